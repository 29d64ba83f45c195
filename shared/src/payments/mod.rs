//! The Payments port: what Tally asks of Stripe. [`stripe_api::StripePayments`] talks to the
//! Stripe API; the local runner's simulator (`tally-local`) stands in for it offline,
//! completing checkouts by delivering signed Stripe-shaped events to the webhook.

pub mod stripe_api;

use crate::error::BoxError;
use crate::ids::{
    ChargeId, CheckoutSessionId, CustomerId, InvoiceId, PaymentIntentId, PaymentMethodId, RefundId,
    SubscriptionId, WorkspaceId,
};
use crate::ledger::Interval;
use crate::money::{Cents, Credits};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why Stripe did not do what was asked. `message` says it for people (it may be shown as
/// a problem's detail); `source` keeps the provider's error when there is one.
#[derive(Debug, Error)]
pub enum PaymentsError {
    /// Stripe refused the request (card declined, invalid parameter...). Not retryable.
    #[error("payment provider refused the request: {message}")]
    Refused {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Network, timeout or 5xx: retry with the same idempotency key.
    #[error("payment provider unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The subscription changed (elsewhere: the portal, the dashboard) after the change was
    /// decided; nothing was sent. Decide again.
    #[error("the subscription changed meanwhile: {message}")]
    Changed { message: String },
}

/// How Stripe's answer to an idempotency key reused with other parameters begins.
pub const KEY_REUSED: &str = "Keys for idempotent requests";

impl PaymentsError {
    pub fn refused(message: impl Into<String>) -> Self {
        Self::Refused {
            message: message.into(),
            source: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// The same error, with the provider's error that caused it.
    pub fn caused_by(self, cause: impl Into<BoxError>) -> Self {
        let source = Some(cause.into());
        match self {
            Self::Refused { message, .. } => Self::Refused { message, source },
            Self::Unavailable { message, .. } => Self::Unavailable { message, source },
            changed @ Self::Changed { .. } => changed,
        }
    }

    /// Stripe refused an idempotency key it saw first with other parameters (its
    /// `idempotency_error`, told by its message): the request was not made, and an earlier
    /// one under the same key may have been.
    pub fn is_key_reused(&self) -> bool {
        matches!(self, Self::Refused { message, .. } if message.contains(KEY_REUSED))
    }

    /// Stripe turned the key away (401: revoked or rolled; 403: a restricted key without
    /// the permission): retried like an outage, since someone may mend the key, but
    /// nothing a retry alone gets over.
    pub fn is_key_denied(&self) -> bool {
        matches!(self, Self::Unavailable { message, .. }
            if message.starts_with("401:") || message.starts_with("403:"))
    }

    /// What happened, in words.
    pub fn message(&self) -> &str {
        match self {
            Self::Refused { message, .. }
            | Self::Unavailable { message, .. }
            | Self::Changed { message } => message,
        }
    }

    /// Whether the same request (same idempotency key) may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// What a checkout sells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Purchase {
    Plan {
        plan: String,
        name: String,
        interval: Interval,
        /// Price per interval, integer cents.
        unit_amount: Cents,
    },
    Pack {
        pack: String,
        name: String,
        quantity: u64,
        /// Price per pack after the plan's pack discount, integer cents.
        unit_amount: Cents,
        credits: Credits,
        /// The plan's pack discount priced in, percent (0 without one). The session
        /// carries it, so it can be expired when the plan stops giving it.
        #[serde(default)]
        discount_pct: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutRequest {
    pub workspace: WorkspaceId,
    pub customer: CustomerId,
    pub purchase: Purchase,
    pub success_url: String,
    pub cancel_url: String,
    /// Stripe idempotency key derived from our own request.
    pub idempotency_key: String,
}

/// What stands in the way of a new plan checkout, once the open ones are expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanCheckouts {
    /// No subscription that has not ended, and no other checkout that can be paid.
    Clear,
    /// Stripe has this subscription of the customer, not ended.
    Subscribed(SubscriptionId),
    /// This checkout was paid while it was being expired.
    JustPaid(CheckoutSessionId),
}

/// The metadata key of a plan checkout session naming the idempotency key it was made
/// under (so a retry of the same request keeps its own session).
pub const CHECKOUT_REQUEST_KEY: &str = "tally_request";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutLink {
    pub id: CheckoutSessionId,
    pub url: String,
    /// Stripe answered a session made earlier under the same key that can no longer be
    /// paid (expired): its URL is of no use.
    #[serde(default)]
    pub expired: bool,
}

/// A recurring price for a subscription item, on a product Tally owns (`tally_<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPrice {
    pub product: String,
    pub product_name: String,
    /// Integer cents per interval.
    pub unit_amount: Cents,
    pub interval: Interval,
}

/// The desired state of a subscription after a change. Unset fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionChange {
    pub subscription: SubscriptionId,
    /// A new price for the plan item.
    pub plan: Option<ItemPrice>,
    /// The add-on item's quantity (0 removes it) and price.
    pub addons: Option<(u64, ItemPrice)>,
    /// Invoice the prorated difference now (upgrades, more units) rather than from the
    /// next renewal on (downgrades, fewer units).
    pub prorate_now: bool,
    /// Metadata to set on the subscription (keys with an empty value are removed).
    pub metadata: std::collections::BTreeMap<String, String>,
    pub cancel_at_period_end: Option<bool>,
    /// `Some(true)` pauses collection (invoices voided), `Some(false)` resumes.
    pub pause: Option<bool>,
    /// The items the change was decided against: if Stripe's differ (a change made
    /// elsewhere meanwhile), nothing is sent and [`PaymentsError::Changed`] is returned.
    pub expect: Option<Vec<LiveItem>>,
    pub idempotency_key: String,
}

impl SubscriptionChange {
    /// A change to `subscription` that changes nothing yet; set the fields that change.
    pub fn to(subscription: SubscriptionId) -> Self {
        Self {
            subscription,
            plan: None,
            addons: None,
            prorate_now: false,
            metadata: Default::default(),
            cancel_at_period_end: None,
            pause: None,
            expect: None,
            idempotency_key: String::new(),
        }
    }
}

/// An item of a subscription as Stripe bills it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveItem {
    /// The subscription item's id (`si_...`).
    pub id: String,
    /// The price's id (`price_...`), needed to keep the item unchanged in a schedule.
    pub price: String,
    pub product: String,
    pub unit_amount: Cents,
    pub interval: Interval,
    pub quantity: u64,
}

/// A subscription as Stripe has it now: what changes are decided against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSubscription {
    pub id: SubscriptionId,
    pub customer: CustomerId,
    /// Stripe's status (`active`, `past_due`, `canceled`, ...).
    pub status: String,
    /// Collection paused (`pause_collection` set).
    pub paused: bool,
    pub cancel_at_period_end: bool,
    pub period_start: chrono::DateTime<chrono::Utc>,
    pub period_end: chrono::DateTime<chrono::Utc>,
    pub items: Vec<LiveItem>,
    /// The subscription schedule holding a change at renewal, if any.
    pub schedule: Option<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl LiveSubscription {
    /// The item of one of Tally's products of this kind (`plan` or `addon`).
    pub fn item(&self, kind: &str) -> Option<&LiveItem> {
        let prefix = format!("tally_{kind}_");
        self.items.iter().find(|i| i.product.starts_with(&prefix))
    }
}

/// A line of an invoice Stripe created for a change, as it bills it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledLine {
    pub product: String,
    pub quantity: u64,
    /// Signed cents: a credit for unused time is negative.
    pub amount: i64,
    pub period_start: chrono::DateTime<chrono::Utc>,
    pub period_end: chrono::DateTime<chrono::Utc>,
    pub proration: bool,
    pub description: String,
}

/// An invoice Stripe created (or would create) for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledInvoice {
    /// `None` for a preview.
    pub id: Option<InvoiceId>,
    pub lines: Vec<BilledLine>,
    /// Signed cents before tax.
    pub subtotal: i64,
    pub tax: i64,
    pub total: i64,
    pub amount_paid: Cents,
    /// Stripe collected it (`status: paid`); a debit still processing is not paid yet.
    pub paid: bool,
    /// `lines` are all of the invoice's (false when Stripe's answer carried the first ones
    /// and the rest could not be read: nothing is valued on them, the invoice's event
    /// grants).
    pub lines_complete: bool,
}

