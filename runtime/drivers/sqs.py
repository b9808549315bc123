"""The Amazon SQS driver (SPEC §7.5), Wippy-compatible: `queue.driver.sqs` with a `config.aws`.

One SQS queue per `queue.queue` (its `queue_name`, else the entry name; a name ending in
`.fifo` is a FIFO queue). One boto3 client per driver, made from a session of its own when
the driver opens and shared by every thread (clients are thread-safe; sessions are not).

How the pieces fit:

* Receiving: each consumer has one receiver thread that long-polls (`ReceiveMessage` with
  `WaitTimeSeconds` = the consumer's `wait_time`, whole seconds, default 20) for up to 10
  messages, or the consumer's free prefetch slots if fewer. A receive starts only when a
  fetch asks for messages, and a fetch waits for it at most its own `wait`: a receive still
  running when the fetch gives up is not wasted, its messages wait in the consumer (leased
  and renewed) for the next fetch. So an idle consumer costs one request per `wait_time`, a
  busy one takes 10 messages a request. A fetch with `wait=0` and no receive running looks
  once, at once (`WaitTimeSeconds=0`).
* A delivery is a lease (the visibility timeout: the consumer's `visibility_timeout`, else
  the queue's). The driver's background thread renews every lease a consumer holds
  (`ChangeMessageVisibilityBatch`) each third of it, so a slow handler's message is never
  handed to a second worker; a renewal SQS refuses (the lease ran out and someone else has
  the message) drops the delivery from the in-flight map (its late settle is refused).
* Acks are queued and deleted in batches of 10 (`DeleteMessageBatch`) by the background
  thread within a millisecond or two; publishes are sent in batches of 10
  (`SendMessageBatch`, also split to stay under the 256 KiB a batch may carry).
* Attempts are SQS's `ApproximateReceiveCount`, so a delivery lost to a crash counts. A
  retry is `ChangeMessageVisibility` to the retry delay (whole seconds; SQS caps it at 15
  minutes: a longer delay is clamped to 900 s and said once in the log). A release (a
  graceful stop returning prefetched messages) is a visibility of 0; SQS counts the next
  receive, so this process remembers the releases and takes them off the count: a released
  message received again by another process counts the release as an attempt.
* Dead-lettering is the runtime's (the consumer pool publishes to the dead-letter queue
  when the attempts reach `max_attempts`), not SQS's redrive policy, so the dead letter gets
  the `x_*` headers and may be on any driver.
* Message encoding. The body is the codec's bytes as SQS text when they are UTF-8 made of
  characters SQS accepts (so other SQS readers see the JSON), else base64. The runtime's own
  headers (`timestamp`, `x_*`), the message id and how the body is encoded travel together as
  JSON in one message attribute, `x_runtime` (users cannot name a header `x_...`), so user
  headers get the other 9 of SQS's 10 attributes natively (String, `Number.int`,
  `Number.float`, `String.bool`); headers beyond 9, or that SQS cannot carry as attributes
  (names it refuses, empty strings), travel packed in `x_runtime` too: none is refused.
  `sqs.delay_seconds`, `sqs.message_group_id` and `sqs.message_deduplication_id` set those SQS
  fields. A message from another SQS producer (no `x_runtime`) arrives with its SQS message
  id, its attributes as headers and its body as sent.
* FIFO queues need `sqs.message_group_id` (its absence is `Invalid`) and take no
  per-message delay. The deduplication id is the `sqs.message_deduplication_id` header, else
  (unless the queue has content-based deduplication) the runtime's message id, so a publish
  retried after a lost response is not stored twice.
* Stats come from `GetQueueAttributes` (approximate on AWS: they lag by up to a minute).
  Purge is `PurgeQueue`, which also deletes messages in flight (their acks then do nothing)
  and which AWS allows once per 60 s per queue.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from ..errors import ConfigError, DriverError, InvalidMessage
from ..queue.driver import BackgroundLoop, Capabilities, Delivery, Driver, DriverConsumer, QueueStats
from ..queue.message import HeaderValue, Message
from ..registry.drivers import env_name

log = logging.getLogger("runtime.driver.sqs")

BATCH = 10  # the most entries SQS takes in one batch call or returns from one receive
MAX_BATCH_BYTES = 262_144  # what one SendMessageBatch may carry in all
MAX_DELAY = 900  # seconds: SQS's longest message delay
MAX_VISIBILITY = 43_200  # seconds: SQS's longest visibility timeout
PACKED = "x_runtime"  # the message attribute holding the runtime's own headers
NATIVE_ATTRIBUTES = 9  # SQS allows 10 message attributes per message; one is PACKED
RENEW_TICK = 0.1  # seconds between looks at whether a consumer's leases are due for renewal
RELEASES_KEPT = 100_000  # releases remembered (to take them off the receive count)
RECEIVE_PAUSES = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds a receiver waits after failing receives
MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
LEASE_GONE = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue",
                        "AWS.SimpleQueueService.MessageNotInflight"})

TEXT, BASE64, EMPTY = 0, 1, 2  # how a body travels as an SQS message body
_NOT_SQS_TEXT = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,256}")
_SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "MessageGroupId", "MessageDeduplicationId"]
_serial = itertools.count()


# -- message encoding ---------------------------------------------------------------------------

def _attribute_name_ok(name: str) -> bool:
    lower = name.lower()
    return (_ATTRIBUTE_NAME.fullmatch(name) is not None and not lower.startswith(("aws.", "amazon."))
            and not name.startswith(".") and not name.endswith(".") and ".." not in name)


def _attribute(value: HeaderValue) -> dict[str, str] | None:
    """A header value as a typed SQS message attribute; None if SQS cannot carry it exactly."""
    if isinstance(value, bool):
        return {"DataType": "String.bool", "StringValue": "true" if value else "false"}
    if isinstance(value, int):
        return {"DataType": "Number.int", "StringValue": str(value)}
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "n" in text or len(text.replace("-", "").replace(".", "")) > 38:
            return None
        return {"DataType": "Number.float", "StringValue": text}
    if isinstance(value, str) and value and not _NOT_SQS_TEXT.search(value):
        return {"DataType": "String", "StringValue": value}
    return None


def _from_attribute(a: dict[str, Any]) -> HeaderValue:
    kind = str(a.get("DataType") or "String")
    if kind.startswith("Binary"):
        return base64.b64encode(bytes(a.get("BinaryValue") or b"")).decode()
    text = str(a.get("StringValue") or "")
    if kind == "String.bool":
        return text == "true"
    if kind.startswith("Number"):
        try:
            if kind == "Number.int" or (kind != "Number.float" and re.fullmatch(r"-?\d+", text)):
                return int(text)
            return float(text)
        except ValueError:
            return text
    return text


def encode(m: Message, fifo: bool, content_dedup: bool, delay: float) -> dict[str, Any]:
    """One SendMessageBatch entry (without its Id) for a message."""
    if not isinstance(m.body, bytes | bytearray | memoryview) or not isinstance(m.id, str):
        raise InvalidMessage(f"a message needs a bytes body and a text id, got {type(m.body).__name__} "
                             f"and {type(m.id).__name__}")
    body = bytes(m.body)
    how = TEXT
    if not body:
        text, how = "-", EMPTY
    else:
        try:
            text = body.decode("utf-8")
            if _NOT_SQS_TEXT.search(text):
                raise ValueError
        except ValueError:
            text, how = base64.b64encode(body).decode(), BASE64
    native: dict[str, dict[str, str]] = {}
    packed: dict[str, HeaderValue] = {}
    entry: dict[str, Any] = {}
    delay_seconds = math.ceil(delay) if delay > 0 else 0
    for key, value in m.headers.items():
        if key == "sqs.delay_seconds":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_DELAY:
                raise InvalidMessage(f"header sqs.delay_seconds must be 0..{MAX_DELAY} seconds, not {value!r}")
            delay_seconds = max(delay_seconds, math.ceil(value))
            continue
        if key in ("sqs.message_group_id", "sqs.message_deduplication_id"):
            packed[key] = value  # travels with the message; sets the SQS field on FIFO queues
            if fifo:
                entry["MessageGroupId" if key == "sqs.message_group_id" else "MessageDeduplicationId"] = str(value)
            continue
        attribute = None
        if key != "timestamp" and key[:2].lower() != "x_" and len(native) < NATIVE_ATTRIBUTES \
                and _attribute_name_ok(key):
            attribute = _attribute(value)
        if attribute is None:
            packed[key] = value
        else:
            native[key] = attribute
    if delay_seconds > MAX_DELAY:
        raise InvalidMessage(f"SQS delays a message by at most {MAX_DELAY}s (15 minutes), not {delay_seconds}s")
    if fifo:
        if "MessageGroupId" not in entry:
            raise InvalidMessage("a message for an SQS FIFO queue needs the header sqs.message_group_id")
        if delay_seconds:
            raise InvalidMessage("SQS FIFO queues take no per-message delay (set it on the queue instead)")
        if "MessageDeduplicationId" not in entry and not content_dedup:
            entry["MessageDeduplicationId"] = m.id
    elif delay_seconds:
        entry["DelaySeconds"] = delay_seconds
    meta: dict[str, Any] = {"i": m.id}
    if how != TEXT:
        meta["e"] = how
    if packed:
        meta["h"] = packed
    native[PACKED] = {"DataType": "String", "StringValue": json.dumps(meta, separators=(",", ":"))}
    entry["MessageBody"] = text
    entry["MessageAttributes"] = native
    return entry


def entry_size(entry: dict[str, Any]) -> int:
    """An entry's size as SQS counts it toward its limits (body plus attribute names, types and values)."""
    n = len(entry["MessageBody"].encode())
    for name, a in entry["MessageAttributes"].items():
        n += len(name.encode()) + len(a["DataType"]) + len(a["StringValue"].encode())
    return n


