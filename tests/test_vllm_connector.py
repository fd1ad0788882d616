"""The vLLM connector in one process: found by vLLM's factory, its configuration, the
scheduler-side bookkeeping in vLLM's call order, and the failure path through vLLM's own
scheduler (a producer that cannot be reached: the request fails, or with
``on_failure="recompute"`` vLLM encodes the item itself). ``test_vllm_connector_two_process``
moves real items between processes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import vllm_harness as vh
from vllm.config import ECTransferConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

import emtransfer as et
from emtransfer.integrations.vllm import (
    ADDR_KEY,
    RID_KEY,
    EmtransferECConnector,
    EmtransferECMetadata,
    EmtransferECStats,
    EmtransferECWorkerMetadata,
    LoadSpec,
)
from emtransfer.integrations.vllm.config import parse_config
from emtransfer.integrations.vllm.scheduler import SchedulerSide
from emtransfer.integrations.vllm.worker import LoadFailed, WorkerSide

pytestmark = pytest.mark.timeout(60)


def _ec(role: str = "ec_consumer", **extra: Any) -> ECTransferConfig:
    return ECTransferConfig(
        ec_connector=vh.CONNECTOR,
        ec_connector_module_path=vh.MODULE,
        ec_role=role,
        ec_connector_extra_config=extra,
    )


# ------------------------------------------------------------------------------ the factory


@pytest.mark.parametrize("role", ["ec_producer", "ec_consumer"])
def test_vllms_factory_builds_the_connector_in_both_roles(role: str) -> None:
    vc = vh.vllm_config(role, {"block_size": 16}, ec_port=vh.free_port())
    assert ECConnectorFactory.get_connector_class(vc.ec_transfer_config) is EmtransferECConnector
    for side in (ECConnectorRole.SCHEDULER, ECConnectorRole.WORKER):
        conn = ECConnectorFactory.create_connector(vc, side)
        try:
            assert isinstance(conn, EmtransferECConnector) and conn.role is side
            assert (conn.is_producer, conn.is_consumer) == (
                role == "ec_producer",
                role == "ec_consumer",
            )
            # vLLM's model config says the payload's shape
            settings = conn.config.settings_for()
            assert (settings.hidden_size, settings.dtype) == (vh.HIDDEN, "bfloat16")
            if side is ECConnectorRole.SCHEDULER:
                meta = conn.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[]))
                assert isinstance(meta, EmtransferECMetadata) and not meta.loads
            else:  # no node yet: vLLM starts the services once the model is resident
                assert conn.build_connector_worker_meta() is None
        finally:
            conn.shutdown()


# -------------------------------------------------------------------------- configuration


def test_a_bad_key_is_a_config_error_naming_it() -> None:
    with pytest.raises(et.ConfigError, match="'num_blokcs'"):
        parse_config(_ec(num_blokcs=8))
    with pytest.raises(et.ConfigError, match="block_size"):
        parse_config(_ec(block_size=0))
    with pytest.raises(et.ConfigError, match="on_failure"):
        parse_config(_ec(on_failure="retry"))
    with pytest.raises(et.ConfigError, match="num_blocks or pool_bytes"):
        parse_config(_ec(num_blocks=8, pool_bytes=1 << 20))
    with pytest.raises(et.ConfigError, match="producer_addr"):
        parse_config(_ec(producer_addr="http://10.0.0.5:9100"))
    with pytest.raises(et.ConfigError, match="transport"):
        parse_config(_ec(transport="carrier-pigeon"))
    with pytest.raises(et.ConfigError, match="less than one block"):
        parse_config(_ec(pool_bytes=100, hidden_size=64), None).settings_for()
    with pytest.raises(et.ConfigError, match="bootstrap_port=0"):
        parse_config(_ec("ec_producer", bootstrap_port=0))


def test_the_keys_map_onto_emtransfer_settings() -> None:
    model = SimpleNamespace(dtype=torch.float16, get_hidden_size=lambda: 3584)
    ec = _ec(
        "ec_producer",
        pool_bytes=64 << 20,
        block_size=64,
        transport="tcp",
        auth_token="s3cret",
        init_timeout=5,
    )
    ec.ec_ip, ec.ec_port = "10.1.2.3", 9123
    cfg = parse_config(ec, model)
    s = cfg.settings_for()
    assert (s.hidden_size, s.dtype, s.block_size, s.transport) == (3584, "float16", 64, "tcp")
    # 64 MiB of 64-token blocks of 3584 fp16: 146 blocks (rounded down)
    assert s.num_blocks == (64 << 20) // (64 * 3584 * 2) == 146
    assert s.default_blocks == 8 and s.init_timeout == 5
    assert s.auth_token is not None and s.auth_token.get_secret_value() == "s3cret"
    assert (s.host, s.bootstrap_port) == ("10.1.2.3", 9123)  # vLLM's ec_ip and ec_port
    # explicit keys win over the model config; a tiny pool caps emtransfer's default_blocks
    cfg = parse_config(_ec(hidden_size=512, dtype="fp32", num_blocks=4), model)
    s = cfg.settings_for()
    assert (s.hidden_size, s.dtype, s.num_blocks, s.default_blocks) == (512, "float32", 4, 4)
    assert cfg.producer_addr == "127.0.0.1:14579"  # the consumer's default: ec_ip:ec_port
    assert parse_config(_ec(producer_addr=None)).producer_addr is None


def test_rids_are_the_mm_hash_within_emtransfers_limit() -> None:
    cfg = parse_config(_ec(rid_prefix="m1/"))
    assert cfg.rid_for("abc") == "m1/abc"
    long_uuid = "u" * 300  # a client-given media UUID longer than a rid may be
    rid = cfg.rid_for(long_uuid)
    assert rid.startswith("m1/sha256:") and len(rid) <= 256
    assert rid == parse_config(_ec("ec_producer", rid_prefix="m1/")).rid_for(long_uuid)


def test_the_v1_model_runner_is_refused_for_a_consumer() -> None:
    vc = SimpleNamespace(ec_transfer_config=_ec(), use_v2_model_runner=False)
    with pytest.raises(et.ConfigError, match="V2 model runner"):
        EmtransferECConnector(vc, ECConnectorRole.WORKER)  # type: ignore[arg-type]
    # TP > 1 is supported (test_vllm_connector_tp), but needs vLLM's TP group
    vc = SimpleNamespace(
        ec_transfer_config=_ec(), parallel_config=SimpleNamespace(tensor_parallel_size=2)
    )
    worker = WorkerSide(parse_config(vc.ec_transfer_config), vc)
    with pytest.raises(et.ConfigError, match="tensor_parallel_size=2 but vLLM's"):
        worker.start_services()


@pytest.mark.parametrize("role", ["ec_consumer", "ec_producer", "ec_both"])
def test_which_ranks_move_items(role: str) -> None:
    """A later pipeline stage moves nothing (as before TP support); a TP rank other than 0
    offers nothing; a consumer's TP ranks all load (checked here without a group: a later
    PP stage never reaches a collective)."""
    from emtransfer.integrations.vllm.broadcast import TPLayout

    cfg = parse_config(_ec(role, producer_addr=None, hidden_size=vh.HIDDEN))
    vc = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2))
    later_stage = WorkerSide(cfg, vc, TPLayout(rank=0, size=2, ranks=(2, 3), first_pp=False))
    later_stage.start_services()  # no node, no group
    spec = EmtransferECMetadata(loads=[LoadSpec("h", "h", "127.0.0.1:1", 4)], publish=["h"])
    cache = {"h": torch.zeros(4, vh.HIDDEN, dtype=torch.bfloat16)}
    later_stage.start_load_caches(spec, cache)
    later_stage.start_save_caches(spec, cache)
    later_stage.save_caches(cache, "h")
    assert later_stage.language_node is None and later_stage.encode_node is None
    assert later_stage.build_connector_worker_meta() is None
    assert later_stage._tp is None and not later_stage._pending
    later_stage.shutdown()
    rank1 = WorkerSide(cfg, vc, TPLayout(rank=1, size=2, ranks=(0, 1)))
    assert rank1._producer_active() is False
    assert rank1._consumer_active() is True
    assert rank1._leads() is False
    rank1.shutdown()


# -------------------------------------------------------------- the scheduler side's books


def _feature(mm_hash: str, offset: int, n: int, media: bool = False) -> Any:
    pos = SimpleNamespace(offset=offset, length=n, get_num_embeds=lambda: n)
    return SimpleNamespace(
        identifier=mm_hash, mm_position=pos, modality="image", data=object() if media else None
    )


def _request(req_id: str, items: list[tuple[str, int]], media: bool = False, params=None) -> Any:
    feats, pos = [], 3
    for h, n in items:
        feats.append(_feature(h, pos, n, media))
        pos += n + 3
    return SimpleNamespace(
        request_id=req_id,
        mm_features=feats,
        ec_transfer_params=params,
        get_num_encoder_embeds=lambda i: feats[i].mm_position.length,
    )


def _output(**meta: Any) -> Any:
    return SimpleNamespace(ec_connector_worker_meta=EmtransferECWorkerMetadata(**meta))


def test_scheduler_side_in_vllms_call_order() -> None:
    side = SchedulerSide(parse_config(_ec(producer_addr="10.0.0.5:9100")), None)
    a = _request("A", [("h1", 5), ("h2", 7)])
    b = _request("B", [("h1", 5)], params={"h1": {ADDR_KEY: "10.0.0.6:9100", RID_KEY: "x"}})
    # schedule(): both wait; one load per item, h1 once for both requests
    assert not side.ensure_cache_available(a, 0) and not side.ensure_cache_available(b, 0)
    meta = side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[]))
    assert [(x.mm_hash, x.peer, x.rid, x.num_tokens) for x in meta.loads] == [
        ("h1", "10.0.0.5:9100", "h1", 5),  # the first asker's source: producer_addr
        ("h2", "10.0.0.5:9100", "h2", 7),
    ]
    assert side.has_pending_push_work() is False
    # the worker reports h1 in its encoder cache: B is ready, A still waits for h2
    side.update_connector_output(_output(loaded={"h1"}))
    assert side.has_cache_item("h1") and not side.has_cache_item("h2")
    assert side.ensure_cache_available(b, 0) and not side.ensure_cache_available(a, 0)
    side.update_state_after_alloc(b, 0)  # vLLM allocates it: its encoder cache owns h1 now
    assert not side.has_cache_item("h1")
    assert side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[])).adopted == ["h1"]
    assert side.ensure_cache_available(a, 0) is False  # h1 is local; h2 still loading
    # h2 fails: A, and only A, is unavailable; it is failed once
    side.update_connector_output(_output(failed={"h2": "PeerLost: gone"}))
    assert side.take_unavailable_requests() == {"A"} and side.take_unavailable_requests() == set()
    side.request_finished(a)
    side.request_finished(b)
    assert not side._loads


def test_a_request_that_ends_while_loading_cancels_the_load() -> None:
    side = SchedulerSide(parse_config(_ec()), None)
    a, c = _request("A", [("h1", 5)]), _request("C", [("h1", 5)])
    assert not side.ensure_cache_available(a, 0) and not side.ensure_cache_available(c, 0)
    side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[]))
    side.request_finished(a)  # C still waits: no cancel
    assert side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[])).cancels == []
    side.request_finished(c)  # nobody waits: the worker aborts the receive
    assert side.has_pending_push_work()
    assert side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[])).cancels == ["h1"]
    # a load reported after its requests ended is dropped by the worker
    side.update_connector_output(_output(loaded={"h1"}))
    assert side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[])).cancels == ["h1"]


def test_items_without_a_producer_and_computed_items_are_left_to_vllm() -> None:
    side = SchedulerSide(parse_config(_ec(producer_addr="")), None)
    assert side.ensure_cache_available(_request("A", [("h1", 5)]), 0)  # nowhere to pull from
    announced = _request("B", [("h2", 5)], params={"h2": {ADDR_KEY: "10.0.0.6:9100"}})
    assert not side.ensure_cache_available(announced, 0)
    assert side.ensure_cache_available(announced, 100)  # prefilled past it: nothing to load


def test_producer_announces_where_each_item_is() -> None:
    cfg = parse_config(_ec("ec_producer", advertise_addr="enc-1.internal:9100"))
    side = SchedulerSide(cfg, None)
    req = _request("A", [("h1", 5), ("h2", 7), ("h1", 5)])
    assert side.ensure_cache_available(req, 0)
    assert side.build_connector_meta(SimpleNamespace(free_encoder_mm_hashes=[])).publish == [
        "h1",
        "h2",
    ]
    delay, params = side.request_finished(req)
    assert delay is False and params is not None
    assert params["h1"] == {
        "modality": "image",
        "item_indices": [0, 2],
        "emtransfer_addr": "enc-1.internal:9100",
        "emtransfer_rid": "h1",
        "num_tokens": 5,
    }
    assert params["h2"]["num_tokens"] == 7


def test_stats_aggregate_and_reduce() -> None:
    a = EmtransferECStats()
    a.add(loads_ok=2, load_bytes=4e9, load_seconds=2.0)
    b = EmtransferECConnector.build_ec_connector_stats({"loads_ok": 1, "loads_failed": 1})
    out = a.aggregate(b).reduce()
    assert out["loads_ok"] == 3 and out["loads_failed"] == 1
    assert out["load_ms_mean"] == pytest.approx(666.667) and out["load_GBps_per_load"] == 2.0
    assert EmtransferECStats().is_empty() and not a.is_empty()
    merged = EmtransferECWorkerMetadata(loaded={"x", "y"}).aggregate(
        EmtransferECWorkerMetadata(failed={"y": "lost"}, address="h:1")
    )
    assert merged.loaded == {"x"} and merged.failed == {"y": "lost"} and merged.address == "h:1"


def test_a_payload_that_is_not_the_item_fails_its_load() -> None:
    from emtransfer.integrations.vllm.metadata import LoadSpec

    worker = WorkerSide(parse_config(_ec(target_device="cpu")), None)
    spec = LoadSpec("h1", "h1", "127.0.0.1:1", 4)
    got = SimpleNamespace(num_tokens=3, meta={"mm_hash": "h1"}, tensors={"embeddings": None})
    with pytest.raises(LoadFailed, match="3 rows; the request expects 4"):
        worker._place(spec, got)  # type: ignore[arg-type]
    got = SimpleNamespace(num_tokens=4, meta={"mm_hash": "h9"}, tensors={})
    with pytest.raises(LoadFailed, match="carried item 'h9'"):
        worker._place(spec, got)  # type: ignore[arg-type]
    emb = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    got = SimpleNamespace(num_tokens=4, meta={"shape": [4, 2, 3]}, tensors={"embeddings": emb})
    assert worker._place(spec, got).shape == (4, 2, 3)  # type: ignore[arg-type]
    worker.shutdown()


# ------------------------------------------------ the failure path through vLLM's scheduler


@pytest.mark.parametrize("on_failure", ["fail", "recompute"])
def test_an_unreachable_producer_fails_only_that_request(
    on_failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer's address refuses the connection (PeerLost at once). With "fail" the
    request ends FINISHED_ERROR through take_unavailable_requests; with "recompute" vLLM
    schedules the encoder for the item (the request still has its media) and the request
    finishes. A request without remote items runs meanwhile either way."""
    progress = vh.Progress(monkeypatch)
    nowhere = f"127.0.0.1:{vh.free_port()}"
    extra = {**vh.EXTRA, "transport": "tcp", "producer_addr": "", "on_failure": on_failure}
    engine = vh.Engine(vh.vllm_config("ec_consumer", extra))
    try:
        params = {"h-remote": {ADDR_KEY: nowhere, RID_KEY: "h-remote"}}
        engine.add(
            vh.make_request(("R", [("h-remote", 20)]), media=True, ec_transfer_params=params)
        )
        engine.add(vh.make_request(("L", [("h-local", 9)]), media=True))  # encoded here
        while not {"R", "L"} <= set(engine.finished):
            mark = progress.mark()
            if not engine.step():
                progress.wait_after(mark)
        reason = str(engine.finished["R"].finish_reason)
        assert str(engine.finished["L"].finish_reason) in ("length", "FinishReason.LENGTH")
        if on_failure == "fail":
            assert reason in ("error", "FinishReason.ERROR")
            assert ("R", "h-remote") not in engine.runner.gathered
        else:
            assert reason in ("length", "FinishReason.LENGTH")
            got = engine.runner.gathered[("R", "h-remote")]
            assert vh.same_bits(got, vh.item_tensor("h-remote", 20))  # the local encoder's
        assert engine.ec_stats.reduce()["loads_failed"] == 1
    finally:
        engine.shutdown()


