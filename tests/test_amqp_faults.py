"""Fault tests of the AMQP driver on the machine's RabbitMQ: a TCP proxy between the runtime and
the broker cut mid-stream and restored, heartbeats served while handlers run, and `kill -9`
of one of two consuming `runtime run` processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import wait_until, write_app
from contract_support import AMQP_URL, FACTORIES, engine_gate

from runtime import App
from runtime.errors import QueueUnavailable

pytestmark = pytest.mark.timeout(90)
AMQP = next(f for f in FACTORIES if f.name == "amqp")


class Proxy:
    """A TCP proxy on a free loopback port to the broker; `cut()` closes every connection and
    refuses new ones until `restore()`."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672)):
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.stopping = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set() or self.stopping:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.stopping = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    engine_gate(AMQP)
    p = Proxy()
    yield p
    p.close()


def delete(*names: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        for name in names:
            ch = conn.channel()
            ch.queue_delete(name)
            ch.close()
    finally:
        conn.close()


APP = """
namespace: f
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: "{url}"
    heartbeat: "{heartbeat}"
    reconnect_delay: 100ms
    reconnect_max_delay: 500ms
    lifecycle: {{auto_start: true}}
  - name: jobs
    kind: queue.queue
    driver: rabbit
    queue_name: "{jobs}"
    driver_options: {{amqp: {{queue_type: {qtype}}}}}
    retry: {{initial_delay: 0}}
  - name: done
    kind: queue.queue
    driver: rabbit
    queue_name: "{done}"
  - name: h
    kind: function.lua
    modules: [queue, time]
    source: |
      local queue = require("queue")
      local time = require("time")
      return function(body)
        if body.sleep then time.sleep(body.sleep) end
        local ok, err = queue.publish("done", {{ n = body.n, attempt = queue.message():attempt() }})
        if not ok then error(tostring(err)) end
      end
  - name: c
    kind: queue.consumer
    queue: jobs
    func: h
    concurrency: {concurrency}
    prefetch: {prefetch}
    lifecycle: {{auto_start: true, stop_timeout: 10s}}
"""


def make_app(root: Path, url: str, jobs: str, done: str, *, heartbeat: str = "10s", qtype: str = "classic",
             concurrency: int = 4, prefetch: int = 20) -> Path:
    return write_app(root, {"app.yaml": APP.format(url=url, jobs=jobs, done=done, heartbeat=heartbeat, qtype=qtype,
                                                   concurrency=concurrency, prefetch=prefetch)})


def publish_jobs(queue: str, bodies: list[dict[str, Any]], qtype: str = "classic") -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        args = {"x-queue-type": "quorum"} if qtype == "quorum" else {}
        ch.queue_declare(queue, durable=True, arguments=args)
        ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish("", queue, json.dumps(b).encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=f"m{b['n']}",
                                                  headers={"x-runtime-props": ""}))
    finally:
        conn.close()


def read_all(queue: str) -> list[dict[str, Any]]:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    out = []
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        while True:
            method, _, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(json.loads(body))
    finally:
        conn.close()


