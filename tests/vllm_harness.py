"""vLLM's own scheduler and EC-connector plumbing on a CPU, for the connector's tests.

What is vLLM's code here and what stands in for it:

- ``vllm.v1.core.sched.scheduler.Scheduler``, the real one, built from a real ``VllmConfig``
  of a tiny local multimodal model config (PaliGemma's architecture: no weights, no
  tokenizer, no network), so the producer is a genuine encoder-only instance
  (``is_mm_encoder_only``: its requests end once the prompt is encoded). vLLM's
  ``MultiModalBudget`` asks the model's processor for the largest item, and that processor
  needs a tokenizer: the one thing replaced is that budget, by fixed sizes, while the
  scheduler is built.
- The worker-side connector is created by vLLM's ``ensure_ec_transfer_initialized`` (its
  factory, WORKER role) and driven by vLLM's V2 runner plumbing
  (``vllm.v1.worker.gpu.ec_connector.get_ec_connector`` -> ``ActiveECConnector``:
  ``maybe_get_output`` on a step with tokens, ``no_forward`` on one without), over vLLM's
  ``EncoderCache``. The GPU model runner itself cannot be built here (no CUDA), so
  :class:`Runner` does what ``GPUModelRunner.execute_model`` (consumer) and
  ``MMEncoderModelRunner.execute_model`` (producer) do around the connector, in their order
  (``vllm/v1/worker/gpu/model_runner.py``, ``vllm/v1/worker/mm_encoder_model_runner.py``:
  finish_requests, free_states, add_requests, update_requests, then ``no_forward`` or the
  encoder, and on the consumer the gather, inside ``maybe_get_output``); the gather raises
  vLLM's "Encoder cache miss" where vLLM would. The "encoder" is :func:`item_tensor`:
  deterministic from the item's hash, so the consumer checks every byte without shipping
  tensors between processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HIDDEN = 64  # the tiny model's hidden size: the connector takes it from the model config
TEXT_GAP = 3  # text tokens before, between and after the items of a prompt
WAIT = 30.0  # seconds any single wait of these tests may take
CONNECTOR = "EmtransferECConnector"
MODULE = "emtransfer.integrations.vllm"
#: emtransfer settings of both sides (keys of ec_connector_extra_config)
EXTRA: dict[str, Any] = {
    "block_size": 16,
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 2.0,
    "init_timeout": 20.0,
    "data_timeout": 20.0,
    # a receiver that loses its peer over nixl keeps the blocks of its open grant quarantined
    # until the grant expires (chunk_timeout + write_timeout: nothing proves the peer's last
    # write will not land); short here, so the killed producer's grant frees the small pool
    # well within the others' alloc_timeout
    "chunk_timeout": 4.0,
    "write_timeout": 2.0,
    "resume_timeout": 20.0,
    "alloc_timeout": 20.0,
    "abort_ack_timeout": 2.0,
}
_TINY = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "model_type": "paligemma",
    "image_token_index": 257152,
    "hidden_size": HIDDEN,
    "projection_dim": HIDDEN,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma",
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_hidden_layers": 1,
        "vocab_size": 257216,
        "max_position_embeddings": 8192,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": 32,
        "patch_size": 16,
        "projection_dim": HIDDEN,
        "num_image_tokens": 4,
    },
}
_model_dir: str | None = None

#: a request: its id and its items, (mm_hash, tokens) in prompt order
Spec = tuple[str, list[tuple[str, int]]]


def model_dir() -> str:
    global _model_dir
    if _model_dir is None:
        _model_dir = tempfile.mkdtemp(prefix="emtransfer-tiny-llama-")
        with open(os.path.join(_model_dir, "config.json"), "w") as f:
            json.dump(_TINY, f)
    return _model_dir


def vllm_config(role: str, extra: dict[str, Any], **ec_fields: Any) -> Any:
    """A real VllmConfig on the CPU with our connector selected by module path (an
    ``ec_producer`` is an encoder-only instance, as vLLM makes it)."""
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        ECTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model = ModelConfig(
        model=model_dir(), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096
    )
    ec = ECTransferConfig(
        ec_connector=CONNECTOR,
        ec_connector_module_path=MODULE,
        ec_role=role,
        ec_connector_extra_config=extra,
        **ec_fields,
    )
    return VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        model_config=model,
        cache_config=CacheConfig(block_size=16),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=8192,
            max_num_seqs=64,
            max_model_len=4096,
            is_encoder_decoder=False,
        ),
        ec_transfer_config=ec,
    )


class _Budget:
    """Stands in for vLLM's MultiModalBudget (which needs the model's processor, hence a
    tokenizer): the encoder's compute budget and cache size, in tokens."""

    def __init__(self, tokens: int) -> None:
        self.encoder_compute_budget = tokens
        self.encoder_cache_size = tokens
        self.mm_max_toks_per_item = {"image": tokens}


