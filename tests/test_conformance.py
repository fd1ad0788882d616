"""Runtime conformance across two OS processes, for every transport that runs here: an encode
node and a language node, each in its own process, on a real data plane and a real TCP
control connection. Known length, resume, a payload larger than the pool, scrambled free
lists, 64 concurrent requests, SIGKILL of either peer in each protocol state, and reconnect
after a restart."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from runtime_harness import BASE_SETTINGS, NodeProc, RemoteError, transport_params
from transport_harness import free_port

POOL_TOKENS = BASE_SETTINGS["num_blocks"] * BASE_SETTINGS["block_size"]
#: how long a survivor may take to notice a killed peer (heartbeat timeout plus slack)
LOSS_S = BASE_SETTINGS["heartbeat_timeout"] + 5


TRANSPORTS = transport_params("tcp", "nixl", "torch", "mooncake")


def _env(transport: str) -> tuple[dict[str, str], dict[str, str]]:
    """torch.distributed needs a process group: encode is rank 0, language rank 1."""
    if transport != "torch":
        return {}, {}
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    return {**base, "RANK": "0"}, {**base, "RANK": "1"}


def _pair(
    transport: str, enc_kw: dict[str, Any] | None = None, lang_kw: dict[str, Any] | None = None
) -> tuple[NodeProc, NodeProc]:
    enc_env, lang_env = _env(transport)
    # with torch.distributed both ranks must start before either can finish initialising
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(2) as pool:
        fe = pool.submit(NodeProc, "encode", transport, enc_env, **(enc_kw or {}))
        fl = pool.submit(NodeProc, "language", transport, lang_env, **(lang_kw or {}))
        enc, lang = fe.result(), fl.result()
    lang.call("connect", enc.address)
    return enc, lang


def _transfer(
    enc: NodeProc,
    lang: NodeProc,
    rid: str,
    n: int,
    *,
    expected: int | None = None,
    send_first: bool = False,
    seed: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = hash(rid) & 0xFFFF if seed is None else seed
    meta = {"rid": rid, "n": n}
    if send_first:
        s = enc.start("send", rid, n, seed, meta)
        r = lang.start("receive", rid, enc.address, expected, seed, n)
    else:
        r = lang.start("receive", rid, enc.address, expected, seed, n)
        s = enc.start("send", rid, n, seed, meta)
    got = lang.wait(r, timeout=120)
    sent = enc.wait(s, timeout=120)
    assert got["ok"], got
    assert got["meta"] == meta
    return got, sent


#: a one-sided engine (nixl, mooncake) cannot prove that a killed peer's writes stopped: the
#: blocks of its last grant are released at the grant's expiry (chunk_timeout + write_timeout
#: after it)
EXPIRY_S = BASE_SETTINGS["chunk_timeout"] + BASE_SETTINGS["write_timeout"] + 5


def _settled(*procs: NodeProc) -> None:
    for p in procs:
        h = p.call("pool_settled", EXPIRY_S, timeout=EXPIRY_S + 15)
        assert h["pool"]["blocks_free"] == h["pool"]["blocks_total"], h
        assert h["pool"]["blocks_quarantined"] == 0, h
        assert h["leaks"] == {}, h


@pytest.fixture
def stop_later() -> Iterator[list[NodeProc]]:
    procs: list[NodeProc] = []
    yield procs
    for p in procs:
        if p.proc.is_alive():
            try:
                p.stop()
            except Exception:
                p.kill()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_flows_scrambled_and_concurrent(transport: str, stop_later: list[NodeProc]) -> None:
    enc, lang = _pair(transport)
    stop_later += [lang, enc]
    # known length: one round
    got, sent = _transfer(enc, lang, "known", 700, expected=700)
    assert got["rounds"] == 1 and sent["rounds"] == 1
    # the original scenario: 2000 tokens against a default allocation of 1024
    got, _ = _transfer(enc, lang, "resume", 2000)
    assert got["rounds"] == 2
    got, _ = _transfer(enc, lang, "resume-sent-first", 2000, send_first=True)
    assert got["rounds"] == 2
    # larger than the whole pool on both sides
    got, _ = _transfer(enc, lang, "huge", 3 * POOL_TOKENS + 5)
    assert got["rounds"] >= 4
    # scrambled free lists on both sides
    enc.call("scramble", 1)
    lang.call("scramble", 2)
    for i, n in enumerate((1, 127, 128, 129, 1500, 5000)):
        _transfer(enc, lang, f"scr{i}", n)
    # 64 concurrent requests of mixed lengths and orders
    rng = random.Random(7)
    jobs = []
    for i in range(64):
        rid, n = f"c{i}", rng.randint(1, 3000)
        seed = i
        if rng.random() < 0.5:
            jobs.append(
                (
                    lang.start("receive", rid, enc.address, None, seed, n),
                    enc.start("send", rid, n, seed, {"i": i}),
                )
            )
        else:
            s = enc.start("send", rid, n, seed, {"i": i})
            jobs.append((lang.start("receive", rid, enc.address, None, seed, n), s))
    for r, s in jobs:
        assert lang.wait(r, timeout=120)["ok"]
        enc.wait(s, timeout=120)
    _settled(enc, lang)
    assert lang.stop() == {}
    assert enc.stop() == {}


def _expect_remote(exc_kind: str, proc: NodeProc, cid: int, timeout: float) -> None:
    with pytest.raises(RemoteError) as info:
        proc.wait(cid, timeout=timeout)
    assert info.value.kind == exc_kind, info.value


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_language_killed_in_each_sender_state(transport: str, stop_later: list[NodeProc]) -> None:
    """The encode node survives a SIGKILLed language node in WAIT_DATA, STAGING, WAIT_RESUME
    and mid-transfer: the affected sends raise PeerLost promptly and the pool is full again."""
    for state in ("WAIT_DATA", "STAGING", "WAIT_RESUME", "MID_TRANSFER"):
        enc, lang = _pair(transport)
        stop_later += [enc, lang]
        waiting: list[int] = []
        if state == "WAIT_DATA":  # Init arrived, the embedding is not computed yet
            lang.start("receive", "a", enc.address, None, 1, 500)
            enc.call("state", "a", ["WAIT_DATA"], 30.0)
        elif state == "STAGING":  # the encode pool is exhausted: staging waits for blocks
            enc.call("hold", BASE_SETTINGS["num_blocks"])
            lang.start("receive", "a", enc.address, None, 1, 500)
            waiting.append(enc.start("send", "a", 500, 1, None))
            enc.call("state", "a", ["STAGING"], 30.0)
        elif state == "WAIT_RESUME":
            # 8 free blocks on the language side; B queues for blocks while A's round 0 is in
            # flight, so A's Resume allocation waits behind B and A's sender waits for Resume
            lang.call("hold", BASE_SETTINGS["num_blocks"] - BASE_SETTINGS["default_blocks"])
            lang.start("receive", "a", enc.address, None, 1, 3000)
            lang.call("state", "a", ["WAIT_CHUNK"], 30.0)
            lang.start("receive", "b", enc.address, None, 2, 500)
            lang.call("state", "b", ["ALLOCATING"], 30.0)
            waiting.append(enc.start("send", "a", 3000, 1, None))
            enc.call("state", "a", ["WAIT_RESUME"], 30.0)
        else:
            lang.start("receive", "a", enc.address, None, 1, 6 * POOL_TOKENS)
            waiting.append(enc.start("send", "a", 6 * POOL_TOKENS, 1, None))
            enc.call("state", "a", ["STAGING", "WRITING", "WAIT_RESUME"], 30.0)
        lang.kill()
        for cid in waiting:
            try:
                enc.wait(cid, timeout=LOSS_S)
                assert state == "MID_TRANSFER", f"{state}: send completed after the peer died"
            except RemoteError as exc:
                assert exc.kind == "PeerLost", f"{state}: {exc}"
        enc.call("release")
        _settled(enc)
        assert enc.stop() == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_encode_killed_in_each_receiver_state(transport: str, stop_later: list[NodeProc]) -> None:
    """The language node survives a SIGKILLed encode node while waiting for a chunk, while
    allocating, and mid-transfer: receive raises PeerLost promptly, the pool is full again."""
    # short grants: on a one-sided engine (nixl, mooncake) nothing proves that the killed
    # node's writes stopped, so its last grant is released at its expiry (chunk_timeout +
    # write_timeout): 7 s here rather than the 25 s of the base settings
    short = {"chunk_timeout": 5.0, "write_timeout": 2.0}
    for state in ("WAIT_CHUNK", "ALLOCATING", "MID_TRANSFER"):
        enc, lang = _pair(transport, lang_kw=short)
        stop_later += [enc, lang]
        if state == "WAIT_CHUNK":
            r = lang.start("receive", "a", enc.address, None, 1, 500)
            lang.call("state", "a", ["WAIT_CHUNK"], 30.0)
        elif state == "ALLOCATING":
            lang.call("hold", BASE_SETTINGS["num_blocks"])
            r = lang.start("receive", "a", enc.address, None, 1, 500)
            lang.call("state", "a", ["ALLOCATING"], 30.0)
        else:
            r = lang.start("receive", "a", enc.address, None, 1, 6 * POOL_TOKENS)
            enc.start("send", "a", 6 * POOL_TOKENS, 1, None)
            lang.call("state", "a", ["WAIT_CHUNK", "ALLOCATING"], 30.0)
        enc.kill()
        try:
            lang.wait(r, timeout=LOSS_S)
            assert state == "MID_TRANSFER", f"{state}: receive completed after the peer died"
        except RemoteError as exc:
            assert exc.kind == "PeerLost", f"{state}: {exc}"
        lang.call("release")
        _settled(lang)
        assert lang.stop() == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_restart_and_reconnect(transport: str, stop_later: list[NodeProc]) -> None:
    if transport == "torch":
        pytest.skip("torch.distributed process groups are static: a restarted rank cannot rejoin")
    port = free_port()
    enc, lang = _pair(transport, enc_kw={"bootstrap_port": port})
    stop_later += [lang, enc]
    _transfer(enc, lang, "before", 1500)
    enc.kill()
    r = lang.start("receive", "lost", enc.address, None, 1, 100)
    with pytest.raises(RemoteError):  # PeerLost, from the transfer or from reconnecting
        lang.wait(r, timeout=LOSS_S + BASE_SETTINGS["bootstrap_timeout"])
    enc2 = NodeProc("encode", transport, bootstrap_port=port)
    stop_later.append(enc2)
    assert enc2.address == enc.address
    got, _ = _transfer(enc2, lang, "after", 2000)  # receive(address) reconnects by itself
    assert got["rounds"] == 2
    _settled(enc2, lang)
