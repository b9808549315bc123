"""Hostile handlers from the grammar in tests/hostile.py, run where a crash cannot take the
test run with it (a subprocess): the fuzz (each hostile message followed by a good one) and
the long run (10,000 messages through one `runtime run --until-idle`)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from hostile import CHECK_DLQ, app_yaml, handler_source, hostile_case

LIMIT = 0.3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_hostile_handlers_never_crash_or_hang_the_host(tmp_path, seed):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hostile.py"), "fuzz", str(tmp_path), str(seed),
                           "24", str(LIMIT)], capture_output=True, text=True, timeout=110, cwd=REPO)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = rows[-1]["case"] if rows else "(none)"
    assert proc.returncode == 0, f"exit {proc.returncode} after case {last}: {proc.stderr[-3000:]}"
    assert len(rows) == 48
    for row in rows:
        assert row["elapsed"] <= LIMIT + 2, row
        assert row["bad_dead_lettered"] == 1, row  # failed like a raised error, with a reason
        assert row["good_acked"] == 1, row  # and the worker went on with the next message
    assert "Traceback" not in proc.stderr


def _rss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_long_run_with_one_hostile_message_in_ten(tmp_path):
    rng = random.Random(15)
    cases = []
    while len(cases) < 40:
        label, body = hostile_case(rng, memory=True)
        if "big_header" not in label and "big_body" not in label:  # those need host-side headers or 2MB lines
            cases.append((label, body))
    # Two attempts: on a loaded 2-core machine a good message can be descheduled past its
    # 80 ms wall-clock limit once (seen in CI); a hostile one fails every time.
    (tmp_path / "app.yaml").write_text(app_yaml({"main": "timeout: 80ms, memory_limit: 1MB"},
                                                concurrency=4, dlq_consumer=True, max_attempts=2))
    (tmp_path / "f_main.lua").write_text(handler_source([body for _, body in cases]))
    (tmp_path / "check_dlq.lua").write_text(CHECK_DLQ)
    total, hostile = 10_000, 0
    with (tmp_path / "messages.jsonl").open("w") as f:
        for i in range(total):
            if i % 10 == 9:
                hostile += 1
                f.write(json.dumps({"h": rng.randrange(1, len(cases) + 1)}) + "\n")
            else:
                f.write(json.dumps({"n": i, "text": "x" * rng.randrange(0, 200)}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "run", str(tmp_path), "--until-idle",
                             "--log-level", "error", "--publish", f"t:q_main=@{tmp_path / 'messages.jsonl'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(0.05):
            rss = _rss_kib(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=220)
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = {m.group(1): m for m in re.finditer(r"^(t:c_\w+) acked=(\d+) nacked=(\d+) dead_lettered=(\d+)",
                                                   out, re.M)}
    main = summary["t:c_main"]
    good_failures = [line for line in err.splitlines() if "GOOD MESSAGE DEAD-LETTERED" in line]
    assert (int(main.group(2)), int(main.group(4))) == (total - hostile, hostile), (out, good_failures[:5])
    assert int(summary["t:c_dlq"].group(2)) == hostile  # every dead letter reached the checker
    assert "WITHOUT A REASON" not in err
    # RSS flat after warm-up: the last quarter of the run holds no more than the second quarter
    # did, plus a small allowance (allocator noise). This found replaced Lua 5.4 states kept
    # alive (about +50% RSS over this run, growing without bound).
    assert len(samples) >= 8, samples
    rss = [r for _, r in samples]
    quarter = len(rss) // 4
    warm = max(rss[quarter:2 * quarter])
    late = max(rss[3 * quarter:])
    assert late <= warm * 1.10 + 4 * 1024, (warm, late, rss)
