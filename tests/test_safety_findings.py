"""One test per finding of the safety review that the in-process or in-loop setting shows
exactly (the live, two-process ones are in test_faults_live.py): single-flight connect and
peers by connection, a cancellation racing the completion of a lease, bounds on
total_tokens and on Encode jobs, retries never poisoned by a failed attempt, pre-staging that
fails, and TCP writes to a receiver that stopped reading."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from helpers_runtime import (
    assert_same_payload,
    connected,
    make_payload,
    make_settings,
    receiver_session,
    wait_pools_clean,
    wait_until,
)
from runtime_harness import transport_params

import emtransfer as et
from emtransfer.runtime import encode as encode_mod
from emtransfer.transport import tcp as tcp_mod

pytestmark = pytest.mark.timeout(60)


ENGINES = transport_params("local", "tcp", "nixl")


async def test_concurrent_receives_share_one_connection() -> None:
    """Finding 3, benign trigger: four receive() calls naming the address at once used to open
    four connections, three of them kicked off as 'replaced by a new connection'."""
    s = make_settings(transport="tcp")
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        payloads = {f"r{i}": make_payload(40 + i, seed=i) for i in range(4)}
        sends = [asyncio.create_task(enc.send(r, p)) for r, p in payloads.items()]
        got = await asyncio.gather(*(lang.receive(r, enc.address) for r in payloads))
        await asyncio.gather(*sends)
        for g in got:
            assert_same_payload(g.tensors, payloads[g.rid])
        assert len(lang.peers) == 1 and len(enc.peers) == 1
        await wait_pools_clean(enc, lang)


async def test_a_second_connection_claiming_the_same_id_kicks_nobody_off() -> None:
    s = make_settings(transport="tcp")
    async with (
        et.EncodeNode(s, control="tcp") as enc,
        et.LanguageNode(s) as a,
        et.LanguageNode(s) as b,
    ):
        b.node_id = a.node_id  # an impostor, or an unlucky restart
        pa = await a.connect(enc.address)
        pb = await b.connect(enc.address)
        assert len(enc.peers_named(a.node_id)) == 2 and pa.alive and pb.alive
        pay = make_payload(50, seed=3)
        send = asyncio.create_task(enc.send("x", pay, peer=enc.peers_named(a.node_id)[0]))
        got = await a.receive("x", pa)
        await send
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, a, b)


async def test_payload_named_for_one_peer_is_refused_to_another() -> None:
    """Finding 2: first Init wins no more. The rightful receiver gets the payload; the other
    peer's Init is refused at once with a typed error (no wait for chunk_timeout)."""
    s = make_settings(transport="tcp", chunk_timeout=30)
    async with (
        et.EncodeNode(s, control="tcp") as enc,
        et.LanguageNode(s) as owner,
        et.LanguageNode(s) as thief,
    ):
        await owner.connect(enc.address)
        tp = await thief.connect(enc.address)
        pay = make_payload(60, seed=4)
        send = asyncio.create_task(enc.send("img", pay, peer=owner.node_id))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(et.TransferAborted, match="another peer"):
            await thief.receive("img", tp)
        assert loop.time() - t0 < 5
        got = await owner.receive("img", enc.address)
        await send
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, owner, thief)


@pytest.mark.parametrize("transport", ENGINES)
async def test_cancel_racing_the_in_place_completion_frees_the_lease(transport: str) -> None:
    """Finding 4: cancelled after the in-place completion but before resuming, the lease's
    blocks were never freed."""
    s = make_settings(transport=transport)
    async with connected(s) as (enc, lang, peer):
        pay = make_payload(40, seed=5)
        task = asyncio.create_task(lang.lease("L", peer, expected_tokens=40).__aenter__())
        await wait_until(lambda: receiver_session(peer, "L") is not None, what="session")
        session = receiver_session(peer, "L")
        # runs before the lease's coroutine wakes up: the cancel lands between the two
        session.result.add_done_callback(lambda _: task.cancel())
        await enc.send("L", pay)
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_pools_clean(enc, lang)


