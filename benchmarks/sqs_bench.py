"""`python -m benchmarks.sqs_bench`: the SQS driver's rates against a local SQS endpoint.

  python -m benchmarks.sqs_bench                       # N = 300, moto's server started here
  python -m benchmarks.sqs_bench --n 100               # quick
  python -m benchmarks.sqs_bench --endpoint http://127.0.0.1:9324   # ElasticMQ, LocalStack, ...

There is no target and no comparison: the local endpoint is a test double, so these figures
measure it more than the driver. moto's server takes milliseconds per message, and more the
more messages its queue holds (it scans the queue on every call: rates at N = 2,000 are a
tenth of those at N = 300), so compare figures only at the same N. They show that the
driver works end to end under load; real SQS is a network round trip per call (tens of ms),
which batching (10 per call) and concurrent long polls hide.

Without --endpoint, moto's server runs in a process of its own (not sharing this process's
GIL) on a free loopback port, with its receives serialised (moto hands one message to two
concurrent receives now and then; see tests/sqs_support.py). Each measurement runs in a fresh
process on queues of its own, deleted afterwards.

* publish: 4 threads publishing N messages in all, one per call (one SendMessageBatch of 1
  each), and the same in batches of 10 (`Driver.publish` of 10 messages: one call).
* consume: N messages already in the queue (not timed), consumed by 4 worker threads with
  64 prefetched, until the last is acked. Twice: the driver alone (4 threads sharing one
  DriverConsumer like the consumer pool) and the product path (a `runtime` app with a Lua
  no-op handler, concurrency 4, prefetch 64).
* end to end: one thread publishing N in batches of 10 while the driver-alone consumers run.

Needs `pip install 'lua-queue-runtime[sqs]' 'moto[server]'` (both are in the `test` extra).
"""

from __future__ import annotations

import argparse
import json
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
REGION = "us-east-1"


def _options(endpoint: str) -> dict[str, Any]:
    return {"config": {"id": "bench:aws", "region": REGION, "access_key_id": "bench", "secret_access_key": "bench"},
            "endpoint": endpoint}


def _driver(endpoint: str, queue: str) -> Any:
    from runtime.drivers.sqs import SqsDriver

    d = SqsDriver("bench:sqs", _options(endpoint))
    d.open()
    d.declare(queue, {})
    return d


def _pool(consumer: Any, threads: int, n: int) -> list[threading.Thread]:
    return driver_pool(consumer, threads, n, PREFETCH)


def _preload(d: Any, queue: str, n: int) -> None:
    from runtime.queue.message import Message

    for i in range(0, n, 10):
        d.publish(queue, [Message.new(BODY) for _ in range(min(10, n - i))])


def _settled(d: Any, queue: str) -> None:
    deadline = time.monotonic() + 10
    while True:  # acks are deleted by the background thread within a few ms
        st = d.stats(queue)
        if (st.ready, st.in_flight, st.delayed) == (0, 0, 0):
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.01)


def driver_consume(endpoint: str, queue: str, n: int) -> dict[str, Any]:
    d = _driver(endpoint, queue)
    try:
        _preload(d, queue, n)
        consumer = d.consume(queue, "bench", PREFETCH, {"wait_time": 1})
        t0 = time.perf_counter()
        for t in _pool(consumer, THREADS, n):
            t.join()
        seconds = time.perf_counter() - t0
        consumer.close()
        _settled(d, queue)
    finally:
        d.delete_queue(queue)
        d.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


APP = """
namespace: bench
entries:
  - name: aws
    kind: config.aws
    region: {region}
    access_key_id: bench
    secret_access_key: bench
  - name: sqs
    kind: queue.driver.sqs
    config: aws
    endpoint: "{endpoint}"
  - name: q
    kind: queue.queue
    driver: sqs
    queue_name: "{queue}"
  - name: noop
    kind: function.lua
    source: "return function(body) end"
  - name: c
    kind: queue.consumer
    queue: q
    func: noop
    concurrency: {threads}
    prefetch: {prefetch}
    driver_options:
      sqs: {{wait_time: 1}}
    lifecycle: {{auto_start: true}}
"""


def app_consume(endpoint: str, queue: str, n: int) -> dict[str, Any]:
    """The product path: a runtime app with a Lua no-op consumer."""
    from runtime import App

    d = _driver(endpoint, queue)
    try:
        with tempfile.TemporaryDirectory(prefix="rt-sqs-bench-") as tmp:
            Path(tmp, "app.yaml").write_text(textwrap.dedent(APP).format(
                region=REGION, endpoint=endpoint, queue=queue, threads=THREADS, prefetch=PREFETCH))
            _preload(d, queue, n)
            app = App.load(tmp)
            t0 = time.perf_counter()
            app.start()
            tick = threading.Event()
            while app.consumer_stats()["bench:c"]["acked"] < n:
                tick.wait(0.002)
            seconds = time.perf_counter() - t0
            app.stop(10)
            _settled(d, queue)
    finally:
        d.delete_queue(queue)
        d.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


