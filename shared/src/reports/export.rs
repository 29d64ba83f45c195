//! CSV exports of the creation history and the journal, as streams of chunks: a header,
//! then one chunk per page of at most 100 rows read from the store. Nothing beyond the
//! page being written is held in memory, however long the range.

use super::csv::{Cell, header, write_row};
use crate::ids::{GenerationId, WorkspaceId};
use crate::ledger::{Entry, Generation};
use crate::store::{EntryQuery, GenerationQuery, LedgerStore, StoreError};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::Stream;
use std::sync::Arc;

pub const GENERATION_COLUMNS: &[&str] = &[
    "id",
    "created_at",
    "started_by",
    "workflow",
    "model",
    "status",
    "estimate_credits",
    "held",
    "charged",
    "reversed",
    "shortfall",
    "settled_at",
    "failure_reason",
];

pub const LEDGER_COLUMNS: &[&str] = &[
    "seq",
    "id",
    "at",
    "reason",
    "credits",
    "available_after",
    "held_after",
    "frozen_after",
    "actor_kind",
    "actor_id",
    "generation",
    "invoice",
    "payment",
    "refund",
    "ticket",
    "stripe_event",
    "note",
    // Credits the entry spent (a generation's charge): `credits` is the change to the
    // available balance, which for a completion is the hold released less the charge.
    "spent",
];

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A serde enum's wire name (`generation_charged`).
fn wire<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

pub fn generation_row(out: &mut String, g: &Generation) {
    let nums = [
        g.estimate.credits.get().to_string(),
        g.held.get().to_string(),
        g.charged.get().to_string(),
        g.reversed.get().to_string(),
        g.shortfall.get().to_string(),
    ];
    let id = g.id.to_string();
    let created = time(g.created_at);
    let settled = g.settled_at.map(time).unwrap_or_default();
    write_row(
        out,
        &[
            Cell::Plain(&id),
            Cell::Plain(&created),
            Cell::Text(&g.started_by),
            Cell::Plain(g.estimate.workflow.as_str()),
            Cell::Text(&g.estimate.model),
            Cell::Plain(g.status.as_str()),
            Cell::Plain(&nums[0]),
            Cell::Plain(&nums[1]),
            Cell::Plain(&nums[2]),
            Cell::Plain(&nums[3]),
            Cell::Plain(&nums[4]),
            Cell::Plain(&settled),
            Cell::Text(g.failure_reason.as_deref().unwrap_or("")),
        ],
    );
}

pub fn entry_row(out: &mut String, e: &Entry) {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let fields = [
        e.seq.to_string(),
        time(e.at),
        wire(&e.reason),
        e.credits.get().to_string(),
        e.balance_after.available.get().to_string(),
        e.balance_after.held.get().to_string(),
        e.balance_after.frozen.get().to_string(),
        wire(&e.actor.kind),
        opt(e.refs.generation.map(|g| g.to_string())),
        opt(e.refs.invoice.as_ref().map(|i| i.to_string())),
        opt(e.refs.refund.as_ref().map(|r| r.to_string())),
        opt(e.refs.stripe_event.as_ref().map(|s| s.to_string())),
        e.totals.spent.get().to_string(),
    ];
    write_row(
        out,
        &[
            Cell::Plain(&fields[0]),
            Cell::Plain(&e.id),
            Cell::Plain(&fields[1]),
            Cell::Plain(&fields[2]),
            Cell::Plain(&fields[3]),
            Cell::Plain(&fields[4]),
            Cell::Plain(&fields[5]),
            Cell::Plain(&fields[6]),
            Cell::Plain(&fields[7]),
            Cell::Text(&e.actor.id),
            Cell::Plain(&fields[8]),
            Cell::Plain(&fields[9]),
            Cell::Text(e.refs.charge.as_deref().unwrap_or("")),
            Cell::Plain(&fields[10]),
            Cell::Text(e.refs.ticket.as_deref().unwrap_or("")),
            Cell::Plain(&fields[11]),
            Cell::Text(e.note.as_deref().unwrap_or("")),
            Cell::Plain(&fields[12]),
        ],
    );
}

