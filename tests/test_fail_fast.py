"""Misconfiguration fails at once, with a message that names what is wrong: a CUDA device on
a CPU-only torch, the torch transport outside torchrun, ``serve --transport local``, calls on a
node that was never started, an address with a scheme or without a port, a connection refused
(not after ``bootstrap_timeout``), a settings mismatch (the setting by name, each side's value
by role); a refused peer is retried with a growing delay and logged once, not every second."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch
from helpers_runtime import make_payload, make_settings
from log_capture import capture_logs

import emtransfer as et
from emtransfer.cli import main
from emtransfer.server.pool import CONFIG_BACKOFF_MAX, EncoderPool

pytestmark = pytest.mark.timeout(30)


@pytest.mark.skipif(
    torch.backends.cuda.is_built(),
    reason="this torch has CUDA; the CPU-only refusal is for CPU builds (the device-count "
    "refusal below covers CUDA builds)",
)
def test_a_cuda_device_on_a_cpu_only_torch() -> None:
    with pytest.raises(et.ConfigError, match=r"device='cuda:0'.*built without CUDA"):
        et.LanguageNode(make_settings(device="cuda:0", transport="tcp"))


def test_a_cuda_device_that_is_not_there(monkeypatch: pytest.MonkeyPatch) -> None:
    from emtransfer.buffers import check_device

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(et.ConfigError, match=r"device='cuda:2': only 2 CUDA device"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(et.ConfigError, match="no CUDA device is visible"):
        check_device("cuda")


def test_the_torch_transport_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(et.ConfigError, match=r"transport='torch'.*torchrun.*not set here: RANK"):
        et.LanguageNode(make_settings(transport="torch"))


def test_serve_refuses_the_in_process_transport(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--role", "encode", "--transport", "local"]) == 2
    assert "transport='local'" in capsys.readouterr().err


async def test_calls_on_a_node_that_was_never_started() -> None:
    lang = et.LanguageNode(make_settings(transport="tcp"))
    enc = et.EncodeNode(make_settings(transport="tcp"))
    calls = [
        lambda: lang.receive("r", "127.0.0.1:9"),
        lambda: lang.encode("r", "127.0.0.1:9", {}),
        lambda: lang.connect("127.0.0.1:9"),
        lambda: enc.send("r", make_payload(4)),
    ]
    for call in calls:
        with pytest.raises(et.ConfigError, match=r"never started: await node\.start"):
            await call()
    with pytest.raises(et.ConfigError, match="EncodeNode was never started"):
        async with enc.stage("r", 4):
            pass
    assert lang.allocator.num_free == lang.allocator.num_blocks


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("http://127.0.0.1:9100", "without a scheme"),
        ("127.0.0.1", "expected host:port"),
        ("127.0.0.1:", "expected host:port"),
        ("127.0.0.1:0", "port must be 1..65535"),
        ("127.0.0.1:70000", "port must be 1..65535"),
    ],
)
async def test_a_bad_address_is_refused_at_once(address: str, why: str) -> None:
    async with et.LanguageNode(make_settings(transport="tcp", bootstrap_timeout=60)) as lang:
        async with asyncio.timeout(5):
            with pytest.raises(et.InvalidRequest, match=why):
                await lang.connect(address)
    assert main(["serve", "--role", "language", "--encoder-addr", address]) == 2


async def test_a_refused_connection_is_reported_at_once() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with et.LanguageNode(make_settings(transport="tcp", bootstrap_timeout=60)) as lang:
        async with asyncio.timeout(5):  # not the 60 s of bootstrap_timeout
            with pytest.raises(et.PeerLost, match="connection refused"):
                await lang.receive("r", f"127.0.0.1:{port}")


async def test_a_settings_mismatch_names_the_setting_and_each_side() -> None:
    enc_settings = make_settings(transport="tcp", hidden_size=512)
    with capture_logs(logging.DEBUG) as events:
        async with (
            et.EncodeNode(enc_settings, control="tcp") as enc,
            et.LanguageNode(make_settings(transport="tcp", hidden_size=4096)) as lang,
        ):
            for _ in range(3):  # a language node that keeps trying
                with pytest.raises(et.ConfigError) as info:
                    await lang.connect(enc.address)
    text = str(info.value)
    assert "hidden_size=512 on the encode node, hidden_size=4096 on the language node" in text
    refusals = [e for e in events if e["event"] == "handshake refused"]
    assert [e["log_level"] for e in refusals] == ["warning", "debug", "debug"]


async def test_the_pool_backs_off_from_a_refusal_and_retries_a_node_that_is_down() -> None:
    """The delays the pool sleeps between attempts (recorded instead of slept)."""

    class Lang:
        settings = make_settings()

        def __init__(self, error: Exception) -> None:
            self.error = error

        async def connect(self, address: str) -> Any:
            raise self.error

    for error, want in [
        (et.ConfigError("settings mismatch"), [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (et.PeerLost("connection refused"), [1.0] * 7),
    ]:
        pool = EncoderPool(Lang(error), ("127.0.0.1:9",), retry_interval=1.0)  # type: ignore[arg-type]
        delays: list[float] = []

        async def record(delay: float, pool: EncoderPool = pool, delays: list = delays) -> None:
            delays.append(delay)
            if len(delays) == 7:
                pool._closing = True

        pool._pause = record  # type: ignore[method-assign]
        await pool._connect_loop(pool.states[0])
        assert delays == want and max(delays) <= CONFIG_BACKOFF_MAX
