"""``python -m emtransfer serve`` argument parsing (in-process; nothing is started)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import emtransfer as et
from emtransfer.cli import main
from emtransfer.server.options import add_serve_parser, resolve_serve, setting_flag


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("EMTRANSFER_", "SGLANG_")):
            monkeypatch.delenv(name)
    root = logging.getLogger()  # main() configures logging for the process: put it back
    saved = root.handlers[:], root.level
    yield
    root.handlers, root.level = saved[0], saved[1]


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for opt in ["--role", "--config", "--host", "--http-host", "--port", "--bootstrap-port",
                "--encoder", "--encoder-addr", "--max-tokens", "--log-json", "--log-level"]:  # fmt: skip
        assert opt in out, opt
    for name in et.Settings.model_fields:
        assert setting_flag(name) in out, name
        assert f"EMTRANSFER_{name.upper()}" in out, name
    assert "SGLANG_MULTIMODAL_BLOCK_SIZE" in out and "module:factory" in out


def test_precedence_flag_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text("block_size = 64\nhidden_size = 512\nnum_blocks = 32\n")
    monkeypatch.setenv("EMTRANSFER_HIDDEN_SIZE", "1024")
    monkeypatch.setenv("EMTRANSFER_NUM_BLOCKS", "48")
    opts = resolve_serve(
        parse("--role", "encode", "--config", str(cfg), "--num-blocks", "40", "--port", "0")
    )
    s = opts.settings
    assert (s.block_size, s.hidden_size, s.num_blocks, s.dtype) == (64, 1024, 40, "bfloat16")
    assert opts.port == 0 and opts.http_host == "127.0.0.1" and opts.encoder == "auto"


def test_every_setting_has_a_working_flag() -> None:
    args = parse(
        "--role", "encode", "--block-size", "64", "--default-blocks", "2", "--num-blocks", "8",
        "--hidden-size", "32", "--dtype", "fp16", "--device", "cpu",
        "--fields", '{"mrope_positions": {"shape": [3], "dtype": "int64"}}',
        "--transport", "tcp", "--host", "127.0.0.2", "--bootstrap-port", "9999",
        "--bootstrap-timeout", "1.5", "--init-timeout", "2", "--data-timeout", "3",
        "--chunk-timeout", "4", "--resume-timeout", "5", "--alloc-timeout", "6",
        "--abort-ack-timeout", "0.5", "--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.9",
        "--max-inflight-per-peer", "3", "--auth-token", "sekret", "--verify-digest",
    )  # fmt: skip
    opts = resolve_serve(args)
    s = opts.settings
    assert s.block_size == 64 and s.default_blocks == 2 and s.num_blocks == 8
    assert (s.hidden_size, s.dtype, s.transport, s.host) == (32, "float16", "tcp", "127.0.0.2")
    assert s.fields["mrope_positions"].shape == (3,) and s.bootstrap_port == 9999
    assert (s.chunk_timeout, s.heartbeat_timeout, s.max_inflight_per_peer) == (4.0, 0.9, 3)
    assert s.auth_token is not None and s.auth_token.get_secret_value() == "sekret"
    assert s.verify_digest is True and opts.http_host == "127.0.0.2" and opts.port == 8100
    assert (
        resolve_serve(parse("--role", "encode", "--no-verify-digest")).settings.verify_digest
        is False
    )
    given = vars(parse("--role", "encode"))  # absent flags stay absent: env and file apply
    assert not set(given) & set(et.Settings.model_fields)


def test_encoder_addresses() -> None:
    opts = resolve_serve(
        parse("--role", "language", "--encoder-addr", "h1:1,h2:2", "--encoder-addr", "h3:3")
    )
    assert opts.encoder_addrs == ("h1:1", "h2:2", "h3:3") and opts.port == 8000
    # default: this host's bootstrap port (the same config file on both sides)
    opts = resolve_serve(parse("--role", "language", "--bootstrap-port", "9100"))
    assert opts.encoder_addrs == ("127.0.0.1:9100",)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--role", "language"], "needs --encoder-addr"),
        (["--role", "language", "--encoder-addr", "nohost"], "invalid --encoder-addr"),
        (["--role", "language", "--encoder-addr", "a:1,a:1"], "duplicates"),
        (["--role", "encode", "--encoder-addr", "a:1"], "for the language role"),
        (["--role", "encode", "--block-size", "abc"], "block_size"),
        (["--role", "encode", "--num-blocks", "0"], "num_blocks"),
        (["--role", "encode", "--heartbeat-timeout", "0.1"], "heartbeat_timeout"),
        (["--role", "encode", "--max-tokens", "0"], "max_tokens"),
        (["--role", "encode", "--max-tokens", "many"], "max_tokens"),
        (["--role", "encode", "--port", "70000"], "--port"),
        (["--role", "encode", "--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_arguments_name_the_problem(argv: list[str], needle: str) -> None:
    with pytest.raises(et.ConfigError, match=needle):
        resolve_serve(parse(*argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--role", "nope"],
        ["--role", "encode", "--transport", "carrier-pigeon"],
        ["--role", "encode", "--fields", "{not json"],
        ["--role", "encode", "--fields", "[1]"],
    ],
)
def test_argparse_refuses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_main_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--role", "language"]) == 2
    assert "--encoder-addr" in capsys.readouterr().err
    # an encoder that cannot load: refused before anything serves (ports 0: free ones)
    argv = ["serve", "--role", "encode", "--port", "0", "--transport", "tcp", "--encoder", "x:y"]
    assert main(argv) == 2
    assert "cannot import 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "serve", "--role", "encode"])


@pytest.mark.parametrize("name", ["cpu.toml", "nixl-gpu.toml"])
def test_shipped_config_files_load(name: str) -> None:
    path = Path(__file__).resolve().parent.parent / "config" / name
    opts = resolve_serve(parse("--role", "language", "--config", str(path)))
    s = opts.settings
    assert opts.encoder_addrs == ("127.0.0.1:9100",) and s.fields["mrope_positions"].shape == (3,)
    assert (s.transport, s.device) == (("tcp", "cpu") if name == "cpu.toml" else ("nixl", "cuda:0"))


def test_every_serve_option_has_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emtransfer.server.options import SERVE_ENV

    env = {
        "EMTRANSFER_ROLE": "language",
        "EMTRANSFER_HTTP_HOST": "0.0.0.0",
        "EMTRANSFER_HTTP_PORT": "8123",
        "EMTRANSFER_ENCODER": "synthetic",
        "EMTRANSFER_ENCODER_ADDR": "10.0.0.1:9100,10.0.0.2:9100",
        "EMTRANSFER_PATCH_SIZE": "28",
        "EMTRANSFER_RETRY_INTERVAL": "0.5",
        "EMTRANSFER_SHUTDOWN_TIMEOUT": "12",
        "EMTRANSFER_API_KEY": "k",
        "EMTRANSFER_API_KEY_EXEMPT": "/live",
        "EMTRANSFER_ACCESS_LOG": "true",
        "EMTRANSFER_GC_FREEZE": "false",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = resolve_serve(parse())  # nothing on the command line
    assert opts.role == "language" and opts.http_host == "0.0.0.0" and opts.port == 8123
    assert opts.encoder == "synthetic" and opts.patch_size == 28
    assert opts.encoder_addrs == ("10.0.0.1:9100", "10.0.0.2:9100")
    assert opts.retry_interval == 0.5 and opts.shutdown_timeout == 12.0
    assert opts.api_key == "k" and opts.api_key_exempt == frozenset({"/live"})
    assert opts.access_log is True and opts.gc_freeze is False
    # a flag wins over its variable
    opts = resolve_serve(
        parse(
            "--role", "language", "--shutdown-timeout", "3", "--no-access-log", "--port", "1",
            "--gc-freeze",
        )
    )  # fmt: skip
    assert (opts.role, opts.shutdown_timeout, opts.access_log, opts.port, opts.gc_freeze) == (
        "language", 3.0, False, 1, True
    )  # fmt: skip
    # every option of serve (but --help and the settings, which have theirs) names its variable
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for var in SERVE_ENV.values():
        assert var in out, var
    assert "``" not in out  # plain text, not reStructuredText
    for argv in ([], ["demo"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        assert "``" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("EMTRANSFER_HTTP_PORT", "eighty", "EMTRANSFER_HTTP_PORT='eighty'"),
        ("EMTRANSFER_ACCESS_LOG", "maybe", "EMTRANSFER_ACCESS_LOG='maybe'"),
        ("EMTRANSFER_SHUTDOWN_TIMEOUT", "-1", "--shutdown-timeout=-1.0"),
        ("EMTRANSFER_ROLE", "prefill", "--role='prefill'"),
    ],
)
def test_a_bad_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    why: str,
) -> None:
    monkeypatch.setenv(name, value)
    if name != "EMTRANSFER_ROLE":
        monkeypatch.setenv("EMTRANSFER_ROLE", "encode")
    assert main(["serve"]) == 2
    assert why in capsys.readouterr().err


def test_gc_freeze_is_on_by_default_and_freezes_what_exists() -> None:
    import gc

    from emtransfer.server.run import freeze_startup_objects

    assert resolve_serve(parse("--role", "encode")).gc_freeze is True
    assert resolve_serve(parse("--role", "encode", "--no-gc-freeze")).gc_freeze is False
    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
