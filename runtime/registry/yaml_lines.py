"""Load YAML into plain dicts and lists that remember the line of every key and item.

Line numbers are 1-based and point at the key (for mapping values) or the item (for
sequence items), so a problem can be reported where the user will look for it.
"""

from __future__ import annotations

from typing import Any

import yaml

try:  # the C parser is much faster and still records node marks
    _BaseLoader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - libyaml missing
    _BaseLoader = yaml.SafeLoader

MAX_DEFINITION_BYTES = 8 * 1024 * 1024


class LineDict(dict):  # type: ignore[type-arg]
    """A mapping from YAML with ``line`` (its own) and ``key_lines`` / ``value_lines``."""

    line: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}
        self.value_lines: dict[Any, int] = {}
        self.value_block: dict[Any, bool] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):  # type: ignore[type-arg]
    """A sequence from YAML with ``line`` (its own) and ``item_lines``."""

    line: int = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        if 0 <= index < len(self.item_lines):
            return self.item_lines[index]
        return self.line


class YamlProblem(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


class _LineLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[int, str]] = []


def _construct_map(loader: _LineLoader, node: yaml.MappingNode):  # type: ignore[no-untyped-def]
    data = LineDict()
    data.line = node.start_mark.line + 1
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise YamlProblem(key_node.start_mark.line + 1, "a mapping key must be a scalar") from None
        if key in data:
            loader.duplicate_keys.append((key_node.start_mark.line + 1, str(key)))
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
        block = isinstance(value_node, yaml.ScalarNode) and value_node.style in ("|", ">")
        # A block scalar's text starts on the line after its indicator.
        data.value_lines[key] = value_node.start_mark.line + 1 + (1 if block else 0)
        data.value_block[key] = block


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode):  # type: ignore[no-untyped-def]
    data = LineList()
    data.line = node.start_mark.line + 1
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def decode_text(raw: bytes) -> str:
    """Decode a definition file's bytes as UTF-8, or raise YamlProblem with the place."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise YamlProblem(
            line, f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def load_yaml(raw: bytes) -> tuple[Any, list[tuple[int, str]]]:
    """Parse one YAML document. Returns (value, duplicate keys as (line, key))."""
    if len(raw) > MAX_DEFINITION_BYTES:
        raise YamlProblem(
            0, f"file is too large ({len(raw)} bytes; definition files are limited to "
            f"{MAX_DEFINITION_BYTES // (1024 * 1024)} MiB)"
        )
    text = decode_text(raw)
    loader = _LineLoader(text)
    try:
        value = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = exc.problem or str(exc)
        if exc.context:
            what = f"{exc.context}: {what}"
        raise YamlProblem(line, f"invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(0, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise YamlProblem(0, "invalid YAML: the document is nested too deeply") from None
    finally:
        loader.dispose()
    return value, loader.duplicate_keys


def reread_scalar(text: str) -> Any:
    """Read a substituted string as a YAML scalar (so "4" becomes 4, "true" becomes True)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) or value is None and text.strip() not in ("null", "~"):
        return text
    return value
