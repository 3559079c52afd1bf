//! The three services' own code: the account places orders (and writes their messages in the
//! same transaction), the warehouse ships, the merchant is credited; the warehouse and the
//! merchant each reply through an outbox of their own, in the transaction of their effect,
//! and the account moves each order's steps to "done" as the replies arrive.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use outbox::{Message, Outbox};
use outbox_consumer::{Handler, HandlerError, Incoming};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::setup::PRICE;

/// An order the account service tried to place.
#[derive(Debug, Clone)]
pub struct Order {
    /// Its id.
    pub id: Uuid,
    /// Its number in the story (1, 2, …).
    pub number: usize,
    /// Who buys.
    pub customer: String,
    /// What.
    pub book: String,
    /// The ids of its two messages (ship, credit), written or not.
    pub messages: [Uuid; 2],
    /// The customer's balance after it, when it was paid.
    pub paid: Option<i32>,
}

/// The account service: balances, orders, and the outbox they share a transaction with.
pub struct Account {
    pub(crate) pool: PgPool,
    pub(crate) outbox: Outbox,
    pub(crate) ship_topic: String,
    pub(crate) credit_topic: String,
}

impl Account {
    /// Places order `number`: in ONE transaction, writes the order, its steps (the debit
    /// done at once; shipping and crediting in progress until their replies arrive) and its
    /// two messages ("ship one copy" to the warehouse, "credit 100" to the merchant), and
    /// debits the customer. Without enough money the debit finds no row, and the
    /// transaction is rolled back: the order, its steps and its messages are gone as if
    /// never written.
    pub async fn place(&self, number: usize, customer: &str, book: &str) -> anyhow::Result<Order> {
        let id = Uuid::now_v7();
        let key = format!("order-{number}");
        let ship = Message::json(
            &self.ship_topic,
            &json!({ "order": id, "number": number, "book": book }),
        )?
        .with_key(&key)?;
        let credit = Message::json(
            &self.credit_topic,
            &json!({ "order": id, "number": number, "amount": PRICE }),
        )?
        .with_key(&key)?;
        let mut order = Order {
            id,
            number,
            customer: customer.to_owned(),
            book: book.to_owned(),
            messages: [ship.id(), credit.id()],
            paid: None,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO account.orders (id, number, customer, book, price) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(number as i32)
        .bind(customer)
        .bind(book)
        .bind(PRICE)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO account.order_steps (order_id, step, state)
             VALUES ($1, 'debit', 'done'), ($1, 'shipping', 'in_progress'),
                    ($1, 'crediting', 'in_progress')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        self.outbox.enqueue_batch(&mut *tx, &[ship, credit]).await?;
        let balance: Option<i32> = sqlx::query_scalar(
            "UPDATE account.customers SET balance = balance - $2
             WHERE name = $1 AND balance >= $2 RETURNING balance",
        )
        .bind(customer)
        .bind(PRICE)
        .fetch_optional(&mut *tx)
        .await?;
        match balance {
            Some(left) => {
                tx.commit().await?;
                order.paid = Some(left);
            }
            None => tx.rollback().await?,
        }
        Ok(order)
    }
}

/// A service's reply to the account: which step of which order is done. Written through the
/// replying service's own outbox, in the transaction of its effect and its dedup row.
pub struct Replies {
    /// The replying service's outbox.
    pub outbox: Outbox,
    /// Where its replies go.
    pub topic: String,
}

impl Replies {
    async fn send(
        &self,
        tx: &mut PgConnection,
        order: Uuid,
        number: u64,
        step: &str,
    ) -> Result<(), HandlerError> {
        let reply = Message::json(
            &self.topic,
            &json!({ "order": order, "number": number, "step": step }),
        )
        .map_err(HandlerError::permanent)?
        .with_key(format!("order-{number}"))
        .map_err(HandlerError::permanent)?;
        self.outbox
            .enqueue(&mut *tx, &reply)
            .await
            .map_err(HandlerError::retryable)?;
        Ok(())
    }
}

/// The warehouse's handler: ships one copy and replies "shipping done", or asks to be
/// retried while the book is out of stock.
pub struct Ship(pub Replies);

impl Handler for Ship {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let body: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            let (Some(order), Some(number), Some(book)) = (
                body["order"].as_str().and_then(|s| s.parse::<Uuid>().ok()),
                body["number"].as_u64(),
                body["book"].as_str(),
            ) else {
                return Err(HandlerError::permanent("not a shipping order"));
            };
            let taken = sqlx::query(
                "UPDATE warehouse.stock SET copies = copies - 1 WHERE book = $1 AND copies > 0",
            )
            .bind(book)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?
            .rows_affected();
            if taken == 0 {
                let known: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM warehouse.stock WHERE book = $1)",
                )
                .bind(book)
                .fetch_one(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
                if !known {
                    return Err(HandlerError::permanent(format!("no such book: {book:?}")));
                }
                println!(
                    "    warehouse  order #{number}: {book:?} is out of stock; rolled back, to be retried with backoff"
                );
                return Err(HandlerError::retryable(format!("{book:?} is out of stock")));
            }
            sqlx::query("INSERT INTO warehouse.shipments (order_id, book) VALUES ($1, $2)")
                .bind(order)
                .bind(book)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            self.0.send(tx, order, number, "shipping").await
        })
    }
}