struct Cursor<C> {
    header: Option<String>,
    next: Option<C>,
    done: bool,
}

/// The creation history matching `query` (its `before` and `limit` are ignored), newest
/// first, as CSV chunks; each generation as of `now` (a hold past its deadline is
/// expired), and with `query.status` in that sense, as the creation history shows it.
pub fn generations_csv(
    store: Arc<dyn LedgerStore>,
    workspace: WorkspaceId,
    query: GenerationQuery,
    now: chrono::DateTime<chrono::Utc>,
) -> impl Stream<Item = Result<String, StoreError>> + Send {
    let status = query.status;
    // Expired ones may still be stored as held: those are read with every status.
    let query = GenerationQuery {
        status: status.filter(|s| *s != crate::ledger::GenerationStatus::Expired),
        ..query
    };
    let start = Cursor::<Option<GenerationId>> {
        header: Some(header(GENERATION_COLUMNS)),
        next: Some(None),
        done: false,
    };
    futures_util::stream::unfold(start, move |mut cur| {
        let store = store.clone();
        let workspace = workspace.clone();
        let query = query.clone();
        async move {
            if let Some(h) = cur.header.take() {
                return Some((Ok(h), cur));
            }
            if cur.done {
                return None;
            }
            let before = cur.next.take().flatten();
            let page = store
                .generations(
                    &workspace,
                    &GenerationQuery {
                        before,
                        limit: 100,
                        ..query
                    },
                )
                .await;
            match page {
                Err(e) => {
                    cur.done = true;
                    Some((Err(e), cur))
                }
                Ok(rows) => {
                    cur.done = rows.len() < 100;
                    cur.next = Some(rows.last().map(|g| g.id));
                    let mut out = String::with_capacity(rows.len() * 160);
                    for g in rows.iter().map(|g| g.clone().as_of(now)) {
                        if status.is_none_or(|s| g.status == s) {
                            generation_row(&mut out, &g);
                        }
                    }
                    if rows.is_empty() {
                        return None;
                    }
                    Some((Ok(out), cur))
                }
            }
        }
    })
}

/// Journal entries with `at` in `[from, to)`, newest first, as CSV chunks.
pub fn ledger_csv(
    store: Arc<dyn LedgerStore>,
    workspace: WorkspaceId,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> impl Stream<Item = Result<String, StoreError>> + Send {
    let start = Cursor::<Option<u64>> {
        header: Some(header(LEDGER_COLUMNS)),
        next: None,
        done: false,
    };
    futures_util::stream::unfold(start, move |mut cur| {
        let store = store.clone();
        let workspace = workspace.clone();
        async move {
            if let Some(h) = cur.header.take() {
                return Some((Ok(h), cur));
            }
            // Where the range ends: found by a binary search of the journal.
            if cur.next.is_none() {
                cur.next = Some(match to {
                    Some(t) => match super::usage::first_seq_at_or_after(
                        store.as_ref(),
                        &workspace,
                        super::usage::slack_after(t),
                    )
                    .await
                    {
                        Ok(seq) => Some(seq),
                        Err(e) => {
                            cur.done = true;
                            return Some((Err(e), cur));
                        }
                    },
                    None => None,
                });
            }
            // Pages that hold no entry of the range (newer than `to`) are skipped here,
            // so the stream never yields an empty chunk but the last.
            loop {
                if cur.done {
                    return None;
                }
                let before = cur.next.take().flatten();
                let page = match store
                    .entries(&workspace, &EntryQuery { before, limit: 100 })
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        cur.done = true;
                        return Some((Err(e), cur));
                    }
                };
                let last = page.last()?;
                cur.next = Some(Some(last.seq));
                cur.done = page.len() < 100
                    || last.seq <= 1
                    || from.is_some_and(|f| last.at < super::usage::slack_before(f));
                let mut out = String::new();
                for e in page
                    .iter()
                    .filter(|e| from.is_none_or(|f| e.at >= f) && to.is_none_or(|t| e.at < t))
                {
                    entry_row(&mut out, e);
                }
                if !out.is_empty() {
                    return Some((Ok(out), cur));
                }
            }
        }
    })
}
