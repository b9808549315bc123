"""Log output for the CLI: text lines or one JSON object per line (SPEC §8).

Lua `logger` records carry `entry` (the entry ID), `lua_line`, `lua_file` and `fields`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LEVEL_NAMES = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "warning": logging.WARNING, "error": logging.ERROR}
_SHORT = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "error"}
_RESERVED = {"ts", "level", "logger", "msg", "entry", "line", "file"}


def _ts(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _level(record: logging.LogRecord) -> str:
    return _SHORT.get(record.levelno, record.levelname.lower())


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u0085\u2028\u2029]")


def _one_record(text: str) -> str:
    """Text from Lua (a message, an error, a field) cannot start a line of its own: line breaks
    become an indented continuation and other control characters (ANSI escapes) are shown
    escaped, so a log line cannot be forged."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                        f"\\u{ord(m.group()):04x}", text)
    return text.replace("\n", "\n    ")


class TextFormatter(logging.Formatter):
    """`TIME LEVEL [entry file:line] message key=value ...`; continuation lines are indented."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), f"{_level(record).upper():5}"]
        entry = getattr(record, "entry", None)
        if entry:
            parts.append(f"[{entry} {getattr(record, 'lua_file', '?')}:{getattr(record, 'lua_line', 0)}]")
        else:
            parts.append(f"[{record.name}]")
        parts.append(record.getMessage())
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            parts.append(f"{key}={text}")
        out = _one_record(" ".join(parts))
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, entry, line, and the user's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _ts(record), "level": _level(record), "logger": record.name,
                               "msg": record.getMessage()}
        entry = getattr(record, "entry", None)
        if entry:
            out["entry"] = entry
            out["line"] = getattr(record, "lua_line", 0)
            out["file"] = getattr(record, "lua_file", "")
        for key, value in (getattr(record, "fields", None) or {}).items():
            out[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _CurrentStderr:
    """Writes to whatever sys.stderr is now, so a live progress display can redirect it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the runtime's logs (and Lua's) to `stream` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or _CurrentStderr())  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("runtime")
    root.handlers[:] = [handler]
    root.setLevel(LEVEL_NAMES[level])
    root.propagate = False
