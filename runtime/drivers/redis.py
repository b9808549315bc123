"""The Redis Streams driver (SPEC §7.4): one stream and one consumer group per queue.

Keys (`key_prefix` default `runtime:`): the stream `<prefix><queue>` and the sorted set
`<prefix><queue>:delayed` (retries and delayed publishes, scored by due time in ms). An
entry's fields: `i` the message id, `b` the body, `h` the headers (msgpack, absent when
empty), `a` the attempts made before this entry was added (absent when 0: a retry adds a new
entry, whose server delivery count starts again at 1). A delivery's attempt is `a` plus the
server's delivery count (XPENDING / XCLAIM), so a delivery lost to a crash counts.

How the pieces fit (Wippy removed its driver because nacked entries stayed pending and
reattaching was unreliable; here nothing stays pending without an owner that renews it):

* fetch runs one server-side script (TAKE): it moves due members of the sorted set back to
  the stream, takes released entries first (the head of the queue), then new entries
  (XREADGROUP `>`). Queued acks go in the same round trip. With nothing there it blocks in
  XREADGROUP up to the fetch's wait (capped below the socket timeout and at the next due
  delayed message), so a publish anywhere wakes it at once.
* ack = XACK + XDEL in one script, batched: acks are queued and written by the next fetch or
  by the background thread within a millisecond or two. Acked entries are gone from the
  stream, so ready = XLEN - pending (+ released).
* retry = XACK + XDEL + (ZADD with the due time, or XADD at the tail) in one script; release
  hands the entry to a reserved consumer name (`~released`) with its delivery count set back
  (XCLAIM RETRYCOUNT JUSTID), where the next TAKE anywhere finds it first.
* Recovery: a consumer's name is `<consumer id>@<host>:<pid>`. At its first fetch and every
  `claim_interval`, a consumer claims (XCLAIM, which counts a delivery) the pending entries
  of consumers on this host whose process is gone (at once: a `kill -9`ed or restarted
  process's entries come back without waiting), its own name's leftovers (a restarted
  process with the same pid, as in a container), and entries of any consumer idle for
  `claim_min_idle` (a crashed process on another host). The background thread renews every
  in-flight delivery (XCLAIM JUSTID of entries still owned) every `claim_min_idle / 4`, so a
  running handler's entries never look idle; an entry found owned by someone else is dropped
  from the in-flight map (its late settle returns False).
* `max_length` counts ready entries; a publisher waits for room (a script adds what fits).
  Never MAXLEN trimming.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import Canceled, ConfigError, DriverError, InvalidMessage, PublishTimeout
from ..queue.driver import BackgroundLoop, Capabilities, Delivery, Driver, DriverConsumer, QueueStats
from ..queue.message import Message
from .redis_scripts import _ACK, _CLAIM, _PURGE, _PUT_BOUNDED, _RELEASE, _RENEW, _RETRY, _STATS, _TAKE

log = logging.getLogger("runtime.driver.redis")

RELEASED = "~released"  # the consumer name that holds released entries until someone takes them
MAX_BATCH = 1000
MOVE_BATCH = 500  # due delayed members moved per fetch
CANCEL_POLL = 0.05  # seconds between looks at a waiting publisher's cancel flag and the queue length
MAX_BLOCK = 1.0  # seconds: the longest single blocking read (released entries are seen at least this often)
OVER_LIMIT_WARNING = 60.0

_serial = itertools.count()  # makes every delivery's token unique (a released entry is taken again)
_pack = msgpack.packb
_unpack = msgpack.unpackb


def _pack_lua(fields: list[Any]) -> bytes:
    """Fields for a script's cmsgpack.unpack, which reads only the old raw format (no bin type)."""
    return msgpack.packb(fields, use_bin_type=False)


def _duration(options: dict[str, Any], key: str, default: float, entry_id: str) -> float:
    value = options.get(key)
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"driver {entry_id}: {key} must be a number of seconds, not {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"driver {entry_id}: {key} must be above 0, not {value!r}")
    return seconds


