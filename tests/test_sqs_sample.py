"""samples/sqs end to end on the local SQS endpoint (moto's server, in this process): the
Wippy-doc entries load and run unchanged (only `endpoint` comes from SQS_ENDPOINT), the tasks
file goes to the end, and the failing tasks land in the dead-letter queue after 3 attempts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqs_support

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "sqs"
TASKS = [json.loads(line) for line in (SAMPLE / "tasks.jsonl").read_text().splitlines()]
FAILING = {t["id"] for t in TASKS if t.get("fail")}


def sample_env(suffix: str) -> dict[str, str]:
    return dict(os.environ, SQS_ENDPOINT=sqs_support.endpoint(), QUEUE_SUFFIX=suffix,
                AWS_ACCESS_KEY_ID=sqs_support.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=sqs_support.SECRET_KEY)


def test_check_accepts_the_wippy_doc_entries_and_shows_no_secret() -> None:
    out = subprocess.run([sys.executable, "-m", "runtime", "check", str(SAMPLE)], env=sample_env("-check"),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sqs_support.SECRET_KEY not in out.stdout + out.stderr


def test_the_sample_runs_to_the_end_with_its_dead_letters() -> None:
    suffix = f"-{uuid.uuid4().hex[:8]}"
    p = subprocess.run([sys.executable, "-m", "runtime", "run", str(SAMPLE), "--until-idle", "--log-level", "info",
                        "--publish", f"app:tasks=@{SAMPLE / 'tasks.jsonl'}"], env=sample_env(suffix),
                       capture_output=True, text=True, timeout=80, cwd=REPO)
    assert p.returncode == 0, p.stderr
    n, bad = len(TASKS), len(FAILING)
    assert f"app:task_consumer acked={n - bad} nacked={2 * bad} dead_lettered={bad} processed={n + 2 * bad}" \
        in p.stdout, p.stdout + p.stderr
    assert sqs_support.SECRET_KEY not in p.stdout + p.stderr
    import boto3

    sqs = boto3.client("sqs", endpoint_url=sqs_support.endpoint(), region_name=sqs_support.REGION,
                       aws_access_key_id=sqs_support.ACCESS_KEY, aws_secret_access_key=sqs_support.SECRET_KEY)
    try:
        dlq = sqs.get_queue_url(QueueName=f"app_tasks_dlq{suffix}")["QueueUrl"]
        got = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"],
                              VisibilityTimeout=0)["Messages"]
        assert {json.loads(m["Body"])["id"] for m in got} == FAILING
        for m in got:
            packed = json.loads(m["MessageAttributes"]["x_runtime"]["StringValue"])["h"]
            assert packed["x_attempts"] == 3 and packed["x_original_queue"] == "app:tasks"
            assert packed["x_dead_letter_reason"] == "handler returned false"
        dlq_list = subprocess.run([sys.executable, "-m", "runtime", "dlq", "list", str(SAMPLE), "app:tasks_dlq",
                                   "--json"], env=sample_env(suffix), capture_output=True, text=True, timeout=60,
                                  cwd=REPO)
        assert dlq_list.returncode == 0, dlq_list.stderr
        assert sorted(d["attempts"] for d in json.loads(dlq_list.stdout)) == [3] * bad, dlq_list.stdout
        inspect = subprocess.run([sys.executable, "-m", "runtime", "inspect", str(SAMPLE)], env=sample_env(suffix),
                                 capture_output=True, text=True, timeout=60, cwd=REPO)
        assert inspect.returncode == 0 and "app:tasks" in inspect.stdout, inspect.stderr
        assert sqs_support.SECRET_KEY not in dlq_list.stdout + dlq_list.stderr + inspect.stdout + inspect.stderr
        tasks = sqs.get_queue_url(QueueName=f"app_tasks{suffix}")["QueueUrl"]
        left = sqs.get_queue_attributes(QueueUrl=tasks, AttributeNames=["All"])["Attributes"]
        assert left["ApproximateNumberOfMessages"] == left["ApproximateNumberOfMessagesNotVisible"] == "0"
    finally:
        for name in (f"app_tasks{suffix}", f"app_tasks_dlq{suffix}"):
            sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