def decode(m: dict[str, Any]) -> Message:
    """A received SQS message as a runtime message. ValueError if its x_runtime is unreadable."""
    attributes = dict(m.get("MessageAttributes") or {})
    meta_attr = attributes.pop(PACKED, None)
    headers: dict[str, HeaderValue] = {}
    if meta_attr is not None:
        meta = json.loads(meta_attr.get("StringValue") or "")
        if not isinstance(meta, dict) or not isinstance(meta.get("i"), str):
            raise ValueError(f"attribute {PACKED} holds no message id")
        message_id = meta["i"]
        how = meta.get("e", TEXT)
        headers.update(meta.get("h") or {})
    else:  # from another SQS producer
        message_id = str(m.get("MessageId") or "")
        how = TEXT
        system = m.get("Attributes") or {}
        if system.get("MessageGroupId"):
            headers["sqs.message_group_id"] = system["MessageGroupId"]
        if system.get("MessageDeduplicationId"):
            headers["sqs.message_deduplication_id"] = system["MessageDeduplicationId"]
    for name, a in attributes.items():
        headers[name] = _from_attribute(a)
    text = str(m.get("Body") or "")
    if how == EMPTY:
        body = b""
    elif how == BASE64:
        body = base64.b64decode(text, validate=True)
    else:
        body = text.encode()
    return Message(body, headers, message_id)


