"""Delivery rules of SPEC §6 on the reshaped driver layer, and the defects of the first
layer (each test here failed before its fix): retry delays, dead-lettering that never
blocks or drops, delayed publishes, msgpack strings byte for byte, stop cancelling a
blocked publish, one shutdown budget, no Lua states kept across restarts, idle waits that
do not poll."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import drain, write_app
from test_delivery import PRELUDE, build, consumer_entry, func_entry, queue_entry, results, standard_app

from runtime import App
from runtime.errors import DriverUnavailable
from runtime.lua.sandbox import LuaSandbox

pytestmark = pytest.mark.timeout(30)
IDLE = 10.0


def test_a_poison_message_without_dead_letter_is_retried_at_a_falling_rate(
        tmp_path: Path, start: Callable[[App], App], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runtime.consumer")
    app = start(standard_app(tmp_path, 'return function(body) error("poison") end'))
    app.publish("t:jobs", {"n": 1})
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        app.activity.wait(app.activity.value, deadline - time.monotonic())
    attempts = app.stats()["consumers"]["t:worker"]["processed"]
    # 100ms, 200ms, 400ms ... (±10%): at most 4 attempts in the first second (was thousands).
    assert 2 <= attempts <= 5, attempts
    failures = [r for r in caplog.records if "poison" in r.getMessage()]
    assert failures and all("[Internal]" in r.getMessage() for r in failures), "the log names the error kind"


def test_a_message_waiting_for_its_retry_holds_no_worker_or_prefetch_slot(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, PRELUDE + """
        return function(body)
            report({ n = body.n, attempt = queue.message():attempt() })
            if body.n == 1 and queue.message():attempt() == 1 then return false end
        end
    """, queue={"retry": {"initial_delay": "300ms", "jitter": 0}}, consumer={"prefetch": 1}))
    app.publish("t:jobs", {"n": 1})
    app.publish("t:jobs", {"n": 2})
    assert app.wait_idle(IDLE), "--until-idle / wait_idle waits for the retry"
    assert [(r["n"], r["attempt"]) for r in results(app)] == [(1, 1), (2, 1), (1, 2)]


def test_retry_policy_initial_delay_zero_is_an_immediate_requeue(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, PRELUDE + """
        return function(body)
            local a = queue.message():attempt()
            report({ attempt = a })
            if a < 20 then return false end
        end
    """, queue={"retry": {"initial_delay": 0}}))
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert [r["attempt"] for r in results(app)] == list(range(1, 21))


def test_delayed_publish_from_lua_and_python_shows_in_info_and_waits(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, PRELUDE + """
        return function(body)
            if body.fan then
                local ok, err = queue.publish("jobs", { n = "lua" }, nil, { delay = "300ms" })
                if not ok then error(tostring(err)) end
                report({ info = queue.info("jobs") })
                return
            end
            report({ n = body.n, at = time.now() })
        end
    """, extra=[func_entry("bad")], files={"bad.lua": """
        local queue = require("queue")
        return function(d) return queue.publish("t:jobs", {}, nil, { delay = d }) end
    """}))
    sent = time.time()
    app.publish("t:jobs", {"n": "py"}, delay=0.3)
    assert app.stats()["queues"]["t:jobs"]["delayed"] == 1
    app.publish("t:jobs", {"fan": True})
    assert app.wait_idle(IDLE)
    got = results(app)
    info = next(r["info"] for r in got if "info" in r)
    assert info["delayed"] >= 1 and info["ready"] == 0
    arrivals = {r["n"]: r["at"] for r in got if "n" in r}
    assert set(arrivals) == {"py", "lua"}
    assert arrivals["py"] - sent >= 0.25
    for bad in ("soon", -1, "1e999s"):
        ok, err = app.call("t:bad", bad)
        assert ok is None and err.kind == "Invalid", bad


def test_dead_letter_queue_over_its_max_length_still_takes_every_dead_letter(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(
        tmp_path, 'return function(body) error("poison") end',
        queue={"dead_letter": {"queue": "dlq", "max_attempts": 1}},
        extra=[queue_entry("small_dlq", driver_options={"memory": {"max_length": 1}})]))
    for i in range(5):
        app.publish("t:jobs", {"n": i})
    assert app.wait_idle(IDLE)
    assert app.stats()["consumers"]["t:worker"]["dead_lettered"] == 5
    assert len(drain(app, "t:dlq")) == 5


def test_dead_letter_queue_bounded_by_max_length_accepts_above_it(
        tmp_path: Path, start: Callable[[App], App], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app = start(build(tmp_path, [
        queue_entry("jobs", dead_letter={"queue": "dlq", "max_attempts": 1}),
        queue_entry("dlq", driver_options={"memory": {"max_length": 2}}),
        func_entry("handler"),
        consumer_entry("worker", "jobs", "handler", concurrency=2),
    ], {"handler.lua": 'return function(body) error("poison " .. body.n) end'}))
    for i in range(30):
        app.publish("t:jobs", {"n": i})
    assert app.wait_idle(IDLE), app.stats()
    c = app.stats()["consumers"]["t:worker"]
    assert c["dead_lettered"] == 30 and c["nacked"] == 0
    assert len(drain(app, "t:dlq")) == 30
    over = [r for r in caplog.records if "above its max_length" in r.getMessage()]
    assert len(over) == 1, "one warning a minute, not one per message"


def test_dead_letter_queue_on_a_driver_that_starts_after_the_consumer(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    """Before: the consumer started first and dead-lettering was off for its whole life."""
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: main, kind: queue.driver.memory}
          - {name: zz_other, kind: queue.driver.memory}
          - name: jobs
            kind: queue.queue
            driver: main
            dead_letter: {queue: dlq, max_attempts: 1}
          - {name: dlq, kind: queue.queue, driver: zz_other}
          - {name: h, kind: function.lua, source: "return function() error('poison') end"}
          - {name: a_worker, kind: queue.consumer, queue: jobs, func: h, lifecycle: {auto_start: true}}
    """})
    app = start(App.load(tmp_path))
    assert app.service_ids().index("t:zz_other") < app.service_ids().index("t:a_worker")
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert app.stats()["consumers"]["t:a_worker"]["dead_lettered"] == 1
    assert len(drain(app, "t:dlq")) == 1


