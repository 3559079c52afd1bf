//! TLS to every server, the way users' secured servers require it: PostgreSQL with
//! `verify-full` against a private CA (the stack's, from `scripts/stack.sh`), RabbitMQ over
//! `amqps://` with that CA and a client certificate, passwords from files that never show
//! up in the output, and a wrong CA refused with an error that says what to check.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use outbox_consumer::{rabbitmq::RabbitMqSource, Deduplicator, Handler, HandlerError, Incoming};
use outbox_tests::{enqueue_all, keyed_messages, topic, Consumer, RelayProcess, TestDb};
use sqlx::{postgres::PgPoolOptions, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn tls_dir() -> PathBuf {
    std::env::var("OUTBOX_TEST_TLS_DIR")
        .expect("OUTBOX_TEST_TLS_DIR is not set: run the tests with scripts/test.sh")
        .into()
}

fn amqps_url() -> String {
    std::env::var("AMQPS_URL").expect("AMQPS_URL is not set: run the tests with scripts/test.sh")
}

fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay-under-test")
}

/// `url` with host `localhost` (the name in the server certificate), the given user and
/// no password, and `query` appended.
fn tls_url(url: &str, user: &str, query: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("localhost")).unwrap();
    u.set_username(user).unwrap();
    u.set_password(None).unwrap();
    u.set_query((!query.is_empty()).then_some(query));
    u.to_string()
}

/// A login role with a password nobody else uses, so the test can look for it in the output.
async fn role_with_password(db: &TestDb) -> (String, String) {
    let role = format!("tls_{}", Uuid::new_v4().simple());
    let password = format!("pw-{}", Uuid::new_v4().simple());
    sqlx::query(&format!(
        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    (role, password)
}

fn secret_file(dir: &tempdir::Dir, name: &str, content: &str) -> PathBuf {
    let path = dir.path().join(name);
    // A trailing newline, as `echo secret > file` and most secret mounts leave it.
    std::fs::write(&path, format!("{content}\n")).unwrap();
    path
}

/// A throwaway directory, removed on drop.
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!("outbox-tls-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Records each handled message id.
struct Record;

impl Handler for Record {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO tls_effects (message_id) VALUES ($1)")
                .bind(m.message_id)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn relay_and_consumer_use_verify_full_postgres_and_amqps_with_passwords_from_files() {
    let db = TestDb::new().await;
    let (role, password) = role_with_password(&db).await;
    let tls = tls_dir();
    let ca = tls.join("ca.crt");
    let files = tempdir::Dir::new();
    let db_password = secret_file(&files, "db-password", &password);
    let amqp_password = secret_file(&files, "amqp-password", "guest");
    let identity_password = secret_file(&files, "p12-password", "outbox");

    let q = topic("tls");
    Consumer::connect().await.declare(&q).await;

    // The relay: settings as a user would give them, secrets in files.
    let mut relay = RelayProcess::spawn(
        relay_bin(),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", tls_url(&db.url, &role, "")),
            (
                "OUTBOX__DATABASE__PASSWORD_FILE",
                db_password.display().to_string(),
            ),
            ("OUTBOX__DATABASE__SSL_MODE", "verify-full".into()),
            ("OUTBOX__DATABASE__SSL_ROOT_CERT", ca.display().to_string()),
            ("OUTBOX__RABBITMQ__URL", tls_url(&amqps_url(), "guest", "")),
            (
                "OUTBOX__RABBITMQ__PASSWORD_FILE",
                amqp_password.display().to_string(),
            ),
            ("OUTBOX__RABBITMQ__TLS__CA_FILE", ca.display().to_string()),
            (
                "OUTBOX__RABBITMQ__TLS__CLIENT_IDENTITY_FILE",
                tls.join("client.p12").display().to_string(),
            ),
            (
                "OUTBOX__RABBITMQ__TLS__CLIENT_IDENTITY_PASSWORD_FILE",
                identity_password.display().to_string(),
            ),
            ("OUTBOX__RELAY__POLL_INTERVAL", "100ms".into()),
        ],
    );

    // The consumer: its pool with libpq-style URL parameters, its source over amqps.
    let consumer_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}&application_name=tls-consumer",
        db.url
            .replace("127.0.0.1", "localhost")
            .split('?')
            .next()
            .unwrap(),
        ca.display()
    );
    let consumer_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&consumer_url)
        .await
        .expect("the consumer connects with verify-full");
    sqlx::query("CREATE TABLE tls_effects (message_id uuid PRIMARY KEY)")
        .execute(&consumer_pool)
        .await
        .unwrap();
    let dedup = Deduplicator::new(consumer_pool.clone(), "tls").unwrap();
    dedup.migrate().await.unwrap();
    let source = RabbitMqSource::new(amqps_url(), q.clone()).with_tls(
        outbox_consumer::rabbitmq::Tls::default()
            .with_ca_pem(std::fs::read_to_string(&ca).unwrap())
            .with_client_identity(std::fs::read(tls.join("client.p12")).unwrap(), "outbox"),
    );
    let shutdown = CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { source.run(dedup, Arc::new(Record), shutdown).await }
    });

    let msgs = keyed_messages(&q, 0..40, 4);
    enqueue_all(&db, &msgs).await;
    let start = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tls_effects")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n == 40 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{n} of 40 messages handled over TLS; relay output:\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every PostgreSQL session of the relay and of the consumer is encrypted.
    let sessions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.application_name IN ('outbox-relay', 'tls-consumer')",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for app in ["outbox-relay", "tls-consumer"] {
        assert!(
            sessions.iter().any(|(a, _)| a == app),
            "no session of {app}: {sessions:?}"
        );
    }
    assert!(
        sessions.iter().all(|(_, ssl)| *ssl),
        "a session without TLS: {sessions:?}"
    );

    shutdown.cancel();
    consuming.await.unwrap().unwrap();
    relay.terminate();
    assert!(relay.exit(Duration::from_secs(30)).await.success());
    let out = relay.output();
    assert!(
        !out.contains(&password),
        "the database password leaked:\n{out}"
    );
    assert!(out.contains("connected to RabbitMQ"), "{out}");
}