def count(queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        conn.close()


def test_connection_cut_mid_stream_consumer_resumes_and_nothing_is_lost(
        tmp_path: Path, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    jobs, done = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    total = 600
    publish_jobs(jobs, [{"n": i, "sleep": 0.002} for i in range(total)])
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    make_app(tmp_path, url, jobs, done)
    try:
        with caplog.at_level(logging.INFO), App.load(tmp_path) as app:
            wait_until(lambda: app.stats()["consumers"]["f:c"]["acked"] >= 100, 30, "progress before the cut")
            proxy.cut()
            wait_until(lambda: "f:c" in app.reconnecting(), 10, "the consumer to show reconnecting")
            with pytest.raises(QueueUnavailable):  # a publish during the outage: Unavailable, not lost
                app.publish("f:done", {"n": -1})
            proxy.restore()
            wait_until(lambda: not app.reconnecting(), 30, "the reconnect")
            app.publish("f:done", {"n": -2})  # after the reconnect: works
            assert app.wait_idle(60)
            assert app.router.bound("f:jobs").driver.reconnects >= 1
        assert "connection lost" in caplog.text and "reconnecting" in caplog.text
        assert "connection is back" in caplog.text
        got = Counter(r["n"] for r in read_all(done))
        assert set(range(total)) <= set(got), f"lost: {sorted(set(range(total)) - set(got))[:10]}"
        assert got[-2] == 1 and got[-1] == 0
        assert proxy.accepted >= 4, "the driver did not open new connections"
    finally:
        delete(jobs, done)


def test_heartbeats_are_served_while_a_handler_runs_longer_than_two_intervals(
        tmp_path: Path, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    jobs, done = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    publish_jobs(jobs, [{"n": 0, "sleep": 3.5}])
    make_app(tmp_path, f"amqp://guest:guest@127.0.0.1:{proxy.port}/", jobs, done, heartbeat="1s",
             concurrency=1, prefetch=1)
    try:
        with caplog.at_level(logging.WARNING), App.load(tmp_path) as app:
            assert app.wait_idle(30)
            assert app.router.bound("f:jobs").driver.reconnects == 0
        assert "connection lost" not in caplog.text
        assert [r["attempt"] for r in read_all(done)] == [1]
        assert proxy.accepted == 2, "a connection was dropped and opened again"
    finally:
        delete(jobs, done)


def runtime(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--log-level", "info", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("qtype", ["classic", "quorum"])
def test_kill_9_of_one_of_two_consumers_its_messages_go_to_the_other(tmp_path: Path, qtype: str) -> None:
    engine_gate(AMQP)
    jobs, done = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    total = 800
    publish_jobs(jobs, [{"n": i, "sleep": 0.004} for i in range(total)], qtype)
    root = make_app(tmp_path, AMQP_URL, jobs, done, qtype=qtype, concurrency=2, prefetch=20)
    victim = runtime(root)
    survivor = None
    try:
        wait_until(lambda: count(done) >= 100, 60, "the first process to make progress")
        survivor = runtime(root)
        wait_until(lambda: count(done) >= 250, 60, "both to work")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        wait_until(lambda: count(jobs) == 0 and count(done) >= total, 60, "the survivor to finish")
        survivor.send_signal(signal.SIGTERM)
        out, err = survivor.communicate(timeout=30)
        assert survivor.returncode == 0, err
        records = read_all(done)
        got = Counter(r["n"] for r in records)
        assert set(got) == set(range(total)), f"lost: {sorted(set(range(total)) - set(got))[:10]}"
        duplicates = sum(v - 1 for v in got.values())
        assert duplicates <= 20 + 2, "more duplicates than the killed process could have held"
        if qtype == "quorum":  # the broker counted the deliveries lost to the crash
            redelivered = [r for r in records if got[r["n"]] > 1]
            assert all(r["attempt"] in (1, 2) for r in records)
            assert not redelivered or any(r["attempt"] == 2 for r in redelivered)
        assert re.search(r"f:c acked=\d+", out)
    finally:
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
        delete(jobs, done)


def test_processes_2_on_amqp(tmp_path: Path) -> None:
    engine_gate(AMQP)
    jobs, done = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    publish_jobs(jobs, [{"n": i} for i in range(300)])
    root = make_app(tmp_path, AMQP_URL, jobs, done, concurrency=2, prefetch=10)
    try:
        p = subprocess.run([sys.executable, "-m", "runtime", "run", str(root), "--processes", "2", "--until-idle"],
                           capture_output=True, text=True, timeout=80, env=dict(os.environ))
        assert p.returncode == 0, p.stderr
        assert "f:c acked=300" in p.stdout
        assert sorted(r["n"] for r in read_all(done)) == list(range(300))
    finally:
        delete(jobs, done)
