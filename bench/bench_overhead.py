"""The runtime's own cost per request, as CPU time: a steadier measure than wall time on a
small shared machine, for comparing two versions of the code.

    python bench/bench_overhead.py [--transport tcp|nixl|local] [--requests 3000]
                                   [--concurrency 1,32] [--repeats 7] [--tokens 256]
                                   [--gc default|freeze] [--count-calls] [--json PATH]

An encode node and a language node run in this one process and loop, connected over a real
control connection (TCP on 127.0.0.1) and the chosen data transport. Each measurement sends
``--requests`` payloads of ``--tokens`` x 1024 bfloat16 (0.5 MiB at 256) at the given
concurrency, the sends issued ahead of the receives (as the transfer benchmark does), and
reports the process's CPU time (user + system, both nodes, the kernel's loopback work
included) per request, and the wall time per request. One process on one loop has nothing to
wait for but itself, so CPU and wall agree closely, and the spread between repeats is a few
microseconds where two processes on two cores spread by tens of percent.

The baseline is the same process moving the same bytes by hand: a copy into a staging
buffer, one ``sock_sendall`` of header and payload over a socket pair, the receive into the
destination and a copy out, with one small request message per transfer (the work of the
transfer benchmark's line (b) on tcp). The difference is the runtime's fixed cost per request.

Each concurrency also reports the garbage collector's passes during the emtransfer runs (how
many per generation, their total and the longest) and that time per request; ``--count-calls``
runs one more measurement under cProfile for the Python calls per request, a figure that does
not depend on the machine's load.

``--gc freeze`` calls ``gc.freeze()`` once both nodes run, as serving engines do after start-up
(vLLM's engine core, and ``python -m emtransfer serve``): the collector then skips the objects
that exist from start-up on, and what is left is the runtime's own garbage.

Medians over ``--repeats`` with the range; nothing is asserted. ``--json`` writes the figures
(a new file only: an existing one is kept unless ``--force``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import emtransfer as et

HIDDEN = 1024
HEADER = struct.Struct("<QQ")


def settings(transport: str) -> et.Settings:
    return et.Settings(
        hidden_size=HIDDEN,
        dtype="bfloat16",
        block_size=128,
        default_blocks=8,
        num_blocks=64,
        transport=transport,
    )


def cpu() -> float:
    return time.process_time()  # every thread of the process, nanosecond resolution


async def emtransfer_run(
    enc: et.EncodeNode,
    lang: et.LanguageNode,
    peer: Any,
    n: int,
    conc: int,
    data: Any,
    profiler: cProfile.Profile | None = None,
) -> tuple[float, float]:
    tag = f"m{time.monotonic_ns()}"
    sends = [asyncio.ensure_future(enc.send(f"{tag}-{i}", data)) for i in range(n)]
    await asyncio.sleep(0)  # the sends' first steps: their offers exist before the Inits
    tokens = data["embeddings"].shape[0]

    async def worker(w: int) -> None:
        for i in range(w, n, conc):
            got = await lang.receive(f"{tag}-{i}", peer, expected_tokens=tokens)
            del got

    c0, t0 = cpu(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await asyncio.gather(*(worker(w) for w in range(conc)))
    await asyncio.gather(*sends)
    if profiler is not None:
        profiler.disable()
    return cpu() - c0, time.perf_counter() - t0


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``; ConnectionError if the other end closes first."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError("the by-hand peer closed the connection")
        buf += chunk
    return bytes(buf)


class ByHand:
    """One socket pair; a request message per transfer, then header + payload back."""

    def __init__(self, tokens: int) -> None:
        self.a, self.b = socket.socketpair()
        for s in (self.a, self.b):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.nbytes = tokens * HIDDEN * 2
        self.src_pool = torch.empty(self.nbytes, dtype=torch.uint8)
        self.dst_pool = torch.empty(self.nbytes, dtype=torch.uint8)
        self.view = self.dst_pool.numpy().data

    async def serve(self, data: torch.Tensor, n: int) -> None:
        loop = asyncio.get_running_loop()
        flat = data.view(torch.uint8).reshape(-1)
        try:
            for _ in range(n):
                (i, _) = HEADER.unpack(await recv_exactly(self.b, HEADER.size))
                self.src_pool.copy_(flat)  # the payload into the sender's pool
                await loop.sock_sendall(self.b, HEADER.pack(i, self.nbytes))
                await loop.sock_sendall(self.b, self.src_pool.numpy().data)
        except BaseException:
            self.b.close()  # the receiving side sees the end instead of waiting for ever
            raise

    async def run(self, data: torch.Tensor, n: int) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        server = asyncio.ensure_future(self.serve(data, n))
        c0, t0 = cpu(), time.perf_counter()
        try:
            for i in range(n):
                await loop.sock_sendall(self.a, HEADER.pack(i, 0))
                (_, size) = HEADER.unpack(await recv_exactly(self.a, HEADER.size))
                got = 0
                while got < size:
                    took = await loop.sock_recv_into(self.a, self.view[got:size])
                    if not took:
                        raise ConnectionError("the by-hand sender closed the connection")
                    got += took
                out = torch.empty_like(self.dst_pool)
                out.copy_(self.dst_pool)  # the payload out of the receiver's pool
        except ConnectionError:
            await server  # the sender failed: raise its error rather than ours
            raise
        await server
        return cpu() - c0, time.perf_counter() - t0


class GcPauses:
    """The collector's passes while on: how many, their total and longest time, by generation."""

    def __init__(self) -> None:
        self.on = False
        self._t0 = 0.0
        self.passes = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        took = time.perf_counter() - self._t0
        entry = self.passes[info["generation"]]
        entry[0] += 1
        entry[1] += took
        entry[2] = max(entry[2], took)

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def report(self, requests: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            f"gen{g}": {"passes": n, "total_ms": 1e3 * t, "longest_ms": 1e3 * m}
            for g, (n, t, m) in self.passes.items()
        }
        out["us_per_request"] = 1e6 * sum(t for _, t, _ in self.passes.values()) / requests
        return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    s = settings(args.transport)
    data = {"embeddings": torch.randn(args.tokens, HIDDEN).to(torch.bfloat16)}
    out: dict[str, Any] = {"config": vars(args) | {"json": str(args.json)}, "lines": {}}
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        await emtransfer_run(enc, lang, peer, 50, 4, data)  # warm up both sides
        hand = ByHand(args.tokens)
        await hand.run(data["embeddings"], 50)
        if args.gc == "freeze":
            gc.freeze()
        lines: dict[str, Any] = {}
        for conc in args.concurrency:
            pauses = GcPauses()  # the emtransfer runs' collections, for this concurrency
            cpu_us: dict[str, list[float]] = {"emtransfer": [], "by hand": []}
            wall_us: dict[str, list[float]] = {"emtransfer": [], "by hand": []}
            for r in range(args.repeats):
                order = ("emtransfer", "by hand") if r % 2 == 0 else ("by hand", "emtransfer")
                for line in order:
                    if line == "by hand" and conc != 1:
                        continue  # the socket pair serves one request at a time
                    if line == "emtransfer":
                        pauses.on = True
                        c, w = await emtransfer_run(enc, lang, peer, args.requests, conc, data)
                        pauses.on = False
                    else:
                        c, w = await hand.run(data["embeddings"], args.requests)
                    cpu_us[line].append(1e6 * c / args.requests)
                    wall_us[line].append(1e6 * w / args.requests)
            lines[str(conc)] = {
                k: {"cpu_us": summary(cpu_us[k]), "wall_us": summary(wall_us[k])}
                for k in cpu_us
                if cpu_us[k]
            }
            pauses.close()
            lines[str(conc)]["emtransfer"]["gc"] = pauses.report(args.requests * args.repeats)
            if args.count_calls:  # deterministic, unlike time: Python calls per request
                prof = cProfile.Profile()
                await emtransfer_run(enc, lang, peer, args.requests, conc, data, prof)
                stats = pstats.Stats(prof)
                calls = stats.total_calls  # type: ignore[attr-defined]
                lines[str(conc)]["emtransfer"]["python_calls"] = calls / args.requests
        out["lines"] = lines
    return out


