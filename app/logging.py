"""Structured logs: JSON lines (or console lines for a person) carrying request and submission ids; never a key, a
secret or moderated text. See docs/operations.md."""

from __future__ import annotations

import logging
import sys

import structlog

from app.config import Settings

_configured = False


def configure_logging(settings: Settings) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # A line below the level is dropped first, before any processor runs (the stdlib logger would drop it
        # anyway, after the processors had done their work: issue 15).
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # werkzeug's access log would print full URLs; our own request log line replaces it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # httpx logs every request's full URL at INFO, and a webhook URL may hold the receiver's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # So does urllib3 (the webhook sender's) at DEBUG.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
