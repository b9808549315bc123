"""Bad input at every door: each case must end in a clear error, nothing lost, nothing crashed.

Doors covered here (what other test files already cover is not repeated):

* the queue codecs (JsonCodec, MsgpackCodec), fuzzed with Hypothesis: round trips, decoding
  arbitrary bytes (a value or ValueError, never anything else), encoding values they cannot
  carry (InvalidMessage);
* the YAML loader (`load_registry`), fuzzed with arbitrary text, arbitrary bytes and random
  YAML-shaped definition files: it never raises, and every problem has a file, a line >= 0
  and a message; plus a huge file, deeply nested documents and alias bombs;
* `App.publish` with values and headers it must refuse, and a 10 MB body that must arrive
  intact;
* bodies a handler cannot receive (msgpack extension types, values Lua cannot hold, nesting
  too deep): dead-lettered, never dropped or stuck in flight;
* handlers returning odd values (SPEC §6 result mapping), with the worker going on after;
* `runtime run --publish` with odd JSONL files;
* odd queue IDs given to Lua's `queue.publish` / `queue.info`.

Waiting is done with `app.wait_idle()` (bounded), never with a sleep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, drain, take, write_app
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime import App
from runtime.errors import ConfigError, InvalidMessage, Problem, QueueNotFound, RuntimeHostError
from runtime.queue.codecs import JsonCodec, MsgpackCodec
from runtime.queue.message import Message
from runtime.registry import load_registry
from runtime.registry.kinds import KIND_PARSERS

pytestmark = pytest.mark.timeout(30)

IDLE = 10.0  # seconds: bound for wait_idle; every test here finishes far sooner
MODULES = ["json", "logger", "queue", "time"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================================
# helpers
# ============================================================================================

PRELUDE = """\
local queue = require("queue")
local json = require("json")
local function report(t)
    local ok, err = queue.publish("results", t)
    if not ok then error("report failed: " .. tostring(err)) end
