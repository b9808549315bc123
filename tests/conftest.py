"""Shared helpers: write small apps into tmp folders and load them."""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from runtime import App
from runtime.errors import ShutdownTimeout

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def write_app(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
    return root


def lua_function_app(root: Path, lua: str, modules: str = "[json, logger, queue, time]",
                     extra_yaml: str = "") -> App:
    """An app with one function `t:f` whose source is `lua`."""
    yaml = f"""
    namespace: t
    entries:
      - name: f
        kind: function.lua
        source: file://f.lua
        modules: {modules}
    """
    extra = textwrap.indent(textwrap.dedent(extra_yaml), "  ")
    write_app(root, {"app.yaml": textwrap.dedent(yaml) + extra, "f.lua": lua})
    return App.load(root)


@pytest.fixture
def lua_fn(tmp_path: Path) -> Callable[..., App]:
    def make(lua: str, **kw: str) -> App:
        return lua_function_app(tmp_path, lua, **kw)
    return make


@pytest.fixture
def run_lua(tmp_path: Path) -> Callable[..., object]:
    """run_lua(body, *args): call a function whose body is `body` (a chunk returning a function)."""
    counter = iter(range(10_000))

    def run(lua: str, *args: object, modules: str = "[json, logger, queue, time]") -> object:
        app = lua_function_app(tmp_path / f"app{next(counter)}", lua, modules=modules)
        return app.call("t:f", *args)
    return run


@pytest.fixture
def start() -> Iterator[Callable[[App], App]]:
    """start(app) starts it; every app started is stopped when the test ends."""
    apps: list[App] = []

    def _start(app: App) -> App:
        apps.append(app)
        app.start()
        return app

    yield _start
    for app in apps:
        try:
            app.stop(5)
        except ShutdownTimeout:
            pass


def drain(app: App, queue_id: str) -> list[tuple[Any, Any]]:
    """Take (and ack) every ready message of a queue: [(message, decoded body)] in order,
    each message with its delivery's `attempt`. A body the codec cannot decode is given as
    its raw bytes."""
    bound = app.router.queues[queue_id]
    out: list[tuple[Any, Any]] = []
    consumer = bound.driver.consume(bound.name, "test:drain", 1000)
    try:
        while True:
            got = consumer.fetch(1000, 0)
            if not got:
                return out
            for d in got:
                try:
                    value: Any = bound.codec.decode(d.message.body)
                except ValueError:
                    value = d.message.body
                m = d.message
                out.append((SimpleNamespace(id=m.id, headers=m.headers, body=m.body, attempt=d.attempt), value))
                consumer.ack(d)
    finally:
        consumer.close()


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.005) -> bool:
    """Wait until predicate() is true (checked every `every` seconds); False if `timeout`
    runs out."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        event.wait(every)
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like wait_for, failing the test with `what` on timeout; for state of another process
    (a child, a server, a shared database), where there is nothing to wait on but a look."""
    assert wait_for(predicate, timeout, every=0.05), f"timed out waiting for {what}"


def take(bound: Any, max_count: int, wait: float = 0.0) -> list[Any]:
    """Fetch (and ack) up to `max_count` deliveries of a bound queue, waiting up to `wait`."""
    consumer = bound.driver.consume(bound.name, "test:take", max_count)
    try:
        got = consumer.fetch(max_count, wait)
        for d in got:
            consumer.ack(d)
        return got  # type: ignore[no-any-return]
    finally:
        consumer.close()
