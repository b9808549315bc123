"""The RabbitMQ driver (SPEC §7.3), Wippy-compatible, with publisher confirms.

Two connections per driver, each with its I/O on its own thread (`amqp_link.Link`): one for
publishing (a confirm-mode channel; every `publish` returns only once the broker confirmed,
and confirms of concurrent publishers pipeline) and queue requests, one for consuming (a
channel per consumer, QoS = the consumer's prefetch, deliveries pushed by the broker wait in
a local buffer until `fetch` takes them; acks and nacks are handed to the I/O thread).

Attempts: a message carries the attempt it was published with (`x-runtime-attempt`, 1 by
default); on quorum queues the broker's `x-delivery-count` (returns: nacks, channel closes,
crashes) is added, so a delivery lost to a crash counts.

Retry delay: a retried message is republished (confirmed) to a delay queue of the main queue
and then acked, so while it waits it holds no prefetch slot. Delay queues are quorum queues
`<queue>.delay.<ms>ms` with that TTL, dead-lettering back to the main queue through the
default exchange with the at-least-once strategy (a message is never dropped on the way, even
when the main queue is full), deleted by the broker when unused (`x-expires`). Delays are
rounded up to steps of 10% so few of them exist. On quorum queues a retry without delay is a
nack with requeue (the broker counts it).

Connection loss: the link's thread notices at once (or by heartbeat), pending confirms fail
(`Unavailable`), deliveries of the old connection are dropped (their tags are void; the broker
redelivers them), the driver reconnects with backoff in the background and consumers
subscribe again by themselves.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import re
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pika
import pika.compat
import pika.credentials
import pika.data
import pika.exceptions

from ..errors import Canceled, ConfigError, DriverError, InvalidMessage, PublishTimeout, QueueUnavailable
from ..queue.driver import Capabilities, Delivery, Driver, DriverConsumer, QueueStats
from ..queue.message import Message
from ..registry.drivers import env_name, mask_url
from . import amqp_wire as wire
from .amqp_link import Admin, AmqpUnavailable, ChannelRefused, Link, Publisher

log = logging.getLogger("runtime.driver.amqp")
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
REQUEST_TIMEOUT = 30.0
FULL_RETRY = 0.05  # seconds between tries of a publish the broker refused because the queue is full
DELAY_STEP = 1.1  # delays round up to the next power of 1.1 ms (within 10%)
DELAY_GRACE = 1.0  # a delayed message counts as delayed this long after it is due (dead-letter hop)
MAX_BATCH = 10000
ACK_LINGER = 0.001  # seconds an ack may wait for others to go with it
FETCH_LINGER = 0.003  # seconds a fetch that had to wait gives the rest of a burst to arrive


class AmqPlainCredentials(pika.credentials.PlainCredentials):
    """AMQPLAIN (a field table with LOGIN and PASSWORD), which pika does not ship."""

    TYPE = "AMQPLAIN"

    def response_for(self, start: Any) -> tuple[str | None, bytes | None]:
        if pika.compat.as_bytes(self.TYPE) not in pika.compat.as_bytes(start.mechanisms).split():
            return None, None
        pieces: list[bytes] = []
        pika.data.encode_table(pieces, {"LOGIN": self.username, "PASSWORD": self.password})
        return self.TYPE, b"".join(pieces)[4:]  # the table without its length prefix


if AmqPlainCredentials not in pika.credentials.VALID_TYPES:
    pika.credentials.VALID_TYPES.append(AmqPlainCredentials)


class AmqpDriver(Driver):
    kind = "queue.driver.amqp"
    capabilities = Capabilities(native_delay=True, shared=True, max_batch=MAX_BATCH)
    connection_errors = (AmqpUnavailable, pika.exceptions.AMQPConnectionError)

    def __init__(self, entry_id: str, options: dict[str, Any] | None = None, **kw: Any):
        super().__init__(entry_id, options, **kw)
        o = self.options
        self.url = str(o.get("url") or DEFAULT_URL)
        self.params = self._parameters()
        self.connect_timeout = float(o.get("connection_timeout") or 10.0)
        self.prefetch_count = int(o.get("prefetch_count") or 0)
        self.default_message_ttl = o.get("default_message_ttl")
        self._secrets = [s for s in (self.params.credentials.password if hasattr(self.params.credentials, "password")
                                     else None,) if s]
        self._pub: Link | None = None
        self._sub: Link | None = None
        self._publisher: Publisher | None = None
        self._admin: Admin | None = None
        self._generation = 0
        self._consumers: set[AmqpConsumer] = set()
        self._consumers_lock = threading.Lock()
        self._delay_queues: dict[str, dict[str, float]] = {}  # queue -> {delay queue: last declared}
        self._delay_lock = threading.Lock()
        self._due: dict[str, list[float]] = {}  # queue -> heap of when its delayed messages are due
        self._stop = threading.Event()
        self._reconnector: threading.Thread | None = None

    # -- connection parameters -----------------------------------------------------------------
    def _parameters(self) -> pika.ConnectionParameters:
        o = self.options
        try:
            params = pika.URLParameters(self.url)
        except Exception as exc:  # noqa: BLE001 - pika raises several kinds
            raise ConfigError(f"driver {self.entry_id}: bad url '{mask_url(self.url)}': {exc}") from None
        if o.get("vhost"):
            params.virtual_host = str(o["vhost"])
        if o.get("heartbeat") is not None:
            params.heartbeat = max(0, int(math.ceil(float(o["heartbeat"]))))
        if o.get("connection_timeout"):
            params.socket_timeout = float(o["connection_timeout"])
            params.stack_timeout = float(o["connection_timeout"])
        if o.get("frame_size"):
            params.frame_max = max(4096, int(o["frame_size"]))
        if o.get("channel_max"):
            params.channel_max = int(o["channel_max"])
        params.connection_attempts = 1
        params.client_properties = {"connection_name": str(o.get("connection_name") or self.entry_id),
                                    "product": "lua-queue-runtime"}
        mechanism = str(o.get("auth_mechanism") or "PLAIN").upper()
        creds = params.credentials
        if mechanism == "EXTERNAL":
            params.credentials = pika.credentials.ExternalCredentials()
        elif mechanism == "AMQPLAIN":
            params.credentials = AmqPlainCredentials(creds.username, creds.password)
        tls = o.get("tls") or {}
        if tls.get("enabled") or self.url.lower().startswith("amqps://"):
            params.ssl_options = pika.SSLOptions(self._tls_context(tls), tls.get("server_name") or params.host)
        return params

    def _tls_context(self, tls: dict[str, Any]) -> ssl.SSLContext:
        def pem(field: str) -> str | None:
            env = tls.get(f"{field}_env")
            if tls.get(field) and env:
                raise ConfigError(f"driver {self.entry_id}: tls.{field} and tls.{field}_env are both set")
            return os.environ.get(env_name(env)) if env else tls.get(field)

        cert, key, ca = pem("cert"), pem("key"), pem("ca")
        if bool(cert) != bool(key):
            raise ConfigError(f"driver {self.entry_id}: tls.cert and tls.key must be given together")
        try:
            ctx = ssl.create_default_context()
            if ca:
                if "-----BEGIN" in ca:
                    ctx.load_verify_locations(cadata=ca)
                else:
                    ctx.load_verify_locations(cafile=ca)
            if cert and key:
                with _pem_file(cert) as certfile, _pem_file(key) as keyfile:
                    ctx.load_cert_chain(certfile, keyfile)
            if tls.get("insecure_skip_verify"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"driver {self.entry_id}: tls: {exc}") from None
        return ctx

    def describe_error(self, exc: BaseException) -> str:
        return self.mask(super().describe_error(exc))

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return re.sub(r"(amqps?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)

    # -- open / close / reconnect -----------------------------------------------------------------
    def _open(self) -> None:
        self._generation += 1
        gen = self._generation
        pub = Link(self.params, f"{self.entry_id} publish", self._link_lost, gen)
        pub.start(self.connect_timeout)
        sub = Link(self.params, f"{self.entry_id} consume", self._link_lost, gen)
        try:
            sub.start(self.connect_timeout)
        except BaseException:
            pub.stop()
            raise
        self._publisher = Publisher(pub)
        self._admin = Admin(pub, REQUEST_TIMEOUT)
        self._pub, self._sub = pub, sub
        with self._delay_lock:
            for known in self._delay_queues.values():
                known.clear()  # declared again on first use
        self._stop.clear()
        log.info("driver %s: connected to %s", self.entry_id, mask_url(self.url))

    def _close(self) -> None:
        if self.state == "closed":  # a real close, not one step of reconnecting
            self._stop.set()
            r = self._reconnector
            if r is not None and r is not threading.current_thread():
                r.join(self.connect_timeout + 5.0)  # it may just have opened new links: closed below
            self.state = "closed"
        links, self._pub, self._sub = (self._pub, self._sub), None, None
        for link in links:
            if link is not None:
                link.stop()

    def _link_lost(self, link: Link, exc: BaseException) -> None:
        """On the link's thread: the connection is gone."""
        if link is not self._pub and link is not self._sub:
            return
        with self._consumers_lock:
            consumers = list(self._consumers)
        for c in consumers:
            c._lost(link.generation)
        self._lost(AmqpUnavailable(str(exc) or type(exc).__name__))
        if self.state == "reconnecting" and (self._reconnector is None or not self._reconnector.is_alive()):
            self._reconnector = threading.Thread(target=self.reconnect, args=(self._stop,), daemon=True,
                                                 name=f"amqp reconnect {self.entry_id}")
            self._reconnector.start()

    def _link(self, which: str) -> Link:
        link = self._pub if which == "pub" else self._sub
        if link is None or not link.alive:
            raise AmqpUnavailable("not connected (reconnecting)" if self.state != "closed" else "driver is closed")
        return link

    # -- queues --------------------------------------------------------------------------------
    def _queue_arguments(self, options: dict[str, Any]) -> tuple[bool, bool, dict[str, Any]]:
        o = self.options
        quorum = options.get("queue_type") == "quorum"
        durable = bool(options.get("durable", True))
        auto_delete = bool(options.get("auto_delete", False))
        if quorum and (not durable or auto_delete):
            raise DriverError(f"driver {self.entry_id}: a quorum queue must be durable and not auto_delete")
        args: dict[str, Any] = {}
        if quorum:
            args["x-queue-type"] = "quorum"
        ttl = options.get("message_ttl") or o.get("default_queue_ttl")
        if ttl:
            args["x-message-ttl"] = _ms(ttl)
        expiry = options.get("queue_expiry") or o.get("default_queue_expiry")
        if expiry:
            args["x-expires"] = max(1, _ms(expiry))
        if options.get("max_length"):
            args["x-max-length"] = int(options["max_length"])
            args["x-overflow"] = "reject-publish"
        return durable, auto_delete, args

    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        durable, auto_delete, args = self._queue_arguments(options)
        self._queue_request(queue, lambda ch, done: ch.queue_declare(queue, durable=durable, auto_delete=auto_delete,
                                                                     arguments=args, callback=done))

    def _queue_request(self, queue: str, op: Any) -> Any:
        admin = self._admin
        if admin is None or self._pub is None or not self._pub.alive:
            raise AmqpUnavailable("not connected")
        try:
            return admin.request(op)
        except ChannelRefused as exc:
            if exc.code == 406:
                raise DriverError(f"driver {self.entry_id}: queue '{queue}' exists on the broker with other "
                                  f"settings: {exc.text}") from None
            if exc.code == 404:
                raise QueueUnavailable(f"driver {self.entry_id}: queue '{queue}' does not exist on the broker "
                                       f"({exc.text})") from None
            raise DriverError(f"driver {self.entry_id}: queue '{queue}': {exc}") from None

    def is_quorum(self, queue: str) -> bool:
        return (self.queues.get(queue) or {}).get("queue_type") == "quorum"

    def content_type(self, queue: str) -> str:
        codec = (self.queues.get(queue) or {}).get("codec") or "json/plain"
        return wire.CONTENT_TYPES.get(str(codec), "application/json")

    def delete_queue(self, queue: str) -> None:
        """Delete a queue and its delay queues from the broker (tests, tools)."""
        with self._delay_lock:
            delays = list(self._delay_queues.pop(queue, {}))
        for name in [queue, *delays]:
            try:
                self._queue_request(name, lambda ch, done, n=name: ch.queue_delete(n, callback=done))
            except (QueueUnavailable, DriverError):
                pass
        self.queues.pop(queue, None)

    def _delay_queue(self, queue: str, delay: float) -> str:
        ms = _delay_bucket(delay)
        name = f"{queue}.delay.{ms}ms"
        expires = 2 * ms + 60_000
        now = time.monotonic()
        with self._delay_lock:
            known = self._delay_queues.setdefault(queue, {})
            fresh = now - known.get(name, float("-inf")) < expires / 4000
        if not fresh:
            args = {"x-queue-type": "quorum", "x-message-ttl": ms, "x-expires": expires,
                    "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
                    "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
            self._queue_request(name, lambda ch, done: ch.queue_declare(name, durable=True, arguments=args,
                                                                        callback=done))
            with self._delay_lock:
                self._delay_queues.setdefault(queue, {})[name] = now
        return name

    # -- publishing ----------------------------------------------------------------------------
    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        self.send(queue, [(m, 1) for m in messages], timeout, cancel, delay, force)

    def send(self, queue: str, items: Sequence[tuple[Message, int]], timeout: float,
             cancel: threading.Event | None = None, delay: float = 0.0, force: bool = False) -> None:
        """Publish (message, attempt) pairs, confirmed; to a delay queue when `delay` > 0."""
        target = self._delay_queue(queue, delay) if delay > 0 else queue
        ctype = self.content_type(queue)
        ttl = str(_ms(self.default_message_ttl)) if self.default_message_ttl else None
        batch = []
        for m, attempt in items:
            props, mandatory = wire.to_amqp(m, ctype, attempt, ttl, keep_expiration=delay <= 0)
            batch.append((target, m.body, props, mandatory))
        deadline = time.monotonic() + timeout
        while True:
            publisher = self._publisher
            if publisher is None or self._pub is None or not self._pub.alive:
                raise AmqpUnavailable("not connected (reconnecting)")
            outcomes = publisher.publish(batch, max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT)
            failed = [(b, why) for b, why in zip(batch, outcomes, strict=True) if why is not None]
            if not failed:
                break
            why = failed[0][1] or ""
            if why.startswith("unavailable") or why == "timeout" and not self._pub.alive:
                raise AmqpUnavailable(why.partition(": ")[2] or why)
            if why.startswith("invalid"):
                raise InvalidMessage(f"queue '{queue}': cannot send the message: {why.partition(': ')[2]}")
            if why.startswith("returned"):
                raise QueueUnavailable(f"queue '{queue}': the broker could not route the message ({why}); "
                                       f"does the queue exist?")
            if why == "timeout":
                raise PublishTimeout(f"queue '{queue}': no confirm from the broker within {timeout:g}s")
            # "nack": the queue is full (max_length with reject-publish), or the broker refused it
            if force or timeout <= 0 or time.monotonic() >= deadline:
                limit = (self.queues.get(queue) or {}).get("max_length")
                raise PublishTimeout(f"queue '{queue}' refused the message" + (
                    f": it is full ({limit} messages) and stayed full for {timeout:g}s" if limit else ""))
            if cancel is not None and cancel.is_set():
                raise Canceled(f"publish to queue '{queue}' canceled: the worker is stopping")
            batch = [b for b, _ in failed]
            time.sleep(min(FULL_RETRY, max(0.0, deadline - time.monotonic())))
        if delay > 0:
            due = time.monotonic() + delay
            with self._delay_lock:
                heap = self._due.setdefault(queue, [])
                for _ in items:
                    heapq.heappush(heap, due)

    # -- consuming, stats, purge ---------------------------------------------------------------
    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> AmqpConsumer:
        c = AmqpConsumer(self, queue, consumer_id, prefetch or self.prefetch_count or 10, options)
        c.subscribe()
        with self._consumers_lock:
            self._consumers.add(c)
        return c

    def consumers_of(self, queue: str) -> list[AmqpConsumer]:
        with self._consumers_lock:
            return [c for c in self._consumers if c.queue == queue and not c.closed]

    def _count(self, name: str) -> int:
        method = self._queue_request(name, lambda ch, done: ch.queue_declare(name, passive=True, callback=done))
        return int(method.message_count)

    def _stats(self, queue: str) -> QueueStats:
        ready = self._count(queue)
        delayed = 0
        with self._delay_lock:
            delays = list(self._delay_queues.get(queue, {}))
            heap = self._due.get(queue, [])
            now = time.monotonic()
            while heap and heap[0] + DELAY_GRACE < now:
                heapq.heappop(heap)
            expected = len(heap)
        for name in delays:
            try:
                delayed += self._count(name)
            except QueueUnavailable:  # expired: nothing waits there
                with self._delay_lock:
                    self._delay_queues.get(queue, {}).pop(name, None)
        consumers = self.consumers_of(queue)
        if not ready:
            for c in consumers:  # deliveries already sent to us are in our buffers after this
                c.sync()
        in_flight = sum(c.held() for c in consumers)
        return QueueStats(ready, in_flight, max(delayed, expected), exact=False)

    def _purge(self, queue: str) -> int:
        n = 0
        with self._delay_lock:
            delays = list(self._delay_queues.get(queue, {}))
            self._due.pop(queue, None)
        for name in [queue, *delays]:
            try:
                n += int(self._queue_request(name, lambda ch, done, q=name: ch.queue_purge(q, callback=done))
                         .message_count)
            except QueueUnavailable:
                pass
        for c in self.consumers_of(queue):
            n += c.discard_buffered()
        return n

    def _forget(self, c: AmqpConsumer) -> None:
        with self._consumers_lock:
            self._consumers.discard(c)


class _Subscription:
    """One consumer's channel on one connection."""

    def __init__(self, link: Link):
        self.link = link
        self.generation = link.generation
        self.ch: Any = None
        self.tag = ""
        self.alive = True
        self.buffer: deque[tuple[int, Any, bytes]] = deque()
        self.cond = threading.Condition()
        self.waiting = 0
        self.settles: deque[tuple[int, int]] = deque()  # (op, delivery tag)
        self.scheduled = False
        self.settled_below = 1  # every tag below this one is settled (tags start at 1 per channel)
        self.settled_above: set[int] = set()


_ACK, _REQUEUE, _DISCARD = 0, 1, 2


class AmqpConsumer(DriverConsumer):
    driver: AmqpDriver

    def __init__(self, driver: AmqpDriver, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]):
        super().__init__(driver, queue, consumer_id, prefetch, options)
        self.sub: _Subscription | None = None
        self.quorum = driver.is_quorum(queue)
        self._sub_lock = threading.Lock()

    # -- subscribing ---------------------------------------------------------------------------
    def subscribe(self) -> _Subscription:
        with self._sub_lock:
            sub = self.sub
            link = self.driver._link("sub")
            if sub is not None and sub.alive and sub.link is link:
                return sub
            sub = _Subscription(link)
            o = self.options
            tag = f"{o.get('consumer_tag') or self.consumer_id}-{os.urandom(4).hex()}"
            starting: list[Any] = []

            def on_close(ch: Any, reason: BaseException) -> None:
                sub.alive = False
                for fut in starting:
                    if not fut.done():
                        fut.set_exception(ChannelRefused(getattr(reason, "reply_code", 0),
                                                         getattr(reason, "reply_text", str(reason))))
                with sub.cond:
                    sub.buffer.clear()
                    sub.cond.notify_all()
                if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                    log.error("consumer %s: the broker closed its channel on queue %s: %s", self.consumer_id,
                              self.queue, reason)

            ch = link.open_channel(on_close)
            sub.ch = ch

            def on_cancel(_frame: Any) -> None:  # the broker cancelled it (e.g. the queue was deleted)
                log.warning("consumer %s: the broker cancelled its subscription to queue %s; subscribing again",
                            self.consumer_id, self.queue)
                sub.alive = False
                with sub.cond:
                    sub.cond.notify_all()
                if ch.is_open:
                    ch.close()  # its unacked deliveries go back to the queue
            ch.add_on_cancel_callback(on_cancel)

            def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                sub.buffer.append((method.delivery_tag, props, body))
                if sub.waiting:
                    with sub.cond:
                        sub.cond.notify()

            def start(fut: Any) -> None:
                starting.append(fut)

                def consume(_frame: Any) -> None:
                    sub.tag = ch.basic_consume(self.queue, on_message, auto_ack=False,
                                               exclusive=bool(o.get("exclusive")), consumer_tag=tag,
                                               callback=lambda _f: fut.done() or fut.set_result(True))
                    if o.get("no_wait"):
                        fut.done() or fut.set_result(True)
                ch.basic_qos(prefetch_count=min(65535, max(1, self.prefetch)), callback=consume)
            try:
                link.call(start, REQUEST_TIMEOUT)
            except ChannelRefused as exc:
                raise DriverError(f"consumer {self.consumer_id}: the broker refused to let it consume from queue "
                                  f"'{self.queue}': {exc}") from None
            except AmqpUnavailable:
                if link.alive and not sub.alive:
                    raise DriverError(f"consumer {self.consumer_id}: cannot consume from queue '{self.queue}' "
                                      f"(see the log)") from None
                raise
            if not sub.alive:
                raise DriverError(f"consumer {self.consumer_id}: the broker refused to let it consume from "
                                  f"queue '{self.queue}' (see the log)")
            self.sub = sub
            return sub

    def _lost(self, generation: int) -> None:
        """On a link thread: the connection of `generation` is gone; its deliveries are void."""
        sub = self.sub
        if sub is not None and sub.generation == generation:
            sub.alive = False
            with sub.cond:
                sub.buffer.clear()
                sub.cond.notify_all()
        with self._lock:
            for token in [t for t in self._in_flight if t[0] == generation]:
                del self._in_flight[token]

    # -- fetching ------------------------------------------------------------------------------
    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        sub = self.sub
        if sub is None or not sub.alive or sub.link is not self.driver._sub:
            sub = self.subscribe()
        buf = sub.buffer
        if not buf and wait > 0:
            deadline = time.monotonic() + wait
            with sub.cond:
                sub.waiting += 1
                try:
                    while not buf and sub.alive:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        sub.cond.wait(remaining)
                    if buf:  # the broker pushes one by one: let the rest of a burst join this fetch
                        until = time.monotonic() + FETCH_LINGER
                        while len(buf) < max_count and sub.alive:
                            remaining = until - time.monotonic()
                            if remaining <= 0:
                                break
                            sub.cond.wait(remaining)
                finally:
                    sub.waiting -= 1
        if not buf:
            if not sub.alive and not sub.link.alive:
                raise AmqpUnavailable("the connection was lost")
            return []  # a channel closed or cancelled by the broker: the next fetch subscribes again
        out: list[Delivery] = []
        gen, queue, quorum = sub.generation, self.queue, self.quorum
        from_amqp = wire.from_amqp
        pop = buf.popleft
        while buf and len(out) < max_count:
            try:
                tag, props, body = pop()
            except IndexError:
                break
            message, attempt = from_amqp(props, body)
            if quorum:
                attempt += wire._int((props.headers or {}).get(wire.DELIVERY_COUNT), 0)
            out.append(Delivery(queue, message, attempt, (gen, tag)))
        return out

    def held(self) -> int:
        sub = self.sub
        return self.in_flight + (len(sub.buffer) if sub is not None else 0)

    def sync(self) -> None:
        """A round trip on the consumer's channel: deliveries the broker sent before it are in
        the buffer afterwards (frames on a channel keep their order)."""
        sub = self.sub
        if sub is None or not sub.alive:
            return
        try:
            sub.link.call(lambda fut: sub.ch.basic_qos(prefetch_count=min(65535, max(1, self.prefetch)),
                                                       callback=lambda _f: fut.set_result(True)), REQUEST_TIMEOUT)
        except (AmqpUnavailable, pika.exceptions.AMQPError):
            pass

    def discard_buffered(self) -> int:
        sub = self.sub
        if sub is None:
            return 0
        n = 0
        while sub.buffer:
            try:
                tag, _, _ = sub.buffer.popleft()
            except IndexError:
                break
            self._settle_tag(sub, _DISCARD, tag)
            n += 1
        return n

    # -- settling ------------------------------------------------------------------------------
    def _live(self, d: Delivery) -> _Subscription | None:
        sub = self.sub
        if sub is None or not sub.alive or d.token[0] != sub.generation:
            return None  # a delivery of a lost connection: the broker delivers it again
        return sub

    def _settle_tag(self, sub: _Subscription, op: int, tag: int) -> None:
        sub.settles.append((op, tag))
        if not sub.scheduled:
            sub.scheduled = True
            try:
                sub.link.post(lambda: self._linger(sub))
            except AmqpUnavailable:
                sub.scheduled = False

    def _linger(self, sub: _Subscription) -> None:
        """On the link thread: settles that come within ACK_LINGER go out together (fewer
        wake-ups of this thread, more multiple acks); at once when many are waiting."""
        if len(sub.settles) >= max(2, self.prefetch // 4) or not sub.alive:
            self._flush(sub)
        else:
            sub.link.conn.ioloop.call_later(ACK_LINGER, lambda: self._flush(sub))

    def _flush(self, sub: _Subscription) -> None:
        """On the link thread: send the queued acks and nacks."""
        sub.scheduled = False
        ch = sub.ch
        settles = sub.settles
        if not sub.alive or ch is None or not ch.is_open:
            settles.clear()
            return
        acks: list[int] = []
        above = sub.settled_above
        while settles:
            op, tag = settles.popleft()
            if op == _ACK:
                acks.append(tag)
            else:
                ch.basic_nack(tag, multiple=False, requeue=op == _REQUEUE)
            above.add(tag)
        low = sub.settled_below
        while low in above:
            above.discard(low)
            low += 1
        sub.settled_below = low
        # Every tag below `low` is settled: the acks among them go as one multiple ack.
        covered = [t for t in acks if t < low]
        if len(covered) > 1:
            ch.basic_ack(max(covered), multiple=True)
            acks = [t for t in acks if t >= low]
        for tag in acks:
            ch.basic_ack(tag, multiple=False)

    def _ack(self, d: Delivery) -> None:
        sub = self._live(d)
        if sub is not None:
            self._settle_tag(sub, _ACK, d.token[1])

    def _retry(self, d: Delivery, delay: float) -> None:
        sub = self._live(d)
        if sub is None:
            return
        if self.quorum and delay <= 0:
            self._settle_tag(sub, _REQUEUE, d.token[1])  # the broker counts the attempt
            return
        try:
            self.driver.send(self.queue, [(d.message, d.attempt + 1)], REQUEST_TIMEOUT, delay=max(delay, 0.0),
                             force=True)
        except Exception as exc:  # noqa: BLE001 - not lost: back to the queue at once instead
            log.warning("consumer %s: could not delay message %s (%s); it is requeued at once", self.consumer_id,
                        d.message.id, self.driver.mask(str(exc)))
            self._settle_tag(sub, _REQUEUE, d.token[1])
            return
        self._settle_tag(sub, _ACK, d.token[1])  # after the confirm: a crash between duplicates, never loses

    def _release(self, deliveries: list[Delivery]) -> None:
        live = [(d, sub) for d in deliveries if (sub := self._live(d)) is not None]
        if not live:
            return
        if self.quorum:  # a nack would count an attempt: republish with the attempt it had, then ack
            try:
                self.driver.send(self.queue, [(d.message, d.attempt) for d, _ in live], REQUEST_TIMEOUT, force=True)
            except Exception as exc:  # noqa: BLE001 - requeued instead (the broker then counts one more attempt)
                log.warning("consumer %s: could not return %d message(s) uncounted (%s); requeued", self.consumer_id,
                            len(live), self.driver.mask(str(exc)))
                for d, sub in live:
                    self._settle_tag(sub, _REQUEUE, d.token[1])
                return
            for d, sub in live:
                self._settle_tag(sub, _ACK, d.token[1])
            return
        for d, sub in live:
            self._settle_tag(sub, _REQUEUE, d.token[1])

    def _close(self) -> None:
        sub = self.sub
        self.driver._forget(self)
        if sub is None or not sub.alive:
            return
        def cancel(fut: Any) -> None:
            if sub.ch.is_open and sub.tag in sub.ch.consumer_tags:
                sub.ch.basic_cancel(sub.tag, callback=lambda _f: fut.done() or fut.set_result(True))
            else:
                fut.set_result(False)
        try:
            sub.link.call(cancel, REQUEST_TIMEOUT)
        except Exception:  # noqa: BLE001 - closing the channel below cancels it too
            pass
        left = []
        while sub.buffer:
            tag, props, body = sub.buffer.popleft()
            message, attempt = wire.from_amqp(props, body)
            if self.quorum:
                attempt += wire._int((props.headers or {}).get(wire.DELIVERY_COUNT), 0)
            left.append(Delivery(self.queue, message, attempt, (sub.generation, tag)))
        if left:
            self._release(left)  # never started: back without counting an attempt
        done = threading.Event()

        def close() -> None:
            self._flush(sub)
            if sub.ch.is_open:
                sub.ch.close()
            done.set()
        try:
            sub.link.post(close)
            done.wait(REQUEST_TIMEOUT)
        except AmqpUnavailable:
            pass
        sub.alive = False


def _ms(seconds: Any) -> int:
    return max(0, int(round(float(seconds) * 1000)))


def _delay_bucket(delay: float) -> int:
    """Milliseconds, rounded up to the next step of DELAY_STEP (so few delay queues exist)."""
    ms = max(0, int(math.ceil(delay * 1000)))
    if ms <= 10:
        return ms
    k = math.ceil(math.log(ms) / math.log(DELAY_STEP) - 1e-9)
    return max(ms, int(math.ceil(DELAY_STEP ** k)))


class _pem_file:
    """PEM text in a private temporary file (ssl wants files), removed after use; a path as it is."""

    def __init__(self, value: str):
        self.value = value
        self.path: str | None = None

    def __enter__(self) -> str:
        if "-----BEGIN" not in self.value:
            return self.value
        fd, self.path = tempfile.mkstemp(suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(self.value)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            os.unlink(self.path)
