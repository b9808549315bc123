"""Delivery semantics through the App API (SPEC §5 `queue`, §6 consumers, §7 memory driver).

Each test writes a small app (YAML + Lua handler) into tmp_path. Handlers report what they
saw by publishing to `t:results`, a queue nobody consumes; the test drains it straight from
the driver. Waiting is done with `app.wait_idle()` or a bounded poll of `app.stats()`,
never a sleep-and-hope.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import conftest
import msgpack
import pytest
import yaml
from conftest import drain, write_app

from runtime import App
from runtime.errors import ConfigError, PublishTimeout, RuntimeHostError, ShutdownTimeout
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(20)

IDLE = 10.0  # seconds: generous bound for wait_idle; tests finish far sooner

# Every handler starts with this: `report(t)` publishes t to t:results.
PRELUDE = """\
local queue = require("queue")
local json = require("json")
local time = require("time")
local function report(t)
    local ok, err = queue.publish("results", t)
    if not ok then error("report failed: " .. tostring(err)) end
end
"""

MODULES = ["json", "logger", "queue", "time"]


# -- app building ----------------------------------------------------------------------------

def queue_entry(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "queue.queue", "driver": "mem", **kw}


def func_entry(name: str, file: str | None = None) -> dict[str, Any]:
    return {"name": name, "kind": "function.lua", "source": f"file://{file or name + '.lua'}", "modules": MODULES}


def consumer_entry(name: str, queue: str, func: str, **kw: Any) -> dict[str, Any]:
    lifecycle = {"auto_start": True, **kw.pop("lifecycle", {})}
    return {"name": name, "kind": "queue.consumer", "queue": queue, "func": func, **kw, "lifecycle": lifecycle}


def build(root: Path, entries: list[dict[str, Any]], files: dict[str, str]) -> App:
    doc = {
        "version": "1.0",
        "namespace": "t",
        "entries": [{"name": "mem", "kind": "queue.driver.memory", "lifecycle": {"auto_start": True}}, *entries],
    }
    write_app(root, {"app.yaml": yaml.safe_dump(doc, sort_keys=False), **files})
    return App.load(root)


def standard_app(root: Path, handler: str, *, queue: dict[str, Any] | None = None,
                 consumer: dict[str, Any] | None = None, extra: list[dict[str, Any]] | None = None,
                 files: dict[str, str] | None = None) -> App:
    """Queues t:jobs (consumed by t:worker running t:handler), t:results and t:dlq
    (nobody consumes them), plus `extra` entries."""
    entries = [
        queue_entry("jobs", **(queue or {})),
        queue_entry("results"),
        queue_entry("dlq"),
        func_entry("handler"),
        consumer_entry("worker", "jobs", "handler", **{"concurrency": 1, **(consumer or {})}),
        *(extra or []),
    ]
    return build(root, entries, {"handler.lua": PRELUDE + handler, **(files or {})})


def results(app: App) -> list[Any]:
    return [value for _, value in drain(app, "t:results")]


def wait_for(cond: Callable[[], bool], timeout: float = IDLE) -> None:
    """Wait (bounded) until a condition holds; fail the test if it never does."""
    assert conftest.wait_for(cond, timeout), "condition not reached in time"


def consumer_stats(app: App, consumer_id: str = "t:worker") -> dict[str, int]:
    return app.stats()["consumers"][consumer_id]  # type: ignore[no-any-return]


def queue_stats(app: App, queue_id: str = "t:jobs") -> dict[str, int]:
    return app.stats()["queues"][queue_id]  # type: ignore[no-any-return]


# -- the handler's argument ------------------------------------------------------------------

@pytest.mark.parametrize("data, lua_type", [
    ({"a": 1, "nested": {"b": [1, 2, 3]}, "s": "x"}, "table"),
    ([1, "two", 3.5], "table"),
    ({}, "table"),
    ("hello ✓", "string"),
    ("", "string"),
    (42, "number"),
    (-3.25, "number"),
    (True, "boolean"),
    (False, "boolean"),
    (None, "nil"),
], ids=["object", "array", "empty-object", "string", "empty-string", "int", "float", "true", "false", "null"])
def test_handler_receives_the_decoded_body(tmp_path: Path, start: Callable[[App], App], data: Any,
                                           lua_type: str) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            report({ type = type(body), value = body })
        end
    """))
    app.publish("t:jobs", data)
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen["type"] == lua_type
    assert seen.get("value") == data
    assert consumer_stats(app)["acked"] == 1