end
"""


def build_app(root: Path, handler: str, *, codec: str = "json", dead_letter: dict[str, Any] | None = None,
              consumer: dict[str, Any] | None = None, dlq_codec: str = "json") -> App:
    """Queues t:jobs (consumed by t:worker running t:handler), t:results and t:dlq (unconsumed)."""
    jobs: dict[str, Any] = {"name": "jobs", "kind": "queue.queue", "driver": "mem", "codec": codec}
    if dead_letter is not None:
        jobs["dead_letter"] = dead_letter
    doc = {
        "version": "1.0",
        "namespace": "t",
        "entries": [
            {"name": "mem", "kind": "queue.driver.memory", "lifecycle": {"auto_start": True}},
            jobs,
            {"name": "results", "kind": "queue.queue", "driver": "mem"},
            {"name": "dlq", "kind": "queue.queue", "driver": "mem", "codec": dlq_codec},
            {"name": "handler", "kind": "function.lua", "source": "file://handler.lua", "modules": MODULES},
            {"name": "worker", "kind": "queue.consumer", "queue": "jobs", "func": "handler", "concurrency": 1,
             **(consumer or {}), "lifecycle": {"auto_start": True}},
        ],
    }
    write_app(root, {"app.yaml": yaml.safe_dump(doc, sort_keys=False),
                     "handler.lua": PRELUDE + textwrap.dedent(handler)})
    return App.load(root)


def results(app: App) -> list[Any]:
    return [value for _, value in drain(app, "t:results")]


def worker_stats(app: App) -> dict[str, int]:
    return app.stats()["consumers"]["t:worker"]  # type: ignore[no-any-return]


def queue_stats(app: App, queue_id: str = "t:jobs") -> dict[str, int]:
    return app.stats()["queues"][queue_id]  # type: ignore[no-any-return]


def host_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records of the host (an internal error, a message that could not be returned)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("runtime") and r.name != "runtime.lua"]


def check_problems(problems: list[Problem], app_yaml_text: str | None = None, app_yaml: str = "") -> None:
    """Every problem is located (a file, a line >= 0) and says something."""
    for p in problems:
        assert isinstance(p, Problem), p
        assert isinstance(p.file, str) and p.file, p
        assert isinstance(p.line, int) and not isinstance(p.line, bool) and p.line >= 0, p
        assert isinstance(p.message, str) and p.message.strip(), p
        assert str(p)
        if app_yaml_text is not None and p.file == app_yaml:
            # YAML also breaks lines at \r, U+0085, U+2028 and U+2029; +1 for the end-of-file mark.
            breaks = len(re.findall("\r\n|[\n\r\x85\u2028\u2029]", app_yaml_text))
            assert p.line <= breaks + 2, f"line {p.line} is past the end of the file: {p}"


# ============================================================================================
# 1. codecs
# ============================================================================================

_json_scalars = (st.none() | st.booleans() | st.integers()
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text())
json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
_msgpack_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                    | st.floats(allow_nan=False) | st.text() | st.binary(max_size=20))
msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)

CODECS = {"json": JsonCodec(), "msgpack": MsgpackCodec()}


@FUZZ
@given(value=json_values)
def test_json_codec_round_trip(value: Any) -> None:
    codec = CODECS["json"]
    body = codec.encode(value)
    assert isinstance(body, bytes)
    assert codec.decode(body) == value


@FUZZ
@given(value=msgpack_values)
def test_msgpack_codec_round_trip(value: Any) -> None:
    codec = CODECS["msgpack"]
    body = codec.encode(value)
    assert isinstance(body, bytes)
    assert codec.decode(body) == value


def _decode_is_value_or_value_error(codec_name: str, body: bytes) -> None:
    try:
        CODECS[codec_name].decode(body)
    except ValueError as exc:
        assert str(exc), "a decode error must say what is wrong"
    # Anything else (RecursionError, TypeError, ...) propagates and fails the test.


@pytest.mark.parametrize("codec_name", list(CODECS))
@FUZZ
@given(body=st.binary(max_size=200))
@example(body=b"")
@example(body=b"\xff\xfe\x00")
@example(body=b"\xc1")  # the byte msgpack never uses
@example(body=b"\xd6\xff\x00\x00\x00\x01")  # msgpack timestamp extension
@example(body=b"\x81\x91\x01\x02")  # msgpack map with a list as key
@example(body=b"\xdd\xff\xff\xff\xff")  # msgpack array claiming 4G items
def test_codec_decode_of_arbitrary_bytes_is_a_value_or_value_error(codec_name: str, body: bytes) -> None:
    _decode_is_value_or_value_error(codec_name, body)


@pytest.mark.parametrize("codec_name", list(CODECS))
@FUZZ
@given(text=st.text(alphabet='{}[]":,-0123456789.eE tfnrul\\ua\n', max_size=80))
def test_codec_decode_of_json_shaped_garbage_is_a_value_or_value_error(codec_name: str, text: str) -> None:
    _decode_is_value_or_value_error(codec_name, text.encode())


@pytest.mark.parametrize("codec_name", list(CODECS))
@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"\x91" * 100_000 + b"\xc0",  # msgpack: 100k nested one-item arrays
    b"1" * 5000,  # an integer longer than Python converts by default
], ids=["json-deep-array", "json-deep-object", "msgpack-deep-array", "huge-int-literal"])
def test_codec_decode_of_deeply_nested_or_huge_input_is_a_value_error(codec_name: str, body: bytes) -> None:
    _decode_is_value_or_value_error(codec_name, body)


class _Opaque:
    pass


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep(n: int) -> list[Any]:
    out: list[Any] = []
    cur = out
    for _ in range(n):
        nxt: list[Any] = []
        cur.append(nxt)
        cur = nxt
    return out


# Values neither codec can carry unchanged, and values only one of them refuses.
_UNSUPPORTED_BOTH = st.sampled_from([
    "object", "set", "frozenset", "complex", "surrogate-str", "surrogate-key", "function", "type",
]).map(lambda name: {
    "object": _Opaque(), "set": {1, 2}, "frozenset": frozenset({"a"}), "complex": 1 + 2j,
    "surrogate-str": "bad \ud800 text", "surrogate-key": {"\udfff": 1}, "function": len, "type": int,
}[name])
_UNSUPPORTED = {
    "json": _UNSUPPORTED_BOTH | st.sampled_from([math.nan, math.inf, -math.inf, b"bytes", bytearray(b"x"),
                                                 {(1, 2): "tuple key"}]),
    "msgpack": _UNSUPPORTED_BOTH | st.sampled_from([2**64, -(2**63) - 1, 10**30]),
}


def _embed(bad: Any) -> st.SearchStrategy[Any]:
    """`bad` alone, or inside lists/dicts of ordinary values."""
    return st.recursive(
        st.just(bad),
        lambda inner: st.tuples(st.lists(json_values, max_size=2), inner).map(lambda t: [*t[0], t[1]])
        | st.tuples(st.text(max_size=5), inner, st.dictionaries(st.text(max_size=5), _json_scalars, max_size=2))
        .map(lambda t: {**t[2], t[0]: t[1]}),
        max_leaves=4,
    )


@pytest.mark.parametrize("codec_name", list(CODECS))
@FUZZ
@given(data=st.data())
def test_codec_encode_of_unsupported_values_raises_invalid_message(codec_name: str, data: st.DataObject) -> None:
    bad = data.draw(_UNSUPPORTED[codec_name])
    value = data.draw(_embed(bad))
    with pytest.raises(InvalidMessage) as info:
        CODECS[codec_name].encode(value)
    assert isinstance(info.value, RuntimeHostError)
    assert str(info.value)


@pytest.mark.parametrize("codec_name", list(CODECS))
@pytest.mark.parametrize("make", [_circular, lambda: _deep(100_000), lambda: {"a": _deep(100_000)}],
                         ids=["circular", "deep-list", "deep-in-dict"])
def test_codec_encode_of_circular_or_deeply_nested_values_raises_invalid_message(
        codec_name: str, make: Callable[[], Any]) -> None:
    with pytest.raises(InvalidMessage):
        CODECS[codec_name].encode(make())


# ============================================================================================
# 2. the YAML loader
# ============================================================================================

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One application folder reused by every fuzz example (app.yaml is rewritten each time)."""
    root = tmp_path_factory.mktemp("fuzzapp")
    (root / "h.lua").write_text("return function(body) return body end\n")
    (root / "sub").mkdir()
    return root


def _load_text_or_bytes(root: Path, content: str | bytes) -> list[Problem]:
    path = root / "app.yaml"
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    else:
        path.write_bytes(content)
    registry, problems = load_registry(root)  # must never raise
    check_problems(problems)
    return problems


@FUZZ
@given(text=st.text(max_size=300))
@example(text="")
@example(text="\ufeff")
@example(text="---\n...\n---\n")
@example(text="namespace: a\nentries: [1, [2], {}, null, {name: x}]\n")
@example(text="namespace: [a]\n")
@example(text="namespace: 'a:b'\n")
@example(text="namespace: a\nentries: {name: x}\n")
@example(text="namespace: a\n? [complex, key]\n: 1\n")
@example(text="namespace: a\nentries:\n  - {name: x, kind: queue.queue, driver: *nope}\n")
@example(text="!!python/object:os.system ls\n")
@example(text="namespace: !!binary aGVsbG8=\n")
@example(text="namespace: a\nentries:\n  - name: 1\n    kind: 2\n")
@example(text="a: b\n\tc: d\n")
def test_loader_never_raises_on_arbitrary_text(fuzz_dir: Path, text: str) -> None:
    _load_text_or_bytes(fuzz_dir, text)


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"\xef\xbb\xbfnamespace: a\n")
@example(raw=b"\xff\xfen\x00a\x00")  # UTF-16 with a BOM
@example(raw=b"namespace: a\x00\n")
@example(raw=b"namespace: caf\xe9\n")
def test_loader_never_raises_on_arbitrary_bytes(fuzz_dir: Path, raw: bytes) -> None:
    _load_text_or_bytes(fuzz_dir, raw)


