//! Reconciliation of the ledger against Stripe for a time range: what Stripe collected
//! that granted nothing, and what was granted without a payment.
//!
//! Stripe's side is every charge created in the range (paged from Stripe). Tally's side is
//! every money movement filed in those days (the billing history's day index), with the
//! credits each granted. A movement is created with Stripe's own `created` time, so both
//! sides fall in the same range; movements of the day before and after are read too, so a
//! charge near a bound still finds its movement.

use super::history::{self, HistoryEntry, MovementKind};
use crate::ids::{ChargeId, WorkspaceId};
use crate::money::{Cents, Credits};
use crate::payments::{ChargeFact, Payments, PaymentsError};
use crate::store::{DocStore, StoreError};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;
use utoipa::ToSchema;

/// The longest range one reconciliation covers.
pub const MAX_DAYS: i64 = 31;

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Payments(#[from] PaymentsError),
}

/// One line of a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub charge: Option<ChargeId>,
    /// The billing-history movement (invoice or payment intent), if Tally has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub workspace: Option<WorkspaceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<MovementKind>,
    pub amount: Cents,
    pub currency: String,
    pub credits_granted: Credits,
    pub created: DateTime<Utc>,
    /// Why it is listed.
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Charges Stripe created in the range.
    pub charges: u64,
    /// Succeeded charges whose movement granted what it should.
    pub matched: u64,
    pub paid_without_credits: Vec<Line>,
    pub credits_without_payment: Vec<Line>,
    /// Charges whose metadata names another workspace than the one credited.
    pub mismatched: Vec<Line>,
}

fn granted(e: &HistoryEntry) -> Credits {
    e.granted
        .values()
        .fold(Credits::ZERO, |a, c| a.checked_add(*c).unwrap_or(a))
}

/// Movements that always buy credits when paid: packs, top-ups, and the invoices that
/// start or renew a subscription period. (A proration can round to nothing, and an
/// interval switch can be worth less than the month it replaces.)
fn grants_credits(e: &HistoryEntry) -> bool {
    match e.kind {
        Some(MovementKind::Pack | MovementKind::TopUp) => true,
        Some(MovementKind::Subscription) => matches!(
            e.billing_reason.as_deref(),
            Some("subscription_create" | "subscription_cycle")
        ),
        _ => false,
    }
}