/// The merchant's handler: credits the price of one order and replies "crediting done".
pub struct Credit(pub Replies);

impl Handler for Credit {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let body: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            let (Some(order), Some(number), Some(amount)) = (
                body["order"].as_str().and_then(|s| s.parse::<Uuid>().ok()),
                body["number"].as_u64(),
                body["amount"].as_i64(),
            ) else {
                return Err(HandlerError::permanent("not a credit"));
            };
            sqlx::query(
                "UPDATE merchant.accounts SET balance = balance + $1 WHERE merchant = 'bookstore'",
            )
            .bind(amount as i32)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?;
            sqlx::query("INSERT INTO merchant.credits (order_id, amount) VALUES ($1, $2)")
                .bind(order)
                .bind(amount as i32)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            self.0.send(tx, order, number, "crediting").await
        })
    }
}

/// The account's handler for the replies: marks the order's step done. The first reply it
/// handles fails after its write and before the commit, as a crash there would: the
/// transaction rolls back with the step it moved, the reply is handled again (retried in
/// place, as a redelivery would be), and the step is done once.
pub struct Reply {
    crash_next: AtomicBool,
}

impl Reply {
    /// A handler that fails once, on the first reply, before committing.
    pub fn crashing_once() -> Self {
        Self {
            crash_next: AtomicBool::new(true),
        }
    }

    /// True once the failure before the commit has happened.
    pub fn crashed(&self) -> bool {
        !self.crash_next.load(Ordering::SeqCst)
    }
}

impl Handler for Reply {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let body: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            let (Some(order), Some(number), Some(step)) = (
                body["order"].as_str().and_then(|s| s.parse::<Uuid>().ok()),
                body["number"].as_u64(),
                body["step"].as_str(),
            ) else {
                return Err(HandlerError::permanent("not a reply"));
            };
            let moved = sqlx::query(
                "UPDATE account.order_steps SET state = 'done', replies = replies + 1
                 WHERE order_id = $1 AND step = $2 AND state = 'in_progress'",
            )
            .bind(order)
            .bind(step)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?
            .rows_affected();
            if moved == 0 {
                return Err(HandlerError::permanent(format!(
                    "order #{number} has no {step} step in progress"
                )));
            }
            if self.crash_next.swap(false, Ordering::SeqCst) {
                println!(
                    "    account    order #{number}: the reply's handler fails after its write, before the commit (as a crash would); rolled back, handled again"
                );
                return Err(HandlerError::retryable("failed before the commit"));
            }
            Ok(())
        })
    }
}
