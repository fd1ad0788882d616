"""Allocator micro-benchmark: alloc/free throughput under churn, runs per transfer after churn
against the minimum possible, and the cost of turning a transfer into descriptors.

    python bench/bench_allocator.py [--num-blocks 4096] [--block-size 128] [--seconds 2.0]
                                    [--fill 0.5] [--seed 0] [--json PATH [--force]]

(a) churn: a steady state of live allocations of 1..32 blocks, kept around ``--fill`` of the
    pool (default half); each step frees a random live allocation or allocates a new one with
    ``try_alloc``. Every block allocated and every block freed counts as one block operation;
    every ``try_alloc`` that succeeds and every ``free`` counts as one allocation operation.
    Target: >= 1,000,000 block operations per second.
(b) runs per transfer: a sender and a receiver allocator, each churned the same way; then,
    repeatedly, one allocation of the transfer size on each side, ``runs_to`` between them,
    free, churn a bit. Each transfer is compared with its minimum, defined as follows. Just
    before the two allocations, the free blocks of each pool (the pool minus every block
    ``leak_report`` lists) form maximal runs of consecutive blocks. ``k_side`` is the fewest of
    those runs whose lengths sum to at least the transfer's blocks (the longest ones): no
    allocator can hand out that many blocks in fewer runs, since every run of an allocation
    lies inside one free run. Every run of a transfer is consecutive on both sides, so a
    transfer needs at least ``min = max(k_sender, k_receiver)`` runs; ``min`` is 1 exactly when
    each pool has a free run long enough. (An allocator that reaches ``k_side`` on both sides
    can still need up to ``k_sender + k_receiver - 1`` runs, when the two sides' run
    boundaries fall at different tokens.) Reported per transfer size: runs (mean, p50, p99,
    max), min (mean, max), the share of transfers at exactly ``min`` runs, and the allocation
    runs per side against ``k_side`` (mean over both sides). The header gives the pools'
    fragmentation at those moments: free runs per pool and the longest free run (means).
(c) median time of ``runs_to`` + ``BufferRegistry.write_ops`` for an 8192-token transfer
    between two churned allocations (embeddings hidden 4096 bf16 + mrope_positions [3] int64).

``--json PATH`` also writes every figure to PATH; an existing PATH is never overwritten unless
``--force`` is given (the check comes first, before any benchmark runs).
"""

from __future__ import annotations

import argparse
import itertools
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
                got = alloc.try_alloc(sizes[i], "churn")
                if got is not None:
                    live.append(got)
                    block_ops += len(got.blocks)
                    alloc_ops += 1
        self._i = i
        self.block_ops += block_ops
        self.alloc_ops += alloc_ops

    def free_all(self) -> None:
        for a in self.live:
            self.alloc.free(a)
        self.live.clear()


def bench_churn(
    num_blocks: int, block_size: int, seconds: float, seed: int, fill: float = 0.5
) -> dict[str, float]:
    alloc = BlockAllocator(num_blocks, block_size)
    churn = Churn(alloc, random.Random(seed), fill)
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


def churned_pair(
    num_blocks: int, block_size: int, seed: int, fill: float = 0.5
) -> tuple[Churn, Churn]:
    sides = []
    for k in range(2):
        c = Churn(BlockAllocator(num_blocks, block_size), random.Random(seed * 7919 + k), fill)
        c.fill()
        c.steps(20_000)
        sides.append(c)
    return sides[0], sides[1]


def free_run_lengths(alloc: BlockAllocator) -> list[int]:
    """Lengths of the maximal free runs, from the pool minus the blocks ``leak_report`` lists
    (any allocator); ``free_runs()`` gives the same faster where the allocator has it."""
    free_runs = getattr(alloc, "free_runs", None)
    if free_runs is not None:
        return [length for _, length in free_runs()]
    held = {b for blocks in alloc.leak_report().values() for b in blocks}
    lengths: list[int] = []
    prev = -2
    for b in range(alloc.num_blocks):
        if b in held:
            continue
        if b == prev + 1:
            lengths[-1] += 1
        else:
            lengths.append(1)
        prev = b
    return lengths


def fewest_runs(lengths: list[int], blocks: int) -> int:
    """``k_side``: the fewest free runs whose lengths sum to at least ``blocks``."""
    total = 0
    for k, length in enumerate(sorted(lengths, reverse=True), 1):
        total += length
        if total >= blocks:
            return k
    raise ValueError(f"{blocks} blocks do not fit in {sum(lengths)} free blocks")


def allocation_runs(a: Allocation) -> int:
    """Runs of consecutive blocks in an allocation, in its block order."""
    return 1 + sum(1 for x, y in itertools.pairwise(a.blocks) if y != x + 1)