# -- result mapping --------------------------------------------------------------------------

NACK_RESULTS = {
    "raise": 'error("boom")',
    "raise-table": "error({ code = 1 })",
    "raise-error-value": 'error(errors.new("boom"))',
    "nil-and-string": 'return nil, "failed"',
    "nil-and-error": 'return nil, errors.new({ message = "failed", kind = errors.INVALID })',
    "false": "return false",
    "false-and-error": 'return false, "failed"',
    "true-and-error": 'return true, "failed"',
}
ACK_RESULTS = {
    "no-return": "",
    "return-nothing": "do return end",
    "nil": "return nil",
    "true": "return true",
    "zero": "return 0",
    "string": 'return "done"',
    "table": "return {}",
    "true-and-nil": "return true, nil",
    "pcall-swallowed": 'pcall(error, "caught")',
}


@pytest.mark.parametrize("result, acked", [(v, False) for v in NACK_RESULTS.values()]
                         + [(v, True) for v in ACK_RESULTS.values()],
                         ids=list(NACK_RESULTS) + list(ACK_RESULTS))
def test_result_mapping(tmp_path: Path, start: Callable[[App], App], result: str, acked: bool) -> None:
    app = start(standard_app(tmp_path, f"""
        return function(body)
            local msg = queue.message()
            report({{ attempt = msg:attempt(), id = msg:id() }})
            if msg:attempt() == 1 then
                {result}
            end
        end
    """))
    mid = app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    seen = results(app)
    stats = consumer_stats(app)
    if acked:
        assert [s["attempt"] for s in seen] == [1]
        assert (stats["acked"], stats["nacked"], stats["processed"]) == (1, 0, 1)
    else:
        # Nacked: redelivered once with attempt+1 (then the handler succeeds).
        assert [s["attempt"] for s in seen] == [1, 2]
        assert (stats["acked"], stats["nacked"], stats["processed"]) == (1, 1, 2)
    assert {s["id"] for s in seen} == {mid}
    assert stats["dead_lettered"] == 0
    assert queue_stats(app) == {"ready": 0, "in_flight": 0, "message_count": 0, "delayed": 0, "consumer_count": 1}


def test_failing_message_without_dead_letter_is_redelivered_until_it_succeeds(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            report({ attempt = msg:attempt(), id = msg:id(), trace = msg:header("trace"), n = body.n })
            if msg:attempt() < 5 then return nil, "not yet" end
        end
    """))
    mid = app.publish("t:jobs", {"n": 7}, headers={"trace": "abc"})
    assert app.wait_idle(IDLE)
    seen = results(app)
    assert [s["attempt"] for s in seen] == [1, 2, 3, 4, 5]
    assert {s["id"] for s in seen} == {mid}, "the message id is kept across redeliveries"
    assert {s["trace"] for s in seen} == {"abc"}, "headers are kept across redeliveries"
    assert {s["n"] for s in seen} == {7}
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"], stats["processed"]) == (1, 4, 0, 5)


def test_nack_requeues_at_the_tail(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            report({ n = body.n, attempt = msg:attempt() })
            if body.n == 1 and msg:attempt() == 1 then
                -- wait (bounded) until 2 and 3 are queued behind us, so "the tail" is after them
                local deadline = time.now() + 10
                while queue.info("jobs").ready < 2 and time.now() < deadline do time.sleep(0.001) end
                return false
            end
        end
    """, consumer={"prefetch": 1}))
    for n in (1, 2, 3):
        app.publish("t:jobs", {"n": n})
    assert app.wait_idle(IDLE)
    seen = [(s["n"], s["attempt"]) for s in results(app)]
    assert seen[0] == (1, 1)
    assert seen[-1] == (1, 2), f"the nacked message goes to the tail: {seen}"
    assert sorted(seen) == [(1, 1), (1, 2), (2, 1), (3, 1)]


# -- the Message object ----------------------------------------------------------------------

