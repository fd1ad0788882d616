"""Grants under contention keep rounds few: a request of known length that fits the pool gets
its allocation whole (one round) however contended the pool is, an unknown length resumes in
partial grants no smaller than ``min_grant_blocks``, and requests beyond what the pool can
serve wait for admission (holding nothing) instead of trickling through one block at a time."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers_runtime import BLOCK, assert_same_payload, connected, make_payload, make_settings

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("known", [True, False])
async def test_a_contended_pool_still_serves_each_request_in_few_rounds(known: bool) -> None:
    s = make_settings(num_blocks=16, default_blocks=2, min_grant_blocks=8)
    rng = random.Random(5)
    sizes = [rng.randint(1, 3 * 16 * BLOCK) for _ in range(40)]  # up to 3x the pool
    async with connected(s) as (enc, lang, peer):
        pays = {f"c{i}": make_payload(n, seed=i) for i, n in enumerate(sizes)}
        sends = [asyncio.create_task(enc.send(r, p)) for r, p in pays.items()]
        recvs = {
            r: asyncio.create_task(lang.receive(r, peer, expected_tokens=len(p["embeddings"])
                                                if known else None))
            for r, p in pays.items()
        }  # fmt: skip
        for r, t in recvs.items():
            got = await asyncio.wait_for(t, 30)
            assert_same_payload(got.tensors, pays[r])
            n, pool, default, least = len(pays[r]["embeddings"]), 16 * BLOCK, 2 * BLOCK, 8 * BLOCK
            first = min(n, pool) if known else default  # round 0: whole, or the whole pool
            if known and n <= pool:
                assert got.rounds == 1, (r, n, got.rounds)
            # then partial grants of at least min_grant_blocks
            assert got.rounds <= 1 + max(0, -(-(n - first) // least)), (r, n, got.rounds)
        await asyncio.gather(*sends)
