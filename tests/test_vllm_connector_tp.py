"""The vLLM connector's consumer with tensor parallelism: TP rank 0 receives each item from
the producer, the group gets it by broadcast, and the scheduler hears "ready" only once
every rank holds it (``emtransfer/integrations/vllm/broadcast.py``).

TP ranks are processes (forked from a forkserver that imported vLLM once), joined over gloo
on 127.0.0.1; the producer is a real ``SyncEncodeNode`` in the test process. The test process
plays vLLM's scheduler and executor: it sends every rank the same step and merges the
ranks' outputs with vLLM's own ``ECOutputAggregator``, as ``MultiprocExecutor`` does.

- Worker level (2 and 4 ranks, a fake TP group: the gloo world): the scheduler-side
  connector (``SchedulerSide``) and each rank's ``WorkerSide`` in vLLM's call order. Every
  rank's encoder cache ends with exactly the producer's tensor, bit for bit (items of 1, 15,
  17, 97 rows and one of 300 rows that resumes past rank 0's 256-token pool, one shared by
  two requests); items are placed on every rank in the same step, the one they are
  reported in. Failures: the producer sends the wrong row count, the producer aborts its
  send, the last rank cannot allocate (a simulated out-of-memory): each item fails on every
  rank, ``take_unavailable_requests`` fails its request, nothing stays in any encoder cache,
  and both pools are whole again.
- vLLM's own distributed setup (2 ranks): ``init_distributed_environment`` and
  ``initialize_model_parallel(tensor_model_parallel_size=2)`` with gloo, so the connector
  finds ``get_tp_group()`` itself; each rank's connector made by vLLM's
  ``ensure_ec_transfer_initialized`` and driven by vLLM's ``ActiveECConnector``
  (``vllm_harness.Runner``); vLLM's real ``Scheduler`` in the test process. Requests finish
  with every rank's gather reading the producer's bytes; a wrong-length item ends its
  request ``FINISHED_ERROR``.

No sleeps: rank 0 waits for its language node's next change (``wait_for_change``) before a
step that follows one where nothing moved; the other ranks wait in the step's collectives.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import vllm_harness as vh
from sync_harness import Recorder, assert_full, call, on, settle

import emtransfer as et

WAIT = 20.0
HIDDEN = vh.HIDDEN
#: both sides' emtransfer settings; rank 0's pool holds 256 tokens
EXTRA: dict[str, Any] = {
    **vh.EXTRA,
    "transport": "tcp",
    "host": "127.0.0.1",
    "hidden_size": HIDDEN,
    "dtype": "bfloat16",
}
CONSUMER_POOL = {"num_blocks": 16, "default_blocks": 4}

# one import of vLLM for every rank process (spawning each would import it again: ~7 s each)
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(
    [
        "vllm_harness",
        "emtransfer.integrations.vllm",
        "vllm.distributed.parallel_state",
        "vllm.v1.worker.gpu.ec_connector",
        "vllm.v1.worker.gpu.mm.encoder_cache",
    ]
)


def _bits(t: torch.Tensor) -> tuple[list[int], str, bytes]:
    return list(t.shape), str(t.dtype), t.contiguous().view(torch.int16).numpy().tobytes()


def _same(dumped: tuple[list[int], str, bytes], want: torch.Tensor) -> bool:
    return dumped == _bits(want)


# -- the rank processes ------------------------------------------------------------------------
def rank_main(conn: Any, rank: int, world: int, port: int, extra: dict, refuse: list) -> None:
    """One TP rank: a ``WorkerSide`` over a fake TP group (the gloo world). Commands:
    ``("step", meta, wait)``: one step in ActiveECConnector's order, answered with the
    step's ECConnectorOutput and the encoder cache's keys; ``("dump",)``: the cache's
    tensors as bits and the worker's books; ``("close",)``."""
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist
        from vllm.config import ECTransferConfig
        from vllm.v1.outputs import ECConnectorOutput

        from emtransfer.integrations.vllm.broadcast import TPLayout
        from emtransfer.integrations.vllm.config import parse_config
        from emtransfer.integrations.vllm.worker import WorkerSide

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=WAIT),
        )
        ec = ECTransferConfig(
            ec_connector=vh.CONNECTOR,
            ec_connector_module_path=vh.MODULE,
            ec_role="ec_consumer",
            ec_connector_extra_config=extra,
        )
        vc = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=world))
        layout = TPLayout(rank, world, tuple(range(world)), device_group=dist.group.WORLD)
        worker = WorkerSide(parse_config(ec), vc, layout)
        if refuse:  # this rank cannot take these items (as a device out of memory)
            buffer = worker._tp_buffer

            def refusing(mm_hash: str, *a: Any) -> torch.Tensor:
                if mm_hash in refuse:
                    raise torch.OutOfMemoryError(f"simulated: no room for {mm_hash}")
                return buffer(mm_hash, *a)

            worker._tp_buffer = refusing  # type: ignore[method-assign]
        worker.start_services()  # the private group (every rank), rank 0's language node
        lang = worker.language_node
        assert (lang is not None) == (rank == 0)
        cache: dict[str, torch.Tensor] = {}
        seen = 0
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                _, meta, wait = msg
                if lang is not None:
                    if wait:  # nothing moved last step: sleep until a handle does
                        lang.wait_for_change(seen, WAIT)
                    seen = lang.changes()
                worker.start_load_caches(meta, cache)  # as ActiveECConnector.maybe_get_output
                _, received = worker.get_finished()
                out = ECConnectorOutput(
                    finished_recving=received,
                    ec_connector_stats=worker.take_stats(),
                    ec_connector_worker_meta=worker.build_connector_worker_meta(),
                )
                conn.send(("stepped", (out, sorted(cache))))
            elif msg[0] == "dump":
                books = {
                    "pending": sorted(worker._pending),
                    "loads": sorted(worker._loads),
                    "placed": sorted(worker._placed),
                    "open_handles": len(lang.open_handles()) if lang is not None else 0,
                    "pool": on(lang, settle(lang.node)) if lang is not None else None,
                }
                conn.send(("dumped", ({h: _bits(t) for h, t in cache.items()}, books)))
            elif msg[0] == "close":
                worker.shutdown()
                dist.destroy_process_group()
                conn.send(("closed", None))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def vllm_rank_main(conn: Any, rank: int, world: int, port: int, extra: dict) -> None:
    """One TP rank set up as vLLM's worker does: vLLM's distributed groups, the connector by
    vLLM's factory (``ensure_ec_transfer_initialized``), started as ``load_model`` starts
    it, and each step run by ``vllm_harness.Runner`` (vLLM's ``ActiveECConnector`` over
    vLLM's ``EncoderCache``). Commands: ``("step", scheduler_output, wait)`` answers the
    ``ModelRunnerOutput``; ``("dump",)``; ``("close",)``."""
    try:
        torch.set_num_threads(1)
        from vllm.config import set_current_vllm_config
        from vllm.distributed.ec_transfer import (
            ensure_ec_transfer_initialized,
            ensure_ec_transfer_shutdown,
            get_ec_transfer,
        )
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
            get_tp_group,
            init_distributed_environment,
            initialize_model_parallel,
        )

        vc = vh.vllm_config("ec_consumer", extra)
        vc.parallel_config.tensor_parallel_size = world
        with set_current_vllm_config(vc):
            init_distributed_environment(
                world_size=world,
                rank=rank,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                local_rank=rank,
                backend="gloo",
            )
            initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
            assert get_tp_group().world_size == world and get_tp_group().rank_in_group == rank
            ensure_ec_transfer_initialized(vc)
            connector = get_ec_transfer()
            connector.start_worker_services()
            runner = vh.Runner(vc)
        worker = connector._worker
        lang = worker.language_node
        assert (lang is not None) == (rank == 0)
        assert worker._where().ranks == tuple(get_tp_group().ranks)  # vLLM's own group
        seen = 0
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                _, so, wait = msg
                if lang is not None:
                    if wait:
                        lang.wait_for_change(seen, WAIT)
                    seen = lang.changes()
                conn.send(("stepped", runner.execute(so)))
            elif msg[0] == "dump":
                gathered = {f"{r}/{h}": _bits(t) for (r, h), t in runner.gathered.items()}
                books = {
                    "pending": sorted(worker._pending),
                    "placed": sorted(worker._placed),
                    "pool": on(lang, settle(lang.node)) if lang is not None else None,
                    # the connector's own gloo group over vLLM's TP ranks, not vLLM's
                    "private": worker._tp is not None
                    and worker._tp.cpu_group is not get_tp_group().cpu_group,
                }
                conn.send(("dumped", (gathered, books)))
            elif msg[0] == "close":
                ensure_ec_transfer_shutdown()
                destroy_model_parallel()
                destroy_distributed_environment()
                conn.send(("closed", None))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