def test_an_unreachable_dead_letter_queue_means_a_later_retry_not_a_loss(
        tmp_path: Path, start: Callable[[App], App], monkeypatch: pytest.MonkeyPatch) -> None:
    app = start(standard_app(tmp_path, 'return function(body) error("poison") end',
                             queue={"dead_letter": {"queue": "dlq", "max_attempts": 1},
                                    "retry": {"initial_delay": "10ms"}}))
    dlq = app.router.queues["t:dlq"]
    real = dlq.put
    failures = []

    def unreachable(*args: Any, **kw: Any) -> None:
        if len(failures) < 2:
            failures.append(1)
            raise DriverUnavailable("driver t:mem: connection refused")
        real(*args, **kw)

    monkeypatch.setattr(dlq, "put", unreachable)
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    c = app.stats()["consumers"]["t:worker"]
    assert len(failures) == 2 and c["dead_lettered"] == 1
    [(m, _)] = drain(app, "t:dlq")
    assert m.headers["x_attempts"] == 1


def test_lua_strings_cross_msgpack_byte_for_byte_and_json_refuses_what_it_cannot_carry(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, PRELUDE + """
        local all = {}
        for i = 0, 255 do all[#all + 1] = string.char(i) end
        local bytes = table.concat(all)
        return function(body)
            if body == "go" then
                local ok, err = queue.publish("bin", { s = bytes, [bytes] = 1, list = { "\\255", "é" }, f = 0.1,
                                                      big = 2^40, neg = -70000, nz = -0.0 })
                if not ok then error(tostring(err)) end
                local ok2, err2 = queue.publish("results", { s = "\\255\\254" })
                report({ json_ok = ok2 == true, kind = err2 and err2:kind() })
                return
            end
            report({ same = body.s == bytes, key = body[bytes] == 1, l1 = body.list[1] == "\\255",
                     l2 = body.list[2] == "é", f = body.f, big = body.big, neg = body.neg, len = #body.s })
        end
    """, extra=[queue_entry("bin", codec="application/msgpack"),
                consumer_entry("bin_worker", "bin", "handler")]))
    app.publish("t:jobs", "go")
    assert app.wait_idle(IDLE)
    got = results(app)
    assert {"json_ok": False, "kind": "Invalid"} in got
    assert {"same": True, "key": True, "l1": True, "l2": True, "f": 0.1, "big": 2**40, "neg": -70000,
            "len": 256} in got


