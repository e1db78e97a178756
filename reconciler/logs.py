"""Logging set-up: one JSON object per line on stderr (or plain text for humans), secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import parse_qsl, unquote, urlsplit

REDACTED = "[REDACTED]"
_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_NOISY_LIBRARIES = ("urllib3", "github", "kubernetes", "apscheduler", "requests", "redis")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@\"'<>]+@")
"""The user information of any URL (``scheme://user:password@host``, and ``scheme://TOKEN@host``: Git hosts take
a token as the user name), whoever wrote it into a message. All of it goes: a user name can be the secret."""
_MIN_SECRET_LENGTH = 4


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields passed through ``extra={...}``."""
    return {key: value for key, value in record.__dict__.items() if key not in _RESERVED}


def url_secrets(url: str | None) -> list[str]:
    """The password of a URL such as ``redis://:password@host:6379/0`` (or its ``?password=`` query), in the
    forms it can be written in, for the redactor."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password, unquote(password)] if password else []
    found += [value for name, value in parse_qsl(parts.query) if name == "password"]
    return [value for value in found if value]


class Redactor:
    """Replaces every known secret value in a rendered line, whatever path it took to get there.

    A secret is also looked for in its JSON-escaped forms (a PEM key's newlines become ``\\n`` in a JSON log
    line) and line by line for multi-line secrets; the user information of every URL
    (``scheme://user:password@host``, ``scheme://TOKEN@host``) is masked whether or not it is known.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str | None]) -> None:
        for secret in secrets:
            if not secret:
                continue
            forms = [secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]]
            forms += [line.strip() for line in secret.splitlines()]
            for form in forms:
                if len(form) >= _MIN_SECRET_LENGTH and form not in self._secrets:
                    self._secrets.append(form)
        self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _URL_USERINFO.sub(rf"\1{REDACTED}@", text)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secret form(s))"


def _printable(text: str) -> str:
    """Lone surrogates (a malformed object's name can carry one) as escapes: a log line must always encode."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(record_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = self.formatException(record.exc_info)
        return _printable(self._redact(json.dumps(entry, default=str, ensure_ascii=False)))


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message key=value ...`` for a human at a terminal.

    A mapping field (the run summary) becomes its own ``key=value`` pairs, nested ones with dotted keys; values
    with spaces are quoted; lists are compact JSON; a ``reason`` that only repeats the message is left out."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        reason = fields.get("reason")
        if isinstance(reason, str):
            message = record.getMessage()
            if reason == message:
                del fields["reason"]
            elif reason.startswith(f"{message}: "):
                fields["reason"] = reason[len(message) + 2 :]
        pairs = list(_pairs(fields, prefix="", top=True))
        if pairs:
            line += " " + " ".join(f"{key}={value}" for key, value in pairs)
        return _printable(self._redact(line))


_BARE = re.compile(r"^[^\s\"'=]+$")
_KEY = re.compile(r"^[\w.:/-]+$")


def _pairs(fields: dict[str, Any], *, prefix: str, top: bool = False) -> Iterator[tuple[str, str]]:
    for key, value in fields.items():
        if value is None or (isinstance(value, list | tuple | dict) and not value):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and all(isinstance(k, str) and _KEY.match(k) for k in value):
            # The first level lends its keys as they are (``summary`` is all its fields); deeper ones are dotted.
            inner = "" if top and not any(k in fields for k in value) else f"{name}."
            yield from _pairs(value, prefix=inner)
            continue
        yield name, _text_value(value)


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value if _BARE.match(value) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple) and all(isinstance(item, dict) and "cause" in item for item in value):
        return _text_value("; ".join(describe_run_error(item) for item in value))
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    return _text_value(str(value))


def describe_run_error(error: dict[str, Any] | str) -> str:
    """A run summary's error entry: ``3x HTTP 503: cause (e.g. app)``, without ``1x`` for a single one; summaries
    stored by earlier versions hold plain strings."""
    if isinstance(error, str):
        return error
    count = error.get("count", 1)
    text = f"{count}x " if count != 1 else ""
    if error.get("status") is not None:
        text += f"HTTP {error['status']}: "
    text += str(error["cause"])
    if error.get("example"):
        text += f" (e.g. {error['example']})"
    return text


def configure_logging(
    *, log_format: str = "json", level: str = "info", stream: TextIO | None = None, redactor: Redactor | None = None
) -> Redactor:
    """Route every log record (ours and the libraries') through one redacting handler on stderr."""
    redactor = redactor or Redactor()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter(redactor) if log_format == "text" else JsonFormatter(redactor))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    return redactor
