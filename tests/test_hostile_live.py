"""Hostile peers against a live encode node (its own process; tcp and nixl) while a legitimate language
node (another process) keeps serving: idle and half-open connection floods, random bytes,
oversized frames, slow handshakes and wrong versions, and, from a peer that completed the
handshake (anyone may, without a token): Init and Resume for rids and blocks it does not own,
pull floods, Encode floods and writes into the encode pool. The legitimate client's success
rate stays at 100 %, and the encode process's open files come back down. With nixl, the encode
node publishes nothing a write could address (no agent metadata, no pool descriptors)."""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
import threading
from typing import Any

import pytest
from runtime_harness import BASE_SETTINGS, NodeProc, transport_params

import emtransfer as et
from emtransfer.buffers import WriteOp
from emtransfer.protocol import PROTOCOL_VERSION
from emtransfer.protocol import messages as m
from emtransfer.protocol.framing import frame
from emtransfer.runtime.control import parse_address

pytestmark = pytest.mark.timeout(180)
T = {
    "max_pending_handshakes": 16,
    "max_inflight_per_peer": 32,
    "max_waiting_inits_per_peer": 8,
    "bootstrap_timeout": 3.0,  # silent and slow handshakes end this soon
    "init_timeout": 120.0,  # the payloads held for the legitimate client outlive the attacks
}
#: the attacker's own node: the encode node's layout, so its handshake passes
ATTACKER = {
    **{k: BASE_SETTINGS[k] for k in ("hidden_size", "dtype", "block_size", "default_blocks")},
    **{k: BASE_SETTINGS[k] for k in ("num_blocks", "fields")},
}


class Legit(threading.Thread):
    """Batches of verified requests from the legitimate language node, until told to stop."""

    def __init__(self, enc: NodeProc, lang: NodeProc, owner: str) -> None:
        super().__init__(daemon=True)
        self.enc, self.lang, self.owner = enc, lang, owner
        self.stop, self.results = threading.Event(), {"ok": 0, "failed": [], "batches": 0}
        self.rng = random.Random(7)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for b in itertools.count():
                if self.stop.is_set() and b >= 3:
                    return
                calls = []
                for i in range(8):
                    rid, n, seed = (
                        f"legit-{b}-{i}",
                        self.rng.randint(1, 2500),
                        self.rng.randrange(1 << 16),
                    )
                    expected = n if i % 2 else None
                    calls.append(
                        (
                            rid,
                            self.lang.start("receive", rid, self.enc.address, expected, seed, n),
                            self.enc.start("send", rid, n, seed, None, self.owner),
                        )
                    )
                for rid, r, s in calls:
                    try:
                        got = self.lang.wait(r, timeout=60)
                        self.enc.wait(s, timeout=60)
                        if got["ok"]:
                            self.results["ok"] += 1
                        else:
                            self.results["failed"].append((rid, "corrupted"))
                    except Exception as exc:
                        self.results["failed"].append((rid, repr(exc)[:200]))
                self.results["batches"] += 1
        except BaseException as exc:
            self.error = exc


