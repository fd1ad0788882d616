"""bench/bench_transfer.py without torchrun: (a) is the best raw method, the (e) figures reach
the table, the targets and summarize.py (older runs without (e) still summarize), the big pools
fit the largest payload, and the raw tcp methods of (a) move the bytes where they belong."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import bench_transfer as bt
from bench import summarize as bs

pytestmark = pytest.mark.timeout(60)
MIB2 = 2 << 20


def _row(tokens: int, a: dict[str, list[float]], **lines: list[float]) -> dict[str, Any]:
    nbytes = tokens * bt.HIDDEN * 2
    got, a_methods, ratios = bt.summarize_lines(nbytes, a, lines)
    for k in ("c", "d", "e"):
        got[k]["rounds"] = 1
    got["e"]["zero_copy"] = {"send": 3, "recv": 3, "reps": 3}
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "mib": nbytes / (1 << 20),
        "lines": got,
        "a_methods": a_methods,
        "ratios": ratios,
        "verified": dict.fromkeys("abce", True),
    }


def _result(transport: str = "nixl") -> dict[str, Any]:
    rows = [
        _row(
            256,
            {"thread-sleep": [0.6e-3] * 3, "loop-spin": [0.3e-3, 0.2e-3, 0.4e-3]},
            b=[0.8e-3] * 3,
            c=[1.2e-3] * 3,
            d=[0.5e-3] * 3,
            e=[0.6e-3] * 3,
        ),
        _row(
            8192,
            {"thread-sleep": [9e-3] * 3, "loop-spin": [10e-3] * 3},
            b=[40e-3] * 3,
            c=[40e-3] * 3,
            d=[10e-3] * 3,
            e=[15e-3] * 3,
        ),
    ]
    result: dict[str, Any] = {"payloads": rows, "verified": True}
    result["config"] = {
        "transport": transport,
        "date": "2026-12-01T00:00:00+00:00",
        "host": "h",
        "cpus": 2,
        "reps": 3,
        "reps_large": 3,
        "warmup": 1,
        "sizes": [256, 8192],
        "small_n": 0,
    }
    result["targets"] = bt.evaluate_targets(result)
    return result


def test_a_is_the_best_raw_method_per_payload() -> None:
    small, large = _result()["payloads"]
    assert small["lines"]["a"]["method"] == "loop-spin"
    assert small["lines"]["a"]["median_s"] == pytest.approx(0.3e-3)
    assert large["lines"]["a"]["method"] == "thread-sleep"
    assert set(small["a_methods"]) == {"thread-sleep", "loop-spin"}
    assert small["ratios"]["d/a"] == pytest.approx(0.3 / 0.5)
    assert small["ratios"]["e/a"] == pytest.approx(0.3 / 0.6)
    assert small["ratios"]["e/c"] == pytest.approx(1.2 / 0.6)


def test_e_over_a_is_reported_without_a_target() -> None:
    result = _result()
    reported = [t for t in result["targets"] if t["ratio"] == "e/a"]
    assert [t["payload"] for t in reported] == ["2 MiB", "64 MiB"]
    assert all(t["target"] == "report" and t["met"] is None for t in reported)
    text = bt.table(result)
    assert "(e)/(a)" in text and "report" in text and "best loop-spin" in text
    assert "stage 3/3, lease 3/3" in text


def test_summarize_reports_e_and_takes_runs_from_before_it() -> None:
    new, old = _result(), _result()
    for row in old["payloads"]:  # a run from before (e): no such line, no such ratio
        del row["lines"]["e"], row["ratios"]["e/a"]
    rows = bs.summarize([new, old])
    ea = {r["payload"]: r for r in rows if r["ratio"] == "e/a"}
    assert set(ea) == {"2 MiB", "64 MiB"} and ea["2 MiB"]["runs"] == 1
    assert ea["2 MiB"]["met"] is None and ea["2 MiB"]["target"] == "report"
    table = bs.markdown("nixl", rows)
    assert "| 2 MiB e/a | 0.50 | 0.50-0.50 | report | - |" in table


def test_the_big_pools_fit_the_largest_payload() -> None:
    assert bt.big_blocks([256, 1024, 2048, 8192]) == 64
    assert bt.big_blocks([256, 9000]) == 71  # 9000 tokens: 71 blocks of 128
    assert bt.raw_methods("tcp", "small") == ("loop-sock",)
    assert bt.raw_methods("nixl", "big") == bt.RAW_METHODS["nixl"]


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    accepted = asyncio.ensure_future(loop.sock_accept(lsock))
    client = socket.create_connection(("127.0.0.1", lsock.getsockname()[1]))
    server, _ = await asyncio.wait_for(accepted, 10)
    lsock.close()
    for s in (client, server):
        bt._tune(s, 1 << 20)
    return server, client


def _node(nbytes: int, fill: int) -> Any:
    pool = torch.full((nbytes,), fill, dtype=torch.uint8)
    return SimpleNamespace(registry=SimpleNamespace(byte_view=lambda field: pool)), pool


@pytest.mark.parametrize("method", bt.RAW_METHODS["tcp"])
async def test_the_raw_tcp_methods_write_into_the_pool_slice(method: str) -> None:
    src_node, src = _node(4 * MIB2, 0)
    dst_node, dst = _node(4 * MIB2, 0)
    src.copy_(torch.randint(0, 256, (4 * MIB2,), dtype=torch.uint8))
    s_sock, r_sock = await _tcp_pair()
    if method == "loop-sock":
        sender: bt.RawSender = bt.TcpRawSender(src_node, s_sock)
        receiver: bt.RawReceiver = bt.TcpRawReceiver(dst_node, r_sock)
    elif method == "loop-stream":
        sender = await bt.TcpStreamSender.open(src_node, s_sock)
        receiver = await bt.TcpProtoReceiver.open(dst_node, r_sock)
    else:
        sender, receiver = (
            bt.TcpThreadSender(src_node, s_sock),
            bt.TcpThreadReceiver(dst_node, r_sock),
        )
    try:
        for tag, (off, n) in enumerate([(0, MIB2), (MIB2 + 7, MIB2 + 5), (3 * MIB2, 100)]):
            landed = receiver.expect(tag, 0, off + 1, n)
            t_post, t_done = await asyncio.wait_for(sender.write(off, off + 1, n, tag, 0), 10)
            t_landed = await asyncio.wait_for(landed, 10)
            assert t_post <= t_done and t_post <= t_landed
            assert torch.equal(dst[off + 1 : off + 1 + n], src[off : off + n])
        assert not dst[3 * MIB2 + 101 :].any()  # nothing past the last slice
    finally:
        await sender.close()
        await receiver.close()
