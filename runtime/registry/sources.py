"""Find an application's definition files and turn them into raw, located entries.

This step handles the file level of SPEC §1: recursive discovery (or `wippy.lock`
`directories.src`), `namespace`, file-level `meta`, `${env:...}` substitution and
`file://` includes. Kind-specific checks happen in :mod:`runtime.registry.kinds`.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Problem
from .yaml_lines import LineDict, LineList, YamlProblem, decode_text, load_yaml, reread_scalar

_SKIP_DIRS = {"node_modules", "__pycache__"}
# `${env:NAME}`, `${env:NAME|default}`; Wippy's `${env:ns:NAME}` names an entry of its env
# registry, which here is the process environment's NAME.
_ENV_RE = re.compile(r"\$\{env:(?:[A-Za-z0-9_.\-]+:)?([A-Za-z_][A-Za-z0-9_]*)(?:\|([^}]*))?\}")
_ENV_ANY_RE = re.compile(r"\$\{env:[^}]*\}")
MAX_INCLUDE_BYTES = 8 * 1024 * 1024


def display_path(path: Path) -> str:
    """A path as a user would like to read it: relative to the working directory if inside."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
        return str(rel)
    except ValueError:
        return str(path)


class SourceText(str):
    """A string read from a file (``file://``) or inline YAML, remembering where it came from.

    ``path`` is the file holding the text and ``line`` the line its first character is on,
    so Lua error lines can be made to match the file the user edits.
    """

    path: Path
    line: int
    inline: bool

    def __new__(cls, text: str, path: Path, line: int, inline: bool) -> SourceText:
        obj = super().__new__(cls, text)
        obj.path = path
        obj.line = line
        obj.inline = inline
        return obj


class Unresolved(str):
    """A value whose `${env:...}` could not be filled in. The problem is already reported,
    so field checks treat the value as absent instead of reporting follow-on problems."""


@dataclass
class RawEntry:
    """An entry as written, after substitution, before kind-specific parsing."""

    namespace: str
    name: str
    kind: str
    data: LineDict
    path: Path
    file: str  # display form of path
    line: int

    @property
    def id(self) -> str:
        return f"{self.namespace}:{self.name}"


def find_definition_files(app_dir: Path) -> tuple[list[Path], list[Problem]]:
    """Every *.yaml / *.yml below the app (or below wippy.lock's source folders)."""
    problems: list[Problem] = []
    roots = [app_dir]
    lock = app_dir / "wippy.lock"
    if lock.is_file():
        roots, lock_problems = _lock_roots(lock)
        problems += lock_problems
    files: set[Path] = set()
    inside = [app_dir.resolve(), *(r.resolve() for r in roots)]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
            for fn in filenames:
                if fn.endswith((".yaml", ".yml")) and not fn.startswith("."):
                    path = Path(dirpath) / fn
                    problem = _not_a_definition_file(path, inside)
                    if problem:
                        problems.append(Problem(display_path(path), 0, problem))
                    else:
                        files.add(path)
    return sorted(files), problems


def _not_a_definition_file(path: Path, inside: list[Path]) -> str | None:
    """Why `path` cannot be read as a definition file (None if it can): it must be a regular
    file (a FIFO or device would block or never end) inside the application, symlinks
    resolved first, as for `file://`."""
    try:
        target = path.resolve()
        mode = target.stat().st_mode
    except (OSError, RuntimeError) as exc:
        return f"cannot read file: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, device or directory is not read as a definition file)"
    if not any(target == d or d in target.parents for d in inside):
        return "is a symlink to a file outside the application directory"
    return None


def _lock_roots(lock: Path) -> tuple[list[Path], list[Problem]]:
    where = display_path(lock)
    try:
        data, _ = load_yaml(lock.read_bytes())
    except YamlProblem as exc:
        return [lock.parent], [Problem(where, exc.line, exc.message)]
    src = None
    if isinstance(data, dict) and isinstance(data.get("directories"), dict):
        src = data["directories"].get("src")
    if src is None:
        return [lock.parent], []
    items = [src] if isinstance(src, str) else src
    line = data["directories"].line_of("src")
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        return [lock.parent], [Problem(where, line, "directories.src must be a string or a list of strings")]
    roots, problems = [], []
    for s in items:
        root = (lock.parent / s).resolve()
        if not root.is_dir():
            problems.append(Problem(where, line, f"source folder '{s}' does not exist"))
        else:
            roots.append(root)
    return roots, problems


