"""`python -m benchmarks`: every scenario of the benchmarks issue, each in a fresh process,
with the raw baseline measured in the same run. Prints a table and writes JSON.

  python -m benchmarks                 # full sizes (about 3-4 minutes here)
  python -m benchmarks --quick         # tiny sizes (the smoke test uses this)
  python -m benchmarks --json out.json
  python -m benchmarks --drivers memory,sqlite,redis,amqp   # the hot-path table on each driver
  python -m benchmarks --runtime ../old-checkout            # measure another checkout's runtime
                                                            # with these benchmarks (before/after)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .scenarios import calibrate_rounds

ROOT = Path(__file__).resolve().parent.parent


RUNTIME_ROOT = ROOT  # the checkout whose `runtime` package is measured (--runtime)


def in_subprocess(name: str, **kwargs: Any) -> dict[str, Any]:
    # `runtime` is imported from RUNTIME_ROOT first, then these benchmarks from ROOT, so an
    # older checkout can be measured by the same programs. -P: no current directory on sys.path.
    code = ("import json, sys; sys.path.insert(0, sys.argv[3]); import runtime; sys.path[0] = sys.argv[4]; "
            "from benchmarks.scenarios import run_in_this_process; "
            "print(json.dumps(run_in_this_process(sys.argv[1], json.loads(sys.argv[2]))))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-P", "-c", code, name, json.dumps(kwargs), str(RUNTIME_ROOT), str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"scenario {name} {kwargs} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--drivers", help="comma-separated drivers: run the hot-path table on each instead")
    parser.add_argument("--runtime", type=Path,
                        help="the checkout whose runtime package to measure (default: this one)")
    args = parser.parse_args()
    global RUNTIME_ROOT
    if args.runtime:
        RUNTIME_ROOT = args.runtime.resolve()
    if args.drivers:
        return drivers_table(args.drivers.split(","), args.quick, args.json)
    n = 2_000 if args.quick else 100_000
    n_compute = 500 if args.quick else 10_000
    started = time.perf_counter()
    rounds = calibrate_rounds()
    results: dict[str, Any] = {"n": n, "compute_rounds": rounds, "scenarios": {}}
    s = results["scenarios"]

    s["baseline_noop"] = {c: in_subprocess("baseline", handler="noop", n=n, threads=c) for c in (1, 2, 4)}
    s["baseline_compute"] = {c: in_subprocess("baseline", handler="compute", rounds=rounds, n=n_compute, threads=c)
                             for c in (1, 2)}
    s["noop"] = {f"c{c}-p{p}": in_subprocess("consume", handler="noop", n=n, concurrency=c, prefetch=p)
                 for c in (1, 2, 4) for p in (10, 100)}
    s["compute"] = {f"c{c}": in_subprocess("consume", handler="compute", rounds=rounds, n=n_compute, concurrency=c,
                                           prefetch=100) for c in (1, 2)}
    # Limits (hardening issue): the same consumer with a time limit (JIT off + count hook) and
    # with a memory limit (a Lua 5.4 state), next to no limits, in the same run.
    s["limits"] = {}
    for label, limits in (("none", ""), ("timeout", "timeout: 10s"), ("memory_limit", "memory_limit: 64MB")):
        s["limits"][label] = {
            "noop": in_subprocess("consume", handler="noop", n=n, concurrency=1, prefetch=100, limits=limits),
            "compute": in_subprocess("consume", handler="compute", rounds=rounds, n=n_compute // 4, concurrency=1,
                                     prefetch=100, limits=limits),
        }
    s["pipeline"] = in_subprocess("pipeline", n=n, concurrency=2)
    s["latency"] = in_subprocess("latency", rate=5000.0, seconds=0.5 if args.quick else 4.0, concurrency=2)
    s["startup"] = in_subprocess("startup", seed=str(ROOT / "samples" / "seed"))
    s["idle_memory"] = in_subprocess("idle_memory", concurrency=100)
    s["peers"] = {p: in_subprocess("peer", which=p, n=n // 2, threads=2) for p in ("huey", "dramatiq")}
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(s)
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}  ({results['seconds']:.0f} s)")
    return 0


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    noop, raw = s["noop"], s["baseline_noop"]
    c1, c2, c4 = (noop[f"c{c}-p100"]["consume_per_s"] for c in (1, 2, 4))
    e2e2 = noop["c2-p100"]["end_to_end_per_s"]
    k1, k2 = s["compute"]["c1"]["consume_per_s"], s["compute"]["c2"]["consume_per_s"]
    lim = s["limits"]

    def target(name: str, value: float, goal: float, below: bool = False) -> dict[str, Any]:
        return {"target": name, "value": value, "goal": goal, "ok": value < goal if below else value >= goal}

    return [
        target("no-op consume, concurrency 2 >= 1.5x raw loop (2 threads)", c2 / raw[2]["consume_per_s"], 1.5),
        target("no-op consume: concurrency 2 >= 1.3x concurrency 1", c2 / c1, 1.3),
        target("no-op consume: concurrency 4 >= concurrency 2", c4 / c2, 1.0),
        target("end to end, concurrency 2 >= 1.0x raw loop's end to end", e2e2 / raw[2]["end_to_end_per_s"], 1.0),
        target("2-stage pipeline >= 0.4x single-stage end to end", s["pipeline"]["end_to_end_per_s"] / e2e2, 0.4),
        target("compute: concurrency 2 >= 1.8x concurrency 1", k2 / k1, 1.8),
        target("timeout no-op cost: rate with a time limit >= 0.8x without",
               lim["timeout"]["noop"]["consume_per_s"] / lim["none"]["noop"]["consume_per_s"], 0.8),
        target("latency p99 at 5,000 msg/s < 2 ms", s["latency"]["p99_ms"], 2.0, below=True),
        target("idle worker memory < 1 MiB", s["idle_memory"]["rss_per_worker_mib"], 1.0, below=True),
    ]


def drivers_table(drivers: list[str], quick: bool, out: Path) -> int:
    """The hot-path figures on each driver: no-op consume at concurrency 1/2/4, end to end
    and the 2-stage pipeline at concurrency 2, next to the raw loop in the same run."""
    n = 1_000 if quick else 20_000
    raw = {c: in_subprocess("baseline", handler="noop", n=n, threads=c) for c in (1, 2)}
    table: dict[str, Any] = {"n": n, "runtime": str(RUNTIME_ROOT), "raw": raw, "drivers": {}}
    print(f"runtime measured: {RUNTIME_ROOT}; {n:,} messages per run; raw loop: "
          f"1 thread {raw[1]['consume_per_s']:,.0f}/s, 2 threads {raw[2]['consume_per_s']:,.0f}/s consume, "
          f"{raw[2]['end_to_end_per_s']:,.0f}/s end to end\n")
    print(f"  {'driver':8} {'c1/s':>9} {'c2/s':>9} {'c4/s':>9} {'c2/raw':>7} {'c2/c1':>6} {'c4/c2':>6} "
          f"{'e2e c2/s':>9} {'e2e/raw':>8} {'pipe/s':>8} {'pipe/e2e':>9}")
    for d in drivers:
        r = {c: in_subprocess("consume", handler="noop", n=n, concurrency=c, prefetch=100, driver=d) for c in (1, 2, 4)}
        pipe = in_subprocess("pipeline", n=n, concurrency=2, driver=d)
        table["drivers"][d] = {"consume": r, "pipeline": pipe}
        c1, c2, c4 = (r[c]["consume_per_s"] for c in (1, 2, 4))
        e2e = r[2]["end_to_end_per_s"]
        print(f"  {d:8} {c1:>9,.0f} {c2:>9,.0f} {c4:>9,.0f} {c2 / raw[2]['consume_per_s']:>7.2f} {c2 / c1:>6.2f} "
              f"{c4 / c2:>6.2f} {e2e:>9,.0f} {e2e / raw[2]['end_to_end_per_s']:>8.2f} "
              f"{pipe['end_to_end_per_s']:>8,.0f} {pipe['end_to_end_per_s'] / e2e:>9.2f}", flush=True)
    out.write_text(json.dumps(table, indent=2))
    print(f"\nJSON: {out}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    s = results["scenarios"]
    print(f"messages per run: {results['n']:,}; compute handler: {results['compute_rounds']} rounds (~200 µs)\n")
    print("Scenario 1: no-op handler (memory driver)")
    print(f"  {'config':10} {'publish/s':>10} {'consume/s':>10} {'e2e/s':>10} {'peak RSS MiB':>13} "
          f"{'consume / raw':>14}")
    for key, r in s["noop"].items():
        c = int(key.split("-")[0][1:])
        raw = s["baseline_noop"][c]["consume_per_s"]
        print(f"  {key:10} {r['publish_per_s']:>10,.0f} {r['consume_per_s']:>10,.0f} {r['end_to_end_per_s']:>10,.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['consume_per_s'] / raw:>14.2f}")
    print("  raw baseline: " + ", ".join(f"{c} thread{'s' if c > 1 else ''} {r['consume_per_s']:,.0f}/s"
                                         for c, r in s["baseline_noop"].items())
          + "; end to end, 2 threads: " + f"{s['baseline_noop'][2]['end_to_end_per_s']:,.0f}/s")
    print("\nIn-memory peers in the same run (Python no-op handlers, 2 worker threads, half the messages):")
    ours = s["noop"]["c2-p100"]
    print(f"  {'':10} {'publish/s':>10} {'consume/s':>10} {'e2e/s':>10} {'ours c2 consume / theirs':>26}")
    for name, r in s["peers"].items():
        if "missing" in r:
            print(f"  {name:10} {r['missing']}")
            continue
        print(f"  {name:10} {r['publish_per_s']:>10,.0f} {r['consume_per_s']:>10,.0f} {r['end_to_end_per_s']:>10,.0f} "
              f"{ours['consume_per_s'] / r['consume_per_s']:>26.1f}")
    print("\nScenario 2: compute handler")
    for key, r in s["compute"].items():
        raw = s["baseline_compute"][int(key[1:])]["consume_per_s"]
        ratio = r["consume_per_s"] / raw
        print(f"  {key:10} consume {r['consume_per_s']:>8,.0f}/s   raw {raw:>8,.0f}/s   ratio {ratio:.2f}")
    print(f"  scaling c2/c1: {s['compute']['c2']['consume_per_s'] / s['compute']['c1']['consume_per_s']:.2f}")
    print("\nLimits (concurrency 1): consume rate, and the ratio to no limits in the same run")
    base = s["limits"]["none"]
    for label, r in s["limits"].items():
        noop, compute = r["noop"]["consume_per_s"], r["compute"]["consume_per_s"]
        print(f"  {label:13} no-op {noop:>9,.0f}/s ({noop / base['noop']['consume_per_s']:.2f})"
              f"   compute {compute:>7,.0f}/s ({compute / base['compute']['consume_per_s']:.2f})")
    print(f"\nScenario 3: 2-stage pipeline (republish from Lua), concurrency 2: "
          f"{s['pipeline']['end_to_end_per_s']:,.0f} msg/s end to end")
    lat = s["latency"]
    print(f"\nScenario 4: latency at {lat['rate_per_s']:,.0f} msg/s: p50 {lat['p50_ms']:.3f} ms, "
          f"p99 {lat['p99_ms']:.3f} ms, max {lat['max_ms']:.3f} ms")
    print(f"\nScenario 5: start-up of the seed app (runtime run --until-idle, 0 messages): "
          f"{s['startup']['seconds']:.2f} s; idle worker memory: "
          f"{s['idle_memory']['rss_per_worker_mib'] * 1024:.0f} KiB each (concurrency 100)")
    print("\nTargets:")
    for t in results["targets"]:
        print(f"  [{'ok' if t['ok'] else 'MISSED'}] {t['target']}: {t['value']:.3f} (goal {t['goal']})")


if __name__ == "__main__":
    sys.exit(main())
