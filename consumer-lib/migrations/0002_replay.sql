-- Consumer-side schema, version 2: operators replay or discard dead letters.
--
-- Additive: every existing row keeps its meaning. Unqualified names, as in version 1.

-- A dedup row written when the message was dead-lettered rather than handled. It still makes
-- every redelivery a duplicate (the message waits for an operator, not for the broker), but a
-- replay may turn it into a handled one. A row written by a handler that committed is never
-- turned back.
ALTER TABLE processed ADD COLUMN dead_lettered boolean NOT NULL DEFAULT false;

-- An operator asked for a replay (`outbox-consumer dead replay`); the group's running
-- consumer handles the letter through the dedup step and settles it. A replay that fails
-- leaves the letter here, with the new error and one more attempt, and clears the request.
ALTER TABLE dead_letters
    ADD COLUMN replay_requested_at timestamptz,
    ADD COLUMN last_replay_at      timestamptz;
CREATE INDEX dead_letters_replay_idx ON dead_letters (consumer_group, id)
    WHERE replay_requested_at IS NOT NULL;

-- Letters that left dead_letters, and how: `replayed` (the handler ran and committed),
-- `duplicate` (the message had been handled already, so the handler did not run again) or
-- `discarded` (an operator gave up on it, with a reason). `id` is the letter's number in
-- dead_letters.
CREATE TABLE settled_letters (
    id             bigint      PRIMARY KEY,
    consumer_group text        NOT NULL,
    message_id     uuid,
    source         text        NOT NULL,
    key            text,
    payload        bytea       NOT NULL,
    headers        jsonb       NOT NULL,
    error          text        NOT NULL,
    attempts       integer     NOT NULL,
    dead_at        timestamptz NOT NULL,
    settled_at     timestamptz NOT NULL DEFAULT now(),
    outcome        text        NOT NULL,
    reason         text,
    CONSTRAINT settled_letters_outcome_check
        CHECK (outcome IN ('replayed', 'duplicate', 'discarded')),
    CONSTRAINT settled_letters_reason_check
        CHECK (outcome <> 'discarded' OR (reason IS NOT NULL AND reason <> ''))
);
CREATE INDEX settled_letters_settled_at_idx ON settled_letters (settled_at);
CREATE INDEX settled_letters_group_idx ON settled_letters (consumer_group, settled_at);
