"""A consumer and its worker pool (SPEC §3, §6).

`concurrency` worker threads each own one handler (a Lua state with the handler loaded).
They share a buffer of up to `prefetch` deliveries: a worker that finds the buffer empty
refills it from the driver consumer (one refill at a time, under a lock: the driver's
`fetch` has one caller at a time), so when every worker is busy and the buffer is full
nothing more is taken from the driver (backpressure). There is no hand-off thread: a
worker goes from one message to the next without waiting on another thread. A worker's
loop body is one `run_once()` step. Drivers whose deliveries are leases renew them
themselves for as long as the delivery is in flight (see Capabilities.lease).

Batches: a worker whose handler can take them (a LuaJIT state, a JSON queue) takes its
share of what is already in the buffer, up to BATCH_MAX, and hands it to Lua in one call;
Python then acks the acked ones in one step. Nothing waits to fill a batch: a lone
message goes alone. Each message still runs on its own (its time limit, its result); the
first that does not end in a plain ack comes back to Python, which settles it as usual
before handing over the rest. Messages of a batch that have not started count against
`prefetch`, go back to the buffer when a batch runs long (so they do not wait behind a
slow one), and back to the queue when the pool stops.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

from ..drivers.catalog import driver_key
from ..errors import DriverUnavailable, LuaHandlerError, RuntimeHostError
from ..lua.sandbox import clean_traceback
from ..lua.threads import start_lua_thread
from ..registry import ConsumerSpec
from .driver import Delivery, DriverConsumer
from .handler import ACK, BATCH_MAX, SETTLED, Handler, Outcome
from .message import Message
from .router import BoundQueue

log = logging.getLogger("runtime.consumer")
POLL = 0.05  # seconds: how often blocked threads look at the stop flag
# Seconds: a worker whose last messages took longer than this each takes one at a time, so
# nothing waits in its batch behind a slow message (batching saves microseconds a message).
SLOW_MESSAGE = 0.001


@dataclass
class Counters:
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    processed: int = 0


# Upper bounds (seconds) of the handler-duration histogram's buckets (`--metrics`).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Durations:
    """One worker's handler durations: counts per bucket (the last one above every bound)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass
class _Worker:
    index: int
    handler: Handler | None = None
    thread: threading.Thread | None = None
    current: Delivery | None = None
    batch: list[Delivery] | None = None  # the deliveries this worker holds (current among them)
    start: int = 0  # where in `batch` the handler call running now began
    batches: bool = False  # its handler takes batches
    most: int = BATCH_MAX  # the most it takes next: 1 after messages slower than SLOW_MESSAGE
    counters: Counters = field(default_factory=Counters)
    durations: Durations = field(default_factory=Durations)
    settle: Callable[..., None] | None = None  # msg:ack()/msg:nack(), see ConsumerPool._settler


