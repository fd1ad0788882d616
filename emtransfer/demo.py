"""``python -m emtransfer demo``: both roles as two processes on the best transport available,
a mixed workload (known lengths, resumes, payloads larger than the pool), every payload
verified byte for byte, a progress bar and a summary table. Exits non-zero on any mismatch,
failure or leaked block."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from .settings import Settings


@dataclass(frozen=True)
class Job:
    rid: str
    num_tokens: int
    expected: int | None


def synthetic_payload(settings: Settings, rid: str, num_tokens: int) -> dict[str, torch.Tensor]:
    """Deterministic from (rid, num_tokens): both sides can build it, so the receiver verifies
    every byte without the payload travelling twice."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(f"{rid}/{num_tokens}".encode()))
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in settings.field_specs().items():
        if dtype.is_floating_point:
            out[name] = torch.randn((num_tokens, *shape), generator=g).to(dtype)
        else:
            out[name] = torch.randint(0, 1 << 30, (num_tokens, *shape), generator=g).to(dtype)
    return out


def workload(settings: Settings, count: int, seed: int = 0) -> list[Job]:
    """Edge lengths around the block size and the default allocation, the original 2000-token
    case, a payload larger than the pool, and random lengths; some with a known length."""
    b, d, pool = settings.block_size, settings.default_tokens, settings.capacity_tokens
    fixed = [1, b - 1, b, b + 1, d, d + 1, 2000, pool + 3, 2 * pool + 1]
    rng = random.Random(seed)
    lengths = fixed + [rng.randint(1, 3 * d) for _ in range(max(0, count - len(fixed)))]
    return [Job(f"demo-{i}", n, n if i % 3 == 0 else None) for i, n in enumerate(lengths[:count])]