def build_scheduler(vc: Any, encoder_cache_tokens: int = 100_000) -> Any:
    from unittest import mock

    import vllm.v1.core.sched.scheduler as sched_mod
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    vc.cache_config.num_gpu_blocks = 2000
    kv = KVCacheConfig(
        num_blocks=2000,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer.0"],
                FullAttentionSpec(
                    block_size=16, num_kv_heads=1, head_size=16, dtype=torch.bfloat16
                ),
            )
        ],
    )
    budget = lambda *a, **kw: _Budget(encoder_cache_tokens)  # noqa: E731
    with mock.patch.object(sched_mod, "MultiModalBudget", budget):
        return sched_mod.Scheduler(
            vllm_config=vc,
            kv_cache_config=kv,
            structured_output_manager=StructuredOutputManager(vc),
            block_size=16,
        )


def item_tensor(mm_hash: str, n: int, hidden: int = HIDDEN) -> torch.Tensor:
    """The "encoder output" of an item: every bf16 bit pattern is possible (NaNs too), so
    the comparison is on the bits."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(mm_hash.encode()).hexdigest()[:15], 16))
    bits = torch.randint(-(1 << 15), 1 << 15, (n, hidden), generator=g, dtype=torch.int32)
    return bits.to(torch.int16).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.int16), b.view(torch.int16))
    )


def make_request(
    spec: Spec, *, media: bool, ec_transfer_params: dict[str, Any] | None = None
) -> Any:
    """A vLLM Request whose prompt holds the items at TEXT_GAP-token intervals; ``media``:
    each item carries processed data (the producer's), or none (metadata only, as a proxy
    forwards it to the consumer once the encoder ran)."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    req_id, items = spec
    pos, features = TEXT_GAP, []
    for mm_hash, n in items:
        features.append(
            MultiModalFeatureSpec(
                data=MultiModalKwargsItem.dummy() if media else None,
                modality="image",
                identifier=mm_hash,
                mm_position=PlaceholderRange(offset=pos, length=n),
            )
        )
        pos += n + TEXT_GAP
    extra = {"ec_transfer_params": ec_transfer_params} if ec_transfer_params else None
    return Request(
        req_id,
        [7] * pos,
        SamplingParams(max_tokens=1, extra_args=extra),
        None,
        mm_features=features,
    )


