"""Encode servers dying and coming back under a language server that keeps running."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from server_harness import ServerProc, encoders_up, expected_digest, free_port, pool_full

GATED = ("--encoder", "tests.server_harness:gated_encoder")
HEARTBEAT_TIMEOUT = 1.0  # SETTINGS_ARGS


def _down(address: str) -> Any:
    def ok(h: dict[str, Any]) -> bool:
        return pool_full(h) and not any(e["up"] for e in h["encoders"] if e["address"] == address)

    return ok


async def _embed(client: httpx.AsyncClient, rid: str, n: int) -> httpx.Response:
    return await client.post("/v1/embeddings", json={"rid": rid, "num_tokens": n})


async def test_kill_restart_round_robin(tmp_path: Path) -> None:
    bport_a, bport_b = free_port(), free_port()
    addr_a, addr_b = f"127.0.0.1:{bport_a}", f"127.0.0.1:{bport_b}"
    lang = ServerProc(
        "language", tmp_path, "--encoder-addr", f"{addr_a},{addr_b}", "--retry-interval", "0.2"
    )
    enc_a = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport_a), *GATED, name="a")
    procs = [lang.start(), enc_a.start()]
    try:
        h = await asyncio.to_thread(lang.wait_health, encoders_up(addr_a))
        b = next(e for e in h["encoders"] if e["address"] == addr_b)
        assert b["up"] is False and b["error"], h  # B was never started: marked down

        async with httpx.AsyncClient(base_url=lang.url, timeout=60) as client:
            # B is skipped: every request goes to A
            rs = await asyncio.gather(*(_embed(client, f"a{i}", 200 + i) for i in range(6)))
            assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs]
            assert {r.json()["encoder"] for r in rs} == {addr_a}

            # the encoder raising is a 502 with its reason, never a silent failure
            r = await _embed(client, "boom-1", 10)
            assert r.status_code == 502 and "kaboom" in r.json()["detail"], r.text

            # requests in flight (3 held by the encoder, others moving) when A is SIGKILLed
            held = [asyncio.ensure_future(_embed(client, f"hold-{i}", 300)) for i in range(3)]
            moving = [asyncio.ensure_future(_embed(client, f"m{i}", 3000)) for i in range(6)]
            await asyncio.to_thread(lang.wait_health, lambda h: h["inflight"] >= 3, 10)
            t_kill = time.monotonic()
            enc_a.kill()
            answers = await asyncio.gather(*held)
            elapsed = time.monotonic() - t_kill
            assert [r.status_code in (503, 504) for r in answers] == [True] * 3, [
                r.text for r in answers
            ]
            assert elapsed < HEARTBEAT_TIMEOUT + 2.0, elapsed
            for r in await asyncio.gather(*moving):
                assert r.status_code in (200, 503, 504), r.text
                if r.status_code == 200:
                    assert r.json()["sha256"] == r.json()["sender_sha256"]

            # every block came back; A is shown down
            await asyncio.to_thread(lang.wait_health, _down(addr_a), 10)

            # nothing reachable: 503 at once
            t0 = time.monotonic()
            r = await _embed(client, "none-1", 10)
            assert r.status_code == 503 and "no encode node reachable" in r.json()["detail"]
            assert time.monotonic() - t0 < 1.0

            # A restarts on the same bootstrap port, B starts: both serve, round-robin
            enc_a2 = ServerProc(
                "encode", tmp_path, "--bootstrap-port", str(bport_a), *GATED, name="a2"
            )
            enc_b = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport_b), name="b")
            procs += [enc_a2.start(), enc_b.start()]
            await asyncio.to_thread(lang.wait_health, encoders_up(addr_a, addr_b), 30)
            rs = await asyncio.gather(*(_embed(client, f"rr{i}", 129 * (i + 1)) for i in range(8)))
            assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs]
            for i, r in enumerate(rs):
                assert r.json()["sha256"] == expected_digest(f"rr{i}", 129 * (i + 1))
            served = {e["address"]: e["served"] for e in lang.health()["encoders"]}
            assert {r.json()["encoder"] for r in rs} == {addr_a, addr_b}, served
        assert await asyncio.to_thread(lang.wait_health, pool_full, 10)
    finally:
        rcs = {p.name: p.stop() for p in procs}
    assert rcs["language"] == 0, lang.log()
    assert "Traceback" not in lang.log(), lang.log()
