"""A Qwen2.5-VL-shaped transfer: what an encode worker sends a prefill worker for one image.

Qwen2.5-VL's vision tower cuts an image into 14-pixel patches and merges 2x2 of them into one
token of the language model's width (3584 for the 7B model, bfloat16). The language model needs,
per image token, its 3-D M-RoPE position (temporal, height, width: ``mrope_positions``, int64
``[3]``), and per request the ``mrope_position_delta`` that continues the positions after the
image. Those are exactly emtransfer's fields and meta:

* ``embeddings`` ``[num_tokens, 3584]`` bfloat16 (always there),
* ``mrope_positions`` ``[num_tokens, 3]`` int64 (an extra field, declared in the settings),
* ``meta = {"mrope_position_delta": ..., "grid_thw": [t, h, w]}``.

The vision tower is a stand-in (random features of the right shape), the positions are Qwen2's
rule for one image. Run it (one process, both nodes, over tcp)::

    python examples/qwen2_5_vl.py --height 1092 --width 1456

It prints the shapes that arrived and checks every byte. With two machines, run
``EncodeNode`` on the vision host and ``LanguageNode`` on the prefill host with the same
settings (``qwen_settings()`` here, or the same TOML file on both).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import torch

import emtransfer as et

HIDDEN = 3584  # Qwen2.5-VL-7B's language-model width
PATCH, MERGE = 14, 2  # 14-px patches, 2x2 merged into one token


def qwen_settings(**overrides: Any) -> et.Settings:
    """Both nodes use these (a mismatch is refused at the handshake, naming the setting)."""
    base: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "dtype": "bfloat16",
        "fields": {"mrope_positions": {"shape": [3], "dtype": "int64"}},
        "block_size": 128,
        "num_blocks": 64,  # 8192 tokens, 56 MiB of bfloat16 embeddings
        "default_blocks": 8,  # 1024 tokens before the first resume
        "transport": "tcp",
    }
    return et.Settings(**{**base, **overrides})


def grid(height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) grid of merged tokens for one image, resized to a multiple of 28 px."""
    unit = PATCH * MERGE
    return 1, max(1, round(height / unit)), max(1, round(width / unit))


def mrope_positions(t: int, h: int, w: int, start: int = 0) -> torch.Tensor:
    """Qwen2-VL's 3-D positions of an image's tokens: temporal, row, column (offset by the
    text before the image)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=1).to(torch.int64) + start


def vision_tower(height: int, width: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A stand-in for the ViT + merger: features of the right shape, positions, meta."""
    t, h, w = grid(height, width)
    n = t * h * w
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16)
    pos = mrope_positions(t, h, w)
    meta = {"grid_thw": [t, h, w], "mrope_position_delta": int(pos.max()) + 1 - n}
    return {"embeddings": emb, "mrope_positions": pos}, meta


async def run(height: int, width: int, rid: str = "qwen-image-0") -> et.Received:
    settings = qwen_settings()
    tensors, meta = vision_tower(height, width)
    async with et.EncodeNode(settings, control="tcp") as enc, et.LanguageNode(settings) as lang:
        peer = await lang.connect(enc.address)
        send = asyncio.create_task(enc.send(rid, tensors, meta=meta))
        got = await lang.receive(rid, peer)  # the prefill side does not know the length
        await send
    for name, want in tensors.items():
        assert torch.equal(got.tensors[name], want), name
    assert got.meta == meta
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1092, help="image height in pixels")
    parser.add_argument("--width", type=int, default=1456, help="image width in pixels")
    args = parser.parse_args()
    got = asyncio.run(run(args.height, args.width))
    emb, pos = got.tensors["embeddings"], got.tensors["mrope_positions"]
    print(f"embeddings {tuple(emb.shape)} {emb.dtype}, mrope_positions {tuple(pos.shape)}")
    print(f"meta {got.meta}; {got.rounds} round(s); every byte checked")


if __name__ == "__main__":
    main()
