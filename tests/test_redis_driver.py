"""The Redis Streams driver (SPEC §7.4, runtime/drivers/redis.py), beyond the contract suite:
configuration and masking, the stream layout, recovery (own leftovers at start, a dead
process's entries at once, a stalled consumer's after claim_min_idle, lease renewal), the
sorted set of retries, and prompt connection errors.

Tests on the machine's server use a key prefix of their own and delete their keys; tests
that stop a server start a private one. A "crashed" consumer in this process is a driver
whose background thread (acks, lease renewal) is stopped without closing anything."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import write_app
from redis_support import RedisServer, delete_prefix, gate_shared, private_server, shared_prefix

from runtime import App
from runtime.drivers import driver_class
from runtime.drivers.redis import RedisDriver, mask_url
from runtime.errors import ConfigError, DriverUnavailable
from runtime.queue.driver import Delivery, QueueStats
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def msg(n: int | str) -> Message:
    return Message(body=f'{{"n":"{n}"}}'.encode(), headers={"timestamp": 1.0}, id=str(n))


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


@pytest.fixture
def make() -> Iterator[Callable[..., RedisDriver]]:
    """Drivers on the shared server, all under one fresh key prefix (deleted afterwards)."""
    gate_shared()
    prefix = shared_prefix()
    made: list[RedisDriver] = []

    def _make(**options: Any) -> RedisDriver:
        d = RedisDriver("test:redis", {"url": "redis://127.0.0.1:6379/0", "key_prefix": prefix, **options})
        d.open()
        d.declare("q", {})
        made.append(d)
        return d

    yield _make
    for d in made:
        d.close()
    delete_prefix(prefix)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from private_server(tmp_path)


def crash(d: RedisDriver) -> None:
    """A frozen or dead process: no more acks written, no lease renewed, nothing released."""
    d._bg_stop.set()
    d._bg_wake.set()
    assert d._bg.thread is not None
    d._bg.thread.join(5)
    assert not d._bg.thread.is_alive()


def raw() -> redis.Redis:
    return redis.Redis("127.0.0.1", 6379, socket_timeout=5)


# -- configuration --------------------------------------------------------------------------

def test_kind_fields_and_errors() -> None:
    assert driver_class("queue.driver.redis") is RedisDriver
    d = RedisDriver("x:r", {"addrs": ["10.0.0.5:6380"], "group": "g", "key_prefix": "p:"})
    assert d.url == "redis://10.0.0.5:6380" and d.group == "g" and d.stream("jobs") == "p:jobs"
    assert RedisDriver("x:r", {}).url == "redis://127.0.0.1:6379"
    with pytest.raises(ConfigError, match="db is given both"):
        RedisDriver("x:r", {"url": "redis://h:1/2", "db": 3})
    RedisDriver("x:r", {"url": "redis://h:1/2", "db": 0})  # the registry's default: the url's db counts
    RedisDriver("x:r", {"url": "redis://h:1/2", "db": 2})
    with pytest.raises(ConfigError, match="password is given both") as both:
        RedisDriver("x:r", {"url": "redis://:pw-in-url@h:1", "password": "pw-field"})
    assert "pw-in-url" not in str(both.value) and "pw-field" not in str(both.value)
    with pytest.raises(ConfigError, match="one host:port"):
        RedisDriver("x:r", {"addrs": ["a:1", "b:2"]})
    with pytest.raises(ConfigError, match="redis://"):
        RedisDriver("x:r", {"url": "http://u:hunter2@h/0"})
    with pytest.raises(ConfigError, match="claim_min_idle"):
        RedisDriver("x:r", {"claim_min_idle": 0})


def test_unknown_field_is_a_config_error_with_a_hint(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
        namespace: r
        entries:
          - {name: rd, kind: queue.driver.redis, claim_min_idl: 5s}
    """})
    with pytest.raises(ConfigError, match="claim_min_idle"):
        App.load(tmp_path)


