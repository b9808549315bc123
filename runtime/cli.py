"""The `runtime` command line (SPEC §8). Only this module knows about the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from . import __version__
from .app import App
from .errors import ConfigError, LuaHandlerError
from .logs import LEVEL_NAMES, configure_logging
from .lua.convert import LuaErrorValue

EXIT_OK, EXIT_CONFIG, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runtime", description="Run Lua-scripted queue consumers described in YAML registry files.")
    parser.add_argument("--version", action="version", version=f"runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser("check", help="validate an application and list every problem")
    check.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR")

    call = sub.add_parser("call", help="run one function.lua entry and print its result as JSON")
    call.add_argument("app_dir", metavar="APP_DIR")
    call.add_argument("func_id", metavar="FUNC_ID", help="the function's registry ID, e.g. app:greet")
    call.add_argument("args", nargs="*", metavar="JSON", help="arguments, each a JSON value")
    for p in (check, call):
        p.add_argument("--log-level", choices=sorted(set(LEVEL_NAMES) - {"warning"}), default="info")
        p.add_argument("--log-format", choices=("text", "json"), default="text")
    return parser


def _summary(app: App) -> str:
    kinds = Counter(spec.kind for spec in app.registry)
    namespaces = sorted({spec.namespace for spec in app.registry})
    files = len(app.registry.files)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return (f"OK: {len(app.registry)} entries in {files} file{'s' if files != 1 else ''} "
            f"(namespaces: {', '.join(namespaces)}; {detail})")


def _print_problems(err: ConfigError) -> None:
    for problem in err.problems:
        print(problem)
    n = len(err.problems)
    sys.stdout.flush()
    print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, LuaErrorValue):
        return {"error": {"kind": value.kind, "message": value.message, "retryable": value.retryable,
                          "details": _jsonable(value.details)}}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def cmd_check(args: argparse.Namespace) -> int:
    try:
        app = App.load(args.app_dir)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    print(_summary(app))
    return EXIT_OK


def cmd_call(args: argparse.Namespace) -> int:
    values = []
    for i, text in enumerate(args.args, 1):
        try:
            values.append(json.loads(text))
        except json.JSONDecodeError as exc:
            print(f"runtime call: argument {i} is not valid JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        app = App.load(args.app_dir)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    try:
        result = app.call(args.func_id, *values)
    except LuaHandlerError as err:
        print(f"runtime call: {err}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        app.stop()
    print(json.dumps(_jsonable(result), ensure_ascii=False, allow_nan=True))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `runtime` command; returns the exit code."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    handler = {"check": cmd_check, "call": cmd_call}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
