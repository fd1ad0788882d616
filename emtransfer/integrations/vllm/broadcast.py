"""A consumer with tensor parallelism: TP rank 0 receives each item, the group gets it by
broadcast, and no rank places it before every rank can.

In vLLM 0.33 every TP worker of the first pipeline stage has its own encoder cache and needs
the item there. Only rank 0 has a language node: it receives from the producer as with TP 1
(one transfer per item: the producer, a separate instance, does not know the consumer's TP),
and the step's collectives hand the tensor to the other ranks. :class:`TPChannel` holds
those collectives; ``WorkerSide`` (``worker.py``) calls them from ``start_load_caches``, on
vLLM's worker thread, which every TP rank runs once per step for the same scheduler output.

Groups: the small messages (rank 0's outcomes, the agreement) go over a gloo group private
to the connector (:func:`private_cpu_group`, created once at start-up by the TP ranks only),
so nothing here shares sequence numbers or a failure with vLLM's own CPU group; a tensor on
CUDA goes over vLLM's device group (NCCL), the fast path, from the thread that issues vLLM's
own collectives on it, at a point every rank reaches in the same order. A CPU tensor goes
over the private group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from ...logs import get_logger

_log = get_logger("emtransfer.integrations.vllm")


@dataclass(frozen=True)
class TPLayout:
    """Where this worker sits: its rank in the TP group, the group's global ranks (TP rank
    order), the groups to move tensors over, and whether it is on the first PP stage."""

    rank: int
    size: int
    ranks: tuple[int, ...]
    #: vLLM's device group (NCCL on GPU): CUDA tensors are broadcast over it
    device_group: Any = None
    #: vLLM's CPU group: only used when a private group cannot be created
    cpu_group: Any = None
    first_pp: bool = True


SINGLE = TPLayout(rank=0, size=1, ranks=(0,))


def vllm_layout() -> TPLayout | None:
    """This worker's layout from vLLM's parallel state; None when vLLM has no groups (a
    process that is the whole instance)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp = get_tp_group()
        first_pp = bool(get_pp_group().is_first_rank)
    except (AssertionError, ImportError, AttributeError):
        return None
    return TPLayout(
        rank=int(tp.rank_in_group),
        size=int(tp.world_size),
        ranks=tuple(int(r) for r in tp.ranks),
        device_group=getattr(tp, "device_group", None),
        cpu_group=getattr(tp, "cpu_group", None),
        first_pp=first_pp,
    )


#: one private group per process and rank set (vLLM builds one worker connector per process;
#: a group created with use_local_synchronization is named by its ranks, so a second one
#: over the same ranks could not be made)
_PRIVATE: dict[tuple[int, ...], Any] = {}


def private_cpu_group(layout: TPLayout) -> Any:
    """A gloo group over the TP ranks, for the connector alone. A collective: every rank of
    the TP group calls it, once (at start-up); the ranks outside it do not."""
    group = _PRIVATE.get(layout.ranks)
    if group is not None:
        return group
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ConfigError(
            f"EmtransferECConnector consumer with tensor_parallel_size={layout.size}: "
            "torch.distributed is not initialized"
        )
    try:
        group = dist.new_group(
            list(layout.ranks),
            backend="gloo",
            use_local_synchronization=True,
            group_desc="emtransfer_vllm_tp",
        )
    except (NotImplementedError, ValueError) as exc:
        # raised before any rendezvous, the same on every rank (TorchComms, a name taken)
        if layout.cpu_group is None:
            raise ConfigError(f"cannot create the connector's TP group: {exc}") from exc
        _log.warning("using vLLM's TP CPU group for the connector", reason=str(exc))
        group = layout.cpu_group
    _PRIVATE[layout.ranks] = group
    return group


class TPChannel:
    """The collectives of one step; every rank calls the same ones in the same order."""

    def __init__(self, layout: TPLayout, cpu_group: Any) -> None:
        self.layout = layout
        self.cpu_group = cpu_group
        self.src = layout.ranks[0]  # TP rank 0's global rank (torch's src)
        #: set once a collective raised (a rank died): the group is unusable from then on
        self.broken: str | None = None

    def outcomes(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable list) on every rank."""
        import torch.distributed as dist

        box = [value if self.layout.rank == 0 else None]
        dist.broadcast_object_list(box, src=self.src, group=self.cpu_group)
        return box[0]

    def agree(self, ok: list[bool]) -> list[int | None]:
        """Per entry: None when every rank said ok, else the lowest rank that did not (an
        all-reduce MIN over the group)."""
        import torch.distributed as dist

        size = self.layout.size
        flags = torch.tensor([size if o else self.layout.rank for o in ok], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return [None if v == size else int(v) for v in flags.tolist()]

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's tensors into the other ranks' buffers of the same shape and dtype (as
        bytes: any dtype on either backend). CUDA tensors over vLLM's device group."""
        import torch.distributed as dist

        works = []
        for t in tensors:
            if t.numel() == 0:
                continue
            on_device = t.device.type != "cpu" and self.layout.device_group is not None
            group = self.layout.device_group if on_device else self.cpu_group
            data = t.view(-1).view(torch.uint8)
            works.append(dist.broadcast(data, src=self.src, group=group, async_op=True))
        for work in works:
            if work is not None:
                work.wait()


__all__ = ["SINGLE", "TPChannel", "TPLayout", "private_cpu_group", "vllm_layout"]