def read_definition_file(path: Path, app_dir: Path) -> tuple[list[RawEntry], list[Problem]]:
    """Parse one definition file into raw entries (substituted) plus every problem found."""
    where = display_path(path)
    try:
        doc, duplicates = load_yaml(path.read_bytes())
    except YamlProblem as exc:
        return [], [Problem(where, exc.line, exc.message)]
    except OSError as exc:
        return [], [Problem(where, 0, f"cannot read file: {exc.strerror}")]
    problems = [Problem(where, line, f"duplicate key '{key}'") for line, key in duplicates]
    if doc is None:
        return [], problems + [Problem(where, 1, "file is empty: expected 'namespace' and 'entries'")]
    if not isinstance(doc, LineDict):
        return [], problems + [Problem(where, 1, "a definition file must be a mapping with 'namespace' and 'entries'")]
    sub = _Substituter(path, app_dir, where, problems)
    namespace = doc.get("namespace")
    if namespace is None:
        problems.append(Problem(where, doc.line, "missing required field 'namespace'"))
        return [], problems
    namespace = sub.value(namespace, doc.line_of("namespace"))
    if not isinstance(namespace, str) or not namespace or ":" in namespace:
        problems.append(Problem(where, doc.line_of("namespace"), "'namespace' must be a non-empty string without ':'"))
        return [], problems
    for key in doc:
        if key not in ("version", "namespace", "meta", "entries"):
            problems.append(Problem(where, doc.line_of(key), f"unknown top-level field '{key}' "
                                    "(expected version, namespace, meta, entries)"))
    file_meta = sub.value(doc.get("meta"), doc.line_of("meta")) if "meta" in doc else None
    if file_meta is not None and not isinstance(file_meta, dict):
        problems.append(Problem(where, doc.line_of("meta"), "'meta' must be a mapping"))
        file_meta = None
    entries = doc.get("entries")
    if entries is None:
        entries = LineList()
    if not isinstance(entries, list):
        problems.append(Problem(where, doc.line_of("entries"), "'entries' must be a list"))
        return [], problems
    out: list[RawEntry] = []
    for index, item in enumerate(entries):
        line = entries.line_of(index) if isinstance(entries, LineList) else doc.line
        if not isinstance(item, LineDict):
            problems.append(Problem(where, line, f"entry #{index + 1} must be a mapping with 'name' and 'kind'"))
            continue
        label = _entry_label(namespace, index, item.get("name"))
        sub.label = label
        data = sub.entry(item, line)
        sub.label = ""
        name, kind = data.get("name"), data.get("kind")
        bad = False
        for field, value in (("name", name), ("kind", kind)):
            if value is None:
                problems.append(Problem(where, line, f"{label}: missing required field '{field}'"))
                bad = True
            elif not isinstance(value, str) or not value.strip():
                problems.append(Problem(where, data.line_of(field),
                                        f"{label}: '{field}' must be a non-empty string"))
                bad = True
        if bad:
            continue
        if ":" in name:
            problems.append(Problem(where, data.line_of("name"), f"entry name '{name}' must not contain ':'"))
            continue
        if file_meta:
            meta = data.get("meta")
            if meta is None:
                data["meta"] = dict(file_meta)
            elif isinstance(meta, dict):
                merged = dict(file_meta)
                merged.update(meta)
                data["meta"] = merged
        out.append(RawEntry(namespace, name, kind, data, path, where, line))
    return out, problems


def _entry_label(namespace: str | None, index: int, name: Any) -> str:
    """How a problem names its entry: by ID, or by position (and name) when there is no ID."""
    if isinstance(name, str) and name.strip() and ":" not in name and "${" not in name and namespace:
        return f"entry {namespace}:{name}"
    if isinstance(name, str) and name.strip():
        return f"entry #{index + 1} ('{name}')"
    return f"entry #{index + 1}"