# -- encode process ----------------------------------------------------------------------------
def _encode_main(settings: Settings, jobs: list[Job], conn: Any, log_level: str) -> None:
    from .logs import configure_logging
    from .runtime import EncodeNode

    configure_logging(log_level)  # a spawned process starts with logging unconfigured
    torch.set_num_threads(1)

    async def main() -> None:
        # every payload is built before the clock starts: the demo times transfers, not this
        payloads = [synthetic_payload(settings, j.rid, j.num_tokens) for j in jobs]
        async with EncodeNode(settings) as enc:
            conn.send(("ready", enc.address, enc.transport.name))
            results = await asyncio.gather(
                *(
                    enc.send(j.rid, payload, meta={"num_tokens": j.num_tokens})
                    for j, payload in zip(jobs, payloads, strict=True)
                ),
                return_exceptions=True,
            )
            del payloads
            failed = [
                f"{j.rid}: {r!r}"
                for j, r in zip(jobs, results, strict=True)
                if isinstance(r, BaseException)
            ]
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # language done
        conn.send(
            ("done", failed, enc.leak_report(), enc.allocator.num_blocks - enc.allocator.low_water)
        )

    try:
        _install_uvloop()
        asyncio.run(main())
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def _union(spans: list[tuple[float, float, int]]) -> float:
    """Seconds during which at least one transfer was moving data."""
    total, end = 0.0, float("-inf")
    for s, e, _ in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def memcpy_rate(nbytes: int = 64 << 20, repeat: int = 5) -> float:
    """GB/s of one copy of ``nbytes`` between two buffers of this process (median): on one host
    the engines copy memory too (UCX cma, loopback TCP), so no transfer beats this."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault both buffers in first
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass


# -- language process (this one) ---------------------------------------------------------------
async def _language(
    settings: Settings, jobs: list[Job], address: str, concurrency: int
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from .runtime import LanguageNode

    lat: list[float] = []
    spans: list[tuple[float, float, int]] = []  # (start, end, bytes) of each data-plane transfer
    waits: list[tuple[float, float]] = []  # (waiting for blocks, whole request) seconds
    rounds: list[int] = []
    problems: list[str] = []
    arrived: list[tuple[Job, Any]] = []  # verified once the clock stopped
    nbytes = 0
    sem = asyncio.Semaphore(concurrency)
    async with LanguageNode(settings) as lang:
        peer = await lang.connect(address)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as progress:
            bar = progress.add_task("transfers", total=len(jobs))

            async def one(job: Job) -> None:
                nonlocal nbytes
                async with sem:
                    t0 = time.perf_counter()
                    try:
                        got = await lang.receive(job.rid, peer, expected_tokens=job.expected)
                    except Exception as exc:
                        problems.append(f"{job.rid}: {exc!r}")
                        return
                    finally:
                        progress.advance(bar)
                    lat.append(time.perf_counter() - t0)
                arrived.append((job, got))
                rounds.append(got.rounds)
                nbytes += int(got.stats["bytes"])
                end, took = got.stats["last_chunk_at"], got.stats["transfer_s"]
                spans.append((end - took, end, int(got.stats["bytes"])))
                waits.append((got.stats["alloc_wait_s"], got.stats["elapsed_s"]))

            t0 = time.perf_counter()
            await asyncio.gather(*(one(j) for j in jobs))
            wall = time.perf_counter() - t0
        for job, got in arrived:  # every payload, bit for bit
            want = synthetic_payload(settings, job.rid, job.num_tokens)
            same = got.num_tokens == job.num_tokens and all(
                torch.equal(got.tensors[k], v) for k, v in want.items()
            )
            if not same or got.meta.get("num_tokens") != job.num_tokens:
                problems.append(f"{job.rid}: payload mismatch")
        arrived.clear()  # the copies go now, not with the results
        high_water = lang.allocator.num_blocks - lang.allocator.low_water
    return {
        "transport": lang.transport.name,
        "wall": wall,
        "lat": lat,
        "spans": spans,
        "waits": waits,
        "rounds": rounds,
        "bytes": nbytes,
        "problems": problems,
        "leaks": lang.leak_report(),
        "high_water": high_water,
    }


def run_demo(
    settings: Settings,
    *,
    requests: int = 64,
    concurrency: int = 16,
    seed: int = 0,
    log_level: str = "warning",
) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    jobs = workload(settings, requests, seed)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_encode_main, args=(settings, jobs, child, log_level), daemon=True)
    proc.start()
    try:
        if not conn.poll(120):
            raise RuntimeError("the encode process did not start within 120 s")
        kind, *info = conn.recv()
        if kind != "ready":
            raise RuntimeError(f"the encode process failed:\n{info[0]}")
        address, transport = info
        console.print(
            f"encode node at [bold]{address}[/] over [bold]{transport}[/]; "
            f"{len(jobs)} requests, {concurrency} at a time"
        )
        _install_uvloop()
        res = asyncio.run(_language(settings, jobs, address, concurrency))
        conn.send("language done")
        if not conn.poll(60):
            raise RuntimeError("the encode process did not finish")
        kind, *info = conn.recv()
        if kind != "done":
            raise RuntimeError(f"the encode process failed:\n{info[0]}")
        enc_failed, enc_leaks, enc_high = info
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()

    lat = sorted(res["lat"]) or [0.0]
    moving = _union(res["spans"])
    rate = res["bytes"] / moving / 1e9 if moving > 0 else 0.0
    each = [b / (e - s) / 1e9 for s, e, b in res["spans"] if e > s]
    ceiling = memcpy_rate()
    waited = sum(w for w, _ in res["waits"]) / max(sum(t for _, t in res["waits"]), 1e-9)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    table = Table(title=f"emtransfer demo ({res['transport']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests ok", f"{len(res['rounds'])} / {len(jobs)}"),
        ("tokens", f"{sum(j.num_tokens for j in jobs):,}"),
        ("bytes", f"{res['bytes'] / 2**20:,.1f} MiB"),
        ("transfer rate (while data moved)", f"{rate:.2f} GB/s"),
        ("transfer rate per request (median)", f"{statistics.median(each or [0.0]):.2f} GB/s"),
        ("memory copy on this host (upper bound)", f"{ceiling:.2f} GB/s"),
        ("request time spent waiting for pool blocks", f"{waited:.0%}"),
        ("requests' wall time", f"{res['wall']:.2f} s"),
        ("latency p50 / p99", f"{statistics.median(lat) * 1e3:.1f} / {p99 * 1e3:.1f} ms"),
        ("rounds (total, max)", f"{sum(res['rounds'])}, {max(res['rounds'], default=0)}"),
        ("requests that resumed", str(sum(r > 1 for r in res["rounds"]))),
        (
            "pool high-water (language / encode)",
            f"{res['high_water']} / {enc_high} of {settings.num_blocks} blocks",
        ),
        (
            "leaked blocks (language / encode)",
            f"{sum(map(len, res['leaks'].values()))} / {sum(map(len, enc_leaks.values()))}",
        ),
        ("mismatches / failures", f"{len(res['problems'])} / {len(enc_failed)}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(
        f"transfers moved {res['bytes'] / 2**20:,.1f} MiB at [bold]{rate:.2f} GB/s[/] over "
        f"{res['transport']} ({waited:.0%} of request time waited for pool blocks: the workload "
        f"is larger than the pool on purpose); a plain memory copy here runs at {ceiling:.2f} GB/s"
    )
    bad = res["problems"] + enc_failed
    for p in bad[:10]:
        console.print(f"[red]{p}[/]")
    ok = not bad and not res["leaks"] and not enc_leaks and len(res["rounds"]) == len(jobs)
    console.print("[green]all payloads verified, no leaks[/]" if ok else "[red]FAILED[/]")
    return 0 if ok else 1
