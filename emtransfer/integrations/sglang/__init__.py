"""emtransfer as SGLang's encoder transfer backend (encode / prefill disaggregation).

One call, in every SGLang process that encodes or schedules::

    import emtransfer.integrations.sglang as et_sglang
    et_sglang.register()      # version-checked, idempotent; et_sglang.unregister() undoes it

then SGLang runs with ``--encoder-transfer-backend zmq_to_scheduler``: the encoder's rank 0
delivers every part through an emtransfer encode node, and each scheduler rank receives it
through an emtransfer language node (polled each tick; the TP group agrees by ``MIN`` as
SGLang does). The launcher does both for a command line, in the main process and in every
process SGLang spawns::

    python -m emtransfer.integrations.sglang.launch --encoder-transfer-backend emtransfer ...

``docs/sglang.md`` describes the design, the patch, the state mapping and what was tested;
``examples/sglang.md`` the launch. Importing this package does not import SGLang;
:func:`register` does.
"""

from __future__ import annotations

import os
from typing import Any

from .patch import (
    SUPPORTED_VERSIONS,
    UnsupportedSGLang,
    check_sglang,
    is_registered,
    register,
    sglang_version,
    unregister,
)

#: set to 1 to make :func:`sglang_plugin` register (the launcher sets it for its children)
ENABLE_ENV = "EMTRANSFER_SGLANG"


def sglang_plugin() -> None:
    """An entry point for SGLang's plugin loader (group ``sglang.srt.plugins``), which SGLang
    0.5.23 runs in its main, scheduler, detokenizer and data-parallel processes: registers
    when ``EMTRANSFER_SGLANG=1``, and does nothing otherwise."""
    if os.environ.get(ENABLE_ENV, "").strip() in ("1", "true", "yes"):
        register()


def __getattr__(name: str) -> Any:
    """The classes that subclass SGLang's import SGLang: loaded on first use."""
    if name in ("EmtransferWaitingRequest", "LanguageLink", "default_language_link"):
        from . import receiver

        return getattr(receiver, name)
    if name in ("EmtransferDelivery", "EncoderLink", "default_encoder_link", "install_delivery"):
        from . import delivery

        return getattr(delivery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENABLE_ENV",
    "SUPPORTED_VERSIONS",
    "EmtransferDelivery",
    "EmtransferWaitingRequest",
    "EncoderLink",
    "LanguageLink",
    "UnsupportedSGLang",
    "check_sglang",
    "default_encoder_link",
    "default_language_link",
    "install_delivery",
    "is_registered",
    "register",
    "sglang_plugin",
    "sglang_version",
    "unregister",
]
