"""The consumer pool's `run_once` step driven by hand with a fake handler: no Lua, no
worker threads (DESIGN convention 4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_app

from runtime import App
from runtime.drivers.memory import MemoryDriver
from runtime.queue.consumer import ConsumerPool
from runtime.queue.driver import Delivery
from runtime.queue.handler import ACK, NACK, SETTLED, UNDECODABLE, Outcome
from runtime.queue.message import Message
from runtime.registry import ConsumerSpec

pytestmark = pytest.mark.timeout(30)

APP = """
namespace: t
entries:
  - {name: mem, kind: queue.driver.memory}
  - name: jobs
    kind: queue.queue
    driver: mem
    dead_letter: {queue: dlq, max_attempts: 2}
    retry: {initial_delay: 0}
  - {name: dlq, kind: queue.queue, driver: mem}
  - {name: f, kind: function.lua, source: "return function() end"}
  - {name: c, kind: queue.consumer, queue: jobs, func: f, prefetch: 5}
"""


class FakeHandler:
    """Answers each delivery from a script of outcomes, recording what it saw."""

    def __init__(self, outcomes: list[Outcome | Callable[[Delivery, Callable[[str], None]], Outcome]]):
        self.outcomes = outcomes
        self.seen: list[tuple[str, int]] = []

    def handle(self, d: Delivery, settle: Callable[[str], None]) -> Outcome:
        self.seen.append((d.message.id, d.attempt))
        out = self.outcomes.pop(0)
        return out(d, settle) if callable(out) else out

    def close(self) -> None:
        pass


@pytest.fixture
def pool(tmp_path: Path) -> ConsumerPool:
    app = App.load(write_app(tmp_path, {"app.yaml": APP}))
    driver = MemoryDriver("t:mem")
    driver.open()
    jobs = app.router.bind(app.registry.entries["t:jobs"], driver)  # type: ignore[arg-type]
    dlq = app.router.bind(app.registry.entries["t:dlq"], driver)  # type: ignore[arg-type]
    spec = app.registry.get("t:c", ConsumerSpec)
    assert spec is not None
    p = ConsumerPool(spec, jobs, dlq, make_handler=lambda: FakeHandler([]))
    p.prepare()
    return p


def publish(pool: ConsumerPool, *ids: str) -> None:
    pool.queue.driver.publish(pool.queue.name, [Message(b"{}", {"timestamp": 0.0}, i) for i in ids])


def ready(pool: ConsumerPool, queue: str = "jobs") -> int:
    st = pool.queue.driver.stats(queue)
    assert st.ready is not None
    return st.ready


def test_run_once_acks_a_handled_message(pool: ConsumerPool) -> None:
    w = pool.workers[0]
    w.handler = handler = FakeHandler([Outcome(ACK)])
    publish(pool, "a")
    assert pool.run_once(w, timeout=1.0) is True
    assert handler.seen == [("a", 1)]
    assert pool.stats() == {"acked": 1, "nacked": 0, "dead_lettered": 0, "in_flight": 0, "processed": 1}
    assert pool.queue.empty()
    assert pool.run_once(w, timeout=0.01) is False


def test_run_once_retries_then_dead_letters_with_the_reason(pool: ConsumerPool) -> None:
    w = pool.workers[0]
    w.handler = handler = FakeHandler([Outcome(NACK, "boom", None, "Unavailable"),
                                       Outcome(NACK, "boom again", None, "Unavailable")])
    publish(pool, "a")
    assert pool.run_once(w, timeout=1.0) and pool.run_once(w, timeout=1.0)
    assert handler.seen == [("a", 1), ("a", 2)]
    stats = pool.stats()
    assert (stats["nacked"], stats["dead_lettered"]) == (1, 1)
    assert pool.queue.empty()
    dead = pool.queue.driver.consume("dlq", "test", 10).fetch(10, 0)
    assert [d.message.id for d in dead] == ["a"]
    assert dead[0].message.headers["x_dead_letter_reason"] == "boom again"
    assert dead[0].message.headers["x_attempts"] == 2
    assert dead[0].message.headers["x_original_queue"] == "t:jobs"


def test_run_once_leaves_a_message_the_handler_settled_itself(pool: ConsumerPool) -> None:
    w = pool.workers[0]

    def ack_early(d: Delivery, settle: Callable[[str], None]) -> Outcome:
        settle("ack")
        return Outcome(SETTLED, "failed after settling", None, "Internal")

    w.handler = FakeHandler([ack_early])
    publish(pool, "a")
    assert pool.run_once(w, timeout=1.0)
    assert pool.stats()["acked"] == 1 and pool.stats()["nacked"] == 0
    assert pool.queue.empty()


def test_an_undecodable_body_counts_as_a_failed_delivery(pool: ConsumerPool) -> None:
    w = pool.workers[0]
    w.handler = FakeHandler([Outcome(UNDECODABLE, "bad body", None, "Invalid")])
    publish(pool, "a")
    assert pool.run_once(w, timeout=1.0)
    assert pool.stats()["nacked"] == 1
    assert ready(pool) == 1  # retried (initial_delay 0): back at once


def test_a_handler_crash_in_the_host_fails_the_delivery_not_the_worker(pool: ConsumerPool) -> None:
    w = pool.workers[0]

    def crash(d: Delivery, settle: Callable[[str], None]) -> Outcome:
        raise RuntimeError("host bug")

    w.handler = FakeHandler([crash, Outcome(ACK)])
    publish(pool, "a")
    assert pool.run_once(w, timeout=1.0)
    assert pool.run_once(w, timeout=1.0)
    assert pool.stats()["nacked"] == 1 and pool.stats()["acked"] == 1


def test_after_stop_a_taken_message_is_released_not_handled(pool: ConsumerPool) -> None:
    w = pool.workers[0]
    w.handler = handler = FakeHandler([])
    publish(pool, "a", "b")
    pool.begin_stop()
    assert pool.run_once(w, timeout=1.0) is False
    assert handler.seen == []
    assert pool.stop(1.0) == []
    assert ready(pool) == 2
