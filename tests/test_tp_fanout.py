"""Tensor-parallel fan-out (emtransfer.integrations.tp): one encoder output, N ranks.

An encode process and N rank processes (spawned), the ranks joined in a gloo group as a TP
group's CPU group is. The encode side sends the payload once per rank (``FanOut``); each
rank receives its copy under its own rid (``RankReceiver``) and ticks as a scheduler does:
every tick all-reduces the ranks' states with ``MIN`` (``agree``), and a rank only releases
once the group agreed. Checked: every rank's payload byte for byte (2 and 4 ranks); a rank
dying, mid-transfer or before the payload was ready, makes every survivor end FAILED (the
collective raises, ``agree`` says FAILED), and the encode side ends with every send over,
every block free and nothing held.

No sleeps, no polling loops: a rank ticks when its handle changes (``wait_for_change`` of its
node), or right away once its own transfer ended (then the tick's collective waits
for the others); the encode side polls its fan-out when one of its handles changed.
"""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any

import pytest
import torch
from runtime_harness import BASE_SETTINGS, payload

SETTINGS = {**BASE_SETTINGS, "transport": "tcp"}
HIDDEN = SETTINGS["hidden_size"]
WAIT = 20.0
TOKENS = 1500  # past the 1024-token default allocation: resumes once


# -- the processes ---------------------------------------------------------------------------------
def encode_main(conn: Any) -> None:
    try:
        from sync_harness import settle

        import emtransfer as et
        from emtransfer.integrations.tp import FanOut
        from emtransfer.sync import SyncEncodeNode

        torch.set_num_threads(1)
        enc = SyncEncodeNode(et.Settings(**SETTINGS))
        conn.send(("ready", enc.address))
        fans: dict[str, Any] = {}
        fan_out: FanOut | None = None  # one per TP group
        while True:
            msg = conn.recv()
            if msg[0] == "send":
                _, rid, seed, owners = msg
                fan_out = fan_out or FanOut(enc, len(owners))
                fans[rid] = fan_out.send(
                    rid, payload(seed, TOKENS, HIDDEN), {"rid": rid}, owners=owners
                )
                conn.send(("sent",))
            elif msg[0] == "watch":  # the live connections of the node named msg[1]
                watched = asyncio.run_coroutine_threadsafe(
                    _named(enc.node, msg[1]), enc.loop
                ).result(WAIT)
                conn.send(("watching", len(watched)))
            elif msg[0] == "gone":  # wait until those connections are gone

                async def gone(peers: list[Any]) -> None:
                    await asyncio.wait_for(asyncio.gather(*(p.gone.wait() for p in peers)), WAIT)

                asyncio.run_coroutine_threadsafe(gone(watched), enc.loop).result(WAIT + 1)
                conn.send(("gone",))
            elif msg[0] == "settle":  # the encode side's scheduler: poll until every send ended
                fan = fans[msg[1]]
                deadline = time.monotonic() + WAIT
                while True:
                    seen = enc.changes()
                    group = fan.poll()  # aborts the other ranks once one failed
                    if fan.done():
                        break
                    assert time.monotonic() < deadline, f"sends still running: {fan.handles}"
                    enc.wait_for_change(seen, deadline - time.monotonic())
                errors = {r: f"{type(e).__name__}: {e}" for r, e in fan.errors().items()}
                fan.release()
                pool = asyncio.run_coroutine_threadsafe(settle(enc.node), enc.loop).result(WAIT)
                conn.send(
                    (
                        "settled",
                        {
                            "group": int(group),
                            "errors": errors,
                            "pool": pool,
                            "held_bytes": enc.node.held_bytes,
                            "open_handles": len(enc.open_handles()),
                        },
                    )
                )
            elif msg[0] == "close":
                enc.close()
                conn.send(("closed",))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def rank_main(conn: Any, rank: int, world: int, port: int, address: str) -> None:
    try:
        import torch.distributed as dist

        import emtransfer as et
        from emtransfer.integrations.tp import RankReceiver, broadcast_received
        from emtransfer.sync import PollState, SyncLanguageNode

        torch.set_num_threads(1)
        lang = SyncLanguageNode(et.Settings(**SETTINGS))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            # a collective waits this long for a rank that stopped ticking (a dead rank's
            # neighbours in the ring fail at once, the others after this)
            timeout=datetime.timedelta(seconds=8),
        )
        rx = RankReceiver(lang, rank)
        conn.send(("ready", lang.node.node_id))
        while True:
            msg = conn.recv()
            if msg[0] == "connect":
                asyncio.run_coroutine_threadsafe(lang.node.connect(address), lang.loop).result(WAIT)
                conn.send(("connected",))
            elif msg[0] == "die":
                os._exit(17)
            elif msg[0] == "receive":
                _, rid, seed, die = msg
                h = rx.receive(rid, address)
                agreed: list[int] = []
                deadline = time.monotonic() + WAIT
                while True:
                    seen = lang.changes()
                    if die and h.poll() >= PollState.TRANSFERRING:
                        os._exit(17)  # mid-transfer: its Init has left
                    (group,) = rx.agree([h])  # a collective: every rank ticks it
                    if not agreed or agreed[-1] != int(group):
                        agreed.append(int(group))
                    if group.finished:
                        break
                    assert time.monotonic() < deadline, f"rank {rank}: no agreement: {agreed}"
                    if not h.done():
                        lang.wait_for_change(seen, max(deadline - time.monotonic(), 0))
                verified = broadcast = None
                if group is PollState.SUCCESS:
                    got, want = h.result(), payload(seed, TOKENS, HIDDEN)
                    verified = (
                        got.num_tokens == TOKENS
                        and got.meta == {"rid": rid}
                        and all(torch.equal(got.tensors[k], v) for k, v in want.items())
                    )
                    # the other strategy: rank 0's copy, broadcast to the group
                    tensors, meta = broadcast_received(got if rank == 0 else None)
                    broadcast = meta == {"rid": rid} and all(
                        torch.equal(tensors[k], v) for k, v in want.items()
                    )
                err = h.error()
                h.release()
                lang_pool = asyncio.run_coroutine_threadsafe(_settle(lang.node), lang.loop).result(
                    WAIT + 1
                )
                conn.send(
                    (
                        "received",
                        {
                            "agreed": agreed,
                            "local": int(h.poll()),
                            "verified": verified,
                            "broadcast": broadcast,
                            "error": None if err is None else type(err).__name__,
                            "pool": lang_pool,
                        },
                    )
                )
            elif msg[0] == "close":
                lang.close()
                conn.send(("closed",))
                return
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