/// The items a subscription has from its next renewal on, kept in a subscription schedule
/// so that today's prices stay as they are until then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalChange {
    pub subscription: SubscriptionId,
    /// The plan item's price from the renewal on.
    pub plan: ItemPrice,
    /// Add-on units (0: none) and their price from the renewal on.
    pub addons: (u64, ItemPrice),
    /// Metadata to set on the subscription now (today's terms and the change, for display).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The subscription's metadata from the renewal on (the new terms).
    pub next_metadata: std::collections::BTreeMap<String, String>,
    pub idempotency_key: String,
}

/// An invoice for an agreed amount, paid by bank transfer or card through Stripe's hosted
/// invoice page; its credits are granted when Stripe reports it paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomInvoice {
    pub workspace: WorkspaceId,
    pub customer: CustomerId,
    /// Integer cents.
    pub amount: Cents,
    pub credits: Credits,
    pub description: String,
    pub days_until_due: u32,
    /// The staff member who billed it (token subject), kept on the invoice's metadata
    /// (`issued_by`) as its audit trail.
    pub staff: String,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLink {
    pub id: InvoiceId,
    pub hosted_invoice_url: String,
}

/// An off-session purchase of a pack with the customer's saved card (auto top-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUp {
    pub workspace: WorkspaceId,
    pub customer: CustomerId,
    pub payment_method: PaymentMethodId,
    pub pack: String,
    /// The credits the pack is sold with (recorded on the payment; its grant follows them).
    pub credits: Credits,
    /// Integer cents, after the plan's pack discount.
    pub amount: Cents,
    pub idempotency_key: String,
}

