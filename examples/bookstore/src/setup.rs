//! The three services' schemas, roles and grants, created by a deployment step (here: the
//! database's owner), as a team's own migration tool would.

use anyhow::Context;
use sqlx::PgPool;

/// Every book costs this much, and the merchant is credited this much per order.
pub const PRICE: i32 = 100;

/// Customers and their opening balances.
pub const CUSTOMERS: &[(&str, i32)] = &[("alice", 400), ("bob", 300), ("carol", 200), ("dave", 0)];

/// Books and the copies in the warehouse at opening.
pub const BOOKS: &[(&str, i32)] = &[("Dune", 4), ("Emma", 3), ("The Hobbit", 1)];

/// Who orders what, in turn (cycled for more orders). Dave has no money; the second order
/// for The Hobbit finds it out of stock.
pub const SCHEDULE: &[(&str, &str)] = &[
    ("alice", "Dune"),
    ("bob", "The Hobbit"),
    ("dave", "Emma"),
    ("carol", "Dune"),
    ("alice", "The Hobbit"),
    ("bob", "Emma"),
    ("carol", "Emma"),
    ("carol", "Dune"),
    ("alice", "Dune"),
    ("dave", "The Hobbit"),
];

/// The orders paid while the merchant's consumer is down, whose credits the story loses and
/// repairs: after the schedule, these customers can pay and these books are in stock.
pub const REPAIR_ORDERS: &[(&str, &str)] = &[("alice", "Dune"), ("bob", "Emma")];

/// The account service's outbox schema.
pub const OUTBOX_SCHEMA: &str = "account_outbox";
/// The account's consumer (dedup) schema, for the replies.
pub const ACCOUNT_INBOX: &str = "account_inbox";
/// The warehouse's consumer (dedup) schema.
pub const WAREHOUSE_INBOX: &str = "warehouse_inbox";
/// The warehouse's outbox schema, for its replies.
pub const WAREHOUSE_OUTBOX: &str = "warehouse_outbox";
/// The merchant's consumer (dedup) schema.
pub const MERCHANT_INBOX: &str = "merchant_inbox";
/// The merchant's outbox schema, for its replies.
pub const MERCHANT_OUTBOX: &str = "merchant_outbox";
/// The account's consumer group for the warehouse's replies.
pub const SHIPPED_GROUP: &str = "account-shipped";
/// The account's consumer group for the merchant's replies.
pub const CREDITED_GROUP: &str = "account-credited";
/// Every outbox schema, the account's first.
pub const OUTBOXES: [&str; 3] = [OUTBOX_SCHEMA, WAREHOUSE_OUTBOX, MERCHANT_OUTBOX];
/// Every consumer schema.
pub const INBOXES: [&str; 3] = [ACCOUNT_INBOX, WAREHOUSE_INBOX, MERCHANT_INBOX];

/// A login role of one service, with a password made for this run.
#[derive(Debug, Clone)]
pub struct Role {
    /// The role's name.
    pub name: &'static str,
    /// Its password.
    pub password: String,
    /// The database URL with this role's credentials.
    pub url: String,
}

/// The roles of the run: one per service, one for the relay, one for reconciliation.
#[derive(Debug, Clone)]
pub struct Roles {
    /// The account service: its own schema, and insert-only on the outbox.
    pub account: Role,
    /// The warehouse: its own schema and consumer schema.
    pub warehouse: Role,
    /// The merchant: its own schema and consumer schema.
    pub merchant: Role,
    /// The relay sidecars (one per service): the README's relay grants on each outbox.
    pub relay: Role,
    /// Reconciliation: read-only, no payloads; and the replay grants on the account's
    /// outbox, for `reconcile --repair`.
    pub auditor: Role,
}

