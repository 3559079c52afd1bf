-- Outbox schema, version 5: the rows a key waits on are found without walking the others.
--
-- The relay marks `held_back` the rows that wait behind a row of their key: a dead one
-- (under relay.dead_key_policy = "block"), and now also one waiting out a retry delay, so
-- that reads step over them for as long as the delay lasts instead of walking them on every
-- read. Its sweep looks for those heads in this index, which holds only rows that failed at
-- least once (and dead ones): writers' inserts never enter it.
--
-- Building the index locks the table against writes for as long as the build takes: a
-- second or less for an outbox of ordinary size, and little for any outbox, since only
-- failed rows are indexed.
CREATE INDEX messages_failed_heads_idx ON messages (partition, key, seq)
    WHERE key IS NOT NULL AND (status = 'dead' OR attempts > 0);
