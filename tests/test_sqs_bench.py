"""The SQS benchmark's measurements run end to end with tiny sizes on the session's local
endpoint (so they cannot rot). No timing is asserted: benchmarks are programs, not tests."""

from __future__ import annotations

import sys
import uuid

import pytest
import sqs_support
from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from benchmarks import sqs_bench  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", sqs_bench.MEASURES)
def test_our_sqs_measurements_run(name: str) -> None:
    result = sqs_bench.run_in_this_process(name, {"endpoint": sqs_support.endpoint(),
                                                  "queue": f"bench{uuid.uuid4().hex[:10]}", "n": 80})
    assert result["seconds"] > 0 and any(k.endswith("_per_s") and v > 0 for k, v in result.items())


def test_the_benchmark_starts_its_own_moto_server() -> None:
    sqs_support.sqs_gate()
    server, endpoint = sqs_bench.start_moto()
    try:
        assert endpoint.startswith("http://127.0.0.1:")
        result = sqs_bench.run_in_this_process("publish_batched", {"endpoint": endpoint, "queue": "benchself", "n": 40})
        assert result["publish_per_s"] > 0
    finally:
        sqs_bench.stop_moto(server)
