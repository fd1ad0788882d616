"""SGLang's real encoder-disaggregation classes, in child processes, with emtransfer.

Two roles, each a spawned process driven over a pipe (``Child``):

- the **producer** (``producer_main``): SGLang's encoder HTTP server (``http_server.app``,
  its real ``/encode`` and ``/scheduler_receive_url`` routes, ``execute_encode_pipeline``,
  ``MMEncoder.batch_encode``, ``_stage_embeddings``, ``send_with_url``, ``release_request``)
  around a ``HarnessEncoder``: an ``MMEncoder`` whose three model-dependent steps are stand-ins
  (the HF preprocessing, the TP status exchange of a single rank, the vision tower's forward),
  delivering through ``EmtransferDelivery`` (``install_delivery``, what the patched
  ``MMEncoder.__init__`` runs).
- the **consumer** (``consumer_main``): SGLang's tokenizer-side dispatch
  (``MMReceiverHTTP._send_encode_request``, which POSTs ``/encode`` from its own thread) and a
  scheduler rank's receiver (``MMReceiverHTTP.process_waiting_requests`` as patched by
  ``register()``, i.e. SGLang's ``_process_waiting_requests`` with its status all-reduce on a
  real gloo group, over ``EmtransferWaitingRequest``), ticked as the scheduler ticks it.

The media are synthetic: an item URL ``emt://<kind>/<tokens>/<seed>`` says how many tokens its
embedding has and seeds its values, so either process can compute what must arrive.
``kind`` is ``image`` or ``video``, ``fail`` (its preprocessing refuses it), ``nomrope``
(its part lacks the M-RoPE positions the settings carry as a field) or ``hang`` (the forward
waits until the test releases it).

No sleeps and no polling loops: the scheduler ticks when a transfer handle changed (the
handles' observer and outcome hooks notify a condition), when a dispatch error arrived, or at
SGLang's own wait deadline; the producer's cleanup is awaited on a condition that its
``release_request`` notifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
import traceback
from array import array
from collections.abc import Callable
from typing import Any

import torch

HIDDEN = 64
SETTINGS: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "dtype": "bfloat16",
    "block_size": 16,
    "default_blocks": 4,  # 64 tokens: larger parts resume
    "num_blocks": 64,
    "fields": {"mrope_positions": {"shape": [3], "dtype": "int64"}},
    "transport": "tcp",
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.5,
    "bootstrap_timeout": 5.0,
    "init_timeout": 2.0,  # an offer no rank claims (its receive was given up) ends soon
    "data_timeout": 20.0,
    "chunk_timeout": 20.0,
    "resume_timeout": 10.0,
    "alloc_timeout": 10.0,
    "abort_ack_timeout": 2.0,
    "write_timeout": 5.0,
}
WAIT = 20.0  # seconds any one wait of these tests may take


def import_sglang() -> None:
    """The torchvision stand-in, then SGLang's modules (a failure here fails the test)."""
    import torchvision_stub

    torchvision_stub.install()
    import sglang.srt.disaggregation.encoder.http_server
    import sglang.srt.disaggregation.encoder.receiver
    import sglang.srt.disaggregation.encoder.server  # noqa: F401


# -- the synthetic media -------------------------------------------------------------------------
def url(kind: str, tokens: int, seed: int) -> str:
    return f"emt://{kind}/{tokens}/{seed}"


def parse(item: Any) -> tuple[str, int, int]:
    u = item if isinstance(item, str) else item["url"]
    kind, tokens, seed = u.removeprefix("emt://").split("/")
    return kind, int(tokens), int(seed)


def item_embedding(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16)


def item_mrope(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, 1 << 40, (tokens, 3), generator=g, dtype=torch.int64)


def item_grid(tokens: int) -> list[int]:
    return [1, 2, 2 * tokens]  # t*h*w / merge^2 = tokens (Qwen-VL's 2x2 merge)


def item_timestamps(tokens: int, seed: int) -> list[float]:
    return [seed + 0.5 * i for i in range(tokens % 4 + 1)]


