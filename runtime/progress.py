"""Live per-consumer progress for `runtime run` when stderr is a terminal (uses rich)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    """Redraws a table of consumers (processed, rate, in flight, queue depth) twice a second."""

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
        for col in ("consumer", "processed", "rate/s", "in flight", "queue depth", "acked", "nacked", "dead"):
            table.add_column(col, justify="left" if col == "consumer" else "right")
        now = time.monotonic()
        for cid, c in sorted(stats["consumers"].items()):
            then, before = self._last.get(cid, (now, c["processed"]))
            rate = (c["processed"] - before) / (now - then) if now > then else 0.0
            self._last[cid] = (now, c["processed"])
            spec = self.app.registry.entries[cid]
            depth = stats["queues"].get(spec.queue, {}).get("ready", 0)
            table.add_row(cid, str(c["processed"]), f"{rate:,.0f}", str(c["in_flight"]), str(depth),
                          str(c["acked"]), str(c["nacked"]), str(c["dead_lettered"]))
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
