"""Readiness from the status code, liveness apart, HEAD on both, through real server
processes: a language server whose encode node is not up yet answers /health with 503 (and
``"ready": false``), /live with 200; once the encoder is up, /health is 200."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProc, encoders_up, free_port

pytestmark = pytest.mark.timeout(90)


async def test_readiness_is_the_status_code_and_liveness_is_apart(tmp_path: Path) -> None:
    bport = free_port()
    addr = f"127.0.0.1:{bport}"
    lang = ServerProc("language", tmp_path, "--encoder-addr", addr, "--retry-interval", "0.2")
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport))
    procs = [lang.start()]
    try:
        h = await asyncio.to_thread(lang.wait_health)  # answers, not ready: no encoder yet
        assert h["ready"] is False and h["encoders"][0]["up"] is False
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(lang.url + "/health")
            assert r.status_code == 503 and r.json()["ready"] is False
            head = await client.head(lang.url + "/health")
            assert head.status_code == 503 and head.content == b""
            for method in (client.get, client.head):
                assert (await method(lang.url + "/live")).status_code == 200
            procs.append(enc.start())
            await asyncio.to_thread(lang.wait_health, encoders_up(addr))
            r = await client.get(lang.url + "/health")
            assert r.status_code == 200 and r.json()["ready"] is True
            assert (await client.head(lang.url + "/health")).status_code == 200
            e = await client.get(enc.url + "/health")
            assert e.status_code == 200 and e.json()["ready"] is True
            assert (await client.head(enc.url + "/live")).status_code == 200
    finally:
        for p in procs:
            p.kill()


async def test_version_on_the_command_line_and_over_http(tmp_path: Path) -> None:
    import subprocess
    import sys

    import emtransfer
    from emtransfer.protocol.messages import PROTOCOL_VERSION

    out = subprocess.run(
        [sys.executable, "-m", "emtransfer", "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert (
        out.stdout.strip() == f"emtransfer {emtransfer.__version__} (protocol {PROTOCOL_VERSION})"
    )
    enc = ServerProc("encode", tmp_path).start()
    try:
        await asyncio.to_thread(enc.wait_health)
        async with httpx.AsyncClient(timeout=10) as client:
            v = (await client.get(enc.url + "/version")).json()
        assert v == {
            "version": emtransfer.__version__, "protocol": PROTOCOL_VERSION, "role": "encode"
        }  # fmt: skip
    finally:
        enc.kill()


async def test_the_first_request_waits_for_the_first_connection_under_way(tmp_path: Path) -> None:
    """A request that comes while the first connection to the encode node is still being made
    (a slow network: the proxy delays every chunk) waits for it instead of answering 503 "not
    connected yet"; an encode node that cannot be reached still gives 503, at once after its
    first attempt failed."""
    from fault_proxy import FaultProxy

    bport = free_port()
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport)).start()
    proxy = FaultProxy(f"127.0.0.1:{bport}")
    proxy.delay_s = 0.4  # every chunk of the handshake: ~2 s before the encoder is up
    lang = ServerProc(
        "language", tmp_path, "--encoder-addr", proxy.address, "--bootstrap-timeout", "10"
    )
    try:
        await asyncio.to_thread(enc.wait_health)
        lang.start()
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.to_thread(lang.wait_health)  # answers (503: connecting)
            assert lang.health()["encoders"][0]["up"] is False  # still under way
            r = await client.post(lang.url + "/v1/embeddings", json={"num_tokens": 40})
            assert r.status_code == 200, r.text
            assert r.json()["num_tokens"] == 40
    finally:
        lang.kill()
        enc.kill()
        proxy.close()
    dead = ServerProc("language", tmp_path, "--encoder-addr", f"127.0.0.1:{free_port()}")
    try:
        dead.start()
        await asyncio.to_thread(dead.wait_health)
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(dead.url + "/v1/embeddings", json={"num_tokens": 40})
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        assert "connection refused" in r.json()["detail"].lower(), r.text
    finally:
        dead.kill()
