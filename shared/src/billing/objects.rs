//! The parts of Stripe's objects that billing reads, as tolerant serde views: unknown
//! fields are ignored, missing optional ones default, expandable ids accept an id or an
//! expanded object. Ids are parsed here, so a malformed one fails the whole object (and
//! the event carrying it is poisoned) instead of reaching the documents.

use crate::ids::{
    ChargeId, CheckoutSessionId, CustomerId, DisputeId, IdError, InvoiceId, PaymentIntentId,
    PaymentMethodId, RefundId, StripeEventId, SubscriptionId,
};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;

/// An id that Stripe may send as a string or, when expanded, as an object with an `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expandable<T>(pub Option<T>);

impl<T> Default for Expandable<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: TryFrom<String, Error = IdError>> Deserialize<'de> for Expandable<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let id = match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(o) => o.get("id").and_then(|i| i.as_str()).map(str::to_owned),
            _ => None,
        };
        id.map(T::try_from)
            .transpose()
            .map(Expandable)
            .map_err(D::Error::custom)
    }
}

impl<T> Expandable<T> {
    pub fn id(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

fn nullable_map<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
    Ok(Option::<HashMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: StripeEventId,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    /// Whether the event comes from Stripe's live mode (`false`: test mode).
    #[serde(default)]
    pub livemode: Option<bool>,
    pub data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: CheckoutSessionId,
    pub mode: Option<String>,
    pub payment_status: Option<String>,
    #[serde(default)]
    pub customer: Expandable<CustomerId>,
    #[serde(default)]
    pub subscription: Expandable<SubscriptionId>,
    #[serde(default)]
    pub invoice: Expandable<InvoiceId>,
    #[serde(default)]
    pub payment_intent: Expandable<PaymentIntentId>,
    pub client_reference_id: Option<String>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    pub amount_total: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Period {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SubscriptionDetails {
    #[serde(default)]
    pub subscription: Expandable<SubscriptionId>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct InvoiceParent {
    pub subscription_details: Option<SubscriptionDetails>,
}

/// Which price and product a line bills (Stripe's `pricing.price_details`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct PriceDetails {
    pub price: Option<serde_json::Value>,
    pub product: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct LinePricing {
    pub price_details: Option<PriceDetails>,
}

/// What a line belongs to (Stripe's `parent.subscription_item_details`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct SubscriptionItemDetails {
    #[serde(default)]
    pub proration: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct LineParent {
    pub subscription_item_details: Option<SubscriptionItemDetails>,
    pub invoice_item_details: Option<SubscriptionItemDetails>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct InvoiceLine {
    pub period: Option<Period>,
    pub description: Option<String>,
    #[serde(default)]
    pub amount: i64,
    pub quantity: Option<u64>,
    pub pricing: Option<LinePricing>,
    pub parent: Option<LineParent>,
    /// What discounts (the invoice's coupons, allocated by Stripe, and the line's own)
    /// took off the line.
    #[serde(default)]
    pub discount_amounts: Option<Vec<TaxAmount>>,
    /// The line's taxes; those `exclusive` come on top of `amount`.
    #[serde(default)]
    pub taxes: Option<Vec<LineTax>>,
}

/// A tax on one invoice line.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct LineTax {
    #[serde(default)]
    pub amount: i64,
    pub tax_behavior: Option<String>,
}

impl InvoiceLine {
    /// What the line adds to the invoice's total: its amount, less its discounts, plus the
    /// taxes charged on top of it (inclusive taxes are part of the amount already).
    pub fn net(&self) -> i64 {
        let discounts: i64 = self
            .discount_amounts
            .iter()
            .flatten()
            .map(|d| d.amount)
            .sum();
        let taxes: i64 = self
            .taxes
            .iter()
            .flatten()
            .filter(|t| t.tax_behavior.as_deref() == Some("exclusive"))
            .map(|t| t.amount)
            .sum();
        self.amount.saturating_sub(discounts).saturating_add(taxes)
    }

    /// The product the line bills, whether Stripe sent the id or expanded the product.
    pub fn product(&self) -> Option<&str> {
        self.pricing
            .as_ref()?
            .price_details
            .as_ref()?
            .product
            .as_deref()
    }

    /// Whether the line bills a subscription item (not a one-off invoice item).
    pub fn subscription_item(&self) -> bool {
        self.parent
            .as_ref()
            .is_some_and(|p| p.subscription_item_details.is_some())
    }

    /// Whether the line is a proration (a change inside a period).
    pub fn proration(&self) -> bool {
        self.parent.as_ref().is_some_and(|p| {
            p.subscription_item_details
                .as_ref()
                .or(p.invoice_item_details.as_ref())
                .is_some_and(|d| d.proration)
        })
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
    /// Whether Stripe has more than `data` holds (an invoice object carries the first ten
    /// of its lines).
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StatusTransitions {
    pub paid_at: Option<i64>,
    #[serde(default)]
    pub finalized_at: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Invoice {
    pub id: InvoiceId,
    #[serde(default)]
    pub customer: Expandable<CustomerId>,
    pub status: Option<String>,
    pub billing_reason: Option<String>,
    pub collection_method: Option<String>,
    pub number: Option<String>,
    #[serde(default)]
    pub amount_due: i64,
    #[serde(default)]
    pub amount_paid: i64,
    #[serde(default)]
    pub amount_remaining: i64,
    #[serde(default)]
    pub total: i64,
    /// Attempts Stripe made to collect it.
    #[serde(default)]
    pub attempt_count: i64,
    /// The customer's Stripe balance before and after this invoice (negative: credit
    /// Stripe holds for them). What moved between them paid part of the invoice.
    #[serde(default)]
    pub starting_balance: i64,
    #[serde(default)]
    pub ending_balance: Option<i64>,
    pub currency: Option<String>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub description: Option<String>,
    /// Tax in integer cents (older API versions).
    pub tax: Option<i64>,
    /// Tax amounts (newer API versions).
    pub total_taxes: Option<Vec<TaxAmount>>,
    pub created: i64,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    pub parent: Option<InvoiceParent>,
    #[serde(default)]
    pub lines: List<InvoiceLine>,
    pub status_transitions: Option<StatusTransitions>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaxAmount {
    #[serde(default)]
    pub amount: i64,
}

impl Invoice {
    /// Integer cents of tax, where Stripe reported any.
    pub fn tax_amount(&self) -> Option<i64> {
        match &self.total_taxes {
            Some(t) => Some(t.iter().map(|x| x.amount).sum()),
            None => self.tax,
        }
    }

    pub fn subscription_details(&self) -> Option<&SubscriptionDetails> {
        self.parent.as_ref()?.subscription_details.as_ref()
    }
    /// The service period the invoice pays for: the latest line period, else the invoice's.
    pub fn service_period(&self) -> Option<(i64, i64)> {
        self.lines
            .data
            .iter()
            .filter_map(|l| l.period.as_ref())
            .filter(|p| p.end > p.start)
            .max_by_key(|p| p.end)
            .map(|p| (p.start, p.end))
            .or(match (self.period_start, self.period_end) {
                (Some(s), Some(e)) if e > s => Some((s, e)),
                _ => None,
            })
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Recurring {
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Price {
    pub recurring: Option<Recurring>,
    /// The product id, or the expanded product.
    pub product: Option<serde_json::Value>,
}

impl Price {
    pub fn product_id(&self) -> Option<&str> {
        match self.product.as_ref()? {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(o) => o.get("id")?.as_str(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SubscriptionItem {
    pub quantity: Option<u64>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub price: Option<Price>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub id: SubscriptionId,
    #[serde(default)]
    pub customer: Expandable<CustomerId>,
    pub status: String,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    pub pause_collection: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub items: List<SubscriptionItem>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    /// The subscription schedule managing future phases (a change at renewal), if any.
    #[serde(default)]
    pub schedule: Option<serde_json::Value>,
    /// When a canceled subscription ended.
    pub ended_at: Option<i64>,
    /// When the subscription was created.
    pub created: Option<i64>,
}

impl Subscription {
    pub fn period(&self) -> Option<(i64, i64)> {
        let item = self.items.data.first();
        let start = item
            .and_then(|i| i.current_period_start)
            .or(self.current_period_start)?;
        let end = item
            .and_then(|i| i.current_period_end)
            .or(self.current_period_end)?;
        Some((start, end))
    }
    pub fn interval(&self) -> Option<&str> {
        self.items
            .data
            .first()?
            .price
            .as_ref()?
            .recurring
            .as_ref()?
            .interval
            .as_deref()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Refund {
    pub id: RefundId,
    #[serde(default)]
    pub amount: i64,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub created: i64,
    #[serde(default)]
    pub charge: Expandable<ChargeId>,
    #[serde(default)]
    pub payment_intent: Expandable<PaymentIntentId>,
    pub currency: Option<String>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Charge {
    pub id: ChargeId,
    #[serde(default)]
    pub customer: Expandable<CustomerId>,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub amount_refunded: i64,
    pub currency: Option<String>,
    #[serde(default)]
    pub payment_intent: Expandable<PaymentIntentId>,
    pub created: i64,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    pub refunds: Option<List<Refund>>,
    #[serde(default)]
    pub payment_method: Expandable<PaymentMethodId>,
    pub receipt_url: Option<String>,
    /// `succeeded`, `pending` or `failed`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub payment_method_details: Option<PaymentMethodDetails>,
}

/// How a charge was paid: `type` is `card`, `link`, `sepa_debit`, `us_bank_account`...
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentMethodDetails {
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// Which payment paid an invoice (`invoice_payment.paid`).
#[derive(Debug, Clone, Deserialize)]
pub struct InvoicePayment {
    pub id: String,
    #[serde(default)]
    pub invoice: Expandable<InvoiceId>,
    pub payment: InvoicePaymentRef,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InvoicePaymentRef {
    #[serde(default)]
    pub payment_intent: Expandable<PaymentIntentId>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentIntent {
    pub id: PaymentIntentId,
    pub status: Option<String>,
    #[serde(default)]
    pub customer: Expandable<CustomerId>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dispute {
    pub id: DisputeId,
    #[serde(default)]
    pub charge: Expandable<ChargeId>,
    #[serde(default)]
    pub payment_intent: Expandable<PaymentIntentId>,
    #[serde(default)]
    pub amount: i64,
    pub currency: Option<String>,
    pub reason: Option<String>,
    pub status: Option<String>,
    pub created: i64,
}

/// A credit note (`credit_note.created`, `.updated`, `.voided`). Of a paid invoice, its
/// `post_payment_amount` is given back as refunds (`refunds`, which reach the charge's
/// `amount_refunded`), as credit on the customer's Stripe balance, or outside Stripe
/// (`out_of_band_amount`).
#[derive(Debug, Clone, Deserialize)]
pub struct CreditNote {
    pub id: String,
    #[serde(default)]
    pub invoice: Expandable<InvoiceId>,
    /// `issued` or `void`.
    pub status: Option<String>,
    /// `pre_payment` or `post_payment`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub total: i64,
    pub post_payment_amount: Option<i64>,
    /// The refunds the note made or linked (API versions from 2025-03-31; older ones
    /// name a single `refund` without its amount).
    #[serde(default)]
    pub refunds: Option<Vec<CreditNoteRefund>>,
    pub memo: Option<String>,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    pub created: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreditNoteRefund {
    #[serde(default)]
    pub amount_refunded: i64,
}

impl CreditNote {
    /// Integer cents of a paid invoice given back other than by a refund: credit on the
    /// customer's balance and credit outside Stripe (what the note gave, void or not).
    /// `None` when the note does not say how much of it was refunded.
    pub fn given_back_without_refund(&self) -> Option<i64> {
        let post =
            self.post_payment_amount
                .unwrap_or(if self.kind.as_deref() == Some("post_payment") {
                    self.total
                } else {
                    0
                });
        if post <= 0 {
            return Some(0);
        }
        let refunded: i64 = self
            .refunds
            .as_ref()?
            .iter()
            .map(|r| r.amount_refunded)
            .sum();
        Some(post.saturating_sub(refunded).max(0))
    }

    pub fn void(&self) -> bool {
        self.status.as_deref() == Some("void")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expandable_ids_accept_an_id_or_an_expanded_object() {
        let plain: Expandable<CustomerId> = serde_json::from_str(r#""cus_1""#).unwrap();
        let expanded: Expandable<CustomerId> =
            serde_json::from_str(r#"{"id": "cus_1", "object": "customer"}"#).unwrap();
        let absent: Expandable<CustomerId> = serde_json::from_str("null").unwrap();
        assert_eq!(plain.id().map(CustomerId::as_str), Some("cus_1"));
        assert_eq!(expanded, plain);
        assert_eq!(absent.id(), None);
    }

    #[test]
    fn a_malformed_id_fails_the_object_with_a_message() {
        let err = serde_json::from_str::<Dispute>(
            r#"{"id": "dp_1", "charge": "ch 1", "amount": 5, "created": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Stripe charge id"), "{err}");
        let err = serde_json::from_str::<Event>(
            r#"{"id": "", "type": "charge.succeeded", "created": 1, "data": {"object": {}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Stripe event id must not be empty"), "{err}");
    }
}
