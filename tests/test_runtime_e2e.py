"""End to end through the runtime (EncodeNode -> LanguageNode over the local transport):
every payload arrives bit-exact, in as many rounds as it needs, whatever the pools' sizes,
the free lists' order and the order in which the two sides start; both pools end full."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
import torch
from helpers_runtime import (
    BLOCK,
    assert_pools_clean,
    assert_same_payload,
    connected,
    make_payload,
    make_settings,
    next_blocks,
    scramble,
    sender_session,
    state_of,
    states_seen,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emtransfer as et
from emtransfer.buffers import payload_digest


async def _transfer(
    enc: et.EncodeNode,
    lang: et.LanguageNode,
    peer: et.Peer,
    rid: str,
    payload: dict[str, torch.Tensor],
    meta: dict,
    *,
    send_first: bool,
    expected_tokens: int | None = None,
) -> tuple[et.Received, et.SendStats, set[str]]:
    """One request with a chosen start order; returns what arrived, the sender's stats and
    the states the sender's machine went through."""
    if send_first:
        send = asyncio.create_task(enc.send(rid, payload, meta=meta))
        await wait_until(lambda: sender_session(enc, rid) is not None or send.done(), 10, rid)
        sess = sender_session(enc, rid)
        recv = asyncio.create_task(lang.receive(rid, peer, expected_tokens=expected_tokens))
    else:
        recv = asyncio.create_task(lang.receive(rid, peer, expected_tokens=expected_tokens))
        # the Init reaches the encode node before it has the data
        await wait_until(
            lambda: state_of(sender_session(enc, rid)) == "WAIT_DATA" or recv.done(), 10, rid
        )
        sess = sender_session(enc, rid)
        send = asyncio.create_task(enc.send(rid, payload, meta=meta))
    got, stats = await asyncio.gather(recv, send)
    return got, stats, states_seen(sess) if sess is not None else set()


def _check(
    got: et.Received,
    stats: et.SendStats,
    payload: dict[str, torch.Tensor],
    meta: dict,
    *,
    rid: str,
    default_tokens: int,
    lang_capacity: int,
) -> None:
    n = payload["embeddings"].shape[0]
    assert got.rid == rid
    assert got.num_tokens == n == stats.num_tokens
    assert_same_payload(got.tensors, payload)
    assert got.meta == meta
    assert got.rounds == stats.rounds
    # one allocation never exceeds the default on round 0 nor the whole pool later
    assert got.rounds >= 1 + math.ceil(max(0, n - default_tokens) / lang_capacity)
    if n > default_tokens:
        assert got.rounds > 1


# ------------------------------------------------------------------------ (a) the main property


async def test_200_concurrent_requests_through_a_64_block_pool() -> None:
    s = make_settings(num_blocks=64, block_size=BLOCK, default_blocks=4)
    capacity = s.capacity_tokens  # 1024 tokens
    rng = random.Random(1234)
    lengths = [rng.randint(1, 3 * capacity) for _ in range(200)]
    lengths[:6] = [1, BLOCK, s.default_tokens, s.default_tokens + 1, capacity, 3 * capacity]
    async with connected(s) as (enc, lang, peer):
        payloads = [make_payload(n, seed=i) for i, n in enumerate(lengths)]
        metas = [{"i": i, "mrope_position_delta": -i, "grid": [1, i % 7, 3]} for i in range(200)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    _transfer(
                        enc, lang, peer, f"req-{i}", payloads[i], metas[i], send_first=i % 2 == 0
                    )
                    for i in range(200)
                )
            ),
            timeout=60,
        )
        for i, (got, stats, seen) in enumerate(results):
            _check(
                got,
                stats,
                payloads[i],
                metas[i],
                rid=f"req-{i}",
                default_tokens=s.default_tokens,
                lang_capacity=capacity,
            )
            # both orders were really exercised
            assert ("WAIT_INIT" if i % 2 == 0 else "WAIT_DATA") in seen, (i, seen)
        # the far-larger-than-the-pool ones needed several rounds
        assert all(r[0].rounds > 1 for r, n in zip(results, lengths, strict=True) if n > capacity)
        assert_pools_clean(enc, lang)
        assert enc.leak_report() == {} and lang.leak_report() == {}


