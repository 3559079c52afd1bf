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

    // Each paid order's steps: the debit, and shipping and crediting done by exactly one
    // reply each (a reply handled twice would count 2; one lost would leave it in progress).
    let steps: Vec<(i32, String, String, i32)> = sqlx::query_as(
        "SELECT o.number, s.step, s.state, s.replies
         FROM account.orders o JOIN account.order_steps s ON s.order_id = o.id
         ORDER BY o.number, s.step",
    )
    .fetch_all(admin)
    .await?;
    let wrong_steps: Vec<String> = steps
        .iter()
        .filter(|(_, step, state, replies)| {
            state != "done" || *replies != i32::from(step.as_str() != "debit")
        })
        .map(|(n, step, state, replies)| format!("order #{n} {step}: {state}, {replies} replies"))
        .collect();
    let steps_ok = wrong_steps.is_empty() && steps.len() == 3 * paid.len();
    line(
        steps_ok,
        format!(
            "every paid order's steps done: the debit at once, shipping and crediting by one reply each ({} steps; {} reply handled again after a failure before its commit)",
            steps.len(),
            summary.crashed_replies
        ),
    );
    if !steps_ok {
        fail(format!(
            "{} steps for {} paid orders; {}",
            steps.len(),
            paid.len(),
            wrong_steps.join("; ")
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

    // Everything settled: the outboxes empty, every message delivered, no letter left.
    summary.delivered = count(admin, "SELECT count(*) FROM account_outbox.delivered").await?;
    summary.replies = count(
        admin,
        "SELECT (SELECT count(*) FROM warehouse_outbox.delivered)
              + (SELECT count(*) FROM merchant_outbox.delivered)",
    )
    .await?;
    let left = count(
        admin,
        "SELECT (SELECT count(*) FROM account_outbox.messages)
              + (SELECT count(*) FROM warehouse_outbox.messages)
              + (SELECT count(*) FROM merchant_outbox.messages)",
    )
    .await?;
    let letters = count(
        admin,
        "SELECT (SELECT count(*) FROM warehouse_inbox.dead_letters)
              + (SELECT count(*) FROM merchant_inbox.dead_letters)
              + (SELECT count(*) FROM account_inbox.dead_letters)",
    )
    .await?;
    let expected = 2 * paid.len() as i64;
    let settled =
        left == 0 && letters == 0 && summary.delivered == expected && summary.replies == expected;
    line(
        settled,
        format!(
            "all {} messages and {} replies delivered, the outboxes empty, no dead letter left ({} parked, {} replayed, {} repaired)",
            summary.delivered, summary.replies, summary.parked, summary.replayed, summary.repaired
        ),
    );
    if !settled {
        fail(format!(
            "{} delivered and {} replies of {expected} each, {left} left in the outboxes, {letters} dead letters",
            summary.delivered, summary.replies
        ));
    }
    summary.failures.extend(failures);
    Ok(())
}
