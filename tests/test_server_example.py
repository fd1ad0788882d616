"""examples/embed_in_fastapi.py works as documented (in-process, against a real EncodeNode)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import httpx
import pytest
import torch

import emtransfer as et
from emtransfer.buffers import payload_digest
from emtransfer.demo import synthetic_payload
from emtransfer.encoders import SyntheticEncoder

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embed_in_fastapi.py"


async def test_embed_in_fastapi(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HIDDEN_SIZE": "64", "TRANSPORT": "tcp", "NUM_BLOCKS": "8", "DEFAULT_BLOCKS": "2"}
    for k, v in env.items():
        monkeypatch.setenv(f"EMTRANSFER_{k}", v)
    monkeypatch.delenv("EMTRANSFER_CONFIG", raising=False)
    settings = et.Settings()
    async with et.EncodeNode(settings, control="tcp", encoder=SyntheticEncoder(settings)) as enc:
        monkeypatch.setenv("ENCODER_ADDR", enc.address)
        spec = importlib.util.spec_from_file_location("embed_in_fastapi", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        app = module.app
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c,
        ):
            r = await c.post("/describe", json={"num_tokens": 700})  # > 2 blocks: resumes
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["num_tokens"] == 700 and body["hidden_size"] == 64 and body["rounds"] >= 2

            r = await c.post("/describe", json={})
            assert r.status_code == 400

            tensors = synthetic_payload(settings, "p1", 300)
            sent = asyncio.ensure_future(enc.send("p1", tensors, meta={"source": "test"}))
            r = await c.post("/pull/p1")
            assert r.status_code == 200, r.text
            assert r.json()["meta"] == {"source": "test"}
            await sent

            lang: et.LanguageNode = app.state.lang
            got = await lang.encode("again", enc.address, {"rid": "again", "num_tokens": 5})
            assert payload_digest(got.tensors) == payload_digest(
                synthetic_payload(settings, "again", 5)
            )
        assert lang.leak_report() == {}


@pytest.mark.timeout(60)
async def test_the_qwen2_5_vl_example_moves_its_shapes() -> None:
    """examples/qwen2_5_vl.py: 3584-wide bfloat16 embeddings with their M-RoPE positions and
    meta arrive bit-exact, for an ordinary photo and for one larger than the pool (resumed)."""
    path = EXAMPLE.parent / "qwen2_5_vl.py"
    spec = importlib.util.spec_from_file_location("qwen2_5_vl", path)
    assert spec is not None and spec.loader is not None
    qwen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qwen)
    got = await qwen.run(1092, 1456)  # checks every byte itself
    assert got.tensors["embeddings"].shape == (39 * 52, 3584)
    assert got.tensors["embeddings"].dtype == torch.bfloat16
    assert got.tensors["mrope_positions"].shape == (39 * 52, 3)
    assert got.meta["grid_thw"] == [1, 39, 52]
    big = await qwen.run(2800, 2800)  # 10,000 tokens through a pool of 8,192
    assert big.num_tokens == 10_000 and big.rounds >= 2