/// How Stripe answered a top-up's payment intent that it did not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUpPayment {
    /// `succeeded`: the money is taken.
    Succeeded(PaymentIntentId),
    /// `processing`: Stripe is still collecting it (rare for a card, but Stripe may answer
    /// so). It ends taken (`payment_intent.succeeded`, which brings the credits) or failed
    /// ([`Collection::Failed`]).
    Processing(PaymentIntentId),
}

/// Where a payment intent Stripe was collecting stands now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collection {
    /// `succeeded`.
    Taken,
    /// Still `processing`.
    Processing,
    /// Not paid (`requires_payment_method` after a decline, `canceled`...): why, as Stripe
    /// says it.
    Failed(String),
}

impl TopUpPayment {
    pub fn intent(&self) -> &PaymentIntentId {
        match self {
            Self::Succeeded(id) | Self::Processing(id) => id,
        }
    }
}

/// An invoice documenting money already received (an auto top-up's payment): created,
/// finalized and marked paid out of band, so it never charges anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidInvoice {
    pub workspace: WorkspaceId,
    pub customer: CustomerId,
    /// (description, signed integer cents) per line.
    pub lines: Vec<(String, i64)>,
    pub description: String,
    /// Metadata of the invoice (`org_id` is added).
    pub metadata: std::collections::BTreeMap<String, String>,
    pub idempotency_key: String,
}

/// Corrected billing details for a customer's invoices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BillingDetails {
    pub name: Option<String>,
    pub email: Option<String>,
    pub address: Option<Address>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    #[schema(schema_with = crate::http::text::text_schema)]
    pub line1: String,
    #[schema(schema_with = crate::http::text::optional_text_schema)]
    pub line2: Option<String>,
    #[schema(schema_with = crate::http::text::optional_text_schema)]
    pub city: Option<String>,
    #[schema(schema_with = crate::http::text::optional_text_schema)]
    pub postal_code: Option<String>,
    #[schema(schema_with = crate::http::text::optional_text_schema)]
    pub state: Option<String>,
    /// Two-letter country code (ISO 3166-1 alpha-2).
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: String,
}

