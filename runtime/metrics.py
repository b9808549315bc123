"""`runtime run --metrics HOST:PORT` (SPEC §8): Prometheus metrics at `/metrics`, with the
official `prometheus_client` library (the `metrics` extra).

Nothing is counted twice: a collector reads the runtime's own counters when Prometheus
scrapes (the consumer pools count anyway), so the per-message cost is only the handler
timing, which is on only while metrics are served. With `--processes N` the parent serves
one endpoint for the whole run, adding up what its worker processes report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConfigError
from .queue.consumer import DURATION_BUCKETS

log = logging.getLogger("runtime.metrics")
Snapshot = dict[str, Any]
COUNTERS = (("acked", "Messages acknowledged"), ("nacked", "Failed deliveries retried"),
            ("dead_lettered", "Messages moved to the dead-letter queue"), ("processed", "Deliveries handled"))


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("--metrics needs the 'metrics' extra (prometheus_client is not installed): "
                          "pip install 'lua-queue-runtime[metrics]'") from None
    return prometheus_client


def serve(address: tuple[str, int], snapshot: Callable[[], Snapshot]) -> tuple[Any, int]:
    """Serve the metrics; returns (server, port). The server runs in a daemon thread."""
    client = _client()
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry

    class RuntimeCollector(Collector):
        def collect(self) -> Iterator[Any]:
            snap = snapshot()
            consumers = snap.get("consumers", {})
            for key, doc in COUNTERS:
                family = CounterMetricFamily(f"runtime_consumer_{key}", doc, labels=["consumer"])
                for cid, c in sorted(consumers.items()):
                    family.add_metric([cid], float(c.get(key, 0)))
                yield family
            for key, doc in (("in_flight", "Deliveries prefetched or running"), ("workers", "Worker threads")):
                gauge = GaugeMetricFamily(f"runtime_consumer_{key}", doc, labels=["consumer"])
                for cid, c in sorted(consumers.items()):
                    gauge.add_metric([cid], float(c.get(key, 0)))
                yield gauge
            hist = HistogramMetricFamily("runtime_handler_duration_seconds", "Time a handler took per delivery",
                                         labels=["consumer"])
            for cid, c in sorted(consumers.items()):
                counts = c.get("durations")
                if counts:
                    cumulative, buckets = 0, []
                    for bound, n in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
                        cumulative += n
                        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
                    hist.add_metric([cid], buckets, float(c.get("duration_sum", 0.0)))
            yield hist
            for key, doc in (("ready", "Messages waiting in the queue"), ("in_flight", "Messages handed to consumers"),
                             ("delayed", "Messages waiting for a retry or publish delay")):
                gauge = GaugeMetricFamily(f"runtime_queue_{key}", doc, labels=["queue"])
                for qid, q in sorted(snap.get("queues", {}).items()):
                    if q.get(key) is not None:
                        gauge.add_metric([qid], float(q[key]))
                yield gauge
            reconnects = CounterMetricFamily("runtime_driver_reconnects", "Connections re-established",
                                             labels=["driver"])
            connected = GaugeMetricFamily("runtime_driver_connected", "1 while the driver's engine is reachable",
                                          labels=["driver"])
            for did, d in sorted(snap.get("drivers", {}).items()):
                reconnects.add_metric([did], float(d.get("reconnects", 0)))
                connected.add_metric([did], 1.0 if d.get("connected") else 0.0)
            yield reconnects
            yield connected
            restarts = CounterMetricFamily("runtime_worker_restarts", "Worker processes restarted (--processes)")
            restarts.add_metric([], float(snap.get("worker_restarts", 0)))
            yield restarts

    registry = CollectorRegistry()
    registry.register(RuntimeCollector())
    server, _thread = client.start_http_server(address[1], addr=address[0], registry=registry)
    port = int(server.server_port)
    log.info("metrics at http://%s:%d/metrics", address[0], port)
    return server, port


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Add up the consumer counts and handler durations of several processes."""
    out: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for cid, c in snap.get("consumers", {}).items():
            total = out.setdefault(cid, {})
            for key, value in c.items():
                if key == "durations":
                    prev = total.get(key)
                    total[key] = [a + b for a, b in zip(prev, value, strict=True)] if prev else list(value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
    return {"consumers": out}