def bench_runs(
    num_blocks: int, block_size: int, seed: int, samples: int = 400, fill: float = 0.5
) -> dict[int, dict[str, float]]:
    sender, receiver = churned_pair(num_blocks, block_size, seed, fill)
    out: dict[int, dict[str, float]] = {}
    for size in TRANSFER_SIZES:
        blocks = -(-size // block_size)
        if blocks > num_blocks // 2:
            continue  # would not fit next to the churned half of the pool
        counts: list[int] = []
        minimums: list[int] = []
        tokens_per_run: list[float] = []
        side_runs: list[int] = []
        side_min: list[int] = []
        free_runs: list[int] = []
        longest: list[int] = []
        for _ in range(samples):
            sender.steps(50)
            receiver.steps(50)
            ks = []
            for side in (sender, receiver):
                lengths = free_run_lengths(side.alloc)
                free_runs.append(len(lengths))
                longest.append(max(lengths, default=0))
                ks.append(fewest_runs(lengths, blocks) if sum(lengths) >= blocks else 0)
            s = sender.alloc.try_alloc(size, "tx")
            r = receiver.alloc.try_alloc(size, "rx")
            if s is not None and r is not None:
                runs = s.runs_to(r, size)
                counts.append(len(runs))
                minimums.append(max(ks))
                tokens_per_run.append(size / len(runs))
                for got, k in ((s, ks[0]), (r, ks[1])):
                    side_runs.append(allocation_runs(got))
                    side_min.append(k)
            for side, a in ((sender, s), (receiver, r)):
                if a is not None:
                    side.alloc.free(a)
        if not counts:
            continue
        order = sorted(counts)
        out[size] = {
            "samples": len(counts),
            "runs_mean": statistics.fmean(counts),
            "runs_median": statistics.median(counts),
            "runs_p99": order[min(len(order) - 1, int(0.99 * len(order)))],
            "runs_max": order[-1],
            "min_runs_mean": statistics.fmean(minimums),
            "min_runs_max": max(minimums),
            "at_min_share": sum(c == m for c, m in zip(counts, minimums, strict=True))
            / len(counts),
            "side_runs_mean": statistics.fmean(side_runs),
            "side_min_runs_mean": statistics.fmean(side_min),
            "tokens_per_run_mean": statistics.fmean(tokens_per_run),
            "blocks_per_transfer": blocks,
            "free_runs_mean": statistics.fmean(free_runs),
            "longest_free_run_mean": statistics.fmean(longest),
        }
    sender.free_all()
    receiver.free_all()
    return out


def bench_descriptors(
    num_blocks: int,
    block_size: int,
    seed: int,
    tokens: int = 8192,
    repeats: int = 300,
    fill: float = 0.5,
) -> dict[str, float]:
    sender, receiver = churned_pair(num_blocks, block_size, seed + 1, fill)
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
    p.add_argument("--fill", type=float, default=0.5, help="churned share of the pool (0..1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json PATH")
    args = p.parse_args(argv)
    if not 0.0 < args.fill < 1.0:
        p.error(f"--fill must be between 0 and 1, got {args.fill}")
    if args.json is not None and args.json.exists() and not args.force:
        print(f"{args.json} exists; not overwriting it (pass --force to)", file=sys.stderr)
        return 2

    churn = bench_churn(args.num_blocks, args.block_size, args.seconds, args.seed, args.fill)
    runs = bench_runs(args.num_blocks, args.block_size, args.seed, fill=args.fill)
    desc = bench_descriptors(args.num_blocks, args.block_size, args.seed, fill=args.fill)

    print(
        f"BlockAllocator: {args.num_blocks} blocks x {args.block_size} tokens, "
        f"python {sys.version.split()[0]}"
    )
    print()
    print(f"(a) churn, live allocations of 1..32 blocks, ~{args.fill:.0%} of the pool in use")
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
    print("(b) runs per transfer between two churned pools, against the minimum (docstring)")
    if runs:
        first = next(iter(runs.values()))
        print(
            f"    fragmentation: {first['free_runs_mean']:.1f} free runs per pool, longest "
            f"{first['longest_free_run_mean']:.1f} blocks (means)"
        )
    print(
        f"    {'tokens':>7} {'blocks':>6} {'samples':>7} | {'runs':>5} {'p50':>4} {'p99':>4} "
        f"{'max':>4} | {'min':>5} {'max':>4} | {'at min':>6} | {'side runs/min':>13} | "
        f"{'tokens/run':>10}"
    )
    for size, r in runs.items():
        print(
            f"    {size:>7} {r['blocks_per_transfer']:>6} {r['samples']:>7} | "
            f"{r['runs_mean']:>5.2f} {r['runs_median']:>4.0f} {r['runs_p99']:>4} "
            f"{r['runs_max']:>4} | {r['min_runs_mean']:>5.2f} {r['min_runs_max']:>4} | "
            f"{r['at_min_share']:>6.0%} | "
            f"{r['side_runs_mean']:>6.2f}/{r['side_min_runs_mean']:<6.2f} | "
            f"{r['tokens_per_run_mean']:>10.1f}"
        )
    print()
    print(
        f"(c) runs_to + write_ops, {desc['tokens']} tokens, 2 fields: "
        f"median {desc['median_us']:.1f} us (min {desc['min_us']:.1f} us; "
        f"{desc['runs']} runs -> {desc['write_ops']} write ops)"
    )

    if args.json is not None:
        text = json.dumps(
            {
                "num_blocks": args.num_blocks,
                "block_size": args.block_size,
                "fill": args.fill,
                "churn": churn,
                "runs_per_transfer": {str(k): v for k, v in runs.items()},
                "descriptors": desc,
            },
            indent=2,
        )
        try:  # "x": fail rather than overwrite a file that appeared while the bench ran
            with args.json.open("w" if args.force else "x") as f:
                f.write(text)
        except FileExistsError:
            print(f"{args.json} appeared meanwhile; not overwriting it", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
