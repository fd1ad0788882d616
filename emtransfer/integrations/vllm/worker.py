"""The worker-side half: the emtransfer nodes, and the tensors in and out of vLLM's encoder
cache (the ``dict[mm_hash, Tensor]`` the model runner passes).

Producer: ``save_caches`` (a freshly encoded item) and ``start_save_caches`` (an item the
scheduler says a request needs and the encoder cache already holds) offer the tensor on a
:class:`~emtransfer.sync.SyncEncodeNode` under the item's rid, for the consumer that asks.
A CUDA tensor is offered once the stream that produced it has passed an event recorded at
save time (a small thread waits on it), so the step never blocks on the encoder.

Consumer: ``start_load_caches`` starts a receive (``SyncLanguageNode.receive`` with
``expected_tokens`` = vLLM's count: one exact allocation, resuming when the item is larger
than the pool) for each load the scheduler dispatched, and puts each finished one into the
encoder cache (moved to ``target_device``). Nothing here waits for a transfer: handles are
polled once per step, and ``build_connector_worker_meta`` reports what loaded or failed.

Consumer with tensor parallelism (``broadcast.py``): every TP rank of the first pipeline
stage keeps the same list of pending loads (the scheduler's metadata is the same on every
rank); TP rank 0 alone receives. Each step with a load pending, in ``start_load_caches``:
rank 0 broadcasts the outcomes of the loads that ended (received and checked, failed, or
already cached); every rank gets a buffer ready for each received item (or says why not);
the group agrees per item (an all-reduce MIN: the lowest rank that cannot take it); the
agreed items' tensors are broadcast from rank 0; then every rank places them, or drops
them, alike. Every rank reports the same ``build_connector_worker_meta``, so the scheduler
marks an item ready only once every rank holds it, and a failure on any rank fails it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from ...errors import ConfigError, TransferError
from ...logs import get_logger
from ...sync import SyncEncodeNode, SyncLanguageNode
from .broadcast import SINGLE, TPChannel, TPLayout, private_cpu_group, vllm_layout
from .config import ConnectorConfig
from .metadata import (
    EmtransferECMetadata,
    EmtransferECStats,
    EmtransferECWorkerMetadata,
    LoadSpec,
)

if TYPE_CHECKING:
    from ...runtime import Received, SendStats
    from ...sync import TransferHandle

_log = get_logger("emtransfer.integrations.vllm")
FIELD = "embeddings"


class LoadFailed(TransferError):
    """A payload arrived but is not the item vLLM expects (rows, shape, dtype, hash)."""

    kind = "protocol_error"


class WorkerSide:
    def __init__(
        self, cfg: ConnectorConfig, vllm_config: Any, layout: TPLayout | None = None
    ) -> None:
        """``layout``: where this worker sits in its TP group (default: vLLM's parallel
        state, read when first needed)."""
        self.cfg = cfg
        parallel = getattr(vllm_config, "parallel_config", None)
        self._tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        self._layout: TPLayout | None = layout
        self._tp: TPChannel | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._lang: SyncLanguageNode | None = None
        self._enc: SyncEncodeNode | None = None
        self._node_error: BaseException | None = None
        self._device: torch.device | None = None
        # consumer
        self._loads: dict[str, tuple[LoadSpec, TransferHandle[Received], float]] = {}
        self._placed: set[str] = set()  # put in the encoder cache by us, not yet adopted
        self._loaded: set[str] = set()
        self._failed: dict[str, str] = {}
        self._recv_done: set[str] = set()
        # consumer with TP > 1: the loads not yet agreed (the same on every rank, in order);
        # rank 0's own: what it found already cached, failed to start, received and checked
        self._pending: dict[str, LoadSpec] = {}
        self._present: set[str] = set()
        self._early: dict[str, str] = {}
        # producer
        self._sends: dict[str, TransferHandle[SendStats]] = {}
        self._queued: set[str] = set()  # CUDA sources waiting for their event
        self._send_done: set[str] = set()
        self._sources: queue.Queue[tuple[str, torch.Tensor, Any] | None] | None = None
        self._source_thread: threading.Thread | None = None
        self._address_sent = False
        self._stats = EmtransferECStats()

    # -- lifecycle ------------------------------------------------------------------------------
    def _where(self) -> TPLayout:
        if self._layout is None:
            layout = vllm_layout()
            if layout is None:  # no distributed groups: this process is the instance
                if self.cfg.is_consumer and self._tp_size > 1:
                    raise ConfigError(
                        f"EmtransferECConnector consumer: tensor_parallel_size={self._tp_size} "
                        "but vLLM's tensor-parallel group is not initialized"
                    )
                layout = SINGLE
            self._layout = layout
        return self._layout

    def _producer_active(self) -> bool:
        """This rank offers items: TP rank 0 of the first pipeline stage (the other ranks
        hold the same outputs)."""
        where = self._where()
        return where.first_pp and where.rank == 0

    def _consumer_active(self) -> bool:
        """This rank loads items: every TP rank of the first pipeline stage (each has its
        own encoder cache); with TP > 1 only rank 0 receives, the others by broadcast."""
        return self._where().first_pp

    def _leads(self) -> bool:
        """This consumer rank receives from producers (TP rank 0)."""
        return self._where().rank == 0

    def _channel(self) -> TPChannel | None:
        """The TP group's collectives (None with TP 1). Created by every TP rank at the same
        point: start-up (``start_services``), else the first ``start_load_caches``."""
        where = self._where()
        if where.size <= 1:
            return None
        if self._tp is None:
            self._tp = TPChannel(where, private_cpu_group(where))
        return self._tp

    def start_services(self) -> None:
        """Start the nodes now (vLLM calls this once the model is resident), so a port in use
        or a bad setting fails the instance's start-up instead of its first request."""
        if self.cfg.is_consumer and self._consumer_active():
            self._channel()  # the TP ranks' private group, made together at start-up
            if self._leads():
                self._language()
        if self.cfg.is_producer and self._producer_active() and "hidden_size" in self.cfg.overrides:
            self._encode(None)

    def _language(self) -> SyncLanguageNode:
        if self._lang is None:
            if self._closed:
                raise ConfigError("EmtransferECConnector is shut down")
            self._lang = SyncLanguageNode(self.cfg.settings_for())
            _log.info("emtransfer language node started", transport=self._lang.settings.transport)
        return self._lang

    def _encode(self, tensor: torch.Tensor | None) -> SyncEncodeNode:
        if self._enc is None:
            if self._closed:
                raise ConfigError("EmtransferECConnector is shut down")
            hidden = None if tensor is None else int(tensor.shape[-1])
            dtype = None if tensor is None else str(tensor.dtype).removeprefix("torch.")
            self._enc = SyncEncodeNode(self.cfg.settings_for(hidden, dtype))
            _log.info("emtransfer encode node listening", address=self._enc.address)
        return self._enc

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._source_thread is not None and self._sources is not None:
            self._sources.put(None)
            self._source_thread.join()
        for _, handle, _ in self._loads.values():
            handle.release()
        self._loads.clear()
        self._pending.clear()
        self._present.clear()
        self._early.clear()
        for node in (self._lang, self._enc):
            if node is not None:
                node.close()  # aborts what is in flight, frees every block, joins its thread
        with self._lock:
            self._sends.clear()

    # -- consumer -------------------------------------------------------------------------------
    def start_load_caches(
        self, meta: EmtransferECMetadata, encoder_cache: dict[str, torch.Tensor]
    ) -> None:
        if not self.cfg.is_consumer or not self._consumer_active():
            return
        for mm_hash in meta.adopted:
            self._placed.discard(mm_hash)
        for mm_hash in meta.cancels:
            self._cancel(mm_hash, encoder_cache)
        tp = self._channel()
        if tp is not None:
            self._tp_step(tp, meta.loads, encoder_cache)
            return
        for spec in meta.loads:
            if spec.mm_hash in self._loads:
                continue  # already in flight (re-dispatched after a cancel that never left)
            if spec.mm_hash in encoder_cache:
                self._loaded.add(spec.mm_hash)
                continue
            try:
                handle = self._language().receive(spec.rid, spec.peer, spec.num_tokens)
            except Exception as exc:  # the node could not start: every load fails, logged
                self._fail(spec, exc)
                continue
            self._loads[spec.mm_hash] = (spec, handle, time.perf_counter())
        self._collect(encoder_cache)

    def _collect(self, encoder_cache: dict[str, torch.Tensor]) -> None:
        for mm_hash, (spec, handle, started) in list(self._loads.items()):
            if not handle.poll().finished:
                continue
            del self._loads[mm_hash]
            error = handle.error()
            tensor = None
            if error is None:
                got = handle.result()
                try:
                    tensor = self._place(spec, got)
                except Exception as exc:
                    error = exc
                else:
                    with self._lock:
                        self._stats.add(
                            loads_ok=1,
                            load_tokens=got.num_tokens,
                            load_bytes=tensor.nbytes,
                            load_seconds=time.perf_counter() - started,  # to placed
                            load_rounds=got.rounds,
                        )
            handle.release()
            if tensor is None:
                self._fail(spec, error)
                continue
            encoder_cache[mm_hash] = tensor
            self._placed.add(mm_hash)
            self._loaded.add(mm_hash)
            self._recv_done.add(mm_hash)

    def _fail(self, spec: LoadSpec, error: BaseException | None) -> None:
        self._fail_why(spec, f"{type(error).__name__}: {error}")

    def _fail_why(self, spec: LoadSpec, why: str, *, counted: bool = True) -> None:
        self._failed[spec.mm_hash] = why
        if not counted:  # a TP rank other than 0: rank 0 counts and logs it
            _log.debug("encoder-cache load failed", mm_hash=spec.mm_hash, reason=why)
            return
        with self._lock:
            self._stats.add(loads_failed=1)
        _log.warning("encoder-cache load failed", mm_hash=spec.mm_hash, peer=spec.peer, reason=why)

    # -- consumer with TP > 1 -------------------------------------------------------------------
    def _tp_step(
        self, tp: TPChannel, loads: list[LoadSpec], encoder_cache: dict[str, torch.Tensor]
    ) -> None:
        """One step's loads on a TP group (every rank, in lockstep; see the module doc).
        Whether and which collectives run depends only on what every rank holds alike:
        the pending list (the scheduler's metadata) and rank 0's broadcast outcomes."""
        lead = self._leads()
        for spec in loads:
            if spec.mm_hash in self._pending:
                continue  # already pending (re-dispatched after a cancel that never left)
            self._pending[spec.mm_hash] = spec
            if not lead:
                continue
            if spec.mm_hash in encoder_cache:
                self._present.add(spec.mm_hash)
                continue
            try:
                handle = self._language().receive(spec.rid, spec.peer, spec.num_tokens)
            except Exception as exc:  # the node could not start: every load fails, logged
                self._early[spec.mm_hash] = f"{type(exc).__name__}: {exc}"
                continue
            self._loads[spec.mm_hash] = (spec, handle, time.perf_counter())
        if not self._pending:
            return  # no collective: every rank knows there is nothing to agree on
        if tp.broken is not None:
            self._tp_fail_all(tp.broken, encoder_cache)
            return
        local: dict[str, tuple[torch.Tensor, Received, float]] = {}
        try:
            outcomes = tp.outcomes(self._tp_outcomes(local) if lead else None)
            self._tp_settle(tp, outcomes, local, encoder_cache)
        except RuntimeError as exc:  # a collective failed (gloo: a rank is gone)
            tp.broken = f"the tensor-parallel group failed: {type(exc).__name__}: {exc}"
            _log.error("encoder-cache loads: the TP group failed", reason=str(exc)[:300])
            self._tp_fail_all(tp.broken, encoder_cache)

    def _tp_outcomes(
        self, local: dict[str, tuple[torch.Tensor, Received, float]]
    ) -> list[tuple[str, str, Any]]:
        """Rank 0: the pending loads that ended, in pending order, as ``(mm_hash, kind,
        detail)``: ``("ready", (shape, dtype, device type))`` (received, checked and on
        the target device: its tensor goes to ``local``), ``("present", None)`` (already
        in the encoder cache) or ``("failed", why)``."""
        out: list[tuple[str, str, Any]] = []
        for mm_hash, spec in self._pending.items():
            if mm_hash in self._present:
                self._present.discard(mm_hash)
                out.append((mm_hash, "present", None))
                continue
            if mm_hash in self._early:
                out.append((mm_hash, "failed", self._early.pop(mm_hash)))
                continue
            entry = self._loads.get(mm_hash)
            if entry is None or not entry[1].poll().finished:
                continue
            del self._loads[mm_hash]
            handle, started = entry[1], entry[2]
            error = handle.error()
            if error is None:
                got = handle.result()
                try:
                    tensor = self._place(spec, got).contiguous()
                except Exception as exc:
                    error = exc
                else:
                    local[mm_hash] = (tensor, got, started)
                    detail = (list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
                    out.append((mm_hash, "ready", (*detail, tensor.device.type)))
            handle.release()  # copied out (or failed): the blocks go back now
            if error is not None:
                out.append((mm_hash, "failed", f"{type(error).__name__}: {error}"))
        return out

    def _tp_settle(
        self,
        tp: TPChannel,
        outcomes: list[tuple[str, str, Any]],
        local: dict[str, tuple[torch.Tensor, Received, float]],
        encoder_cache: dict[str, torch.Tensor],
    ) -> None:
        """Every rank: take rank 0's outcomes; agree on the items to place; broadcast them."""
        lead = self._leads()
        tensors: dict[str, torch.Tensor] = {}
        why_not: dict[str, str] = {}
        agreeing: list[str] = []
        for mm_hash, kind, detail in outcomes:
            if kind == "failed":
                continue
            agreeing.append(mm_hash)
            if mm_hash not in self._pending:  # cannot happen: the lists are the same
                why_not[mm_hash] = "not pending on this rank"
            elif kind == "present":
                if mm_hash not in encoder_cache:
                    why_not[mm_hash] = "not in this rank's encoder cache"
            elif lead:
                tensors[mm_hash] = local[mm_hash][0]
            else:
                try:
                    tensors[mm_hash] = self._tp_buffer(mm_hash, *detail)
                except Exception as exc:  # e.g. the device is out of memory
                    why_not[mm_hash] = f"{type(exc).__name__}: {exc}"
        refused = tp.agree([h not in why_not for h in agreeing]) if agreeing else []
        lowest = dict(zip(agreeing, refused, strict=True))
        tp.broadcast([t for h, t in tensors.items() if lowest[h] is None])
        for mm_hash, kind, detail in outcomes:
            spec = self._pending.pop(mm_hash, None)
            if spec is None:
                tensors.pop(mm_hash, None)
                continue
            rank = lowest.get(mm_hash)
            if kind == "failed":
                self._fail_why(spec, str(detail), counted=lead)
            elif rank is not None:
                why = f"tensor-parallel rank {rank} cannot take the item"
                if mm_hash in why_not and rank == self._where().rank:
                    why += f": {why_not[mm_hash]}"
                tensors.pop(mm_hash, None)  # whatever this rank got is dropped
                self._fail_why(spec, why, counted=lead)
            elif kind == "present":
                self._loaded.add(mm_hash)
            else:
                tensor = tensors.pop(mm_hash)
                encoder_cache[mm_hash] = tensor
                self._placed.add(mm_hash)
                self._loaded.add(mm_hash)
                self._recv_done.add(mm_hash)
                if lead:
                    _, got, started = local[mm_hash]
                    with self._lock:
                        self._stats.add(
                            loads_ok=1,
                            load_tokens=got.num_tokens,
                            load_bytes=tensor.nbytes,
                            load_seconds=time.perf_counter() - started,  # to every rank
                            load_rounds=got.rounds,
                        )

    def _tp_buffer(self, mm_hash: str, shape: list[int], dtype: str, device: str) -> torch.Tensor:
        """A rank other than 0: where rank 0's tensor of ``mm_hash`` will be broadcast to."""
        target = self._target_device()
        if target.type != device:
            raise ConfigError(
                f"TP rank 0 places items on {device}, this rank on {target}: set the same "
                "target_device type on every rank"
            )
        return torch.empty(shape, dtype=getattr(torch, dtype), device=target)

    def _tp_fail_all(self, why: str, encoder_cache: dict[str, torch.Tensor]) -> None:
        """The group is unusable: every pending load fails here, without collectives."""
        lead = self._leads()
        for mm_hash, spec in list(self._pending.items()):
            self._cancel(mm_hash, encoder_cache)
            self._fail_why(spec, why, counted=lead)

    def _place(self, spec: LoadSpec, got: Received) -> torch.Tensor:
        """The received payload as vLLM's encoder output, or LoadFailed saying why not."""
        meta = got.meta or {}
        if meta.get("mm_hash", spec.mm_hash) != spec.mm_hash:
            raise LoadFailed(f"rid {spec.rid!r} carried item {meta.get('mm_hash')!r}")
        if got.num_tokens != spec.num_tokens:
            raise LoadFailed(
                f"item {spec.mm_hash} has {got.num_tokens} rows; the request expects "
                f"{spec.num_tokens}"
            )
        tensor = got.tensors[FIELD]
        shape = meta.get("shape")
        if isinstance(shape, list) and shape and tuple(shape) != tuple(tensor.shape):
            tensor = tensor.reshape(shape)
        return tensor.to(self._target_device())

    def _target_device(self) -> torch.device:
        if self._device is None:
            if self.cfg.target_device:
                self._device = torch.device(self.cfg.target_device)
            elif torch.cuda.is_available():
                self._device = torch.device("cuda", torch.cuda.current_device())
            else:
                self._device = torch.device("cpu")
        return self._device

    def _cancel(self, mm_hash: str, encoder_cache: dict[str, torch.Tensor]) -> None:
        entry = self._loads.pop(mm_hash, None)
        if entry is not None:
            entry[1].release()  # in flight: aborted (the producer is told), blocks freed
        self._pending.pop(mm_hash, None)  # TP > 1: on every rank alike
        self._present.discard(mm_hash)
        self._early.pop(mm_hash, None)
        if mm_hash in self._placed:
            self._placed.discard(mm_hash)
            encoder_cache.pop(mm_hash, None)
        self._loaded.discard(mm_hash)

    # -- producer -------------------------------------------------------------------------------
    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str) -> None:
        if self.cfg.is_producer and self._producer_active():
            self._serve(mm_hash, encoder_cache[mm_hash])

    def start_save_caches(
        self, meta: EmtransferECMetadata, encoder_cache: dict[str, torch.Tensor] | None
    ) -> None:
        if not self.cfg.is_producer or not self._producer_active():
            return
        self._reap()
        if isinstance(encoder_cache, dict):
            for mm_hash in meta.publish:
                tensor = encoder_cache.get(mm_hash)
                if tensor is not None:
                    self._serve(mm_hash, tensor)

    def _serve(self, mm_hash: str, tensor: torch.Tensor) -> None:
        with self._lock:
            if self._closed or mm_hash in self._sends or mm_hash in self._queued:
                return  # offered already: the first consumer to ask takes it
            tensor = tensor.detach()
            if tensor.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(tensor.device))
                self._queued.add(mm_hash)
                self._source_queue().put((mm_hash, tensor, event))
                return
        self._offer(mm_hash, tensor)

    def _source_queue(self) -> queue.Queue[tuple[str, torch.Tensor, Any] | None]:
        if self._sources is None:
            self._sources = queue.Queue()
            self._source_thread = threading.Thread(
                target=self._wait_sources, name="emtransfer-vllm-sources", daemon=True
            )
            self._source_thread.start()
        return self._sources

    def _wait_sources(self) -> None:
        assert self._sources is not None
        while (item := self._sources.get()) is not None:
            mm_hash, tensor, event = item
            try:
                event.synchronize()  # the encoder's stream has written the tensor
                if not self._closed:
                    self._offer(mm_hash, tensor)
            finally:
                with self._lock:
                    self._queued.discard(mm_hash)

    def _offer(self, mm_hash: str, tensor: torch.Tensor) -> None:
        meta: dict[str, Any] = {"mm_hash": mm_hash}
        if tensor.dim() != 2:
            meta["shape"] = list(tensor.shape)
            tensor = tensor.reshape(tensor.shape[0], -1)
        tensor = tensor.contiguous()
        try:
            enc = self._encode(tensor)
            s = enc.settings
            width, dtype = int(tensor.shape[1]), str(tensor.dtype).removeprefix("torch.")
            if (width, dtype) != (s.hidden_size, s.dtype):
                raise ConfigError(
                    f"the encoder output is [{tensor.shape[0]}, {width}] {dtype}, the node moves "
                    f"[n, {s.hidden_size}] {s.dtype}: set hidden_size and dtype in "
                    "ec_connector_extra_config on both instances (an encoder wider than the "
                    "language model, e.g. DeepStack, needs it)"
                )
            handle = enc.send(self.cfg.rid_for(mm_hash), {FIELD: tensor}, meta)
        except Exception as exc:
            with self._lock:
                self._stats.add(sends_failed=1)
            _log.error("cannot offer an encoder output", mm_hash=mm_hash, reason=str(exc))
            return
        with self._lock:
            self._sends[mm_hash] = handle

    def _reap(self) -> None:
        with self._lock:
            done = [(h, x) for h, x in self._sends.items() if x.done()]
            for mm_hash, _ in done:
                del self._sends[mm_hash]
        for mm_hash, handle in done:
            error = handle.error()
            with self._lock:
                if error is None:
                    self._stats.add(sends_ok=1, send_bytes=handle.result().nbytes)
                    self._send_done.add(mm_hash)
                else:  # e.g. no consumer asked within init_timeout: the payload is let go
                    self._stats.add(sends_failed=1)
            if error is not None:
                _log.warning("encoder output not delivered", mm_hash=mm_hash, reason=str(error))
            handle.release()

    # -- both -----------------------------------------------------------------------------------
    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        self._reap()
        sent, self._send_done = self._send_done, set()
        received, self._recv_done = self._recv_done, set()
        return sent or None, received or None

    def build_connector_worker_meta(self) -> EmtransferECWorkerMetadata | None:
        """What loaded or failed (every consumer rank alike: vLLM merges the ranks' reports,
        or reads one), and the producer's address (from the rank that offers)."""
        reports = self._consumer_active() if self.cfg.is_consumer else self._producer_active()
        if not reports:
            return None
        address = None
        if self._enc is not None and not self._address_sent:
            address, self._address_sent = self._enc.address, True
        if not (self._loaded or self._failed or address):
            return None
        meta = EmtransferECWorkerMetadata(self._loaded, self._failed, address)
        self._loaded, self._failed = set(), {}
        return meta

    def take_stats(self) -> EmtransferECStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, EmtransferECStats()
            return out

    def metrics_text(self) -> bytes:
        """Prometheus text of this worker's emtransfer nodes (emtransfer_* families)."""
        return b"".join(n.node.metrics.render() for n in (self._lang, self._enc) if n is not None)

    @property
    def language_node(self) -> SyncLanguageNode | None:
        return self._lang

    @property
    def encode_node(self) -> SyncEncodeNode | None:
        return self._enc


__all__ = ["FIELD", "LoadFailed", "WorkerSide"]
