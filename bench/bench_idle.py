"""CPU used by idle, connected nodes (target: under 1% of a core per node).

    python bench/bench_idle.py nixl|tcp|torch [--seconds 5] [--progress-delay-us US]
                                              [--threads]

Starts an encode node and a language node in this process, connects them, and measures the
process's CPU time over an idle interval (heartbeats flowing, no requests). ``--threads`` also
lists the CPU of each thread (``/proc/self/task/*/stat``, clock ticks: 10 ms resolution), which
is how the NIXL progress threads were found to be the idle cost: UCX's progress thread wakes
once per ``progress_delay_us`` (rounded up to whole milliseconds) and progresses its worker
even when nothing happened. ``--progress-delay-us`` builds the nodes' NIXL transports with that
delay instead of the default (to compare; nixl only)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emtransfer as et
from emtransfer.logs import configure_logging


def thread_ticks() -> dict[str, tuple[str, int]]:
    """Per thread of this process: (name, user + system clock ticks)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, int(fields[11]) + int(fields[12]))
    return out


def transport_for(s: et.Settings, delay_us: int | None) -> Any:
    if delay_us is None:
        return None  # the node builds its own, with the defaults
    from emtransfer.buffers import BufferRegistry
    from emtransfer.transport.nixl import NixlTransport

    return NixlTransport(
        BufferRegistry.from_settings(s), xfer_timeout=s.write_timeout, progress_delay_us=delay_us
    )


async def main(transport: str, seconds: float, delay_us: int | None, threads: bool) -> None:
    s = et.Settings(transport=transport, hidden_size=4096, dtype="bfloat16")
    enc = et.EncodeNode(s, control="tcp", transport=transport_for(s, delay_us))
    lang = et.LanguageNode(s, transport=transport_for(s, delay_us))
    async with enc, lang:
        await lang.connect(enc.address)
        await asyncio.sleep(1.0)  # let start-up work finish before measuring
        t0, c0, k0 = time.monotonic(), os.times(), thread_ticks()
        await asyncio.sleep(seconds)  # the idle interval being measured
        t1, c1, k1 = time.monotonic(), os.times(), thread_ticks()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    share = 100 * cpu / (t1 - t0)
    delay = "" if delay_us is None else f" (progress_delay_us={delay_us})"
    print(
        f"{transport}{delay}: two idle connected nodes: {share:.2f}% of a core "
        f"({share / 2:.2f}% each)"
    )
    if threads:
        hz = os.sysconf("SC_CLK_TCK")
        rows = sorted(((k1[t][1] - k0.get(t, ("", 0))[1], t, k1[t][0]) for t in k1), reverse=True)
        for ticks, tid, name in rows:
            if ticks:
                print(f"  thread {tid:>8} {name:18s} {100 * ticks / hz / (t1 - t0):6.2f}%")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("transport", choices=["nixl", "tcp", "torch"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--progress-delay-us",
        type=int,
        default=None,
        help="nixl: the NIXL progress thread's idle poll timeout (default: the transport's)",
    )
    ap.add_argument("--threads", action="store_true", help="per-thread CPU as well")
    args = ap.parse_args()
    if args.progress_delay_us is not None and args.transport != "nixl":
        ap.error("--progress-delay-us applies to nixl only")
    configure_logging("warning")
    asyncio.run(main(args.transport, args.seconds, args.progress_delay_us, args.threads))