def test_passwords_are_masked_in_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert mask_url("redis://bob:hunter2@h:1/0") == "redis://bob:***@h:1/0"
    assert mask_url("rediss://:hunter2@h/2") == "rediss://:***@h/2"
    assert "hunter2" not in mask_url("redis://u:hunter2@[::1]:7/0")
    d = RedisDriver("x:r", {"url": "redis://127.0.0.1:1/0", "username": "bob", "password": "s3cret-pw",
                            "dial_timeout": 0.5})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DriverUnavailable) as err:
        d.open()
    assert "hunter2" not in str(err.value) and "s3cret-pw" not in str(err.value)
    assert d.describe_error(RuntimeError("auth s3cret-pw failed")) == "RuntimeError: auth *** failed"
    with pytest.raises(ConfigError) as bad:
        RedisDriver("x:r", {"url": "http://u:hunter2@h/0"})
    assert "hunter2" not in str(bad.value)
    assert "hunter2" not in caplog.text and "s3cret-pw" not in caplog.text


def test_wrong_password_is_refused_without_showing_it(server: RedisServer) -> None:
    with server.client() as r:
        r.config_set("requirepass", "right-pw")
    d = RedisDriver("x:r", {"url": server.url, "password": "wrong-pw"})
    with pytest.raises(Exception) as err:
        d.open()
    assert "wrong-pw" not in str(err.value) and "right-pw" not in str(err.value)
    ok = RedisDriver("x:r", {"url": f"redis://:right-pw@127.0.0.1:{server.port}/0", "client_name": "tester"})
    ok.open()
    try:
        ok.declare("q", {})
        ok.publish("q", [msg(1)])
        assert ok.stats("q").ready == 1
    finally:
        ok.close()


def test_the_db_field_selects_the_database(server: RedisServer) -> None:
    d = RedisDriver("x:r", {"url": f"redis://127.0.0.1:{server.port}", "db": 3})
    d.open()
    try:
        d.declare("q", {})
        d.publish("q", [msg(1)])
        with redis.Redis(port=server.port, db=3, socket_timeout=5) as r3, server.client() as r0:
            assert r3.xlen("runtime:q") == 1 and r0.exists("runtime:q") == 0
    finally:
        d.close()


# -- the stream layout ----------------------------------------------------------------------

def test_a_deleted_stream_is_declared_again_and_consumers_carry_on(make: Callable[..., RedisDriver]) -> None:
    d = make()
    c = d.consume("q", "c", 10)
    assert c.fetch(10, 0.01) == []
    with raw() as r:
        r.delete(d.stream("q"))
    assert c.fetch(10, 0.01) == []  # NOGROUP: declared again, logged
    d.publish("q", [msg("after")])
    assert ids(c.fetch(10, 1.0)) == ["after"]


def test_one_stream_one_group_acked_entries_deleted(make: Callable[..., RedisDriver]) -> None:
    d = make()
    d.publish("q", [msg(i) for i in range(3)])
    c = d.consume("q", "c", 10)
    got = c.fetch(10, 1.0)
    assert len(got) == 3
    with raw() as r:
        stream = d.stream("q")
        assert r.type(stream) == b"stream"
        assert [g["name"] for g in r.xinfo_groups(stream)] == [b"runtime"]
        assert r.xpending(stream, "runtime")["pending"] == 3
        for x in got:
            c.ack(x)
        assert d.stats("q") == QueueStats(0, 0, 0)  # acks are batched; stats writes them first
        assert r.xlen(stream) == 0, "an ack removes the entry"
        assert r.xpending(stream, "runtime")["pending"] == 0


def test_counts_follow_every_step(make: Callable[..., RedisDriver]) -> None:
    d = make()
    d.publish("q", [msg("a"), msg("b"), msg("c")])
    d.publish("q", [msg("later")], delay=30)
    assert d.stats("q") == QueueStats(3, 0, 1)
    c = d.consume("q", "c", 10)
    a, b = c.fetch(2, 1.0)
    assert d.stats("q") == QueueStats(1, 2, 1)
    c.ack(a)
    assert d.stats("q") == QueueStats(1, 1, 1)
    c.retry(b, 30)
    assert d.stats("q") == QueueStats(1, 0, 2)
    (x,) = c.fetch(1, 1.0)
    c.release([x])
    assert d.stats("q") == QueueStats(1, 0, 2)
    assert d.purge("q") == 3
    assert d.stats("q") == QueueStats(0, 0, 0)


