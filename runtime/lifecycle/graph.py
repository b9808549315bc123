"""Start order from the registry's dependency edges (explicit depends_on plus implied ones)."""

from __future__ import annotations

from ..registry import Registry
from ..registry.kinds import SERVICE_KINDS


def start_order(registry: Registry) -> list[str]:
    """IDs of every entry to bring up, dependencies first: the `auto_start` services and
    everything they depend on, transitively. (Validation has refused cycles.)"""
    roots = [s.id for s in registry if s.kind in SERVICE_KINDS and s.lifecycle.auto_start]
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
    return order
