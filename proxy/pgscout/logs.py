"""Structured logging setup.

Owns: structlog configuration: JSON lines on stdout by default, the console renderer when stdout
is a TTY (log.format=auto), the level filter. Every pgscout log line is one structlog event with
a snake_case event name (connection_opened, slow_query, n_plus_one...).
Must not: be called per message on the hot path (callers log per connection or per finding).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str, fmt: str, *, file: TextIO | None = None,
              processors: Sequence[Callable] = ()) -> None:
    """Log to `file` (stdout by default); `processors` see every event before it is rendered."""
    file = file or sys.stdout
    console = fmt == "console" or (fmt == "auto" and file.isatty())
    renderer = (structlog.dev.ConsoleRenderer() if console
                else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *processors,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=file),
        cache_logger_on_first_use=False,
    )
