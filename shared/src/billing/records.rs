//! Billing documents and where they live. Every merge picks a winner by a total order on
//! the facts (status rank, Stripe's `created` time, event id), so any delivery order of the
//! same events ends in the same document.

use crate::ids::WorkspaceId;
use crate::ledger::{Interval, PlanState, PlanStatus};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub fn workspace_pk(workspace: &WorkspaceId) -> String {
    format!("WORKSPACE#{workspace}")
}
pub fn customer_pk(customer: &str) -> String {
    format!("CUSTOMER#{customer}")
}
pub fn charge_pk(charge: &str) -> String {
    format!("CHARGE#{charge}")
}
pub const PROFILE_SK: &str = "BILLING";
pub const SUBSCRIPTION_SK: &str = "SUBSCRIPTION";
pub const LINK_SK: &str = "LINK";
pub const PAYMENT_SK: &str = "PAYMENT";
pub const INVOICE_PREFIX: &str = "INVOICE#";

/// Invoices sort by creation time, so listing the prefix newest first is billing history.
pub fn invoice_sk(created: i64, id: &str) -> String {
    format!("{INVOICE_PREFIX}{created:012}#{id}")
}

/// A workspace's Stripe identities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingProfile {
    pub customer: Option<String>,
    pub subscription: Option<String>,
    /// The card saved by the last checkout, for auto top-up.
    #[serde(default)]
    pub payment_method: Option<String>,
}

/// Which workspace a Stripe customer (or charge) belongs to. Written once; never moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub workspace: WorkspaceId,
}

/// The subscription as the latest Stripe facts describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionRecord {
    pub id: String,
    pub customer: Option<String>,
    pub plan: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub stripe_status: String,
    pub cancel_at_period_end: bool,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub addon_units: u32,
    /// A downgrade or add-on reduction waiting for the next renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<ScheduledChange>,
    /// Stripe `created` time of the event these facts came from, and its id.
    pub as_of: i64,
    pub as_of_event: String,
}

impl SubscriptionRecord {
    fn order(&self) -> (i64, u8, &str) {
        let terminal = u8::from(self.status == PlanStatus::Canceled);
        (self.as_of, terminal, self.as_of_event.as_str())
    }

    /// The newer of two descriptions of the same subscription; a different (newer)
    /// subscription id replaces the old one only when its facts are newer.
    pub fn merge(current: Option<Self>, incoming: Self) -> Option<Self> {
        match current {
            // Another subscription only takes over once the current one has ended: a late
            // event about an old subscription must not bring it back.
            Some(c) if c.id != incoming.id && c.status != PlanStatus::Canceled => None,
            Some(c) if c.order() >= incoming.order() => None,
            _ => Some(incoming),
        }
    }

    /// Like [`merge`](Self::merge) for facts read off an invoice, which say nothing about
    /// cancellation: the known `cancel_at_period_end` is kept.
    pub fn merge_invoice_facts(current: Option<Self>, mut incoming: Self) -> Option<Self> {
        if let Some(c) = &current
            && c.id == incoming.id
        {
            incoming.cancel_at_period_end = c.cancel_at_period_end;
        }
        Self::merge(current, incoming)
    }

    /// The add-on units Stripe bills from the next renewal (a scheduled reduction already
    /// changed the quantity there).
    pub fn billed_addon_units(&self) -> u32 {
        self.scheduled
            .as_ref()
            .map_or(self.addon_units, |s| s.addon_units)
    }

    /// A pending add-on reduction, carried over to new terms; `None` when there is none.
    pub fn pending_addon_reduction(
        &self,
        plan: &str,
        interval: Interval,
    ) -> Option<ScheduledChange> {
        let units = self.billed_addon_units();
        (units != self.addon_units).then(|| ScheduledChange {
            plan: plan.to_owned(),
            interval,
            addon_units: units,
            from: self.period_end,
        })
    }

    pub fn plan_state(&self) -> PlanState {
        PlanState {
            plan: self.plan.clone(),
            interval: self.interval,
            status: self.status,
            period_start: self.period_start,
            period_end: self.period_end,
            cancel_at_period_end: self.cancel_at_period_end,
        }
    }
}

/// Terms that take effect at the start of the next period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScheduledChange {
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
    pub from: DateTime<Utc>,
}

/// An invoice line of billing history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceRecord {
    pub id: String,
    pub number: Option<String>,
    pub status: String,
    pub billing_reason: Option<String>,
    /// Integer cents.
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    pub currency: String,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub created: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub subscription: Option<String>,
    pub as_of: i64,
    pub as_of_event: String,
}

