"""An import-only stand-in for torchvision, for the SGLang tests on CPU torch.

SGLang imports torchvision at module level (its multimodal processors), and the published
torchvision wheels are CUDA builds that fail to load against the CPU torch these tests run
on ("operator torchvision::nms does not exist"). The tests never process an image with it:
they need SGLang's modules to import. :func:`install` puts a stand-in into ``sys.modules``
before SGLang is imported: packages whose every attribute is a ``MagicMock``, and a
``__version__`` of 0.0.0 so that transformers' version checks parse it (and treat it as too
old for its torchvision code paths). A real torchvision that imports is left alone.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from unittest import mock

MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
    "torchvision.transforms.InterpolationMode",
    "torchvision.io",
    "torchvision.ops",
    "torchvision.models",
    "torchvision.utils",
)


class _Stub(types.ModuleType):
    """A module whose public attributes are mocks (dunder lookups fail as for a module)."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


def _real_torchvision() -> bool:
    if "torchvision" in sys.modules:
        return not isinstance(sys.modules["torchvision"], _Stub)
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a CUDA build that fails on CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install() -> bool:
    """Install the stand-in unless a working torchvision imports; True when installed."""
    if _real_torchvision():
        return False
    for name in MODULES:
        module = _Stub(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__version__ = "0.0.0"
        sys.modules[name] = module
    for name in MODULES:  # parents expose their children, as after a real import
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    return True