def test_message_accessors(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            local headers = msg:headers()
            headers.trace = "changed"               -- a copy: must not change the message
            local again = msg:headers()
            report({
                id = msg:id(),
                attempt = msg:attempt(),
                trace = msg:header("trace"),
                count = msg:header("count"),
                flag = msg:header("flag"),
                missing = msg:header("missing") == nil,
                headers = again,
                body = msg:body(),
                body_type = type(msg:body()),
                same_value = rawequal(msg:body_json(), body),
                body_json_a = msg:body_json().a,
                same_object = rawequal(queue.message(), msg),
            })
        end
    """))
    before = time.time()
    mid = app.publish("t:jobs", {"a": 1, "s": "x"}, headers={"trace": "abc", "count": 7, "flag": True})
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen["id"] == mid
    assert seen["attempt"] == 1
    assert (seen["trace"], seen["count"], seen["flag"], seen["missing"]) == ("abc", 7, True, True)
    headers = seen["headers"]
    assert {k: headers[k] for k in ("trace", "count", "flag")} == {"trace": "abc", "count": 7, "flag": True}
    assert isinstance(headers["timestamp"], (int, float))
    assert before - 1 <= headers["timestamp"] <= time.time() + 1
    assert not any(k.startswith("x_") for k in headers)
    assert seen["body_type"] == "string"
    assert seen["body"] == '{"a":1,"s":"x"}'  # the body as the JSON codec encoded it
    assert seen["same_value"] is True
    assert seen["body_json_a"] == 1
    assert seen["same_object"] is True


def test_queue_message_outside_a_handler_is_invalid(tmp_path: Path) -> None:
    app = build(tmp_path, [func_entry("f")], {"f.lua": PRELUDE + """
        return function()
            local msg, err = queue.message()
            return msg == nil, err and err:kind()
        end
    """})
    assert app.call("t:f") == (True, "Invalid")


def test_settlement_is_single_shot_and_methods_fail_after_return(tmp_path: Path,
                                                                  start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        local saved
        local function outcome(v, err)
            return { is_nil = v == nil, err = err and tostring(err) or "", kind = err and err:kind() or "" }
        end
        return function(body)
            if body.step == 1 then
                local msg = queue.message()
                saved = msg
                local first = outcome(msg:ack())
                first.is_true = first.is_nil == false
                report({ step = 1, first = first, second = outcome(msg:ack()), nack = outcome(msg:nack()),
                         id_after_settle = msg:id() })
            else
                -- the message object of the previous call, after its handler returned
                local r = { step = 2 }
                for _, name in ipairs({ "id", "attempt", "body", "body_json", "headers", "ack", "nack" }) do
                    r[name] = outcome(saved[name](saved))
                end
                r.header = outcome(saved:header("timestamp"))
                report(r)
            end
        end
    """))
    mid = app.publish("t:jobs", {"step": 1})
    assert app.wait_idle(IDLE)
    app.publish("t:jobs", {"step": 2})
    assert app.wait_idle(IDLE)
    first, second = results(app)
    assert first["first"]["is_true"] is True and first["first"]["err"] == ""
    assert first["second"]["is_nil"] is True and first["second"]["err"] != ""
    assert first["nack"]["is_nil"] is True and first["nack"]["err"] != ""
    assert first["id_after_settle"] == mid, "reading the message still works after settling it"
    for name in ("id", "attempt", "body", "body_json", "headers", "ack", "nack", "header"):
        assert second[name]["is_nil"] is True, f"msg:{name}() after the handler returned"
        assert "released" in second[name]["err"], second[name]
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["processed"]) == (2, 0, 2)
    assert queue_stats(app)["message_count"] == 0


@pytest.mark.parametrize("failure", ['return nil, "late failure"', 'error("late failure")', "return false"])
def test_handler_acks_itself_then_fails_stays_acked(tmp_path: Path, start: Callable[[App], App],
                                                    failure: str) -> None:
    app = start(standard_app(tmp_path, f"""
        return function(body)
            local msg = queue.message()
            report({{ attempt = msg:attempt() }})
            assert(msg:ack())
            {failure}
        end
    """))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert [s["attempt"] for s in results(app)] == [1]
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"], stats["processed"]) == (1, 0, 0, 1)
    assert queue_stats(app)["message_count"] == 0


