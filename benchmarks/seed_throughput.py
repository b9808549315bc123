"""End-to-end throughput of the seed app through the CLI, at several concurrencies.

Copies samples/seed to a temporary folder, sets the consumer's concurrency, writes N tasks
to a JSONL file and times `runtime run --until-idle --publish ...` (start-up included).
The runtime's own summary gives the consume rate. A baseline in the same run: the same
command with zero messages (start-up and shut-down alone).

Run: python -m benchmarks.seed_throughput [--n 100000] [--concurrency 1 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED = Path(__file__).resolve().parent.parent / "samples" / "seed"


def run_once(app: Path, tasks: Path | None) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "runtime", "run", str(app), "--until-idle", "--log-level", "warn"]
    if tasks is not None:
        cmd += ["--publish", f"app.queue:tasks=@{tasks}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.jsonl"
        tasks.write_text("".join(json.dumps({"id": f"task-{i}", "action": "process", "data": {"n": i}}) + "\n"
                                 for i in range(args.n)))
        for conc in args.concurrency:
            app = Path(tmp) / f"seed-c{conc}"
            shutil.copytree(SEED, app)
            yaml = (app / "app.yaml").read_text()
            (app / "app.yaml").write_text(re.sub(r"concurrency: \d+", f"concurrency: {conc}", yaml)
                                          )
            # The queue must hold the whole batch: --publish runs before consumers catch up.
            (app / "app.yaml").write_text((app / "app.yaml").read_text().replace(
                "driver: app.queue:memory_driver",
                "driver: app.queue:memory_driver\n    driver_options: {memory: {max_length: 1000000}}", 1))
            empty, _ = run_once(app, None)
            wall, summary = run_once(app, tasks)
            rate = float(re.search(r"rate=([\d.]+)/s", summary).group(1))  # type: ignore[union-attr]
            results.append({"concurrency": conc, "messages": args.n, "wall_s": wall, "startup_s": empty,
                            "end_to_end_per_s": args.n / wall, "consume_per_s": rate})
    print(f"{'concurrency':>11} {'messages':>9} {'wall s':>7} {'start+stop s':>12} {'end-to-end/s':>13} "
          f"{'consume/s':>10}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['messages']:>9} {r['wall_s']:>7.2f} {r['startup_s']:>12.2f} "
              f"{r['end_to_end_per_s']:>13,.0f} {r['consume_per_s']:>10,.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