impl InvoiceRecord {
    fn rank(status: &str) -> u8 {
        match status {
            "draft" => 0,
            "open" => 1,
            _ => 2, // paid, void, uncollectible: final
        }
    }
    fn order(&self) -> (u8, i64, &str) {
        (
            Self::rank(&self.status),
            self.as_of,
            self.as_of_event.as_str(),
        )
    }
    pub fn merge(current: Option<Self>, incoming: Self) -> Option<Self> {
        match current {
            Some(c) if c.order() >= incoming.order() => None,
            _ => Some(incoming),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RefundFact {
    pub id: String,
    pub amount: i64,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub created: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DisputeFact {
    pub id: String,
    pub amount: i64,
    pub reason: Option<String>,
    pub status: Option<String>,
    pub created: DateTime<Utc>,
    pub as_of: i64,
}

/// A payment (Stripe charge) with what happened to it afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PaymentRecord {
    pub charge: String,
    pub workspace: Option<WorkspaceId>,
    pub amount: i64,
    pub amount_refunded: i64,
    pub currency: Option<String>,
    pub payment_intent: Option<String>,
    pub created: Option<DateTime<Utc>>,
    pub refunds: Vec<RefundFact>,
    pub disputes: Vec<DisputeFact>,
}

impl PaymentRecord {
    /// Union of facts: amounts only grow, refunds and disputes are merged by id (a
    /// dispute's newest state wins). Returns `None` when nothing changes.
    pub fn merge(current: Option<Self>, incoming: Self) -> Option<Self> {
        let Some(mut merged) = current.clone() else {
            return Some(incoming);
        };
        merged.workspace = merged.workspace.or(incoming.workspace);
        merged.amount = merged.amount.max(incoming.amount);
        merged.amount_refunded = merged.amount_refunded.max(incoming.amount_refunded);
        merged.currency = merged.currency.or(incoming.currency);
        merged.payment_intent = merged.payment_intent.or(incoming.payment_intent);
        merged.created = merged.created.or(incoming.created);
        for r in incoming.refunds {
            match merged.refunds.iter_mut().find(|x| x.id == r.id) {
                Some(x) if r.status.is_some() && x.status.as_deref() != Some("succeeded") => *x = r,
                Some(_) => {}
                None => merged.refunds.push(r),
            }
        }
        for d in incoming.disputes {
            match merged.disputes.iter_mut().find(|x| x.id == d.id) {
                Some(x) if (d.as_of, &d.status) > (x.as_of, &x.status) => *x = d,
                Some(_) => {}
                None => merged.disputes.push(d),
            }
        }
        merged
            .refunds
            .sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        merged
            .disputes
            .sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        (Some(&merged) != current.as_ref()).then_some(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: PlanStatus, as_of: i64, cancel: bool) -> SubscriptionRecord {
        SubscriptionRecord {
            id: id.into(),
            customer: None,
            plan: "max".into(),
            interval: Interval::Monthly,
            status,
            stripe_status: "active".into(),
            cancel_at_period_end: cancel,
            period_start: DateTime::from_timestamp(0, 0).unwrap(),
            period_end: DateTime::from_timestamp(100, 0).unwrap(),
            addon_units: 0,
            scheduled: None,
            as_of,
            as_of_event: format!("evt_{as_of}"),
        }
    }

    #[test]
    fn a_late_event_about_an_old_subscription_does_not_replace_the_live_one() {
        let live = record("sub_new", PlanStatus::Active, 10, false);
        let late = record("sub_old", PlanStatus::PastDue, 20, false);
        assert_eq!(SubscriptionRecord::merge(Some(live), late), None);
        // Once the current one has ended, a newer subscription takes over.
        let ended = record("sub_old", PlanStatus::Canceled, 10, false);
        let next = record("sub_new", PlanStatus::Active, 20, false);
        assert_eq!(
            SubscriptionRecord::merge(Some(ended), next.clone()),
            Some(next)
        );
    }

    #[test]
    fn invoice_facts_keep_a_known_cancellation() {
        let cancelling = record("sub_a", PlanStatus::Active, 10, true);
        let from_invoice = record("sub_a", PlanStatus::Active, 20, false);
        let merged =
            SubscriptionRecord::merge_invoice_facts(Some(cancelling), from_invoice).unwrap();
        assert!(merged.cancel_at_period_end);
        assert_eq!(merged.as_of, 20);
    }
}
