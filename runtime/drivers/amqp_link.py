"""One AMQP connection with its I/O on its own thread (pika's SelectConnection), used by the
AMQP driver (`amqp.py`).

pika connections are not thread-safe. Everything that touches the connection or its channels
runs on the link's thread; other threads hand work over with `post` (fire and forget) or
`call` (wait for the result), both through pika's `add_callback_threadsafe`, the one method
pika allows from any thread. Heartbeats are served by that thread whatever the handlers do.

`Publisher` is the confirm-mode channel: publishes from many threads are queued to the link
thread, each caller waits for its own confirms (delivery tags), so confirms of concurrent
publishers pipeline instead of one round trip per message.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pika
import pika.exceptions

log = logging.getLogger("runtime.driver.amqp")
CONNECT_TIMEOUT = 10.0


class AmqpUnavailable(Exception):
    """The connection (or the broker) is gone: wrapped into DriverUnavailable by the driver."""


class ChannelRefused(Exception):
    """The broker closed a channel over one request (e.g. PRECONDITION_FAILED, NOT_FOUND)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class Link:
    """A SelectConnection and the thread running its I/O loop."""

    def __init__(self, params: pika.ConnectionParameters, name: str, on_lost: Callable[[Link, BaseException], None],
                 generation: int = 0):
        self.params = params
        self.name = name
        self.on_lost = on_lost
        self.generation = generation
        self.conn: Any = None
        self.alive = False
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._closing = False
        self._futures: set[Future[Any]] = set()
        self._close_hooks: list[Callable[[], None]] = []
        self.thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        self.thread = threading.Thread(target=self._run, name=f"amqp {self.name}", daemon=True)
        self.thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise AmqpUnavailable(f"timed out connecting after {timeout:g}s")
        if not self.alive:
            self.stop()
            raise AmqpUnavailable(_describe(self.error) if self.error else "could not connect")

    def _run(self) -> None:
        try:
            self.conn = pika.SelectConnection(self.params, on_open_callback=self._opened,
                                              on_open_error_callback=self._open_failed,
                                              on_close_callback=self._closed)
            self.conn.ioloop.start()
        except Exception as exc:  # noqa: BLE001 - reported to whoever waits
            self.error = exc
        finally:
            was_alive, self.alive = self.alive, False
            if self.conn is not None:
                try:
                    self.conn.ioloop.close()  # its wake-up socket pair
                except Exception:  # noqa: BLE001
                    pass
            self._fail_all(AmqpUnavailable("the connection is closed"))
            self._ready.set()
            if was_alive and not self._closing:  # pragma: no cover - the loop ended without a close callback
                self.on_lost(self, self.error or AmqpUnavailable("connection loop ended"))

    def _opened(self, conn: Any) -> None:
        self.alive = True
        self._ready.set()

    def _open_failed(self, conn: Any, exc: BaseException) -> None:
        self.error = exc
        conn.ioloop.stop()

    def _closed(self, conn: Any, exc: BaseException) -> None:
        was_alive, self.alive = self.alive, False
        self.error = exc
        self._fail_all(AmqpUnavailable(f"connection lost: {_describe(exc)}"))
        for hook in list(self._close_hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001 - one hook must not stop the others
                log.exception("amqp link %s: close hook failed", self.name)
        conn.ioloop.stop()
        if was_alive and not self._closing:
            self.on_lost(self, exc)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run `hook` on the link thread when the connection closes (also on a clean stop)."""
        self._close_hooks.append(hook)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the connection and end the thread (never from the link thread itself)."""
        self._closing = True
        conn = self.conn
        if conn is not None and self.thread is not None and self.thread.is_alive():
            def close() -> None:
                if conn.is_open:
                    conn.close()
                elif not conn.is_closing:
                    conn.ioloop.stop()
            try:
                conn.ioloop.add_callback_threadsafe(close)
            except Exception:  # noqa: BLE001 - the loop is gone already
                pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
            if self.thread.is_alive() and conn is not None:  # pragma: no cover - a wedged socket
                try:
                    conn.ioloop.add_callback_threadsafe(conn.ioloop.stop)
                except Exception:  # noqa: BLE001
                    pass
                self.thread.join(timeout)

    # -- handing work to the link thread -----------------------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        if not self.alive:
            raise AmqpUnavailable("not connected")
        try:
            self.conn.ioloop.add_callback_threadsafe(fn)
        except Exception as exc:  # noqa: BLE001 - the loop closed under us
            raise AmqpUnavailable(f"not connected ({exc})") from None

    def call(self, fn: Callable[[Future[Any]], None], timeout: float) -> Any:
        """Run fn(future) on the link thread and wait for the result it sets."""
        fut: Future[Any] = Future()
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)

        def run() -> None:
            try:
                fn(fut)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if not fut.done():
                    fut.set_exception(exc)
        self.post(run)
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise AmqpUnavailable(f"no answer from the broker within {timeout:g}s") from None

    def _fail_all(self, exc: BaseException) -> None:
        for fut in list(self._futures):
            if not fut.done():
                try:
                    fut.set_exception(exc)
                except Exception:  # noqa: BLE001 - set meanwhile
                    pass

    def open_channel(self, on_close: Callable[[Any, BaseException], None] | None = None,
                     timeout: float = CONNECT_TIMEOUT) -> Any:
        def open_(fut: Future[Any]) -> None:
            def opened(ch: Any) -> None:
                if on_close is not None:
                    ch.add_on_close_callback(on_close)
                fut.set_result(ch)
            self.conn.channel(on_open_callback=opened)
        return self.call(open_, timeout)