/// Every charge Stripe created in `[from, to)`, oldest first.
pub async fn stripe_charges(
    payments: &dyn Payments,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<ChargeFact>, PaymentsError> {
    let mut out: Vec<ChargeFact> = Vec::new();
    let mut after: Option<ChargeId> = None;
    loop {
        let page = payments.charges_between(from, to, after.as_ref()).await?;
        after = page.charges.last().map(|c| c.id.clone());
        let done = !page.has_more || page.charges.is_empty();
        out.extend(page.charges);
        if done {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

/// How far either side of the range both sides are read: an invoice is filed when it is
/// created and charged up to an hour later (a renewal) or days later (a retried card, a
/// custom payment), a checkout may cross midnight.
pub const MARGIN_DAYS: i64 = 2;

/// The movement Tally filed for a charge, found from the charge's payment record (for
/// charges the day index does not pair, e.g. paid long after the invoice was filed).
async fn movement_of_charge(
    docs: &dyn DocStore,
    charge: &ChargeId,
) -> Result<Option<(WorkspaceId, HistoryEntry)>, StoreError> {
    use super::records::{PAYMENT_SK, PaymentRecord, charge_pk};
    use super::refunds::{PaymentLink, payment_pk};
    let Some(p) =
        crate::store::docs::get::<PaymentRecord>(docs, &charge_pk(charge), PAYMENT_SK).await?
    else {
        return Ok(None);
    };
    let (Some(ws), Some(pi)) = (p.workspace, p.payment_intent) else {
        return Ok(None);
    };
    let link =
        crate::store::docs::get::<PaymentLink>(docs, &payment_pk(&pi), super::records::LINK_SK)
            .await?;
    let id = match link.and_then(|l| l.invoice) {
        Some(i) => i.to_string(),
        None => pi.to_string(),
    };
    Ok(history::get(docs, &ws, &id).await?.map(|e| (ws, e)))
}

fn purchase(kind: Option<MovementKind>) -> bool {
    !matches!(
        kind,
        Some(MovementKind::Refund | MovementKind::Dispute) | None
    )
}

/// Compares Stripe's charges in `[from, to)` with the movements Tally filed.
///
/// - `paid_without_credits`: a charge created in the range that Stripe collected (and did
///   not refund in full) with no movement in Tally, or whose pack, top-up or subscription
///   movement granted nothing;
/// - `credits_without_payment`: a movement created in the range that granted credits while
///   Stripe has no collected charge for it (a movement that cost nothing, a 100% coupon,
///   is not listed);
/// - `mismatched`: a charge whose metadata names another workspace than the one its
///   credits went to.
///
/// Movements are filed in the day index from the release that added it on: a range
/// before it finds every charge without a record.
pub async fn reconcile(
    docs: &dyn DocStore,
    payments: &dyn Payments,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Report, ReconcileError> {
    let margin = Duration::days(MARGIN_DAYS);
    let listed = stripe_charges(payments, from - margin, to + margin).await?;
    let in_range = |t: DateTime<Utc>| t >= from && t < to;
    // Tally's side: every movement filed in the widened range, read straight from where
    // the day index says it is filed.
    let mut entries: BTreeMap<String, (WorkspaceId, HistoryEntry)> = BTreeMap::new();
    let mut day = (from - margin).date_naive();
    let last = (to + margin).date_naive();
    while day <= last {
        for (sk, d) in history::day(docs, day).await? {
            let pk = super::records::workspace_pk(&d.workspace);
            if let Some(e) = crate::store::docs::get::<HistoryEntry>(docs, &pk, &sk).await? {
                entries.insert(e.id.clone(), (d.workspace, e));
            }
        }
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
    let by_charge: HashMap<ChargeId, &(WorkspaceId, HistoryEntry)> = entries
        .values()
        .filter(|(_, e)| purchase(e.kind))
        .filter_map(|pair| pair.1.charge.clone().map(|c| (c, pair)))
        .collect();
    let mut report = Report {
        from,
        to,
        charges: 0,
        matched: 0,
        paid_without_credits: Vec::new(),
        credits_without_payment: Vec::new(),
        mismatched: Vec::new(),
    };
    let succeeded: HashMap<ChargeId, &ChargeFact> = listed
        .iter()
        .filter(|c| c.succeeded)
        .map(|c| (c.id.clone(), c))
        .collect();
    for c in listed.iter().filter(|c| in_range(c.created)) {
        report.charges += 1;
        if !c.succeeded {
            continue;
        }
        let fully_refunded = c.amount_refunded >= c.amount;
        let found = match by_charge.get(&c.id) {
            Some((ws, e)) => Some((ws.clone(), e.clone())),
            None => movement_of_charge(docs, &c.id).await?,
        };
        let line = |movement: Option<&(WorkspaceId, HistoryEntry)>, note: &str| Line {
            charge: Some(c.id.clone()),
            movement: movement.map(|(_, e)| e.id.clone()),
            workspace: movement
                .map(|(w, _)| w.clone())
                .or_else(|| c.workspace.clone()),
            kind: movement.and_then(|(_, e)| e.kind),
            amount: c.amount,
            currency: c.currency.clone(),
            credits_granted: movement.map_or(Credits::ZERO, |(_, e)| granted(e)),
            created: c.created,
            note: note.to_owned(),
        };
        match &found {
            None if !fully_refunded => report.paid_without_credits.push(line(
                None,
                "Stripe collected this charge and Tally has no record of it",
            )),
            Some((_, e)) if grants_credits(e) && granted(e).is_zero() && !fully_refunded => {
                report.paid_without_credits.push(line(
                    found.as_ref(),
                    "paid for credits that were never granted",
                ))
            }
            Some((ws, _)) if c.workspace.as_ref().is_some_and(|named| named != ws) => {
                report.mismatched.push(line(
                    found.as_ref(),
                    "the charge names another workspace than the one its credits went to",
                ))
            }
            _ => report.matched += 1,
        }
    }
    for (ws, e) in entries.values() {
        let credits = granted(e);
        // An invoice that cost nothing (a 100% coupon) grants without a charge; a pack or
        // top-up row takes its amount from its charge, so one with none is never skipped.
        let free_invoice = e.amount == Cents::ZERO
            && !matches!(e.kind, Some(MovementKind::Pack | MovementKind::TopUp));
        if credits.is_zero() || !in_range(e.created) || free_invoice {
            continue;
        }
        let paid = match &e.charge {
            None => false,
            Some(c) if succeeded.contains_key(c) => true,
            // Collected outside the widened range (a late payment): asked for by id.
            Some(c) => payments.charge(c).await?.is_some_and(|f| f.succeeded),
        };
        if !paid {
            report.credits_without_payment.push(Line {
                charge: e.charge.clone(),
                movement: Some(e.id.clone()),
                workspace: Some(ws.clone()),
                kind: e.kind,
                amount: e.amount,
                currency: e.currency.clone().unwrap_or_default(),
                credits_granted: credits,
                created: e.created,
                note: match &e.charge {
                    None => "credits granted for a movement with no collected charge".into(),
                    Some(_) => {
                        "credits granted for a charge Stripe does not show as collected".into()
                    }
                },
            });
        }
    }
    Ok(report)
}