class Runner:
    """The V2 GPU model runner's steps around the EC connector (see the module doc)."""

    def __init__(self, vc: Any, encode: Callable[[str, int], torch.Tensor] | None = None) -> None:
        from vllm.v1.worker.gpu.ec_connector import get_ec_connector
        from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache

        self.encoder_cache = EncoderCache()
        self.ec = get_ec_connector(vc, self.encoder_cache)
        self.encode = encode or item_tensor
        self.encoder_only = bool(vc.is_mm_encoder_only)
        self.num_computed: dict[str, int] = {}
        self.num_prompt: dict[str, int] = {}
        self.gathered: dict[tuple[str, str], torch.Tensor] = {}

    def execute(self, so: Any) -> Any:
        from vllm.v1.outputs import (
            EMPTY_MODEL_RUNNER_OUTPUT,
            ModelRunnerOutput,
            make_empty_encoder_model_runner_output,
        )

        cache = self.encoder_cache
        for req_id in so.finished_req_ids:  # finish_requests
            cache.remove_request(req_id)
            self.num_computed.pop(req_id, None)
        for mm_hash in so.free_encoder_mm_hashes:  # free_states
            cache.free_encoder_cache(mm_hash)
        for new in so.scheduled_new_reqs:  # add_requests
            cache.add_request(new.req_id, new.mm_features)
            self.num_computed[new.req_id] = new.num_computed_tokens
            self.num_prompt[new.req_id] = len(new.prompt_token_ids or ())
        cached = so.scheduled_cached_reqs  # update_requests
        for req_id, n in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            self.num_computed[req_id] = n
        if so.total_num_scheduled_tokens == 0:  # _merge_ec_connector_no_forward
            return ModelRunnerOutput.with_ec_conn_output(
                EMPTY_MODEL_RUNNER_OUTPUT, self.ec.no_forward(so).ec_connector_output
            )
        with self.ec.maybe_get_output(so) as ec_output:
            for req_id, input_ids in so.scheduled_encoder_inputs.items():  # the encoder
                for i in input_ids:
                    feature = cache.mm_features[req_id][i]
                    if feature.data is None or feature.identifier in cache.encoder_outputs:
                        continue
                    n = feature.mm_position.get_num_embeds()
                    cache.encoder_outputs[feature.identifier] = self.encode(feature.identifier, n)
            if not self.encoder_only:
                self._gather(so)
        if self.encoder_only:  # MMEncoderModelRunner: no language model, nothing sampled
            return ModelRunnerOutput.with_ec_conn_output(
                make_empty_encoder_model_runner_output(so), ec_output
            )
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            done = self.num_computed[req_id] + so.num_scheduled_tokens[req_id]
            sampled.append([11] if done >= self.num_prompt[req_id] else [])
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )
        return ModelRunnerOutput.with_ec_conn_output(out, ec_output)

    def _gather(self, so: Any) -> None:
        """gather_mm_embeddings: every item the scheduled tokens cover must be cached."""
        cache = self.encoder_cache
        for req_id, n in so.num_scheduled_tokens.items():
            start = self.num_computed[req_id]
            for feature in cache.mm_features[req_id]:
                pos = feature.mm_position
                if pos.offset >= start + n or pos.offset + pos.length <= start:
                    continue
                out = cache.encoder_outputs.get(feature.identifier)
                if out is None:
                    raise RuntimeError(f"Encoder cache miss for {feature.identifier}.")
                self.gathered[(req_id, feature.identifier)] = out


class Engine:
    """EngineCore.step for one instance: schedule, execute, update_from_output."""

    def __init__(self, vc: Any, encode: Callable[[str, int], torch.Tensor] | None = None) -> None:
        from vllm.distributed.ec_transfer import ensure_ec_transfer_initialized, get_ec_transfer

        ensure_ec_transfer_initialized(vc)  # the worker-side connector, by vLLM's factory
        self.worker_connector = get_ec_transfer()
        self.worker_connector.start_worker_services()  # as gpu_worker does once loaded
        self.scheduler = build_scheduler(vc)
        self.runner = Runner(vc, encode)
        self.finished: dict[str, Any] = {}  # request_id -> its last EngineCoreOutput
        self.ec_stats: Any = None  # the connector's stats of every step, aggregated
        self.steps = 0

    def add(self, request: Any) -> None:
        self.scheduler.add_request(request)

    def step(self) -> bool:
        """One engine step; whether anything moved (tokens ran, a request ended, or the
        connector reported a load)."""
        so = self.scheduler.schedule()
        mro = self.runner.execute(so)
        outputs = self.scheduler.update_from_output(so, mro)
        self.steps += 1
        moved = so.total_num_scheduled_tokens > 0
        ec = mro.ec_connector_output
        if ec is not None and ec.ec_connector_worker_meta is not None:
            moved = True
        if ec is not None and ec.ec_connector_stats is not None:  # what the scheduler logs
            stats = ec.ec_connector_stats
            self.ec_stats = stats if self.ec_stats is None else self.ec_stats.aggregate(stats)
        for eco in outputs.values():
            for out in eco.outputs:
                if out.finish_reason is not None:
                    self.finished[out.request_id] = out
                    moved = True
        return moved or self.scheduler.ec_connector.has_pending_push_work()

    def run(self, req_ids: Iterable[str], wait: Callable[[], None] | None = None) -> None:
        """Step until every request in ``req_ids`` finished. A step that moved nothing is
        followed by ``wait()`` (the next transfer to end) instead of spinning."""
        want = set(req_ids)
        steps = 0
        while not want <= set(self.finished):
            steps += 1
            assert steps < 5000, f"requests never finished: {want - set(self.finished)}"
            if not self.step():
                assert wait is not None, f"no progress: {want - set(self.finished)}"
                wait()

    def shutdown(self) -> None:
        from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

        self.scheduler.shutdown()  # calls the scheduler-side connector's shutdown
        ensure_ec_transfer_shutdown()  # the worker side's, as gpu_worker does


