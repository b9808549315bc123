"""`python -m benchmarks.redis_bench`: the Redis Streams driver next to Dramatiq's Redis broker
and Celery on Redis, measured in the same run against the same server, each measurement in a
fresh process.

  python -m benchmarks.redis_bench                       # N = 20,000, the server at 127.0.0.1:6379
  python -m benchmarks.redis_bench --n 2000              # quick
  python -m benchmarks.redis_bench --url redis://host:6379/0 --repeat 3 --json out.json

Every system gets its own key prefix on the server (ours `key_prefix`, Dramatiq `namespace`,
Celery `global_keyprefix`), deleted after each measurement: nothing else on the server is
touched. All three settle after the work (Celery with `task_acks_late`), no results stored.

* consume: N no-op messages already in the queue (not timed), then consumed by 4 worker
  threads with 64 prefetched, until the last is settled. Ours twice: the product path (a
  `runtime` app, a Lua no-op handler, concurrency 4, prefetch 64: Lua call, JSON decode, the
  consumer pool) and the driver alone (4 threads sharing one DriverConsumer like the pool,
  no Lua). Dramatiq: `Worker(worker_threads=4)` with `queue_prefetch = 64`, a no-op actor.
  Celery: a thread-pool worker of 4 with `worker_prefetch_multiplier = 16`, a no-op task,
  timed from `worker_ready`.
* end to end: one publisher thread publishing N, one per call, while the same consumers run;
  time until the last is settled. Ours: the driver with 4 pool-like threads.
* publish: 4 threads publishing N messages in all, one per call.

Needs `pip install 'lua-queue-runtime[redis,bench]'` (dramatiq[redis], celery[redis]).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .common import driver_pool, pool_end_to_end, threads_publishing

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"id": 1, "numbers": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "text": "hello"}'
PREFETCH = 64
THREADS = 4
REPEAT = 1


def _done_after(n: int) -> tuple[Any, threading.Event, list[float]]:
    """A counter that sets the event at its n-th call, recording when."""
    counter = itertools.count(1)
    done = threading.Event()
    at: list[float] = []

    def tick() -> None:
        if next(counter) == n:
            at.append(time.perf_counter())
            done.set()

    return tick, done, at


# -- ours ------------------------------------------------------------------------------------

def _driver(url: str, prefix: str) -> Any:
    from runtime.drivers.redis import RedisDriver

    d = RedisDriver("bench:redis", {"url": url, "key_prefix": prefix})
    d.open()
    d.declare("q", {})
    return d


def _pool(consumer: Any, threads: int, n: int) -> list[threading.Thread]:
    return driver_pool(consumer, threads, n, PREFETCH)


def _preload(d: Any, n: int) -> None:
    from runtime.queue.message import Message

    for i in range(0, n, 1000):
        d.publish("q", [Message.new(BODY) for _ in range(min(1000, n - i))])


def ours_driver_consume(url: str, prefix: str, n: int) -> dict[str, Any]:
    d = _driver(url, prefix)
    _preload(d, n)
    consumer = d.consume("q", "bench", PREFETCH)
    t0 = time.perf_counter()
    for t in _pool(consumer, THREADS, n):
        t.join()
    consumer.close()
    seconds = time.perf_counter() - t0
    stats = d.stats("q")
    assert (stats.ready, stats.in_flight, stats.delayed) == (0, 0, 0), stats
    d.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


APP = """
namespace: bench
entries:
  - name: rd
    kind: queue.driver.redis
    url: "{url}"
    key_prefix: "{prefix}"
  - name: q
    kind: queue.queue
    driver: rd
  - name: noop
    kind: function.lua
    source: "return function(body) end"
  - name: c
    kind: queue.consumer
    queue: q
    func: noop
    concurrency: {threads}
    prefetch: {prefetch}
    lifecycle: {{auto_start: true}}
