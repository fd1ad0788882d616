"""emtransfer.sync: the poll facade for synchronous schedulers, in one process.

A sync node (its own loop in its own thread) faces an asyncio node of the other role that the
test drives on that same loop (the local transport), or, where both lifecycles must be apart
(close), another sync node over tcp. Every state poll() reports is checked against the
protocol machine's state it came from; waits are on the handles' own notifications
(``Recorder``), never a sleep; every test ends with both pools full and the loop's thread gone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from helpers_runtime import (
    assert_same_payload,
    connected,
    hold_all,
    make_payload,
    make_settings,
    raises_typed,
)
from log_capture import capture_logs
from sync_harness import (
    WAIT,
    Recorder,
    assert_full,
    assert_monotonic,
    assert_stopped,
    call,
    clean_shutdown,
    on,
    pool_state,
    settle,
    started,
)
from transport_harness import free_port

import emtransfer as et
from emtransfer.protocol import ReceiverState, SenderState
from emtransfer.sync import (
    RECEIVER_PROGRESS,
    SENDER_PROGRESS,
    SGLANG_MM_TIMEOUT,
    PollState,
    SyncEncodeNode,
    SyncLanguageNode,
    TransferHandle,
    progress,
    sglang_mm_status,
)

pytestmark = pytest.mark.timeout(30)
P = PollState


@contextmanager
def language_side(
    loop_factory: Any = None, encoder: Any = None, **overrides: Any
) -> Iterator[tuple[SyncLanguageNode, et.EncodeNode]]:
    """A SyncLanguageNode (settings ``overrides``) and, on its loop, an asyncio EncodeNode the
    test drives; at the end both pools are full and the shutdown left nothing behind."""
    with clean_shutdown() as problems:
        lang = SyncLanguageNode(make_settings(**overrides), loop_factory=loop_factory)
        try:
            enc = on(lang, started(lambda: et.EncodeNode(make_settings(), encoder=encoder)))
            try:
                yield lang, enc
                assert_full(on(lang, settle(lang.node)))
                assert_full(on(lang, settle(enc)))
                assert not lang.open_handles()
            finally:
                on(lang, enc.close())
        finally:
            lang.close()
        assert_stopped(lang)
    assert not problems, problems


@contextmanager
def encode_side(**overrides: Any) -> Iterator[tuple[SyncEncodeNode, et.LanguageNode, et.Peer]]:
    """A SyncEncodeNode and, on its loop, an asyncio LanguageNode connected to it."""
    with clean_shutdown() as problems:
        enc = SyncEncodeNode(make_settings(**overrides))
        try:
            lang = on(enc, started(lambda: et.LanguageNode(make_settings())))
            try:
                peer = on(enc, lang.connect(enc.address))
                yield enc, lang, peer
                assert_full(on(enc, settle(enc.node)))
                assert_full(on(enc, settle(lang)))
                assert not enc.open_handles()
            finally:
                on(enc, lang.close())
        finally:
            enc.close()
        assert_stopped(enc)
    assert not problems, problems


def send_soon(sync: Any, node: et.EncodeNode, rid: str, payload: dict[str, torch.Tensor]) -> Any:
    """``node.send`` started on the sync node's loop; its concurrent future."""
    return asyncio.run_coroutine_threadsafe(node.send(rid, payload), sync.loop)


# ------------------------------------------------------------------------------ the states


def test_states_are_ordered_for_a_min_over_a_group_and_map_to_sglang() -> None:
    assert P.FAILED < P.BOOTSTRAPPING < P.WAITING_FOR_INPUT < P.TRANSFERRING < P.SUCCESS
    assert P.FAILED < 0 < P.SUCCESS
    assert min([P.SUCCESS, P.TRANSFERRING, P.SUCCESS]) is P.TRANSFERRING
    assert min([P.SUCCESS, P.FAILED, P.BOOTSTRAPPING]) is P.FAILED
    assert [p.finished for p in P] == [True, False, False, False, True]
    # KVPoll: Failed 0, Bootstrapping 1, WaitingForInput 2, Transferring 3, Success 4
    assert [p.sglang_kvpoll() for p in P] == [0, 1, 2, 3, 4]
    # WaitingMMRequestStatus: FAIL -1, PENDING 0, SUCCESS 1, TIMEOUT -2
    assert sglang_mm_status(P.SUCCESS, None) == 1
    for pending in (P.BOOTSTRAPPING, P.WAITING_FOR_INPUT, P.TRANSFERRING):
        assert sglang_mm_status(pending, None) == 0
    assert sglang_mm_status(P.FAILED, et.TransferTimeout("t")) == SGLANG_MM_TIMEOUT == -2
    assert sglang_mm_status(P.FAILED, et.AllocationTimeout("t")) == -2
    assert sglang_mm_status(P.FAILED, et.PeerLost("p")) == -1
    assert sglang_mm_status(P.FAILED, et.TransferAborted("a")) == -1


