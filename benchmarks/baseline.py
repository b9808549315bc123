"""The raw baseline (scenario 6): Python queue.Queue + worker threads, each with its own
lupa LuaJIT runtime, doing JSON string -> json.loads -> table_from -> the same Lua function.
No runtime code at all: the floor we compare ourselves with."""

from __future__ import annotations

import json
import queue
import threading
import time

import lupa.luajit21 as lupa


def raw_end_to_end_rate(handler_src: str, values: list[object], threads: int) -> float:
    """Messages per second from the first publish to the last handled, the host thread
    publishing (json.dumps, Queue.put) while `threads` workers consume."""
    q: queue.Queue[bytes | None] = queue.Queue()
    workers = _start_workers(handler_src, q, threads)
    t0 = time.perf_counter()
    for v in values:
        q.put(json.dumps(v).encode())
    for _ in range(threads):
        q.put(None)
    for w in workers:
        w.join()
    return len(values) / (time.perf_counter() - t0)


def _start_workers(handler_src: str, q: queue.Queue[bytes | None], threads: int) -> list[threading.Thread]:
    """`threads` workers, returned once each has its Lua state ready."""
    ready = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=_worker, args=(handler_src, q, ready)) for _ in range(threads)]
    for w in workers:
        w.start()
    ready.wait()
    return workers


def _worker(handler_src: str, q: queue.Queue[bytes | None], ready: threading.Barrier) -> None:
    lua = lupa.LuaRuntime()
    fn = lua.execute(handler_src)
    table_from = lua.table_from
    ready.wait()
    while True:
        item = q.get()
        if item is None:
            return
        fn(table_from(json.loads(item), recursive=True))


def raw_rate(handler_src: str, bodies: list[bytes], threads: int) -> float:
    """Messages per second for consuming every body once with `threads` workers."""
    q: queue.Queue[bytes | None] = queue.Queue()
    for b in bodies:
        q.put(b)
    for _ in range(threads):
        q.put(None)
    workers = _start_workers(handler_src, q, threads)
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return len(bodies) / (time.perf_counter() - t0)
