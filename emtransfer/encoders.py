"""Encoders an encode server runs: what turns a job into the tensors it sends.

An encoder is a callable ``encoder(job) -> tensors | (tensors, meta)`` (it may be a coroutine
function); ``tensors`` maps every field of the settings (``embeddings`` first, then the extra
fields) to a tensor of ``num_tokens`` rows. A job is a dict; the servers send

* ``{"rid": ..., "num_tokens": n}`` -- for the ``synthetic`` encoder,
* ``{"rid": ..., "image": <bytes>, "image_type": "image/jpeg"}`` -- an image's own bytes and
  their media type (nothing decodes it on the way), for the ``vision`` encoder (PNG, JPEG,
  WebP, GIF) or yours.

Built-in encoders (``--encoder NAME``):

``synthetic``  deterministic from ``(rid, num_tokens)`` (a seeded torch RNG), every field filled;
               the payload anybody can rebuild to check what arrived.
``vision``     a small patch encoder with seeded weights: the image is decoded with Pillow, each
               side resized to the nearest multiple of the patch size, one token per patch, a
               linear patch embedding and a tiny residual MLP to ``hidden_size``, computed on
               the settings' ``device`` and cast to its ``dtype``. An extra field
               ``mrope_positions`` (``[3]`` integers) gets the patch's ``(t, row, col)``; other
               extra fields are zeros.
``auto``       (the default) ``vision`` for image jobs, ``synthetic`` for the others.

``module:factory`` loads a user's encoder: ``factory(settings)`` returns the callable. An
encoder that refuses its input raises :class:`JobError`; the language server then answers 400
with the message (any other exception is a 502: the encoder failed, not the input).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError, InvalidRequest
from .settings import Settings

#: how the encode node's "encode failed: ..." abort reason marks the input's fault
JOB_ERROR_PREFIX = "bad job: "
DEFAULT_MAX_TOKENS = 32768
DEFAULT_PATCH_SIZE = 16
#: what the built-in vision encoder decodes (through Pillow)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
#: the media type of an image, from its first bytes
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
BUILTIN = ("synthetic", "vision", "auto")

Encoder = Callable[[dict[str, Any]], Any]


class JobError(InvalidRequest):
    """The job itself is bad (the caller's fault): missing field, undecodable image, too long."""

    def __init__(self, detail: str) -> None:
        super().__init__(JOB_ERROR_PREFIX + detail)
        self.detail = detail


def job_num_tokens(job: dict[str, Any], max_tokens: int) -> int:
    n = job.get("num_tokens")
    if n is None:
        raise JobError("num_tokens is missing")
    if not isinstance(n, int) or isinstance(n, bool):
        raise JobError(f"num_tokens must be an integer, got {n!r}")
    if n <= 0:
        raise JobError(f"num_tokens must be >= 1, got {n}")
    if n > max_tokens:
        raise JobError(f"num_tokens={n} is above the maximum {max_tokens} (--max-tokens)")
    return n


def _job_rid(job: dict[str, Any]) -> str:
    rid = job.get("rid", "")
    if not isinstance(rid, str):
        raise JobError(f"rid must be a string, got {rid!r}")
    return rid


# -- images --------------------------------------------------------------------------------------
def image_type(raw: bytes) -> str:
    """The media type of an image from its first bytes (``application/octet-stream`` when
    unknown: the encoder decides what it takes)."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in _MAGIC if raw.startswith(magic)), "application/octet-stream")


def decode_image_field(data: str) -> tuple[bytes, str]:
    """An HTTP request's ``image`` (base64, a ``data:image/...;base64,`` URL allowed) as raw
    bytes and their media type: the type the data URL names, else the one the bytes show.
    Nothing is decoded as an image here: that is the encoder's business."""
    declared = ""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep:
            raise JobError("image data URL has no ',' before the base64 data")
        declared = head.removeprefix("data:").split(";", 1)[0]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise JobError(f"image is not valid base64: {exc}") from None
    if not raw:
        raise JobError("image is empty")
    return raw, declared or image_type(raw)


def image_bytes(data: object) -> bytes:
    """The raw bytes of a job's image: bytes as they are, or a base64 string (a
    ``data:image/...;base64,`` prefix is allowed)."""
    if isinstance(data, bytes | bytearray | memoryview):
        if not data:
            raise JobError("image is empty")
        return bytes(data)
    if not isinstance(data, str) or not data:
        raise JobError("image must be bytes or a non-empty base64 string")
    return decode_image_field(data)[0]


def open_image(raw: bytes) -> Any:
    """Open (lazily: the header only) a PNG, JPEG, WebP or GIF; JobError when it is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise JobError("image cannot be decoded: not a PNG, JPEG, WebP or GIF") from None
    except (OSError, ValueError) as exc:
        raise JobError(f"image cannot be decoded: {exc}") from None


def check_image(data: object) -> tuple[int, int]:
    """Cheap validation (format, Pillow's ``verify``); returns (width, height)."""
    img = open_image(image_bytes(data))
    try:
        size = img.size
        img.verify()
    except Exception as exc:
        raise JobError(f"image cannot be decoded: {exc}") from None
    return size


def patch_grid(width: int, height: int, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of patches: each side rounded to the nearest multiple, at least one patch."""
    rows = max(1, math.floor(height / patch_size + 0.5))
    cols = max(1, math.floor(width / patch_size + 0.5))
    return rows, cols


# -- encoders ------------------------------------------------------------------------------------
class SyntheticEncoder:
    """Deterministic payload from ``(rid, num_tokens)``: the demo's, so anybody can rebuild it."""

    name = "synthetic"

    def __init__(self, settings: Settings, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.settings = settings
        self.max_tokens = max_tokens

    def __call__(self, job: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from .demo import synthetic_payload

        if "image" in job:
            raise JobError("the synthetic encoder takes num_tokens, not an image")
        n = job_num_tokens(job, self.max_tokens)
        return synthetic_payload(self.settings, _job_rid(job), n), {"num_tokens": n}


class VisionEncoder:
    """A small ViT-style patch encoder with seeded weights (a stand-in for a real one)."""

    name = "vision"

    def __init__(
        self,
        settings: Settings,
        *,
        patch_size: int = DEFAULT_PATCH_SIZE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int = 0,
    ) -> None:
        if patch_size <= 0:
            raise ConfigError(f"invalid patch_size={patch_size}: must be > 0")
        self.settings = settings
        self.patch_size = patch_size
        self.max_tokens = max_tokens
        d_in, hidden = 3 * patch_size * patch_size, settings.hidden_size
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same weights on any device
        self.device = torch.device(settings.device)
        self.w_patch = (torch.randn(d_in, hidden, generator=g) / math.sqrt(d_in)).to(self.device)
        self.b_patch = (torch.randn(hidden, generator=g) * 0.02).to(self.device)
        self.w_mlp = (torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)).to(self.device)

    def __call__(self, job: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if "num_tokens" in job:
            raise JobError("the vision encoder takes an image, not num_tokens")
        if "image" not in job:
            raise JobError("image is missing")
        img = open_image(image_bytes(job["image"]))
        width, height = img.size
        p = self.patch_size
        rows, cols = patch_grid(width, height, p)
        n = rows * cols
        if n > self.max_tokens:  # checked on the header, before decoding the pixels
            raise JobError(
                f"image of {width}x{height} pixels is {n} tokens (patch {p}), above the "
                f"maximum {self.max_tokens} (--max-tokens)"
            )
        try:
            from PIL import Image

            rgb = img.convert("RGB").resize((cols * p, rows * p), Image.Resampling.BICUBIC)
        except Exception as exc:
            raise JobError(f"image cannot be decoded: {exc}") from None
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        x = pixels.view(rows, p, cols, p, 3).permute(0, 2, 1, 3, 4).reshape(n, 3 * p * p)
        x = x.to(self.device).float() / 127.5 - 1.0
        with torch.no_grad():
            h = x @ self.w_patch + self.b_patch
            h = h + torch.nn.functional.gelu(h) @ self.w_mlp
        out: dict[str, torch.Tensor] = {"embeddings": h.to(self.settings.torch_dtype)}
        for name, (shape, dtype) in self.settings.field_specs().items():
            if name == "embeddings":
                continue
            if name == "mrope_positions" and shape == (3,) and not dtype.is_floating_point:
                r = torch.arange(rows, device=self.device).repeat_interleave(cols)
                c = torch.arange(cols, device=self.device).repeat(rows)
                out[name] = torch.stack([torch.zeros_like(r), r, c], dim=1).to(dtype)
            else:
                out[name] = torch.zeros((n, *shape), dtype=dtype, device=self.device)
        meta = {
            "num_tokens": n,
            "grid": [rows, cols],
            "patch_size": p,
            "image_size": [width, height],
        }
        return out, meta


class AutoEncoder:
    """``vision`` for image jobs, ``synthetic`` for the others."""

    name = "auto"

    def __init__(self, synthetic: SyntheticEncoder, vision: VisionEncoder) -> None:
        self.synthetic = synthetic
        self.vision = vision

    def __call__(self, job: dict[str, Any]) -> Any:
        if "image" in job and "num_tokens" in job:
            raise JobError("give either num_tokens or image, not both")
        return (self.vision if "image" in job else self.synthetic)(job)


def load_encoder(
    spec: str,
    settings: Settings,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> Encoder:
    """A built-in encoder by name, or ``module:factory`` (``factory(settings)`` returns it)."""
    if spec == "synthetic":
        return SyntheticEncoder(settings, max_tokens=max_tokens)
    if spec == "vision":
        return VisionEncoder(settings, patch_size=patch_size, max_tokens=max_tokens)
    if spec == "auto":
        return AutoEncoder(
            SyntheticEncoder(settings, max_tokens=max_tokens),
            VisionEncoder(settings, patch_size=patch_size, max_tokens=max_tokens),
        )
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"invalid encoder {spec!r}: choose {', '.join(BUILTIN)} or module:factory"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"invalid encoder {spec!r}: cannot import {module_name!r}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"invalid encoder {spec!r}: module {module_name!r} has no {attr!r}"
            ) from None
    if not callable(obj):
        raise ConfigError(f"invalid encoder {spec!r}: {attr!r} is not callable")
    try:
        encoder = obj(settings)
    except Exception as exc:
        raise ConfigError(f"invalid encoder {spec!r}: the factory failed: {exc!r}") from None
    if not callable(encoder):
        raise ConfigError(f"invalid encoder {spec!r}: the factory returned {encoder!r}")
    return encoder


__all__ = [
    "BUILTIN",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PATCH_SIZE",
    "IMAGE_FORMATS",
    "JOB_ERROR_PREFIX",
    "AutoEncoder",
    "Encoder",
    "JobError",
    "SyntheticEncoder",
    "VisionEncoder",
    "check_image",
    "decode_image_field",
    "image_type",
    "load_encoder",
    "patch_grid",
]
