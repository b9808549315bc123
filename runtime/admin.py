"""Operator tools that connect to an app's drivers without starting any consumer (SPEC §8):
`runtime inspect` (per queue counts) and `runtime dlq list|replay|purge` (dead letters).

Only drivers whose queues live outside the process can be looked into; the memory driver's
queues exist only inside a running `runtime run`, and these tools say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .app import App
from .drivers import driver_class
from .drivers.catalog import driver_key
from .errors import EntryNotFound, RuntimeHostError
from .queue.driver import Delivery, Driver, DriverConsumer
from .queue.message import Message
from .registry import DriverSpec, QueueSpec

RESERVED = ("x_dead_letter_reason", "x_original_queue", "x_attempts")
BATCH = 500


class InProcessOnly(RuntimeHostError):
    """The queue lives inside a running process (memory driver): nothing to see from outside."""


@dataclass
class Connected:
    """An app's drivers, opened, with every queue declared."""

    app: App
    drivers: dict[str, Driver]

    def driver_of(self, queue: QueueSpec) -> Driver:
        return self.drivers[queue.driver]


def in_process_only(app: App, queue: QueueSpec) -> bool:
    spec = app.registry.get(queue.driver, DriverSpec)
    return spec is not None and not driver_class(spec.kind).capabilities.shared


@contextmanager
def connect(app: App, queues: list[QueueSpec]) -> Iterator[Connected]:
    """Open the drivers of `queues` (those kept outside the process) and declare the queues."""
    drivers: dict[str, Driver] = {}
    try:
        for queue in queues:
            if in_process_only(app, queue):
                continue
            driver = drivers.get(queue.driver)
            if driver is None:
                spec = app.registry.get(queue.driver, DriverSpec)
                assert spec is not None
                driver = driver_class(spec.kind)(spec.id, spec.options, app_dir=app.registry.app_dir)
                driver.open()
                drivers[queue.driver] = driver
            driver.declare(queue.queue_name, dict(queue.driver_options.get(driver_key(driver.kind), {}) or {}))
        yield Connected(app, drivers)
    finally:
        for driver in drivers.values():
            driver.close()


# -- inspect ----------------------------------------------------------------------------------

def inspect(app: App) -> list[dict[str, Any]]:
    """One row per queue: its counts (None for in-process queues) and its dead-letter queue's."""
    queues = sorted(app.registry.of_type(QueueSpec), key=lambda q: q.id)
    rows: list[dict[str, Any]] = []
    with connect(app, queues) as conn:
        counts: dict[str, dict[str, Any]] = {}
        for q in queues:
            if in_process_only(app, q):
                counts[q.id] = {"ready": None, "in_flight": None, "delayed": None}
                continue
            st = conn.driver_of(q).stats(q.queue_name)
            counts[q.id] = {"ready": st.ready, "in_flight": st.in_flight, "delayed": st.delayed}
        for q in queues:
            dl = q.dead_letter
            dl_counts = counts.get(dl.queue) if dl else None
            rows.append({"queue": q.id, "driver": q.driver, "in_process_only": in_process_only(app, q),
                         **counts[q.id], "dead_letter_queue": dl.queue if dl else None,
                         "dead_letters": dl_counts["ready"] if dl_counts else None})
    return rows


# -- dead letters -------------------------------------------------------------------------------

def dead_letter_queue(app: App, queue_id: str) -> QueueSpec:
    full = app.registry.resolve(queue_id)
    spec = app.registry.get(full, QueueSpec)
    if spec is None:
        raise EntryNotFound(f"queue '{queue_id}' not found")
    if in_process_only(app, spec):
        kind = app.registry.entries[spec.driver].kind
        raise InProcessOnly(f"queue {spec.id} is on {kind} {spec.driver}: its messages exist only inside a running "
                            "`runtime run`, so there is nothing to see from outside")
    return spec


@contextmanager
def _taking(conn: Connected, spec: QueueSpec, ids: set[str] | None,
            limit: int | None) -> Iterator[tuple[DriverConsumer, list[Delivery]]]:
    """Take the queue's dead letters (those with `ids`, or all), up to `limit`; whatever the
    caller does not settle goes back at the end, unchanged."""
    driver = conn.driver_of(spec)
    consumer = driver.consume(spec.queue_name, "runtime:dlq", BATCH)
    chosen: list[Delivery] = []
    fetched: list[Delivery] = []  # in queue order, to give back in that order
    try:
        while limit is None or len(chosen) < limit:
            got = consumer.fetch(BATCH, 0)
            if not got:
                break
            fetched += got
            for d in got:
                if (ids is None or d.message.id in ids) and (limit is None or len(chosen) < limit):
                    chosen.append(d)
            if ids is not None and len(chosen) == len(ids):
                break
        yield consumer, chosen
    finally:
        consumer.release(fetched)  # what was settled is refused here, the rest goes back in order
        consumer.close()


def list_dead_letters(app: App, queue_id: str, ids: set[str] | None, limit: int | None) -> list[dict[str, Any]]:
    spec = dead_letter_queue(app, queue_id)
    with connect(app, [spec]) as conn, _taking(conn, spec, ids, limit) as (_, taken):
        return [_describe(d) for d in taken]


def replay(app: App, queue_id: str, ids: set[str] | None, limit: int | None) -> list[dict[str, Any]]:
    """Move dead letters back to their original queue, attempts reset, other headers kept.
    Each is published there before it is removed here: a crash in between duplicates it,
    never loses it."""
    spec = dead_letter_queue(app, queue_id)
    done: list[dict[str, Any]] = []
    with connect(app, [spec]) as conn:
        with _taking(conn, spec, ids, limit) as (consumer, taken):
            targets: dict[str, QueueSpec] = {}
            for d in taken:
                original = str(d.message.headers.get("x_original_queue") or "")
                target = targets.get(original) or app.registry.get(original, QueueSpec)
                if target is None:
                    done.append({**_describe(d), "replayed": False,
                                 "error": f"original queue '{original}' is not in this app"})
                    continue
                targets[original] = target
            with connect(app, list(targets.values())) as out:
                for d in taken:
                    original = str(d.message.headers.get("x_original_queue") or "")
                    target = targets.get(original)
                    if target is None:
                        continue
                    headers = {k: v for k, v in d.message.headers.items() if k not in RESERVED}
                    out.driver_of(target).publish(target.queue_name, [Message(d.message.body, headers, d.message.id)],
                                                  30.0, force=True)
                    consumer.ack(d)
                    done.append({**_describe(d), "replayed": True, "to": target.id})
    return done


def purge(app: App, queue_id: str, ids: set[str] | None, limit: int | None) -> int:
    spec = dead_letter_queue(app, queue_id)
    with connect(app, [spec]) as conn, _taking(conn, spec, ids, limit) as (consumer, taken):
        for d in taken:
            consumer.ack(d)
        return len(taken)


def _describe(d: Delivery) -> dict[str, Any]:
    h = d.message.headers
    ts = h.get("timestamp")
    return {"id": d.message.id, "reason": h.get("x_dead_letter_reason"), "attempts": h.get("x_attempts"),
            "original_queue": h.get("x_original_queue"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts))) if isinstance(ts, (int, float))
            else None}

