"""The encode role's HTTP server: an EncodeNode that runs the configured encoder for the jobs
language nodes send it, and ``POST /v1/encode`` to compute a payload and hold it for a pull."""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from fastapi import FastAPI

from ..buffers import payload_digest
from ..encoders import Encoder, load_encoder
from ..errors import InvalidRequest, PayloadError
from ..runtime import EncodeNode
from .common import ERROR_RESPONSES, HTTPFailure, NodeService, guarded, log, make_app
from .options import ServeOptions
from .schemas import EncodeRequest, EncodeResponse


class EncoderRunner:
    """Wraps an encoder for the node: heavy work off the event loop, the payload checked
    against the fields, the sender's digest (``sender_sha256``) and ``encode_ms`` in meta."""

    def __init__(self, encoder: Encoder, service: EncodeService) -> None:
        self.encoder = encoder
        self.service = service
        call = getattr(encoder, "__call__", None)  # noqa: B004 - a class instance's __call__
        self.is_async = inspect.iscoroutinefunction(encoder) or inspect.iscoroutinefunction(call)

    def _finish(self, out: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        tensors, meta = out if isinstance(out, tuple) else (out, None)
        if not isinstance(tensors, dict):
            raise PayloadError(
                f"the encoder returned {type(tensors).__name__}, not a dict of tensors"
            )
        if meta is not None and not isinstance(meta, dict):
            raise PayloadError(f"the encoder's meta is {type(meta).__name__}, not a dict")
        registry = self.service.node.registry
        registry.check_payload(tensors)
        return tensors, dict(meta or {}), payload_digest(tensors, list(registry.layouts))

    def _run_sync(self, job: dict[str, Any]) -> Any:
        out = self.encoder(job)
        return out if inspect.isawaitable(out) else self._finish(out)

    async def __call__(self, job: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t0 = time.perf_counter()
        if self.is_async:
            done = await self.service.offload(self._finish, await self.encoder(job))
        else:
            done = await self.service.offload(self._run_sync, job)
            if inspect.isawaitable(done):  # a plain callable that returned a coroutine
                done = await self.service.offload(self._finish, await done)
        tensors, meta, digest = done
        meta["sender_sha256"] = digest
        meta["encode_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return tensors, meta


class EncodeService(NodeService):
    role = "encode"
    node: EncodeNode

    def __init__(self, options: ServeOptions) -> None:
        super().__init__(options)
        encoder = load_encoder(
            options.encoder,
            options.settings,
            max_tokens=options.max_tokens,
            patch_size=options.patch_size,
        )
        self.runner = EncoderRunner(encoder, self)
        self.node = EncodeNode(options.settings, control="tcp", encoder=self.runner)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "address": self.node.address, "encoder": self.options.encoder}

    async def encode(self, req: EncodeRequest) -> EncodeResponse:
        t0 = time.perf_counter()
        if req.num_tokens is not None and req.num_tokens > self.options.max_tokens:
            raise HTTPFailure(
                400,
                "invalid_request",
                f"num_tokens={req.num_tokens} is above the maximum {self.options.max_tokens} "
                "(--max-tokens)",
            )
        if req.image is None:  # a token count: nothing to decode, not worth a thread hop
            job = req.job(req.rid)
        else:  # an image's base64, decoded off the loop
            job = await guarded(req.rid, self.offload(req.job, req.rid))
        tensors, meta = await guarded(req.rid, self._compute(job))
        stats = await guarded(req.rid, self.node.send(req.rid, tensors, meta, peer=req.receiver))
        return EncodeResponse(
            rid=req.rid,
            num_tokens=stats.num_tokens,
            sha256=meta["sender_sha256"],
            rounds=stats.rounds,
            timings_ms={
                "encode": meta["encode_ms"],
                "transfer": round(stats.transfer_s * 1e3, 3),
                "alloc_wait": round(stats.alloc_wait_s * 1e3, 3),
                "send": round(stats.elapsed_s * 1e3, 3),
                "total": round((time.perf_counter() - t0) * 1e3, 3),
            },
        )

    async def _compute(self, job: dict[str, Any]) -> Any:
        try:
            return await self.runner(job)
        except InvalidRequest:
            raise
        except Exception as exc:  # the encoder's fault, not the input's
            log.error("encoder failed", rid=job.get("rid"), error=repr(exc), exc_info=True)
            raise HTTPFailure(500, "encoder_failed", f"the encoder failed: {exc!r}") from exc


def create_encode_app(service: EncodeService) -> FastAPI:
    app = make_app(
        service,
        "emtransfer encode node",
        "Computes embeddings with the configured encoder and pushes them into the blocks of "
        "the language node that asks for them.",
    )

    @app.post(
        "/v1/encode",
        response_model=EncodeResponse,
        responses=ERROR_RESPONSES,
        summary="compute a job and hold the payload until a language node pulls rid",
    )
    async def encode(req: EncodeRequest) -> EncodeResponse:
        return await service.encode(req)

    return app


__all__ = ["EncodeService", "EncoderRunner", "create_encode_app"]