# -- the test's side ---------------------------------------------------------------------------
class Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def answer(self, timeout: float = WAIT + 10) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no answer within {timeout}s")
        msg = self.conn.recv()
        if msg[0] == "crash":
            raise RuntimeError(f"the rank failed:\n{msg[1]}")
        return msg[1]

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close",))
                self.answer()
            except Exception:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class Ranks:
    """The TP group's processes; ``ask`` sends each the same command (vLLM broadcasts the
    step to every worker) and returns their answers in rank order."""

    def __init__(self, target: Any, world: int, *args: Any, per_rank: Any = None) -> None:
        port = vh.free_port()
        self.procs: list[Proc] = []
        try:
            for r in range(world):
                extra = () if per_rank is None else (per_rank(r),)
                self.procs.append(Proc(target, r, world, port, *args, *extra))
            for p in self.procs:
                p.answer(90)  # the first fork waits for the forkserver's imports
        except BaseException:
            self.close()
            raise

    def ask(self, *msg: Any) -> list[Any]:
        for p in self.procs:
            p.conn.send(msg)
        return [p.answer() for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.close()


def _aggregate(outputs: list[Any]) -> Any:
    """vLLM's merge of every worker's EC output (``MultiprocExecutor`` with an EC connector:
    ``ECOutputAggregator`` onto the output rank's, TP rank 0 here)."""
    from vllm.distributed.ec_transfer.ec_connector.utils import ECOutputAggregator

    return ECOutputAggregator().aggregate(outputs, output_rank=0)


def _producer() -> Any:
    from emtransfer.sync import SyncEncodeNode

    keys = ("block_size", "transport", "host", "hidden_size", "dtype", "heartbeat_interval")
    settings = {k: v for k, v in EXTRA.items() if k in keys or k.endswith("_timeout")}
    return SyncEncodeNode(et.Settings(**settings, bootstrap_port=0))


class Books:
    """The scheduler's side: vLLM's calls on ``SchedulerSide`` for a set of requests."""

    def __init__(self, producer_addr: str) -> None:
        from vllm.config import ECTransferConfig

        from emtransfer.integrations.vllm.config import parse_config
        from emtransfer.integrations.vllm.scheduler import SchedulerSide

        ec = ECTransferConfig(
            ec_connector=vh.CONNECTOR,
            ec_connector_module_path=vh.MODULE,
            ec_role="ec_consumer",
            ec_connector_extra_config={**EXTRA, "producer_addr": producer_addr},
        )
        self.cfg = parse_config(ec)
        self.sched = SchedulerSide(self.cfg, SimpleNamespace(model_config=None))
        self.ready: set[str] = set()
        self.unavailable: set[str] = set()
        self.stats: Any = None
        self.placed_at: dict[str, int] = {}  # item -> the step it was reported loaded
        self.why: dict[str, str] = {}  # item -> why it failed, as the scheduler heard it

    def run(self, ranks: Ranks, requests: list[Any], *, first_wait: bool = False) -> None:
        """Step until every request is ready (its items allocated) or unavailable."""
        from vllm.v1.outputs import ModelRunnerOutput

        open_reqs = {r.request_id: r for r in requests}
        wait = first_wait
        for step in range(1, 400):
            for req_id, req in list(open_reqs.items()):
                if req_id in self.unavailable:
                    del open_reqs[req_id]
                elif self.sched.ensure_cache_available(req, 0):
                    for i, _ in enumerate(req.mm_features):  # vLLM allocates: adopted
                        self.sched.update_state_after_alloc(req, i)
                    self.ready.add(req_id)
                    del open_reqs[req_id]
            meta = self.sched.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[]))
            if not open_reqs and not (meta.loads or meta.cancels or meta.adopted):
                return
            answers = ranks.ask("step", meta, wait)
            keys = [k for _, k in answers]
            assert all(k == keys[0] for k in keys), keys  # every rank holds the same items
            merged = _aggregate([ModelRunnerOutput.with_ec_conn_output_only(o) for o, _ in answers])
            ec_out = merged.ec_connector_output if merged is not None else None
            wm = ec_out.ec_connector_worker_meta if ec_out is not None else None
            if wm is not None:
                for mm_hash in wm.loaded:  # "ready" only once every rank has it
                    assert all(mm_hash in k for k in keys), (mm_hash, keys)
                    self.placed_at[mm_hash] = step
                for mm_hash, why in wm.failed.items():
                    assert not any(mm_hash in k for k in keys), (mm_hash, keys)
                    self.why[mm_hash] = why
            if ec_out is not None:
                self.sched.update_connector_output(ec_out)
                if ec_out.ec_connector_stats is not None:
                    s = ec_out.ec_connector_stats
                    self.stats = s if self.stats is None else self.stats.aggregate(s)
            self.unavailable |= self.sched.take_unavailable_requests()
            wait = wm is None  # nothing moved: rank 0 sleeps until its node changes
        raise AssertionError(f"requests never ended: {sorted(open_reqs)}")