async def test_tiny_pools_far_smaller_than_the_in_flight_payloads_make_progress() -> None:
    # 2 blocks of 16 on each side; 24 concurrent payloads of up to 10x the pool
    s = make_settings(num_blocks=2, block_size=BLOCK, default_blocks=2)
    rng = random.Random(7)
    lengths = [rng.randint(1, 10 * s.capacity_tokens) for _ in range(24)]
    async with connected(s) as (enc, lang, peer):
        payloads = [make_payload(n, seed=i) for i, n in enumerate(lengths)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    _transfer(
                        enc, lang, peer, f"t{i}", payloads[i], {"i": i}, send_first=i % 3 == 0
                    )
                    for i in range(len(lengths))
                )
            ),
            timeout=30,
        )
        for i, (got, stats, _) in enumerate(results):
            _check(
                got,
                stats,
                payloads[i],
                {"i": i},
                rid=f"t{i}",
                default_tokens=s.default_tokens,
                lang_capacity=s.capacity_tokens,
            )


@st.composite
def _scenarios(draw: st.DrawFn) -> dict:
    block = draw(st.sampled_from([1, 4, 16]))
    enc_blocks = draw(st.integers(1, 24))
    lang_blocks = draw(st.integers(1, 24))
    default_blocks = draw(st.integers(1, lang_blocks))
    cap = max(enc_blocks, lang_blocks) * block
    lengths = draw(st.lists(st.integers(1, 3 * cap), min_size=1, max_size=12))
    orders = draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    return {
        "block": block,
        "enc_blocks": enc_blocks,
        "lang_blocks": lang_blocks,
        "default_blocks": default_blocks,
        "inflight": draw(st.integers(1, 8)),
        "lengths": lengths,
        "orders": orders,
        "scramble_seed": draw(st.one_of(st.none(), st.integers(0, 2**16))),
    }


async def _run_scenario(sc: dict) -> None:
    common = {"block_size": sc["block"], "default_blocks": 1}
    enc_s = make_settings(num_blocks=sc["enc_blocks"], **common)
    lang_s = make_settings(
        num_blocks=sc["lang_blocks"],
        max_inflight_per_peer=sc["inflight"],
        **{**common, "default_blocks": sc["default_blocks"]},
    )
    async with connected(enc_s, lang_s) as (enc, lang, peer):
        if sc["scramble_seed"] is not None:
            scramble(enc.allocator, seed=sc["scramble_seed"])
            scramble(lang.allocator, seed=sc["scramble_seed"] + 1)
        payloads = [make_payload(n, seed=i) for i, n in enumerate(sc["lengths"])]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    _transfer(enc, lang, peer, f"h{i}", p, {"n": i}, send_first=sc["orders"][i])
                    for i, p in enumerate(payloads)
                )
            ),
            timeout=20,
        )
        for i, (got, stats, _) in enumerate(results):
            _check(
                got,
                stats,
                payloads[i],
                {"n": i},
                rid=f"h{i}",
                default_tokens=lang_s.default_tokens,
                lang_capacity=lang_s.capacity_tokens,
            )
        assert_pools_clean(enc, lang)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sc=_scenarios())
def test_property_random_pools_lengths_orders(sc: dict) -> None:
    asyncio.run(_run_scenario(sc))


# --------------------------------------------------------------------- (b) the original scenario


def _original_settings(**kw: object) -> et.Settings:
    # default_blocks * block_size = 1024 tokens
    return make_settings(block_size=128, default_blocks=8, num_blocks=16, **kw)


async def test_2000_tokens_with_a_1024_token_default_take_two_rounds() -> None:
    s = _original_settings()
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(2000, seed=3)
        meta = {"mrope_position_delta": 5}
        send = asyncio.create_task(enc.send("orig", payload, meta=meta))
        got = await lang.receive("orig", peer, expected_tokens=None)
        stats = await send
        assert got.rounds == 2 and stats.rounds == 2
        assert got.num_tokens == 2000
        assert_same_payload(got.tensors, payload)
        assert got.meta == meta
        assert set(got.stats) >= {"elapsed_s", "transfer_s", "alloc_wait_s", "copy_s", "bytes"}


async def test_known_length_takes_one_round() -> None:
    s = _original_settings()
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(2000, seed=4)
        recv = asyncio.create_task(lang.receive("known", peer, expected_tokens=2000))
        stats = await enc.send("known", payload)
        got = await recv
        assert got.rounds == 1 and stats.rounds == 1
        assert_same_payload(got.tensors, payload)
        assert got.meta == {}


