//! Billing history: one small document per money movement of a workspace (an invoice, a
//! pack or top-up payment, a refund, a dispute), filed under the workspace by the time the
//! movement was created, so the history reads newest first, a page at a time.
//!
//! Several consumers write to the same movement in any order (the invoice's events, the
//! grant of its credits, its payment, refunds); the first one files it and records where in
//! a tiny pointer document (`HISTID#<id>`), so later writers find the same document. Every
//! write is a merge: statuses only move forward, credits granted and taken back are kept
//! per ledger key, so repeated deliveries change nothing.

use crate::ids::{ChargeId, InvoiceId, PaymentIntentId, SubscriptionId, WorkspaceId};
use crate::money::{Cents, Credits};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

use super::records::workspace_pk;

pub const HISTORY_PREFIX: &str = "HISTORY#";
const POINTER_PREFIX: &str = "HISTID#";
/// The day index of every workspace's movements (`MOVEMENTS#<YYYY-MM-DD>` /
/// `<created>#<id>`), for finance's reconciliation across workspaces.
pub const DAY_PREFIX: &str = "MOVEMENTS#";

/// A movement filed in the day index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayEntry {
    pub workspace: WorkspaceId,
    pub id: String,
}

pub fn day_pk(day: chrono::NaiveDate) -> String {
    format!("{DAY_PREFIX}{}", day.format("%Y-%m-%d"))
}

/// The movements filed on a UTC day, oldest first, with where each is filed under its
/// workspace (the history sort key).
pub async fn day(
    store: &dyn DocStore,
    day: chrono::NaiveDate,
) -> Result<Vec<(String, DayEntry)>, StoreError> {
    let pk = day_pk(day);
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = docs::page::<DayEntry>(store, &pk, "", before.as_deref(), 500).await?;
        let full = page.len() == 500;
        before = page.last().map(|(sk, _)| sk.clone());
        out.extend(
            page.into_iter()
                .map(|(sk, e)| (format!("{HISTORY_PREFIX}{sk}"), e)),
        );
        if !full {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

/// Where a movement is filed: by creation time, then id.
pub fn history_sk(created: DateTime<Utc>, id: &str) -> String {
    format!("{HISTORY_PREFIX}{:012}#{id}", created.timestamp().max(0))
}

/// What a movement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MovementKind {
    /// A subscription invoice: sign-up, renewal, upgrade proration, add-on change.
    Subscription,
    /// A credit pack bought through Checkout.
    Pack,
    /// A pack bought automatically with the saved card.
    TopUp,
    /// An invoice for an agreed amount.
    CustomPayment,
    /// Any other invoice.
    Invoice,
    /// Money given back to the customer.
    Refund,
    /// A payment the customer contested with their bank.
    Dispute,
}

impl MovementKind {
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// A money movement as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: String,
    pub kind: Option<MovementKind>,
    pub status: Option<String>,
    /// (rank, Stripe time) of the status: a status is replaced only by a later one.
    #[serde(default)]
    pub status_order: (u8, i64),
    pub description: Option<String>,
    /// Integer cents: paid (or due) for purchases, given back for refunds, contested for
    /// disputes.
    #[serde(default)]
    pub amount: Cents,
    /// Of a purchase: how much of it was refunded so far.
    #[serde(default)]
    pub amount_refunded: Cents,
    /// Of a purchase: how much credit notes gave back without a refund (to the customer's
    /// Stripe balance, or outside Stripe).
    #[serde(default)]
    pub amount_credited: Cents,
    /// Of a purchase: the cents that are not refundable (add-on units).
    #[serde(default)]
    pub non_refundable: Cents,
    /// Of a subscription invoice: the subscription.
    #[serde(default)]
    pub subscription: Option<SubscriptionId>,
    pub currency: Option<String>,
    pub tax: Option<Cents>,
    /// Credits granted, per ledger operation key.
    #[serde(default)]
    pub granted: BTreeMap<String, Credits>,
    /// Credits taken back, per ledger operation key.
    #[serde(default)]
    pub taken_back: BTreeMap<String, Credits>,
    pub invoice: Option<InvoiceId>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub receipt_url: Option<String>,
    pub payment_intent: Option<PaymentIntentId>,
    pub charge: Option<ChargeId>,
    pub billing_reason: Option<String>,
    /// Of a corrected invoice: the invoice it replaces; of the original: its replacement.
    #[serde(default)]
    pub replaces: Option<InvoiceId>,
    #[serde(default)]
    pub replaced_by: Option<InvoiceId>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
}

impl HistoryEntry {
    fn new(id: &str, created: DateTime<Utc>) -> Self {
        Self {
            id: id.to_owned(),
            kind: None,
            status: None,
            status_order: (0, 0),
            description: None,
            amount: Cents::ZERO,
            amount_refunded: Cents::ZERO,
            amount_credited: Cents::ZERO,
            non_refundable: Cents::ZERO,
            subscription: None,
            currency: None,
            tax: None,
            granted: BTreeMap::new(),
            taken_back: BTreeMap::new(),
            invoice: None,
            hosted_invoice_url: None,
            invoice_pdf: None,
            receipt_url: None,
            payment_intent: None,
            charge: None,
            billing_reason: None,
            replaces: None,
            replaced_by: None,
            created,
            updated: created,
        }
    }

    /// Sets the status if `order` is not older than the current one's.
    pub fn set_status(&mut self, status: &str, order: (u8, i64)) {
        if order >= self.status_order {
            self.status = Some(status.to_owned());
            self.status_order = order;
        }
    }

    /// Sets a field that is unknown so far.
    pub fn fill<T: Clone>(field: &mut Option<T>, value: Option<&T>) {
        if field.is_none() {
            *field = value.cloned();
        }
    }

    fn sum(m: &BTreeMap<String, Credits>) -> Credits {
        m.values()
            .fold(Credits::ZERO, |a, c| a.checked_add(*c).unwrap_or(a))
    }
}

/// A money movement as the billing history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Movement {
    /// The Stripe object: an invoice (`in_`), a payment intent (`pi_`), a refund (`re_`)
    /// or a dispute (`du_`).
    pub id: String,
    pub kind: MovementKind,
    /// Stripe's status: `paid`, `open`, `void` for invoices; `succeeded` for payments;
    /// `pending`, `succeeded`, `failed`, `canceled` for refunds; a dispute's status.
    pub status: String,
    pub description: Option<String>,
    /// Integer cents.
    pub amount: Cents,
    /// Of a purchase: integer cents refunded so far.
    pub amount_refunded: Cents,
    /// Of a purchase: integer cents credit notes gave back without a refund (to the
    /// customer's Stripe balance, or outside Stripe).
    pub amount_credited: Cents,
    pub currency: String,
    /// Integer cents of tax, where Stripe reported it.
    pub tax: Option<Cents>,
    pub credits_granted: Credits,
    pub credits_taken_back: Credits,
    /// The invoice, where there is one, with its hosted page and PDF.
    pub invoice: Option<InvoiceId>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub receipt_url: Option<String>,
    /// The payment the movement belongs to.
    pub payment_intent: Option<PaymentIntentId>,
    pub charge: Option<ChargeId>,
    pub billing_reason: Option<String>,
    /// A corrected invoice names the invoice it replaces (same payment, no new charge);
    /// the original names its replacement.
    pub replaces: Option<InvoiceId>,
    pub replaced_by: Option<InvoiceId>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
}

