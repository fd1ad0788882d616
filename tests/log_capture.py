"""Capture emtransfer's log events in a test, as dicts: ``event``, ``log_level``, ``logger``
and the event's fields."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from emtransfer.logs import fields_of


@contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append(
                {
                    "event": record.getMessage(),
                    "log_level": record.levelname.lower(),
                    "logger": record.name,
                    **fields_of(record),
                }
            )

    handler, logger = Collect(level), logging.getLogger("emtransfer")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
