"""The SQLite store's schema, migrations and statements, and row conversions.

Plain strings, kept apart from the connection handling in :mod:`._sqlite`.
Statements that read or write a recipient's status list its columns in one order:
``address, state, attempts, code, enhanced_code, message, raw_message, host, ip,
tls, tls_verified, first_attempt_at, last_attempt_at, next_attempt_at,
possible_duplicate, held``. History rows (table ``history``) list theirs as
``address, attempt, started_at, duration, state, code, enhanced_code, message,
raw_message, host, ip, tls, tls_verified``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mailstrom_async._domain import domain_key
from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus

__all__ = [
    "CANCEL",
    "CLAIM",
    "HISTORY_QUERY",
    "HOLD_DOMAIN",
    "HOLD_MESSAGE",
    "INSERT_HISTORY",
    "INSERT_MESSAGE",
    "INSERT_RECIPIENT",
    "INTEGRITY_PROBES",
    "JOB_MESSAGES",
    "LEASED_BY",
    "LEASED_UNDER",
    "LEASE_OWNERS",
    "LIST_MESSAGES",
    "MESSAGE_DATA",
    "MESSAGE_SIZES",
    "MIGRATIONS",
    "NEXT_DUE",
    "NEXT_PRIORITY",
    "PURGE",
    "PURGE_BOUND",
    "RECORD",
    "RELEASE_OWNER",
    "RENEW_ALL",
    "RENEW_SOME",
    "RETRY_NOW",
    "SCAN_DUE",
    "SCHEMA_VERSION",
    "STATUSES_QUERY",
    "STATUS_QUERY",
    "TRIM_HISTORY",
    "TRIM_HISTORY_TO_LATEST",
    "UNHOLD_ALL",
    "UNHOLD_DOMAIN",
    "UNHOLD_MESSAGE",
    "UNLEASE",
    "domain",
    "from_ts",
    "history_from_row",
    "history_params",
    "shape_query",
    "status_from_row",
    "status_params",
    "to_ts",
]

#: Schema migrations; step *n* takes ``user_version`` from *n* to *n + 1*.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            mail_from TEXT NOT NULL,
            data BLOB NOT NULL,
            smtputf8 INTEGER NOT NULL,
            submitted_at REAL NOT NULL,
            idempotency_key TEXT UNIQUE
        )""",
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            address TEXT NOT NULL,
            domain TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            code INTEGER,
            enhanced_code TEXT,
            message TEXT,
            host TEXT,
            ip TEXT,
            tls INTEGER,
            tls_verified INTEGER,
            first_attempt_at REAL,
            last_attempt_at REAL,
            next_attempt_at REAL,
            possible_duplicate INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until REAL,
            PRIMARY KEY (message_id, position)
        )""",
        # Claims walk this in (next_attempt_at, rowid) order: due first, then by
        # submission.
        """CREATE INDEX recipients_due ON recipients (next_attempt_at)
            WHERE state IN ('queued', 'deferred')""",
        # Only leased rows: small, and finds the earliest lease end quickly.
        """CREATE INDEX recipients_leased ON recipients (lease_until)
            WHERE lease_until IS NOT NULL""",
    ),
    (
        # Version 2: lease renewal (UPDATE ... WHERE lease_owner = ?) follows the
        # leased rows instead of scanning every recipient while holding the lock.
        """CREATE INDEX recipients_lease_owner ON recipients (lease_owner)
            WHERE lease_owner IS NOT NULL""",
    ),
    (
        # Version 3: held recipients (Store.hold). A held row is never claimed, so
        # the due index leaves held rows out (claims and next_due_at walk only
        # what can be claimed); a small index over the held rows serves unhold()
        # and the held counts. ADD COLUMN with a constant default rewrites no row.
        "ALTER TABLE recipients ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX recipients_due",
        """CREATE INDEX recipients_claimable ON recipients (next_attempt_at)
            WHERE state IN ('queued', 'deferred') AND held = 0""",
        "CREATE INDEX recipients_held ON recipients (domain) WHERE held = 1",
    ),
    (
        # Version 4: the exact bytes of the last reply text when they are not what
        # ``message`` shows (not UTF-8, or cut at 4 KiB); NULL otherwise.
        "ALTER TABLE recipients ADD COLUMN raw_message BLOB",
    ),
    (
        # Version 5: each recipient's attempt history (Store.history), bounded
        # per recipient. The primary key is the table (WITHOUT ROWID): one b-tree,
        # a message's rows side by side, found by the message id that leads it
        # (history(), the cascade of a purge) and trimmed by attempt number. A
        # retried write of the same attempt (same started_at) is one row.
        """CREATE TABLE history (
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            started_at REAL NOT NULL,
            duration REAL NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
            code INTEGER,
            enhanced_code TEXT,
            message TEXT,
            raw_message BLOB,
            host TEXT,
            ip TEXT,
            tls INTEGER,
            tls_verified INTEGER,
            PRIMARY KEY (message_id, position, attempt, started_at)
        ) WITHOUT ROWID""",
    ),
    (
        # Version 6: the lease token of the claim that leased the row last
        # (Store.record and Store.release are fenced by it). Only a claim sets
        # it; ending a lease keeps it. Rows leased before have none: a record
        # fenced by a token leaves them alone, one without writes them as before.
        "ALTER TABLE recipients ADD COLUMN lease_token TEXT",
    ),
    (
        # Version 7: message priorities, lowest claimed first. The message's
        # priority is copied to each of its rows, so that claims walk one index
        # in claim order (priority, next_attempt_at, rowid) without a join;
        # rows written before are 0. The index replaces recipients_claimable
        # under a new name (its integrity probe reads other columns).
        "ALTER TABLE recipients ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX recipients_claimable",
        """CREATE INDEX recipients_claim_order ON recipients (priority, next_attempt_at)
            WHERE state IN ('queued', 'deferred') AND held = 0""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