async def test_total_tokens_is_bounded_before_any_allocation() -> None:
    """Finding 7: a sender's total_tokens was trusted and pre-allocated."""
    small = make_settings(max_tokens=100)
    big = make_settings(max_tokens=10_000)
    async with connected(big, small) as (enc, lang, peer):
        with pytest.raises(et.InvalidRequest, match="max_tokens"):
            await lang.receive("e", peer, expected_tokens=101)
        send = asyncio.create_task(enc.send("huge", make_payload(300, seed=6)))
        with pytest.raises(et.ProtocolError, match="max_tokens"):
            await lang.receive("huge", peer)
        with pytest.raises(et.TransferError):
            await send
    async with connected(small) as (enc, _lang, _peer):
        with pytest.raises(et.PayloadError, match="max_tokens"):
            await enc.send("big", make_payload(101))


async def test_encode_jobs_count_against_the_in_flight_limit() -> None:
    """Finding 7: 200 jobs with the limit at 2 parked 200 payloads."""
    gate = asyncio.Event()

    async def slow(job: dict[str, Any]) -> dict[str, torch.Tensor]:
        await gate.wait()
        return make_payload(job["n"], seed=job["n"])

    s = make_settings(max_inflight_per_peer=2)
    async with (
        et.EncodeNode(s, encoder=slow) as enc,
        et.LanguageNode(make_settings(max_inflight_per_peer=8)) as lang,
    ):
        peer = await lang.connect(enc.address)
        jobs = [asyncio.create_task(lang.encode(f"j{i}", peer, {"n": 20 + i})) for i in range(6)]
        await wait_until(lambda: sum(j.done() for j in jobs) == 4, what="four refusals")
        refused = [j for j in jobs if j.done()]
        for j in refused:
            with pytest.raises(et.TransferAborted, match="max_inflight_per_peer"):
                j.result()
        gate.set()
        for j in jobs:
            if j not in refused:
                got = await j
                assert_same_payload(got.tensors, make_payload(got.num_tokens, seed=got.num_tokens))
        await wait_pools_clean(enc, lang)


@pytest.mark.parametrize("transport", ENGINES)
async def test_a_failed_attempt_never_poisons_a_retry_nor_binds_its_orphan(transport: str) -> None:
    """Finding 6: a failed job was remembered by rid (a retry got the old reason), and an
    orphaned result of an old attempt could bind to the retry."""
    calls: list[dict[str, Any]] = []
    release_old = asyncio.Event()

    async def encoder(job: dict[str, Any]) -> dict[str, torch.Tensor]:
        calls.append(job)
        if job.get("fail"):
            raise ValueError("undecodable image")
        if job.get("slow"):
            await release_old.wait()
        return make_payload(30, seed=job["seed"])

    s = make_settings(transport=transport)
    async with et.EncodeNode(s, encoder=encoder) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        with pytest.raises(et.TransferAborted, match="undecodable"):
            await lang.encode("r", peer, {"fail": True, "seed": 1})
        got = await lang.encode("r", peer, {"seed": 2})  # the retry: same rid
        assert_same_payload(got.tensors, make_payload(30, seed=2))
        old = asyncio.create_task(lang.encode("o", peer, {"slow": True, "seed": 3}))
        await wait_until(lambda: len(calls) == 3, what="the slow job to start")
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await old
        await wait_until(lambda: "o" not in peer.sessions, what="the old attempt to end")
        retry = asyncio.create_task(lang.encode("o", peer, {"slow": False, "seed": 4}))
        await wait_until(lambda: len(calls) == 4, what="the retry's job")
        release_old.set()  # the orphan's result arrives now: it must go nowhere
        got = await retry
        assert_same_payload(got.tensors, make_payload(30, seed=4))
        await wait_pools_clean(enc, lang)


