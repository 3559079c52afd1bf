-- Consumer-side schema, version 1 (default schema name: outbox_consumer).
--
-- Unqualified names: apply with the consumer schema first on the search_path (the
-- library's `Deduplicator::migrate` does that).

-- One row per message a consumer group has handled. The row is inserted in the same
-- transaction as the handler's writes, so "processed" and "its effects happened" commit
-- together; a second delivery of the same message finds the row and is skipped.
CREATE TABLE processed (
    consumer_group text        NOT NULL,
    message_id     uuid        NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, message_id)
);
CREATE INDEX processed_processed_at_idx ON processed (processed_at);

-- Failed attempts of messages still being retried.
CREATE TABLE attempts (
    consumer_group text        NOT NULL,
    message_id     uuid        NOT NULL,
    attempts       integer     NOT NULL,
    last_error     text        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, message_id)
);

-- Messages a consumer gave up on (a permanent failure, too many attempts, no message id),
-- kept with everything needed to look at them or replay them.
CREATE TABLE dead_letters (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text        NOT NULL,
    message_id     uuid,
    source         text        NOT NULL,
    key            text,
    payload        bytea       NOT NULL,
    headers        jsonb       NOT NULL,
    error          text        NOT NULL,
    attempts       integer     NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_group_idx ON dead_letters (consumer_group, dead_at);
