//! Applies SQL migrations to a schema: the outbox's own (`migrations/`), and, through
//! [`apply`], those of the libraries built on it.

use sqlx::{Connection, PgConnection};

use crate::{Error, Schema};

/// One migration file, compiled into a library.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version; migrations apply in ascending order.
    pub version: i32,
    /// Its file name, for messages.
    pub name: &'static str,
    /// Its SQL, with unqualified names (it runs with the schema first on the search path).
    pub sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_outbox.sql",
        sql: include_str!("../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_wake_at_commit.sql",
        sql: include_str!("../migrations/0002_wake_at_commit.sql"),
    },
    Migration {
        version: 3,
        name: "0003_held_back.sql",
        sql: include_str!("../migrations/0003_held_back.sql"),
    },
    Migration {
        version: 4,
        name: "0004_wakeup_opt_out.sql",
        sql: include_str!("../migrations/0004_wakeup_opt_out.sql"),
    },
    Migration {
        version: 5,
        name: "0005_failed_heads.sql",
        sql: include_str!("../migrations/0005_failed_heads.sql"),
    },
    Migration {
        version: 6,
        name: "0006_wake_once.sql",
        sql: include_str!("../migrations/0006_wake_once.sql"),
    },
    Migration {
        version: 7,
        name: "0007_replay.sql",
        sql: include_str!("../migrations/0007_replay.sql"),
    },
];

/// The newest schema version this library ships.
pub const LATEST_VERSION: i32 = 7;

/// Creates `schema` if needed and applies the migrations it has not seen yet, each in its
/// own transaction, recording them in `schema.schema_migrations`. Safe to call from several
/// processes at once: a transaction-scoped advisory lock serialises them. Returns the
/// versions applied by this call.
pub(crate) async fn run(conn: &mut PgConnection, schema: &Schema) -> Result<Vec<i32>, Error> {
    apply(conn, schema, MIGRATIONS).await
}

/// Creates `schema` if needed and applies those of `migrations` (in ascending version order)
/// that it has not seen yet, as [`crate::Outbox::migrate`] does for the outbox's own.
pub async fn apply(
    conn: &mut PgConnection,
    schema: &Schema,
    migrations: &[Migration],
) -> Result<Vec<i32>, Error> {
    let latest = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    let mut applied_now = Vec::new();
    for migration in migrations {
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("outbox-migrate:{schema}"))
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 checksum   text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .execute(&mut *tx)
        .await?;
        let newest: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT max(version) FROM {schema}.schema_migrations"
        ))
        .fetch_one(&mut *tx)
        .await?;
        if let Some(found) = newest.filter(|v| *v > latest) {
            return Err(Error::SchemaTooNew {
                schema: schema.to_string(),
                found,
                known: latest,
            });
        }
        let same: Option<bool> = sqlx::query_scalar(&format!(
            "SELECT checksum = md5($2) FROM {schema}.schema_migrations WHERE version = $1"
        ))
        .bind(migration.version)
        .bind(migration.sql)
        .fetch_optional(&mut *tx)
        .await?;
        match same {
            Some(true) => continue,
            Some(false) => {
                return Err(Error::MigrationChanged {
                    version: migration.version,
                    name: migration.name,
                })
            }
            None => {}
        }
        sqlx::query(&format!("SET LOCAL search_path TO {schema}"))
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, md5($3))"
        ))
        .bind(migration.version)
        .bind(migration.name)
        .bind(migration.sql)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%schema, version = migration.version, name = migration.name, "applied migration");
        applied_now.push(migration.version);
    }
    Ok(applied_now)
}