class _Substituter:
    """Applies `${env:...}` and `file://` to every string value of a YAML tree."""

    def __init__(self, path: Path, app_dir: Path, where: str, problems: list[Problem]):
        self.path = path
        self.app_dir = app_dir.resolve()
        self.where = where
        self.problems = problems
        self.seen: set[int] = set()  # YAML aliases share containers: visit each once
        self.label = ""  # the entry being read, named in every problem

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.where, line, f"{self.label}: {message}" if self.label else message))

    def entry(self, item: LineDict, line: int) -> Any:
        """An entry's mapping. Its `source` is Lua text (inline or `file://`): `${env:...}` is
        never expanded there, so Lua code cannot read the host's environment."""
        if id(item) in self.seen:
            return item
        self.seen.add(id(item))
        for key in list(item):
            value_line, block = item.value_lines.get(key, line), item.value_block.get(key, False)
            if key == "source" and isinstance(item[key], str):
                item[key] = self.string(item[key], value_line, block, expand_env=False)
            else:
                item[key] = self.value(item[key], value_line, block)
        return item

    def value(self, v: Any, line: int, block: bool = False) -> Any:
        if isinstance(v, (LineDict, LineList)):
            if id(v) in self.seen:
                return v
            self.seen.add(id(v))
        if isinstance(v, LineDict):
            for key in list(v):
                v[key] = self.value(v[key], v.value_lines.get(key, line), v.value_block.get(key, False))
            return v
        if isinstance(v, LineList):
            for i in range(len(v)):
                v[i] = self.value(v[i], v.line_of(i))
            return v
        if isinstance(v, str):
            return self.string(v, line, block)
        return v

    def string(self, s: str, line: int, block: bool, expand_env: bool = True) -> Any:
        result: Any = s
        if expand_env and "${env:" in s:
            result = self.env(s, line)
            if not isinstance(result, str) or isinstance(result, Unresolved):
                return result
        if result.startswith("file://") and "\n" not in result:
            return self.include(result[len("file://"):], line)
        return SourceText(result, self.path, line, inline=True)

    def env(self, s: str, line: int) -> Any:
        for bad in _ENV_ANY_RE.findall(s):
            if not _ENV_RE.fullmatch(bad):
                self.problem(line, f"malformed placeholder '{bad}' (expected ${{env:NAME}} or ${{env:NAME|default}})")
                return s

        missing = []

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    self.problem(line, f"environment variable '{name}' is not set and has no default")
                    missing.append(name)
                    return ""
                return default
            return value

        whole = _ENV_RE.fullmatch(s) is not None
        out = _ENV_RE.sub(repl, s)
        if missing:
            return Unresolved(out)
        return reread_scalar(out) if whole else out

    def include(self, rel: str, line: int) -> Any:
        if not rel:
            self.problem(line, "empty path in 'file://'")
            return ""
        target = (self.path.parent / rel).resolve()
        if target != self.app_dir and self.app_dir not in target.parents:
            self.problem(line, f"'file://{rel}' points outside the application directory")
            return ""
        try:
            info = target.stat()
            if not stat.S_ISREG(info.st_mode):
                self.problem(line, f"'file://{rel}' is not a regular file")
                return ""
            raw = target.read_bytes() if info.st_size <= MAX_INCLUDE_BYTES else None
        except OSError as exc:
            self.problem(line, f"cannot read 'file://{rel}': {exc.strerror or exc}")
            return ""
        if raw is None:
            self.problem(line, f"'file://{rel}' is larger than {MAX_INCLUDE_BYTES // (1024 * 1024)} MiB")
            return ""
        try:
            text = decode_text(raw)
        except YamlProblem as exc:
            message = f"{self.label}: {exc.message}" if self.label else exc.message
            self.problems.append(Problem(display_path(target), exc.line, message))
            return ""
        return SourceText(text, target, 1, inline=False)
