"""A library is silent unless its host configures logging: emtransfer's events go through the
standard ``logging`` module under the ``emtransfer`` logger, rendered by the CLI's formatter."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
from runtime_harness import transport_params

from emtransfer.logs import Formatter, configure_logging, get_logger

pytestmark = pytest.mark.timeout(60)

TRANSFER = textwrap.dedent(
    """
    import asyncio, logging, sys
    import torch
    import emtransfer as et
    {setup}
    async def main():
        s = et.Settings(transport="{transport}", hidden_size=64, dtype="float32", num_blocks=8,
                        block_size=16, default_blocks=2)
        async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as lang:
            peer = await lang.connect(enc.address)
            pay = {{"embeddings": torch.randn(100, 64)}}
            send = asyncio.create_task(enc.send("r", pay))
            got = await lang.receive("r", peer)
            await send
            assert torch.equal(got.tensors["embeddings"], pay["embeddings"])
            try:
                await lang.receive("missing", peer, expected_tokens=10**9)  # a warning-worthy refusal
            except et.TransferError:
                pass
    asyncio.run(main())
    """
)


def _run(setup: str, transport: str = "local") -> subprocess.CompletedProcess[str]:
    code = TRANSFER.format(setup=setup, transport=transport)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True
    )


@pytest.mark.parametrize("transport", transport_params("local", "tcp", "nixl"))
def test_embedded_and_unconfigured_it_prints_nothing(transport: str) -> None:
    """Nothing on stdout or stderr: not our events, not NIXL's own lines."""
    r = _run("", transport)
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_the_host_s_logging_configuration_decides() -> None:
    r = _run(
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format='%(name)s %(levelname)s %(message)s')"
    )
    lines = r.stdout.splitlines()
    assert any(ln.startswith("emtransfer DEBUG transition") for ln in lines), lines[:20]
    r = _run("logging.basicConfig(level=logging.WARNING, stream=sys.stdout)")
    assert "transition" not in r.stdout


def test_configure_logging_renders_fields_readable_and_as_json() -> None:
    record = logging.LogRecord("emtransfer", logging.INFO, __file__, 1, "peer lost", None, None)
    record.emtransfer = {"peer": "enc-1", "requests": 3}
    line = Formatter().format(record)
    assert "[info     ] peer lost" in line and "peer='enc-1'" in line and "requests=3" in line
    obj = json.loads(Formatter(json=True).format(record))
    assert obj["event"] == "peer lost" and obj["level"] == "info" and obj["requests"] == 3


def test_a_filtered_level_formats_nothing() -> None:
    """Below the level a call returns before its fields are touched; at the level they are
    rendered (the counter shows both)."""
    seen = []

    class Counted:
        def __repr__(self) -> str:
            seen.append(1)
            return "counted"

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info")
        root.handlers[0].stream = open("/dev/null", "w")  # noqa: SIM115
        log = get_logger("emtransfer").bind(node="n")
        log.debug("transition", frm=Counted())
        assert seen == []
        log.info("transition", frm=Counted())
        assert seen == [1]
    finally:
        root.handlers[0].stream.close()
        root.handlers, root.level = saved


@pytest.mark.timeout(120)
def test_demo_log_level_reaches_the_encode_process() -> None:
    """``demo --log-level info`` after the subcommand: both processes log at info."""
    r = subprocess.run(
        [sys.executable, "-m", "emtransfer", "demo", "--requests", "4", "--concurrency", "2",
         "--transport", "tcp", "--log-level", "info"],
        capture_output=True, text=True, timeout=100, check=True,
    )  # fmt: skip
    assert "role='encode'" in r.stderr and "role='language'" in r.stderr, r.stderr
