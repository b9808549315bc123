"""Reconnect with backoff, done once in the driver base class (runtime/queue/driver.py):
a lost connection becomes DriverUnavailable and is logged once; `reconnect` retries with
backoff until the engine is back, declares the queues again and logs that it is back; a
consumer pool resumes by itself. The engine here is a memory driver that can be cut."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for, write_app
from test_consumer_pool import APP, FakeHandler, publish

from runtime import App
from runtime.drivers.memory import MemoryConsumer, MemoryDriver
from runtime.errors import DriverUnavailable
from runtime.queue.consumer import ConsumerPool
from runtime.queue.driver import Backoff, Delivery
from runtime.queue.handler import ACK, Outcome
from runtime.queue.message import Message
from runtime.registry import ConsumerSpec

pytestmark = pytest.mark.timeout(30)


class EngineDown(ConnectionError):
    pass


class CuttableDriver(MemoryDriver):
    """A memory driver whose 'connection' can be cut: every call fails while it is down."""

    connection_errors = (EngineDown,)

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.down = threading.Event()
        self.opens = 0
        self.declares: list[str] = []

    def _open(self) -> None:
        if self.down.is_set():
            raise EngineDown("connection refused")
        self.opens += 1

    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        if self.down.is_set():
            raise EngineDown("connection refused")
        self.declares.append(queue)
        super()._declare(queue, options)

    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> MemoryConsumer:
        consumer = super()._consume(queue, consumer_id, prefetch, options)
        real = consumer._fetch

        def fetch(max_count: int, wait: float) -> list[Delivery]:
            if self.down.is_set():
                raise EngineDown("connection reset by peer")
            return real(max_count, wait)

        consumer._fetch = fetch  # type: ignore[method-assign]
        return consumer


def test_a_lost_connection_is_unavailable_logged_once_and_reconnected_with_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.driver")
    d = CuttableDriver("t:cut", backoff=Backoff(0.01, 0.05))
    d.open()
    d.declare("q", {})
    c = d.consume("q", "t:c", 10)
    d.down.set()
    for _ in range(3):
        with pytest.raises(DriverUnavailable, match="connection reset"):
            c.fetch(1, 0)
    assert d.state == "reconnecting"
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert len(lost) == 1, "one warning when the connection is lost, not one per call"
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(d.reconnect(stop)))
    t.start()
    assert not t.join(0.1) and t.is_alive(), "reconnect gave up while the engine was down"
    d.down.clear()
    t.join(5)
    assert result == [True] and d.state == "open" and d.reconnects == 1
    assert d.declares.count("q") == 2, "queues are declared again after a reconnect"
    assert [r for r in caplog.records if "connection is back" in r.getMessage()]
    d.publish("q", [publish_message("m1")])
    assert [x.message.id for x in c.fetch(1, 1.0)] == ["m1"]


def test_reconnect_stops_trying_when_asked() -> None:
    d = CuttableDriver("t:cut", backoff=Backoff(0.01, 0.02))
    d.open()
    d.down.set()
    with pytest.raises(DriverUnavailable):
        d.engine(d._open)
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(d.reconnect(stop)))
    t.start()
    stop.set()
    t.join(5)
    assert result == [False]


def test_a_consumer_pool_resumes_by_itself_after_the_connection_comes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = App.load(write_app(tmp_path, {"app.yaml": APP}))
    driver = CuttableDriver("t:mem", backoff=Backoff(0.01, 0.05))
    driver.open()
    jobs = app.router.bind(app.registry.entries["t:jobs"], driver)  # type: ignore[arg-type]
    spec = app.registry.get("t:c", ConsumerSpec)
    assert spec is not None
    acks = [Outcome(ACK)] * 4
    pool = ConsumerPool(spec, jobs, None, make_handler=lambda: FakeHandler(list(acks)))
    pool.start()
    try:
        driver.down.set()
        assert wait_for(lambda: pool.reconnecting, 5), "the pool did not notice the lost connection"
        driver.down.clear()
        publish(pool, "a", "b")
        assert wait_for(lambda: pool.stats()["acked"] == 2, 5), pool.stats()
        assert not pool.reconnecting
    finally:
        pool.stop(2)
    text = caplog.text
    assert "waiting for the driver to reconnect" in text and "connection is back" in text


def publish_message(mid: str) -> Message:
    return Message(b"{}", {"timestamp": 0.0}, mid)
