"""Buffer registry: one pool tensor per field, registered once with the transport, and the
translation from token runs to byte descriptors.

A pool for a field of shape ``S`` is ``[num_blocks * block_size, *S]``; slot ``s`` of it is
``pool[s]``. Data is moved only along :class:`~emtransfer.allocator.Allocation` segments, so
bytes land in the blocks a request owns and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import hugepages
from .allocator import Allocation, Run
from .errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from .settings import Settings

EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One contiguous copy of ``nbytes`` within one field's pools (offsets in bytes from the
    start of the sender's and the receiver's pool of that field)."""

    field: str
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class FieldLayout:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    token_nbytes: int


def check_device(device: str) -> None:
    """A CUDA device this torch can use, or :class:`ConfigError` saying why not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        raise ConfigError(
            f"invalid setting device={device!r}: this torch ({torch.__version__}) is built "
            "without CUDA; install a CUDA build of torch or use device='cpu'"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(f"invalid setting device={device!r}: no CUDA device is visible")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"invalid setting device={device!r}: only {count} CUDA device(s) visible "
            f"(cuda:0..cuda:{count - 1})"
        )


class BufferRegistry:
    """The pools of one node, one tensor per field, on ``device``."""

    def __init__(
        self,
        fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        num_blocks: int,
        block_size: int,
        device: str | torch.device = "cpu",
        output_hugepages: bool = False,
    ) -> None:
        """``output_hugepages``: fresh CPU outputs (:meth:`empty_like_payload`) of at least
        :data:`emtransfer.hugepages.MIN_BYTES` get transparent huge pages."""
        if EMBEDDINGS not in fields:
            raise PayloadError(f"fields must include {EMBEDDINGS!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.device = torch.device(device)
        self.output_hugepages = output_hugepages
        self.layouts: dict[str, FieldLayout] = {}
        self.pools: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in fields.items():
            elem = torch.empty((), dtype=dtype).element_size()
            self.layouts[name] = FieldLayout(name, tuple(shape), dtype, math.prod(shape) * elem)
            self.pools[name] = torch.zeros(
                (self.num_slots, *shape), dtype=dtype, device=self.device
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> BufferRegistry:
        check_device(settings.device)
        return cls(
            settings.field_specs(),
            num_blocks=settings.num_blocks,
            block_size=settings.block_size,
            device=settings.device,
            output_hugepages=settings.output_hugepages,
        )

    @property
    def token_nbytes(self) -> int:
        """Bytes one token occupies across all fields."""
        return sum(f.token_nbytes for f in self.layouts.values())

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.token_nbytes

    # -- validation ----------------------------------------------------------------------------
    def check_payload(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Validate a payload against the fields and return its token count."""
        if not isinstance(tensors, Mapping):
            raise PayloadError(
                f"payload must be a mapping of field name to tensor, got {type(tensors).__name__}"
            )
        unknown = set(tensors) - set(self.layouts)
        if unknown:
            raise PayloadError(
                f"unknown fields {sorted(unknown, key=str)}; this node has {list(self.layouts)}"
            )
        missing = set(self.layouts) - set(tensors)
        if missing:
            raise PayloadError(f"missing fields {sorted(missing)}")
        n: int | None = None
        for name, lay in self.layouts.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise PayloadError(f"field {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1 + len(lay.shape) or tuple(t.shape[1:]) != lay.shape:
                raise PayloadError(
                    f"field {name!r} must have shape [num_tokens, {', '.join(map(str, lay.shape))}], "
                    f"got {list(t.shape)}"
                )
            if t.dtype != lay.dtype:
                raise PayloadError(f"field {name!r} must have dtype {lay.dtype}, got {t.dtype}")
            if t.shape[0] == 0:
                raise PayloadError(f"field {name!r} is empty (0 tokens)")
            if n is None:
                n = int(t.shape[0])
            elif t.shape[0] != n:
                raise PayloadError(
                    f"field {name!r} has {t.shape[0]} tokens but {EMBEDDINGS!r} has {n}"
                )
        assert n is not None
        return n

    # -- local copies --------------------------------------------------------------------------
    def write(
        self,
        allocation: Allocation,
        tensors: Mapping[str, torch.Tensor],
        *,
        count: int,
        src_start: int = 0,
        dst_start: int = 0,
    ) -> None:
        """Copy tokens ``[src_start, src_start + count)`` of ``tensors`` into tokens
        ``[dst_start, ...)`` of ``allocation``."""
        segs = list(allocation.segments(dst_start, count))
        for name, pool in self.pools.items():
            src = tensors[name]
            for tok, slot, n in segs:
                s = src_start + tok - dst_start
                pool[slot : slot + n].copy_(src[s : s + n], non_blocking=True)
        self._sync()

    def read_into(
        self,
        allocation: Allocation,
        out: Mapping[str, torch.Tensor],
        *,
        count: int,
        start: int = 0,
        out_start: int = 0,
    ) -> None:
        """Copy tokens ``[start, start + count)`` of ``allocation`` into ``out`` from ``out_start``."""
        segs = list(allocation.segments(start, count))
        for name, pool in self.pools.items():
            dst = out[name]
            for tok, slot, n in segs:
                o = out_start + tok - start
                dst[o : o + n].copy_(pool[slot : slot + n], non_blocking=True)
        self._sync()

    def _sync(self) -> None:
        """A transport reads (or the allocator recycles) the pool right after a copy: on a
        CUDA pool wait for the copies queued on the current stream."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def empty_like_payload(
        self, num_tokens: int, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh tensors for ``num_tokens`` tokens of every field (not yet touched: huge pages
        asked for, see ``output_hugepages``)."""
        dev = self.device if device is None else torch.device(device)
        out = {
            name: torch.empty((num_tokens, *lay.shape), dtype=lay.dtype, device=dev)
            for name, lay in self.layouts.items()
        }
        if self.output_hugepages and dev.type == "cpu":
            for t in out.values():
                hugepages.advise(t)
        return out

    def read(
        self, allocation: Allocation, *, count: int, start: int = 0
    ) -> dict[str, torch.Tensor]:
        """Tokens of ``allocation`` as new contiguous tensors."""
        out = self.empty_like_payload(count)
        self.read_into(allocation, out, count=count, start=start)
        return out

    def views(self, allocation: Allocation, *, count: int) -> dict[str, torch.Tensor] | None:
        """Zero-copy views of the first ``count`` tokens when they occupy consecutive slots."""
        segs = list(allocation.segments(0, count))
        if len(segs) != 1:
            return None
        _, slot, n = segs[0]
        return {name: pool[slot : slot + n] for name, pool in self.pools.items()}

    # -- descriptors ---------------------------------------------------------------------------
    def write_ops(self, runs: list[Run]) -> list[WriteOp]:
        """Byte descriptors for ``runs``: one per run and field."""
        ops: list[WriteOp] = []
        for name, lay in self.layouts.items():
            tb = lay.token_nbytes
            ops.extend(WriteOp(name, r.src_slot * tb, r.dst_slot * tb, r.length * tb) for r in runs)
        return ops

    def byte_view(self, field: str) -> torch.Tensor:
        """The pool of ``field`` as a flat uint8 tensor (shares memory)."""
        return self.pools[field].view(-1).view(torch.uint8)


def payload_digest(tensors: Mapping[str, torch.Tensor], order: list[str] | None = None) -> str:
    """SHA-256 over the raw bytes of every field, in ``order`` (default: sorted names)."""
    import hashlib

    h = hashlib.sha256()
    for name in order or sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
