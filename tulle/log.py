"""Logging for every Tulle process: structlog, JSON lines when not on a terminal.

Every line carries `component` (destination, identity, policy, injector, proxy, cli, local).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
import structlog.tracebacks

_configured = False
# Tracebacks as data, *without* local variables: structlog's default shows them, and a
# frame's locals can hold a token, a key or a credential (the identity client's do).
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def setup_logging(component: str, level: str | None = None, fmt: str | None = None) -> structlog.BoundLogger:
    """Configure structlog once per process and return a logger bound to `component`.

    fmt: "json", "console", or None for "console on a TTY, JSON otherwise"
    (TULLE_LOG_FORMAT overrides). level: TULLE_LOG_LEVEL or "info".
    """
    global _configured
    level = (level or os.environ.get("TULLE_LOG_LEVEL") or "info").upper()
    fmt = fmt or os.environ.get("TULLE_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty() and "NO_COLOR" not in os.environ)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _DICT_TRACEBACKS if fmt == "json" else structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library logs (nats, kubernetes) at WARNING and above, through the same output.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"%(levelname)s {component} %(name)s: %(message)s")
    structlog.contextvars.bind_contextvars(component=component)
    _configured = True
    return structlog.get_logger()


def get_logger(**bound) -> structlog.BoundLogger:
    # Lazy: a module-level logger made at import, before setup_logging ran, must still log
    # with the configuration set later (`.bind()` on structlog's proxy would fix it at once).
    return structlog.get_logger(**bound)
