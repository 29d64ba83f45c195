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
    /// Product of the plan item (`tally_plan_<id>`).
    pub(super) plan_product: String,
    /// Product of the add-on item, when there is one.
    pub(super) addon_product: Option<String>,
    /// The change a subscription schedule applies at the renewal, if any.
    pub(super) next: Option<tally::payments::RenewalChange>,
    /// The invoice last created for the subscription.
    pub(super) latest_invoice: Option<String>,
}

/// A line of a simulated invoice, in Stripe's shape.
#[derive(Debug, Clone)]
pub(super) struct SimLine {
    pub(super) product: String,
    pub(super) quantity: u64,
    pub(super) amount: i64,
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) proration: bool,
    pub(super) description: String,
}

impl SimLine {
    pub(super) fn json(&self, sub: &SubscriptionId, invoice: &str) -> Value {
        json!({
            "id": new_id("il"),
            "object": "line_item",
            "amount": self.amount,
            "subtotal": self.amount,
            "currency": "usd",
            "description": self.description,
            "discount_amounts": [],
            "discountable": true,
            "discounts": [],
            "invoice": invoice,
            "livemode": false,
            "metadata": {},
            "parent": {
                "type": "subscription_item_details",
                "invoice_item_details": null,
                "subscription_item_details": {
                    "invoice_item": null,
                    "proration": self.proration,
                    "proration_details": {"credited_items": null},
                    "subscription": sub,
                    "subscription_item": new_id("si"),
                }
            },
            "period": {"start": self.start, "end": self.end},
            "pretax_credit_amounts": [],
            "pricing": {
                "type": "price_details",
                "price_details": {"price": new_id("price"), "product": self.product},
                "unit_amount_decimal": null
            },
            "quantity": self.quantity,
            "quantity_decimal": null,
            "taxes": []
        })
    }

    pub(super) fn billed(&self) -> tally::payments::BilledLine {
        let ts = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap_or_default();
        tally::payments::BilledLine {
            product: self.product.clone(),
            quantity: self.quantity,
            amount: self.amount,
            period_start: ts(self.start),
            period_end: ts(self.end),
            proration: self.proration,
            description: self.description.clone(),
        }
    }
}

impl SimSubscription {
    pub(super) fn days(&self) -> i64 {
        match self.interval {
            Interval::Monthly => 30,
            Interval::Yearly => 365,
        }
    }

    /// The subscription as the payments port describes it.
    pub(super) fn live(&self) -> tally::payments::LiveSubscription {
        let ts = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap_or_default();
        let item = |product: &str, unit: u64, quantity: u64| tally::payments::LiveItem {
            id: format!("si_{}", product),
            price: format!("price_{}", product),
            product: product.to_owned(),
            unit_amount: tally::money::Cents::new(unit),
            interval: self.interval,
            quantity,
        };
        let mut items = vec![item(&self.plan_product, self.unit_amount, 1)];
        if let Some(p) = &self.addon_product
            && self.addon_units > 0
        {
            items.push(item(p, self.addon_unit_amount, self.addon_units));
        }
        tally::payments::LiveSubscription {
            id: self.id.clone(),
            customer: self.customer.clone(),
            status: "active".into(),
            paused: self.paused,
            cancel_at_period_end: self.cancel_at_period_end,
            period_start: ts(self.period_start),
            period_end: ts(self.period_end),
            items,
            schedule: self
                .next
                .as_ref()
                .map(|_| format!("sub_sched_{}", &self.id.as_str()[4..])),
            metadata: self.metadata.clone(),
        }
    }