def test_handler_nacks_itself_message_is_requeued(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            report({ attempt = msg:attempt(), id = msg:id() })
            if msg:attempt() == 1 then
                assert(msg:nack())
                return true   -- would be an ack, but the handler settled already
            end
        end
    """))
    mid = app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    seen = results(app)
    assert [(s["attempt"], s["id"]) for s in seen] == [(1, mid), (2, mid)]
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["processed"]) == (1, 1, 2)


# -- dead letters ----------------------------------------------------------------------------

@pytest.mark.parametrize("failure, reason", [
    ('return nil, "bad order 7"', "bad order 7"),
    ('return nil, errors.new({ message = "bad order 7", kind = errors.INVALID })', "bad order 7"),
    ('error("bad order 7")', None),
], ids=["string", "error-value", "raise"])
def test_dead_letter_after_max_attempts(tmp_path: Path, start: Callable[[App], App], failure: str,
                                        reason: str | None) -> None:
    app = start(standard_app(tmp_path, f"""
        return function(body)
            report({{ attempt = queue.message():attempt() }})
            {failure}
        end
    """, queue={"dead_letter": {"queue": "dlq", "max_attempts": 3}}))
    mid = app.publish("t:jobs", {"order": 7}, headers={"trace": "t-1"})
    assert app.wait_idle(IDLE)
    assert [s["attempt"] for s in results(app)] == [1, 2, 3], "exactly max_attempts deliveries"
    [(dead, body)] = drain(app, "t:dlq")
    assert body == {"order": 7}
    assert dead.id == mid
    h = dead.headers
    if reason is None:
        assert "bad order 7" in str(h["x_dead_letter_reason"])
    else:
        assert h["x_dead_letter_reason"] == reason
    assert h["x_original_queue"] == "t:jobs"
    assert h["x_attempts"] == 3 and isinstance(h["x_attempts"], int)
    assert h["trace"] == "t-1" and "timestamp" in h
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"], stats["processed"]) == (0, 2, 1, 3)
    assert queue_stats(app)["message_count"] == 0


def test_dead_letter_headers_visible_to_a_dlq_consumer(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            return nil, "always fails"
        end
    """, queue={"dead_letter": {"queue": "dlq", "max_attempts": 1}},
        extra=[func_entry("dlq_handler"), consumer_entry("dlq_worker", "dlq", "dlq_handler")],
        files={"dlq_handler.lua": PRELUDE + """
        return function(body)
            local msg = queue.message()
            report({ n = body.n, reason = msg:header("x_dead_letter_reason"),
                     original = msg:header("x_original_queue"), attempts = msg:header("x_attempts"),
                     attempt = msg:attempt() })
        end
    """}))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen == {"n": 1, "reason": "always fails", "original": "t:jobs", "attempts": 1, "attempt": 1}
    assert consumer_stats(app)["dead_lettered"] == 1
    assert consumer_stats(app, "t:dlq_worker")["acked"] == 1


def test_dead_letter_into_a_queue_with_another_codec(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            return nil, "rejected " .. body.name
        end
    """, queue={"codec": "msgpack", "dead_letter": {"queue": "dlq", "max_attempts": 1}}))
    data = {"name": "w", "items": [1, 2.5, {"k": True}]}
    mid = app.publish("t:jobs", data)
    assert app.wait_idle(IDLE)
    [(dead, body)] = drain(app, "t:dlq")  # t:dlq uses the default JSON codec
    assert body == data
    assert (dead.id, dead.headers["x_dead_letter_reason"], dead.headers["x_attempts"]) == (mid, "rejected w", 1)
    assert consumer_stats(app)["dead_lettered"] == 1


@pytest.mark.parametrize("codec, raw", [
    ("json", b"{not json"),
    ("json", b"[1, 2"),
    ("json", b"\xff\xfe{not json"),
    ("msgpack", b"\xc1"),
    ("msgpack", b"\x92\x01"),
], ids=["json-malformed", "json-truncated", "json-invalid-utf8", "msgpack-reserved-byte", "msgpack-truncated"])
def test_undecodable_body_is_dead_lettered_with_the_decode_error(tmp_path: Path, start: Callable[[App], App],
                                                                  codec: str, raw: bytes) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            report({ called = true })
        end
    """, queue={"codec": codec, "dead_letter": {"queue": "dlq", "max_attempts": 2}}))
    bound = app.router.queues["t:jobs"]
    bad = Message.new(raw, {"trace": "x"})
    bound.driver.publish(bound.name, [bad])
    good = app.publish("t:jobs", {"ok": True})
    assert app.wait_idle(IDLE)
    assert results(app) == [{"called": True}], "the handler never sees the undecodable body"
    [(dead, body)] = drain(app, "t:dlq")
    assert dead.id == bad.id and dead.id != good
    assert body == raw, "the undecodable body is dead-lettered as it came"
    h = dead.headers
    assert h["x_attempts"] == 2
    assert h["x_original_queue"] == "t:jobs"
    reason = str(h["x_dead_letter_reason"])
    # The codec's own decode error, not a host failure.
    assert codec in reason.lower(), reason
    assert "internal error" not in reason.lower() and "UnicodeDecodeError" not in reason, reason
    stats = consumer_stats(app)
    assert (stats["acked"], stats["nacked"], stats["dead_lettered"]) == (1, 1, 1)


