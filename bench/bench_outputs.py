"""What a fresh CPU output costs to fill, with and without huge pages (``output_hugepages``).

    python bench/bench_outputs.py [--mib 4,8,16,64] [--iters 40] [--repeats 3] [--keep 4]
                                  [--json PATH] [--force]

For each size: allocate a fresh tensor as the receiver does (``torch.empty``), optionally ask for
huge pages on it (``emtransfer.hugepages.advise``, what the registry does), copy a payload of
that size into it (the copy-out), and keep the last ``--keep`` outputs alive, as a server keeps
the outputs it has handed on. Reports the median and p90 time per output and the minor page
faults per output (``getrusage``), per repeat, plain pages and advised pages alternated. One
process, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from emtransfer import hugepages


def measure(src: torch.Tensor, advise: bool, iters: int, keep: int) -> dict[str, float]:
    held: list[torch.Tensor] = []
    times: list[float] = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(iters):
        t0 = time.perf_counter()
        out = torch.empty_like(src)
        if advise:
            hugepages.advise(out)
        out.copy_(src)
        times.append(time.perf_counter() - t0)
        held.append(out)
        if len(held) > keep:
            held.pop(0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    times.sort()
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
        "faults": faults / iters,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    available = hugepages.available()
    print(f"huge pages available: {available} ({hugepages._THP_MODE})")
    print(f"{'MiB':>5} {'pages':>7} {'repeat':>6} {'median ms':>10} {'p90 ms':>8} {'faults':>8}")
    res: dict[str, Any] = {"available": available, "sizes": {}}
    for mib in (int(x) for x in args.mib.split(",")):
        src = torch.randn(mib << 18, dtype=torch.float32)  # mib MiB
        rows: dict[str, list[dict[str, float]]] = {"4k": [], "huge": []}
        for r in range(args.repeats):
            for kind in ("4k", "huge"):
                m = measure(src, kind == "huge", args.iters, args.keep)
                rows[kind].append(m)
                print(
                    f"{mib:>5} {kind:>7} {r + 1:>6} {m['median_ms']:>10.2f} {m['p90_ms']:>8.2f} "
                    f"{m['faults']:>8.1f}"
                )
        res["sizes"][str(mib)] = rows
    return res


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", default="4,8,16,64")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--json", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing --json")
    args = p.parse_args()
    if args.json is not None and args.json.exists() and not args.force:
        sys.exit(f"{args.json} exists; pass --force to overwrite it")
    res = main(args)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    cli()
