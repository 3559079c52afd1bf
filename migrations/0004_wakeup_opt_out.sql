-- Outbox schema, version 4: a transaction can write to the outbox without the wake-up.
--
-- PostgreSQL refuses `PREPARE TRANSACTION` in a transaction that ran NOTIFY, and version 2's
-- deferred trigger sends its NOTIFY at PREPARE. A producer under a two-phase-commit (XA/JTA)
-- transaction manager sets `outbox.wakeup` to `off` in its transaction
-- (`SET LOCAL outbox.wakeup = 'off'`, at any point before PREPARE) or for its session, and
-- the trigger then sends nothing: the relay finds the row by polling, within
-- `relay.poll_interval`. Writers and their grants are unchanged.
CREATE OR REPLACE FUNCTION wake_relays() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    done text := 'outbox.woke_' || TG_TABLE_SCHEMA;
BEGIN
    IF current_setting(done, true) = '1'
       OR lower(coalesce(current_setting('outbox.wakeup', true), '')) IN ('off', 'false', '0') THEN
        RETURN NULL;
    END IF;
    PERFORM set_config(done, '1', true);
    IF EXISTS (SELECT 1 FROM relay_waiters WHERE expires_at > clock_timestamp()) THEN
        PERFORM pg_notify('outbox_wakeup_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END;
$$;
