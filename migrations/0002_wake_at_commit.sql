-- Outbox schema, version 2: the wake-up is decided at commit.
--
-- Version 1's statement trigger looked for a waiting relay when the INSERT ran, but a NOTIFY
-- is sent at commit: a relay that registered itself as idle in between was not woken, and
-- waited a whole poll interval. The trigger is now a deferred constraint trigger. It runs at
-- commit, once per transaction and outbox schema (a transaction-local setting remembers that
-- it ran), and reads relay_waiters then. Several notifications in one transaction are still
-- folded into one by PostgreSQL.
DROP TRIGGER messages_wake_relays ON messages;

CREATE OR REPLACE FUNCTION wake_relays() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    done text := 'outbox.woke_' || TG_TABLE_SCHEMA;
BEGIN
    IF current_setting(done, true) = '1' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config(done, '1', true);
    IF EXISTS (SELECT 1 FROM relay_waiters WHERE expires_at > clock_timestamp()) THEN
        PERFORM pg_notify('outbox_wakeup_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER messages_wake_relays
    AFTER INSERT ON messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION wake_relays();
