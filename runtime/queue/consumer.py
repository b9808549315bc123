"""A consumer and its worker pool (SPEC §3, §6).

`concurrency` worker threads each own one Lua state with the handler loaded. They share a
buffer of up to `prefetch` deliveries: a worker that finds the buffer empty refills it from
the driver (one refill at a time, under a lock), so when every worker is busy and the
buffer is full nothing more is taken from the driver (backpressure). There is no hand-off
thread: a worker goes from one message to the next without waiting on another thread.
A worker's loop body is one `run_once()` step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import LuaHandlerError, RuntimeHostError
from ..lua.sandbox import ACK, SETTLED, UNDECODABLE, LuaSandbox, clean_traceback
from ..lua.threads import start_lua_thread
from ..registry import ConsumerSpec
from .codecs import JsonCodec
from .driver import Delivery
from .message import Message
from .router import BoundQueue

log = logging.getLogger("runtime.consumer")
POLL = 0.05  # seconds: how often blocked threads look at the stop flag


@dataclass
class Counters:
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    processed: int = 0


@dataclass
class _Worker:
    index: int
    sandbox: LuaSandbox | None = None
    thread: threading.Thread | None = None
    current: Delivery | None = None
    counters: Counters = field(default_factory=Counters)


class ConsumerPool:
    """Runs one `queue.consumer` entry."""

    def __init__(self, spec: ConsumerSpec, queue: BoundQueue, dead_letter: BoundQueue | None,
                 make_sandbox: Callable[[], LuaSandbox], timeout: float | None = None):
        """`make_sandbox` makes one worker's Lua state (with the consumer's memory limit and
        security context); `timeout` is the per-call time limit (consumer's, else function's)."""
        self.spec = spec
        self.timeout = timeout
        self.queue = queue
        self.dead_letter = dead_letter
        self.make_sandbox = make_sandbox
        self.workers = [_Worker(i) for i in range(spec.concurrency)]
        self._buffer: deque[Delivery] = deque()
        self._refill = threading.Lock()
        self._stopping = threading.Event()
        self._json_body = isinstance(queue.codec, JsonCodec)
        self.started = False

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers, each loading the handler first; LuaHandlerError if any cannot."""
        ready = threading.Barrier(len(self.workers) + 1)
        failures: list[LuaHandlerError] = []
        for w in self.workers:
            w.thread = start_lua_thread(self._worker_main, args=(w, ready, failures), name=f"{self.spec.id}#{w.index}")
        ready.wait()
        if failures:
            self._stopping.set()
            raise failures[0]
        self.queue.consumers += 1
        self.started = True

    def _worker_main(self, w: _Worker, ready: threading.Barrier, failures: list[LuaHandlerError]) -> None:
        try:
            w.sandbox = self.make_sandbox()
            w.sandbox.ensure_loaded(self.spec.func)
        except LuaHandlerError as exc:
            failures.append(exc)
        except Exception as exc:  # noqa: BLE001 - reported as a start failure
            failures.append(LuaHandlerError(f"worker could not start: {exc}", entry_id=self.spec.func))
        ready.wait()
        if failures:
            return
        stopping = self._stopping
        while not stopping.is_set():
            self.run_once(w)

    # -- the buffer --------------------------------------------------------------------------
    def _take(self, timeout: float) -> Delivery | None:
        """The next delivery from the shared buffer, refilling it from the driver if empty."""
        buffer = self._buffer
        try:
            return buffer.popleft()
        except IndexError:
            pass
        if not self._refill.acquire(timeout=timeout):
            return None
        try:
            if not buffer and not self._stopping.is_set():
                try:
                    buffer.extend(self.queue.driver.get(self.queue.name, self.spec.prefetch, timeout))
                except Exception:  # noqa: BLE001 - a driver failure must not kill the worker
                    log.exception("consumer %s: fetching from queue %s failed", self.spec.id, self.queue.spec.id)
                    self._stopping.wait(1.0)
        finally:
            self._refill.release()
        try:
            return buffer.popleft()
        except IndexError:
            return None

    # -- one step of a worker ------------------------------------------------------------------
    def run_once(self, w: _Worker, timeout: float = POLL) -> bool:
        """Take one delivery and process it. False if none came in time."""
        d = self._take(timeout)
        if d is None:
            return False
        if self._stopping.is_set():
            self.queue.driver.release(d)
            return False
        w.current = d
        try:
            self._process(w, d)
        except Exception as exc:  # noqa: BLE001 - a host bug must not kill the worker or lose the message
            log.exception("consumer %s: internal error on message %s", self.spec.id, d.message.id)
            try:
                self._fail(w, d, f"internal error: {type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - last resort: back to the queue, never stuck in flight
                log.exception("consumer %s: could not fail message %s; requeueing it", self.spec.id, d.message.id)
                self.queue.driver.requeue(d, d.message.retried())
        finally:
            w.current = None
            w.counters.processed += 1
        return True

    def _process(self, w: _Worker, d: Delivery) -> None:
        sandbox = w.sandbox
        assert sandbox is not None
        msg = d.message
        driver = self.queue.driver
        if self.spec.auto_ack:
            driver.ack(d)
            w.counters.acked += 1
        bridge = sandbox.bridge
        bridge.delivery = d
        bridge.settler = self._settler(w, d)
        try:
            if self._json_body:
                status, error, tb, kind = sandbox.deliver(self.spec.func, msg.body, None, False, msg.attempt,
                                                          self.timeout)
            else:
                try:
                    value = self.queue.codec.decode(msg.body)
                except ValueError as exc:
                    status, error, tb, kind = UNDECODABLE, str(exc), None, None
                else:
                    status, error, tb, kind = sandbox.deliver(self.spec.func, msg.body, value, True, msg.attempt,
                                                              self.timeout)
        finally:
            bridge.settler = None
            bridge.delivery = None
        if status == ACK:
            if not self.spec.auto_ack and driver.ack(d):
                w.counters.acked += 1
            return
        if status == SETTLED:
            if error:
                self._log_failure(msg, error, tb, "after settling its message")
            return
        what = "could not decode the message body" if status == UNDECODABLE else None
        if kind == "Memory":
            what = f"ran out of memory (memory_limit {sandbox.memory_limit} bytes)"
            self._replace_sandbox(w)
        elif kind == "Timeout":
            self._replace_sandbox(w)  # stopped mid-way: its module state may be half-updated (or full)
        self._log_failure(msg, error or "handler failed", tb, what)
        if self.spec.auto_ack:
            return  # at-most-once: already settled, not redelivered
        self._fail(w, d, error or "handler failed")

    def _replace_sandbox(self, w: _Worker) -> None:
        """After a memory error the state may stay full, after a timeout its module state may be
        half-updated: the worker starts a fresh one."""
        old = w.sandbox
        w.sandbox = self.make_sandbox()
        w.sandbox.ensure_loaded(self.spec.func)
        if old is not None:
            old.close()

    def _settler(self, w: _Worker, d: Delivery) -> Callable[[str], None]:
        return lambda action: self._settle(w, d, action)

    def _settle(self, w: _Worker, d: Delivery, action: str) -> None:
        if action == "ack":
            if self.queue.driver.ack(d):
                w.counters.acked += 1
        else:
            self._fail(w, d, "nacked by the handler")

    def _fail(self, w: _Worker, d: Delivery, reason: str) -> None:
        """A failed delivery: requeue with attempt+1, or dead-letter at max_attempts."""
        msg = d.message
        dl = self.queue.spec.dead_letter
        if dl is not None and self.dead_letter is not None and msg.attempt >= dl.max_attempts:
            headers = dict(msg.headers)
            headers.update({"x_dead_letter_reason": reason, "x_original_queue": self.queue.spec.id,
                            "x_attempts": msg.attempt})
            body = msg.body
            if self.dead_letter.codec is not self.queue.codec:
                try:
                    body = self.dead_letter.codec.encode(self.queue.codec.decode(body))
                except Exception:  # noqa: BLE001 - undecodable: kept as the bytes it came with
                    pass
            try:
                self.dead_letter.driver.put(self.dead_letter.name, Message(body, headers, msg.id, msg.attempt),
                                            timeout=0)
            except RuntimeHostError:
                # The dead-letter queue is full: never drop; retry through the queue instead.
                log.error("dead-letter queue %s is full; message %s is requeued", self.dead_letter.spec.id, msg.id)
                if self.queue.driver.requeue(d, msg):
                    w.counters.nacked += 1
                return
            if self.queue.driver.ack(d):
                w.counters.dead_lettered += 1
            return
        if self.queue.driver.requeue(d, msg.retried()):
            w.counters.nacked += 1

    def _log_failure(self, msg: Message, error: str, tb: str | None, what: str | None) -> None:
        text = f"consumer {self.spec.id}: message {msg.id} (attempt {msg.attempt}) "
        text += f"{what}: {error}" if what else f"failed: {error}"
        tb = clean_traceback(tb or "")
        if tb:
            text += "\n" + tb
        log.warning(text, extra={"entry": self.spec.func, "lua_file": "", "lua_line": 0})

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, timeout: float) -> list[str]:
        """Graceful shutdown (SPEC §3). Returns the names of workers that overran `timeout`
        (their messages are back in the queue)."""
        deadline = time.monotonic() + timeout
        self._stopping.set()  # (1) take no new deliveries
        for w in self.workers:  # (2) cancel: time.sleep returns Canceled
            if w.sandbox is not None:
                w.sandbox.bridge.cancel.set()
        for w in self.workers:  # (3) wait for in-flight handlers
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
        self._return_buffered()  # (4) prefetched, never started: back unchanged
        overran = []
        for w in self.workers:  # (5) abandoned handlers: their messages go back too
            d = w.current
            if w.thread is not None and w.thread.is_alive() and d is not None:
                self.queue.driver.release(d)  # its late ack will find nothing to settle
                overran.append(f"{self.spec.id}#{w.index}")
        if self.started:
            self.queue.consumers -= 1
            self.started = False
        return overran

    def _return_buffered(self) -> None:
        with self._refill:
            pending = list(self._buffer)
            self._buffer.clear()
        for d in reversed(pending):  # released to the head: keep their order
            self.queue.driver.release(d)

    # -- stats -------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        total = Counters()
        in_flight = 0
        for w in self.workers:
            c = w.counters
            total.acked += c.acked
            total.nacked += c.nacked
            total.dead_lettered += c.dead_lettered
            total.processed += c.processed
            in_flight += w.current is not None
        in_flight += len(self._buffer)
        return {"acked": total.acked, "nacked": total.nacked, "dead_lettered": total.dead_lettered,
                "in_flight": in_flight, "processed": total.processed}


