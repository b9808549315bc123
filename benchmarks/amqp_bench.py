"""`python -m benchmarks.amqp_bench`: the AMQP driver next to Dramatiq's RabbitMQ broker, on the
local RabbitMQ, measured in the same run (each measurement in a fresh process).

  python -m benchmarks.amqp_bench                 # N = 20,000
  python -m benchmarks.amqp_bench --n 2000        # quick
  python -m benchmarks.amqp_bench --json out.json --url amqp://guest:guest@127.0.0.1:5672/

What is measured (classic durable queues, persistent messages, prefetch 64 on both sides):

* consume (noop): N messages already in the queue (published before the clock starts), then
  consumed until all are acked. Ours: `runtime run`'s machinery (App, a consumer with 4
  workers, a Lua handler `return function(body) end`). Dramatiq: a Worker with 4 threads and
  a no-op actor (its default middleware), `prefetch=64`.
* publish with confirms: 8 threads publishing N messages in all, one per call, each call
  returning only once the broker confirmed it. Ours: `App.publish`. Dramatiq:
  `RabbitmqBroker(confirm_delivery=True)` and `actor.send`.
* end to end: one thread publishes N messages (one call each, confirmed) while the consumer
  runs; time from the first publish until the last message is acked.

Needs `pip install 'lua-queue-runtime[bench]'` (dramatiq[rabbitmq]). Figures, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .common import threads_publishing

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "64"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
PUBLISHERS = 8
BODY = {"id": 1, "numbers": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "text": "hello"}

APP = """
namespace: bench
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: "{url}"
    lifecycle: {{auto_start: true}}
  - name: q
    kind: queue.queue
    driver: rabbit
    queue_name: "{queue}"
    retry: {{initial_delay: 0}}
  - name: noop
    kind: function.lua
    source: "return function(body) end"
  - name: c
    kind: queue.consumer
    queue: q
    func: noop
    concurrency: {workers}
    prefetch: {prefetch}
    lifecycle: {{auto_start: {start}}}
"""


def _app(folder: Path, queue: str, start: bool) -> Any:
    from runtime import App

    (folder / "app.yaml").write_text(APP.format(url=URL, queue=queue, workers=WORKERS, prefetch=PREFETCH,
                                                start="true" if start else "false"))
    return App.load(folder)


def _delete(queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        ch.queue_delete(queue)
    finally:
        conn.close()


def _publish_threads(publish: Any, n: int, threads: int) -> float:
    per = n // threads
    return per * threads / threads_publishing(publish, per, threads)


def ours(mode: str, n: int) -> dict[str, Any]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            if mode == "publish":
                app = _app(folder, queue, start=False)
                app.start()
                try:
                    rate = _publish_threads(lambda: app.publish("bench:q", BODY), n, PUBLISHERS)
                finally:
                    app.stop()
                return {"publish_per_s": rate}
            if mode == "consume":
                loader = _app(folder, queue, start=False)
                loader.start()
                _publish_threads(lambda: loader.publish("bench:q", BODY), n, PUBLISHERS)
                loader.stop()
                app = _app(folder, queue, start=True)
                start = time.perf_counter()
                app.start()
                assert app.wait_idle(600), "did not finish"
                elapsed = time.perf_counter() - start
                acked = app.stats()["consumers"]["bench:c"]["acked"]
                app.stop()
                return {"consume_per_s": acked / elapsed, "acked": acked}
            app = _app(folder, queue, start=True)
            app.start()
            start = time.perf_counter()
            for _ in range(n):
                app.publish("bench:q", BODY)
            assert app.wait_idle(600)
            elapsed = time.perf_counter() - start
            acked = app.stats()["consumers"]["bench:c"]["acked"]
            app.stop()
            return {"end_to_end_per_s": acked / elapsed, "acked": acked}
        finally:
            _delete(queue)


def dramatiq_side(mode: str, n: int) -> dict[str, Any]:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    queue = f"bench-d-{uuid.uuid4().hex[:8]}"
    broker = RabbitmqBroker(url=URL, confirm_delivery=True)
    dramatiq.set_broker(broker)
    counter = [0]
    lock = threading.Lock()
    all_done = threading.Event()

    @dramatiq.actor(queue_name=queue, max_retries=0, broker=broker)
    def noop(body: dict[str, Any]) -> None:
        with lock:
            counter[0] += 1
            if counter[0] >= target[0]:
                all_done.set()

    target = [n]
    try:
        if mode == "publish":
            rate = _publish_threads(lambda: noop.send(BODY), n, PUBLISHERS)
            return {"publish_per_s": rate}
        if mode == "consume":
            _publish_threads(lambda: noop.send(BODY), n, PUBLISHERS)
            target[0] = (n // PUBLISHERS) * PUBLISHERS
            worker = dramatiq.Worker(broker, worker_threads=WORKERS, worker_timeout=100)
            worker.queue_prefetch = PREFETCH
            start = time.perf_counter()
            worker.start()
            assert all_done.wait(600)
            elapsed = time.perf_counter() - start
            worker.stop()
            return {"consume_per_s": counter[0] / elapsed, "acked": counter[0]}
        worker = dramatiq.Worker(broker, worker_threads=WORKERS, worker_timeout=100)
        worker.queue_prefetch = PREFETCH
        worker.start()
        start = time.perf_counter()
        for _ in range(n):
            noop.send(BODY)
        assert all_done.wait(600)
        elapsed = time.perf_counter() - start
        worker.stop()
        return {"end_to_end_per_s": counter[0] / elapsed, "acked": counter[0]}
    finally:
        for q in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            try:
                broker.channel.queue_delete(q)
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        broker.close()


def in_subprocess(side: str, mode: str, n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.amqp_bench", "--one", side, mode, "--n", str(n)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{side} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        side, mode = args.one
        fn = ours if side == "ours" else dramatiq_side
        print(json.dumps(fn(mode, args.n)))
        return 0
    results: dict[str, Any] = {"n": args.n, "prefetch": PREFETCH, "workers": WORKERS}
    for mode, key in (("consume", "consume_per_s"), ("publish", "publish_per_s"), ("end_to_end", "end_to_end_per_s")):
        a = in_subprocess("ours", mode, args.n)
        b = in_subprocess("dramatiq", mode, args.n)
        results[mode] = {"ours": a[key], "dramatiq": b[key], "ratio": a[key] / b[key]}
        print(f"{mode:>11}: ours {a[key]:9.0f}/s   dramatiq {b[key]:9.0f}/s   ratio {a[key] / b[key]:.2f}x",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
