"""Application files -> located entries -> typed, validated specs per kind (SPEC §1-§2).

The registry knows nothing of running things: it reads and checks definitions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from ..drivers.catalog import DRIVER_KINDS
from ..errors import Problem
from .fields import Ref, parse_duration, parse_size, suggest
from .kinds import (
    KIND_PARSERS,
    ConfigSpec,
    ConsumerSpec,
    DriverSpec,
    EntrySpec,
    FunctionSpec,
    LibrarySpec,
    LuaCodeSpec,
    LuaSource,
    PolicySpec,
    ProcessSpec,
    QueueSpec,
    RetryPolicy,
    ServiceSpec,
)
from .sources import display_path, find_definition_files, read_definition_file
from .validate import check_cycles, check_queue_names, check_refs, dependency_graph

__all__ = [
    "Registry", "load_registry", "EntrySpec", "ConsumerSpec", "FunctionSpec", "LibrarySpec",
    "LuaCodeSpec", "LuaSource", "ConfigSpec", "DriverSpec", "RetryPolicy", "PolicySpec", "ProcessSpec", "QueueSpec",
    "ServiceSpec", "parse_duration", "parse_size", "display_path",
]

S = TypeVar("S", bound=EntrySpec)


@dataclass
class Registry:
    """Every entry of an application by ID, with the dependency edges between them."""

    app_dir: Path
    entries: dict[str, EntrySpec]
    dependencies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def __iter__(self) -> Iterator[EntrySpec]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, entry_id: str, kind: type[S] | None = None) -> S | None:
        spec = self.entries.get(entry_id)
        if spec is None or (kind is not None and not isinstance(spec, kind)):
            return None
        return spec  # type: ignore[return-value]

    def of_type(self, kind: type[S]) -> list[S]:
        return [s for s in self.entries.values() if isinstance(s, kind)]

    def resolve(self, ref: str, namespace: str | None = None) -> str:
        """A bare name resolves in `namespace`; a full ID stays as it is."""
        if ":" in ref or namespace is None:
            return ref
        return f"{namespace}:{ref}"


def load_registry(app_dir: Path) -> tuple[Registry, list[Problem]]:
    """Read and check every definition. Returns the registry and all problems found."""
    files, problems = find_definition_files(app_dir)
    if not files and not problems:
        problems.append(Problem(display_path(app_dir), 0, "no definition files (*.yaml, *.yml) found"))
    entries: dict[str, EntrySpec] = {}
    refs: list[Ref] = []
    for path in files:
        raws, file_problems = read_definition_file(path, app_dir)
        problems += file_problems
        for raw in raws:
            parser = KIND_PARSERS.get(raw.kind)
            if parser is None:
                problems.append(Problem(raw.file, raw.data.line_of("kind"), f"entry {raw.id}: unknown kind "
                                        f"'{raw.kind}'{suggest(raw.kind, set(KIND_PARSERS))}"))
                continue
            if raw.id in entries:
                first = entries[raw.id]
                problems.append(Problem(raw.file, raw.line, f"duplicate entry ID '{raw.id}' "
                                        f"(first defined at {first.file}:{first.line})"))
                continue
            entries[raw.id] = parser(raw, problems, refs)
    problems += check_refs(entries, refs)
    resolve_driver_refs(entries)
    problems += check_queue_names(entries)
    graph = dependency_graph(entries, refs)
    problems += check_cycles(entries, graph)
    return Registry(app_dir, entries, graph, files), problems


def resolve_driver_refs(entries: dict[str, EntrySpec]) -> None:
    """Put the options of the entry a driver's `ref` field names (a `config.aws`) in that
    field's place, with its ID under "id": drivers are built from their options alone, and a
    change of the referenced entry is a change of the driver. A missing or wrong target is a
    problem reported by check_refs; the field then stays the bare ID."""
    for entry_id, spec in list(entries.items()):
        if not isinstance(spec, DriverSpec):
            continue
        schema = DRIVER_KINDS[spec.kind].fields
        resolved = dict(spec.options)
        for key, opt in schema.items():
            target = spec.options.get(key)
            if opt.type != "ref" or not isinstance(target, str):
                continue
            config = entries.get(target)
            if isinstance(config, ConfigSpec) and config.kind in opt.choices:
                resolved[key] = {"id": target, **config.options}
        if resolved != spec.options:
            entries[entry_id] = replace(spec, options=resolved)