_KINDS = [*KIND_PARSERS, "queue.driver.redis", "queue.consumr", "", "function", "kind"]
_NAMES = ["q", "d", "f", "c", "p", "lib", "svc", "pol", "jobs", "a:b", "", " ", "x.y"]
_SPECIAL_STRINGS = [
    "file://h.lua", "file://../outside.lua", "file://", "file://app.yaml", "file://sub", "file:///etc/hostname",
    "file://missing.lua", "${env:HOME}", "${env:RUNTIME_BAD_INPUT_UNSET}", "${env:RUNTIME_BAD_INPUT_UNSET|4}",
    "${env:", "${env:1bad}", "${env:X|${env:Y}}", "10s", "-1s", "1m30s", "500ms", "10 parsecs", "64MB", "1e400",
    "json", "msgpack", "application/msgpack", "xml", "t:q", ":", "main", "return function() end", "return 1 +",
    "\x00", "\u2028", "x" * 200,
]
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats() | st.text(max_size=10) | st.sampled_from(_SPECIAL_STRINGS) | st.sampled_from(_NAMES))
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["max_length", "queue", "max_attempts", "memory",
                                                               "auto_start", "actor", "id", "actions"]),
                      children, max_size=4),
    max_leaves=12,
)
_refs = st.sampled_from(_NAMES) | st.sampled_from(["t:q", "t:d", "t:f", "other:x"]) | _values
_lifecycle = st.fixed_dictionaries({}, optional={
    "auto_start": st.booleans() | _scalars,
    "depends_on": st.lists(_refs, max_size=3) | _refs,
    "requires": st.lists(_refs, max_size=3),
    "stop_timeout": _scalars,
    "restart": st.fixed_dictionaries({}, optional={k: _scalars for k in ("max_attempts", "initial_delay",
                                                                         "max_delay")}) | _values,
    "security": st.fixed_dictionaries({}, optional={"actor": _values, "policies": _values, "groups": _values})
    | _values,
}) | _values
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "driver": _refs, "queue": _refs, "func": _refs, "process": _refs, "codec": _scalars,
    "queue_name": _scalars, "options": _values, "source": st.sampled_from(_SPECIAL_STRINGS) | _values,
    "method": _scalars, "modules": st.lists(st.sampled_from([*MODULES, "jsn", "os", "string"]) | _scalars,
                                            max_size=3) | _values,
    "imports": st.dictionaries(st.text(max_size=5), _refs, max_size=2) | _values,
    "concurrency": _scalars, "prefetch": _scalars, "auto_ack": _scalars, "timeout": _scalars,
    "memory_limit": _scalars, "host": _scalars, "args": _values,
    "driver_options": st.fixed_dictionaries({"memory": st.fixed_dictionaries({"max_length": _scalars})}) | _values,
    "dead_letter": st.fixed_dictionaries({}, optional={"queue": _refs, "max_attempts": _scalars}) | _values,
    "policy": st.fixed_dictionaries({}, optional={k: _values for k in ("actions", "resources", "effect",
                                                                       "conditions")}) | _values,
    "groups": _values, "meta": _values, "lifecycle": _lifecycle, "typo_field": _values,
    "path": _scalars, "synchronous": _scalars, "visibility_timeout": _scalars, "poll_interval": _scalars,
    "busy_timeout": _scalars, "addrs": _values, "password": _scalars, "db": _scalars, "claim_min_idle": _scalars,
    **{k: _scalars for k in (
        "url", "vhost", "connection_name", "auth_mechanism", "heartbeat", "connection_timeout", "reconnect_delay",
        "reconnect_max_delay", "default_message_ttl", "default_queue_ttl", "default_queue_expiry",
        "prefetch_count", "frame_size", "channel_max", "config", "endpoint", "message_retention_period",
        "default_delay_seconds", "use_fips", "region", "access_key_id", "secret_access_key", "session_token",
        "region_env", "access_key_id_env")},
    "tls": st.fixed_dictionaries({}, optional={k: _scalars for k in ("enabled", "cert", "key", "ca", "cert_env",
                                                                     "server_name")}) | _values,
    "retry": st.fixed_dictionaries({}, optional={
        k: _scalars for k in ("initial_delay", "max_delay", "multiplier", "jitter")}) | _values,
}
_VALID_NAMES = ["q", "d", "f", "c", "p", "lib", "svc", "pol", "jobs", "x.y"]
_KIND_FIELDS = {
    "queue.driver.memory": ["lifecycle"],
    "queue.driver.sqlite": ["lifecycle", "path", "synchronous", "visibility_timeout", "poll_interval",
                            "busy_timeout"],
    "queue.driver.redis": ["lifecycle", "url", "addrs", "password", "db", "claim_min_idle", "tls"],
    "queue.driver.amqp": ["lifecycle", "url", "vhost", "connection_name", "auth_mechanism", "heartbeat",
                          "connection_timeout", "reconnect_delay", "reconnect_max_delay", "default_message_ttl",
                          "default_queue_ttl", "default_queue_expiry", "prefetch_count", "frame_size",
                          "channel_max", "tls"],
    "queue.driver.sqs": ["lifecycle", "config", "endpoint", "message_retention_period", "default_delay_seconds",
                         "use_fips"],
    "config.aws": ["region", "access_key_id", "secret_access_key", "session_token", "region_env",
                   "access_key_id_env"],
    "queue.queue": ["driver", "queue_name", "codec", "options", "driver_options", "dead_letter", "retry"],
    "queue.consumer": ["queue", "func", "concurrency", "prefetch", "auto_ack", "driver_options", "lifecycle",
                       "timeout", "memory_limit"],
    "function.lua": ["source", "method", "modules", "imports", "timeout", "memory_limit"],
    "library.lua": ["source", "modules", "imports"],
    "process.lua": ["source", "method", "modules", "imports"],
    "process.service": ["process", "host", "args", "lifecycle"],
    "process.host": ["lifecycle"],
    "security.policy": ["policy", "groups"],
}
assert set(_KIND_FIELDS) == set(KIND_PARSERS), "a new kind: add its fields here"


