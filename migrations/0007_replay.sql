-- Outbox schema, version 7: delivered messages kept whole, and sent again on request.
--
-- With `retention.delivered_payloads` on, the relay's delete keeps each delivered message's
-- payload, headers and content type in `delivered` beside the slim record, for as long as
-- `retention.delivered` keeps the record. Slim records leave these columns NULL.
--
-- `outbox-relay replay` (and `reconcile --repair`) writes archived messages back into
-- `messages` with their original ids, so the normal pipeline sends them again and a consumer
-- that already processed one deduplicates it. Such a row sets `replay_of` to the topic the
-- message was first written with; the relay then marks it on the wire (`outbox-replay`) and
-- sends that topic as `outbox-topic`, even when the replay goes to another destination.
--
-- Adding columns without a default changes no existing row: it takes a brief lock and no
-- rewrite.
ALTER TABLE delivered
    ADD COLUMN payload      bytea,
    ADD COLUMN headers      jsonb,
    ADD COLUMN content_type text;

ALTER TABLE messages
    ADD COLUMN replay_of text,
    ADD CONSTRAINT messages_replay_of_check
        CHECK (replay_of IS NULL OR (octet_length(replay_of) BETWEEN 1 AND 255
                                     AND replay_of !~ '[[:cntrl:]]'));
