"""The PostgreSQL store's schema, migrations and statements.

Plain strings, kept apart from the connection handling in :mod:`._postgres`.
Statements that return a recipient's status list its columns in one order (as
the SQLite store's do): ``address, state, attempts, code, enhanced_code, message,
raw_message, host, ip, tls, tls_verified, first_attempt_at, last_attempt_at,
next_attempt_at, possible_duplicate, held``. History rows list theirs as
``address, attempt, started_at, duration, state, code, enhanced_code, message,
raw_message, host, ip, tls, tls_verified``.

Times are ``timestamptz`` (microseconds, as Python's datetimes), bytes ``bytea``,
flags ``boolean``. Bulk writes pass one array per column and ``unnest`` them: one
statement, one round trip, whatever the number of rows.
"""

from __future__ import annotations

__all__ = [
    "CANCEL",
    "CLAIM",
    "HISTORY_QUERY",
    "HOLD_DOMAIN",
    "HOLD_MESSAGE",
    "INSERT_HISTORY",
    "INSERT_MESSAGES",
    "INSERT_RECIPIENTS",
    "KNOWN_KEYS",
    "LEASE_OWNERS",
    "LIST_MESSAGES",
    "LOCK_RECIPIENTS",
    "LOCK_RECORDED",
    "MESSAGES_EXISTING",
    "MESSAGE_DATA",
    "MESSAGE_EXISTS",
    "MESSAGE_SIZES",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "NEXT_DUE",
    "PURGE",
    "RECORD_MANY",
    "RECORD_WITH_HISTORY",
    "RELEASE_OWNER",
    "RENEW_ALL",
    "RENEW_SOME",
    "RETRY_NOW",
    "SCHEMA_TABLE",
    "SCHEMA_VERSION",
    "SHAPE",
    "STATUSES_QUERY",
    "STATUS_QUERY",
    "SUMMARY",
    "TRIM_HISTORY",
    "TRIM_HISTORY_TO_LATEST",
    "UNHOLD_ALL",
    "UNHOLD_DOMAIN",
    "UNHOLD_MESSAGE",
    "UNLEASE_FENCED",
    "UNLEASE_MANY",
    "UNLEASE_OWN",
]

#: The table that holds the schema version (one row).
SCHEMA_TABLE = "mailstrom_schema"
#: ``pg_advisory_xact_lock`` key taken while the schema is checked and migrated,
#: so that processes opening the same database at once migrate it once.
MIGRATION_LOCK = 0x6D61696C  # "mail"