def test_retries_wait_in_the_sorted_set_and_keep_their_attempt_count(make: Callable[..., RedisDriver]) -> None:
    d = make()
    d.publish("q", [msg("a")])
    c = d.consume("q", "c", 10)
    (x,) = c.fetch(1, 1.0)
    assert c.retry(x, 30)
    with raw() as r:
        assert r.xlen(d.stream("q")) == 0 and r.zcard(d.delayed_key("q")) == 1
        r.zadd(d.delayed_key("q"), {m: 0 for m in r.zrange(d.delayed_key("q"), 0, -1)})  # due now
    for attempt in (2, 3, 4):  # across moves back to the stream (a new entry each time)
        (x,) = c.fetch(1, 2.0)
        assert (x.message.id, x.attempt) == ("a", attempt)
        assert c.retry(x, 0.01 if attempt % 2 else 0)
    (x,) = c.fetch(1, 2.0)
    assert x.attempt == 5 and c.ack(x)


def test_a_release_goes_back_to_the_head_without_counting(make: Callable[..., RedisDriver]) -> None:
    d = make()
    d.publish("q", [msg(i) for i in range(4)])
    a = d.consume("q", "a", 10)
    first = a.fetch(2, 1.0)
    assert a.release(first) == 2
    got = d.consume("q", "b", 10).fetch(10, 1.0)
    assert ids(got) == ["0", "1", "2", "3"] and {g.attempt for g in got} == {1}


def test_fetch_honours_short_waits_and_blocks_below_the_socket_timeout(make: Callable[..., RedisDriver]) -> None:
    d = make(read_timeout=0.3)
    c = d.consume("q", "c", 10)
    t0 = time.monotonic()
    assert c.fetch(10, 0.05) == []
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    assert c.fetch(10, 1.0) == [], "a wait longer than the socket timeout is cut into shorter reads"
    assert 0.9 <= time.monotonic() - t0 < 2.5


# -- recovery -------------------------------------------------------------------------------

def test_a_stalled_consumers_entries_are_claimed_after_claim_min_idle(make: Callable[..., RedisDriver]) -> None:
    a_drv = make(claim_min_idle=0.5, claim_interval=0.1)
    a_drv.publish("q", [msg(i) for i in range(3)])
    a = a_drv.consume("q", "a", 10)
    taken = a.fetch(10, 1.0)
    assert len(taken) == 3
    crash(a_drv)
    b = make(claim_min_idle=0.5, claim_interval=0.1).consume("q", "b", 10)
    t0 = time.monotonic()
    assert b.fetch(10, 0.2) == [], "claimed before claim_min_idle"
    back = b.fetch(10, 5.0)
    assert sorted(ids(back)) == ["0", "1", "2"] and time.monotonic() - t0 >= 0.4
    assert {g.attempt for g in back} == {2}, "a delivery lost to a stall counts"
    a.close()  # its late release finds the entries owned by b: nothing happens
    assert a_drv.stats("q") == QueueStats(0, 3, 0)


def test_a_running_handlers_entries_are_renewed_and_never_claimed(make: Callable[..., RedisDriver]) -> None:
    a_drv = make(claim_min_idle=0.3, claim_interval=0.05)
    a_drv.publish("q", [msg("slow"), msg("prefetched"), msg("too")])
    a = a_drv.consume("q", "a", 10)
    x, *rest = a.fetch(3, 1.0)
    assert len(rest) == 2
    b = make(claim_min_idle=0.3, claim_interval=0.05).consume("q", "b", 10)
    deadline = time.monotonic() + 1.5  # five times claim_min_idle
    while time.monotonic() < deadline:
        assert b.fetch(10, 0.05) == [], "a renewed entry was claimed while its handler ran"
    assert a.ack(x) is True and a.release(rest) == 2
    assert a_drv.stats("q") == QueueStats(2, 0, 0)


def test_a_restarted_consumer_takes_its_own_leftovers_at_start(make: Callable[..., RedisDriver]) -> None:
    # Same consumer id and pid (a container restarted: pid 1 again): the same name.
    old_drv = make(claim_min_idle=3600)
    old_drv.publish("q", [msg(i) for i in range(3)])
    old = old_drv.consume("q", "worker", 10)
    assert len(old.fetch(2, 1.0)) == 2
    crash(old_drv)
    new = make(claim_min_idle=3600).consume("q", "worker", 10)
    assert new.name == old.name  # type: ignore[attr-defined]
    got = new.fetch(10, 1.0)
    assert sorted(ids(got)) == ["0", "1"] and {g.attempt for g in got} == {2}
    assert ids(new.fetch(10, 1.0)) == ["2"]