def report(res: dict[str, Any]) -> None:
    cfg = res["config"]
    print(
        f"runtime overhead: transport={cfg['transport']} tokens={cfg['tokens']} "
        f"({cfg['tokens'] * HIDDEN * 2 / 2**20:.1f} MiB), {cfg['requests']} requests x "
        f"{cfg['repeats']} repeats, gc={cfg['gc']}; one process, both nodes"
    )
    print(
        f"{'conc':>5} {'line':>11}  {'CPU us/request (range)':>26}  {'wall us/request (range)':>26}"
    )
    for conc, lines in res["lines"].items():
        for line, f in lines.items():
            c, w = f["cpu_us"], f["wall_us"]
            print(
                f"{conc:>5} {line:>11}  {c['median']:9.1f} ({c['min']:7.1f}-{c['max']:7.1f})  "
                f"{w['median']:9.1f} ({w['min']:7.1f}-{w['max']:7.1f})"
            )
        g = lines["emtransfer"]["gc"]
        print(
            f"{conc:>5} {'emtransfer':>11}  {g['us_per_request']:9.1f} us per request in the "
            f"collector; full passes {g['gen2']['passes']}, longest {g['gen2']['longest_ms']:.1f} ms"
        )
        if "python_calls" in lines["emtransfer"]:
            calls = lines["emtransfer"]["python_calls"]
            print(f"{conc:>5} {'emtransfer':>11}  {calls:9.1f} Python calls per request (cProfile)")
        if "by hand" in lines:
            d = lines["emtransfer"]["cpu_us"]["median"] - lines["by hand"]["cpu_us"]["median"]
            print(f"{conc:>5} {'difference':>11}  {d:9.1f} us of CPU per request")


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="tcp", choices=("tcp", "nixl", "local"))
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gc", default="default", choices=("default", "freeze"))
    ap.add_argument(
        "--count-calls",
        action="store_true",
        help="one more measurement per concurrency under cProfile: Python calls per request",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.json is not None and args.json.exists() and not args.force:
        sys.exit(f"{args.json} exists; pass --force to overwrite it")
    try:
        import uvloop

        res = uvloop.run(main(args))
    except ImportError:
        res = asyncio.run(main(args))
    report(res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
        print(f"json: {args.json}")


if __name__ == "__main__":
    cli()
