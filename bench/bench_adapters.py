"""The engine adapters' overhead over the bare emtransfer API, for the same payloads, in one run.

    python bench/bench_adapters.py [--adapters vllm] [--transport tcp|nixl] [--reps 5]
                                   [--sets 64x576,4x16384] [--json PATH]

Two processes on one host: this one is the language (prefill) side, a child process the encode
side. Each payload set is ``COUNTxTOKENS`` items of ``[TOKENS, 3584]`` bfloat16 (Qwen2.5-VL's
width): ``64x576`` is 64 images of 576 tokens, ``4x16384`` four payloads each larger than the
consumer's pool (64 blocks of 128 tokens: 8192), which resume. Per rep, in alternating order:

bare  -- the child offers every item on a ``SyncEncodeNode`` (``send``); here T0, then one
         ``SyncLanguageNode.receive(rid, peer, expected_tokens)`` per item, all in flight, and T1
         once every result is in hand.
vllm  -- the child offers every item through the vLLM connector's producer (``save_caches`` on
         an encoder-cache dict, as vLLM's runner calls it); here T0, then one request per item
         through the consumer connector in vLLM's call order (scheduler side:
         ``ensure_cache_available``, ``build_connector_meta``; worker side through vLLM's own
         ``ActiveECConnector``: ``start_load_caches`` (receives, and puts finished items in
         the encoder cache), ``get_finished``, stats, ``build_connector_worker_meta``; then
         ``update_connector_output``), stepping until ``has_cache_item`` is true for every
         item, T1: the moment vLLM could schedule them all. A step that finds nothing new
         waits for the oldest receive in flight to end (a real engine steps without waiting;
         this keeps the 2 cores for the transfers).

Both offer before T0, so the clock covers the consumer's side; the offer calls are timed apart
(``offer_ms``), and so is the time spent inside the connector's calls on the language side
(``in connector ms``: its bookkeeping, without the waits for transfers). Every received tensor is checked against the sent one after T1. Medians of the
reps with their min-max spread; the table goes to stdout, the JSON to ``--json`` or a new file
under ``bench/results/2026-12-01/`` (never an existing one).

sglang -- the child offers every item through SGLang's encoder-side delivery
         (``EmtransferDelivery.send``, as its encoder's ``send_with_url`` calls it per rank);
         here T0, then one request per item through SGLang's scheduler loop as
         ``emtransfer.integrations.sglang.register()`` patches it
         (``process_waiting_requests`` over ``EmtransferWaitingRequest``), ticking until every
         request came out assembled, T1. See the SGLang section for what is left out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch

import emtransfer as et

HIDDEN = 3584
DTYPE = torch.bfloat16
RESULTS = Path(__file__).resolve().parent / "results" / "2026-12-01"
WAIT = 300.0


def settings_kw(transport: str) -> dict[str, Any]:
    return {"hidden_size": HIDDEN, "dtype": "bfloat16", "transport": transport}


def make_items(tag: str, count: int, tokens: int) -> dict[str, torch.Tensor]:
    """``count`` payloads keyed by an mm_hash-like id, deterministic from ``tag``."""
    g = torch.Generator().manual_seed(count * 100_003 + tokens)
    base = torch.randn((tokens, HIDDEN), generator=g).to(DTYPE)
    return {f"{tag}-{i:03d}": base.roll(i, 0) for i in range(count)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ec_config(role: str, transport: str, port: int, producer: str | None = None) -> Any:
    from vllm.config import ECTransferConfig

    extra: dict[str, Any] = {"transport": transport}
    if producer is not None:
        extra["producer_addr"] = producer
    return ECTransferConfig(
        ec_connector="EmtransferECConnector",
        ec_connector_module_path="emtransfer.integrations.vllm",
        ec_role=role,
        ec_ip="127.0.0.1",
        ec_port=port,
        ec_connector_extra_config=extra,
    )


def _vllm_config(ec: Any) -> Any:
    """What the connector reads of a VllmConfig: the EC config and the model's dtype/width."""
    model = SimpleNamespace(dtype=DTYPE, get_hidden_size=lambda: HIDDEN)
    return SimpleNamespace(ec_transfer_config=ec, model_config=model, use_v2_model_runner=True)


