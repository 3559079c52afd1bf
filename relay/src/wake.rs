//! Wake-ups: the LISTEN task, and the plumbing that tells it when a worker is idle.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use outbox::Backoff;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::store::Store;

/// Wake-up plumbing between the workers and the LISTEN task. The relay is registered for
/// wake-ups while any of its workers is idle, so an idle worker is woken within
/// milliseconds even while the others are busy.
#[derive(Default)]
pub(crate) struct Wake {
    pub(crate) notify: Notify,
    pub(crate) some_idle: Notify,
    idle: AtomicUsize,
}

impl Wake {
    pub(crate) fn went_idle(&self) {
        if self.idle.fetch_add(1, Ordering::SeqCst) == 0 {
            self.some_idle.notify_one();
        }
    }

    pub(crate) fn busy(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn is_any_idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst) > 0
    }
}

/// LISTENs for inserts. While a worker is idle relay `relay_id` is registered in
/// `relay_waiters`, so producers' inserts send a NOTIFY; while all are busy it is not, so
/// producers' commits do not pay for NOTIFY. `timing`: the poll interval (registrations
/// last three of them) and the longest wait between reconnects.
pub(crate) async fn listen(
    store: &Store,
    relay_id: Uuid,
    timing: (Duration, Duration),
    wake: &Wake,
    shutdown: CancellationToken,
) {
    let (poll_interval, reconnect_max_delay) = timing;
    /// After registering, how soon the workers look once more.
    const RECHECK: Duration = Duration::from_millis(50);
    let channel = store.schema().wakeup_channel();
    let mut backoff = Backoff::new(reconnect_max_delay);
    let ttl = poll_interval * 3;
    'connect: while !shutdown.is_cancelled() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "cannot LISTEN for wake-ups; polling meanwhile");
                tokio::select! { _ = tokio::time::sleep(wait) => continue, _ = shutdown.cancelled() => break }
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            let wait = backoff.next_delay();
            tracing::warn!(error = %e, retry_in = ?wait, "cannot LISTEN for wake-ups; polling meanwhile");
            tokio::select! { _ = tokio::time::sleep(wait) => continue, _ = shutdown.cancelled() => break }
        }
        backoff.reset();
        let mut registered = false;
        let mut recheck: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(poll_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'connect,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        wake.notify.notify_waiters();
                        if registered && store.remove_waiter(relay_id).await.is_ok() {
                            registered = false;
                        }
                    }
                    Ok(None) | Err(_) => {
                        // Connection lost: anything may have been missed.
                        wake.notify.notify_waiters();
                        continue 'connect;
                    }
                },
                _ = wake.some_idle.notified(), if !registered => {
                    if store.register_waiter(relay_id, ttl).await.is_ok() {
                        registered = true;
                        // Rows committed before the registration sent no NOTIFY; nor did
                        // a commit whose trigger ran just before it and was still being
                        // flushed: look again now, and once more shortly.
                        wake.notify.notify_waiters();
                        recheck = Some(tokio::time::Instant::now() + RECHECK);
                    }
                }
                _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)), if recheck.is_some() => {
                    recheck = None;
                    wake.notify.notify_waiters();
                }
                _ = tick.tick() => {
                    if registered {
                        let refreshed = if wake.is_any_idle() {
                            store.register_waiter(relay_id, ttl).await
                        } else {
                            store.remove_waiter(relay_id).await.map(|()| registered = false)
                        };
                        if let Err(e) = refreshed {
                            tracing::debug!(error = %e, "wake-up registration not refreshed");
                        }
                    }
                }
            }
        }
    }
    let _ = store.remove_waiter(relay_id).await;
}
