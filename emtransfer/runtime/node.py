"""What both roles share: the pool, the transport, the peers and their control channels,
the handshake, and an orderly shutdown that leaves no block behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from ..allocator import Allocation, BlockAllocator
from ..buffers import BufferRegistry
from ..errors import ConfigError, InvalidRequest, PeerLost, ProtocolError, TransferError
from ..logs import get_logger
from ..protocol import PROTOCOL_VERSION
from ..protocol import events as ev
from ..protocol import messages as m
from ..protocol.machine import Machine
from ..settings import Settings
from ..transport import Transport, create_transport
from .channel import Channel
from .metrics import Metrics
from .session import Session

#: payloads at least this large are copied on the executor, not on the event loop
OFFLOAD_BYTES = 16 << 20
#: how long a failed data-plane operation waits for the control connection to report the
#: peer's death (a dead peer breaks the data path a moment before its control connection)
PEER_LOSS_GRACE_S = 0.25
_peer_serial = itertools.count(1)


def now_stamp() -> int:
    """This node's clock as a wire stamp (microseconds of ``time.monotonic()``)."""
    return int(time.monotonic() * 1e6)


@dataclass(eq=False)
class Peer:
    """A connected peer node: one authenticated control connection and the requests it shares
    with us. A peer *is* its connection: ``node_id`` is only what it claims to be, and two
    connections claiming one id are two peers."""

    node_id: str
    role: str
    num_blocks: int
    channel: Channel
    inflight: asyncio.Semaphore
    sessions: dict[str, Session] = field(default_factory=dict)
    alive: bool = True
    reader: asyncio.Task[None] | None = None
    #: the transport's name for this peer (unique per connection, so a restarted peer is new)
    transport_id: str = ""
    #: where we connected to (language side), for reconnecting after the peer restarts
    address: str = ""
    last_seen: float = 0.0
    heartbeat: asyncio.Task[None] | None = None
    #: the latest stamp (the peer's clock) seen from it, echoed in the grants we send it, and
    #: when (our loop time) it arrived
    stamp: int = 0
    stamp_at: float = 0.0
    #: ended requests whose blocks are still quarantined, by attempt (session tag)
    lingering: dict[str, Session] = field(default_factory=dict)
    #: set once the peer is lost
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    #: encode side: pieces of large Encode jobs still arriving, by (rid, session)
    job_pieces: dict[tuple[str, str], Any] = field(default_factory=dict)

    async def lost_soon(self) -> bool:
        """After a data-plane failure: whether the peer turns out to be gone (so the caller
        reports PeerLost, the real cause, rather than the transport's error)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PEER_LOSS_GRACE_S):
                await self.gone.wait()
        return not self.alive

    def send(self, msg: m.Message) -> None:
        if not self.alive:
            raise PeerLost(f"peer {self.node_id} is gone")
        self.channel.send(msg)


class Node:
    """Base of :class:`EncodeNode` and :class:`LanguageNode`."""

    role: ClassVar[str]

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        transport: Transport | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = Settings(**{**settings.model_dump(), **overrides})
        self.settings = settings
        self.node_id = f"{self.role}-{uuid.uuid4().hex[:12]}"
        self.allocator = BlockAllocator(settings.num_blocks, settings.block_size)
        # a transport handed in brings its registered pools: the node must use the same ones
        self.registry = (
            transport.registry if transport is not None else BufferRegistry.from_settings(settings)
        )
        #: bytes of one token across every field (the registry's layout is fixed)
        self.token_nbytes = self.registry.token_nbytes
        self.transport = transport or create_transport(settings, self.registry)
        self.transport.inbound = self.role == "language"  # only receivers are written to
        #: connected peers by connection (their transport id), never by the id they claim
        self.peers: dict[str, Peer] = {}
        self.metrics = Metrics(
            self.role,
            self.allocator,
            settings,
            transport=self.transport.name,
            inflight=self.inflight_requests,
            peers=lambda: sum(p.alive for p in self.peers.values()),
        )
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emtransfer-copy")
        self.log = get_logger("emtransfer").bind(node=self.node_id, role=self.role)
        self._started = False
        self._closing = False
        #: quarantined allocations released by a timer (grant expiry), not by a session
        self._expiries: dict[int, tuple[Allocation, asyncio.TimerHandle]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        #: handshake refusals by reason (how often each was seen)
        self._refusals: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._started:
            return
        await self.transport.start()
        self._started = True
        if self.settings.auth_token is None and not _loopback(self.settings.host):
            self.log.warning(
                "serving on a non-loopback address without auth_token: any host that reaches "
                "it can connect, claim payloads and be written to; set auth_token",
                host=self.settings.host,
            )
        self.log.info(
            "node started",
            transport=self.transport.name,
            blocks=self.settings.num_blocks,
            block_size=self.settings.block_size,
            pool_mib=round(self.registry.nbytes / 2**20, 1),
        )

    async def close(self) -> None:
        """Abort what is in flight, drain writes, drop the peers, release the transport."""
        if self._closing:
            return
        self._closing = True
        sessions = [s for p in self.peers.values() for s in p.sessions.values()]
        sessions += [s for p in self.peers.values() for s in p.lingering.values()]
        sessions += self._unbound_sessions()
        for s in sessions:
            if s.running:
                s.feed(ev.LocalAbort("node closing", kind="unavailable"))
        tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.abort_ack_timeout)
        lingering = [s for p in self.peers.values() for s in p.lingering.values()]
        await self.transport.finish_writes()  # what send() reported written reaches the peer
        for peer in list(self.peers.values()):
            peer.channel.close()
            await self._peer_lost(peer, "node closing")
        await self.transport.close()
        # the pools are deregistered: nothing can land in a quarantined allocation any more
        lingering = [s for s in lingering if s.running]
        for s in lingering:
            s.feed(ev.PeerLost("node closed", inbound_stopped=True))
        if lingering:
            await asyncio.wait([s.task for s in lingering if s.task is not None], timeout=5)
        self._release_expiries()
        self.executor.shutdown(wait=True)
        leaks = self.allocator.leak_report()
        if leaks:
            self.log.error("blocks still held at close", leaks=leaks)
        self.log.info("node closed")

    def release_at(self, when: float, allocation: Allocation) -> None:
        """Release the quarantined ``allocation`` at loop time ``when`` (a grant's expiry), or
        when the node closes, whichever comes first: closing deregisters the pools, so nothing
        can land in it any more."""

        def release() -> None:
            if self._expiries.pop(allocation.serial, None) is not None:
                self.allocator.release_quarantine(allocation)

        handle = asyncio.get_running_loop().call_at(when, release)
        self._expiries[allocation.serial] = (allocation, handle)

    def _release_expiries(self) -> None:
        for allocation, handle in list(self._expiries.values()):
            handle.cancel()
            self.allocator.release_quarantine(allocation)
        self._expiries.clear()

    def check_started(self) -> None:
        """A call on a node that was never started fails at once, saying so."""
        if not self._started and not self._closing:
            cls = type(self).__name__
            raise ConfigError(
                f"this {cls} was never started: await node.start() first, or use "
                f"'async with {cls}(...) as node'"
            )

    def spawn(self, coro: Any) -> None:
        """Run a short piece of bookkeeping in the background, keeping a reference to it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _unbound_sessions(self) -> list[Session]:
        return []

    # -- queries -------------------------------------------------------------------------------
    def leak_report(self) -> dict[str, list[int]]:
        return self.allocator.leak_report()

    def inflight_requests(self) -> int:
        """Requests running on this node: bound to a peer, or (encode) offered and waiting
        for the Init that claims them."""
        bound = sum(len(p.sessions) for p in self.peers.values())
        return bound + len(self._unbound_sessions())

    def health(self) -> dict[str, Any]:
        a = self.allocator
        return {
            "role": self.role,
            "node_id": self.node_id,
            "transport": self.transport.name,
            "pool": {
                "blocks_total": a.num_blocks,
                "blocks_free": a.num_free,
                "blocks_quarantined": a.num_quarantined,
                "waiters": a.num_waiters,
            },
            "inflight": self.inflight_requests(),
            "peers": [p.node_id for p in self.peers.values() if p.alive],
            "quarantined_requests": sum(len(p.lingering) for p in self.peers.values()),
        }

    def peers_named(self, node_id: str) -> list[Peer]:
        """The live connections whose peer claims ``node_id``."""
        return [p for p in self.peers.values() if p.node_id == node_id and p.alive]

    # -- handshake -----------------------------------------------------------------------------
    def _hello_fields(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "role": self.role,
            "node_id": self.node_id,
            "fingerprint": self.settings.fingerprint(),
            "num_blocks": self.settings.num_blocks,
            "transport": self.transport.name,
            "transport_meta": self.transport.metadata(),
            "stamp": now_stamp(),
        }

    def _proof(self, label: bytes, *parts: bytes) -> bytes:
        token = self.settings.auth_token
        if token is None:
            return b""
        key = token.get_secret_value().encode()
        mac = hmac.new(key, label, hashlib.sha256)
        for part in parts:  # length-prefixed: no two transcripts run together the same way
            mac.update(len(part).to_bytes(8, "big") + part)
        return mac.digest()

    def _check_proof(self, got: bytes, label: bytes, *parts: bytes) -> None:
        want = self._proof(label, *parts)
        if not want and got:
            raise ConfigError("peer sent an auth proof but auth_token is not set here")
        if want and not hmac.compare_digest(want, got):
            raise ConfigError("authentication failed: auth_token differs or is missing")

    def _check_hello(self, hello: m.Hello | m.HelloAck, expected_role: str) -> None:
        """Refuse a peer that does not speak our protocol or lays out its pools differently."""
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: peer {hello.version}, ours {PROTOCOL_VERSION}"
            )
        if hello.role != expected_role:
            raise ProtocolError(f"peer role is {hello.role!r}, expected {expected_role!r}")
        if hello.transport != self.transport.name:
            raise ConfigError(
                f"transport mismatch: peer uses {hello.transport!r}, we use {self.transport.name!r}"
            )
        ours = self.settings.fingerprint()
        diff = _first_difference(ours, hello.fingerprint)
        if diff is not None:
            name, mine, theirs = _setting_of(*diff)
            # by role, not "ours" and "theirs": the refusal reaches the other side verbatim
            raise ConfigError(
                f"settings mismatch: {name}={mine!r} on the {self.role} node, "
                f"{name}={theirs!r} on the {hello.role} node (both must use the same {name})"
            )

    async def _recv_within_bootstrap(self, channel: Channel, want: type[m.Message]) -> Any:
        try:
            async with asyncio.timeout(self.settings.bootstrap_timeout):
                msg = await channel.recv()
        except TimeoutError:
            raise PeerLost(
                f"no handshake within bootstrap_timeout={self.settings.bootstrap_timeout}s"
            ) from None
        if isinstance(msg, m.Error):
            err = ConfigError if msg.kind == "config" else ProtocolError
            raise err(f"peer refused the handshake: {msg.reason}")
        if not isinstance(msg, want):
            raise ProtocolError(f"expected {want.__name__}, got {type(msg).__name__}")
        return msg

    async def _serve_handshake(self, channel: Channel, client_role: str) -> Peer | None:
        """Server side: Challenge -> Hello (client's proof) -> HelloAck (our proof)."""
        tid = ""
        try:
            nonce = os.urandom(16)
            channel.send(m.Challenge(version=PROTOCOL_VERSION, nonce=nonce))
            hello = await self._recv_within_bootstrap(channel, m.Hello)
            theirs = _transcript(hello)
            self._check_proof(hello.auth, b"emtransfer-client", nonce, theirs)
            self._check_hello(hello, expected_role=client_role)
            secret = self._proof(b"emtransfer-data", nonce, theirs)
            tid = await self._reach_transport(hello, secret)  # refuse before acknowledging
            ack = m.HelloAck(**self._hello_fields())
            proof = self._proof(b"emtransfer-server", nonce, theirs, _transcript(ack))
            channel.send(msgspec.structs.replace(ack, auth=proof))
            return await self._add_peer(channel, hello, tid)
        except TransferError as exc:
            if tid:
                await self.transport.remove_peer(tid)
            # a peer that retries a refused handshake must not flood the log: the first
            # refusal of each kind is a warning, its repeats are debug lines
            seen = self._refusals.get(str(exc), 0)
            self._refusals[str(exc)] = seen + 1
            if len(self._refusals) > 1024:
                self._refusals.clear()
            log = self.log.warning if seen == 0 else self.log.debug
            log("handshake refused", error=str(exc), via=channel.description, times=seen + 1)
            try:
                kind = "config" if isinstance(exc, ConfigError) else ""
                channel.send(m.Error(reason=m.reason(f"handshake refused: {exc}"), kind=kind))
            except PeerLost:
                pass
            channel.close()
            return None

    async def _client_handshake(self, channel: Channel, server_role: str, address: str) -> Peer:
        try:
            challenge = await self._recv_within_bootstrap(channel, m.Challenge)
            if challenge.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version mismatch: peer {challenge.version}, ours {PROTOCOL_VERSION}"
                )
            hello = m.Hello(**self._hello_fields(), nonce=os.urandom(16))
            ours = _transcript(hello)
            proof = self._proof(b"emtransfer-client", challenge.nonce, ours)
            channel.send(msgspec.structs.replace(hello, auth=proof))
            ack = await self._recv_within_bootstrap(channel, m.HelloAck)
            self._check_proof(
                ack.auth, b"emtransfer-server", challenge.nonce, ours, _transcript(ack)
            )
            self._check_hello(ack, expected_role=server_role)
            tid = await self._reach_transport(
                ack, self._proof(b"emtransfer-data", challenge.nonce, ours)
            )
        except BaseException:
            channel.close()
            raise
        peer = await self._add_peer(channel, ack, tid)
        peer.address = address
        return peer

    async def _reach_transport(self, hello: m.Hello | m.HelloAck, secret: bytes) -> str:
        """Make the peer's pools reachable; any failure is a refused handshake. ``secret``
        (from the authenticated handshake, empty without a token) is the data plane's to prove."""
        tid = f"{hello.node_id}#{next(_peer_serial)}"
        try:
            await self.transport.add_peer(tid, hello.transport_meta, secret=secret)
        except TransferError:
            raise
        except Exception as exc:
            raise ProtocolError(f"peer's transport metadata refused: {exc!r}") from None
        return tid

    async def _add_peer(self, channel: Channel, hello: m.Hello | m.HelloAck, tid: str) -> Peer:
        peer = Peer(
            node_id=hello.node_id,
            role=hello.role,
            num_blocks=hello.num_blocks,
            channel=channel,
            inflight=asyncio.Semaphore(self.settings.max_inflight_per_peer),
            transport_id=tid,
            last_seen=asyncio.get_running_loop().time(),
            stamp=hello.stamp,
        )
        peer.stamp_at = peer.last_seen
        self.peers[tid] = peer
        peer.reader = asyncio.create_task(self._read(peer), name=f"emtransfer:read:{peer.node_id}")
        peer.heartbeat = asyncio.create_task(self._heartbeat(peer))
        self.log.info("peer connected", peer=peer.node_id, via=channel.description)
        return peer

    async def _heartbeat(self, peer: Peer) -> None:
        """Send a heartbeat every interval; a peer silent for heartbeat_timeout is lost."""
        loop = asyncio.get_running_loop()
        interval, limit = self.settings.heartbeat_interval, self.settings.heartbeat_timeout
        while peer.alive:
            await asyncio.sleep(interval)  # a periodic tick, not a synchronisation point
            silent = loop.time() - peer.last_seen
            if silent > limit:
                peer.channel.close()
                await self._peer_lost(peer, f"no message for {silent:.1f}s (heartbeat_timeout)")
                return
            try:
                peer.channel.send(m.Heartbeat(stamp=now_stamp()))
            except PeerLost:
                return

    # -- control messages ----------------------------------------------------------------------
    async def _read(self, peer: Peer) -> None:
        reason = "connection closed"
        try:
            loop = asyncio.get_running_loop()
            while True:
                try:
                    msg = await peer.channel.recv()
                except m.InvalidMessage as exc:
                    self._refuse(peer, exc)
                    continue
                peer.last_seen = loop.time()
                stamp = getattr(msg, "stamp", 0)
                if stamp > peer.stamp:
                    peer.stamp, peer.stamp_at = stamp, peer.last_seen
                try:
                    self._on_message(peer, msg)
                except TransferError as exc:
                    self.log.warning("refused message", peer=peer.node_id, error=str(exc))
                    if not isinstance(msg, m.Error | m.Abort | m.Resume):  # those answered already
                        self._tell(peer, f"refused {type(msg).__name__}: {exc}")
        except PeerLost as exc:
            reason = str(exc)
        except ProtocolError as exc:
            # an undecodable frame: the stream can no longer be trusted
            reason = f"protocol error: {exc}"
            self.log.warning("dropping peer", peer=peer.node_id, error=reason)
        finally:
            peer.channel.close()
            await self._peer_lost(peer, reason)

    def _on_message(self, peer: Peer, msg: m.AnyMessage) -> None:
        raise NotImplementedError

    def _tell(self, peer: Peer, text: str) -> None:
        try:
            peer.send(m.Error(reason=m.reason(text)))
        except PeerLost:
            pass

    def _refuse(self, peer: Peer, exc: m.InvalidMessage) -> None:
        """One invalid message: tell the peer, fail the request it names, keep the rest."""
        self.log.warning("invalid message refused", peer=peer.node_id, rid=exc.rid, error=str(exc))
        self._tell(peer, f"refused: {exc}")
        session = peer.sessions.get(exc.rid) if exc.rid else None
        if session is not None and session.running:
            session._error_override = exc
            session.feed(ev.LocalAbort(m.reason(f"peer sent an invalid message: {exc}")))

    def answer_unknown(
        self, peer: Peer, machine: type[Machine[Any]], rid: str, tag: str, event: ev.Event
    ) -> None:
        """Answer a message for ``rid``, a request with no session here, as the role's
        ``UNKNOWN`` table says; a ``Fail`` there means the peer broke the protocol."""
        for action in machine.answer_unknown(rid, event):
            match action:
                case ev.SendAbortAck():
                    peer.send(m.AbortAck(rid=rid, session=tag))
                case ev.SendAbort():
                    reason = m.reason(action.reason)
                    peer.send(m.Abort(rid=rid, reason=reason, session=tag, kind=action.kind))
                case ev.Fail():
                    raise action.error
                case _:  # pragma: no cover - a table entry the runtime cannot execute
                    raise ProtocolError(f"cannot answer for an unknown rid with {action!r}")

    async def tear_down(self, peer: Peer, reason: str) -> None:
        """Drop ``peer``'s connection and fail its requests."""
        self.log.warning("tearing the peer down", peer=peer.node_id, reason=reason)
        peer.channel.close()
        await self._peer_lost(peer, reason)

    async def _peer_lost(self, peer: Peer, reason: str) -> None:
        """Fail every request of the peer, telling each whether the transport proved that no
        write from the peer can land any more (the machines decide what that frees)."""
        if not peer.alive:
            return
        peer.alive = False
        peer.gone.set()
        if self.peers.get(peer.transport_id) is peer:
            del self.peers[peer.transport_id]
        stopped = self.transport.guarantees.remove_stops_inbound
        try:
            await self.transport.remove_peer(peer.transport_id)
        except TransferError as exc:
            stopped = False
            self.log.warning("peer's writes not fenced", peer=peer.node_id, error=str(exc))
        # losing an idle peer is routine (it closed); losing one mid-request is not
        level = "warning" if peer.sessions and not self._closing else "info"
        getattr(self.log, level)(
            "peer lost", peer=peer.node_id, reason=reason, requests=len(peer.sessions)
        )
        for session in [*peer.sessions.values(), *peer.lingering.values()]:
            if session.task is None:  # never started (its caller left while queued)
                peer.sessions.pop(session.rid, None)
            elif session.running:
                session.feed(ev.PeerLost(reason, inbound_stopped=stopped))
        for task in (peer.reader, peer.heartbeat):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def session_ended(self, session: Session) -> None:
        raise NotImplementedError


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub, a.get(key), b.get(key)
            found = _first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return None if a == b else (path or "fingerprint", a, b)


