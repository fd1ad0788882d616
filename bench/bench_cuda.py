"""The CUDA path against raw NIXL, in one run: VRAM pools on one GPU, an encode process and a
language process, NIXL between them; ``BENCH_DEVICE=cpu`` runs the same script on DRAM pools (a
dry run off-GPU: the figures are not the GPU path's).

    python bench/bench_cuda.py [--sizes-mib 1,16,64] [--resume-mib 16] [--default-mib 8]
                               [--reps 20] [--warmup 3] [--poll-us 30] [--json PATH] [--force]
                               [--no-probe-write]

Needs a CUDA GPU and nixl with its CUDA support (the nixl wheel for torch's CUDA major); without
them it exits with a one-line reason. The main process is the language side (a
``LanguageNode``), a spawned process the encode side (an ``EncodeNode``). Each has one pool on
``BENCH_DEVICE`` (default ``cuda:0``) of blocks of 128 tokens x 4096 bfloat16 (1 MiB a block),
enough for the largest payload, registered with NIXL by emtransfer's transport (VRAM with the
GPU index as device id; DRAM on cpu). Payloads are [tokens, 4096] bfloat16 tensors on that
device, the same bytes on both sides. Every rep runs each line once, in rotating order:

(a) wire  -- raw NIXL alone: one WRITE, with a notification, of the payload bytes from the encode
             pool into the language pool (the nodes' own agents and registered pools, the
             descriptors VRAM and device id on cuda). a = t1 - t0: t0 just before the engine
             call, on the thread that makes it; t1 the first moment either side knows the bytes
             landed (the sender's DONE, or the language side's poller seeing the notification).
             A ceiling: each rep runs both of bench_transfer.py's raw NIXL methods (posted in an
             executor thread and polled with --poll-us sleeps, "thread-sleep"; posted and polled
             in a tight loop on the loop thread, "loop-spin"); (a) is the best median.
(b) hand  -- the job by hand on raw NIXL, no emtransfer: the language side synchronises the
             device and records T0, sends "go" naming pre-agreed slots; the encode side copies
             the tensor into its pool (a device copy), synchronises, writes with a notification
             (thread-sleep); the language side sees the notification, copies the slots out into
             a fresh tensor (a device copy), synchronises; T1.
(c) emt   -- ``EncodeNode.send`` of the tensor already pending; the language side synchronises,
             T0, ``LanguageNode.receive`` with ``expected_tokens`` (the payload in one
             allocation), synchronises, T1.
(d) xfer  -- emtransfer's transfer phase from the same (c) reps: the receiver's
             ``stats["last_chunk_at"]`` minus the sender's ``SendStats.first_write_at``.
resume    -- one more row: a --resume-mib payload, larger than the default allocation
             (--default-mib), received without ``expected_tokens``: (c) and (d) span the rounds
             and the Resume between them; (a) and (b) move the same bytes in one write.

Per row: GB/s of payload bytes over the median, p50/p99 latency per line, the ratios of medians
(c)/(b) and (d)/(a) (1.0: as fast as the baseline), and at 1 MiB the fixed cost p50(c) - p50(b).
Targets (reported, never asserted): (c)/(b) >= 0.9 and (d)/(a) >= 0.9 at 64 MiB, fixed cost
<= 0.2 ms at 1 MiB; the resume row's ratios are reported. Warm-up reps and one trailing rep of
every line are verified byte for byte, not timed. Times are ``time.time()`` in two processes of
one host. A device copy in one process (torch ``copy_``) is printed for reference, not as a line.
The table goes to stdout; --json writes every figure (an existing file is kept unless --force).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import emtransfer as et
from bench.bench_transfer import Coord, as_bytes, coord_connect, git_describe, make_payload
from bench.bench_transfer import summarize as line_figures
from bench.raw_nixl import NixlInlineSender, NixlRawReceiver, NixlRawSender, RawSender
from emtransfer.logs import configure_logging

MiB = 1 << 20
HIDDEN, BLOCK_TOKENS = 4096, 128  # a block is 128 x 4096 bfloat16 = 1 MiB
TOKEN_BYTES = HIDDEN * 2
LINES = ("a", "b", "c", "d")
LABELS = {
    "a": "(a) raw NIXL write, pool to pool (best method)",
    "b": "(b) the job by hand on raw NIXL (copy in, write, copy out)",
    "c": "(c) emtransfer send/receive",
    "d": "(d) emtransfer transfer phase",
}
RAW_METHODS = ("thread-sleep", "loop-spin")  # the first is (b)'s too
#: (row, what, <= or >=, bound): the performance issue's targets on the GPU run
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("64 MiB", "c/b", ">=", 0.9),
    ("64 MiB", "d/a", ">=", 0.9),
    ("1 MiB", "fixed cost ms", "<=", 0.2),
)
DEVICE_ENV = "BENCH_DEVICE"


def device_from_env() -> torch.device | None:
    """``$BENCH_DEVICE`` (default ``cuda:0``; ``cuda`` is ``cuda:0``); None if not cpu or cuda."""
    text = os.environ.get(DEVICE_ENV, "cuda:0").strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        return None
    return torch.device("cuda", 0) if text == "cuda" else torch.device(text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settings(args: argparse.Namespace) -> et.Settings:
    return et.Settings(
        hidden_size=HIDDEN,
        dtype="bfloat16",
        device=str(args.device),
        transport="nixl",
        block_size=BLOCK_TOKENS,
        num_blocks=args.num_blocks,
        default_blocks=args.default_blocks,
    )


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- before anything starts: a CUDA GPU, nixl, a write of the device's memory ---------------------
def nixl_package() -> tuple[str, str | None]:
    """The nixl package emtransfer loads and its version."""
    from importlib.metadata import PackageNotFoundError, version

    from emtransfer.transport.nixl import nixl_modules

    pkg = nixl_modules()[0].__name__.split(".")[0]
    try:
        return pkg, version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return pkg, None


def probe(
    device: torch.device, write: bool = True, nbytes: int = MiB, timeout: float = 20.0
) -> None:
    """Two NIXL agents in this process with the UCX backend, a buffer on ``device`` each,
    registered as the transport registers its pools (VRAM and the GPU index on cuda, DRAM on
    cpu); unless ``write`` is false, one WRITE with a notification from one to the other,
    checked byte for byte. Raises, saying which step failed."""
    from emtransfer.transport.nixl import new_agent, parse_backend_params

    cuda = device.type == "cuda"
    mem, dev = ("VRAM", device.index or 0) if cuda else ("DRAM", 0)
    # the buffers (and CUDA) first, the agents after, as a node does it
    src = torch.arange(nbytes, device=device, dtype=torch.int32).remainder(251).to(torch.uint8)
    dst = torch.zeros(nbytes, device=device, dtype=torch.uint8)
    sync(device)
    params, tag = parse_backend_params(), uuid.uuid4().hex[:8]
    a = new_agent(f"bench-cuda-probe-a-{tag}", params, delay_us=1000, thread=False)
    b = new_agent(f"bench-cuda-probe-b-{tag}", params, delay_us=1000, thread=False)
    if f"{mem}_SEG" not in a.get_backend_mem_types("UCX"):
        raise RuntimeError(f"the UCX backend supports {a.get_backend_mem_types('UCX')}, not {mem}")
    rows_src = np.array([[src.data_ptr(), nbytes, dev]], dtype=np.uint64)
    rows_dst = np.array([[dst.data_ptr(), nbytes, dev]], dtype=np.uint64)
    try:
        reg_a, reg_b = a.register_memory(rows_src, mem), b.register_memory(rows_dst, mem)
    except Exception as exc:
        raise RuntimeError(f"cannot register {mem} memory: {exc!r}") from exc
    if not write:
        a.deregister_memory(reg_a)
        b.deregister_memory(reg_b)
        return
    name = a.add_remote_agent(b.get_agent_metadata())
    name = name.decode() if isinstance(name, bytes) else name
    a.make_connection(name)
    handle = a.initialize_xfer(
        "WRITE", a.get_xfer_descs(rows_src, mem), a.get_xfer_descs(rows_dst, mem), name, b"probe"
    )
    try:
        deadline, state, notified = time.monotonic() + timeout, a.transfer(handle), False
        while state == "PROC" or not notified:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no completion in {timeout:g} s (state {state})")
            if state == "PROC":
                state = a.check_xfer_state(handle)
            if state not in ("PROC", "DONE"):
                raise RuntimeError(f"a {mem} write in one process ended in state {state}")
            notified = notified or any(b"probe" in m for m in b.get_new_notifs().values())
            time.sleep(1e-4)
    finally:
        handle.release()
    sync(device)
    if not torch.equal(src, dst):
        raise RuntimeError(f"a {mem} write in one process completed but the bytes differ")
    with contextlib.suppress(Exception):
        a.remove_remote_agent(name)
        a.deregister_memory(reg_a)
        b.deregister_memory(reg_b)


def preflight(device: torch.device, write: bool = True) -> str | None:
    """Why this run cannot go ahead, in one line; None when it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) "
                f"sees none ({DEVICE_ENV}=cpu runs a dry run on DRAM pools)"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            return f"no {device}: {torch.cuda.device_count()} CUDA device(s) visible"
        try:  # CUDA initialised before any NIXL agent exists, as a node does it
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)
        except Exception as exc:
            return one_line(f"CUDA cannot start on {device}: {exc}")
    from emtransfer.transport.nixl import NixlTransport

    if why := NixlTransport.unavailable():
        return one_line(why)
    try:
        probe(device, write)
    except Exception as exc:
        mem = "VRAM" if device.type == "cuda" else "DRAM"
        hint = ""
        if device.type == "cuda":
            pkg, ver = nixl_package()
            hint = (
                f" (installed: {pkg} {ver}, torch CUDA {torch.version.cuda}: nixl needs its "
                "CUDA support, the wheel for torch's CUDA major, nixl-cu13 or nixl-cu12)"
            )
        return one_line(f"nixl cannot move {mem} on {device}: {exc}{hint}")
    return None


