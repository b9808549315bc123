"""Shared helpers: write small apps into tmp folders and load them."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime import App

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
