"""Encode jobs (``LanguageNode.encode`` -> the encode node's encoder -> the transfer): the
result arrives verified, an encoder that fails ends the request at once on both sides, and a
job's result goes to the connection (and attempt) that asked for it, and nowhere else."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from helpers_runtime import (
    make_payload,
    make_settings,
    receiver_session,
    state_of,
    wait_pools_clean,
    wait_until,
)

import emtransfer as et
from emtransfer.protocol import messages as m


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
        await wait_until(lambda: not enc.senders, what="encode side sessions gone")
        assert all(not p.sessions for p in enc.peers.values())
        await wait_pools_clean(enc, lang)


@pytest.mark.timeout(30)
async def test_an_encode_jobs_result_belongs_to_the_connection_that_asked() -> None:
    s = make_settings()
    gate = asyncio.Event()

    async def gated(job: dict[str, Any]) -> Any:
        await asyncio.wait_for(gate.wait(), 10)  # released by the test
        return encoder(job)

    async with (
        et.EncodeNode(s, encoder=gated) as enc,
        et.LanguageNode(s) as lang,
        et.LanguageNode(s) as other,
    ):
        peer = await lang.connect(enc.address)
        other_peer = await other.connect(enc.address)
        aborts: list[m.Abort] = []
        original = lang._on_message

        def on_message(p: et.Peer, msg: Any) -> None:
            if isinstance(msg, m.Abort):
                aborts.append(msg)
            original(p, msg)

        lang._on_message = on_message  # type: ignore[method-assign]
        job = {"num_tokens": 40, "seed": 4}
        mine = asyncio.create_task(lang.encode("j", peer, job))
        [enc_side] = enc.peers_named(lang.node_id)
        await wait_until(
            lambda: state_of(enc_side.sessions.get("j")) == "WAIT_DATA", what="the job's Init"
        )
        tag = receiver_session(peer, "j").session_tag
        # the same rid again on the same connection (another attempt): refused, the first
        # one untouched
        peer.channel.send(m.Encode(rid="j", job=job, session="again"))
        await wait_until(lambda: bool(aborts), what="the refusal")
        [abort] = aborts
        assert abort.rid == "j" and abort.session == "again"
        assert "already in flight on this connection" in abort.reason
        assert receiver_session(peer, "j").session_tag == tag and not mine.done()
        # another connection asking for the rid waits on its own; it never gets the job
        theirs = asyncio.create_task(other.receive("j", other_peer))
        [other_side] = enc.peers_named(other.node_id)
        await wait_until(
            lambda: state_of(other_side.sessions.get("j")) == "WAIT_DATA", what="their Init"
        )
        gate.set()
        got = await asyncio.wait_for(mine, 10)
        want = make_payload(40, seed=4)
        assert all(torch.equal(got.tensors[k], v) for k, v in want.items())
        assert not theirs.done()
        assert state_of(other_side.sessions.get("j")) == "WAIT_DATA"
        theirs.cancel()
        with pytest.raises(asyncio.CancelledError):
            await theirs
        await wait_until(lambda: not enc.senders, what="encode side sessions gone")
        await wait_pools_clean(enc, lang, other)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_an_encoder_slower_than_chunk_timeout_but_within_data_timeout(transport: str) -> None:
    """The encode node holds the job's Init for up to data_timeout while the encoder runs:
    the receiver waits that long too (encode_timeout), so a 1 s encode succeeds with
    chunk_timeout=0.3; one that never finishes fails with the sender's words, at its
    data_timeout; a receive of a rid nobody sends says so, at chunk_timeout."""
    s = make_settings(transport=transport, chunk_timeout=0.3, data_timeout=4.0)
    never = asyncio.Event()

    async def slow(job: dict[str, Any]) -> Any:
        if job.get("hold"):
            await never.wait()  # an encoder that never finishes
        await asyncio.sleep(1.0)  # the model's own time: longer than chunk_timeout
        return encoder(job)

    async with et.EncodeNode(s, encoder=slow) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        got = await lang.encode("slow", peer, {"num_tokens": 100, "seed": 1})
        assert got.num_tokens == 100 and got.meta == {"seed": 1}
        with pytest.raises(et.TransferTimeout, match=r"has no payload for this rid after 0\.3s"):
            await lang.receive("nobody-sends-this", peer)
        short = make_settings(transport=transport, chunk_timeout=2.0, data_timeout=0.5)
        async with et.EncodeNode(short, encoder=slow) as enc2, et.LanguageNode(short) as lang2:
            peer2 = await lang2.connect(enc2.address)
            with pytest.raises(
                et.TransferError, match=r"payload was not ready in time \(data_timeout\)"
            ):
                await lang2.encode("held", peer2, {"hold": True})
            await wait_pools_clean(enc2, lang2)
        await wait_pools_clean(enc, lang)
