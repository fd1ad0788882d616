"""Wire messages of the control connection, versioned and validated on receipt.

Encoded as msgpack through msgspec: a tagged union decoded against typed structs, so a
message with a wrong type, a missing field, an unknown field or a value out of range is
refused with a :class:`ProtocolError` that says what was wrong.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

from ..errors import AbortKind, ProtocolError

PROTOCOL_VERSION = 6
MAX_RID_LEN = 256
MAX_BLOCKS = 1 << 16
#: a large value of an Encode job (an image's bytes) travels in JobParts of at most this
PART_BYTES = 256 << 10

Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_RID_LEN)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Pos = Annotated[int, msgspec.Meta(gt=0)]
Blocks = Annotated[list[NonNeg], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)]
Reason = Annotated[str, msgspec.Meta(max_length=4096)]
SessionTag = Annotated[str, msgspec.Meta(max_length=64)]
#: a moment on the sender's monotonic clock, in microseconds. The sender stamps its Heartbeat,
#: HelloAck and ChunkDone; a receiver echoes the latest stamp it has seen in each grant, so the
#: sender can start the grant's lifetime at a moment that surely came before the grant
Stamp = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
#: the lifetime of a grant, in milliseconds from its stamp
TtlMs = Annotated[int, msgspec.Meta(ge=0, le=86_400_000)]


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of every control message."""


class Challenge(Message, tag="challenge", frozen=True):
    """Encode -> language, first on a new connection: the nonce the client's proof covers."""

    version: int
    nonce: bytes


class Hello(Message, tag="hello", frozen=True):
    version: int
    role: str
    node_id: str
    fingerprint: dict[str, Any]
    num_blocks: Pos
    transport: str
    transport_meta: bytes = b""
    nonce: bytes = b""
    auth: bytes = b""
    stamp: Stamp = 0


class HelloAck(Message, tag="hello_ack", frozen=True):
    version: int
    role: str
    node_id: str
    fingerprint: dict[str, Any]
    num_blocks: Pos
    transport: str
    transport_meta: bytes = b""
    auth: bytes = b""
    stamp: Stamp = 0


class Init(Message, tag="init", frozen=True):
    """Language -> encode: the receiver's first allocation for ``rid``: a grant that lives
    ``ttl_ms`` from the sender's ``stamp`` (no write may be posted after that)."""

    rid: Rid
    blocks: Blocks
    capacity_tokens: Pos
    expected_tokens: Pos | None = None
    #: the receiver's name for this attempt: data-plane tags carry it, so bytes of an
    #: abandoned attempt can never be taken for those of a new request reusing the rid
    session: SessionTag = ""
    stamp: Stamp = 0
    ttl_ms: TtlMs = 0


class ChunkDone(Message, tag="chunk", frozen=True):
    """Encode -> language: the write of ``round`` completed; ``total_tokens`` on every round."""

    rid: Rid
    round: NonNeg
    start: NonNeg
    count: Pos
    total_tokens: Pos
    is_last: bool
    meta: dict[str, Any] | None = None
    digest: str | None = None
    stamp: Stamp = 0


class Total(Message, tag="total", frozen=True):
    """Encode -> language, before round 0's write, when round 0's allocation cannot hold the
    payload: its length, so the receiver can grant round 1 while round 0 is on the wire."""

    rid: Rid
    total_tokens: Pos
    session: SessionTag = ""


class Resume(Message, tag="resume", frozen=True):
    """Language -> encode: the receiver's next allocation (round >= 1), a grant like Init's.
    ``received_tokens`` is where the round starts: the tokens of the rounds before it (a
    Resume sent while the previous round is still written counts that round as full)."""

    rid: Rid
    round: Pos
    blocks: Blocks
    capacity_tokens: Pos
    received_tokens: Pos
    stamp: Stamp = 0
    ttl_ms: TtlMs = 0


class Abort(Message, tag="abort", frozen=True):
    """Either way. From the sender it also says that no write of ``session`` is in flight."""

    rid: Rid
    reason: Reason = ""
    session: SessionTag = ""
    #: why, for the caller's typed error: "" (plain), "unavailable" (shutting down or over a
    #: limit: retry), "refused" (the encoder refused the job's input), "encoder_failed"
    kind: AbortKind = ""


class AbortAck(Message, tag="abort_ack", frozen=True):
    """Confirms that no write for ``rid`` (attempt ``session``) is in flight any more."""

    rid: Rid
    session: SessionTag = ""


class Heartbeat(Message, tag="heartbeat", frozen=True):
    seq: NonNeg = 0
    stamp: Stamp = 0


class JobPart(Message, tag="job_part", frozen=True):
    """A piece of a large value of an Encode job, sent before its Encode: ``data`` is appended
    to the value of ``key`` in the job of (rid, session)."""

    rid: Rid
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    data: Annotated[bytes, msgspec.Meta(min_length=1, max_length=PART_BYTES)]
    session: SessionTag = ""


class Encode(Message, tag="encode", frozen=True):
    """Language asks its encoder to compute the embedding for ``rid``; the result belongs to
    the sending peer's attempt ``session`` (its Init carries the same tag). ``parts``: how many
    JobParts of this attempt came before it (their values join ``job``)."""

    rid: Rid
    job: dict[str, Any]
    session: SessionTag = ""
    parts: NonNeg = 0


class Error(Message, tag="error", frozen=True):
    """A refusal of a message that could not be tied to a request (bad frame, bad handshake).
    ``kind`` is ``"config"`` when the two nodes' settings disagree."""

    reason: Reason
    kind: str = ""


class InvalidMessage(ProtocolError):
    """One message failed validation; the stream around it is intact. ``rid`` is the request
    it seems to belong to, when that much could be read."""

    def __init__(self, text: str, rid: str | None = None) -> None:
        super().__init__(text)
        self.rid = rid


def reason(text: str) -> str:
    """A reason that fits in a message (long ones are cut, never refused)."""
    return text if len(text) <= 4000 else text[:3990] + " [...]"


AnyMessage = Union[  # noqa: UP007 - msgspec needs a runtime Union of the tagged structs
    Challenge,
    Hello,
    HelloAck,
    Init,
    ChunkDone,
    Total,
    Resume,
    Abort,
    AbortAck,
    Heartbeat,
    JobPart,
    Encode,
    Error,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | bytearray | memoryview) -> AnyMessage:
    """Decode and validate one message; anything malformed raises :class:`InvalidMessage`."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(f"invalid message: {exc}", _guess_rid(data)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise InvalidMessage(f"undecodable message: {type(exc).__name__}: {exc}") from None


def _guess_rid(data: bytes | bytearray | memoryview) -> str | None:
    try:
        raw = msgspec.msgpack.decode(data)
    except Exception:
        return None
    rid = raw.get("rid") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_RID_LEN else None
