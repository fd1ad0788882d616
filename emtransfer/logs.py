"""Logging: the standard ``logging`` module under the ``emtransfer`` logger, key-value events.

A library is silent unless its host configures logging: records go to
``logging.getLogger("emtransfer")`` (and children such as ``emtransfer.server``), which has a
``NullHandler`` and no level of its own, so an application's logging set-up decides what is
shown, and Python's last-resort handler never prints our warnings to stderr behind its back.

Call sites log events with fields (``log.info("peer lost", peer=..., reason=...)``), as with
structlog; a filtered level costs one ``isEnabledFor`` check (no dict, no formatting). The
fields travel on the record as ``record.emtransfer``; :class:`Formatter` renders them as a
readable line or a JSON object, and :func:`configure_logging` (what the CLI calls) installs it.
structlog users can render the same records with ``structlog.stdlib.ProcessorFormatter``.
"""

from __future__ import annotations

import json as _json
import logging
import sys
import time
from typing import Any

ROOT = "emtransfer"
FIELDS = "emtransfer"  # the LogRecord attribute carrying an event's fields
logging.getLogger(ROOT).addHandler(logging.NullHandler())

_DEBUG, _INFO, _WARNING, _ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR


class Log:
    """A logger with bound fields; ``bind`` returns a new one (cheap: one dict)."""

    __slots__ = ("_ctx", "logger")

    def __init__(self, logger: logging.Logger, ctx: dict[str, Any] | None = None) -> None:
        self.logger = logger
        self._ctx = ctx or {}

    def bind(self, **fields: Any) -> Log:
        return Log(self.logger, {**self._ctx, **fields})

    def is_enabled(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: Any = None) -> None:
        if "exc_info" in fields:
            exc_info = fields.pop("exc_info")
        self.logger.log(
            level, event, exc_info=exc_info, extra={FIELDS: {**self._ctx, **fields}}, stacklevel=3
        )

    def debug(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(_DEBUG):
            self._emit(_DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(_INFO):
            self._emit(_INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(_WARNING):
            self._emit(_WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(_ERROR):
            self._emit(_ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(_ERROR):
            self._emit(_ERROR, event, fields, exc_info=True)


def get_logger(name: str = ROOT, **fields: Any) -> Log:
    """A :class:`Log` over ``logging.getLogger(name)``; ``name`` should be ``emtransfer`` or
    below it, so that the host's configuration (and our ``NullHandler``) applies."""
    return Log(logging.getLogger(name), fields or None)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The event's fields (empty for a record that did not come through :class:`Log`)."""
    return dict(getattr(record, FIELDS, None) or {})


class Formatter(logging.Formatter):
    """``2026-12-01T10:00:00.123Z [info     ] event  key=value ...`` or, with ``json``, one
    JSON object per line: timestamp, level, logger, event and the fields."""

    def __init__(self, *, json: bool = False) -> None:
        super().__init__()
        self.json = json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        fields = fields_of(record)
        event = record.getMessage()
        level = record.levelname.lower()
        if self.json:
            out: dict[str, Any] = {"timestamp": ts, "level": level, "logger": record.name}
            out["event"] = event
            out.update(fields)
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
            return _json.dumps(out, default=repr)
        text = f"{ts} [{level:<9}] {event:<30}"
        if record.name != ROOT:
            fields = {"logger": record.name, **fields}
        text += "".join(
            f" {k}={v!r}" if isinstance(v, str) else f" {k}={v}" for k, v in fields.items()
        )
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str | int = "info", *, json: bool = False) -> None:
    """Show emtransfer's events (and every other logger's: uvicorn's, the host's) at ``level``
    on stderr, readable or JSON. The CLI calls it; an application embedding emtransfer may
    call it, or configure ``logging`` its own way instead."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(json=json))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(lvl)
    logging.getLogger(ROOT).setLevel(logging.NOTSET)  # follow the root's level


__all__ = ["Formatter", "Log", "configure_logging", "fields_of", "get_logger"]
