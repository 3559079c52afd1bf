//! A suspect waiting to go alone while nothing may start costs no CPU.
//!
//! Alone in its test binary: it measures the process's CPU time. The publisher is scripted
//! (fault injection no broker gives on demand): a message whose confirm never comes (a
//! partition that does not answer), another that fails as "broker unavailable" while it is
//! out, and a suspect that waits behind them. The relay then may start nothing until the
//! silent message comes back, and must sleep meanwhile, not spin.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use outbox::Message;
use outbox_relay::{
    envelope::Envelope,
    publish::{Confirm, PublishError, Publisher},
};
use outbox_tests::{enqueue_all, relay_with, run_relay, settings, topic, TestDb};

/// Scripted outcomes by payload: `suspect` is lost with the connection twice (once among
/// others, so it becomes a suspect, then alone, which charges it an attempt), then
/// confirmed; `silent` is never confirmed; `unavailable` fails as "broker unavailable" three
/// seconds after it is handed over.
#[derive(Default)]
struct Scripted {
    attempts: Mutex<HashMap<Vec<u8>, u32>>,
}

impl Scripted {
    fn attempts(&self, payload: &[u8]) -> u32 {
        *self.attempts.lock().unwrap().get(payload).unwrap_or(&0)
    }
}

impl Publisher for Scripted {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        async { Ok(()) }.boxed()
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        match self.send(envelope) {
            Ok(confirm) => confirm,
            Err(e) => async move { Err(e) }.boxed(),
        }
    }

    fn key_depth(&self) -> u32 {
        u32::MAX
    }

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(envelope.payload.clone()).or_default();
            *n += 1;
            *n
        };
        Ok(match (envelope.payload.as_slice(), attempt) {
            (b"suspect", 1 | 2) => async {
                Err(PublishError::Disconnected(
                    "scripted: connection lost".into(),
                ))
            }
            .boxed(),
            (b"silent", _) => futures::future::pending().boxed(),
            (b"unavailable", _) => async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Err(PublishError::Unavailable(
                    "scripted: broker unavailable".into(),
                ))
            }
            .boxed(),
            _ => async { Ok(()) }.boxed(),
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        async { Ok(()) }.boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

/// User and system CPU time of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_waiting_while_nothing_may_start_costs_no_cpu() {
    let db = TestDb::new().await;
    let t = topic("suspect-wait");
    let mut s = settings(&db);
    s.relay.workers = 1;
    s.relay.shutdown_grace = Duration::from_secs(1);
    // The suspect's attempt charged while it was alone makes it wait 2 s before it is read
    // again: by then the silent message and the unavailable one are out.
    s.retry.initial_delay = Duration::from_secs(2);
    s.retry.max_delay = Duration::from_secs(2);
    s.retry.max_attempts = 10;
    let scripted = Arc::new(Scripted::default());
    let relay = run_relay(relay_with(&s, scripted.clone()).await);

    let one = |payload: &[u8], key: &str| {
        Message::new(&t, payload.to_vec())
            .unwrap()
            .with_key(key)
            .unwrap()
    };
    enqueue_all(&db, &[one(b"suspect", "s")]).await;
    let started = Instant::now();
    while scripted.attempts(b"suspect") < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the suspect was not published alone within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    enqueue_all(&db, &[one(b"silent", "a"), one(b"unavailable", "b")]).await;
    // The suspect comes back after its 2 s and waits to go alone; the unavailable message
    // fails at 3 s (nothing may start any more) while the silent one stays out for good; the
    // suspect's 5 s of waiting are over by 8 s.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        (
            scripted.attempts(b"silent"),
            scripted.attempts(b"unavailable")
        ),
        (1, 1),
        "the silent and the unavailable message each went out once"
    );
    assert_eq!(
        scripted.attempts(b"suspect"),
        2,
        "the suspect went out while the silent message was still out"
    );
    let before = cpu_time();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let used = cpu_time() - before;
    let over = window.elapsed();
    relay.stop().await;
    assert!(
        used < Duration::from_millis(200),
        "the relay used {used:?} of CPU in {over:?} while a suspect waited and nothing could start"
    );
}
