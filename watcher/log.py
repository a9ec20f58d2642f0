"""Logging: JSON lines when stderr is not a terminal (journald, Docker, files), readable
lines on a terminal. Structured fields come from ``extra={...}`` (chain, transfer_id,
invoice_id, ...) and appear as keys in JSON and as ``key=value`` in text."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TextIO

# user:password@ inside any URL (an RPC URL that carries credentials): scrubbed from every
# line and traceback, whatever logged it (our code names nodes by ChainConfig.node already;
# this is for a library's message or an exception text that repeats a URL)
_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"<>]+@")


def scrub(text: str) -> str:
    return _CREDENTIALS.sub(r"\1***@", text) if "@" in text else text


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(out, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname[:4]:4} {record.name.removeprefix('watcher.')}: {record.getMessage()}"
        extras = _extras(record)
        extras.pop("chain", None)  # already in every chain message
        if extras:
            line += "  " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "hypercorn", "hypercorn.error", "web3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