# ----------------------------------------------------------------------------- the encode side


def encode_child(conn: Any, transport: str, ports: dict[str, int]) -> None:
    """Offers items on command: ``("offer", adapter, tag, count, tokens)``."""
    torch.set_num_threads(1)
    try:
        from emtransfer.sync import SyncEncodeNode

        bare = SyncEncodeNode(et.Settings(**settings_kw(transport), bootstrap_port=ports["bare"]))
        from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole

        from emtransfer.integrations.vllm import EmtransferECConnector

        vc = _vllm_config(_ec_config("ec_producer", transport, ports["vllm"]))
        producer = EmtransferECConnector(vc, ECConnectorRole.WORKER)
        producer.start_worker_services()
        sglang: SGLangEncodeSide | None = None  # built on its first offer (imports SGLang)
        conn.send(("ready", {"bare": bare.address, "vllm": f"127.0.0.1:{ports['vllm']}"}))
        handles: list[Any] = []
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            _, adapter, tag, count, tokens = msg
            for h in handles:  # the previous rep's sends: over by now (their items arrived)
                h.result(WAIT)
                h.release()
            handles.clear()
            if sglang is not None:
                sglang.wait_sent()
            producer.get_finished(set())  # the connector reaps its sends once per step
            items = make_items(tag, count, tokens)
            t0 = time.perf_counter()
            if adapter == "bare":
                handles = [bare.send(rid, {"embeddings": t}) for rid, t in items.items()]
            elif adapter == "vllm":
                for mm_hash in items:
                    producer.save_caches(items, mm_hash)
            elif adapter == "sglang":
                sglang = sglang or SGLangEncodeSide(transport, ports["sglang"])
                t0 = time.perf_counter()  # not the import and set-up of the first offer
                sglang.offer(items)
            else:
                raise ValueError(f"unknown adapter {adapter!r}")
            conn.send(("offered", time.perf_counter() - t0))
        producer.shutdown()
        if sglang is not None:
            sglang.close()
        bare.close()
        conn.send(("closed", None))
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def _recv(conn: Any) -> Any:
    if not conn.poll(WAIT):
        raise TimeoutError("the encode process said nothing")
    msg = conn.recv()
    if msg[0] == "crash":
        raise RuntimeError(f"the encode process failed:\n{msg[1]}")
    return msg


# --------------------------------------------------------------------------- the language side


def run_bare(ctx: dict[str, Any], items: dict[str, torch.Tensor]) -> tuple[float, dict]:
    lang = ctx["bare_lang"]
    peer = ctx["addresses"]["bare"]
    t0 = time.perf_counter()
    handles = {rid: lang.receive(rid, peer, int(t.shape[0])) for rid, t in items.items()}
    got = {rid: h.result(WAIT).tensors["embeddings"] for rid, h in handles.items()}
    t1 = time.perf_counter()
    for h in handles.values():
        h.release()
    return t1 - t0, got


