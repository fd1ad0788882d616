"""Settings: defaults < config TOML < environment (EMTRANSFER_*, SGLANG_* aliases) < arguments."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from emtransfer.errors import ConfigError

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
FIELD_DTYPES = (*FLOAT_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")
_RDMA_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_LOCATION_RE = re.compile(r"(cpu|cuda):\d+")
#: Legacy SGLang variable names, read when the EMTRANSFER_* variable is not set.
SGLANG_ALIASES = {
    "block_size": "SGLANG_MULTIMODAL_BLOCK_SIZE",
    "default_blocks": "SGLANG_DEFAULT_MULTIMODAL_BLOCKS",
    "num_blocks": "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE",
}
CONFIG_ENV = "EMTRANSFER_CONFIG"
PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
_config_file: ContextVar[str | Path | None] = ContextVar("emtransfer_config_file", default=None)


def _dtype(value: str, allowed: tuple[str, ...]) -> str:
    name = _DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return name


def _device(value: str) -> str:
    if not _DEVICE_RE.fullmatch(value := value.strip().lower()):
        raise ValueError("must be cpu, cuda or cuda:N")
    return value


FloatDtype = Annotated[str, AfterValidator(lambda v: _dtype(v, FLOAT_DTYPES))]
FieldDtype = Annotated[str, AfterValidator(lambda v: _dtype(v, FIELD_DTYPES))]


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dt: torch.dtype = getattr(torch, name)
    return dt


class FieldSpec(BaseModel):
    """An extra per-token field: its per-token shape and its dtype."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    shape: tuple[PosInt, ...]
    dtype: FieldDtype


class _TomlSource(TomlConfigSettingsSource):
    """Top-level keys, or an ``[emtransfer]`` table (which wins over top-level keys)."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        table = data.pop("emtransfer", None)
        return {**data, **table} if isinstance(table, dict) else data


class _SGLangAliasSource(PydanticBaseSettingsSource):
    """Reads the SGLANG_* aliases; ranks below EMTRANSFER_* variables."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return os.environ.get(SGLANG_ALIASES.get(field_name, "")), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: os.environ[v] for k, v in SGLANG_ALIASES.items() if v in os.environ}


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        msg = "unknown setting"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        msg = f"must be {op} {next(iter(ctx.values()))}"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        return f"invalid settings: {msg}"
    value = "'**********'" if loc == "auth_token" else repr(err.get("input"))
    return f"invalid setting {loc}={value}: {msg}"


