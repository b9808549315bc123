"""Huey and Dramatiq on their in-memory brokers, measured the way `python -m benchmarks`
measures ours (no-op handler, the same payload, n messages): the publish rate, the
consume rate of a backlog, and end to end (the host publishing while the workers consume).

Each uses its own worker as users run it: Huey's consumer with thread workers
(`MemoryHuey`, polling 1 ms when idle), Dramatiq's `Worker` on a `StubBroker`. Their
handlers are Python functions (that is what they run); ours are Lua. Benchmark-only
dependencies (`pip install 'lua-queue-runtime[bench]'`); a peer that is not installed is
reported as missing, not measured.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from .common import payload


def _counter(n: int) -> tuple[Any, threading.Event]:
    """A no-op handler body that sets the event at its n-th call."""
    count = itertools.count(1)
    done = threading.Event()

    def tick() -> None:
        if next(count) >= n:
            done.set()

    return tick, done


def _measure(publish: Any, start: Any, done: threading.Event, n: int, backlog: bool) -> dict[str, Any]:
    """Backlog: publish n (the publish rate), then start the workers (the consume rate).
    Otherwise: start the workers, then publish n (the end-to-end rate)."""
    values = [payload(i) for i in range(n)]
    out: dict[str, Any] = {}
    if backlog:
        t0 = time.perf_counter()
        for v in values:
            publish(v)
        out["publish_per_s"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        start()
        assert done.wait(600)
        out["consume_per_s"] = n / (time.perf_counter() - t0)
    else:
        start()
        t0 = time.perf_counter()
        for v in values:
            publish(v)
        assert done.wait(600)
        out["end_to_end_per_s"] = n / (time.perf_counter() - t0)
    return out


def _huey_run(n: int, threads: int, backlog: bool) -> dict[str, Any]:
    from huey import MemoryHuey

    huey = MemoryHuey("bench", results=False)
    tick, done = _counter(n)

    @huey.task()
    def noop(body: dict[str, Any]) -> None:
        body.get("id")
        tick()

    consumer = huey.create_consumer(workers=threads, worker_type="thread", initial_delay=0.001, backoff=1.0,
                                    max_delay=0.001, periodic=False)
    try:
        return _measure(noop, consumer.start, done, n, backlog)
    finally:
        consumer.stop(graceful=True)


def _dramatiq_run(n: int, threads: int, backlog: bool) -> dict[str, Any]:
    import dramatiq
    from dramatiq import Worker
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    tick, done = _counter(n)

    @dramatiq.actor(queue_name="bench", max_retries=0, broker=broker)
    def noop(body: dict[str, Any]) -> None:
        body.get("id")
        tick()

    worker = Worker(broker, worker_threads=threads, worker_timeout=1)
    try:
        return _measure(noop.send, worker.start, done, n, backlog)
    finally:
        worker.stop()
        broker.close()


def huey_memory(n: int, threads: int) -> dict[str, Any]:
    return {**_huey_run(n, threads, True), **_huey_run(n, threads, False)}


def dramatiq_stub(n: int, threads: int) -> dict[str, Any]:
    return {**_dramatiq_run(n, threads, True), **_dramatiq_run(n, threads, False)}


def peer(which: str, n: int, threads: int) -> dict[str, Any]:
    """One peer's figures, or {"missing": reason} when its package is not installed."""
    fn = {"huey": huey_memory, "dramatiq": dramatiq_stub}[which]
    try:
        return fn(n, threads)
    except ImportError as exc:
        return {"missing": f"{which} is not installed ({exc}); pip install 'lua-queue-runtime[bench]'"}