async def _closed(reader: asyncio.StreamReader, timeout: float = 15) -> bool:
    """Whether the node closed (or reset) the connection within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def raw_attacks(host: str, port: int) -> dict[str, int]:
    """Connections that never finish (or never start) a handshake: each must end."""
    out: dict[str, int] = {}
    flood = [await asyncio.open_connection(host, port) for _ in range(40)]
    refused = 0
    for r, _ in flood[T["max_pending_handshakes"] :]:  # beyond the bound: refused at once
        refused += await _closed(r, 5)
    out["idle_refused"] = refused
    for _, w in flood:
        w.close()
    junk = {
        "random": random.Random(1).randbytes(4096),
        "oversized": struct.pack("!I", 0xFFFFFFF0) + b"x" * 64,
        "half-open": struct.pack("!I", 4096) + b"\x81",  # a frame announced, never finished
        "wrong-version": frame(
            m.Hello(
                version=PROTOCOL_VERSION + 7,
                role="language",
                node_id="evil",
                fingerprint={},
                num_blocks=1,
                transport="tcp",
            )
        ),
    }
    for name, data in junk.items():
        r, w = await asyncio.open_connection(host, port)
        w.write(data)
        out[name] = int(await _closed(r))
        w.close()
    r, w = await asyncio.open_connection(host, port)  # slow: one byte at a time
    for b in frame(m.Heartbeat())[:6]:
        w.write(bytes([b]))
        await asyncio.sleep(0.3)  # the slowness is the attack, not a sync point
    out["slow"] = int(await _closed(r))
    w.close()
    return out


async def peer_attacks(address: str, transport: str) -> dict[str, int]:
    """A peer that completed the handshake misbehaves every way it can."""
    counts: dict[str, int] = {}
    async with et.LanguageNode(et.Settings(**ATTACKER, transport=transport)) as evil:
        published: list[bytes] = []
        add_peer = evil.transport.add_peer

        async def record(peer_id: str, metadata: bytes, **kw: Any) -> None:
            published.append(metadata)
            await add_peer(peer_id, metadata, **kw)

        evil.transport.add_peer = record  # type: ignore[method-assign]
        peer = await evil.connect(address)
        if transport == "nixl":  # what the encode node gave us to address its pool: nothing
            import msgspec

            from emtransfer.transport.nixl import _Meta

            meta = msgspec.msgpack.decode(published[0], type=_Meta)
            counts["published_keys"] = len(meta.agent) + len(meta.pools)
        refused: list[str] = []
        all_refused = asyncio.Event()
        original = evil._on_message
        # every attack message below draws one Abort: 8 foreign Inits, 40 pulls, 100 jobs and
        # 10 Resumes
        expected = 8 + 40 - T["max_waiting_inits_per_peer"] + 100 + 10

        def watch(p: Any, msg: Any) -> None:
            if isinstance(msg, m.Abort | m.Error):
                refused.append(msg.reason)
                if len(refused) >= expected:
                    all_refused.set()
            original(p, msg)

        evil._on_message = watch  # type: ignore[method-assign]
        grant = {"stamp": peer.stamp, "ttl_ms": 30_000}
        for i in range(8):  # Inits for payloads held for the legitimate client: not ours
            peer.send(m.Init(rid=f"owned-{i}", blocks=[0], capacity_tokens=128, **grant))
        for i in range(40):  # a pull flood: rids nobody holds
            peer.send(m.Init(rid=f"pull-{i}", blocks=[i % 64], capacity_tokens=128, **grant))
        for i in range(100):  # an Encode flood (this node has no encoder, and a limit)
            peer.send(m.Encode(rid=f"job-{i}", job={"x": i}, session="s"))
        for i in range(10):  # Resumes for rounds of rids we never had
            peer.send(m.Resume(rid=f"none-{i}", round=1, blocks=[1], capacity_tokens=128,
                               received_tokens=128, **grant))  # fmt: skip
        try:  # and a write into the encode pool
            await evil.transport.write(
                peer.transport_id, [WriteOp("embeddings", 0, 0, 512)], tag="x"
            )
            counts["write_landed"] = 1
        except et.TransferError:
            counts["write_refused"] = 1
        await asyncio.wait_for(all_refused.wait(), 30)
        counts["refusals"] = len(refused)
        counts["held_for_another"] = sum("for another peer" in r for r in refused)
        counts["pulls_refused"] = sum("max_waiting_inits_per_peer" in r for r in refused)
        counts["jobs_refused"] = sum("encoder" in r or "in flight" in r for r in refused)
    return counts


@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_hostile_peers_while_a_legitimate_client_serves(transport: str) -> None:
    enc = NodeProc("encode", transport, **T)
    lang = NodeProc("language", transport, **T)
    try:
        owner = lang.call("node_id")
        lang.call("connect", enc.address)
        # payloads held for the legitimate client, pulled only after the attacks
        owned = [enc.start("send", f"owned-{i}", 300 + i, 50 + i, None, owner) for i in range(8)]
        before = enc.call("stats")
        legit = Legit(enc, lang, owner)
        legit.start()
        host, port = parse_address(enc.address)
        raw = asyncio.run(raw_attacks(host, port))
        evil = asyncio.run(peer_attacks(enc.address, transport))
        legit.stop.set()
        legit.join(120)
        assert legit.error is None, legit.error
        assert not legit.is_alive()
        res = legit.results
        for i, cid in enumerate(owned):  # the attacker's Inits did not get them
            got = lang.call("receive", f"owned-{i}", enc.address, None, 50 + i, 300 + i)
            assert got["ok"], got
            enc.wait(cid, timeout=30)
        assert res["failed"] == [], res  # 100 %: nobody else's misbehaviour costs it a request
        assert res["ok"] >= 24
        # every raw connection ended, the flood beyond the bound at once
        assert raw["idle_refused"] == 40 - T["max_pending_handshakes"], raw
        assert all(
            raw[k] == 1 for k in ("random", "oversized", "half-open", "wrong-version", "slow")
        )
        assert evil.get("write_refused") == 1, evil
        assert evil.get("published_keys", 0) == 0, evil
        assert evil["pulls_refused"] > 0 and evil["held_for_another"] == 8, evil
        assert evil["jobs_refused"] >= 100 - T["max_inflight_per_peer"], evil
        h = enc.call("pool_settled", 30.0, timeout=40)
        assert h["pool"]["blocks_free"] == h["pool"]["blocks_total"], h
        after = enc.call("stats")
        assert after["open_files"] <= before["open_files"] + 8, (before, after)
        assert after["rss_mib"] <= before["rss_mib"] + 300, (before, after)
        print(f"legit {res}, raw {raw}, peer {evil}, encode process {before} -> {after}")
    finally:
        lang.kill()
        enc.kill()