class Settings(BaseSettings):
    """Every knob of emtransfer. Invalid values raise :class:`ConfigError` naming the setting."""

    model_config = SettingsConfigDict(
        env_prefix="EMTRANSFER_", frozen=True, extra="forbid", use_attribute_docstrings=True
    )

    block_size: PosInt = 128
    """Tokens per block (alias SGLANG_MULTIMODAL_BLOCK_SIZE)."""
    default_blocks: PosInt = 8
    """Blocks reserved when the length is unknown (alias SGLANG_DEFAULT_MULTIMODAL_BLOCKS)."""
    min_grant_blocks: PosInt | None = None
    """Fewest blocks a Resume round accepts when the pool is contended (fewer rounds, at the
    price of waiting); unset: half the pool, at least default_blocks. Round 0 always
    gets its allocation whole (a known length capped at the pool, else default_blocks)."""
    pipeline_resume: bool = True
    """Language node: when the encode node says the payload needs more than round 0's
    allocation, grant the next round while the current one is on the wire (only with blocks
    free at that moment, never ahead of requests waiting for blocks); off: each round is
    granted once the previous one is in and copied out."""
    num_blocks: PosInt = 64
    """Pool size in blocks per node. Alias SGLANG_EMBEDDING_CACHE_BUFFER_SIZE: in SGLang's design
    that is the number of buffer blocks of the embedding cache (default 64), so it maps 1:1."""
    hidden_size: PosInt = 4096
    dtype: FloatDtype = "bfloat16"
    """dtype of the embeddings field: float32, float16, bfloat16, float64 (fp32/fp16/bf16)."""
    device: Annotated[str, AfterValidator(_device)] = "cpu"
    """Pool device: cpu, cuda or cuda:N."""
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    """Extra per-token fields besides the (reserved) embeddings, in order."""
    transport: Literal["auto", "nixl", "torch", "tcp", "local", "mooncake"] = "auto"
    host: str = "127.0.0.1"
    bootstrap_port: int = Field(0, ge=0, le=65535)
    """Control channel port; 0 picks a free port."""
    bootstrap_timeout: PosFloat = 10.0
    init_timeout: PosFloat = 30.0
    """Encode side waiting for the receiver's Init."""
    data_timeout: PosFloat = 60.0
    """Encode side holding an Init while waiting for the embedding to be produced."""
    chunk_timeout: PosFloat = 30.0
    resume_timeout: PosFloat = 30.0
    alloc_timeout: PosFloat = 30.0
    abort_ack_timeout: PosFloat = 5.0
    """Seconds a receiver waits for the sender's AbortAck after giving up on a round before it
    tears the connection down; the blocks stay quarantined until a proof or the grant's
    expiry. Also bounds a sender waiting for its last write to end after an abort."""
    write_timeout: PosFloat = 10.0
    """The engine's bound on one posted data-plane write: it lands, fails or is cancelled within
    this many seconds. A receiver's quarantine lasts at most chunk_timeout plus this."""
    max_tokens: PosInt = 262_144
    """The largest payload (tokens) this node sends or accepts; a larger total_tokens or
    expected_tokens is refused before any block is allocated."""
    heartbeat_interval: PosFloat = 1.0
    heartbeat_timeout: PosFloat = 5.0
    """Seconds without a heartbeat before the peer is lost; must be > heartbeat_interval."""
    max_inflight_per_peer: PosInt = 64
    max_connections: PosInt = 1024
    """Encode node: control connections at most, handshakes included; more are refused."""
    max_job_bytes: PosInt = 32 << 20
    """The largest Encode job (an image's bytes and the rest of the job) a language node sends
    and an encode node accepts; a large job travels in pieces, so a 3 MB photo is ordinary."""
    max_pending_handshakes: PosInt = 64
    """Encode node: connections still in their handshake at most; more are refused at once."""
    max_waiting_inits_per_peer: PosInt = 16
    """Encode node: Inits from one peer for rids it holds no payload for yet (pulls waiting for
    their data, each holding the receiver's blocks) at most; more are refused at once."""
    max_held_mib: PosFloat = 4096.0
    """Encode node: MiB of payloads held (sent, or Encode results, not yet fully written) at
    most; a send() or job beyond it is refused (CapacityError) instead of growing the heap."""
    auth_token: SecretStr | None = None
    """Shared secret both sides prove in the handshake (HMAC over the whole transcript); unset
    means no authentication. An empty or blank token is refused, not taken as a key."""
    verify_digest: bool = False
    output_hugepages: bool = True
    """CPU pools: ask the kernel for transparent huge pages, madvise(MADV_HUGEPAGE), on each
    fresh output tensor of two huge pages or more (4 MiB on x86-64) before the payload is
    copied into it, so its first touch costs one page fault per huge page (2 MiB) instead of
    512. Needs Linux with THP in madvise or always mode; off: plain pages, e.g. where the
    host's THP defrag policy stalls."""
    tcp_data_port: int = Field(0, ge=0, le=65535)
    """Port of the tcp transport's data listener; 0 picks a free one."""
    tcp_advertise: str | None = None
    """host:port peers use to reach this node's tcp data port, when that is not the bound
    address (behind NAT, a port mapping or a proxy)."""
    mooncake_protocol: Literal["tcp", "rdma"] = "tcp"
    """mooncake transport: the engine's data protocol, tcp (any IP network) or rdma
    (InfiniBand/RoCE NICs; refused where the machine lists no RDMA device)."""
    mooncake_devices: str | None = None
    """mooncake transport over rdma: the RDMA devices to use, comma-separated (e.g.
    mlx5_0,mlx5_1); unset: every device the engine discovers. Refused with tcp."""
    mooncake_location: str | None = None
    """mooncake transport: where the pools are registered as living, cpu:N (NUMA node N) or
    cuda:N (GPU N), which the engine matches to its NICs; unset: cuda:N for pools on cuda:N,
    else the engine finds out. A CUDA pool needs the engine's CUDA build
    (mooncake-transfer-engine, not -non-cuda)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) this node presents on the control connection: the encode node's
    server certificate, or the language node's client certificate for mutual TLS."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_ca: Path | None = None
    """PEM CA bundle. On the language node it turns TLS on and verifies the encode node's
    certificate (host name included); on the encode node it requires client certificates
    signed by it (mutual TLS)."""
    tls_server_name: str | None = None
    """Host name the encode node's certificate must carry, when it is not the connect address."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError("; ".join(_describe(err) for err in e.errors())) from e
        except SettingsError as e:
            raise ConfigError(f"invalid settings: {e}") from e

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from ``config_file`` (or $EMTRANSFER_CONFIG), environment and overrides."""
        token = _config_file.set(config_file)
        try:
            return cls(**overrides)
        finally:
            _config_file.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = (init_settings, env_settings, _SGLangAliasSource(settings_cls))
        path = _config_file.get() or os.environ.get(CONFIG_ENV)
        if not path:
            return sources
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            return (*sources, _TomlSource(settings_cls, toml_file=path))
        except Exception as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from e

    @field_validator("auth_token")
    @classmethod
    def _check_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("an empty token authenticates nobody: set a secret or leave it unset")
        return v

    @field_validator("mooncake_devices")
    @classmethod
    def _check_devices(cls, v: str | None) -> str | None:
        if v is None:
            return v
        names = [d.strip() for d in v.split(",")]
        if not all(_RDMA_DEVICE_RE.fullmatch(d) for d in names):
            raise ValueError("must be RDMA device names, comma-separated (e.g. mlx5_0,mlx5_1)")
        return ",".join(names)

    @field_validator("mooncake_location")
    @classmethod
    def _check_location(cls, v: str | None) -> str | None:
        if v is not None and not _LOCATION_RE.fullmatch(v := v.strip().lower()):
            raise ValueError("must be cpu:N or cuda:N")
        return v

    @field_validator("fields")
    @classmethod
    def _check_fields(cls, v: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        if "embeddings" in v or "" in v:
            raise ValueError("field names 'embeddings' (always present) and '' are reserved")
        return v

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if (d := self.default_blocks) > (n := self.num_blocks):
            raise ValueError(f"default_blocks={d} must be <= num_blocks={n}")
        if (t := self.heartbeat_timeout) <= (i := self.heartbeat_interval):
            raise ValueError(f"heartbeat_timeout={t} must be > heartbeat_interval={i}")
        if self.tcp_advertise is not None:
            host, sep, port = self.tcp_advertise.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"tcp_advertise={self.tcp_advertise!r} must be host:port")
        self._check_mooncake()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={str(path)!r} is not a readable file")
        return self

    def _check_mooncake(self) -> None:
        if self.mooncake_devices is not None and self.mooncake_protocol != "rdma":
            raise ValueError(
                f"mooncake_devices={self.mooncake_devices!r} names RDMA devices: it needs "
                "mooncake_protocol='rdma'"
            )
        if (loc := self.mooncake_location) is not None and loc.split(":")[0] != self.device_kind:
            raise ValueError(
                f"mooncake_location={loc!r} does not match device={self.device!r}: the pools "
                "live where device says"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The embeddings dtype as a ``torch.dtype``."""
        return _torch_dtype(self.dtype)

    @property
    def device_kind(self) -> Literal["cpu", "cuda"]:
        return "cpu" if self.device == "cpu" else "cuda"

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def default_tokens(self) -> int:
        """Tokens of a default (unknown-length) allocation."""
        return self.default_blocks * self.block_size

    @property
    def min_grant_tokens(self) -> int:
        """Fewest tokens a Resume round accepts (``min_grant_blocks``, resolved)."""
        blocks = self.min_grant_blocks or max(self.default_blocks, self.num_blocks // 2)
        return min(blocks, self.num_blocks) * self.block_size

    def _field_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        extra = {n: (f.shape, f.dtype) for n, f in self.fields.items()}
        return {"embeddings": ((self.hidden_size,), self.dtype), **extra}

    def field_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-token shape and dtype of every field, ``embeddings`` first."""
        return {n: (shape, _torch_dtype(dt)) for n, (shape, dt) in self._field_names().items()}

    @property
    def encode_timeout(self) -> float:
        """How long a receiver waits for round 0 of an Encode job: the encode node may hold
        its Init for ``data_timeout`` while the encoder runs, then writes within
        ``chunk_timeout``."""
        return self.data_timeout + self.chunk_timeout

    def fingerprint(self) -> dict[str, Any]:
        """What two peers must agree on: block size, device kind, fields' shapes and dtypes."""
        fields = {n: {"shape": list(s), "dtype": dt} for n, (s, dt) in self._field_names().items()}
        return {"block_size": self.block_size, "device_kind": self.device_kind, "fields": fields}


__all__ = ["FIELD_DTYPES", "FLOAT_DTYPES", "SGLANG_ALIASES", "FieldSpec", "Settings"]
