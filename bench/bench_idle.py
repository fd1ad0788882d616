"""CPU used by idle, connected nodes (target: under 5% of a core per node).

    python bench/bench_idle.py nixl|tcp [--seconds 5]

Starts an encode node and a language node in this process, connects them, and measures the
process's CPU time over an idle interval (heartbeats flowing, no requests)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import emtransfer as et
from emtransfer.logs import configure_logging


async def main(transport: str, seconds: float) -> None:
    s = et.Settings(transport=transport, hidden_size=4096, dtype="bfloat16")
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        await lang.connect(enc.address)
        await asyncio.sleep(1.0)  # let start-up work finish before measuring
        t0, c0 = time.monotonic(), os.times()
        await asyncio.sleep(seconds)  # the idle interval being measured
        t1, c1 = time.monotonic(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    share = 100 * cpu / (t1 - t0)
    print(f"{transport}: two idle connected nodes: {share:.2f}% of a core ({share / 2:.2f}% each)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("transport", choices=["nixl", "tcp", "torch"])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    configure_logging("warning")
    asyncio.run(main(args.transport, args.seconds))
