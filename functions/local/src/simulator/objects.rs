//! The Stripe-shaped objects the simulator sends: Stripe's own example objects (from
//! `fixtures/stripe/`, compiled in so the runner needs no files at run time) with the fields
//! of one simulated purchase filled in, and the signature Stripe puts on a delivery.

use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::str::FromStr;
use tally::ids::{CustomerId, IdError, SubscriptionId};
use tally::ledger::Interval;

const FIXTURES: [(&str, &str); 6] = [
    (
        "payment_intent",
        include_str!("../../../../fixtures/stripe/payment_intent.json"),
    ),
    (
        "checkout.session",
        include_str!("../../../../fixtures/stripe/checkout.session.json"),
    ),
    (
        "subscription",
        include_str!("../../../../fixtures/stripe/subscription.json"),
    ),
    (
        "invoice",
        include_str!("../../../../fixtures/stripe/invoice.json"),
    ),
    (
        "charge",
        include_str!("../../../../fixtures/stripe/charge.json"),
    ),
    (
        "event",
        include_str!("../../../../fixtures/stripe/event.json"),
    ),
];

pub(super) fn fixture(name: &str) -> Value {
    let text = FIXTURES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .expect("known fixture");
    serde_json::from_str(text).expect("fixture JSON")
}

pub(super) fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_sim{}",
        ulid::Ulid::new().to_string().to_lowercase()
    )
}

/// A fresh id of one of the Stripe id types.
pub(super) fn new_stripe_id<T: FromStr<Err = IdError>>(prefix: &str) -> T {
    new_id(prefix)
        .parse()
        .expect("simulated ids are ASCII letters, digits and '_'")
}

/// Signs a payload the way Stripe does: `t=<unix>,v1=<hex HMAC-SHA256("<t>.<payload>")>`.
pub fn stripe_signature(payload: &str, secret: &str, timestamp: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp}.{payload}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

/// A subscription as the simulator keeps it.
#[derive(Debug, Clone)]
pub(super) struct SimSubscription {
    pub(super) id: SubscriptionId,
    pub(super) customer: CustomerId,
    pub(super) metadata: std::collections::BTreeMap<String, String>,
    pub(super) interval: Interval,
    pub(super) unit_amount: u64,
    pub(super) addon_units: u64,
    pub(super) addon_unit_amount: u64,
    pub(super) period_start: i64,
    pub(super) period_end: i64,
    pub(super) cancel_at_period_end: bool,
    pub(super) paused: bool,
}

impl SimSubscription {
    pub(super) fn days(&self) -> i64 {
        match self.interval {
            Interval::Monthly => 30,
            Interval::Yearly => 365,
        }
    }

    pub(super) fn object(&self) -> Value {
        let mut sub = fixture("subscription");
        sub["id"] = json!(self.id);
        sub["customer"] = json!(self.customer);
        sub["status"] = json!(if self.paused { "paused" } else { "active" });
        sub["cancel_at_period_end"] = json!(self.cancel_at_period_end);
        sub["pause_collection"] = if self.paused {
            json!({"behavior": "void", "resumes_at": null})
        } else {
            Value::Null
        };
        sub["metadata"] = json!(self.metadata);
        let item = &mut sub["items"]["data"][0];
        item["current_period_start"] = json!(self.period_start);
        item["current_period_end"] = json!(self.period_end);
        item["price"]["recurring"]["interval"] =
            json!(if self.days() == 30 { "month" } else { "year" });
        item["price"]["unit_amount"] = json!(self.unit_amount);
        sub
    }

    pub(super) fn invoice(&self, base_url: &str, reason: &str, amount: u64, paid: bool) -> Value {
        let id = new_id("in");
        let mut inv = fixture("invoice");
        inv["id"] = json!(id);
        inv["customer"] = json!(self.customer);
        inv["billing_reason"] = json!(reason);
        inv["collection_method"] = json!("charge_automatically");
        inv["created"] = json!(Utc::now().timestamp());
        inv["currency"] = json!("usd");
        inv["metadata"] = json!({});
        inv["number"] = json!(format!("SIM-{}", &id[id.len() - 6..]));
        inv["hosted_invoice_url"] = json!(format!("{base_url}/sim/invoices/{id}"));
        inv["invoice_pdf"] = json!(format!("{base_url}/sim/invoices/{id}.pdf"));
        inv["parent"] = json!({"type": "subscription_details", "quote_details": null,
            "subscription_details": {"subscription": self.id, "metadata": self.metadata}});
        inv["lines"]["data"][0]["period"] =
            json!({"start": self.period_start, "end": self.period_end});
        inv["lines"]["data"][0]["amount"] = json!(amount);
        for k in ["amount_due", "total", "subtotal"] {
            inv[k] = json!(amount);
        }
        inv["status"] = json!(if paid { "paid" } else { "open" });
        inv["amount_paid"] = json!(if paid { amount } else { 0 });
        inv["amount_remaining"] = json!(if paid { 0 } else { amount });
        inv["status_transitions"]["paid_at"] = if paid {
            json!(Utc::now().timestamp())
        } else {
            Value::Null
        };
        inv
    }
}
