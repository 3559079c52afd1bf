//! A lane: the deliveries of one key (RabbitMQ) or partition (Kafka), handled in arrival
//! order, each acknowledged only once settled; those waiting together are handled in one
//! transaction up to [`Deduplicator::with_batch`]. Both sources run their lanes here.

use std::{future::Future, sync::Arc};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Deduplicator, Handler, Incoming};

/// Settles each delivery from `rx` (retrying in place), then `acknowledge`s it, in order.
/// Stops after the deliveries in hand once `stop` fires; a delivery given up while waiting
/// to retry is not acknowledged (nor those after it), so the broker delivers it again.
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
    let mut batch: Vec<T> = Vec::with_capacity(dedup.batch());
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            d = rx.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        batch.push(first);
        // What else is waiting already goes in the same transaction (up to the batch size).
        while batch.len() < dedup.batch() {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        if batch.len() > 1 {
            let messages: Vec<Incoming> = batch.iter().map(&incoming).collect();
            if let Ok(Some(_)) = dedup.handle_batch(&messages, handler.as_ref()).await {
                for delivery in batch.drain(..) {
                    acknowledge(delivery).await;
                }
                continue;
            }
        }
        // One at a time: alone, or a batch that could not be handled whole.
        for delivery in batch.drain(..) {
            let settled = dedup
                .handle_until_settled_or_stopped(&incoming(&delivery), handler.as_ref(), &stop)
                .await;
            if settled.is_none() {
                // The rest are not acknowledged: the broker delivers them again.
                return;
            }
            acknowledge(delivery).await;
        }
    }
}
