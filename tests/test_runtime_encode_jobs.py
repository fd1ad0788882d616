"""Encode jobs (``LanguageNode.encode`` -> the encode node's encoder -> the transfer): the
result arrives verified, and an encoder that fails ends the request at once on both sides."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers_runtime import make_payload, make_settings, wait_pools_clean, wait_until

import emtransfer as et


def encoder(job: dict[str, Any]) -> Any:
    if job.get("fail"):
        raise ValueError("bad job: refused by the test encoder")
    return make_payload(job["num_tokens"], seed=job["seed"]), {"seed": job["seed"]}


@pytest.mark.timeout(30)
async def test_encode_job_round_trip_and_failure() -> None:
    s = make_settings()
    async with et.EncodeNode(s, encoder=encoder) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        got = await lang.encode("ok", peer, {"num_tokens": 300, "seed": 3})
        want = make_payload(300, seed=3)
        assert all(torch.equal(got.tensors[k], v) for k, v in want.items())
        assert got.meta == {"seed": 3}
        with pytest.raises(et.TransferAborted, match="encode failed: bad job"):
            await lang.encode("bad", peer, {"fail": True})
        # the encode side holds no session for the failed job (no wait for data_timeout)
        await wait_until(lambda: not enc._senders, what="encode side sessions gone")
        assert all(not p.sessions for p in enc.peers.values())
        await wait_pools_clean(enc, lang)