def _entry_of_kind(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """An entry of a known kind with a random subset of its own fields (rarely a stray one)."""
    fields = {f: _FIELD_VALUES[f] for f in [*_KIND_FIELDS[kind], "meta"]}
    return st.fixed_dictionaries({"name": st.sampled_from(_VALID_NAMES), "kind": st.just(kind)}, optional=fields)


_good_entry = st.sampled_from(sorted(KIND_PARSERS)).flatmap(_entry_of_kind)
_entry = _good_entry | st.fixed_dictionaries(
    {"name": st.sampled_from(_NAMES) | _scalars, "kind": st.sampled_from(_KINDS) | _scalars},
    optional=_FIELD_VALUES,
)
# Mostly well-formed files (a namespace and entries of known kinds, so the kind parsers and the
# cross-entry checks see random field values), and some with anything at the top.
_document = st.fixed_dictionaries(
    {"namespace": st.sampled_from(["t", "app.queue"]), "entries": st.lists(_entry, min_size=1, max_size=6)},
    optional={"version": _scalars, "meta": _values},
) | st.fixed_dictionaries({}, optional={
    "version": _scalars,
    "namespace": st.sampled_from(["t", "app.queue", "", "a:b", "other"]) | _scalars,
    "meta": _values,
    "entries": st.lists(_entry | _values, max_size=5) | _values,
    "extra": _values,
})


@FUZZ
@given(doc=_document, data=st.data())
def test_loader_never_raises_on_random_definition_documents(fuzz_dir: Path, doc: dict[str, Any],
                                                             data: st.DataObject) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if data.draw(st.booleans(), label="truncate"):
        text = text[:data.draw(st.integers(0, len(text)), label="cut")]
    (fuzz_dir / "app.yaml").write_text(text, encoding="utf-8")
    registry, problems = load_registry(fuzz_dir)
    check_problems(problems, text, str(fuzz_dir / "app.yaml"))
    # The whole load (with the Lua syntax check) ends in an App or a ConfigError, nothing else.
    try:
        App.load(fuzz_dir)
    except ConfigError as err:
        assert err.problems
        check_problems(err.problems)


# -- sizes, depth, aliases --------------------------------------------------------------------

_GOOD_FILE = """\
namespace: t
entries:
  - name: mem
    kind: queue.driver.memory
"""


def test_definition_file_over_8_mib_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("w") as fh:
        fh.write("namespace: big\nentries:\n")
        line = "  - {name: e%07d, kind: queue.driver.memory}\n"
        for i in range((9 * 1024 * 1024) // len(line % 0) + 1):
            fh.write(line % i)
    assert big.stat().st_size > 8 * 1024 * 1024
    (tmp_path / "good.yaml").write_text(_GOOD_FILE)
    (tmp_path / "other.yaml").write_text("namespace: o\nentries:\n  - name: x\n    kind: queue.consumr\n")
    registry, problems = load_registry(tmp_path)
    check_problems(problems)
    too_big = [p for p in problems if p.file.endswith("big.yaml")]
    assert len(too_big) == 1 and "too large" in too_big[0].message and "8 MiB" in too_big[0].message
    # The other files were still read: every problem at once, and the good entries exist.
    assert any(p.file.endswith("other.yaml") and "unknown kind" in p.message for p in problems)
    assert "t:mem" in registry.entries
    with pytest.raises(ConfigError) as info:
        App.load(tmp_path)
    assert any("too large" in p.message for p in info.value.problems)


def test_included_file_over_8_mib_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: file://big.lua
    """})
    with (tmp_path / "big.lua").open("w") as fh:
        fh.write("return function() end\n")
        fh.write(("-- " + "x" * 1020 + "\n") * (9 * 1024))
    registry, problems = load_registry(tmp_path)
    check_problems(problems)
    assert [(p.line, "larger than 8 MiB" in p.message) for p in problems] == [(5, True)], problems


def _nest(style: str, depth: int) -> str:
    if style == "flow-list":
        return "[" * depth + "1" + "]" * depth
    if style == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    raise AssertionError(style)


def _deep_document(where: str, style: str, depth: int) -> str:
    if style == "block-map":
        body = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "leaf: 1\n"
        nested = "\n" + textwrap.indent(body, "      ")
    elif style == "block-list":
        nested = "\n" + "".join("      " + "  " * i + "-\n" for i in range(depth - 1)) + \
            "      " + "  " * (depth - 1) + "- 1\n"
    else:
        nested = " " + _nest(style, depth) + "\n"
    if where == "top":
        return nested.lstrip() if style.startswith("flow") else textwrap.dedent(nested.lstrip("\n"))
    return "namespace: t\nentries:\n  - name: mem\n    kind: queue.driver.memory\n    meta:" + nested


@pytest.mark.parametrize("where", ["top", "entry-meta"])
@pytest.mark.parametrize("style", ["flow-list", "flow-map", "block-map", "block-list"])
@pytest.mark.parametrize("depth", [50, 300, 600, 990, 5000])
def test_deeply_nested_yaml_is_loaded_or_reported_never_a_crash(tmp_path: Path, where: str, style: str,
                                                                  depth: int) -> None:
    text = _deep_document(where, style, depth)
    (tmp_path / "app.yaml").write_text(text)
    registry, problems = load_registry(tmp_path)  # RecursionError here is the bug
    check_problems(problems, text, str(tmp_path / "app.yaml"))
    if where == "top":
        assert problems, "a top-level list or deep mapping is not a definition file"
    try:
        App.load(tmp_path)
    except ConfigError as err:
        check_problems(err.problems)


def _billion_laughs(indent: str, levels: int = 9) -> str:
    """The classic alias bomb: 9 levels of 9 references, 9**9 strings once expanded."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


_BOMBS = {
    "top-level-key": lambda: "namespace: t\nbomb:\n" + _billion_laughs("  ") + "entries: []\n",
    "file-meta": lambda: "namespace: t\nmeta:\n" + _billion_laughs("  ")
    + "entries:\n  - name: mem\n    kind: queue.driver.memory\n",
    "entry-meta": lambda: "namespace: t\nentries:\n  - name: mem\n    kind: queue.driver.memory\n    meta:\n"
    + _billion_laughs("      "),
    "queue-options": lambda: "namespace: t\nentries:\n  - name: mem\n    kind: queue.driver.memory\n"
    "  - name: q\n    kind: queue.queue\n    driver: mem\n    options:\n" + _billion_laughs("      "),
    "service-args": lambda: "namespace: t\nentries:\n  - name: p\n    kind: process.lua\n"
    "    source: 'return {main = function() end}'\n  - name: s\n    kind: process.service\n    process: p\n"
    "    x_bomb:\n" + _billion_laughs("      ") + "    args: [*l8, *l8]\n",
    "entries-alias": lambda: "bomb:\n" + _billion_laughs("  ") + "namespace: t\nentries: *l8\n",
}

_BOMB_SCRIPT = """
import json, resource, sys
limit = 1536 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pathlib import Path
from runtime.registry import load_registry
registry, problems = load_registry(Path(sys.argv[1]))
print(json.dumps({"entries": sorted(registry.entries),
                  "problems": [[p.file, p.line, p.message] for p in problems]}))
"""


@pytest.mark.parametrize("where", list(_BOMBS))
def test_yaml_alias_bomb_does_not_hang_or_blow_memory(tmp_path: Path, where: str) -> None:
    """Run in a child process with a 1.5 GiB address-space limit and a 3 s budget, so a
    loader that expands the aliases fails this test instead of the machine."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.yaml").write_text(_BOMBS[where]())
    try:
        proc = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, str(app)], capture_output=True, text=True,
                              timeout=3, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_registry did not finish within 3 s on an alias bomb in {where} (it expands the aliases)")
    assert proc.returncode == 0, f"load_registry crashed on an alias bomb in {where}:\n{proc.stderr[-2000:]}"
    out = json.loads(proc.stdout)
    check_problems([Problem(f, ln, m) for f, ln, m in out["problems"]])


# ============================================================================================
# 3. App.publish with odd values
# ============================================================================================

REPORT_BODY = """
return function(body)
    report({ n = body.n })
end
"""


def _assert_still_works(app: App, n: int = 1) -> None:
    """Nothing was enqueued by the refused publishes, and a normal message is processed."""
    assert queue_stats(app)["message_count"] == 0
    app.publish("t:jobs", {"n": n})
    assert app.wait_idle(IDLE)
    assert results(app) == [{"n": n}]
    assert worker_stats(app)["acked"] == 1 and worker_stats(app)["nacked"] == 0


@pytest.mark.parametrize("data", [
    math.nan, math.inf, -math.inf, {"n": math.nan}, [1, math.inf], {"a": {"b": [-math.inf]}},
], ids=["nan", "inf", "-inf", "nan-in-object", "inf-in-array", "-inf-nested"])
def test_publish_nan_or_infinity_to_a_json_queue_is_refused(tmp_path: Path, start: Callable[[App], App],
                                                             data: Any) -> None:
    app = start(build_app(tmp_path, REPORT_BODY))
    with pytest.raises(InvalidMessage) as info:
        app.publish("t:jobs", data)
    assert "JSON" in str(info.value)
    _assert_still_works(app)


@pytest.mark.parametrize("headers, phrase", [
    ({1: "a"}, "must be strings"),
    ({None: "a"}, "must be strings"),
    ({b"k": "a"}, "must be strings"),
    ({("a", "b"): "a"}, "must be strings"),
    ({"h": [1, 2]}, "string, number or boolean"),
    ({"h": ["a"]}, "string, number or boolean"),
    ({"h": {"a": 1}}, "string, number or boolean"),
    ({"h": None}, "string, number or boolean"),
    ({"h": b"bytes"}, "string, number or boolean"),
    ({"x_dead_letter_reason": "forged"}, "reserved"),
    ({"x_attempts": 1}, "reserved"),
    ({"x_original_queue": "t:dlq"}, "reserved"),
    ({"x_": "a"}, "reserved"),
    ({"X_attempts": 1}, "reserved"),
    ({"X_Dead_Letter_Reason": "forged"}, "reserved"),
    ({"h": math.nan}, "'h'"),
    ({"h": math.inf}, "'h'"),
    ({"h": "bad \ud800"}, ""),
    ({"bad \udfff": "a"}, ""),
    ([("h", "a")], ""),
    ("h=a", ""),
], ids=["int-key", "none-key", "bytes-key", "tuple-key", "list-value", "str-list-value", "dict-value",
        "none-value", "bytes-value", "x_dead_letter_reason", "x_attempts", "x_original_queue", "x_",
        "X_attempts", "X_mixed_case", "nan-value", "inf-value", "surrogate-value", "surrogate-key", "list-of-pairs",
        "string"])
def test_publish_with_bad_headers_is_refused(tmp_path: Path, start: Callable[[App], App], headers: Any,
                                             phrase: str) -> None:
    """Host-side headers follow the rules Lua's queue.publish enforces (SPEC §5): string
    names, scalar values (finite numbers, valid text, as the header travels as JSON), no
    reserved `x_` names. Anything else is InvalidMessage, and nothing is enqueued."""
    app = start(build_app(tmp_path, REPORT_BODY))
    with pytest.raises(InvalidMessage) as info:
        app.publish("t:jobs", {"n": 0}, headers)
    assert phrase in str(info.value)
    _assert_still_works(app)


@pytest.mark.parametrize("headers", [
    {"empty": ""},
    {"unicode ✓ key": "välue ✓ \u2028"},
    {"long": "v" * 100_000},
    {"big": 10**30},
    {"tiny": 5e-324, "max": 1.7976931348623157e308, "neg_zero": -0.0},
    {"flag": False, "n": 0},
    {"Xu_upper": "not reserved: the rule is the x_ prefix, in any case"},
    {"a" * 1000: 1},
], ids=["empty-value", "unicode", "long-value", "big-int", "float-extremes", "false-and-zero", "X_upper",
        "long-key"])
def test_odd_but_valid_headers_reach_the_handler(tmp_path: Path, start: Callable[[App], App],
                                                 caplog: pytest.LogCaptureFixture, headers: dict[str, Any]) -> None:
    """Whatever App.publish accepts as a header, the handler can read with msg:headers()."""
    caplog.set_level(logging.WARNING)
    app = start(build_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            local hs, err = msg:headers()
            if hs == nil then return nil, err end
            hs.timestamp = nil
            report(hs)
        end
    """))
    app.publish("t:jobs", {"n": 1}, headers)
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen.keys() == headers.keys()
    for key, value in headers.items():
        assert seen[key] == value or (isinstance(value, (int, float)) and math.isclose(seen[key], value)), key
    assert (worker_stats(app)["acked"], worker_stats(app)["nacked"]) == (1, 0)
    assert host_errors(caplog) == []


