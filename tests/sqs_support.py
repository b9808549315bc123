"""A local SQS endpoint for the tests: moto's server, started in this process on a free
loopback port the first time a test needs it and shared by the whole session.

Without boto3 or moto (a laptop without the test extra) the SQS tests skip with the reason;
under CI=true they fail instead, since `[test]` ships both (DESIGN convention 6)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "AKIATESTRUNTIME0001"
SECRET_KEY = "runtime-test-secret-key-do-not-log"  # the tests look for it in logs and output

_lock = threading.Lock()
_endpoint: str | None = None


def missing() -> str | None:
    """Why the SQS tests cannot run here, or None."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"sqs: {exc.name} is not installed (pip install -e '.[test]')"
    return None


def sqs_gate() -> None:
    import pytest  # here: benchmarks/sqs_bench.py imports this module without pytest

    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI=true: SQS tests must run)")
    pytest.skip(reason)


_receiving = threading.Lock()


def _serialize_moto_receives() -> None:
    """moto's ReceiveMessage checks that a message is visible and then marks it received
    without a lock, so two receives running at once in its threaded server now and then both
    hand out one message (seen in the contract's load test). Real SQS does not do that for a
    message it has just made invisible. One receive at a time, then; a long poll lets go of
    the lock while it waits for messages."""
    from moto.sqs import models

    if getattr(models.SQSBackend.receive_message, "serialized", False):
        return
    receive, wait = models.SQSBackend.receive_message, models.Queue.wait_for_messages

    def receive_message(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _receiving:
            return receive(self, *args, **kwargs)

    def wait_for_messages(self: Any, timeout: int) -> None:
        _receiving.release()
        try:
            wait(self, timeout)
        finally:
            _receiving.acquire()

    receive_message.serialized = True  # type: ignore[attr-defined]
    models.SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    models.Queue.wait_for_messages = wait_for_messages  # type: ignore[method-assign]


def endpoint() -> str:
    """The URL of the session's moto server (started on first use, stopped at exit)."""
    global _endpoint
    sqs_gate()
    with _lock:
        if _endpoint is None:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
            _serialize_moto_receives()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            _endpoint = f"http://{host}:{port}"
            atexit.register(server.stop)
    return _endpoint


def driver_options(**extra: Any) -> dict[str, Any]:
    """Options of a queue.driver.sqs entry on the local endpoint, as the registry makes them."""
    return {"config": {"id": "test:aws", "region": REGION, "access_key_id": ACCESS_KEY,
                       "secret_access_key": SECRET_KEY}, "endpoint": endpoint(), **extra}


def aws_yaml(name: str = "aws") -> str:
    """A config.aws entry (YAML list item) with the test credentials from the environment."""
    return f"""
  - name: {name}
    kind: config.aws
    region: {REGION}
    access_key_id: ${{env:SQS_TEST_ACCESS_KEY}}
    secret_access_key: ${{env:SQS_TEST_SECRET_KEY}}
"""


def env() -> dict[str, str]:
    """Environment variables the YAML of these tests names."""
    return {"SQS_TEST_ACCESS_KEY": ACCESS_KEY, "SQS_TEST_SECRET_KEY": SECRET_KEY, "SQS_ENDPOINT": endpoint()}