# -- auto_ack --------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ['error("boom")', 'return nil, "failed"', "return false"])
def test_auto_ack_failing_handler_is_not_redelivered(tmp_path: Path, start: Callable[[App], App],
                                                     failure: str) -> None:
    app = start(standard_app(tmp_path, f"""
        return function(body)
            report({{ attempt = queue.message():attempt() }})
            {failure}
        end
    """, consumer={"auto_ack": True}, queue={"dead_letter": {"queue": "dlq", "max_attempts": 1}}))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert [s["attempt"] for s in results(app)] == [1]
    assert drain(app, "t:dlq") == [], "at-most-once: settled before the handler ran"
    stats = consumer_stats(app)
    assert (stats["nacked"], stats["dead_lettered"], stats["processed"]) == (0, 0, 1)
    assert queue_stats(app)["message_count"] == 0


def test_auto_ack_settles_before_the_handler_runs(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local info = queue.info("jobs")
            report({ in_flight = info.in_flight })
        end
    """, consumer={"auto_ack": True}))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert results(app) == [{"in_flight": 0}]
    assert consumer_stats(app)["acked"] == 1


# -- codecs and chains -----------------------------------------------------------------------

def test_msgpack_queue_end_to_end(tmp_path: Path, start: Callable[[App], App]) -> None:
    data = {"name": "widget", "items": [1, 2.5, "three", {"k": True}], "n": -4}
    app = start(standard_app(tmp_path, """
        return function(body)
            local msg = queue.message()
            report({ type = type(body), body = body, same = rawequal(msg:body_json(), body),
                     raw_type = type(msg:body()) })
            assert(queue.publish("packed", { from_lua = body.name, list = { 1, 2 } }))
        end
    """, queue={"codec": "application/msgpack"}, extra=[queue_entry("packed", codec="msgpack")]))
    app.publish("t:jobs", data)
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen == {"type": "table", "body": data, "same": True, "raw_type": "string"}
    # The msgpack queues hold msgpack bytes (the driver path goes through the codec).
    [(m, value)] = drain(app, "t:packed")
    assert msgpack.unpackb(m.body, raw=False) == {"from_lua": "widget", "list": [1, 2]} == value
    app.publish("t:packed", {"x": [1, {"y": None}]})
    [(m, _)] = drain(app, "t:packed")
    assert msgpack.unpackb(m.body, raw=False) == {"x": [1, {"y": None}]}


def test_two_stage_chain(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local ok, err = queue.publish("stage2", { n = body.n * 2 }, { origin = "stage1", n = body.n })
            if not ok then return nil, err end
        end
    """, consumer={"concurrency": 2}, extra=[
        queue_entry("stage2", codec="msgpack"),
        func_entry("stage2_handler"),
        consumer_entry("stage2_worker", "stage2", "stage2_handler", concurrency=2),
    ], files={"stage2_handler.lua": PRELUDE + """
        return function(body)
            local msg = queue.message()
            report({ doubled = body.n, origin = msg:header("origin"), n = msg:header("n") })
        end
    """}))
    for n in range(30):
        app.publish("t:jobs", {"n": n})
    assert app.wait_idle(IDLE)
    seen = results(app)
    assert sorted((s["n"], s["doubled"]) for s in seen) == [(n, 2 * n) for n in range(30)]
    assert {s["origin"] for s in seen} == {"stage1"}
    assert consumer_stats(app)["acked"] == 30
    assert consumer_stats(app, "t:stage2_worker")["acked"] == 30
    assert queue_stats(app, "t:stage2")["message_count"] == 0


# -- queue.info ------------------------------------------------------------------------------