@pytest.mark.parametrize("queue_id", ["", ":", "::", "a:b:c", "t:", ":jobs", "t:jobs:x", " t:jobs", "T:JOBS",
                                      "t:jobs\x00", "q" * 100_000],
                         ids=["empty", "colon", "two-colons", "a:b:c", "no-name", "no-namespace", "extra-part",
                              "leading-space", "upper-case", "nul", "very-long"])
def test_publish_to_odd_unknown_queue_ids_is_queue_not_found(tmp_path: Path, start: Callable[[App], App],
                                                             queue_id: str) -> None:
    app = start(build_app(tmp_path, REPORT_BODY))
    with pytest.raises(QueueNotFound) as info:
        app.publish(queue_id, {"n": 0})
    assert "not found" in str(info.value)
    _assert_still_works(app)


BIG = 10 * 1024 * 1024


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec, as_bytes", [("json", False), ("msgpack", False), ("msgpack", True)],
                         ids=["json", "msgpack-str", "msgpack-bin"])
def test_ten_megabyte_body_goes_through_a_queue_intact(tmp_path: Path, start: Callable[[App], App], codec: str,
                                                      as_bytes: bool) -> None:
    app = start(build_app(tmp_path, """
        return function(body)
            local blob = body.blob
            local n_x = select(2, blob:gsub("x", "x"))
            report({ len = #blob, head = blob:sub(1, 4), tail = blob:sub(-4), n_x = n_x })
        end
    """, codec=codec))
    blob: str | bytes = "head" + "x" * (BIG - 8) + "tail"
    if as_bytes:
        blob = blob.encode()
    app.publish("t:jobs", {"blob": blob})
    assert app.wait_idle(IDLE * 3)
    bound = app.router.queues["t:results"]
    [delivery] = take(bound, 1, 1)
    seen = bound.codec.decode(delivery.message.body)
    assert seen == {"len": BIG, "head": "head", "tail": "tail", "n_x": BIG - 8}
    stats = worker_stats(app)
    assert (stats["acked"], stats["nacked"]) == (1, 0)
    assert queue_stats(app)["message_count"] == 0