def digest(embedding: torch.Tensor | None, attrs: dict[str, Any]) -> str:
    """A part's embedding bytes and metadata, hashed (the same on both sides)."""
    import msgspec

    from emtransfer.integrations.sglang.payload import encode_value

    h = hashlib.sha256()
    if embedding is not None:
        h.update(embedding.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(msgspec.msgpack.encode(encode_value(dict(sorted(attrs.items())))))
    return h.hexdigest()


# -- the producer ---------------------------------------------------------------------------------
def harness_encoder_class() -> type:
    from sglang.srt.disaggregation.encoder import server as S
    from sglang.srt.disaggregation.encoder.preprocessor import EncoderPreprocessResult
    from sglang.srt.managers.schedule_batch import Modality

    from emtransfer.integrations.sglang.payload import public_attrs

    class HarnessEncoder(S.MMEncoder):  # type: ignore[misc]
        """SGLang's MMEncoder with stand-ins for its model-dependent steps only."""

        def __init__(self, send_timeout: float) -> None:  # no model to load
            import concurrent.futures

            import zmq.asyncio

            self.server_args = None
            self.rank, self.dp_rank, self.profiler = 0, 0, None
            self.model_type = "qwen3_vl"
            self.transfer_backend = "zmq_to_scheduler"
            self.use_mooncake = False
            self.send_timeout = send_timeout
            self.context = zmq.asyncio.Context(2)
            self.sync_context = zmq.Context()
            self.scheduler_send_sockets: dict[str, Any] = {}
            self.scheduler_send_locks: dict[str, Any] = {}
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
            self.background_tasks: set[asyncio.Task[Any]] = set()
            self._embedding_dtype = torch.bfloat16
            self._element_size = 2
            self._embedding_dims = {m: HIDDEN for m in (Modality.IMAGE, Modality.VIDEO)}
            self.mm_global_cache = None
            self.req_states: dict[str, Any] = {}
            self.abandoned_req_ids: set[str] = set()
            self.encode_dispatch_lock = asyncio.Lock()
            self.staged: dict[str, str] = {}  # part req_id -> digest of what was staged
            self.hangs: dict[int, asyncio.Event] = {}
            self.released = asyncio.Condition()

        # stand-in: the HF processor (what it yields: grids, token counts, video metadata)
        async def _prepare_encode_context(  # type: ignore[override]
            self,
            requests: list[dict[str, Any]],
            modality: Any,
            *,
            use_global_cache: bool,
            is_health_check: bool = False,
        ) -> Any:
            items = [parse(i) for r in requests for i in r["mm_items"]]
            if any(kind == "fail" for kind, _, _ in items):
                raise S.BadRequestError("harness: this image is refused")
            mm_inputs: dict[str, Any] = {}
            if modality == Modality.VIDEO:
                mm_inputs["video_timestamps"] = [item_timestamps(t, s) for _, t, s in items]
                mm_inputs["second_per_grid_ts"] = torch.tensor([1.0 + s for _, _, s in items])
            aux = S._build_mm_aux_data(mm_inputs, self.model_type)
            if not any(kind == "nomrope" for kind, _, _ in items):
                aux["mrope_positions"] = torch.cat([item_mrope(t, s) for _, t, s in items])
            aux["mrope_position_delta"] = -sum(t for _, t, _ in items)
            result = EncoderPreprocessResult(
                mm_inputs=mm_inputs,
                grid_thw=torch.tensor([item_grid(t) for _, t, _ in items]),
                token_counts=[t for _, t, _ in items],
            )
            return S.EncodeContext(
                req_id=requests[0]["req_id"],
                modality=modality,
                preprocess_result=result,
                get_feature_fn=None,
                mm_feature=items,
                num_items=len(items),
                items_per_req=[len(r["mm_items"]) for r in requests],
                aux_data=aux,
                str_mm_hashes=None,
                use_global_cache=False,
                is_health_check=is_health_check,
            )

        # stand-in: the TP status exchange, for a group of one rank
        def _sync_tp_prepare_status(
            self, local_error: Any, *, error_phase: int, layout_digest: Any
        ) -> Any:
            if local_error is None:
                return [torch.tensor([0, error_phase, *layout_digest])]
            phase = "Encoder metadata publication" if error_phase == 2 else "Encoder preprocessing"
            message = f"{phase} failed on TP rank 0: {local_error}"
            if isinstance(local_error, S.BadRequestError):
                raise S.BadRequestError(message)
            raise S.InternalError(message)

        # stand-in: the vision tower
        async def _compute_embedding(self, ctx: Any, *, keep_on_gpu: bool) -> Any:
            for kind, _, seed in ctx.mm_feature:
                if kind == "hang":
                    await self.hangs.setdefault(seed, asyncio.Event()).wait()
            return torch.cat([item_embedding(t, s) for _, t, s in ctx.mm_feature])

        def _stage_embedding_batch(self, embeddings: list[Any]) -> None:
            for mm_data in embeddings:
                self.staged[mm_data.req_id] = digest(mm_data.embedding, public_attrs(mm_data))
            super()._stage_embedding_batch(embeddings)

        async def release_request(self, req_id: str, **kw: Any) -> None:
            try:
                await super().release_request(req_id, **kw)
            finally:
                async with self.released:
                    self.released.notify_all()

    return HarnessEncoder


def producer_main(conn: Any, settings: dict[str, Any]) -> None:
    try:
        import_sglang()
        import uvicorn
        from sglang.srt.disaggregation.encoder import http_server, server
        from sync_harness import settle

        import emtransfer as et
        from emtransfer.integrations.sglang import register
        from emtransfer.integrations.sglang.delivery import EncoderLink, install_delivery

        torch.set_num_threads(1)
        register()
        enc = harness_encoder_class()(send_timeout=10.0)
        link = EncoderLink(et.Settings(**settings))
        assert install_delivery(enc, link), "the delivery was not installed"
        http_server.encoder = enc
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # clients queue here until uvicorn serves
        loop = asyncio.new_event_loop()
        config = uvicorn.Config(http_server.app, log_level="error", access_log=False)
        httpd = uvicorn.Server(config)
        threading.Thread(
            target=loop.run_until_complete, args=(httpd.serve(sockets=[sock]),), daemon=True
        ).start()
        conn.send(
            ("ready", {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "address": link.address})
        )

        def on_loop(coro: Any, timeout: float = WAIT) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

        async def release(seed: int) -> None:
            enc.hangs.setdefault(seed, asyncio.Event()).set()

        async def drained(timeout: float) -> None:
            async with enc.released:
                await asyncio.wait_for(enc.released.wait_for(lambda: not enc.req_states), timeout)

        while True:
            msg = conn.recv()
            if msg[0] == "staged":
                conn.send(("staged", dict(enc.staged)))
            elif msg[0] == "release":
                on_loop(release(msg[1]))
                conn.send(("released",))
            elif msg[0] == "settle":
                on_loop(drained(WAIT), WAIT + 1)
                pool = asyncio.run_coroutine_threadsafe(
                    settle(link.node.node), link.node.loop
                ).result(WAIT + 1)
                conn.send(
                    (
                        "settled",
                        {
                            "pool": pool,
                            "req_states": sorted(enc.req_states),
                            "endpoints": sorted(server.rid_to_receive_endpoint),
                            "sends": sorted(enc.delivery._sends),
                            "open_handles": len(link.node.open_handles()),
                            "held_bytes": link.node.node.held_bytes,
                        },
                    )
                )
            elif msg[0] == "close":
                link.close()
                httpd.should_exit = True
                conn.send(("closed",))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


# -- the consumer ---------------------------------------------------------------------------------
class Ticks:
    """What wakes the scheduler loop: a handle's change, a dispatch error, or a deadline."""

    def __init__(self) -> None:
        from emtransfer.sync import TransferHandle

        self.cond = threading.Condition()
        self.version = 0
        observe, finish = TransferHandle._observe, TransferHandle._finish

        def observed(h: Any, session: Any) -> None:
            observe(h, session)
            self.bump()

        def finished(h: Any, *a: Any, **kw: Any) -> None:
            finish(h, *a, **kw)
            self.bump()

        TransferHandle._observe = observed  # type: ignore[method-assign]
        TransferHandle._finish = finished  # type: ignore[method-assign]

    def bump(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()

    def seen(self) -> int:
        with self.cond:
            return self.version

    def wait(self, seen: int, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.version != seen, max(timeout, 0.0))


class RecordingProcessor:
    """Stands in for the model's multimodal processor: records what SGLang hands it (the
    embeddings by modality and the per-part metadata), and returns inputs as it would."""

    prefer_tokenized_input = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []

    def get_validated_mm_data(self, prompt: Any, embeddings: Any, **meta: Any) -> Any:
        from types import SimpleNamespace

        self.calls.append((prompt, dict(embeddings), meta))
        return SimpleNamespace(input_ids=[1, 2, 3], mm_items=[SimpleNamespace()])


def expected_parts(items: list[str], assigned: Any) -> list[dict[str, Any]]:
    """SGLang's parts of a request: (part_idx, modality, items), numbered as it numbers them."""
    from sglang.srt.managers.schedule_batch import Modality

    by_mod: dict[Any, list[tuple[str, int, int]]] = {}
    for item in items:
        kind, t, s = parse(item)
        mod = Modality.VIDEO if kind == "video" else Modality.IMAGE
        by_mod.setdefault(mod, []).append((kind, t, s))
    parts, idx = [], 0
    for mod, counts in assigned.items():
        start = 0
        for n in counts:
            if n:
                parts.append(
                    {"part_idx": idx, "modality": mod, "items": by_mod[mod][start : start + n]}
                )
                start += n
                idx += 1
    return parts


def check_success(
    waiting: Any, processor: RecordingProcessor, items: list[str], assigned: Any
) -> dict[str, Any]:
    """Compare what SGLang's assembly received with what the encoder computed."""
    from sglang.srt.managers.schedule_batch import Modality

    parts = expected_parts(items, assigned)
    ((_, embeddings, meta),) = processor.calls[-1:]
    checks: dict[str, Any] = {}
    for mod in (Modality.IMAGE, Modality.VIDEO):
        its = [i for p in parts if p["modality"] == mod for i in p["items"]]
        if not its:
            checks[f"{mod.name}_absent"] = mod not in embeddings
            continue
        want = torch.cat([item_embedding(t, s) for _, t, s in its])
        got = embeddings.get(mod)
        checks[f"{mod.name}_embeddings"] = (
            got is not None and got.dtype == want.dtype and torch.equal(got, want)
        )
        grid = torch.tensor([item_grid(t) for _, t, _ in its])
        key = "img_grid_thw" if mod == Modality.IMAGE else "video_grid_thw"
        checks[key] = meta.get(key) is not None and torch.equal(meta[key], grid)
        if mod == Modality.VIDEO:
            checks["video_timestamps"] = meta.get("video_timestamps") == [
                x for _, t, s in its for x in item_timestamps(t, s)
            ] or meta.get("video_timestamps") == [item_timestamps(t, s) for _, t, s in its]
            # not one of SGLang's tensor attributes: chained as a list of 0-d tensors
            checks["second_per_grid_ts"] = [float(x) for x in meta["second_per_grid_ts"]] == [
                1.0 + s for _, _, s in its
            ]
    received = {p.part_idx: p for p in waiting.received_parts}
    checks["parts"] = sorted(received) == [p["part_idx"] for p in parts]
    for p in parts:
        got = received.get(p["part_idx"])
        if got is None:
            continue
        its = p["items"]
        checks[f"part{p['part_idx']}_mrope"] = torch.equal(
            got.mrope_positions, torch.cat([item_mrope(t, s) for _, t, s in its])
        )
        checks[f"part{p['part_idx']}_delta"] = got.mrope_position_delta == -sum(
            t for _, t, _ in its
        )
    from emtransfer.integrations.sglang.payload import public_attrs

    data = waiting.recv_embedding_data
    digests = {
        rec.req_id: digest(data.embedding_list[rec.part_idx], public_attrs(rec))
        for rec in waiting.received_parts
    }
    return {"checks": checks, "digests": digests}


def consumer_main(conn: Any, settings: dict[str, Any]) -> None:
    try:
        import_sglang()
        import torch.distributed as dist
        import zmq
        from sglang.srt.disaggregation.encoder import receiver as R
        from sglang.srt.managers.io_struct import (
            AbortReq,
            GenerateReqInput,
            TokenizedGenerateReqInput,
        )
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.utils.network import get_zmq_socket_on_host
        from sync_harness import settle

        import emtransfer as et
        from emtransfer.integrations.sglang import register
        from emtransfer.integrations.sglang.receiver import LanguageLink

        torch.set_num_threads(1)
        register()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ticks = Ticks()
        schedulers: dict[str, Any] = {}
        tokenizers: dict[str, Any] = {}
        runs: dict[str, dict[str, Any]] = {}
        conn.send(("ready", None))

        def scheduler(
            name: str, producer: dict[str, Any], overrides: dict[str, Any], wait_timeout: float
        ) -> Any:
            urls = [producer["url"], producer["url"]]  # two encoders: parts go to both
            encoders = {producer["url"]: producer["address"]}
            tokenizer = object.__new__(R.MMReceiverHTTP)  # SGLang's tokenizer-side receiver
            tokenizer.encode_urls = urls
            tokenizer.host = "127.0.0.1"
            tokenizers[name] = tokenizer
            rc = object.__new__(R.MMReceiverHTTP)  # a scheduler rank's receiver, unloaded
            rc.encoder_transfer_backend = "zmq_to_scheduler"
            rc.scheduler_context = zmq.Context()
            rc.hostname = "127.0.0.1"
            rc.scheduler_embedding_port, rc.scheduler_recv_socket = get_zmq_socket_on_host(
                rc.scheduler_context, zmq.PULL, host=rc.hostname
            )
            rc.registration_runner = R._ReceiveRegistrationRunner(f"registration-{name}")
            rc.waiting_list, rc.waiting_by_rid = [], {}
            rc.mm_processor = RecordingProcessor()
            rc.model_type = "qwen3_vl"
            rc.tp_size = 1
            rc.tp_group = type("TP", (), {"cpu_group": dist.group.WORLD})()
            rc.wait_timeout = wait_timeout
            rc.embedding_pool = None
            rc.encode_urls = urls
            # SGLang builds a scheduler Req for the abort it streams out; keep the input
            rc.create_req = lambda recv_req: recv_req
            rc.emtransfer_link = LanguageLink(
                et.Settings(**{**settings, **overrides}), encoders=encoders
            )
            return rc

        def tick(run: dict[str, Any]) -> None:
            rc = run["rc"]
            with ticks.cond:
                inputs, run["inbox"] = run["inbox"], []
            out, aborts = rc.process_waiting_requests(inputs)
            waiting = rc.waiting_by_rid.get(run["rid"]) or run.get("waiting")
            if waiting is not None:
                if "waiting" not in run and waiting.registration_future is not None:
                    # the registration's end is a change the scheduler must see, too
                    waiting.registration_future.add_done_callback(lambda _: ticks.bump())
                run["waiting"] = waiting
                if not run["statuses"] or run["statuses"][-1] != int(waiting.status):
                    run["statuses"].append(int(waiting.status))
            for req in out:
                if req.rid == run["rid"]:
                    run["outcome"] = {"kind": "success"}
            for req, msg, code in aborts:
                if req.rid == run["rid"]:
                    run["outcome"] = {
                        "kind": "aborted",
                        "error": msg,
                        "code": int(code) if code is not None else None,
                    }

        def tick_until(run: dict[str, Any], done: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + WAIT
            while True:
                seen = ticks.seen()
                tick(run)
                if done():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{run['rid']}: never {what} within {WAIT}s: {run['statuses']}"
                    )
                waiting = run.get("waiting")
                if (
                    waiting is not None and waiting in run["rc"].waiting_list
                ):  # SGLang's own deadline
                    left = min(
                        left, waiting.start_time + run["rc"].wait_timeout - time.time() + 0.01
                    )
                ticks.wait(seen, left)

        def transferring(run: dict[str, Any]) -> bool:
            from emtransfer.sync import PollState

            w = run.get("waiting")
            registered = (
                w is not None and w.registration_future is not None and w.registration_future.done()
            )
            return (
                registered
                and bool(w._parts)
                and all(
                    p.handle is not None and p.handle.poll() >= PollState.TRANSFERRING
                    for p in w._parts
                )
            )

        while True:
            msg = conn.recv()
            if msg[0] == "scheduler":
                _, name, producer, overrides, wait_timeout = msg
                schedulers[name] = scheduler(name, producer, overrides, wait_timeout)
                conn.send(("ok",))
            elif msg[0] == "patch":
                conn.send(("patch", patch_checks()))
            elif msg[0] == "codec":
                conn.send(("codec", codec_checks()))
            elif msg[0] == "start":
                _, name, rid, items, until, dispatch_errors = msg
                obj = GenerateReqInput(
                    text="describe",
                    image_data=[u for u in items if not u.startswith("emt://video")] or None,
                    video_data=[u for u in items if u.startswith("emt://video")] or None,
                    rid=rid,
                )
                run = runs[rid] = {"rid": rid, "rc": schedulers[name], "inbox": [], "statuses": []}

                def on_dispatch_error(
                    err: Any, run: dict[str, Any] = run, feed: bool = dispatch_errors
                ) -> None:
                    run.setdefault("dispatch_errors", []).append(err.error_msg)
                    if not feed:  # held back: the test looks at another failure
                        return
                    with ticks.cond:
                        run["inbox"].append(err)
                    ticks.bump()

                ready = tokenizers[name]._send_encode_request(
                    obj, on_dispatch_error=on_dispatch_error
                )
                run["items"] = list(obj.image_data or []) + list(obj.video_data or [])
                run["assigned"] = obj.num_items_assigned
                run["inbox"].append(
                    TokenizedGenerateReqInput(
                        rid=rid,
                        input_text="describe",
                        input_ids=array("q", [1, 2, 3]),
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
                        num_items_assigned=obj.num_items_assigned,
                        encoder_urls=obj.encoder_urls,
                    )
                )
                tick(run)  # the scheduler has the request now
                ready.set()
                if until == "transferring":
                    tick_until(
                        run, lambda run=run: transferring(run) or "outcome" in run, "transferring"
                    )
                conn.send(
                    ("started", {"statuses": run["statuses"], "parts": len(run["waiting"]._parts)})
                )
            elif msg[0] == "finish":
                _, rid, action = msg
                run = runs[rid]
                if action == "abort":
                    run["rc"].abort_waiting_requests(AbortReq(rid=rid))
                tick_until(run, lambda run=run: "outcome" in run, "done")
                waiting = run["waiting"]
                report = {
                    **run["outcome"],
                    "statuses": run["statuses"],
                    "error_msg": waiting.error_msg,
                    "error_code": waiting.error_code,
                    "open_parts": [p.part_rid for p in waiting._parts if not p.taken],
                    "waiting_left": [w.rid for w in run["rc"].waiting_list],
                    "dispatch_errors": run.get("dispatch_errors", []),
                }
                if report["kind"] == "success":
                    report.update(
                        check_success(
                            waiting, run["rc"].mm_processor, run["items"], run["assigned"]
                        )
                    )
                conn.send(("finished", report))
            elif msg[0] == "settle":
                node = schedulers[msg[1]].emtransfer_link.node
                pool = asyncio.run_coroutine_threadsafe(settle(node.node), node.loop).result(
                    WAIT + 1
                )
                conn.send(("settled", {"pool": pool, "open_handles": len(node.open_handles())}))
            elif msg[0] == "close":
                for rc in schedulers.values():
                    rc.emtransfer_link.close()
                conn.send(("closed",))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def patch_checks() -> dict[str, Any]:
    """register / unregister on SGLang's real classes: what each call did."""
    import importlib
    import runpy

    import sglang

    from emtransfer.errors import ConfigError
    from emtransfer.integrations.sglang import patch as P

    def current() -> list[Any]:
        return [getattr(importlib.import_module(m), c).__dict__[a] for m, c, a in P.TARGETS]

    out: dict[str, Any] = {}
    patched = current()
    out["registered"] = P.is_registered()
    out["marked"] = all(getattr(f, "__emtransfer_patch__", False) for f in patched)
    P.register()
    out["idempotent"] = current() == patched
    P.unregister()
    originals = current()
    out["restored"] = not P.is_registered() and all(
        a is not b and not getattr(a, "__emtransfer_patch__", False)
        for a, b in zip(originals, patched, strict=True)
    )
    P.unregister()
    out["unregister_idempotent"] = current() == originals
    version = sglang.__version__
    sglang.__version__ = "0.6.0"
    try:
        P.register()
        out["refused"] = "registered"
    except P.UnsupportedSGLang as exc:
        out["refused"] = str(exc)
    out["refused_left_unpatched"] = current() == originals and not P.is_registered()
    P.register(force=True)
    out["forced"] = P.is_registered()
    P.unregister()
    sglang.__version__ = version
    from sglang.srt.disaggregation.encoder import receiver as R

    status = R.WaitingMMRequestStatus
    R.WaitingMMRequestStatus = None
    out["shape_problems"] = P.check_sglang(force=True)
    R.WaitingMMRequestStatus = status
    runpy.run_module("emtransfer.integrations.sglang.launch", run_name="__mp_main__")
    out["launch_child_registers"] = P.is_registered()
    cls = R.MMReceiverHTTP
    ours = cls.__dict__["process_waiting_requests"]
    cls.process_waiting_requests = lambda self, recv_reqs: recv_reqs
    try:
        P.unregister()
        out["foreign_patch"] = "restored anyway"
    except ConfigError as exc:
        out["foreign_patch"] = str(exc)
    cls.process_waiting_requests = ours
    out["still_registered"] = P.is_registered() and current() == patched
    return out


def codec_checks() -> dict[str, Any]:
    """The payload codec on SGLang's EmbeddingData: typed values, errors, refusals."""
    import numpy as np
    from sglang.srt.disaggregation.encoder.receiver import EmbeddingData
    from sglang.srt.managers.schedule_batch import Modality

    import emtransfer as et
    from emtransfer.errors import PayloadError
    from emtransfer.integrations.sglang.payload import (
        decode_value,
        encode_value,
        from_received,
        public_attrs,
        to_payload,
    )

    settings = et.Settings(**SETTINGS)
    out: dict[str, Any] = {}
    value = {
        "t": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bf": torch.randn(3, dtype=torch.float32).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(7),
        "tuple": (1, "a", None, 2.5, b"x"),
        "list": [[1, 2], {"k": Modality.VIDEO}],
        "dtype": torch.float16,
        "np": np.arange(4, dtype=np.int32),
        "npscalar": np.float32(1.5),
    }
    back = decode_value(encode_value(value))
    out["values"] = (
        torch.equal(back["t"], value["t"])
        and torch.equal(back["bf"], value["bf"])
        and back["bf"].dtype == torch.bfloat16
        and back["empty"].shape == (0, 4)
        and back["scalar"].shape == ()
        and int(back["scalar"]) == 7
        and back["tuple"] == value["tuple"]
        and back["list"] == [[1, 2], {"k": Modality.VIDEO}]
        and back["dtype"] is torch.float16
        and torch.equal(back["np"], torch.arange(4, dtype=torch.int32))
        and back["npscalar"] == 1.5
    )
    refusals = {}
    for name, bad in {
        "object": object(),
        "keys": {1: 2},
        "complex": torch.zeros(1, dtype=torch.complex64),
    }.items():
        try:
            encode_value(bad, name)
            refusals[name] = "accepted"
        except PayloadError as exc:
            refusals[name] = str(exc)
    for name, bad in {
        "tag": {"__pickle": b"x"},
        "dtype": {"__dtype": "complex64"},
        "mod": {"__modality": "SMELL"},
    }.items():
        try:
            decode_value(bad, name)
            refusals["decode_" + name] = "accepted"
        except PayloadError as exc:
            refusals["decode_" + name] = str(exc)
    out["refusals"] = refusals

    def roundtrip(part: Any) -> Any:
        tensors, meta = to_payload(part, settings)
        n = int(tensors["embeddings"].shape[0])
        return from_received(et.Received("r", dict(tensors), meta, n, 1, None))

    emb = torch.randn(5, HIDDEN).to(torch.bfloat16)
    part = EmbeddingData(
        "q_local_part_1",
        2,
        1,
        torch.tensor([[1, 2, 10]]),
        Modality.IMAGE,
        emb,
        mrope_positions=torch.arange(15).reshape(5, 3),
        mrope_position_delta=-5,
        original_image_sizes=[(32, 64)],
    )
    back = roundtrip(part)
    out["part"] = (
        torch.equal(back.embedding, emb)
        and torch.equal(back.mrope_positions, part.mrope_positions)
        and {
            k: v for k, v in public_attrs(back).items() if k not in ("grid_dim", "mrope_positions")
        }
        == {k: v for k, v in public_attrs(part).items() if k not in ("grid_dim", "mrope_positions")}
        and torch.equal(back.grid_dim, part.grid_dim)
    )
    err = EmbeddingData(
        "q_local_part_0", 1, 0, None, Modality.IMAGE, error_msg="boom", error_code=400
    )
    back = roundtrip(err)
    out["error"] = back.embedding is None and back.error_msg == "boom" and back.error_code == 400
    empty = EmbeddingData(
        "q_local_part_0",
        1,
        0,
        torch.tensor([[1, 0, 0]]),
        Modality.IMAGE,
        torch.empty(0, HIDDEN, dtype=torch.bfloat16),
        mrope_positions=torch.empty(0, 3, dtype=torch.int64),
    )
    back = roundtrip(empty)
    out["empty"] = back.embedding is not None and tuple(back.embedding.shape) == (0, HIDDEN)
    problems = {}
    no_field = EmbeddingData("q_local_part_0", 1, 0, None, Modality.IMAGE, emb)
    big = EmbeddingData(
        "q_local_part_0",
        1,
        0,
        None,
        Modality.IMAGE,
        emb,
        mrope_positions=torch.zeros(5, 3, dtype=torch.int64),
        audio=torch.zeros(1 << 18),
    )
    for name, bad in {"missing_field": no_field, "too_large": big}.items():
        try:
            to_payload(bad, settings)
            problems[name] = "accepted"
        except PayloadError as exc:
            problems[name] = str(exc)
    try:
        from_received(et.Received("r", {"embeddings": emb}, {"other": 1}, 5, 1, None))
        problems["foreign_meta"] = "accepted"
    except PayloadError as exc:
        problems["foreign_meta"] = str(exc)
    out["problems"] = problems
    out["links"] = link_checks()
    return out


def link_checks() -> dict[str, Any]:
    """Where a rank finds an encoder's emtransfer node."""
    import emtransfer as et
    from emtransfer.errors import ConfigError
    from emtransfer.integrations.sglang.receiver import LanguageLink, iter_parts, parse_encoder_map

    out: dict[str, Any] = {}
    out["pairs"] = parse_encoder_map("http://a:1=a:9100, http://b:2/=10.0.0.2:9200")
    out["json"] = parse_encoder_map('{"http://a:1": "a:9100"}')
    out["empty"] = parse_encoder_map("  ")
    for name, text in {
        "bad_pair": "http://a:1",
        "bad_json": "{nope",
        "bad_types": '{"a": 1}',
    }.items():
        try:
            parse_encoder_map(text)
            out[name] = "accepted"
        except ConfigError as exc:
            out[name] = str(exc)
    mapped = LanguageLink(et.Settings(**SETTINGS), encoders={"http://a:1": "a:9100"})
    by_port = LanguageLink(et.Settings(**{**SETTINGS, "bootstrap_port": 9300}), encoders={})
    no_port = LanguageLink(et.Settings(**SETTINGS), encoders={})
    out["mapped"] = mapped.address_of("http://a:1/")
    out["by_port"] = by_port.address_of("http://10.1.2.3:30000")
    out["by_port_v6"] = by_port.address_of("http://[fd00::1]:30000")
    try:
        no_port.address_of("http://c:3")
        out["no_port"] = "accepted"
    except ConfigError as exc:
        out["no_port"] = str(exc)
    from sglang.srt.managers.schedule_batch import Modality

    assigned = {Modality.IMAGE: [2, 0, 1], Modality.VIDEO: [0, 3, 0]}
    out["parts"] = iter_parts(assigned)
    return out


class Child:
    """A spawned process running ``target(conn, *args)``, driven by request and answer."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()
        self.info: Any = None

    def started(self, timeout: float = 90.0) -> Any:
        kind, self.info = self.answer(timeout)
        assert kind == "ready", kind
        return self.info

    def answer(self, timeout: float = WAIT + 5) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the child process said nothing within {timeout}s")
        msg = self.conn.recv()
        if msg[0] == "crash":
            raise RuntimeError(f"the child process failed:\n{msg[1]}")
        return msg if len(msg) != 2 else (msg[0], msg[1])

    def ask(self, *msg: Any, timeout: float = WAIT + 5) -> Any:
        self.conn.send(msg)
        reply = self.answer(timeout)
        return reply[1] if len(reply) == 2 else None

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("close", timeout=15)
            except Exception:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