def test_queue_info_inside_a_handler(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            local jobs = queue.info("jobs")
            local full = queue.info("t:dlq")
            local missing, err = queue.info("nope")
            report({ jobs = jobs, dlq = full, missing = missing == nil, kind = err and err:kind() or "" })
        end
    """))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    [seen] = results(app)
    assert seen["jobs"] == {"ready": 0, "in_flight": 1, "message_count": 1, "delayed": 0, "consumer_count": 1}
    assert seen["dlq"] == {"ready": 0, "in_flight": 0, "message_count": 0, "delayed": 0, "consumer_count": 0}
    assert seen["missing"] is True and seen["kind"] == "NotFound"


# -- worker pool -----------------------------------------------------------------------------

def test_backpressure_in_flight_never_exceeds_concurrency_plus_prefetch(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            time.sleep(0.02)
        end
    """, consumer={"concurrency": 1, "prefetch": 2}))
    total = 40
    for n in range(total):
        app.publish("t:jobs", {"n": n})
    max_driver = max_consumer = samples = 0
    min_ready = total
    while not app.wait_idle(0.005):
        stats = app.stats()
        q, c = stats["queues"]["t:jobs"], stats["consumers"]["t:worker"]
        max_driver = max(max_driver, q["in_flight"])
        max_consumer = max(max_consumer, c["in_flight"])
        if q["ready"] or q["in_flight"]:
            samples += 1
            min_ready = min(min_ready, q["ready"])
        assert q["in_flight"] <= 3 and c["in_flight"] <= 3, stats
    assert samples > 5, "the loop sampled while messages were pending"
    assert max_driver >= 1
    assert consumer_stats(app)["acked"] == total


def test_competing_consumers_each_message_acked_exactly_once(tmp_path: Path,
                                                            start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            report({ n = body.n })
            time.sleep(0.005)
        end
    """, consumer={"concurrency": 2, "prefetch": 1},
        extra=[consumer_entry("worker2", "jobs", "handler", concurrency=2, prefetch=1)]))
    total = 80
    for n in range(total):
        app.publish("t:jobs", {"n": n})
    assert app.wait_idle(IDLE)
    counts = Counter(s["n"] for s in results(app))
    assert counts == Counter(range(total)), "every message handled exactly once"
    a, b = consumer_stats(app, "t:worker"), consumer_stats(app, "t:worker2")
    assert a["acked"] + b["acked"] == total
    assert a["nacked"] == b["nacked"] == 0
    assert a["acked"] > 0 and b["acked"] > 0, "both consumers took part"
    assert queue_stats(app)["consumer_count"] == 2


def test_several_queues_share_a_driver(tmp_path: Path, start: Callable[[App], App]) -> None:
    handler = """
        return function(body)
            if body.q ~= "%s" then return nil, "wrong queue: " .. tostring(body.q) end
            report({ q = body.q, n = body.n })
        end
    """
    app = start(build(tmp_path, [
        queue_entry("qa", driver_options={"memory": {"max_length": 5}}),
        queue_entry("qb", codec="msgpack"),
        queue_entry("results"),
        func_entry("ha"), func_entry("hb"),
        consumer_entry("ca", "qa", "ha"),
        consumer_entry("cb", "qb", "hb", concurrency=3),
    ], {"ha.lua": PRELUDE + handler % "a", "hb.lua": PRELUDE + handler % "b"}))
    for n in range(20):
        app.publish("t:qa", {"q": "a", "n": n})
        app.publish("t:qb", {"q": "b", "n": n})
    assert app.wait_idle(IDLE)
    seen = results(app)
    assert sorted(s["n"] for s in seen if s["q"] == "a") == list(range(20))
    assert sorted(s["n"] for s in seen if s["q"] == "b") == list(range(20))
    for cid in ("t:ca", "t:cb"):
        stats = consumer_stats(app, cid)
        assert (stats["acked"], stats["nacked"]) == (20, 0)
    assert app.router.queues["t:qa"].driver is app.router.queues["t:qb"].driver


# -- stopping --------------------------------------------------------------------------------

def test_stop_returns_prefetched_messages_to_the_queue(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body)
            time.sleep(0.03)   -- cut short by the stop; the handler then returns normally (ack)
            report({ n = body.n })
        end
    """, consumer={"concurrency": 1, "prefetch": 5}, extra=[func_entry("info")], files={"info.lua": PRELUDE + """
        return function(id) return queue.info(id) end
    """}))
    total = 20
    ids = [app.publish("t:jobs", {"n": n}) for n in range(total)]
    wait_for(lambda: consumer_stats(app)["acked"] >= 2 and queue_stats(app)["in_flight"] >= 3)
    app.stop()
    acked = consumer_stats(app)["acked"]
    assert 2 <= acked < total
    stats = app.stats()
    assert stats["consumers"]["t:worker"]["in_flight"] == 0
    expected = {"ready": total - acked, "in_flight": 0, "message_count": total - acked, "delayed": 0,
                "consumer_count": 0}
    assert stats["queues"]["t:jobs"] == expected
    info = app.call("t:info", "jobs")  # queue.info still answers after stop
    assert info == expected
    done = {s["n"] for s in results(app)}
    assert len(done) == acked
    left = drain(app, "t:jobs")
    assert {value["n"] for _, value in left} == set(range(total)) - done, "no message lost or duplicated"
    assert {m.id for m, _ in left} == {ids[n] for n in range(total) if n not in done}
    assert {m.attempt for m, _ in left} == {1}, "returned unchanged"


