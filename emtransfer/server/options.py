"""``python -m emtransfer serve``: its options, and one ``--<setting>`` flag per Settings field.

Precedence for the settings: flag > environment (EMTRANSFER_*, then the SGLANG_* aliases) >
config file (--config or EMTRANSFER_CONFIG) > default. Nothing here imports the web stack, so
building the parser stays cheap for ``demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import typing
from dataclasses import dataclass
from typing import Any

from ..encoders import BUILTIN, DEFAULT_MAX_TOKENS, DEFAULT_PATCH_SIZE
from ..errors import ConfigError
from ..settings import SGLANG_ALIASES, Settings

DEFAULT_HTTP_PORT = {"encode": 8100, "language": 8000}

#: help for the settings whose field has no (short) docstring; config/default.toml agrees
_HELP = {
    "num_blocks": "pool size in blocks per node (SGLANG_EMBEDDING_CACHE_BUFFER_SIZE counts the "
    "embedding cache's buffer blocks: the same thing, 1:1)",
    "hidden_size": "width of the embeddings field",
    "transport": "data plane; both roles must use the same one",
    "host": "address the node binds: the control (bootstrap) listener of an encode node and, "
    "unless --http-host is given, the HTTP server",
    "bootstrap_timeout": "seconds to connect to an encode node and finish the handshake",
    "chunk_timeout": "seconds the receiver waits for the next chunk",
    "resume_timeout": "seconds the sender waits for a Resume",
    "alloc_timeout": "seconds an allocation may wait for free blocks",
    "abort_ack_timeout": "seconds to wait for an AbortAck before tearing the connection down",
    "heartbeat_interval": "seconds between heartbeats",
    "write_timeout": "the engine's bound on one posted data-plane write (seconds)",
    "max_tokens": "largest payload in tokens a node sends or accepts, and a request may ask for",
    "max_inflight_per_peer": "requests in flight per peer pair",
    "auth_token": "shared secret for the handshake (prefer EMTRANSFER_AUTH_TOKEN: a flag shows in ps)",
    "verify_digest": "check a digest of every payload on arrival (slower)",
    "tcp_data_port": "port of the tcp transport's data listener (0 picks a free one)",
    "tcp_advertise": "HOST:PORT peers use to reach the tcp data port (behind NAT or a proxy)",
    "tls_cert": "PEM certificate of this node on the control connection (encode: the server's; "
    "language: the client's, for mutual TLS)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_ca": "PEM CA bundle: language: turns TLS on and verifies the encode node; encode: "
    "requires client certificates it signed (mutual TLS)",
    "tls_server_name": "host name the encode node's certificate must carry, when it is not the "
    "host of --encoder-addr",
}
#: appended to a field's own description
_EXAMPLE = {
    "fields": 'as JSON, e.g. \'{"mrope_positions": {"shape": [3], "dtype": "int64"}}\'',
}


def setting_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; absent flags stay absent (env, file and defaults apply)."""
    group = parser.add_argument_group(
        "settings",
        "Every setting of emtransfer (see config/default.toml). Precedence: flag > environment "
        "(EMTRANSFER_<NAME>, SGLang aliases) > --config file > default.",
    )
    for name, info in Settings.model_fields.items():
        text = (_HELP.get(name) or info.description or name.replace("_", " ")).rstrip(".")
        text = re.sub(r"\s*\(?[Aa]lias SGLANG_\w+\)?\.?", "", text)  # the env part says it
        text = text if text[:3].isupper() else text[0].lower() + text[1:]  # keep "PEM"
        if name in _EXAMPLE:
            text += ", " + _EXAMPLE[name]
        default = "unset" if info.default is None else info.default
        if name == "fields":
            default = "none"
        env = f"EMTRANSFER_{name.upper()}"
        if name in SGLANG_ALIASES:
            env += f" or {SGLANG_ALIASES[name]}"
        help_text = f"{text} (default {default}; env {env})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "fields":
            kwargs.update(type=_json_object, metavar="JSON")
        elif typing.get_origin(info.annotation) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(info.annotation)))
        else:
            kind = "N" if info.annotation is int else "SECONDS" if info.annotation is float else ""
            kwargs["metavar"] = kind or name.split("_")[-1].upper()
        group.add_argument(setting_flag(name), **kwargs)