def end_to_end(endpoint: str, queue: str, n: int) -> dict[str, Any]:
    from runtime.queue.message import Message

    d = _driver(endpoint, queue)
    try:
        consumer = d.consume(queue, "bench", PREFETCH, {"wait_time": 1})

        def publish_all() -> None:
            for i in range(0, n, 10):
                d.publish(queue, [Message.new(BODY) for _ in range(min(10, n - i))])

        seconds, published = pool_end_to_end(consumer, publish_all, THREADS, n, PREFETCH)
        consumer.close()
        _settled(d, queue)
    finally:
        d.delete_queue(queue)
        d.close()
    return {"end_to_end_per_s": n / seconds, "publish_per_s": n / published, "seconds": seconds}


def _publish(endpoint: str, queue: str, n: int, batch: int) -> dict[str, Any]:
    from runtime.queue.message import Message

    d = _driver(endpoint, queue)
    try:
        calls = n // batch // THREADS
        seconds = threads_publishing(lambda: d.publish(queue, [Message.new(BODY) for _ in range(batch)]), calls,
                                     THREADS)
        total = calls * batch * THREADS
        assert d.stats(queue).ready == total
    finally:
        d.delete_queue(queue)
        d.close()
    return {"publish_per_s": total / seconds, "seconds": seconds}


def publish_one(endpoint: str, queue: str, n: int) -> dict[str, Any]:
    return _publish(endpoint, queue, n, 1)


def publish_batched(endpoint: str, queue: str, n: int) -> dict[str, Any]:
    return _publish(endpoint, queue, n, 10)


MEASURES = ["publish_one", "publish_batched", "driver_consume", "app_consume", "end_to_end"]


# -- running ---------------------------------------------------------------------------------

def run_in_this_process(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if name not in MEASURES:
        raise ValueError(f"no measurement {name!r}")
    return globals()[name](**kwargs)  # type: ignore[no-any-return]


def in_subprocess(name: str, endpoint: str, n: int) -> dict[str, Any]:
    queue = f"bench{uuid.uuid4().hex[:12]}"
    code = ("import json, sys; from benchmarks.sqs_bench import run_in_this_process; "
            "print(json.dumps(run_in_this_process(sys.argv[1], json.loads(sys.argv[2]))), flush=True)")
    out = subprocess.run([sys.executable, "-c", code, name, json.dumps({"endpoint": endpoint, "queue": queue, "n": n})],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


SERVE = """
import logging, sys, threading
sys.path.insert(0, sys.argv[1])
logging.getLogger("werkzeug").setLevel(logging.WARNING)
import sqs_support
sqs_support._serialize_moto_receives()
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the parent closes our stdin
"""


def start_moto() -> tuple[subprocess.Popen[str], str]:
    """moto's server in a process of its own; (the process, its endpoint URL)."""
    p = subprocess.Popen([sys.executable, "-c", SERVE, str(ROOT / "tests")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if not line:
        p.kill()
        raise RuntimeError("moto's server did not start (pip install 'moto[server]')")
    return p, f"http://{line}"


def stop_moto(p: subprocess.Popen[str]) -> None:
    for pipe in (p.stdin, p.stdout):
        if pipe is not None:
            pipe.close()  # its stdin closed: it exits
    p.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqs_bench")
    parser.add_argument("--n", type=int, default=300, help="messages per measurement")
    parser.add_argument("--endpoint", help="an SQS endpoint to use instead of starting moto's server")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "sqs_results.json")
    args = parser.parse_args()
    try:
        import boto3  # noqa: F401
    except ImportError:
        print("this benchmark needs boto3: pip install 'lua-queue-runtime[sqs]' 'moto[server]'", file=sys.stderr)
        return 2
    server = None
    endpoint = args.endpoint
    if endpoint is None:
        server, endpoint = start_moto()
    started = time.perf_counter()
    try:
        results: dict[str, Any] = {"n": args.n, "endpoint": "moto (started here)" if server else endpoint,
                                   "threads": THREADS, "prefetch": PREFETCH}
        for name in MEASURES:
            results[name] = in_subprocess(name, endpoint, args.n)
    finally:
        if server is not None:
            stop_moto(server)
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}  ({results['seconds']:.0f} s)")
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"SQS driver on {results['endpoint']}: {results['n']:,} messages per run, {results['threads']} threads, "
          f"prefetch {results['prefetch']} (no target: the local endpoint is a test double)\n")
    rows = [
        ("publish, 4 threads, 1 per call", results["publish_one"]["publish_per_s"]),
        ("publish, 4 threads, 10 per call", results["publish_batched"]["publish_per_s"]),
        ("consume (driver alone)", results["driver_consume"]["consume_per_s"]),
        ("consume (app, Lua no-op)", results["app_consume"]["consume_per_s"]),
        ("end to end", results["end_to_end"]["end_to_end_per_s"]),
        ("  (its publisher, 10 per call)", results["end_to_end"]["publish_per_s"]),
    ]
    print(f"  {'measure':34} {'msg/s':>9}")
    for label, rate in rows:
        print(f"  {label:34} {rate:>9,.0f}")


if __name__ == "__main__":
    sys.exit(main())
