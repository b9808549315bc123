"""`runtime run --processes N` (SPEC §8): N worker processes running the app's consumers,
supervised by the parent, which runs everything else once (process services, --publish).

A worker process is `runtime run APP --worker-process`: it starts only the consumers and
writes one JSON line to stdout every REPORT_EVERY seconds (its counts, whether it is
idle, its activity counter), and a last one when it stops. It stops on SIGTERM, or when
its stdin closes (the parent is gone). The parent restarts a worker that dies, with
backoff; on SIGINT/SIGTERM it sends SIGTERM to every worker and waits for them; with
--until-idle it stops them once its own processes have finished and every worker has
reported idle twice with no activity in between. The exit summary adds up all workers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .app import App
from .drivers import driver_class
from .errors import ConfigError, Problem
from .lifecycle.graph import start_order
from .metrics import merge
from .registry import ConsumerSpec, QueueSpec

log = logging.getLogger("runtime.processes")
REPORT_EVERY = 0.2  # seconds between a worker's reports
COUNTS = ("acked", "nacked", "dead_lettered", "processed")
GAUGES = ("in_flight", "workers")
STARTUP_FAILED = 1  # a worker that exits 1 before it reported "started" has a config problem


def check_shared(app: App, processes: int) -> None:
    """ConfigError if a consumer to be started consumes a queue on a driver that cannot be
    shared between processes (the memory driver)."""
    if processes <= 1:
        return
    problems = []
    for entry_id in start_order(app.registry, "consumers"):
        spec = app.registry.get(entry_id, ConsumerSpec)
        if spec is None:
            continue
        queue = app.registry.get(spec.queue, QueueSpec)
        driver = app.registry.entries.get(queue.driver) if queue else None
        if driver is not None and not driver_class(driver.kind).capabilities.shared:
            problems.append(Problem(spec.file, spec.line, f"entry {spec.id}: --processes {processes} needs queues "
                                    f"that several processes can share, but queue {spec.queue} is on {driver.kind} "
                                    f"{driver.id}, which lives in one process (use queue.driver.sqlite or a broker)"))
    if problems:
        raise ConfigError(problems)


# -- the worker side ------------------------------------------------------------------------

def run_worker(app: App, stop: threading.Event, out: IO[str] = sys.stdout) -> bool:
    """Run the consumers until `stop` is set (or stdin closes); report on `out`. True if
    the stop overran its timeout."""
    from .errors import ShutdownTimeout

    lock = threading.Lock()

    def report(kind: str) -> None:
        consumers = app.metrics_snapshot()["consumers"] if app.measure_durations else app.consumer_stats()
        line = json.dumps({"type": kind, "pid": os.getpid(), "consumers": consumers,
                           "idle": app.idle(), "activity": app._activity()})
        with lock:
            try:
                out.write(line + "\n")
                out.flush()
            except (BrokenPipeError, ValueError, OSError):
                stop.set()  # the parent is gone

    def watch_stdin() -> None:
        try:
            while sys.stdin.readline():
                pass
        except (OSError, ValueError):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True, name="parent-watch").start()
    app.start("consumers")
    report("started")
    while not stop.wait(REPORT_EVERY):
        report("stats")
    overran = False
    try:
        app.stop()
    except ShutdownTimeout as exc:
        log.error("%s", exc)
        overran = True
    report("final")
    return overran


# -- the parent side ------------------------------------------------------------------------

@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[str] | None = None
    last: dict[str, Any] | None = None  # the latest report
    last_at: float = 0.0  # when it came (monotonic)
    started: bool = False
    final: bool = False
    restarts: int = 0
    past: dict[str, dict[str, Any]] = field(default_factory=dict)  # counts of earlier incarnations
    pids: list[int] = field(default_factory=list)


class WorkerPool:
    """The parent's view of its worker processes."""

    def __init__(self, argv: list[str], processes: int, stop: threading.Event):
        self.argv = argv
        self.stop = stop
        self.workers = [_Worker(i) for i in range(processes)]
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.fatal: str | None = None
        self.exit_codes: list[int] = []

    def spawn(self, w: _Worker) -> None:
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                start_new_session=True)  # a terminal's Ctrl-C reaches the parent only
        w.proc, w.started, w.final, w.last = proc, False, False, None
        w.pids.append(proc.pid)
        threading.Thread(target=self._read, args=(w, proc), daemon=True, name=f"worker-{w.slot}-reader").start()
        log.info("worker process %d started (pid %d)", w.slot, proc.pid)

    def start(self) -> None:
        for w in self.workers:
            self.spawn(w)

    def _read(self, w: _Worker, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.changed:
                if w.proc is not proc:
                    return
                w.last, w.last_at = msg, time.monotonic()
                w.started = w.started or msg.get("type") == "started"
                w.final = msg.get("type") == "final"
                self.changed.notify_all()
        proc.wait()
        with self.changed:
            self.changed.notify_all()

    def supervise(self) -> None:
        """Restart workers that died (not when stopping); one call per look."""
        for w in self.workers:
            proc = w.proc
            if proc is None or proc.poll() is None or self.stop.is_set():
                continue
            code = proc.returncode
            with self.lock:
                if not w.started and code == STARTUP_FAILED:
                    self.fatal = f"worker process {w.slot} could not start (exit code {code})"
                    self.stop.set()
                    return
                self._bank(w)
                w.proc = None
            w.restarts += 1
            delay = min(30.0, 0.5 * 2 ** min(w.restarts - 1, 6))
            log.warning("worker process %d (pid %d) died with exit code %s; restarting it in %.1fs", w.slot,
                        proc.pid, code, delay)
            threading.Timer(delay, self._respawn, args=(w,)).start()

    def _respawn(self, w: _Worker) -> None:
        if not self.stop.is_set() and w.proc is None:
            self.spawn(w)
            with self.changed:
                self.changed.notify_all()

    def _bank(self, w: _Worker) -> None:
        """Keep a finished incarnation's last counts (holding the lock); its gauges end."""
        if w.last is None:
            return
        ended = {cid: {k: v for k, v in c.items() if k not in GAUGES} for cid, c in w.last.get("consumers", {}).items()}
        w.past = merge([{"consumers": w.past}, {"consumers": ended}])["consumers"]
        w.last = None

    def all_idle(self) -> tuple[bool, list[Any]]:
        """(every worker running and idle, their activity counters)."""
        with self.lock:
            states = [(w.proc is not None and w.proc.poll() is None and w.started and bool(w.last and w.last["idle"]),
                       w.last["activity"] if w.last else None) for w in self.workers]
        return all(ok for ok, _ in states), [a for _, a in states]

    def reports_since(self, t: float) -> bool:
        with self.lock:
            return all(w.last_at > t for w in self.workers)

    def wait_change(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def terminate(self, timeout: float) -> None:
        """SIGTERM every worker and wait up to `timeout`; then SIGKILL what is left."""
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process pid %d did not stop in %.0fs; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        for w in self.workers:
            if w.proc is not None:
                self.exit_codes.append(w.proc.returncode)
                if w.proc.stdout is not None:
                    w.proc.stdout.close()
                if w.proc.stdin is not None:
                    try:
                        w.proc.stdin.close()
                    except OSError:
                        pass

    def per_worker(self) -> list[tuple[int, list[int], int]]:
        """(slot, pids of its incarnations, messages processed) per worker process."""
        with self.lock:
            out = []
            for w in self.workers:
                processed = sum(int(c.get("processed", 0)) for c in w.past.values())
                if w.last:
                    processed += sum(int(c.get("processed", 0)) for c in w.last.get("consumers", {}).values())
                out.append((w.slot, list(w.pids), processed))
            return out

    def totals(self) -> dict[str, dict[str, Any]]:
        """Every worker's consumer counts added up (those of dead incarnations too)."""
        with self.lock:
            parts = []
            for w in self.workers:
                parts.append({"consumers": w.past})
                if w.last:
                    parts.append({"consumers": w.last.get("consumers", {})})
            out = merge(parts)["consumers"]
        for counts in out.values():
            for key in COUNTS:
                counts.setdefault(key, 0)
        return out

    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)


def run_parent(app: App, argv: list[str], processes: int, stop: threading.Event, until_idle: bool,
               stop_timeout: float, before_workers: Callable[[], None],
               on_pool: Callable[[WorkerPool], None] | None = None) -> tuple[WorkerPool, int]:
    """Run the parent's share and N workers until `stop` (or idle, with `until_idle`).
    Returns the pool (for the summary) and the exit code contribution (0, 1 or 3).
    `on_pool` sees the pool before the workers start (to serve metrics from it)."""
    app.start("others")
    before_workers()
    pool = WorkerPool(argv, processes, stop)
    if on_pool is not None:
        on_pool(pool)
    pool.start()
    candidate: tuple[float, list[Any], int] | None = None
    try:
        while not stop.is_set():
            pool.supervise()
            if until_idle:
                ok, activity = pool.all_idle()
                if ok and app.idle():
                    mine = app._activity()
                    if candidate is None or candidate[1] != activity or candidate[2] != mine:
                        candidate = (time.monotonic(), activity, mine)
                    elif pool.reports_since(candidate[0]):
                        break
                else:
                    candidate = None
            pool.wait_change(REPORT_EVERY)
    finally:
        pool.terminate(stop_timeout + 5.0)
    if pool.fatal:
        log.error("%s", pool.fatal)
        return pool, 1
    return pool, 3 if 3 in pool.exit_codes else 0
