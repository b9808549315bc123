"""Conversion of values between Python and Lua.

Python -> Lua: only JSON-like values (None, bool, int, float, str, bytes, lists, tuples,
dicts) are converted, into fresh Lua tables; anything else is refused, so no Python
object ever becomes reachable from Lua. Lua -> Python: values come through the sandbox's
`export`, which has already replaced what Python cannot read safely (see sandbox.lua).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LuaErrorValue:
    """An error value (SPEC §5) returned from Lua, as seen from Python."""

    kind: str
    message: str
    retryable: bool = False
    details: Any = field(default=None)

    def __str__(self) -> str:
        return self.message


def _check_str(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError("cannot pass a string that is not valid Unicode (lone surrogate) to Lua") from None
    return value


def _check_int(value: int) -> int:
    if not -(2**53) <= value <= 2**53:
        raise TypeError(f"integer {value} is too large for a Lua number")
    return value


def to_lua(lua: Any, value: Any, depth: int = 0) -> Any:
    """Convert a Python value for a call into Lua. Raises TypeError for anything else."""
    if value is None or isinstance(value, (bool, bytes)):
        return value
    if isinstance(value, str):
        return _check_str(value)
    if isinstance(value, int):
        return _check_int(value)
    if isinstance(value, float):
        return value
    if depth > 200:
        raise TypeError("value is nested too deeply to pass to Lua")
    if type(value) in (list, tuple):  # not namedtuples such as msgpack's ExtType
        return lua.table_from([to_lua(lua, v, depth + 1) for v in value])
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            # bytes: a msgpack bin key, which is how a Lua string key that is not UTF-8 travels.
            if not isinstance(k, (str, bytes, int, float)) or (isinstance(k, float) and math.isnan(k)):
                raise TypeError(f"cannot pass a dict key of type {type(k).__name__} to Lua")
            if isinstance(k, str):
                _check_str(k)
            elif isinstance(k, int) and not isinstance(k, bool):
                _check_int(k)
            out[k] = to_lua(lua, v, depth + 1)
        return lua.table_from(out)
    raise TypeError(f"cannot pass a value of type {type(value).__name__} to Lua")


def from_lua(value: Any) -> Any:
    """Convert an exported Lua value (see sandbox.lua `export`) to plain Python.

    Marker keys ("\0bytes", "\0error", "\0object") can only come from the export: a
    user key starting with "\0" arrives with one more "\0", removed here."""
    if value is None or isinstance(value, (str, int, float, bytes)):
        return value  # anything else `export` hands over is a table
    items = dict(value.items())
    if len(items) == 1:
        (key, inner), = items.items()
        if key == "\0bytes":
            return bytes.fromhex(inner)
        if key == "\0error":
            details = inner["details"]
            return LuaErrorValue(kind=str(inner["kind"]), message=str(from_lua(inner["message"])),
                                 retryable=bool(inner["retryable"]),
                                 details=None if details is None else from_lua(details))
        if key == "\0object":
            return {}
    n = len(items)
    if n and all(type(k) is int for k in items) and min(items) == 1 and max(items) == n:
        return [from_lua(items[i]) for i in range(1, n + 1)]
    if n == 0:
        return []
    return {_key(k): from_lua(v) for k, v in items.items()}


def _key(k: Any) -> Any:
    if isinstance(k, str) and k.startswith("\0"):
        return k[1:]
    return from_lua(k)
