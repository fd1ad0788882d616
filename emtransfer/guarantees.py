"""What a data-plane engine can prove about its writes (declared by each transport, checked by
the conformance suite, acted on by the protocol machines). A leaf module: the protocol layer
reads it without importing any engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Guarantees:
    """One transport's declared guarantees.

    ``remote_completion``
        a write that completed on the sender is already in the receiver's pool, so the sender's
        ``AbortAck`` (sent only once its last write ended) proves nothing more can land.
    ``fences_tag``
        the receiver's ``discard(tag)`` really stops later bytes of that tag from landing (it
        raises when it cannot), so abandoned blocks can be reused at once.
    ``remove_stops_inbound``
        the receiver's ``remove_peer`` stops that peer's writes into the pool (it raises when it
        cannot), so a lost peer's blocks can be reused at once.
    ``post_bound``
        the engine's bound on a posted write: a write posted before its grant's deadline lands,
        fails or is cancelled within this many seconds (the ``write_timeout`` setting).
    ``authorizes_writes``
        the receiving engine lands bytes only inside the blocks it granted to that peer under
        that tag (``Transport.grant``), until the grant ends; anything else lands nothing.
        Without it, a peer that holds the pool's metadata can write anywhere in it.

    When none of the three proofs applies, a receiver keeps the blocks quarantined until the
    grant's write deadline plus ``post_bound`` has passed: the sender never posts a write for
    an expired grant.
    """

    remote_completion: bool
    fences_tag: bool
    remove_stops_inbound: bool
    post_bound: float = 10.0
    authorizes_writes: bool = False


#: a receiver that trusts nothing but the grant's expiry (used by tests of the machines)
NONE = Guarantees(remote_completion=False, fences_tag=False, remove_stops_inbound=False)
