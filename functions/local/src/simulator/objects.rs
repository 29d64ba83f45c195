//! The Stripe-shaped objects the simulator sends: Stripe's own example objects (from
//! `fixtures/stripe/`, compiled in so the runner needs no files at run time) with the fields
//! of one simulated purchase filled in, the calendar Stripe bills on, and the signature
//! Stripe puts on a delivery.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::str::FromStr;
use tally::ids::{CustomerId, IdError, InvoiceId, SubscriptionId};
use tally::ledger::Interval;

const FIXTURES: [(&str, &str); 10] = [
    (
        "invoice_payment",
        include_str!("../../../../fixtures/stripe/invoice_payment.json"),
    ),
    (
        "refund",
        include_str!("../../../../fixtures/stripe/refund.json"),
    ),
    (
        "dispute",
        include_str!("../../../../fixtures/stripe/dispute.json"),
    ),
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
    (
        "credit_note",
        include_str!("../../../../fixtures/stripe/credit_note.json"),
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

fn at(ts: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(ts, 0).unwrap_or_default()
}

/// `anchor` plus `months` calendar months, on the anchor's day clamped to the month's last
/// day and at the anchor's time of day, as Stripe bills `interval=month|year` prices:
/// anchored on Jan 31, periods end Feb 28 (29 in leap years), Mar 31, Apr 30...
pub fn add_months(anchor: i64, months: u32) -> i64 {
    let a = at(anchor);
    let index = a.year() * 12 + a.month0() as i32 + months as i32;
    let (year, month) = (index.div_euclid(12), index.rem_euclid(12) as u32 + 1);
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid month");
    let next = first
        .checked_add_months(chrono::Months::new(1))
        .expect("valid month");
    let last_day = (next - first).num_days() as u32;
    first
        .with_day(a.day().min(last_day))
        .expect("clamped day")
        .and_time(a.time())
        .and_utc()
        .timestamp()
}

pub(super) fn months(interval: Interval) -> u32 {
    match interval {
        Interval::Monthly => 1,
        Interval::Yearly => 12,
    }
}

pub(super) fn stripe_interval(interval: Interval) -> &'static str {
    match interval {
        Interval::Monthly => "month",
        Interval::Yearly => "year",
    }
}

pub(super) fn dollars(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}${}.{:02}", c / 100, c % 100)
}

/// One item of a subscription: a price (Stripe makes a new one for every `price_data`) on
/// one of Tally's products, and a quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SimItem {
    pub(super) id: String,
    pub(super) price: String,
    pub(super) product: String,
    pub(super) name: String,
    pub(super) unit_amount: u64,
    pub(super) interval: Interval,
    pub(super) quantity: u64,
    pub(super) created: i64,
}

