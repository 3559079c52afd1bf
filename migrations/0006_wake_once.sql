-- Outbox schema, version 6: the wake-up is decided once per transaction, not once per row.
--
-- Version 2's deferred row trigger queued one event per inserted row, and at commit
-- PostgreSQL ran `wake_relays()` for each of them: the first decided, the others returned at
-- once, but every row still paid for a queued event and a PL/pgSQL call at commit (about a
-- fifth of a 100-row transaction's commit time). The trigger now has a WHEN condition that
-- is true for the transaction's first row only: it sets a transaction-local flag as it
-- passes, so later rows queue nothing. The one event still runs at commit (or PREPARE), so
-- the decision (is a relay waiting? is `outbox.wakeup` off?) is still taken then.
--
-- The flag is a setting like any other: a savepoint rolled back also rolls it back, with the
-- event it queued, and the next row queues again.
DROP TRIGGER messages_wake_relays ON messages;

DO $migration$
DECLARE
    flag text := 'outbox.wake_queued_' || current_schema();
BEGIN
    EXECUTE format(
        'CREATE CONSTRAINT TRIGGER messages_wake_relays
             AFTER INSERT ON messages
             DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW
             WHEN (CASE WHEN current_setting(%1$L, true) = %2$L THEN false
                        ELSE set_config(%1$L, %2$L, true) = %2$L END)
             EXECUTE FUNCTION wake_relays()',
        flag, '1');
END
$migration$;
