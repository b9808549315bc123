"""Registry kinds: one frozen spec dataclass per kind and one parser function for each.

A parser reads a :class:`RawEntry` through a :class:`FieldReader`, so every problem is
collected with its file and line, and references are recorded for the cross-entry checks
in :mod:`runtime.registry.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..drivers.catalog import CONFIG_KINDS
from ..drivers.catalog import DRIVER_KINDS as DRIVER_CATALOG
from ..errors import Problem
from .drivers import read_driver_options, read_options
from .fields import FieldReader, Ref, suggest
from .sources import RawEntry, SourceText, Unresolved
from .yaml_lines import LineList

MAX_CONCURRENCY = 1000
MAX_PREFETCH = 10000
DEFAULT_STOP_TIMEOUT = 10.0

CODECS = {"json/plain": "json/plain", "json": "json/plain", "application/json": "json/plain",
          "application/msgpack": "application/msgpack", "msgpack": "application/msgpack"}
DRIVER_KINDS = ("queue.driver.*",)
LUA_MODULES = ("json", "logger", "queue", "time")
STANDARD_TABLES = ("string", "table", "math", "coroutine", "os", "errors")


MAX_ARGS_VALUES = 100_000  # a process.service's args, once YAML aliases are expanded


@dataclass(frozen=True)
class RestartPolicy:
    max_attempts: int = 0  # 0: retry forever
    initial_delay: float = 1.0
    max_delay: float = 30.0


@dataclass(frozen=True)
class Actor:
    id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SecurityContext:
    actor: Actor | None = None
    policies: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lifecycle:
    auto_start: bool = False
    depends_on: tuple[str, ...] = ()
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    restart: RestartPolicy | None = None
    security: SecurityContext | None = None


@dataclass(frozen=True)
class EntrySpec:
    id: str
    kind: str
    file: str
    line: int
    meta: dict[str, Any]
    lifecycle: Lifecycle

    @property
    def namespace(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split(":", 1)[1]


@dataclass(frozen=True)
class LuaSource:
    """Lua source text and where it lives, so Lua line numbers match the user's file."""

    text: str
    path: Path
    first_line: int  # line of the text's first character in `path`
    inline: bool

    @property
    def chunk_text(self) -> str:
        # Inline YAML sources are padded so Lua's line numbers are the YAML file's lines.
        return "\n" * (self.first_line - 1) + self.text if self.first_line > 1 else self.text