def mask_url(url: str) -> str:
    """The URL with its password shown as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisDriver(Driver):
    kind = "queue.driver.redis"
    capabilities = Capabilities(bounded=True, native_attempts=True, native_delay=True, lease=True, shared=True,
                                max_batch=MAX_BATCH, min_wait=0.001)
    connection_errors = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError,
                         TimeoutError)

    def __init__(self, entry_id: str, options: dict[str, Any] | None = None, **kw: Any):
        super().__init__(entry_id, options, **kw)
        o = self.options
        self.prefix = str(o.get("key_prefix") if o.get("key_prefix") is not None else "runtime:")
        self.group = str(o.get("group") or "runtime")
        self.claim_interval = _duration(o, "claim_interval", 30.0, entry_id)
        self.claim_min_idle = _duration(o, "claim_min_idle", 60.0, entry_id)
        self.dial_timeout = _duration(o, "dial_timeout", 5.0, entry_id)
        self.read_timeout = _duration(o, "read_timeout", 3.0, entry_id)
        self.write_timeout = _duration(o, "write_timeout", 3.0, entry_id)
        self.pool_size = int(o.get("pool_size") or 0) or 32
        self.url = self._url(o)
        self._password = str(o.get("password") or urlsplit(self.url).password or "")
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._limits: dict[str, int] = {}
        self._acks: deque[tuple[str, bytes]] = deque()  # (queue, entry id) not yet written
        self._consumers: set[RedisConsumer] = set()
        self._names: set[str] = set()
        self._cond = threading.Condition()  # room freed (bounded publishers wait on it)
        self._room = 0
        self._bg = BackgroundLoop()
        self._bg_stop, self._bg_wake = self._bg.stop, self._bg.wake
        self._flush_lock = threading.Lock()
        self._warned_at: dict[str, float] = {}
        self.host = socket.gethostname()

    # -- configuration ------------------------------------------------------------------------
    def _url(self, o: dict[str, Any]) -> str:
        url = o.get("url")
        addrs = o.get("addrs")
        if url and addrs:
            raise ConfigError(f"driver {self.entry_id}: give url or addrs, not both")
        if not url and addrs:
            items = [addrs] if isinstance(addrs, str) else list(addrs)
            if len(items) != 1:
                raise ConfigError(f"driver {self.entry_id}: addrs lists {len(items)} addresses; this driver "
                                  "talks to one server (no cluster or sentinel): give one host:port")
            url = f"redis://{items[0]}"
        url = str(url or "redis://127.0.0.1:6379")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"driver {self.entry_id}: url must start with redis:// or rediss://, "
                              f"not {mask_url(url)}")
        # redis-py lets the url win over separate fields: a field given twice is refused, not ignored.
        db = parts.path.strip("/")
        for key, in_url in (("username", parts.username), ("password", parts.password),
                            ("db", db if db and db != str(o.get("db")) else None)):
            if o.get(key) not in (None, "", 0) and in_url not in (None, ""):
                raise ConfigError(f"driver {self.entry_id}: {key} is given both in the url and as a field; "
                                  "give it once")
        return url

    def _pool_kwargs(self) -> dict[str, Any]:
        o = self.options
        kw: dict[str, Any] = {
            "socket_timeout": max(self.read_timeout, self.write_timeout),
            "socket_connect_timeout": self.dial_timeout,
            "socket_keepalive": True,
            "health_check_interval": 15,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
            "max_connections": self.pool_size,
            "timeout": self.dial_timeout,  # waiting for a free connection of the pool
        }
        if o.get("username"):
            kw["username"] = str(o["username"])
        if o.get("password"):
            kw["password"] = str(o["password"])
        if o.get("db") is not None and o.get("db") != "":
            kw["db"] = int(o["db"])
        if o.get("client_name"):
            kw["client_name"] = str(o["client_name"])
        tls = o.get("tls") or {}
        if tls.get("enabled") or urlsplit(self.url).scheme == "rediss":
            kw["connection_class"] = redis.SSLConnection
            kw["ssl_cert_reqs"] = ssl.CERT_NONE if tls.get("insecure_skip_verify") else ssl.CERT_REQUIRED
            kw["ssl_check_hostname"] = not tls.get("insecure_skip_verify")
            if tls.get("ca"):
                kw["ssl_ca_certs"] = str(tls["ca"])
            if tls.get("cert"):
                kw["ssl_certfile"] = str(tls["cert"])
            if tls.get("key"):
                kw["ssl_keyfile"] = str(tls["key"])
            server_name = str(tls.get("server_name") or "")
            if server_name and server_name != urlsplit(self.url).hostname:
                raise ConfigError(f"driver {self.entry_id}: tls.server_name {server_name!r} differs from the "
                                  "url's host; redis-py checks the certificate against the host it connects to, "
                                  "so put that name in the url")
        return kw

    def describe_error(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        return text

    # -- open / close -------------------------------------------------------------------------
    def _open(self) -> None:
        pool = redis.BlockingConnectionPool.from_url(self.url, **self._pool_kwargs())
        client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        try:
            info = client.info("server")
        except BaseException:
            client.close()
            pool.disconnect()
            raise
        version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2] if p.isdigit())
        if version < (7, 0):
            client.close()
            pool.disconnect()
            raise DriverError(f"driver {self.entry_id}: needs Redis 7.0 or newer; {mask_url(self.url)} runs "
                              f"{info.get('redis_version')}")
        self._client = client
        self._scripts = {name: client.register_script(src) for name, src in (
            ("take", _TAKE), ("ack", _ACK), ("retry", _RETRY), ("release", _RELEASE), ("renew", _RENEW),
            ("claim", _CLAIM), ("stats", _STATS), ("put", _PUT_BOUNDED), ("purge", _PURGE))}
        self._bg.start(self._background, f"redis-driver {self.entry_id}")

    def _close(self) -> None:
        self._bg.join()
        client, self._client = self._client, None
        if client is not None:
            if self._acks and self.state == "closed":  # a graceful close (a reconnect keeps them queued)
                try:
                    self._flush_acks(client)
                except Exception as exc:  # noqa: BLE001 - those messages come back after claim_min_idle
                    log.warning("driver %s: could not write %d ack(s) before closing (%s); they are kept for the "
                                "next connection (else those messages are delivered again)", self.entry_id,
                                len(self._acks), self.describe_error(exc))
            client.close()
            client.connection_pool.disconnect()

    def _redis(self) -> redis.Redis:
        client = self._client
        if client is None:
            raise redis.ConnectionError(f"driver {self.entry_id} is not open")
        return client

    def stream(self, queue: str) -> str:
        return f"{self.prefix}{queue}"

    def delayed_key(self, queue: str) -> str:
        return f"{self.prefix}{queue}:delayed"

    # -- queues and publishing ----------------------------------------------------------------
    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        self._limits[queue] = max(0, int(options.get("max_length") or 0))
        if self._client is None:
            return  # recorded; open() declares every queue again
        try:
            self._client.xgroup_create(self.stream(queue), self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise DriverError(f"driver {self.entry_id}: cannot declare queue '{queue}': {exc}") from None

    @staticmethod
    def _fields(m: Message, base: int = 0) -> list[Any]:
        if not isinstance(m.body, bytes | bytearray | memoryview) or not isinstance(m.id, str):
            raise InvalidMessage(f"a message needs a bytes body and a text id, got {type(m.body).__name__} "
                                 f"and {type(m.id).__name__}")
        fields: list[Any] = ["i", m.id, "b", bytes(m.body)]
        if m.headers:
            try:
                fields += ["h", _pack(m.headers)]
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidMessage(f"cannot store the message headers: {exc}") from None
        if base:
            fields += ["a", str(base)]
        return fields

    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        client = self._redis()
        stream = self.stream(queue)
        try:
            all_fields = [self._fields(m) for m in messages]
        except InvalidMessage as exc:
            raise InvalidMessage(f"queue '{queue}': {exc}") from None
        if delay > 0:
            due = int((time.time() + delay) * 1000)
            tag = os.urandom(8)
            mapping = {_pack_lua([tag + i.to_bytes(4, "big"), *f]): due for i, f in enumerate(all_fields)}
            client.zadd(self.delayed_key(queue), mapping)
            return
        limit = self._limits.get(queue, 0)
        if limit and not force:
            self._publish_bounded(queue, all_fields, limit, timeout, cancel)
            return
        pipe = client.pipeline(transaction=False)
        for f in all_fields:
            pipe.xadd(stream, dict(zip(f[::2], f[1::2], strict=True)))
        pipe.execute()
        if limit and force:
            self._warn_if_over(queue, limit)

    def _publish_bounded(self, queue: str, all_fields: list[list[Any]], limit: int, timeout: float,
                         cancel: threading.Event | None) -> None:
        put = self._scripts["put"]
        packed = [_pack_lua(f) for f in all_fields]
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            seen = self._room
            done += int(put(keys=[self.stream(queue)], args=[self.group, limit, RELEASED, *packed[done:]]))
            if done >= len(packed):
                return
            if cancel is not None and cancel.is_set():
                raise Canceled(f"publish to queue '{queue}' canceled: the worker is stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout(f"queue '{queue}' is full ({limit} messages) and stayed full for {timeout:g}s")
            with self._cond:  # woken by fetches in this process; other processes' seen by the poll
                if self._room == seen:
                    self._cond.wait(min(remaining, CANCEL_POLL))

    def _warn_if_over(self, queue: str, limit: int) -> None:
        now = time.monotonic()
        if now - self._warned_at.get(queue, float("-inf")) < OVER_LIMIT_WARNING:
            return
        ready = self._stats(queue).ready or 0
        if ready >= limit:
            self._warned_at[queue] = now
            log.warning("queue %s on driver %s holds %d messages, at or above its max_length %d "
                        "(requeues and dead letters are never refused)", queue, self.entry_id, ready, limit)

    def _stats(self, queue: str) -> QueueStats:
        client = self._redis()
        self._flush_acks(client)
        xlen, pending, released, zcard, due = (int(x) for x in self._scripts["stats"](
            keys=[self.stream(queue), self.delayed_key(queue)],
            args=[self.group, RELEASED, int(time.time() * 1000)]))
        return QueueStats(xlen - pending + released + due, pending - released, zcard - due, exact=True)

    def _purge(self, queue: str) -> int:
        client = self._redis()
        self._flush_acks(client)
        n = int(self._scripts["purge"](keys=[self.stream(queue), self.delayed_key(queue)],
                                       args=[self.group, RELEASED]))
        self._freed()
        return n

    def delete_queue(self, queue: str) -> None:
        """Delete the queue's stream, group and delayed set (tests on a shared server)."""
        self._redis().delete(self.stream(queue), self.delayed_key(queue))

    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> RedisConsumer:
        base = f"{consumer_id}@{self.host}:{os.getpid()}"
        with self._cond:
            name, n = base, 1
            while name in self._names:
                name = f"{consumer_id}#{n}@{self.host}:{os.getpid()}"
                n += 1
            self._names.add(name)
            consumer = RedisConsumer(self, queue, consumer_id, prefetch, options, name)
            self._consumers.add(consumer)
        return consumer

    def _freed(self) -> None:
        with self._cond:
            self._room += 1
            self._cond.notify_all()

    # -- acks ---------------------------------------------------------------------------------
    def _queue_ack(self, queue: str, entry_id: bytes) -> None:
        self._acks.append((queue, entry_id))
        if not self._bg_wake.is_set():
            self._bg_wake.set()

    def _queue_acks(self, queue: str, entry_ids: list[bytes]) -> None:
        """Acks of a batch: queued together, one wake-up of the writer."""
        self._acks.extend((queue, eid) for eid in entry_ids)
        if not self._bg_wake.is_set():
            self._bg_wake.set()

    def _take_acks(self) -> dict[str, list[bytes]]:
        by_queue: dict[str, list[bytes]] = {}
        pop = self._acks.popleft
        try:
            while True:
                q, eid = pop()
                by_queue.setdefault(q, []).append(eid)
        except IndexError:
            return by_queue

    def _ack_calls(self, acks: dict[str, list[bytes]]) -> list[tuple[str, list[Any], list[Any]]]:
        return [("ack", [self.stream(q)], [self.group, *ids[i:i + MAX_BATCH]])
                for q, ids in acks.items() for i in range(0, len(ids), MAX_BATCH)]

    def _pipeline(self, client: redis.Redis, calls: list[tuple[str, list[Any], list[Any]]]) -> list[Any]:
        """Run scripts in one round trip by their sha (redis-py's own script pipelining asks
        SCRIPT EXISTS first, a second round trip each time); a server that lost its scripts
        (a restart) gets them loaded again and the whole batch once more (every script here
        may run twice: acks of gone entries do nothing)."""
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
            try:
                return pipe.execute()  # type: ignore[no-any-return]
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in self._scripts.values():
                    client.script_load(script.script)
        raise AssertionError("unreachable")  # pragma: no cover

    def _requeue_acks(self, acks: dict[str, list[bytes]]) -> None:
        self._acks.extendleft((q, eid) for q, ids in reversed(list(acks.items())) for eid in reversed(ids))

    def _flush_acks(self, client: redis.Redis) -> None:
        # Under the lock even with nothing queued: acks the background thread has taken and
        # is writing now must be written before the caller (stats, a retry) reads the stream.
        with self._flush_lock:
            acks = self._take_acks()
            if not acks:
                return
            try:
                self._pipeline(client, self._ack_calls(acks))
            except BaseException:
                self._requeue_acks(acks)
                raise

    # -- the background thread: acks, lease renewal -------------------------------------------
    def _background(self) -> None:
        """Writes queued acks soon after they come; renews every in-flight entry."""

        def flush() -> None:
            client = self._client
            if client is not None:
                self._flush_acks(client)

        def consumers() -> list[DriverConsumer]:
            with self._cond:
                return list(self._consumers)

        self.settle_and_renew(self._bg_stop, self._bg_wake, flush=flush, pending=lambda: len(self._acks),
                              consumers=consumers, renew=lambda c, live: c._extend(live, self.claim_min_idle),
                              renew_every=self.claim_min_idle / 4, what="acks")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RedisConsumer(DriverConsumer):
    driver: RedisDriver

    def __init__(self, driver: RedisDriver, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any],
                 name: str):
        super().__init__(driver, queue, consumer_id, prefetch, options)
        self.name = name
        self._stream = driver.stream(queue)
        self._delayed = driver.delayed_key(queue)
        self._next_claim = 0.0  # monotonic time of the next claim round (0: at the first fetch)
        self._first_claim = True  # the first round also takes this name's leftovers (a restart, same pid)

    # -- fetching -----------------------------------------------------------------------------
    def _deliveries(self, rows: list[Any]) -> list[Delivery]:
        out = []
        queue = self.queue
        for entry_id, count, flat in rows:
            f = dict(zip(flat[::2], flat[1::2], strict=False))
            headers = f.get(b"h")
            base = int(f.get(b"a") or 0)
            m = Message(f.get(b"b", b""), _unpack(headers) if headers else {}, f.get(b"i", b"").decode())
            out.append(Delivery(queue, m, base + int(count), (entry_id, int(count), next(_serial))))
        return out

    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        try:
            return self._fetch_from(self.driver._redis(), min(max_count, MAX_BATCH), wait)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group is gone (deleted, evicted, a server restarted without its
            # data): declare it again; the next fetch reads from it.
            log.warning("consumer %s: the stream of %s or its group is gone (%s); declaring it again",
                        self.consumer_id, self.queue, exc)
            self.driver._declare(self.queue, self.driver.queues.get(self.queue, {}))
            return []

    def _fetch_from(self, client: redis.Redis, n: int, wait: float) -> list[Delivery]:
        d = self.driver
        deadline = time.monotonic() + wait
        if time.monotonic() >= self._next_claim:
            claimed = self._claim(client, n)
            if claimed:
                return self._took(claimed)
        while True:
            acks = d._take_acks() if d._acks else {}
            now_ms = int(time.time() * 1000)
            calls = d._ack_calls(acks) if acks else []
            calls.append(("take", [self._stream, self._delayed], [d.group, self.name, n, now_ms, MOVE_BATCH, RELEASED]))
            try:
                result = d._pipeline(client, calls)
            except BaseException:
                if acks:
                    d._requeue_acks(acks)
                raise
            next_due, rows = result[-1]
            if rows:
                return self._took(self._deliveries(rows))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return []
            block = min(remaining, MAX_BLOCK, d.read_timeout / 2)
            next_due = float(next_due)
            if next_due >= 0:
                block = min(block, max(0.001, (next_due - now_ms) / 1000 + 0.001))
            if time.monotonic() + block >= self._next_claim:
                block = max(0.001, min(block, self._next_claim - time.monotonic()))
            read: Any = client.xreadgroup(d.group, self.name, {self._stream: ">"}, count=n,
                                          block=max(1, int(block * 1000)))
            if read:
                rows = [(eid, 1, _flat(fields)) for eid, fields in read[0][1]]
                return self._took(self._deliveries(rows))
            if time.monotonic() >= self._next_claim:
                claimed = self._claim(client, n)
                if claimed:
                    return self._took(claimed)
            if time.monotonic() >= deadline or self.closed:
                return []

    def _took(self, got: list[Delivery]) -> list[Delivery]:
        if self.driver._limits.get(self.queue):
            self.driver._freed()
        return got

    def _claim(self, client: redis.Redis, n: int) -> list[Delivery]:
        """Claim pending entries of gone consumers: this host's dead processes (and this
        consumer's own leftovers) at once, anyone's idle past claim_min_idle."""
        d = self.driver
        self._next_claim = time.monotonic() + d.claim_interval
        d._flush_acks(client)  # an entry acked here is not claimed back
        names = [self.name] if self._first_claim else []
        self._first_claim = False
        for info in client.xinfo_consumers(self._stream, d.group):
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            who, _, where = name.rpartition("@")
            host, _, pid = where.rpartition(":")
            if who and host == d.host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                names.append(name)
        held = [dl.token[0] for dl in self.deliveries()]
        rows = d._scripts["claim"](keys=[self._stream], args=[d.group, self.name, RELEASED,
                                   int(d.claim_min_idle * 1000), n, len(names), *names, *held])
        got = self._deliveries(rows)
        if got:
            log.info("consumer %s: claimed %d message(s) of %s left by a stopped or stalled consumer",
                     self.consumer_id, len(got), self.queue)
        return got

    # -- settling -----------------------------------------------------------------------------
    def _ack(self, d: Delivery) -> None:
        self.driver._queue_ack(self.queue, d.token[0])

    def _ack_many(self, deliveries: list[Delivery]) -> None:
        self.driver._queue_acks(self.queue, [d.token[0] for d in deliveries])

    def _retry(self, d: Delivery, delay: float) -> None:
        dr = self.driver
        fields = dr._fields(d.message, d.attempt)
        due = int((time.time() + delay) * 1000) if delay > 0 else 0
        member = _pack_lua([d.token[0] + os.urandom(4), *fields])
        dr._flush_acks(dr._redis())
        dr._scripts["retry"](keys=[self._stream, self._delayed],
                             args=[dr.group, self.name, d.token[0], due, member])

    def _release(self, deliveries: list[Delivery]) -> None:
        dr = self.driver
        args: list[Any] = [dr.group, self.name, RELEASED]
        for d in deliveries:
                args += [d.token[0], max(0, d.token[1] - 1)]
        dr._scripts["release"](keys=[self._stream], args=args)

    def _extend(self, deliveries: list[Delivery], seconds: float) -> None:
        dr = self.driver
        ids = [d.token[0] for d in deliveries]
        lost: list[bytes] = []
        for i in range(0, len(ids), MAX_BATCH):
            lost += dr._scripts["renew"](keys=[self._stream], args=[dr.group, self.name, *ids[i:i + MAX_BATCH]])
        if lost:
            gone_ids = set(lost)
            self.lost([dl for dl in self.deliveries() if dl.token[0] in gone_ids],
                      "taken by another consumer: held past claim_min_idle without renewal")

    def _close(self) -> None:
        d = self.driver
        with d._cond:
            d._consumers.discard(self)
            d._names.discard(self.name)
        client = d._client
        if client is None:
            return
        try:
            d._flush_acks(client)
            if not client.xpending_range(self._stream, d.group, "-", "+", 1, consumername=self.name):
                client.xgroup_delconsumer(self._stream, d.group, self.name)
        except Exception as exc:  # noqa: BLE001 - a leftover consumer name is harmless
            log.debug("consumer %s: cleanup failed: %s", self.consumer_id, d.describe_error(exc))


def _flat(fields: dict[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for k, v in fields.items():
        out += [k, v]
    return out