#: every serve option also reads EMTRANSFER_<DEST> when it is not on the command line
SERVE_ENV = {
    "role": "EMTRANSFER_ROLE",
    "config": "EMTRANSFER_CONFIG",
    "http_host": "EMTRANSFER_HTTP_HOST",
    "port": "EMTRANSFER_HTTP_PORT",
    "encoder": "EMTRANSFER_ENCODER",
    "encoder_addr": "EMTRANSFER_ENCODER_ADDR",
    "patch_size": "EMTRANSFER_PATCH_SIZE",
    "retry_interval": "EMTRANSFER_RETRY_INTERVAL",
    "shutdown_timeout": "EMTRANSFER_SHUTDOWN_TIMEOUT",
    "log_summary_interval": "EMTRANSFER_LOG_SUMMARY_INTERVAL",
    "max_body_bytes": "EMTRANSFER_MAX_BODY_BYTES",
    "log_level": "EMTRANSFER_LOG_LEVEL",
    "log_json": "EMTRANSFER_LOG_JSON",
    "api_key": "EMTRANSFER_API_KEY",
    "api_key_exempt": "EMTRANSFER_API_KEY_EXEMPT",
    "access_log": "EMTRANSFER_ACCESS_LOG",
    "gc_freeze": "EMTRANSFER_GC_FREEZE",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_default(dest: str, default: Any, kind: Any = str) -> Any:
    """The option's default: its environment variable, converted, or ``default``."""
    name = SERVE_ENV[dest]
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        if kind is bool:
            if text.strip().lower() not in _TRUE | _FALSE:
                raise ValueError("use 1/0, true/false, yes/no or on/off")
            return text.strip().lower() in _TRUE
        if kind is list:
            return [text]
        return kind(text)
    except ValueError as exc:
        raise ConfigError(f"invalid {name}={text!r}: {exc}") from None


def _help(text: str, dest: str) -> str:
    return f"{text} (env {SERVE_ENV[dest]})"


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    serve = sub.add_parser(
        "serve",
        help="run an encode or a language node behind an HTTP API",
        description="Runs one node behind an HTTP API (FastAPI on uvicorn with uvloop; the "
        "schema is at /openapi.json, browsable at /docs). Both roles: GET /health (readiness: "
        "200 or 503), GET /live, GET /version, GET /metrics. Encode: POST /v1/encode computes "
        "a job with the encoder and holds it until a language node pulls it. Language: POST "
        "/v1/embeddings asks an encode node (round-robin over --encoder-addr, skipping dead "
        "ones) to compute a job and receives the result; POST /v1/receive pulls a payload an "
        "encode node holds. SIGTERM drains: new requests get 503, open ones finish within "
        "--shutdown-timeout. Every option also reads its environment variable (named in its "
        "help); a flag wins over it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    role = env_default("role", None)
    serve.add_argument(
        "--role",
        required=role is None,
        default=role,
        choices=["encode", "language"],
        help=_help("node role", "role"),
    )
    serve.add_argument(
        "--config",
        help="TOML settings file (env EMTRANSFER_CONFIG; else the defaults)",
    )
    serve.add_argument(
        "--http-host",
        default=env_default("http_host", None),
        help=_help("address the HTTP server binds (default: the --host setting)", "http_host"),
    )
    serve.add_argument(
        "--port",
        type=int,
        default=env_default("port", None, int),
        help=_help(
            "HTTP port (default 8100 for encode, 8000 for language; 0 picks a free one)", "port"
        ),
    )
    serve.add_argument(
        "--encoder",
        default=env_default("encoder", "auto"),
        help=_help(
            f"encode role: {', '.join(BUILTIN)} (see emtransfer.encoders) or module:factory, "
            "where factory(settings) returns a callable job -> tensors | (tensors, meta) "
            "(default auto)",
            "encoder",
        ),
    )
    serve.add_argument(
        "--encoder-addr",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help=_help(
            "language role: an encode node's bootstrap address; repeat or comma-separate for "
            "several (round-robin). Default: --host:--bootstrap-port when bootstrap_port is set",
            "encoder_addr",
        ),
    )
    serve.add_argument(
        "--patch-size",
        type=int,
        default=env_default("patch_size", DEFAULT_PATCH_SIZE, int),
        help=_help(
            f"encode role: patch size of the built-in vision encoder (default "
            f"{DEFAULT_PATCH_SIZE})",
            "patch_size",
        ),
    )
    serve.add_argument(
        "--retry-interval",
        type=float,
        default=env_default("retry_interval", 1.0, float),
        help=_help(
            "language role: seconds between reconnection attempts to an encode node that is "
            "down (default 1.0)",
            "retry_interval",
        ),
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=env_default("shutdown_timeout", 30.0, float),
        metavar="SECONDS",
        help=_help(
            "on SIGTERM, seconds the open requests have to finish; those still open then are "
            "answered 503 (default 30)",
            "shutdown_timeout",
        ),
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=env_default("max_body_bytes", None, int),
        metavar="N",
        help=_help(
            "largest HTTP request body; larger ones are answered 413 (default: room for a job "
            "of max_job_bytes in base64)",
            "max_body_bytes",
        ),
    )
    serve.add_argument(
        "--log-summary-interval",
        type=float,
        default=env_default("log_summary_interval", 60.0, float),
        metavar="SECONDS",
        help=_help(
            "one info line per interval with the requests that ended in it, by outcome, and "
            "the rounds, resumes and bytes (per-request lines are debug); 0 for none "
            "(default 60)",
            "log_summary_interval",
        ),
    )
    serve.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        help="debug, info, warning, error (default info; env EMTRANSFER_LOG_LEVEL)",
    )
    serve.add_argument(
        "--log-json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JSON log lines (env EMTRANSFER_LOG_JSON=1)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every HTTP request but the exempt paths "
        "(the vLLM convention; env EMTRANSFER_API_KEY, preferred: a flag shows in ps)",
    )
    serve.add_argument(
        "--api-key-exempt",
        default=env_default("api_key_exempt", "/health,/live,/metrics"),
        metavar="PATHS",
        help=_help(
            "comma-separated paths served without the API key (default /health,/live,/metrics; "
            "'' for none)",
            "api_key_exempt",
        ),
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=env_default("access_log", False, bool),
        help=_help(
            "one concise line per HTTP request: method, path, status, time, rid and client (at "
            "info; /health, /live and /metrics at debug)",
            "access_log",
        ),
    )
    serve.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=env_default("gc_freeze", True, bool),
        help=_help(
            "once the node runs, move every object that exists then out of the garbage "
            "collector's reach (gc.freeze(), as vLLM and SGLang do after start-up): a full "
            "collection then scans only what serving made, not every module and tensor loaded",
            "gc_freeze",
        ),
    )
    add_settings_flags(serve)
    return serve


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` runs, resolved from the arguments."""

    role: str
    settings: Settings
    http_host: str
    port: int
    encoder: str = "auto"
    encoder_addrs: tuple[str, ...] = ()
    max_tokens: int = DEFAULT_MAX_TOKENS
    patch_size: int = DEFAULT_PATCH_SIZE
    retry_interval: float = 1.0
    #: on SIGTERM, seconds open requests have to finish before they are answered 503
    shutdown_timeout: float = 30.0
    #: seconds between summary log lines (0: none)
    log_summary_interval: float = 60.0
    #: largest HTTP request body (None: room for a job of max_job_bytes in base64)
    max_body_bytes: int | None = None
    access_log: bool = False
    #: gc.freeze() once the node runs (see ``--gc-freeze``)
    gc_freeze: bool = True
    #: required as a bearer token on every HTTP request but ``api_key_exempt``; None: open
    api_key: str | None = None
    api_key_exempt: frozenset[str] = frozenset({"/health", "/live", "/metrics"})

    @property
    def body_limit(self) -> int:
        """The HTTP body limit: ``max_body_bytes``, else a job of ``max_job_bytes`` in base64
        (4/3 of it) with room for the rest of the JSON."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.settings.max_job_bytes * 4 // 3 + (64 << 10)


def resolve_serve(args: argparse.Namespace) -> ServeOptions:
    """Turn parsed arguments into options; ConfigError names the bad option or setting."""
    overrides = {n: getattr(args, n) for n in Settings.model_fields if hasattr(args, n)}
    settings = Settings.load(args.config, **overrides)
    if settings.transport == "local":
        raise ConfigError(
            "invalid setting transport='local': it moves data inside one process, and serve "
            "runs one role per process; use nixl, tcp, torch or auto"
        )
    if args.patch_size <= 0:
        raise ConfigError(f"invalid --patch-size={args.patch_size}: must be > 0")
    if args.role not in DEFAULT_HTTP_PORT:
        raise ConfigError(f"invalid --role={args.role!r}: encode or language")
    if args.retry_interval <= 0:
        raise ConfigError(f"invalid --retry-interval={args.retry_interval}: must be > 0")
    if args.max_body_bytes is not None and args.max_body_bytes <= 0:
        raise ConfigError(f"invalid --max-body-bytes={args.max_body_bytes}: must be > 0")
    if args.log_summary_interval < 0:
        raise ConfigError(
            f"invalid --log-summary-interval={args.log_summary_interval}: must be >= 0"
        )
    if args.shutdown_timeout < 0:
        raise ConfigError(f"invalid --shutdown-timeout={args.shutdown_timeout}: must be >= 0")
    port = DEFAULT_HTTP_PORT[args.role] if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid --port={port}: must be 0..65535")
    addrs: list[str] = []
    for item in args.encoder_addr or env_default("encoder_addr", [], list):
        addrs += [a.strip() for a in item.split(",") if a.strip()]
    if args.role == "language":
        if not addrs and settings.bootstrap_port:
            addrs = [f"{settings.host}:{settings.bootstrap_port}"]
        if not addrs:
            raise ConfigError(
                "the language role needs --encoder-addr HOST:PORT (or bootstrap_port in the "
                "config, to reach an encode node on --host)"
            )
        from ..runtime.control import parse_address

        for a in addrs:
            try:
                parse_address(a)
            except Exception as exc:
                raise ConfigError(f"invalid --encoder-addr: {exc}") from None
        if len(set(addrs)) != len(addrs):
            raise ConfigError(f"invalid --encoder-addr: duplicates in {addrs}")
    elif addrs:
        raise ConfigError("--encoder-addr is for the language role")
    api_key = args.api_key if args.api_key is not None else os.environ.get("EMTRANSFER_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ConfigError(
            "invalid --api-key: an empty key admits everybody; set one or leave it out"
        )
    exempt = frozenset(p.strip() for p in args.api_key_exempt.split(",") if p.strip())
    if bad := sorted(p for p in exempt if not p.startswith("/")):
        raise ConfigError(f"invalid --api-key-exempt: paths must start with '/': {bad}")
    return ServeOptions(
        role=args.role,
        settings=settings,
        http_host=args.http_host or settings.host,
        port=port,
        encoder=args.encoder,
        encoder_addrs=tuple(addrs),
        max_tokens=settings.max_tokens,
        patch_size=args.patch_size,
        retry_interval=args.retry_interval,
        shutdown_timeout=args.shutdown_timeout,
        log_summary_interval=args.log_summary_interval,
        max_body_bytes=args.max_body_bytes,
        access_log=args.access_log,
        gc_freeze=args.gc_freeze,
        api_key=api_key,
        api_key_exempt=exempt,
    )