# -- the driver ---------------------------------------------------------------------------------

def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "")
    return ""


def _sender_fault(exc: botocore.exceptions.ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) == 400


class SqsDriver(Driver):
    kind = "queue.driver.sqs"
    capabilities = Capabilities(native_attempts=True, native_delay=True, lease=True, shared=True, max_batch=BATCH)
    connection_errors = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, ConnectionError)

    def __init__(self, entry_id: str, options: dict[str, Any] | None = None, **kw: Any):
        super().__init__(entry_id, options, **kw)
        o = self.options
        aws = o.get("config")
        if not isinstance(aws, dict):
            raise ConfigError(f"driver {entry_id}: 'config' must name a config.aws entry")
        self.config_id = str(aws.get("id") or "")
        self.region = self._setting(aws, "region")
        self._access_key = self._setting(aws, "access_key_id")
        self._secret_key = self._setting(aws, "secret_access_key")
        self._token = self._setting(aws, "session_token")
        if not self.region:
            raise ConfigError(f"driver {entry_id}: config.aws {self.config_id} gives no region")
        self.endpoint = str(o.get("endpoint") or "") or None
        self.retention = int(o.get("message_retention_period") or 0)
        if 0 < self.retention < 60:
            raise ConfigError(f"driver {entry_id}: message_retention_period must be 60..1209600 seconds "
                              f"(or 0 for the AWS default), not {self.retention}")
        self.default_delay = int(o.get("default_delay_seconds") or 0)
        self._client: Any = None
        self._urls: dict[str, str] = {}
        self._fifo: dict[str, bool] = {}
        self._content_dedup: dict[str, bool] = {}
        self._visibility: dict[str, int] = {}
        self._acks: deque[tuple[str, str, str]] = deque()  # (queue url, receipt handle, SQS message id)
        self._flush_lock = threading.Lock()
        self._consumers: set[SqsConsumer] = set()
        self._lock = threading.Lock()
        self._released: OrderedDict[str, int] = OrderedDict()  # SQS message id -> releases not to count
        self._clamp_warned = False
        self._bg = BackgroundLoop()
        self._bg_stop, self._bg_wake = self._bg.stop, self._bg.wake

    def _setting(self, aws: dict[str, Any], key: str) -> str:
        """A config.aws value: Wippy's `<key>_env` variable when it is set and not empty, else
        the value itself (which may have come from `${env:...}`)."""
        name = aws.get(f"{key}_env")
        if name:
            value = os.environ.get(env_name(str(name)))
            if value:
                return value
        return str(aws.get(key) or "")

    def describe_error(self, exc: BaseException) -> str:
        return self.mask(f"{type(exc).__name__}: {exc}")

    def mask(self, text: str) -> str:
        for secret in (self._secret_key, self._token):
            if secret:
                text = text.replace(secret, "***")
        return text

    # -- open / close -------------------------------------------------------------------------
    def _open(self) -> None:
        static = self._access_key and self._secret_key  # else boto3's default chain (env, profile, role)
        session = boto3.session.Session(
            aws_access_key_id=self._access_key if static else None,
            aws_secret_access_key=self._secret_key if static else None,
            aws_session_token=(self._token or None) if static else None,
            region_name=self.region)
        config = botocore.config.Config(
            max_pool_connections=64, connect_timeout=5, read_timeout=40,  # above the longest poll, 20s
            retries={"mode": "standard", "max_attempts": 3},
            use_fips_endpoint=bool(self.options.get("use_fips")),
            use_dualstack_endpoint=bool(self.options.get("use_dual_stack")),
            user_agent_extra="lua-queue-runtime")
        # disable_message_checksum_validation is accepted for Wippy's configs: botocore does not
        # check SQS message checksums, so there is nothing to turn off.
        self._client = session.client("sqs", endpoint_url=self.endpoint, config=config)
        log.info("driver %s: SQS in %s%s", self.entry_id, self.region,
                 f" at {self.endpoint}" if self.endpoint else "")
        self._bg.start(self._background, f"sqs-driver {self.entry_id}")

    def _close(self) -> None:
        self._bg.join()
        if self._client is not None and self._acks and self.state == "closed":
            try:
                self._flush_acks()
            except Exception as exc:  # noqa: BLE001 - those messages come back after their visibility timeout
                log.warning("driver %s: could not delete %d acked message(s) before closing (%s); they will be "
                            "delivered again", self.entry_id, len(self._acks), self.describe_error(exc))
        # Not client.close(): a receiver still in a long poll finishes with the client it holds,
        # and returns what it got.
        self._client = None

    def _ok(self) -> None:
        """A request went through: after a lost connection, the endpoint is back (HTTP keeps no
        connection to reopen, so whichever request works first says so, unless a reconnect by
        a consumer is under way and says it itself)."""
        if self.state == "reconnecting" and self._reconnect_lock.acquire(blocking=False):
            try:
                if self.state == "reconnecting":
                    self.state = "open"
                    self.reconnects += 1
                    log.info("driver %s: connection is back", self.entry_id)
            finally:
                self._reconnect_lock.release()

    def _sqs(self) -> Any:
        client = self._client
        if client is None:
            raise ConnectionError(f"driver {self.entry_id} is not open")
        return client

    def _url(self, queue: str) -> str:
        url = self._urls.get(queue)
        if url is None:
            raise DriverError(f"driver {self.entry_id}: queue '{queue}' is not declared")
        return url

    # -- queues -------------------------------------------------------------------------------
    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        if self._client is None:
            return  # recorded by the base; open() declares every queue again
        client = self._sqs()
        fifo = queue.endswith(".fifo")
        wanted: dict[str, str] = {}
        if self.retention:
            wanted["MessageRetentionPeriod"] = str(self.retention)
        if self.default_delay:
            wanted["DelaySeconds"] = str(self.default_delay)
        visibility = options.get("default_visibility_timeout")
        if visibility is not None:
            wanted["VisibilityTimeout"] = str(math.ceil(float(visibility)))
        if fifo:
            wanted["FifoQueue"] = "true"
        try:
            try:
                url = client.get_queue_url(QueueName=queue)["QueueUrl"]
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) not in MISSING_QUEUE:
                    raise
                try:
                    url = client.create_queue(QueueName=queue, Attributes=wanted)["QueueUrl"]
                except botocore.exceptions.ClientError as exc2:
                    if _error_code(exc2) not in ("QueueAlreadyExists", "QueueNameExists"):
                        raise
                    url = client.get_queue_url(QueueName=queue)["QueueUrl"]  # made by another process meanwhile
            current = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]).get("Attributes", {})
        except botocore.exceptions.ClientError as exc:
            raise DriverError(f"driver {self.entry_id}: cannot declare queue '{queue}': "
                              f"{self.describe_error(exc)}") from None
        clashes = [f"{k} is {current.get(k, 'unset')}, not {v}" for k, v in wanted.items()
                   if str(current.get(k, "false" if k == "FifoQueue" else "")).lower() != v.lower()]
        if clashes:
            raise DriverError(f"driver {self.entry_id}: queue '{queue}' exists with other settings: "
                              + "; ".join(clashes))
        self._urls[queue] = url
        self._fifo[queue] = fifo
        self._content_dedup[queue] = str(current.get("ContentBasedDeduplication", "")).lower() == "true"
        self._visibility[queue] = max(1, int(current.get("VisibilityTimeout") or 30))

    def delete_queue(self, queue: str) -> None:
        """Delete the queue on the server (tests on a shared endpoint)."""
        url = self._urls.pop(queue, None)
        if url is not None:
            self._sqs().delete_queue(QueueUrl=url)

    # -- publishing ---------------------------------------------------------------------------
    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        url = self._url(queue)
        fifo, dedup = self._fifo[queue], self._content_dedup[queue]
        chunk: list[dict[str, Any]] = []
        size = 0
        for m in messages:
            entry = encode(m, fifo, dedup, delay)
            n = entry_size(entry)
            if chunk and (len(chunk) == BATCH or size + n > MAX_BATCH_BYTES):
                self._send(queue, url, chunk)
                chunk, size = [], 0
            entry["Id"] = str(len(chunk))
            chunk.append(entry)
            size += n
        if chunk:
            self._send(queue, url, chunk)

    def _send(self, queue: str, url: str, entries: list[dict[str, Any]]) -> None:
        client = self._sqs()
        for attempt in range(3):
            try:
                response = client.send_message_batch(QueueUrl=url, Entries=entries)
            except botocore.exceptions.ClientError as exc:
                if _sender_fault(exc):
                    raise InvalidMessage(f"SQS refused a message for queue '{queue}': "
                                         f"{self.describe_error(exc)}") from None
                raise DriverError(f"driver {self.entry_id}: cannot publish to '{queue}': "
                                  f"{self.describe_error(exc)}") from None
            self._ok()
            failed = response.get("Failed") or []
            if not failed:
                return
            refused = [f for f in failed if f.get("SenderFault")]
            if refused:
                f = refused[0]
                raise InvalidMessage(f"SQS refused a message for queue '{queue}': {f.get('Code')}: "
                                     f"{f.get('Message')}")
            by_id = {e["Id"]: e for e in entries}
            entries = [by_id[f["Id"]] for f in failed if f.get("Id") in by_id]
            if attempt < 2:
                time.sleep(0.05 * (attempt + 1))  # a server-side failure of some entries: send those again
        raise DriverError(f"driver {self.entry_id}: SQS failed {len(entries)} message(s) for '{queue}' "
                          f"three times: {failed[0].get('Code')}: {failed[0].get('Message')}")

    # -- stats and purge ----------------------------------------------------------------------
    def _stats(self, queue: str) -> QueueStats:
        self._flush_acks()
        a = self._sqs().get_queue_attributes(
            QueueUrl=self._url(queue), AttributeNames=["ApproximateNumberOfMessages",
                                                       "ApproximateNumberOfMessagesNotVisible",
                                                       "ApproximateNumberOfMessagesDelayed"]).get("Attributes", {})
        return QueueStats(int(a.get("ApproximateNumberOfMessages", 0)),
                          int(a.get("ApproximateNumberOfMessagesNotVisible", 0)),
                          int(a.get("ApproximateNumberOfMessagesDelayed", 0)), exact=False)

    def _purge(self, queue: str) -> int:
        st = self._stats(queue)
        waiting = (st.ready or 0) + (st.delayed or 0)
        if not waiting:
            return 0  # nothing to delete: no PurgeQueue, which AWS allows once a minute
        try:
            self._sqs().purge_queue(QueueUrl=self._url(queue))
        except botocore.exceptions.ClientError as exc:
            if "PurgeQueueInProgress" in _error_code(exc):
                raise DriverError(f"driver {self.entry_id}: queue '{queue}' was purged less than 60s ago; SQS "
                                  "allows one purge per 60 seconds") from None
            raise DriverError(f"driver {self.entry_id}: cannot purge '{queue}': {self.describe_error(exc)}") from None
        return waiting

    # -- consumers ----------------------------------------------------------------------------
    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> SqsConsumer:
        consumer = SqsConsumer(self, queue, consumer_id, prefetch, options)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def _attempt(self, m: dict[str, Any]) -> int:
        count = int((m.get("Attributes") or {}).get("ApproximateReceiveCount") or 1)
        released = self._released.get(str(m.get("MessageId")), 0)
        return max(1, count - released)

    def _uncount(self, message_id: str) -> None:
        with self._lock:
            self._released[message_id] = self._released.pop(message_id, 0) + 1
            while len(self._released) > RELEASES_KEPT:
                self._released.popitem(last=False)

    def clamp_delay(self, delay: float) -> int:
        seconds = math.ceil(delay) if delay > 0 else 0
        if seconds > MAX_DELAY:
            if not self._clamp_warned:
                self._clamp_warned = True
                log.warning("driver %s: a retry delay of %ds is longer than SQS allows; delays are clamped to "
                            "%ds (15 minutes); said once", self.entry_id, seconds, MAX_DELAY)
            seconds = MAX_DELAY
        return seconds

    # -- acks and the background thread ---------------------------------------------------------
    def _queue_ack(self, url: str, receipt: str, message_id: str) -> None:
        self._acks.append((url, receipt, message_id))
        if not self._bg_wake.is_set():
            self._bg_wake.set()

    def _flush_acks(self) -> None:
        if not self._acks:
            return
        with self._flush_lock:
            taken: list[tuple[str, str, str]] = []
            try:
                while True:
                    taken.append(self._acks.popleft())
            except IndexError:
                pass
            by_url: dict[str, list[tuple[str, str, str]]] = {}
            for t in taken:
                by_url.setdefault(t[0], []).append(t)
            chunks = [(url, items[i:i + BATCH]) for url, items in by_url.items() for i in range(0, len(items), BATCH)]
            for n, (url, chunk) in enumerate(chunks):
                try:
                    response = self._sqs().delete_message_batch(
                        QueueUrl=url, Entries=[{"Id": str(j), "ReceiptHandle": t[1]} for j, t in enumerate(chunk)])
                except BaseException:
                    left = [t for _, c in chunks[n:] for t in c]
                    self._acks.extendleft(reversed(left))  # kept, in their order, for the next try
                    raise
                self._ok()
                for f in response.get("Failed") or []:
                    log.warning("driver %s: SQS did not delete an acked message (%s: %s); it may be delivered "
                                "again", self.entry_id, f.get("Code"), f.get("Message"))
                with self._lock:
                    for t in chunk:
                        self._released.pop(t[2], None)

    def _background(self) -> None:
        """Deletes acked messages soon after the acks come; renews the consumers' leases."""

        def consumers() -> list[DriverConsumer]:
            with self._lock:
                return list(self._consumers)

        self.settle_and_renew(self._bg_stop, self._bg_wake, flush=self._flush_acks, pending=lambda: len(self._acks),
                              consumers=consumers, renew=lambda c, live: c._renew(live),  # type: ignore[attr-defined]
                              renew_every=RENEW_TICK, what="acks")