#: The cheap integrity check of a large file (see ``SQLiteStore.open``): for each
#: b-tree (a table or an index, by name), a query that reads its first and last
#: entries, the leftmost and rightmost paths from its root, as the store's own
#: queries do. A b-tree the file does not have (an older schema) is skipped. Every
#: index a migration adds needs its probe here (a test checks that each probe's
#: plan uses its b-tree, and that every b-tree of the schema has one).
INTEGRITY_PROBES: tuple[tuple[str, str], ...] = (
    ("messages", "SELECT * FROM messages WHERE rowid = (SELECT MIN(rowid) FROM messages)"),
    ("messages", "SELECT * FROM messages WHERE rowid = (SELECT MAX(rowid) FROM messages)"),
    ("recipients", "SELECT * FROM recipients WHERE rowid = (SELECT MIN(rowid) FROM recipients)"),
    ("recipients", "SELECT * FROM recipients WHERE rowid = (SELECT MAX(rowid) FROM recipients)"),
    ("sqlite_autoindex_messages_1", "SELECT (SELECT MIN(id) FROM messages), (SELECT MAX(id) FROM messages)"),
    ("sqlite_autoindex_messages_2", "SELECT (SELECT MIN(idempotency_key) FROM messages), (SELECT MAX(idempotency_key) FROM messages)"),
    ("sqlite_autoindex_recipients_1", "SELECT (SELECT MIN(message_id) FROM recipients), (SELECT MAX(message_id) FROM recipients)"),
    ("recipients_due", "SELECT (SELECT MIN(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred')), (SELECT MAX(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred'))"),
    ("recipients_leased", "SELECT (SELECT MIN(lease_until) FROM recipients WHERE lease_until IS NOT NULL), (SELECT MAX(lease_until) FROM recipients WHERE lease_until IS NOT NULL)"),
    ("recipients_lease_owner", "SELECT (SELECT MIN(lease_owner) FROM recipients WHERE lease_owner IS NOT NULL), (SELECT MAX(lease_owner) FROM recipients WHERE lease_owner IS NOT NULL)"),
    ("recipients_claimable", "SELECT (SELECT MIN(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred') AND held = 0), (SELECT MAX(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred') AND held = 0)"),
    ("recipients_claim_order", "SELECT (SELECT MIN(priority) FROM recipients WHERE state IN ('queued', 'deferred') AND held = 0), (SELECT MAX(priority) FROM recipients WHERE state IN ('queued', 'deferred') AND held = 0)"),
    ("recipients_held", "SELECT (SELECT MIN(domain) FROM recipients WHERE held = 1), (SELECT MAX(domain) FROM recipients WHERE held = 1)"),
    ("history", "SELECT (SELECT MIN(message_id) FROM history), (SELECT MAX(message_id) FROM history)"),
)  # fmt: skip


