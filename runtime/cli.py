"""The `runtime` command line (SPEC §8). Only this module knows about the terminal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__
from .app import App
from .errors import ConfigError, InvalidMessage, LuaHandlerError, Problem, RuntimeHostError, ShutdownTimeout
from .logs import LEVEL_NAMES, configure_logging
from .lua.convert import LuaErrorValue
from .queue.router import check_travels

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_SHUTDOWN_TIMEOUT, EXIT_FORCED = 0, 1, 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runtime", description="Run Lua-scripted queue consumers described in YAML registry files.")
    parser.add_argument("--version", action="version", version=f"runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run an application until SIGINT/SIGTERM (or until idle)")
    run.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR")
    run.add_argument("--until-idle", action="store_true",
                     help="exit 0 once every consumed queue is empty and every process has finished")
    run.add_argument("--publish", action="append", default=[], metavar="QUEUE_ID=JSON|@FILE.jsonl",
                     help="publish a message (or every line of a JSONL file) after start; repeatable")
    run.add_argument("--stop-timeout", type=float, metavar="SECONDS",
                     help="graceful shutdown budget, overriding each service's stop_timeout")
    run.add_argument("--strict-security", action="store_true",
                     help="deny permission checks made with no actor or no policies")
    run.add_argument("--no-progress", action="store_true", help="no live progress display on a terminal")

    check = sub.add_parser("check", help="validate an application and list every problem")
    check.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR")

    call = sub.add_parser("call", help="run one function.lua entry and print its result as JSON")
    call.add_argument("app_dir", metavar="APP_DIR")
    call.add_argument("func_id", metavar="FUNC_ID", help="the function's registry ID, e.g. app:greet")
    call.add_argument("args", nargs="*", metavar="JSON", help="arguments, each a JSON value")
    for p in (run, check, call):
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


def _read_publishes(items: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, Any]]:
    """Parse every --publish before anything starts. Usage errors exit 2 (via parser.error);
    bad JSON or an unreadable file raises ConfigError."""
    out: list[tuple[str, Any]] = []
    problems = []
    for item in items:
        if "=" not in item:
            parser.error(f"--publish {item!r}: expected QUEUE_ID=JSON or QUEUE_ID=@FILE.jsonl")
        queue_id, _, value = item.partition("=")
        if not queue_id:
            parser.error(f"--publish {item!r}: the queue ID is empty")
        if value.startswith("@"):
            path = Path(value[1:])
            try:
                # utf-8-sig: a BOM is ignored; split on \n only, since U+2028 and friends are
                # legal inside JSON strings and str.splitlines would cut there.
                lines = path.read_text(encoding="utf-8-sig").split("\n")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(Problem(str(path), 0, f"--publish: cannot read file: {exc}"))
                continue
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                error = _parse_publish(queue_id, line, out)
                if error:
                    problems.append(Problem(str(path), number, f"--publish: {error}"))
        else:
            error = _parse_publish(queue_id, value, out)
            if error:
                problems.append(Problem("--publish", 0, f"{queue_id}: {error}"))
    if problems:
        raise ConfigError(problems)
    return out


def _parse_publish(queue_id: str, text: str, out: list[tuple[str, Any]]) -> str | None:
    """Parse one --publish value into `out`; the problem with it, or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    try:
        check_travels(value)
    except InvalidMessage as exc:
        return str(exc)
    out.append((queue_id, value))
    return None


class _Signals:
    """First SIGINT/SIGTERM asks for a graceful stop; a second one forces exit 130."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.count = 0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count >= 2:
            sys.stderr.write("runtime: second signal, forcing exit\n")
            sys.stderr.flush()
            os._exit(EXIT_FORCED)
        sys.stderr.write("runtime: stopping (send the signal again to force exit)\n")
        self.stop.set()


def _print_summary(app: App, elapsed: float) -> None:
    for cid, c in sorted(app.stats()["consumers"].items()):
        rate = c["processed"] / elapsed if elapsed > 0 else 0.0
        print(f"{cid} acked={c['acked']} nacked={c['nacked']} dead_lettered={c['dead_lettered']} "
              f"processed={c['processed']} rate={rate:.1f}/s")
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    signals = _Signals()
    signals.install()
    try:
        publishes = _read_publishes(args.publish, args.parser)
        app = App.load(args.app_dir, strict_security=args.strict_security)
        for queue_id, _ in publishes:
            app.router.spec(queue_id)  # unknown queue: refuse before starting anything
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except RuntimeHostError as err:
        print(f"runtime run: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        app.start()
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    started = time.monotonic()
    services = len(app.service_ids())
    logging.getLogger("runtime").info(
        "started %d service%s from %s%s", services, "" if services == 1 else "s", args.app_dir,
        "" if args.until_idle else "; press Ctrl-C to stop")
    progress = None
    if sys.stderr.isatty() and args.log_format == "text" and not args.no_progress:
        from rich.console import Console

        from .progress import Progress
        progress = Progress(app, Console(stderr=True))
        progress.start()
    code = EXIT_OK
    try:
        for queue_id, data in publishes:
            if signals.stop.is_set():
                break
            app.publish(queue_id, data)
        while not signals.stop.is_set():
            if args.until_idle and app.idle():
                break
            signals.stop.wait(0.01)
    except RuntimeHostError as err:
        print(f"runtime run: {err}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        if progress is not None:
            progress.stop()
        elapsed = time.monotonic() - started
        try:
            app.stop(args.stop_timeout)
        except ShutdownTimeout as err:
            print(f"runtime run: {err}", file=sys.stderr)
            code = EXIT_SHUTDOWN_TIMEOUT
        _print_summary(app, elapsed)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `runtime` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.parser = parser
    configure_logging(args.log_level, args.log_format)
    handler = {"run": cmd_run, "check": cmd_check, "call": cmd_call}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
