"""`python -m benchmarks`: every scenario of the benchmarks issue, each in a fresh process,
with the raw baseline measured in the same run. Prints a table and writes JSON.

  python -m benchmarks                 # full sizes (about 2-3 minutes here)
  python -m benchmarks --quick         # tiny sizes (the smoke test uses this)
  python -m benchmarks --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .scenarios import calibrate_rounds

ROOT = Path(__file__).resolve().parent.parent


def in_subprocess(name: str, **kwargs: Any) -> dict[str, Any]:
    code = ("import json, sys; from benchmarks.scenarios import run_in_this_process; "
            "print(json.dumps(run_in_this_process(sys.argv[1], json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, name, json.dumps(kwargs)], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"scenario {name} {kwargs} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
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
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(s)
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}  ({results['seconds']:.0f} s)")
    return 0


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    base2 = s["baseline_noop"][2]["consume_per_s"]
    ours2 = s["noop"]["c2-p100"]["consume_per_s"]
    c1, c2 = s["compute"]["c1"]["consume_per_s"], s["compute"]["c2"]["consume_per_s"]
    return [
        {"target": "no-op consume, concurrency 2 >= 0.7x raw baseline", "value": ours2 / base2, "goal": 0.7,
         "ok": ours2 / base2 >= 0.7},
        {"target": "compute: concurrency 2 >= 1.8x concurrency 1", "value": c2 / c1, "goal": 1.8, "ok": c2 / c1 >= 1.8},
        {"target": "latency p99 at 5,000 msg/s < 2 ms", "value": s["latency"]["p99_ms"], "goal": 2.0,
         "ok": s["latency"]["p99_ms"] < 2.0},
        {"target": "idle worker memory < 1 MiB", "value": s["idle_memory"]["rss_per_worker_mib"], "goal": 1.0,
         "ok": s["idle_memory"]["rss_per_worker_mib"] < 1.0},
    ]


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
                                         for c, r in s["baseline_noop"].items()))
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
