"""Several runs of bench_transfer.py per transport: medians with their spread, targets on the
medians, and a plot with error bars.

    python bench/summarize.py RUN.json [RUN.json ...] [--plot out.png] [--markdown]

Runs are grouped by transport. For every figure a target is set on (bench_transfer.TARGETS,
TORCH_TARGETS) it prints the median over the runs and the range (min-max), and whether the
median meets the target; ``--markdown`` prints the same as a table for docs/bench.md.

It also reports, with no target (the issue fixes none; marked "report"), the figures in
bench_transfer.REPORTED: (e)/(a) per payload, the zero-copy path end to end (``stage`` on the
sender, ``lease`` on the receiver, from the receiver's request to the payload in hand) against
(a), the raw engine's best pool-to-pool write of the same bytes: 1.0 would be zero copy at the
wire's speed. Runs from before (e) existed simply lack those rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_transfer import (
    LABELS,
    LINES,
    REPORTED,
    TARGETS,
    TORCH_TARGETS,
    measures,
    style_axes,
    target_text,
)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target, then per reported figure (target "report", met None): the median,
    min and max over ``runs`` (of one transport)."""
    transport = runs[0]["config"]["transport"]
    targets: list[tuple[object, str, float | str]] = list(
        TORCH_TARGETS if transport == "torch" else TARGETS
    )
    targets += [(key, what, "report") for key, what in REPORTED]
    figures = [measures(r) for r in runs]
    rows = []
    for key, what, target in targets:
        values = [f[(key, what)] for f in figures if (key, what) in f]
        if not values:
            continue
        med = statistics.median(values)
        rows.append(
            {
                "payload": key if isinstance(key, str) else f"{key} MiB",
                "ratio": what,
                "target": target,
                "value": med,
                "min": min(values),
                "max": max(values),
                "runs": len(values),
                "met": None if isinstance(target, str) else med >= target,
            }
        )
    return rows


def _spread(row: dict[str, Any]) -> str:
    if row["ratio"].startswith("p50"):
        return f"{-row['max']:+.2f} to {-row['min']:+.2f}"
    return f"{row['min']:.2f}-{row['max']:.2f}"


def markdown(transport: str, rows: list[dict[str, Any]]) -> str:
    out = [f"| {transport} | median | range | target | met |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        p50 = r["ratio"].startswith("p50")
        value = f"{-r['value']:+.2f} ms" if p50 else f"{r['value']:.2f}"
        if r["met"] is None:
            target, met = "report", "-"
        else:
            target = f"<= +{-r['target']:.2f} ms" if p50 else f">= {r['target']:.2f}"
            met = "yes" if r["met"] else "no"
        name = f"{r['payload']} {r['ratio']}"
        out.append(f"| {name} | {value} | {_spread(r)} | {target} | {met} |")
    return "\n".join(out)


def plot(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (transport, runs) in zip(axes[0], groups.items(), strict=True):
        rows = runs[0]["payloads"]
        x = [r["mib"] for r in rows]
        for k in LINES:
            if any(k not in p["lines"] for run in runs for p in run["payloads"]):
                continue  # runs from before that line existed
            per_size = [
                [run["payloads"][i]["lines"][k]["gbps"] for run in runs] for i in range(len(x))
            ]
            med = [statistics.median(v) for v in per_size]
            lo = [m - min(v) for m, v in zip(med, per_size, strict=True)]
            hi = [max(v) - m for m, v in zip(med, per_size, strict=True)]
            ax.errorbar(x, med, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[k])
        style_axes(ax, x, "GB/s: median of runs, bars: min-max")
        ax.set_title(f"{transport}: {len(runs)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path, help="write a figure with error bars here")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --plot")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in args.json:
        r = json.loads(p.read_text())
        groups[r["config"]["transport"]].append(r)
    for transport, runs in groups.items():
        rows = summarize(runs)
        if args.markdown:
            print(markdown(f"{transport} ({len(runs)} runs)", rows), end="\n\n")
            continue
        print(f"{transport}: {len(runs)} runs, medians (range)")
        for r in rows:
            mark = "report" if r["met"] is None else "met   " if r["met"] else "MISSED"
            print(f"  {mark} {target_text(r)}  [{_spread(r)}]")
    if args.plot is not None:
        if args.plot.exists() and not args.force:
            sys.exit(f"{args.plot} exists: not overwritten (pass --force)")
        plot(dict(groups), args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
