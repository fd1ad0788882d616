"""Combine the JSON results of bench_transfer.py for several transports into one figure.

    python bench/plot_all.py [--out bench/results/throughput.png] [JSON ...]

Without JSON arguments it reads bench/results/{nixl,torch,tcp}.json (those that exist). One panel
per transport: GB/s against payload MiB (log x) for the four lines (a) wire, (b) by hand,
(c) emtransfer end to end, (d) emtransfer's transfer phase.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_transfer import draw

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("json", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.png")
    args = ap.parse_args(argv)
    paths = args.json or [
        p for t in ("nixl", "torch", "tcp") if (p := RESULTS / f"{t}.json").exists()
    ]
    if not paths:
        sys.exit(f"no results: run bench/bench_transfer.py first (looked in {RESULTS})")
    results = [json.loads(p.read_text()) for p in paths]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), squeeze=False)
    top = max(r["lines"][k]["gbps"] for res in results for r in res["payloads"] for k in r["lines"])
    for ax, res in zip(axes[0], results, strict=True):
        draw(ax, res)
        ax.set_ylim(0, top * 1.08)
        ax.set_title(f"{res['config']['transport']} ({res['config']['date'][:10]})")
    for ax in axes[0][1:]:
        ax.get_legend().remove()
    fig.suptitle(
        "emtransfer vs the raw transport, 2 processes on one host (CPU pools)", fontsize=11
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