class SqsConsumer(DriverConsumer):
    driver: SqsDriver

    def __init__(self, driver: SqsDriver, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]):
        super().__init__(driver, queue, consumer_id, prefetch, options)
        self.url = driver._url(queue)
        given = options.get("visibility_timeout")
        self.own_visibility = bool(given)  # else the queue's, as SQS applies it
        self.visibility = min(MAX_VISIBILITY, math.ceil(float(given))) if given else driver._visibility.get(queue, 30)
        self.visibility = max(1, self.visibility)
        wait = options.get("wait_time")
        self.wait_time = 20 if wait is None else max(0, min(20, math.ceil(float(wait))))
        self._cond = threading.Condition()
        self._buffer: deque[Delivery] = deque()  # received, not yet fetched (leased all the same)
        self._want = 0  # how many messages a waiting fetch asks for
        self._receiving = False
        self._error: BaseException | None = None
        self._next_renewal = time.monotonic() + self.visibility / 3
        self._thread = threading.Thread(target=self._receiver, name=f"sqs-receiver {consumer_id}", daemon=True)
        self._thread.start()

    # -- receiving ----------------------------------------------------------------------------
    def _free(self, want: int) -> int:
        return min(BATCH, want, self.prefetch - len(self._in_flight) - len(self._buffer))

    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                if self._buffer:
                    return [self._buffer.popleft() for _ in range(min(max_count, len(self._buffer)))]
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self.closed:
                    return []
                if wait <= 0 and not self._receiving:
                    break
                if self._want < max_count:
                    self._want = max_count
                    self._cond.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
        return self._receive(min(BATCH, max_count), 0)  # wait=0: one look, at once (as the caller asks)

    def _receive(self, n: int, wait_seconds: int, client: Any = None) -> list[Delivery]:
        d = self.driver
        kwargs: dict[str, Any] = {"QueueUrl": self.url, "MaxNumberOfMessages": n, "WaitTimeSeconds": wait_seconds,
                                  "MessageAttributeNames": ["All"], "MessageSystemAttributeNames": _SYSTEM_ATTRIBUTES}
        if self.own_visibility:
            kwargs["VisibilityTimeout"] = self.visibility
        response = (client or d._sqs()).receive_message(**kwargs)
        d._ok()
        out = []
        for m in response.get("Messages") or []:
            try:
                message = decode(m)
            except (ValueError, TypeError) as exc:  # delivered as it is: the codec's failure dead-letters it
                log.warning("consumer %s: message %s of %s has an unreadable %s attribute (%s)", self.consumer_id,
                            m.get("MessageId"), self.queue, PACKED, exc)
                message = Message(str(m.get("Body") or "").encode(), {}, str(m.get("MessageId") or ""))
            out.append(Delivery(self.queue, message, d._attempt(m),
                                (str(m["ReceiptHandle"]), str(m.get("MessageId")), next(_serial))))
        return out

    def _receiver(self) -> None:
        """Long-polls whenever a fetch asks for messages and there are free prefetch slots."""
        failures = 0
        while True:
            with self._cond:
                while not self.closed and (self._want <= 0 or self._free(self._want) <= 0):
                    self._cond.wait()
                if self.closed:
                    return
                n = self._free(self._want)
                self._want = 0
                self._receiving = True
            client = self.driver._client
            got: list[Delivery] = []
            error: BaseException | None = None
            if client is None:  # the driver is reconnecting (or closing): look again shortly
                with self._cond:
                    self._receiving = False
                    self._want = max(self._want, n)
                    self._cond.wait(RECEIVE_PAUSES[0])
                continue
            try:
                got = self._receive(n, self.wait_time, client)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - handed to the next fetch, which reports it
                error = exc
                failures += 1
            with self._cond:
                self._receiving = False
                closed = self.closed
                if not closed:
                    self._buffer.extend(got)
                    if error is not None:
                        self._error = error
                self._cond.notify_all()
            if closed:
                if got:
                    self._return(got, client)
                return
            if error is not None:
                if _error_code(error) in MISSING_QUEUE:
                    self._redeclare(error)
                with self._cond:
                    self._cond.wait(RECEIVE_PAUSES[min(failures, len(RECEIVE_PAUSES)) - 1])

    def _redeclare(self, error: BaseException) -> None:
        d = self.driver
        log.warning("consumer %s: queue %s is gone on the server (%s); declaring it again", self.consumer_id,
                    self.queue, d.describe_error(error))
        try:
            d._declare(self.queue, d.queues.get(self.queue, {}))
            self.url = d._url(self.queue)
        except Exception as exc:  # noqa: BLE001 - tried again at the next failing receive
            log.warning("consumer %s: cannot declare %s again: %s", self.consumer_id, self.queue,
                        d.describe_error(exc))

    def _return(self, deliveries: list[Delivery], client: Any = None) -> None:
        """Give back deliveries nobody will handle (received after the consumer closed)."""
        try:
            self._change_visibility(deliveries, 0, client)
            for dl in deliveries:
                self.driver._uncount(dl.token[1])
        except Exception as exc:  # noqa: BLE001 - they come back after their visibility timeout
            log.debug("consumer %s: could not return %d message(s): %s", self.consumer_id, len(deliveries),
                      self.driver.describe_error(exc))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- settling -----------------------------------------------------------------------------
    def _ack(self, d: Delivery) -> None:
        self.driver._queue_ack(self.url, d.token[0], d.token[1])
        self._wake()

    def _ack_many(self, deliveries: list[Delivery]) -> None:
        """Several acks (DriverConsumer.ack_many): queued together, one wake-up."""
        for d in deliveries:
            self.driver._acks.append((self.url, d.token[0], d.token[1]))
        self.driver._bg_wake.set()
        self._wake()

    def _retry(self, d: Delivery, delay: float) -> None:
        try:
            self.driver._sqs().change_message_visibility(QueueUrl=self.url, ReceiptHandle=d.token[0],
                                                         VisibilityTimeout=self.driver.clamp_delay(delay))
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) not in LEASE_GONE:
                raise DriverError(f"driver {self.driver.entry_id}: cannot retry message {d.message.id}: "
                                  f"{self.driver.describe_error(exc)}") from None
            log.warning("consumer %s: message %s of %s was no longer held when it was retried (%s); SQS delivers "
                        "it again", self.consumer_id, d.message.id, self.queue, _error_code(exc))
        self._wake()

    def _release(self, deliveries: list[Delivery]) -> None:
        self._change_visibility(deliveries, 0)
        for d in deliveries:
            self.driver._uncount(d.token[1])
        self._wake()

    def _extend(self, deliveries: list[Delivery], seconds: float) -> None:
        gone = self._change_visibility(deliveries, min(MAX_VISIBILITY, max(1, math.ceil(seconds))))
        if gone:
            with self._cond:
                for dl in gone:
                    try:
                        self._buffer.remove(dl)
                    except ValueError:
                        pass
            self.lost(gone, "its visibility timeout ran out before it was renewed")

    def _renew(self, live: list[Delivery]) -> None:
        """Called by the driver's background thread every RENEW_TICK: renews this consumer's
        leases (in flight and not yet fetched) once a third of the visibility timeout has passed."""
        now = time.monotonic()
        if now < self._next_renewal:
            return
        self._next_renewal = now + self.visibility / 3
        with self._cond:
            held = live + list(self._buffer)
        if held:
            self._extend(held, self.visibility)

    def _change_visibility(self, deliveries: list[Delivery], seconds: int, client: Any = None) -> list[Delivery]:
        """ChangeMessageVisibilityBatch; the deliveries whose lease SQS says is gone."""
        client = client or self.driver._sqs()
        gone: list[Delivery] = []
        for i in range(0, len(deliveries), BATCH):
            chunk = deliveries[i:i + BATCH]
            response = client.change_message_visibility_batch(
                QueueUrl=self.url, Entries=[{"Id": str(j), "ReceiptHandle": d.token[0], "VisibilityTimeout": seconds}
                                            for j, d in enumerate(chunk)])
            for f in response.get("Failed") or []:
                j = int(f.get("Id", -1))
                if 0 <= j < len(chunk) and str(f.get("Code")) in LEASE_GONE:
                    gone.append(chunk[j])
                else:
                    log.warning("consumer %s: SQS refused a visibility change (%s: %s)", self.consumer_id,
                                f.get("Code"), f.get("Message"))
        return gone

    def _close(self) -> None:
        with self._cond:
            left = list(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        with self.driver._lock:
            self.driver._consumers.discard(self)
        if left and self.driver._client is not None:
            self._return(left)
