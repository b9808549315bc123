"""Reading driver entry fields (`queue.driver.*`) and `driver_options`, by the option
schemas in `runtime.drivers.catalog` (pure data: the registry still knows nothing of
running things)."""

from __future__ import annotations

import math
from typing import Any

from ..drivers.catalog import DRIVER_KINDS, Option, driver_key
from .fields import FieldReader

DRIVER_OPTION_KEYS = {driver_key(kind): kind for kind in DRIVER_KINDS}


def read_option(r: FieldReader, key: str, opt: Option) -> Any:
    """One option field, type-checked; its default when absent or wrong."""
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
        return r.text(key, default=opt.default, choices={c: c for c in opt.choices})
    if opt.type == "text":
        return r.text(key, default=opt.default)
    if opt.type == "mapping":
        return r.mapping(key) if key in r.data else opt.default
    if opt.type == "list":
        return r.items(key) if key in r.data else opt.default
    r.used.add(key)
    return r.data.get(key, opt.default)


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