# --------------------------------------------------------------- the producer's worker side


def test_producer_offers_an_item_once_at_a_time_and_again_when_published() -> None:
    """save_caches offers an item; a second save while the offer is open changes nothing (the
    first consumer to ask takes it); once taken, a request that hits the producer's encoder
    cache (no encoder run, so no save_caches) gets it offered again through the scheduler's
    publish list and start_save_caches. The node starts from the first tensor's shape."""
    from emtransfer.sync import SyncLanguageNode

    port = vh.free_port()
    cfg = parse_config(_ec("ec_producer", **vh.EXTRA, transport="tcp", bootstrap_port=port))
    worker = WorkerSide(cfg, None)
    emb = vh.item_tensor("h1", 37)
    cache = {"h1": emb}
    lang = None
    try:
        worker.start_services()  # no hidden_size yet: the node waits for the first tensor
        assert worker.encode_node is None
        worker.save_caches(cache, "h1")
        worker.save_caches(cache, "h1")
        enc = worker.encode_node
        assert enc is not None and enc.address == f"127.0.0.1:{port}"
        assert enc.settings.hidden_size == vh.HIDDEN and len(worker._sends) == 1
        lang = SyncLanguageNode(cfg.settings_for(vh.HIDDEN, "bfloat16"))
        got = lang.receive("h1", enc.address, 37).result(vh.WAIT)
        assert vh.same_bits(got.tensors["embeddings"], emb) and got.meta == {"mm_hash": "h1"}
        worker._sends["h1"].result(vh.WAIT)  # the send's end, as a later step would see it
        worker.start_save_caches(EmtransferECMetadata(publish=["h1", "h-gone"]), cache)
        got = lang.receive("h1", enc.address, 37).result(vh.WAIT)
        assert vh.same_bits(got.tensors["embeddings"], emb)
        worker._sends["h1"].result(vh.WAIT)
        sent, received = worker.get_finished()
        assert sent == {"h1"} and received is None
        stats = worker.take_stats()
        assert stats is not None and stats.data["sends_ok"] == 2
        worker.save_caches({"h2": vh.item_tensor("h2", 3, 32)}, "h2")  # a wrong width
        assert "h2" not in worker._sends and worker._stats.data["sends_failed"] == 1
    finally:
        worker.shutdown()
        if lang is not None:
            lang.close()
    assert worker.encode_node is not None and worker.encode_node.closed


def test_an_ec_both_instance_pulls_only_announced_items() -> None:
    cfg = parse_config(_ec("ec_both"))  # its ec_ip:ec_port is its own encode node
    assert (cfg.is_producer, cfg.is_consumer, cfg.producer_addr) == (True, True, None)
    side = SchedulerSide(cfg, None)
    assert side.ensure_cache_available(_request("A", [("h1", 5)]), 0)  # encoded here
