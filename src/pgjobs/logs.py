"""Log output of the ``pgjobs`` commands: text for people, JSON lines for log pipelines.

``--log-format json`` (or ``PGJOBS_LOG_FORMAT=json``) writes one JSON object per line:
``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, then the job fields a
record carries (``JOB_FIELDS``: passed as ``extra=``, e.g. ``Job.log_fields()``, or by
a job's ``ctx.logger``), and ``traceback`` when it has an exception. The text format
appends the job id and attempt to the message, so both formats say which job a line is
about.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final

from pgjobs.errors import ConfigurationError

FORMATS: Final = ("text", "json")
JOB_FIELDS: Final = ("job_id", "company_id", "job_type", "attempt", "worker_id")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def resolve_format(flag: str | None) -> str:
    """The flag's format, else PGJOBS_LOG_FORMAT's, else text."""
    chosen = flag or os.environ.get("PGJOBS_LOG_FORMAT", "").strip().lower() or "text"
    if chosen not in FORMATS:
        raise ConfigurationError(f"PGJOBS_LOG_FORMAT must be text or json, got {chosen!r}")
    return chosen


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ``[job <id> attempt <n>]`` on job records."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            return line
        attempt = getattr(record, "attempt", None)
        return f"{line} [job {job_id}" + (f" attempt {attempt}]" if attempt is not None else "]")


def configure(log_format: str, *, verbose: bool = False) -> None:
    """Send the process's logs to stderr in ``log_format`` (replacing any handler the
    root logger had), at INFO, or DEBUG when ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
