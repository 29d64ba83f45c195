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
}

fn granted(e: &HistoryEntry) -> Credits {
    e.granted
        .values()
        .fold(Credits::ZERO, |a, c| a.checked_add(*c).unwrap_or(a))
}

/// Kinds of movement that buy credits.
fn grants_credits(kind: Option<MovementKind>) -> bool {
    matches!(
        kind,
        Some(MovementKind::Pack | MovementKind::TopUp | MovementKind::Subscription)
    )
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

/// Compares Stripe's charges in `[from, to)` with the movements Tally filed.
pub async fn reconcile(
    docs: &dyn DocStore,
    payments: &dyn Payments,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Report, ReconcileError> {
    let charges = stripe_charges(payments, from, to).await?;
    let mut workspaces: HashMap<String, WorkspaceId> = HashMap::new();
    let mut by_charge: HashMap<ChargeId, HistoryEntry> = HashMap::new();
    let mut entries: BTreeMap<String, HistoryEntry> = BTreeMap::new();
    let mut day = (from - Duration::days(1)).date_naive();
    let last = (to + Duration::days(1)).date_naive();
    while day <= last {
        for d in history::day(docs, day).await? {
            if let Some(e) = history::get(docs, &d.workspace, &d.id).await? {
                workspaces.insert(e.id.clone(), d.workspace.clone());
                if let Some(c) = &e.charge {
                    by_charge.insert(c.clone(), e.clone());
                }
                entries.insert(e.id.clone(), e);
            }
        }
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
    let mut report = Report {
        from,
        to,
        charges: charges.len() as u64,
        matched: 0,
        paid_without_credits: Vec::new(),
        credits_without_payment: Vec::new(),
    };
    let mut succeeded: HashMap<ChargeId, &ChargeFact> = HashMap::new();
    for c in &charges {
        if !c.succeeded {
            continue;
        }
        succeeded.insert(c.id.clone(), c);
        let fully_refunded = c.amount_refunded >= c.amount;
        match by_charge.get(&c.id) {
            None if !fully_refunded => report.paid_without_credits.push(Line {
                charge: Some(c.id.clone()),
                movement: None,
                workspace: c.workspace.clone(),
                kind: None,
                amount: c.amount,
                currency: c.currency.clone(),
                credits_granted: Credits::ZERO,
                created: c.created,
                note: "Stripe collected this charge and Tally has no record of it".into(),
            }),
            Some(e) if grants_credits(e.kind) && granted(e).is_zero() && !fully_refunded => {
                report.paid_without_credits.push(Line {
                    charge: Some(c.id.clone()),
                    movement: Some(e.id.clone()),
                    workspace: workspaces.get(&e.id).cloned(),
                    kind: e.kind,
                    amount: c.amount,
                    currency: c.currency.clone(),
                    credits_granted: Credits::ZERO,
                    created: c.created,
                    note: "paid for credits that were never granted".into(),
                })
            }
            _ => report.matched += 1,
        }
    }
    for e in entries.values() {
        let credits = granted(e);
        if credits.is_zero() || e.created < from || e.created >= to {
            continue;
        }
        let paid = e.charge.as_ref().is_some_and(|c| succeeded.contains_key(c));
        if !paid {
            report.credits_without_payment.push(Line {
                charge: e.charge.clone(),
                movement: Some(e.id.clone()),
                workspace: workspaces.get(&e.id).cloned(),
                kind: e.kind,
                amount: e.amount,
                currency: e.currency.clone().unwrap_or_default(),
                credits_granted: credits,
                created: e.created,
                note: match &e.charge {
                    None => "credits granted for a movement with no charge".into(),
                    Some(_) => "credits granted for a charge Stripe does not list as collected in the range".into(),
                },
            });
        }
    }
    Ok(report)
}
