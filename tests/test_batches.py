"""Batched dispatch (the hot path): a worker hands the messages already in its buffer to Lua
in one call. Per-message semantics must not change: each message has its own result, time
limit, `queue.message()`, early ack/nack; one failure does not touch the others; stop
returns what did not start; a message does not wait behind a slow one.

Batches form when messages are waiting: each test first keeps the workers busy with
"gate" messages (they sleep), publishes the messages under test meanwhile, so the next
refill of the buffer holds them all."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import drain, wait_until
from test_delivery import consumer_stats, results, standard_app

from runtime import App
from runtime.errors import ShutdownTimeout

pytestmark = pytest.mark.timeout(60)
IDLE = 20.0

GATE = """
local function gate(body)
    if body.gate then time.sleep(body.gate) return true end
end
"""


def publish_behind_gates(app: App, gates: int, bodies: list[dict[str, Any]], headers: bool = False) -> list[str]:
    for _ in range(gates):
        app.publish("t:jobs", {"gate": 0.3})
    wait_until(lambda: consumer_stats(app)["in_flight"] >= gates, 5, "the gates are taken")
    return [app.publish("t:jobs", b, {"k": f"h{b.get('n')}"} if headers else None) for b in bodies]


def test_each_message_of_a_batch_has_its_own_result_message_and_settling(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, GATE + """
        return function(body)
            if gate(body) then return end
            local msg = queue.message()
            report({ n = body.n, id = msg:id(), k = msg:header("k"), attempt = msg:attempt() })
            if body.n % 5 == 0 then error("boom " .. body.n) end
            if body.n == 7 then msg:nack() return end
            if body.n == 8 then msg:ack() return false end -- settled first: the false changes nothing
            if body.n == 9 then return nil, "soft failure" end
        end
    """, queue={"dead_letter": {"queue": "dlq", "max_attempts": 1}}, consumer={"prefetch": 50}))
    ids = publish_behind_gates(app, 1, [{"n": n} for n in range(1, 31)], headers=True)
    assert app.wait_idle(IDLE)
    got = {r["n"]: r for r in results(app)}
    assert sorted(got) == list(range(1, 31)), "every message ran exactly once"
    for n, r in got.items():
        assert (r["id"], r["k"], r["attempt"]) == (ids[n - 1], f"h{n}", 1), "queue.message() is the running message"
    dead = {value["n"]: m.headers for m, value in drain(app, "t:dlq")}
    assert sorted(dead) == [5, 7, 9, 10, 15, 20, 25, 30]
    assert "boom 5" in dead[5]["x_dead_letter_reason"] and "soft failure" in dead[9]["x_dead_letter_reason"]
    stats = consumer_stats(app)
    assert stats["acked"] == 30 + 1 - 8 and stats["dead_lettered"] == 8  # the gate is acked too


def test_a_time_limit_cuts_one_message_of_a_batch_and_the_rest_run_in_a_fresh_state(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, GATE + """
        local seen = 0 -- module state: a fresh state after a time limit starts again from 0
        return function(body)
            if gate(body) then return end
            seen = seen + 1
            if body.n == 4 then while true do end end
            report({ n = body.n, seen = seen })
        end
    """, queue={"dead_letter": {"queue": "dlq", "max_attempts": 1}},
        consumer={"prefetch": 50, "timeout": "1s"}))
    publish_behind_gates(app, 1, [{"n": n} for n in range(1, 11)])
    assert app.wait_idle(IDLE)
    got = results(app)
    assert [r["n"] for r in got] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert [r["seen"] for r in got] == [1, 2, 3, 1, 2, 3, 4, 5, 6], "state replaced after the timeout"
    dead = drain(app, "t:dlq")
    assert [v["n"] for _, v in dead] == [4] and "time limit" in dead[0][0].headers["x_dead_letter_reason"]


def test_stop_during_a_batch_returns_the_messages_that_did_not_start(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    root = tmp_path / "app"
    app = start(standard_app(root, GATE + """
        return function(body)
            if gate(body) then return end
            report({ n = body.n })
            if body.n == 5 then
                report({ waiting = true })
                time.sleep(30) -- cut short by the stop (returns an error value): message 5 ends
            end
        end
    """, consumer={"prefetch": 50}))
    publish_behind_gates(app, 1, [{"n": n} for n in range(1, 21)])
    wait_until(lambda: app.stats()["queues"]["t:results"]["ready"] >= 6, 10, "message 5 is running")
    jobs = app.router.queues["t:jobs"]
    app.stop(timeout=5)
    started = [r["n"] for r in results(app) if "n" in r]
    assert started == [1, 2, 3, 4, 5], "nothing after the running message started"
    left = sorted(value["n"] for _, value in _drain_bound(jobs))
    assert left == list(range(6, 21)), "the unstarted ones are back in the queue"


def test_a_worker_abandoned_at_stop_gives_back_the_rest_of_its_batch(
        tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, GATE + """
        return function(body)
            if gate(body) then return end
            report({ n = body.n })
            if body.n == 3 then while true do end end -- runs past the stop timeout, ignores cancel
        end
    """, consumer={"prefetch": 50, "timeout": "3s"}))
    publish_behind_gates(app, 1, [{"n": n} for n in range(1, 11)])
    wait_until(lambda: app.stats()["queues"]["t:results"]["ready"] >= 3, 10, "message 3 is running")
    jobs = app.router.queues["t:jobs"]
    with pytest.raises(ShutdownTimeout, match="worker#0"):
        app.stop(timeout=0.3)
    assert [r["n"] for r in results(app)] == [1, 2, 3]
    left = sorted(value["n"] for _, value in _drain_bound(jobs))
    assert left == list(range(3, 11)), "the running message and the unstarted ones went back, 1 and 2 were acked"


def test_messages_do_not_wait_in_a_batch_behind_a_slow_one(tmp_path: Path, start: Callable[[App], App]) -> None:
    # After slow messages (the gates), a worker takes one message at a time: the slow one
    # below holds one worker while the other works through the rest.
    app = start(standard_app(tmp_path, GATE + """
        return function(body)
            if gate(body) then return end
            if body.slow then
                local deadline = time.now() + 10
                while time.now() < deadline do
                    if queue.info("results").ready >= 20 then report({ slow = "others done meanwhile" }) return end
                    time.sleep(0.01)
                end
                report({ slow = "others waited" })
                return
            end
            report({ n = body.n })
        end
    """, consumer={"prefetch": 50, "concurrency": 2}))
    publish_behind_gates(app, 2, [{"slow": True}] + [{"n": n} for n in range(1, 21)])
    assert app.wait_idle(IDLE)
    got = results(app)
    assert {"slow": "others done meanwhile"} in got and len(got) == 21


def test_handler_durations_are_measured_per_message_in_batches(tmp_path: Path) -> None:
    app = standard_app(tmp_path, GATE + """
        return function(body)
            if gate(body) then return end
            local t = time.now() + 0.002
            while time.now() < t do end
        end
    """, consumer={"prefetch": 50})
    app.measure_durations = True
    with app:
        publish_behind_gates(app, 1, [{"n": n} for n in range(1, 21)])
        assert app.wait_idle(IDLE)
        snapshot = app.metrics_snapshot()
    worker = snapshot["consumers"]["t:worker"]
    assert sum(worker["durations"]) == 21
    assert 20 * 0.002 + 0.3 <= worker["duration_sum"] < 5.0


def test_a_lone_message_is_not_held_back_to_fill_a_batch(tmp_path: Path, start: Callable[[App], App]) -> None:
    app = start(standard_app(tmp_path, """
        return function(body) report({ n = body.n, at = time.now() }) end
    """, consumer={"prefetch": 100}))
    for n in range(5):
        sent = time.time()
        app.publish("t:jobs", {"n": n})
        wait_until(lambda n=n: app.stats()["queues"]["t:results"]["ready"] > n, 5, f"message {n} handled")
    got = results(app)
    assert [r["n"] for r in got] == list(range(5)) and got[-1]["at"] - sent < 1.0


def _drain_bound(bound: Any) -> list[tuple[Any, Any]]:
    reader = bound.driver.consume(bound.name, "test:reader", 1000)
    out = []
    while batch := reader.fetch(1000, 0):
        for d in batch:
            out.append((d.message.headers, bound.codec.decode(d.message.body)))
            reader.ack(d)
    return out

