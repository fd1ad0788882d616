"""``ec_connector_extra_config`` mapped onto :class:`emtransfer.Settings` and the connector's own
options. Nothing here imports vLLM: the config object is read by attribute.

Every key is either one of the connector's own (:data:`CONNECTOR_KEYS`) or an emtransfer
setting (a field of :class:`~emtransfer.Settings`); anything else is a :class:`ConfigError`
naming the key. Values are checked by ``Settings`` itself, so a bad value is a
``ConfigError`` naming the setting too. ``EMTRANSFER_*`` variables and a TOML file
(``config_file``) apply below the keys given here, as everywhere in emtransfer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from ...errors import ConfigError
from ...runtime.node import check_rid
from ...settings import Settings

#: the connector's own keys, with what they mean (``docs/vllm.md`` has the long form)
CONNECTOR_KEYS: dict[str, str] = {
    "producer_addr": "consumer: host:port of the encode node to pull an item from when the "
    "request does not name one (default ec_ip:ec_port, none for ec_both; '' or null: only "
    "items a request's ec_transfer_params announces)",
    "advertise_addr": "producer: the host:port announced to consumers in ec_transfer_params "
    "(default host:bootstrap_port)",
    "pool_bytes": "pool size in bytes instead of num_blocks (rounded down to whole blocks)",
    "target_device": "consumer: where received items are put for the model (default: the "
    "worker's current CUDA device, else cpu)",
    "rid_prefix": "a prefix of every request id on the wire (both sides must agree)",
    "on_failure": "consumer: 'fail' (default: the request fails, retryable) or 'recompute' "
    "(an item whose load failed is encoded locally when the request still has its media)",
    "config_file": "an emtransfer TOML file (keys given here win over it)",
}
OnFailure = Literal["fail", "recompute"]
_SETTING_KEYS = frozenset(Settings.model_fields)
_MAX_RID = 256  # emtransfer's limit (protocol.messages.MAX_RID_LEN), checked below


@dataclass(frozen=True)
class ConnectorConfig:
    """What one connector instance runs with; ``settings_for`` makes the node's Settings."""

    role: Literal["producer", "consumer", "both"]
    overrides: dict[str, Any]  # emtransfer settings given as keys, with vLLM's defaults added
    config_file: str | None
    pool_bytes: int | None
    producer_addr: str | None
    advertise_addr: str | None
    target_device: str | None
    rid_prefix: str
    on_failure: OnFailure

    @property
    def is_producer(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("consumer", "both")

    def settings_for(self, hidden_size: int | None = None, dtype: str | None = None) -> Settings:
        """The node's Settings; ``hidden_size``/``dtype`` fill in what neither the keys nor
        the model config said (the producer passes its first tensor's)."""
        kw = dict(self.overrides)
        if "hidden_size" not in kw and hidden_size is not None:
            kw["hidden_size"] = hidden_size
        if "dtype" not in kw and dtype is not None:
            kw["dtype"] = dtype
        if self.pool_bytes is not None:
            probe = Settings.load(self.config_file, **{**kw, "num_blocks": 1, "default_blocks": 1})
            token_nbytes = probe.hidden_size * probe.torch_dtype.itemsize
            token_nbytes += sum(_nbytes(s.shape, s.dtype) for s in probe.fields.values())
            blocks = self.pool_bytes // (token_nbytes * probe.block_size)
            if blocks < 1:
                raise ConfigError(
                    f"ec_connector_extra_config: pool_bytes={self.pool_bytes} is less than one "
                    f"block ({token_nbytes * probe.block_size} bytes: block_size="
                    f"{probe.block_size} tokens of {token_nbytes} bytes)"
                )
            kw["num_blocks"] = blocks
        if "default_blocks" not in kw and "num_blocks" in kw:
            # emtransfer's default (8) must fit a small pool: cap it rather than refuse
            default = Settings.model_fields["default_blocks"].default
            kw["default_blocks"] = min(default, int(kw["num_blocks"]))
        return Settings.load(self.config_file, **kw)

    def rid_for(self, mm_hash: str) -> str:
        """The wire rid of an item: ``rid_prefix`` + mm_hash, or a digest of it when that
        would exceed emtransfer's 256 characters (a long client-given media UUID). Both sides
        compute it the same way."""
        rid = self.rid_prefix + mm_hash
        if len(rid) > _MAX_RID:
            rid = self.rid_prefix + "sha256:" + hashlib.sha256(mm_hash.encode()).hexdigest()
        return rid


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    import torch

    n = 1
    for d in shape:
        n *= d
    return n * getattr(torch, dtype).itemsize


def parse_config(ec_config: Any, model_config: Any = None) -> ConnectorConfig:
    """Read vLLM's ``ECTransferConfig`` (and the model config for dtype and hidden size)."""
    extra = dict(getattr(ec_config, "ec_connector_extra_config", None) or {})
    unknown = sorted(k for k in extra if k not in CONNECTOR_KEYS and k not in _SETTING_KEYS)
    if unknown:
        raise ConfigError(
            f"ec_connector_extra_config: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the connector's keys are "
            f"{', '.join(sorted(CONNECTOR_KEYS))}, and every emtransfer setting "
            "(emtransfer.Settings: hidden_size, dtype, num_blocks, block_size, transport, "
            "host, bootstrap_port, auth_token, *_timeout, ...)"
        )
    own = {k: extra.pop(k) for k in list(extra) if k in CONNECTOR_KEYS}
    is_producer = bool(getattr(ec_config, "is_ec_producer", False))
    is_consumer = bool(getattr(ec_config, "is_ec_consumer", False))
    if not (is_producer or is_consumer):
        raise ConfigError(
            f"ec_role={getattr(ec_config, 'ec_role', None)!r}: EmtransferECConnector needs "
            "ec_producer, ec_consumer or ec_both"
        )
    role: Literal["producer", "consumer", "both"] = (
        "both" if is_producer and is_consumer else "producer" if is_producer else "consumer"
    )
    ec_ip = str(getattr(ec_config, "ec_ip", "127.0.0.1") or "127.0.0.1")
    ec_port = int(getattr(ec_config, "ec_port", 0) or 0)
    overrides = dict(extra)
    overrides.setdefault("host", ec_ip)
    if is_producer:
        overrides.setdefault("bootstrap_port", ec_port)
    if model_config is not None:
        dtype = getattr(model_config, "dtype", None)
        if dtype is not None and "dtype" not in overrides:
            overrides["dtype"] = str(dtype).removeprefix("torch.")
        get_hidden = getattr(model_config, "get_hidden_size", None)
        if callable(get_hidden) and "hidden_size" not in overrides:
            overrides["hidden_size"] = int(get_hidden())
    if "num_blocks" in overrides and own.get("pool_bytes") is not None:
        raise ConfigError("ec_connector_extra_config: give num_blocks or pool_bytes, not both")
    pool_bytes = own.get("pool_bytes")
    if pool_bytes is not None and (
        isinstance(pool_bytes, bool) or not isinstance(pool_bytes, int) or pool_bytes <= 0
    ):
        raise ConfigError(f"invalid setting pool_bytes={pool_bytes!r}: must be a positive integer")
    on_failure = own.get("on_failure", "fail")
    if on_failure not in ("fail", "recompute"):
        raise ConfigError(
            f"invalid setting on_failure={on_failure!r}: must be 'fail' or 'recompute'"
        )
    rid_prefix = own.get("rid_prefix", "") or ""
    if not isinstance(rid_prefix, str) or len(rid_prefix) > _MAX_RID - 72:
        raise ConfigError(
            f"invalid setting rid_prefix={rid_prefix!r}: must be a string of at most "
            f"{_MAX_RID - 72} characters"
        )
    # ec_ip:ec_port names the producer on a consumer; on an ec_both instance it is its own
    # encode node, so there only announced items are pulled
    default_producer = f"{ec_ip}:{ec_port}" if ec_port and role == "consumer" else None
    producer_addr = own.get("producer_addr", default_producer) or None
    advertise_addr = own.get("advertise_addr") or None
    for name, addr in (("producer_addr", producer_addr), ("advertise_addr", advertise_addr)):
        if addr is not None:
            _check_addr(name, addr)
    target_device = own.get("target_device")
    cfg = ConnectorConfig(
        role=role,
        overrides=overrides,
        config_file=own.get("config_file"),
        pool_bytes=pool_bytes,
        producer_addr=producer_addr,
        advertise_addr=advertise_addr,
        target_device=str(target_device) if target_device else None,
        rid_prefix=rid_prefix,
        on_failure=on_failure,
    )
    settings = cfg.settings_for()  # every value checked now, not at the first request
    if is_producer and cfg.advertise_addr is None and settings.bootstrap_port == 0:
        raise ConfigError(
            "EmtransferECConnector producer: bootstrap_port=0 picks a port nobody can be told "
            "about: set ec_port, bootstrap_port or advertise_addr"
        )
    check_rid(cfg.rid_for("0" * 64))
    return cfg


def _check_addr(name: str, addr: object) -> None:
    if not isinstance(addr, str):
        raise ConfigError(f"invalid setting {name}={addr!r}: must be a host:port string")
    host, sep, port = addr.rpartition(":")
    if "://" in addr or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"invalid setting {name}={addr!r}: must be host:port (no scheme)")


def advertised(cfg: ConnectorConfig, settings: Settings) -> str:
    """The address a producer announces."""
    return cfg.advertise_addr or f"{settings.host}:{settings.bootstrap_port}"


__all__ = ["CONNECTOR_KEYS", "ConnectorConfig", "advertised", "parse_config"]
