"""Reproduction, not a test (pytest does not collect it): a Mooncake write whose target stops
*while the write is under way* does not end within ``write_timeout``; it ends only once the
target runs again (docs/transports-mooncake.md, "post bound").

    python tests/repro_mooncake_stall.py [ITERATIONS]

Each iteration: two processes (tests/transport_harness.py), one 1.5 MiB write that completes,
then a second write with the target stopped 0-4 ms after it was posted (SIGSTOP, confirmed by
``waitpid``); the target is woken after 8 s. Prints, per iteration, the stop's delay, how the
write ended and how long it took. Measured 2026-12-01 on the 2-core CPU machine, 25
iterations: 20 completed before the stop took effect, 2 failed within 1.0 s (the engine's
progress timeout), 3 waited until the target was woken and then completed (8.0 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("EMTRANSFER_WRITE_TIMEOUT", "1.5")

from transport_harness import BLOCK_SIZE, block_ops, link, recv, run_pair, serve_until_sender_done

STOPPED_FOR = 8.0


async def scenario(role: str, transport: Any, registry: Any, conn: Any) -> None:
    from emtransfer.transport.base import TransportError

    await link(transport, conn)
    if role == "receiver":
        await serve_until_sender_done(transport, conn)
        return
    ops = block_ops(registry, list(range(24)), list(range(24, 48)), 24 * BLOCK_SIZE)
    await transport.write("peer", ops, tag="alive")
    delay = random.uniform(0, 0.004)
    t0 = time.monotonic()
    write = asyncio.create_task(transport.write("peer", ops, tag="stopped"))
    await asyncio.sleep(delay)  # where in the write the target stops: random, on purpose
    conn.send(("sigstop",))
    await recv(conn)
    await asyncio.wait([write], timeout=STOPPED_FOR)
    conn.send(("sigcont",))
    await recv(conn)
    try:
        await asyncio.wait_for(write, 20)
        outcome = "completed"
    except (TransportError, TimeoutError) as exc:
        outcome = f"failed: {type(exc).__name__}"
    took = time.monotonic() - t0
    conn.send(("done",))
    await transport.close()
    conn.send(("ok", (delay * 1000, outcome, took)))


def main() -> None:
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 25):
        delay_ms, outcome, took = run_pair("mooncake", scenario, timeout=60)[0]
        late = "  <- beyond write_timeout" if took > 2.0 else ""
        print(
            f"{i:3d} stopped {delay_ms:4.2f} ms in: {outcome:24s} {took:5.2f} s{late}", flush=True
        )


if __name__ == "__main__":
    main()
