//! The parts of Stripe's objects that billing reads, as tolerant serde views: unknown
//! fields are ignored, missing optional ones default, expandable ids accept an id or an
//! expanded object.

use serde::{Deserialize, Deserializer};
use std::collections::HashMap;

/// An id that Stripe may send as a string or, when expanded, as an object with an `id`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expandable(pub Option<String>);

impl<'de> Deserialize<'de> for Expandable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Expandable(match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(o) => o.get("id").and_then(|i| i.as_str()).map(str::to_owned),
            _ => None,
        }))
    }
}

impl Expandable {
    pub fn id(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

fn nullable_map<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
    Ok(Option::<HashMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub mode: Option<String>,
    pub payment_status: Option<String>,
    #[serde(default)]
    pub customer: Expandable,
    #[serde(default)]
    pub subscription: Expandable,
    #[serde(default)]
    pub invoice: Expandable,
    #[serde(default)]
    pub payment_intent: Expandable,
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
    pub subscription: Expandable,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct InvoiceParent {
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct InvoiceLine {
    pub period: Option<Period>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StatusTransitions {
    pub paid_at: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Invoice {
    pub id: String,
    #[serde(default)]
    pub customer: Expandable,
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
    pub currency: Option<String>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
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

impl Invoice {
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
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SubscriptionItem {
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub price: Option<Price>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub id: String,
    #[serde(default)]
    pub customer: Expandable,
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
    pub id: String,
    #[serde(default)]
    pub amount: i64,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub created: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Charge {
    pub id: String,
    #[serde(default)]
    pub customer: Expandable,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub amount_refunded: i64,
    pub currency: Option<String>,
    #[serde(default)]
    pub payment_intent: Expandable,
    pub created: i64,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
    pub refunds: Option<List<Refund>>,
    #[serde(default)]
    pub payment_method: Expandable,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    pub status: Option<String>,
    #[serde(default)]
    pub customer: Expandable,
    #[serde(default, deserialize_with = "nullable_map")]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dispute {
    pub id: String,
    #[serde(default)]
    pub charge: Expandable,
    #[serde(default)]
    pub amount: i64,
    pub currency: Option<String>,
    pub reason: Option<String>,
    pub status: Option<String>,
    pub created: i64,
}
