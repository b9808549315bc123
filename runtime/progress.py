"""Live per-consumer progress for `runtime run` when stderr is a terminal (uses rich)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    """Redraws a table of consumers (processed, rate, in flight, queue depth, delayed, failures)
    twice a second; a state column appears while a consumer's driver is reconnecting."""

    def __init__(self, app: Any, console: Console):
        self.app = app
        self.console = console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, tuple[float, int]] = {}
        self._live: Live | None = None

    def _table(self) -> Table:
        stats = self.app.stats()
        table = Table(title="consumers", expand=False)
        reconnecting = self.app.reconnecting()
        columns = ["consumer", "processed", "rate/s", "in flight", "ready", "delayed", "nacked", "dead"]
        if reconnecting:  # shown only then, to keep the table narrow
            columns.insert(1, "state")
        for col in columns:
            table.add_column(col, justify="left" if col == "consumer" else "right")
        now = time.monotonic()
        for cid, c in sorted(stats["consumers"].items()):
            then, before = self._last.get(cid, (now, c["processed"]))
            rate = (c["processed"] - before) / (now - then) if now > then else 0.0
            self._last[cid] = (now, c["processed"])
            spec = self.app.registry.entries[cid]
            queue = stats["queues"].get(spec.queue, {})
            row = [cid, str(c["processed"]), f"{rate:,.0f}", str(c["in_flight"]), str(queue.get("ready", 0)),
                   str(queue.get("delayed", 0)), str(c["nacked"]), str(c["dead_lettered"])]
            if reconnecting:
                row.insert(1, "reconnecting" if cid in reconnecting else "running")
            table.add_row(*row)
        return table

    def start(self) -> None:
        self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)
        self._live.start()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="progress")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            if self._live is not None:
                self._live.update(self._table())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._live is not None:
            self._live.stop()
