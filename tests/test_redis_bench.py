"""The Redis benchmark's own measurements run end to end with tiny sizes (so they cannot rot);
Dramatiq and Celery are benchmark-only dependencies (the `bench` extra), not needed here. No
timing is asserted: benchmarks are programs, not tests."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO
from redis_support import delete_prefix, gate_shared, shared_prefix

# benchmarks/ is not part of the installed package: found in the checkout, after the
# installed `runtime` (appended, so the tests still run against the wheel).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from benchmarks import redis_bench  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", ["ours_driver_consume", "ours_app_consume", "ours_end_to_end", "ours_publish"])
def test_our_redis_measurements_run(name: str) -> None:
    gate_shared()
    prefix = shared_prefix()
    try:
        result = redis_bench.run_in_this_process(name, {"url": "redis://127.0.0.1:6379/0", "prefix": prefix,
                                                        "n": 400})
    finally:
        delete_prefix(prefix)
    assert result["seconds"] > 0 and any(k.endswith("_per_s") and v > 0 for k, v in result.items())
