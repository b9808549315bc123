"""The benchmark scenarios. Each function runs one measurement in this process and returns
a dict of figures; `python -m benchmarks` runs them (each in a fresh subprocess, so peak
RSS is per scenario) and compares with the raw baseline measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime import App
from runtime.lifecycle.services import ConsumerService
from runtime.registry import ConsumerSpec

from .baseline import raw_end_to_end_rate, raw_rate
from .common import COMPUTE_HANDLER, NOOP_HANDLER, cleanup, payload, peak_rss_mib, rss_mib, write_app
from .peers import peer

LATENCY_HANDLER = """
local queue = require("queue")
local time = require("time")
return function(body)
  local now = time.now()
  local sent = queue.message():header("timestamp")
  queue.publish("lat", {l = now - sent})
end
"""


def _wait(predicate: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        time.sleep(0.0005)


def calibrate_rounds(target_us: float = 200.0) -> int:
    """Rounds of the compute handler that take about `target_us` in LuaJIT here."""
    import lupa.luajit21 as lupa
    lua = lupa.LuaRuntime()
    rounds = 100
    while True:
        fn = lua.execute(COMPUTE_HANDLER.replace("{rounds}", str(rounds)))
        body = lua.table_from(payload(1), recursive=True)
        for _ in range(20):
            fn(body)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn(body)
        per_call_us = (time.perf_counter() - t0) / n * 1e6
        if per_call_us > target_us / 4:
            return max(1, int(rounds * target_us / per_call_us))
        rounds *= 4


def consume(handler: str, n: int, concurrency: int, prefetch: int, limits: str = "",
            driver: str = "memory") -> dict[str, Any]:
    """Publish n messages first (publish rate), then start the consumer (consume rate);
    then the same again with the consumer running while publishing (end-to-end rate).
    `limits`: consumer fields such as "timeout: 10s" or "memory_limit: 64MB"."""
    app = App.load(write_app(handler, concurrency=concurrency, prefetch=prefetch, auto_start_consumers=False,
                             limits=limits, driver=driver))
    app.start()
    t0 = time.perf_counter()
    for i in range(n):
        app.publish("b:q1", payload(i))
    publish_s = time.perf_counter() - t0
    spec = app.registry.get("b:c1", ConsumerSpec)
    assert spec is not None
    svc = ConsumerService(spec, app.router, app.new_sandbox)
    svc.start()  # workers load the handler before the clock starts
    pool = svc.pool
    assert pool is not None
    t0 = time.perf_counter()
    _wait(lambda: pool.stats()["acked"] >= n)
    consume_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        app.publish("b:q1", payload(i))
    _wait(lambda: pool.stats()["acked"] >= 2 * n)
    e2e_s = time.perf_counter() - t0
    svc.stop(10)
    cleanup(app)
    app.stop()
    return {"publish_per_s": n / publish_s, "consume_per_s": n / consume_s, "end_to_end_per_s": n / e2e_s,
            "peak_rss_mib": peak_rss_mib()}


def pipeline(n: int, concurrency: int, driver: str = "memory") -> dict[str, Any]:
    """Scenario 3: a handler that republishes to a second queue; both stages consumed."""
    app = App.load(write_app(NOOP_HANDLER, concurrency=concurrency, prefetch=100, stages=2, driver=driver))
    with app:
        t0 = time.perf_counter()
        for i in range(n):
            app.publish("b:q1", payload(i))
        _wait(lambda: app.stats()["consumers"]["b:c2"]["acked"] >= n)
        e2e_s = time.perf_counter() - t0
        cleanup(app)
    return {"end_to_end_per_s": n / e2e_s, "peak_rss_mib": peak_rss_mib()}


def latency(rate: float, seconds: float, concurrency: int) -> dict[str, Any]:
    """Scenario 4: publish-to-handler-start latency at a steady publish rate."""
    root = write_app(LATENCY_HANDLER, concurrency=concurrency, prefetch=10)
    yaml = (root / "app.yaml").read_text()
    (root / "app.yaml").write_text(yaml + "  - {name: lat, kind: queue.queue, driver: store, "
                                   "driver_options: {memory: {max_length: 1000000}}}\n")
    app = App.load(root)
    n = int(rate * seconds)
    with app:
        start = time.perf_counter()
        for i in range(n):
            target = start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            app.publish("b:q1", payload(i))
        _wait(lambda: app.stats()["queues"]["b:lat"]["ready"] >= n)
        achieved = n / (time.perf_counter() - start)
    bound = app.router.queues["b:lat"]
    values = []
    reader = bound.driver.consume(bound.name, "bench:reader", 10_000)
    while True:
        batch = reader.fetch(10_000, 0)
        if not batch:
            break
        values += [json.loads(d.message.body)["l"] * 1000 for d in batch]
    values.sort()

    def pct(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"messages": n, "rate_per_s": achieved, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": values[-1]}


def startup(seed: Path) -> dict[str, Any]:
    """Scenario 5a: `runtime run --until-idle` of the seed app with zero messages."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "runtime", "run", str(seed), "--until-idle", "--log-level", "warn"],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times)}


def idle_memory(concurrency: int) -> dict[str, Any]:
    """Scenario 5b: RSS per idle worker of a started consumer."""
    app = App.load(write_app(NOOP_HANDLER, concurrency=concurrency, prefetch=10))
    before = rss_mib()
    app.start()
    after = rss_mib()
    app.stop()
    return {"workers": concurrency, "rss_per_worker_mib": (after - before) / concurrency}


def baseline(handler: str, n: int, threads: int) -> dict[str, Any]:
    bodies = [json.dumps(payload(i)).encode() for i in range(n)]
    consume = raw_rate(handler, bodies, threads)
    return {"consume_per_s": consume,
            "end_to_end_per_s": raw_end_to_end_rate(handler, [payload(i) for i in range(n)], threads)}


def run_in_this_process(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    fn = {"consume": consume, "pipeline": pipeline, "latency": latency, "startup": startup,
          "idle_memory": idle_memory, "baseline": baseline, "peer": peer}[name]
    kwargs = dict(kwargs)
    rounds = kwargs.pop("rounds", None)
    if kwargs.get("handler") == "compute":
        kwargs["handler"] = COMPUTE_HANDLER.replace("{rounds}", str(rounds))
    elif "handler" in kwargs:
        kwargs["handler"] = NOOP_HANDLER
    if "seed" in kwargs:
        kwargs["seed"] = Path(kwargs["seed"])
    return fn(**kwargs)  # type: ignore[operator]