async def test_expected_tokens_above_the_real_length_takes_one_round() -> None:
    s = _original_settings()
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(700, seed=5)
        send = asyncio.create_task(enc.send("over", payload))
        got = await lang.receive("over", peer, expected_tokens=1500)
        await send
        assert got.rounds == 1 and got.num_tokens == 700
        assert_same_payload(got.tensors, payload)


@pytest.mark.parametrize("enc_blocks", [2, 16, 40])
async def test_payload_larger_than_the_whole_receiver_pool(enc_blocks: int) -> None:
    enc_s = make_settings(block_size=128, default_blocks=1, num_blocks=enc_blocks)
    lang_s = make_settings(block_size=128, default_blocks=4, num_blocks=4)  # 512 tokens
    async with connected(enc_s, lang_s) as (enc, lang, peer):
        payload = make_payload(2000, seed=6)
        send = asyncio.create_task(enc.send("huge", payload, meta={"k": "v"}))
        got = await lang.receive("huge", peer)
        stats = await send
        assert got.rounds == stats.rounds == math.ceil(2000 / 512)
        assert_same_payload(got.tensors, payload)
        assert got.meta == {"k": "v"}
        # the sender staged through its own (possibly tiny) pool in pieces
        assert stats.writes >= max(got.rounds, math.ceil(2000 / enc_s.capacity_tokens))


# ----------------------------------------------------------------------------------- (c) lease


def _pool_storage(lang: et.LanguageNode, name: str) -> int:
    return lang.registry.pools[name].untyped_storage().data_ptr()


