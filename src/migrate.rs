//! Applies the SQL files in `migrations/` to the outbox schema.

use sqlx::{Connection, PgConnection};

use crate::{Error, Schema};

/// One migration file, compiled into the library.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_outbox.sql",
    sql: include_str!("../migrations/0001_outbox.sql"),
}];

/// The newest schema version this library ships.
pub const LATEST_VERSION: i32 = 1;

/// Creates `schema` if needed and applies the migrations it has not seen yet, each in its
/// own transaction, recording them in `schema.schema_migrations`. Safe to call from several
/// processes at once: a transaction-scoped advisory lock serialises them. Returns the
/// versions applied by this call.
pub(crate) async fn run(conn: &mut PgConnection, schema: &Schema) -> Result<Vec<i32>, Error> {
    let mut applied_now = Vec::new();
    for migration in MIGRATIONS {
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
        if let Some(found) = newest.filter(|v| *v > LATEST_VERSION) {
            return Err(Error::SchemaTooNew {
                schema: schema.to_string(),
                found,
                known: LATEST_VERSION,
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
        tracing::info!(%schema, version = migration.version, name = migration.name, "applied outbox migration");
        applied_now.push(migration.version);
    }
    Ok(applied_now)
}
