"""Command line: ``python -m emtransfer demo`` and ``python -m emtransfer serve``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .errors import ConfigError
from .logs import configure_logging
from .server.options import add_serve_parser, env_default, resolve_serve
from .settings import Settings


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {k: v for k, v in extra.items() if v is not None}
    return Settings.load(args.config, **overrides)


def version_line() -> str:
    from . import __version__
    from .protocol.messages import PROTOCOL_VERSION

    return f"emtransfer {__version__} (protocol {PROTOCOL_VERSION})"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _log_level_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        help=f"debug, info, warning, error (default {default}; env EMTRANSFER_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JSON log lines instead of text (env EMTRANSFER_LOG_JSON=1)",
    )


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emtransfer",
        description="Move multimodal embeddings between encode and language workers: 'demo' "
        "runs both roles on this machine, 'serve' runs one behind an HTTP API.",
    )
    parser.add_argument(
        "--log-level", help="debug, info, warning, error (default: warning; info for serve)"
    )
    parser.add_argument("--log-json", action="store_true", help="JSON log lines instead of text")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="both roles as two processes, a mixed verified workload, a summary table",
        description="Runs an encode process and a language process on the best transport "
        "available (or --transport) and moves a mixed workload through them: known lengths, "
        "resumes, payloads larger than the pool. Every payload is verified; exits 1 on any "
        "mismatch, failure or leaked block.",
    )
    demo.add_argument("--config", help="TOML settings file (else EMTRANSFER_CONFIG, else defaults)")
    demo.add_argument("--requests", type=int, default=64, help="number of requests (default 64)")
    demo.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    demo.add_argument(
        "--transport", choices=["auto", "nixl", "tcp", "mooncake"], help="data plane (default auto)"
    )
    demo.add_argument("--hidden-size", type=int, help="embedding width (default from settings)")
    demo.add_argument("--seed", type=int, default=0, help="workload seed")
    _log_level_flag(demo, "warning")

    add_serve_parser(sub)

    args = parser.parse_args(argv)
    default_level = "info" if args.command == "serve" else "warning"
    level = (args.log_level or os.environ.get("EMTRANSFER_LOG_LEVEL") or default_level).lower()
    log_json = args.log_json or env_default("log_json", False, bool)
    if level not in ("debug", "info", "warning", "error", "critical"):
        parser.error(f"invalid --log-level {args.log_level!r}: debug, info, warning or error")
    configure_logging(level, json=log_json)
    try:
        if args.command == "serve":
            from .server.run import serve

            return serve(resolve_serve(args), log_level=level, log_json=log_json)
        if args.command == "demo":
            from .demo import run_demo

            settings = _settings(args, transport=args.transport, hidden_size=args.hidden_size)
            return run_demo(
                settings,
                requests=args.requests,
                concurrency=args.concurrency,
                seed=args.seed,
                log_level=level,
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
