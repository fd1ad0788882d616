"""Soak: many requests with a realistic mix between an encode and a language process.

    python bench/soak.py nixl|tcp [--requests 10000] [--concurrency 256] [--json out.json]
    python bench/soak.py tcp --requests 3000 --num-blocks 64 --default-blocks 4 --concurrency 8,128


Two processes (an encode node with a deterministic encoder, a language node driving the
requests as ``Encode`` jobs), small pools (256 blocks of 16 tokens), payloads of 64-4,096
tokens (images) and some up to 3x the pool, half of them with a known length. Every payload is
checked byte for byte on arrival. At the end: requests lost (neither a success nor a typed
error), corrupted, failed by error type, both pools' state (free, quarantined), and each
process's RSS and open files at the start and the end; a JSON file with all of it
(``--json``; never overwritten unless ``--force``) and a one-paragraph summary.

``--concurrency 8,128`` runs the same workload at each concurrency in turn (fresh processes
each time) and reports them side by side: the contention check of the admission policy
(throughput at high concurrency at least that at low, p99 within a few times p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, Any] = {
    "hidden_size": 256,
    "dtype": "bfloat16",
    "block_size": 16,
    "num_blocks": 256,
    "default_blocks": 16,
    "fields": {"mrope_positions": {"shape": [3], "dtype": "int64"}},
    "max_inflight_per_peer": 512,
    "max_waiting_inits_per_peer": 512,
    "heartbeat_interval": 1.0,
    "heartbeat_timeout": 10.0,
    "chunk_timeout": 60.0,
    "alloc_timeout": 120.0,
    "resume_timeout": 120.0,
    "init_timeout": 120.0,
    "data_timeout": 120.0,
}


def payload(seed: int, n: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, SETTINGS["hidden_size"], generator=g).to(torch.bfloat16)
    pos = torch.randint(0, 1 << 40, (n, 3), generator=g, dtype=torch.int64)
    return {"embeddings": emb, "mrope_positions": pos}


def encoder(job: dict[str, Any]) -> dict[str, Any]:
    return payload(job["seed"], job["n"])


def workload(requests: int, seed: int, pool_tokens: int) -> list[tuple[str, int, int, int | None]]:
    """(rid, tokens, seed, expected_tokens or None) for each request."""
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        if rng.random() < 0.1:  # a large payload, up to 3x the pool
            n = rng.randint(pool_tokens // 2, 3 * pool_tokens)
        else:  # an image: 64-4,096 tokens, most of them small
            n = int(64 * 2 ** rng.uniform(0, 6))
        out.append((f"soak-{i}", n, rng.randrange(1 << 30), n if rng.random() < 0.5 else None))
    return out


def process_stats() -> dict[str, float]:
    rss = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"rss_mib": round(rss, 1), "open_files": len(os.listdir("/proc/self/fd"))}


def _pool(node: Any) -> dict[str, Any]:
    h = node.health()
    return {
        **h["pool"],
        "quarantined_requests": h["quarantined_requests"],
        "leaks": node.leak_report(),
    }


async def _settled(node: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while node.allocator.num_free < node.allocator.num_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the last frees run as the final tasks end


def _child_setup() -> None:
    import torch

    from emtransfer.logs import configure_logging

    torch.set_num_threads(1)
    configure_logging("warning")


def encode_side(transport: str, settings: dict[str, Any], conn: Any) -> None:
    import emtransfer as et

    _child_setup()

    async def main() -> None:
        s = et.Settings(transport=transport, **settings)
        async with et.EncodeNode(s, control="tcp", encoder=encoder) as enc:
            start = process_stats()
            conn.send(enc.address)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "done"
            await _settled(enc)
            conn.send({"start": start, "end": process_stats(), "pool": _pool(enc)})

    asyncio.run(main())


def language_side(
    transport: str, settings: dict[str, Any], address: str, args: dict[str, Any], conn: Any
) -> None:
    import torch

    import emtransfer as et

    _child_setup()

    async def main() -> dict[str, Any]:
        s = et.Settings(transport=transport, **settings)
        work = workload(args["requests"], args["seed"], s.num_blocks * s.block_size)
        async with et.LanguageNode(s) as lang:
            start = process_stats()
            peer = await lang.connect(address)
            gate = asyncio.Semaphore(args["concurrency"])
            outcome: dict[str, int] = {"ok": 0, "corrupted": 0}
            latencies: list[float] = []
            rounds: list[int] = []

            async def one(rid: str, n: int, seed: int, expected: int | None) -> None:
                async with gate:
                    t0 = time.perf_counter()
                    try:
                        got = await lang.encode(rid, peer, {"n": n, "seed": seed}, expected)
                    except et.TransferError as exc:
                        kind = type(exc).__name__
                        outcome[kind] = outcome.get(kind, 0) + 1
                        return
                    latencies.append(time.perf_counter() - t0)
                    want = payload(seed, n)
                    same = got.num_tokens == n and all(
                        torch.equal(got.tensors[k], v) for k, v in want.items()
                    )
                    outcome["ok" if same else "corrupted"] += 1
                    rounds.append(got.rounds)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(*w) for w in work))
            elapsed = time.perf_counter() - t0
            await _settled(lang)
            latencies.sort()

            def pct(q: float) -> float:
                return round(1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

            return {
                "requests": len(work),
                "outcome": outcome,
                "lost": len(work) - sum(outcome.values()),
                "elapsed_s": round(elapsed, 2),
                "rate_per_s": round(len(work) / elapsed, 1),
                "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}
                if latencies
                else {},
                "rounds_mean": round(sum(rounds) / max(1, len(rounds)), 2),
                "tokens": sum(n for _, n, _, _ in work),
                "known_length": sum(1 for *_, e in work if e is not None),
                "start": start,
                "end": process_stats(),
                "pool": _pool(lang),
            }

    conn.send(asyncio.run(main()))


def soak(
    transport: str,
    requests: int,
    concurrency: int,
    seed: int = 20261201,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    settings = SETTINGS if settings is None else settings
    ctx = mp.get_context("spawn")
    enc_conn, enc_child = ctx.Pipe()
    enc = ctx.Process(target=encode_side, args=(transport, settings, enc_child), daemon=True)
    enc.start()
    address = enc_conn.recv()
    lang_conn, lang_child = ctx.Pipe()
    args = {"requests": requests, "concurrency": concurrency, "seed": seed}
    lang = ctx.Process(
        target=language_side, args=(transport, settings, address, args, lang_child), daemon=True
    )
    lang.start()
    language = lang_conn.recv()
    enc_conn.send("done")
    encode = enc_conn.recv()
    for p in (lang, enc):
        p.join(30)
    return {
        "transport": transport,
        "concurrency": concurrency,
        "settings": settings,
        "date": time.strftime("%Y-%m-%d"),
        "language": language,
        "encode": encode,
    }


def summary(r: dict[str, Any]) -> str:
    lang, enc = r["language"], r["encode"]
    lp, ep = lang["pool"], enc["pool"]
    return (
        f"{r['transport']}: {lang['requests']} requests at concurrency {r['concurrency']} in "
        f"{lang['elapsed_s']} s ({lang['rate_per_s']} req/s; p50 {lang['latency_ms'].get('p50')} "
        f"ms, p99 {lang['latency_ms'].get('p99')} ms; {lang['rounds_mean']} rounds each on "
        f"average); outcome {lang['outcome']}, lost {lang['lost']}; pools free "
        f"{lp['blocks_free']}/{lp['blocks_total']} (language) and {ep['blocks_free']}/"
        f"{ep['blocks_total']} (encode), quarantined {lp['blocks_quarantined']} and "
        f"{ep['blocks_quarantined']}; RSS MiB language {lang['start']['rss_mib']} -> "
        f"{lang['end']['rss_mib']}, encode {enc['start']['rss_mib']} -> {enc['end']['rss_mib']}; "
        f"open files language {lang['start']['open_files']} -> {lang['end']['open_files']}, "
        f"encode {enc['start']['open_files']} -> {enc['end']['open_files']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("transport", choices=["nixl", "tcp"])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument(
        "--concurrency", default="256", help="one value, or several (8,128): one run each"
    )
    ap.add_argument("--num-blocks", type=int, default=SETTINGS["num_blocks"])
    ap.add_argument("--default-blocks", type=int, default=SETTINGS["default_blocks"])
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = ap.parse_args()
    if args.json is not None and args.json.exists() and not args.force:
        print(f"{args.json} exists: not overwritten (use --force)", file=sys.stderr)
        return 2
    from emtransfer.logs import configure_logging

    configure_logging("warning")
    settings = {
        **SETTINGS, "num_blocks": args.num_blocks, "default_blocks": args.default_blocks
    }  # fmt: skip
    runs = []
    for c in (int(x) for x in str(args.concurrency).split(",")):
        runs.append(soak(args.transport, args.requests, c, settings=settings))
        print(summary(runs[-1]), flush=True)
    if len(runs) > 1:
        print(contention(runs))
    if args.json is not None:
        out = runs[0] if len(runs) == 1 else {"runs": runs, "contention": contention(runs)}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    clean = all(
        r["language"]["lost"] == 0
        and r["language"]["outcome"].get("corrupted", 0) == 0
        and all(
            r[s]["pool"]["blocks_free"] == r[s]["pool"]["blocks_total"]
            for s in ("language", "encode")
        )
        for r in runs
    )
    return 0 if clean else 1


def contention(runs: list[dict[str, Any]]) -> str:
    """The runs side by side: rate, p50, p99, p99/p50 and rounds per concurrency."""
    rows = [
        "| concurrency | req/s | p50 ms | p99 ms | p99/p50 | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lang = r["language"]
        lat = lang["latency_ms"]
        ratio = lat["p99"] / lat["p50"] if lat.get("p50") else float("nan")
        rows.append(
            f"| {r['concurrency']} | {lang['rate_per_s']} | {lat.get('p50')} | {lat.get('p99')} "
            f"| {ratio:.1f} | {lang['rounds_mean']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