#[tokio::test]
async fn a_postgres_server_certificate_from_another_ca_is_refused_naming_tls() {
    let db = TestDb::new().await;
    let wrong_ca = tls_dir().join("other-ca.crt");
    for cmd in ["status", "run"] {
        let mut p = RelayProcess::spawn(
            relay_bin(),
            &[cmd],
            &[
                (
                    "OUTBOX__DATABASE__URL",
                    db.url.replace("127.0.0.1", "localhost"),
                ),
                ("OUTBOX__DATABASE__SSL_MODE", "verify-full".into()),
                (
                    "OUTBOX__DATABASE__SSL_ROOT_CERT",
                    wrong_ca.display().to_string(),
                ),
                ("OUTBOX__RABBITMQ__URL", outbox_tests::amqp_url()),
            ],
        );
        let status = p.exit(Duration::from_secs(20)).await;
        let out = p.output();
        assert_eq!(status.code(), Some(1), "{cmd}: {out}");
        assert!(
            out.contains("certificate") && out.contains("PostgreSQL"),
            "{cmd}: the error should say the server certificate was refused:\n{out}"
        );
    }
}

#[tokio::test]
async fn an_amqps_broker_certificate_from_another_ca_stops_the_relay_naming_the_setting() {
    let db = TestDb::new().await;
    let mut p = RelayProcess::spawn(
        relay_bin(),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", tls_url(&amqps_url(), "guest", "")),
            (
                "OUTBOX__RABBITMQ__PASSWORD_FILE",
                "/nonexistent/amqp-password".into(),
            ),
        ],
    );
    // A password file that is not there: a configuration error naming it, at once.
    let status = p.exit(Duration::from_secs(20)).await;
    let out = p.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("rabbitmq.password_file: cannot read"), "{out}");

    let mut p = RelayProcess::spawn(
        relay_bin(),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqps_url()),
            (
                "OUTBOX__RABBITMQ__TLS__CA_FILE",
                tls_dir().join("other-ca.crt").display().to_string(),
            ),
        ],
    );
    let status = p.exit(Duration::from_secs(20)).await;
    let out = p.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("certificate") && out.contains("rabbitmq.tls.ca_file"),
        "the error should name the certificate and the setting:\n{out}"
    );
}

#[tokio::test]
async fn a_client_identity_with_the_wrong_password_is_a_configuration_error() {
    let db = TestDb::new().await;
    let mut p = RelayProcess::spawn(
        relay_bin(),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqps_url()),
            (
                "OUTBOX__RABBITMQ__TLS__CLIENT_IDENTITY_FILE",
                tls_dir().join("client.p12").display().to_string(),
            ),
            (
                "OUTBOX__RABBITMQ__TLS__CLIENT_IDENTITY_PASSWORD",
                "not-the-password".into(),
            ),
        ],
    );
    let status = p.exit(Duration::from_secs(20)).await;
    let out = p.output();
    assert_ne!(status.code(), Some(0), "{out}");
    assert!(
        out.contains("rabbitmq.tls.client_identity_file")
            && out.contains("client_identity_password"),
        "{out}"
    );
    assert!(
        !out.contains("not-the-password"),
        "the password leaked:\n{out}"
    );
}
