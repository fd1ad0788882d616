"""structlog set-up: readable console lines by default, JSON lines on request."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str | int = "info", *, json: bool = False) -> None:
    """Configure structlog for a process (the CLI calls it; libraries embedding emtransfer
    may configure structlog themselves instead)."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
