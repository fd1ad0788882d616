"""A userspace TCP proxy the tests own, between two processes (this kernel has no netem).

It runs its own event loop in a thread, so a test can drive it from plain code while the nodes
run in their own processes. Faults: ``blackhole()`` stops forwarding in both directions and
keeps every socket open (a partition without FIN or RST), ``cut()`` resets every connection,
``heal()`` forwards again (connections made after a cut go through).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any


class FaultProxy:
    """``listen``: the address to bind (default loopback); ``netns``: the network namespace the
    proxy's thread works in (a "host" of :mod:`netns`). ``delay_s`` and ``rate_bps`` shape the
    traffic (added latency per chunk, a bandwidth cap), changeable at any time."""

    def __init__(self, target: str, listen: str = "127.0.0.1", netns: str | None = None) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listen = listen
        self.delay_s = 0.0
        self.rate_bps = 0.0  # 0: no cap
        self.bytes_forwarded = 0
        self._loop = asyncio.new_event_loop()
        entered = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if netns is not None:
                    from netns import enter

                    enter(netns, process=False)  # this thread only
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                entered.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        entered.wait(10)
        if failure:
            raise failure[0]
        self._flowing = asyncio.Event()  # used on the proxy's loop only
        self._loop.call_soon_threadsafe(self._flowing.set)
        self._conns: set[Any] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server = self._call(self._start())
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{listen}:{port}"

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, self.listen, 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_w)
        self._conns.add(pair)
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer))
        self._conns.discard(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                await self._flowing.wait()  # blackholed: hold the bytes, send nothing
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)  # the added latency of this chunk
                if self.rate_bps:
                    await asyncio.sleep(len(data) / self.rate_bps)  # the bandwidth cap
                writer.write(data)
                self.bytes_forwarded += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await self._flowing.wait()  # blackholed: not even the FIN goes through
            writer.close()

    def blackhole(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def cut(self) -> None:
        """Reset every connection now (RST, not FIN)."""

        async def reset() -> None:
            for a, b in list(self._conns):
                for w in (a, b):
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    w.transport.abort()
            self._conns.clear()

        self._call(reset())

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for a, b in list(self._conns):
                a.transport.abort()
                b.transport.abort()
            handlers = list(self._handlers)  # their pumps end with the connections
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        self.heal()
        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()  # else the collector finds it unclosed, in another test
