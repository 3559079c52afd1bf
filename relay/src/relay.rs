//! The [`Relay`] and its supervisor: the workers (`pipeline`), the partition keeper
//! ([`crate::leases`]), the wake-ups ([`crate::wake`]) and the chores ([`crate::chores`]) run
//! as tasks of one `run`, which drains them on shutdown. The suspect rule lives in
//! [`crate::suspects`], what a failure comes to in [`crate::verdict`].

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use crate::error::{error_chain, RelayError};
pub use crate::pipeline::WorkerOptions;
use crate::{
    error::panic_message,
    health::Heartbeats,
    pipeline::{self, Context},
    publish::Publisher,
    retry::RetryPolicy,
    store::{Retention, Store},
    suspects::{SharedAlone, Suspects},
    wake::{self, Wake},
};

/// How a relay runs (from `[relay]`; see [`crate::startup`]).
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Workers, each streaming a fixed subset of the relay's partitions.
    pub workers: u32,
    /// Wake up on PostgreSQL NOTIFY when new rows commit, instead of waiting for the poll.
    pub listen: bool,
    /// On shutdown, how long in-flight publishes may take to be confirmed.
    pub shutdown_grace: Duration,
    /// How each worker reads and holds rows; its lease and reconnect timings are the
    /// relay's.
    pub worker: WorkerOptions,
}

impl RelayOptions {
    /// How long a partition lease lasts (renewed every third of it).
    pub fn lease(&self) -> Duration {
        self.worker.lease
    }
}

/// A relay: one store, one publisher, one policy.
pub struct Relay {
    pub(crate) store: Store,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) policy: RetryPolicy,
    pub(crate) options: RelayOptions,
    pub(crate) retention: Retention,
    pub(crate) id: Uuid,
    pub(crate) owned: tokio::sync::watch::Sender<Vec<i16>>,
    /// Per worker, the partitions it has rows of in hand or a read under way from: they
    /// change hands only once those are settled.
    pub(crate) busy: std::sync::Mutex<Vec<Vec<i16>>>,
    /// Partitions leased but no longer read, waiting for their rows to be settled.
    pub(crate) draining: std::sync::Mutex<Vec<i16>>,
    pub(crate) heartbeats: Heartbeats,
    /// Reads hold it shared while they run; the partition keeper holds it alone while
    /// partitions change hands (see [`Relay::rebalance`]).
    pub(crate) handover: tokio::sync::RwLock<()>,
    /// See [`Relay::inject_handover_delay`].
    pub(crate) handover_delay: std::sync::atomic::AtomicU64,
    pub(crate) observe: Observe,
    pub(crate) suspects: Suspects,
    /// The suspect rule's "alone" across the workers, for a pipelining publisher.
    pub(crate) shared_alone: SharedAlone,
}

/// Health and metrics options of a relay (see [`Relay::with_observe`]).
#[derive(Debug, Clone, Copy)]
pub struct Observe {
    /// How often the backlog gauges are read from PostgreSQL; `None` reads none.
    pub backlog_interval: Option<Duration>,
    /// A loop silent for longer than this makes the relay not live.
    pub stall_timeout: Duration,
}

impl Default for Observe {
    fn default() -> Self {
        Self {
            backlog_interval: None,
            stall_timeout: Duration::from_secs(300),
        }
    }
}

/// The heartbeat slot of the partition keeper; workers use slots `0..workers`.
pub(crate) fn keeper_slot(options: &RelayOptions) -> usize {
    options.workers as usize
}

impl Relay {
    /// A relay over `store` publishing with `publisher`.
    pub fn new(
        store: Store,
        publisher: Arc<dyn Publisher>,
        policy: RetryPolicy,
        options: RelayOptions,
        retention: Retention,
    ) -> Self {
        let (owned, _) = tokio::sync::watch::channel(Vec::new());
        let busy = std::sync::Mutex::new(vec![Vec::new(); options.workers as usize]);
        let mut loops: Vec<String> = (0..options.workers)
            .map(|w| format!("worker {w}"))
            .collect();
        loops.push("partition keeper".to_owned());
        Self {
            store,
            publisher,
            policy,
            options,
            retention,
            id: Uuid::new_v4(),
            owned,
            busy,
            draining: std::sync::Mutex::new(Vec::new()),
            heartbeats: Heartbeats::new(loops),
            handover: tokio::sync::RwLock::new(()),
            handover_delay: std::sync::atomic::AtomicU64::new(0),
            observe: Observe::default(),
            suspects: Suspects::default(),
            shared_alone: SharedAlone::default(),
        }
    }

    /// Sets the health and metrics options.
    pub fn with_observe(mut self, observe: Observe) -> Self {
        self.observe = observe;
        self
    }