impl Movement {
    fn of(e: HistoryEntry) -> Option<Self> {
        let kind = e.kind?;
        let status = e.status.clone()?;
        Some(Self {
            credits_granted: HistoryEntry::sum(&e.granted),
            credits_taken_back: HistoryEntry::sum(&e.taken_back),
            id: e.id,
            kind,
            status,
            description: e.description,
            amount: e.amount,
            amount_refunded: e.amount_refunded,
            amount_credited: e.amount_credited,
            currency: e.currency.unwrap_or_else(|| "usd".into()),
            tax: e.tax,
            invoice: e.invoice,
            hosted_invoice_url: e.hosted_invoice_url,
            invoice_pdf: e.invoice_pdf,
            receipt_url: e.receipt_url,
            payment_intent: e.payment_intent,
            charge: e.charge,
            billing_reason: e.billing_reason,
            replaces: e.replaces,
            replaced_by: e.replaced_by,
            created: e.created,
            updated: e.updated,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pointer {
    sk: String,
}

/// Merges into the movement `id` of `workspace`, filing it under `created` if it is new.
/// `edit` changes the entry and answers whether it changed anything.
pub async fn record(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    id: &str,
    created: DateTime<Utc>,
    now: DateTime<Utc>,
    edit: impl Fn(&mut HistoryEntry) -> bool,
) -> Result<(), StoreError> {
    let pk = workspace_pk(workspace);
    let sk = history_sk(created, id);
    let pointer = docs::update(
        store,
        &pk,
        &format!("{POINTER_PREFIX}{id}"),
        |cur: Option<Pointer>| match cur {
            Some(_) => None,
            None => Some(Pointer { sk: sk.clone() }),
        },
    )
    .await?
    .map_or(sk, |p| p.sk);
    // Filed in the day index once (a second put of the same key writes nothing).
    if let Some(at) = pointer
        .strip_prefix(HISTORY_PREFIX)
        .and_then(|rest| rest.split_once('#'))
        .and_then(|(secs, _)| secs.parse::<i64>().ok())
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
    {
        let entry = DayEntry {
            workspace: workspace.clone(),
            id: id.to_owned(),
        };
        store
            .put_doc(
                &day_pk(at.date_naive()),
                &pointer[HISTORY_PREFIX.len()..],
                &crate::store::encode(&entry)?,
                0,
            )
            .await?;
    }
    docs::update(store, &pk, &pointer, |cur: Option<HistoryEntry>| {
        let mut e = cur.unwrap_or_else(|| HistoryEntry::new(id, created));
        edit(&mut e).then(|| {
            e.updated = e.updated.max(now);
            e
        })
    })
    .await?;
    Ok(())
}

/// The movement `id` of `workspace`, if it has one.
pub async fn get(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    id: &str,
) -> Result<Option<HistoryEntry>, StoreError> {
    let pk = workspace_pk(workspace);
    let Some(p) = docs::get::<Pointer>(store, &pk, &format!("{POINTER_PREFIX}{id}")).await? else {
        return Ok(None);
    };
    docs::get(store, &pk, &p.sk).await
}

/// Most movements [`around`] reads.
const MAX_AROUND: usize = 200;

/// The movements created from `from` up to (not including) `to`, newest first, at most
/// a couple of hundred.
pub async fn around(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let pk = workspace_pk(workspace);
    let upper = format!("{HISTORY_PREFIX}{:012}", to.timestamp().max(0));
    let lower = format!("{HISTORY_PREFIX}{:012}", from.timestamp().max(0));
    let rows: Vec<(String, HistoryEntry)> =
        docs::page(store, &pk, HISTORY_PREFIX, Some(&upper), MAX_AROUND).await?;
    Ok(rows
        .into_iter()
        .take_while(|(sk, _)| sk >= &lower)
        .map(|(_, e)| e)
        .collect())
}

/// What a page of history is asked for.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub kinds: Vec<MovementKind>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    pub limit: usize,
}

/// Most documents one page reads while filtering by kind: a page may come back short
/// (with a cursor) rather than read the whole history.
const MAX_READ_PER_PAGE: usize = 500;

/// A page of history, newest first, and the cursor of the next page if there may be one.
pub async fn page(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    q: &HistoryQuery,
) -> Result<(Vec<Movement>, Option<String>), StoreError> {
    if let (Some(f), Some(t)) = (q.from, q.to)
        && f >= t
    {
        return Ok((Vec::new(), None));
    }
    let pk = workspace_pk(workspace);
    // Movements are dated to the second (as Stripe dates its objects): an instant within a
    // second bounds the range as the next whole second does. `to` is exclusive: start below
    // the first key of that second.
    let second =
        |t: DateTime<Utc>| (t.timestamp() + i64::from(t.timestamp_subsec_nanos() > 0)).max(0);
    let upper = q.to.map(|t| format!("{HISTORY_PREFIX}{:012}", second(t)));
    let mut before = match (&q.cursor, upper) {
        (Some(c), Some(u)) => Some(c.clone().min(u)),
        (c, u) => c.clone().or(u),
    };
    let lower = q.from.map(|f| format!("{HISTORY_PREFIX}{:012}", second(f)));
    let mut out = Vec::new();
    let mut last_sk = None;
    let mut read = 0;
    loop {
        let want = (q.limit - out.len()).max(1) + 1;
        let batch: Vec<(String, HistoryEntry)> =
            docs::page(store, &pk, HISTORY_PREFIX, before.as_deref(), want.min(100)).await?;
        let exhausted = batch.len() < want.min(100);
        for (sk, e) in batch {
            if lower.as_ref().is_some_and(|l| &sk < l) {
                return Ok((out, None));
            }
            read += 1;
            before = Some(sk.clone());
            if let Some(m) =
                Movement::of(e).filter(|m| q.kinds.is_empty() || q.kinds.contains(&m.kind))
            {
                if out.len() == q.limit {
                    // One more exists: the page ends at the last one returned.
                    return Ok((out, last_sk));
                }
                out.push(m);
                last_sk = Some(sk.clone());
            }
            if read >= MAX_READ_PER_PAGE {
                return Ok((out, Some(sk)));
            }
        }
        if exhausted {
            return Ok((out, None));
        }
    }
}

/// A page cursor for clients from a sort key `<prefix><created>#<id>`: `<created>-<id>`,
/// safe in a query string.
pub fn cursor_of(sk: &str, prefix: &str) -> Option<String> {
    let (created, id) = sk.strip_prefix(prefix)?.split_once('#')?;
    let created = created.trim_start_matches('0');
    let created = if created.is_empty() { "0" } else { created };
    Some(format!("{created}-{id}"))
}

/// The sort key a client's cursor stands for, if it is one [`cursor_of`] hands out.
pub fn sk_of(cursor: &str, prefix: &str) -> Option<String> {
    let (created, id) = cursor.split_once('-')?;
    if created.is_empty() || created.len() > 12 || !created.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let created: i64 = created.parse().ok()?;
    let ok =
        (1..=100).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| format!("{prefix}{created:012}#{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let sk = history_sk(DateTime::from_timestamp(1_764_000_000, 0).unwrap(), "pi_1");
        let c = cursor_of(&sk, HISTORY_PREFIX).unwrap();
        assert_eq!(c, "1764000000-pi_1");
        assert_eq!(sk_of(&c, HISTORY_PREFIX).as_deref(), Some(sk.as_str()));
        for bad in [
            "",
            "x",
            "1-",
            "-1",
            "1-a#b",
            "9999999999999-pi",
            "1-pi%00",
            "+1-pi",
        ] {
            assert_eq!(sk_of(bad, HISTORY_PREFIX), None, "{bad:?}");
        }
    }
}
