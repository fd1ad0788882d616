"""One test per finding of the hostile-network review (issue: data-plane authorization,
authenticated handshake, bounded resources) that the in-loop setting shows exactly; the
two-process suites run the same attacks against a live server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from helpers_runtime import (
    assert_same_payload,
    connected,
    hold_all,
    make_payload,
    make_settings,
    wait_pools_clean,
    wait_until,
)
from runtime_harness import transport_params

import emtransfer as et

pytestmark = pytest.mark.timeout(60)


ENGINES = transport_params("local", "tcp", "nixl")


@pytest.mark.parametrize("transport", ENGINES)
async def test_a_retry_after_round_0_gave_up_gets_its_own_job(transport: str) -> None:
    """Finding 2: a request that failed while allocating its first round (its Encode already
    sent) left the job's session on the encode node; the retry of the rid bound to it and got
    the old job's payload (its digests agree, so nothing noticed)."""
    jobs: list[dict[str, Any]] = []

    def encoder(job: dict[str, Any]) -> dict[str, torch.Tensor]:
        jobs.append(job)
        return make_payload(job["n"], seed=job["n"])

    s = make_settings(transport=transport, alloc_timeout=0.3, init_timeout=30.0)
    async with et.EncodeNode(s, encoder=encoder) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        hog = hold_all(lang.allocator)
        with pytest.raises(et.AllocationTimeout):
            await lang.encode("r", peer, {"n": 100})
        lang.allocator.free(hog)
        got = await lang.encode("r", peer, {"n": 300})
        assert got.num_tokens == 300, "the retry got the old job's payload"
        assert_same_payload(got.tensors, make_payload(300, seed=300))
        await wait_pools_clean(enc, lang)
        assert not enc.senders, "the old job's session outlived its request"


@pytest.mark.parametrize("transport", ENGINES)
async def test_the_longest_rid_travels_on_every_engine(transport: str) -> None:
    """Finding 5: a rid of 256 four-byte characters passed validation but its data tag (1024
    bytes of rid, then the attempt and the round) exceeded the tcp transport's 1024-byte tags:
    the encoder did the work and the request failed with 502 instead of going through."""
    from emtransfer.protocol.messages import MAX_RID_LEN
    from emtransfer.runtime.node import data_tag
    from emtransfer.transport.base import MAX_TAG_BYTES

    rid = "\U0001f600" * MAX_RID_LEN
    assert len(data_tag(rid, "x" * 64, 1 << 62).encode()) <= MAX_TAG_BYTES
    s = make_settings(transport=transport)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        pay = make_payload(150, seed=5)  # more than the default allocation: two rounds
        send = asyncio.create_task(enc.send(rid, pay))
        got = await lang.receive(rid, peer)
        await send
        assert got.rounds >= 2
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, lang)


def test_an_empty_token_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 6: an empty EMTRANSFER_AUTH_TOKEN became an empty HMAC key that anyone passes."""
    for blank in ("", "   "):
        with pytest.raises(et.ConfigError, match=r"auth_token.*empty token") as err:
            et.Settings(auth_token=blank)
        assert "'**********'" in str(err.value)  # the value itself is never echoed
        monkeypatch.setenv("EMTRANSFER_AUTH_TOKEN", blank)
        with pytest.raises(et.ConfigError, match="auth_token"):
            et.Settings()
        monkeypatch.delenv("EMTRANSFER_AUTH_TOKEN")


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [
        ("0.0.0.0", None, True),
        ("", None, True),
        ("10.1.2.3", None, True),
        ("0.0.0.0", "s3cret", False),
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
    ],
)
async def test_serving_beyond_loopback_without_a_token_warns(
    host: str, token: str | None, warned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 6: nothing warned when a node bound a non-loopback address without a token."""
    from log_capture import capture_logs

    s = make_settings(host=host, auth_token=token)
    lang = et.LanguageNode(s)  # the in-process engine binds nothing: only the check is run
    with capture_logs() as logs:
        await lang.start()
    await lang.close()
    hits = [e for e in logs if "without auth_token" in e["event"]]
    assert bool(hits) == warned, logs
    if warned:
        assert hits[0]["log_level"] == "warning" and hits[0]["host"] == host


