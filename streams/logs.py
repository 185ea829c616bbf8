"""Log lines as text (the default) or JSON objects, one per line (``LEADSTREAM_LOG_FORMAT=json``).

>>> import logging
>>> record = logging.LogRecord("leadstream.api", logging.INFO, __file__, 1, "hello %s", ("there",), None)
>>> line = JsonFormatter().format(record)
>>> import json; {k: v for k, v in json.loads(line).items() if k != "ts"}
{'level': 'INFO', 'logger': 'leadstream.api', 'message': 'hello there'}
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import orjson

from streams.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def handler(settings: Settings) -> logging.Handler:
    """A stderr handler in the format the settings ask for."""
    out = logging.StreamHandler()
    out.setFormatter(JsonFormatter() if settings.log_format == "json"
                     else logging.Formatter("[%(asctime)s] [%(levelname)s] %(name)s: %(message)s"))
    return out


def configure_logging(settings: Settings, level: str | int = "INFO") -> None:
    """Root logging for a process that is not a Faust worker (the worker passes ``handler`` to Faust)."""
    root = logging.getLogger()
    root.handlers[:] = [handler(settings)]
    root.setLevel(level.upper() if isinstance(level, str) else level)
