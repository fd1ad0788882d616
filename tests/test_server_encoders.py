"""The built-in encoders, encoder loading, and the encode server's encoder wrapper (in-process)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from typing import Any

import pytest
import torch

import emtransfer as et
from emtransfer.buffers import BufferRegistry, payload_digest
from emtransfer.demo import synthetic_payload
from emtransfer.encoders import (
    IMAGE_FORMATS,
    AutoEncoder,
    JobError,
    SyntheticEncoder,
    VisionEncoder,
    check_image,
    decode_image_field,
    image_type,
    load_encoder,
    patch_grid,
)

FIELDS = {"mrope_positions": {"shape": [3], "dtype": "int64"}}


@pytest.fixture
def settings() -> et.Settings:
    return et.Settings(hidden_size=64, dtype="bfloat16", fields=FIELDS, transport="tcp")


def image(fmt: str, width: int, height: int, seed: int = 0) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


# -- synthetic -----------------------------------------------------------------------------------
def test_synthetic_is_deterministic_with_every_field(settings: et.Settings) -> None:
    enc = SyntheticEncoder(settings)
    a, meta = enc({"rid": "r1", "num_tokens": 130})
    b, _ = enc({"rid": "r1", "num_tokens": 130})
    c, _ = enc({"rid": "r2", "num_tokens": 130})
    assert meta == {"num_tokens": 130}
    assert a["embeddings"].shape == (130, 64) and a["embeddings"].dtype == torch.bfloat16
    assert a["mrope_positions"].shape == (130, 3) and a["mrope_positions"].dtype == torch.int64
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings"], c["embeddings"])
    want = synthetic_payload(settings, "r1", 130)  # the demo's payload: the same bytes
    assert payload_digest(a) == payload_digest(want)


@pytest.mark.parametrize(
    ("job", "needle"),
    [
        ({"rid": "r"}, "num_tokens is missing"),
        ({"num_tokens": 0}, "must be >= 1"),
        ({"num_tokens": -4}, "must be >= 1"),
        ({"num_tokens": 2.0}, "must be an integer"),
        ({"num_tokens": True}, "must be an integer"),
        ({"num_tokens": 101}, "above the maximum 100"),
        ({"num_tokens": 5, "rid": 3}, "rid must be a string"),
        ({"image": "AAAA"}, "takes num_tokens, not an image"),
    ],
)
def test_synthetic_refuses_bad_jobs(
    settings: et.Settings, job: dict[str, Any], needle: str
) -> None:
    with pytest.raises(JobError, match=needle) as info:
        SyntheticEncoder(settings, max_tokens=100)(job)
    assert str(info.value).startswith("bad job: ")  # what the language server maps to 400


# -- vision --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "grid"),
    [((64, 48), (3, 4)), ((16, 16), (1, 1)), ((1, 1), (1, 1)), ((100, 37), (2, 6)),
     ((24, 24), (2, 2)), ((23, 40), (3, 1))],
)  # fmt: skip
def test_patch_grid_rounds_to_the_nearest_multiple(
    size: tuple[int, int], grid: tuple[int, int]
) -> None:
    assert patch_grid(*size, 16) == grid


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_vision_tokens_follow_the_image_size(settings: et.Settings, fmt: str) -> None:
    enc = VisionEncoder(settings, patch_size=16)
    for (w, h), (rows, cols) in [((64, 48), (3, 4)), ((160, 120), (8, 10)), ((30, 70), (4, 2))]:
        tensors, meta = enc({"image": image(fmt, w, h)})
        n = rows * cols
        assert meta["grid"] == [rows, cols] and meta["num_tokens"] == n
        assert meta["image_size"] == [w, h]
        emb = tensors["embeddings"]
        assert emb.shape == (n, 64) and emb.dtype == torch.bfloat16
        assert torch.isfinite(emb.float()).all()
        pos = tensors["mrope_positions"]
        assert pos.dtype == torch.int64 and pos.shape == (n, 3)
        assert pos[:, 0].eq(0).all()
        assert pos[-1].tolist() == [0, rows - 1, cols - 1]
        assert pos[cols].tolist() == [0, 1, 0]  # row-major: the second row starts at cols
        BufferRegistry.from_settings(settings).check_payload(tensors)  # fits the node's fields


def test_vision_is_deterministic_and_depends_on_the_pixels(settings: et.Settings) -> None:
    img_a, img_b = image("PNG", 32, 32, seed=1), image("PNG", 32, 32, seed=2)
    a1, _ = VisionEncoder(settings)({"image": img_a})
    a2, _ = VisionEncoder(settings)({"image": f"data:image/png;base64,{img_a}"})  # fresh weights
    b, _ = VisionEncoder(settings)({"image": img_b})
    assert torch.equal(a1["embeddings"], a2["embeddings"])
    assert not torch.equal(a1["embeddings"], b["embeddings"])
    other_patch, _ = VisionEncoder(settings, patch_size=8)({"image": img_a})
    assert other_patch["embeddings"].shape[0] == 16


def test_vision_float_dtypes(settings: et.Settings) -> None:
    s = et.Settings(hidden_size=32, dtype="float16")
    tensors, _ = VisionEncoder(s)({"image": image("PNG", 32, 16)})
    assert tensors["embeddings"].dtype == torch.float16 and set(tensors) == {"embeddings"}


def _truncated_png() -> str:
    raw = base64.b64decode(image("PNG", 64, 64))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


@pytest.mark.parametrize(
    ("job", "needle"),
    [
        ({"image": "***"}, "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a....").decode()}, "cannot be decoded"),
        ({"image": base64.b64encode(b"BM not a format we take").decode()}, "not a PNG, JPEG"),
        ({"image": ""}, "non-empty base64"),
        ({"image": b""}, "image is empty"),
        ({"image": 5}, "bytes or a non-empty base64"),
        ({"image": "data:image/png;base64"}, "no ','"),
        ({"image": _truncated_png()}, "cannot be decoded"),
        ({"num_tokens": 3}, "takes an image"),
        ({}, "image is missing"),
    ],
)
def test_vision_refuses_bad_images(settings: et.Settings, job: dict[str, Any], needle: str) -> None:
    with pytest.raises(JobError, match=needle):
        VisionEncoder(settings)(job)


def test_vision_checks_the_token_count_before_decoding(settings: et.Settings) -> None:
    with pytest.raises(JobError, match=r"is 48 tokens .* above the maximum 40"):
        VisionEncoder(settings, max_tokens=40)({"image": image("PNG", 128, 96)})


def test_check_image_is_cheap_validation() -> None:
    assert check_image(image("JPEG", 40, 30)) == (40, 30)
    with pytest.raises(JobError, match="not a PNG, JPEG, WebP or GIF"):
        check_image(base64.b64encode(b"\x00" * 64).decode())
    with pytest.raises(JobError):
        check_image(_truncated_png())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_vision_decodes_every_format_from_bytes_or_base64(settings: et.Settings, fmt: str) -> None:
    """PNG, JPEG, WebP and GIF, as the raw bytes a language node sends (with their type) or as
    base64; the media type is read off the bytes when no data URL names it."""
    b64 = image(fmt, 48, 32)
    raw, kind = decode_image_field(b64)
    assert kind == {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp",
                    "GIF": "image/gif"}[fmt]  # fmt: skip
    assert decode_image_field(f"data:image/x-custom;base64,{b64}") == (raw, "image/x-custom")
    assert image_type(b"\x00\x01") == "application/octet-stream"
    enc = VisionEncoder(settings)
    from_bytes = enc({"image": raw, "image_type": kind})
    from_b64 = enc({"image": b64})
    assert from_bytes[0]["embeddings"].shape == (6, 64)  # 48x32 in 16-px patches
    assert torch.equal(from_bytes[0]["embeddings"], from_b64[0]["embeddings"])
    assert fmt in IMAGE_FORMATS


def test_auto_dispatches_on_the_job(settings: et.Settings) -> None:
    enc = load_encoder("auto", settings)
    assert isinstance(enc, AutoEncoder)
    assert enc({"rid": "x", "num_tokens": 7})[0]["embeddings"].shape == (7, 64)
    assert enc({"image": image("PNG", 32, 32)})[1]["grid"] == [2, 2]
    with pytest.raises(JobError, match="either num_tokens or image"):
        enc({"num_tokens": 7, "image": "AAAA"})


# -- loading -------------------------------------------------------------------------------------
def test_load_builtin_and_module_factory(settings: et.Settings) -> None:
    assert isinstance(load_encoder("synthetic", settings), SyntheticEncoder)
    assert load_encoder("vision", settings, patch_size=14).patch_size == 14  # type: ignore[attr-defined]
    fn = load_encoder("server_harness:gated_encoder", settings)
    assert callable(fn) and asyncio.iscoroutinefunction(fn)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nonsense", "choose synthetic, vision, auto or module:factory"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("emtransfer.encoders:nothing_here", "has no 'nothing_here'"),
        ("emtransfer.encoders:IMAGE_FORMATS", "is not callable"),
        ("emtransfer.encoders:check_image", "the factory failed"),
        ("builtins:str", "the factory returned"),
    ],
)
def test_load_errors_name_the_problem(settings: et.Settings, spec: str, needle: str) -> None:
    with pytest.raises(et.ConfigError, match=needle):
        load_encoder(spec, settings)


# -- the wrapper the encode server hands to its node ----------------------------------------------
def _service(settings: et.Settings, encoder: str) -> Any:
    from emtransfer.server.encode_app import EncodeService
    from emtransfer.server.options import ServeOptions

    return EncodeService(ServeOptions(role="encode", settings=settings, http_host="127.0.0.1",
                                      port=0, encoder=encoder))  # fmt: skip


async def test_runner_adds_the_sender_digest(settings: et.Settings) -> None:
    svc = _service(settings, "synthetic")
    _, meta = await svc.runner({"rid": "q", "num_tokens": 9})
    assert meta["num_tokens"] == 9 and meta["encode_ms"] >= 0
    assert meta["sender_sha256"] == payload_digest(
        synthetic_payload(settings, "q", 9), ["embeddings", "mrope_positions"]
    )
    svc.executor.shutdown()


threads: list[str] = []


def recording_factory(settings: et.Settings) -> Any:
    def encode(job: dict[str, Any]) -> Any:
        threads.append(threading.current_thread().name)
        if job.get("bad"):
            return {"embeddings": torch.zeros(3, 5)}  # wrong width
        return synthetic_payload(settings, "x", 4)

    return encode


async def test_runner_runs_sync_encoders_off_the_loop_and_checks_fields(
    settings: et.Settings,
) -> None:
    svc = _service(settings, "test_server_encoders:recording_factory")
    await svc.runner({})
    assert threads and threads[-1] != threading.current_thread().name
    with pytest.raises(et.PayloadError):
        await svc.runner({"bad": True})
    svc.executor.shutdown()
