//! The end of the story, printed and checked.

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::{count, services::Order, setup::BOOKS, Summary};

/// Prints the final state and checks the story's end.
pub async fn check(
    admin: &PgPool,
    orders: &[Order],
    restock: &BTreeMap<String, i32>,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let mut fail = |what: String| failures.push(what);
    let balances: Vec<(String, i32)> =
        sqlx::query_as("SELECT name, balance FROM account.customers ORDER BY name")
            .fetch_all(admin)
            .await?;
    let merchant: i32 = sqlx::query_scalar("SELECT balance FROM merchant.accounts")
        .fetch_one(admin)
        .await?;
    let customers: i64 = balances.iter().map(|(_, b)| i64::from(*b)).sum();
    let money_at_end = customers + i64::from(merchant);
    println!();
    println!("== final state");
    println!(
        "  customers   {}   (sum {customers})",
        balances
            .iter()
            .map(|(n, b)| format!("{n} {b}"))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    println!("  merchant    {merchant}");
    let paid: Vec<&Order> = orders.iter().filter(|o| o.paid.is_some()).collect();
    let refused: Vec<&Order> = orders.iter().filter(|o| o.paid.is_none()).collect();
    let mut stock_line = Vec::new();
    for (book, opening) in BOOKS {
        let copies: i32 = sqlx::query_scalar("SELECT copies FROM warehouse.stock WHERE book = $1")
            .bind(book)
            .fetch_one(admin)
            .await?;
        let shipped: i64 =
            sqlx::query_scalar("SELECT count(*) FROM warehouse.shipments WHERE book = $1")
                .bind(book)
                .fetch_one(admin)
                .await?;
        let restocked = restock.get(*book).copied().unwrap_or(0);
        stock_line.push(format!(
            "{book} {copies} ({shipped} shipped{})",
            if restocked > 0 {
                format!(", {restocked} restocked")
            } else {
                String::new()
            }
        ));
        if i64::from(*opening) + i64::from(restocked) - shipped != i64::from(copies) {
            fail(format!(
                "{book:?}: {opening} at opening + {restocked} restocked - {shipped} shipped != {copies} in stock"
            ));
        }
    }
    println!("  stock       {}", stock_line.join(" · "));
    println!(
        "  orders      {} paid, {} refused",
        paid.len(),
        refused.len()
    );

    let line = |ok: bool, what: String| println!("  {} {what}", if ok { "✓" } else { "✗" });
    summary.money_at_end = money_at_end;
    let conserved = money_at_end == summary.money_at_opening;
    line(
        conserved,
        format!(
            "money conserved: {} at opening, {customers} + {merchant} = {money_at_end} now",
            summary.money_at_opening
        ),
    );
    if !conserved {
        fail(format!(
            "money: {} at opening, {money_at_end} at the end",
            summary.money_at_opening
        ));
    }

    // Each paid order: exactly one shipment, exactly one credit.
    let per_order: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT o.number,
                (SELECT count(*) FROM warehouse.shipments s WHERE s.order_id = o.id),
                (SELECT count(*) FROM merchant.credits c WHERE c.order_id = o.id)
         FROM account.orders o ORDER BY o.number",
    )
    .fetch_all(admin)
    .await?;
    let bad: Vec<String> = per_order
        .iter()
        .filter(|(_, s, c)| *s != 1 || *c != 1)
        .map(|(n, s, c)| format!("order #{n}: {s} shipments, {c} credits"))
        .collect();
    let shipped = count(admin, "SELECT count(*) FROM warehouse.shipments").await?;
    let credited = count(admin, "SELECT count(*) FROM merchant.credits").await?;
    summary.shipped = shipped;
    summary.credited = credited;
    let once = bad.is_empty()
        && per_order.len() == paid.len()
        && shipped == paid.len() as i64
        && credited == paid.len() as i64;
    line(
        once,
        format!(
            "every paid order shipped and credited exactly once ({} orders, {shipped} shipments, {credited} credits)",
            per_order.len()
        ),
    );
    if !once {
        fail(format!(
            "{} paid, {} order rows, {shipped} shipments, {credited} credits; {}",
            paid.len(),
            per_order.len(),
            bad.join("; ")
        ));
    }

    // Refused orders: no order, no message (written, pending or delivered), no effect.
    let ids: Vec<Uuid> = refused.iter().map(|o| o.id).collect();
    let messages: Vec<Uuid> = refused.iter().flat_map(|o| o.messages).collect();
    let traces: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM account.orders WHERE id = ANY($1))
              + (SELECT count(*) FROM account_outbox.messages WHERE id = ANY($2))
              + (SELECT count(*) FROM account_outbox.delivered WHERE id = ANY($2))
              + (SELECT count(*) FROM warehouse.shipments WHERE order_id = ANY($1))
              + (SELECT count(*) FROM merchant.credits WHERE order_id = ANY($1))
              + (SELECT count(*) FROM warehouse_inbox.processed WHERE message_id = ANY($2))
              + (SELECT count(*) FROM merchant_inbox.processed WHERE message_id = ANY($2))",
    )
    .bind(&ids)
    .bind(&messages)
    .fetch_one(admin)
    .await?;
    line(
        traces == 0,
        format!(
            "the {} refused orders left no trace (no order, no message, no shipment, no credit)",
            refused.len()
        ),
    );
    if traces != 0 {
        fail(format!("refused orders left {traces} traces"));
    }

    // Everything settled: the outbox empty, every message delivered, no letter left.
    summary.delivered = count(admin, "SELECT count(*) FROM account_outbox.delivered").await?;
    let left = count(admin, "SELECT count(*) FROM account_outbox.messages").await?;
    let letters = count(
        admin,
        "SELECT (SELECT count(*) FROM warehouse_inbox.dead_letters)
              + (SELECT count(*) FROM merchant_inbox.dead_letters)",
    )
    .await?;
    let settled = left == 0 && letters == 0 && summary.delivered == 2 * paid.len() as i64;
    line(
        settled,
        format!(
            "all {} messages delivered, the outbox empty, no dead letter left ({} parked, {} replayed)",
            summary.delivered, summary.parked, summary.replayed
        ),
    );
    if !settled {
        fail(format!(
            "{} delivered of {}, {left} left in the outbox, {letters} dead letters",
            summary.delivered,
            2 * paid.len()
        ));
    }
    summary.failures.extend(failures);
    Ok(())
}
