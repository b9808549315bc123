"""Every `runtime check` problem that belongs to an entry names it (SPEC §8): by ID, or by
position and name when no ID can be formed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import write_app

from runtime import App
from runtime.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def problems(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        App.load(root)
    return [str(p) for p in info.value.problems]


def test_a_missing_or_escaping_file_include_names_its_entry(tmp_path: Path) -> None:
    (tmp_path / "outside.lua").write_text("return function() end")
    write_app(tmp_path / "app", {"app.yaml": """
        namespace: t
        entries:
          - {name: gone, kind: function.lua, source: "file://missing.lua"}
          - {name: escapes, kind: function.lua, source: "file://../outside.lua"}
          - {name: bad_env, kind: function.lua, source: "return 1", method: "${env:NOPE_NOT_SET_X}"}
    """})
    found = problems(tmp_path / "app")
    assert any("entry t:gone" in p and "missing.lua" in p for p in found), found
    assert any("entry t:escapes" in p and "outside the application directory" in p for p in found), found
    assert any("entry t:bad_env" in p and "NOPE_NOT_SET_X" in p for p in found), found


def test_an_entry_without_kind_is_named_by_its_id(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: a, kind: queue.driver.memory}
          - {name: b, kind: queue.driver.memory}
          - {name: c, kind: queue.driver.memory}
          - {name: d, kind: queue.driver.memory}
          - {name: orphan}
          - {kind: queue.driver.memory}
    """})
    found = problems(tmp_path)
    assert any(p.endswith("entry t:orphan: missing required field 'kind'") for p in found), found
    assert any(p.endswith("entry #6: missing required field 'name'") for p in found), found


def test_every_problem_of_the_broken_apps_names_an_entry_or_is_about_the_file() -> None:
    root = Path(__file__).parent / "broken_apps"
    # Problems of a whole file or folder, found before there are entries (with file:line).
    file_level = ("invalid YAML", "duplicate key", "missing required field 'namespace'", "source folder")
    entry_id = re.compile(r"\b(entry [#\w]|[\w.]+:[\w.]+\b)")
    for app in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            App.load(app)
        except ConfigError as err:
            for p in err.problems:
                assert entry_id.search(p.message) or p.message.startswith(file_level), f"{app.name}: {p}"
