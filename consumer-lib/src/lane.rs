//! A lane: the deliveries of one key (RabbitMQ) or partition (Kafka), handled one at a time
//! in arrival order, each acknowledged only once settled. Both sources run their lanes here.

use std::{future::Future, sync::Arc};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Deduplicator, Handler, Incoming};

/// Settles each delivery from `rx` (retrying in place), then `acknowledge`s it. Stops after
/// the delivery in hand once `stop` fires; a delivery given up while waiting to retry is not
/// acknowledged, so the broker delivers it again.
pub(crate) async fn run<T, H, A, Ack>(
    mut rx: mpsc::Receiver<T>,
    stop: CancellationToken,
    dedup: Deduplicator,
    handler: Arc<H>,
    incoming: impl Fn(&T) -> Incoming,
    mut acknowledge: A,
) where
    H: Handler + ?Sized,
    A: FnMut(T) -> Ack,
    Ack: Future<Output = ()>,
{
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            d = rx.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        let settled = dedup
            .handle_until_settled_or_stopped(&incoming(&delivery), handler.as_ref(), &stop)
            .await;
        if settled.is_none() {
            return;
        }
        acknowledge(delivery).await;
    }
}
