"""The language role's HTTP server: ``POST /v1/embeddings`` forwards a job to an encode node
(round-robin, skipping dead ones), receives the payload into this node's pool and answers with
its digest; ``POST /v1/receive`` pulls a payload an encode node already holds."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI

from ..buffers import payload_digest
from ..runtime import LanguageNode, Peer, Received
from .common import ERROR_RESPONSES, HTTPFailure, NodeService, guarded, make_app, note_rid
from .options import ServeOptions
from .pool import EncoderPool, EncoderState
from .schemas import EmbeddingsRequest, EmbeddingsResponse, ReceiveRequest


class LanguageService(NodeService):
    role = "language"
    node: LanguageNode

    def __init__(self, options: ServeOptions) -> None:
        super().__init__(options)
        self.node = LanguageNode(options.settings)
        self.pool = EncoderPool(self.node, options.encoder_addrs, options.retry_interval)

    async def start(self) -> None:
        if not self._started:
            await super().start()
            self.pool.start()  # connects in the background; /health tells when they are up

    async def close(self) -> None:
        await self.pool.close()
        await super().close()

    def health(self) -> dict[str, Any]:
        encoders = self.pool.describe()
        return {
            **self.node.health(),
            "ready": self.serving and any(e["up"] for e in encoders),
            "encoders": encoders,
        }

    async def embeddings(self, req: EmbeddingsRequest) -> EmbeddingsResponse:
        t0 = time.perf_counter()
        rid = req.rid or f"emb-{uuid.uuid4().hex}"
        note_rid(rid)
        if req.num_tokens is not None and req.num_tokens > self.options.max_tokens:
            raise HTTPFailure(
                400,
                "invalid_request",
                f"num_tokens={req.num_tokens} is above the maximum {self.options.max_tokens} "
                "(--max-tokens)",
            )
        if req.image is None:  # a token count: nothing to decode, not worth a thread hop
            job = req.job(rid)
        else:  # an image's base64, decoded off the loop
            job = await guarded(rid, self.offload(req.job, rid))

        def call(peer: Peer) -> Any:
            return self.node.encode(rid, peer, job, expected_tokens=req.expected_tokens)

        state, got = await guarded(rid, self.pool.run(call))
        return await self._answer(rid, state, got, t0)

    async def receive(self, req: ReceiveRequest) -> EmbeddingsResponse:
        t0 = time.perf_counter()
        note_rid(req.rid)
        addresses = [s.address for s in self.pool.states]
        address = req.encoder
        if address is None:
            if len(addresses) > 1:
                raise HTTPFailure(
                    400, "invalid_request", f"name the encoder holding rid: one of {addresses}"
                )
            address = addresses[0]
        state = self.pool.get(address)
        if state is None:
            raise HTTPFailure(
                400, "invalid_request", f"unknown encoder {address!r}: one of {addresses}"
            )
        peer = state.peer
        if peer is None or not peer.alive:
            raise HTTPFailure(503, "unavailable", f"encode node {address} is down: {state.error}")
        got = await guarded(
            req.rid, self.node.receive(req.rid, peer, expected_tokens=req.expected_tokens)
        )
        state.served += 1
        return await self._answer(req.rid, state, got, t0)

    async def _answer(
        self, rid: str, state: EncoderState, got: Received, t0: float
    ) -> EmbeddingsResponse:
        t1 = time.perf_counter()
        order = list(self.node.registry.layouts)
        digest = await self.offload(payload_digest, got.tensors, order)
        meta = dict(got.meta)
        sender = meta.pop("sender_sha256", None)
        encode_ms = meta.pop("encode_ms", None)
        st = got.stats
        timings = {
            "receive": round(st.get("elapsed_s", 0.0) * 1e3, 3),
            "transfer": round(st.get("transfer_s", 0.0) * 1e3, 3),
            "alloc_wait": round(st.get("alloc_wait_s", 0.0) * 1e3, 3),
            "copy": round(st.get("copy_s", 0.0) * 1e3, 3),
            "digest": round((time.perf_counter() - t1) * 1e3, 3),
            "total": round((time.perf_counter() - t0) * 1e3, 3),
        }
        if isinstance(encode_ms, int | float):
            timings["encode"] = float(encode_ms)
        emb = got.tensors["embeddings"]
        return EmbeddingsResponse(
            rid=rid,
            num_tokens=got.num_tokens,
            hidden_size=int(emb.shape[1]),
            dtype=str(emb.dtype).removeprefix("torch."),
            rounds=got.rounds,
            sha256=digest,
            sender_sha256=sender if isinstance(sender, str) else None,
            encoder=state.address,
            meta=meta,
            timings_ms=timings,
        )


def create_language_app(service: LanguageService) -> FastAPI:
    app = make_app(
        service,
        "emtransfer language node",
        "Asks encode nodes for embeddings and receives them into this node's block pool.",
    )

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingsResponse,
        responses=ERROR_RESPONSES,
        summary="have an encode node compute a job and receive the embedding",
    )
    async def embeddings(req: EmbeddingsRequest) -> EmbeddingsResponse:
        return await service.embeddings(req)

    @app.post(
        "/v1/receive",
        response_model=EmbeddingsResponse,
        responses=ERROR_RESPONSES,
        summary="pull the payload an encode node holds for rid (see POST /v1/encode there)",
    )
    async def receive(req: ReceiveRequest) -> EmbeddingsResponse:
        return await service.receive(req)

    return app