def test_every_protocol_state_has_a_decided_progress() -> None:
    """A state the tables leave out says nothing new (the result decides); a new machine
    state must be placed in a table or in these lists on purpose."""
    r, s = ReceiverState, SenderState
    assert set(RECEIVER_PROGRESS) == set(r) - {r.QUARANTINED, r.EXPIRING, r.DONE, r.FAILED}
    assert set(SENDER_PROGRESS) == set(s) - {s.DRAINING, s.DONE, s.FAILED}
    receiver_path = [r.NEW, r.ALLOCATING, r.WAIT_CHUNK]
    sender_path = [s.NEW, s.WAIT_INIT, s.STAGING, s.WRITING, s.WAIT_RESUME]
    for path in (receiver_path, sender_path, [s.NEW, s.WAIT_DATA, s.STAGING]):
        assert_monotonic([progress(x) for x in path])  # type: ignore[misc]
    assert progress(r.DONE) is None and progress(s.DRAINING) is None and progress("x") is None


# --------------------------------------------------------------------------- language side


def test_a_receive_shows_each_state_of_its_protocol_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    # the sequential resume: round 1 is allocated once round 0 is in (ALLOCATING again)
    with language_side(pipeline_resume=False) as (lang, enc):
        hog = call(lang, hold_all, lang.node.allocator)
        h = lang.receive("walk", enc.address)  # 150 tokens: more than the first allocation
        rec.wait_protocol(h, "ALLOCATING")
        assert h.poll() is P.WAITING_FOR_INPUT  # no blocks to receive into: no Init yet
        call(lang, lang.node.allocator.free, hog)
        rec.wait_protocol(h, "WAIT_CHUNK")
        assert h.poll() is P.TRANSFERRING  # the Init has left
        payload = make_payload(150, seed=3)
        stats = on(lang, enc.send("walk", payload, meta={"k": 1}))
        got = h.result(WAIT)
        assert_same_payload(got.tensors, payload)
        assert got.meta == {"k": 1} and got.rounds == stats.rounds > 1
        assert h.poll() is P.SUCCESS and h.done() and h.error() is None
        seen = rec.seen["walk"]
        assert seen[0] == (P.BOOTSTRAPPING, "NEW")
        assert (P.TRANSFERRING, "ALLOCATING") in seen  # the resume's allocation goes on
        assert seen[-1] == (P.SUCCESS, "DONE")
        assert_monotonic(rec.polls("walk"))
        h.release()