def test_stop_cancels_a_handler_blocked_publishing_to_a_full_queue(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, PRELUDE + """
        return function(body)
            local ok, err = queue.publish("full", { n = 2 })
            report({ ok = ok, kind = err and err:kind() })
        end
    """, extra=[queue_entry("full", driver_options={"memory": {"max_length": 1}})],
        consumer={"lifecycle": {"stop_timeout": "3s"}}))
    app.publish("t:full", {"n": 1})
    app.publish("t:jobs", {"n": 1})
    deadline = time.monotonic() + IDLE
    while app.stats()["consumers"]["t:worker"]["in_flight"] == 0 and time.monotonic() < deadline:
        app.activity.wait(app.activity.value, 0.05)
    began = time.monotonic()
    app.stop()  # raised ShutdownTimeout after 3s before: the publish waited its 30s
    assert time.monotonic() - began < 2.5
    assert {"kind": "Canceled"} in results(app)


def test_shutdown_gives_all_services_one_budget(tmp_path: Path) -> None:
    busy = 'return function(body) local t = os.clock() while os.clock() - t < 2.5 do end end'
    entries = [queue_entry(f"q{i}") for i in range(3)] + [func_entry("busy")] + [
        consumer_entry(f"c{i}", f"q{i}", "busy", lifecycle={"stop_timeout": "1s"}) for i in range(3)]
    app = build(tmp_path, entries, {"busy.lua": busy})
    app.start()
    for i in range(3):
        app.publish(f"t:q{i}", {"n": i})
    deadline = time.monotonic() + IDLE
    while sum(c["in_flight"] for c in app.stats()["consumers"].values()) < 3 and time.monotonic() < deadline:
        app.activity.wait(app.activity.value, 0.05)
    began = time.monotonic()
    with pytest.raises(Exception, match="did not stop in time"):
        app.stop()
    assert time.monotonic() - began < 2.0, "each consumer waited its full 1s one after another (3s)"


def test_restarting_an_app_keeps_no_lua_state_of_its_stopped_consumers(
        tmp_path: Path) -> None:
    app = standard_app(tmp_path, "return function(body) end", consumer={"concurrency": 4})

    def states() -> int:
        gc.collect()
        return sum(isinstance(o, LuaSandbox) for o in gc.get_objects())

    before = states()
    for _ in range(5):
        app.start()
        app.publish("t:jobs", {"n": 1})
        assert app.wait_idle(IDLE)
        app.stop()
    assert states() - before <= 1, "every start/stop cycle left its four worker states behind"


def test_wait_idle_waits_on_a_condition_instead_of_polling(
        tmp_path: Path, start: Callable[[App], App], monkeypatch: pytest.MonkeyPatch) -> None:
    app = start(standard_app(tmp_path, 'local time = require("time") return function() time.sleep(0.5) end'))
    calls = [0]
    real = App.idle

    def counting(self: App) -> bool:
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(App, "idle", counting)
    app.publish("t:jobs", {"n": 1})
    assert app.wait_idle(IDLE)
    assert calls[0] <= 40, f"{calls[0]} idle checks in 0.5s: polling (every 2ms was ~250)"