def run_vllm(ctx: dict[str, Any], items: dict[str, torch.Tensor]) -> tuple[float, dict]:
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    sched, ec, cache = ctx["sched"], ctx["ec"], ctx["cache"]
    worker = ctx["worker"]._worker
    requests = [
        Request(
            f"req-{mm_hash}",
            [7] * (int(t.shape[0]) + 2),
            SamplingParams(max_tokens=1),
            None,
            mm_features=[
                MultiModalFeatureSpec(
                    data=None,
                    modality="image",
                    identifier=mm_hash,
                    mm_position=PlaceholderRange(offset=1, length=int(t.shape[0])),
                )
            ],
        )
        for mm_hash, t in items.items()
    ]

    def step(free: list[str]) -> Any:
        so = SimpleNamespace(free_encoder_mm_hashes=free, finished_req_ids=set())
        so.ec_connector_metadata = sched.build_connector_meta(so)
        out = ec.no_forward(so).ec_connector_output  # vLLM's worker plumbing, as on a 0-token step
        if out is not None:
            sched.update_connector_output(out)
        return out

    t0 = time.perf_counter()
    inside = 0.0  # time in the connector's calls (the bookkeeping), not waiting for transfers
    waiting = list(requests)
    while waiting:
        c0 = time.perf_counter()
        waiting = [r for r in waiting if not sched.ensure_cache_available(r, 0)]
        out = None if not waiting else step([])
        inside += time.perf_counter() - c0
        if not waiting:
            break
        if out is None or out.ec_connector_worker_meta is None:  # nothing new: wait
            oldest = next(iter(worker._loads.values()), None)
            if oldest is not None:
                try:
                    oldest[1].result(WAIT)
                except et.TransferError:
                    pass
    assert all(sched.has_cache_item(h) for h in items)
    t1 = time.perf_counter()
    ctx.setdefault("inside", []).append(inside)
    got = {h: cache[h] for h in items}
    for r in requests:  # vLLM allocates them (the cache owns them), then they end
        sched.update_state_after_alloc(r, 0)
        sched.request_finished(r)
    step(list(items))  # the scheduler frees them; the worker forgets it placed them
    for h in items:
        cache.pop(h, None)
    return t1 - t0, got


# ------------------------------------------------------------------------------ SGLang section
# The SGLang adapter (emtransfer.integrations.sglang) moves each item as one request's single
# image part. Encode side: SGLang's delivery call, ``EmtransferDelivery.send(state,
# destination)`` (what its encoder's ``send_with_url`` awaits for each registered rank), on
# an event loop standing in for the encoder server's, for every item at once. Language side:
# one ``TokenizedGenerateReqInput`` per item through SGLang's scheduler-side loop,
# ``MMReceiverHTTP.process_waiting_requests`` as ``register()`` patches it (SGLang's
# ``_process_waiting_requests``: ``EmtransferWaitingRequest`` per request, ticked, statuses
# all-reduced over a one-rank gloo group, parts aggregated and handed to the multimodal
# processor), ticking until every request came out assembled, T1. A tick that finds nothing
# new waits for the oldest receive in flight, as for vLLM. SGLang's registration call to its
# encoder (an HTTP POST, its control path, not the adapter's) is left out; the ranks do not
# know the payloads' lengths (SGLang does not tell them), so they receive into the default
# allocation and resume, where bare is given the length.
SGLANG_URL = "http://127.0.0.1:1"  # the encoder URL the requests name (mapped below)
SGLANG_ENDPOINT_PORT = 1  # the rank's receive endpoint: a name in the rids, no socket


