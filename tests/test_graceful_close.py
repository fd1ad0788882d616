"""An encode node that closes the moment its sends returned loses none of them: over tcp a
returned write has its bytes in the kernel, not yet in the peer's pool, and closing used to
tear the data connection down (and the control connection after it) while the receiver was
still reading, which failed the last requests as "peer lost while round 0 was landing". Now
close half-closes each data connection and waits until the peer has read it all. Over nixl
the round's notification had arrived, but the receiver's wait was between two polls when the
control connection's end removed the peer, and the removal dropped what had arrived; now a
wait under way sees what arrived before the removal (the transports' contract, test_transport_
nixl and test_transport_mooncake show it deterministically). Mooncake's removal failed its
waiters without a last look in the same way.

Two processes, several rounds (the window is the last few in-flight writes)."""

from __future__ import annotations

import pytest
from runtime_harness import NodeProc, transport_params

pytestmark = pytest.mark.timeout(180)
ROUNDS, CONCURRENT, TOKENS = 4, 48, 700


@pytest.mark.parametrize("transport", transport_params("tcp", "nixl", "mooncake"))
def test_closing_right_after_the_sends_returned_loses_nothing(transport: str) -> None:
    lang = NodeProc("language", transport)
    failures: list[str] = []
    try:
        for r in range(ROUNDS):
            enc = NodeProc("encode", transport)
            try:
                rids = [f"g{r}-{i}" for i in range(CONCURRENT)]
                recvs = [lang.start("receive", x, enc.address, TOKENS, i, TOKENS)
                         for i, x in enumerate(rids)]  # fmt: skip
                sends = [enc.start("send", x, TOKENS, i, None) for i, x in enumerate(rids)]
                for cid in sends:
                    enc.wait(cid, timeout=60)
                leaks = enc.stop()  # at once: the last writes are still on their way
                assert not leaks, leaks
            finally:
                enc.kill()
            for x, cid in zip(rids, recvs, strict=True):
                try:
                    got = lang.wait(cid, timeout=60)
                    if not got["ok"]:
                        failures.append(f"{x}: corrupted")
                except Exception as exc:  # a typed error is still a lost request here
                    failures.append(f"{x}: {exc}"[:200])
        assert failures == [], failures
    finally:
        lang.kill()


@pytest.mark.timeout(30)
async def test_closing_with_a_peer_still_connected_leaves_no_socket_open() -> None:
    """tcp: the data connection finish_writes half-closed is closed too (it used to stay open
    until the garbage collector found it: "unclosed StreamWriter")."""
    import asyncio
    import gc
    import warnings

    from helpers_runtime import make_payload, make_settings

    import emtransfer as et

    s = make_settings(transport="tcp")
    gc.collect()  # what earlier tests left to the collector warns now, not below
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        async with et.LanguageNode(s) as lang:
            enc = et.EncodeNode(s, control="tcp")
            await enc.start()
            peer = await lang.connect(enc.address)
            send = asyncio.create_task(enc.send("r", make_payload(50)))
            got = await lang.receive("r", peer)
            await send
            assert got.num_tokens == 50
            await enc.close()  # the language node is still connected
            del enc, send
            gc.collect()
    unclosed = [  # sockets and streams only: an event loop another test leaked is not ours
        w
        for w in seen
        if issubclass(w.category, ResourceWarning)
        and any(k in str(w.message) for k in ("socket", "StreamWriter", "transport"))
    ]
    assert not unclosed, [str(w.message) for w in unclosed]
