"""Tensor-parallel fan-out: one encoder output to every rank of a TP group, two strategies.

``torchrun --nproc-per-node 3 bench/bench_tp.py`` runs an encode node on rank 0 and a TP group
of ``world - 1`` language ranks on the others, and times, per request, from a barrier until
every rank holds the payload:

* ``per-rank``: the encode node sends once per rank (``FanOut``), each rank receives its own
  copy (``RankReceiver``), as ``emtransfer.integrations.tp`` does;
* ``broadcast``: the encode node sends once, to the group's first rank, which broadcasts it
  to the others over gloo (``broadcast_received``).

Every copy is checked against the payload. Prints medians and ranges over ``--reps``; writes
``--json`` only to a new file (``--force`` to overwrite).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import emtransfer as et
from emtransfer.integrations.tp import FanOut, RankReceiver, broadcast_received
from emtransfer.sync import SyncEncodeNode, SyncLanguageNode

WAIT = 60.0


def settings(args: argparse.Namespace) -> et.Settings:
    return et.Settings(
        hidden_size=args.hidden,
        dtype="bfloat16",
        block_size=128,
        num_blocks=max(64, -(-args.tokens // 128) * 2),
        default_blocks=8,
        transport=args.transport,
    )


def payload(tokens: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--transport", default="tcp", choices=["tcp", "nixl", "mooncake"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="overwrite --json")
    args = parser.parse_args()
    if args.json is not None and args.json.exists() and not args.force:
        raise SystemExit(f"{args.json} exists: pick a new name or pass --force")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WAIT))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 3:
        raise SystemExit("run with torchrun --nproc-per-node 3 or more (an encoder, 2+ ranks)")
    tp = world - 1
    group = dist.new_group(list(range(1, world)))  # the TP group: language ranks only
    s = settings(args)
    node: Any = SyncEncodeNode(s) if rank == 0 else SyncLanguageNode(s)
    info: list[Any] = [None] * world
    dist.all_gather_object(info, node.address if rank == 0 else node.node.node_id)
    address, owners = info[0], info[1:]
    want = payload(args.tokens, args.hidden, seed=1)
    times: dict[str, list[float]] = {"per-rank": [], "broadcast": []}
    fan = FanOut(node, tp) if rank == 0 else None
    rx = RankReceiver(node, rank - 1, group) if rank else None
    for rep in range(args.reps + 1):  # the first round of each is a warm-up
        for strategy in ("per-rank", "broadcast"):
            rid = f"{strategy}-{rep}"
            dist.barrier()
            t0 = time.perf_counter()
            ok = True
            if rank == 0:
                if strategy == "per-rank":
                    sent = fan.send(rid, want, owners=owners)  # type: ignore[union-attr]
                    for h in sent.handles.values():
                        h.result(WAIT)
                    sent.release()
                else:
                    node.send(rid, want, peer=owners[0]).result(WAIT)
            elif strategy == "per-rank":
                h = rx.receive(rid, address, expected_tokens=args.tokens)  # type: ignore[union-attr]
                got = h.result(WAIT).tensors
                ok = torch.equal(got["embeddings"], want["embeddings"])
                h.release()
            else:
                first = rank == 1
                h = node.receive(rid, address, expected_tokens=args.tokens) if first else None
                received = h.result(WAIT) if h is not None else None
                tensors, _ = broadcast_received(received, group, src=1)
                ok = torch.equal(tensors["embeddings"], want["embeddings"])
                if h is not None:
                    h.release()
            elapsed = torch.tensor([time.perf_counter() - t0, 0.0 if ok else 1.0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the group is as slow as its last
            if elapsed[1] > 0:
                raise SystemExit(f"{rid}: a rank's copy differs from the payload")
            if rep > 0:
                times[strategy].append(float(elapsed[0]))
    node.close()
    if rank == 0:
        mib = args.tokens * args.hidden * 2 / 2**20
        print(f"TP {tp}, {args.tokens} x {args.hidden} bf16 ({mib:.1f} MiB), {args.transport}, "
              f"{args.reps} reps (median [min-max] until every rank holds it):")  # fmt: skip
        result: dict[str, Any] = {"tp": tp, "tokens": args.tokens, "hidden": args.hidden,
                                  "transport": args.transport, "reps": args.reps}  # fmt: skip
        for strategy, ts in times.items():
            med = statistics.median(ts)
            print(f"  {strategy:10s} {med * 1e3:8.2f} ms [{min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f}]")
            result[strategy] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "all_s": ts}
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    os._exit(0)  # the loop threads are closed; skip interpreter teardown of the engines


if __name__ == "__main__":
    main()