async def _named(node: Any, name: str) -> list[Any]:
    return list(node.peers_named(name))


async def _settle(node: Any) -> Any:
    from sync_harness import settle

    return await settle(node)


# -- the test's side ---------------------------------------------------------------------------------
class Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def answer(self, timeout: float = WAIT + 10) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no answer within {timeout}s")
        msg = self.conn.recv()
        if msg[0] == "crash":
            raise RuntimeError(f"the child failed:\n{msg[1]}")
        return msg[1] if len(msg) > 1 else None

    def ask(self, *msg: Any) -> Any:
        self.conn.send(msg)
        return self.answer()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("close")
            except Exception:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Group:
    def __init__(self, tp: int) -> None:
        self.enc = Proc(encode_main)
        self.address = self.enc.answer(60)
        port = _free_port()
        self.ranks = [Proc(rank_main, r, tp, port, self.address) for r in range(tp)]
        self.ids = [r.answer(60) for r in self.ranks]

    def receive_all(
        self, rid: str, seed: int, die: int | None = None, dead: int | None = None
    ) -> dict[int, Any]:
        """Every live rank receives ``rid``; rank ``die`` dies mid-way, ``dead`` is gone."""
        live = [r for r in range(len(self.ranks)) if r != dead]
        for r in live:
            self.ranks[r].conn.send(("receive", rid, seed, r == die))
        return {r: self.ranks[r].answer() for r in live if r != die}

    def close(self) -> None:
        for p in (*self.ranks, self.enc):
            p.close()


def _full(pool: dict[str, Any]) -> None:
    assert pool["free"] == pool["blocks"] and pool["quarantined"] == 0, pool
    assert pool["waiters"] == 0 and not pool["leaks"], pool


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tp", [2, 4])
def test_every_rank_receives_the_same_payload(tp: int) -> None:
    g = Group(tp)
    try:
        g.enc.ask("send", "req-1", 7, g.ids)
        results = g.receive_all("req-1", 7)
        for r, res in results.items():
            assert res["agreed"][-1] == 3 and res["verified"] is True, (r, res)  # SUCCESS
            assert res["broadcast"] is True, (r, res)
            assert res["agreed"] == sorted(res["agreed"]), (r, res)  # never goes back
            _full(res["pool"])
        enc = g.enc.ask("settle", "req-1")
        assert enc["group"] == 3 and enc["errors"] == {}, enc
        _full(enc["pool"])
        assert enc["held_bytes"] == 0 and enc["open_handles"] == 0, enc
    finally:
        g.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("tp", "when"), [(4, "mid_transfer"), (2, "between_requests")])
def test_a_dying_rank_fails_the_group_consistently(tp: int, when: str) -> None:
    """``mid_transfer``: the last rank dies once its Init has left (the encode side was
    already holding its copy). ``between_requests``: after a first request, it dies before
    the next payload exists; the fan-out fails its copy at once (its node, seen before, is
    gone) and aborts the others'."""
    g = Group(tp)
    victim = tp - 1
    try:
        if when == "between_requests":
            g.enc.ask("send", "req-1", 7, g.ids)
            first = g.receive_all("req-1", 7)
            assert all(res["verified"] for res in first.values()), first
            assert g.enc.ask("settle", "req-1")["group"] == 3
            assert g.enc.ask("watch", g.ids[victim]) == 1
            g.ranks[victim].conn.send(("die",))
            g.ranks[victim].proc.join(10)
            g.enc.ask("gone")
            g.enc.ask("send", "req-2", 8, g.ids)
            results = g.receive_all("req-2", 8, dead=victim)
        else:
            g.enc.ask("send", "req-2", 8, g.ids)
            results = g.receive_all("req-2", 8, die=victim)
            g.ranks[victim].proc.join(10)
        assert g.ranks[victim].proc.exitcode == 17
        assert sorted(results) == [r for r in range(tp) if r != victim]
        for r, res in results.items():
            assert res["agreed"][-1] == -1, (r, res)  # every survivor: FAILED
            assert res["verified"] is None, (r, res)  # nothing consumed
            _full(res["pool"])
        enc = g.enc.ask("settle", "req-2")
        _full(enc["pool"])
        assert enc["held_bytes"] == 0 and enc["open_handles"] == 0, enc
        if when == "between_requests":
            assert enc["group"] == -1, enc
            assert "is not connected any more" in enc["errors"][victim], enc
    finally:
        g.close()
