"""The SQLite driver (SPEC §7.2): durable queues in one database file, no server.

Everything survives a restart and `kill -9`; several processes on one host share a database
(WAL mode; not over a network file system). The schema and its version are in
`sqlite_schema.py`.

How it works, in one process:

* One writing connection per driver, used under `_lock` (a sqlite3 connection must not be
  used by two threads at once; SQLite has one writer at a time anyway), and one reading
  connection for counts, which in WAL mode neither waits for writers nor holds them up.
  Every write is a `BEGIN IMMEDIATE` transaction, so it waits for other processes up to
  `busy_timeout`; still locked after that is DriverUnavailable (so is an I/O error, a full
  disk or a file that cannot be opened; a programming error is not).
* Group commit: publishes and settles are queued and written by whoever holds the lock next,
  in one transaction (one fsync under `synchronous=full`). A publisher queues its batch and
  either finds it taken by the commit under way (and returns when that ends) or leads the
  next commit, with every publish queued meanwhile. Settles (ack / retry / release) do not
  wait: they are written by the next fetch's claim transaction or by the background thread
  within a millisecond or two. `stats` and `purge` write what is pending first, so their
  counts are exact.
* A fetch claims up to `max_count` ready rows in one `UPDATE ... RETURNING` (attempt counted
  there, so a delivery lost to a crash counts), after moving due delayed rows to the tail and
  freeing expired leases. With nothing ready it waits on a Condition: a publish in this
  process wakes it at once, other processes' publishes are seen within `poll_interval`, a
  delayed message when it is due, a crashed process's messages when their lease runs out.
* The background thread also renews the leases of every delivery in flight in this process
  every `visibility_timeout / 3`, so a slow handler keeps its message; a lease found lost
  (this process stalled past it and another took the message) drops the delivery from the
  in-flight map, so its late settle returns False.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from ..errors import Canceled, ConfigError, DriverError, InvalidMessage, PublishTimeout, RuntimeHostError
from ..queue.driver import BackgroundLoop, Capabilities, Delivery, Driver, DriverConsumer, QueueStats
from ..queue.message import Message
from . import sqlite_schema as sql
from .sqlite_schema import DELAYED, READY, TAKEN, SchemaError, SqliteUnavailable, unavailable

DEFAULT_PATH = ".runtime/queues.sqlite3"
CANCEL_POLL = 0.05  # seconds between looks at a publisher's cancel flag while it waits for room
MAX_CLAIM = 1000
MIN_SQLITE = (3, 35, 0)
COMMIT_WAIT = 1.0  # seconds: a publisher's longest wait for a commit under way (it is woken at its end)
OVER_LIMIT_WARNING = 60.0  # seconds between warnings that a queue is above max_length

log = logging.getLogger("runtime.driver.sqlite")
T = TypeVar("T")
_pack = msgpack.packb
_ACK, _RETRY, _RELEASE, _REQUEUE = 0, 1, 2, 3


class _PublishOp:
    __slots__ = ("queue", "rows", "done", "error")

    def __init__(self, queue: str, rows: list[tuple[Any, ...]]):
        self.queue = queue
        self.rows = rows
        self.done = False
        self.error: BaseException | None = None


class SqliteDriver(Driver):
    kind = "queue.driver.sqlite"
    capabilities = Capabilities(bounded=True, ordered=True, exact_stats=True, native_attempts=True,
                                native_delay=True, lease=True, shared=True, max_batch=MAX_CLAIM)
    connection_errors = (SqliteUnavailable,)

    def __init__(self, entry_id: str, options: dict[str, Any] | None = None, **kw: Any):
        super().__init__(entry_id, options, **kw)
        o = self.options
        path = Path(str(o.get("path") or DEFAULT_PATH)).expanduser()
        self.path = path if path.is_absolute() else self.app_dir / path
        self.synchronous = str(o.get("synchronous") or "full").lower()
        if self.synchronous not in ("full", "normal"):
            raise ConfigError(f"driver {entry_id}: synchronous must be 'full' or 'normal', not {self.synchronous!r}")
        self.visibility_timeout = _seconds(o, "visibility_timeout", 30.0, entry_id)
        self.poll_interval = _seconds(o, "poll_interval", 0.1, entry_id)
        self.busy_timeout = _seconds(o, "busy_timeout", 5.0, entry_id, allow_zero=True)
        self._lock = threading.Lock()  # the connection
        self._conn: Any = None  # sqlite3.Connection while open: every write, claims
        self._commit_cond = threading.Condition()  # signalled when a commit with publishes ends
        self._committing = False  # such a commit is under way
        self._read_lock = threading.Lock()
        self._reader: Any = None  # a second connection for counts, so they never hold up writes
        self._pubs: deque[_PublishOp] = deque()  # publishes waiting for a commit
        self._settles: deque[tuple[int, str, int, int, float]] = deque()  # (op, queue, seq, claim, visible_at)
        self._limits: dict[str, int] = {}  # queue -> max_length (0: unbounded)
        self._cond = threading.Condition()  # signalled when messages arrive or room is freed
        self._arrivals: dict[str, int] = {}  # queue -> counter of arrivals seen by this process
        self._room: dict[str, int] = {}  # queue -> counter of claims and purges (bounded queues)
        self._consumers: set[SqliteConsumer] = set()
        self._bg = BackgroundLoop()
        self._bg_stop, self._bg_wake = self._bg.stop, self._bg.wake
        self._warned_at: dict[str, float] = {}  # queue -> when it was last said to be over max_length

    # -- open / close -------------------------------------------------------------------------
    def _open(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise DriverError(f"driver {self.entry_id}: needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later "
                              f"(UPDATE ... RETURNING); this Python's sqlite3 module has {sqlite3.sqlite_version}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SqliteUnavailable(f"cannot create {self.path.parent}: {exc}") from None
        conn = self._connect()
        try:
            self._set_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            sql.migrate(conn, str(self.path))
            reader = self._connect()
        except BaseException as exc:
            conn.close()
            raise self._open_error(exc) from None
        with self._lock:
            self._conn = conn
        with self._read_lock:
            self._reader = reader
        self._bg.start(self._background, f"sqlite-driver {self.entry_id}")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False, cached_statements=64)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            return conn
        except BaseException as exc:
            raise self._open_error(exc) from None

    def _open_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, SchemaError):
            return DriverError(f"driver {self.entry_id}: {exc}")
        if isinstance(exc, sqlite3.Error):
            return unavailable(exc) or DriverError(f"driver {self.entry_id}: {self.path}: {exc}")
        return exc

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """WAL mode. Switching a new database needs a moment alone with it: another process
        opening it at the same time gets "locked" at once, not after busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout
        pause = threading.Event()
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (5, 6) or time.monotonic() >= deadline:
                    raise
                pause.wait(0.01)
        if str(mode).lower() != "wal":
            raise DriverError(f"driver {self.entry_id}: {self.path}: cannot use WAL mode (got {mode!r})")

    def _close(self) -> None:
        self._bg.join()
        with self._lock:
            if self._conn is None:
                return
            try:
                self._flush_locked()
            except Exception as exc:  # noqa: BLE001 - what is left is redelivered after its lease
                log.warning("driver %s: could not write %d settle(s) before closing (%s); those messages come "
                            "back after their lease", self.entry_id, len(self._settles), exc)
            self._conn.close()
            self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- queues and publishing ----------------------------------------------------------------
    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        self._limits[queue] = max(0, int(options.get("max_length") or 0))
        if self._conn is None and self.state == "closed":
            return  # recorded; open() declares every queue again
        self._write(lambda conn: conn.execute(sql.DECLARE, (queue, self._limits[queue], time.time())))

    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        state, visible_at = (DELAYED, time.time() + delay) if delay > 0 else (READY, None)
        try:
            rows = [(queue, state, visible_at, m.id, _pack(m.headers) if m.headers else None, m.body)
                    for m in messages]
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidMessage(f"queue '{queue}': cannot store the message headers: {exc}") from None
        for m in messages:  # checked here: a bad row in a shared commit would fail everyone's publish
            if not isinstance(m.body, bytes | bytearray | memoryview) or not isinstance(m.id, str):
                raise InvalidMessage(f"queue '{queue}': a message needs a bytes body and a text id, got "
                                     f"{type(m.body).__name__} and {type(m.id).__name__}")
        limit = self._limits.get(queue, 0)
        if limit and not force and state == READY:
            self._publish_bounded(queue, rows, limit, timeout, cancel)
            return
        if limit and force:
            self._warn_if_over(queue, limit)
        op = _PublishOp(queue, rows)
        self._pubs.append(op)
        self._await_commit(op)
        if not op.done:  # pragma: no cover - every flush marks the ops it took
            raise DriverError(f"driver {self.entry_id}: publish to '{queue}' was not written")
        if op.error is not None:
            err = op.error
            if isinstance(err, SqliteUnavailable):
                raise SqliteUnavailable(str(err))
            if isinstance(err, RuntimeHostError):
                raise type(err)(str(err))
            raise DriverError(f"driver {self.entry_id}: publish to '{queue}' failed: {type(err).__name__}: {err}")

    def _publish_bounded(self, queue: str, rows: list[tuple[Any, ...]], limit: int, timeout: float,
                         cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            seen = self._room.get(queue, 0)
            put_now = self._write(functools.partial(_put_up_to, queue, rows[done:], limit))
            if put_now:
                done += put_now
                self._notify(self._arrivals, (queue,))
            if done >= len(rows):
                return
            if cancel is not None and cancel.is_set():
                raise Canceled(f"publish to queue '{queue}' canceled: the worker is stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout(f"queue '{queue}' is full ({limit} messages) and stayed full for {timeout:g}s")
            wait = min(remaining, self.poll_interval, CANCEL_POLL if cancel is not None else remaining)
            self._wait(self._room, queue, seen, wait)

    def _warn_if_over(self, queue: str, limit: int) -> None:
        """Requeues and dead letters are never refused; say so once a minute when a queue is over."""
        now = time.monotonic()
        if now - self._warned_at.get(queue, float("-inf")) < OVER_LIMIT_WARNING:
            return
        n = self._read(lambda conn: conn.execute(sql.COUNT_READY_UP_TO, (queue, limit + 1)).fetchone()[0])
        if n >= limit:
            self._warned_at[queue] = now
            log.warning("queue %s on driver %s holds %s messages, at or above its max_length %d "
                        "(requeues and dead letters are never refused)", queue, self.entry_id,
                        f"{n}+" if n > limit else n, limit)

    def _stats(self, queue: str) -> QueueStats:
        def count(conn: Any) -> QueueStats:
            by_state = dict(conn.execute(sql.COUNT_BY_STATE, (queue,)).fetchall())
            due = conn.execute(sql.COUNT_DUE, (queue, time.time())).fetchone()[0] if by_state.get(DELAYED) else 0
            return QueueStats(by_state.get(READY, 0) + due, by_state.get(TAKEN, 0), by_state.get(DELAYED, 0) - due)
        return self._read(count)

    def _purge(self, queue: str) -> int:
        n: int = self._write(lambda conn: conn.execute(sql.PURGE, (queue,)).rowcount)
        self._notify(self._room, (queue,))
        return n

    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> SqliteConsumer:
        consumer = SqliteConsumer(self, queue, consumer_id, prefetch, options)
        with self._cond:
            self._consumers.add(consumer)
        return consumer

    # -- the connection -----------------------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is None:
            raise SqliteUnavailable(f"driver {self.entry_id} is not open")
        return self._conn

    def _write(self, work: Callable[[Any], T]) -> T:
        with self._lock:
            return self._flush_locked(work)  # type: ignore[return-value]

    def _read(self, work: Callable[[Any], T]) -> T:
        """Run `work` on the reading connection after writing what is pending (so counts are
        exact). In WAL mode a reader never waits for writers nor holds them up."""
        with self._lock:
            self._flush_locked()
        with self._read_lock:
            if self._reader is None:
                raise SqliteUnavailable(f"driver {self.entry_id} is not open")
            try:
                return work(self._reader)
            except sqlite3.Error as exc:
                raise unavailable(exc) or exc from None

    def _flush_locked(self, work: Callable[[Any], Any] | None = None) -> Any:
        """Write pending publishes and settles, then `work(conn)`, in one transaction (holding
        `_lock`). Returns what `work` returned. On failure the settles stay pending and the
        publishes carry the error."""
        pubs = _drain(self._pubs)
        settles = _drain(self._settles)
        if not pubs and not settles and work is None:
            return None
        if pubs:
            with self._commit_cond:
                self._committing = True
        try:
            result = self._transaction(pubs, settles, work)
        except BaseException as exc:
            self._settles.extendleft(reversed(settles))
            error: BaseException = exc
            if isinstance(exc, sqlite3.Error):
                error = unavailable(exc) or exc
            for op in pubs:
                op.error = error
                op.done = True
            if error is exc:
                raise
            raise error from None
        finally:
            if pubs:
                for op in pubs:
                    op.done = True
                with self._commit_cond:  # publishers waiting for this commit return now
                    self._committing = False
                    self._commit_cond.notify_all()
        if pubs or settles:
            touched = {op.queue for op in pubs}
            touched.update(s[1] for s in settles if s[0] != _ACK)
            if touched:
                self._notify(self._arrivals, touched)
        return result

    def _transaction(self, pubs: list[_PublishOp], settles: list[tuple[int, str, int, int, float]],
                     work: Callable[[Any], Any] | None) -> Any:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if settles:  # first: they are usually older than the publishes
                _apply_settles(conn, settles)
            for op in pubs:
                conn.executemany(sql.INSERT, op.rows)
            result = work(conn) if work is not None else None
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return result

    def _await_commit(self, op: _PublishOp) -> None:
        """Group commit: wait until `op` is written, by the commit under way if it took it,
        else by leading the next one (with every publish queued meanwhile)."""
        cond = self._commit_cond
        while not op.done:
            with cond:
                if self._committing and not op.done:
                    cond.wait(COMMIT_WAIT)  # woken when that commit ends; then done, or lead the next
                    continue
            with self._lock:
                if not op.done:
                    try:
                        self._flush_locked()
                    except Exception:  # noqa: BLE001 - the op carries the error
                        pass

    # -- waking -------------------------------------------------------------------------------
    def _notify(self, counters: dict[str, int], queues: Iterable[str]) -> None:
        with self._cond:
            for q in queues:
                counters[q] = counters.get(q, 0) + 1
            self._cond.notify_all()

    def _wait(self, counters: dict[str, int], queue: str, seen: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while counters.get(queue, 0) == seen:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    # -- settles, claims and leases (called by SqliteConsumer) --------------------------------
    def _settle(self, op: int, d: Delivery, visible_at: float = 0.0) -> None:
        seq, claim = d.token
        self._settles.append((op, d.queue, seq, claim, visible_at))
        if not self._bg_wake.is_set():
            self._bg_wake.set()

    def _ack_all(self, deliveries: list[Delivery]) -> None:
        """Acks of a batch: queued together, one wake-up of the writer."""
        self._settles.extend((_ACK, d.queue, d.token[0], d.token[1], 0.0) for d in deliveries)
        if not self._bg_wake.is_set():
            self._bg_wake.set()

    def _claim(self, queue: str, max_count: int) -> tuple[list[Delivery], float | None]:
        """Claim up to max_count deliveries; with none, also when to look again (the next
        delayed message due or lease running out), if anything is waiting."""
        with self._lock:
            conn = self._connection()
            now = time.time()
            if not self._pubs and not self._settles:
                try:
                    ready, due, lease = conn.execute(sql.PEEK, (queue,)).fetchone()
                except sqlite3.Error as exc:
                    raise unavailable(exc) or exc from None
                if not ready and (due is None or due > now) and (lease is None or lease > now):
                    return [], _earliest(due, lease)
            claim = int.from_bytes(os.urandom(8), "big") >> 1  # fresh per claim, also after a fork
            lease_until = now + self.visibility_timeout
            limit = min(max_count, MAX_CLAIM)

            def take(conn: Any) -> tuple[list[Any], float | None]:
                ready, due, lease = conn.execute(sql.PEEK, (queue,)).fetchone()
                if due is not None and due <= now:
                    if conn.execute(sql.PROMOTE, (queue, now)).rowcount:
                        conn.execute(sql.DELETE_PROMOTED, (queue, now))
                    ready = True
                    due = conn.execute(sql.PEEK, (queue,)).fetchone()[1]
                if lease is not None and lease <= now:
                    if conn.execute(sql.RECOVER, (queue, now)).rowcount:
                        ready = True
                    lease = None
                rows = conn.execute(sql.CLAIM, (claim, lease_until, queue, limit)).fetchall() if ready else []
                return rows, _earliest(due, lease)

            rows, wake = self._flush_locked(take)
        if not rows:
            return [], wake
        if self._limits.get(queue):
            self._notify(self._room, (queue,))
        rows.sort()
        unpack = msgpack.unpackb
        return [Delivery(queue, Message(body, unpack(headers) if headers else {}, mid), attempts, (seq, claim))
                for seq, attempts, mid, headers, body in rows], None

    def _extend_leases(self, consumer: SqliteConsumer, deliveries: list[Delivery], seconds: float) -> None:
        until = time.time() + seconds

        def extend(conn: Any) -> list[Delivery]:
            execute = conn.execute
            return [d for d in deliveries if not execute(sql.EXTEND, (until, *d.token)).rowcount]

        lost = self._write(extend)
        if lost:
            consumer.lost(lost, "lease held past visibility_timeout without renewal")

    # -- the background thread: group commit of settles, lease renewal ------------------------
    def _background(self) -> None:
        """Writes queued settles soon after they come (a group commit); renews every lease."""

        def flush() -> None:
            with self._lock:
                if self._conn is not None:
                    self._flush_locked()

        def consumers() -> list[DriverConsumer]:
            with self._cond:
                return list(self._consumers)

        def renew(c: DriverConsumer, live: list[Delivery]) -> None:
            assert isinstance(c, SqliteConsumer)
            self._extend_leases(c, live, self.visibility_timeout)

        self.settle_and_renew(self._bg_stop, self._bg_wake, flush=flush, pending=lambda: len(self._settles),
                              consumers=consumers, renew=renew, renew_every=self.visibility_timeout / 3)


class SqliteConsumer(DriverConsumer):
    driver: SqliteDriver

    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        d, queue = self.driver, self.queue
        deadline = time.monotonic() + wait
        while True:
            seen = d._arrivals.get(queue, 0)
            got, wake = d._claim(queue, max_count)
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return []
            timeout = min(remaining, d.poll_interval)
            if wake is not None:
                timeout = min(timeout, max(0.0, wake - time.time()) + 0.001)
            d._wait(d._arrivals, queue, seen, timeout)

    def _ack(self, d: Delivery) -> None:
        self.driver._settle(_ACK, d)

    def _ack_many(self, deliveries: list[Delivery]) -> None:
        self.driver._ack_all(deliveries)

    def _retry(self, d: Delivery, delay: float) -> None:
        if delay > 0:
            self.driver._settle(_RETRY, d, time.time() + delay)
        else:
            self.driver._settle(_REQUEUE, d)  # to the tail at once

    def _release(self, deliveries: list[Delivery]) -> None:
        # Each goes to the head when written: queued last-first, so they end up in their order
        # (and ahead of those released earlier, as with the memory driver).
        for d in reversed(deliveries):
            self.driver._settle(_RELEASE, d)

    def _extend(self, deliveries: list[Delivery], seconds: float) -> None:
        self.driver._extend_leases(self, deliveries, seconds)

    def _close(self) -> None:
        d = self.driver
        with d._cond:
            d._consumers.discard(self)
        try:
            with d._lock:
                if d._conn is not None:
                    d._flush_locked()  # the releases of close(), at once
        except Exception as exc:  # noqa: BLE001 - the background thread tries again
            log.warning("consumer %s: could not return its messages yet (%s)", self.consumer_id, exc)


def _apply_settles(conn: Any, settles: list[tuple[int, str, int, int, float]]) -> None:
    acks = [(seq, claim) for op, _, seq, claim, _ in settles if op == _ACK]
    if acks:
        conn.executemany(sql.ACK, acks)
    if len(acks) < len(settles):
        retries = [(at, seq, claim) for op, _, seq, claim, at in settles if op == _RETRY]
        if retries:
            conn.executemany(sql.RETRY, retries)
        releases = [(seq, claim) for op, _, seq, claim, _ in settles if op == _RELEASE]
        if releases:
            conn.executemany(sql.RELEASE, releases)
        requeues = [(seq, claim) for op, _, seq, claim, _ in settles if op == _REQUEUE]
        if requeues:
            conn.executemany(sql.REQUEUE, requeues)  # a copy at the tail (a new seq) ...
            conn.executemany(sql.ACK, requeues)  # ... and the claimed row goes


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:  # the connection is broken: the transaction is gone with it
        pass


def _put_up_to(queue: str, rows: list[tuple[Any, ...]], limit: int, conn: Any) -> int:
    """Insert as many of `rows` as the queue has room for; how many."""
    room = limit - conn.execute(sql.COUNT_READY_UP_TO, (queue, limit)).fetchone()[0]
    take = rows[:room] if room > 0 else []
    if take:
        conn.executemany(sql.INSERT, take)
    return len(take)


def _drain(q: deque[T]) -> list[T]:
    out: list[T] = []
    pop = q.popleft
    try:
        while True:
            out.append(pop())
    except IndexError:
        return out


def _seconds(options: dict[str, Any], key: str, default: float, entry_id: str, allow_zero: bool = False) -> float:
    value = options.get(key)
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"driver {entry_id}: {key} must be a number of seconds, not {value!r}") from None
    if seconds < 0 or (seconds == 0 and not allow_zero) or seconds != seconds:
        raise ConfigError(f"driver {entry_id}: {key} must be above 0, not {value!r}")
    return seconds
