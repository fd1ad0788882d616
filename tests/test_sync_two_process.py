"""emtransfer.sync across two OS processes over the real transports (tcp, nixl), driven as
synchronous schedulers drive it: a SyncLanguageNode here and a SyncEncodeNode in a child
process, each request's handle polled each tick by a plain thread on either side.

64 handles in flight at once: 62 payloads (receives and leases, some resuming past the first
allocation), one the polling thread aborts once it transfers, and one it gives up on at its
own deadline (``result(timeout=0)`` raises the builtin TimeoutError, then it aborts). Leases
are verified and released by another thread than the one polling. Both aborted requests
leave the encode process holding an Init for a payload it never gets: its sessions must end
within the settle bound (data_timeout is far longer), so the aborts reached it, and over
nixl the quarantined blocks come back only on its AbortAck (the grant's expiry is further
off than the settle bound). At the end both pools are full and both loops' threads are gone.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import random
import threading
from typing import Any

import pytest
import torch
from runtime_harness import BASE_SETTINGS, payload, transport_params
from sync_harness import (
    assert_full,
    assert_monotonic,
    assert_stopped,
    clean_shutdown,
    encode_child,
    on,
    settle,
)

import emtransfer as et
from emtransfer.sync import PollState, SyncLanguageNode, TransferHandle

P = PollState
HIDDEN = BASE_SETTINGS["hidden_size"]
#: the encode side keeps an Init waiting for its data far longer than the settle bound
CHILD = {"data_timeout": 60.0, "max_waiting_inits_per_peer": 64}


def _recv(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"the encode process said nothing within {timeout}s")
    msg = conn.recv()
    if msg[0] == "crash":
        raise RuntimeError(f"the encode process failed:\n{msg[1]}")
    return msg


def _check(h: TransferHandle[et.Received], specs: dict[str, tuple[int, int]]) -> list[Any]:
    """The outcome of a finished handle: ["ok", rounds] when every byte is right."""
    err = h.error()
    if err is not None:
        return [type(err).__name__, str(err)]
    got, (n, seed) = h.result(), specs[h.rid]
    want = payload(seed, n, HIDDEN)
    ok = got.num_tokens == n and all(torch.equal(got.tensors[k], v) for k, v in want.items())
    ok = ok and got.meta == {"rid": h.rid, "n": n}
    return ["ok", got.rounds] if ok else ["corrupt", h.rid]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_64_handles_polled_from_threads_in_two_processes(transport: str) -> None:
    settings = {**BASE_SETTINGS, "transport": transport}
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=encode_child, args=(child_conn, {**settings, **CHILD}), daemon=True)
    child.start()
    try:
        _, address = _recv(conn, 60)
        rng = random.Random(10)
        specs = {  # rid -> (tokens, seed); every fourth a lease, small enough to hold a while
            f"r{i}": (rng.randint(1, 1000) if i % 4 == 0 else rng.randint(1, 3000), 100 + i)
            for i in range(62)
        }
        with clean_shutdown() as problems:
            lang = SyncLanguageNode(et.Settings(**settings))
            try:
                handles: dict[str, TransferHandle[et.Received]] = {}

                def start(rid: str) -> None:
                    i, n = int(rid[1:]), specs[rid][0]
                    if i % 4 == 0:
                        handles[rid] = lang.lease(rid, address, n if i % 8 == 0 else None)
                    else:
                        handles[rid] = lang.receive(rid, address, n if i % 3 == 0 else None)

                rids = list(specs)
                for rid in rids[::2]:  # these ask before the encode side has the payload
                    start(rid)
                handles["rx-abort"] = lang.receive("rx-abort", address)
                handles["rx-deadline"] = lang.receive("rx-deadline", address)
                conn.send(("send", [(rid, n, seed) for rid, (n, seed) in specs.items()]))
                for rid in rids[1::2]:
                    start(rid)
                assert len(handles) == 64

                outcomes: dict[str, list[Any]] = {}
                history: dict[str, list[PollState]] = {rid: [] for rid in handles}
                deadline: dict[str, Any] = {}
                leases: queue.Queue[TransferHandle[et.Received] | None] = queue.Queue()

                def scheduler() -> None:
                    tick, pending, ticks = threading.Event(), dict(handles), 0
                    aborted = False
                    while pending:
                        for rid, h in list(pending.items()):
                            state = h.poll()
                            if not history[rid] or history[rid][-1] is not state:
                                history[rid].append(state)
                            if rid == "rx-abort" and state is P.TRANSFERRING and not aborted:
                                aborted = h.abort("the scheduler aborted it")
                            if rid == "rx-deadline" and state is P.TRANSFERRING:
                                ticks += 1
                                if ticks == 20:  # its deadline, counted in the scheduler's ticks
                                    try:
                                        h.result(timeout=0)
                                    except TimeoutError as exc:
                                        deadline["error"] = exc
                                    h.abort("the scheduler's deadline passed")
                            if state.finished:
                                del pending[rid]
                                if h.kind == "lease" and state is P.SUCCESS:
                                    leases.put(h)  # checked and released by another thread
                                else:
                                    outcomes[rid] = _check(h, specs) if rid in specs else []
                                    h.release()
                        tick.wait(0.001)
                    leases.put(None)

                def consumer() -> None:
                    while (h := leases.get()) is not None:
                        outcomes[h.rid] = _check(h, specs)
                        h.release()

                threads = [threading.Thread(target=f) for f in (scheduler, consumer)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                    assert not t.is_alive(), "a request never ended"

                bad = {r: o for r, o in outcomes.items() if r in specs and o[0] != "ok"}
                assert not bad and len(outcomes) == 64, bad
                assert any(o[1] > 1 for r, o in outcomes.items() if r in specs)  # resumed
                for rid, states in history.items():
                    assert_monotonic(states)
                    assert states[-1] is (P.SUCCESS if rid in specs else P.FAILED), (rid, states)
                for rid, why in (
                    ("rx-abort", "the scheduler aborted it"),
                    ("rx-deadline", "the scheduler's deadline passed"),
                ):
                    h = handles[rid]
                    assert P.TRANSFERRING in history[rid]
                    err = h.error()
                    assert type(err) is et.TransferAborted and why in str(err), err
                assert type(deadline["error"]) is TimeoutError  # the builtin, the wait's own
                # every block back: over nixl, the aborted grants only on the peer's AbortAck
                assert_full(on(lang, settle(lang.node)))
                assert not lang.open_handles()
                conn.send(("settle",))  # while still connected: its sessions end by the aborts
                _, report = _recv(conn, 60)
            finally:
                lang.close()
            assert_stopped(lang)
        assert not problems, problems
        conn.send(("close",))
        _, child_problems = _recv(conn, 60)
        assert not child_problems, child_problems
        assert report["outcomes"] == {rid: ["ok", n] for rid, (n, _) in specs.items()}
        assert_full(report["pool"])
        for states in report["states"].values():
            assert_monotonic([P(s) for s in states])
            assert states[-1] == P.SUCCESS
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
