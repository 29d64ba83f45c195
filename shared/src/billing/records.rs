//! Billing documents and where they live. Every merge picks a winner by a total order on
//! the facts (status rank, Stripe's `created` time, event id), so any delivery order of the
//! same events ends in the same document. The subscription document itself lives with the
//! rest of the subscription rules, in [`crate::subscriptions`].

pub use crate::subscriptions::{ScheduledChange, SubscriptionRecord};

use crate::ids::{
    ChargeId, CustomerId, DisputeId, InvoiceId, PaymentIntentId, PaymentMethodId, RefundId,
    StripeEventId, SubscriptionId, WorkspaceId,
};
use crate::money::{Cents, SignedCents};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub fn workspace_pk(workspace: &WorkspaceId) -> String {
    format!("WORKSPACE#{workspace}")
}
pub fn customer_pk(customer: &CustomerId) -> String {
    format!("CUSTOMER#{customer}")
}
pub fn charge_pk(charge: &ChargeId) -> String {
    format!("CHARGE#{charge}")
}
pub const PROFILE_SK: &str = "BILLING";
pub const SUBSCRIPTION_SK: &str = "SUBSCRIPTION";
pub const LINK_SK: &str = "LINK";
pub const PAYMENT_SK: &str = "PAYMENT";
pub const INVOICE_PREFIX: &str = "INVOICE#";

/// Where an invoice is filed: its workspace and creation time (`INVOICE#<id>` / `LINK`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLink {
    pub workspace: WorkspaceId,
    pub created: i64,
}

pub fn invoice_link_pk(invoice: &InvoiceId) -> String {
    format!("{INVOICE_PREFIX}{invoice}")
}

/// Invoices sort by creation time, so listing the prefix newest first is billing history.
pub fn invoice_sk(created: i64, id: &InvoiceId) -> String {
    format!("{INVOICE_PREFIX}{created:012}#{id}")
}

/// A workspace's Stripe identities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingProfile {
    pub customer: Option<CustomerId>,
    pub subscription: Option<SubscriptionId>,
    /// The card auto top-up charges: that of the latest card payment whose card Stripe
    /// keeps for the customer.
    #[serde(default)]
    pub payment_method: Option<PaymentMethodId>,
    /// When the payment that made it the saved card was made (Unix seconds, Stripe's
    /// `created`): an older payment delivered later does not replace it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method_at: Option<i64>,
}

/// Which workspace a Stripe customer (or charge) belongs to. Written once; never moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub workspace: WorkspaceId,
}

/// An invoice line of billing history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceRecord {
    pub id: InvoiceId,
    pub number: Option<String>,
    pub status: String,
    pub billing_reason: Option<String>,
    pub amount_due: Cents,
    pub amount_paid: Cents,
    pub amount_remaining: Cents,
    /// Below zero when credit notes and prorations exceed the invoice's charges.
    pub total: SignedCents,
    pub currency: String,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub created: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub subscription: Option<SubscriptionId>,
    pub as_of: i64,
    pub as_of_event: StripeEventId,
}

impl InvoiceRecord {
    pub fn rank(status: &str) -> u8 {
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
    pub id: RefundId,
    pub amount: Cents,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub created: DateTime<Utc>,
    /// The refund request that asked for it, and which of its approvals (the refund's
    /// `refund_request` and `refund_attempt` metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

impl RefundFact {
    /// Refunds move from pending to succeeded, and may still fail (or be canceled) after.
    pub fn rank(&self) -> u8 {
        refund_rank(self.status.as_deref())
    }
}

/// The order of a refund's statuses.
pub fn refund_rank(status: Option<&str>) -> u8 {
    match status {
        None => 0,
        Some("pending" | "requires_action") => 1,
        Some("succeeded") => 2,
        Some(_) => 3, // failed, canceled
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DisputeFact {
    pub id: DisputeId,
    pub amount: Cents,
    pub reason: Option<String>,
    pub status: Option<String>,
    pub created: DateTime<Utc>,
    pub as_of: i64,
}

impl DisputeFact {
    /// Its status; a dispute whose event carried none is taken as open.
    pub fn status_or_open(&self) -> &str {
        self.status.as_deref().unwrap_or("needs_response")
    }

    /// A closed dispute never reopens, so its outcome wins over any open state, even one
    /// delivered later or stamped the same second.
    pub fn order(&self) -> (bool, i64, Option<&str>) {
        let closed = matches!(
            self.status.as_deref(),
            Some("won" | "lost" | "warning_closed" | "prevented")
        );
        (closed, self.as_of, self.status.as_deref())
    }
}

/// A payment (Stripe charge) with what happened to it afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PaymentRecord {
    pub charge: ChargeId,
    pub workspace: Option<WorkspaceId>,
    pub amount: Cents,
    pub amount_refunded: Cents,
    pub currency: Option<String>,
    pub payment_intent: Option<PaymentIntentId>,
    pub created: Option<DateTime<Utc>>,
    pub refunds: Vec<RefundFact>,
    pub disputes: Vec<DisputeFact>,
    #[serde(default)]
    pub receipt_url: Option<String>,
}

impl PaymentRecord {
    /// A dispute's status as the credits follow it. An inquiry still open when a
    /// chargeback of the payment was opened at or after it was escalated: the chargeback
    /// decides, so the inquiry counts as closed (`warning_closed`), whether or not Stripe
    /// has closed it yet.
    pub fn dispute_status<'a>(&'a self, d: &'a DisputeFact) -> &'a str {
        let status = d.status_or_open();
        let inquiry_open = status.starts_with("warning_") && status != "warning_closed";
        let escalated = inquiry_open
            && self.disputes.iter().any(|o| {
                o.id != d.id
                    && !o.status_or_open().starts_with("warning_")
                    && o.created >= d.created
            });
        if escalated { "warning_closed" } else { status }
    }

    /// A payment known so far only by its charge; other facts merge in as they arrive.
    pub fn new(charge: ChargeId) -> Self {
        Self {
            charge,
            workspace: None,
            amount: Cents::default(),
            amount_refunded: Cents::default(),
            currency: None,
            payment_intent: None,
            created: None,
            refunds: Vec::new(),
            disputes: Vec::new(),
            receipt_url: None,
        }
    }

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
        merged.receipt_url = merged.receipt_url.or(incoming.receipt_url);
        for r in incoming.refunds {
            match merged.refunds.iter_mut().find(|x| x.id == r.id) {
                Some(x) if r.rank() > x.rank() => {
                    let (request, attempt) = (x.request.take(), x.attempt.take());
                    *x = r;
                    x.request = x.request.take().or(request);
                    x.attempt = x.attempt.take().or(attempt);
                }
                Some(x) => {
                    x.request = x.request.take().or(r.request);
                    x.attempt = x.attempt.take().or(r.attempt);
                }
                None => merged.refunds.push(r),
            }
        }
        for d in incoming.disputes {
            match merged.disputes.iter_mut().find(|x| x.id == d.id) {
                Some(x) if d.order() > x.order() => *x = d,
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
