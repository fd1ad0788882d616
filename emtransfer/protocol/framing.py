"""Length-prefixed framing of control messages (sans-IO).

A frame is a 4-byte big-endian length followed by that many bytes of one encoded message.
The length is checked against a hard limit *before* anything is buffered, so a peer cannot
make us allocate more than ``max_frame`` bytes.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError
from . import messages as m

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20


def frame(msg: m.Message) -> bytes:
    body = m.encode(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes in, take frame bodies out. A bad length raises :class:`ProtocolError` and
    the decoder stays broken (the stream cannot be resynchronised); the bodies are decoded
    one by one by :func:`messages.decode`, so one invalid message does not end the stream."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None
        self._broken: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        out: list[bytes] = []
        try:
            while True:
                if self._need is None:
                    if len(self._buf) < HEADER.size:
                        break
                    (n,) = HEADER.unpack_from(self._buf)
                    if n == 0 or n > self.max_frame:
                        raise ProtocolError(f"frame length {n} outside 1..{self.max_frame}")
                    del self._buf[: HEADER.size]
                    self._need = n
                if len(self._buf) < self._need:
                    break
                body = bytes(self._buf[: self._need])
                del self._buf[: self._need]
                self._need = None
                out.append(body)
        except ProtocolError as exc:
            self._broken = exc
            self._buf.clear()  # keep nothing of a stream we refused
            raise
        return out