@pytest.mark.parametrize("transport", ENGINES)
@pytest.mark.parametrize("how", ["timeout", "peer-lost", "cancelled"])
async def test_a_failed_send_lets_go_of_its_payload_at_once(how: str, transport: str) -> None:
    """Finding 3: the payload of a timed-out send() stayed alive until gc.collect(): the error
    the caller got was the very object the session's future kept, and raised through the
    runtime its traceback held the frames that held the session and the payload (a cycle).
    With the collector off, the tensors must die once the caller has handled the error."""
    import gc
    import weakref

    # short grants: on nixl a lost peer's grant is quarantined until it expires
    s = make_settings(init_timeout=0.3, chunk_timeout=1.0, write_timeout=0.5, transport=transport)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)

        async def caller() -> weakref.ref[torch.Tensor]:
            """A caller that sends, handles the failure and returns (its frames end)."""
            pay = make_payload(2000, seed=3)  # more than one round: a Resume is awaited
            ref = weakref.ref(pay["embeddings"])
            send = asyncio.create_task(enc.send("x", pay, peer=lang.node_id))
            del pay
            if how == "timeout":
                with pytest.raises(et.TransferTimeout):
                    await send
                return ref
            recv = asyncio.create_task(lang.receive("x", peer))
            await wait_until(
                lambda: "x" in enc.senders and enc.senders["x"].machine.state.name == "WAIT_RESUME"
            )
            if how == "peer-lost":
                next(iter(enc.peers.values())).channel.close()
                with pytest.raises(et.TransferError):
                    await send
            else:
                send.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await send
            with pytest.raises((asyncio.CancelledError, et.TransferError)):
                recv.cancel()
                await recv
            return ref

        gc.collect()
        gc.disable()
        try:
            ref = await caller()
            await wait_until(lambda: not enc.senders, what="the session to end")
            assert ref() is None, "the payload outlived its failed send (a reference cycle)"
        finally:
            gc.enable()
        await wait_pools_clean(enc, lang, timeout=10)


async def test_handshakes_and_connections_are_bounded() -> None:
    """Finding 3: connections that had not finished the handshake were not limited in number
    (each may hold a frame buffer for bootstrap_timeout), nor connections in total."""
    from emtransfer.runtime.control import parse_address

    s = make_settings(
        transport="tcp", max_pending_handshakes=2, max_connections=3, bootstrap_timeout=5.0
    )
    async with et.EncodeNode(s, control="tcp") as enc:
        host, port = parse_address(enc.address)
        silent = [await asyncio.open_connection(host, port) for _ in range(2)]
        await wait_until(lambda: enc._handshaking == 2, what="two handshakes pending")
        async with et.LanguageNode(s) as lang:
            with pytest.raises(et.ProtocolError, match="max_pending_handshakes=2"):
                await lang.connect(enc.address)
        for _, w in silent:
            w.close()
        await wait_until(lambda: enc._handshaking == 0, what="the silent ones to go")
        langs = [et.LanguageNode(s) for _ in range(4)]
        for n in langs:
            await n.start()
        try:
            for n in langs[:3]:
                await n.connect(enc.address)
            with pytest.raises(et.ProtocolError, match="max_connections=3"):
                await langs[3].connect(enc.address)
            await langs[0].close()
            await wait_until(lambda: len(enc.peers) == 2, what="a connection to free up")
            peer = await langs[3].connect(enc.address)  # room again
            pay = make_payload(50, seed=2)
            send = asyncio.create_task(enc.send("r", pay))
            got = await langs[3].receive("r", peer)
            await send
            assert_same_payload(got.tensors, pay)
        finally:
            for n in langs:
                await n.close()


async def test_payload_memory_held_for_receivers_is_bounded() -> None:
    """Finding 3: payloads waiting for their receiver were not bounded (40 jobs of 32,768
    tokens took an encode server from 292 to 935 MiB)."""
    s = make_settings()
    nbytes = 100 * et.EncodeNode(s).registry.token_nbytes
    s = make_settings(max_held_mib=1.5 * nbytes / 2**20, init_timeout=30.0)
    async with connected(s) as (enc, lang, peer):
        first = asyncio.create_task(enc.send("a", make_payload(100, seed=1)))
        await wait_until(lambda: enc.held_bytes == nbytes, what="the first payload held")
        with pytest.raises(et.CapacityError, match="max_held_mib"):
            await enc.send("b", make_payload(100, seed=2))
        assert enc.held_bytes == nbytes  # the refused one took nothing
        got = await lang.receive("a", peer)
        await first
        assert got.num_tokens == 100 and enc.held_bytes == 0
        second = asyncio.create_task(enc.send("b", make_payload(100, seed=2)))  # room again
        await lang.receive("b", peer)
        await second


