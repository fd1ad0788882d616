"""Request and response bodies of the HTTP API (they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from ..encoders import decode_image_field
from ..protocol.messages import MAX_RID_LEN

Rid = Annotated[StrictStr, Field(min_length=1, max_length=MAX_RID_LEN)]
Tokens = Annotated[StrictInt, Field(ge=1)]


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_tokens: Tokens | None = Field(
        None, description="synthetic job: this many tokens, deterministic from (rid, num_tokens)"
    )
    image: StrictStr | None = Field(
        None,
        description="vision job: a base64 image (a data: URL is accepted). It reaches the "
        "encoder as bytes with their media type (image_type); the built-in vision encoder "
        "decodes PNG, JPEG, WebP and GIF",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> _Job:
        if (self.num_tokens is None) == (self.image is None):
            raise ValueError("give exactly one of num_tokens or image")
        return self

    def job(self, rid: str) -> dict[str, Any]:
        """What the encoder gets: an image as raw bytes and their media type (base64 is
        decoded here, the image itself is not: that is the encoder's business)."""
        if self.image is not None:
            raw, kind = decode_image_field(self.image)
            return {"rid": rid, "image": raw, "image_type": kind}
        return {"rid": rid, "num_tokens": self.num_tokens}


class EncodeRequest(_Job):
    rid: Rid = Field(description="request id the language node will pull")
    receiver: str | None = Field(
        None,
        max_length=128,
        description="node id of the only language node that may pull it (its /health node_id); "
        "absent: any connected language node",
    )


class EmbeddingsRequest(_Job):
    rid: Rid | None = Field(None, description="request id (generated when absent)")
    expected_tokens: Tokens | None = Field(
        None, description="length hint: allocate exactly this much (else default_blocks, resuming)"
    )


class ReceiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rid: Rid = Field(description="the request id an encode node holds (POST /v1/encode there)")
    encoder: StrictStr | None = Field(
        None, description="the encode node's bootstrap address (needed with several encoders)"
    )
    expected_tokens: Tokens | None = None


class EncodeResponse(BaseModel):
    rid: str
    num_tokens: int
    sha256: str = Field(description="digest of the payload sent (every field, in order)")
    rounds: int
    timings_ms: dict[str, float]


class EmbeddingsResponse(BaseModel):
    rid: str
    num_tokens: int
    hidden_size: int
    dtype: str
    rounds: int
    sha256: str = Field(description="digest of what arrived, computed on the language node")
    sender_sha256: str | None = Field(description="digest the encode node computed before sending")
    encoder: str = Field(description="bootstrap address of the encode node that served it")
    meta: dict[str, Any] = Field(description="what the encoder put in meta")
    timings_ms: dict[str, float]


class ErrorBody(BaseModel):
    error: str = Field(description="kind: invalid_request, conflict, unavailable, timeout, ...")
    detail: str = Field(description="what went wrong, naming the problem")