impl Roles {
    /// Roles for the database at `admin_url`.
    pub fn new(admin_url: &str) -> anyhow::Result<Self> {
        let role = |name: &'static str| -> anyhow::Result<Role> {
            let password = uuid::Uuid::new_v4().simple().to_string();
            let mut url = url::Url::parse(admin_url).context("the database URL")?;
            url.set_username(name)
                .map_err(|()| anyhow::anyhow!("the database URL cannot take a user name"))?;
            url.set_password(Some(&password))
                .map_err(|()| anyhow::anyhow!("the database URL cannot take a password"))?;
            Ok(Role {
                name,
                password,
                url: url.to_string(),
            })
        };
        Ok(Self {
            account: role("bookstore_account")?,
            warehouse: role("bookstore_warehouse")?,
            merchant: role("bookstore_merchant")?,
            relay: role("bookstore_relay")?,
            auditor: role("bookstore_auditor")?,
        })
    }

    fn all(&self) -> [&Role; 5] {
        [
            &self.account,
            &self.warehouse,
            &self.merchant,
            &self.relay,
            &self.auditor,
        ]
    }
}

/// Drops what an earlier run left in this database, creates the roles (or resets their
/// passwords) and the services' own schemas, tables and opening data.
pub async fn create(admin: &PgPool, roles: &Roles) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "DROP SCHEMA IF EXISTS account, account_outbox, account_inbox, warehouse,
                               warehouse_inbox, warehouse_outbox, merchant, merchant_inbox,
                               merchant_outbox CASCADE",
    )
    .execute(admin)
    .await
    .context("dropping an earlier run's schemas")?;
    for role in roles.all() {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role.name)
                .fetch_one(admin)
                .await?;
        let verb = if exists { "ALTER" } else { "CREATE" };
        // Passwords are generated hex: safe to place in the statement.
        sqlx::raw_sql(&format!(
            "{verb} ROLE {} LOGIN PASSWORD '{}'",
            role.name, role.password
        ))
        .execute(admin)
        .await
        .with_context(|| format!("creating role {}", role.name))?;
    }
    sqlx::raw_sql(
        "CREATE SCHEMA account;
         CREATE TABLE account.customers (
             name    text    PRIMARY KEY,
             balance integer NOT NULL CHECK (balance >= 0)
         );
         CREATE TABLE account.orders (
             id        uuid        PRIMARY KEY,
             number    integer     NOT NULL UNIQUE,
             customer  text        NOT NULL REFERENCES account.customers,
             book      text        NOT NULL,
             price     integer     NOT NULL,
             placed_at timestamptz NOT NULL DEFAULT now()
         );
         -- Each order's steps: the debit, done when the order is placed; shipping and
         -- crediting, in progress until the warehouse's and the merchant's replies arrive.
         -- `replies` counts the replies applied: a second one would show.
         CREATE TABLE account.order_steps (
             order_id uuid    NOT NULL REFERENCES account.orders,
             step     text    NOT NULL CHECK (step IN ('debit', 'shipping', 'crediting')),
             state    text    NOT NULL CHECK (state IN ('in_progress', 'done')),
             replies  integer NOT NULL DEFAULT 0,
             PRIMARY KEY (order_id, step)
         );
         CREATE SCHEMA warehouse;
         CREATE TABLE warehouse.stock (
             book   text    PRIMARY KEY,
             copies integer NOT NULL CHECK (copies >= 0)
         );
         -- No unique constraint on purpose: a second shipment of an order would show.
         CREATE TABLE warehouse.shipments (
             order_id   uuid        NOT NULL,
             book       text        NOT NULL,
             shipped_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE SCHEMA merchant;
         CREATE TABLE merchant.accounts (
             merchant text    PRIMARY KEY,
             balance  integer NOT NULL
         );
         -- Likewise: a second credit of an order would show.
         CREATE TABLE merchant.credits (
             order_id    uuid        NOT NULL,
             amount      integer     NOT NULL,
             credited_at timestamptz NOT NULL DEFAULT now()
         );
         INSERT INTO merchant.accounts VALUES ('bookstore', 0);",
    )
    .execute(admin)
    .await
    .context("creating the services' schemas")?;
    for (name, balance) in CUSTOMERS {
        sqlx::query("INSERT INTO account.customers VALUES ($1, $2)")
            .bind(name)
            .bind(balance)
            .execute(admin)
            .await?;
    }
    for (book, copies) in BOOKS {
        sqlx::query("INSERT INTO warehouse.stock VALUES ($1, $2)")
            .bind(book)
            .bind(copies)
            .execute(admin)
            .await?;
    }
    Ok(())
}