class ConsumerPool:
    """Runs one `queue.consumer` entry."""

    def __init__(self, spec: ConsumerSpec, queue: BoundQueue, dead_letter: BoundQueue | None,
                 make_handler: Callable[[], Handler]):
        """`make_handler` makes one worker's handler (called in the worker's own thread)."""
        self.spec = spec
        self.queue = queue
        self.dead_letter = dead_letter
        self.make_handler = make_handler
        self.workers = [_Worker(i) for i in range(spec.concurrency)]
        for w in self.workers:
            w.settle = self._settler(w)
        self.source: DriverConsumer | None = None
        self._buffer: deque[Delivery] = deque()
        self._refill = threading.Lock()
        self._busy = 0  # workers holding a batch (under _busy_lock), for the fair share of the buffer
        self._busy_lock = threading.Lock()
        self._stopping = threading.Event()
        self._go = threading.Event()  # workers take messages once the driver consumer exists
        self.started = False
        self.retry = queue.spec.retry
        self.reconnecting = False
        self.timed = False  # measure handler durations (for --metrics); off: no clock reads per message
        self._counted = False  # this pool is in its queue's consumer_count
        # Deliveries past this attempt are dead-lettered without running (see _process).
        dl = queue.spec.dead_letter
        self._max_attempts = dl.max_attempts if dl and dead_letter and not spec.auto_ack else float("inf")

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers, each loading the handler first; LuaHandlerError if any cannot
        (then nothing was taken from the queue)."""
        ready = threading.Barrier(len(self.workers) + 1)
        failures: list[LuaHandlerError] = []
        for w in self.workers:
            w.thread = start_lua_thread(self._worker_main, args=(w, ready, failures), name=f"{self.spec.id}#{w.index}")
        ready.wait()
        if failures:
            self._stopping.set()
            for w in self.workers:
                if w.thread is not None:
                    w.thread.join()
            raise failures[0]
        self.prepare()
        self.started = True
        self._go.set()

    def prepare(self) -> None:
        """Open the pool's driver consumer (what `start` does before the workers take
        messages); tests call it to drive `run_once` by hand."""
        self.source = self.queue.driver.consume(self.queue.name, self.spec.id, self.spec.prefetch,
                                                self.spec.driver_options.get(driver_key(self.queue.driver.kind), {}))
        self.queue.consumers += 1
        self._counted = True

    def _worker_main(self, w: _Worker, ready: threading.Barrier, failures: list[LuaHandlerError]) -> None:
        try:
            w.handler = self.make_handler()
            w.batches = bool(getattr(w.handler, "batches", False)) and not self.spec.auto_ack
        except LuaHandlerError as exc:
            failures.append(exc)
        except Exception as exc:  # noqa: BLE001 - reported as a start failure
            failures.append(LuaHandlerError(f"worker could not start: {exc}", entry_id=self.spec.func))
        ready.wait()
        if not failures:
            self._go.wait()
            stopping = self._stopping
            while not stopping.is_set():
                self.run_once(w)
        if w.handler is not None:
            w.handler.close()
            w.handler = None  # the pool lets go of its Lua states when it stops

    # -- the buffer --------------------------------------------------------------------------
    def _take(self, timeout: float, most: int = 1) -> list[Delivery] | None:
        """This worker's share (up to `most`) of the shared buffer, refilling it from the
        driver if empty; None if nothing came in time."""
        got = self._pop(most)
        if got:
            return got
        if not self._refill.acquire(timeout=timeout):
            return None
        try:
            if not self._buffer and not self._stopping.is_set():
                self._fill(timeout)
        finally:
            self._refill.release()
        return self._pop(most) or None

    @staticmethod
    def _running_index(w: _Worker, batch: list[Delivery]) -> int:
        """Where in its batch the message a worker runs now is (read from another thread: a
        close estimate is enough for the refill; stop reads it once the worker overran)."""
        current = w.current
        if current is not None:  # settled in Python, or run one at a time
            return next((j for j, d in enumerate(batch) if d is current), 0)
        if w.batches and w.handler is not None:  # inside a batch call
            return w.start + max(w.handler.running(), 1) - 1  # type: ignore[attr-defined]
        return 0

    def _unstarted(self, w: _Worker) -> int:
        """How many messages of a worker's batch have not started."""
        batch = w.batch
        return max(0, len(batch) - 1 - self._running_index(w, batch)) if batch else 0

    def _pop(self, most: int) -> list[Delivery]:
        buffer = self._buffer
        if most > 1:  # a fair share: what is there, split between the workers with nothing to do
            most = min(most, -(-len(buffer) // max(1, len(self.workers) - self._busy)))
        got: list[Delivery] = []
        try:
            while len(got) < most:
                got.append(buffer.popleft())
        except IndexError:
            pass
        return got

    def _fill(self, timeout: float) -> None:
        assert self.source is not None
        # Messages waiting in the workers' batches are still "prefetched": they count.
        waiting = sum(self._unstarted(w) for w in self.workers)
        try:
            self._buffer.extend(self.source.fetch(max(1, self.spec.prefetch - waiting), timeout))
        except DriverUnavailable as exc:
            log.warning("consumer %s: %s; waiting for the driver to reconnect", self.spec.id, exc)
            self.reconnecting = True
            try:
                self.queue.driver.reconnect(self._stopping)
            finally:
                self.reconnecting = False
        except Exception:  # noqa: BLE001 - a driver failure must not kill the worker
            log.exception("consumer %s: fetching from queue %s failed", self.spec.id, self.queue.spec.id)
            self._stopping.wait(1.0)

    # -- one step of a worker ------------------------------------------------------------------
    def run_once(self, w: _Worker, timeout: float = POLL) -> bool:
        """Take one delivery (or a batch) and process it. False if none came in time."""
        batch = self._take(timeout, w.most if w.batches else 1)
        if batch is None:
            return False
        assert self.source is not None
        if self._stopping.is_set():
            self.source.release(batch)
            return False
        w.batch = batch
        with self._busy_lock:
            self._busy += 1
        try:
            if w.batches:
                self._run_batch(w, batch)
            else:
                for d in batch:
                    self._run_one(w, d)
        finally:
            w.batch = None
            with self._busy_lock:
                self._busy -= 1
        return True

    def _run_one(self, w: _Worker, d: Delivery) -> None:
        assert self.source is not None
        w.current = d
        try:
            self._process(w, d)
        except DriverUnavailable as exc:  # settling failed: the engine keeps the message and hands it out again
            self._settle_failed(d, exc)
        except Exception as exc:  # noqa: BLE001 - a host bug must not kill the worker or lose the message
            self._internal_error(w, d, exc)
        finally:
            w.current = None
            w.counters.processed += 1

    def _settle_failed(self, d: Delivery, exc: Exception) -> None:
        log.warning("consumer %s: could not settle message %s (%s); the driver delivers it again after its "
                    "recovery time", self.spec.id, d.message.id, exc)

    def _internal_error(self, w: _Worker, d: Delivery, exc: Exception) -> None:
        assert self.source is not None
        log.exception("consumer %s: internal error on message %s", self.spec.id, d.message.id)
        try:
            self._fail(w, d, f"internal error: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - last resort: back to the queue, never stuck in flight
            log.exception("consumer %s: could not fail message %s; returning it", self.spec.id, d.message.id)
            self.source.release((d,))

    def _run_batch(self, w: _Worker, batch: list[Delivery]) -> None:
        """Several deliveries in as few handler calls as their results allow."""
        source, handler = self.source, w.handler
        assert source is not None and handler is not None
        if self._max_attempts != float("inf") and any(d.attempt > self._max_attempts for d in batch):
            for d in [d for d in batch if d.attempt > self._max_attempts]:
                self._run_one(w, d)  # dead-lettered without running
            batch = [d for d in batch if d.attempt <= self._max_attempts]
            w.batch = batch
        start, n, timed = 0, len(batch), self.timed
        while start < n:
            w.start = start
            try:
                k, out, durations = handler.handle_batch(batch, start, w.settle, timed)  # type: ignore[attr-defined]
                ran = k - start + (out is not None)
                if ran:
                    w.most = 1 if handler.ran_for() > SLOW_MESSAGE * ran else BATCH_MAX  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - a host bug: the message it was on fails, the rest go on
                self._internal_error(w, batch[start], exc)
                w.counters.processed += 1
                start += 1
                continue
            if durations:
                for seconds in durations:
                    w.durations.observe(seconds)
            if k > start:
                try:
                    w.counters.acked += source.ack_many(batch[start:k])
                except DriverUnavailable as exc:
                    self._settle_failed(batch[start], exc)
                w.counters.processed += k - start
            if out is None:
                if k < n:  # not started: the worker is stopping, or the batch ran long
                    self._give_back(batch[k:])
                return
            d = batch[k]
            w.current = d
            try:
                self._settle_outcome(w, d, out)
            except DriverUnavailable as exc:
                self._settle_failed(d, exc)
            except Exception as exc:  # noqa: BLE001 - as in _run_one
                self._internal_error(w, d, exc)
            finally:
                w.current = None
                w.counters.processed += 1
            start = k + 1

    def _give_back(self, rest: list[Delivery]) -> None:
        """Deliveries of a batch that did not start: to the head of the buffer, for any
        worker, or to the queue when the pool is stopping."""
        assert self.source is not None
        if self._stopping.is_set():
            self.source.release(rest)
            return
        self._buffer.extendleft(reversed(rest))

    def _process(self, w: _Worker, d: Delivery) -> None:
        handler = w.handler
        assert handler is not None and self.source is not None
        if d.attempt > self._max_attempts:
            # Delivered more often than allowed without a result: its worker stopped or crashed
            # each time (the driver counts deliveries lost to crashes). Not run again.
            self._fail(w, d, f"delivered {d.attempt} times without a result (its worker stopped each time)")
            return
        if self.spec.auto_ack and self.source.ack(d):
            w.counters.acked += 1
        if self.timed:
            began = perf_counter()
            out: Outcome = handler.handle(d, w.settle)  # type: ignore[arg-type]
            w.durations.observe(perf_counter() - began)
        else:
            out = handler.handle(d, w.settle)  # type: ignore[arg-type]
        self._settle_outcome(w, d, out)

    def _settle_outcome(self, w: _Worker, d: Delivery, out: Outcome) -> None:
        """What a handler's outcome means for its delivery (SPEC §6)."""
        assert self.source is not None
        if out.status == ACK:
            if not self.spec.auto_ack and self.source.ack(d):
                w.counters.acked += 1
            return
        if out.status == SETTLED:
            if out.error:
                self._log_failure(d, out, "after settling its message")
            return
        self._log_failure(d, out, out.what)
        if self.spec.auto_ack:
            return  # at-most-once: already settled, not redelivered
        self._fail(w, d, out.error or "handler failed")

    def _settler(self, w: _Worker) -> Callable[..., None]:
        """A worker's early-settle callback (msg:ack()/msg:nack()), made once per worker:
        it settles the given delivery of its batch, or the one the worker is running."""

        def settle(action: str, d: Delivery | None = None) -> None:
            if d is None:
                d = w.current
            if d is None:
                raise RuntimeHostError("no message to settle")
            self._settle(w, d, action)

        return settle

    def _settle(self, w: _Worker, d: Delivery, action: str) -> None:
        assert self.source is not None
        if action == "ack":
            if self.source.ack(d):
                w.counters.acked += 1
        else:
            self._fail(w, d, "nacked by the handler")

    def retry_delay(self, attempt: int) -> float:
        """The SPEC §6 delay before attempt `attempt + 1`, with jitter."""
        delay = self.retry.delay(attempt)
        if delay > 0 and self.retry.jitter:
            delay *= random.uniform(1 - self.retry.jitter, 1 + self.retry.jitter)
        return delay

    def _fail(self, w: _Worker, d: Delivery, reason: str) -> None:
        """A failed delivery: retried after the queue's delay, or dead-lettered at
        max_attempts. A dead letter is published first and acked after, so a crash in
        between duplicates it, never loses it."""
        assert self.source is not None
        dl = self.queue.spec.dead_letter
        if dl is not None and self.dead_letter is not None and d.attempt >= dl.max_attempts:
            try:
                self._publish_dead_letter(d, reason, dl.max_attempts)
            except RuntimeHostError as exc:
                # The dead-letter queue cannot take it now: keep it, retry later.
                log.warning("consumer %s: dead-letter queue %s cannot take message %s (%s); it is retried later",
                            self.spec.id, self.dead_letter.spec.id, d.message.id, exc)
                if self.source.retry(d, max(1.0, self.retry_delay(d.attempt))):
                    w.counters.nacked += 1
                return
            if self.source.ack(d):
                w.counters.dead_lettered += 1
            return
        if self.source.retry(d, self.retry_delay(d.attempt)):
            w.counters.nacked += 1

    def _publish_dead_letter(self, d: Delivery, reason: str, max_attempts: int) -> None:
        assert self.dead_letter is not None
        msg = d.message
        headers = dict(msg.headers)
        headers.update({"x_dead_letter_reason": reason, "x_original_queue": self.queue.spec.id,
                        "x_attempts": max_attempts})
        body = msg.body
        if self.dead_letter.codec is not self.queue.codec:
            try:
                body = self.dead_letter.codec.encode(self.queue.codec.decode(body))
            except Exception:  # noqa: BLE001 - undecodable: kept as the bytes it came with
                pass
        # Never bounded by the dead-letter queue's max_length, never waiting (SPEC §6).
        self.dead_letter.put(Message(body, headers, msg.id), timeout=0, force=True)

    def _log_failure(self, d: Delivery, out: Outcome, what: str | None) -> None:
        error = out.error or "handler failed"
        text = f"consumer {self.spec.id}: message {d.message.id} (attempt {d.attempt}) "
        text += f"{what}: " if what else "failed: "
        text += f"[{out.kind or 'Internal'}] {error}"
        tb = clean_traceback(out.traceback or "")
        if tb:
            text += "\n" + tb
        log.warning(text, extra={"entry": self.spec.func, "lua_file": "", "lua_line": 0,
                                 "fields": {"error_kind": out.kind or "Internal", "message_id": d.message.id,
                                            "attempt": d.attempt}})

    # -- stop ----------------------------------------------------------------------------------
    def begin_stop(self) -> None:
        """(1) take no new deliveries, (2) cancel what running handlers wait for."""
        self._stopping.set()
        self._go.set()
        for w in self.workers:
            handler = w.handler
            cancel = getattr(handler, "cancel", None)
            if cancel is not None:
                cancel()

    def stop(self, timeout: float) -> list[str]:
        """Graceful shutdown (SPEC §3). Returns the names of workers that overran `timeout`
        (their messages are back in the queue)."""
        deadline = time.monotonic() + timeout
        self.begin_stop()
        for w in self.workers:  # (3) wait for in-flight handlers
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
        overran = []
        if self.source is not None:
            self._return_buffered()  # (4) prefetched, never started: back unchanged
            for w in self.workers:  # (5) abandoned handlers: their messages go back too
                if w.thread is not None and w.thread.is_alive() and w.batch:
                    self._abandon(w, w.batch)  # their late acks will find nothing to settle
                    overran.append(f"{self.spec.id}#{w.index}")
            try:
                self.source.close()
            except RuntimeHostError as exc:
                log.warning("consumer %s: closing its driver consumer failed: %s", self.spec.id, exc)
        if self._counted:
            self.queue.consumers -= 1
            self._counted = False
        self.started = False
        return overran

    def _abandon(self, w: _Worker, batch: list[Delivery]) -> None:
        """A worker still running past the stop timeout: the messages of its batch call that
        its handler acked are acked, the running one and those after it go back."""
        assert self.source is not None
        i = self._running_index(w, batch)
        if w.current is None and w.batches:  # inside a batch call: those before i ended in an ack
            self.source.ack_many(batch[w.start:i])
        self.source.release(batch[i:])

    def _return_buffered(self) -> None:
        assert self.source is not None
        with self._refill:
            pending = list(self._buffer)
            self._buffer.clear()
        if pending:
            self.source.release(pending)  # back to the head, in their order

    # -- stats -------------------------------------------------------------------------------
    def durations(self) -> Durations:
        """Handler durations of all workers added up."""
        total = Durations()
        for w in self.workers:
            total.counts = [a + b for a, b in zip(total.counts, w.durations.counts, strict=True)]
            total.total += w.durations.total
        return total

    def stats(self) -> dict[str, int]:
        total = Counters()
        in_flight = 0
        for w in self.workers:
            c = w.counters
            total.acked += c.acked
            total.nacked += c.nacked
            total.dead_lettered += c.dead_lettered
            total.processed += c.processed
            batch = w.batch
            in_flight += len(batch) if batch else 0
        in_flight += len(self._buffer)
        return {"acked": total.acked, "nacked": total.nacked, "dead_lettered": total.dead_lettered,
                "in_flight": in_flight, "processed": total.processed}
