"""`python -m benchmarks.sqlite_bench`: the SQLite driver next to Huey's SQLite storage,
measured in the same run on the same machine, each measurement in a fresh process.

  python -m benchmarks.sqlite_bench                # N = 20,000 (under a minute here)
  python -m benchmarks.sqlite_bench --n 2000       # quick
  python -m benchmarks.sqlite_bench --json out.json
  python -m benchmarks.sqlite_bench --repeat 3     # best of 3 of everything (a busy machine)

What is measured, for synchronous=full and synchronous=normal (Huey: `fsync=True` is FULL;
for NORMAL its storage is subclassed to set the same pragma, since Huey only offers FULL/OFF):

* consume: N messages already in the queue (written in one transaction, not timed), then
  consumed by 1, 2 and 4 threads until all are settled and written. Ours: threads share one
  DriverConsumer the way the consumer pool does (a shared buffer of `prefetch` = 100, refilled
  by one fetch at a time under a lock, each delivery acked). Huey: the same threads call
  `huey.dequeue()` + `huey.execute(task)` on a no-op task (results off), which is its
  consumer's inner loop without the polling sleeps.
* consume with a backlog: the same with 1 thread, N messages taken from the head of a queue
  holding N + 200,000 (a claim must not scan what waits behind it).
* publish: 4 threads publishing N messages in all, one per call (ours: concurrent calls share
  a commit; Huey: one transaction per enqueue).
* end to end: one publisher thread publishing N messages one call each (one commit each:
  nothing to group with) while 2 consumer threads consume; time until the last is settled.
  Huey: `task(i)` enqueues while 2 threads dequeue + execute (sleeping 1 ms when empty).

No Lua anywhere: this is the driver's own cost. Needs `pip install huey` (benchmark only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import driver_pool

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"id": 1, "numbers": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "text": "hello"}'
PREFETCH = 100


# -- ours ------------------------------------------------------------------------------------

def _driver(folder: Path, sync: str) -> Any:
    from runtime.drivers.sqlite import SqliteDriver

    d = SqliteDriver("bench:sqlite", {"path": "q.sqlite3", "synchronous": sync}, app_dir=folder)
    d.open()
    d.declare("q", {})
    return d


def _pool(consumer: Any, threads: int, n: int) -> list[threading.Thread]:
    return driver_pool(consumer, threads, n, PREFETCH)


def ours_consume(sync: str, n: int, threads: int, backlog: int = 0) -> dict[str, Any]:
    from runtime.queue.message import Message

    with tempfile.TemporaryDirectory(prefix="rt-sqlite-bench-") as tmp:
        d = _driver(Path(tmp), sync)
        total = n + backlog
        for i in range(0, total, 1000):
            d.publish("q", [Message.new(BODY) for _ in range(min(1000, total - i))])
        consumer = d.consume("q", "bench", PREFETCH)
        t0 = time.perf_counter()
        for t in _pool(consumer, threads, n):
            t.join()
        consumer.close()  # writes the last acks (and returns the prefetched rest of a backlog)
        seconds = time.perf_counter() - t0
        stats = d.stats("q")
        assert (stats.ready, stats.in_flight, stats.delayed) == (backlog, 0, 0), stats
        d.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


def ours_end_to_end(sync: str, n: int, threads: int) -> dict[str, Any]:
    from runtime.queue.message import Message

    with tempfile.TemporaryDirectory(prefix="rt-sqlite-bench-") as tmp:
        d = _driver(Path(tmp), sync)
        consumer = d.consume("q", "bench", PREFETCH)
        published: list[float] = []

        def publisher() -> None:
            t = time.perf_counter()
            for _ in range(n):
                d.publish("q", [Message.new(BODY)])
            published.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        workers = _pool(consumer, threads, n)
        pub = threading.Thread(target=publisher)
        pub.start()
        pub.join()
        for t in workers:
            t.join()
        stats = d.stats("q")
        seconds = time.perf_counter() - t0
        assert (stats.ready, stats.in_flight, stats.delayed) == (0, 0, 0), stats
        consumer.close()
        d.close()
    return {"end_to_end_per_s": n / seconds, "publish_per_s": n / published[0], "seconds": seconds}


def ours_publish(sync: str, n: int, threads: int) -> dict[str, Any]:
    """`threads` publishers, one message per call: concurrent calls share commits."""
    from runtime.queue.message import Message

    with tempfile.TemporaryDirectory(prefix="rt-sqlite-bench-") as tmp:
        d = _driver(Path(tmp), sync)
        per = n // threads

        def publisher() -> None:
            for _ in range(per):
                d.publish("q", [Message.new(BODY)])

        ts = [threading.Thread(target=publisher) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        seconds = time.perf_counter() - t0
        assert d.stats("q").ready == per * threads
        d.close()
    return {"publish_per_s": per * threads / seconds, "seconds": seconds}


# -- huey ------------------------------------------------------------------------------------

def _huey(folder: Path, sync: str) -> tuple[Any, Any]:
    from huey import Huey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):  # Huey's fsync option only knows FULL (True) and OFF (False)
        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("pragma synchronous=1")
            return conn

    storage = SqliteStorage if sync == "full" else NormalSyncStorage
    huey = Huey("bench", results=False, storage_class=storage, filename=str(folder / "huey.db"),
                fsync=True if sync == "full" else None)

    @huey.task()
    def noop(i: int) -> None:
        return None

    mode = huey.storage.conn.execute("pragma synchronous").fetchone()[0]
    assert mode == (2 if sync == "full" else 1), mode
    return huey, noop


def _huey_workers(huey: Any, threads: int, n: int, wait_when_empty: bool) -> list[threading.Thread]:
    executed = itertools.count(1)
    done = threading.Event()
    idle = threading.Event()

    def worker() -> None:
        dequeue, execute = huey.dequeue, huey.execute
        while not done.is_set():
            task = dequeue()
            if task is None:
                if not wait_when_empty:
                    return
                idle.wait(0.001)
                continue
            execute(task)
            if next(executed) >= n:
                done.set()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    return ts


def huey_consume(sync: str, n: int, threads: int, backlog: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rt-huey-bench-") as tmp:
        huey, noop = _huey(Path(tmp), sync)
        rows = [("bench", huey.serialize_task(noop.s(i)), 0) for i in range(n + backlog)]
        with huey.storage.db(commit=True) as cur:  # preload in one transaction (not timed)
            cur.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)
        assert huey.pending_count() == n + backlog
        t0 = time.perf_counter()
        for t in _huey_workers(huey, threads, n, wait_when_empty=False):
            t.join()
        seconds = time.perf_counter() - t0
        assert huey.pending_count() == backlog
        huey.storage.close()
    return {"consume_per_s": n / seconds, "seconds": seconds}


def huey_publish(sync: str, n: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rt-huey-bench-") as tmp:
        huey, noop = _huey(Path(tmp), sync)
        per = n // threads

        def publisher() -> None:
            for i in range(per):
                noop(i)

        ts = [threading.Thread(target=publisher) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        seconds = time.perf_counter() - t0
        assert huey.pending_count() == per * threads
        huey.storage.close()
    return {"publish_per_s": per * threads / seconds, "seconds": seconds}


def huey_end_to_end(sync: str, n: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rt-huey-bench-") as tmp:
        huey, noop = _huey(Path(tmp), sync)
        published: list[float] = []

        def publisher() -> None:
            t = time.perf_counter()
            for i in range(n):
                noop(i)
            published.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        workers = _huey_workers(huey, threads, n, wait_when_empty=True)
        pub = threading.Thread(target=publisher)
        pub.start()
        pub.join()
        for t in workers:
            t.join()
        seconds = time.perf_counter() - t0
        assert huey.pending_count() == 0
        huey.storage.close()
    return {"end_to_end_per_s": n / seconds, "publish_per_s": n / published[0], "seconds": seconds}


MEASUREMENTS = {"ours_consume": ours_consume, "ours_end_to_end": ours_end_to_end, "ours_publish": ours_publish,
                "huey_consume": huey_consume, "huey_end_to_end": huey_end_to_end, "huey_publish": huey_publish}


def run_in_this_process(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return MEASUREMENTS[name](**kwargs)  # type: ignore[operator]


REPEAT = 1  # --repeat: every measurement is run this many times, the fastest kept


def in_subprocess(name: str, **kwargs: Any) -> dict[str, Any]:
    runs = [_one_subprocess(name, **kwargs) for _ in range(REPEAT)]
    return min(runs, key=lambda r: r["seconds"])


def _one_subprocess(name: str, **kwargs: Any) -> dict[str, Any]:
    code = ("import json, sys; from benchmarks.sqlite_bench import run_in_this_process; "
            "print(json.dumps(run_in_this_process(sys.argv[1], json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, name, json.dumps(kwargs)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {kwargs} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_bench")
    parser.add_argument("--n", type=int, default=20_000, help="messages per measurement")
    parser.add_argument("--backlog", type=int, default=200_000,
                        help="messages left in the queue behind the consumed ones (the backlog row)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "sqlite_results.json")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every measurement this many times and keep the fastest (a busy machine)")
    args = parser.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    try:
        import huey  # noqa: F401
    except ImportError:
        print("this benchmark compares with Huey: pip install huey", file=sys.stderr)
        return 2
    started = time.perf_counter()
    import sqlite3

    results: dict[str, Any] = {"n": args.n, "backlog": args.backlog, "repeat": REPEAT,
                               "sqlite_version": sqlite3.sqlite_version, "modes": {}}
    for sync in ("full", "normal"):
        m: dict[str, Any] = {"consume": {}, "end_to_end": {}, "publish": {}}
        for c in (1, 2, 4):
            m["consume"][c] = {"ours": in_subprocess("ours_consume", sync=sync, n=args.n, threads=c),
                               "huey": in_subprocess("huey_consume", sync=sync, n=args.n, threads=c)}
            m["end_to_end"][c] = {"ours": in_subprocess("ours_end_to_end", sync=sync, n=args.n, threads=c),
                                  "huey": in_subprocess("huey_end_to_end", sync=sync, n=args.n, threads=c)}
        m["backlog"] = {"ours": in_subprocess("ours_consume", sync=sync, n=args.n, threads=1, backlog=args.backlog),
                        "huey": in_subprocess("huey_consume", sync=sync, n=args.n, threads=1, backlog=args.backlog)}
        m["publish"][4] = {"ours": in_subprocess("ours_publish", sync=sync, n=args.n, threads=4),
                           "huey": in_subprocess("huey_publish", sync=sync, n=args.n, threads=4)}
        results["modes"][sync] = m
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}  ({results['seconds']:.0f} s)")
    return 0


def print_table(results: dict[str, Any]) -> None:
    best = f", best of {results['repeat']}" if results.get("repeat", 1) > 1 else ""
    print(f"SQLite driver vs Huey SqliteHuey: {results['n']:,} messages per run{best}, "
          f"SQLite {results['sqlite_version']}, no-op work\n")
    print(f"  {'synchronous':11} {'measure':18} {'ours msg/s':>11} {'huey msg/s':>11} {'ratio':>7}")
    ratios = []
    for sync, m in results["modes"].items():
        for c, r in m["consume"].items():
            ours, huey = r["ours"]["consume_per_s"], r["huey"]["consume_per_s"]
            ratios.append(ours / huey)
            print(f"  {sync:11} {'consume, ' + str(c) + ' thr':18} {ours:>11,.0f} {huey:>11,.0f} {ours / huey:>6.1f}x")
        r = m["backlog"]
        ours, huey = r["ours"]["consume_per_s"], r["huey"]["consume_per_s"]
        ratios.append(ours / huey)
        label = f"consume, {results['backlog'] // 1000}k behind"
        print(f"  {sync:11} {label:18} {ours:>11,.0f} {huey:>11,.0f} {ours / huey:>6.1f}x")
        for c, r in m["end_to_end"].items():
            ours, huey = r["ours"]["end_to_end_per_s"], r["huey"]["end_to_end_per_s"]
            print(f"  {sync:11} {'end to end, ' + str(c) + ' thr':18} {ours:>11,.0f} {huey:>11,.0f} "
                  f"{ours / huey:>6.1f}x")
            po, ph = r["ours"]["publish_per_s"], r["huey"]["publish_per_s"]
            print(f"  {sync:11} {'  (its publisher)':18} {po:>11,.0f} {ph:>11,.0f} {po / ph:>6.1f}x")
        for c, r in m["publish"].items():
            po, ph = r["ours"]["publish_per_s"], r["huey"]["publish_per_s"]
            print(f"  {sync:11} {'publish, ' + str(c) + ' thr':18} {po:>11,.0f} {ph:>11,.0f} {po / ph:>6.1f}x")
    worst = min(ratios)
    print(f"\n  [{'ok' if worst >= 3 else 'MISSED'}] consume >= 3x Huey in every row: lowest ratio {worst:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
