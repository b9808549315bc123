"""The SQLite driver (SPEC §7.2, runtime/drivers/sqlite.py): durable queues in one database
file shared by threads, driver objects and processes.

Nothing here sleeps to wait: blocking calls are observed through threads, events and the
driver's own bounded waits; every test has a timeout. Lease tests use a short
visibility_timeout; a "crashed" process is either a driver whose background thread (the one
renewing leases) is stopped without closing anything, or a real subprocess killed with
SIGKILL after it claimed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from runtime.drivers import driver_class
from runtime.drivers.sqlite import SqliteConsumer, SqliteDriver
from runtime.drivers.sqlite_schema import SCHEMA_VERSION, unavailable
from runtime.errors import Canceled, DriverError, DriverUnavailable, InvalidMessage, PublishTimeout
from runtime.queue.driver import Delivery, QueueStats
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
BLOCK_CHECK = 0.1  # seconds a blocked call is given to (wrongly) return before the test acts


def msg(n: int | str, **headers: Any) -> Message:
    return Message(body=f'{{"n":"{n}"}}'.encode(), headers={"timestamp": 1.0, **headers}, id=str(n))


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run fn in a daemon thread; the outcome list gets ("ok", value) or ("error", exc)."""
    outcome: list[Any] = []
    started = threading.Event()

    def body() -> None:
        started.set()
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(("error", exc))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    assert started.wait(5)
    return t, outcome


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., SqliteDriver]]:
    """make(**options) -> an open SqliteDriver on tmp_path/q.sqlite3 (same file every call,
    so two calls are two "processes" on one database). Closed at the end."""
    drivers: list[SqliteDriver] = []

    def _make(*, queues: dict[str, dict[str, Any]] | None = None, **options: Any) -> SqliteDriver:
        options.setdefault("path", "q.sqlite3")
        d = SqliteDriver(f"test:sqlite{len(drivers)}", options, app_dir=tmp_path)
        d.open()
        for name, qopts in (queues or {"q": {}}).items():
            d.declare(name, qopts)
        drivers.append(d)
        return d

    yield _make
    for d in drivers:
        d.close()


def crash(driver: SqliteDriver) -> None:
    """Make a driver behave like a frozen or dead process: its background thread (lease
    renewal, settle writing) stops; nothing is released or closed."""
    driver._bg_stop.set()
    driver._bg_wake.set()
    assert driver._bg.thread is not None
    driver._bg.thread.join(5)
    assert not driver._bg.thread.is_alive()


# -- basics ----------------------------------------------------------------------------------

def test_driver_class_is_found_by_kind() -> None:
    cls = driver_class("queue.driver.sqlite")
    assert cls is SqliteDriver
    caps = cls.capabilities
    assert (caps.bounded, caps.ordered, caps.exact_stats, caps.native_attempts, caps.native_delay, caps.lease,
            caps.shared) == (True,) * 7


def test_no_io_before_open_and_default_path(tmp_path: Path) -> None:
    d = SqliteDriver("test:s", {}, app_dir=tmp_path)
    d.declare("q", {"max_length": 3})  # recorded; written when the driver opens
    assert not (tmp_path / ".runtime").exists()
    with pytest.raises(DriverUnavailable):
        d.publish("q", [msg(1)])
    d.open()
    try:
        assert (tmp_path / ".runtime" / "queues.sqlite3").is_file()
        d.publish("q", [msg(1)])
        assert d.stats("q").ready == 1
    finally:
        d.close()


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="synchronous"):
        SqliteDriver("test:s", {"synchronous": "off"}, app_dir=tmp_path)
    with pytest.raises(ConfigError, match="visibility_timeout"):
        SqliteDriver("test:s", {"visibility_timeout": 0}, app_dir=tmp_path)