@pytest.mark.parametrize("transport", ENGINES)
@pytest.mark.parametrize("offload", [False, True], ids=["inline", "executor"])
async def test_a_failing_prestage_copy_gives_its_blocks_back(
    offload: bool, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 8: a pre-staged allocation leaked if its copy raised."""
    if offload:
        monkeypatch.setattr(encode_mod, "OFFLOAD_BYTES", 0)
    s = make_settings(transport=transport)
    async with connected(s) as (enc, lang, peer):
        real = enc.registry.write
        calls = {"n": 0}

        def flaky(*a: Any, **kw: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:  # the pre-stage at send(), before the Init: it fails
                raise RuntimeError("copy failed")
            real(*a, **kw)

        monkeypatch.setattr(enc.registry, "write", flaky)
        pay = make_payload(150, seed=7)  # 150 tokens over a 64-token default: resumes
        send = asyncio.create_task(enc.send("p", pay))
        got = await lang.receive("p", peer)
        await send
        assert calls["n"] >= 2 and got.rounds >= 2  # staged again the ordinary way
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, lang)


async def test_tcp_write_to_a_receiver_that_stopped_reading_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 5: with no deadline in WRITING and an unbounded drain(), a receiver that stops
    reading its data socket but keeps heartbeating pinned blocks on both nodes forever."""
    real_accept = tcp_mod._RecvConn.accept

    def accept_then_stall(self: Any, peer: Any) -> None:
        real_accept(self, peer)
        self.tr.pause_reading()

    monkeypatch.setattr(tcp_mod._RecvConn, "accept", accept_then_stall)
    s = et.Settings(
        hidden_size=4096,
        num_blocks=32,
        block_size=128,
        default_blocks=8,
        transport="tcp",
        chunk_timeout=2.0,
        write_timeout=0.5,
        abort_ack_timeout=1.0,
    )
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        emb = torch.randn(2048, 4096).to(torch.bfloat16)  # 16 MiB: more than both buffers
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        send = asyncio.create_task(enc.send("stall", {"embeddings": emb}))
        with pytest.raises(et.TransferError):
            await lang.receive("stall", peer, expected_tokens=2048)
        with pytest.raises(et.TransferError):
            await send
        assert loop.time() - t0 < s.chunk_timeout + s.write_timeout + 2
        assert peer.alive  # the control connection was never the problem
        await wait_pools_clean(enc, lang, timeout=10)


@pytest.mark.parametrize("transport", ENGINES)
async def test_an_abandoned_write_keeps_its_session_and_gets_no_ack(transport: str) -> None:
    """A sender that gave up on a write (DRAINING's deadline) must not tell anybody that
    nothing of that attempt is in flight until the write ended. It used to drop its session
    at once, and the runtime answered a later Abort for the attempt with an AbortAck -- the
    receiver's proof to reuse the blocks the write is still going to."""
    s = make_settings(
        transport=transport, chunk_timeout=30.0, write_timeout=0.2, abort_ack_timeout=0.2
    )
    async with connected(s) as (enc, lang, peer):
        gate = asyncio.Event()
        real_write = enc.transport.write

        async def held_write(*a: Any, **kw: Any) -> None:
            await gate.wait()  # the engine holds the write past every deadline
            await real_write(*a, **kw)

        enc.transport.write = held_write  # type: ignore[method-assign]
        acks: list[Any] = []
        enc_peer = next(iter(enc.peers.values()))
        real_send = enc_peer.send

        def spy(msg: Any) -> None:
            if isinstance(msg, encode_mod.m.AbortAck):
                acks.append(msg)
            real_send(msg)

        enc_peer.send = spy  # type: ignore[method-assign]
        recv = asyncio.create_task(lang.receive("w", peer))
        with pytest.raises(et.TransferTimeout, match="write_timeout"):
            await enc.send("w", make_payload(30, seed=1))
        session = receiver_session(peer, "w")
        tag = session.session_tag
        sender = enc_peer.lingering.get(tag)
        assert sender is not None and sender.running, "the abandoned attempt must linger"
        assert "w" not in enc_peer.sessions  # ... without blocking a retry of the rid
        peer.send(encode_mod.m.Abort(rid="w", reason="receiver gives up", session=tag))
        await wait_until(
            lambda: (
                ("FAILED", "AbortReceived", "FAILED")
                in [(a.name, e, b.name) for a, e, b in sender.machine.history]
            ),
            what="the late Abort to reach the lingering attempt",
        )
        assert acks == [], "an AbortAck while the abandoned write may still land"
        gate.set()  # the write goes: refused at posting (its grant expired) or it lands
        await wait_until(lambda: not sender.running, what="the lingering attempt to end")
        assert tag not in enc_peer.lingering
        recv.cancel()
        with pytest.raises((asyncio.CancelledError, et.TransferError)):
            await recv
        peer.send(encode_mod.m.Abort(rid="w", reason="again", session=tag))
        await wait_until(lambda: len(acks) >= 1, what="an ack once the attempt ended")
        await wait_pools_clean(enc, lang, timeout=10)