def _send(enc: Any, cfg: Any, mm_hash: str, rows: int) -> tuple[Any, torch.Tensor]:
    from emtransfer.integrations.vllm.worker import FIELD

    t = vh.item_tensor(mm_hash, rows)
    return enc.send(cfg.rid_for(mm_hash), {FIELD: t}, {"mm_hash": mm_hash}), t


def _consumer_extra() -> dict[str, Any]:
    return {**EXTRA, **CONSUMER_POOL, "producer_addr": None}


def _check_whole(enc: Any, handles: list[Any], dumps: list[Any]) -> None:
    """Nothing left behind: every rank's books empty, rank 0's pool and the producer's
    whole, no handle open on either side."""
    for r, (_, books) in enumerate(dumps):
        assert books["pending"] == [] and books["loads"] == [], (r, books)
        assert books["placed"] == [] and books["open_handles"] == 0, (r, books)
        if r == 0:
            assert_full(books["pool"])
    for h in handles:
        assert h.done(), h
        h.release()
    assert_full(on(enc, settle(enc.node)))
    assert not enc.open_handles() and enc.node.held_bytes == 0


# -- worker level: a fake TP group -----------------------------------------------------------------
REQUESTS: list[vh.Spec] = [
    ("A", [("img-1", 1), ("img-15", 15), ("img-17", 17)]),
    ("B", [("img-97", 97), ("img-17", 17), ("img-300", 300)]),  # 300 > rank 0's pool
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp", [2, 4])
def test_every_rank_holds_the_producers_tensor(tp: int) -> None:
    torch.set_num_threads(1)
    enc = _producer()
    ranks = None
    try:
        ranks = Ranks(rank_main, tp, _consumer_extra(), [])
        books = Books(enc.address)
        items = {h: n for _, its in REQUESTS for h, n in its}
        sent = {h: _send(enc, books.cfg, h, n) for h, n in items.items()}
        requests = [vh.make_request(s, media=False) for s in REQUESTS]
        books.run(ranks, requests)
        assert books.ready == {"A", "B"} and not books.unavailable
        assert set(books.placed_at) == set(items)  # each once: img-17 is pulled once
        stats = books.stats.reduce()  # summed over the ranks: counted by rank 0 alone
        assert stats["loads_ok"] == len(items) and stats["loads_failed"] == 0, stats
        assert stats["load_rounds"] >= len(items) + 1, stats  # img-300 resumed
        dumps = ranks.ask("dump")
        for r, (cache, _) in enumerate(dumps):
            assert sorted(cache) == sorted(items), r
            for h, (_, tensor) in sent.items():
                assert _same(cache[h], tensor), (r, h)  # bit for bit, on every rank
        _check_whole(enc, [h for h, _ in sent.values()], dumps)
    finally:
        if ranks is not None:
            ranks.close()
        enc.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp", [2, 4])
def test_a_failure_on_any_rank_fails_the_item_on_every_rank(
    tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong rows (rank 0 refuses the payload), an item the last rank cannot take (rank 0
    received it: dropped), and, with the producer's staging pool held, a send the producer
    aborts once the consumer claimed it. Each fails its request only; R goes on. A request
    whose client gives up while its load waits cancels the load on every rank."""
    from helpers_runtime import hold_all

    torch.set_num_threads(1)
    rec = Recorder(monkeypatch)
    enc = _producer()
    ranks = None
    try:
        last = tp - 1
        ranks = Ranks(
            rank_main,
            tp,
            _consumer_extra(),
            per_rank=lambda r: ["img-refused"] if r == last else [],
        )
        books = Books(enc.address)
        handles = [
            _send(enc, books.cfg, "img-ok", 40)[0],
            _send(enc, books.cfg, "img-rows", 20)[0],  # the request says 21
            _send(enc, books.cfg, "img-refused", 33)[0],
        ]
        specs: list[vh.Spec] = [
            ("R", [("img-ok", 40)]),
            ("W", [("img-rows", 21)]),
            ("X", [("img-refused", 33)]),
        ]
        books.run(ranks, [vh.make_request(s, media=False) for s in specs])
        assert books.ready == {"R"} and books.unavailable == {"W", "X"}

        # the producer aborts: its staging pool held, the send waits once claimed
        hog = call(enc, hold_all, enc.node.allocator)
        aborted, _ = _send(enc, books.cfg, "img-aborted", 50)
        handles.append(aborted)
        req = vh.make_request(("Z", [("img-aborted", 50)]), media=False)
        gone = vh.make_request(("D", [("img-never", 8)]), media=False)  # never offered
        assert books.sched.ensure_cache_available(req, 0) is False
        assert books.sched.ensure_cache_available(gone, 0) is False
        meta = books.sched.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[]))
        assert [s.mm_hash for s in meta.loads] == ["img-aborted", "img-never"]
        ranks.ask("step", meta, False)  # rank 0 starts the receives; nothing ended
        rec.wait_protocol(aborted, "STAGING")
        assert aborted.abort("the producer gave up")
        call(enc, enc.node.allocator.free, hog)
        books.sched.request_finished(gone)  # D's client gave up: the load is cancelled
        books.run(ranks, [req], first_wait=True)
        assert books.unavailable == {"W", "X", "Z"} and books.ready == {"R"}
        assert "LoadFailed" in books.why["img-rows"] and "21" in books.why["img-rows"]
        assert books.why["img-refused"].startswith(f"tensor-parallel rank {last} cannot")
        assert "the producer gave up" in books.why["img-aborted"], books.why
        assert "img-never" not in books.why  # cancelled, not failed

        stats = books.stats.reduce()
        assert stats["loads_ok"] == 1 and stats["loads_failed"] == 3, stats
        dumps = ranks.ask("dump")
        for r, (cache, _) in enumerate(dumps):
            assert sorted(cache) == ["img-ok"], r  # nothing of the failed items anywhere
            assert _same(cache["img-ok"], vh.item_tensor("img-ok", 40)), r
        _check_whole(enc, handles, dumps)
    finally:
        if ranks is not None:
            ranks.close()
        enc.close()


# -- vLLM's own TP group ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_through_vllms_distributed_setup_and_scheduler() -> None:
    torch.set_num_threads(1)
    enc = _producer()
    ranks = None
    try:
        extra = {**EXTRA, **CONSUMER_POOL, "producer_addr": enc.address}
        ranks = Ranks(vllm_rank_main, 2, extra)
        vc = vh.vllm_config("ec_consumer", extra)
        scheduler = vh.build_scheduler(vc)
        cfg = scheduler.ec_connector.config
        specs: list[vh.Spec] = [
            ("A", [("img-1", 1), ("img-17", 17)]),
            ("B", [("img-300", 300), ("img-17", 17)]),
            ("E", [("img-short", 12)]),  # the producer has 11 rows
        ]
        handles = [_send(enc, cfg, h, n)[0] for h, n in (("img-1", 1), ("img-17", 17))]
        handles += [_send(enc, cfg, "img-300", 300)[0], _send(enc, cfg, "img-short", 11)[0]]
        for spec in specs:
            scheduler.add_request(vh.make_request(spec, media=False))
        finished: dict[str, Any] = {}
        wait = False
        for _ in range(400):
            if set(finished) >= {"A", "B", "E"}:
                break
            so = scheduler.schedule()
            outputs = ranks.ask("step", so, wait)
            mro = _aggregate(outputs)  # as MultiprocExecutor merges every worker's
            moved = so.total_num_scheduled_tokens > 0
            ec = mro.ec_connector_output
            moved = moved or (ec is not None and ec.ec_connector_worker_meta is not None)
            for eco in scheduler.update_from_output(so, mro).values():
                for out in eco.outputs:
                    if out.finish_reason is not None:
                        finished[out.request_id] = out
                        moved = True
            wait = not (moved or scheduler.ec_connector.has_pending_push_work())
        assert set(finished) == {"A", "B", "E"}, finished
        for req_id in "AB":
            assert finished[req_id].error is None, finished[req_id]
            assert str(finished[req_id].finish_reason) in ("length", "FinishReason.LENGTH")
        assert str(finished["E"].finish_reason) in ("error", "FinishReason.ERROR")
        dumps = ranks.ask("dump")
        for r, (gathered, books) in enumerate(dumps):
            want = {f"{q}/{h}": vh.item_tensor(h, n) for q, its in specs[:2] for h, n in its}
            assert sorted(gathered) == sorted(want), r  # vLLM's gather on every rank
            for key, tensor in want.items():
                assert _same(gathered[key], tensor), (r, key)
            assert books["pending"] == [] and books["placed"] == [], (r, books)
            assert books["private"] is True, r
            if r == 0:
                assert_full(books["pool"])
        for h in handles:
            assert h.done(), h
            h.release()
        assert_full(on(enc, settle(enc.node)))
    finally:
        if ranks is not None:
            ranks.close()
        enc.close()
