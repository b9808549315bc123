"""Start order from the registry's dependency edges (explicit depends_on plus implied ones)."""

from __future__ import annotations

from ..registry import Registry
from ..registry.kinds import SERVICE_KINDS


def start_order(registry: Registry, part: str = "all") -> list[str]:
    """IDs of every entry to bring up, dependencies first: the `auto_start` services and
    everything they depend on, transitively. (Validation has refused cycles.)

    `part`: "all"; "consumers" (the consumers, as a worker process of `--processes` runs
    them); or "others" (everything but the consumers, their drivers included, as the
    parent process runs it)."""
    roots = [s.id for s in registry if s.kind in SERVICE_KINDS and s.lifecycle.auto_start
             and (part != "consumers" or s.kind == "queue.consumer")]
    order: list[str] = []
    seen: set[str] = set()

    def visit(entry_id: str) -> None:
        if entry_id in seen:
            return
        seen.add(entry_id)
        for dep in registry.dependencies.get(entry_id, ()):
            visit(dep)
        order.append(entry_id)

    for root in sorted(roots):
        visit(root)
    if part == "others":
        return [e for e in order if registry.entries[e].kind != "queue.consumer"]
    return order
