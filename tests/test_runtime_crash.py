"""A bug inside a session (here: a copy that raises) ends that request with a TransferError,
keeps blocks a late write could reach out of circulation until the peer is gone, and leaves
the node serving other requests."""

from __future__ import annotations

import asyncio

import pytest
from helpers_runtime import make_payload, make_settings, wait_pools_clean, wait_until

import emtransfer as et
from emtransfer.runtime.language import ReceiverSession


@pytest.mark.timeout(30)
async def test_crashing_session_holds_blocks_until_teardown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = make_settings()
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)

        async def broken(self: ReceiverSession, action: object) -> None:
            raise RuntimeError("copy exploded")

        monkeypatch.setattr(ReceiverSession, "_deliver", broken)
        send = asyncio.create_task(enc.send("x", make_payload(50, seed=1)))
        with pytest.raises(et.TransferError, match="copy exploded"):
            await lang.receive("x", peer)
        await asyncio.wait_for(send, 10)  # the sender finished its write before the crash
        assert lang.allocator.num_free < lang.allocator.num_blocks  # held: not reusable yet
        monkeypatch.undo()
        # the node still serves
        t = asyncio.create_task(enc.send("y", make_payload(70, seed=2)))
        got = await lang.receive("y", peer)
        await t
        assert got.num_tokens == 70
        peer.channel.close()  # teardown: nothing can land any more
        await wait_until(lambda: not peer.alive, what="peer torn down")
        await wait_pools_clean(enc, lang)