# -- the encode process -------------------------------------------------------------------------
class EncodeSide:
    """Serves the language side's requests on the coordination channel."""

    def __init__(self, args: argparse.Namespace, node: Any) -> None:
        self.args, self.node = args, node
        self.device: torch.device = args.device
        self.senders: dict[str, RawSender] = {}
        self.payloads: dict[int, torch.Tensor] = {}
        self.sends: dict[str, asyncio.Task[Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.coord: Coord | None = None
        self.done = asyncio.get_running_loop().create_future()

    def handle(self, msg: dict[str, Any]) -> None:
        task = asyncio.create_task(self._serve(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, msg: dict[str, Any]) -> None:
        assert self.coord is not None
        try:
            self.coord.reply(msg, **(await getattr(self, "op_" + msg["op"])(msg) or {}))
        except Exception as exc:
            traceback.print_exc()
            self.coord.reply(msg, error=one_line(repr(exc)))

    def payload(self, tokens: int) -> torch.Tensor:
        if tokens not in self.payloads:
            self.payloads[tokens] = make_payload(HIDDEN, tokens, 0).to(self.device)
        return self.payloads[tokens]

    async def op_setup(self, msg: dict[str, Any]) -> None:
        (peer,) = self.node.peers.values()
        tid, poll_s = peer.transport_id, self.args.poll_us * 1e-6
        self.senders = {
            "thread-sleep": NixlRawSender(self.node, tid, poll_s),
            "loop-spin": NixlInlineSender(self.node, tid),
        }

    async def op_payload(self, msg: dict[str, Any]) -> None:
        self.payload(msg["tokens"])
        sync(self.device)

    async def op_a(self, msg: dict[str, Any]) -> dict[str, Any]:
        """(a): the payload bytes put in the source region first (untimed), then the write."""
        src = as_bytes(self.payload(msg["tokens"]))
        self.node.registry.byte_view("embeddings")[: src.numel()].copy_(src)
        sync(self.device)
        t0, t_done = await self.senders[msg["method"]].write(0, 0, src.numel(), msg["tag"], 0)
        return {"t0": t0, "t_done": t_done}

    async def op_b(self, msg: dict[str, Any]) -> dict[str, Any]:
        """(b): copy the tensor into the pre-agreed slots, synchronise, write with a notification."""
        tokens, payload = msg["tokens"], self.payload(msg["tokens"])
        pool = self.node.registry.pools["embeddings"]
        t0 = time.perf_counter()
        pool[:tokens].copy_(payload)
        sync(self.device)  # the copy is queued on the stream; the write must see it done
        t1 = time.perf_counter()
        nbytes = payload.numel() * payload.element_size()
        await self.senders[RAW_METHODS[0]].write(0, 0, nbytes, msg["tag"], 0)
        return {"copy_in_s": t1 - t0, "write_s": time.perf_counter() - t1}

    async def op_c_prepare(self, msg: dict[str, Any]) -> None:
        payload = self.payload(msg["tokens"])
        self.sends[msg["rid"]] = asyncio.create_task(
            self.node.send(msg["rid"], {"embeddings": payload})
        )

    async def op_c_stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        st = await self.sends.pop(msg["rid"])
        return {"first_write_at": st.first_write_at, "rounds": st.rounds}

    async def op_bye(self, msg: dict[str, Any]) -> None:
        for sender in self.senders.values():
            await sender.close()
        if not self.done.done():
            self.done.set_result(None)


async def encode_main(args: argparse.Namespace, conn: Any) -> None:
    async with et.EncodeNode(settings(args), control="tcp") as node:
        side = EncodeSide(args, node)
        connected: asyncio.Future[Coord] = asyncio.get_running_loop().create_future()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            side.coord = Coord(reader, writer, side.handle)
            connected.set_result(side.coord)

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        try:
            conn.send({"address": node.address, "port": server.sockets[0].getsockname()[1]})
            coord = await asyncio.wait_for(connected, 120)
            await asyncio.wait([side.done, coord.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.close()


def encode_process(args: argparse.Namespace, conn: Any) -> None:
    """The spawned encode side."""
    torch.set_num_threads(1)
    configure_logging("warning")  # a spawned process starts with logging unconfigured
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    run(encode_main(args, conn))


def run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the language process: drives the run ---------------------------------------------------------
class LanguageSide:
    def __init__(self, args: argparse.Namespace, coord: Coord, node: Any, peer: Any) -> None:
        self.args, self.coord, self.node, self.peer = args, coord, node, peer
        self.device: torch.device = args.device
        self.receiver = NixlRawReceiver(node, peer.transport_id, args.poll_us * 1e-6)
        self.tags = itertools.count(1)
        self.rids = itertools.count()

    async def rep_a(self, tokens: int, want: torch.Tensor, verify: bool, method: str) -> Any:
        pool = self.node.registry.byte_view("embeddings")
        n = want.numel()
        if verify:
            pool[:n].zero_()
            sync(self.device)
        tag = next(self.tags)
        landed = self.receiver.expect(tag, 0, 0, n)
        reply = self.coord.request("a", tokens=tokens, tag=tag, method=method)
        t1 = await landed  # when this side learnt it, on the thread that learnt it
        r = await reply
        t1 = min(t1, r["t_done"])  # nixl's DONE is remote completion: the earlier sighting
        ok = bool(torch.equal(pool[:n], want)) if verify else True
        return t1 - r["t0"], ok

    async def rep_b(self, tokens: int, expected: torch.Tensor, verify: bool) -> Any:
        pool = self.node.registry.pools["embeddings"]
        n = expected.numel() * expected.element_size()
        if verify:
            pool[:tokens].zero_()
        sync(self.device)
        t0 = time.time()
        tag = next(self.tags)
        landed = self.receiver.expect(tag, 0, 0, n)
        reply = self.coord.request("b", tokens=tokens, tag=tag)
        await landed
        t_landed = time.time()
        out = torch.empty_like(expected)
        out.copy_(pool[:tokens])
        sync(self.device)
        t1 = time.time()
        r = await reply
        parts = {**{k: r[k] for k in ("copy_in_s", "write_s")}, "copy_out_s": t1 - t_landed}
        ok = bool(torch.equal(out, expected)) if verify else True
        return t1 - t0, ok, parts

    async def rep_c(self, tokens: int, expected: torch.Tensor, verify: bool, resume: bool) -> Any:
        rid = f"r{tokens}-{next(self.rids)}"
        await self.coord.call("c_prepare", rid=rid, tokens=tokens)
        sync(self.device)
        t0 = time.time()
        got = await self.node.receive(rid, self.peer, expected_tokens=None if resume else tokens)
        sync(self.device)
        t1 = time.time()
        sent = await self.coord.call("c_stats", rid=rid)
        ok = bool(torch.equal(got.tensors["embeddings"], expected)) if verify else True
        d = got.stats["last_chunk_at"] - sent["first_write_at"]
        return t1 - t0, d, got.rounds, ok

    async def row(self, tokens: int, resume: bool) -> dict[str, Any]:
        args = self.args
        expected = make_payload(HIDDEN, tokens, 0).to(self.device)
        want = as_bytes(expected)
        nbytes = want.numel()
        await self.coord.call("payload", tokens=tokens)
        times: dict[str, list[float]] = {k: [] for k in ("b", "c", "d")}
        a_times: dict[str, list[float]] = {m: [] for m in RAW_METHODS}
        verified: dict[str, list[bool]] = {k: [] for k in ("a", "b", "c")}
        rounds, b_parts = [], []
        order = ("a", "b", "c")
        for i in range(args.warmup + args.reps + 1):  # warm-ups and a last rep: verified
            timed = args.warmup <= i < args.warmup + args.reps
            for line in order[i % 3 :] + order[: i % 3]:
                if line == "a":
                    oks = []
                    for method in RAW_METHODS[i % 2 :] + RAW_METHODS[: i % 2]:
                        t, ok = await self.rep_a(tokens, want, not timed, method)
                        oks.append(ok)
                        if timed:
                            a_times[method].append(t)
                    ok = all(oks)
                elif line == "b":
                    t, ok, parts = await self.rep_b(tokens, expected, not timed)
                    if timed:
                        times["b"].append(t)
                        b_parts.append(parts)
                else:
                    t, d, n_rounds, ok = await self.rep_c(tokens, expected, not timed, resume)
                    if timed:
                        times["c"].append(t)
                        times["d"].append(d)
                        rounds.append(n_rounds)
                if not timed:
                    verified[line].append(ok)
                    if not ok:
                        raise RuntimeError(f"{tokens} tokens, line ({line}): payload mismatch")
        a_methods = {m: line_figures(v, nbytes) for m, v in a_times.items()}
        best = min(a_methods, key=lambda m: a_methods[m]["median_s"])
        lines: dict[str, Any] = {"a": {**a_methods[best], "method": best}}
        lines.update({k: line_figures(v, nbytes) for k, v in times.items()})
        med = {k: v["median_s"] for k, v in lines.items()}
        mib = nbytes / MiB
        return {
            "label": f"{'resume ' if resume else ''}{mib:g} MiB",
            "resume": resume,
            "tokens": tokens,
            "bytes": nbytes,
            "mib": mib,
            "expected_tokens": None if resume else tokens,
            "reps": args.reps,
            "warmup": args.warmup,
            "lines": lines,
            "a_methods": a_methods,
            "ratios": {"c/b": med["b"] / med["c"], "d/a": med["a"] / med["d"]},
            "fixed_cost_ms": lines["c"]["p50_ms"] - lines["b"]["p50_ms"],
            "rounds": {"c": statistics.median(rounds), "a": 1, "b": 1},
            "b_parts_median_ms": {
                k: statistics.median(p[k] for p in b_parts) * 1e3 for k in b_parts[0]
            },
            "verified": {k: bool(v) and all(v) for k, v in verified.items()},
        }


async def language_main(args: argparse.Namespace, info: dict[str, Any]) -> list[dict[str, Any]]:
    coord = await coord_connect("127.0.0.1", info["port"])
    rows = []
    async with et.LanguageNode(settings(args)) as node:
        peer = await node.connect(info["address"])
        await coord.call("setup")
        side = LanguageSide(args, coord, node, peer)
        try:
            for tokens, resume in args.payloads:
                row = await side.row(tokens, resume)
                rows.append(row)
                print(
                    f"  {row['label']:>14}: "
                    + "  ".join(f"{k} {row['lines'][k]['gbps']:.2f}" for k in LINES)
                    + f" GB/s, rounds {row['rounds']['c']:g}",
                    flush=True,
                )
            await coord.call("bye")
        finally:
            await side.receiver.close()
    return rows


def device_copy(device: torch.device, nbytes: int, reps: int) -> float:
    """Reference: GB/s of a ``copy_`` of ``nbytes`` on the device in one process (median)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[2:]) / 1e9


# -- report -------------------------------------------------------------------------------------
def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_label = {r["label"]: r for r in rows}
    out: list[dict[str, Any]] = []
    for label, what, op, bound in TARGETS:
        row = by_label.get(label)
        value = None
        if row is not None:
            value = row["fixed_cost_ms"] if what == "fixed cost ms" else row["ratios"][what]
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out.append(
            {
                "payload": label,
                "what": what,
                "target": f"{op} {bound:g}",
                "value": value,
                "met": met,
            }
        )
    for row in rows:
        if row["resume"]:
            for what in ("c/b", "d/a"):
                out.append(
                    {
                        "payload": row["label"],
                        "what": what,
                        "target": "report",
                        "value": row["ratios"][what],
                        "met": None,
                    }
                )
    return out


def target_text(t: dict[str, Any]) -> str:
    if t["target"] == "report":
        mark = "report"
    else:
        mark = "n/a   " if t["met"] is None else "met   " if t["met"] else "MISSED"
    if t["what"] == "fixed cost ms":
        what = "fixed cost p50(c) - p50(b)"
        value = "not measured" if t["value"] is None else f"{t['value']:+.3f} ms"
        target = f"target {t['target']} ms"
    else:
        what = f"({t['what'][0]})/({t['what'][2]})"
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        target = "target: report" if t["target"] == "report" else f"target {t['target']}"
    return f"  {mark} {t['payload']:>14}  {what:28s} {value} ({target})"


def table(result: dict[str, Any]) -> str:
    cfg, rows = result["config"], result["rows"]
    out = [
        f"bench_cuda: {cfg['device']} ({cfg['device_name']}), {cfg['mem']} pools, "
        f"{cfg['nixl']} {cfg['nixl_version']}, torch {cfg['torch']}, {cfg['date']}",
    ]
    if cfg["dry_run"]:
        out.append(
            f"DRY RUN ({DEVICE_ENV}=cpu): DRAM pools on the CPU, not the GPU path; "
            "the targets are for a GPU run"
        )
    out += [
        f"payload [tokens, {HIDDEN}] bfloat16; pools {cfg['num_blocks']} blocks x "
        f"{BLOCK_TOKENS} tokens per side; default allocation {cfg['default_blocks']} blocks "
        f"({cfg['default_blocks'] * BLOCK_TOKENS * TOKEN_BYTES / MiB:g} MiB); "
        f"{cfg['reps']} reps after {cfg['warmup']} warm-up",
        *(f"  {LABELS[k]}" for k in LINES),
        "",
        "                 throughput GB/s (bytes / median)        ratio of medians   rounds",
        "payload          (a)wire  (b)hand   (c)emt  (d)xfer      (c)/(b)  (d)/(a)      (c)",
    ]
    for r in rows:
        ln, ra = r["lines"], r["ratios"]
        out.append(
            f"{r['label']:>14} "
            + " ".join(f"{ln[k]['gbps']:8.2f}" for k in LINES)
            + f"      {ra['c/b']:7.2f}  {ra['d/a']:7.2f}   {r['rounds']['c']:6g}"
        )
    out += ["", "latency ms, p50 / p99", "payload       " + "".join(
        f"{x:>18}" for x in ("(a) wire", "(b) hand", "(c) emt", "(d) xfer")
    )]  # fmt: skip
    for r in rows:
        ln = r["lines"]
        out.append(
            f"{r['label']:>14}"
            + "".join(f"{ln[k]['p50_ms']:9.3f} /{ln[k]['p99_ms']:7.3f}" for k in LINES)
        )
    out += ["", "(a) per raw method, median GB/s; (b) parts, median ms:"]
    for r in rows:
        am, bp = r["a_methods"], r["b_parts_median_ms"]
        out.append(
            f"{r['label']:>14}  best {r['lines']['a']['method']:12s}"
            + "".join(f" {m} {a['gbps']:.2f}" for m, a in am.items())
            + f";  copy in {bp['copy_in_s']:.3f}, write {bp['write_s']:.3f}, "
            f"copy out {bp['copy_out_s']:.3f}"
        )
    fixed = [r for r in rows if r["label"] == "1 MiB"]
    out.append("")
    if fixed:
        out.append(f"fixed cost at 1 MiB, p50(c) - p50(b): {fixed[0]['fixed_cost_ms']:+.3f} ms")
    out.append(
        "reference, not a line: device copy in one process (torch copy_) GB/s: "
        + ", ".join(f"{r['label']} {r['device_copy_gbps']:.1f}" for r in rows if not r["resume"])
    )
    out += ["", "targets (reported, not asserted)"]
    out += [target_text(t) for t in result["targets"]]
    out.append(
        "verified: every payload byte-identical (lines a, b, c; warm-up and last reps)"
        if result["verified"]
        else "verified: MISMATCH"
    )
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------
def tokens_of(mib: float) -> int:
    return max(1, round(mib * MiB / TOKEN_BYTES))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes-mib", default="1,16,64", help="payloads received with known length")
    ap.add_argument(
        "--resume-mib",
        type=float,
        default=16.0,
        help="the resume payload, received without expected_tokens; 0: none",
    )
    ap.add_argument(
        "--default-mib", type=float, default=8.0, help="the default allocation (default_blocks)"
    )
    ap.add_argument("--reps", type=int, default=20, help="timed reps per payload")
    ap.add_argument("--warmup", type=int, default=3, help="untimed, verified reps per payload")
    ap.add_argument(
        "--poll-us",
        type=float,
        default=30.0,
        help="raw NIXL: sleep between polls, as bench_transfer",
    )
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json")
    ap.add_argument(
        "--no-probe-write",
        action="store_true",
        help="skip the start-up check's write between two agents in this process (the "
        "registration of the device's memory is still checked)",
    )
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be at least 1, --warmup at least 0")
    try:
        sizes = [float(s) for s in args.sizes_mib.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes-mib {args.sizes_mib!r}: expected MiB, comma-separated")
    if not sizes or min(sizes) <= 0:
        ap.error("--sizes-mib: at least one size, each above 0")
    args.default_blocks = max(1, -(-tokens_of(args.default_mib) // BLOCK_TOKENS))
    args.payloads = [(tokens_of(m), False) for m in sizes]
    if args.resume_mib:
        resume_tokens = tokens_of(args.resume_mib)
        if resume_tokens <= args.default_blocks * BLOCK_TOKENS:
            ap.error("--resume-mib must exceed the default allocation (--default-mib)")
        args.payloads.append((resume_tokens, True))
    largest = max(-(-t // BLOCK_TOKENS) for t, _ in args.payloads)
    args.num_blocks = max(largest, args.default_blocks)
    if args.json is not None and args.json.exists() and not args.force:
        ap.error(f"{args.json} exists: not overwritten (pass --force, or another --json)")
    device = device_from_env()
    if device is None:
        ap.error(f"{DEVICE_ENV}={os.environ.get(DEVICE_ENV)!r}: expected cuda, cuda:N or cpu")
    args.device = device
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(1)
    configure_logging("warning")
    if why := preflight(args.device, write=not args.no_probe_write):
        print(f"bench_cuda: {why}", file=sys.stderr)
        return 2
    cuda = args.device.type == "cuda"
    name = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu"
    print(f"device: {args.device} ({name}), torch {torch.__version__}", flush=True)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=encode_process, args=(args, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    try:
        if not conn.poll(180):
            raise RuntimeError("the encode process did not start in 180 s")
        try:
            info = conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the encode process failed to start (exit code {proc.exitcode})"
            ) from None
        rows = run(language_main(args, info))
        proc.join(60)
    except Exception as exc:  # the traceback, then the reason on the last line
        traceback.print_exc()
        print(f"bench_cuda: the run failed: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
    for r in rows:
        r["device_copy_gbps"] = device_copy(args.device, r["bytes"], args.reps)
    pkg, ver = nixl_package()
    result: dict[str, Any] = {
        "config": {
            "device": str(args.device),
            "device_name": name,
            "mem": "VRAM" if cuda else "DRAM",
            "dry_run": not cuda,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([f"{DEVICE_ENV}={args.device}", "python", *sys.argv]),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nixl": pkg,
            "nixl_version": ver,
            "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
            "git": git_describe(),
            "hidden": HIDDEN,
            "block_tokens": BLOCK_TOKENS,
            "num_blocks": args.num_blocks,
            "default_blocks": args.default_blocks,
            "reps": args.reps,
            "warmup": args.warmup,
            "poll_us": args.poll_us,
            "raw_methods": list(RAW_METHODS),
            "fixed_cost": "p50(c) - p50(b) at 1 MiB, ms",
            "clock": "time.time() in both processes of one host",
            "wall_s": time.time() - started,
        },
        "rows": rows,
    }
    result["verified"] = all(all(r["verified"].values()) for r in rows)
    result["targets"] = evaluate_targets(rows)
    print(table(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w" if args.force else "x") as f:
            json.dump(result, f, indent=1)
        print(f"json: {args.json}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
