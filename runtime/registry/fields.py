"""Typed reading of an entry's fields, collecting every problem with its line.

Durations become float seconds and sizes become bytes here, once, at load time.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import Problem
from .sources import Unresolved
from .yaml_lines import LineDict, LineList

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4,
               "tb": 1024**4, "tib": 1024**4}


MAX_DURATION = 10 * 365 * 24 * 3600.0  # ten years: anything longer is a mistake, and overflows timers
MIN_MEMORY_LIMIT = 64 * 1024  # below this a handler's Lua state cannot run anything


def _finite_duration(number: float) -> float:
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"a duration must be a finite number of seconds (got {number})")
    if number < 0:
        raise ValueError("a duration cannot be negative")
    if number > MAX_DURATION:
        raise ValueError(f"a duration cannot be longer than {MAX_DURATION:.0f}s (ten years)")
    return number


def parse_duration(value: Any) -> float:
    """`500ms`, `10s`, `1m30s`, or a number of seconds -> float seconds. ValueError if bad
    (negative, NaN, infinite, longer than ten years)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        return _finite_duration(float(value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration like '500ms', '10s' or '1m30s'")
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(text) or pos == 0:
            raise ValueError(f"'{value}' is not a duration (use e.g. '500ms', '10s', '1m30s')") from None
        return _finite_duration(total)
    return _finite_duration(number)


def parse_size(value: Any) -> int:
    """`64MB`, `512KB`, or a number of bytes -> int bytes (binary units). ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m and m.group(2).lower() in _SIZE_UNITS:
            size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
            if not size.is_integer():
                raise ValueError(f"'{value}' is not a whole number of bytes")
            return int(size)
    raise ValueError(f"'{value}' is not a size (use e.g. '64MB', '512KB' or a number of bytes)")


def suggest(word: str, choices: list[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Ref:
    """A reference from one entry's field to another entry, checked once all are known."""

    source_id: str
    field: str
    target: str
    kinds: tuple[str, ...]  # accepted kinds; a trailing '*' matches a prefix
    file: str
    line: int
    dependency: bool = True  # an edge for start order and cycle detection


def resolve_id(value: str, namespace: str) -> str:
    """A full ID stays as it is; a bare name resolves in the referring namespace."""
    return value if ":" in value else f"{namespace}:{value}"


class FieldReader:
    """Reads fields of one mapping with type checks, recording problems and references."""

    def __init__(self, data: LineDict, *, entry_id: str, namespace: str, file: str,
                 problems: list[Problem], refs: list[Ref], prefix: str = ""):
        self.data = data
        self.entry_id = entry_id
        self.namespace = namespace
        self.file = file
        self.problems = problems
        self.refs = refs
        self.prefix = prefix
        self.used: set[str] = set()

    # -- helpers -----------------------------------------------------------------------------
    def line(self, key: str) -> int:
        return self.data.line_of(key) if isinstance(self.data, LineDict) else 0

    def problem(self, key: str | None, message: str) -> None:
        line = self.line(key) if key else getattr(self.data, "line", 0)
        field = f" field '{self.prefix}{key}'" if key else ""
        self.problems.append(Problem(self.file, line, f"entry {self.entry_id}:{field} {message}".replace(":  ", ": ")))

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        if isinstance(self.data.get(key), Unresolved):
            return None  # its missing ${env:...} is reported already
        if key not in self.data or self.data[key] is None:
            if required:
                self.problem(None, f"missing required field '{self.prefix}{key}'")
            return None
        return self.data[key]

    def sub(self, key: str) -> FieldReader | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, LineDict):
            self.problem(key, f"must be a mapping, got {type_name(value)}")
            return None
        return FieldReader(value, entry_id=self.entry_id, namespace=self.namespace, file=self.file,
                           problems=self.problems, refs=self.refs, prefix=f"{self.prefix}{key}.")

    # -- typed getters ---------------------------------------------------------------------
    def text(self, key: str, *, required: bool = False, default: str | None = None,
            choices: dict[str, str] | None = None) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {type_name(value)}")
            return default
        if choices is not None:
            if value.lower() not in choices:
                self.problem(key, f"'{value}' is not one of {', '.join(sorted(set(choices.values())))}"
                             + suggest(value, list(choices)))
                return default
            return choices[value.lower()]
        return str(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {type_name(value)}")
            return default
        return value

    def number(self, key: str, *, default: int, maximum: int | None = None, minimum: int | None = None,
            nonpositive_is_default: bool = False) -> int:
        value = self._get(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be a whole number, got {type_name(value)}")
            return default
        if nonpositive_is_default and value <= 0:
            return default
        if maximum is not None and value > maximum:
            self.problem(key, f"{value} is above the maximum {maximum}")
            return default
        if minimum is not None and value < minimum:
            self.problem(key, f"{value} is below the minimum {minimum}")
            return default
        return value

    def duration(self, key: str, default: float | None = None) -> float | None:
        value = self._get(key, False)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def limit_duration(self, key: str) -> float | None:
        """A time limit: unset means none; 0 is refused (it is not "no limit")."""
        value = self.duration(key)
        if value is not None and value <= 0:
            self.problem(key, "must be more than 0 (leave it unset for no time limit)")
            return None
        return value

    def limit_size(self, key: str) -> int | None:
        """A memory limit: unset means none; 0 and sizes too small to run a handler are refused."""
        value = self.size(key)
        if value is not None and value < MIN_MEMORY_LIMIT:
            self.problem(key, f"must be at least {MIN_MEMORY_LIMIT // 1024}KB (got {value} bytes; "
                              "leave it unset for no memory limit)")
            return None
        return value

    def size(self, key: str) -> int | None:
        value = self._get(key, False)
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {type_name(value)}")
            return {}
        return plain(value)

    def items(self, key: str, max_values: int | None = None) -> list[Any]:
        """A list. With `max_values`: refused if it would expand to more values than that
        when handed over (YAML aliases share containers; an alias bomb or cycle expands)."""
        value = self._get(key, False)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(key, f"must be a list, got {type_name(value)}")
            return []
        if max_values is not None and expanded_size(value, max_values) > max_values:
            self.problem(key, f"expands to more than {max_values} values (through YAML aliases or a cycle)")
            return []
        return plain(value)

    def str_list(self, key: str, *, allow_single: bool = False) -> list[str]:
        value = self._get(key, False)
        if value is None:
            return []
        if allow_single and isinstance(value, str):
            return [str(value)]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(key, "must be a list of strings")
            return []
        return [str(v) for v in value if not isinstance(v, Unresolved)]

    def item_line(self, key: str, index: int) -> int:
        value = self.data.get(key)
        return value.line_of(index) if isinstance(value, LineList) else self.line(key)

    def ref(self, key: str, kinds: tuple[str, ...], *, required: bool = False,
            dependency: bool = True) -> str | None:
        value = self.text(key, required=required)
        if value is None:
            return None
        target = resolve_id(value, self.namespace)
        self.refs.append(Ref(self.entry_id, self.prefix + key, target, kinds, self.file,
                             self.line(key), dependency))
        return target

    def ref_list(self, key: str, kinds: tuple[str, ...], *, dependency: bool = True) -> list[str]:
        out = []
        self.str_list(key)  # type check
        value = self.data.get(key)
        items = value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []
        for i, item in enumerate(items):
            if isinstance(item, Unresolved):
                continue
            target = resolve_id(item, self.namespace)
            line = self.item_line(key, i)
            self.refs.append(Ref(self.entry_id, self.prefix + key, target, kinds, self.file, line, dependency))
            out.append(target)
        return out

    def finish(self, allowed_extra: tuple[str, ...] = ()) -> None:
        """Report every field nobody read (a typo, usually)."""
        known = self.used | set(allowed_extra)
        for key in self.data:
            if key not in known:
                self.problem(key, "is not a known field" + suggest(str(key), known))


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the number {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string '{value}'" if len(value) < 40 else "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def plain(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """Drop line bookkeeping: LineDict/LineList/SourceText -> dict/list/str. Containers
    shared through YAML aliases stay shared (so an alias bomb is not expanded)."""
    if isinstance(value, (dict, list)):
        memo = {} if memo is None else memo
        done = memo.get(id(value))
        if done is not None:
            return done
        if isinstance(value, dict):
            mapping: dict[Any, Any] = {}
            memo[id(value)] = mapping
            for k, v in value.items():
                mapping[str(k) if isinstance(k, str) else k] = plain(v, memo)
            return mapping
        items: list[Any] = []
        memo[id(value)] = items
        items.extend(plain(v, memo) for v in value)
        return items
    if isinstance(value, str):
        return str(value)
    return value


def expanded_size(value: Any, limit: int) -> int:
    """How many values `value` holds once every shared container (YAML alias) is copied out,
    counting no further than just past `limit` (so a cycle or an alias bomb ends quickly)."""
    count = 0
    stack = [value]
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count
