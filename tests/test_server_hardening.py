"""HTTP hardening, in process (the apps on httpx's ASGI transport): an API key in the vLLM
convention with exempt paths, and a body limit that holds however the body is framed
(Content-Length or chunked)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from emtransfer.errors import ConfigError
from emtransfer.server.options import add_serve_parser, resolve_serve
from emtransfer.server.run import build_service

pytestmark = pytest.mark.timeout(60)
KEY = "k3y-for-the-test-9c1f"


def _options(*argv: str) -> Any:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="cmd"))
    base = ["serve", "--role", "encode", "--transport", "tcp", "--hidden-size", "64",
            "--num-blocks", "16", "--encoder", "synthetic"]  # fmt: skip
    return resolve_serve(parser.parse_args([*base, *argv]))


@asynccontextmanager
async def client(*argv: str) -> AsyncIterator[httpx.AsyncClient]:
    _service, app = build_service(_options(*argv))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://enc") as c,
    ):
        yield c


BAD_JOB = {"rid": "r1"}  # refused by validation (400): proof the request reached the handler


async def test_without_a_key_the_api_is_open() -> None:
    async with client() as c:
        assert (await c.post("/v1/encode", json=BAD_JOB)).status_code == 400
        assert (await c.get("/openapi.json")).status_code == 200


async def test_the_api_key_is_required_except_on_exempt_paths() -> None:
    async with client("--api-key", KEY) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = await c.post("/v1/encode", json=BAD_JOB, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"] == "unauthorized" and KEY not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/health")).status_code == 200  # health checks and scrapers
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        r = await c.post("/v1/encode", json=BAD_JOB, headers=auth)
        assert r.status_code == 400, r.text
        assert (await c.get("/openapi.json", headers=auth)).status_code == 200


async def test_exempt_paths_are_a_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_API_KEY", KEY)  # the environment variable works too
    async with client("--api-key-exempt", "") as c:
        assert (await c.get("/health")).status_code == 401
        ok = await c.get("/health", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--api-key", " "], "empty key"),
        (["--api-key", KEY, "--api-key-exempt", "health"], "must start with '/'"),
    ],
)
def test_bad_api_key_options_are_refused(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _options(*argv)


async def test_a_chunked_body_is_held_to_the_limit() -> None:
    """Chunked bodies used to bypass the limit (it only read Content-Length): 64 MB bodies were
    read and parsed."""

    async def chunks(total: int) -> AsyncIterator[bytes]:
        yield b'{"rid": "r1", "num_tokens": 10, "pad": "'
        sent = 0
        while sent < total:
            yield b"x" * 65536
            sent += 65536
        yield b'"}'

    json_type = {"Content-Type": "application/json"}
    limit = 1 << 20
    async with client("--max-body-bytes", str(limit)) as c:
        r = await c.post("/v1/encode", content=chunks(limit + (1 << 20)), headers=json_type)
        assert r.status_code == 413, r.text
        assert "above the limit" in r.json()["detail"]
        small = await c.post("/v1/encode", content=chunks(1 << 16), headers=json_type)  # parsed
        assert small.status_code == 400 and "unknown field 'pad'" in small.text
        assert (await c.post("/v1/encode", json=BAD_JOB)).status_code == 400  # serving goes on