def test_publish_fetch_ack(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    m = Message(body=b'{"a":[1,2]}', headers={"timestamp": 12.5, "k": "v", "n": 3, "b": True, "f": -0.5}, id="abc")
    d.publish("q", [m, msg("plain"), Message(b"\x00\xffraw", {}, "empty-headers")])
    assert d.stats("q") == QueueStats(3, 0, 0)
    c = d.consume("q", "c1", 10)
    got = c.fetch(10, 1.0)
    assert ids(got) == ["abc", "plain", "empty-headers"]
    assert got[0].message == m
    assert got[2].message.body == b"\x00\xffraw" and got[2].message.headers == {}
    assert [g.attempt for g in got] == [1, 1, 1]
    assert all(g.queue == "q" for g in got)
    assert len({g.token for g in got}) == 3
    assert d.stats("q") == QueueStats(0, 3, 0)
    assert c.in_flight == 3
    for g in got:
        assert c.ack(g) is True
    # stats writes pending settles first: exact at once
    assert d.stats("q") == QueueStats(0, 0, 0)
    assert c.fetch(10, 0) == []


def test_unstorable_headers_are_invalid_message(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    with pytest.raises(InvalidMessage):
        d.publish("q", [Message(b"x", {"bad": object()}, "1")])  # type: ignore[dict-item]
    with pytest.raises(InvalidMessage, match="bytes body"):
        d.publish("q", [msg(1), Message("text", {}, "2")])  # type: ignore[arg-type]
    assert d.stats("q").ready == 0
    d.publish("q", [msg(3)])
    assert d.stats("q").ready == 1


def test_fifo_in_batches(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    d.publish("q", [msg(i) for i in range(25)])
    d.publish("q", [msg(i) for i in range(25, 50)])
    c = d.consume("q", "c1", 100)
    seen: list[str] = []
    while len(seen) < 50:
        got = c.fetch(7, 1.0)
        assert 0 < len(got) <= 7
        seen += ids(got)
        for g in got:
            c.ack(g)
    assert seen == [str(i) for i in range(50)]


def test_fetch_timeout_returns_empty(make: Callable[..., SqliteDriver]) -> None:
    c = make(poll_interval=0.01).consume("q", "c1", 10)
    t0 = time.monotonic()
    assert c.fetch(5, 0.05) == []
    assert time.monotonic() - t0 < 5


# -- retry, release, stale settles -----------------------------------------------------------

def test_retry_with_delay(make: Callable[..., SqliteDriver]) -> None:
    d = make(poll_interval=5.0)  # the wait must end when the retry is due, not at the next poll
    d.publish("q", [msg("a")])
    c = d.consume("q", "c1", 10)
    [a] = c.fetch(1, 1.0)
    assert c.retry(a, 0.4) is True
    t0 = time.monotonic()
    assert c.fetch(1, 0) == [], "visible before its delay"
    assert d.stats("q") == QueueStats(0, 0, 1)
    [again] = c.fetch(1, 4.0)
    waited = time.monotonic() - t0
    assert 0.3 <= waited < 3.0
    assert again.message.id == "a" and again.message.body == a.message.body
    assert again.message.headers == a.message.headers
    assert again.attempt == 2
    assert again.token != a.token


def test_retry_goes_to_the_tail(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    d.publish("q", [msg("a"), msg("b")])
    c = d.consume("q", "c1", 10)
    [a] = c.fetch(1, 1.0)
    c.retry(a, 0)
    d.publish("q", [msg("c")])
    got = c.fetch(10, 1.0)
    assert ids(got) == ["b", "a", "c"]
    assert [g.attempt for g in got] == [1, 2, 1]
    # a retry with a delay goes to the tail when it is due
    [b, a2, c2] = got
    c.retry(b, 0.05)
    d.publish("q", [msg("d")])
    got = c.fetch(10, 1.0)
    if ids(got) == ["d"]:  # "b" was not due yet at that claim
        got += c.fetch(10, 2.0)
    assert ids(got) == ["d", "b"]


def test_release_returns_at_once_and_is_not_counted(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    d.publish("q", [msg(i) for i in range(4)])
    c = d.consume("q", "c1", 10)
    got = c.fetch(3, 1.0)
    assert c.release(got) == 3
    assert c.release(got) == 0, "released twice"
    assert d.stats("q") == QueueStats(4, 0, 0)
    again = c.fetch(10, 1.0)
    assert ids(again) == ["0", "1", "2", "3"], "released messages go back to the head, in order"
    assert [g.attempt for g in again] == [1, 1, 1, 1]
    # released one at a time: the later release goes in front (as with the memory driver)
    first, second = again[:2]
    c.release([first])
    c.release([second])
    c.release(again[2:])
    assert ids(c.fetch(10, 1.0)) == ["2", "3", "1", "0"]


def test_double_settles_return_false(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    d.publish("q", [msg("a"), msg("b")])
    c = d.consume("q", "c1", 10)
    a, b = c.fetch(2, 1.0)
    assert c.ack(a) is True
    assert c.ack(a) is False
    assert c.retry(a, 0) is False
    assert c.release([a]) == 0
    assert c.retry(b, 0) is True
    assert c.ack(b) is False
    assert d.stats("q") == QueueStats(1, 0, 0)
    [b2] = c.fetch(1, 1.0)
    assert b2.message.id == "b" and b2.attempt == 2


def test_stale_settle_after_a_lost_lease_does_nothing(make: Callable[..., SqliteDriver]) -> None:
    a_drv = make(visibility_timeout=0.3)
    b_drv = make(visibility_timeout=30, poll_interval=0.02)
    a_drv.publish("q", [msg("m")])
    a = a_drv.consume("q", "a", 10)
    [held] = a.fetch(1, 1.0)
    crash(a_drv)  # A stalls: its lease runs out
    b = b_drv.consume("q", "b", 10)
    [taken] = b.fetch(1, 10.0)
    assert taken.message.id == "m" and taken.attempt == 2
    # A wakes up and settles late: its ack reaches the database but must not touch B's claim.
    assert a.ack(held) is True  # A cannot know yet (the base class still had it in flight)
    assert a_drv.stats("q") == QueueStats(0, 1, 0)
    assert b_drv.stats("q") == QueueStats(0, 1, 0)
    assert b.ack(taken) is True
    assert b_drv.stats("q") == QueueStats(0, 0, 0)


def test_lost_lease_is_noticed_by_renewal_and_its_settle_returns_false(make: Callable[..., SqliteDriver]) -> None:
    a_drv = make(visibility_timeout=0.3)
    b_drv = make(poll_interval=0.02)
    a_drv.publish("q", [msg("m")])
    a = a_drv.consume("q", "a", 10)
    [held] = a.fetch(1, 1.0)
    crash(a_drv)
    b = b_drv.consume("q", "b", 10)
    [taken] = b.fetch(1, 10.0)
    a.extend([held], 30)  # the renewal A would have done: finds the lease gone
    assert a.in_flight == 0
    assert a.ack(held) is False
    assert a.retry(held, 0) is False
    assert b.ack(taken) is True
    assert b_drv.stats("q") == QueueStats(0, 0, 0)


# -- bounded queues --------------------------------------------------------------------------

def test_max_length_blocks_until_room(make: Callable[..., SqliteDriver]) -> None:
    d = make(queues={"small": {"max_length": 2}})
    d.publish("small", [msg(1), msg(2)])
    t, outcome = run_in_thread(lambda: d.publish("small", [msg(3)], timeout=20))
    t.join(BLOCK_CHECK)
    assert t.is_alive(), "publish to a full queue did not wait"
    c = d.consume("small", "c", 10)
    [first] = c.fetch(1, 1.0)  # makes room: the waiting publish goes on at once
    t.join(5)
    assert not t.is_alive() and outcome == [("ok", None)]
    assert d.stats("small") == QueueStats(2, 1, 0)
    assert first.message.id == "1"


def test_max_length_times_out(make: Callable[..., SqliteDriver]) -> None:
    d = make(queues={"small": {"max_length": 2}})
    d.publish("small", [msg(1), msg(2)])
    t0 = time.monotonic()
    with pytest.raises(PublishTimeout, match="full"):
        d.publish("small", [msg(3)], timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert d.stats("small").ready == 2


def test_max_length_partial_batch_then_timeout(make: Callable[..., SqliteDriver]) -> None:
    d = make(queues={"small": {"max_length": 3}})
    d.publish("small", [msg(1)])
    with pytest.raises(PublishTimeout):
        d.publish("small", [msg(2), msg(3), msg(4)], timeout=0.1)
    assert d.stats("small").ready == 3  # what fitted was written, like the memory driver


def test_max_length_cancel(make: Callable[..., SqliteDriver]) -> None:
    d = make(queues={"small": {"max_length": 1}}, poll_interval=5.0)
    d.publish("small", [msg(1)])
    cancel = threading.Event()
    t, outcome = run_in_thread(lambda: d.publish("small", [msg(2)], timeout=30, cancel=cancel))
    t.join(BLOCK_CHECK)
    assert t.is_alive()
    t0 = time.monotonic()
    cancel.set()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 2.0, "cancel was not honoured while waiting"
    assert outcome[0][0] == "error" and isinstance(outcome[0][1], Canceled)
    assert d.stats("small").ready == 1


def test_force_never_blocks(make: Callable[..., SqliteDriver], caplog: pytest.LogCaptureFixture) -> None:
    d = make(queues={"small": {"max_length": 1}})
    d.publish("small", [msg(1)])
    d.publish("small", [msg(2), msg(3)], timeout=0.01, force=True)
    assert d.stats("small").ready == 3
    assert "max_length" in caplog.text
    # delayed publishes are not held back by the limit either (they are not ready)
    d.publish("small", [msg(4)], timeout=0.01, delay=30)
    assert d.stats("small") == QueueStats(3, 0, 1)


# -- delayed publish -------------------------------------------------------------------------

def test_delayed_publish_and_stats(make: Callable[..., SqliteDriver]) -> None:
    d = make(poll_interval=5.0)
    d.publish("q", [msg("later")], delay=0.4)
    d.publish("q", [msg("much-later")], delay=60)
    d.publish("q", [msg("now")])
    assert d.stats("q") == QueueStats(1, 0, 2)
    c = d.consume("q", "c", 10)
    assert ids(c.fetch(10, 1.0)) == ["now"]
    assert c.fetch(10, 0) == []
    t0 = time.monotonic()
    got = c.fetch(10, 4.0)  # wakes when "later" is due, well before poll_interval
    assert ids(got) == ["later"] and got[0].attempt == 1
    assert 0.2 <= time.monotonic() - t0 < 3.0
    assert d.stats("q") == QueueStats(0, 2, 1)
    assert d.purge("q") == 1
    assert d.stats("q") == QueueStats(0, 2, 0)


# -- waking ----------------------------------------------------------------------------------

def test_publish_in_process_wakes_a_waiting_fetch(make: Callable[..., SqliteDriver]) -> None:
    d = make(poll_interval=5.0)
    c = d.consume("q", "c", 10)
    t, outcome = run_in_thread(lambda: c.fetch(10, 10.0))
    t.join(BLOCK_CHECK)
    assert t.is_alive()
    t0 = time.monotonic()
    d.publish("q", [msg("x")])
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 1.0, "a publish in this process must wake the fetch at once"
    assert ids(outcome[0][1]) == ["x"]


def test_publish_from_another_process_is_seen_within_poll_interval(make: Callable[..., SqliteDriver]) -> None:
    a, b = make(poll_interval=0.05), make(poll_interval=5.0)
    c = a.consume("q", "c", 10)
    t, outcome = run_in_thread(lambda: c.fetch(10, 20.0))
    t.join(BLOCK_CHECK)
    assert t.is_alive()
    t0 = time.monotonic()
    b.publish("q", [msg("x")])
    t.join(10)
    assert not t.is_alive() and ids(outcome[0][1]) == ["x"]
    assert time.monotonic() - t0 < 3.0


def test_release_in_process_wakes_a_waiting_fetch(make: Callable[..., SqliteDriver]) -> None:
    d = make(poll_interval=5.0)
    d.publish("q", [msg("x")])
    c1, c2 = d.consume("q", "c1", 10), d.consume("q", "c2", 10)
    got = c1.fetch(1, 1.0)
    t, outcome = run_in_thread(lambda: c2.fetch(10, 10.0))
    t.join(BLOCK_CHECK)
    assert t.is_alive()
    t0 = time.monotonic()
    c1.release(got)
    t.join(5)
    assert not t.is_alive() and ids(outcome[0][1]) == ["x"]
    assert time.monotonic() - t0 < 1.0


# -- competing consumers ---------------------------------------------------------------------

def _consume_all(consumer: SqliteConsumer, into: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        got = consumer.fetch(10, 0.05)
        for g in got:
            into.append(g.message.id)
            assert consumer.ack(g)


@pytest.mark.parametrize("separate_drivers", [False, True], ids=["one-driver", "two-drivers"])
def test_competing_consumers_each_message_once(make: Callable[..., SqliteDriver], separate_drivers: bool) -> None:
    d1 = make(poll_interval=0.01)
    d2 = make(poll_interval=0.01) if separate_drivers else d1
    n = 600
    stop = threading.Event()
    seen: list[list[str]] = [[], []]
    consumers = [d1.consume("q", "c1", 10), d2.consume("q", "c2", 10)]
    threads = [threading.Thread(target=_consume_all, args=(c, s, stop), daemon=True)
               for c, s in zip(consumers, seen, strict=True)]
    for t in threads:
        t.start()
    for i in range(0, n, 20):
        (d1 if i % 40 else d2).publish("q", [msg(j) for j in range(i, i + 20)])
    assert wait_for(lambda: sum(map(len, seen)) >= n, 30)
    assert wait_for(lambda: d1.stats("q") == QueueStats(0, 0, 0), 10)
    stop.set()
    for t in threads:
        t.join(5)
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == {str(i) for i in range(n)}
    assert max(counts.values()) == 1, "a message was delivered twice"
    assert seen[0] and seen[1], "both consumers took part"


# -- leases: crash recovery and renewal ------------------------------------------------------

def test_abandoned_driver_messages_come_back_after_visibility_timeout(make: Callable[..., SqliteDriver]) -> None:
    a_drv = make(visibility_timeout=0.5)
    a_drv.publish("q", [msg(i) for i in range(5)])
    a = a_drv.consume("q", "a", 10)
    assert len(a.fetch(3, 1.0)) == 3
    crash(a_drv)  # abandoned: never closed, nothing released
    b_drv = make(visibility_timeout=30, poll_interval=0.02)
    b = b_drv.consume("q", "b", 10)
    first = b.fetch(10, 1.0)
    assert ids(first) == ["3", "4"] and [g.attempt for g in first] == [1, 1]
    t0 = time.monotonic()
    back = b.fetch(10, 10.0)
    assert ids(back) == ["0", "1", "2"]
    assert [g.attempt for g in back] == [2, 2, 2], "a delivery lost to a crash counts"
    assert time.monotonic() - t0 < 8.0


def test_expired_lease_is_taken_back_when_it_runs_out_not_at_the_next_poll(
        make: Callable[..., SqliteDriver]) -> None:
    a_drv = make(visibility_timeout=0.5)
    b_drv = make(poll_interval=10.0)
    a_drv.publish("q", [msg("m")])
    a_drv.consume("q", "a", 10).fetch(1, 1.0)
    crash(a_drv)
    b = b_drv.consume("q", "b", 10)
    t0 = time.monotonic()
    [back] = b.fetch(1, 8.0)
    assert back.attempt == 2
    assert time.monotonic() - t0 < 5.0


def test_renewal_keeps_a_slow_delivery_from_other_consumers(make: Callable[..., SqliteDriver]) -> None:
    a_drv = make(visibility_timeout=1.0)  # renewed every 0.33 s
    b_drv = make(visibility_timeout=1.0, poll_interval=0.02)
    a_drv.publish("q", [msg("slow")])
    a = a_drv.consume("q", "a", 10)
    [held] = a.fetch(1, 1.0)
    b = b_drv.consume("q", "b", 10)
    assert b.fetch(1, 3.5) == [], "a delivery still being handled was given to another consumer"
    assert a.ack(held) is True
    assert a_drv.stats("q") == QueueStats(0, 0, 0)
    assert b_drv.stats("q") == QueueStats(0, 0, 0)


def test_consumer_close_returns_prefetched_at_once(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    d.publish("q", [msg(i) for i in range(3)])
    c = d.consume("q", "c", 10)
    c.fetch(3, 1.0)
    c.close()
    other = make(poll_interval=5.0)  # another process sees them at once: written, not just queued
    assert other.stats("q") == QueueStats(3, 0, 0)
    c2 = other.consume("q", "c2", 10)
    assert [g.attempt for g in c2.fetch(10, 1.0)] == [1, 1, 1]


def test_settles_are_written_soon_without_a_fetch(make: Callable[..., SqliteDriver]) -> None:
    d, other = make(), make()
    d.publish("q", [msg(1), msg(2)])
    c = d.consume("q", "c", 10)
    a, b = c.fetch(2, 1.0)
    c.ack(a)
    c.retry(b, 30)
    # no fetch, no stats on d: the background writer commits them within milliseconds
    t0 = time.monotonic()
    assert wait_for(lambda: other.stats("q") == QueueStats(0, 0, 1), 5)
    assert time.monotonic() - t0 < 1.0


KILLED_CLAIMER = """
import sys
from pathlib import Path
from runtime.drivers.sqlite import SqliteDriver
d = SqliteDriver("child:sqlite", {"path": sys.argv[1], "visibility_timeout": 0.5})
d.open()
d.declare("q", {})
c = d.consume("q", "child", 10)
got = c.fetch(int(sys.argv[2]), 5.0)
print(" ".join(g.message.id for g in got), flush=True)
sys.stdin.read()  # hold the claims until killed
"""


def test_killed_process_messages_come_back_with_attempt_counted(make: Callable[..., SqliteDriver],
                                                                tmp_path: Path) -> None:
    d = make(poll_interval=0.02)
    d.publish("q", [msg(i) for i in range(6)])
    child = subprocess.Popen([sys.executable, "-c", KILLED_CLAIMER, str(tmp_path / "q.sqlite3"), "4"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.split() == ["0", "1", "2", "3"]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    assert child.returncode == -signal.SIGKILL
    assert d.stats("q") == QueueStats(2, 4, 0)
    c = d.consume("q", "parent", 10)
    assert ids(c.fetch(10, 1.0)) == ["4", "5"]
    back = c.fetch(10, 10.0)
    assert ids(back) == ["0", "1", "2", "3"]
    assert [g.attempt for g in back] == [2, 2, 2, 2]


CONSUMER_PROCESS = """
import sys
from runtime.drivers.sqlite import SqliteDriver
d = SqliteDriver("child:sqlite", {"path": sys.argv[1], "poll_interval": 0.01, "synchronous": "normal"})
d.open()
d.declare("q", {})
c = d.consume("q", "child", 20)
print("ready", flush=True)
sys.stdin.readline()  # go
seen = []
idle = 0
while idle < 30:  # stop after the queue stayed empty for 30 fetches in a row
    got = c.fetch(20, 0.01)
    idle = 0 if got else idle + 1
    for g in got:
        seen.append(g.message.id)
        c.ack(g)
c.close()
d.close()
print(" ".join(seen), flush=True)
"""


def test_processes_compete_each_message_once(make: Callable[..., SqliteDriver], tmp_path: Path) -> None:
    d = make(synchronous="normal")
    n = 2000
    procs = [subprocess.Popen([sys.executable, "-c", CONSUMER_PROCESS, str(tmp_path / "q.sqlite3")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        d.publish("q", [msg(i) for i in range(n)])
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=40)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=5)
    assert [p.returncode for p in procs] == [0, 0]
    seen = [out.split() for out in outs]
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == {str(i) for i in range(n)}
    assert max(counts.values()) == 1
    assert d.stats("q") == QueueStats(0, 0, 0)


# -- durability, schema, errors --------------------------------------------------------------

def test_close_and_open_again_keeps_everything(make: Callable[..., SqliteDriver]) -> None:
    d = make(visibility_timeout=0.3)
    d.publish("q", [msg(i) for i in range(5)])
    d.publish("q", [msg("d")], delay=0.2)
    c = d.consume("q", "c", 10)
    [g0, g1] = c.fetch(2, 1.0)
    c.ack(g0)  # a pending settle: written by close
    d.close()  # like a stop that left "1" taken (its lease runs out)
    assert d.state == "closed"
    with pytest.raises(DriverUnavailable):
        d.publish("q", [msg("x")])
    restarted = make(visibility_timeout=30, poll_interval=0.02)
    st = restarted.stats("q")
    assert st.ready + st.delayed == 4 and st.in_flight == 1
    c2 = restarted.consume("q", "c2", 10)
    got: list[Delivery] = []
    assert wait_for(lambda: bool(got.extend(c2.fetch(10, 0.2))) or len(got) >= 5, 10)
    assert sorted(ids(got)) == ["1", "2", "3", "4", "d"]
    assert [(g.message.id, g.attempt) for g in got if g.message.id in ("1", "d")] in (
        [("d", 1), ("1", 2)], [("1", 2), ("d", 1)])
    for g in got:
        assert c2.ack(g)
    # the same driver object opens again after close
    d.open()
    d.publish("q", [msg("again")])
    assert restarted.stats("q") == QueueStats(1, 0, 0)


def test_reconnect_keeps_renewing_leases_of_live_consumers(make: Callable[..., SqliteDriver]) -> None:
    d = make(visibility_timeout=0.6)
    other = make(poll_interval=0.02)
    d.publish("q", [msg("held")])
    c = d.consume("q", "c", 10)
    [held] = c.fetch(1, 1.0)
    d._close()  # what reconnect() does first: the consumer and its handler live on
    d._open()
    assert other.consume("q", "o", 10).fetch(1, 2.0) == []
    assert c.ack(held) is True
    assert d.stats("q") == QueueStats(0, 0, 0)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    d = SqliteDriver("test:s", {"path": "q.sqlite3"}, app_dir=tmp_path)
    d.open()
    d.close()
    with sqlite3.connect(tmp_path / "q.sqlite3") as raw:
        assert raw.execute("SELECT value FROM rq_meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
        raw.execute("UPDATE rq_meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(DriverError, match=r"schema version 99, newer than this runtime's 1") as info:
        d.open()
    assert not isinstance(info.value, DriverUnavailable), "not retryable: reconnecting cannot fix it"
    assert d.state == "closed"


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk.sqlite3").write_bytes(b"this is not a database file at all" * 100)
    d = SqliteDriver("test:s", {"path": "junk.sqlite3"}, app_dir=tmp_path)
    with pytest.raises(DriverError, match="junk.sqlite3") as info:
        d.open()
    assert not isinstance(info.value, DriverUnavailable)


def test_locked_database_is_unavailable_then_recovers(make: Callable[..., SqliteDriver], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    d = make(busy_timeout=0.1)
    raw = sqlite3.connect(tmp_path / "q.sqlite3", isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(DriverUnavailable, match="locked"):
            d.publish("q", [msg(1)])
        assert d.state == "reconnecting"
        assert "connection lost" in caplog.text
        raw.execute("ROLLBACK")
    finally:
        raw.close()
    assert d.reconnect(threading.Event()) is True
    assert d.state == "open"
    d.publish("q", [msg(1)])
    assert d.stats("q").ready == 1


def test_settles_survive_a_locked_database(make: Callable[..., SqliteDriver], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    d = make(busy_timeout=0.05)
    d.publish("q", [msg(1), msg(2)])
    c = d.consume("q", "c", 10)
    a, b = c.fetch(2, 1.0)
    raw = sqlite3.connect(tmp_path / "q.sqlite3", isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        assert c.ack(a) is True  # queued: the background writer cannot write it yet
        with pytest.raises(DriverUnavailable):
            c.fetch(1, 0)  # the claim transaction (carrying the ack) cannot start either
        assert wait_for(lambda: "cannot write settles yet" in caplog.text, 10)
        assert raw.execute("SELECT count(*) FROM rq_messages").fetchone() == (2,)
        raw.execute("ROLLBACK")
    finally:
        raw.close()
    assert d.reconnect(threading.Event())
    assert wait_for(lambda: d.stats("q") == QueueStats(0, 1, 0), 10), "the ack was lost"
    assert c.ack(b) is True
    assert d.stats("q") == QueueStats(0, 0, 0)


def test_programming_errors_are_not_connection_loss(tmp_path: Path) -> None:
    raw = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.OperationalError) as syntax:
        raw.execute("SELEC 1")
    with pytest.raises(sqlite3.OperationalError) as missing:
        raw.execute("SELECT * FROM nowhere")
    raw.close()
    assert unavailable(syntax.value) is None
    assert unavailable(missing.value) is None
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5  # type: ignore[attr-defined]
    assert unavailable(locked) is not None


def test_synchronous_modes_both_work(make: Callable[..., SqliteDriver], tmp_path: Path) -> None:
    for mode, expected in (("full", 2), ("normal", 1)):
        d = make(path=f"{mode}.sqlite3", synchronous=mode)
        assert d._conn.execute("PRAGMA synchronous").fetchone()[0] == expected
        assert d._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        d.publish("q", [msg(1)])
        c = d.consume("q", "c", 1)
        [g] = c.fetch(1, 1.0)
        assert c.ack(g)
        assert d.stats("q") == QueueStats(0, 0, 0)


def test_concurrent_publishers_share_commits(make: Callable[..., SqliteDriver]) -> None:
    d = make()
    n_threads, per_thread = 8, 50
    barrier = threading.Barrier(n_threads)

    def publisher(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            d.publish("q", [msg(f"{t}-{i}")])

    threads = [threading.Thread(target=publisher, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert d.stats("q").ready == n_threads * per_thread
    c = d.consume("q", "c", 1000)
    got = ids(c.fetch(1000, 1.0))
    assert len(got) == n_threads * per_thread
    for t in range(n_threads):  # each publisher's messages in its own order
        mine = [g for g in got if g.startswith(f"{t}-")]
        assert mine == [f"{t}-{i}" for i in range(per_thread)]


def test_publishes_waiting_together_share_one_commit(make: Callable[..., SqliteDriver],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = make()
    commits: list[int] = []
    real = d._transaction
    monkeypatch.setattr(d, "_transaction", lambda pubs, settles, work: (commits.append(len(pubs)),
                                                                         real(pubs, settles, work))[1])
    threads = [threading.Thread(target=d.publish, args=("q", [msg(i)])) for i in range(8)]
    with d._lock:  # the database is busy (as during another commit): all 8 queue up
        for t in threads:
            t.start()
        assert wait_for(lambda: len(d._pubs) == 8, 10)
    for t in threads:
        t.join(10)
    assert commits == [8], "8 waiting publishes must go in one transaction (one fsync)"
    assert d.stats("q").ready == 8


def test_queues_are_separate(make: Callable[..., SqliteDriver]) -> None:
    d = make(queues={"a": {}, "b": {}})
    d.publish("a", [msg("a1")])
    d.publish("b", [msg("b1"), msg("b2")])
    assert d.stats("a").ready == 1 and d.stats("b").ready == 2
    assert ids(d.consume("b", "c", 10).fetch(10, 1.0)) == ["b1", "b2"]
    assert d.purge("a") == 1
    assert d.stats("a") == QueueStats(0, 0, 0)
    assert d.stats("b") == QueueStats(0, 2, 0)


def test_catalog_defaults_build_a_driver(tmp_path: Path) -> None:
    """The catalog's defaults build a driver (the registry passes them as given)."""
    from runtime.drivers.catalog import DRIVER_KINDS

    fields = {k: o.default for k, o in DRIVER_KINDS["queue.driver.sqlite"].fields.items()}
    d = SqliteDriver("test:s", fields, app_dir=tmp_path)
    assert d.path == tmp_path / ".runtime" / "queues.sqlite3"
    assert (d.visibility_timeout, d.poll_interval, d.busy_timeout, d.synchronous) == (30.0, 0.1, 5.0, "full")


def test_too_old_sqlite_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    d = SqliteDriver("test:s", {"path": "q.sqlite3"}, app_dir=tmp_path)
    with pytest.raises(DriverError, match=r"needs SQLite 3\.35\.0 or later"):
        d.open()
    assert not (tmp_path / "q.sqlite3").exists()
