"""Servers as real processes (``python -m emtransfer serve ...``) driven over HTTP.

``ServerProc`` starts one role on free ports, waits on ``/health`` (a bounded poll), and can
SIGKILL it. ``gated_encoder`` is an encoder for ``--encoder tests.server_harness:gated_encoder``:
synthetic, except that rids starting with ``hold-`` never finish (requests stay in flight until
the process dies), ``slow-<seconds>-`` ones finish after that long (a request that is slow,
not stuck) and rids starting with ``boom-`` make the encoder raise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"mrope_positions": {"shape": [3], "dtype": "int64"}}
#: tcp on the CPU by default; e.g. SERVER_TEST_TRANSPORT=nixl SERVER_TEST_DEVICE=cuda:0 on a GPU
TRANSPORT = os.environ.get("SERVER_TEST_TRANSPORT", "tcp")
DEVICE = os.environ.get("SERVER_TEST_DEVICE", "cpu")
#: small pools and quick failure detection; both roles get the same settings
SETTINGS_ARGS = [
    "--transport", TRANSPORT,
    "--device", DEVICE,
    "--hidden-size", "256",
    "--dtype", "bfloat16",
    "--block-size", "128",
    "--num-blocks", "16",
    "--default-blocks", "4",
    "--fields", json.dumps(FIELDS),
    "--heartbeat-interval", "0.2",
    "--heartbeat-timeout", "1.0",
    "--bootstrap-timeout", "2",
]  # fmt: skip
SETTINGS = {
    "transport": TRANSPORT,
    "hidden_size": 256,
    "dtype": "bfloat16",
    "block_size": 128,
    "num_blocks": 16,
    "default_blocks": 4,
    "fields": FIELDS,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    def __init__(self, role: str, log_dir: Path, *args: str, name: str = "", port: int = 0):
        self.role = role
        self.port = port or free_port()
        self.args = list(args)
        self.name = name or role
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProc:
        cmd = [sys.executable, "-m", "emtransfer", "serve", "--role", self.role]
        cmd += ["--port", str(self.port), *SETTINGS_ARGS, *self.args]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        env.pop("EMTRANSFER_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def health(self) -> dict[str, Any]:
        """The /health body, ready or not (readiness is also its status: 200 or 503)."""
        r = httpx.get(self.url + "/health", timeout=5)
        if r.status_code not in (200, 503):
            r.raise_for_status()
        assert (r.status_code == 200) == r.json()["ready"], (r.status_code, r.text)
        return r.json()  # type: ignore[no-any-return]

    def wait_health(self, ok: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /health until it answers (and ``ok(health)`` holds), within ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.health()
                if ok is None or ok(last):
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)  # bounded poll of another process
        raise AssertionError(f"{self.name}: /health never satisfied: {last}\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """Poll the process's log (bounded) until it holds ``text``; the log then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (log := self.log()):
                return log
            time.sleep(0.05)  # bounded poll of another process's output
        raise AssertionError(f"{self.name}: no {text!r} in the log:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def blocks_free(h: dict[str, Any]) -> bool:
    """Every block of the pool free, none quarantined."""
    p = h["pool"]
    return bool(p["blocks_free"] == p["blocks_total"] and p["blocks_quarantined"] == 0)


def pool_full(h: dict[str, Any]) -> bool:
    """Every block free and nothing in flight."""
    return blocks_free(h) and h["inflight"] == 0


def encoders_up(*addresses: str) -> Any:
    def ok(h: dict[str, Any]) -> bool:
        up = {e["address"] for e in h["encoders"] if e["up"]}
        return set(addresses) <= up

    return ok


def expected_digest(rid: str, num_tokens: int) -> str:
    """The digest of the synthetic payload for (rid, num_tokens), computed here."""
    import emtransfer as et
    from emtransfer.buffers import payload_digest
    from emtransfer.demo import synthetic_payload

    settings = et.Settings(**SETTINGS)
    tensors = synthetic_payload(settings, rid, num_tokens)
    return payload_digest(tensors, list(settings.field_specs()))


# -- a test encoder, loaded by the encode server ---------------------------------------------------
def gated_encoder(settings: Any) -> Any:
    from emtransfer.encoders import SyntheticEncoder

    synthetic = SyntheticEncoder(settings)

    async def encode(job: dict[str, Any]) -> Any:
        rid = str(job.get("rid", ""))
        if rid.startswith("hold-"):
            await asyncio.Event().wait()  # held until the process dies
        if rid.startswith("slow-"):  # slow-<seconds>-...: finishes after that long
            await asyncio.sleep(float(rid.split("-")[1]))
        if rid.startswith("boom-"):
            raise RuntimeError("kaboom: the test encoder failed")
        return synthetic(job)

    return encode


def bytes_encoder(settings: Any) -> Any:
    """An encoder of the user's own that takes any bytes (no image decoding anywhere): it
    answers with a synthetic payload and says what it got (length, media type, digest)."""
    import hashlib

    from emtransfer.encoders import SyntheticEncoder

    synthetic = SyntheticEncoder(settings)

    def encode(job: dict[str, Any]) -> Any:
        raw = job["image"]
        assert isinstance(raw, bytes), type(raw)
        tensors, _ = synthetic({"rid": job["rid"], "num_tokens": 64})
        meta = {
            "image_bytes": len(raw),
            "image_type": job.get("image_type"),
            "image_sha256": hashlib.sha256(raw).hexdigest(),
        }
        return tensors, meta

    return encode