INSERT_MESSAGE = """INSERT INTO messages
    (id, mail_from, data, smtputf8, submitted_at, idempotency_key)
    VALUES (?, ?, ?, ?, ?, ?)"""
INSERT_RECIPIENT = """INSERT INTO recipients
    (message_id, position, address, domain, state, next_attempt_at, lease_owner,
     lease_until, lease_token, priority)
    VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)"""
# The claimable rows are the partial index recipients_claim_order: keep the
# terms "state IN ('queued', 'deferred') AND held = 0" exactly as the index says
# them. Claims and NEXT_DUE walk it one priority at a time (a skip scan): the
# next priority that has claimable rows is one seek (NEXT_PRIORITY), and within
# a priority the due rows are one range in claim order (SCAN_DUE). One scan in
# (priority, next_attempt_at) order would walk past every row of a lower
# priority that is not due yet.
NEXT_PRIORITY = """SELECT MIN(priority) FROM recipients
    WHERE state IN ('queued', 'deferred') AND held = 0 AND priority > :after"""
SCAN_DUE = """SELECT message_id FROM recipients
    WHERE state IN ('queued', 'deferred') AND held = 0 AND priority = :priority
      AND next_attempt_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
    ORDER BY next_attempt_at, rowid"""
# A row the claiming worker held already keeps its lease token (as
# ``_common.kept_token`` says); every other row gets the claim's fresh :token.
CLAIM = """UPDATE recipients SET lease_owner = :worker, lease_until = :until,
      lease_token = CASE WHEN lease_owner = :worker AND lease_token IS NOT NULL
                         THEN lease_token ELSE :token END
    WHERE message_id IN (SELECT value FROM json_each(:ids))
      AND state IN ('queued', 'deferred') AND held = 0 AND next_attempt_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
    RETURNING message_id, position, address, state, attempts, code, enhanced_code,
      message, raw_message, host, ip, tls, tls_verified, first_attempt_at,
      last_attempt_at, next_attempt_at, possible_duplicate, held, lease_token,
      priority"""
JOB_MESSAGES = """SELECT id, mail_from, data, smtputf8, submitted_at FROM messages
    WHERE id IN (SELECT value FROM json_each(?))"""
STATUS_QUERY = """SELECT m.mail_from, m.submitted_at, r.address, r.state, r.attempts,
      r.code, r.enhanced_code, r.message, r.raw_message, r.host, r.ip, r.tls,
      r.tls_verified, r.first_attempt_at, r.last_attempt_at, r.next_attempt_at,
      r.possible_duplicate, r.held
    FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
    WHERE m.id = ? ORDER BY r.position"""
STATUSES_QUERY = """SELECT m.id, m.mail_from, m.submitted_at, r.address, r.state,
      r.attempts, r.code, r.enhanced_code, r.message, r.raw_message, r.host, r.ip,
      r.tls, r.tls_verified, r.first_attempt_at, r.last_attempt_at,
      r.next_attempt_at, r.possible_duplicate, r.held
    FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
    WHERE m.id IN (SELECT value FROM json_each(?)) ORDER BY m.id, r.position"""
