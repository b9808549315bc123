"""Shared pieces of the benchmarks: apps written to temp folders, RSS, timing helpers."""

from __future__ import annotations

import itertools
import json
import resource
import tempfile
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAYLOAD = {"numbers": list(range(1, 11)), "text": "hello"}

NOOP_HANDLER = "return function(body) local id = body.id end"
# ~200 µs of LuaJIT arithmetic per message on this machine kind (calibrated by `calibrate`).
COMPUTE_HANDLER = """
local rounds = {rounds}
return function(body)
  local s = 0
  local numbers = body.numbers
  for r = 1, rounds do
    for j = 1, #numbers do s = s + (body.id + r) * numbers[j] % 7 end
  end
  return s >= 0
end
"""


def payload(i: int) -> dict:
    return {"id": i, **PAYLOAD}


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / (1024 * 1024)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The driver entry of a benchmark app, per driver kind (the servers are the machine's own).
DRIVERS = {
    "memory": "{name: store, kind: queue.driver.memory, lifecycle: {auto_start: true}}",
    "sqlite": "{name: store, kind: queue.driver.sqlite, path: '{root}/queues.sqlite3', lifecycle: {auto_start: true}}",
    "redis": "{name: store, kind: queue.driver.redis, url: 'redis://127.0.0.1:6379/0', key_prefix: 'bench:{tag}:', "
             "lifecycle: {auto_start: true}}",
    "amqp": "{name: store, kind: queue.driver.amqp, url: 'amqp://guest:guest@127.0.0.1:5672/', "
            "lifecycle: {auto_start: true}}",
}


def write_app(handler: str, *, concurrency: int = 1, prefetch: int = 10, stages: int = 1,
              max_length: int = 1_000_000, auto_start_consumers: bool = True, limits: str = "",
              driver: str = "memory") -> Path:
    """A benchmark app: queues q1..qN (q_i's handler republishes to q_{i+1}), `handler` last,
    on a driver of `DRIVERS` (queues on a server get names of their own, gone a minute after
    the run on RabbitMQ, and are purged by `cleanup`)."""
    root = Path(tempfile.mkdtemp(prefix="rt-bench-"))
    tag = root.name.removeprefix("rt-bench-")
    entries = ["  - " + DRIVERS[driver].replace("{root}", str(root)).replace("{tag}", tag)]
    for s in range(1, stages + 1):
        options = {"memory": f"memory: {{max_length: {max_length}}}", "amqp": "amqp: {queue_expiry: 60s}"}.get(driver)
        name = f", queue_name: 'bench-{tag}-q{s}'" if driver == "amqp" else ""
        entries.append(f"  - {{name: q{s}, kind: queue.queue, driver: store{name}"
                       f"{', driver_options: {' + options + '}' if options else ''}}}")
        if s < stages:
            src = f'local queue = require("queue") return function(b) return queue.publish("q{s + 1}", b) end'
            mods = "[queue]"
        else:
            src, mods = handler, "[queue, time]"
        (root / f"h{s}.lua").write_text(src)
        entries.append(f"  - {{name: h{s}, kind: function.lua, source: 'file://h{s}.lua', modules: {mods}}}")
        entries.append(f"  - {{name: c{s}, kind: queue.consumer, queue: q{s}, func: h{s}, concurrency: {concurrency}, "
                       f"prefetch: {prefetch}, lifecycle: {{auto_start: {str(auto_start_consumers).lower()}}}"
                       f"{', ' + limits if limits else ''}}}")
    (root / "app.yaml").write_text("namespace: b\nentries:\n" + "\n".join(entries) + "\n")
    return root


def cleanup(app: object) -> None:
    """Purge the benchmark's queues (on a server they would otherwise stay)."""
    for bound in list(app.router.queues.values()):  # type: ignore[attr-defined]
        try:
            bound.driver.purge(bound.name)
        except Exception:  # noqa: BLE001 - best effort after a measurement
            pass


def driver_pool(consumer: Any, threads: int, n: int, prefetch: int) -> list[threading.Thread]:
    """Worker threads sharing one DriverConsumer like the consumer pool: a shared buffer, one
    refill (fetch of the free prefetch slots) at a time, each delivery acked."""
    buf: deque[Any] = deque()
    fetch_lock = threading.Lock()
    acked = itertools.count(1)
    done = threading.Event()

    def worker() -> None:
        pop, ack = buf.popleft, consumer.ack
        while not done.is_set():
            try:
                d = pop()
            except IndexError:
                with fetch_lock:
                    if not buf and not done.is_set():
                        buf.extend(consumer.fetch(max(1, prefetch - consumer.in_flight), 0.05))
                continue
            ack(d)
            if next(acked) >= n:
                done.set()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    return ts


def threads_publishing(send: Callable[[], object], calls: int, threads: int) -> float:
    """Seconds for `threads` threads, let go together, to make `calls` calls of `send` each
    (the first error of any thread is raised)."""
    go = threading.Event()
    errors: list[BaseException] = []

    def body() -> None:
        go.wait()
        try:
            for _ in range(calls):
                send()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=body) for _ in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    go.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def pool_end_to_end(consumer: Any, publish_all: Callable[[], object], threads: int, n: int,
                    prefetch: int) -> tuple[float, float]:
    """One thread runs `publish_all` while a `driver_pool` acks n messages: (seconds until
    the last ack, seconds the publisher took)."""
    published: list[float] = []

    def publisher() -> None:
        t = time.perf_counter()
        publish_all()
        published.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    workers = driver_pool(consumer, threads, n, prefetch)
    pub = threading.Thread(target=publisher)
    pub.start()
    pub.join()
    for t in workers:
        t.join()
    return time.perf_counter() - t0, published[0]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dedent(s: str) -> str:
    return textwrap.dedent(s).strip() + "\n"


def dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2))