async def test_lease_fitting_one_allocation_is_zero_copy() -> None:
    s = make_settings(num_blocks=64, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        n = 100  # 7 blocks of 16
        payload = make_payload(n, seed=11)
        send = asyncio.create_task(enc.send("lease", payload, meta={"a": 1}))
        async with lang.lease("lease", peer, expected_tokens=n) as got:
            assert got.zero_copy
            assert got.rounds == 1 and got.num_tokens == n
            assert got.meta == {"a": 1}
            assert_same_payload(got.tensors, payload)
            for name in payload:  # views into the pool, not copies
                assert got.tensors[name].untyped_storage().data_ptr() == _pool_storage(lang, name)
            # the blocks stay held while the lease is open
            assert lang.allocator.num_free == s.num_blocks - math.ceil(n / s.block_size)
            assert list(lang.leak_report()) == ["lease"]
            await send
        assert_pools_clean(lang, enc)


async def test_lease_without_expected_tokens_uses_the_default_allocation() -> None:
    s = make_settings(num_blocks=64, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(s.default_tokens - 3, seed=12)
        send = asyncio.create_task(enc.send("lease-d", payload))
        async with lang.lease("lease-d", peer) as got:
            assert got.zero_copy and got.rounds == 1
            assert_same_payload(got.tensors, payload)
            assert lang.allocator.num_free == s.num_blocks - s.default_blocks
        await send


async def test_lease_with_scrambled_free_list_is_a_correct_copy() -> None:
    s = make_settings(num_blocks=16, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        # the receiver's allocation will be blocks [9, 3, 4, 5, 0, ...]: not consecutive
        order = [9, 3, 4, 5, 0, *[b for b in range(16) if b not in (9, 3, 4, 5, 0)]]
        scramble(lang.allocator, order)
        scramble(enc.allocator, seed=3)
        n = 4 * s.block_size
        payload = make_payload(n, seed=13)
        send = asyncio.create_task(enc.send("lease-s", payload))
        async with lang.lease("lease-s", peer, expected_tokens=n) as got:
            assert not got.zero_copy
            assert got.rounds == 1
            assert_same_payload(got.tensors, payload)
            assert lang.leak_report() == {"lease-s": [9, 3, 4, 5]}
        await send


async def test_lease_payload_longer_than_the_allocation_is_still_correct() -> None:
    s = make_settings(num_blocks=16, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(100, seed=14)
        send = asyncio.create_task(enc.send("lease-l", payload))
        async with lang.lease("lease-l", peer, expected_tokens=32) as got:
            assert got.rounds > 1
            assert got.num_tokens == 100
            assert_same_payload(got.tensors, payload)
        assert (await send).rounds == got.rounds


async def test_lease_body_raising_still_frees_the_blocks() -> None:
    s = make_settings(num_blocks=16, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(40, seed=15)
        send = asyncio.create_task(enc.send("lease-x", payload))
        with pytest.raises(KeyError):
            async with lang.lease("lease-x", peer, expected_tokens=40) as got:
                assert_same_payload(got.tensors, payload)
                raise KeyError("consumer failed")
        await send
        assert_pools_clean(lang, enc)


async def test_non_contiguous_and_strided_payloads_arrive_intact() -> None:
    s = make_settings(num_blocks=16, default_blocks=2)
    async with connected(s) as (enc, lang, peer):
        n = 3 * s.default_tokens + 5
        base = make_payload(n, seed=16)
        emb = base["embeddings"].t().contiguous().t()  # column-major: not contiguous
        pos = torch.cat([base["mrope_positions"], base["mrope_positions"]], dim=1)[:, ::2]
        assert not emb.is_contiguous() and not pos.is_contiguous()
        send = asyncio.create_task(enc.send("strided", {"embeddings": emb, "mrope_positions": pos}))
        got = await lang.receive("strided", peer)
        await send
        assert_same_payload(
            got.tensors, {"embeddings": emb.contiguous(), "mrope_positions": pos.contiguous()}
        )


async def test_one_encode_node_serves_two_language_nodes() -> None:
    s = make_settings(num_blocks=16, default_blocks=2)
    async with connected(s) as (enc, lang, peer), et.LanguageNode(s) as lang2:
        peer2 = await lang2.connect(enc.address)
        p1, p2 = make_payload(70, seed=17), make_payload(90, seed=18)
        sends = [asyncio.create_task(enc.send("a", p1)), asyncio.create_task(enc.send("b", p2))]
        g1, g2 = await asyncio.gather(lang.receive("a", peer), lang2.receive("b", peer2))
        await asyncio.gather(*sends)
        assert_same_payload(g1.tensors, p1)
        assert_same_payload(g2.tensors, p2)
        assert_pools_clean(lang2)


# ---------------------------------------------------------------------------------- (d) digest


@pytest.mark.parametrize("n", [1, 50, 300])
async def test_verify_digest(n: int) -> None:
    s = make_settings(num_blocks=32, default_blocks=2, verify_digest=True)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(n, seed=21)
        want = payload_digest(payload, ["embeddings", "mrope_positions"])
        recv = asyncio.create_task(lang.receive("dig", peer))
        stats = await enc.send("dig", payload)
        got = await recv
        assert stats.digest is not None and got.digest is not None
        assert got.digest == stats.digest == want
        assert payload_digest(got.tensors, ["embeddings", "mrope_positions"]) == want
        assert_same_payload(got.tensors, payload)
        # and through a zero-copy lease
        send = asyncio.create_task(enc.send("dig-l", payload))
        async with lang.lease("dig-l", peer, expected_tokens=n) as held:
            assert held.digest == want
            assert_same_payload(held.tensors, payload)
        await send


@pytest.mark.parametrize("use_lease", [False, True])
async def test_verify_digest_catches_corruption(use_lease: bool) -> None:
    s = make_settings(num_blocks=16, default_blocks=4, verify_digest=True)
    async with connected(s) as (enc, lang, peer):
        original = enc.transport.write

        async def corrupting_write(peer_id: str, ops: list, *, tag: str, **kw: Any) -> None:
            await original(peer_id, ops, tag=tag, **kw)
            op = next(o for o in ops if o.field == "embeddings")
            lang.registry.byte_view("embeddings")[op.dst_offset] ^= 0x5A  # one flipped byte

        enc.transport.write = corrupting_write  # type: ignore[method-assign]
        send = asyncio.create_task(enc.send("corrupt", make_payload(30, seed=23)))
        with pytest.raises(et.TransferError, match="digest"):
            if use_lease:
                async with lang.lease("corrupt", peer, expected_tokens=30):
                    pass
            else:
                await lang.receive("corrupt", peer)
        await send
        assert_pools_clean(enc, lang)


async def test_without_verify_digest_no_digest_travels() -> None:
    s = make_settings(num_blocks=8, default_blocks=2)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(20, seed=22)
        send = asyncio.create_task(enc.send("nodig", payload))
        got = await lang.receive("nodig", peer)
        assert got.digest is None and (await send).digest is None


# ----------------------------------------------------------------------- (e) scrambled free lists


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_scrambled_free_lists_keep_data_intact(seed: int) -> None:
    s = make_settings(num_blocks=24, default_blocks=3)
    async with connected(s) as (enc, lang, peer):
        scramble(enc.allocator, seed=seed)
        scramble(lang.allocator, seed=seed + 100)
        first = next_blocks(lang.allocator, 3)
        assert first != sorted(first) or first != list(range(first[0], first[0] + 3))
        rng = random.Random(seed)
        lengths = [rng.randint(1, 2 * s.capacity_tokens) for _ in range(16)]
        payloads = [make_payload(n, seed=100 * seed + i) for i, n in enumerate(lengths)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    _transfer(enc, lang, peer, f"s{i}", p, {"i": i}, send_first=bool(i % 2))
                    for i, p in enumerate(payloads)
                )
            ),
            timeout=20,
        )
        for i, (got, stats, _) in enumerate(results):
            _check(
                got,
                stats,
                payloads[i],
                {"i": i},
                rid=f"s{i}",
                default_tokens=s.default_tokens,
                lang_capacity=s.capacity_tokens,
            )


async def test_a_pool_slot_outside_the_allocation_is_never_written() -> None:
    # blocks [9, 3, 4, 5, 0]: the region [0, 10 blocks) built from min(blocks) would cover free
    # blocks 1, 2, 6, 7, 8; fill them with a sentinel and check it survives the transfer
    s = make_settings(num_blocks=16, default_blocks=5)
    async with connected(s) as (enc, lang, peer):
        order = [9, 3, 4, 5, 0, *[b for b in range(16) if b not in (9, 3, 4, 5, 0)]]
        scramble(lang.allocator, order)
        pool = lang.registry.pools["embeddings"]
        pool.fill_(-7.0)
        n = 5 * s.block_size
        payload = make_payload(n, seed=31)
        send = asyncio.create_task(enc.send("sentinel", payload))
        async with lang.lease("sentinel", peer, expected_tokens=n) as got:
            assert_same_payload(got.tensors, payload)
            for b in range(16):
                rows = pool[b * s.block_size : (b + 1) * s.block_size]
                if b not in (9, 3, 4, 5, 0):
                    assert torch.all(rows == -7.0), f"block {b} was written"
        await send


# ------------------------------------------------------------- Init and data at the same moment


async def test_send_called_while_the_init_is_being_processed() -> None:
    # BUG: an Init creates the sender session in state NEW and queues InitReceived; a send()
    # that runs before the session's coroutine stepped sees "NEW with no payload" and refuses
    # with InvalidRequest("already in flight"), although Init-before-data must work.
    s = make_settings(num_blocks=16, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        payload = make_payload(50, seed=41)
        sends: list[asyncio.Task[et.SendStats]] = []
        original = enc._on_message

        def on_message(p: et.Peer, msg: object) -> None:
            # the caller's send() is scheduled just as the Init is handled
            if type(msg).__name__ == "Init" and not sends:
                sends.append(asyncio.create_task(enc.send("race", payload, meta={"r": 1})))
            original(p, msg)

        enc._on_message = on_message  # type: ignore[method-assign]
        recv = asyncio.create_task(lang.receive("race", peer))
        await wait_until(lambda: bool(sends), 5, "the Init")
        try:
            stats = await asyncio.wait_for(sends[0], 10)
        except et.TransferError as exc:
            recv.cancel()
            pytest.fail(f"send racing the Init failed: {type(exc).__name__}: {exc}", pytrace=False)
        got = await asyncio.wait_for(recv, 10)
        assert stats.rounds == got.rounds == 1
        assert_same_payload(got.tensors, payload)
        assert got.meta == {"r": 1}


async def test_received_tensors_do_not_alias_the_pool() -> None:
    s = make_settings(num_blocks=4, default_blocks=4)
    async with connected(s) as (enc, lang, peer):
        first = make_payload(40, seed=51)
        send = asyncio.create_task(enc.send("one", first))
        got = await lang.receive("one", peer)
        await send
        # the same blocks are reused by the next request: the first result must not change
        second = make_payload(40, seed=52)
        send = asyncio.create_task(enc.send("two", second))
        got2 = await lang.receive("two", peer)
        await send
        assert_same_payload(got.tensors, first)
        assert_same_payload(got2.tensors, second)
        assert not got.zero_copy
