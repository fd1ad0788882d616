"""Embed emtransfer in an existing FastAPI app (the language side of your own server).

The app owns a ``LanguageNode`` for its whole life (the lifespan), and its endpoints call

* ``lang.encode(rid, encoder, job)`` -- ask the encode node to compute ``job`` with its encoder and
  receive the embedding into this node's pool (what ``POST /v1/embeddings`` of the language
  server does), and
* ``lang.receive(rid, encoder)`` -- pull an embedding the encode side already has for ``rid``
  (``enc.send(rid, ...)`` in its code, or ``POST /v1/encode`` on an encode server).

Passing the encode node's *address* (rather than a ``Peer``) makes each call reconnect by itself
after that node restarted. Both sides must agree on the settings (same config file or variables).

Run it next to an encode server (see examples/quickstart.md)::

    python -m emtransfer serve --role encode --config config/cpu.toml     # terminal 1
    EMTRANSFER_CONFIG=config/cpu.toml uvicorn examples.embed_in_fastapi:app --port 8001
    curl -s -X POST localhost:8001/describe -H 'content-type: application/json' -d '{"num_tokens": 300}'
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

import emtransfer as et
from emtransfer.encoders import decode_image_field


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = et.Settings.load()  # EMTRANSFER_CONFIG and EMTRANSFER_* variables
    app.state.encoder = os.environ.get("ENCODER_ADDR", f"{settings.host}:{settings.bootstrap_port}")
    async with et.LanguageNode(settings) as lang:  # pool + transport, closed (nothing held) at exit
        app.state.lang = lang
        try:
            await lang.connect(app.state.encoder)  # optional: connect early, fail fast in the log
        except et.TransferError as exc:
            print(f"encode node not reachable yet ({exc}); the first request retries")
        yield


app = FastAPI(title="my multimodal app", lifespan=lifespan)


class Describe(BaseModel):
    num_tokens: int | None = Field(None, ge=1, le=32768)
    image: str | None = None  # a base64 image (PNG, JPEG, WebP, GIF for the vision encoder)


def _status(exc: et.TransferError) -> HTTPException:
    """Every emtransfer error carries its HTTP status (and whether a retry may help)."""
    headers = {"Retry-After": "1"} if exc.retryable else None
    return HTTPException(exc.http_status, f"{exc.kind}: {exc}", headers=headers)


def _summary(got: et.Received) -> dict[str, Any]:
    emb = got.tensors["embeddings"]  # [num_tokens, hidden] on the pool's device: feed it to prefill
    return {
        "rid": got.rid,
        "num_tokens": got.num_tokens,
        "hidden_size": emb.shape[1],
        "rounds": got.rounds,
        "mean": round(float(emb.float().mean()), 6),
        "meta": {k: v for k, v in got.meta.items() if k != "sender_sha256"},
        "ms": round(got.stats["elapsed_s"] * 1e3, 2),
    }


@app.post("/describe")
async def describe(body: Describe) -> dict[str, Any]:
    """Have the encode node compute the embedding, then use it here."""
    if (body.num_tokens is None) == (body.image is None):
        raise HTTPException(400, "give exactly one of num_tokens or image")
    rid = f"describe-{uuid.uuid4().hex[:12]}"
    job: dict[str, Any] = {"rid": rid}  # the encode server's encoders read rid and one of:
    lang: et.LanguageNode = app.state.lang
    try:
        if body.image is None:
            job["num_tokens"] = body.num_tokens
        else:  # the image's own bytes and their type: large ones travel in pieces
            job["image"], job["image_type"] = decode_image_field(body.image)
        got = await lang.encode(rid, app.state.encoder, job)
    except et.TransferError as exc:
        raise _status(exc) from exc
    return _summary(got)


@app.post("/pull/{rid}")
async def pull(rid: str, expected_tokens: int | None = None) -> dict[str, Any]:
    """Receive what the encode side holds for ``rid`` (pushed with enc.send / POST /v1/encode)."""
    lang: et.LanguageNode = app.state.lang
    try:
        got = await lang.receive(rid, app.state.encoder, expected_tokens=expected_tokens)
    except et.TransferError as exc:
        raise _status(exc) from exc
    return _summary(got)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8001")))