    /// Applies a change as Stripe does with these parameters; returns the invoice lines it
    /// bills now (prorations of changed items; an interval switch restarts the period and
    /// bills it whole).
    pub(super) fn apply(
        &mut self,
        change: &tally::payments::SubscriptionChange,
        now: i64,
    ) -> Vec<SimLine> {
        let before = self.clone();
        if let Some(p) = &change.plan {
            self.unit_amount = p.unit_amount.get();
            self.interval = p.interval;
            self.plan_product = p.product.clone();
        }
        if let Some((units, p)) = &change.addons {
            self.addon_units = *units;
            self.addon_unit_amount = p.unit_amount.get();
            self.addon_product = (*units > 0).then(|| p.product.clone());
        }
        for (k, v) in &change.metadata {
            if v.is_empty() {
                self.metadata.remove(k);
            } else {
                self.metadata.insert(k.clone(), v.clone());
            }
        }
        if let Some(c) = change.cancel_at_period_end {
            self.cancel_at_period_end = c;
        }
        if let Some(p) = change.pause {
            self.paused = p;
        }
        let mut lines = Vec::new();
        let remaining = (self.period_end - now).max(0) as i128;
        let length = (self.period_end - self.period_start).max(1) as i128;
        let prorate = |amount: u64| -> i64 {
            ((amount as i128 * remaining * 2 + length) / (2 * length)) as i64
        };
        let switched = before.interval != self.interval;
        let plan_changed =
            before.plan_product != self.plan_product || before.unit_amount != self.unit_amount;
        let addon_changed = before.addon_units != self.addon_units
            || before.addon_product != self.addon_product
            || before.addon_unit_amount != self.addon_unit_amount;
        if (plan_changed || switched) && change.prorate_now {
            lines.push(SimLine {
                product: before.plan_product.clone(),
                quantity: 1,
                amount: -prorate(before.unit_amount),
                start: now,
                end: before.period_end,
                proration: true,
                description: "Unused time on plan".into(),
            });
            if !switched {
                lines.push(SimLine {
                    product: self.plan_product.clone(),
                    quantity: 1,
                    amount: prorate(self.unit_amount),
                    start: now,
                    end: self.period_end,
                    proration: true,
                    description: "Remaining time on plan".into(),
                });
            }
        }
        if (addon_changed || switched) && change.prorate_now {
            if let Some(p) = &before.addon_product
                && before.addon_units > 0
            {
                lines.push(SimLine {
                    product: p.clone(),
                    quantity: before.addon_units,
                    amount: -prorate(before.addon_units * before.addon_unit_amount),
                    start: now,
                    end: before.period_end,
                    proration: true,
                    description: "Unused time on add-on units".into(),
                });
            }
            if let Some(p) = &self.addon_product
                && self.addon_units > 0
                && !switched
            {
                lines.push(SimLine {
                    product: p.clone(),
                    quantity: self.addon_units,
                    amount: prorate(self.addon_units * self.addon_unit_amount),
                    start: now,
                    end: self.period_end,
                    proration: true,
                    description: "Remaining time on add-on units".into(),
                });
            }
        }
        if switched {
            // Stripe resets the billing anchor to now and bills the new period whole.
            let start = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
            self.period_start = now;
            self.period_end =
                tally::subscriptions::calendar::period_end(start, self.interval).timestamp();
            lines.push(SimLine {
                product: self.plan_product.clone(),
                quantity: 1,
                amount: self.unit_amount as i64,
                start: self.period_start,
                end: self.period_end,
                proration: false,
                description: "plan".into(),
            });
            if let Some(p) = &self.addon_product
                && self.addon_units > 0
            {
                lines.push(SimLine {
                    product: p.clone(),
                    quantity: self.addon_units,
                    amount: (self.addon_units * self.addon_unit_amount) as i64,
                    start: self.period_start,
                    end: self.period_end,
                    proration: false,
                    description: "add-on units".into(),
                });
            }
        }
        lines
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
        sub["schedule"] = match &self.next {
            Some(_) => json!(format!("sub_sched_{}", &self.id.as_str()[4..])),
            None => Value::Null,
        };
        sub["latest_invoice"] = json!(self.latest_invoice);
        let interval = if self.days() == 30 { "month" } else { "year" };
        let template = sub["items"]["data"][0].clone();
        let item = |product: &str, unit: u64, quantity: u64| {
            let mut item = template.clone();
            item["id"] = json!(new_id("si"));
            item["subscription"] = json!(self.id);
            item["current_period_start"] = json!(self.period_start);
            item["current_period_end"] = json!(self.period_end);
            item["quantity"] = json!(quantity);
            item["price"]["id"] = json!(new_id("price"));
            item["price"]["product"] = json!(product);
            item["price"]["recurring"]["interval"] = json!(interval);
            item["price"]["unit_amount"] = json!(unit);
            item["price"]["unit_amount_decimal"] = json!(unit.to_string());
            item["plan"]["interval"] = json!(interval);
            item
        };
        let mut items = vec![item(&self.plan_product, self.unit_amount, 1)];
        if let Some(p) = &self.addon_product
            && self.addon_units > 0
        {
            items.push(item(p, self.addon_unit_amount, self.addon_units));
        }
        sub["items"]["data"] = json!(items);
        sub
    }

    /// An invoice of the given lines (a change's prorations).
    pub(super) fn change_invoice(&self, base_url: &str, lines: &[SimLine]) -> Value {
        let total: i64 = lines.iter().map(|l| l.amount).sum();
        let mut inv = self.invoice(base_url, "subscription_update", total.max(0) as u64, true);
        let id = inv["id"].as_str().unwrap_or_default().to_owned();
        inv["lines"]["data"] = json!(
            lines
                .iter()
                .map(|l| l.json(&self.id, &id))
                .collect::<Vec<_>>()
        );
        inv["subtotal"] = json!(total);
        inv["total"] = json!(total);
        inv
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
        let mut lines = vec![SimLine {
            product: self.plan_product.clone(),
            quantity: 1,
            amount: self.unit_amount as i64,
            start: self.period_start,
            end: self.period_end,
            proration: false,
            description: "plan".into(),
        }];
        if let Some(p) = &self.addon_product
            && self.addon_units > 0
        {
            lines.push(SimLine {
                product: p.clone(),
                quantity: self.addon_units,
                amount: (self.addon_units * self.addon_unit_amount) as i64,
                start: self.period_start,
                end: self.period_end,
                proration: false,
                description: "add-on units".into(),
            });
        }
        inv["lines"]["data"] = json!(
            lines
                .iter()
                .map(|l| l.json(&self.id, &id))
                .collect::<Vec<_>>()
        );
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
