"""Helpers of the Redis tests (tests/test_redis_*.py): the gate, a private `redis-server` on
a free port that a test may stop and restart (append-only file in a temp folder, so its data
survives), and key cleanup on the machine's shared server (never FLUSHALL there)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from contract_support import DriverFactory, engine_gate

from runtime.drivers.redis import RedisDriver

SHARED = ("127.0.0.1", 6379)


def gate_shared() -> None:
    """Skip without the machine's Redis on a laptop; fail under CI=true."""
    engine_gate(DriverFactory("redis", lambda tmp: None, lambda n: {}, engine=SHARED))  # type: ignore[arg-type,return-value]


def gate_private() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI=true: engine tests must run)")
        pytest.skip("redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server the test owns: started, stopped (SIGTERM: it writes its AOF)
    or killed, and restarted on the same port with the same data folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--save", "", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as r:
                    if r.ping():
                        return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)  # waiting for another process to listen: nothing to wait on

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(sig)
            proc.wait(15)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    gate_private()
    folder = tmp_path / f"redis-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


def shared_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


def delete_prefix(prefix: str) -> None:
    """Delete every key under `prefix` on the shared server."""
    with redis.Redis(*SHARED, socket_timeout=5) as r:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)


def driver(url: str = "redis://127.0.0.1:6379/0", **options: Any) -> RedisDriver:
    d = RedisDriver("test:redis", {"url": url, **options})
    d.open()
    return d