CHILD = """
import sys
from runtime.drivers.redis import RedisDriver
d = RedisDriver("child:redis", {"url": "redis://127.0.0.1:6379/0", "key_prefix": sys.argv[1]})
d.open()
d.declare("q", {})
c = d.consume("q", "child", 10)
print(" ".join(g.message.id for g in c.fetch(int(sys.argv[2]), 5.0)), flush=True)
sys.stdin.read()  # hold them until killed
"""


def test_a_killed_process_entries_come_back_at_once_with_the_attempt_counted(
        make: Callable[..., RedisDriver]) -> None:
    d = make(claim_min_idle=3600, claim_interval=0.2)  # not by idle time: by the dead pid
    d.publish("q", [msg(i) for i in range(6)])
    child = subprocess.Popen([sys.executable, "-c", CHILD, d.prefix, "4"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["0", "1", "2", "3"]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    assert d.stats("q") == QueueStats(2, 4, 0)
    c = d.consume("q", "parent", 10)
    got = c.fetch(10, 2.0)
    got += c.fetch(10, 2.0)
    assert sorted(ids(got)) == [str(i) for i in range(6)]
    assert sorted(g.attempt for g in got) == [1, 1, 2, 2, 2, 2]
    with raw() as r:  # the dead consumer's name is gone from the group
        names = [i["name"] for i in r.xinfo_consumers(d.stream("q"), "runtime")]
        assert not any(f":{child.pid}".encode() in n for n in names), names


# -- connection errors ----------------------------------------------------------------------

def test_connection_errors_surface_promptly_and_the_driver_reconnects(server: RedisServer) -> None:
    d = RedisDriver("x:r", {"url": server.url, "read_timeout": 1.0, "dial_timeout": 0.5})
    d.open()
    try:
        d.declare("q", {})
        d.publish("q", [msg(1)])
        c = d.consume("q", "c", 10)
        assert ids(c.fetch(10, 1.0)) == ["1"]
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(DriverUnavailable):
            c.fetch(10, 0.05)
        with pytest.raises(DriverUnavailable):
            d.publish("q", [msg(2)])
        assert time.monotonic() - t0 < 3.0, "connection errors must not hide behind silent retries"
        assert d.state == "reconnecting"
        server.start()
        import threading
        assert d.reconnect(threading.Event()) is True
        back = c.fetch(10, 2.0)  # the AOF kept the entry, pending: claimed at the next round or now
        back += c.fetch(10, 2.0)
        d.publish("q", [msg(3)])
        back += c.fetch(10, 2.0)
        assert "3" in ids(back)
    finally:
        d.close()


def test_a_hung_server_surfaces_after_the_read_timeout_not_after_silent_retries(server: RedisServer) -> None:
    """A server that stops answering (SIGSTOP) without closing the socket: the fetch's
    blocking read is kept below the socket timeout, so the hang is a DriverUnavailable after
    about read_timeout (redis-py's own retries would hide it for many seconds)."""
    d = RedisDriver("x:r", {"url": server.url, "read_timeout": 1.0, "write_timeout": 1.0, "dial_timeout": 0.5})
    d.open()
    assert server.proc is not None
    try:
        d.declare("q", {})
        c = d.consume("q", "c", 10)
        assert c.fetch(10, 0.01) == []
        server.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DriverUnavailable, match="Timeout"):
                c.fetch(10, 5.0)
            assert time.monotonic() - t0 < 2.5
        finally:
            server.proc.send_signal(signal.SIGCONT)
        import threading
        assert d.reconnect(threading.Event()) is True
        d.publish("q", [msg("back")])
        assert ids(c.fetch(10, 2.0)) == ["back"]
    finally:
        d.close()


def test_scripts_lost_by_the_server_are_loaded_again(server: RedisServer) -> None:
    d = RedisDriver("x:r", {"url": server.url})
    d.open()
    try:
        d.declare("q", {})
        d.publish("q", [msg(1), msg(2)])
        c = d.consume("q", "c", 10)
        first = c.fetch(1, 1.0)
        assert c.ack(first[0])
        with server.client() as r:
            r.script_flush()
        assert ids(c.fetch(10, 1.0)) == ["2"]  # the ack and the take in one batch, run again after loading
        assert d.stats("q") == QueueStats(0, 1, 0)
    finally:
        d.close()