impl SimItem {
    pub(super) fn amount(&self) -> i64 {
        (self.unit_amount * self.quantity) as i64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubStatus {
    Active,
    PastDue,
    Canceled,
}

/// An unpaid subscription invoice being retried.
#[derive(Debug, Clone)]
pub(super) struct Dunning {
    pub(super) invoice: InvoiceId,
    pub(super) first_failed: i64,
    /// Retries made so far.
    pub(super) retries: usize,
}

/// A subscription as the simulator keeps it.
#[derive(Debug, Clone)]
pub(super) struct SimSubscription {
    pub(super) id: SubscriptionId,
    pub(super) customer: CustomerId,
    pub(super) metadata: std::collections::BTreeMap<String, String>,
    /// The plan item first, then the add-on item if any.
    pub(super) items: Vec<SimItem>,
    pub(super) created: i64,
    /// Billing cycle anchor: periods end whole calendar intervals after it.
    pub(super) anchor: i64,
    /// Periods since the anchor.
    pub(super) cycle: u32,
    pub(super) period_start: i64,
    pub(super) period_end: i64,
    pub(super) cancel_at_period_end: bool,
    /// `pause_collection` with `behavior: void`.
    pub(super) paused: bool,
    pub(super) status: SubStatus,
    pub(super) ended_at: Option<i64>,
    pub(super) dunning: Option<Dunning>,
    pub(super) latest_invoice: Option<InvoiceId>,
    /// A renewal invoice created as a draft, and when Stripe finalizes and charges it.
    pub(super) draft: Option<(InvoiceId, i64)>,
    /// A subscription schedule's next phase: the change it applies at the renewal.
    pub(super) schedule: Option<(String, tally::payments::RenewalChange)>,
    /// A schedule in its last phase: still attached (Stripe gives a last phase without an
    /// end date one billing interval, and releases the schedule only when it ends), with
    /// nothing left to apply.
    pub(super) last_phase: Option<String>,
    /// Prorations of changes made without invoicing them (`create_prorations`, the
    /// dashboard's default), newest first: the subscription's next invoice bills them (its
    /// renewal, or a change billed at once). Not simulated: Stripe bills them on a final
    /// invoice when a subscription set to cancel ends; here they end with it.
    pub(super) pending: Vec<Line>,
}

impl SimSubscription {
    /// The subscription as the payments port describes it.
    pub(super) fn live(&self) -> tally::payments::LiveSubscription {
        tally::payments::LiveSubscription {
            id: self.id.clone(),
            customer: self.customer.clone(),
            status: match self.status {
                SubStatus::Active => "active",
                SubStatus::PastDue => "past_due",
                SubStatus::Canceled => "canceled",
            }
            .into(),
            paused: self.paused,
            cancel_at_period_end: self.cancel_at_period_end,
            period_start: at(self.period_start),
            period_end: at(self.period_end),
            items: self
                .items
                .iter()
                .map(|i| tally::payments::LiveItem {
                    id: i.id.clone(),
                    price: i.price.clone(),
                    product: i.product.clone(),
                    unit_amount: tally::money::Cents::new(i.unit_amount),
                    interval: i.interval,
                    quantity: i.quantity,
                })
                .collect(),
            schedule: self.schedule_id(),
            metadata: self.metadata.clone(),
        }
    }

    /// The schedule attached to the subscription, if any (with a phase to come, or in its
    /// last one).
    pub(super) fn schedule_id(&self) -> Option<String> {
        self.schedule
            .as_ref()
            .map(|(id, _)| id.clone())
            .or_else(|| self.last_phase.clone())
    }

    /// At a renewal: the schedule's next phase starts (its items and metadata from now on,
    /// the schedule staying attached for that phase), or a last phase ends and the schedule
    /// is released (`end_behavior: release`). Returns whether the interval changed (the
    /// billing cycle then restarts at the phase start).
    pub(super) fn enter_next_phase(&mut self, now: i64) -> bool {
        let Some((id, next)) = self.schedule.take() else {
            self.last_phase = None;
            return false;
        };
        self.last_phase = Some(id);
        let before = self.interval();
        let mut items = Vec::new();
        let plan_item = self.items.first().cloned();
        let price_item =
            |p: &tally::payments::ItemPrice, quantity: u64, old: Option<&SimItem>| SimItem {
                id: old.map_or_else(|| new_id("si"), |o| o.id.clone()),
                price: new_id("price"),
                product: p.product.clone(),
                name: p.product_name.clone(),
                unit_amount: p.unit_amount.get(),
                interval: p.interval,
                quantity,
                created: old.map_or(now, |o| o.created),
            };
        items.push(price_item(&next.plan, 1, plan_item.as_ref()));
        let (units, addon) = &next.addons;
        if *units > 0 {
            let old = self
                .items
                .iter()
                .find(|i| i.product.starts_with("tally_addon_"));
            items.push(price_item(addon, *units, old));
        }
        self.items = items;
        // Stripe merges the phase's metadata into the subscription's: keys it does not
        // name (the scheduled change's) stay.
        for (k, v) in &next.next_metadata {
            if !v.is_empty() {
                self.metadata.insert(k.clone(), v.clone());
            }
        }
        before != self.interval()
    }

    pub(super) fn interval(&self) -> Interval {
        self.items.first().map_or(Interval::Monthly, |i| i.interval)
    }

    /// Starts period `cycle` counted from `anchor`.
    pub(super) fn set_cycle(&mut self, anchor: i64, cycle: u32) {
        let k = months(self.interval());
        self.anchor = anchor;
        self.cycle = cycle;
        self.period_start = add_months(anchor, cycle * k);
        self.period_end = add_months(anchor, (cycle + 1) * k);
    }

    pub(super) fn object(&self) -> Value {
        let mut sub = fixture("subscription");
        let template = sub["items"]["data"][0].clone();
        sub["id"] = json!(self.id);
        sub["customer"] = json!(self.customer);
        sub["status"] = json!(match self.status {
            SubStatus::Active => "active",
            SubStatus::PastDue => "past_due",
            SubStatus::Canceled => "canceled",
        });
        sub["created"] = json!(self.created);
        sub["start_date"] = json!(self.created);
        sub["billing_cycle_anchor"] = json!(self.anchor);
        sub["billing_cycle_anchor_config"] = Value::Null;
        sub["billing_schedules"] = json!([]);
        sub["billing_thresholds"] = Value::Null;
        sub["cancel_at_period_end"] = json!(self.cancel_at_period_end);
        sub["cancel_at"] = if self.cancel_at_period_end {
            json!(self.period_end)
        } else {
            Value::Null
        };
        sub["canceled_at"] = json!(self.ended_at);
        sub["ended_at"] = json!(self.ended_at);
        sub["pause_collection"] = if self.paused {
            json!({"behavior": "void", "resumes_at": null})
        } else {
            Value::Null
        };
        sub["metadata"] = json!(self.metadata);
        sub["latest_invoice"] = json!(self.latest_invoice);
        sub["schedule"] = json!(self.schedule_id());
        sub["test_clock"] = Value::Null;
        sub["items"]["url"] = json!(format!("/v1/subscription_items?subscription={}", self.id));
        sub["items"]["data"] = self
            .items
            .iter()
            .map(|i| {
                let mut item = template.clone();
                item["id"] = json!(i.id);
                item["created"] = json!(i.created);
                item["subscription"] = json!(self.id);
                item["quantity"] = json!(i.quantity);
                item["current_period_start"] = json!(self.period_start);
                item["current_period_end"] = json!(self.period_end);
                item["billing_thresholds"] = Value::Null;
                let interval = stripe_interval(i.interval);
                let price = &mut item["price"];
                price["id"] = json!(i.price);
                price["product"] = json!(i.product);
                price["created"] = json!(i.created);
                price["custom_unit_amount"] = Value::Null;
                price["transform_quantity"] = Value::Null;
                price["unit_amount"] = json!(i.unit_amount);
                price["unit_amount_decimal"] = json!(i.unit_amount.to_string());
                price["recurring"]["interval"] = json!(interval);
                let plan = &mut item["plan"];
                plan["id"] = json!(i.price);
                plan["amount"] = json!(i.unit_amount);
                plan["amount_decimal"] = json!(i.unit_amount.to_string());
                plan["billing_scheme"] = json!("per_unit");
                plan["created"] = json!(i.created);
                plan["currency"] = json!("usd");
                plan["interval"] = json!(interval);
                plan["interval_count"] = json!(1);
                plan["livemode"] = json!(false);
                plan["product"] = json!(i.product);
                plan["transform_usage"] = Value::Null;
                item
            })
            .collect();
        sub
    }
}

/// One line of an invoice: a subscription item's price for a period.
#[derive(Debug, Clone)]
pub(super) struct Line {
    pub(super) description: String,
    /// Signed cents: credits for unused time are negative.
    pub(super) amount: i64,
    pub(super) quantity: u64,
    pub(super) period: (i64, i64),
    pub(super) item: SimItem,
    pub(super) proration: bool,
}

fn day(ts: i64) -> String {
    at(ts).format("%-d %b %Y").to_string()
}

impl Line {
    /// A whole period of an item at its price.
    pub(super) fn full(item: &SimItem, period: (i64, i64)) -> Self {
        Self {
            description: format!(
                "{} × {} (at {} / {})",
                item.quantity,
                item.name,
                dollars(item.unit_amount as i64),
                stripe_interval(item.interval)
            ),
            amount: item.amount(),
            quantity: item.quantity,
            period,
            item: item.clone(),
            proration: false,
        }
    }

    /// The prorated share of `item` for `[now, period.1)` out of `period`: Stripe's
    /// "Unused time" credit (`unused`) or "Remaining time" charge, rounded to the cent.
    pub(super) fn prorated(item: &SimItem, period: (i64, i64), now: i64, unused: bool) -> Self {
        let remaining = (period.1 - now).max(0) as i128;
        let length = (period.1 - period.0).max(1) as i128;
        let full = item.amount() as i128;
        let share = ((2 * full * remaining + length) / (2 * length)) as i64;
        let (description, amount) = if unused {
            (
                format!("Unused time on {} after {}", item.name, day(now)),
                -share,
            )
        } else {
            (
                format!(
                    "Remaining time on {} × {} after {}",
                    item.quantity,
                    item.name,
                    day(now)
                ),
                share,
            )
        };
        Self {
            description,
            amount,
            quantity: item.quantity,
            period: (now, period.1),
            item: item.clone(),
            proration: true,
        }
    }

    fn object(&self, invoice: &str, subscription: &str, template: &Value) -> Value {
        let mut l = template.clone();
        l["id"] = json!(new_id("il"));
        l["invoice"] = json!(invoice);
        l["amount"] = json!(self.amount);
        l["subtotal"] = json!(self.amount);
        l["currency"] = json!("usd");
        l["description"] = json!(self.description);
        l["quantity"] = json!(self.quantity);
        l["period"] = json!({"start": self.period.0, "end": self.period.1});
        l["pricing"] = json!({"type": "price_details",
            "price_details": {"price": self.item.price, "product": self.item.product},
            "unit_amount_decimal": self.item.unit_amount.to_string()});
        l["parent"] = json!({"type": "subscription_item_details", "invoice_item_details": null,
            "subscription_item_details": {"invoice_item": null, "proration": self.proration,
                "proration_details": {"credited_items": null},
                "subscription": subscription, "subscription_item": self.item.id}});
        l["subscription"] = json!(subscription);
        l["taxes"] = json!([]);
        l["pretax_credit_amounts"] = json!([]);
        l
    }
}

/// A draft invoice: Stripe's example invoice with these lines and amounts, its hosted page
/// and PDF under `base_url`.
pub(super) fn invoice_object(
    base_url: &str,
    id: &InvoiceId,
    customer: &CustomerId,
    created: i64,
    reason: &str,
    lines: &[Line],
    sub: Option<&SimSubscription>,
) -> Value {
    let mut inv = fixture("invoice");
    let template = inv["lines"]["data"][0].clone();
    let sub_id = sub.map(|s| s.id.to_string()).unwrap_or_default();
    inv["id"] = json!(id);
    inv["customer"] = json!(customer);
    inv["billing_reason"] = json!(reason);
    inv["collection_method"] = json!("charge_automatically");
    inv["created"] = json!(created);
    inv["currency"] = json!("usd");
    inv["metadata"] = json!({});
    inv["account_name"] = json!("Tally (simulated)");
    // Drafts have no number; Stripe numbers an invoice as it finalizes it.
    inv["number"] = Value::Null;
    inv["hosted_invoice_url"] = json!(format!("{base_url}/sim/invoices/{id}"));
    inv["invoice_pdf"] = json!(format!("{base_url}/sim/invoices/{id}.pdf"));
    inv["parent"] = match sub {
        Some(s) => json!({"type": "subscription_details", "quote_details": null,
            "subscription_details": {"subscription": s.id, "metadata": s.metadata}}),
        None => Value::Null,
    };
    inv["lines"]["data"] = lines
        .iter()
        .map(|l| l.object(id.as_str(), &sub_id, &template))
        .collect();
    inv["lines"]["url"] = json!(format!("/v1/invoices/{id}/lines"));
    let total: i64 = lines.iter().map(|l| l.amount).sum();
    for k in [
        "subtotal",
        "subtotal_excluding_tax",
        "total",
        "total_excluding_tax",
    ] {
        inv[k] = json!(total);
    }
    // A negative total goes to the customer's credit balance; nothing is due.
    inv["amount_due"] = json!(total.max(0));
    inv["amount_remaining"] = json!(total.max(0));
    inv["amount_paid"] = json!(0);
    inv["amount_overpaid"] = json!(0);
    inv["attempt_count"] = json!(0);
    inv["attempted"] = json!(false);
    inv["auto_advance"] = json!(true);
    inv["automatic_tax"]["enabled"] = json!(false);
    inv["total_taxes"] = json!([]);
    inv["period_start"] = json!(created);
    inv["period_end"] = json!(created);
    inv["due_date"] = Value::Null;
    inv["effective_at"] = Value::Null;
    inv["ending_balance"] = Value::Null;
    inv["from_invoice"] = Value::Null;
    inv["last_finalization_error"] = Value::Null;
    inv["next_payment_attempt"] = Value::Null;
    inv["shipping_cost"] = Value::Null;
    inv["webhooks_delivered_at"] = Value::Null;
    inv["automatically_finalizes_at"] = Value::Null;
    inv["status"] = json!("draft");
    inv["status_transitions"] = json!({"finalized_at": null, "marked_uncollectible_at": null, "paid_at": null, "voided_at": null});
    inv
}

/// Marks every line of a one-off invoice as an invoice item (not a subscription item).
pub(super) fn invoice_item_lines(inv: &mut Value) {
    for line in inv["lines"]["data"].as_array_mut().into_iter().flatten() {
        line["parent"] = json!({"type": "invoice_item_details",
            "subscription_item_details": null,
            "invoice_item_details": {"invoice_item": new_id("ii"), "proration": false,
                "proration_details": {"credited_items": null}, "subscription": null}});
        line["subscription"] = Value::Null;
    }
}

pub(super) fn finalize(inv: &mut Value, now: i64) {
    inv["status"] = json!("open");
    inv["status_transitions"]["finalized_at"] = json!(now);
    inv["effective_at"] = json!(now);
    inv["ending_balance"] = json!(0);
}

pub(super) fn mark_paid(inv: &mut Value, now: i64) {
    let due = inv["amount_due"].as_i64().unwrap_or_default();
    inv["status"] = json!("paid");
    inv["amount_paid"] = json!(due);
    inv["amount_remaining"] = json!(0);
    inv["status_transitions"]["paid_at"] = json!(now);
    inv["next_payment_attempt"] = Value::Null;
    if due > 0 {
        inv["attempted"] = json!(true);
        inv["attempt_count"] = json!(inv["attempt_count"].as_i64().unwrap_or_default() + 1);
    }
}

pub(super) fn mark_failed(inv: &mut Value, next_attempt: Option<i64>) {
    inv["attempted"] = json!(true);
    inv["attempt_count"] = json!(inv["attempt_count"].as_i64().unwrap_or_default() + 1);
    inv["next_payment_attempt"] = json!(next_attempt);
}

pub(super) fn mark_void(inv: &mut Value, now: i64) {
    inv["status"] = json!("void");
    inv["amount_remaining"] = json!(0);
    inv["status_transitions"]["voided_at"] = json!(now);
    inv["next_payment_attempt"] = Value::Null;
}

/// A card payment of `amount` by `customer`, succeeded or declined.
pub(super) fn charge_object(
    customer: &CustomerId,
    amount: i64,
    created: i64,
    metadata: Value,
    payment_method: &str,
    declined: bool,
) -> Value {
    let mut charge = fixture("charge");
    charge["id"] = json!(new_id("ch"));
    charge["customer"] = json!(customer);
    charge["created"] = json!(created);
    charge["metadata"] = metadata;
    charge["amount"] = json!(amount);
    charge["amount_captured"] = json!(if declined { 0 } else { amount });
    charge["amount_refunded"] = json!(0);
    charge["captured"] = json!(!declined);
    charge["paid"] = json!(!declined);
    charge["payment_intent"] = json!(new_id("pi"));
    charge["payment_method"] = json!(payment_method);
    charge["refunded"] = json!(false);
    charge["status"] = json!(if declined { "failed" } else { "succeeded" });
    if declined {
        charge["failure_code"] = json!("card_declined");
        charge["failure_message"] = json!("Your card was declined.");
    }
    charge["refunds"] =
        json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"});
    charge
}

/// The record that `charge` paid invoice `inv` (Stripe's `invoice_payment`, delivered as
/// `invoice_payment.paid`): how a payment intent is tied to the invoice it paid.
pub(super) fn invoice_payment(inv: &Value, charge: &Value, now: i64) -> Value {
    let mut p = fixture("invoice_payment");
    p["id"] = json!(new_id("inpay"));
    p["invoice"] = inv["id"].clone();
    p["amount_paid"] = charge["amount"].clone();
    p["amount_requested"] = charge["amount"].clone();
    p["currency"] = charge["currency"].clone();
    p["created"] = json!(now);
    p["livemode"] = json!(false);
    p["is_default"] = json!(true);
    p["payment"] = json!({"type": "payment_intent", "payment_intent": charge["payment_intent"]});
    p["status"] = json!("paid");
    p["status_transitions"] = json!({"canceled_at": null, "paid_at": now});
    p
}

/// The saved card's id for a customer (one card per simulated customer).
pub(super) fn card_of(customer: &CustomerId) -> String {
    let part: String = customer
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("pm_sim_{part}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ts(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 9, 30, 0).unwrap().timestamp()
    }

    #[test]
    fn months_are_calendar_months_clamped_to_the_month_end_from_the_anchor() {
        let jan31 = ts(2028, 1, 31);
        assert_eq!(add_months(jan31, 1), ts(2028, 2, 29));
        assert_eq!(add_months(jan31, 2), ts(2028, 3, 31));
        assert_eq!(add_months(jan31, 3), ts(2028, 4, 30));
        assert_eq!(add_months(ts(2027, 1, 31), 1), ts(2027, 2, 28));
        assert_eq!(add_months(ts(2028, 2, 29), 12), ts(2029, 2, 28));
        assert_eq!(add_months(ts(2028, 2, 29), 48), ts(2032, 2, 29));
        assert_eq!(add_months(ts(2026, 11, 15), 2), ts(2027, 1, 15));
    }

    #[test]
    fn prorations_round_to_the_nearest_cent() {
        let item = SimItem {
            id: "si_1".into(),
            price: "price_1".into(),
            product: "tally_plan_max".into(),
            name: "Max plan".into(),
            unit_amount: 2900,
            interval: Interval::Monthly,
            quantity: 1,
            created: 0,
        };
        let unused = Line::prorated(&item, (0, 30), 20, true);
        assert_eq!((unused.amount, unused.period), (-967, (20, 30)));
        let remaining = Line::prorated(&item, (0, 30), 20, false);
        assert_eq!(remaining.amount, 967);
        assert!(
            unused
                .description
                .starts_with("Unused time on Max plan after")
        );
    }
}
