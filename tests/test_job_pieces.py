"""Large Encode jobs travel as JobPart pieces before their Encode. Splitting and joining are
exact; a hostile or broken client gets a typed refusal and cannot make the encode node hold more
than ``max_inflight_per_peer`` jobs of at most ``max_job_bytes`` each; a cancelled caller's
pieces are dropped."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from helpers_runtime import make_payload, make_settings, wait_until
from test_control import raw_client

import emtransfer as et
from emtransfer.protocol import messages as m
from emtransfer.runtime.jobs import INLINE_BYTES, JobPieces, split_job

pytestmark = pytest.mark.timeout(30)


def test_split_and_join_are_exact() -> None:
    raw = bytes(range(256)) * 5000  # 1.28 MB: five pieces
    small = b"x" * INLINE_BYTES  # stays inline
    inline, pieces = split_job("r", {"image": raw, "thumb": small, "n": 3}, 4 << 20)
    assert inline == {"thumb": small, "n": 3}
    assert [k for k, _ in pieces] == ["image"] * 5
    assert all(0 < len(d) <= m.PART_BYTES for _, d in pieces)
    got = JobPieces(4 << 20)
    for key, data in pieces:
        assert got.add(key, data) is None
    assert got.join(inline, len(pieces)) == {"image": raw, "thumb": small, "n": 3}
    with pytest.raises(et.InvalidRequest, match="names 4 pieces, 5 arrived"):
        got.join(inline, 4)
    with pytest.raises(et.InvalidRequest, match="both inline and in pieces"):
        got.join({"image": b""}, 5)


def test_a_job_above_max_job_bytes_or_too_large_inline_is_refused() -> None:
    with pytest.raises(et.InvalidRequest, match="above max_job_bytes=1000000"):
        split_job("r", {"image": b"\0" * 1_000_001}, 1_000_000)
    with pytest.raises(et.InvalidRequest, match="send large values, such as an image, as bytes"):
        split_job("r", {"image": "A" * (600 << 10)}, 4 << 20)


def _encoder(job: dict[str, Any]) -> Any:
    digest = hashlib.sha256(job["image"]).hexdigest()
    return make_payload(32), {"sha": digest, "n": len(job["image"]), "k": job.get("k")}


async def test_a_large_job_arrives_whole_over_tcp() -> None:
    s = make_settings(transport="tcp")
    raw = b"\x07" * (3 << 20) + b"end"
    async with et.EncodeNode(s, control="tcp", encoder=_encoder) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        got = await lang.encode("big", peer, {"image": raw, "k": "v"})
        assert got.meta == {"sha": hashlib.sha256(raw).hexdigest(), "n": len(raw), "k": "v"}
        assert all(not p.job_pieces for p in enc.peers.values())


async def _raw(enc: et.EncodeNode, lang: et.LanguageNode) -> Any:
    conn, reply = await raw_client(enc.address, lang._hello_fields())
    assert isinstance(reply, m.HelloAck), reply
    await wait_until(lambda: bool(enc.peers_named("raw-language")), 5, "raw peer")
    return conn, enc.peers_named("raw-language")[0]


async def _abort_for(conn: Any, rid: str) -> m.Abort:
    while True:
        msg = await asyncio.wait_for(conn.recv(), 5)
        if isinstance(msg, m.Abort) and msg.rid == rid:
            return msg


async def test_a_hostile_client_cannot_make_the_encode_node_hold_much() -> None:
    limit, job_max = 3, 1 << 20
    s = make_settings(transport="tcp", max_inflight_per_peer=limit, max_job_bytes=job_max)
    piece = b"\xaa" * m.PART_BYTES
    async with et.EncodeNode(s, control="tcp", encoder=_encoder) as enc, et.LanguageNode(s) as lang:
        conn, raw_peer = await _raw(enc, lang)
        # one job past max_job_bytes: refused once (typed), its further pieces dropped silently
        for _ in range(6):
            conn.send(m.JobPart(rid="huge", key="image", data=piece, session="s"))
        abort = await _abort_for(conn, "huge")
        assert abort.kind == "refused" and "max_job_bytes=1048576" in abort.reason
        # many jobs started, never finished: at most `limit` held, the oldest evicted
        for i in range(10):
            conn.send(m.JobPart(rid=f"left-{i}", key="image", data=piece, session="s"))
        conn.send(m.Encode(rid="left-0", job={}, session="s", parts=1))  # evicted: refused
        abort = await _abort_for(conn, "left-0")
        assert abort.kind == "refused" and "none arrived" in abort.reason
        held = [k for k, v in raw_peer.job_pieces.items() if isinstance(v, JobPieces)]
        assert len(raw_peer.job_pieces) <= limit and len(held) <= limit
        # an Encode naming more pieces than came: refused
        conn.send(m.JobPart(rid="short", key="image", data=b"abc", session="s"))
        conn.send(m.Encode(rid="short", job={}, session="s", parts=2))
        abort = await _abort_for(conn, "short")
        assert "names 2 pieces, 1 arrived" in abort.reason
        # an Abort drops what arrived of a job
        conn.send(m.JobPart(rid="dropped", key="image", data=b"abc", session="t"))
        conn.send(m.Abort(rid="dropped", reason="cancelled", session="t"))
        await wait_until(lambda: ("dropped", "t") not in raw_peer.job_pieces, 5, "pieces dropped")
        # a piece longer than PART_BYTES is an invalid message: the stream goes on
        with pytest.raises(m.InvalidMessage, match="length <= 262144"):
            m.decode(m.encode(m.JobPart(rid="x", key="image", data=piece + b"!")))
        conn.close()


async def test_a_cancelled_caller_leaves_no_pieces_behind() -> None:
    s = make_settings(transport="tcp")
    gate = asyncio.Event()
    async with et.EncodeNode(s, control="tcp", encoder=_encoder) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        original = peer.channel.drain

        async def stalled() -> None:  # the socket is slow: the caller gives up mid-job
            await original()
            await gate.wait()

        peer.channel.drain = stalled  # type: ignore[method-assign]
        call = asyncio.create_task(lang.encode("gone", peer, {"image": b"\0" * (2 << 20)}))
        await wait_until(lambda: any(p.job_pieces for p in enc.peers.values()), 5, "a piece")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: all(not p.job_pieces for p in enc.peers.values()), 5, "dropped")
        peer.channel.drain = original  # type: ignore[method-assign]
        got = await lang.encode("after", peer, {"image": b"\1" * (1 << 20)})
        assert got.meta["n"] == 1 << 20