def _import_sglang() -> None:
    """SGLang imports torchvision, whose wheels are CUDA builds: on CPU torch the tests'
    import-only stand-in is installed first (a working torchvision is kept)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import torchvision_stub

    torchvision_stub.install()


class SGLangEncodeSide:
    """SGLang's encoder-side delivery through emtransfer, driven as its encoder drives it."""

    def __init__(self, transport: str, port: int) -> None:
        _import_sglang()
        import asyncio
        import threading

        from sglang.srt.disaggregation.encoder.server import MMEncoder

        from emtransfer.integrations.sglang.delivery import EmtransferDelivery, EncoderLink

        self.link = EncoderLink(et.Settings(**settings_kw(transport), bootstrap_port=port))
        # the encoder's own wait for a staged embedding (it only reads the state)
        encoder = SimpleNamespace(
            _wait_for_embedding=lambda state: MMEncoder._wait_for_embedding(None, state)
        )
        self.delivery = EmtransferDelivery(encoder, self.link)
        self.loop = asyncio.new_event_loop()  # stands in for the encoder server's loop
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.futures: list[Any] = []

    def offer(self, items: dict[str, torch.Tensor]) -> None:
        import asyncio

        from sglang.srt.disaggregation.encoder.receiver import EmbeddingData, create_part_req_id
        from sglang.srt.disaggregation.encoder.server import ReqState, SendDestination
        from sglang.srt.managers.schedule_batch import Modality

        endpoint = f"127.0.0.1:{SGLANG_ENDPOINT_PORT}"

        async def send(rid: str, t: torch.Tensor) -> None:
            part = create_part_req_id(rid, 0)
            state = ReqState(part)
            grid = torch.tensor([[1, 2, 2 * int(t.shape[0])]])
            state.embedding_data = EmbeddingData(part, 1, 0, grid, Modality.IMAGE, t)
            state.embedding_ready.set()
            await self.delivery.send(state, SendDestination(endpoint=endpoint))
            await self.delivery.release(state)

        self.futures = [
            asyncio.run_coroutine_threadsafe(send(rid, t), self.loop) for rid, t in items.items()
        ]

    def wait_sent(self) -> None:
        for f in self.futures:
            f.result(WAIT)
        self.futures.clear()

    def close(self) -> None:
        self.wait_sent()
        self.link.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


class _Processor:
    """The model's multimodal processor, standing in: keeps what SGLang assembled, by rid
    (the prompt is the rid)."""

    prefer_tokenized_input = False

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def get_validated_mm_data(self, prompt: str, embeddings: dict, **meta: Any) -> Any:
        (tensor,) = embeddings.values()
        self.got[prompt] = tensor
        return SimpleNamespace(input_ids=[1], mm_items=[SimpleNamespace()])


class _NoRegistration:
    """SGLang's registration runner, standing in: the HTTP call to the encoder is SGLang's
    control path (bare has none), so it is skipped, as if it had succeeded."""

    def submit(self, coroutine: Any) -> Any:
        import concurrent.futures

        coroutine.close()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done


def _setup_sglang(ctx: dict[str, Any], transport: str, port: int) -> None:
    _import_sglang()
    import torch.distributed as dist
    from sglang.srt.disaggregation.encoder import receiver as R

    from emtransfer.integrations.sglang import register
    from emtransfer.integrations.sglang.receiver import LanguageLink

    register()
    if not dist.is_initialized():  # SGLang all-reduces the statuses over the TP group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rc = object.__new__(R.MMReceiverHTTP)  # a scheduler rank's receiver, without a model
    rc.encoder_transfer_backend = "zmq_to_scheduler"
    rc.hostname = "127.0.0.1"
    rc.scheduler_embedding_port, rc.scheduler_recv_socket = SGLANG_ENDPOINT_PORT, None
    import zmq

    rc.scheduler_context = zmq.Context()  # shared, as a rank's own socket context
    rc.registration_runner = _NoRegistration()
    rc.waiting_list, rc.waiting_by_rid = [], {}
    rc.mm_processor = _Processor()
    rc.model_type = "qwen2_5_vl"
    rc.tp_size = 1
    rc.tp_group = SimpleNamespace(cpu_group=dist.group.WORLD)
    rc.wait_timeout = WAIT
    rc.embedding_pool = None
    rc.encode_urls = [SGLANG_URL]
    link = LanguageLink(
        et.Settings(**settings_kw(transport)), encoders={SGLANG_URL: f"127.0.0.1:{port}"}
    )
    rc.emtransfer_link = link
    ctx["sglang_rc"] = rc