/// A paid invoice reissued with corrected billing details: the customer's details are
/// corrected, the original gets a credit note settled out of band (no money moves) and a
/// replacement with the same lines is issued, paid by the original payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reissue {
    pub workspace: WorkspaceId,
    pub customer: CustomerId,
    pub invoice: InvoiceId,
    pub details: BillingDetails,
    /// The staff member who asked for it (token subject), kept on the replacement's
    /// metadata (`reissued_by`) as its audit trail.
    pub staff: String,
    pub idempotency_key: String,
}

/// The memo of the credit note a reissue settles its original with: how billing tells that
/// note (no money given back) from one made in the dashboard.
pub const REISSUE_MEMO: &str = "Reissued with corrected billing details; replaced by a new invoice";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reissued {
    pub replacement: InvoiceLink,
    pub credit_note: String,
}

/// Money given back on a charge, for a refund request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundOrder {
    pub workspace: WorkspaceId,
    pub charge: ChargeId,
    /// Integer cents, at most what is left of the charge.
    pub amount: Cents,
    /// The refund request it carries out (Stripe metadata `refund_request`), and which
    /// approval of it (`refund_attempt`).
    pub request: String,
    pub attempt: u32,
    /// Stripe's reason: `duplicate` for duplicate charges, else `requested_by_customer`.
    pub duplicate: bool,
    pub idempotency_key: String,
}

/// A refund as Stripe made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundMade {
    pub id: RefundId,
    /// `pending`, `requires_action`, `succeeded`, `failed` or `canceled`.
    pub status: String,
}

/// A charge as Stripe lists it (for reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeFact {
    pub id: ChargeId,
    pub payment_intent: Option<PaymentIntentId>,
    pub customer: Option<CustomerId>,
    /// Integer cents.
    pub amount: Cents,
    pub amount_refunded: Cents,
    pub currency: String,
    /// Whether the money was collected (`paid` and `status: succeeded`).
    pub succeeded: bool,
    pub created: DateTime<Utc>,
    /// The workspace the charge's metadata names, if any (`org_id`).
    pub workspace: Option<WorkspaceId>,
}

/// A page of charges, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargePage {
    pub charges: Vec<ChargeFact>,
    pub has_more: bool,
}

