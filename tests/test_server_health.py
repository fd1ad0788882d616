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
