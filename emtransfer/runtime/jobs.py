"""Encode jobs larger than one control message: their large ``bytes`` values (an image) travel
as :class:`~emtransfer.protocol.messages.JobPart` pieces before the ``Encode`` that names how
many came, and are joined again on the encode node, within ``max_job_bytes`` per job."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..protocol import messages as m

#: a bytes value of a job longer than this travels in pieces (the rest stays in the Encode)
INLINE_BYTES = 64 << 10
#: the Encode message itself (job without its pieces) stays well inside one frame
MAX_INLINE_JOB = 512 << 10


def split_job(
    rid: str, job: dict[str, Any], max_job_bytes: int
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """``job`` without its long bytes values, and those values as ``(key, piece)`` in order.
    InvalidRequest when the job is larger than ``max_job_bytes`` or cannot travel."""
    inline: dict[str, Any] = {}
    pieces: list[tuple[str, bytes]] = []
    total = 0
    for key, value in job.items():
        if isinstance(value, bytearray | memoryview):
            value = bytes(value)
        if isinstance(value, bytes) and len(value) > INLINE_BYTES:
            if not 0 < len(key) <= 64:
                raise InvalidRequest(
                    f"job of rid={rid!r}: key {key[:70]!r} is not 1..64 characters"
                )
            total += len(value)
            step = m.PART_BYTES
            pieces += [(key, value[i : i + step]) for i in range(0, len(value), step)]
        else:
            inline[key] = value
    small = len(m.encode(m.Encode(rid=rid, job=inline)))
    if total + small > max_job_bytes:
        raise InvalidRequest(
            f"job of rid={rid!r} is {total + small} bytes, above max_job_bytes={max_job_bytes}"
        )
    if small > MAX_INLINE_JOB:
        raise InvalidRequest(
            f"job of rid={rid!r}: {small} bytes besides its bytes values, above {MAX_INLINE_JOB} "
            "(send large values, such as an image, as bytes: those travel in pieces)"
        )
    return inline, pieces


class JobPieces:
    """The pieces of one job arriving on the encode node, bounded by ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values: dict[str, bytearray] = {}
        self.count = 0
        self.nbytes = 0

    def add(self, key: str, data: bytes) -> str | None:
        """Append a piece; why it cannot be taken (the job is too large), or None."""
        self.nbytes += len(data)
        self.count += 1
        if self.nbytes > self.limit:
            return f"job larger than max_job_bytes={self.limit}"
        self.values.setdefault(key, bytearray()).extend(data)
        return None

    def join(self, inline: dict[str, Any], parts: int) -> dict[str, Any]:
        """The whole job, once its Encode came; InvalidRequest when the pieces do not match."""
        if parts != self.count:
            raise InvalidRequest(f"the Encode names {parts} pieces, {self.count} arrived")
        if clash := sorted(set(self.values) & set(inline)):
            raise InvalidRequest(f"job keys both inline and in pieces: {clash}")
        return {**inline, **{k: bytes(v) for k, v in self.values.items()}}