class Progress:
    """Counts emtransfer handles that ended (in this process), announced on a condition, so
    a step loop waits for the next one instead of polling."""

    def __init__(self, monkeypatch: Any, on_observe: Callable[[Any, Any], None] | None = None):
        from emtransfer.sync import TransferHandle

        self.cond = threading.Condition()
        self.count = 0
        finish, observe = TransferHandle._finish, TransferHandle._observe

        def finished(h: Any, *a: Any, **kw: Any) -> None:
            finish(h, *a, **kw)
            with self.cond:
                self.count += 1
                self.cond.notify_all()

        def observed(h: Any, session: Any) -> None:
            observe(h, session)
            if on_observe is not None:
                on_observe(h, session)

        monkeypatch.setattr(TransferHandle, "_finish", finished)
        monkeypatch.setattr(TransferHandle, "_observe", observed)

    def mark(self) -> int:
        with self.cond:
            return self.count

    def wait_after(self, mark: int, timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.count > mark, timeout):
                raise AssertionError(f"no transfer ended within {timeout}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------- the producer process


def producer_child(conn: Any, extra: dict[str, Any], port: int) -> None:
    """An encoder instance (ec_producer): vLLM's scheduler and the runner's steps, the
    connector by module path. Commands: ``("run", specs)`` adds the requests (with their
    media), steps until they finished and answers with each one's ec_transfer_params (what a
    proxy forwards to the prefill instance); ``("close",)`` shuts the instance down and
    answers with what its sends did."""
    torch.set_num_threads(1)
    try:
        vc = vllm_config("ec_producer", extra, ec_ip="127.0.0.1", ec_port=port)
        engine = Engine(vc)
        node = engine.worker_connector._worker.encode_node
        conn.send(("ready", node.address if node is not None else None))
        while True:
            msg = conn.recv()
            if msg[0] == "run":
                specs: list[Spec] = msg[1]
                for spec in specs:
                    engine.add(make_request(spec, media=True))
                engine.run([s[0] for s in specs])
                conn.send(("done", {r: engine.finished[r].ec_transfer_params for r, _ in specs}))
            elif msg[0] == "close":
                worker = engine.worker_connector._worker
                worker._reap()  # the sends that ended since the last step
                stats = (
                    worker._stats.aggregate(engine.ec_stats) if engine.ec_stats else worker._stats
                )
                sends = {"open": len(worker._sends), "stats": stats.reduce()}
                engine.shutdown()
                conn.send(("closed", sends))
                break
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def recv(conn: Any, timeout: float = 90.0) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"the producer process said nothing within {timeout}s")
    msg = conn.recv()
    if msg[0] == "crash":
        raise RuntimeError(f"the producer process failed:\n{msg[1]}")
    return msg