"""


def ours_app_consume(url: str, prefix: str, n: int) -> dict[str, Any]:
    """The product path: a runtime app with a Lua no-op consumer."""
    from runtime import App

    with tempfile.TemporaryDirectory(prefix="rt-redis-bench-") as tmp:
        Path(tmp, "app.yaml").write_text(textwrap.dedent(APP).format(url=url, prefix=prefix, threads=THREADS,
                                                                     prefetch=PREFETCH))
        d = _driver(url, prefix)
        _preload(d, n)
        app = App.load(tmp)
        t0 = time.perf_counter()
        app.start()
        tick = threading.Event()
        while app.consumer_stats()["bench:c"]["acked"] < n:
            tick.wait(0.002)
        seconds = time.perf_counter() - t0
        app.stop(10)
        stats = d.stats("q")
        assert (stats.ready, stats.in_flight, stats.delayed) == (0, 0, 0), stats
        d.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


def ours_end_to_end(url: str, prefix: str, n: int) -> dict[str, Any]:
    from runtime.queue.message import Message

    d = _driver(url, prefix)
    consumer = d.consume("q", "bench", PREFETCH)

    def publish_all() -> None:
        for _ in range(n):
            d.publish("q", [Message.new(BODY)])

    seconds, published = pool_end_to_end(consumer, publish_all, THREADS, n, PREFETCH)
    consumer.close()
    d.close()
    return {"end_to_end_per_s": n / seconds, "publish_per_s": n / published, "seconds": seconds}


def _threads_publishing(n: int, send: Any) -> float:
    return threads_publishing(send, n // THREADS, THREADS)


def ours_publish(url: str, prefix: str, n: int) -> dict[str, Any]:
    from runtime.queue.message import Message

    d = _driver(url, prefix)
    seconds = _threads_publishing(n, lambda: d.publish("q", [Message.new(BODY)]))
    assert d.stats("q").ready == n // THREADS * THREADS
    d.close()
    return {"publish_per_s": n // THREADS * THREADS / seconds, "seconds": seconds}


# -- Dramatiq --------------------------------------------------------------------------------

def _dramatiq(url: str, prefix: str, n: int) -> tuple[Any, Any, threading.Event, list[float]]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url, namespace=prefix.rstrip(":"))
    dramatiq.set_broker(broker)
    tick, done, at = _done_after(n)

    @dramatiq.actor(queue_name="q", max_retries=0, broker=broker)
    def noop(body: str) -> None:
        tick()

    return broker, noop, done, at


def _dramatiq_worker(broker: Any) -> Any:
    from dramatiq import Worker

    w = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    w.queue_prefetch = PREFETCH
    return w


def dramatiq_consume(url: str, prefix: str, n: int) -> dict[str, Any]:
    broker, noop, done, at = _dramatiq(url, prefix, n)
    body = BODY.decode()
    for _ in range(n):
        noop.send(body)
    w = _dramatiq_worker(broker)
    t0 = time.perf_counter()
    w.start()
    assert done.wait(600)
    seconds = at[0] - t0
    w.stop()
    broker.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


def dramatiq_end_to_end(url: str, prefix: str, n: int) -> dict[str, Any]:
    broker, noop, done, at = _dramatiq(url, prefix, n)
    body = BODY.decode()
    w = _dramatiq_worker(broker)
    w.start()
    t0 = time.perf_counter()
    for _ in range(n):
        noop.send(body)
    published = time.perf_counter() - t0
    assert done.wait(600)
    seconds = at[0] - t0
    w.stop()
    broker.close()
    return {"end_to_end_per_s": n / seconds, "publish_per_s": n / published, "seconds": seconds}


def dramatiq_publish(url: str, prefix: str, n: int) -> dict[str, Any]:
    broker, noop, _, _ = _dramatiq(url, prefix, n)
    body = BODY.decode()
    seconds = _threads_publishing(n, lambda: noop.send(body))
    broker.close()
    return {"publish_per_s": n // THREADS * THREADS / seconds, "seconds": seconds}


# -- Celery ----------------------------------------------------------------------------------

def _celery(url: str, prefix: str, n: int) -> tuple[Any, Any, threading.Event, list[float]]:
    from celery import Celery

    app = Celery("bench", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_acks_late=True, worker_prefetch_multiplier=PREFETCH // THREADS,
                    broker_transport_options={"global_keyprefix": prefix}, task_default_queue="q",
                    worker_hijack_root_logger=False, worker_redirect_stdouts=False,
                    broker_connection_retry_on_startup=True)
    tick, done, at = _done_after(n)

    @app.task(name="noop")
    def noop(body: str) -> None:
        tick()

    return app, noop, done, at


def _celery_run(app: Any, until: threading.Event, on_ready: Any) -> None:
    """Run a thread-pool worker in this (main) thread; exits the process when `until` is set."""
    from celery import signals

    signals.worker_ready.connect(lambda **_: on_ready(), weak=False)
    w = app.Worker(pool="threads", concurrency=THREADS, without_heartbeat=True, without_mingle=True,
                   without_gossip=True, loglevel="WARNING", quiet=True)
    w.start()


def _finish(result: dict[str, Any]) -> None:
    os.write(1, (json.dumps(result) + "\n").encode())  # Celery redirects sys.stdout to its logger
    os._exit(0)  # a Celery worker in the main thread: the quickest clean way out of a measurement


def celery_consume(url: str, prefix: str, n: int) -> dict[str, Any]:
    app, noop, done, at = _celery(url, prefix, n)
    body = BODY.decode()
    for _ in range(n):
        noop.delay(body)
    t0: list[float] = []

    def ready() -> None:
        t0.append(time.perf_counter())

        def wait() -> None:
            done.wait(600)
            seconds = at[0] - t0[0]
            _finish({"consume_per_s": n / seconds, "seconds": seconds})
        threading.Thread(target=wait, daemon=True).start()

    _celery_run(app, done, ready)
    raise RuntimeError("the Celery worker stopped before the measurement ended")


def celery_end_to_end(url: str, prefix: str, n: int) -> dict[str, Any]:
    app, noop, done, at = _celery(url, prefix, n)
    body = BODY.decode()

    def ready() -> None:
        def run() -> None:
            t0 = time.perf_counter()
            for _ in range(n):
                noop.delay(body)
            published = time.perf_counter() - t0
            done.wait(600)
            seconds = at[0] - t0
            _finish({"end_to_end_per_s": n / seconds, "publish_per_s": n / published, "seconds": seconds})
        threading.Thread(target=run, daemon=True).start()

    _celery_run(app, done, ready)
    raise RuntimeError("the Celery worker stopped before the measurement ended")


def celery_publish(url: str, prefix: str, n: int) -> dict[str, Any]:
    app, noop, _, _ = _celery(url, prefix, n)
    body = BODY.decode()
    noop.delay(body)  # connect first (not timed)
    seconds = _threads_publishing(n, lambda: noop.delay(body))
    return {"publish_per_s": n // THREADS * THREADS / seconds, "seconds": seconds}


# -- running ---------------------------------------------------------------------------------

def run_in_this_process(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return globals()[name](**kwargs)  # type: ignore[no-any-return]


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as r:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])


def in_subprocess(name: str, url: str, n: int) -> dict[str, Any]:
    runs = []
    for _ in range(REPEAT):
        prefix = f"bench:{uuid.uuid4().hex[:12]}:"
        code = ("import json, sys; from benchmarks.redis_bench import run_in_this_process; "
                "print(json.dumps(run_in_this_process(sys.argv[1], json.loads(sys.argv[2]))), flush=True)")
        try:
            out = subprocess.run([sys.executable, "-c", code, name, json.dumps({"url": url, "prefix": prefix, "n": n})],
                                 capture_output=True, text=True, cwd=ROOT, timeout=900)
        finally:
            _delete_prefix(url, prefix)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_bench")
    parser.add_argument("--n", type=int, default=20_000, help="messages per measurement")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "redis_results.json")
    parser.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs of each")
    args = parser.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    try:
        import celery  # noqa: F401
        import dramatiq  # noqa: F401
    except ImportError:
        print("this benchmark compares with Dramatiq and Celery: pip install 'lua-queue-runtime[redis,bench]'",
              file=sys.stderr)
        return 2
    import redis

    with redis.Redis.from_url(args.url, socket_timeout=5) as r:
        version = r.info("server")["redis_version"]
    started = time.perf_counter()
    u, n = args.url, args.n
    results: dict[str, Any] = {"n": n, "repeat": REPEAT, "redis_version": version, "threads": THREADS,
                               "prefetch": PREFETCH}
    results["consume"] = {k: in_subprocess(f"{k}_consume", u, n)
                          for k in ("ours_app", "ours_driver", "dramatiq", "celery")}
    results["end_to_end"] = {k: in_subprocess(f"{k}_end_to_end", u, n) for k in ("ours", "dramatiq", "celery")}
    results["publish"] = {k: in_subprocess(f"{k}_publish", u, n) for k in ("ours", "dramatiq", "celery")}
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}  ({results['seconds']:.0f} s)")
    return 0


def print_table(results: dict[str, Any]) -> None:
    best = f", best of {results['repeat']}" if results.get("repeat", 1) > 1 else ""
    print(f"Redis Streams driver vs Dramatiq RedisBroker vs Celery (Redis): {results['n']:,} no-op messages per "
          f"run{best}, Redis {results['redis_version']}, {results['threads']} threads, prefetch "
          f"{results['prefetch']}\n")
    print(f"  {'measure':30} {'ours msg/s':>11} {'dramatiq':>11} {'celery':>11} {'vs dramatiq':>12} {'vs celery':>10}")

    def row(label: str, ours: float, dq: float, cel: float) -> float:
        print(f"  {label:30} {ours:>11,.0f} {dq:>11,.0f} {cel:>11,.0f} {ours / dq:>11.1f}x {ours / cel:>9.1f}x")
        return ours / dq

    c = results["consume"]
    dq, cel = c["dramatiq"]["consume_per_s"], c["celery"]["consume_per_s"]
    app_ratio = row("consume (app, Lua no-op)", c["ours_app"]["consume_per_s"], dq, cel)
    drv_ratio = row("consume (driver alone)", c["ours_driver"]["consume_per_s"], dq, cel)
    e = results["end_to_end"]
    row("end to end", e["ours"]["end_to_end_per_s"], e["dramatiq"]["end_to_end_per_s"],
        e["celery"]["end_to_end_per_s"])
    row("  (its publisher, 1 thread)", e["ours"]["publish_per_s"], e["dramatiq"]["publish_per_s"],
        e["celery"]["publish_per_s"])
    p = results["publish"]
    row(f"publish, {results['threads']} threads", p["ours"]["publish_per_s"], p["dramatiq"]["publish_per_s"],
        p["celery"]["publish_per_s"])
    print(f"\n  [{'ok' if app_ratio >= 3 else 'MISSED'}] consume >= 3x Dramatiq: {app_ratio:.1f}x through the app "
          f"(Lua handler), {drv_ratio:.1f}x for the driver alone")


if __name__ == "__main__":
    sys.exit(main())