async def test_pulls_for_rids_nobody_holds_are_bounded_per_peer() -> None:
    """Finding 4: ten pulls for rids nobody holds emptied the language pool for the whole
    timeout (each Init holds the receiver's blocks). Beyond the bound the encode node refuses
    at once, saying why, and the receiver frees its blocks."""
    s = make_settings(max_waiting_inits_per_peer=2, data_timeout=30.0, chunk_timeout=30.0)
    async with connected(s) as (enc, lang, peer):
        waiting = [asyncio.create_task(lang.receive(f"w{i}", peer)) for i in range(2)]
        await wait_until(lambda: len(enc.senders) == 2, what="two pulls waiting for data")
        with pytest.raises(et.TransferAborted, match="max_waiting_inits_per_peer=2"):
            await lang.receive("w2", peer)
        # the refused pull freed its blocks: only the two waiting ones hold any
        await wait_until(
            lambda: lang.allocator.num_free == s.num_blocks - 2 * s.default_blocks,
            what="the refused pull's blocks back",
        )
        pays = {f"w{i}": make_payload(30, seed=i) for i in range(2)}
        sends = [asyncio.create_task(enc.send(r, p)) for r, p in pays.items()]
        for g in await asyncio.gather(*waiting):
            assert_same_payload(g.tensors, pays[g.rid])
        await asyncio.gather(*sends)


async def test_tcp_data_connections_prove_the_handshake_secret() -> None:
    """Finding 1: TCP data keys travel in clear (the control Hello's metadata and the data
    hello carry both) and were the whole credential: with them, anybody could open a data
    connection as the encode node. With a token, no key exists: the metadata carries none,
    the data hello names ids derived from the handshake's secret, and a connection must answer
    a fresh challenge under that secret, so even a hello and a proof sniffed off the wire are
    worth nothing."""
    import msgspec
    from test_transport_tcp import HELLO, HELLO_MAGIC, VERSION

    from emtransfer.transport.tcp import ACK, CHALLENGE, _Meta

    s = make_settings(transport="tcp", auth_token="data-secret-test-7b2e", bootstrap_timeout=1.5)
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        for node in (enc, lang):  # what the control Hello publishes: no key
            assert msgspec.msgpack.decode(node.transport.metadata(), type=_Meta).key == b""
        peer = await lang.connect(enc.address)
        pay = make_payload(150, seed=4)  # the legitimate path proves it and goes through
        send = asyncio.create_task(enc.send("r", pay))
        assert_same_payload((await lang.receive("r", peer)).tensors, pay)
        await send
        (sniffed,) = [p.ids_out for p in enc.transport._peers.values()]  # as seen on the wire
        for receiver, proof in ((sniffed[1], b"\x00" * 32), (sniffed[1], None), (bytes(16), b"")):
            r, w = await asyncio.open_connection("127.0.0.1", lang.transport.port)
            w.write(HELLO.pack(HELLO_MAGIC, VERSION, sniffed[0], receiver))
            if receiver == sniffed[1]:
                assert await r.readexactly(1) == CHALLENGE  # the sniffed ids are not enough
                await r.readexactly(16)  # a fresh nonce: an old proof answers another one
                if proof is not None:
                    w.write(proof)
            try:
                got = await asyncio.wait_for(r.read(1), s.bootstrap_timeout + 5)
            except ConnectionError:
                got = b""
            assert got != ACK and got == b"", got  # dropped: no ACK, no frame will be read
            w.close()
        send = asyncio.create_task(enc.send("r2", pay))  # serving goes on
        assert_same_payload((await lang.receive("r2", peer)).tensors, pay)
        await send
        await wait_pools_clean(enc, lang)


async def test_tcp_data_connections_without_a_token_need_no_proof() -> None:
    from test_transport_tcp import HELLO, HELLO_MAGIC, VERSION

    from emtransfer.transport.tcp import ACK

    s = make_settings(transport="tcp")
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
        await lang.connect(enc.address)
        r, w = await asyncio.open_connection("127.0.0.1", lang.transport.port)
        w.write(HELLO.pack(HELLO_MAGIC, VERSION, enc.transport.key, lang.transport.key))
        assert await asyncio.wait_for(r.readexactly(1), 5) == ACK
        w.close()
