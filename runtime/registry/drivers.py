"""Reading driver entry fields (`queue.driver.*`) and `driver_options`, by the option
schemas in `runtime.drivers.catalog` (pure data: the registry still knows nothing of
running things)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..drivers.catalog import DRIVER_KINDS, Option, driver_key
from .fields import FieldReader

DRIVER_OPTION_KEYS = {driver_key(kind): kind for kind in DRIVER_KINDS}


class Secret(str):
    """A secret option value (a password, a key): the text itself for the code that uses it,
    `'***'` in a repr, so a spec or options dict printed in a log or a traceback shows no
    secret."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def env_name(name: str) -> str:
    """The environment variable an `*_env` field names: Wippy names an entry of its env
    registry (`ns:NAME`), which here is the process environment's NAME."""
    return name.rpartition(":")[2]


def read_option(r: FieldReader, key: str, opt: Option) -> Any:
    """One option field, type-checked; its default when absent or wrong."""
    value = _read_option(r, key, opt)
    if opt.secret and isinstance(value, str) and not isinstance(value, Secret):
        return Secret(value)
    return value


def _read_option(r: FieldReader, key: str, opt: Option) -> Any:
    if opt.type == "int":
        return r.number(key, default=opt.default if opt.default is not None else 0,
                        minimum=int(opt.minimum) if opt.minimum is not None else None,
                        maximum=int(opt.maximum) if opt.maximum is not None else None)
    if opt.type == "duration":
        value = r.duration(key, opt.default)
        if value is not None and key in r.data:
            if not math.isfinite(value):
                r.problem(key, "must be a finite duration")
                return opt.default
            if opt.minimum is not None and value < opt.minimum:
                r.problem(key, f"{value:g}s is below the minimum {opt.minimum:g}s")
                return opt.default
            if opt.maximum is not None and value > opt.maximum:
                r.problem(key, f"{value:g}s is above the maximum {opt.maximum:g}s")
                return opt.default
        return value
    if opt.type == "bool":
        return r.flag(key, bool(opt.default))
    if opt.type == "choice":
        return r.text(key, default=opt.default, choices={c.lower(): c for c in opt.choices})
    if opt.type == "url":
        return _read_url(r, key, opt)
    if opt.type == "pem":
        return _read_pem(r, key)
    if opt.type == "env":
        name = r.text(key, required=opt.required)
        if name is not None and ("\0" in name or os.environ.get(env_name(name)) is None):
            r.problem(key, f"environment variable '{env_name(name)}' is not set")
        return name
    if opt.type == "ref":
        return r.ref(key, opt.choices, required=opt.required)
    if opt.type == "mapping" and opt.fields is not None:
        sub = r.sub(key)
        if sub is None:
            return opt.default
        values = read_options(sub, opt.fields)
        sub.finish()
        return values
    if opt.type == "text":
        return r.text(key, default=opt.default, required=opt.required)
    if opt.type == "mapping":
        return r.mapping(key) if key in r.data else opt.default
    if opt.type == "list":
        return r.items(key) if key in r.data else opt.default
    r.used.add(key)
    return r.data.get(key, opt.default)


def mask_url(url: str) -> str:
    """A URL with its password replaced by ***, for logs, errors and output."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[-1]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        return "<invalid url>"


def _read_url(r: FieldReader, key: str, opt: Option) -> Any:
    value = r.text(key, default=opt.default)
    if value is None or key not in r.data:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        r.problem(key, f"'{mask_url(value)}' is not a valid URL ({exc})")
        return opt.default
    if opt.choices and parts.scheme.lower() not in opt.choices:
        r.problem(key, f"'{mask_url(value)}' must start with {' or '.join(c + '://' for c in opt.choices)}")
        return opt.default
    if not parts.hostname:
        r.problem(key, f"'{mask_url(value)}' names no host")
        return opt.default
    return value


def _read_pem(r: FieldReader, key: str) -> str | None:
    """PEM text as it is, or a file path (relative to the definition file) that must exist;
    returned as an absolute path."""
    value = r.text(key)
    if value is None or "-----BEGIN" in value:
        return value
    path = Path(value).expanduser()
    try:
        if not path.is_absolute():
            path = Path(r.file).resolve().parent / path
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        r.problem(key, f"file '{value}' not found ({path})")
        return None
    return str(path)


def read_options(r: FieldReader, schema: dict[str, Option]) -> dict[str, Any]:
    return {key: read_option(r, key, opt) for key, opt in schema.items()}


def read_driver_options(r: FieldReader, which: str) -> dict[str, Any]:
    """`driver_options` of a queue (which="queue") or consumer (which="consumer"): the keys of
    known drivers checked by their schema; other keys (drivers this runtime does not have,
    e.g. a file shared with Wippy) are kept as they are."""
    dro = r.sub("driver_options")
    if dro is None:
        return {}
    out: dict[str, Any] = {}
    for key in list(dro.data):
        kind = DRIVER_OPTION_KEYS.get(str(key))
        if kind is None:
            dro.used.add(key)
            out[str(key)] = dro.mapping(str(key))
            continue
        sub = dro.sub(str(key))
        if sub is None:
            continue
        entry = DRIVER_KINDS[kind]
        schema = entry.queue_options if which == "queue" else entry.consumer_options
        out[str(key)] = read_options(sub, schema)
        sub.finish()
    dro.finish()
    return out