RECORD = """UPDATE recipients SET state = ?, attempts = ?, code = ?, enhanced_code = ?,
      message = ?, raw_message = ?, host = ?, ip = ?, tls = ?, tls_verified = ?,
      first_attempt_at = ?, last_attempt_at = ?, next_attempt_at = ?,
      possible_duplicate = ?, held = held AND ?
    WHERE message_id = ? AND position = ?"""
# The rows release() ends the lease of: those of a worker, or those still
# under a lease token.
LEASED_BY = """SELECT position, address FROM recipients
    WHERE message_id = ? AND lease_owner = ?"""
LEASED_UNDER = """SELECT position, address FROM recipients
    WHERE message_id = ? AND lease_token = ?"""
UNLEASE = (
    "UPDATE recipients SET lease_owner = NULL, lease_until = NULL"
    " WHERE message_id = ? AND position = ?"
)
RENEW_ALL = """UPDATE recipients SET lease_until = ?
    WHERE lease_owner = ? AND state IN ('queued', 'deferred')"""
RENEW_SOME = """UPDATE recipients SET lease_until = ?
    WHERE lease_owner = ? AND state IN ('queued', 'deferred')
      AND message_id IN (SELECT value FROM json_each(?))"""
LEASE_OWNERS = """SELECT lease_owner, COUNT(*), MAX(lease_until) FROM recipients
    WHERE lease_owner IS NOT NULL AND state IN ('queued', 'deferred')
    GROUP BY lease_owner ORDER BY lease_owner"""
RELEASE_OWNER = """UPDATE recipients SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = ?"""
# The first of the unleased rows is looked for in each priority that has
# claimable rows (found one seek each, as SCAN_DUE's are).
NEXT_DUE = """WITH RECURSIVE levels (priority) AS (
      SELECT MIN(priority) FROM recipients
        WHERE state IN ('queued', 'deferred') AND held = 0
      UNION ALL
      SELECT (SELECT MIN(priority) FROM recipients
        WHERE state IN ('queued', 'deferred') AND held = 0
          AND priority > levels.priority)
      FROM levels WHERE levels.priority IS NOT NULL)
    SELECT
    (SELECT MIN((SELECT next_attempt_at FROM recipients
      WHERE state IN ('queued', 'deferred') AND held = 0
        AND priority = levels.priority AND lease_until IS NULL
      ORDER BY next_attempt_at LIMIT 1)) FROM levels),
    (SELECT MIN(MAX(next_attempt_at, lease_until)) FROM recipients
      WHERE lease_until IS NOT NULL AND state IN ('queued', 'deferred')
        AND held = 0)"""
# A purge walks the messages in rowid order, a step at a time, each step its own
# transaction, so that no lock is held for long: PURGE_BOUND is the last rowid of
# the step of at most ? messages after rowid ? (NULL: none left), and PURGE
# deletes the finished messages with a rowid in (?, ?] last attempted before ?.
PURGE_BOUND = """SELECT max(rowid) FROM (
    SELECT rowid FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?)"""
PURGE = """DELETE FROM messages WHERE id IN (
    SELECT m.id FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
    WHERE m.rowid > ? AND m.rowid <= ?
    GROUP BY m.id
    HAVING TOTAL(r.state IN ('queued', 'deferred')) = 0
       AND MAX(COALESCE(r.last_attempt_at, m.submitted_at)) < ?)"""