@dataclass(frozen=True)
class DriverSpec(EntrySpec):
    """A `queue.driver.*` entry; `options` holds its fields, typed by the driver catalog."""

    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConfigSpec(EntrySpec):
    """A `config.*` entry (`config.aws`): settings drivers take by reference. Secret values
    are `Secret` strings, shown as '***' in a repr."""

    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    """The delay before a nacked message is delivered again (SPEC §6)."""

    initial_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1`, without jitter."""
        if self.initial_delay <= 0:
            return 0.0
        try:
            base = self.initial_delay * self.multiplier ** max(0, attempt - 1)
        except OverflowError:
            base = self.max_delay
        return min(self.max_delay, base)


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    max_attempts: int


@dataclass(frozen=True)
class QueueSpec(EntrySpec):
    driver: str
    queue_name: str
    codec: str
    options: dict[str, Any]
    driver_options: dict[str, Any]
    dead_letter: DeadLetter | None
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True)
class ConsumerSpec(EntrySpec):
    queue: str
    func: str
    concurrency: int
    prefetch: int
    auto_ack: bool
    driver_options: dict[str, Any]
    timeout: float | None
    memory_limit: int | None


@dataclass(frozen=True)
class LuaCodeSpec(EntrySpec):
    source: LuaSource
    method: str | None
    modules: tuple[str, ...]
    imports: dict[str, str]  # alias -> library.lua ID


@dataclass(frozen=True)
class FunctionSpec(LuaCodeSpec):
    timeout: float | None = None
    memory_limit: int | None = None


@dataclass(frozen=True)
class LibrarySpec(LuaCodeSpec):
    pass


@dataclass(frozen=True)
class ProcessSpec(LuaCodeSpec):
    pass


@dataclass(frozen=True)
class ServiceSpec(EntrySpec):
    process: str
    host: str | None
    args: tuple[Any, ...]


@dataclass(frozen=True)
class HostSpec(EntrySpec):
    pass


@dataclass(frozen=True)
class PolicyCondition:
    field: str
    operator: str
    value: Any = None
    value_from: str | None = None


@dataclass(frozen=True)
class PolicySpec(EntrySpec):
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    effect: str
    conditions: tuple[PolicyCondition, ...]
    groups: tuple[str, ...]


CONDITION_OPERATORS = ("eq", "ne", "lt", "gt", "lte", "gte", "in", "nin", "exists", "nexists",
                       "contains", "ncontains", "matches", "nmatches")


# -- parsing ---------------------------------------------------------------------------------

def _reader(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> FieldReader:
    r = FieldReader(raw.data, entry_id=raw.id, namespace=raw.namespace, file=raw.file,
                    problems=problems, refs=refs)
    r.used.update(("name", "kind"))
    return r


def _common(r: FieldReader, raw: RawEntry) -> dict[str, Any]:
    return {"id": raw.id, "kind": raw.kind, "file": raw.file, "line": raw.line,
            "meta": r.mapping("meta"), "lifecycle": _lifecycle(r)}


def _lifecycle(r: FieldReader) -> Lifecycle:
    lc = r.sub("lifecycle")
    if lc is None:
        return Lifecycle()
    depends = lc.ref_list("depends_on", ("*",)) + lc.ref_list("requires", ("*",))
    restart = None
    rs = lc.sub("restart")
    if rs is not None:
        restart = RestartPolicy(
            max_attempts=rs.number("max_attempts", default=0, minimum=0),
            initial_delay=rs.duration("initial_delay", 1.0) or 0.0,
            max_delay=rs.duration("max_delay", 30.0) or 0.0,
        )
        rs.finish()
    security = None
    sec = lc.sub("security")
    if sec is not None:
        actor = None
        ac = sec.sub("actor")
        if ac is not None:
            actor_id = ac.text("id", required=True) or ""
            actor = Actor(actor_id, ac.mapping("meta"))
            ac.finish()
        security = SecurityContext(actor, tuple(sec.ref_list("policies", ("security.policy",), dependency=False)),
                                   tuple(sec.str_list("groups")))
        sec.finish()
    result = Lifecycle(
        auto_start=lc.flag("auto_start", False),
        depends_on=tuple(dict.fromkeys(depends)),
        stop_timeout=lc.duration("stop_timeout", DEFAULT_STOP_TIMEOUT) or 0.0,
        restart=restart,
        security=security,
    )
    lc.finish()
    return result


def _source(r: FieldReader, raw: RawEntry) -> LuaSource:
    value = r.data.get("source")
    text = r.text("source", required=True)
    if isinstance(value, SourceText):
        return LuaSource(str(value), value.path, value.line, value.inline)
    return LuaSource(text or "", raw.path, r.line("source"), True)


def _lua_code(r: FieldReader, raw: RawEntry, *, default_method: str | None = None) -> dict[str, Any]:
    imports: dict[str, str] = {}
    imp = r.sub("imports")
    if imp is not None:
        for alias in list(imp.data):
            target = imp.ref(str(alias), ("library.lua",))
            if target is not None:
                imports[str(alias)] = target
    modules = r.str_list("modules")
    known = set(LUA_MODULES) | set(STANDARD_TABLES)
    for i, name in enumerate(modules):
        if name not in known:
            r.problems.append(Problem(r.file, r.item_line("modules", i), f"entry {raw.id}: unknown module "
                                      f"'{name}' in 'modules'{suggest(name, known)} "
                                      f"(available: {', '.join(LUA_MODULES)})"))
    for alias in imports:
        if alias in known:
            r.problems.append(Problem(r.file, imp.line(alias) if imp else raw.line, f"entry {raw.id}: "
                                      f"import alias '{alias}' hides a module of the same name"))
    return {"source": _source(r, raw), "method": r.text("method", default=default_method),
            "modules": tuple(modules), "imports": imports}


def parse_driver(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    common = _common(r, raw)
    options = read_options(r, DRIVER_CATALOG[raw.kind].fields)
    r.finish()
    return DriverSpec(**common, options=options)


def parse_config(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    common = _common(r, raw)
    kind = CONFIG_KINDS[raw.kind]
    options = read_options(r, kind.fields)
    for group in kind.one_of:
        if not any(isinstance(r.data.get(key), Unresolved) or r.data.get(key) not in (None, "") for key in group):
            r.problem(None, f"needs {' or '.join(repr(k) for k in group)}")
    r.finish()
    return ConfigSpec(**common, options=options)


def _retry(r: FieldReader) -> RetryPolicy:
    rs = r.sub("retry")
    if rs is None:
        return RetryPolicy()
    d = RetryPolicy()
    values = {}
    for key in ("initial_delay", "max_delay"):
        value = rs.duration(key, getattr(d, key))
        if value is None or not math.isfinite(value) or value < 0:
            rs.problem(key, "must be a finite duration of 0 or more")
            value = getattr(d, key)
        values[key] = value
    for key, low, high in (("multiplier", 1.0, 100.0), ("jitter", 0.0, 1.0)):
        raw_value = rs._get(key, False)
        value = getattr(d, key)
        if raw_value is not None:
            if isinstance(raw_value, bool) or not isinstance(raw_value, (int, float)) \
                    or not low <= raw_value <= high:
                rs.problem(key, f"must be a number from {low:g} to {high:g}")
            else:
                value = float(raw_value)
        values[key] = value
    rs.finish()
    return RetryPolicy(**values)


def parse_queue(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    common = _common(r, raw)
    driver = r.ref("driver", DRIVER_KINDS, required=True) or ""
    dead_letter = None
    dl = r.sub("dead_letter")
    if dl is not None:
        dl_queue = dl.ref("queue", ("queue.queue",), required=True, dependency=False)
        max_attempts = dl.number("max_attempts", default=3, minimum=1)
        if dl_queue == raw.id:
            dl.problem("queue", "a queue cannot be its own dead-letter queue")
        dl.finish()
        if dl_queue:
            dead_letter = DeadLetter(dl_queue, max_attempts)
    driver_options = read_driver_options(r, "queue")
    spec = QueueSpec(
        **common, driver=driver,
        queue_name=r.text("queue_name", default=raw.name) or raw.name,
        codec=r.text("codec", default="json/plain", choices=CODECS) or "json/plain",
        options=r.mapping("options"), driver_options=driver_options, dead_letter=dead_letter,
        retry=_retry(r),
    )
    r.finish()
    return spec


def parse_consumer(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    spec = ConsumerSpec(
        **_common(r, raw),
        queue=r.ref("queue", ("queue.queue",), required=True) or "",
        func=r.ref("func", ("function.lua",), required=True) or "",
        concurrency=r.number("concurrency", default=1, maximum=MAX_CONCURRENCY, nonpositive_is_default=True),
        prefetch=r.number("prefetch", default=10, maximum=MAX_PREFETCH, nonpositive_is_default=True),
        auto_ack=r.flag("auto_ack", False),
        driver_options=read_driver_options(r, "consumer"),
        timeout=r.limit_duration("timeout"),
        memory_limit=r.limit_size("memory_limit"),
    )
    r.finish()
    return spec


def parse_function(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    spec = FunctionSpec(**_common(r, raw), **_lua_code(r, raw),
                        timeout=r.limit_duration("timeout"), memory_limit=r.limit_size("memory_limit"))
    r.finish()
    return spec


def parse_library(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    spec = LibrarySpec(**_common(r, raw), **_lua_code(r, raw))
    r.finish(allowed_extra=("method",))
    return spec


def parse_process(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    spec = ProcessSpec(**_common(r, raw), **_lua_code(r, raw, default_method="main"))
    r.finish()
    return spec


def parse_service(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    spec = ServiceSpec(**_common(r, raw),
                       process=r.ref("process", ("process.lua",), required=True) or "",
                       host=r.text("host"), args=tuple(r.items("args", max_values=MAX_ARGS_VALUES)))
    r.finish()
    return spec


def parse_host(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    common = _common(r, raw)
    # Accepted for compatibility with Wippy apps: its other fields configure Wippy's own host.
    return HostSpec(**common)


def parse_policy(raw: RawEntry, problems: list[Problem], refs: list[Ref]) -> EntrySpec:
    r = _reader(raw, problems, refs)
    common = _common(r, raw)
    groups = tuple(r.str_list("groups"))
    pol = r.sub("policy")
    if pol is None:
        r.problem(None, "missing required field 'policy'")
        r.finish()
        return PolicySpec(**common, actions=(), resources=(), effect="deny", conditions=(), groups=groups)
    actions = tuple(pol.str_list("actions", allow_single=True))
    resources = tuple(pol.str_list("resources", allow_single=True))
    if not actions:
        pol.problem(None, "missing required field 'policy.actions'")
    if not resources:
        pol.problem(None, "missing required field 'policy.resources'")
    effect = pol.text("effect", required=True, choices={"allow": "allow", "deny": "deny"}) or "deny"
    conditions = []
    cond_list = pol.data.get("conditions")
    for i, cond in enumerate(pol.items("conditions")):
        line = cond_list.line_of(i) if isinstance(cond_list, LineList) else pol.line("conditions")
        if not isinstance(cond, dict):
            problems.append(Problem(raw.file, line, f"entry {raw.id}: policy condition #{i + 1} must be a mapping"))
            continue
        op = cond.get("operator")
        fld = cond.get("field")
        bad = []
        if not isinstance(fld, str) or not fld:
            bad.append("'field' must be a non-empty string")
        if op not in CONDITION_OPERATORS:
            bad.append(f"'operator' must be one of {', '.join(CONDITION_OPERATORS)}")
        if "value" in cond and "value_from" in cond:
            bad.append("give either 'value' or 'value_from', not both")
        if op not in ("exists", "nexists") and "value" not in cond and "value_from" not in cond:
            bad.append("needs 'value' or 'value_from'")
        extra = set(cond) - {"field", "operator", "value", "value_from"}
        if extra:
            bad.append(f"unknown key(s) {', '.join(sorted(map(str, extra)))}")
        if bad:
            problems.append(Problem(raw.file, line, f"entry {raw.id}: policy condition #{i + 1}: " + "; ".join(bad)))
            continue
        conditions.append(PolicyCondition(str(fld), str(op), cond.get("value"), cond.get("value_from")))
    pol.finish()
    r.finish()
    return PolicySpec(**common, actions=actions, resources=resources, effect=effect,
                      conditions=tuple(conditions), groups=groups)


Parser = Callable[[RawEntry, list[Problem], list[Ref]], EntrySpec]

KIND_PARSERS: dict[str, Parser] = {
    **{kind: parse_driver for kind in DRIVER_CATALOG},
    **{kind: parse_config for kind in CONFIG_KINDS},
    "queue.queue": parse_queue,
    "queue.consumer": parse_consumer,
    "function.lua": parse_function,
    "library.lua": parse_library,
    "process.lua": parse_process,
    "process.service": parse_service,
    "process.host": parse_host,
    "security.policy": parse_policy,
}

SERVICE_KINDS = (*DRIVER_CATALOG, "queue.consumer", "process.service")
