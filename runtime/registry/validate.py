"""Checks across entries: references, duplicate IDs, module names and dependency cycles."""

from __future__ import annotations

from ..errors import Problem
from .fields import Ref, suggest
from .kinds import ConsumerSpec, EntrySpec, QueueSpec


def kind_matches(kind: str, accepted: tuple[str, ...]) -> bool:
    for pattern in accepted:
        if pattern == "*" or pattern == kind:
            return True
        if pattern.endswith("*") and kind.startswith(pattern[:-1]):
            return True
    return False


def check_refs(entries: dict[str, EntrySpec], refs: list[Ref]) -> list[Problem]:
    problems = []
    for ref in refs:
        target = entries.get(ref.target)
        if target is None:
            hint = suggest(ref.target, set(entries))
            problems.append(Problem(ref.file, ref.line, f"entry {ref.source_id}: field '{ref.field}' "
                                    f"refers to '{ref.target}', which does not exist{hint}"))
        elif not kind_matches(target.kind, ref.kinds):
            want = " or ".join(k.replace(".*", ".<driver>") for k in ref.kinds)
            problems.append(Problem(ref.file, ref.line, f"entry {ref.source_id}: field '{ref.field}' "
                                    f"refers to '{ref.target}', which is a {target.kind}, not a {want}"))
        elif ref.target == ref.source_id and ref.dependency:
            problems.append(Problem(ref.file, ref.line, f"entry {ref.source_id}: field '{ref.field}' "
                                    "refers to the entry itself"))
    return problems


def dependency_graph(entries: dict[str, EntrySpec], refs: list[Ref]) -> dict[str, tuple[str, ...]]:
    graph: dict[str, list[str]] = {eid: [] for eid in entries}
    for ref in refs:
        if ref.dependency and ref.target in entries and ref.source_id in graph and ref.target != ref.source_id:
            if ref.target not in graph[ref.source_id]:
                graph[ref.source_id].append(ref.target)
    # A consumer dead-letters into its queue's dead-letter queue: that queue's driver must be
    # running before the consumer takes its first message (SPEC §6).
    for eid, spec in entries.items():
        if isinstance(spec, ConsumerSpec):
            queue = entries.get(spec.queue)
            dl = queue.dead_letter if isinstance(queue, QueueSpec) else None
            dl_queue = entries.get(dl.queue) if dl is not None else None
            if isinstance(dl_queue, QueueSpec) and dl_queue.driver in entries \
                    and dl_queue.driver not in graph[eid]:
                graph[eid].append(dl_queue.driver)
    return {k: tuple(v) for k, v in graph.items()}


def find_cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Every elementary cycle found by one depth-first pass (each reported once)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for root in sorted(graph):
        if color[root] != WHITE:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = GREY
        while stack:
            node, i = stack[-1]
            children = graph.get(node, ())
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if color.get(child, BLACK) == GREY:
                    cycle = path[path.index(child):] + [child]
                    key = frozenset(cycle)
                    if key not in seen:
                        seen.add(key)
                        cycles.append(cycle)
                elif color.get(child) == WHITE:
                    color[child] = GREY
                    stack.append((child, 0))
                    path.append(child)
            else:
                color[node] = BLACK
                stack.pop()
                path.pop()
    return cycles


def check_cycles(entries: dict[str, EntrySpec], graph: dict[str, tuple[str, ...]]) -> list[Problem]:
    problems = []
    for cycle in find_cycles(graph):
        first = entries[cycle[0]]
        problems.append(Problem(first.file, first.line, "dependency cycle: " + " -> ".join(cycle)))
    return problems


def check_queue_names(entries: dict[str, EntrySpec]) -> list[Problem]:
    """Two queue entries with one `queue_name` on one driver would be one queue under two IDs
    (a policy on one ID would not hold for the other): a configuration error naming both."""
    problems = []
    first: dict[tuple[str, str], QueueSpec] = {}
    for spec in entries.values():
        if not isinstance(spec, QueueSpec) or not spec.driver:
            continue
        key = (spec.driver, spec.queue_name)
        other = first.setdefault(key, spec)
        if other is not spec:
            problems.append(Problem(spec.file, spec.line, f"entry {spec.id}: queue_name '{spec.queue_name}' on driver "
                                    f"{spec.driver} is already used by {other.id} ({other.file}:{other.line}); "
                                    "two entries would share one queue"))
    return problems
