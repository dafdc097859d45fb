"""Logging: JSON lines (python-json-logger) by default, plain text on request.

Structured fields travel in `extra=`; every line has a stable `event` name so operators can
filter on it. No call site logs per frame.
"""

from __future__ import annotations

import logging
import sys

try:  # python-json-logger >= 3 moved the formatter
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # pragma: no cover
    from pythonjsonlogger.jsonlogger import JsonFormatter  # type: ignore[no-redef]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _TextFormatter(logging.Formatter):
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in self._STANDARD}
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


_static_fields: dict[str, object] = {}


def set_static_fields(**fields: object) -> None:
    """Fields on every line from now on (a worker's index under --workers)."""
    _static_fields.update(fields)


def _add_static_fields(record: logging.LogRecord) -> bool:
    for name, value in _static_fields.items():
        setattr(record, name, value)
    return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _static_fields:
        handler.addFilter(_add_static_fields)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