/// Grants each role what its service needs, and nothing else: the README's producer, relay,
/// consumer, reconciliation and replay grants, on this run's schemas.
pub async fn grant(admin: &PgPool, roles: &Roles) -> anyhow::Result<()> {
    let (a, w, m, r, x) = (
        roles.account.name,
        roles.warehouse.name,
        roles.merchant.name,
        roles.relay.name,
        roles.auditor.name,
    );
    let mut sql = format!(
        "-- account: its own tables, and its dedup tables for the replies.
         GRANT USAGE ON SCHEMA account, account_inbox TO {a};
         GRANT SELECT, UPDATE ON account.customers TO {a};
         GRANT SELECT, INSERT ON account.orders TO {a};
         GRANT SELECT, INSERT, UPDATE ON account.order_steps TO {a};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA account_inbox TO {a};
         -- warehouse: its stock and shipments, its dedup tables.
         GRANT USAGE ON SCHEMA warehouse, warehouse_inbox TO {w};
         GRANT SELECT, UPDATE ON warehouse.stock TO {w};
         GRANT INSERT ON warehouse.shipments TO {w};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA warehouse_inbox TO {w};
         -- merchant: its account and credits, its dedup tables.
         GRANT USAGE ON SCHEMA merchant, merchant_inbox TO {m};
         GRANT SELECT, UPDATE ON merchant.accounts TO {m};
         GRANT INSERT ON merchant.credits TO {m};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA merchant_inbox TO {m};
         -- reconciliation of each group's dedup rows and dead letters: no payloads.
         GRANT USAGE ON SCHEMA account_inbox, warehouse_inbox, merchant_inbox TO {x};
         GRANT SELECT ON account_inbox.processed, warehouse_inbox.processed,
             merchant_inbox.processed TO {x};
         GRANT SELECT (id, consumer_group, message_id, source, key, attempts, error, dead_at)
             ON account_inbox.dead_letters, warehouse_inbox.dead_letters,
                merchant_inbox.dead_letters TO {x};
         -- repair: the account's archived messages, written back (README: replay grants).
         GRANT SELECT (payload, headers, content_type) ON account_outbox.delivered TO {x};
         GRANT INSERT (id, topic, key, payload, headers, content_type, replay_of)
             ON account_outbox.messages TO {x};
         GRANT SELECT ON account_outbox.relay_waiters TO {x};"
    );
    // Each service writes to its own outbox (insert-only), each outbox has its relay
    // sidecar, and each is reconciled.
    for (outbox, writer) in [
        (OUTBOX_SCHEMA, a),
        (WAREHOUSE_OUTBOX, w),
        (MERCHANT_OUTBOX, m),
    ] {
        sql += &format!(
            "
         GRANT USAGE ON SCHEMA {outbox} TO {writer}, {r}, {x};
         GRANT INSERT, SELECT (id, seq) ON {outbox}.messages TO {writer};
         GRANT SELECT ON {outbox}.relay_waiters TO {writer};
         GRANT SELECT, UPDATE, DELETE ON {outbox}.messages TO {r};
         GRANT SELECT, UPDATE ON {outbox}.partitions TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE
             ON {outbox}.relays, {outbox}.relay_waiters, {outbox}.delivered,
                {outbox}.discarded TO {r};
         GRANT SELECT (seq, id, topic, key, status, attempts, last_error, created_at, dead_at)
             ON {outbox}.messages TO {x};
         GRANT SELECT (id, seq, topic, key, created_at, delivered_at, attempts)
             ON {outbox}.delivered TO {x};
         GRANT SELECT (id, topic) ON {outbox}.discarded TO {x};
         GRANT SELECT (started_at) ON {outbox}.relays TO {x};"
        );
    }
    sqlx::raw_sql(&sql)
        .execute(admin)
        .await
        .context("granting the services' privileges")?;
    Ok(())
}
