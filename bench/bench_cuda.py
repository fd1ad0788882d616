"""CUDA path check: VRAM pools on one GPU, an encode process and a language process, NIXL
between them, against a device-to-device copy in one process.

    python bench/bench_cuda.py [--sizes-mib 16,64,256] [--reps 10] [--json PATH]

Needs a CUDA GPU and nixl with its CUDA plugin. Reports, per payload size: the
device-to-device copy (torch ``copy_``, bytes copied / time), emtransfer send/receive end to
end (CUDA tensor in, CUDA tensor out, verified), and emtransfer's transfer phase alone (first
write posted to last chunk seen), all as GB/s of payload bytes, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HIDDEN = 4096
DEVICE = os.environ.get("BENCH_DEVICE", "cuda:0")  # cpu: a dry run of this script off-GPU


def settings(num_tokens: int, transport: str) -> Any:
    import emtransfer as et

    blocks = -(-num_tokens // 128)
    return et.Settings(
        hidden_size=HIDDEN,
        dtype="bfloat16",
        device=DEVICE,
        transport=transport,
        block_size=128,
        num_blocks=blocks,
        default_blocks=min(8, blocks),
    )


def payload(n: int, seed: int) -> torch.Tensor:
    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(n, HIDDEN, device=dev, generator=g).to(torch.bfloat16)


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def d2d(nbytes: int, reps: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 2):
        sync()
        t = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[2:]) / 1e9


def encode_main(n: int, reps: int, transport: str, conn: Any) -> None:
    import emtransfer as et
    from emtransfer.logs import configure_logging

    configure_logging("warning")  # a spawned process starts with logging unconfigured

    async def main() -> None:
        async with et.EncodeNode(settings(n, transport), control="tcp") as enc:
            conn.send(enc.address)
            for i in range(reps + 2):
                st = await enc.send(f"r{i}", {"embeddings": payload(n, i)})
                conn.send(st.first_write_at)

    asyncio.run(main())


async def language(
    n: int, reps: int, transport: str, address: str, conn: Any, resume: bool = False
) -> dict[str, Any]:
    import emtransfer as et

    e2e, phase, ok = [], [], True
    async with et.LanguageNode(settings(n, transport)) as lang:
        peer = await lang.connect(address)
        for i in range(reps + 2):
            t = time.perf_counter()
            got = await lang.receive(f"r{i}", peer, expected_tokens=None if resume else n)
            sync()
            dt = time.perf_counter() - t
            first = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            if i >= 2:
                e2e.append(dt)
                phase.append(got.stats["last_chunk_at"] - first)
            if i < 3:
                ok = ok and torch.equal(got.tensors["embeddings"], payload(n, i))
    return {"e2e": e2e, "phase": phase, "verified": ok, "rounds": got.rounds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="16,64,256")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--transport", default="nixl")
    ap.add_argument("--json")
    ap.add_argument(
        "--resume", action="store_true", help="unknown length: resume from the default allocation"
    )
    args = ap.parse_args()
    from emtransfer.logs import configure_logging

    configure_logging("warning")
    name = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows = []
    for mib in (int(x) for x in args.sizes_mib.split(",")):
        nbytes = mib << 20
        n = nbytes // (HIDDEN * 2)
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        p = ctx.Process(target=encode_main, args=(n, args.reps, args.transport, child))
        p.start()
        address = conn.recv()
        res = asyncio.run(language(n, args.reps, args.transport, address, conn, args.resume))
        p.join(60)
        row = {
            "MiB": mib,
            "d2d_GBps": d2d(nbytes, args.reps),
            "e2e_GBps": nbytes / statistics.median(res["e2e"]) / 1e9,
            "phase_GBps": nbytes / statistics.median(res["phase"]) / 1e9,
            "e2e_p50_ms": statistics.median(res["e2e"]) * 1e3,
            "verified": res["verified"],
            "rounds": res["rounds"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'MiB':>6} {'d2d GB/s':>10} {'e2e GB/s':>10} {'phase GB/s':>11} {'p50 ms':>8} ok")
    for r in rows:
        print(
            f"{r['MiB']:>6} {r['d2d_GBps']:>10.1f} {r['e2e_GBps']:>10.1f} "
            f"{r['phase_GBps']:>11.1f} {r['e2e_p50_ms']:>8.2f} {r['verified']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