def _setting_of(path: str, mine: Any, theirs: Any) -> tuple[str, Any, Any]:
    """A fingerprint difference as the setting a user sets: ``fields.embeddings.shape``
    ``[512]`` is ``hidden_size`` 512, ``device_kind`` is ``device``."""
    if path == "fields.embeddings.shape" and len(mine or ()) == len(theirs or ()) == 1:
        return "hidden_size", mine[0], theirs[0]
    if path == "fields.embeddings.dtype":
        return "dtype", mine, theirs
    if path == "device_kind":
        return "device", mine, theirs
    if path.startswith("fields.") and path.count(".") == 1:  # a field one side lacks
        return path, "present" if mine else "absent", "present" if theirs else "absent"
    return path, mine, theirs


def _loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address to bind) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def _transcript(hello: m.Hello | m.HelloAck) -> bytes:
    """What a handshake proof covers of a Hello or HelloAck: every field but the proof itself
    (a relay cannot swap the transport metadata, the role, the id, the settings...)."""
    return hashlib.sha256(m.encode(msgspec.structs.replace(hello, auth=b""))).digest()


def data_tag(rid: str, session: str, round_: int) -> str:
    """The data-plane tag of one round of one attempt."""
    return f"{rid}/{session}/{round_}"


def check_rid(rid: object) -> None:
    if not isinstance(rid, str) or not 0 < len(rid) <= m.MAX_RID_LEN:
        raise InvalidRequest(f"rid must be a non-empty string of at most {m.MAX_RID_LEN} chars")
