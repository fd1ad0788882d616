"""Tensor-parallel fan-out: one encoder output delivered to every rank of a TP group.

A language (prefill) worker with tensor parallelism N runs N ranks, and every rank needs the
same multimodal embedding. The strategy implemented here is **one transfer per rank**: each
rank has its own :class:`~emtransfer.sync.SyncLanguageNode` and receives the payload under its
own rid (:func:`rank_rid`: ``f"{rid}#tp{rank}"``), and the encode side sends the payload once
per rank (:class:`FanOut`). An emtransfer payload belongs to one receiver, so one send per rank
is the honest mapping; it costs N writes from the encode pool (the network carries N copies),
and no rank depends on another for its bytes.

The ranks agree on each request's outcome the way SGLang's scheduler does: every rank polls
its handles, and the group all-reduces the states with ``MIN`` over a CPU (gloo) group
(:func:`agree`). :class:`~emtransfer.sync.PollState` is ordered for exactly that: any failed
rank makes the group fail, else the group is as far as its slowest rank. A rank that died
makes the collective raise on the others; :func:`agree` reports that as FAILED for every
request, so the survivors end consistently (their group is unusable afterwards, as in SGLang,
where a dead rank takes the whole TP group down).

The alternative, one transfer to rank 0 and a local broadcast
(:func:`broadcast_received`), moves the bytes over the network once but puts every rank
behind rank 0 and a collective, and a rank 0 failure takes every rank's copy with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidRequest
from ..logs import get_logger
from ..runtime import Received, SendStats
from ..sync import PollState, SyncEncodeNode, SyncLanguageNode, TransferHandle

_log = get_logger("emtransfer.integrations.tp")

#: separates a request's rid from the rank it is delivered to
RANK_SEPARATOR = "#tp"


def rank_rid(rid: str, rank: int | str) -> str:
    """The rid under which ``rank`` receives ``rid``'s payload: ``f"{rid}#tp{rank}"``. A rank
    is its index in the group, or any name unique within it (SGLang names a scheduler rank
    by its receive endpoint, ``host:port``)."""
    if not isinstance(rid, str) or not rid:
        raise InvalidRequest(f"rid must be a non-empty string, got {rid!r}")
    return f"{rid}{RANK_SEPARATOR}{rank}"


def split_rank_rid(rid: str) -> tuple[str, str]:
    """``(rid, rank)`` of a rid made by :func:`rank_rid` (the rank as the string it was)."""
    base, sep, rank = rid.rpartition(RANK_SEPARATOR)
    if not sep or not base or not rank:
        raise InvalidRequest(f"{rid!r} is not a per-rank rid (no {RANK_SEPARATOR!r} suffix)")
    return base, rank


def agree(
    states: Sequence[int],
    group: Any = None,
    *,
    failed: int = int(PollState.FAILED),
    destroy_on_failure: bool = True,
) -> list[int]:
    """The group's view of each request: the ``MIN`` of every rank's ``states`` (the same
    requests, in the same order, on every rank), all-reduced over ``group`` (a
    ``torch.distributed`` CPU group, gloo; None: the default group). Every rank must call it
    the same number of times, as with any collective.

    When the collective fails (a rank died, or the group timed out) every request is
    ``failed`` (PollState.FAILED by default; pass SGLang's FAIL for its statuses), and the
    group is unusable. With ``destroy_on_failure`` this rank then destroys the group, so that
    the ranks still in it fail their next collective at once (their connections to this rank
    close) instead of each waiting for the group's timeout."""
    if not states:
        return []
    import torch.distributed as dist

    local = torch.tensor([int(s) for s in states], dtype=torch.int64)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [int(x) for x in local.tolist()]
    try:
        dist.all_reduce(local, op=dist.ReduceOp.MIN, group=group)
    except RuntimeError as exc:  # gloo: "Connection closed by peer", a timeout, ...
        _log.warning("tp group agreement failed: every request fails", error=str(exc)[:200])
        if destroy_on_failure:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
        return [failed] * len(states)
    return [int(x) for x in local.tolist()]


def agree_poll(handles: Sequence[TransferHandle[Any]], group: Any = None) -> list[PollState]:
    """:func:`agree` over the handles' :meth:`~TransferHandle.poll` states."""
    return [PollState(s) for s in agree([h.poll() for h in handles], group)]


class FanOutSend:
    """One payload sent once per rank: the rank's handle by rank. The group fails as one: once
    any rank's send failed, :meth:`poll` aborts the others (their receivers would be
    discarded by the group's ``MIN`` anyway), so a dead rank does not leave its siblings'
    payloads held on the encode node."""

    def __init__(
        self,
        rid: str,
        handles: Mapping[int, TransferHandle[SendStats]],
        on_delivered: Callable[[int], None] | None = None,
    ) -> None:
        self.rid = rid
        self.handles = dict(handles)
        self._released = False
        self._aborted = False
        self._on_delivered = on_delivered
        self._delivered: set[int] = set()

    def poll(self) -> PollState:
        """The group's state: the minimum over the ranks (never waits). A failure aborts the
        ranks still in flight."""
        if self._on_delivered is not None:
            for r, h in self.handles.items():
                if r not in self._delivered and h.poll() is PollState.SUCCESS:
                    self._delivered.add(r)
                    self._on_delivered(r)
        state = min((h.poll() for h in self.handles.values()), default=PollState.SUCCESS)
        if state is PollState.FAILED and not self._aborted:
            self._aborted = True
            failed = [r for r, h in self.handles.items() if h.poll() is PollState.FAILED]
            for h in self.handles.values():
                h.abort(f"rank {failed[0]} of {self.rid!r} failed")
        return state

    def done(self) -> bool:
        """Every rank's send has ended."""
        return all(h.done() for h in self.handles.values())

    def errors(self) -> dict[int, BaseException]:
        return {r: e for r, h in self.handles.items() if (e := h.error()) is not None}

    def abort(self, reason: str = "aborted by the caller") -> None:
        for h in self.handles.values():
            h.abort(reason)

    def release(self) -> None:
        """Release every rank's handle, once (idempotent; aborts the ranks in flight)."""
        if self._released:
            return
        self._released = True
        for h in self.handles.values():
            h.release()


class FanOut:
    """The encode side of a TP group of ``tp_size`` ranks: :meth:`send` pushes one payload to
    every rank, each under :func:`rank_rid`. Keep one per group: it remembers which ranks'
    language nodes it has seen connected, to fail a rank at once once its node is gone."""

    def __init__(self, node: SyncEncodeNode, tp_size: int) -> None:
        if not isinstance(tp_size, int) or tp_size < 1:
            raise InvalidRequest(f"tp_size must be a positive integer, got {tp_size!r}")
        self.node = node
        self.tp_size = tp_size
        #: owners seen connected: at a send, or as the receivers of a delivered copy
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def send(
        self,
        rid: str,
        tensors: Mapping[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        *,
        owners: Sequence[str | None] | None = None,
    ) -> FanOutSend:
        """Send ``tensors`` to every rank (one send each, never waits). ``owners[r]`` is the
        node id of rank r's language node (who may claim its copy, as ``peer=`` of
        ``EncodeNode.send``; None: any connected peer). A rank whose named node was connected
        at an earlier send and is gone now fails at once (and, through
        :meth:`FanOutSend.poll`, its siblings), instead of holding its copy until
        ``init_timeout``; a rank not connected yet is waited for (its Init may come later)."""
        if owners is not None and len(owners) != self.tp_size:
            raise InvalidRequest(f"owners has {len(owners)} entries for {self.tp_size} ranks")
        gone = self._absent(owners) if owners is not None else set()
        handles: dict[int, TransferHandle[SendStats]] = {}
        for r in range(self.tp_size):
            owner = owners[r] if owners is not None else None
            h = self.node.send(rank_rid(rid, r), tensors, meta, peer=owner)
            if r in gone:
                h.abort(f"rank {r} ({owner}) is not connected any more")
            handles[r] = h

        def delivered(r: int) -> None:
            if owners is not None and owners[r] is not None:
                with self._lock:
                    self._seen.add(owners[r])  # type: ignore[arg-type]

        return FanOutSend(rid, handles, delivered)

    def _absent(self, owners: Sequence[str | None]) -> set[int]:
        """The ranks whose named language node was seen connected and has no live connection
        any more (asked on the node's loop, where its peers live)."""
        node = self.node.node

        async def ask() -> set[int]:
            gone = set()
            with self._lock:
                for r, owner in enumerate(owners):
                    if owner is None:
                        continue
                    if node.peers_named(owner):
                        self._seen.add(owner)
                    elif owner in self._seen:
                        gone.add(r)
            return gone

        return asyncio.run_coroutine_threadsafe(ask(), self.node.loop).result(10)


class RankReceiver:
    """One rank's side: receives each request under its own rid from the encode node."""

    def __init__(self, node: SyncLanguageNode, rank: int, group: Any = None) -> None:
        self.node = node
        self.rank = rank
        self.group = group

    def receive(
        self, rid: str, peer: str, expected_tokens: int | None = None
    ) -> TransferHandle[Received]:
        """Start receiving this rank's copy of ``rid`` (never waits)."""
        return self.node.receive(rank_rid(rid, self.rank), peer, expected_tokens)

    def agree(self, handles: Sequence[TransferHandle[Any]]) -> list[PollState]:
        """The group's state of each handle (a collective: every rank, same order)."""
        return agree_poll(handles, self.group)


def broadcast_received(
    got: Received | None, group: Any = None, *, src: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The other strategy: rank ``src`` received the payload (``got``; None on the other
    ranks) and broadcasts its tensors and meta to the group (gloo: CPU tensors). Returns
    ``(tensors, meta)`` on every rank. A collective: every rank calls it."""
    import torch.distributed as dist

    header: list[Any] = [None]
    if got is not None:
        header = [
            {
                "meta": got.meta,
                "fields": [(k, list(t.shape), str(t.dtype)) for k, t in got.tensors.items()],
            }
        ]
    dist.broadcast_object_list(header, src=src, group=group)
    spec = header[0]
    tensors: dict[str, torch.Tensor] = {}
    for name, shape, dtype in spec["fields"]:
        if got is not None:
            t = got.tensors[name].contiguous()
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
        dist.broadcast(t.view(torch.uint8), src=src, group=group)  # bytes: any dtype on gloo
        tensors[name] = t
    return tensors, dict(spec["meta"])


__all__ = [
    "RANK_SEPARATOR",
    "FanOut",
    "FanOutSend",
    "RankReceiver",
    "agree",
    "agree_poll",
    "broadcast_received",
    "rank_rid",
    "split_rank_rid",
]
