"""`runtime check` on a corpus of broken applications (SPEC §1, §2, §8).

Every folder under tests/broken_apps/ is a tiny application with one deliberate mistake
(`several_mistakes` has many). For each, the CLI runs in a subprocess and must exit 1 and
print the mistake as `FILE:LINE: message`, with the file and line where the user has to
look, and nothing else (no cascade of follow-up problems). A few cases whose files cannot
be committed as text (non-UTF-8 bytes, CRLF line ends, a symlink) are written to a
temporary directory by the test itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BROKEN = REPO / "tests" / "broken_apps"
UNSET_VAR = "RUNTIME_BROKEN_APP_UNSET_VAR"  # removed from the environment of every run

# (file relative to the app folder, line, phrases that must all be in that problem's message)
Expected = tuple[str, int, tuple[str, ...]]

CASES: list[tuple[str, list[Expected]]] = [
    ("unknown_kind", [
        ("app.yaml", 20, ("entry app:worker", "unknown kind 'queue.consumr'",
                          "did you mean 'queue.consumer'")),
    ]),
    ("consumer_missing_func", [
        ("app.yaml", 14, ("entry app:worker", "missing required field 'func'")),
    ]),
    ("queue_missing_driver", [
        ("app.yaml", 10, ("entry app:tasks", "missing required field 'driver'")),
    ]),
    ("function_missing_source", [
        ("app.yaml", 7, ("entry app:handler", "missing required field 'source'")),
    ]),
    ("concurrency_not_number", [
        ("app.yaml", 23, ("entry app:worker", "'concurrency'", "whole number", "'four'")),
    ]),
    ("auto_ack_quoted_string", [
        ("app.yaml", 23, ("entry app:worker", "'auto_ack'", "true or false", "'yes'")),
    ]),
    ("modules_not_list", [
        ("app.yaml", 9, ("entry app:handler", "'modules'", "must be a list")),
    ]),
    ("concurrency_too_high", [
        ("app.yaml", 23, ("entry app:worker", "'concurrency'", "2000", "maximum 1000")),
    ]),
    ("prefetch_too_high", [
        ("app.yaml", 24, ("entry app:worker", "'prefetch'", "20000", "maximum 10000")),
    ]),
    ("missing_reference", [
        ("app.yaml", 21, ("entry app:worker", "'queue'", "'app:task'", "does not exist",
                          "did you mean 'app:tasks'")),
    ]),
    ("wrong_kind_reference", [
        ("app.yaml", 22, ("entry app:worker", "'func'", "'app:tasks'", "queue.queue",
                          "not a function.lua")),
    ]),
    ("import_wrong_kind", [
        ("app.yaml", 16, ("entry app:handler", "'imports.helpers'", "'app:helpers'", "function.lua",
                          "not a library.lua")),
    ]),
    ("service_wrong_kind", [
        ("app.yaml", 14, ("entry app:service", "'process'", "'app:main'", "not a process.lua")),
    ]),
    ("duplicate_id", [
        ("b.yaml", 11, ("duplicate entry ID 'app:handler'", "duplicate_id/a.yaml:9")),
    ]),
    ("duplicate_yaml_key", [
        ("app.yaml", 24, ("duplicate key 'func'",)),
    ]),
    ("dependency_cycle", [
        ("app.yaml", 7, ("dependency cycle", "app:a -> app:b -> app:a")),
    ]),
    ("self_dependency", [
        ("app.yaml", 12, ("entry app:memory", "'lifecycle.depends_on'", "the entry itself")),
    ]),
    ("lua_syntax_file", [
        ("handler.lua", 4, ("Lua syntax error", "app:handler", "near '='")),
    ]),
    ("lua_syntax_nested_file", [
        ("lib/util.lua", 5, ("Lua syntax error", "library.lua app:util", "near '/'")),
    ]),
    ("lua_syntax_inline", [
        ("app.yaml", 19, ("Lua syntax error", "app:handler", "near '='")),
    ]),
    ("lua_syntax_inline_quoted", [
        ("app.yaml", 13, ("Lua syntax error", "app:handler", "near '*'")),
    ]),
    ("unknown_module", [
        ("app.yaml", 11, ("entry app:handler", "unknown module 'jsn'", "did you mean 'json'")),
    ]),
    ("unknown_field_typo", [
        ("app.yaml", 23, ("entry app:worker", "'concurency'", "not a known field",
                          "did you mean 'concurrency'")),
    ]),
    ("bad_codec", [
        ("app.yaml", 13, ("entry app:tasks", "'codec'", "'msgpak'", "did you mean 'msgpack'")),
    ]),
    ("malformed_yaml", [
        ("app.yaml", 12, ("invalid YAML",)),
    ]),
    ("tab_indentation", [
        ("app.yaml", 8, ("invalid YAML", "tab")),
    ]),
    ("file_escapes_app", [
        ("app.yaml", 9, ("'file://../../etc/passwd'", "outside the application directory")),
    ]),
    ("include_missing_file", [
        ("app.yaml", 9, ("cannot read", "'file://handlers/handler.lua'")),
    ]),
    ("missing_env_var", [
        ("app.yaml", 14, (f"'{UNSET_VAR}'", "not set", "no default")),
    ]),
    ("missing_env_var_in_reference", [
        ("app.yaml", 14, (f"'{UNSET_VAR}'", "not set", "no default")),
    ]),
    ("env_default_not_number", [
        ("app.yaml", 24, ("entry app:worker", "'concurrency'", "whole number", "'lots'")),
    ]),
    ("missing_namespace", [
        ("app.yaml", 1, ("missing required field 'namespace'",)),
    ]),
    ("dead_letter_self", [
        ("app.yaml", 14, ("entry app:tasks", "'dead_letter.queue'", "own dead-letter queue")),
    ]),
    ("dead_letter_bad_attempts", [
        ("app.yaml", 19, ("entry app:tasks", "'dead_letter.max_attempts'", "minimum 1")),
    ]),
    ("bad_duration", [
        ("app.yaml", 11, ("entry app:memory", "'lifecycle.stop_timeout'", "'10 parsecs' is not a duration")),
    ]),
    ("bad_consumer_timeout", [
        ("app.yaml", 17, ("entry app:handler", "'timeout'", "cannot be negative")),
        ("app.yaml", 25, ("entry app:worker", "'timeout'", "'soon' is not a duration")),
    ]),
    ("bad_memory_limit", [
        ("app.yaml", 9, ("entry app:handler", "'memory_limit'", "'64 megabytes' is not a size")),
    ]),
    ("wippy_lock_missing_src", [
        ("wippy.lock", 5, ("source folder 'src' does not exist",)),
    ]),
    ("several_mistakes", [
        ("app.yaml", 12, ("entry app:tasks", "'codec'", "'xml'")),
        ("app.yaml", 18, ("entry app:handler", "'timeout'", "'fast' is not a duration")),
        ("app.yaml", 24, ("entry app:worker", "'prefetch'", "maximum 10000")),
        ("app.yaml", 25, ("entry app:worker", "'auto_ack'", "true or false")),
        ("app.yaml", 29, ("entry app:other_worker", "'app:jobs'", "does not exist")),
        ("app.yaml", 33, ("entry app:stray", "unknown kind 'queue.consumr'")),
        ("extra/broken.yaml", 6, ("invalid YAML",)),
        ("handler.lua", 5, ("Lua syntax error", "app:handler", "near 'end'")),
    ]),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(UNSET_VAR, None)
    env.pop("PYTHONWARNINGS", None)
    return env


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_problems(proc: subprocess.CompletedProcess[str], app_shown: str,
                    expected: list[Expected]) -> None:
    """Exit 1; each expected problem on its own `FILE:LINE: ` line; nothing more."""
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    assert proc.returncode == 1, report
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for file, line, phrases in expected:
        prefix = f"{app_shown}/{file}:{line}: "
        hits = [ln for ln in lines if ln.startswith(prefix)]
        assert hits, f"no problem reported at {prefix!r}\n{report}"
        assert any(all(p in ln for p in phrases) for ln in hits), (
            f"the problem at {prefix!r} should mention {phrases}\n{report}")
    n = len(expected)
    assert len(lines) == n, f"expected exactly {n} problem line(s)\n{report}"
    assert f"{n} problem{'s' if n != 1 else ''} found" in proc.stderr, report


def test_corpus_is_complete() -> None:
    """Every folder of the corpus has a row in the table, and the other way round."""
    folders = {p.name for p in BROKEN.iterdir() if p.is_dir()}
    assert folders == {name for name, _ in CASES}
    assert len(folders) >= 18


@pytest.mark.parametrize("app, expected", CASES, ids=[name for name, _ in CASES])
def test_broken_app(app: str, expected: list[Expected]) -> None:
    proc = run_cli("check", f"tests/broken_apps/{app}")
    assert_problems(proc, f"tests/broken_apps/{app}", expected)


# -- cases written at test time --------------------------------------------------------------

_HEAD = 'version: "1.0"\nnamespace: app\n\nentries:\n'


def _non_utf8_yaml(d: Path) -> list[Expected]:
    (d / "app.yaml").write_bytes(
        (_HEAD + "  - name: memory\n    kind: queue.driver.memory\n    meta:\n").encode()
        + b'      note: "caf\xe9"\n')
    return [("app.yaml", 8, ("not valid UTF-8", "0xe9"))]


def _non_utf8_lua(d: Path) -> list[Expected]:
    (d / "app.yaml").write_text(_HEAD + "  - name: h\n    kind: function.lua\n    source: file://h.lua\n")
    (d / "h.lua").write_bytes(b'-- greeting\nreturn function()\n  return "caf\xe9"\nend\n')
    return [("h.lua", 3, ("not valid UTF-8", "0xe9"))]


def _crlf_inline_lua(d: Path) -> list[Expected]:
    text = (_HEAD + "  - name: h\n    kind: function.lua\n    source: |\n      local x = 1\n"
            "      local y = = 2\n      return function() return y end\n")
    (d / "app.yaml").write_bytes(text.replace("\n", "\r\n").encode())
    return [("app.yaml", 9, ("Lua syntax error", "app:h"))]


def _bom_inline_lua(d: Path) -> list[Expected]:
    text = (_HEAD + "  - name: h\n    kind: function.lua\n    source: |\n      local x = 1\n"
            "      local y = = 2\n      return function() return y end\n")
    (d / "app.yaml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    return [("app.yaml", 9, ("Lua syntax error", "app:h"))]


def _symlink_escape(d: Path) -> list[Expected]:
    outside = d.parent / "outside.lua"
    outside.write_text("return function() return 1 end\n")
    (d / "link.lua").symlink_to(outside)
    (d / "app.yaml").write_text(_HEAD + "  - name: h\n    kind: function.lua\n    source: file://link.lua\n")
    return [("app.yaml", 7, ("'file://link.lua'", "outside the application directory"))]


GENERATED = {
    "non_utf8_yaml": _non_utf8_yaml,
    "non_utf8_lua": _non_utf8_lua,
    "crlf_inline_lua": _crlf_inline_lua,
    "bom_inline_lua": _bom_inline_lua,
    "symlink_escape": _symlink_escape,
}


@pytest.mark.parametrize("name", list(GENERATED))
def test_generated_broken_app(name: str, tmp_path: Path) -> None:
    app = tmp_path / name
    app.mkdir()
    expected = GENERATED[name](app)
    # Run from the temporary directory, so paths are shown relative to it.
    proc = run_cli("check", name, cwd=tmp_path)
    assert_problems(proc, name, expected)


def test_check_never_runs_lua(tmp_path: Path) -> None:
    """Validation compiles Lua but never executes it: a chunk that would loop forever or
    raise at load time still checks OK."""
    (tmp_path / "app.yaml").write_text(
        _HEAD + "  - name: spin\n    kind: function.lua\n    source: file://spin.lua\n"
        "  - name: boom\n    kind: library.lua\n    source: |\n      error('executed!')\n")
    (tmp_path / "spin.lua").write_text("while true do end\nreturn function() end\n")
    proc = run_cli("check", str(tmp_path), timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK:"), proc.stdout


# -- good apps, usage errors, working directory ----------------------------------------------

@pytest.mark.parametrize("sample", ["samples/seed", "samples/functions"])
def test_samples_check_ok(sample: str) -> None:
    proc = run_cli("check", sample)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(ln.startswith("OK:") for ln in proc.stdout.splitlines()), proc.stdout


def test_missing_directory_exits_1() -> None:
    proc = run_cli("check", "tests/broken_apps/no_such_app")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tests/broken_apps/no_such_app" in proc.stdout
    assert "does not exist" in proc.stdout


def test_file_instead_of_directory_exits_1() -> None:
    proc = run_cli("check", "tests/broken_apps/unknown_kind/app.yaml")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not a directory" in proc.stdout


@pytest.mark.parametrize("args", [
    ("frobnicate", "samples/seed"),
    ("check", "--no-such-option", "samples/seed"),
    ("check", "samples/seed", "samples/functions"),
    ("check", "--log-level", "loud", "samples/seed"),
    (),
], ids=["unknown-command", "unknown-option", "extra-argument", "bad-option-value", "no-command"])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr


def test_check_from_another_cwd_absolute_paths(tmp_path: Path) -> None:
    """Outside the working directory, files are shown by their absolute path."""
    ok = run_cli("check", str(REPO / "samples" / "seed"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK:")
    for app, shown in (("lua_syntax_file", "handler.lua:4: "), ("unknown_kind", "app.yaml:20: ")):
        bad = run_cli("check", str(BROKEN / app), cwd=tmp_path)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert f"{BROKEN / app}/{shown}" in bad.stdout, bad.stdout


def test_check_from_inside_the_app_defaults_to_cwd() -> None:
    """`runtime check` with no APP_DIR checks `.`, and paths are relative to the cwd."""
    proc = run_cli("check", cwd=BROKEN / "lua_syntax_file")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("handler.lua:4: "), proc.stdout


def test_check_from_a_parent_directory() -> None:
    proc = run_cli("check", "duplicate_id", cwd=BROKEN)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("duplicate_id/b.yaml:11: "), proc.stdout
    assert "duplicate_id/a.yaml:9" in proc.stdout
