"""The vLLM connector between an encoder instance and a prefill instance in separate OS
processes, over real transports (tcp, nixl), each driven by vLLM's own scheduler and the
runner's connector plumbing (``tests/vllm_harness.py`` says what is vLLM's and what stands
in for the GPU model runner).

Two producers (encoder instances) in child processes, one consumer (prefill instance) here.
The flow is EPD's: a request goes to the producer first (it encodes, offers each item, and
its finished output's ``ec_transfer_params`` say where each item is), then to the consumer
(a proxy forwards ``ec_transfer_params``; the media is dropped), which pulls the items into
its worker's encoder cache before vLLM schedules the prefill. Checked:

- several items per request, of awkward lengths (1, block_size - 1, block_size + 1, primes),
  one item shared by two requests (pulled once), one item larger than the consumer's whole
  pool (it resumes): every tensor in the worker's encoder cache is the producer's, bit for
  bit, and vLLM's gather finds every item (no "Encoder cache miss");
- items found through the consumer's ``producer_addr`` and through a request's announcement;
- the second producer SIGKILLed while its item is mid-transfer (between two rounds, at the
  consumer's Resume): that request ends FINISHED_ERROR through ``take_unavailable_requests``,
  the others finish;
- a request aborted by its client while its load waits: the load is cancelled;
- at the end the consumer's pool is whole (no block leaked or quarantined), no handle is
  open, and shutdown ends the emtransfer threads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from typing import Any

import pytest
import vllm_harness as vh
from runtime_harness import transport_params
from sync_harness import assert_full, on, settle

BS = vh.EXTRA["block_size"]
CONSUMER_POOL = {"num_blocks": 16, "default_blocks": 4}  # 256 tokens in all
#: producer 1: requests A, B, C (C shares A's first item); the awkward lengths and the
#: item larger than the consumer's pool (700 > 256 tokens)
P1_SPECS: list[vh.Spec] = [
    ("A", [("img-one", 1), ("img-bs-1", BS - 1), ("img-bs+1", BS + 1)]),
    ("B", [("img-97", 97), ("img-huge", 700)]),
    ("C", [("img-31", 31), ("img-one", 1)]),
]
#: producer 2: request K, whose item (3 rounds at least) is cut by SIGKILL at its Resume
P2_SPECS: list[vh.Spec] = [("K", [("img-killed", 600)])]


def _start_producer(ctx: Any, extra: dict[str, Any]) -> tuple[Any, Any, str]:
    port = vh.free_port()
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=vh.producer_child, args=(child_conn, extra, port), daemon=True)
    proc.start()
    return proc, conn, f"127.0.0.1:{port}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_producer_and_consumer_in_two_processes(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from vllm.v1.request import RequestStatus

    torch.set_num_threads(1)
    extra = {**vh.EXTRA, "transport": transport}
    ctx = mp.get_context("spawn")
    p1, conn1, addr1 = _start_producer(ctx, extra)
    p2, conn2, addr2 = _start_producer(ctx, extra)
    engine = None
    try:
        # the consumer: P1 is its default producer; P2's items are announced per request
        consumer_extra = {**extra, **CONSUMER_POOL, "producer_addr": addr1}
        killed = threading.Event()
        kill_rid = "img-killed"

        def on_observe(h: Any, session: Any) -> None:
            # on the loop thread, as the receiver enters a resume's allocation: its Resume
            # has not left, so P2 cannot have written the next round
            m = session.machine
            resuming = h.rid == kill_rid and m.state.name == "ALLOCATING" and m.round >= 1
            if resuming and not killed.is_set():
                os.kill(p2.pid, signal.SIGKILL)
                killed.set()

        progress = vh.Progress(monkeypatch, on_observe)
        engine = vh.Engine(vh.vllm_config("ec_consumer", consumer_extra))
        lang = engine.worker_connector._worker.language_node
        assert lang is not None  # started by start_worker_services, before any request

        for conn, specs in ((conn1, P1_SPECS), (conn2, P2_SPECS)):
            msg = vh.recv(conn)
            assert msg[0] == "ready", msg
            conn.send(("run", specs))
        params: dict[str, Any] = {}
        for conn in (conn1, conn2):
            msg = vh.recv(conn)
            assert msg[0] == "done", msg
            params.update(msg[1])
        # the announcement: where each item is, under which rid, how many rows
        assert params["K"]["img-killed"]["emtransfer_addr"] == addr2
        assert params["B"]["img-huge"]["num_tokens"] == 700

        # the proxy's second leg: P1's requests without their announcement (the consumer's
        # producer_addr finds them), K with it; D's item was never encoded anywhere
        for spec in P1_SPECS:
            engine.add(vh.make_request(spec, media=False))
        engine.add(vh.make_request(P2_SPECS[0], media=False, ec_transfer_params=params["K"]))
        engine.add(vh.make_request(("D", [("img-never", 50)]), media=False))

        def wait() -> None:
            progress.wait_after(mark)

        mark = progress.mark()
        engine.step()  # every request waits for its items: 8 distinct items, 8 loads
        assert len(engine.scheduler.ec_connector._scheduler._loads) == 8
        assert not engine.runner.gathered  # nothing was scheduled without its items
        # D's client gives up while its load waits (P1 holds the Init for a payload it never
        # gets): the scheduler finishes it, the connector cancels the receive
        engine.scheduler.finish_requests({"D"}, RequestStatus.FINISHED_ABORTED)
        while not set("ABCK") <= set(engine.finished):
            mark = progress.mark()
            if not engine.step():
                wait()
        assert killed.is_set(), "the producer was never killed mid-transfer"

        finished = engine.finished
        for req_id in "ABC":
            assert finished[req_id].error is None, finished[req_id]
            assert str(finished[req_id].finish_reason) in ("length", "FinishReason.LENGTH")
        assert str(finished["K"].finish_reason) in ("error", "FinishReason.ERROR"), finished["K"]
        assert "D" not in finished  # aborted by its client: no output of its own

        # byte for byte what the producer encoded, as vLLM's gather read it
        gathered = engine.runner.gathered
        for req_id, items in P1_SPECS:
            for mm_hash, n in items:
                assert vh.same_bits(gathered[(req_id, mm_hash)], vh.item_tensor(mm_hash, n))
        assert not any(r in ("K", "D") for r, _ in gathered)
        worker = engine.worker_connector._worker
        stats = engine.ec_stats.reduce()  # through vLLM's stats hook, as its logger reads them
        assert stats["loads_ok"] == 6 and stats["loads_failed"] == 1, stats  # img-one once
        assert stats["load_rounds"] >= 6 + 2  # img-huge resumed past the pool

        # nothing left behind on the consumer: every block back, no handle open
        assert_full(on(lang, settle(lang.node)))
        assert not lang.open_handles()
        assert not worker._loads and not worker._placed

        engine.shutdown()  # the scheduler's and the worker's connector, as vLLM does
        engine = None
        assert lang.closed and not lang._thread.is_alive()
        # the nixl transport lets its executor's idle threads go without waiting: they end
        for t in [t for t in threading.enumerate() if t.name.startswith("emtransfer-")]:
            t.join(10)
            assert not t.is_alive(), f"thread {t.name} outlived the shutdown"
        conn1.send(("close",))
        msg = vh.recv(conn1)
        assert msg[0] == "closed", msg
        # P1 offered each of its items once (img-one too) and each was delivered
        assert msg[1]["stats"]["sends_ok"] == 6 and msg[1]["open"] == 0, msg[1]
        p1.join(30)
        p2.join(30)
        assert p1.exitcode == 0 and p2.exitcode == -signal.SIGKILL
    finally:
        if engine is not None:
            engine.shutdown()
        for p in (p1, p2):
            if p.is_alive():
                p.kill()
                p.join(10)
