"""Nodes in their own OS processes, driven by commands over a pipe.

``NodeProc(role, transport, **settings)`` spawns a process running an ``EncodeNode`` or a
``LanguageNode`` on a real transport and a real TCP control connection. The test sends
commands (``send``, ``receive``, ``hold``...) and reads their results; it can SIGKILL the
process at any moment. Payloads are generated from ``(seed, num_tokens)`` on both sides, so
the receiver verifies every byte without the test shipping tensors around.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from typing import Any

from transport_harness import stop_child

BASE_SETTINGS: dict[str, Any] = {
    "hidden_size": 256,
    "dtype": "bfloat16",
    "block_size": 128,
    "default_blocks": 8,
    "num_blocks": 64,
    "fields": {"mrope_positions": {"shape": [3], "dtype": "int64"}},
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.5,
    "bootstrap_timeout": 10.0,
    "init_timeout": 20.0,
    "data_timeout": 20.0,
    "chunk_timeout": 20.0,
    "resume_timeout": 20.0,
    "alloc_timeout": 20.0,
    "abort_ack_timeout": 2.0,
    "write_timeout": 5.0,
}


def payload(seed: int, n: int, hidden: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
    pos = torch.randint(0, 1 << 40, (n, 3), generator=g, dtype=torch.int64)
    return {"embeddings": emb, "mrope_positions": pos}


def transport_params(*names: str) -> list[Any]:
    """pytest params for the named transports; one that cannot run here is skipped, saying
    why (on a machine with the engine installed it runs)."""
    import pytest

    from emtransfer.transport import transport_unavailable

    out = []
    for name in names:
        why = transport_unavailable(name)
        out.append(pytest.param(name, marks=[pytest.mark.skip(reason=why)] if why else [], id=name))
    return out


class RemoteError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------- child side


async def _serve(role: str, settings: dict[str, Any], conn: Any, env: dict[str, str]) -> None:
    import torch

    import emtransfer as et

    os.environ.update(env)
    torch.set_num_threads(1)
    s = et.Settings(**settings)
    node = et.EncodeNode(s) if role == "encode" else et.LanguageNode(s)
    await node.start()
    conn.send(("ready", node.address if role == "encode" else ""))
    loop = asyncio.get_running_loop()
    held: list[Any] = []
    tasks: set[asyncio.Task[None]] = set()
    hidden = s.hidden_size
    # a pause point the tests enable: data-plane writes wait here, before the engine's own
    # checks and post, as a write queued behind a busy executor would
    gate = asyncio.Event()
    gate.set()
    gated = {"waiting": 0}
    waiting_changed = asyncio.Event()
    real_write = node.transport.write

    async def gated_write(*a: Any, **kw: Any) -> None:
        if not gate.is_set():
            gated["waiting"] += 1
            waiting_changed.set()
            await gate.wait()
            gated["waiting"] -= 1
        await real_write(*a, **kw)

    node.transport.write = gated_write  # type: ignore[method-assign]
    # a second pause point: the protocol's allocations wait here (the test's own holds do not),
    # as behind a pool that other requests hold
    agate = asyncio.Event()
    agate.set()
    real_try, real_alloc = node.allocator.try_alloc, node.allocator.alloc

    def gated_try(n: int, owner: str, **kw: Any) -> Any:
        if not agate.is_set() and owner != "held-by-test":
            return None
        return real_try(n, owner, **kw)

    async def gated_alloc(*a: Any, **kw: Any) -> Any:
        await agate.wait()
        return await real_alloc(*a, **kw)

    node.allocator.try_alloc = gated_try  # type: ignore[method-assign]
    node.allocator.alloc = gated_alloc  # type: ignore[method-assign]
    leases: dict[str, tuple[Any, Any, int, int]] = {}
    posts = {"open": threading.Event()}
    posts["open"].set()
    post_held = asyncio.Event()

    def verify(got: Any, seed: int, n: int) -> bool:
        want = payload(seed, n, hidden)
        return got.num_tokens == n and all(torch.equal(got.tensors[k], v) for k, v in want.items())

    def sessions_by_rid() -> dict[str, str]:
        """rid -> protocol state of every session of the node: live, lingering, offered."""
        states: dict[str, str] = {}
        for p in node.peers.values():
            for sess in [*p.lingering.values(), *p.sessions.values()]:
                if sess.running:
                    states[sess.rid] = sess.machine.state.name
        if role == "encode":
            states.update({r: x.machine.state.name for r, x in node.senders.items() if x.running})
        return states

    by_cid: dict[int, asyncio.Task[None]] = {}

    async def run(cid: int, cmd: str, args: tuple[Any, ...]) -> None:
        try:
            value = await handle(cmd, *args)
            conn.send(("result", cid, value))
        except asyncio.CancelledError:  # the test's "cancel": the caller gave up
            conn.send(("error", cid, "CancelledError", "cancelled by the test"))
        except Exception as exc:
            conn.send(("error", cid, type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))
        finally:
            by_cid.pop(cid, None)

    async def handle(cmd: str, *args: Any) -> Any:
        if cmd == "send":  # (rid, n, seed, meta[, peer]): peer names who may claim it
            rid, n, seed, meta, *owner = args
            st = await node.send(
                rid, payload(seed, n, hidden), meta=meta, peer=owner[0] if owner else None
            )
            return {"rounds": st.rounds, "writes": st.writes, "resume_waits": st.resume_waits}
        if cmd == "node_id":
            return node.node_id
        if cmd == "stats":  # this process's RSS (MiB) and open files
            with open("/proc/self/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
            return {"rss_mib": rss, "open_files": len(os.listdir("/proc/self/fd"))}
        if cmd == "receive":
            rid, address, expected, seed, n = args
            got = await node.receive(rid, address, expected_tokens=expected)
            want = payload(seed, n, hidden)
            ok = got.num_tokens == n and all(
                torch.equal(got.tensors[k], v) for k, v in want.items()
            )
            return {
                "ok": ok,
                "rounds": got.rounds,
                "meta": got.meta,
                "num_tokens": got.num_tokens,
                "prefetched": int(got.stats.get("prefetched_rounds", 0)),
            }
        if cmd == "hold_writes":
            gate.clear()
            return True
        if cmd == "writes_held":  # wait until a write sits at the pause point
            async with asyncio.timeout(args[0]):
                while gated["waiting"] < 1:
                    waiting_changed.clear()
                    await waiting_changed.wait()
            return gated["waiting"]
        if cmd == "release_writes":
            gate.set()
            return True
        if cmd == "hold_posts":  # nixl: hold writes inside the engine, past its last checks
            tr = node.transport
            tr.inline_max_bytes = 0  # type: ignore[attr-defined]
            agent = tr._agent  # type: ignore[attr-defined]
            real_transfer = agent.transfer
            posts["open"].clear()

            def held_transfer(handle: Any) -> Any:
                loop.call_soon_threadsafe(post_held.set)
                posts["open"].wait()  # a posted write still in flight, as long as the test says
                return real_transfer(handle)

            agent.transfer = held_transfer
            return True
        if cmd == "posts_held":
            async with asyncio.timeout(args[0]):
                await post_held.wait()
            return True
        if cmd == "release_posts":
            posts["open"].set()
            return True
        if cmd == "cancel":  # the caller of command ``cid`` gives up (client gone, wait_for)
            task = by_cid.get(args[0])
            if task is not None:
                task.cancel()
            return task is not None
        if cmd == "hold_allocs":
            agate.clear()
            return True
        if cmd == "release_allocs":
            agate.set()
            return True
        if cmd == "ended":  # wait until rid has no session left (live or lingering)
            rid, timeout = args
            deadline = loop.time() + timeout
            while rid in sessions_by_rid():
                if loop.time() > deadline:
                    raise TimeoutError(f"{rid} still in {sessions_by_rid()[rid]}")
                await asyncio.sleep(0.005)  # bounded poll of another process's view
            return True
        if cmd == "lease_open":  # a zero-copy lease kept open until lease_close
            rid, address, expected, seed, n = args
            stack = contextlib.AsyncExitStack()
            got = await stack.enter_async_context(
                node.lease(rid, address, expected_tokens=expected)
            )
            leases[rid] = (stack, got, seed, n)
            return {"ok": verify(got, seed, n), "zero_copy": got.zero_copy}
        if cmd == "lease_check":
            _, got, seed, n = leases[args[0]]
            return verify(got, seed, n)
        if cmd == "lease_close":
            stack, *_ = leases.pop(args[0])
            await stack.aclose()
            return True
        if cmd == "connect":
            peer = await node.connect(args[0])
            return peer.node_id
        if cmd == "hold":  # take blocks out of the pool to create pressure
            a = node.allocator.try_alloc(args[0] * s.block_size, "held-by-test")
            assert a is not None, "pool too busy to hold"
            held.append(a)
            return len(a.blocks)
        if cmd == "release":
            while held:
                node.allocator.free(held.pop())
            return True
        if cmd == "scramble":  # hand blocks out in a random order from now on
            from helpers_runtime import scramble

            scramble(node.allocator, seed=args[0])
            return True
        if cmd == "state":  # the protocol state of rid, once it is in one of the wanted states
            rid, wanted, timeout = args
            deadline = loop.time() + timeout
            while True:
                states = sessions_by_rid()
                if states.get(rid) in wanted:
                    return states[rid]
                if loop.time() > deadline:
                    raise TimeoutError(f"{rid} never reached {wanted}: {states.get(rid)}")
                await asyncio.sleep(0.005)  # bounded poll of another process's view
        if cmd == "ahead":  # wait until rid's next round is granted while its round is written
            rid, timeout = args
            deadline = loop.time() + timeout
            while True:
                live = [x for p in node.peers.values() for x in p.sessions.values()]
                if role == "encode":
                    live += list(node.senders.values())
                found = [x for x in live if x.rid == rid and x.running]
                m = found[0].machine if found else None
                ahead = (
                    getattr(m, "ahead", None) if role == "language" else getattr(m, "_ahead", None)
                )
                if ahead is not None:
                    return True
                if loop.time() > deadline:
                    raise TimeoutError(f"{rid}: no round granted ahead ({sessions_by_rid()})")
                await asyncio.sleep(0.005)  # bounded poll of another process's view
        if cmd == "health":
            h = node.health()
            h["leaks"] = node.leak_report()
            return h
        if cmd == "pool_settled":  # wait until nothing is held or quarantined
            deadline = loop.time() + args[0]
            while node.allocator.num_free + sum(len(a.blocks) for a in held) < s.num_blocks:
                if loop.time() > deadline:
                    return node.health() | {"leaks": node.leak_report()}
                await asyncio.sleep(0.005)
            return node.health() | {"leaks": node.leak_report()}
        if cmd == "close":
            await node.close()
            return node.leak_report()
        raise ValueError(f"unknown command {cmd}")

    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] == "exit":
            break
        _, cid, cmd, args = msg
        t = asyncio.create_task(run(cid, cmd, args))
        by_cid[cid] = t
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    conn.send(("bye",))


def _child(
    role: str, settings: dict[str, Any], conn: Any, env: dict[str, str], netns: str | None = None
) -> None:
    try:
        if netns is not None:  # another "host": before any socket is opened
            from netns import enter

            enter(netns)
        asyncio.run(_serve(role, settings, conn, env))
    except BaseException:
        try:
            conn.send(("crash", traceback.format_exc()))
        except Exception:
            pass
        raise


# --------------------------------------------------------------------------- parent side


class NodeProc:
    """A node in a child process; ``call`` runs a command and returns its result."""

    _cids = itertools.count(1)

    def __init__(
        self,
        role: str,
        transport: str,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        **overrides: Any,
    ) -> None:
        self.role = role
        settings = {**BASE_SETTINGS, "transport": transport, **overrides}
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child, args=(role, settings, child_conn, env or {}, netns), daemon=True
        )
        self.proc.start()
        self._results: dict[int, Any] = {}
        kind, *rest = self._next(60)
        if kind != "ready":
            raise RuntimeError(f"{role} node failed to start: {rest}")
        self.address: str = rest[0]

    def _next(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role} node: no message within {timeout}s")
        msg = self.conn.recv()
        if msg[0] == "crash":
            raise RuntimeError(f"{self.role} node crashed:\n{msg[1]}")
        return msg

    def start(self, cmd: str, *args: Any) -> int:
        cid = next(self._cids)
        self.conn.send(("cmd", cid, cmd, args))
        return cid

    def wait(self, cid: int, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while cid not in self._results:
            msg = self._next(max(0.0, deadline - time.monotonic()))
            if msg[0] in ("result", "error"):
                self._results[msg[1]] = msg
        msg = self._results.pop(cid)
        if msg[0] == "error":
            raise RemoteError(msg[2], msg[3])
        return msg[2]

    def call(self, cmd: str, *args: Any, timeout: float = 60) -> Any:
        return self.wait(self.start(cmd, *args), timeout)

    def pause(self) -> None:
        """SIGSTOP: the process stays alive, its sockets open, and does nothing at all (once
        this returns: the kernel reported it stopped)."""
        assert self.proc.pid is not None
        stop_child(self.proc.pid)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> Any:
        """Close the node (returns its leak report) and end the process."""
        try:
            leaks = self.call("close", timeout=30)
            self.conn.send(("exit",))
            return leaks
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()