# Messages with a recipient in one of :states (a JSON list) and, unless :domain is
# NULL, of :domain and, unless :held is NULL, held or not as :held says; oldest
# first, at most :limit (-1: all), each with every recipient.
LIST_MESSAGES = """WITH chosen AS (
      SELECT m.id, m.rowid AS seq, m.submitted_at FROM messages m
      WHERE EXISTS (
        SELECT 1 FROM recipients r WHERE r.message_id = m.id
          AND r.state IN (SELECT value FROM json_each(:states))
          AND (:domain IS NULL OR r.domain = :domain)
          AND (:held IS NULL OR r.held = :held))
      ORDER BY m.submitted_at, m.rowid LIMIT :limit)
    SELECT m.id, m.mail_from, m.submitted_at, r.address, r.state, r.attempts,
      r.code, r.enhanced_code, r.message, r.raw_message, r.host, r.ip, r.tls,
      r.tls_verified, r.first_attempt_at, r.last_attempt_at, r.next_attempt_at,
      r.possible_duplicate, r.held
    FROM chosen c JOIN messages m ON m.id = c.id
      JOIN recipients r ON r.message_id = m.id
    ORDER BY c.submitted_at, c.seq, r.position"""
MESSAGE_DATA = "SELECT data FROM messages WHERE id = ?"
# length() of a BLOB reads its size from the record header: the data stays on disk.
MESSAGE_SIZES = """SELECT id, length(data) FROM messages
    WHERE id IN (SELECT value FROM json_each(?))"""


def shape_query(buckets: int) -> str:
    """Recipients counted by domain and age bucket (see ``Store.shape``): the
    recipients that match are first counted per message and domain, so each
    message's ``submitted_at`` is read once. Named parameters: ``:now``,
    ``:states`` (a JSON list), ``:domain`` and ``:held`` (NULL: any), and the
    bounds ``:b0`` ... ``:b{buckets - 1}`` in seconds."""
    cases = " ".join(
        f"WHEN :now - m.submitted_at < :b{i} THEN {i}" for i in range(buckets)
    )
    return f"""WITH counted AS (
          SELECT message_id, domain, COUNT(*) AS n FROM recipients
          WHERE state IN (SELECT value FROM json_each(:states))
            AND (:domain IS NULL OR domain = :domain)
            AND (:held IS NULL OR held = :held)
          GROUP BY message_id, domain)
        SELECT c.domain, CASE {cases} ELSE {buckets} END AS bucket, SUM(c.n)
        FROM counted c JOIN messages m ON m.id = c.message_id
        GROUP BY c.domain, bucket"""  # noqa: S608 (only numbers are formatted in)


RETRY_NOW = """UPDATE recipients SET next_attempt_at = :now
    WHERE state IN ('queued', 'deferred') AND held = 0 AND next_attempt_at > :now
      AND (lease_until IS NULL OR lease_until <= :now)
      AND (:message_id IS NULL OR message_id = :message_id)
      AND (:domain IS NULL OR domain = :domain)"""
CANCEL = """UPDATE recipients SET state = 'failed', code = NULL, enhanced_code = NULL,
      message = :reason, raw_message = NULL, next_attempt_at = NULL,
      lease_owner = NULL, lease_until = NULL, held = 0
    WHERE message_id = :message_id AND state IN ('queued', 'deferred')"""
# Hold and unhold, by message (the primary key leads) or by domain alone (hold
# walks the claimable index; unhold the held index); unhold of all held rows too.
HOLD_MESSAGE = """UPDATE recipients SET held = 1
    WHERE message_id = :message_id AND state IN ('queued', 'deferred') AND held = 0
      AND (:domain IS NULL OR domain = :domain)"""
HOLD_DOMAIN = """UPDATE recipients SET held = 1
    WHERE state IN ('queued', 'deferred') AND held = 0 AND domain = :domain"""
UNHOLD_MESSAGE = """UPDATE recipients SET held = 0
    WHERE message_id = :message_id AND held = 1
      AND (:domain IS NULL OR domain = :domain)"""
UNHOLD_DOMAIN = "UPDATE recipients SET held = 0 WHERE held = 1 AND domain = :domain"
UNHOLD_ALL = "UPDATE recipients SET held = 0 WHERE held = 1"

