"""Allocator micro-benchmark: alloc/free throughput under churn, runs per transfer after churn,
and the cost of turning a transfer into descriptors.

    python bench/bench_allocator.py [--num-blocks 4096] [--block-size 128] [--seconds 2.0]
                                    [--json PATH] [--seed 0]

(a) churn: a steady state of live allocations of 1..32 blocks, kept around half the pool;
    each step frees a random live allocation or allocates a new one with ``try_alloc``.
    Every block allocated and every block freed counts as one block operation; every
    ``try_alloc`` that succeeds and every ``free`` counts as one allocation operation.
(b) runs per transfer: a sender and a receiver allocator, each churned; then, repeatedly, one
    allocation of the transfer size on each side, ``runs_to`` between them, free, churn a bit.
(c) median time of ``runs_to`` + ``BufferRegistry.write_ops`` for an 8192-token transfer
    between two churned allocations (embeddings hidden 4096 bf16 + mrope_positions [3] int64).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from emtransfer.allocator import Allocation, BlockAllocator
from emtransfer.buffers import BufferRegistry

TARGET_BLOCK_OPS = 1_000_000
TRANSFER_SIZES = (256, 1024, 2048, 8192)
MAX_BLOCKS_PER_ALLOC = 32


class Churn:
    """Random alloc/free around a target fill level, with pre-drawn random numbers so that the
    measured loop is dominated by the allocator, not by ``random``."""

    def __init__(self, alloc: BlockAllocator, rng: random.Random, fill: float = 0.5) -> None:
        self.alloc = alloc
        self.rng = rng
        self.live: list[Allocation] = []
        self.target = int(alloc.num_blocks * fill)
        self.block_ops = 0
        self.alloc_ops = 0
        n = 1 << 16
        self._sizes = [rng.randint(1, MAX_BLOCKS_PER_ALLOC) * alloc.block_size for _ in range(n)]
        self._coins = [rng.random() for _ in range(n)]
        self._picks = [rng.random() for _ in range(n)]
        self._i = 0

    def fill(self) -> None:
        while self.alloc.num_blocks - self.alloc.num_free < self.target:
            self.steps(1)

    def steps(self, n: int) -> None:
        alloc, live = self.alloc, self.live
        sizes, coins, picks = self._sizes, self._coins, self._picks
        mask = len(sizes) - 1
        i = self._i
        block_ops = alloc_ops = 0
        target = self.target
        for _ in range(n):
            i = (i + 1) & mask
            used = alloc.num_blocks - alloc.num_free
            # below the target fill: mostly allocate; above: mostly free
            p_alloc = 0.75 if used < target else 0.25
            if live and coins[i] >= p_alloc:
                k = int(picks[i] * len(live))
                a = live[k]
                live[k] = live[-1]
                live.pop()
                alloc.free(a)
                block_ops += len(a.blocks)
                alloc_ops += 1
            else:
                a = alloc.try_alloc(sizes[i], "churn")
                if a is not None:
                    live.append(a)
                    block_ops += len(a.blocks)
                    alloc_ops += 1
        self._i = i
        self.block_ops += block_ops
        self.alloc_ops += alloc_ops

    def free_all(self) -> None:
        for a in self.live:
            self.alloc.free(a)
        self.live.clear()


def bench_churn(num_blocks: int, block_size: int, seconds: float, seed: int) -> dict[str, float]:
    alloc = BlockAllocator(num_blocks, block_size)
    churn = Churn(alloc, random.Random(seed))
    churn.fill()
    churn.steps(10_000)  # warm up and scramble
    churn.block_ops = churn.alloc_ops = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        churn.steps(2_000)
        elapsed = time.perf_counter() - t0
    churn.free_all()
    assert alloc.num_free == num_blocks and not alloc.leak_report()
    return {
        "seconds": elapsed,
        "block_ops": churn.block_ops,
        "alloc_ops": churn.alloc_ops,
        "block_ops_per_s": churn.block_ops / elapsed,
        "alloc_ops_per_s": churn.alloc_ops / elapsed,
        "blocks_per_alloc_op": churn.block_ops / max(1, churn.alloc_ops),
    }


def churned_pair(num_blocks: int, block_size: int, seed: int) -> tuple[Churn, Churn]:
    sides = []
    for k in range(2):
        c = Churn(BlockAllocator(num_blocks, block_size), random.Random(seed * 7919 + k))
        c.fill()
        c.steps(20_000)
        sides.append(c)
    return sides[0], sides[1]


def bench_runs(
    num_blocks: int, block_size: int, seed: int, samples: int = 400
) -> dict[int, dict[str, float]]:
    sender, receiver = churned_pair(num_blocks, block_size, seed)
    out: dict[int, dict[str, float]] = {}
    for size in TRANSFER_SIZES:
        if -(-size // block_size) > num_blocks // 2:
            continue  # would not fit next to the churned half of the pool
        counts: list[int] = []
        tokens_per_run: list[float] = []
        for _ in range(samples):
            sender.steps(50)
            receiver.steps(50)
            s = sender.alloc.try_alloc(size, "tx")
            r = receiver.alloc.try_alloc(size, "rx")
            if s is not None and r is not None:
                runs = s.runs_to(r, size)
                counts.append(len(runs))
                tokens_per_run.append(size / len(runs))
            for side, a in ((sender, s), (receiver, r)):
                if a is not None:
                    side.alloc.free(a)
        counts.sort()
        out[size] = {
            "samples": len(counts),
            "runs_mean": statistics.fmean(counts),
            "runs_median": statistics.median(counts),
            "runs_p99": counts[min(len(counts) - 1, int(0.99 * len(counts)))],
            "runs_max": counts[-1],
            "tokens_per_run_mean": statistics.fmean(tokens_per_run),
            "blocks_per_transfer": -(-size // block_size),
        }
    sender.free_all()
    receiver.free_all()
    return out


def bench_descriptors(
    num_blocks: int, block_size: int, seed: int, tokens: int = 8192, repeats: int = 300
) -> dict[str, float]:
    sender, receiver = churned_pair(num_blocks, block_size, seed + 1)
    # write_ops only needs the field layouts; a one-slot registry avoids a multi-GiB pool
    layouts = BufferRegistry(
        {"embeddings": ((4096,), torch.bfloat16), "mrope_positions": ((3,), torch.int64)},
        num_blocks=1,
        block_size=1,
    )
    s = sender.alloc.try_alloc(tokens, "tx")
    r = receiver.alloc.try_alloc(tokens, "rx")
    assert s is not None and r is not None, "pool too small for the descriptor benchmark"
    times: list[float] = []
    runs = ops = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        runs = s.runs_to(r, tokens)
        ops = layouts.write_ops(runs)
        times.append(time.perf_counter() - t0)
    assert runs is not None and ops is not None
    return {
        "tokens": tokens,
        "runs": len(runs),
        "write_ops": len(ops),
        "median_us": statistics.median(times) * 1e6,
        "min_us": min(times) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)

    churn = bench_churn(args.num_blocks, args.block_size, args.seconds, args.seed)
    runs = bench_runs(args.num_blocks, args.block_size, args.seed)
    desc = bench_descriptors(args.num_blocks, args.block_size, args.seed)

    print(
        f"BlockAllocator: {args.num_blocks} blocks x {args.block_size} tokens, "
        f"python {sys.version.split()[0]}"
    )
    print()
    print("(a) churn, live allocations of 1..32 blocks, ~50% of the pool in use")
    ok = "OK" if churn["block_ops_per_s"] >= TARGET_BLOCK_OPS else "BELOW TARGET"
    print(
        f"    block ops/s      {churn['block_ops_per_s']:>14,.0f}   "
        f"(target >= {TARGET_BLOCK_OPS:,}: {ok})"
    )
    print(
        f"    allocation ops/s {churn['alloc_ops_per_s']:>14,.0f}   "
        f"({churn['blocks_per_alloc_op']:.1f} blocks per op, {churn['seconds']:.2f} s)"
    )
    print()
    print("(b) runs per transfer between two churned pools")
    print(
        f"    {'tokens':>7} {'blocks':>6} {'samples':>7} {'mean':>7} {'median':>7} "
        f"{'p99':>5} {'max':>5} {'tokens/run':>10}"
    )
    for size, r in runs.items():
        print(
            f"    {size:>7} {r['blocks_per_transfer']:>6} {r['samples']:>7} "
            f"{r['runs_mean']:>7.1f} {r['runs_median']:>7.1f} {r['runs_p99']:>5} "
            f"{r['runs_max']:>5} {r['tokens_per_run_mean']:>10.1f}"
        )
    print()
    print(
        f"(c) runs_to + write_ops, {desc['tokens']} tokens, 2 fields: "
        f"median {desc['median_us']:.1f} us (min {desc['min_us']:.1f} us; "
        f"{desc['runs']} runs -> {desc['write_ops']} write ops)"
    )

    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "num_blocks": args.num_blocks,
                    "block_size": args.block_size,
                    "churn": churn,
                    "runs_per_transfer": {str(k): v for k, v in runs.items()},
                    "descriptors": desc,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