#[async_trait]
pub trait Payments: Send + Sync {
    /// Charges created in `[from, to)`, newest first, a page at a time: the next page
    /// starts after the last charge of the previous one.
    async fn charges_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        starting_after: Option<&ChargeId>,
    ) -> Result<ChargePage, PaymentsError>;

    /// One charge, if Stripe has it.
    async fn charge(&self, id: &ChargeId) -> Result<Option<ChargeFact>, PaymentsError>;

    /// Reissues a paid invoice with corrected billing details (see [`Reissue`]).
    async fn reissue_invoice(&self, req: &Reissue) -> Result<Reissued, PaymentsError>;

    /// Creates an invoice for money already received, marked paid out of band (no charge).
    async fn paid_invoice(&self, req: &PaidInvoice) -> Result<InvoiceLink, PaymentsError>;

    /// The refund made on `charge` for an approval of a refund request (by its metadata),
    /// if Stripe made one.
    async fn find_refund(
        &self,
        charge: &ChargeId,
        request: &str,
        attempt: u32,
    ) -> Result<Option<RefundMade>, PaymentsError>;

    /// Refunds part or all of a charge to the original payment method. Credits follow from
    /// Stripe's refund events.
    async fn refund(&self, order: &RefundOrder) -> Result<RefundMade, PaymentsError>;

    /// Charges a saved card off-session; returns the payment intent, taken or still being
    /// collected. Credits follow from its `payment_intent.succeeded` event.
    async fn charge_saved_method(&self, req: &TopUp) -> Result<TopUpPayment, PaymentsError>;

    /// Where a payment intent that was `processing` stands now.
    async fn collection(&self, intent: &PaymentIntentId) -> Result<Collection, PaymentsError>;

    /// Whether Stripe keeps `card` for `customer` (attached to it), so that it can be
    /// charged off-session. A card entered once on a hosted invoice page is not kept; one
    /// Stripe does not know is not either.
    async fn card_saved_for(
        &self,
        card: &PaymentMethodId,
        customer: &CustomerId,
    ) -> Result<bool, PaymentsError>;

    /// Creates, finalizes and sends a custom-payment invoice.
    async fn create_custom_invoice(
        &self,
        req: &CustomInvoice,
    ) -> Result<InvoiceLink, PaymentsError>;

    /// Every line of an invoice, in Stripe's order, each as Stripe returns it. Stripe's
    /// invoice objects (in events, and expanded in other answers) carry only the first ten
    /// lines and say `has_more`; the rest are read from the invoice's line list, a page at a
    /// time. `Ok(None)`: Stripe has no such invoice.
    async fn invoice_lines(
        &self,
        invoice: &InvoiceId,
    ) -> Result<Option<Vec<serde_json::Value>>, PaymentsError>;

    /// The subscription as Stripe has it now.
    async fn subscription(&self, id: &SubscriptionId) -> Result<LiveSubscription, PaymentsError>;

    /// Changes a subscription's items, metadata, cancellation or pause; returns the invoice
    /// Stripe created and collected for it, if any (prorations invoiced now).
    async fn update_subscription(
        &self,
        change: &SubscriptionChange,
    ) -> Result<Option<BilledInvoice>, PaymentsError>;

    /// What a change would invoice now, without making it.
    async fn preview_change(
        &self,
        change: &SubscriptionChange,
    ) -> Result<BilledInvoice, PaymentsError>;

    /// Keeps today's items until the period ends and bills `change` from the renewal on
    /// (a subscription schedule with two phases), replacing any change already scheduled.
    async fn schedule_renewal_change(&self, change: &RenewalChange) -> Result<(), PaymentsError>;

    /// Drops a change scheduled for the renewal (releases the schedule); the subscription
    /// renews as it is.
    async fn cancel_renewal_change(
        &self,
        subscription: &SubscriptionId,
        idempotency_key: &str,
    ) -> Result<(), PaymentsError>;

    /// Creates the Stripe customer of a workspace.
    async fn create_customer(
        &self,
        workspace: &WorkspaceId,
        email: Option<&str>,
        idempotency_key: &str,
    ) -> Result<CustomerId, PaymentsError>;

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError>;

    /// Makes way for a new plan checkout of `customer`: expires the customer's open
    /// subscription checkouts (but the one made under `keep`, the Stripe idempotency key of
    /// this very request), so no two can be paid, then says whether Stripe has a
    /// subscription of the customer that has not ended (the ledger may not know it yet: a
    /// checkout just paid).
    async fn clear_plan_checkouts(
        &self,
        customer: &CustomerId,
        keep: &str,
    ) -> Result<PlanCheckouts, PaymentsError>;

    /// Expires the customer's open pack checkouts priced with a pack discount above
    /// `above_pct` (the discount the customer's plan gives now), so a discount the plan no
    /// longer gives cannot be paid for in the session's remaining hours. A session paid or
    /// expired meanwhile is left as it is. Answers how many it expired.
    async fn expire_pack_checkouts(
        &self,
        customer: &CustomerId,
        above_pct: u8,
    ) -> Result<u32, PaymentsError>;

    /// A customer-portal URL (plans, invoices, payment methods).
    async fn billing_portal(
        &self,
        customer: &CustomerId,
        return_url: &str,
        idempotency_key: &str,
    ) -> Result<String, PaymentsError>;
}
