"""The metrics a node exports: in-flight requests counted on both roles while they run (a
pending receive too) and not after they end; every label set there from the start; no
``_created`` series; pool states that sum to the capacity; one transfers counter whose outcome
label covers failures; an info metric; duration buckets that reach the configured timeouts; a
tokens counter; process metrics; Prometheus names."""

from __future__ import annotations

import asyncio

import pytest
from helpers_runtime import connected, make_payload, make_settings, wait_pools_clean, wait_until
from prometheus_client.parser import text_string_to_metric_families
from runtime_harness import transport_params

import emtransfer as et
from emtransfer.runtime.metrics import OUTCOMES, outcome_of

pytestmark = pytest.mark.timeout(30)


def samples(node: et.EncodeNode | et.LanguageNode) -> dict[tuple[str, tuple], float]:
    """Every exported sample as ``(name, sorted labels) -> value``."""
    text = node.metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(node: et.EncodeNode | et.LanguageNode, name: str, **labels: str) -> float:
    return samples(node)[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize("transport", transport_params("local", "tcp", "nixl"))
async def test_inflight_counts_a_pending_receive_and_a_pending_send_until_they_end(
    transport: str,
) -> None:
    # short grants: over nixl the timed-out receive's blocks wait for the grant's expiry
    settings = make_settings(
        transport=transport, chunk_timeout=0.5, init_timeout=0.5, write_timeout=1.0
    )
    async with connected(settings) as (enc, lang, peer):
        assert value(lang, "emtransfer_inflight_requests") == 0
        assert value(enc, "emtransfer_inflight_requests") == 0
        # a receive of a rid nobody sends: in flight until its deadline
        pending = asyncio.create_task(lang.receive("nobody-sends", peer))
        await wait_until(lambda: lang.inflight_requests() == 1, 5, "the receive to start")
        assert value(lang, "emtransfer_inflight_requests") == 1
        with pytest.raises(et.TransferTimeout):
            await pending
        # at once: blocks still quarantined (over nixl, until the grant expires) are no request
        assert value(lang, "emtransfer_inflight_requests") == 0
        assert value(lang, "emtransfer_transfers_total", outcome="timeout") == 1
        await wait_pools_clean(enc, lang)
        # a send nobody claims yet: in flight on the encode role
        send = asyncio.create_task(enc.send("later", make_payload(40)))
        await wait_until(lambda: enc.inflight_requests() == 1, 5, "the send to be offered")
        assert value(enc, "emtransfer_inflight_requests") == 1
        got = await lang.receive("later", peer)
        await send
        assert got.num_tokens == 40
        assert value(enc, "emtransfer_inflight_requests") == 0
        assert value(lang, "emtransfer_inflight_requests") == 0
        assert value(lang, "emtransfer_payload_tokens_total", direction="in") == 40
        assert value(enc, "emtransfer_payload_tokens_total", direction="out") == 40
        nbytes = 40 * lang.registry.token_nbytes
        assert value(lang, "emtransfer_payload_bytes_total", direction="in") == nbytes
        assert value(enc, "emtransfer_payload_bytes_total", direction="out") == nbytes
        assert value(lang, "emtransfer_transfers_total", outcome="ok") == 1
        assert value(lang, "emtransfer_peers") == 1


async def test_every_series_exists_from_the_start_with_conventional_names() -> None:
    settings = make_settings(chunk_timeout=7.0, data_timeout=45.0)
    async with connected(settings) as (enc, lang, _):
        for node in (enc, lang):
            got = samples(node)
            names = {name for name, _ in got}
            assert not [n for n in names if n.endswith("_created")]
            for outcome in OUTCOMES:  # pre-created: rate() works from the first scrape
                assert got[("emtransfer_transfers_total", (("outcome", outcome),))] == 0
            for d in ("in", "out"):
                assert ("emtransfer_payload_bytes_total", (("direction", d),)) in got
                assert ("emtransfer_payload_tokens_total", (("direction", d),)) in got
            pool = {
                dict(labels)["state"]: v
                for (name, labels), v in got.items()
                if name == "emtransfer_pool_blocks"
            }
            assert set(pool) == {"free", "used", "quarantined"}
            assert sum(pool.values()) == got[("emtransfer_pool_capacity_blocks", ())] == 64
            info = [
                dict(labels) for (name, labels), _ in got.items() if name == "emtransfer_node_info"
            ]
            assert info == [
                {
                    "version": et.__version__,
                    "role": node.role,
                    "transport": "local",
                    "hidden_size": "32",
                    "dtype": "float32",
                }
            ]
            les = {
                float(dict(labels)["le"])
                for (name, labels), _ in got.items()
                if name == "emtransfer_transfer_duration_seconds_bucket"
                and dict(labels)["le"] != "+Inf"
            }
            assert {7.0, 45.0, 90.0} <= les  # the timeouts, and twice the longest
            assert ("process_cpu_seconds_total", ()) in got
            assert ("process_resident_memory_bytes", ()) in got
            # counters end in _total, durations in _seconds, sizes in _bytes
            for name in names:
                if name.startswith("emtransfer_") and "bytes" in name:
                    assert name.endswith(("_bytes", "_bytes_total")), name


async def test_pool_states_sum_to_the_capacity_while_blocks_are_held() -> None:
    settings = make_settings()
    async with connected(settings) as (enc, lang, peer):
        send = asyncio.create_task(enc.send("held", make_payload(100)))
        async with lang.lease("held", peer, expected_tokens=100) as got:
            assert got.num_tokens == 100
            used = value(lang, "emtransfer_pool_blocks", state="used")
            free = value(lang, "emtransfer_pool_blocks", state="free")
            assert used == 7 and used + free == 64  # ceil(100 / 16) blocks lent out
        await send
        assert value(lang, "emtransfer_pool_blocks", state="used") == 0


def test_outcomes_by_error_type() -> None:
    assert outcome_of(et.AllocationTimeout("x")) == "no_capacity"
    assert outcome_of(et.TransferTimeout("x")) == "timeout"
    assert outcome_of(et.PeerLost("x")) == "peer_lost"
    assert outcome_of(et.Unavailable("x")) == "unavailable"
    assert outcome_of(et.JobRefused("x")) == "refused"
    assert outcome_of(et.EncoderFailed("x")) == "encoder_failed"
    assert outcome_of(et.TransferAborted("x")) == "aborted"
    assert outcome_of(et.CapacityError("x")) == "no_capacity"
    assert outcome_of(et.PayloadError("x")) == "invalid"
    assert outcome_of(et.ProtocolError("x")) == "protocol_error"
    assert outcome_of(RuntimeError("x")) == "failed"
    assert set(OUTCOMES) >= {outcome_of(e("x")) for e in (et.TransferError, et.RidInFlight)}


def test_durations_buckets_are_cumulative_and_inclusive_of_their_bound() -> None:
    from emtransfer.runtime.metrics import Durations

    h = Durations((0.5, 0.001, 2.0))  # any order: sorted
    for v in (0.0005, 0.001, 0.3, 0.5, 2.0, 7.0):
        h.observe(v)
    assert h.buckets() == [("0.001", 2), ("0.5", 4), ("2.0", 5), ("+Inf", 6)]
    assert h.sum == pytest.approx(9.8015)


async def test_a_completed_transfer_moves_every_counter_of_both_sides() -> None:
    settings = make_settings()
    async with connected(settings) as (enc, lang, peer):
        send = asyncio.create_task(enc.send("counted", make_payload(40)))
        await lang.receive("counted", peer)
        await send
        nbytes = 40 * lang.token_nbytes  # every field of a token (embeddings and the side field)
        for node, direction in ((lang, "in"), (enc, "out")):
            assert value(node, "emtransfer_transfers_total", outcome="ok") == 1
            assert value(node, "emtransfer_payload_bytes_total", direction=direction) == nbytes
            assert value(node, "emtransfer_payload_tokens_total", direction=direction) == 40
            assert value(node, "emtransfer_rounds_total") == 1
            assert value(node, "emtransfer_transfer_duration_seconds_count") == 1
            totals = node.metrics.totals()
            assert totals["ok"] == 1 and totals[f"bytes_{direction}"] == nbytes
