"""vLLM encoder-cache connector over emtransfer (``EmtransferECConnector``).

Selected by vLLM's own ``ECConnectorFactory``::

    --ec-transfer-config '{"ec_connector": "EmtransferECConnector",
                           "ec_connector_module_path": "emtransfer.integrations.vllm",
                           "ec_role": "ec_producer",
                           "ec_connector_extra_config": {"transport": "nixl"}}'

The encoder instance (``ec_producer``) offers each encoder output, keyed by its ``mm_hash``,
on an emtransfer encode node; the prefill instance (``ec_consumer``) pulls the items its
requests need into the worker's encoder cache before vLLM schedules them, and a load that
fails (producer gone, timeout, abort) fails only the requests that needed it, through vLLM's
``take_unavailable_requests``. ``docs/vllm.md`` has the design, the keys and the failure
semantics. One instance per process and role: vLLM builds one in the scheduler
(``ECConnectorRole.SCHEDULER``) and one in each worker (``WORKER``); each half lives in its
own module (``scheduler.py``, ``worker.py``). A consumer with tensor parallelism receives on
TP rank 0 and broadcasts each item to the other ranks (``broadcast.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorRole

from .config import CONNECTOR_KEYS, ConnectorConfig, parse_config
from .metadata import (
    EmtransferECMetadata,
    EmtransferECStats,
    EmtransferECWorkerMetadata,
    LoadSpec,
)
from .scheduler import ADDR_KEY, RID_KEY, TOKENS_KEY, SchedulerSide
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorWorkerMetadata
    from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request


class EmtransferECConnector(ECConnectorBase):
    """Moves encoder outputs between vLLM instances with emtransfer; see the module doc."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        self.config: ConnectorConfig = parse_config(
            vllm_config.ec_transfer_config, getattr(vllm_config, "model_config", None)
        )
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == ECConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.config, vllm_config)
        elif role == ECConnectorRole.WORKER:
            if self.config.is_consumer and not getattr(vllm_config, "use_v2_model_runner", True):
                from ...errors import ConfigError

                raise ConfigError(
                    "EmtransferECConnector consumer needs vLLM's V2 model runner (the V1 runner "
                    "skips the EC connector on a step with no tokens, which is every step while "
                    "all requests wait for their items): unset VLLM_USE_V2_MODEL_RUNNER=0"
                )
            self._worker = WorkerSide(self.config, vllm_config)
        else:
            raise ValueError(f"unknown ECConnectorRole {role!r}")

    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side method on a worker connector"
        return self._scheduler

    def _work(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side method on a scheduler connector"
        return self._worker

    def _meta(self) -> EmtransferECMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, EmtransferECMetadata), type(meta)
        return meta

    # -- worker side ----------------------------------------------------------------------------
    def start_worker_services(self) -> None:
        self._work().start_services()

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        self._work().start_load_caches(self._meta(), encoder_cache)

    def start_save_caches(self, **kwargs: Any) -> None:
        self._work().start_save_caches(self._meta(), kwargs.get("encoder_cache"))

    def save_caches(
        self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any
    ) -> None:
        self._work().save_caches(encoder_cache, mm_hash)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(items whose send ended, items received): mm_hashes, for vLLM's output only; the
        scheduler learns loads and failures from ``build_connector_worker_meta``."""
        return self._work().get_finished()

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        return self._work().build_connector_worker_meta()

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats:
        return EmtransferECStats(data=dict(data or {}))

    def metrics_text(self) -> bytes:
        """Prometheus text of this worker's emtransfer nodes (``emtransfer_*`` families: the
        same as the servers' ``/metrics``), for an exporter of the host's choosing."""
        return self._worker.metrics_text() if self._worker is not None else b""

    # -- scheduler side -------------------------------------------------------------------------
    def has_cache_item(self, identifier: str) -> bool:
        return self._sched().has_cache_item(identifier)

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        return self._sched().ensure_cache_available(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        self._sched().update_state_after_alloc(request, index)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> EmtransferECMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def take_unavailable_requests(self) -> set[str]:
        return self._sched().take_unavailable_requests()

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_push_work()

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request)

    # -- both -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._worker is not None:
            self._worker.shutdown()


__all__ = [
    "ADDR_KEY",
    "CONNECTOR_KEYS",
    "RID_KEY",
    "TOKENS_KEY",
    "ConnectorConfig",
    "EmtransferECConnector",
    "EmtransferECMetadata",
    "EmtransferECStats",
    "EmtransferECWorkerMetadata",
    "LoadSpec",
]
