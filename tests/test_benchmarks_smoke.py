"""The benchmark program runs end to end with tiny sizes (so it cannot rot). No timing is
asserted: benchmarks are programs, not tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmarks_quick_run(tmp_path):
    out_json = tmp_path / "results.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, cwd=REPO, timeout=280)
    assert out.returncode == 0, out.stderr
    assert "Scenario 1" in out.stdout and "Targets:" in out.stdout
    results = json.loads(out_json.read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == {"baseline_noop", "baseline_compute", "noop", "compute", "limits", "pipeline", "latency",
                              "startup", "idle_memory", "peers"}
    assert all(r["consume_per_s"] > 0 for r in scenarios["noop"].values())
    assert scenarios["latency"]["messages"] > 0
    assert len(results["targets"]) == 9
    assert "end_to_end_per_s" in scenarios["baseline_noop"]["2"]
    for peer in scenarios["peers"].values():  # benchmark-only packages: measured where installed
        assert "missing" in peer or peer["consume_per_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_driver_table_quick_run(tmp_path):
    out_json = tmp_path / "drivers.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--drivers", "memory,sqlite",
                          "--json", str(out_json)], capture_output=True, text=True, cwd=REPO, timeout=280)
    assert out.returncode == 0, out.stderr
    table = json.loads(out_json.read_text())
    assert set(table["drivers"]) == {"memory", "sqlite"}
    assert all(r["consume_per_s"] > 0 for d in table["drivers"].values() for r in d["consume"].values())


def test_conversion_benchmark_runs():
    out = subprocess.run([sys.executable, "-m", "benchmarks.conversion", "--n", "200"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lua-decode" in out.stdout
