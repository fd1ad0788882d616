"""The scheduler-side half: which items of a request must be pulled from a producer, whether
they are in the worker's encoder cache yet, and which requests can no longer get theirs.

The scheduler process holds no tensor and runs no transfer: it decides, and the workers'
half (``worker.py``) receives. Per item (``mm_hash``) a consumer knows one of:

- *local*: vLLM's encoder cache holds it (allocated; mirrored from ``update_state_after_alloc``
  and the step's ``free_encoder_mm_hashes``);
- *loading*: a receive was dispatched to the worker and has not been reported yet;
- *ready*: the worker put the tensor in its encoder cache; ``has_cache_item`` is True and the
  next scheduling pass allocates it as an external load (no encoder run);
- nothing: not remote (no producer named), so vLLM encodes it itself.

``ensure_cache_available`` defers a request while any of its items loads; a failed load
fails every request waiting for it through ``take_unavailable_requests`` (vLLM finishes them
with FINISHED_ERROR, a retryable error), or, with ``on_failure="recompute"``, lets vLLM
encode the item locally when the request still carries its media.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...logs import get_logger
from .config import ConnectorConfig, advertised
from .metadata import EmtransferECMetadata, EmtransferECWorkerMetadata, LoadSpec

_log = get_logger("emtransfer.integrations.vllm")
#: keys of an item's entry in ``ec_transfer_params`` (the producer announces, the proxy
#: forwards it to the consumer's request)
ADDR_KEY, RID_KEY, TOKENS_KEY = "emtransfer_addr", "emtransfer_rid", "num_tokens"


@dataclass
class _Load:
    spec: LoadSpec
    ready: bool = False
    #: the requests waiting for it: request_id -> Request (for the recompute fallback)
    requests: dict[str, Any] = field(default_factory=dict)


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, vllm_config: Any) -> None:
        self.cfg = cfg
        self._model_config: Any = getattr(vllm_config, "model_config", None)
        self._settings = cfg.settings_for()
        # consumer
        self._loads: dict[str, _Load] = {}
        self._local: set[str] = set()
        self._recompute: set[str] = set()
        self._unavailable: set[str] = set()
        self._to_dispatch: list[LoadSpec] = []
        self._cancels: list[str] = []
        self._adopted: list[str] = []
        # producer
        self._publish: dict[str, None] = {}
        self._address = advertised(cfg, self._settings) if cfg.is_producer else None
        self._resolver: Any = None

    # -- consumer: what must be loaded ----------------------------------------------------------
    def _source(self, request: Any, mm_hash: str) -> tuple[str, str] | None:
        """(peer, rid) of a remote item: the request's announcement, else producer_addr."""
        entry = (getattr(request, "ec_transfer_params", None) or {}).get(mm_hash)
        if isinstance(entry, dict) and isinstance(entry.get(ADDR_KEY), str):
            rid = entry.get(RID_KEY)
            return entry[ADDR_KEY], rid if isinstance(rid, str) else self.cfg.rid_for(mm_hash)
        if self.cfg.producer_addr is not None:
            return self.cfg.producer_addr, self.cfg.rid_for(mm_hash)
        return None

    def ensure_cache_available(self, request: Any, num_computed_tokens: int) -> bool:
        pending = _pending_features(request, num_computed_tokens)
        if self.cfg.is_producer:
            for _, feature in pending:
                self._publish[feature.identifier] = None
        if not self.cfg.is_consumer:
            return True
        req_id = request.request_id
        if req_id in self._unavailable:  # failing this step: start nothing more for it
            return False
        ready = True
        for index, feature in pending:
            mm_hash = feature.identifier
            if mm_hash in self._local or mm_hash in self._recompute:
                continue
            load = self._loads.get(mm_hash)
            if load is None:
                source = self._source(request, mm_hash)
                if source is None:
                    continue  # not remote: vLLM encodes it
                peer, rid = source
                if mm_hash in self._cancels:  # not sent yet: the worker may still hold it
                    self._cancels = [h for h in self._cancels if h != mm_hash]
                spec = LoadSpec(mm_hash, rid, peer, int(request.get_num_encoder_embeds(index)))
                load = self._loads[mm_hash] = _Load(spec)
                self._to_dispatch.append(spec)
                _log.debug("load dispatched", mm_hash=mm_hash, peer=peer, tokens=spec.num_tokens)
            load.requests[req_id] = request
            ready = ready and load.ready
        return ready

    def has_cache_item(self, identifier: str) -> bool:
        load = self._loads.get(identifier) if self.cfg.is_consumer else None
        return load is not None and load.ready

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        mm_hash = request.mm_features[index].identifier
        self._local.add(mm_hash)
        self._recompute.discard(mm_hash)
        load = self._loads.get(mm_hash)
        if load is not None and load.ready:  # vLLM's encoder cache owns it from now on
            del self._loads[mm_hash]
            self._adopted.append(mm_hash)

    def build_connector_meta(self, scheduler_output: Any) -> EmtransferECMetadata:
        for mm_hash in getattr(scheduler_output, "free_encoder_mm_hashes", None) or ():
            self._local.discard(mm_hash)
        meta = EmtransferECMetadata(
            loads=self._to_dispatch,
            cancels=self._cancels,
            adopted=self._adopted,
            publish=list(self._publish),
        )
        self._to_dispatch, self._cancels, self._adopted = [], [], []
        self._publish.clear()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "ec_connector_worker_meta", None)
        if not isinstance(meta, EmtransferECWorkerMetadata):
            return
        if meta.address and self.cfg.advertise_addr is None:
            self._address = meta.address  # what the node bound (the same unless port 0)
        for mm_hash in meta.loaded:
            load = self._loads.get(mm_hash)
            if load is None:  # nobody waits for it any more: the worker drops it
                self._cancels.append(mm_hash)
            elif not load.ready:
                load.ready = True
        for mm_hash, why in meta.failed.items():
            load = self._loads.pop(mm_hash, None)
            if load is not None:
                self._failed(load, why)

    def _failed(self, load: _Load, why: str) -> None:
        mm_hash = load.spec.mm_hash
        for req_id, request in load.requests.items():
            if self.cfg.on_failure == "recompute" and _has_media(request, mm_hash):
                self._recompute.add(mm_hash)
                _log.warning(
                    "encoder-cache load failed; encoding the item locally",
                    request=req_id,
                    mm_hash=mm_hash,
                    peer=load.spec.peer,
                    reason=why,
                )
            else:
                self._unavailable.add(req_id)
                _log.warning(
                    "encoder-cache load failed; failing the request",
                    request=req_id,
                    mm_hash=mm_hash,
                    peer=load.spec.peer,
                    reason=why,
                )

    def take_unavailable_requests(self) -> set[str]:
        out, self._unavailable = self._unavailable, set()
        return out

    def has_pending_push_work(self) -> bool:
        # a cancel or a dispatch still to reach the workers needs one more step
        return bool(self._cancels or self._to_dispatch or self._adopted)

    # -- both ----------------------------------------------------------------------------------
    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._unavailable.discard(req_id)
        for feature in request.mm_features:
            self._recompute.discard(feature.identifier)  # a later request tries the load again
            load = self._loads.get(feature.identifier)
            if load is None or load.requests.pop(req_id, None) is None:
                continue
            if not load.requests:  # nobody waits for it any more
                del self._loads[feature.identifier]
                self._cancels.append(feature.identifier)
        if not self.cfg.is_producer or not request.mm_features:
            return False, None
        return False, self._announce(request)

    def _announce(self, request: Any) -> dict[str, Any]:
        """``ec_transfer_params`` of a finished producer request: per item, where to pull it."""
        items: dict[str, Any] = {}
        resolver_items = self._placeholder_metadata(request)
        for index, feature in enumerate(request.mm_features):
            mm_hash = feature.identifier
            entry = items.setdefault(
                mm_hash, dict(resolver_items.get(mm_hash) or {"modality": feature.modality})
            )
            entry.setdefault("item_indices", [])
            if index not in entry["item_indices"]:
                entry["item_indices"].append(index)
            entry[ADDR_KEY] = self._address
            entry[RID_KEY] = self.cfg.rid_for(mm_hash)
            entry[TOKENS_KEY] = int(request.get_num_encoder_embeds(index))
        return items

    def _placeholder_metadata(self, request: Any) -> dict[str, Any]:
        """vLLM's own per-item metadata (so a proxy may drop the media), for multimodal
        models; a model config without a multimodal processor has none."""
        mc = self._model_config
        if not getattr(mc, "is_multimodal_model", False) or getattr(
            mc, "skip_tokenizer_init", False
        ):
            return {}  # no processor to ask (it needs the tokenizer)
        from vllm.distributed.ec_transfer.ec_connector.utils import (
            PlaceholderMetadataResolver,
            collect_ec_item_metadata,
        )

        if self._resolver is None:
            self._resolver = PlaceholderMetadataResolver(self._model_config)
        items: dict[str, Any] = collect_ec_item_metadata(request.mm_features, self._resolver)
        return items

    def shutdown(self) -> None:
        self._loads.clear()
        self._to_dispatch.clear()
        self._publish.clear()


def _pending_features(request: Any, num_computed_tokens: int) -> list[tuple[int, Any]]:
    """The request's items not yet behind ``num_computed_tokens``, with their index."""
    out = []
    for index, feature in enumerate(request.mm_features):
        pos = feature.mm_position
        if pos.offset + pos.length > num_computed_tokens:
            out.append((index, feature))
    return out


def _has_media(request: Any, mm_hash: str) -> bool:
    return any(
        f.identifier == mm_hash and getattr(f, "data", None) is not None
        for f in request.mm_features
    )


__all__ = ["ADDR_KEY", "RID_KEY", "TOKENS_KEY", "SchedulerSide"]
