"""Bad input through the public API, and a misbehaving peer: a clear, typed error, no effect on
other requests, and both pools full afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from helpers_runtime import (
    BLOCK,
    HIDDEN,
    assert_pools_clean,
    assert_same_payload,
    connected,
    grant,
    make_payload,
    make_settings,
    raises_typed,
    sender_session,
    state_of,
    wait_pools_clean,
    wait_receive_ready,
    wait_until,
)

import emtransfer as et
from emtransfer.protocol import messages as m
from emtransfer.runtime.node import data_tag


def _settings(**kw: Any) -> et.Settings:
    return make_settings(num_blocks=16, default_blocks=4, **kw)


async def _complete(
    enc: et.EncodeNode, lang: et.LanguageNode, peer: et.Peer, rid: str, n: int = 40
) -> None:
    payload = make_payload(n, seed=len(rid))
    send = asyncio.create_task(enc.send(rid, payload, meta={"rid": rid}))
    got = await asyncio.wait_for(lang.receive(rid, peer), 10)
    await asyncio.wait_for(send, 10)
    assert_same_payload(got.tensors, payload)
    assert got.meta == {"rid": rid}


# --------------------------------------------------------------------------- payload errors


def _bad_payloads() -> dict[str, dict[str, Any]]:
    good = make_payload(10)
    emb, pos = good["embeddings"], good["mrope_positions"]
    return {
        "wrong hidden size": {"embeddings": torch.zeros(10, HIDDEN + 1), "mrope_positions": pos},
        "wrong embeddings dtype": {"embeddings": emb.half(), "mrope_positions": pos},
        "wrong side-field dtype": {"embeddings": emb, "mrope_positions": pos.int()},
        "wrong side-field shape": {
            "embeddings": emb,
            "mrope_positions": torch.zeros(10, 4, dtype=torch.int64),
        },
        "empty": {"embeddings": emb[:0], "mrope_positions": pos[:0]},
        "1-D embeddings": {"embeddings": emb[0], "mrope_positions": pos},
        "3-D embeddings": {"embeddings": emb.reshape(10, 1, HIDDEN), "mrope_positions": pos},
        "missing side field": {"embeddings": emb},
        "unknown field": {**good, "audio": torch.zeros(10, 2)},
        "mismatched token counts": {"embeddings": emb, "mrope_positions": pos[:9]},
        "not a tensor": {"embeddings": emb.tolist(), "mrope_positions": pos},
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
async def test_bad_payload_is_refused(case: str) -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        with raises_typed(et.PayloadError):
            await enc.send("bad", _bad_payloads()[case])
        assert sender_session(enc, "bad") is None
        assert_pools_clean(enc, lang)
        await _complete(enc, lang, peer, "bad")  # the rid is not burnt


async def test_payload_not_a_mapping() -> None:
    async with connected(_settings()) as (enc, _lang, _peer):
        with raises_typed(et.PayloadError):
            await enc.send("bad", torch.zeros(10, HIDDEN))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "meta",
    [[1, 2], "meta", 3, {"x": object()}, {"t": torch.zeros(2)}, {"nested": {"f": lambda: 0}}],
    ids=["list", "str", "int", "object", "tensor", "nested-callable"],
)
async def test_bad_meta_is_refused(meta: Any) -> None:
    s = _settings()
    async with connected(s) as (enc, lang, _peer):
        with raises_typed(et.PayloadError):
            await enc.send("meta", make_payload(5), meta=meta)
        assert sender_session(enc, "meta") is None
        assert_pools_clean(enc, lang)


async def test_meta_with_non_string_keys_is_refused_up_front() -> None:
    # BUG: meta={1: "x"} passes EncodeNode.send's check (msgpack can encode it) but the wire
    # schema says ChunkDone.meta is dict[str, Any]: the send "succeeds", the language node
    # cannot decode the last ChunkDone, drops the whole connection, and every request of that
    # peer (here "keys" and "good") fails with PeerLost.
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        keys = asyncio.create_task(lang.receive("keys", peer))
        await wait_receive_ready(enc, peer, "good")
        await wait_receive_ready(enc, peer, "keys")
        with raises_typed(et.PayloadError):
            await asyncio.wait_for(enc.send("keys", make_payload(5), meta={1: "x"}), 5)
        keys.cancel()
        # the concurrent request on the same peer is unaffected
        payload = make_payload(7)
        _, got = await asyncio.wait_for(asyncio.gather(enc.send("good", payload), good), 5)
        assert_same_payload(got.tensors, payload)


async def test_meta_round_trips_plain_values() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        meta = {
            "mrope_position_delta": -12,
            "f": 1.5,
            "s": "x",
            "l": [1, [2, 3]],
            "d": {"k": None},
            "b": True,
        }
        send = asyncio.create_task(enc.send("meta-ok", make_payload(3), meta=meta))
        got = await lang.receive("meta-ok", peer)
        await send
        assert got.meta == meta


# -------------------------------------------------------------------------------- rid errors


@pytest.mark.parametrize(
    "rid", ["", "x" * 257, 123, None], ids=["empty", "257-chars", "int", "none"]
)
async def test_bad_rid_is_refused(rid: Any) -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        with raises_typed(et.InvalidRequest):
            await enc.send(rid, make_payload(5))
        with raises_typed(et.InvalidRequest):
            await lang.receive(rid, peer)
        with raises_typed(et.InvalidRequest):
            async with lang.lease(rid, peer, expected_tokens=5):
                pass
        assert_pools_clean(enc, lang)


async def test_rid_of_256_chars_is_fine() -> None:
    async with connected(_settings()) as (enc, lang, peer):
        await _complete(enc, lang, peer, "r" * 256)


async def test_duplicate_rid_in_flight_on_send() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        first = asyncio.create_task(enc.send("dup", make_payload(20, seed=1)))
        await wait_until(lambda: state_of(sender_session(enc, "dup")) == "WAIT_INIT")
        with raises_typed(et.InvalidRequest):
            await enc.send("dup", make_payload(20, seed=2))
        # the first one is untouched and completes
        got = await asyncio.wait_for(lang.receive("dup", peer), 10)
        await asyncio.wait_for(first, 10)
        assert_same_payload(got.tensors, make_payload(20, seed=1))


async def test_duplicate_rid_in_flight_on_receive() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        first = asyncio.create_task(lang.receive("dupr", peer))
        await wait_receive_ready(enc, peer, "dupr")
        with raises_typed(et.InvalidRequest):
            await lang.receive("dupr", peer)
        with raises_typed(et.InvalidRequest):
            async with lang.lease("dupr", peer):
                pass
        payload = make_payload(20, seed=3)
        await enc.send("dupr", payload)
        assert_same_payload((await asyncio.wait_for(first, 10)).tensors, payload)


# --------------------------------------------------------------------- expected_tokens errors


BAD_EXPECTED = [0, -1, -1000, 2.5, "10", True, [3]]
BAD_EXPECTED_IDS = ["zero", "minus-one", "very-negative", "float", "str", "bool", "list"]


@pytest.mark.parametrize("expected", BAD_EXPECTED, ids=BAD_EXPECTED_IDS)
async def test_bad_expected_tokens_on_receive(expected: Any) -> None:
    # BUG (bool): expected_tokens=True is accepted as 1 token by LanguageNode._open and then
    # fails inside the allocator with CapacityError instead of InvalidRequest.
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        with raises_typed(et.InvalidRequest):
            await asyncio.wait_for(lang.receive("exp", peer, expected_tokens=expected), 5)
        await wait_pools_clean(enc, lang)
        assert "exp" not in peer.sessions


@pytest.mark.parametrize("expected", BAD_EXPECTED, ids=BAD_EXPECTED_IDS)
async def test_bad_expected_tokens_on_lease(expected: Any) -> None:
    # BUG (str, list): LanguageNode.lease computes allocator.blocks_for(expected_tokens) before
    # validating it: a str or list raises a bare TypeError instead of InvalidRequest.
    # BUG (bool): as on receive, True passes _open and fails later with CapacityError.
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        with raises_typed(et.InvalidRequest):
            async with lang.lease("exp", peer, expected_tokens=expected):
                pass
        await wait_pools_clean(enc, lang)
        assert "exp" not in peer.sessions


async def test_lease_larger_than_the_pool() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        with raises_typed(et.CapacityError, match="pool"):
            async with lang.lease("big", peer, expected_tokens=s.capacity_tokens + 1):
                pass
        assert "big" not in peer.sessions
        assert_pools_clean(enc, lang)
        # exactly the pool is fine
        payload = make_payload(s.capacity_tokens, seed=8)
        send = asyncio.create_task(enc.send("big", payload))
        async with lang.lease("big", peer, expected_tokens=s.capacity_tokens) as got:
            assert got.zero_copy
            assert_same_payload(got.tensors, payload)
        await send


async def test_receive_expecting_more_than_the_pool_still_completes() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        n = 3 * s.capacity_tokens
        payload = make_payload(n, seed=9)
        send = asyncio.create_task(enc.send("more", payload))
        got = await asyncio.wait_for(lang.receive("more", peer, expected_tokens=n), 10)
        await send
        assert got.rounds == 3
        assert_same_payload(got.tensors, payload)


# ---------------------------------------------------------------------------- handshake errors


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"block_size": 2 * BLOCK}, "block_size"),
        ({"hidden_size": 2 * HIDDEN}, f"hidden_size={2 * HIDDEN} on the language node"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"fields": {"mrope_positions": {"shape": [4], "dtype": "int64"}}}, "mrope_positions"),
        ({"fields": {}}, "mrope_positions"),
    ],
    ids=["block_size", "hidden_size", "dtype", "side-field-shape", "side-field-missing"],
)
async def test_handshake_with_mismatched_settings(override: dict, named: str) -> None:
    # BUG: the encode node detects the mismatch and answers m.Error; the language node turns
    # that into ProtocolError("peer refused the handshake: ... settings mismatch on ...")
    # instead of ConfigError, so a caller cannot tell a misconfiguration from a bad peer.
    enc_s = _settings()
    lang_s = make_settings(**{**{"num_blocks": 16, "default_blocks": 4}, **override})
    async with et.EncodeNode(enc_s) as enc, et.LanguageNode(lang_s) as lang:
        with raises_typed(et.ConfigError, match=named):
            await asyncio.wait_for(lang.connect(enc.address), 5)
        await wait_until(lambda: not enc.peers and not lang.peers, 5, "no peer on either side")
        assert_pools_clean(enc, lang)


async def test_pool_sizes_and_timeouts_may_differ() -> None:
    enc_s = make_settings(num_blocks=3, default_blocks=1, chunk_timeout=7.0)
    lang_s = make_settings(num_blocks=40, default_blocks=10, resume_timeout=9.0)
    async with connected(enc_s, lang_s) as (enc, lang, peer):
        await _complete(enc, lang, peer, "sizes", n=500)


# ------------------------------------------------------------------ a misbehaving peer (raw)


def _enc_peer(enc: et.EncodeNode, lang: et.LanguageNode) -> et.Peer:
    return enc.peers_named(lang.node_id)[0]


@pytest.mark.parametrize(
    "violation",
    ["wrong-round", "wrong-start", "count-over-capacity", "is_last-lies", "total-too-small"],
)
async def test_bad_chunk_done_fails_only_that_request(violation: str) -> None:
    s = _settings()
    cap = s.default_tokens
    chunk = {
        "wrong-round": {"round": 3, "start": 0, "count": 1, "total_tokens": 1, "is_last": True},
        "wrong-start": {"round": 0, "start": 5, "count": 1, "total_tokens": 6, "is_last": True},
        "count-over-capacity": {
            "round": 0,
            "start": 0,
            "count": cap + 1,
            "total_tokens": cap + 1,
            "is_last": True,
        },
        "is_last-lies": {"round": 0, "start": 0, "count": 1, "total_tokens": 10, "is_last": True},
        "total-too-small": {
            "round": 0,
            "start": 0,
            "count": 5,
            "total_tokens": 3,
            "is_last": False,
        },
    }[violation]
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        bad = asyncio.create_task(lang.receive("bad", peer))
        await wait_receive_ready(enc, peer, "bad")
        await wait_receive_ready(enc, peer, "good")
        _enc_peer(enc, lang).send(m.ChunkDone(rid="bad", **chunk))
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(bad, 5)
        payload = make_payload(30, seed=4)
        await enc.send("good", payload)
        assert_same_payload((await asyncio.wait_for(good, 5)).tensors, payload)
        assert peer.alive
        # the local engine fences the bad one's round: its quarantine ends at once
        await wait_pools_clean(enc, lang)


async def test_chunk_done_for_an_unknown_rid_is_refused() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        await wait_receive_ready(enc, peer, "good")
        _enc_peer(enc, lang).send(
            m.ChunkDone(rid="ghost", round=0, start=0, count=1, total_tokens=1, is_last=True)
        )
        _enc_peer(enc, lang).send(m.Abort(rid="ghost", reason="?"))
        _enc_peer(enc, lang).send(m.AbortAck(rid="ghost"))
        payload = make_payload(12, seed=5)
        await enc.send("good", payload)
        assert_same_payload((await asyncio.wait_for(good, 5)).tensors, payload)
        assert peer.alive and "ghost" not in peer.sessions


async def test_resume_and_abort_for_an_unknown_rid_are_refused() -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        await wait_receive_ready(enc, peer, "good")
        peer.channel.send(
            m.Resume(
                **grant(),
                rid="ghost",
                round=1,
                blocks=[0],
                capacity_tokens=BLOCK,
                received_tokens=BLOCK,
            )
        )
        peer.channel.send(m.Abort(rid="ghost2", reason="?"))
        payload = make_payload(12, seed=6)
        await enc.send("good", payload)
        assert_same_payload((await asyncio.wait_for(good, 5)).tensors, payload)
        assert peer.alive and not enc.senders
        await wait_pools_clean(enc, lang)


async def _raw_round0(
    enc: et.EncodeNode, lang: et.LanguageNode, peer: et.Peer, rid: str, n: int
) -> tuple[asyncio.Task[et.SendStats], Any]:
    """Drive the language side by hand: a raw Init into blocks we allocated, so the sender
    writes round 0 and then waits for a Resume that we control."""
    dest = lang.allocator.try_alloc(lang.settings.default_tokens, f"raw-{rid}")
    assert dest is not None
    send = asyncio.create_task(enc.send(rid, make_payload(n, seed=7)))
    await wait_until(lambda: state_of(sender_session(enc, rid)) == "WAIT_INIT")
    lang.transport.grant(peer.transport_id, data_tag(rid, "", 0), dest.blocks)  # as a receiver
    peer.channel.send(
        m.Init(**grant(), rid=rid, blocks=list(dest.blocks), capacity_tokens=dest.capacity_tokens)
    )
    await wait_until(lambda: state_of(sender_session(enc, rid)) == "WAIT_RESUME")
    return send, dest


@pytest.mark.parametrize(
    "violation", ["wrong-round", "wrong-received", "foreign-blocks", "duplicate-blocks"]
)
async def test_bad_resume_fails_only_that_request(violation: str) -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        await wait_receive_ready(enc, peer, "good")
        n = 3 * s.default_tokens
        send, dest = await _raw_round0(enc, lang, peer, "raw", n)
        sent = s.default_tokens
        resume = {
            "wrong-round": {"round": 5, "blocks": list(dest.blocks), "received_tokens": sent},
            "wrong-received": {
                "round": 1,
                "blocks": list(dest.blocks),
                "received_tokens": sent + 1,
            },
            "foreign-blocks": {"round": 1, "blocks": [s.num_blocks + 3], "received_tokens": sent},
            "duplicate-blocks": {
                "round": 1,
                "blocks": [dest.blocks[0]] * 2,
                "received_tokens": sent,
            },
        }[violation]
        cap = len(resume["blocks"]) * BLOCK
        peer.channel.send(m.Resume(**grant(), rid="raw", capacity_tokens=cap, **resume))
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(send, 5)
        lang.allocator.free(dest)
        payload = make_payload(25, seed=8)
        await enc.send("good", payload)
        assert_same_payload((await asyncio.wait_for(good, 5)).tensors, payload)
        assert peer.alive
        await wait_pools_clean(enc, lang)


@pytest.mark.parametrize(
    "violation", ["foreign-blocks", "duplicate-blocks", "capacity-over-blocks"]
)
async def test_bad_init_fails_only_that_request(violation: str) -> None:
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        await wait_receive_ready(enc, peer, "good")
        send = asyncio.create_task(enc.send("raw", make_payload(20)))
        await wait_until(lambda: state_of(sender_session(enc, "raw")) == "WAIT_INIT")
        init = {
            "foreign-blocks": {"blocks": [s.num_blocks], "capacity_tokens": BLOCK},
            "duplicate-blocks": {"blocks": [7, 7], "capacity_tokens": 2 * BLOCK},
            "capacity-over-blocks": {"blocks": [7], "capacity_tokens": BLOCK + 1},
        }[violation]
        before = lang.registry.pools["embeddings"].clone()
        peer.channel.send(m.Init(**grant(), rid="raw", **init))
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(send, 5)
        # nothing was written into the language pool
        assert torch.equal(lang.registry.pools["embeddings"][BLOCK * 4 :], before[BLOCK * 4 :])
        payload = make_payload(25, seed=9)
        await enc.send("good", payload)
        assert_same_payload((await asyncio.wait_for(good, 5)).tensors, payload)
        assert peer.alive
        await wait_pools_clean(enc, lang)


async def test_long_block_list_in_a_bad_init_does_not_kill_the_connection() -> None:
    # BUG: the sender answers a bad Init with Abort(reason=f"... blocks {bad} outside ...") that
    # lists every offending block; with ~2000 blocks the reason exceeds the wire limit of
    # 4096 chars (messages.Reason), the language node cannot decode the Abort and drops the
    # whole connection, failing every other request of that peer.
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        good = asyncio.create_task(lang.receive("good", peer))
        await wait_receive_ready(enc, peer, "good")
        send = asyncio.create_task(enc.send("raw", make_payload(20)))
        await wait_until(lambda: state_of(sender_session(enc, "raw")) == "WAIT_INIT")
        blocks = list(range(1000, 3000))
        peer.channel.send(
            m.Init(**grant(), rid="raw", blocks=blocks, capacity_tokens=len(blocks) * BLOCK)
        )
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(send, 5)
        payload = make_payload(25, seed=10)
        _, got = await asyncio.wait_for(asyncio.gather(enc.send("good", payload), good), 5)
        assert_same_payload(got.tensors, payload)
        assert peer.alive


async def test_schema_invalid_message_ends_cleanly() -> None:
    # a message that violates the wire schema (capacity 0, no blocks) cannot be trusted: the
    # connection may be dropped, but nothing hangs or leaks and a new request works afterwards
    s = _settings()
    async with connected(s) as (enc, lang, peer):
        victim = asyncio.create_task(lang.receive("victim", peer))
        await wait_receive_ready(enc, peer, "victim")
        peer.channel.send(m.Init(**grant(), rid="x", blocks=[], capacity_tokens=0))
        # a valid probe behind it tells when the encode node has dealt with the bad message
        probe = lang.allocator.try_alloc(BLOCK, "probe")
        assert probe is not None
        peer.channel.send(
            m.Init(**grant(), rid="probe", blocks=list(probe.blocks), capacity_tokens=BLOCK)
        )
        await wait_until(lambda: not peer.alive or sender_session(enc, "probe") is not None)
        if peer.alive:  # refused, connection kept: the victim still completes
            peer.channel.send(m.Abort(rid="probe", reason="probe done"))
            await wait_until(lambda: sender_session(enc, "probe") is None)
            await enc.send("victim", make_payload(5))
            await asyncio.wait_for(victim, 5)
        else:  # dropped: the victim fails with a typed error, promptly
            with raises_typed(et.TransferError):
                await asyncio.wait_for(victim, 5)
        lang.allocator.free(probe)
        await wait_pools_clean(enc, lang)
        fresh = await lang.connect(enc.address)
        await _complete(enc, lang, fresh, "after")


@pytest.mark.parametrize("owner", ["peer", "node-id"])
async def test_same_rid_from_a_second_receiver_is_refused(owner: str) -> None:
    # chunk_timeout is long: a refusal that came by timeout would not be prompt
    s = _settings(chunk_timeout=20.0)
    async with connected(s) as (enc, lang, peer), et.LanguageNode(s) as lang2:
        peer2 = await lang2.connect(enc.address)
        held_for: et.Peer | str = _enc_peer(enc, lang) if owner == "peer" else lang.node_id
        payload = make_payload(20, seed=11)
        send = asyncio.create_task(enc.send("shared", payload, peer=held_for))
        await wait_until(lambda: state_of(sender_session(enc, "shared")) == "WAIT_INIT")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with raises_typed(et.TransferAborted, match="held here for another peer"):
            await asyncio.wait_for(lang2.receive("shared", peer2), 5)
        assert loop.time() - t0 < 1.0, "not refused promptly"
        assert peer2.alive and "shared" not in peer2.sessions
        await wait_pools_clean(lang2)  # nothing was written, nothing stays held
        # the payload is still held for its receiver, who gets it intact
        assert state_of(sender_session(enc, "shared")) == "WAIT_INIT" and not send.done()
        got = await asyncio.wait_for(lang.receive("shared", peer), 5)
        assert_same_payload(got.tensors, payload)
        await asyncio.wait_for(send, 5)
        await wait_pools_clean(enc, lang, lang2)
