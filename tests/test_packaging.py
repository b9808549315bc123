"""The wheel ships lua_modules, and the installed package finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from runtime.lua.paths import lua_modules_dir

LUA_FILES = sorted(p.name for p in (REPO / "lua_modules").glob("*.lua"))


def test_installed_package_finds_lua_modules():
    found = lua_modules_dir()
    assert sorted(p.name for p in found.glob("*.lua")) == LUA_FILES


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_contains_lua_modules(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for lua in LUA_FILES:
        assert f"runtime/_lua_modules/{lua}" in names
    assert "runtime/cli.py" in names
