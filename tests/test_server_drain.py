"""SIGTERM drains, through real server processes: the log says how many requests are open;
new requests get 503 JSON "shutting down" (and /health 503, /live 200); a request that ends
within ``--shutdown-timeout`` is answered as usual; one still open at the deadline gets 503
JSON; no traceback; the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProc, encoders_up, free_port

pytestmark = pytest.mark.timeout(90)

GATED = "tests.server_harness:gated_encoder"


async def test_sigterm_drains_then_answers_what_is_left_with_503(tmp_path: Path) -> None:
    bport = free_port()
    addr = f"127.0.0.1:{bport}"
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport), "--encoder", GATED)
    lang = ServerProc(
        "language", tmp_path, "--encoder-addr", addr, "--shutdown-timeout", "6",
        "--chunk-timeout", "60", "--data-timeout", "60",
    )  # fmt: skip
    procs = [enc.start(), lang.start()]
    try:
        await asyncio.to_thread(lang.wait_health, encoders_up(addr))
        async with httpx.AsyncClient(timeout=30) as client:
            url = lang.url + "/v1/embeddings"
            stuck = asyncio.create_task(client.post(url, json={"rid": "hold-1", "num_tokens": 64}))
            slow = asyncio.create_task(
                client.post(url, json={"rid": "slow-1.5-a", "num_tokens": 64})
            )
            await asyncio.to_thread(lang.wait_health, lambda h: h["inflight"] == 2)
            assert lang.proc is not None
            lang.proc.send_signal(signal.SIGTERM)
            log = await asyncio.to_thread(lang.wait_log, "draining")
            assert "requests=2" in log.split("draining", 1)[1].splitlines()[0]
            refused = await client.post(url, json={"num_tokens": 8})
            assert refused.status_code == 503
            assert refused.json() == {"error": "unavailable", "detail": "shutting down"}
            health = await client.get(lang.url + "/health")
            assert health.status_code == 503 and health.json()["ready"] is False
            assert (await client.get(lang.url + "/live")).status_code == 200
            done = await slow  # finished inside the drain window: answered as usual
            assert done.status_code == 200 and done.json()["num_tokens"] == 64
            left = await stuck  # still open at the deadline
            assert left.status_code == 503, left.text
            body = left.json()
            assert body["error"] == "unavailable"
            assert "still open when the drain ended" in body["detail"]
            assert "--shutdown-timeout=6s" in body["detail"]
        assert await asyncio.to_thread(lang.proc.wait, 20) == 0
        log = lang.log()
        assert "drain cut short" in log and "by='deadline'" in log, log
        assert "Traceback" not in log, log
        # the abort of the request cut short reached the encode node: its pool is whole again
        await asyncio.to_thread(
            enc.wait_health, lambda h: h["pool"]["blocks_free"] == h["pool"]["blocks_total"]
        )
    finally:
        for p in procs:
            p.kill()


async def test_a_quiet_server_stops_at_once(tmp_path: Path) -> None:
    enc = ServerProc("encode", tmp_path, "--shutdown-timeout", "30").start()
    try:
        await asyncio.to_thread(enc.wait_health)
        assert enc.proc is not None
        t0 = time.monotonic()
        enc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(enc.proc.wait, 20) == 0
        assert time.monotonic() - t0 < 15  # nothing open: the 30 s window is not waited out
        log = enc.log()
        assert "draining" in log and "drained" in log and "Traceback" not in log, log
    finally:
        enc.kill()


async def test_a_second_signal_stops_without_waiting_out_the_drain(tmp_path: Path) -> None:
    bport = free_port()
    addr = f"127.0.0.1:{bport}"
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport), "--encoder", GATED)
    lang = ServerProc("language", tmp_path, "--encoder-addr", addr, "--shutdown-timeout", "60")
    procs = [enc.start(), lang.start()]
    try:
        await asyncio.to_thread(lang.wait_health, encoders_up(addr))
        async with httpx.AsyncClient(timeout=30) as client:
            url = lang.url + "/v1/embeddings"
            stuck = asyncio.create_task(client.post(url, json={"rid": "hold-2", "num_tokens": 8}))
            await asyncio.to_thread(lang.wait_health, lambda h: h["inflight"] == 1)
            assert lang.proc is not None
            lang.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(lang.wait_log, "draining")
            t0 = time.monotonic()
            lang.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lang.proc.wait, 30) == 0
            assert time.monotonic() - t0 < 20  # not the 60 s drain window
            left = await stuck  # answered, not dropped
            assert left.status_code == 503 and left.json()["error"] == "unavailable"
        log = lang.log()
        assert "drain cut short" in log and "by='second signal'" in log, log
        assert "Traceback" not in log, log
    finally:
        for p in procs:
            p.kill()