@pytest.mark.parametrize("chunk", [
    "return 42",
    'error("cannot load")',
    "return { other = function() end }",
])
def test_handler_that_cannot_be_loaded_refuses_the_start(tmp_path: Path, chunk: str) -> None:
    app = build(tmp_path, [
        queue_entry("jobs"),
        func_entry("good"), func_entry("bad"),
        consumer_entry("a_good", "jobs", "good", concurrency=2),
        consumer_entry("b_bad", "jobs", "bad", concurrency=2),
    ], {"good.lua": "return function() end\n", "bad.lua": chunk + "\n"})
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as info:
        app.start()
    text = str(info.value)
    assert "t:b_bad" in text or "t:bad" in text
    assert "bad.lua" in text
    assert not app.running
    for t in set(threading.enumerate()) - before:
        t.join(5)
        assert not t.is_alive(), f"thread {t.name} left running after a failed start"
    with pytest.raises(RuntimeHostError):
        app.publish("t:jobs", {"n": 1})
    app.stop()  # harmless


@pytest.mark.timeout(30)
def test_stop_timeout_raises_shutdown_timeout_and_returns_the_message(tmp_path: Path) -> None:
    app = standard_app(tmp_path, """
        return function(body)
            report({ started = body.n })
            local t = os.clock()
            while os.clock() - t < 1.0 do end
            report({ finished = body.n })
        end
    """, consumer={"lifecycle": {"stop_timeout": "100ms"}})
    app.start()
    try:
        mid = app.publish("t:jobs", {"n": 1})
        wait_for(lambda: queue_stats(app, "t:results")["ready"] >= 1)
        started = time.monotonic()
        with pytest.raises(ShutdownTimeout) as info:
            app.stop()
        assert time.monotonic() - started < 0.9, "stop waited for the handler instead of its stop_timeout"
    finally:
        app.stop()
    assert "t:worker" in str(info.value)
    assert queue_stats(app) == {"ready": 1, "in_flight": 0, "message_count": 1, "delayed": 0, "consumer_count": 0}
    # Let the abandoned handler finish: its late ack must be ignored.
    for t in threading.enumerate():
        if t.name.startswith("t:worker"):
            t.join(10)
            assert not t.is_alive()
    assert queue_stats(app)["ready"] == 1
    assert consumer_stats(app)["acked"] == 0
    [(m, value)] = drain(app, "t:jobs")
    assert (m.id, m.attempt, value) == (mid, 1, {"n": 1})


# -- a full memory queue ---------------------------------------------------------------------

def test_publish_past_max_length_times_out(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(build(tmp_path, [
        queue_entry("tiny", driver_options={"memory": {"max_length": 2}}),
        func_entry("pub"),
    ], {"pub.lua": PRELUDE + """
        return function()
            local out = {}
            for i = 1, 3 do
                local ok, err = queue.publish("tiny", { i = i })
                out[i] = { ok = ok == true, kind = err and err:kind() or "", msg = err and tostring(err) or "" }
            end
            return out
        end
    """}))
    app.router.publish_timeout = 0.05
    out = app.call("t:pub")
    assert [o["ok"] for o in out] == [True, True, False]
    assert out[2]["kind"] == "Timeout" and out[2]["msg"]
    assert queue_stats(app, "t:tiny")["ready"] == 2
    with pytest.raises(PublishTimeout):
        app.publish("t:tiny", {"i": 4})
    assert [value for _, value in drain(app, "t:tiny")] == [{"i": 1}, {"i": 2}]
