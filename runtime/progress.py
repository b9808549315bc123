"""Live per-consumer progress for `runtime run` when stderr is a terminal (uses rich)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    """Redraws a table of consumers (processed, rate, in flight, queue depth, delayed, failures,
    and the dead-letter queue's depth) twice a second; a state column appears while a
    consumer's driver is reconnecting."""

    def __init__(self, app: Any, console: Console):
        self.app = app
        self.console = console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, tuple[float, int]] = {}
        self._live: Live | None = None

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        stats = self.app.stats()
        reconnecting = self.app.reconnecting()
        columns = ["consumer", "done", "rate/s", "in flight", "ready", "delayed", "retried", "dead"]
        dlqs = {cid: self._dlq(cid) for cid in stats["consumers"]}
        if any(dlqs.values()):  # the dead-letter queue's depth, where there is one
            columns.append("dlq")
        if reconnecting:  # shown only then, to keep the table narrow
            columns.insert(1, "state")
        now = time.monotonic()
        rows = []
        for cid, c in sorted(stats["consumers"].items()):
            then, before = self._last.get(cid, (now, c["processed"]))
            rate = (c["processed"] - before) / (now - then) if now > then else 0.0
            self._last[cid] = (now, c["processed"])
            spec = self.app.registry.entries[cid]
            queue = stats["queues"].get(spec.queue, {})
            row = [cid, str(c["processed"]), f"{rate:.0f}", str(c["in_flight"]), str(queue.get("ready", 0)),
                   str(queue.get("delayed", 0)), str(c["nacked"]), str(c["dead_lettered"])]
            if any(dlqs.values()):
                dlq = dlqs[cid]
                row.append(str(stats["queues"].get(dlq, {}).get("ready", "-")) if dlq else "")
            if reconnecting:
                row.insert(1, "reconnecting" if cid in reconnecting else "running")
            rows.append(row)
        return columns, rows

    def _table(self) -> Table:
        columns, rows = self._rows()
        title = "consumers"
        namespaces = {r[0].split(":", 1)[0] for r in rows}
        width = sum(max(len(col), *(len(r[i]) for r in rows)) + 2 for i, col in enumerate(columns)) if rows else 0
        if width > self.console.width and len(namespaces) == 1:  # narrow terminal: the namespace goes to the title
            title = f"consumers of {namespaces.pop()}"
            rows = [[r[0].split(":", 1)[1], *r[1:]] for r in rows]
        table = Table(title=title, expand=False, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                      show_edge=False)
        for col in columns:  # no_wrap: IDs and numbers are not folded over two lines
            table.add_column(col, justify="left" if col == "consumer" else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        return table

    def _dlq(self, consumer_id: str) -> str | None:
        spec = self.app.registry.entries.get(consumer_id)
        queue = self.app.registry.entries.get(getattr(spec, "queue", ""))
        dl = getattr(queue, "dead_letter", None)
        return dl.queue if dl is not None else None

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
