"""A bug inside a session (here: a copy that raises) ends that request with a TransferError,
keeps blocks a late write could reach out of circulation until the grant it sent has surely
expired (not merely until the peer is gone), and leaves the node serving other requests."""

from __future__ import annotations

import asyncio

import pytest
from helpers_runtime import make_payload, make_settings, wait_pools_clean, wait_until

import emtransfer as et
from emtransfer.runtime.language import ReceiverSession


@pytest.mark.timeout(30)
async def test_crashing_session_holds_blocks_until_the_grant_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # short grants, so the expiry comes within the test: chunk_timeout + write_timeout + margin
    s = make_settings(chunk_timeout=1.0, write_timeout=0.5, heartbeat_interval=0.05)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        crashed: list[ReceiverSession] = []

        async def broken(self: ReceiverSession, action: object) -> None:
            crashed.append(self)
            raise RuntimeError("copy exploded")

        monkeypatch.setattr(ReceiverSession, "_deliver", broken)
        send = asyncio.create_task(enc.send("x", make_payload(50, seed=1)))
        with pytest.raises(et.TransferError, match="copy exploded"):
            await lang.receive("x", peer)
        await asyncio.wait_for(send, 10)  # the sender finished its write before the crash
        loop = asyncio.get_running_loop()
        [session] = crashed
        expiry = session.grant_expiry()
        assert loop.time() < expiry
        # held: quarantined, not reusable yet, although the connection is alive and well
        held = s.default_blocks
        assert lang.allocator.num_quarantined == held
        assert lang.allocator.num_free == lang.allocator.num_blocks - held
        assert "x" not in peer.sessions  # the rid is free for a retry at once
        monkeypatch.undo()
        # the node still serves meanwhile (the rid too)
        t = asyncio.create_task(enc.send("x", make_payload(70, seed=2)))
        got = await lang.receive("x", peer)
        await t
        assert got.num_tokens == 70
        if loop.time() < expiry - 0.01:
            assert lang.allocator.num_quarantined == held, "released before the grant expired"
        # released once the grant has expired, with the peer still connected
        await wait_until(
            lambda: lang.allocator.num_quarantined == 0,
            expiry - loop.time() + 2.0,
            "the quarantine to end at the grant's expiry",
        )
        assert loop.time() >= expiry - 0.01, "released before the grant expired"
        assert peer.alive
        await wait_pools_clean(enc, lang)


@pytest.mark.timeout(30)
async def test_close_releases_a_crashed_sessions_quarantine_before_its_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The expiry timer of a crashed session belongs to the node: closing it deregisters the
    pools (nothing can land any more), so the blocks go back then rather than at an expiry the
    node no longer waits for, and the leak report stays empty."""
    s = make_settings(chunk_timeout=30.0, write_timeout=10.0, heartbeat_interval=0.05)
    enc = et.EncodeNode(s)
    lang = et.LanguageNode(s)
    await enc.start()
    await lang.start()
    try:
        peer = await lang.connect(enc.address)

        async def broken(self: ReceiverSession, action: object) -> None:
            raise RuntimeError("copy exploded")

        monkeypatch.setattr(ReceiverSession, "_deliver", broken)
        send = asyncio.create_task(enc.send("x", make_payload(50, seed=1)))
        with pytest.raises(et.TransferError, match="copy exploded"):
            await lang.receive("x", peer)
        await asyncio.wait_for(send, 10)
        assert lang.allocator.num_quarantined == s.default_blocks  # the expiry is ~40 s away
    finally:
        await lang.close()
        await enc.close()
    assert lang.allocator.num_quarantined == 0
    assert lang.allocator.num_free == lang.allocator.num_blocks
    assert not lang.leak_report()