def run_sglang(ctx: dict[str, Any], items: dict[str, torch.Tensor]) -> tuple[float, dict]:
    from array import array

    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.schedule_batch import Modality
    from sglang.srt.sampling.sampling_params import SamplingParams

    rc = ctx["sglang_rc"]
    inbox = [
        TokenizedGenerateReqInput(
            rid=rid,
            input_text=rid,
            input_ids=array("q", [7] * 4),
            input_embeds=None,
            mm_inputs=None,
            token_type_ids=None,
            sampling_params=SamplingParams(),
            return_logprob=False,
            logprob_start_len=-1,
            top_logprobs_num=0,
            token_ids_logprob=None,
            stream=False,
            need_wait_for_mm_inputs=True,
            num_items_assigned={Modality.IMAGE: [1]},
            encoder_urls=[SGLANG_URL],
        )
        for rid in items
    ]
    t0 = time.perf_counter()
    inside = 0.0
    done: set[str] = set()
    while len(done) < len(items):
        c0 = time.perf_counter()
        out, aborts = rc.process_waiting_requests(inbox)
        inside += time.perf_counter() - c0
        inbox = []
        if aborts:
            raise RuntimeError(f"sglang: requests failed: {[(r.rid, m) for r, m, _ in aborts]}")
        done.update(r.rid for r in out)
        if not out and len(done) < len(items):  # nothing new: wait for the oldest receive
            oldest = next(
                (p.handle for w in rc.waiting_list for p in w._parts if not p.taken), None
            )
            if oldest is not None:
                try:
                    oldest.result(WAIT)
                except et.TransferError:
                    pass
    t1 = time.perf_counter()
    ctx.setdefault("inside", []).append(inside)
    got = {rid: rc.mm_processor.got.pop(rid) for rid in items}
    return t1 - t0, got


ADAPTERS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], tuple[float, dict]]] = {
    "bare": run_bare,
    "vllm": run_vllm,
    "sglang": run_sglang,
}


def _setup_vllm(ctx: dict[str, Any], transport: str) -> None:
    from vllm.distributed.ec_transfer import ensure_ec_transfer_initialized, get_ec_transfer
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    from vllm.v1.worker.gpu.ec_connector import ActiveECConnector

    vc = _vllm_config(_ec_config("ec_consumer", transport, 0, ctx["addresses"]["vllm"]))
    ctx["sched"] = ECConnectorFactory.create_connector(vc, ECConnectorRole.SCHEDULER)
    ensure_ec_transfer_initialized(vc)  # the worker-side connector, as gpu_worker makes it
    ctx["worker"] = get_ec_transfer()
    ctx["worker"].start_worker_services()
    ctx["cache"] = {}
    ctx["ec"] = ActiveECConnector(vc, ctx["cache"])  # type: ignore[arg-type]


