"""Large jobs through real server processes: a real-sized photo (a ~3 MB JPEG) travels to the
encode node in pieces and is encoded; the language server decodes base64 only, so an encoder of
the user's own gets the very bytes and their media type; the limits are settings (413 for a
body above --max-body-bytes, 400 naming max_job_bytes for a job above it)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from pathlib import Path

import httpx
import pytest
import torch
from server_harness import ServerProc, encoders_up, free_port

pytestmark = pytest.mark.timeout(120)


def photo(width: int = 1500, height: int = 1100) -> bytes:
    """A JPEG the size of a phone photo: noise compresses badly, as real detail does."""
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buf, format="JPEG", quality=97)
    return buf.getvalue()


async def _pair(tmp_path: Path, encoder: str, *lang_args: str) -> tuple[ServerProc, ServerProc]:
    bport = free_port()
    addr = f"127.0.0.1:{bport}"
    enc = ServerProc("encode", tmp_path, "--bootstrap-port", str(bport), "--encoder", encoder,
                     "--max-tokens", "20000", name=f"encode-{encoder.split(':')[-1]}")  # fmt: skip
    lang = ServerProc("language", tmp_path, "--encoder-addr", addr, *lang_args,
                      name=f"language-{encoder.split(':')[-1]}")  # fmt: skip
    enc.start()
    lang.start()
    await asyncio.to_thread(lang.wait_health, encoders_up(addr))
    return enc, lang


async def test_a_photo_travels_in_pieces_and_is_encoded(tmp_path: Path) -> None:
    raw = photo()
    assert 2_000_000 < len(raw) < 4_000_000, len(raw)
    enc, lang = await _pair(tmp_path, "vision")
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"rid": "photo-1", "image": base64.b64encode(raw).decode()}
            r = await client.post(lang.url + "/v1/embeddings", json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            # 1500x1100 in 16-px patches: 94 x 69 tokens, more than the 16-block pool holds
            assert got["num_tokens"] == 94 * 69 and got["rounds"] >= 2
            assert got["sha256"] == got["sender_sha256"]
            assert got["meta"]["image_size"] == [1500, 1100]
            for fmt in ("PNG", "WEBP", "GIF"):
                from PIL import Image

                buf = io.BytesIO()
                Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format=fmt)
                small = {"image": base64.b64encode(buf.getvalue()).decode()}
                r = await client.post(lang.url + "/v1/embeddings", json=small)
                assert r.status_code == 200 and r.json()["num_tokens"] == 12, (fmt, r.text)
            bad = {"image": base64.b64encode(b"\x00not an image" * 1000).decode()}
            r = await client.post(lang.url + "/v1/embeddings", json=bad)
            assert r.status_code == 400 and "cannot be decoded" in r.json()["detail"], r.text
    finally:
        lang.kill()
        enc.kill()


async def test_the_users_encoder_gets_the_bytes_and_their_type(tmp_path: Path) -> None:
    raw = b"\x01\x02 not an image format anybody knows " * 100_000  # 3.7 MB
    enc, lang = await _pair(tmp_path, "tests.server_harness:bytes_encoder")
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            url = "data:application/x-scan;base64," + base64.b64encode(raw).decode()
            r = await client.post(lang.url + "/v1/embeddings", json={"image": url})
            assert r.status_code == 200, r.text
            assert r.json()["meta"] == {
                "image_bytes": len(raw),
                "image_type": "application/x-scan",
                "image_sha256": hashlib.sha256(raw).hexdigest(),
            }
    finally:
        lang.kill()
        enc.kill()


async def test_the_limits_are_settings(tmp_path: Path) -> None:
    raw = photo(900, 700)
    text = base64.b64encode(raw).decode()
    enc, lang = await _pair(
        tmp_path, "vision", "--max-job-bytes", str(len(raw) // 2), "--max-body-bytes",
        str(len(text) * 2),
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            url = lang.url + "/v1/embeddings"
            r = await client.post(url, json={"image": text})  # fits the body, not the job
            assert r.status_code == 400, r.text
            assert "max_job_bytes" in r.json()["detail"]
            r = await client.post(url, json={"image": text * 3})  # above the body limit
            assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"], r.text
        h = await asyncio.to_thread(lang.health)
        assert h["pool"]["blocks_free"] == h["pool"]["blocks_total"]
    finally:
        lang.kill()
        enc.kill()
