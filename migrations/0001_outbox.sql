-- Outbox schema, version 1.
--
-- Object names are unqualified on purpose: apply this file with the outbox schema first on
-- the search_path (`outbox-relay migrate` and `outbox::Outbox::migrate` do that for you;
-- with psql: `PGOPTIONS='-c search_path=outbox' psql -v ON_ERROR_STOP=1 -f ...` after
-- `CREATE SCHEMA outbox`). The README's "SQL contract" section documents every column.

-- One row per message that a committed transaction wants published. Writers set id (or take
-- the default), topic, key, payload, headers and content_type; every other column belongs to
-- the relay. A row is deleted once the broker has confirmed it.
CREATE TABLE messages (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic        text        NOT NULL,
    key          text,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    content_type text,
    created_at   timestamptz NOT NULL DEFAULT now(),

    -- Relay bookkeeping. Writers leave these at their defaults.
    -- Which of the 64 partitions the row belongs to: a hash of its key (of its id when it
    -- has none), so that all rows of a key are handled by the relay owning that partition.
    partition    smallint    NOT NULL GENERATED ALWAYS AS (hashtext(coalesce(key, id::text)) & 63) STORED,
    status       text        NOT NULL DEFAULT 'pending',
    attempts     integer     NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error   text,
    dead_at      timestamptz,

    CONSTRAINT messages_id_key UNIQUE (id),
    CONSTRAINT messages_topic_check
        CHECK (octet_length(topic) BETWEEN 1 AND 255 AND topic !~ '[[:cntrl:]]'),
    CONSTRAINT messages_key_check
        CHECK (key IS NULL OR octet_length(key) BETWEEN 1 AND 255),
    CONSTRAINT messages_headers_check
        CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT messages_content_type_check
        CHECK (content_type IS NULL OR octet_length(content_type) BETWEEN 1 AND 255),
    CONSTRAINT messages_status_check
        CHECK (status IN ('pending', 'dead')),
    CONSTRAINT messages_attempts_check
        CHECK (attempts >= 0)
);

-- Header values must be strings; checked row by row so a bad plain-SQL insert fails at the
-- writer, with the constraint's name, instead of surprising the relay later.
CREATE FUNCTION headers_are_strings(h jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    -- Non-objects are messages_headers_check's to report.
    SELECT CASE WHEN jsonb_typeof(h) = 'object'
                THEN NOT EXISTS (SELECT 1 FROM jsonb_each(h) AS e WHERE jsonb_typeof(e.value) <> 'string')
                ELSE true END
$$;

ALTER TABLE messages
    ADD CONSTRAINT messages_header_values_check CHECK (headers_are_strings(headers));

-- Rows that may hold back later rows of their key: those that failed at least once (in
-- backoff, or dead). Only failures enter it, so it stays small however busy the outbox is.
CREATE INDEX messages_failed_key_seq_idx ON messages (key, seq)
    WHERE key IS NOT NULL AND (status = 'dead' OR attempts > 0);

-- Pending rows in order, per partition.
CREATE INDEX messages_pending_idx ON messages (partition, seq) WHERE status = 'pending';

-- Queue tables churn: vacuum the hot table early instead of at 20% dead rows.
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
                          autovacuum_vacuum_insert_scale_factor = 0.01);

-- A slim record of each delivered message, kept for `retention.delivered` (off by
-- default) for reconciliation; purged in bounded batches.
CREATE TABLE delivered (
    id           uuid        PRIMARY KEY,
    seq          bigint      NOT NULL,
    topic        text        NOT NULL,
    key          text,
    created_at   timestamptz NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL
);
CREATE INDEX delivered_delivered_at_idx ON delivered (delivered_at);

-- Dead messages an operator discarded (`outbox-relay dead discard --reason`), with the
-- reason; purged after `retention.discarded`.
CREATE TABLE discarded (
    id           uuid        PRIMARY KEY,
    seq          bigint      NOT NULL,
    topic        text        NOT NULL,
    key          text,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL,
    content_type text,
    created_at   timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    last_error   text,
    dead_at      timestamptz,
    discarded_at timestamptz NOT NULL DEFAULT now(),
    reason       text        NOT NULL
);
CREATE INDEX discarded_discarded_at_idx ON discarded (discarded_at);

-- Live relays, for sharing the partitions out fairly.
CREATE TABLE relays (
    relay_id     uuid        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Each partition is leased to at most one relay at a time; only its owner reads and
-- settles its rows. An owner that stops renewing loses it when lease_until passes.
CREATE TABLE partitions (
    partition   smallint    PRIMARY KEY,
    owner       uuid,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    CONSTRAINT partitions_range_check CHECK (partition BETWEEN 0 AND 63)
);
INSERT INTO partitions (partition) SELECT generate_series(0, 63);

-- Relays that are idle and waiting for a wake-up. The insert trigger below sends a NOTIFY
-- only while some relay waits, so a busy system never pays NOTIFY's commit-time lock.
CREATE TABLE relay_waiters (
    relay_id   uuid        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

CREATE FUNCTION wake_relays() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM relay_waiters WHERE expires_at > now()) THEN
        PERFORM pg_notify('outbox_wakeup_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END;
$$;

-- Statement level: one check per INSERT statement, however many rows it writes; several
-- notifications in one transaction are folded into one by PostgreSQL.
CREATE TRIGGER messages_wake_relays
    AFTER INSERT ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION wake_relays();
