"""The sender stages its next round while it waits for the Resume, but only in blocks that are
free at that moment, and gives them back as soon as anyone has to wait for blocks: the
speculation never makes another request wait, and the payload still arrives intact."""

from __future__ import annotations

import asyncio

import pytest
from helpers_runtime import (
    BLOCK,
    assert_same_payload,
    make_payload,
    make_settings,
    sender_session,
    state_of,
    wait_pools_clean,
    wait_until,
)

import emtransfer as et


@pytest.mark.timeout(30)
async def test_prestaged_blocks_are_given_back_to_a_waiter() -> None:
    enc_s = make_settings(num_blocks=8, default_blocks=2)
    lang_s = make_settings(num_blocks=64, default_blocks=2)
    async with et.EncodeNode(enc_s) as enc, et.LanguageNode(lang_s) as lang:
        peer = await lang.connect(enc.address)
        # the language pool has exactly one default allocation free, so B (queued behind A's
        # round 0) takes A's blocks when A frees them, and A's Resume waits: A's sender sits
        # in WAIT_RESUME holding what it pre-staged
        hog = lang.allocator.try_alloc((64 - 2) * BLOCK, "hog")
        assert hog is not None
        want = make_payload(200, seed=5)
        recv_a = asyncio.create_task(lang.receive("a", peer))
        await wait_until(lambda: lang.allocator.num_free == 0, what="A holds round 0")
        recv_b = asyncio.create_task(lang.receive("b", peer))
        await wait_until(lambda: lang.allocator.num_waiters == 1, what="B queued")
        send_a = asyncio.create_task(enc.send("a", want))
        await wait_until(lambda: state_of(sender_session(enc, "a")) == "WAIT_RESUME", what="A")
        assert enc.allocator.num_free < enc.allocator.num_blocks  # pre-staged blocks held
        # anyone who must wait for encode blocks gets them back at once
        probe = await asyncio.wait_for(
            enc.allocator.alloc(enc.allocator.capacity_tokens, "probe", timeout=5), 5
        )
        enc.allocator.free(probe)
        # B has nothing to receive: abort it; A resumes and arrives intact
        recv_b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recv_b
        lang.allocator.free(hog)
        got = await asyncio.wait_for(recv_a, 10)
        await asyncio.wait_for(send_a, 10)
        assert got.rounds >= 2
        assert_same_payload(got.tensors, want)
        await wait_pools_clean(enc, lang)


@pytest.mark.timeout(30)
async def test_tokens_staged_at_send_are_copied_once_across_rounds() -> None:
    """send() stages the payload before the receiver's grant is known; a grant smaller than
    that (a resumed transfer) must not throw the rest away and copy it again: every token is
    copied into the encode pool exactly once."""
    s = make_settings(num_blocks=64, default_blocks=2)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        copied: list[int] = []
        real = enc.registry.write

        def counting(allocation, tensors, *, count, src_start=0, dst_start=0):  # type: ignore[no-untyped-def]
            copied.append(count)
            real(allocation, tensors, count=count, src_start=src_start, dst_start=dst_start)

        enc.registry.write = counting  # type: ignore[method-assign]
        want = make_payload(5 * 2 * BLOCK + 7, seed=9)  # five default allocations and a bit
        send = asyncio.create_task(enc.send("once", want))
        got = await lang.receive("once", peer)  # unknown length: resumes
        await send
        assert got.rounds == 2  # the default allocation, then the rest
        assert_same_payload(got.tensors, want)
        assert sum(copied) == len(want["embeddings"]), copied
        await wait_pools_clean(enc, lang)
