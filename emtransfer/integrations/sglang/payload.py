"""SGLang's per-part embedding message (``EmbeddingData``) as an emtransfer payload, and back.

What SGLang's ZMQ backends carry for one part is a pickled ``EmbeddingData`` without its
embedding (``copy_without_embedding``: every public attribute) plus the embedding's bytes as a
second frame. Here the same part travels as:

- the ``embeddings`` field: the embedding, ``[num_tokens, hidden_size]`` in the model's dtype;
- one more field per extra per-token field of the node's settings (``Settings.fields``), taken
  from the ``EmbeddingData`` attribute of the same name: e.g. ``mrope_positions`` ``[3]``
  int64 when an encoder attaches M-RoPE positions to its parts;
- ``meta["sglang"]``: every other public attribute, typed (tensors by dtype, shape and raw
  bytes; tuples, dicts, dtypes and SGLang's ``Modality`` tagged), so what arrives is equal
  byte for byte: ``req_id``, ``num_parts``, ``part_idx``, ``modality``, ``grid_dim``
  (per-item grids), ``shape``, ``dtype``, ``error_msg``/``error_code``, and the per-model
  extras (``video_timestamps``, ``second_per_grid_ts``, ``original_image_sizes``, MiMo's
  audio-in-video fields, ``mrope_position_delta``...).

No pickle crosses the wire: the receiver rebuilds the object from typed values only, and
refuses a type it does not know. An encoder's error (``error_msg`` set, no embedding) and an
empty embedding travel as a one-token placeholder with ``tokens: 0`` in the meta (emtransfer
payloads have at least one token).
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch
from sglang.srt.disaggregation.encoder.receiver import (  # type: ignore[import-untyped]
    EmbeddingData,
)
from sglang.srt.managers.schedule_batch import Modality  # type: ignore[import-untyped]

from ...errors import PayloadError
from ...runtime import Received
from ...settings import Settings

#: the key of the meta entry this module owns
META_KEY = "sglang"
#: version of the layout of meta["sglang"]
LAYOUT = 1
#: metadata larger than this would not fit emtransfer's control frame (1 MiB) with headroom
MAX_META_BYTES = 512 << 10
EMBEDDINGS = "embeddings"

_TENSOR, _TUPLE, _DICT, _DTYPE, _MODALITY = "__tensor", "__tuple", "__dict", "__dtype", "__modality"
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# -- values ------------------------------------------------------------------------------------
def encode_value(value: Any, where: str = "value") -> Any:
    """A plain, msgpack-able form of ``value`` that :func:`decode_value` turns back into an
    equal value. Raises :class:`PayloadError` naming ``where`` for a type it cannot carry."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, Modality):
        return {_MODALITY: value.name}
    if isinstance(value, torch.dtype):
        return {_DTYPE: _dtype_name(value, where)}
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {_TENSOR: [_dtype_name(t.dtype, where), list(t.shape), data]}
    if isinstance(value, list):
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PayloadError(f"{where}: dict keys must be strings, got {k!r}")
            out[k] = encode_value(v, f"{where}.{k}")
        return {_DICT: out}
    numpy_value = _from_numpy(value)
    if numpy_value is not None:
        return encode_value(numpy_value, where)
    raise PayloadError(f"{where}: cannot carry a {type(value).__name__} in the metadata")


def decode_value(value: Any, where: str = "value") -> Any:
    """The value :func:`encode_value` encoded. Refuses anything it would not have written."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, list):
        return [decode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, body),) = value.items()
        if tag == _TENSOR:
            dtype_name, shape, data = body
            dtype = _dtype_of(dtype_name, where)
            if not data:
                return torch.empty(shape, dtype=dtype)
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return flat.view(dtype).reshape(shape)
        if tag == _TUPLE:
            return tuple(decode_value(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == _DICT:
            return {k: decode_value(v, f"{where}.{k}") for k, v in body.items()}
        if tag == _DTYPE:
            return _dtype_of(body, where)
        if tag == _MODALITY:
            try:
                return Modality[body]
            except KeyError:
                raise PayloadError(f"{where}: unknown modality {body!r}") from None
    raise PayloadError(f"{where}: unexpected {type(value).__name__} in the metadata")


def _dtype_name(dtype: torch.dtype, where: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise PayloadError(f"{where}: tensors of dtype {dtype} are not carried")
    return name


def _dtype_of(name: object, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise PayloadError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


def _from_numpy(value: Any) -> Any:
    """A numpy array as a tensor (object arrays as lists), a numpy scalar as a Python one;
    None for anything else. SGLang normalises numpy values the same way before pickling."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - torch needs numpy
        return None
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return value.tolist()
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return None