    /// `Ok` while every loop made progress within the stall timeout; otherwise the silent
    /// loops and for how long.
    pub fn liveness(&self) -> Result<(), String> {
        let stalled = self.heartbeats.stalled(self.observe.stall_timeout);
        if stalled.is_empty() {
            return Ok(());
        }
        Err(stalled
            .iter()
            .map(|(name, silent)| format!("{name} silent for {}s", silent.as_secs()))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// `Ok` when PostgreSQL answers a query and the broker connection is up; otherwise
    /// what is down.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        let probe = Duration::from_secs(2);
        let (db, broker) = tokio::join!(
            tokio::time::timeout(probe, sqlx::query("SELECT 1").execute(self.store.pool())),
            self.publisher.health()
        );
        let mut problems = Vec::new();
        match db {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("PostgreSQL: {}", error_chain(&e))),
            Err(_) => problems.push(format!("PostgreSQL: no answer within {probe:?}")),
        }
        crate::metrics::broker_up(broker.is_ok());
        if let Err(e) = broker {
            problems.push(e);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// This relay instance's id (its partition leases and wake-up registration use it).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Worker `worker`'s view of this relay.
    fn context<'a>(&'a self, worker: u32, wake: &'a Wake) -> Context<'a> {
        Context {
            worker,
            workers: self.options.workers,
            relay_id: self.id,
            options: &self.options.worker,
            store: &self.store,
            publisher: self.publisher.as_ref(),
            policy: &self.policy,
            suspects: &self.suspects,
            shared_alone: &self.shared_alone,
            heartbeats: &self.heartbeats,
            busy: &self.busy,
            owned: &self.owned,
            handover: &self.handover,
            wake,
        }
    }

    /// Runs `workers` batch loops until `shutdown` fires, then lets in-flight batches
    /// finish for up to `shutdown_grace` and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RelayError> {
        let abort = CancellationToken::new();
        let wake = Arc::new(Wake::default());
        let mut tasks = JoinSet::new();
        if self.options.listen {
            let (relay, wake, shutdown) = (self.clone(), wake.clone(), shutdown.clone());
            tasks.spawn(async move {
                let o = &relay.options.worker;
                let timing = (o.poll_interval, o.reconnect_max_delay);
                wake::listen(&relay.store, relay.id, timing, &wake, shutdown).await;
                Ok(())
            });
        }
        // The leases are renewed until the workers have settled their last messages.
        let workers_done = CancellationToken::new();
        {
            let relay = self.clone();
            let (shutdown, done) = (shutdown.clone(), workers_done.clone());
            tasks.spawn(async move {
                relay.keep_partitions(shutdown, done).await;
                Ok(())
            });
        }
        {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.purge_expired(shutdown).await;
                Ok(())
            });
        }
        {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.keep_held_back(shutdown).await;
                Ok(())
            });
        }
        if let Some(every) = self.observe.backlog_interval {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.observe_backlog(every, shutdown).await;
                Ok(())
            });
        }
        let running = Arc::new(AtomicUsize::new(self.options.workers as usize));
        for worker in 0..self.options.workers {
            let relay = self.clone();
            let (wake, shutdown, abort) = (wake.clone(), shutdown.clone(), abort.clone());
            let (running, done) = (running.clone(), workers_done.clone());
            tasks.spawn(async move {
                let result = pipeline::run(relay.context(worker, &wake), shutdown, abort).await;
                if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                    done.cancel();
                }
                result
            });
        }
        tracing::info!(relay_id = %self.id, workers = self.options.workers, "relay running");

        let grace = self.options.shutdown_grace;
        let mut result = Ok(());
        let mut grace_timer = std::pin::pin!(async {
            shutdown.cancelled().await;
            tracing::info!(grace = ?grace, "shutting down: no new claims, waiting for in-flight publishes");
            tokio::time::sleep(grace).await;
        });
        let mut grace_over = false;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        result = Err(e);
                        shutdown.cancel();
                        abort.cancel();
                    }
                    Some(Err(join)) => {
                        let what = panic_message(join);
                        tracing::error!(error = %what, "relay task panicked; stopping");
                        if result.is_ok() {
                            result = Err(RelayError::Panicked(what));
                        }
                        shutdown.cancel();
                        // A worker that panicked never says it is done.
                        workers_done.cancel();
                    }
                },
                _ = &mut grace_timer, if !grace_over => {
                    grace_over = true;
                    abort.cancel();
                }
            }
        }
        self.publisher.close().await;
        match self.store.release_all(self.id).await {
            Ok(()) => tracing::info!("relay stopped; partitions released"),
            Err(e) => {
                tracing::warn!(error = %e, "relay stopped; partitions not released, they expire after relay.lease")
            }
        }
        result
    }
}