def _teardown_vllm(ctx: dict[str, Any]) -> None:
    from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

    ctx["sched"].shutdown()
    ensure_ec_transfer_shutdown()


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", default="vllm", help="comma-separated: vllm, sglang")
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sets", default="64x576,4x16384")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    for a in adapters:
        if a not in ADAPTERS or a == "bare":
            ap.error(
                f"unknown adapter {a!r}; known: {', '.join(k for k in ADAPTERS if k != 'bare')}"
            )
    sets = [tuple(int(x) for x in s.split("x")) for s in args.sets.split(",")]
    torch.set_num_threads(1)
    et.configure_logging("warning")

    from emtransfer.sync import SyncLanguageNode

    mpctx = mp.get_context("spawn")
    conn, child_conn = mpctx.Pipe()
    ports = {"bare": _free_port(), "vllm": _free_port(), "sglang": _free_port()}
    child = mpctx.Process(target=encode_child, args=(child_conn, args.transport, ports))
    child.start()
    ctx: dict[str, Any] = {"addresses": _recv(conn)[1]}
    ctx["bare_lang"] = SyncLanguageNode(et.Settings(**settings_kw(args.transport)))
    if "vllm" in adapters:
        _setup_vllm(ctx, args.transport)
    if "sglang" in adapters:
        _setup_sglang(ctx, args.transport, ports["sglang"])
    results: dict[str, Any] = {}
    try:
        for count, tokens in sets:
            name = f"{count}x{tokens}"
            runs: dict[str, list[float]] = {a: [] for a in ("bare", *adapters)}
            offers: dict[str, list[float]] = {a: [] for a in runs}
            connector: dict[str, list[float]] = {a: [] for a in adapters}
            order = list(runs)
            for rep in range(args.warmup + args.reps):
                for adapter in order if rep % 2 == 0 else order[::-1]:
                    tag = f"{adapter}-{name}-{rep}"
                    conn.send(("offer", adapter, tag, count, tokens))
                    offered = _recv(conn)[1]
                    seconds, got = ADAPTERS[adapter](ctx, _expected(tag, count, tokens))
                    want = make_items(tag, count, tokens)
                    bad = [k for k, v in want.items() if not torch.equal(got[k], v)]
                    if bad:
                        raise AssertionError(f"{adapter} {name}: {len(bad)} payloads differ")
                    inside = ctx.pop("inside", [None])[-1]
                    if rep >= args.warmup:
                        runs[adapter].append(seconds)
                        offers[adapter].append(offered)
                        if inside is not None:
                            connector[adapter].append(inside)
            nbytes = count * tokens * HIDDEN * DTYPE.itemsize
            results[name] = {
                "count": count,
                "tokens": tokens,
                "bytes": nbytes,
                "seconds": {a: _summary(v) for a, v in runs.items()},
                "offer_ms": {a: 1000 * statistics.median(v) for a, v in offers.items()},
                "connector_ms": {
                    a: {k: 1000 * v for k, v in _summary(xs).items()}
                    for a, xs in connector.items()
                    if xs
                },
                "raw": runs,
            }
    finally:
        conn.send(("close",))
        _recv(conn)
        child.join(60)
        if "vllm" in adapters:
            _teardown_vllm(ctx)
        if "sglang" in adapters:
            ctx["sglang_rc"].emtransfer_link.close()
        ctx["bare_lang"].close()
    _print(results, args)
    out = {
        "bench": "bench_adapters",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "transport": args.transport,
        "reps": args.reps,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version},
        "emtransfer": et.__version__,
        "sets": results,
    }
    path = args.json or _new_path(f"adapters-{'-'.join(adapters)}-{args.transport}")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _expected(tag: str, count: int, tokens: int) -> dict[str, torch.Tensor]:
    """The items by id with their shapes (the language side knows the lengths, as vLLM does)."""
    return {f"{tag}-{i:03d}": torch.empty((tokens, 0)) for i in range(count)}


def _new_path(stem: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = RESULTS / f"{stem}-run{i}.json"
        if not path.exists():
            return path
    raise RuntimeError("no free result file name")


def _print(results: dict[str, Any], args: Any) -> None:
    print(f"\nadapters over the bare emtransfer API ({args.transport}, {args.reps} reps)")
    print("median [min-max]; overhead: the adapter's median minus bare's")
    header = (
        f"{'set':<9} {'adapter':<7} {'seconds':>25} {'GB/s':>5} {'overhead':>21} "
        f"{'offer ms':>8} {'in connector ms':>20}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        base = r["seconds"]["bare"]
        for adapter, s in r["seconds"].items():
            rate = r["bytes"] / s["median"] / 1e9
            span = f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"
            if adapter == "bare":
                over = "-"
            else:
                d = 1000 * (s["median"] - base["median"])
                over = f"{d:+.1f} ms ({s['median'] / base['median']:.3f}x)"
            c = r["connector_ms"].get(adapter)
            inside = f"{c['median']:.2f} [{c['min']:.2f}-{c['max']:.2f}]" if c else "-"
            offer = r["offer_ms"][adapter]
            print(
                f"{name:<9} {adapter:<7} {span:>25} {rate:>5.2f} {over:>21} "
                f"{offer:>8.2f} {inside:>20}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
