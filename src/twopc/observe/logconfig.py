"""Logging set-up for twopc processes: structlog, JSON for machines, console for people.

Library code only calls `structlog.get_logger(...)`; the process decides where logs
go (`configure`). Disabled levels cost one method call that does nothing
(`make_filtering_bound_logger`), so debug events on the hot path are free when off.

A process that configures nothing gets `use_default()` when twopc is imported: info
and above, for people, on standard error. structlog's own default would print every
debug event of the hot path to standard output.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["console", "json"]


def configure(fmt: LogFormat = "console", *, level: str = "info", stream: TextIO | None = None) -> None:
    """Configures structlog for this process.

    Args:
        fmt: "json" (one object per line) or "console" (aligned, for people).
        level: the lowest level emitted ("debug", "info", "warning", "error").
        stream: where to write; standard error by default.
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def use_default() -> None:
    """Info and above on standard error, unless the process configured structlog.

    Loggers are not cached under this default, so a `configure` made later (after
    some events were logged) still takes effect everywhere.
    """
    if not structlog.is_configured():
        configure("console", level="info")
        structlog.configure(cache_logger_on_first_use=False)
