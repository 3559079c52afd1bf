-- Outbox schema, version 3: rows waiting behind a dead row of their key leave the read path.
--
-- Under relay.dead_key_policy = "block", the rows of a key whose oldest row is dead wait
-- until that row is retried or discarded. Until version 2 every read walked past them in
-- `seq` order, rejecting each one, so a dead row with 100,000 rows of its key behind it made
-- every read of its partition far slower for all other keys. The relay now marks such rows
-- `held_back` (within about a second of the dead row) and clears the mark when the dead
-- row is retried or discarded; the index the reads use leaves marked rows out. A marked row
-- still holds back the later rows of its key, whatever the policy.
--
-- Writers leave `held_back` at its default. Rebuilding the two indexes locks the table
-- against writes for as long as the rebuild takes: a second or less for an outbox of
-- ordinary size.
ALTER TABLE messages ADD COLUMN held_back boolean NOT NULL DEFAULT false;

ALTER TABLE messages
    ADD CONSTRAINT messages_held_back_check CHECK (NOT held_back OR key IS NOT NULL);

DROP INDEX messages_pending_idx;
CREATE INDEX messages_pending_idx ON messages (partition, seq)
    WHERE status = 'pending' AND NOT held_back;

DROP INDEX messages_failed_key_seq_idx;
CREATE INDEX messages_failed_key_seq_idx ON messages (key, seq)
    WHERE key IS NOT NULL AND (status = 'dead' OR attempts > 0 OR held_back);

-- The dead rows of a partition: the heads whose keys are held back.
CREATE INDEX messages_dead_idx ON messages (partition, key, seq) WHERE status = 'dead';
