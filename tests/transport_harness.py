"""Two-process harness for transport conformance: a sender process and a receiver process,
each with its own registered pools, exchanging transport metadata over a pipe.

Every transport that can run here is driven through the same cases by
``tests/test_transport_conformance.py``. The child processes are spawned (not forked) so
that engines with threads (NIXL, gloo) start clean.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import traceback
from collections.abc import Callable
from typing import Any

FIELDS = {"embeddings": ((1024,), "float32"), "mrope_positions": ((3,), "int64")}
NUM_BLOCKS = 64
BLOCK_SIZE = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_child(pid: int) -> None:
    """SIGSTOP a child of this process and return once the kernel reports it stopped: a
    signal is delivered asynchronously, so a peer may still run (and answer) for a while
    after ``kill`` returns; ``waitpid(WUNTRACED)`` blocks until every thread stopped."""
    os.kill(pid, signal.SIGSTOP)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        raise RuntimeError(f"process {pid} ended instead of stopping (status {status})")


async def recv(conn: Any) -> Any:
    """The next message on the harness pipe, read off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def link(transport: Any, conn: Any) -> None:
    """Start ``transport``, swap metadata with the other side over the pipe, add it as
    ``"peer"``."""
    await transport.start()
    conn.send(("meta", transport.metadata()))
    _, meta = await recv(conn)
    await transport.add_peer("peer", meta)


async def serve_until_sender_done(transport: Any, conn: Any) -> None:
    """The receiving side of a scenario in which only the sender acts: keep the transport up
    until the sender says it is done, then close it and report success."""
    await recv(conn)
    await transport.close()
    conn.send(("ok", None))


def make_registry(num_blocks: int = NUM_BLOCKS) -> Any:
    import torch

    from emtransfer.buffers import BufferRegistry

    fields = {k: (shape, getattr(torch, dt)) for k, (shape, dt) in FIELDS.items()}
    return BufferRegistry(fields, num_blocks=num_blocks, block_size=BLOCK_SIZE)


def block_ops(registry: Any, src: list[int], dst: list[int], count: int) -> list[Any]:
    """The write descriptors of ``count`` tokens from blocks ``src`` to blocks ``dst``."""
    from emtransfer.allocator import Allocation

    a, b = Allocation("r", tuple(src), BLOCK_SIZE, 0), Allocation("r", tuple(dst), BLOCK_SIZE, 0)
    ops: list[Any] = registry.write_ops(a.runs_to(b, count))
    return ops


def fill_random(registry: Any, seed: int) -> None:
    """Every byte of every pool, from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name in registry.layouts:
        view = registry.byte_view(name)
        view.copy_(torch.randint(0, 256, (view.numel(),), dtype=torch.uint8, generator=g))


def landed(src: Any, dst: Any, ops: list[Any]) -> bool:
    """Whether every op's bytes in ``dst`` equal its source bytes in ``src``."""
    import torch

    return all(
        torch.equal(
            dst.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes],
            src.byte_view(o.field)[o.src_offset : o.src_offset + o.nbytes],
        )
        for o in ops
    )


def trust_all(transport: Any) -> Any:
    """Turn the receiver's grant check off on ``transport``, for a test about something else:
    every byte of a known peer lands wherever it points (the check itself has its own tests:
    test_grants.py, and the authorization case of the conformance suite)."""
    transport.grants.refusal = lambda *a, **k: None
    return transport


def enforce(transport: Any) -> Any:
    """Undo :func:`trust_all`: the transport checks its grants again."""
    transport.grants.__dict__.pop("refusal", None)
    return transport


def make_transport(
    name: str, registry: Any, rank: int, env: dict[str, str], *, authorize: bool = False
) -> Any:
    os.environ.update(env)
    from emtransfer.settings import Settings
    from emtransfer.transport import create_transport

    settings = Settings(
        transport=name,
        hidden_size=1024,
        dtype="float32",
        num_blocks=registry.num_blocks,
        block_size=BLOCK_SIZE,
        fields={"mrope_positions": {"shape": [3], "dtype": "int64"}},
        # tcp: a hello nobody added is held this long (the removed-peer case waits it out)
        **({"bootstrap_timeout": 2.0} if name == "tcp" else {}),
    )
    transport = create_transport(settings, registry)
    return transport if authorize else trust_all(transport)


def _child(
    role: str,
    name: str,
    conn: Any,
    env: dict[str, str],
    scenario_ref: tuple[str, str],
    namespace: str | None = None,
) -> None:
    if namespace is not None:  # another "host": before any socket is opened
        from netns import enter

        enter(namespace)
    os.environ.update(env)  # before any engine is imported
    import importlib

    import torch

    # imported only now: a test module may probe an engine at import (UCX would then have
    # listed the devices of the namespace the process was born in)
    scenario = getattr(importlib.import_module(scenario_ref[0]), scenario_ref[1])

    torch.set_num_threads(1)
    try:
        registry = make_registry()
        transport = make_transport(name, registry, 0 if role == "sender" else 1, env)
        asyncio.run(scenario(role, transport, registry, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def run_pair(
    name: str,
    scenario: Callable[..., Any],
    *,
    timeout: float = 60.0,
    hosts: Any = None,
) -> list[Any]:
    """Run ``scenario(role, transport, registry, conn)`` in two processes; return what each
    side sent last on its pipe (``("ok", value)``), raising if either side failed. A side
    that sends ``("sigstop",)`` (``("sigcont",)``) gets the same back once the other side
    is stopped (woken).
    ``hosts`` (a ``netns.TwoHosts``): the sender runs in host B, the receiver in host A, each
    bound to its own address there (UCX limited to TCP: no shared memory between "hosts")."""
    ctx = mp.get_context("spawn")
    port = free_port()
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = []
    for rank, role in enumerate(("sender", "receiver")):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        where = None
        if hosts is not None:
            where, addr = (hosts.b, hosts.addr_b) if role == "sender" else (hosts.a, hosts.addr_a)
            env |= {"EMTRANSFER_HOST": addr, "UCX_TLS": "tcp"}
        ref = (scenario.__module__, scenario.__qualname__)
        args = (role, name, pipes[rank][1], env, ref, where)
        p = ctx.Process(target=_child, args=args)
        p.start()
        procs.append(p)
    for _, child_end in pipes:
        child_end.close()  # so a child that dies shows up as EOF, not as a timeout
    # relay: each side's messages go to the other, until both report a result
    pending = object()
    results: list[Any] = [pending, pending]
    import time

    deadline = time.monotonic() + timeout
    ends = [pipes[0][0], pipes[1][0]]
    try:
        while any(r is pending for r in results):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: transport pair did not finish in {timeout}s")
            ready = mp.connection.wait(
                [e for i, e in enumerate(ends) if results[i] is pending], left
            )
            for e in ready:
                i = ends.index(e)
                try:
                    msg = e.recv()
                except EOFError:
                    raise RuntimeError(f"{name}: side {i} exited without a result") from None
                kind = msg[0]
                if kind == "error":
                    raise RuntimeError(f"{name}: side {i} failed:\n{msg[1]}")
                if kind == "ok":
                    results[i] = msg[1]
                elif kind in ("sigstop", "sigcont"):  # stop (or wake) the other side for it
                    other = procs[1 - i].pid
                    assert other is not None
                    stop_child(other) if kind == "sigstop" else os.kill(other, signal.SIGCONT)
                    ends[i].send((kind,))
                else:  # relay to the other side
                    ends[1 - i].send(msg)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return results