# -- parts ---------------------------------------------------------------------------------------
def public_attrs(mm_data: Any) -> dict[str, Any]:
    """What SGLang's ZMQ path carries of a part besides the embedding: every public attribute
    (as ``EmbeddingData.copy_without_embedding`` copies them)."""
    return {k: v for k, v in vars(mm_data).items() if not k.startswith("_") and k != "embedding"}


def to_payload(mm_data: Any, settings: Settings) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` for one ``EmbeddingData`` part, for a node with ``settings``."""
    attrs = public_attrs(mm_data)
    embedding = getattr(mm_data, "embedding", None)
    failed = attrs.get("error_msg") is not None
    if not failed and not isinstance(embedding, torch.Tensor):
        raise PayloadError(f"part {attrs.get('req_id')!r} has neither an embedding nor an error")
    tokens = 0 if failed else int(embedding.shape[0])  # type: ignore[union-attr]
    tensors: dict[str, torch.Tensor] = {}
    dtype = getattr(torch, settings.dtype)
    if tokens == 0:  # an error or an empty embedding: one placeholder token
        tensors[EMBEDDINGS] = torch.zeros(1, settings.hidden_size, dtype=dtype)
    else:
        assert isinstance(embedding, torch.Tensor)
        tensors[EMBEDDINGS] = embedding.reshape(tokens, -1)
    fields = []
    for name, spec in settings.fields.items():
        value = attrs.pop(name, None)
        field_dtype = getattr(torch, spec.dtype)
        if tokens == 0:
            tensors[name] = torch.zeros(1, *spec.shape, dtype=field_dtype)
            if value is not None:
                attrs[name] = value  # an empty one: it travels in the meta
            continue
        if not isinstance(value, torch.Tensor):
            raise PayloadError(
                f"part {attrs.get('req_id')!r}: the settings carry the per-token field "
                f"{name!r}, but the part has no tensor attribute {name!r}"
            )
        tensors[name] = value
        fields.append(name)
    meta = {
        META_KEY: {
            "layout": LAYOUT,
            "tokens": tokens,
            "fields": fields,
            "attrs": encode_value(attrs, "EmbeddingData"),
        }
    }
    size = len(msgspec.msgpack.encode(meta))
    if size > MAX_META_BYTES:
        raise PayloadError(
            f"part {attrs.get('req_id')!r}: its metadata takes {size} bytes, more than "
            f"{MAX_META_BYTES}; carry large per-token tensors as fields (Settings.fields)"
        )
    return tensors, meta


def from_received(got: Received) -> Any:
    """The ``EmbeddingData`` part that :func:`to_payload` sent, rebuilt from typed values:
    its embedding (``got.tensors["embeddings"]``, no copy), every attribute, and the per-token
    fields as attributes of their names."""
    block = got.meta.get(META_KEY) if isinstance(got.meta, dict) else None
    if not isinstance(block, dict) or block.get("layout") != LAYOUT:
        raise PayloadError(f"rid {got.rid!r}: no SGLang part (layout {LAYOUT}) in the metadata")
    attrs = decode_value(block.get("attrs"), "EmbeddingData")
    tokens = block.get("tokens")
    if not isinstance(attrs, dict) or not isinstance(tokens, int) or tokens < 0:
        raise PayloadError(f"rid {got.rid!r}: malformed SGLang part metadata")
    for key in ("req_id", "num_parts", "part_idx", "modality"):
        if key not in attrs:
            raise PayloadError(f"rid {got.rid!r}: the part has no {key!r}")
    embedding = got.tensors[EMBEDDINGS] if tokens else None
    if tokens and got.num_tokens != tokens:
        raise PayloadError(f"rid {got.rid!r}: {got.num_tokens} tokens arrived, {tokens} were sent")
    part = EmbeddingData(
        attrs["req_id"],
        attrs["num_parts"],
        attrs["part_idx"],
        attrs.get("grid_dim"),
        attrs["modality"],
        embedding=None,
        embedding_shape=attrs.get("shape"),
        error_msg=attrs.get("error_msg"),
        error_code=attrs.get("error_code"),
    )
    for key, value in attrs.items():  # as copy_without_embedding does
        setattr(part, key, value)
    if embedding is None and attrs.get("error_msg") is None and attrs.get("shape") is not None:
        shape = attrs["shape"]
        embedding = torch.empty(shape, dtype=attrs.get("dtype") or got.tensors[EMBEDDINGS].dtype)
    part.embedding = embedding
    for name in block.get("fields") or ():
        if name not in got.tensors:
            raise PayloadError(f"rid {got.rid!r}: field {name!r} did not arrive")
        setattr(part, name, got.tensors[name])
    return part


__all__ = [
    "EMBEDDINGS",
    "LAYOUT",
    "MAX_META_BYTES",
    "META_KEY",
    "decode_value",
    "encode_value",
    "from_received",
    "public_attrs",
    "to_payload",
]