def test_a_pipelined_resume_stays_transferring_in_wait_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pipelining on (the default): round 1 is granted while round 0 is on the wire, so the
    machine goes from WAIT_CHUNK to WAIT_CHUNK, and the handle reads TRANSFERRING throughout."""
    rec = Recorder(monkeypatch)
    with language_side() as (lang, enc):
        payload = make_payload(150, seed=4)
        h = lang.receive("pipe", enc.address)
        rec.wait_protocol(h, "WAIT_CHUNK")
        stats = on(lang, enc.send("pipe", payload))
        got = h.result(WAIT)
        assert_same_payload(got.tensors, payload)
        # (the sender may still wait for the Resume: a write this small can end before it)
        assert got.rounds == stats.rounds > 1
        assert got.stats["prefetched_rounds"] == stats.rounds - 1
        seen = rec.seen["pipe"]
        assert (P.TRANSFERRING, "ALLOCATING") not in seen  # never waited for a resume's blocks
        assert seen[-1] == (P.SUCCESS, "DONE")
        assert_monotonic(rec.polls("pipe"))
        h.release()


def test_waiting_for_a_slot_is_bootstrapping_and_an_abort_there_ends_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with language_side(max_inflight_per_peer=1) as (lang, enc):
        first = lang.receive("first", enc.address)
        rec.wait_protocol(first, "WAIT_CHUNK")
        queued = lang.receive("queued", enc.address)  # the only slot is taken
        later = lang.receive("later", enc.address)
        assert queued.poll() is P.BOOTSTRAPPING and queued.protocol_state is None
        assert queued.abort() is True
        with raises_typed(et.TransferAborted, "before it began"):
            queued.result(WAIT)
        assert rec.seen["queued"] == [(P.FAILED, None)]  # it never had a session
        assert first.poll() is P.TRANSFERRING
        on(lang, enc.send("first", make_payload(10, seed=1)))
        assert first.result(WAIT).num_tokens == 10
        rec.wait_protocol(later, "WAIT_CHUNK")  # the slot came free: the next one goes on
        on(lang, enc.send("later", make_payload(12, seed=2)))
        assert later.result(WAIT).num_tokens == 12
        assert rec.seen["later"][0] == (P.BOOTSTRAPPING, "NEW")
        for h in (first, queued, later):
            h.release()


def test_connecting_is_bootstrapping_and_a_dead_address_fails_with_peer_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with language_side(bootstrap_timeout=0.3) as (lang, _):
        h = lang.receive("nobody", f"127.0.0.1:{free_port()}")
        with raises_typed(et.PeerLost, "could not connect"):
            h.result(WAIT)
        assert rec.seen["nobody"] == [(P.FAILED, None)]  # never past connecting
        assert h.sglang_kvpoll() == 0 and h.sglang_mm_status() == -1
        h.release()


def test_an_encode_job_transfers_once_the_encoder_computed_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    computing, go = threading.Event(), asyncio.Event()

    async def encoder(job: dict[str, Any]) -> dict[str, torch.Tensor]:
        computing.set()
        await go.wait()  # the encoder is busy until the test lets it finish
        return make_payload(job["n"], seed=job["seed"])

    with language_side(encoder=encoder) as (lang, enc):
        h = lang.encode("job", enc.address, {"n": 90, "seed": 4})
        assert computing.wait(WAIT)
        rec.wait_protocol(h, "WAIT_CHUNK")
        assert h.poll() is P.TRANSFERRING and h.kind == "encode"  # the Init has left
        call(lang, go.set)
        got = h.result(WAIT)
        assert_same_payload(got.tensors, make_payload(90, seed=4))
        assert_monotonic(rec.polls("job"))
        h.release()


def test_result_with_a_timeout_raises_a_plain_timeout_and_the_request_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with language_side() as (lang, enc):
        h = lang.receive("slow", enc.address)
        rec.wait_protocol(h, "WAIT_CHUNK")
        for timeout in (0, 0.05):
            with pytest.raises(TimeoutError, match="still TRANSFERRING") as info:
                h.result(timeout)
            assert not isinstance(info.value, et.TransferError)
        assert h.poll() is P.TRANSFERRING and not h.done() and h.error() is None
        on(lang, enc.send("slow", make_payload(5)))
        assert h.result(WAIT).num_tokens == 5
        h.release()


def test_a_deadline_of_the_runtime_fails_with_transfer_timeout() -> None:
    with language_side(chunk_timeout=0.3) as (lang, enc):
        h = lang.receive("never-sent", enc.address)
        with raises_typed(et.TransferTimeout):
            h.result(WAIT)
        assert h.poll() is P.FAILED and isinstance(h.error(), et.TransferTimeout)
        assert h.sglang_mm_status() == SGLANG_MM_TIMEOUT and h.sglang_kvpoll() == 0
        h.release()
        # on exit: the encode node's session for it ended (it was told), both pools are full


def test_abort_from_the_polling_thread_tells_the_peer() -> None:
    with language_side() as (lang, enc):
        h = lang.receive("abort-me", enc.address)
        seen: list[PollState] = []

        def scheduler() -> None:  # polls each tick; gives the request up once it transfers
            tick, aborted = threading.Event(), False
            while not (state := h.poll()).finished:
                seen.append(state)
                if state is P.TRANSFERRING and not aborted:
                    aborted = h.abort()
                tick.wait(0.001)
            seen.append(state)

        poller = threading.Thread(target=scheduler)
        poller.start()
        poller.join(WAIT)
        assert not poller.is_alive()
        assert P.TRANSFERRING in seen and seen[-1] is P.FAILED
        assert_monotonic(seen)
        with raises_typed(et.TransferAborted, "aborted by the caller"):
            h.result()
        assert not isinstance(h.error(), et.Unavailable)
        assert h.abort() is False  # it has ended
        # the encode node was told: its session waiting for this payload ended (it would wait
        # data_timeout otherwise), and the rid is free for a retry
        assert_full(on(lang, settle(enc)))
        retry = lang.receive("abort-me", enc.address)
        on(lang, enc.send("abort-me", make_payload(7)))
        assert retry.result(WAIT).num_tokens == 7
        h.release()
        retry.release()


def test_abort_after_the_result_is_refused_and_the_result_stands() -> None:
    with language_side() as (lang, enc):
        h = lang.receive("done", enc.address)
        on(lang, enc.send("done", make_payload(9)))
        got = h.result(WAIT)
        assert h.abort() is False
        assert h.poll() is P.SUCCESS and h.result() is got
        h.release()


def test_release_of_a_lease_gives_its_blocks_back_once_from_any_thread() -> None:
    with language_side() as (lang, enc):
        payload = make_payload(40, seed=7)
        h = lang.lease("lease", enc.address, expected_tokens=40)
        on(lang, enc.send("lease", payload))
        got = h.result(WAIT)
        assert got.zero_copy and h.kind == "lease"
        assert_same_payload(got.tensors, payload)
        del got  # views into the pool: not to be used past release()
        pool = call(lang, pool_state, lang.node)
        assert pool["free"] == pool["blocks"] - 3  # 40 tokens in blocks of 16, held
        assert lang.open_handles() == [h]
        barrier = threading.Barrier(8)

        def release() -> None:
            barrier.wait()
            h.release()

        threads = [threading.Thread(target=release) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert_full(on(lang, settle(lang.node)))  # granted once every block is back
        assert not lang.open_handles()
        with raises_typed(et.InvalidRequest, "released"):
            h.result()
        assert h.poll() is P.SUCCESS and h.error() is None
        h.release()


def test_release_in_flight_aborts_and_after_a_failure_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with language_side() as (lang, enc):
        h = lang.receive("dropped", enc.address)
        rec.wait_protocol(h, "WAIT_CHUNK")
        other = threading.Thread(target=h.release)
        other.start()
        other.join(WAIT)
        with raises_typed(et.TransferAborted, "released by the caller"):
            h.result(WAIT)
        h.release()
        bad = lang.receive("", enc.address)
        with raises_typed(et.InvalidRequest, "rid"):
            bad.result(WAIT)
        bad.release()
        bad.release()


def test_errors_are_the_runtimes_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with language_side() as (lang, enc):
        first = lang.receive("dup", enc.address)
        rec.wait_protocol(first, "WAIT_CHUNK")
        second = lang.receive("dup", enc.address)
        with raises_typed(et.RidInFlight):
            second.result(WAIT)
        assert isinstance(second.error(), et.RidInFlight) and second.error().http_status == 409  # type: ignore[union-attr]
        zero = lang.receive("zero", enc.address, expected_tokens=0)
        with raises_typed(et.InvalidRequest, "expected_tokens"):
            zero.result(WAIT)
        first.abort()
        with raises_typed(et.TransferAborted):
            first.result(WAIT)
        for h in (first, second, zero):
            h.release()
        with pytest.raises(RuntimeError, match="own loop thread"):
            call(lang, lang.close)
    with pytest.raises(et.Unavailable, match="closed"):
        lang.receive("late", enc.address)
    with encode_side() as (sync_enc, _, _):
        bad = sync_enc.send("bad", {"embeddings": torch.zeros(3, 5)})
        with raises_typed(et.PayloadError):
            bad.result(WAIT)
        bad.release()


# ----------------------------------------------------------------------------- encode side


def test_a_send_shows_each_state_of_its_protocol_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with encode_side() as (enc, lang, peer):
        hog = call(enc, hold_all, enc.node.allocator)  # nothing to stage the write in
        payload = make_payload(40, seed=5)
        h = enc.send("w", payload)
        rec.wait_protocol(h, "WAIT_INIT")
        assert h.poll() is P.BOOTSTRAPPING  # no receiver claimed it yet
        receiving = asyncio.run_coroutine_threadsafe(lang.receive("w", peer), enc.loop)
        rec.wait_protocol(h, "STAGING")
        assert h.poll() is P.WAITING_FOR_INPUT
        call(enc, enc.node.allocator.free, hog)
        stats = h.result(WAIT)
        assert stats.num_tokens == 40 and stats.rounds == 1
        assert_same_payload(receiving.result(WAIT).tensors, payload)
        assert rec.seen["w"] == [
            (P.BOOTSTRAPPING, "NEW"),
            (P.BOOTSTRAPPING, "WAIT_INIT"),
            (P.WAITING_FOR_INPUT, "STAGING"),
            (P.TRANSFERRING, "WRITING"),
            (P.TRANSFERRING, "DONE"),
            (P.SUCCESS, "DONE"),
        ]
        h.release()


def test_a_send_whose_init_came_first_starts_waiting_for_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with encode_side() as (enc, lang, peer):
        inited = threading.Event()
        real = enc.node._on_init

        def spy(p: Any, msg: Any) -> None:
            real(p, msg)
            inited.set()

        monkeypatch.setattr(enc.node, "_on_init", spy)
        receiving = asyncio.run_coroutine_threadsafe(lang.receive("f", peer), enc.loop)
        assert inited.wait(WAIT)  # the encode node holds the Init, waiting for data
        payload = make_payload(30, seed=6)
        h = enc.send("f", payload)
        assert h.result(WAIT).num_tokens == 30
        assert_same_payload(receiving.result(WAIT).tensors, payload)
        assert rec.seen["f"][0] == (P.WAITING_FOR_INPUT, "WAIT_DATA")
        assert_monotonic(rec.polls("f"))
        h.release()


def test_abort_of_a_send_from_the_polling_thread_tells_the_receiver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with encode_side() as (enc, lang, peer):
        hog = call(enc, hold_all, enc.node.allocator)
        receiving = asyncio.run_coroutine_threadsafe(lang.receive("s", peer), enc.loop)
        h = enc.send("s", make_payload(20))
        rec.wait_protocol(h, "STAGING")  # claimed by the Init, waiting for staging blocks
        assert h.poll() is P.WAITING_FOR_INPUT
        scheduler = threading.Thread(target=h.abort, args=("the scheduler gave up",))
        scheduler.start()
        scheduler.join(WAIT)
        with raises_typed(et.TransferAborted, "the scheduler gave up"):
            h.result(WAIT)
        with raises_typed(et.TransferAborted, "aborted by sender"):
            receiving.result(WAIT)
        call(enc, enc.node.allocator.free, hog)
        h.release()


# ------------------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_many_handles_started_and_polled_from_plain_threads(loop: str) -> None:
    factory = None if loop == "uvloop" else asyncio.new_event_loop
    with language_side(loop_factory=factory) as (lang, enc):
        assert type(lang.loop).__module__.split(".")[0] == loop  # uvloop unless told
        payloads = {f"m{i}": make_payload(1 + (37 * i) % 200, seed=i) for i in range(32)}
        handles: dict[str, TransferHandle[et.Received]] = {}
        lock = threading.Lock()

        def starter(rids: list[str]) -> None:
            for rid in rids:
                n = payloads[rid]["embeddings"].shape[0]
                start = lang.lease if int(rid[1:]) % 4 == 0 else lang.receive
                h = start(rid, enc.address, n)
                with lock:
                    handles[rid] = h

        rids = list(payloads)
        starters = [threading.Thread(target=starter, args=(rids[k::4],)) for k in range(4)]
        for t in starters:
            t.start()
        for t in starters:
            t.join(WAIT)
        sends = [send_soon(lang, enc, rid, p) for rid, p in payloads.items()]
        states: dict[str, list[PollState]] = {rid: [] for rid in rids}

        def scheduler() -> None:
            tick, pending = threading.Event(), dict(handles)
            while pending:
                for rid, h in list(pending.items()):
                    state = h.poll()
                    states[rid].append(state)
                    if state.finished:
                        assert_same_payload(h.result().tensors, payloads[rid])
                        h.release()  # a lease's blocks go back for the ones still waiting
                        del pending[rid]
                tick.wait(0.001)

        poller = threading.Thread(target=scheduler)
        poller.start()
        poller.join(WAIT * 2)
        assert not poller.is_alive()
        for rid in rids:
            assert states[rid][-1] is P.SUCCESS, (rid, states[rid])
            assert_monotonic(states[rid])
        for f in sends:
            f.result(WAIT)


def test_close_with_requests_in_flight_aborts_them_and_frees_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    with clean_shutdown() as problems:
        enc = SyncEncodeNode(make_settings(transport="tcp"))
        lang = SyncLanguageNode(make_settings(transport="tcp", max_inflight_per_peer=2))
        try:
            payload = make_payload(40, seed=8)
            lease = lang.lease("held", enc.address, 40)
            enc.send("held", payload).result(WAIT)
            assert_same_payload(lease.result(WAIT).tensors, payload)  # holds its blocks
            a, b = lang.receive("a", enc.address), lang.receive("b", enc.address)
            rec.wait_protocol(a, "WAIT_CHUNK")
            rec.wait_protocol(b, "WAIT_CHUNK")
            queued = lang.receive("queued", enc.address)  # no slot left: not begun
            woke: list[BaseException] = []

            def waiter() -> None:  # a thread blocked in result() while the node closes
                try:
                    a.result()
                except BaseException as exc:
                    woke.append(exc)

            blocked = threading.Thread(target=waiter)
            blocked.start()
            closers = [threading.Thread(target=lang.close) for _ in range(2)]  # at once
            for t in closers:
                t.start()
            for t in (*closers, blocked):
                t.join(WAIT * 2)
            assert_stopped(lang)
            assert [type(e) for e in woke] == [et.Unavailable]
            for h in (a, b):
                with raises_typed(et.Unavailable, "node closing"):
                    h.result(0)
            with raises_typed(et.Unavailable, "before it began"):
                queued.result(0)
            assert lease.poll() is P.SUCCESS
            with raises_typed(et.InvalidRequest, "released"):
                lease.result(0)  # its views went with the pool
            assert_full(pool_state(lang.node))  # closed with every block free
            assert_full(on(enc, settle(enc.node)))  # the encode node heard of it
            with pytest.raises(et.Unavailable):
                lang.receive("late", enc.address)
            lang.close()  # idempotent
        finally:
            lang.close()
            enc.close()
        assert_stopped(enc)
    assert not problems, problems


def test_a_node_that_cannot_start_raises_in_the_caller_and_leaves_no_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(et.ConfigError, match="no_such_option"):
        SyncLanguageNode(make_settings(), no_such_option=1)
    after = {t.name for t in threading.enumerate()}
    assert not {n for n in after - before if n.startswith("emtransfer-sync")}


# ------------------------------------------------------------------ the runtime's hook


async def test_the_runtime_tells_an_observer_each_state_and_drops_one_that_raises() -> None:
    async with connected(make_settings()) as (enc, lang, peer):
        watched: list[Any] = []
        seen: list[Any] = []

        def observer(session: Any) -> None:
            watched.append(session)
            seen.append(session.machine.state)

        sent: list[Any] = []
        receiving = asyncio.create_task(lang.receive("o", peer, observer=observer))
        await enc.send("o", make_payload(100), observer=lambda s: sent.append(s.machine.state))
        await receiving
        history = watched[0].machine.history
        assert seen == [ReceiverState.NEW] + [to for frm, _, to in history if to is not frm]
        assert sent[0] is SenderState.NEW and sent[-1] is SenderState.DONE
        assert watched[0].abort("too late") is False  # it has ended

        def broken(session: Any) -> None:
            raise RuntimeError("observer bug")

        with capture_logs() as events:
            receiving = asyncio.create_task(lang.receive("b", peer, observer=broken))
            await enc.send("b", make_payload(10))
            assert (await receiving).num_tokens == 10
        assert [e["event"] for e in events].count("state observer failed; dropped") == 1


def test_wait_for_change_wakes_on_each_new_state_and_on_the_end() -> None:
    """A scheduler sleeps in wait_for_change instead of polling: it wakes when a handle moves
    on (a new PollState) or ends, and times out, returning the same count, when nothing
    moved."""
    with language_side() as (lang, enc):
        seen = lang.changes()
        assert lang.wait_for_change(seen, 0.05) == seen  # nothing in flight: nothing moves
        h = lang.receive("watched", enc.address)
        while h.poll() is not P.TRANSFERRING:  # its Init goes out: each step wakes us
            assert lang.wait_for_change(seen, WAIT) != seen
            seen = lang.changes()
        assert lang.wait_for_change(seen, 0.05) == seen  # no payload yet: nothing moves
        send = send_soon(lang, enc, "watched", make_payload(5))
        while not h.done():
            seen = lang.wait_for_change(seen, WAIT)
        assert h.poll() is P.SUCCESS and h.result().num_tokens == 5
        send.result(WAIT)
        h.release()
