"""What the servers log at info, through real server processes: the access log names the rid
and the client; per-request protocol lines are debug; a periodic summary counts what ended
(by outcome) and the resumes."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProc, encoders_up, free_port

pytestmark = pytest.mark.timeout(90)


def _summed(log: str) -> dict[str, int]:
    summaries = [ln for ln in log.splitlines() if "] summary " in ln]
    return {
        key: sum(int(v) for ln in summaries for v in re.findall(rf" {key}=(\d+)", ln))
        for key in ("requests", "ok", "resumes")
    }


async def test_access_log_and_summary(tmp_path: Path) -> None:
    bport = free_port()
    addr = f"127.0.0.1:{bport}"
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport))
    lang = ServerProc(
        "language", tmp_path, "--encoder-addr", addr, "--access-log",
        "--log-summary-interval", "0.5",
    )  # fmt: skip
    procs = [enc.start(), lang.start()]
    try:
        await asyncio.to_thread(lang.wait_health, encoders_up(addr))
        async with httpx.AsyncClient(timeout=30) as client:
            url = lang.url + "/v1/embeddings"
            for rid, n in [("small-1", 100), ("big-1", 1500), ("big-2", 1500)]:  # 2 resume
                r = await client.post(url, json={"rid": rid, "num_tokens": n})
                assert r.status_code == 200, r.text
            bad = await client.post(url, json={"rid": "too-big", "num_tokens": 10**9})
            assert bad.status_code == 400
        # the requests may straddle two intervals: wait until the summaries add up to them
        deadline = time.monotonic() + 20
        while (total := _summed(lang.log()))["requests"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # bounded poll of another process's output
        assert total == {"requests": 3, "ok": 3, "resumes": 2}, lang.log()
        lines = lang.log().splitlines()
        access = [ln for ln in lines if "] http " in ln]
        assert any("rid='big-2'" in ln and "client='127.0.0.1:" in ln for ln in access), access
        assert any("rid='too-big'" in ln and "status=400" in ln for ln in access), access
        # nothing per round or per resume at info
        assert not [ln for ln in lines if "resum" in ln.lower() and "] summary " not in ln]
    finally:
        for p in procs:
            p.kill()