#: Schema migrations; step *n* takes the version from *n* to *n + 1*.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # seq: the order messages were added in (claim ties, listings).
        """CREATE TABLE messages (
            seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            id text PRIMARY KEY,
            mail_from text NOT NULL,
            data bytea NOT NULL,
            smtputf8 boolean NOT NULL,
            submitted_at timestamptz NOT NULL,
            idempotency_key text UNIQUE
        )""",
        # seq is the message's, copied so that a claim orders due rows by
        # (next_attempt_at, seq) from one index without a join.
        """CREATE TABLE recipients (
            message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            position integer NOT NULL,
            seq bigint NOT NULL,
            address text NOT NULL,
            domain text NOT NULL,
            state text NOT NULL
                CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
            attempts integer NOT NULL DEFAULT 0,
            code integer,
            enhanced_code text,
            message bytea,  -- UTF-8: text cannot hold the NUL a reply may
            raw_message bytea,
            host text,
            ip text,
            tls boolean,
            tls_verified boolean,
            first_attempt_at timestamptz,
            last_attempt_at timestamptz,
            next_attempt_at timestamptz,
            possible_duplicate boolean NOT NULL DEFAULT false,
            held boolean NOT NULL DEFAULT false,
            lease_owner text,
            lease_until timestamptz,
            PRIMARY KEY (message_id, position)
        )""",
        # Claims walk this in claim order; only rows that can be claimed.
        """CREATE INDEX recipients_claimable ON recipients (next_attempt_at, seq)
            WHERE state IN ('queued', 'deferred') AND NOT held""",
        """CREATE INDEX recipients_leased ON recipients (lease_until)
            WHERE lease_until IS NOT NULL""",
        """CREATE INDEX recipients_lease_owner ON recipients (lease_owner)
            WHERE lease_owner IS NOT NULL""",
        "CREATE INDEX recipients_held ON recipients (domain) WHERE held",
        "CREATE INDEX recipients_domain ON recipients (domain, state)",
        """CREATE TABLE history (
            message_id text NOT NULL,
            position integer NOT NULL,
            attempt integer NOT NULL,
            started_at timestamptz NOT NULL,
            duration double precision NOT NULL,
            state text NOT NULL
                CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
            code integer,
            enhanced_code text,
            message bytea,  -- UTF-8: text cannot hold the NUL a reply may
            raw_message bytea,
            host text,
            ip text,
            tls boolean,
            tls_verified boolean,
            PRIMARY KEY (message_id, position, attempt, started_at),
            FOREIGN KEY (message_id, position)
                REFERENCES recipients (message_id, position) ON DELETE CASCADE
        )""",
    ),
    (
        # Version 2: the lease token of the claim that leased the row last
        # (Store.record and Store.release are fenced by it). Only a claim sets
        # it; ending a lease keeps it. Adding a nullable column rewrites no row.
        "ALTER TABLE recipients ADD COLUMN lease_token text",
    ),
    (
        # Version 3: message priorities, lowest claimed first, copied to each
        # of the message's rows (as seq is) so that a claim walks one index in
        # claim order. A column with a constant default rewrites no row
        # (PostgreSQL 11 and later); rows written before are 0. The claim
        # index is rebuilt on (priority, next_attempt_at, seq).
        "ALTER TABLE recipients ADD COLUMN priority integer NOT NULL DEFAULT 0",
        "DROP INDEX recipients_claimable",
        """CREATE INDEX recipients_claimable
            ON recipients (priority, next_attempt_at, seq)
            WHERE state IN ('queued', 'deferred') AND NOT held""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_STATUS = """r.address, r.state, r.attempts, r.code, r.enhanced_code, r.message,
      r.raw_message, r.host, r.ip, r.tls, r.tls_verified, r.first_attempt_at,
      r.last_attempt_at, r.next_attempt_at, r.possible_duplicate, r.held"""

KNOWN_KEYS = """SELECT idempotency_key, id FROM messages
    WHERE idempotency_key = ANY($1::text[])"""
INSERT_MESSAGES = """INSERT INTO messages
    (id, mail_from, data, smtputf8, submitted_at, idempotency_key)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::boolean[],
                         $5::timestamptz[], $6::text[])"""
# Recipients of the messages just inserted: $1 message ids, $2 positions, $3
# addresses, $4 domains, $8 their message's priority; every row QUEUED, due at
# its message's submission, leased to $5 until $6 under token $7 when those are
# not NULL.
INSERT_RECIPIENTS = """INSERT INTO recipients
    (message_id, position, seq, address, domain, state, next_attempt_at,
     lease_owner, lease_until, lease_token, priority)
    SELECT u.message_id, u.position, m.seq, u.address, u.domain, 'queued',
      m.submitted_at, $5::text, $6::timestamptz, $7::text, u.priority
    FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $8::integer[])
      AS u (message_id, position, address, domain, priority)
    JOIN messages m ON m.id = u.message_id"""

# The priorities that have claimable rows, in order, one index seek each (a
# skip scan of recipients_claimable; PostgreSQL 15 does not skip by itself).
# Evaluated lazily: a claim that finds its rows in the first priority never
# looks for the second. The last row is NULL.
_LEVELS = """levels (priority) AS (
      (SELECT priority FROM recipients
        WHERE state IN ('queued', 'deferred') AND NOT held
        ORDER BY priority LIMIT 1)
      UNION ALL
      SELECT (SELECT r.priority FROM recipients r
          WHERE r.state IN ('queued', 'deferred') AND NOT r.held
            AND r.priority > l.priority
          ORDER BY r.priority LIMIT 1)
        FROM levels l WHERE l.priority IS NOT NULL)"""

# One claim, one statement: lock due rows in claim order (skipping rows another
# claim holds), keep the first $4 messages among them, lock every due row of
# those messages, lease them, and return them with each message's data once.
# Claim order is (priority, next_attempt_at, seq): the due rows are read one
# priority at a time (levels), each priority's as one range of the index in
# (next_attempt_at, seq) order, so that rows of a lower priority that are not
# due yet are never walked past. The nested loop over levels yields them in
# claim order, and stops (locking nothing more) once $5 rows are found.
# $5 bounds the rows the first step looks at; the caller repeats the statement
# when that bound, not the queue, ran out before $4 messages were found. The
# rows get lease token $6, but those the claiming worker held already keep
# theirs (as ``_common.kept_token`` says).
CLAIM = f"""WITH RECURSIVE {_LEVELS},
    due AS MATERIALIZED (
      SELECT d.message_id, d.seq, d.next_attempt_at, d.priority
      FROM levels l CROSS JOIN LATERAL (
        SELECT message_id, seq, next_attempt_at, priority FROM recipients
        WHERE state IN ('queued', 'deferred') AND NOT held
          AND priority = l.priority AND next_attempt_at <= $1
          AND (lease_until IS NULL OR lease_until <= $1)
        ORDER BY next_attempt_at, seq
        LIMIT $5
        FOR UPDATE SKIP LOCKED) d
      LIMIT $5),
    chosen AS MATERIALIZED (
      SELECT message_id FROM due GROUP BY message_id
      ORDER BY min(priority), min(next_attempt_at), min(seq) LIMIT $4),
    rows AS MATERIALIZED (
      SELECT r.message_id, r.position FROM recipients r
      JOIN chosen c ON c.message_id = r.message_id
      WHERE r.state IN ('queued', 'deferred') AND NOT r.held
        AND r.next_attempt_at <= $1
        AND (r.lease_until IS NULL OR r.lease_until <= $1)
      FOR UPDATE OF r SKIP LOCKED),
    claimed AS (
      UPDATE recipients r SET lease_owner = $2, lease_until = $3,
        lease_token = CASE WHEN r.lease_owner = $2 AND r.lease_token IS NOT NULL
                           THEN r.lease_token ELSE $6 END
      FROM rows x
      WHERE r.message_id = x.message_id AND r.position = x.position
      RETURNING r.*)
    SELECT (SELECT count(*) FROM due) AS scanned, m.id, m.seq, m.mail_from,
      m.smtputf8, m.submitted_at,
      CASE WHEN r.position = min(r.position) OVER (PARTITION BY r.message_id)
           THEN m.data END AS data,
      r.position, {_STATUS}, r.lease_token, r.priority
    FROM claimed r JOIN messages m ON m.id = r.message_id"""  # noqa: S608 (constant)

STATUS_QUERY = f"""SELECT m.mail_from, m.submitted_at, {_STATUS}
    FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
    WHERE m.id = $1 ORDER BY r.position"""  # noqa: S608 (constant)
STATUSES_QUERY = f"""SELECT m.id, m.mail_from, m.submitted_at, {_STATUS}
    FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
    WHERE m.id = ANY($1::text[]) ORDER BY m.id, r.position"""  # noqa: S608 (constant)
MESSAGE_EXISTS = "SELECT 1 FROM messages WHERE id = $1"
# The rows release() decides on, locked for its transaction.
LOCK_RECIPIENTS = """SELECT position, address, state, lease_owner, lease_token
    FROM recipients WHERE message_id = $1 ORDER BY position FOR UPDATE"""
# The rows record() and record_many() decide on, of every message in $1,
# locked in one stable order (two batches never wait for each other in a circle).
LOCK_RECORDED = """SELECT message_id, position, address, state, lease_owner,
      lease_token
    FROM recipients WHERE message_id = ANY($1::text[])
    ORDER BY message_id, position FOR UPDATE"""
MESSAGES_EXISTING = "SELECT id FROM messages WHERE id = ANY($1::text[])"
# New statuses of any number of recipients of any number of messages: one row
# per (message_id, position), never two for one recipient. A row whose $18 is
# true ends its lease in the same write.
RECORD_MANY = """UPDATE recipients r SET state = u.state, attempts = u.attempts,
      code = u.code, enhanced_code = u.enhanced_code, message = u.message,
      raw_message = u.raw_message, host = u.host, ip = u.ip, tls = u.tls,
      tls_verified = u.tls_verified, first_attempt_at = u.first_attempt_at,
      last_attempt_at = u.last_attempt_at, next_attempt_at = u.next_attempt_at,
      possible_duplicate = u.possible_duplicate, held = r.held AND u.keep_held,
      lease_owner = CASE WHEN u.unlease THEN NULL ELSE r.lease_owner END,
      lease_until = CASE WHEN u.unlease THEN NULL ELSE r.lease_until END
    FROM unnest($1::text[], $2::integer[], $3::text[], $4::integer[],
                $5::integer[], $6::text[], $7::bytea[], $8::bytea[], $9::text[],
                $10::text[], $11::boolean[], $12::boolean[], $13::timestamptz[],
                $14::timestamptz[], $15::timestamptz[], $16::boolean[],
                $17::boolean[], $18::boolean[])
      AS u (message_id, position, state, attempts, code, enhanced_code, message,
            raw_message, host, ip, tls, tls_verified, first_attempt_at,
            last_attempt_at, next_attempt_at, possible_duplicate, keep_held,
            unlease)
    WHERE r.message_id = u.message_id AND r.position = u.position"""
UNLEASE_MANY = """UPDATE recipients r SET lease_owner = NULL, lease_until = NULL
    FROM unnest($1::text[], $2::integer[]) AS u (message_id, position)
    WHERE r.message_id = u.message_id AND r.position = u.position"""
# Fenced: only the leases that $3 still holds end.
UNLEASE_OWN = """UPDATE recipients SET lease_owner = NULL, lease_until = NULL
    WHERE message_id = $1 AND position = ANY($2::integer[]) AND lease_owner = $3"""
# Fenced by the lease token: only the leases still under token $3 end.
UNLEASE_FENCED = """UPDATE recipients SET lease_owner = NULL, lease_until = NULL
    WHERE message_id = $1 AND position = ANY($2::integer[]) AND lease_token = $3"""
RENEW_ALL = """UPDATE recipients SET lease_until = $1
    WHERE lease_owner = $2 AND state IN ('queued', 'deferred')"""
RENEW_SOME = """UPDATE recipients SET lease_until = $1
    WHERE lease_owner = $2 AND state IN ('queued', 'deferred')
      AND message_id = ANY($3::text[])"""
LEASE_OWNERS = """SELECT lease_owner, count(*), max(lease_until) FROM recipients
    WHERE lease_owner IS NOT NULL AND state IN ('queued', 'deferred')
    GROUP BY lease_owner ORDER BY lease_owner"""
RELEASE_OWNER = """UPDATE recipients SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = $1"""
# The first unleased row is looked for in each priority that has claimable rows.
NEXT_DUE = f"""WITH RECURSIVE {_LEVELS}
    SELECT
    (SELECT min((SELECT r.next_attempt_at FROM recipients r
        WHERE r.state IN ('queued', 'deferred') AND NOT r.held
          AND r.priority = l.priority AND r.lease_until IS NULL
        ORDER BY r.next_attempt_at LIMIT 1)) FROM levels l),
    (SELECT min(greatest(next_attempt_at, lease_until)) FROM recipients
      WHERE lease_until IS NOT NULL AND state IN ('queued', 'deferred')
        AND NOT held)"""  # noqa: S608 (constant)
SUMMARY = """SELECT state, domain, count(*), count(*) FILTER (WHERE held)
    FROM recipients GROUP BY state, domain"""
# One step of a purge, one statement committed on its own: of the (at most $3)
# messages added after seq $2, delete those finished and last attempted before
# $1; return the step's last seq (NULL: no message left) and how many went. A
# purge walks the table this way so that no step holds locks for long.
PURGE = """WITH step AS (
      SELECT max(seq) AS last FROM (
        SELECT seq FROM messages WHERE seq > $2 ORDER BY seq LIMIT $3) AS s),
    finished AS (
      SELECT m.id FROM messages m LEFT JOIN recipients r ON r.message_id = m.id
      WHERE m.seq > $2 AND m.seq <= (SELECT last FROM step)
      GROUP BY m.id
      HAVING count(*) FILTER (WHERE r.state IN ('queued', 'deferred')) = 0
         AND max(coalesce(r.last_attempt_at, m.submitted_at)) < $1),
    deleted AS (
      DELETE FROM messages m USING finished f WHERE m.id = f.id RETURNING 1)
    SELECT (SELECT last FROM step), (SELECT count(*) FROM deleted)"""
# Messages with a recipient in one of $1 and, unless NULL, of domain $2 and held
# or not as $3 says; oldest first, at most $4 (NULL: all), each with every
# recipient.
LIST_MESSAGES = f"""WITH chosen AS (
      SELECT m.id, m.seq, m.submitted_at FROM messages m
      WHERE EXISTS (
        SELECT 1 FROM recipients r WHERE r.message_id = m.id
          AND r.state = ANY($1::text[])
          AND ($2::text IS NULL OR r.domain = $2)
          AND ($3::boolean IS NULL OR r.held = $3))
      ORDER BY m.submitted_at, m.seq LIMIT $4)
    SELECT m.id, m.mail_from, m.submitted_at, {_STATUS}
    FROM chosen c JOIN messages m ON m.id = c.id
      JOIN recipients r ON r.message_id = m.id
    ORDER BY c.submitted_at, c.seq, r.position"""  # noqa: S608 (constant)
MESSAGE_DATA = "SELECT data FROM messages WHERE id = $1"
# octet_length() of a TOASTed bytea reads its header, not the data.
MESSAGE_SIZES = """SELECT id, octet_length(data) FROM messages
    WHERE id = ANY($1::text[])"""
# Recipients counted by domain and age bucket (Store.shape): $1 now, $2 states,
# $3 domain, $4 held (NULL: any), $5 the bounds in seconds; the bucket is the
# number of bounds the age has reached.
SHAPE = """WITH counted AS (
      SELECT message_id, domain, count(*) AS n FROM recipients
      WHERE state = ANY($2::text[])
        AND ($3::text IS NULL OR domain = $3)
        AND ($4::boolean IS NULL OR held = $4)
      GROUP BY message_id, domain)
    SELECT c.domain, (SELECT count(*) FROM unnest($5::float8[]) AS b (bound)
        WHERE extract(epoch FROM $1::timestamptz - m.submitted_at) >= b.bound)
      AS bucket, sum(c.n)
    FROM counted c JOIN messages m ON m.id = c.message_id
    GROUP BY 1, 2"""
RETRY_NOW = """UPDATE recipients SET next_attempt_at = $1
    WHERE state IN ('queued', 'deferred') AND NOT held AND next_attempt_at > $1
      AND (lease_until IS NULL OR lease_until <= $1)
      AND ($2::text IS NULL OR message_id = $2)
      AND ($3::text IS NULL OR domain = $3)"""
CANCEL = """UPDATE recipients SET state = 'failed', code = NULL, enhanced_code = NULL,
      message = convert_to($2, 'UTF8'), raw_message = NULL, next_attempt_at = NULL,
      lease_owner = NULL, lease_until = NULL, held = false
    WHERE message_id = $1 AND state IN ('queued', 'deferred')"""
HOLD_MESSAGE = """UPDATE recipients SET held = true
    WHERE message_id = $1 AND state IN ('queued', 'deferred') AND NOT held
      AND ($2::text IS NULL OR domain = $2)"""
HOLD_DOMAIN = """UPDATE recipients SET held = true
    WHERE state IN ('queued', 'deferred') AND NOT held AND domain = $1"""
UNHOLD_MESSAGE = """UPDATE recipients SET held = false
    WHERE message_id = $1 AND held AND ($2::text IS NULL OR domain = $2)"""
UNHOLD_DOMAIN = "UPDATE recipients SET held = false WHERE held AND domain = $1"
UNHOLD_ALL = "UPDATE recipients SET held = false WHERE held"


def _insert_history(first: int) -> str:
    """The history insert, its 14 column arrays numbered from ``$first`` on."""
    types = ("text", "integer", "integer", "timestamptz", "float8", "text",
             "integer", "text", "bytea", "bytea", "text", "text", "boolean",
             "boolean")  # fmt: skip
    arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(types, first))
    return f"""INSERT INTO history
    (message_id, position, attempt, started_at, duration, state, code,
     enhanced_code, message, raw_message, host, ip, tls, tls_verified)
    SELECT * FROM unnest({arrays})
    ON CONFLICT DO NOTHING"""  # noqa: S608 (constant)


INSERT_HISTORY = _insert_history(1)
# Statuses ($1-$18, as RECORD_MANY) and the attempts that made them ($19-$32,
# as INSERT_HISTORY) in one statement: one round trip for the common record.
RECORD_WITH_HISTORY = f"""WITH statuses AS ({RECORD_MANY})
    {_insert_history(19)}"""

# Trimming (run only for an attempt numbered above the limit): the rows between
# the recipient's first kept attempt and the window of the latest ones, as
# :func:`~._common.trimmed_history` says. $1 message ids, $2 positions, $3
# cutoffs / added: one row per recipient.
TRIM_HISTORY = """DELETE FROM history h
    USING unnest($1::text[], $2::integer[], $3::integer[])
      AS t (message_id, position, cutoff)
    WHERE h.message_id = t.message_id AND h.position = t.position
      AND h.attempt <= t.cutoff
      AND h.attempt > (SELECT min(attempt) FROM history
                       WHERE message_id = t.message_id AND position = t.position)"""
TRIM_HISTORY_TO_LATEST = """DELETE FROM history h
    USING unnest($1::text[], $2::integer[], $3::integer[])
      AS t (message_id, position, added)
    WHERE h.message_id = t.message_id AND h.position = t.position
      AND h.attempt < t.added"""
HISTORY_QUERY = """SELECT r.address, h.attempt, h.started_at, h.duration, h.state,
      h.code, h.enhanced_code, h.message, h.raw_message, h.host, h.ip, h.tls,
      h.tls_verified
    FROM history h JOIN recipients r
      ON r.message_id = h.message_id AND r.position = h.position
    WHERE h.message_id = $1 ORDER BY h.started_at, h.position, h.attempt"""