class Admin:
    """Requests that may be refused one at a time (declare, passive declare, purge, delete) on a
    channel of their own, opened again after the broker closes it over a refusal."""

    def __init__(self, link: Link, timeout: float):
        self.link = link
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ch: Any = None
        self._pending: Future[Any] | None = None

    def _closed(self, ch: Any, reason: BaseException) -> None:
        if self._ch is ch:
            self._ch = None
        fut = self._pending
        if fut is not None and not fut.done():
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                fut.set_exception(ChannelRefused(reason.reply_code, reason.reply_text))
            else:
                fut.set_exception(AmqpUnavailable(_describe(reason)))

    def request(self, op: Callable[[Any, Callable[[Any], None]], None]) -> Any:
        """op(channel, done) sends one request; done(frame) is its reply. The reply's method."""
        with self._lock:
            if self._ch is None or not self._ch.is_open:
                self._ch = self.link.open_channel(self._closed, self.timeout)
            ch = self._ch

            def run(fut: Future[Any]) -> None:
                self._pending = fut
                if not ch.is_open:
                    raise AmqpUnavailable("channel closed")
                def done(frame: Any) -> None:
                    if not fut.done():
                        fut.set_result(frame.method)
                op(ch, done)
            return self.link.call(run, self.timeout)


class _PublishOp:
    __slots__ = ("items", "results", "remaining", "done")

    def __init__(self, items: list[tuple[str, bytes, Any, bool]]):
        self.items = items
        self.results: list[str | None] = [None] * len(items)
        self.remaining = len(items)
        self.done = threading.Event()


class Publisher:
    """The confirm-mode channel of a link. `publish` returns one outcome per item: None when the
    broker confirmed it, else why not ("nack", "returned: ...", "unavailable: ...")."""

    def __init__(self, link: Link):
        self.link = link
        self._pending: deque[_PublishOp] = deque()
        self._unconfirmed: OrderedDict[int, tuple[_PublishOp, int]] = OrderedDict()
        self._ch: Any = None
        self._opening = False
        self._next_tag = 1
        self._scheduled = False
        link.on_close(lambda: self._fail_everything("unavailable: connection lost"))

    def publish(self, items: list[tuple[str, bytes, Any, bool]], timeout: float) -> list[str | None]:
        op = _PublishOp(items)
        self._pending.append(op)
        if not self._scheduled:
            self._scheduled = True
            try:
                self.link.post(self._flush)
            except AmqpUnavailable:
                self._scheduled = False
                raise
        if not op.done.wait(timeout):
            return [r if r is not None else "timeout" for r in op.results]  # confirms still owed
        return op.results

    # -- on the link thread ------------------------------------------------------------------------
    def _flush(self) -> None:
        self._scheduled = False
        ch = self._ch
        if ch is None or not ch.is_open:
            if not self._opening:
                self._opening = True
                self.link.conn.channel(on_open_callback=self._channel_open)
            return
        pending = self._pending
        unconfirmed = self._unconfirmed
        publish = ch.basic_publish
        while pending:
            op = pending.popleft()
            for i, (key, body, props, mandatory) in enumerate(op.items):
                try:
                    publish("", key, body, props, mandatory)
                except (pika.exceptions.AMQPError, OSError) as exc:  # e.g. the channel closed meanwhile
                    self._resolve(op, i, f"unavailable: {_describe(exc)}")
                    continue
                except Exception as exc:  # noqa: BLE001 - a value pika cannot encode
                    self._resolve(op, i, f"invalid: {_describe(exc)}")
                    continue
                unconfirmed[self._next_tag] = (op, i)
                self._next_tag += 1

    def _channel_open(self, ch: Any) -> None:
        ch.add_on_close_callback(self._channel_closed)
        ch.add_on_return_callback(self._returned)

        def selected(_frame: Any) -> None:
            self._ch = ch
            self._opening = False
            self._next_tag = 1
            self._flush()
        ch.confirm_delivery(self._confirmed, callback=selected)

    def _channel_closed(self, ch: Any, reason: BaseException) -> None:
        self._ch = None
        self._opening = False
        self._fail_unconfirmed(f"unavailable: channel closed ({_describe(reason)})")
        if self._pending and self.link.alive:
            self.link.conn.ioloop.add_callback_threadsafe(self._flush)

    def _returned(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        for op, i in self._unconfirmed.values():
            key, _, p, _ = op.items[i]
            if key == method.routing_key and p.message_id == props.message_id and op.results[i] is None:
                op.results[i] = f"returned: {method.reply_code} {method.reply_text}"
                return

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tag = method.delivery_tag
        unconfirmed = self._unconfirmed
        if method.multiple:
            while unconfirmed:
                first = next(iter(unconfirmed))
                if first > tag:
                    break
                op, i = unconfirmed.pop(first)
                self._resolve(op, i, "nack" if nack else op.results[i])
        else:
            entry = unconfirmed.pop(tag, None)
            if entry is not None:
                op, i = entry
                self._resolve(op, i, "nack" if nack else op.results[i])

    @staticmethod
    def _resolve(op: _PublishOp, i: int, outcome: str | None) -> None:
        if outcome is not None and op.results[i] is None:
            op.results[i] = outcome
        op.remaining -= 1
        if op.remaining <= 0:
            op.done.set()

    def _fail_unconfirmed(self, why: str) -> None:
        entries = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        for op, i in entries:
            self._resolve(op, i, why)

    def _fail_everything(self, why: str) -> None:
        self._fail_unconfirmed(why)
        while self._pending:
            op = self._pending.popleft()
            for i in range(len(op.items)):
                self._resolve(op, i, why)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"