@pytest.mark.parametrize("codec, dlq_codec, raw, phrase", [
    ("msgpack", "json", b"\xd6\xff\x00\x00\x00\x01", "Timestamp"),
    ("msgpack", "json", b"\xd4\x01\x00", "ExtType"),
    ("msgpack", "json", b"\x91" * 300 + b"\xc0", "nested"),
    ("msgpack", "json", b"\xcf\x80\x00\x00\x00\x00\x00\x00\x00", "too large"),
    ("msgpack", "json", b"\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x01", "float"),
    ("json", "json", b"[" * 100_000 + b"]" * 100_000, "nesting too deep"),
    ("json", "msgpack", b"[" * 100_000 + b"]" * 100_000, "nesting too deep"),
    ("json", "msgpack", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nesting too deep"),
], ids=["msgpack-timestamp", "msgpack-ext", "msgpack-300-deep", "msgpack-uint64",
        "msgpack-nan-key", "json-deep", "json-deep-to-msgpack-dlq", "json-deep-object-to-msgpack-dlq"])
def test_body_the_handler_cannot_receive_is_dead_lettered_not_lost(
        tmp_path: Path, start: Callable[[App], App], caplog: pytest.LogCaptureFixture, codec: str, dlq_codec: str,
        raw: bytes, phrase: str) -> None:
    """A body that decodes in Python but cannot be handed to Lua (an extension type, a bytes
    key, a number Lua cannot hold, too deep) or that Lua refuses, is a failed delivery (SPEC
    §2): dead-lettered with the reason, also when the dead-letter queue has another codec.
    Never dropped, never stuck in flight."""
    caplog.set_level(logging.WARNING)
    app = start(build_app(tmp_path, """
        return function(body)
            report({ called = true })
        end
    """, codec=codec, dlq_codec=dlq_codec, dead_letter={"queue": "dlq", "max_attempts": 1}))
    bound = app.router.queues["t:jobs"]
    bad = Message.new(raw, {"trace": "x"})
    bound.driver.publish(bound.name, [bad])
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(5), f"not idle (a message is stuck): {app.stats()}"
    assert results(app) == [{"called": True}], "only the good message reaches the handler"
    dl = app.router.queues["t:dlq"]
    [delivery] = take(dl, 10)
    dead = delivery.message
    assert dead.id == bad.id and dead.headers["trace"] == "x" and dead.headers["x_attempts"] == 1
    assert phrase in str(dead.headers["x_dead_letter_reason"]), dead.headers
    stats = worker_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"]) == (1, 0, 1)
    assert queue_stats(app) == {"ready": 0, "in_flight": 0, "message_count": 0, "delayed": 0, "consumer_count": 1}
    assert host_errors(caplog) == []


# ============================================================================================
# 4. handlers returning odd values (SPEC §6)
# ============================================================================================

HOSTILE = 'setmetatable({}, {__tostring = function() error("x") end})'
ODD_ACK = {
    "table": "return { a = 1, { 2, { 3 } } }",
    "coroutine": "return coroutine.create(function() end)",
    "function": "return function() end",
    "hostile-tostring-table": f"return {HOSTILE}",
    "hostile-index-table": 'return setmetatable({}, {__index = function() error("trap") end})',
    "locked-metatable": 'return setmetatable({}, {__metatable = false})',
    "nan": "return 0/0",
    "error-value-first": 'return errors.new("first value only")',
    "nil-nil": "return nil, nil",
    "big-string": 'return string.rep("x", 1000000)',
    "invalid-utf8": 'return "\\255\\254"',
    "true-nil-more": "return true, nil, 3",
}
ODD_NACK = {
    "many-values": "return 1, 2, 3, 4, 5",
    "nil-plain-table": "return nil, {}",
    "nil-hostile-tostring": f"return nil, {HOSTILE}",
    "nil-tostring-not-a-string": "return nil, setmetatable({}, {__tostring = function() return {} end})",
    "nil-false": "return nil, false",
    "nil-function": "return nil, function() end",
    "nil-coroutine": "return nil, coroutine.create(function() end)",
    "nil-invalid-utf8": 'return nil, "bad \\255 reason"',
    "nil-huge-reason": 'return nil, string.rep("r", 200000)',
    "false-table": "return false, {}",
    "raise-hostile-tostring": f"error({HOSTILE})",
    "raise-nil": "error(nil)",
    "raise-coroutine": "error(coroutine.create(function() end))",
    "raise-function": "error(function() end)",
    "raise-huge": 'error(string.rep("e", 200000))',
}
ODD_HANDLER = """
return function(body)
    local msg = queue.message()
    if body.odd and msg:attempt() == 1 then
        {odd}
    end
    report({{ n = body.n, attempt = msg:attempt() }})
end
"""


@pytest.mark.parametrize("odd, acked", [(v, True) for v in ODD_ACK.values()]
                         + [(v, False) for v in ODD_NACK.values()],
                         ids=[f"ack-{k}" for k in ODD_ACK] + [f"nack-{k}" for k in ODD_NACK])
def test_handler_returning_odd_values_is_acked_or_nacked_and_the_worker_goes_on(
        tmp_path: Path, start: Callable[[App], App], caplog: pytest.LogCaptureFixture, odd: str,
        acked: bool) -> None:
    caplog.set_level(logging.WARNING)
    app = start(build_app(tmp_path, ODD_HANDLER.format(odd=odd)))
    odd_id = app.publish("t:jobs", {"odd": True, "n": 0})
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    seen = sorted(results(app), key=lambda r: (r["n"], r["attempt"]))
    stats = worker_stats(app)
    if acked:
        assert seen == [{"n": 1, "attempt": 1}]
        assert (stats["acked"], stats["nacked"], stats["processed"]) == (2, 0, 2)
    else:
        # Nacked: requeued at the tail with attempt 2 (then the handler succeeds).
        assert seen == [{"n": 0, "attempt": 2}, {"n": 1, "attempt": 1}]
        assert (stats["acked"], stats["nacked"], stats["processed"]) == (2, 1, 3)
        failures = [r.getMessage() for r in caplog.records if odd_id in r.getMessage()]
        assert failures, "a nacked message is logged"
    assert stats["dead_lettered"] == 0
    assert queue_stats(app) == {"ready": 0, "in_flight": 0, "message_count": 0, "delayed": 0, "consumer_count": 1}
    assert host_errors(caplog) == []


@pytest.mark.parametrize("odd", [
    ODD_NACK["nil-plain-table"], ODD_NACK["nil-hostile-tostring"], ODD_NACK["nil-tostring-not-a-string"],
    ODD_NACK["nil-invalid-utf8"], ODD_NACK["raise-hostile-tostring"], ODD_NACK["raise-nil"],
    ODD_NACK["many-values"],
], ids=["plain-table", "hostile-tostring", "tostring-not-a-string", "invalid-utf8", "raise-hostile", "raise-nil",
        "many-values"])
def test_odd_error_values_still_dead_letter_with_a_readable_reason(
        tmp_path: Path, start: Callable[[App], App], caplog: pytest.LogCaptureFixture, odd: str) -> None:
    caplog.set_level(logging.WARNING)
    app = start(build_app(tmp_path, ODD_HANDLER.format(odd=odd),
                          dead_letter={"queue": "dlq", "max_attempts": 1}))
    mid = app.publish("t:jobs", {"odd": True, "n": 0}, {"trace": "abc"})
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    [(message, body)] = drain(app, "t:dlq")
    assert message.id == mid and body == {"odd": True, "n": 0}
    reason = message.headers["x_dead_letter_reason"]
    assert isinstance(reason, str) and reason.strip()
    reason.encode("utf-8")  # valid text, so it can travel as a header anywhere
    assert message.headers["x_attempts"] == 1 and message.headers["x_original_queue"] == "t:jobs"
    assert message.headers["trace"] == "abc"
    assert results(app) == [{"n": 1, "attempt": 1}]
    stats = worker_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"]) == (1, 0, 1)
    assert host_errors(caplog) == []


# ============================================================================================
# 5. odd queue IDs from Lua
# ============================================================================================

ODD_IDS_HANDLER = """
local ODD_IDS = { "", ":", "::", "a:b:c", "t:", ":jobs", "t:jobs:extra", " t:jobs", "t:jobs ", "T:JOBS",
                  "\\0", "t:jobs\\0", "\\255\\254", "t:\\255", string.rep("q", 100000), string.rep(":", 1000),
                  "t:" .. string.rep("x", 100000), "nope" }
return function(body)
    local out = {}
    for i, id in ipairs(ODD_IDS) do
        local ok, err = queue.publish(id, { i = i })
        local info, ierr = queue.info(id)
        out[#out + 1] = {
            i = i, published = ok ~= nil, info = info ~= nil,
            pub_kind = err and err:kind(), pub_msg = err and err:message():sub(-30),
            info_kind = ierr and ierr:kind(), info_msg = ierr and ierr:message():sub(-30),
        }
    end
    report(out)
end
"""


def test_odd_unknown_queue_ids_from_lua_are_not_found_errors(tmp_path: Path, start: Callable[[App], App],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app = start(build_app(tmp_path, ODD_IDS_HANDLER))
    app.publish("t:jobs", {})
    assert app.wait_idle(IDLE)
    [report] = results(app)
    assert len(report) == 18
    for row in report:
        assert row["published"] is False and row["info"] is False, row
        assert row["pub_kind"] == "NotFound" and row["info_kind"] == "NotFound", row
        assert "not found" in row["pub_msg"] and "not found" in row["info_msg"], row
    stats = worker_stats(app)
    assert (stats["acked"], stats["nacked"]) == (1, 0)
    for qid in ("t:jobs", "t:dlq", "t:results"):
        assert queue_stats(app, qid)["message_count"] == 0, qid
    assert host_errors(caplog) == []
    # The same calls outside a handler (app.call, in this thread's own Lua state) agree.
    assert app.call("t:handler", {}) is None
    [again] = results(app)
    assert again == report


# ============================================================================================
# 6. `runtime run --publish` with odd JSONL
# ============================================================================================

CLI_HANDLER = """\
-- Acks only what arrived intact: `len` is the byte length the sender measured.
return function(body)
    if type(body) ~= "table" then return nil, "not an object" end
    if body.len ~= nil and #body.s ~= body.len then
        return nil, "mangled: " .. #body.s .. " bytes, expected " .. tostring(body.len)
    end
end
"""


@pytest.fixture
def cli_app(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    doc = {"namespace": "t", "entries": [
        {"name": "mem", "kind": "queue.driver.memory"},
        {"name": "jobs", "kind": "queue.queue", "driver": "mem"},
        {"name": "handler", "kind": "function.lua", "source": "file://handler.lua", "modules": MODULES},
        {"name": "worker", "kind": "queue.consumer", "queue": "jobs", "func": "handler", "concurrency": 2,
         "lifecycle": {"auto_start": True}},
    ]}
    write_app(root, {"app.yaml": yaml.safe_dump(doc, sort_keys=False), "handler.lua": CLI_HANDLER})
    return root


def run_cli(app: Path, *publish: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "runtime", "run", str(app), "--until-idle", "--log-level", "warn"]
    for p in publish:
        args += ["--publish", p]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def _line(s: str) -> str:
    return json.dumps({"s": s, "len": len(s.encode())}, ensure_ascii=False)


def _expect_acked(proc: subprocess.CompletedProcess[str], n: int) -> None:
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert f"t:worker acked={n} nacked=0 dead_lettered=0 processed={n}" in proc.stdout, report


@pytest.mark.timeout(60)
def test_cli_publish_jsonl_with_a_one_megabyte_line(tmp_path: Path, cli_app: Path) -> None:
    f = tmp_path / "big.jsonl"
    f.write_text(_line("x" * (1024 * 1024)) + "\n" + _line("small") + "\n", encoding="utf-8")
    assert f.stat().st_size > 1024 * 1024
    _expect_acked(run_cli(cli_app, f"t:jobs=@{f}"), 2)


@pytest.mark.timeout(60)
def test_cli_publish_inline_json_of_100_kib(cli_app: Path) -> None:
    # One argv string cannot exceed 128 KiB on Linux, so the inline form gets 100 KiB.
    _expect_acked(run_cli(cli_app, "t:jobs=" + _line("y" * (100 * 1024))), 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [b"", b"\n", b"\n\n  \n\t\n", b"\xef\xbb\xbf"],
                         ids=["empty", "newline", "blank-lines", "bom-only"])
def test_cli_publish_jsonl_with_no_messages_exits_0(tmp_path: Path, cli_app: Path, content: bytes) -> None:
    f = tmp_path / "none.jsonl"
    f.write_bytes(content)
    _expect_acked(run_cli(cli_app, f"t:jobs=@{f}"), 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content, n", [
    (b"\xef\xbb\xbf" + _line("a").encode() + b"\n" + _line("b").encode() + b"\n", 2),
    (_line("a").encode() + b"\r\n" + _line("b").encode() + b"\r\n", 2),
    (_line("no final newline").encode(), 1),
    (_line("line\u2028separator").encode() + b"\n", 1),
    (_line("para\u2029separator").encode() + b"\n", 1),
    (_line("next\x85line").encode() + b"\n", 1),
], ids=["utf8-bom", "crlf", "no-final-newline", "u2028-in-string", "u2029-in-string", "nel-in-string"])
def test_cli_publish_jsonl_variants_are_read_as_json_lines(tmp_path: Path, cli_app: Path, content: bytes,
                                                           n: int) -> None:
    """JSON Lines are separated by \\n (a \\r before it is whitespace). A UTF-8 BOM at the start
    is ignored, as for definition files; U+2028/U+2029/U+0085 are legal inside JSON strings
    and do not end a line."""
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    _expect_acked(run_cli(cli_app, f"t:jobs=@{f}"), n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [
    _line("ok").encode() + b"\n" + b'{"s": "caf\xe9"}\n',
    "\n".join([_line("a"), _line("b")]).encode("utf-16"),
    b"\xff\xfe\xfd\n",
], ids=["latin1-line", "utf16", "garbage"])
def test_cli_publish_non_utf8_jsonl_is_a_clear_error(tmp_path: Path, cli_app: Path, content: bytes) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    proc = run_cli(cli_app, f"t:jobs=@{f}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert str(f) in out and "utf-8" in out.lower(), out
    assert "Traceback" not in out, out
    assert "acked=" not in proc.stdout, "nothing may start when an input file is unreadable"