INSERT_HISTORY = """INSERT OR IGNORE INTO history
    (message_id, position, attempt, started_at, duration, state, code,
     enhanced_code, message, raw_message, host, ip, tls, tls_verified)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
# Trimming, run only for an attempt numbered above the limit: the rows between
# the recipient's first kept attempt and the window of the latest ones
# (:func:`~._common.trimmed_history` is the same rule), in one primary-key range.
TRIM_HISTORY = """DELETE FROM history
    WHERE message_id = :message_id AND position = :position AND attempt <= :cutoff
      AND attempt > (SELECT MIN(attempt) FROM history
                     WHERE message_id = :message_id AND position = :position)"""
TRIM_HISTORY_TO_LATEST = """DELETE FROM history
    WHERE message_id = :message_id AND position = :position AND attempt < :added"""
HISTORY_QUERY = """SELECT r.address, h.attempt, h.started_at, h.duration, h.state,
      h.code, h.enhanced_code, h.message, h.raw_message, h.host, h.ip, h.tls,
      h.tls_verified
    FROM history h JOIN recipients r
      ON r.message_id = h.message_id AND r.position = h.position
    WHERE h.message_id = ? ORDER BY h.started_at, h.position, h.attempt"""


def to_ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def from_ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _from_ts_or_none(value: float | None) -> datetime | None:
    return None if value is None else from_ts(value)


def _bool_or_none(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def domain(address: str) -> str:
    return domain_key(address.rpartition("@")[2])


def status_from_row(row: Sequence[Any]) -> RecipientStatus:
    """A status from ``address, state, attempts, ..., possible_duplicate, held``."""
    (address, state, attempts, code, enhanced_code, message, raw_message, host, ip,
     tls, tls_verified, first, last, nxt, duplicate, held) = row  # fmt: skip
    return RecipientStatus(
        address=address,
        state=RecipientState(state),
        attempts=attempts,
        code=code,
        enhanced_code=enhanced_code,
        message=message,
        raw_message=raw_message,
        host=host,
        ip=ip,
        tls=_bool_or_none(tls),
        tls_verified=_bool_or_none(tls_verified),
        first_attempt_at=_from_ts_or_none(first),
        last_attempt_at=_from_ts_or_none(last),
        next_attempt_at=_from_ts_or_none(nxt),
        possible_duplicate=bool(duplicate),
        held=bool(held),
    )


def status_params(s: RecipientStatus) -> tuple[Any, ...]:
    """The values for ``state, attempts, ..., possible_duplicate`` from *s*
    (``held`` is not among them: the store keeps its own).

    *s* has passed :func:`~._common.check_statuses`, so its text is valid Unicode.
    """
    return (
        s.state.value,
        s.attempts,
        s.code,
        s.enhanced_code,
        s.message,
        s.raw_message,
        s.host,
        s.ip,
        s.tls,
        s.tls_verified,
        to_ts(s.first_attempt_at),
        to_ts(s.last_attempt_at),
        to_ts(s.next_attempt_at),
        s.possible_duplicate,
    )


def history_params(message_id: str, position: int, r: AttemptRecord) -> tuple[Any, ...]:
    """The values of :data:`INSERT_HISTORY` for *r*, the recipient at *position*
    (*r* has passed :func:`~._common.check_history`)."""
    return (
        message_id,
        position,
        r.attempt,
        r.started_at.timestamp(),
        r.duration,
        r.state.value,
        r.code,
        r.enhanced_code,
        r.message,
        r.raw_message,
        r.host,
        r.ip,
        r.tls,
        r.tls_verified,
    )


def history_from_row(row: Sequence[Any]) -> AttemptRecord:
    """An attempt from ``address, attempt, started_at, ..., tls_verified``."""
    (address, attempt, started, duration, state, code, enhanced_code, message,
     raw_message, host, ip, tls, tls_verified) = row  # fmt: skip
    return AttemptRecord(
        address=address,
        attempt=attempt,
        started_at=from_ts(started),
        duration=duration,
        state=RecipientState(state),
        code=code,
        enhanced_code=enhanced_code,
        message=message,
        raw_message=raw_message,
        host=host,
        ip=ip,
        tls=_bool_or_none(tls),
        tls_verified=_bool_or_none(tls_verified),
    )
