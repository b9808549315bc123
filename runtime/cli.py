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
from .app import IDLE_CALM, App
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
    run.add_argument("--processes", type=int, default=1, metavar="N",
                     help="run the consumers in N worker processes (queues on a shared driver such as sqlite)")
    run.add_argument("--metrics", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the 'metrics' extra)")
    run.add_argument("--watch", action="store_true",
                     help="reload when a definition or Lua file changes, restarting only what the change affects")
    run.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--worker-metrics", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate an application and list every problem")
    check.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR")

    inspect = sub.add_parser("inspect", help="print each queue's counts, connecting to the drivers only")
    inspect.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR")
    inspect.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    dlq = sub.add_parser("dlq", help="list, replay or purge the messages of a dead-letter queue")
    dlq.add_argument("action", choices=("list", "replay", "purge"))
    dlq.add_argument("app_dir", metavar="APP_DIR")
    dlq.add_argument("queue_id", metavar="QUEUE_ID", help="the dead-letter queue's ID")
    dlq.add_argument("--id", action="append", dest="ids", metavar="ID", help="only this message id (repeatable)")
    dlq.add_argument("--all", action="store_true", help="every message (replay and purge need --id, --limit or --all)")
    dlq.add_argument("--limit", type=int, metavar="N", help="at most N messages")
    dlq.add_argument("--json", action="store_true", help="JSON output")
    dlq.add_argument("--yes", action="store_true", help="purge without asking")

    call = sub.add_parser("call", help="run one function.lua entry and print its result as JSON")
    call.add_argument("app_dir", metavar="APP_DIR")
    call.add_argument("func_id", metavar="FUNC_ID", help="the function's registry ID, e.g. app:greet")
    call.add_argument("args", nargs="*", metavar="JSON", help="arguments, each a JSON value")
    for p in (run, check, call, inspect, dlq):
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


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .admin import inspect
    try:
        app = App.load(args.app_dir)
        rows = inspect(app)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except RuntimeHostError as err:
        print(f"runtime inspect: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps({"queues": rows}, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"queues of {args.app_dir}", expand=False)
    for col in ("queue", "driver", "ready", "in flight", "delayed", "dead-letter queue", "dead letters"):
        table.add_column(col, justify="left" if col in ("queue", "driver", "dead-letter queue") else "right")
    for r in rows:
        table.add_row(r["queue"], r["driver"], _count(r["ready"]), _count(r["in_flight"]), _count(r["delayed"]),
                      r["dead_letter_queue"] or "", _count(r["dead_letters"]))
    Console(width=max(100, Console().width)).print(table)
    if any(r["in_process_only"] for r in rows):
        print("-: the queue is on an in-process driver (queue.driver.memory); its messages exist only inside a "
              "running `runtime run`, so there is nothing to see from outside.")
    return EXIT_OK


def cmd_dlq(args: argparse.Namespace) -> int:
    from . import admin
    ids = set(args.ids) if args.ids else None
    if args.action in ("replay", "purge") and ids is None and not args.all and args.limit is None:
        args.parser.error(f"dlq {args.action}: say which messages: --id ID (repeatable), --limit N (the oldest N) "
                          "or --all")
    if args.limit is not None and args.limit < 1:
        args.parser.error("--limit must be 1 or more")
    try:
        app = App.load(args.app_dir)
        if args.action == "list":
            rows = admin.list_dead_letters(app, args.queue_id, ids, args.limit if args.all or ids else
                                           args.limit or 100)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    print(f"{r['id']}  attempts={r['attempts']}  from={r['original_queue']}  at={r['time']}  "
                          f"reason={r['reason']}")
                print(f"{len(rows)} dead letter{'s' if len(rows) != 1 else ''}", file=sys.stderr)
            return EXIT_OK
        if args.action == "purge" and not args.yes:
            admin.dead_letter_queue(app, args.queue_id)  # unknown or in-process queue: say so first
            what = f"{len(ids)} message(s)" if ids else "every message"
            if not sys.stdin.isatty():
                print(f"runtime dlq purge: would delete {what} of {args.queue_id}; pass --yes to confirm "
                      "(no terminal to ask on)", file=sys.stderr)
                return EXIT_USAGE
            answer = input(f"Delete {what} of {args.queue_id} for good? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return EXIT_OK
        if args.action == "purge":
            n = admin.purge(app, args.queue_id, ids, args.limit)
            print(f"purged {n} dead letter{'s' if n != 1 else ''} from {args.queue_id}")
            return EXIT_OK
        done = admin.replay(app, args.queue_id, ids, args.limit)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except RuntimeHostError as err:
        print(f"runtime dlq: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        for r in done:
            print(f"{r['id']}  -> {r['to']}" if r["replayed"] else f"{r['id']}  not replayed: {r['error']}")
    replayed = sum(r["replayed"] for r in done)
    print(f"replayed {replayed} dead letter{'s' if replayed != 1 else ''}", file=sys.stderr)
    return EXIT_OK if replayed == len(done) else EXIT_CONFIG


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


def _print_summary(consumers: dict[str, dict[str, int]], elapsed: float) -> None:
    for cid, c in sorted(consumers.items()):
        rate = c["processed"] / elapsed if elapsed > 0 else 0.0
        print(f"{cid} acked={c['acked']} nacked={c['nacked']} dead_lettered={c['dead_lettered']} "
              f"processed={c['processed']} rate={rate:.1f}/s")
    sys.stdout.flush()


def _failed(err: RuntimeHostError, what: str = "") -> int:
    """Report a failure before or at start (configuration problems listed one per line)."""
    if isinstance(err, ConfigError):
        _print_problems(err)
    else:
        print(f"runtime run: {what}{err}", file=sys.stderr)
    return EXIT_CONFIG


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one worker process of `--processes`."""
    argv = [sys.executable, "-m", "runtime", "run", str(args.app_dir), "--worker-process",
            "--log-level", args.log_level, "--log-format", args.log_format]
    if args.strict_security:
        argv.append("--strict-security")
    if args.metrics:
        argv.append("--worker-metrics")
    if args.stop_timeout is not None:
        argv += ["--stop-timeout", str(args.stop_timeout)]
    return argv


def _stop_budget(app: App, override: float | None) -> float:
    if override is not None:
        return override
    return max((spec.lifecycle.stop_timeout for spec in app.registry), default=10.0)


def cmd_run(args: argparse.Namespace) -> int:
    signals = _Signals()
    signals.install()
    if args.processes < 1:
        args.parser.error("--processes must be 1 or more")
    if args.watch and args.processes > 1:
        args.parser.error("--watch works in one process; it cannot be combined with --processes yet")
    metrics_address = None
    if args.metrics:
        from .metrics import parse_address
        try:
            metrics_address = parse_address(args.metrics)
        except ValueError as exc:
            args.parser.error(str(exc))
    try:
        publishes = _read_publishes(args.publish, args.parser)
        app = App.load(args.app_dir, strict_security=args.strict_security)
        for queue_id, _ in publishes:
            app.router.spec(queue_id)  # unknown queue: refuse before starting anything
        if args.processes > 1:
            from .multiprocess import check_shared
            check_shared(app, args.processes)
    except RuntimeHostError as err:
        return _failed(err)
    app.measure_durations = bool(metrics_address or args.worker_metrics)
    if args.worker_process:
        return _run_worker(app, signals)
    if args.processes > 1:
        return _run_parent(app, args, publishes, signals, metrics_address)
    try:
        app.start()
        if metrics_address is not None:
            from .metrics import serve
            serve(metrics_address, app.metrics_snapshot)
    except RuntimeHostError as err:
        _stop(app, args.stop_timeout)
        return _failed(err, "cannot start: ")
    except OSError as err:
        _stop(app, args.stop_timeout)
        print(f"runtime run: --metrics {args.metrics}: {err.strerror or err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.watch:
        from .watch import Watcher
        Watcher(app, args.app_dir, signals.stop, strict_security=args.strict_security).start()
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
        _publish_all(app, publishes, signals)
        if args.until_idle:
            seen = app.activity.value
            while not signals.stop.is_set() and not app.idle():
                seen = app.activity.wait(seen, 0.05)  # woken by the next message move
                signals.stop.wait(IDLE_CALM)  # then a pause: a burst of moves costs one check
        else:
            while not signals.stop.wait(0.5):
                pass
    except RuntimeHostError as err:
        print(f"runtime run: {err}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        if progress is not None:
            progress.stop()
        elapsed = time.monotonic() - started
        code = _stop(app, args.stop_timeout) or code
        _print_summary(app.consumer_stats(), elapsed)
    return code


def _stop(app: App, timeout: float | None) -> int:
    """Stop the app gracefully; EXIT_SHUTDOWN_TIMEOUT if handlers overran, else 0."""
    try:
        app.stop(timeout)
    except ShutdownTimeout as err:
        print(f"runtime run: {err}", file=sys.stderr)
        return EXIT_SHUTDOWN_TIMEOUT
    return EXIT_OK


def _publish_all(app: App, publishes: list[tuple[str, Any]], signals: _Signals) -> None:
    for queue_id, data in publishes:
        if signals.stop.is_set():
            break
        app.publish(queue_id, data)


def _run_worker(app: App, signals: _Signals) -> int:
    from .multiprocess import run_worker
    try:
        overran = run_worker(app, signals.stop)
    except RuntimeHostError as err:
        return _failed(err, "cannot start: ")
    return EXIT_SHUTDOWN_TIMEOUT if overran else EXIT_OK


def _run_parent(app: App, args: argparse.Namespace, publishes: list[tuple[str, Any]], signals: _Signals,
                metrics_address: tuple[str, int] | None) -> int:
    from .multiprocess import WorkerPool, run_parent

    def serve_metrics(pool: WorkerPool) -> None:
        if metrics_address is None:
            return
        from .metrics import serve

        def snapshot() -> dict[str, Any]:
            own = app.metrics_snapshot()
            return {**own, "consumers": pool.totals(), "worker_restarts": pool.restarts()}

        serve(metrics_address, snapshot)

    started = time.monotonic()
    code = EXIT_OK
    pool = None
    try:
        logging.getLogger("runtime").info("starting %d worker processes for %s%s", args.processes, args.app_dir,
                                          "" if args.until_idle else "; press Ctrl-C to stop")
        pool, code = run_parent(app, _worker_argv(args), args.processes, signals.stop, args.until_idle,
                                _stop_budget(app, args.stop_timeout), lambda: _publish_all(app, publishes, signals),
                                serve_metrics)
    except RuntimeHostError as err:
        code = _failed(err)
    except OSError as err:
        print(f"runtime run: --metrics {args.metrics}: {err.strerror or err}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        elapsed = time.monotonic() - started
        code = _stop(app, args.stop_timeout) or code
    if pool is not None:
        _print_summary(pool.totals(), elapsed)
        for slot, pids, processed in pool.per_worker():
            print(f"worker {slot} pids={','.join(map(str, pids))} processed={processed}")
        sys.stdout.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `runtime` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.parser = parser
    configure_logging(args.log_level, args.log_format)
    handler = {"run": cmd_run, "check": cmd_check, "call": cmd_call, "inspect": cmd_inspect,
               "dlq": cmd_dlq}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
