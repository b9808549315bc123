"""The SQLite driver's database: schema, its version, the SQL it runs and which engine errors
mean "the database cannot be used now" (see `sqlite.py` for the driver itself).

One table holds every message of every queue. A row is in one of three states:

* ready (0): waiting for a consumer, delivered in `seq` order (a released row goes back to
  the head: it gets a `seq` below all others);
* taken (1): claimed by a consumer until `lease_until` (renewed while its handler runs; an
  expired lease means the claimer is gone: the row becomes ready again, attempt kept);
* delayed (2): a delayed publish or a retry, invisible until `visible_at`; when due it is
  moved to the tail (a new `seq`), as a retry goes to the tail of its queue.

The main index leads with (queue, state, seq): a claim reads the head of the ready rows of
one queue and never scans the backlog. Due delayed rows and expired leases are found through
two small partial indexes. Times are wall-clock seconds (`time.time()`), shared by every
process on the host.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1
READY, TAKEN, DELAYED = 0, 1, 2

# Schema version 1. Later versions add a step to MIGRATIONS (from version n to n+1).
SCHEMA_V1 = (
    """CREATE TABLE IF NOT EXISTS rq_queues (
        name TEXT PRIMARY KEY,
        max_length INTEGER NOT NULL DEFAULT 0,
        declared_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rq_messages (
        seq INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        state INTEGER NOT NULL,
        visible_at REAL,
        lease_until REAL,
        claim INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        id TEXT NOT NULL,
        headers BLOB,
        body BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS rq_messages_queue ON rq_messages (queue, state, seq)",
    "CREATE INDEX IF NOT EXISTS rq_messages_due ON rq_messages (queue, visible_at) WHERE state = 2",
    "CREATE INDEX IF NOT EXISTS rq_messages_lease ON rq_messages (queue, lease_until) WHERE state = 1",
)
MIGRATIONS: dict[int, tuple[str, ...]] = {0: SCHEMA_V1}

CREATE_META = "CREATE TABLE IF NOT EXISTS rq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
GET_VERSION = "SELECT value FROM rq_meta WHERE key = 'schema_version'"
SET_VERSION = ("INSERT INTO rq_meta (key, value) VALUES ('schema_version', ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

DECLARE = ("INSERT INTO rq_queues (name, max_length, declared_at) VALUES (?, ?, ?) "
           "ON CONFLICT (name) DO UPDATE SET max_length = excluded.max_length")
INSERT = ("INSERT INTO rq_messages (queue, state, visible_at, id, headers, body) "
          "VALUES (?, ?, ?, ?, ?, ?)")
# What a fetch needs to know before it takes the write lock: any ready row, the next due
# delayed row, the oldest lease (all index probes).
PEEK = """SELECT
    EXISTS (SELECT 1 FROM rq_messages WHERE queue = ?1 AND state = 0),
    (SELECT min(visible_at) FROM rq_messages WHERE queue = ?1 AND state = 2),
    (SELECT min(lease_until) FROM rq_messages WHERE queue = ?1 AND state = 1)"""
PROMOTE = """INSERT INTO rq_messages (queue, state, attempts, id, headers, body)
    SELECT queue, 0, attempts, id, headers, body FROM rq_messages
    WHERE queue = ?1 AND state = 2 AND visible_at <= ?2 ORDER BY visible_at, seq"""
DELETE_PROMOTED = "DELETE FROM rq_messages WHERE queue = ?1 AND state = 2 AND visible_at <= ?2"
RECOVER = ("UPDATE rq_messages SET state = 0, claim = NULL, lease_until = NULL "
           "WHERE queue = ?1 AND state = 1 AND lease_until <= ?2")
CLAIM = """UPDATE rq_messages SET state = 1, claim = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE seq IN (SELECT seq FROM rq_messages WHERE queue = ?3 AND state = 0 ORDER BY seq LIMIT ?4)
    RETURNING seq, attempts, id, headers, body"""
ACK = "DELETE FROM rq_messages WHERE seq = ? AND claim = ?"
RETRY = ("UPDATE rq_messages SET state = 2, visible_at = ?, claim = NULL, lease_until = NULL "
         "WHERE seq = ? AND claim = ?")
# Back to the head: a seq below every row's (one row per statement, so each sees the last).
RELEASE = ("UPDATE rq_messages SET seq = (SELECT min(seq) FROM rq_messages) - 1, state = 0, claim = NULL, "
           "lease_until = NULL, attempts = max(0, attempts - 1) WHERE seq = ? AND claim = ?")
REQUEUE = """INSERT INTO rq_messages (queue, state, attempts, id, headers, body)
    SELECT queue, 0, attempts, id, headers, body FROM rq_messages WHERE seq = ? AND claim = ?"""
EXTEND = "UPDATE rq_messages SET lease_until = ? WHERE seq = ? AND claim = ?"
COUNT_READY_UP_TO = "SELECT count(*) FROM (SELECT 1 FROM rq_messages WHERE queue = ? AND state = 0 LIMIT ?)"
COUNT_BY_STATE = "SELECT state, count(*) FROM rq_messages WHERE queue = ? GROUP BY state"
COUNT_DUE = "SELECT count(*) FROM rq_messages WHERE queue = ? AND state = 2 AND visible_at <= ?"
PURGE = "DELETE FROM rq_messages WHERE queue = ? AND state IN (0, 2)"

# Primary result codes meaning "cannot use the database now" (retry later), not a bug:
# BUSY, LOCKED (busy_timeout ran out), NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


class SqliteUnavailable(Exception):
    """The database cannot be used now (locked past busy_timeout, I/O error, disk full, file
    cannot be opened). The base Driver turns it into DriverUnavailable."""


def unavailable(exc: BaseException) -> SqliteUnavailable | None:
    """The SqliteUnavailable for an engine error that means "cannot use the database now";
    None for anything else (a bug must not look like a lost connection)."""
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.ProgrammingError | sqlite3.IntegrityError | sqlite3.InterfaceError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) in UNAVAILABLE_CODES:
            return SqliteUnavailable(str(exc))
    return None


class SchemaError(Exception):
    """The database was written by a newer runtime (or is not ours)."""


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Create or upgrade the schema inside one write transaction; the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(CREATE_META)
        row = conn.execute(GET_VERSION).fetchone()
        try:
            found = int(row[0]) if row else 0
        except ValueError:
            raise SchemaError(f"{path}: unreadable schema version {row[0]!r}") from None
        if found > SCHEMA_VERSION:
            raise SchemaError(f"{path} has queue schema version {found}, newer than this runtime's "
                              f"{SCHEMA_VERSION} (a newer runtime wrote it): upgrade the runtime, or set the "
                              f"driver's `path` to another file")
        version = found
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
        if version != found:
            conn.execute(SET_VERSION, (str(version),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found
