"""Settings: defaults, sources and their precedence, validation errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr, ValidationError

from emtransfer.errors import ConfigError, TransferError
from emtransfer.settings import FieldSpec, Settings

REPO = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "block_size": 128,
    "default_blocks": 8,
    "min_grant_blocks": None,
    "pipeline_resume": True,
    "num_blocks": 64,
    "hidden_size": 4096,
    "dtype": "bfloat16",
    "device": "cpu",
    "fields": {},
    "transport": "auto",
    "host": "127.0.0.1",
    "bootstrap_port": 0,
    "bootstrap_timeout": 10.0,
    "init_timeout": 30.0,
    "data_timeout": 60.0,
    "chunk_timeout": 30.0,
    "resume_timeout": 30.0,
    "alloc_timeout": 30.0,
    "abort_ack_timeout": 5.0,
    "write_timeout": 10.0,
    "max_tokens": 262_144,
    "heartbeat_interval": 1.0,
    "heartbeat_timeout": 5.0,
    "max_inflight_per_peer": 64,
    "max_connections": 1024,
    "max_job_bytes": 32 << 20,
    "max_pending_handshakes": 64,
    "max_waiting_inits_per_peer": 16,
    "max_held_mib": 4096.0,
    "auth_token": None,
    "verify_digest": False,
    "output_hugepages": True,
    "tcp_data_port": 0,
    "tcp_advertise": None,
    "mooncake_protocol": "tcp",
    "mooncake_devices": None,
    "mooncake_location": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_ca": None,
    "tls_server_name": None,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("EMTRANSFER_", "SGLANG_")):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "emt.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_default() -> None:
    s = Settings()
    assert set(DEFAULTS) == set(Settings.model_fields)
    for name, value in DEFAULTS.items():
        assert getattr(s, name) == value, name
    assert s.torch_dtype is torch.bfloat16
    assert s.device_kind == "cpu"
    assert s.capacity_tokens == 64 * 128
    assert s.default_tokens == 8 * 128
    assert s.min_grant_tokens == 32 * 128  # half the pool
    assert Settings(min_grant_blocks=100).min_grant_tokens == 64 * 128  # capped at the pool


def test_default_toml_matches_defaults() -> None:
    assert Settings.load(REPO / "config" / "default.toml") == Settings()


def test_sglang_env_example_matches_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in (REPO / "config" / "sglang.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key.strip(), value.strip())
    assert Settings() == Settings(block_size=128)


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("EMTRANSFER_BLOCK_SIZE", "64", "block_size", 64),
        ("EMTRANSFER_NUM_BLOCKS", "256", "num_blocks", 256),
        ("EMTRANSFER_HIDDEN_SIZE", "1024", "hidden_size", 1024),
        ("EMTRANSFER_DTYPE", "fp16", "dtype", "float16"),
        ("EMTRANSFER_DEVICE", "cuda:1", "device", "cuda:1"),
        ("EMTRANSFER_TRANSPORT", "tcp", "transport", "tcp"),
        ("EMTRANSFER_BOOTSTRAP_PORT", "5757", "bootstrap_port", 5757),
        ("EMTRANSFER_CHUNK_TIMEOUT", "2.5", "chunk_timeout", 2.5),
        ("EMTRANSFER_OUTPUT_HUGEPAGES", "false", "output_hugepages", False),
        ("EMTRANSFER_VERIFY_DIGEST", "true", "verify_digest", True),
        ("emtransfer_max_inflight_per_peer", "3", "max_inflight_per_peer", 3),
    ],
)
def test_env_override(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, attr: str, expected: object
) -> None:
    monkeypatch.setenv(var, value)
    assert getattr(Settings(), attr) == expected


@pytest.mark.parametrize(
    ("var", "attr"),
    [
        ("SGLANG_MULTIMODAL_BLOCK_SIZE", "block_size"),
        ("SGLANG_DEFAULT_MULTIMODAL_BLOCKS", "default_blocks"),
        ("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", "num_blocks"),
    ],
)
def test_sglang_alias(monkeypatch: pytest.MonkeyPatch, var: str, attr: str) -> None:
    monkeypatch.setenv(var, "32")
    assert getattr(Settings(), attr) == 32


def test_emtransfer_beats_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_MULTIMODAL_BLOCK_SIZE", "32")
    monkeypatch.setenv("EMTRANSFER_BLOCK_SIZE", "16")
    assert Settings().block_size == 16


def test_alias_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_MULTIMODAL_BLOCK_SIZE", "0")
    with pytest.raises(ConfigError, match="block_size"):
        Settings()


def test_auth_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_AUTH_TOKEN", "hunter2")
    s = Settings()
    assert isinstance(s.auth_token, SecretStr)
    assert s.auth_token.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'block_size = 16\ndtype = "float32"\n'
        '[fields.mrope_positions]\nshape = [3]\ndtype = "int64"\n',
    )
    s = Settings.load(path)
    assert (s.block_size, s.dtype, s.num_blocks) == (16, "float32", 64)
    assert s.fields == {"mrope_positions": FieldSpec(shape=(3,), dtype="int64")}
    assert Settings.load(str(path)) == s


def test_toml_emtransfer_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[emtransfer]\nnum_blocks = 9\ndefault_blocks = 9\n")
    s = Settings.load(path)
    assert (s.num_blocks, s.default_blocks) == (9, 9)


def test_toml_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMTRANSFER_CONFIG", str(write(tmp_path, "hidden_size = 8\n")))
    assert Settings().hidden_size == 8
    assert Settings.load().hidden_size == 8
    other = write(tmp_path, "hidden_size = 16\n", "other.toml")
    assert Settings.load(other).hidden_size == 16


def test_load_does_not_leak_config_file(tmp_path: Path) -> None:
    Settings.load(write(tmp_path, "hidden_size = 8\n"))
    assert Settings().hidden_size == 4096


def test_precedence_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "block_size = 16\nhidden_size = 16\nnum_blocks = 16\n")
    assert Settings.load(path).block_size == 16  # file beats default
    monkeypatch.setenv("EMTRANSFER_BLOCK_SIZE", "32")
    monkeypatch.setenv("EMTRANSFER_HIDDEN_SIZE", "32")
    monkeypatch.setenv("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", "32")
    s = Settings.load(path, block_size=64)
    assert s.block_size == 64  # argument beats environment and file
    assert s.hidden_size == 32  # environment beats file
    assert s.num_blocks == 32  # alias variable beats file too
    assert s.dtype == "bfloat16"  # default where nothing is set


def test_direct_kwargs_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_HIDDEN_SIZE", "32")
    assert Settings(hidden_size=7).hidden_size == 7


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"block_size": 0}, ["block_size", "0", "> 0"]),
        ({"default_blocks": 65}, ["default_blocks", "num_blocks"]),
        ({"num_blocks": 4}, ["default_blocks", "num_blocks"]),
        ({"hidden_size": -1}, ["hidden_size"]),
        ({"dtype": "int4"}, ["dtype", "int4"]),
        ({"device": "tpu"}, ["device", "tpu"]),
        ({"device": "cuda:x"}, ["device"]),
        ({"transport": "carrier-pigeon"}, ["transport"]),
        ({"bootstrap_port": 70000}, ["bootstrap_port", "70000"]),
        ({"chunk_timeout": 0}, ["chunk_timeout"]),
        ({"heartbeat_timeout": 1.0}, ["heartbeat_timeout", "heartbeat_interval"]),
        ({"heartbeat_interval": 6.0}, ["heartbeat_timeout", "heartbeat_interval"]),
        ({"max_inflight_per_peer": 0}, ["max_inflight_per_peer"]),
        ({"fields": {"embeddings": {"shape": [1], "dtype": "int64"}}}, ["fields", "embeddings"]),
        ({"fields": {"pos": {"shape": [0], "dtype": "int64"}}}, ["fields.pos.shape"]),
        ({"fields": {"pos": {"shape": [3], "dtype": "complex64"}}}, ["fields.pos.dtype"]),
        ({"fields": {"pos": {"shape": [3], "dtype": "int64", "x": 1}}}, ["fields.pos.x"]),
        ({"no_such_setting": 1}, ["no_such_setting", "unknown"]),
    ],
)
def test_invalid_value(kwargs: dict[str, object], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)
    for name in names:
        assert name in str(info.value)
    assert isinstance(info.value, TransferError)
    assert isinstance(info.value.__cause__, ValidationError)


def test_invalid_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_NUM_BLOCKS", "lots")
    with pytest.raises(ConfigError, match="num_blocks='lots'"):
        Settings()


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="blok_size"):
        Settings.load(write(tmp_path, "blok_size = 4\n"))


def test_unknown_key_in_load_overrides() -> None:
    with pytest.raises(ConfigError, match="colour"):
        Settings.load(None, colour="blue")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        Settings.load(missing)


def test_missing_config_file_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMTRANSFER_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        Settings()


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        Settings.load(write(tmp_path, "block_size = = 3\n", "bad.toml"))


@pytest.mark.parametrize(
    ("given", "canonical", "torch_dtype"),
    [
        ("fp32", "float32", torch.float32),
        ("FP16", "float16", torch.float16),
        ("bf16", "bfloat16", torch.bfloat16),
        ("float64", "float64", torch.float64),
    ],
)
def test_dtype_normalised(given: str, canonical: str, torch_dtype: torch.dtype) -> None:
    s = Settings(dtype=given)
    assert s.dtype == canonical
    assert s.torch_dtype is torch_dtype


@pytest.mark.parametrize(("device", "kind"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda")])
def test_device_kind(device: str, kind: str) -> None:
    assert Settings(device=device).device_kind == kind


def test_fields_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "EMTRANSFER_FIELDS",
        '{"mrope_positions": {"shape": [3], "dtype": "int64"}, "mask": {"shape": [], "dtype": "bool"}}',
    )
    s = Settings(hidden_size=64, dtype="fp32")
    assert list(s.fields) == ["mrope_positions", "mask"]
    assert s.field_specs() == {
        "embeddings": ((64,), torch.float32),
        "mrope_positions": ((3,), torch.int64),
        "mask": ((), torch.bool),
    }
    assert list(s.field_specs()) == ["embeddings", "mrope_positions", "mask"]


def test_fields_bad_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_FIELDS", "{not json")
    with pytest.raises(ConfigError, match="fields"):
        Settings()


def test_fingerprint() -> None:
    s = Settings(
        block_size=64,
        hidden_size=32,
        dtype="fp16",
        device="cuda:1",
        fields={"mrope_positions": {"shape": [3], "dtype": "int64"}},
    )
    assert s.fingerprint() == {
        "block_size": 64,
        "device_kind": "cuda",
        "fields": {
            "embeddings": {"shape": [32], "dtype": "float16"},
            "mrope_positions": {"shape": [3], "dtype": "int64"},
        },
    }
    # Settings that do not concern the peer do not change the fingerprint.
    assert Settings(num_blocks=8, default_blocks=2).fingerprint() == Settings().fingerprint()


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.block_size = 4  # type: ignore[misc]
    spec = FieldSpec(shape=(3,), dtype="int64")
    with pytest.raises(ValidationError):
        spec.dtype = "int32"  # type: ignore[misc]
    assert s.block_size == 128


@pytest.mark.parametrize("value", ["nohost", "h:", ":80", "h:0", "h:99999", "h:x"])
def test_tcp_advertise_must_be_host_port(value: str) -> None:
    with pytest.raises(ConfigError, match="tcp_advertise"):
        Settings(tcp_advertise=value)


def test_tcp_advertise_reaches_the_transport_metadata() -> None:
    import msgspec

    from emtransfer.buffers import BufferRegistry
    from emtransfer.transport.tcp import TcpTransport, _Meta

    s = Settings(transport="tcp", hidden_size=8, num_blocks=8, tcp_advertise="[::1]:7001")
    t = TcpTransport.from_settings(s, BufferRegistry.from_settings(s))

    async def meta() -> bytes:
        await t.start()
        try:
            return t.metadata()
        finally:
            await t.close()

    m = msgspec.msgpack.decode(asyncio.run(meta()), type=_Meta)
    assert (m.host, m.port) == ("::1", 7001)
