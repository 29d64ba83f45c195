//! Offline stand-in for Stripe, used by the local runner when no `STRIPE_SECRET_KEY` is set.
//!
//! Checkout URLs point to `GET /sim/checkout/{id}`, a page with a Pay button. Paying builds
//! the events Stripe would send (from Stripe's own example objects), signs them with the
//! webhook secret exactly as Stripe does, and delivers them to `POST /webhooks/stripe`, so
//! they take the same path as real deliveries: signature check, billing queue, worker.
//! `GET /sim/events` lists every delivered event; `POST /sim/events/{id}/redeliver` sends
//! one again (with a fresh signature) as Stripe resends one later, past the billing queue's
//! five-minute deduplication window, to see duplicates handled by the billing worker.
//!
//! Time is the local system's one clock, shared with the ledger and the webhook: like a
//! Stripe test clock, `POST /sim/clock/advance` moves it forward and plays, in time order,
//! everything Stripe does in between (renewals on calendar anchors, cancellations at period
//! end, voided invoices while collection is paused, failed payments and their retries), see
//! `cycle`. Subscription updates follow Stripe's rules for the parameters Tally's adapter
//! sends: proration invoices with "Unused time" and "Remaining time" lines, interval
//! switches resetting the billing anchor, refusals when the card declines.
//!
//! It lives in the local runner rather than in `tally` so that no Lambda binary carries it.
//! The Stripe-shaped objects it sends are built in `objects`, its pages served by `pages`.

mod cycle;
mod disputes;
mod objects;
mod pages;
mod pdf;

pub use cycle::{
    AdvanceError, ClockView, FINALIZE_AFTER_SECS, NoSchedule, RETRY_DAYS, ScheduleHook,
};
pub use objects::{add_months, stripe_signature};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use chrono::{DateTime, Utc};
use objects::{
    Dunning, Line, SimItem, SimSubscription, SubStatus, card_of, charge_object, finalize, fixture,
    invoice_item_lines, invoice_object, invoice_payment, mark_failed, mark_paid, mark_void, new_id,
    new_stripe_id,
};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tally::clock::AdvanceableClock;
use tally::ids::{
    CheckoutSessionId, CustomerId, InvoiceId, PaymentIntentId, PaymentMethodId, SubscriptionId,
    WorkspaceId,
};
use tally::payments::stripe_api::product_id;
use tally::payments::{
    BilledInvoice, CheckoutLink, CheckoutRequest, CustomInvoice, InvoiceLink, LiveSubscription,
    Payments, PaymentsError, PlanCheckouts, Purchase, RenewalChange, SubscriptionChange, TopUp,
};
use tally::queue::local::LocalQueue;
use tower::ServiceExt;

#[derive(Debug, Clone)]
struct SimSession {
    request: CheckoutRequest,
    paid: bool,
    /// Stripe's default: a session not paid within 24 hours expires and cannot be paid.
    expires_at: i64,
}

/// How many of its lines an invoice object carries (Stripe's default).
const INVOICE_LINES_CARRIED: usize = 10;

/// How long a checkout session stays open (Stripe's default; the adapter sets none).
const CHECKOUT_LIFETIME_SECS: i64 = 24 * 3600;

/// An invoice as Stripe shows it now, with the idempotency key of the request that made
/// it (custom invoices).
#[derive(Debug, Clone)]
struct StoredInvoice {
    key: Option<String>,
    object: Value,
}

/// A delivered event, as `GET /sim/events` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SimEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    /// Status the webhook answered with.
    pub delivered_status: u16,
    pub payload: Value,
}

/// Events to deliver, in order.
type Events = Vec<(&'static str, Value)>;

/// Stripe's refusal of a payment method attached to no customer, used once already.
const NOT_ATTACHED: &str = "The provided PaymentMethod was previously used with a PaymentIntent without Customer attachment, shared with a connected account without Customer attachment, or was detached from a Customer. It may not be used again. To use a PaymentMethod multiple times, you must attach it to a Customer first.";
const DECLINED: &str = "Your card was declined.";

/// What an idempotency key was first used with (the parameters, as a fingerprint) and
/// Stripe's answer then.
type Keyed<T> = (String, Result<T, String>);

/// Stripe's answer to an idempotency key reused with other parameters.
const IDEMPOTENCY_MISMATCH: &str = "Keys for idempotent requests can only be used with the same parameters they were first used with.";

pub struct Simulator {
    base_url: String,
    secret: String,
    webhook: Router,
    clock: Arc<dyn AdvanceableClock>,
    /// The billing queue: advancing the clock waits for it to apply each instant's events
    /// before moving on, as Tally would have by then.
    billing_queue: Option<Arc<LocalQueue>>,
    schedule: Mutex<Arc<dyn ScheduleHook>>,
    advancing: tokio::sync::Mutex<()>,
    sessions: Mutex<HashMap<CheckoutSessionId, SimSession>>,
    subscriptions: Mutex<HashMap<SubscriptionId, SimSubscription>>,
    invoices: Mutex<HashMap<InvoiceId, StoredInvoice>>,
    customers: Mutex<HashSet<CustomerId>>,
    /// Customers made without an email: Stripe makes no invoice it would have to send them.
    emailless: Mutex<HashSet<CustomerId>>,
    /// Customers made, by idempotency key, with the parameters they were made with.
    customer_keys: Mutex<HashMap<String, (String, CustomerId)>>,
    declining: Mutex<HashSet<CustomerId>>,
    /// Idempotency keys of subscription updates already made.
    /// Answers of subscription updates by idempotency key (refusals too, as Stripe
    /// replays a failed request's answer for the same key).
    /// By idempotency key: the parameters it was first used with, and the answer.
    updates: Mutex<HashMap<String, Keyed<Option<BilledInvoice>>>>,
    events: Mutex<Vec<SimEvent>>,
    /// Every line of each invoice an event was made of, as last delivered (the events
    /// carry the first ten, as Stripe's do).
    invoice_lines: Mutex<HashMap<String, Value>>,
    event_ids: Mutex<ulid::Generator>,
    /// Succeeded charges as last delivered (refunds and disputes change them).
    charges: Mutex<HashMap<String, Value>>,
    disputes: Mutex<HashMap<String, Value>>,
    /// Refunds made through the API, by idempotency key (the same key answers the same
    /// refund, or the same refusal); held while a refund is made.
    /// By idempotency key: the parameters it was first used with, and the answer.
    refunds: tokio::sync::Mutex<HashMap<String, Keyed<Value>>>,
    /// Billing details set on customers (printed on their later invoices).
    customer_details: Mutex<HashMap<CustomerId, tally::payments::BillingDetails>>,
    /// Invoices finalized per customer: Stripe numbers a customer's invoices in sequence
    /// (`<customer prefix>-0001`, ...) in the order it finalizes them.
    invoice_numbers: Mutex<HashMap<CustomerId, u32>>,
    /// Reissues made, by idempotency key; held while one is made.
    reissues: tokio::sync::Mutex<HashMap<String, tally::payments::Reissued>>,
    /// Off-session payments by idempotency key: what was asked, and the answer (a payment
    /// intent or a refusal), which the same key answers again; held while one is made.
    off_session: tokio::sync::Mutex<HashMap<String, Keyed<PaymentIntentId>>>,
    /// Answers still to be lost (see [`Simulator::lose_answers`]).
    lost_answers: std::sync::atomic::AtomicU32,
    /// Checkout expiries still to find Stripe unreachable (see
    /// [`Simulator::unreachable_for_expiries`]).
    unreachable_expiries: std::sync::atomic::AtomicU32,
    /// Subscription updates still to find Stripe unreachable (see
    /// [`Simulator::unreachable_for_updates`]).
    unreachable_updates: std::sync::atomic::AtomicU32,
    /// Events made while deliveries are held back (see [`Simulator::hold_deliveries`]).
    held: Mutex<Option<Vec<Value>>>,
}

impl Simulator {
    /// `base_url` is where the local runner serves `/sim`; `webhook` is the router that
    /// serves `POST /webhooks/stripe`; `clock` is the local system's one clock.
    pub fn new(
        base_url: &str,
        secret: &str,
        webhook: Router,
        clock: Arc<dyn AdvanceableClock>,
        billing_queue: Option<Arc<LocalQueue>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            secret: secret.to_owned(),
            webhook,
            clock,
            billing_queue,
            schedule: Mutex::new(Arc::new(NoSchedule)),
            advancing: tokio::sync::Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            invoices: Mutex::new(HashMap::new()),
            customers: Mutex::new(HashSet::new()),
            emailless: Mutex::new(HashSet::new()),
            customer_keys: Mutex::new(HashMap::new()),
            declining: Mutex::new(HashSet::new()),
            updates: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            invoice_lines: Mutex::new(HashMap::new()),
            event_ids: Mutex::new(ulid::Generator::new()),
            charges: Mutex::new(HashMap::new()),
            disputes: Mutex::new(HashMap::new()),
            refunds: tokio::sync::Mutex::new(HashMap::new()),
            customer_details: Mutex::new(HashMap::new()),
            invoice_numbers: Mutex::new(HashMap::new()),
            reissues: tokio::sync::Mutex::new(HashMap::new()),
            off_session: tokio::sync::Mutex::new(HashMap::new()),
            lost_answers: std::sync::atomic::AtomicU32::new(0),
            unreachable_expiries: std::sync::atomic::AtomicU32::new(0),
            unreachable_updates: std::sync::atomic::AtomicU32::new(0),
            held: Mutex::new(None),
        })
    }

    pub fn events(&self) -> Vec<SimEvent> {
        self.events.lock().expect("sim lock").clone()
    }

    /// The current object of a simulated invoice, as Stripe would answer it.
    pub fn invoice(&self, id: &str) -> Option<Value> {
        self.invoices
            .lock()
            .expect("sim lock")
            .get(id)
            .map(|i| i.object.clone())
    }

    fn now(&self) -> i64 {
        self.clock.now().timestamp()
    }

    /// A change made in the dashboard that creates prorations without invoicing them
    /// (Stripe's `proration_behavior=create_prorations`, the dashboard's default): the
    /// items change at once and the prorated difference waits for the subscription's next
    /// invoice, its renewal or a change billed at once. A switch of interval is refused
    /// here (Stripe bills a new interval's period at once).
    pub async fn change_without_invoicing(
        &self,
        change: &SubscriptionChange,
    ) -> Result<(), PaymentsError> {
        let now = self.now();
        let events = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let current = subs.get(&change.subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
            // Stripe collects such prorations at the end of a period set to cancel (a final
            // invoice), which is not modelled here.
            if current.cancel_at_period_end {
                return Err(PaymentsError::refused(
                    "prorations left for the next invoice of a subscription set to cancel are not simulated",
                ));
            }
            let prorated = SubscriptionChange {
                prorate_now: true,
                ..change.clone()
            };
            let (mut next, mut lines) = self.plan_update(current, &prorated, now)?;
            if next.interval() != current.interval() {
                return Err(PaymentsError::refused(
                    "a switch of interval is billed at once",
                ));
            }
            lines.append(&mut next.pending);
            next.pending = lines;
            let (before, after) = (current.object(), next.object());
            subs.insert(next.id.clone(), next);
            updated(before, after)
        };
        self.deliver_all(events).await;
        Ok(())
    }

    /// Makes every later charge of a customer's saved card decline (`true`) or succeed.
    /// Returns `false` for a customer the simulator does not know.
    pub fn set_card_declines(&self, customer: &str, declines: bool) -> bool {
        let Some(c) = self
            .customers
            .lock()
            .expect("sim lock")
            .iter()
            .find(|c| c.as_str() == customer)
            .cloned()
        else {
            return false;
        };
        let mut declining = self.declining.lock().expect("sim lock");
        if declines {
            declining.insert(c);
        } else {
            declining.remove(&c);
        }
        true
    }

    /// The next `n` off-session payments, paid invoices, new checkout sessions and
    /// subscription updates are made, but their answers never arrive: the caller sees a
    /// timeout (a network fault after Stripe acted).
    pub fn lose_answers(&self, n: u32) {
        self.lost_answers
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `n` requests to expire a customer's discounted pack checkouts find Stripe
    /// unreachable: nothing is listed or expired, and the caller sees an outage.
    pub fn unreachable_for_expiries(&self, n: u32) {
        self.unreachable_expiries
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `n` subscription updates find Stripe unreachable: nothing is sent or made,
    /// and the caller sees an outage.
    pub fn unreachable_for_updates(&self, n: u32) {
        self.unreachable_updates
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets the idempotency keys of off-session payments, as Stripe does after 24 hours:
    /// the same key then makes a new payment.
    pub async fn forget_idempotency_keys(&self) {
        self.off_session.lock().await.clear();
        self.customer_keys.lock().expect("sim lock").clear();
    }

    fn answer<T>(&self, made: T) -> Result<T, PaymentsError> {
        use std::sync::atomic::Ordering;
        match self
            .lost_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Err(PaymentsError::unavailable(
                "timed out waiting for Stripe's answer",
            )),
            Err(_) => Ok(made),
        }
    }

    fn declines(&self, customer: &CustomerId) -> bool {
        self.declining.lock().expect("sim lock").contains(customer)
    }

    /// The invoice an earlier request with this idempotency key made, if any.
    fn invoice_by_key(&self, key: &str) -> Option<InvoiceId> {
        self.invoices
            .lock()
            .expect("sim lock")
            .iter()
            .find(|(_, i)| i.key.as_deref() == Some(key))
            .map(|(id, _)| id.clone())
    }

    fn invoice_link(&self, id: &InvoiceId) -> InvoiceLink {
        InvoiceLink {
            id: id.clone(),
            hosted_invoice_url: format!("{}/sim/invoices/{id}", self.base_url),
        }
    }

    fn store_invoice(&self, object: &Value, key: Option<String>) {
        let id: InvoiceId = object["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("simulated invoice id");
        let mut invoices = self.invoices.lock().expect("sim lock");
        let key = key.or_else(|| invoices.get(&id).and_then(|i| i.key.clone()));
        invoices.insert(
            id,
            StoredInvoice {
                key,
                object: object.clone(),
            },
        );
    }

    fn event_id(&self) -> String {
        let mut ids = self.event_ids.lock().expect("sim lock");
        // Monotonic within one millisecond, so ids sort in delivery order.
        let id = ids.generate().unwrap_or_else(|_| ulid::Ulid::new());
        format!("evt_sim{}", id.to_string().to_lowercase())
    }

    async fn deliver(&self, kind: &str, mut object: Value) -> SimEvent {
        // A charge's receipt is a page of the simulator, as Stripe hosts its own.
        if let Some(id) = object["id"].as_str().filter(|id| id.starts_with("ch_"))
            && object["object"] == "charge"
        {
            let url = format!("{}/sim/receipts/{id}", self.base_url);
            object["receipt_url"] = json!(url);
        }
        if let ("charge.succeeded", Some(id)) = (kind, object["id"].as_str()) {
            self.charges
                .lock()
                .expect("sim lock")
                .insert(id.to_owned(), object.clone());
        }
        // Stripe's charges no longer list their refunds (not expanded since 2022-11-15):
        // each refund comes as a `refund.*` event of its own. The simulator keeps them.
        if object["object"] == "charge"
            && let Some(c) = object.as_object_mut()
        {
            c.remove("refunds");
        }
        // An invoice object carries the first ten of its lines and says whether there are
        // more (`GET /v1/invoices/{id}/lines` lists them all).
        if object["object"] == "invoice"
            && let Some(id) = object["id"].as_str().map(str::to_owned)
        {
            let lines = object["lines"]["data"].clone();
            if let Some(all) = lines.as_array() {
                object["lines"]["has_more"] = json!(all.len() > INVOICE_LINES_CARRIED);
                object["lines"]["data"] = json!(all[..all.len().min(INVOICE_LINES_CARRIED)]);
            }
            self.invoice_lines
                .lock()
                .expect("sim lock")
                .insert(id, lines);
        }
        let created = self.now();
        let mut e = fixture("event");
        e["id"] = json!(self.event_id());
        e["type"] = json!(kind);
        e["created"] = json!(created);
        e["livemode"] = json!(false);
        e["data"] = json!({"object": object});
        let held = match self.held.lock().expect("sim lock").as_mut() {
            Some(held) => {
                held.push(e.clone());
                true
            }
            None => false,
        };
        let status = if held { 0 } else { self.post_signed(&e).await };
        let event = SimEvent {
            id: e["id"].as_str().unwrap_or_default().to_owned(),
            kind: kind.to_owned(),
            created,
            delivered_status: status,
            payload: e,
        };
        self.events.lock().expect("sim lock").push(event.clone());
        event
    }

    /// Holds back every event made from now on, until [`Simulator::release_deliveries`]:
    /// Stripe promises no order between events, and retries a failed delivery hours
    /// later, after events made since.
    pub fn hold_deliveries(&self) {
        self.held
            .lock()
            .expect("sim lock")
            .get_or_insert_with(Vec::new);
    }

    /// Delivers the events held back, in the order `order` leaves them in (signed now),
    /// and stops holding back. Returns how many were delivered.
    pub async fn release_deliveries(&self, order: impl FnOnce(&mut Vec<Value>)) -> usize {
        let Some(mut held) = self.held.lock().expect("sim lock").take() else {
            return 0;
        };
        order(&mut held);
        for e in &held {
            let status = self.post_signed(e).await;
            if let Some(recorded) = self
                .events
                .lock()
                .expect("sim lock")
                .iter_mut()
                .find(|r| r.payload["id"] == e["id"])
            {
                recorded.delivered_status = status;
            }
        }
        held.len()
    }

    async fn deliver_all(&self, events: Events) {
        for (kind, object) in events {
            self.deliver(kind, object).await;
        }
    }

    async fn post_signed(&self, event: &Value) -> u16 {
        let payload = event.to_string();
        let signature = stripe_signature(&payload, &self.secret, self.now());
        let req = Request::post("/webhooks/stripe")
            .header(header::CONTENT_TYPE, "application/json")
            .header("stripe-signature", signature)
            .body(Body::from(payload))
            .expect("valid request");
        match self.webhook.clone().oneshot(req).await {
            Ok(res) => res.status().as_u16(),
            Err(never) => match never {},
        }
    }

    /// Finalizes and collects a new subscription invoice as Stripe does: voided while
    /// collection is paused, paid at once when nothing is due, else charged to the saved
    /// card (a decline leaves it open, the subscription past due, and retries scheduled).
    /// Returns the events from `invoice.created` on; the caller delivers them.
    /// Finalizes a draft invoice: its number, the next of its customer's sequence.
    fn finalize(&self, inv: &mut Value, now: i64) {
        let customer: CustomerId = inv["customer"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .expect("a simulated invoice names its customer");
        let seq = {
            let mut numbers = self.invoice_numbers.lock().expect("sim lock");
            let n = numbers.entry(customer.clone()).or_default();
            *n += 1;
            *n
        };
        let text = customer.as_str();
        let prefix = text[text.len().saturating_sub(8)..].to_uppercase();
        inv["number"] = json!(format!("{prefix}-{seq:04}"));
        finalize(inv, now);
    }

    fn collect(&self, sub: &mut SimSubscription, inv: Value, now: i64) -> Events {
        let mut out: Events = vec![("invoice.created", inv.clone())];
        sub.latest_invoice = inv["id"].as_str().and_then(|s| s.parse().ok());
        out.extend(self.attempt(sub, inv, now, true));
        out
    }

    /// Finalizes a subscription's invoice and charges it: what Stripe does at once for a
    /// change's invoice, and an hour after a renewal's was created. One created while
    /// collection is paused (`void`) is voided instead; a draft made before the pause is
    /// collected (`created_paused`: whether it was created while paused).
    fn attempt(
        &self,
        sub: &mut SimSubscription,
        mut inv: Value,
        now: i64,
        created_paused: bool,
    ) -> Events {
        let mut out: Events = Vec::new();
        let id: InvoiceId = inv["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("simulated invoice id");
        if created_paused && sub.paused {
            self.finalize(&mut inv, now);
            mark_void(&mut inv, now);
            out.push(("invoice.voided", inv.clone()));
        } else {
            self.finalize(&mut inv, now);
            out.push(("invoice.finalized", inv.clone()));
            let due = inv["amount_due"].as_i64().unwrap_or_default();
            // Stripe does not copy the subscription's metadata to the payment of its
            // invoices: the charge names the customer only.
            let meta = json!({});
            if due == 0 {
                mark_paid(&mut inv, now);
                out.push(("invoice.paid", inv.clone()));
            } else if self.declines(&sub.customer) {
                let card = card_of(&sub.customer);
                let charge = charge_object(&sub.customer, due, now, meta, &card, true);
                out.push(("charge.failed", charge));
                mark_failed(&mut inv, Some(now + RETRY_DAYS[0] * 86_400));
                out.push(("invoice.payment_failed", inv.clone()));
                sub.status = SubStatus::PastDue;
                if sub.dunning.is_none() {
                    sub.dunning = Some(Dunning {
                        invoice: id,
                        first_failed: now,
                        retries: 0,
                    });
                }
            } else {
                let card = card_of(&sub.customer);
                let charge = charge_object(&sub.customer, due, now, meta, &card, false);
                let paid_by = invoice_payment(&inv, &charge, now);
                out.push(("charge.succeeded", charge));
                mark_paid(&mut inv, now);
                out.push(("invoice.paid", inv.clone()));
                out.push(("invoice_payment.paid", paid_by));
            }
        }
        self.store_invoice(&inv, None);
        out
    }

    /// Whether a checkout session exists but can no longer be paid (expired unpaid).
    pub fn expired(&self, session_id: &str) -> bool {
        let now = self.now();
        self.sessions
            .lock()
            .expect("sim lock")
            .get(session_id)
            .is_some_and(|s| !s.paid && now >= s.expires_at)
    }

    /// Plays Stripe's side of a completed checkout. Paying twice delivers nothing new; an
    /// expired session cannot be paid (`None`, as for an unknown one).
    pub async fn complete(&self, session_id: &str) -> Option<String> {
        let now = self.now();
        let request = {
            let mut sessions = self.sessions.lock().expect("sim lock");
            let s = sessions.get_mut(session_id)?;
            if s.paid {
                return Some(s.request.success_url.clone());
            }
            if now >= s.expires_at {
                return None;
            }
            s.paid = true;
            (s.request.clone(), s.expires_at)
        };
        let (request, expires_at) = request;
        let ws = request.workspace.to_string();
        let customer = request.customer.clone();
        // Checkout asks a customer without an email for one and sets it on the customer.
        self.emailless.lock().expect("sim lock").remove(&customer);
        let meta = tally::payments::stripe_api::checkout_metadata(&request);
        let mut session = fixture("checkout.session");
        session["id"] = json!(session_id);
        // Made when its page was asked for; paid now.
        session["created"] = json!(expires_at - CHECKOUT_LIFETIME_SECS);
        session["expires_at"] = json!(expires_at);
        session["customer"] = json!(customer);
        session["client_reference_id"] = json!(ws);
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["metadata"] = json!(meta);
        session["success_url"] = json!(request.success_url);
        session["cancel_url"] = json!(request.cancel_url);
        session["url"] = Value::Null;
        let card = card_of(&customer);
        match &request.purchase {
            Purchase::Pack {
                name,
                quantity,
                unit_amount,
                ..
            } => {
                let amount = (quantity * unit_amount.get()) as i64;
                session["mode"] = json!("payment");
                session["amount_total"] = json!(amount);
                session["amount_subtotal"] = json!(amount);
                session["subscription"] = Value::Null;
                // The payment intent carries `payment_intent_data.metadata` (the session's),
                // and its charge a copy of it, as Stripe makes them.
                let charge = charge_object(&customer, amount, now, json!(meta), &card, false);
                // The session's payment intent is the one its charge paid.
                session["payment_intent"] = charge["payment_intent"].clone();
                let mut intent = fixture("payment_intent");
                intent["id"] = charge["payment_intent"].clone();
                intent["created"] = json!(now);
                intent["amount"] = json!(amount);
                intent["amount_received"] = json!(amount);
                intent["customer"] = json!(customer);
                intent["payment_method"] = json!(card);
                intent["status"] = json!("succeeded");
                intent["metadata"] = json!(meta);
                // Checkout's post-payment invoice (`invoice_creation`), paid by the charge.
                let item = SimItem {
                    id: new_id("ii"),
                    price: new_id("price"),
                    product: new_id("prod"),
                    name: name.clone(),
                    unit_amount: unit_amount.get(),
                    interval: tally::ledger::Interval::Monthly,
                    quantity: *quantity,
                    created: now,
                };
                let line = Line {
                    description: format!("{quantity} × {name}"),
                    amount,
                    quantity: *quantity,
                    period: (now, now),
                    item,
                    proration: false,
                };
                let id: InvoiceId = new_stripe_id("in");
                let mut inv =
                    invoice_object(&self.base_url, &id, &customer, now, "manual", &[line], None);
                invoice_item_lines(&mut inv);
                inv["metadata"] = json!(meta);
                self.finalize(&mut inv, now);
                let finalized = inv.clone();
                mark_paid(&mut inv, now);
                let paid_by = invoice_payment(&inv, &charge, now);
                self.store_invoice(&inv, None);
                session["invoice"] = json!(id);
                self.deliver("charge.succeeded", charge).await;
                self.deliver("payment_intent.succeeded", intent).await;
                self.deliver("invoice.finalized", finalized).await;
                self.deliver("invoice.paid", inv).await;
                self.deliver("invoice_payment.paid", paid_by).await;
                self.deliver("checkout.session.completed", session).await;
            }
            Purchase::Plan {
                plan,
                name,
                interval,
                unit_amount,
            } => {
                let mut metadata = meta.clone();
                metadata.remove("kind");
                metadata.insert("addon_units", "0".into());
                let mut sub = SimSubscription {
                    id: new_stripe_id("sub"),
                    customer: customer.clone(),
                    metadata: metadata
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    items: vec![SimItem {
                        id: new_id("si"),
                        price: new_id("price"),
                        product: product_id("plan", plan),
                        name: format!("{name} plan"),
                        unit_amount: unit_amount.get(),
                        interval: *interval,
                        quantity: 1,
                        created: now,
                    }],
                    created: now,
                    anchor: now,
                    cycle: 0,
                    period_start: now,
                    period_end: now,
                    cancel_at_period_end: false,
                    paused: false,
                    status: SubStatus::Active,
                    ended_at: None,
                    dunning: None,
                    latest_invoice: None,
                    draft: None,
                    schedule: None,
                    last_phase: None,
                    pending: Vec::new(),
                };
                sub.set_cycle(now, 0);
                let id: InvoiceId = new_stripe_id("in");
                let lines: Vec<Line> = sub
                    .items
                    .iter()
                    .map(|i| Line::full(i, (sub.period_start, sub.period_end)))
                    .collect();
                let mut inv = invoice_object(
                    &self.base_url,
                    &id,
                    &customer,
                    now,
                    "subscription_create",
                    &lines,
                    Some(&sub),
                );
                sub.latest_invoice = Some(id.clone());
                // The card was just entered on the checkout page: the first invoice is paid.
                let mut events: Events = vec![("invoice.created", inv.clone())];
                self.finalize(&mut inv, now);
                events.push(("invoice.finalized", inv.clone()));
                let amount = unit_amount.get() as i64;
                // The invoice's payment carries no metadata of the subscription's.
                let charge = charge_object(&customer, amount, now, json!({}), &card, false);
                let paid_by = invoice_payment(&inv, &charge, now);
                events.push(("charge.succeeded", charge));
                mark_paid(&mut inv, now);
                events.push(("invoice.paid", inv.clone()));
                events.push(("invoice_payment.paid", paid_by));
                self.store_invoice(&inv, None);
                session["mode"] = json!("subscription");
                session["subscription"] = json!(sub.id);
                session["invoice"] = json!(id);
                session["amount_total"] = json!(amount);
                session["amount_subtotal"] = json!(amount);
                // Checkout makes the subscription incomplete and activates it once its first
                // invoice is paid: created incomplete, then updated active.
                let mut created = sub.object();
                created["status"] = json!("incomplete");
                events.insert(0, ("customer.subscription.created", created));
                events.push(("customer.subscription.updated", sub.object()));
                events.push(("checkout.session.completed", session));
                self.subscriptions
                    .lock()
                    .expect("sim lock")
                    .insert(sub.id.clone(), sub);
                self.deliver_all(events).await;
            }
        }
        Some(request.success_url)
    }

    /// Pays an open custom-payment invoice (once; paying again delivers nothing new).
    pub async fn pay_invoice(&self, id: &str) -> bool {
        let now = self.now();
        let invoice = {
            let mut invoices = self.invoices.lock().expect("sim lock");
            let Some(stored) = invoices.get_mut(id) else {
                return false;
            };
            let inv = &mut stored.object;
            if inv["status"] != "open" || inv["billing_reason"] != "manual" {
                return true;
            }
            mark_paid(inv, now);
            inv.clone()
        };
        // Paid by card on the hosted page: a payment intent and its charge, as Stripe makes.
        // The card is entered there, and Stripe keeps it for no one (not the saved card).
        let due = invoice["amount_paid"].as_i64().unwrap_or_default();
        let customer: Option<CustomerId> =
            invoice["customer"].as_str().and_then(|c| c.parse().ok());
        let paid_by = match customer {
            Some(customer) if due > 0 => {
                let card = new_id("pm");
                let charge = charge_object(&customer, due, now, json!({}), &card, false);
                let link = invoice_payment(&invoice, &charge, now);
                self.deliver("charge.succeeded", charge).await;
                Some(link)
            }
            _ => None,
        };
        self.deliver("invoice.paid", invoice).await;
        if let Some(link) = paid_by {
            self.deliver("invoice_payment.paid", link).await;
        }
        true
    }

    /// Applies a subscription update under Stripe's rules; returns the events to deliver.
    /// The subscription after `change`, and the invoice lines Stripe bills for it now.
    fn plan_update(
        &self,
        current: &SimSubscription,
        change: &SubscriptionChange,
        now: i64,
    ) -> Result<(SimSubscription, Vec<Line>), PaymentsError> {
        if current.status == SubStatus::Canceled {
            return Err(PaymentsError::refused(
                "A canceled subscription can only update its cancellation_details and metadata.",
            ));
        }
        // Stripe refuses any cancellation setting, `false` included, on a subscription a
        // schedule manages.
        if let (Some(schedule), Some(_)) = (current.schedule_id(), change.cancel_at_period_end) {
            return Err(PaymentsError::refused(format!(
                "The subscription is managed by the subscription schedule `{schedule}`, and updating any cancelation behavior directly is not allowed. Please update the schedule instead."
            )));
        }
        if let Some(expected) = &change.expect {
            let key = |i: &tally::payments::LiveItem| {
                (
                    i.product.clone(),
                    i.quantity,
                    i.unit_amount,
                    i.interval.as_str(),
                )
            };
            let mut now_items: Vec<_> = current.live().items.iter().map(key).collect();
            let mut then: Vec<_> = expected.iter().map(key).collect();
            now_items.sort();
            then.sort();
            if now_items != then {
                return Err(PaymentsError::Changed {
                    message: "its items are not the ones the change was decided against".into(),
                });
            }
        }
        let mut next = current.clone();
        // (before, after) of each item the update touches.
        let mut touched: Vec<(Option<SimItem>, Option<SimItem>)> = Vec::new();
        if let Some(p) = &change.plan {
            let i = next
                .items
                .iter()
                .position(|i| !i.product.starts_with("tally_addon_"))
                .ok_or_else(|| PaymentsError::refused("the subscription has no plan item"))?;
            let old = next.items[i].clone();
            next.items[i] = SimItem {
                price: new_id("price"),
                product: p.product.clone(),
                name: p.product_name.clone(),
                unit_amount: p.unit_amount.get(),
                interval: p.interval,
                ..old.clone()
            };
            touched.push((Some(old), Some(next.items[i].clone())));
        }
        if let Some((quantity, p)) = &change.addons {
            // The adapter names the existing add-on item (whatever its add-on) by its id.
            let found = next
                .items
                .iter()
                .position(|i| i.product.starts_with("tally_addon_"));
            match (found, *quantity) {
                (Some(i), 0) => touched.push((Some(next.items.remove(i)), None)),
                (None, 0) => {}
                (found, q) => {
                    let item = SimItem {
                        id: found.map_or_else(|| new_id("si"), |i| next.items[i].id.clone()),
                        price: new_id("price"),
                        product: p.product.clone(),
                        name: p.product_name.clone(),
                        unit_amount: p.unit_amount.get(),
                        interval: p.interval,
                        quantity: q,
                        created: found.map_or(now, |i| next.items[i].created),
                    };
                    match found {
                        Some(i) => {
                            touched.push((Some(next.items[i].clone()), Some(item.clone())));
                            next.items[i] = item;
                        }
                        None => {
                            touched.push((None, Some(item.clone())));
                            next.items.push(item);
                        }
                    }
                }
            }
        }
        let interval = next.interval();
        if next.items.iter().any(|i| i.interval != interval) {
            return Err(PaymentsError::refused(
                "Currently all prices on a subscription must have the same `recurring.interval` and `recurring.interval_count`.",
            ));
        }
        for (k, v) in &change.metadata {
            if v.is_empty() {
                next.metadata.remove(k);
            } else {
                next.metadata.insert(k.clone(), v.clone());
            }
        }
        if let Some(c) = change.cancel_at_period_end {
            next.cancel_at_period_end = c;
        }
        if let Some(p) = change.pause {
            next.paused = p;
        }
        let old_period = (current.period_start, current.period_end);
        let mut lines = Vec::new();
        let switch = interval != current.interval();
        if switch {
            // A new interval resets the billing cycle anchor to now and bills the new
            // period in full; the old period's unused time is credited when prorating.
            if change.prorate_now {
                for item in current.items.iter().filter(|i| i.quantity > 0) {
                    lines.push(Line::prorated(item, old_period, now, true));
                }
            }
            next.set_cycle(now, 0);
            for item in &next.items {
                lines.push(Line::full(item, (next.period_start, next.period_end)));
            }
        } else if change.prorate_now {
            for (before, after) in &touched {
                if let Some(b) = before.as_ref().filter(|b| b.quantity > 0) {
                    lines.push(Line::prorated(b, old_period, now, true));
                }
                if let Some(a) = after.as_ref().filter(|a| a.quantity > 0) {
                    lines.push(Line::prorated(a, old_period, now, false));
                }
            }
        }
        Ok((next, lines))
    }

    fn apply_update(
        &self,
        change: &SubscriptionChange,
    ) -> Result<(Events, Option<BilledInvoice>), PaymentsError> {
        let now = self.now();
        let mut subs = self.subscriptions.lock().expect("sim lock");
        let current = subs.get(&change.subscription).ok_or_else(|| {
            PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
        })?;
        let (mut next, mut lines) = self.plan_update(current, change, now)?;
        let mut events: Events = Vec::new();
        let mut billed = None;
        if !lines.is_empty() {
            // An invoice made now bills the prorations waiting for one too (listed after
            // the change's own, newest first).
            lines.append(&mut next.pending);
            let total: i64 = lines.iter().map(|l| l.amount).sum();
            let strict = change.prorate_now; // payment_behavior=error_if_incomplete
            if strict && total > 0 && !next.paused && self.declines(&next.customer) {
                return Err(PaymentsError::refused(DECLINED));
            }
            let id: InvoiceId = new_stripe_id("in");
            let inv = invoice_object(
                &self.base_url,
                &id,
                &next.customer,
                now,
                "subscription_update",
                &lines,
                Some(&next),
            );
            events = self.collect(&mut next, inv, now);
            billed = events
                .iter()
                .rev()
                .find(|(_, o)| o["id"] == json!(id))
                .map(|(_, o)| billed_invoice(o));
        }
        let before = current.object();
        let after = next.object();
        if before != after {
            events.insert(0, ("customer.subscription.updated", after));
        }
        subs.insert(next.id.clone(), next);
        Ok((events, billed))
    }
}

/// `customer.subscription.updated` when the subscription's object changed, else nothing.
fn updated(before: Value, after: Value) -> Events {
    if before == after {
        Vec::new()
    } else {
        vec![("customer.subscription.updated", after)]
    }
}

/// An invoice object as the payments port describes it.
fn billed_invoice(inv: &Value) -> BilledInvoice {
    let lines = inv["lines"]["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some(tally::payments::BilledLine {
                product: l["pricing"]["price_details"]["product"]
                    .as_str()?
                    .to_owned(),
                quantity: l["quantity"].as_u64().unwrap_or(1),
                amount: l["amount"].as_i64().unwrap_or_default(),
                period_start: at(l["period"]["start"].as_i64().unwrap_or_default()),
                period_end: at(l["period"]["end"].as_i64().unwrap_or_default()),
                proration: l["parent"]["subscription_item_details"]["proration"] == json!(true),
                description: l["description"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect();
    BilledInvoice {
        id: inv["id"].as_str().and_then(|i| i.parse().ok()),
        lines,
        subtotal: inv["subtotal"].as_i64().unwrap_or_default(),
        tax: 0,
        total: inv["total"].as_i64().unwrap_or_default(),
        amount_paid: tally::money::Cents::new(inv["amount_paid"].as_u64().unwrap_or_default()),
        paid: inv["status"] == "paid",
        // The simulator answers with every line, as the adapter does once it has read them.
        lines_complete: true,
    }
}

/// A simulated charge as Stripe's list and retrieve answer it.
fn charge_fact(c: &Value) -> Option<tally::payments::ChargeFact> {
    Some(tally::payments::ChargeFact {
        id: c["id"].as_str()?.parse().ok()?,
        payment_intent: c["payment_intent"].as_str().and_then(|p| p.parse().ok()),
        customer: c["customer"].as_str().and_then(|p| p.parse().ok()),
        amount: tally::money::Cents::new(c["amount"].as_u64()?),
        amount_refunded: tally::money::Cents::new(c["amount_refunded"].as_u64().unwrap_or(0)),
        currency: c["currency"].as_str().unwrap_or("usd").to_owned(),
        succeeded: c["paid"] == true && c["status"] == "succeeded",
        created: DateTime::from_timestamp(c["created"].as_i64()?, 0)?,
        workspace: c["metadata"]["org_id"]
            .as_str()
            .and_then(|w| WorkspaceId::parse(w).ok()),
    })
}

#[async_trait]
impl Payments for Simulator {
    async fn charges_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        starting_after: Option<&tally::ids::ChargeId>,
    ) -> Result<tally::payments::ChargePage, PaymentsError> {
        let all: Vec<Value> = self
            .charges
            .lock()
            .expect("sim lock")
            .values()
            .cloned()
            .collect();
        let mut rows: Vec<(i64, String, Value)> = all
            .into_iter()
            .filter_map(|c| Some((c["created"].as_i64()?, c["id"].as_str()?.to_owned(), c)))
            .filter(|(t, _, _)| *t >= from.timestamp() && *t < to.timestamp())
            .collect();
        // Stripe lists newest first.
        rows.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
        if let Some(after) = starting_after {
            match rows.iter().position(|(_, id, _)| id == after.as_str()) {
                Some(i) => {
                    rows.drain(..=i);
                }
                None => rows.clear(),
            }
        }
        let has_more = rows.len() > 100;
        rows.truncate(100);
        let charges = rows.iter().filter_map(|(_, _, c)| charge_fact(c)).collect();
        Ok(tally::payments::ChargePage { charges, has_more })
    }

    async fn invoice_lines(
        &self,
        invoice: &InvoiceId,
    ) -> Result<Option<Vec<Value>>, PaymentsError> {
        Ok(self
            .invoice_lines
            .lock()
            .expect("sim lock")
            .get(invoice.as_str())
            .and_then(|l| l.as_array().cloned()))
    }

    async fn charge(
        &self,
        id: &tally::ids::ChargeId,
    ) -> Result<Option<tally::payments::ChargeFact>, PaymentsError> {
        Ok(self.charge(id.as_str()).as_ref().and_then(charge_fact))
    }

    async fn find_refund(
        &self,
        charge: &tally::ids::ChargeId,
        request: &str,
        attempt: u32,
    ) -> Result<Option<tally::payments::RefundMade>, PaymentsError> {
        let Some(c) = self.charge(charge.as_str()) else {
            return Ok(None);
        };
        let attempt = attempt.to_string();
        Ok(c["refunds"]["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| {
                r["metadata"]["refund_request"] == request
                    && r["metadata"]["refund_attempt"] == attempt.as_str()
            })
            .and_then(|r| {
                Some(tally::payments::RefundMade {
                    id: r["id"].as_str()?.parse().ok()?,
                    status: r["status"].as_str().unwrap_or("pending").to_owned(),
                })
            }))
    }

    async fn reissue_invoice(
        &self,
        req: &tally::payments::Reissue,
    ) -> Result<tally::payments::Reissued, PaymentsError> {
        let mut made = self.reissues.lock().await;
        if let Some(r) = made.get(&req.idempotency_key) {
            return Ok(r.clone());
        }
        let original = self
            .invoice(req.invoice.as_str())
            .ok_or_else(|| PaymentsError::refused(format!("No such invoice: '{}'", req.invoice)))?;
        if original["status"] != "paid" {
            return Err(PaymentsError::refused(format!(
                "invoice {} is not paid; only paid invoices are reissued",
                req.invoice
            )));
        }
        if original["post_payment_credit_notes_amount"]
            .as_i64()
            .unwrap_or_default()
            > 0
        {
            return Err(PaymentsError::refused(format!(
                "the credit notes of invoice {} would exceed its amount paid",
                req.invoice
            )));
        }
        {
            let mut details = self.customer_details.lock().expect("sim lock");
            let d = details.entry(req.customer.clone()).or_default();
            if req.details.name.is_some() {
                d.name = req.details.name.clone();
            }
            if req.details.email.is_some() {
                d.email = req.details.email.clone();
            }
            if req.details.address.is_some() {
                d.address = req.details.address.clone();
            }
        }
        let now = self.now();
        let paid = original["amount_paid"].as_i64().unwrap_or_default();
        // As Stripe: credit notes never exceed what the invoice was paid.
        let credited = original["post_payment_credit_notes_amount"]
            .as_i64()
            .unwrap_or_default();
        if credited + paid > paid || paid <= 0 {
            return Err(PaymentsError::refused(format!(
                "the credit notes of invoice {} would exceed its amount paid",
                req.invoice
            )));
        }
        let mut credited_invoice = original.clone();
        credited_invoice["post_payment_credit_notes_amount"] = json!(credited + paid);
        self.store_invoice(&credited_invoice, None);
        let mut note = fixture("credit_note");
        let note_id = new_id("cn");
        note["id"] = json!(note_id);
        note["invoice"] = json!(req.invoice);
        note["customer"] = json!(req.customer);
        note["created"] = json!(now);
        note["effective_at"] = json!(now);
        note["amount"] = json!(paid);
        note["total"] = json!(paid);
        note["subtotal"] = json!(paid);
        note["out_of_band_amount"] = json!(paid);
        note["post_payment_amount"] = json!(paid);
        note["pre_payment_amount"] = json!(0);
        note["type"] = json!("post_payment");
        note["status"] = json!("issued");
        note["memo"] = json!(tally::payments::REISSUE_MEMO);
        note["refunds"] = json!([]);
        self.deliver("credit_note.created", note).await;
        let lines = tally::payments::stripe_api::same_total(
            original["lines"]["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    (
                        l["description"].as_str().unwrap_or_default().to_owned(),
                        l["amount"].as_i64().unwrap_or_default(),
                    )
                })
                .collect(),
            paid,
        );
        let number = original["number"].as_str().unwrap_or(req.invoice.as_str());
        let replacement = self
            .paid_invoice(&tally::payments::PaidInvoice {
                workspace: req.workspace.clone(),
                customer: req.customer.clone(),
                lines,
                description: format!("Corrected invoice replacing {number}"),
                metadata: std::collections::BTreeMap::from([
                    ("kind".to_owned(), "reissue".to_owned()),
                    ("reissue_of".to_owned(), req.invoice.to_string()),
                    ("reissued_by".to_owned(), req.staff.clone()),
                ]),
                idempotency_key: format!("{}-replacement", req.idempotency_key),
            })
            .await?;
        let r = tally::payments::Reissued {
            replacement,
            credit_note: note_id,
        };
        made.insert(req.idempotency_key.clone(), r.clone());
        Ok(r)
    }

    async fn paid_invoice(
        &self,
        req: &tally::payments::PaidInvoice,
    ) -> Result<InvoiceLink, PaymentsError> {
        let link = |id: &InvoiceId| self.invoice_link(id);
        if let Some(id) = self.invoice_by_key(&req.idempotency_key) {
            return self.answer(link(&id));
        }
        let now = self.now();
        let id: InvoiceId = new_stripe_id("in");
        let lines: Vec<Line> = req
            .lines
            .iter()
            .map(|(description, amount)| Line {
                description: description.clone(),
                amount: *amount,
                quantity: 1,
                period: (now, now),
                item: SimItem {
                    id: new_id("ii"),
                    price: new_id("price"),
                    product: new_id("prod"),
                    name: description.clone(),
                    unit_amount: amount.unsigned_abs(),
                    interval: tally::ledger::Interval::Monthly,
                    quantity: 1,
                    created: now,
                },
                proration: false,
            })
            .collect();
        let mut inv = invoice_object(
            &self.base_url,
            &id,
            &req.customer,
            now,
            "manual",
            &lines,
            None,
        );
        invoice_item_lines(&mut inv);
        let mut metadata = json!(req.metadata);
        metadata["org_id"] = json!(req.workspace.to_string());
        inv["metadata"] = metadata;
        inv["description"] = json!(req.description);
        inv["auto_advance"] = json!(false);
        if let Some(d) = self
            .customer_details
            .lock()
            .expect("sim lock")
            .get(&req.customer)
        {
            inv["customer_name"] = json!(d.name);
            inv["customer_email"] = json!(d.email);
            inv["customer_address"] = json!(d.address);
        }
        self.finalize(&mut inv, now);
        let finalized = inv.clone();
        // Paid out of band: marked paid, no charge.
        mark_paid(&mut inv, now);
        inv["paid_out_of_band"] = json!(true);
        self.store_invoice(&inv, Some(req.idempotency_key.clone()));
        self.deliver("invoice.finalized", finalized).await;
        self.deliver("invoice.paid", inv).await;
        self.answer(link(&id))
    }

    async fn refund(
        &self,
        order: &tally::payments::RefundOrder,
    ) -> Result<tally::payments::RefundMade, PaymentsError> {
        let mut made = self.refunds.lock().await;
        let asked = format!("{order:?}");
        let answer = match made.get(&order.idempotency_key) {
            Some((first, _)) if *first != asked => {
                return Err(PaymentsError::refused(IDEMPOTENCY_MISMATCH));
            }
            Some((_, a)) => a.clone(),
            None => {
                let metadata = json!({"org_id": order.workspace.to_string(),
                    "refund_request": order.request, "refund_attempt": order.attempt.to_string()});
                let reason = if order.duplicate {
                    "duplicate"
                } else {
                    "requested_by_customer"
                };
                let a = self
                    .refund_with(
                        order.charge.as_str(),
                        Some(order.amount.get() as i64),
                        metadata,
                        reason,
                    )
                    .await
                    .map_err(|e| match e {
                        disputes::MoneyBackError::NotFound(m)
                        | disputes::MoneyBackError::Invalid(m) => m,
                    });
                made.insert(order.idempotency_key.clone(), (asked, a.clone()));
                a
            }
        };
        let refund = answer.map_err(PaymentsError::refused)?;
        Ok(tally::payments::RefundMade {
            id: refund["id"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|_| PaymentsError::unavailable("refund without an id"))?,
            status: refund["status"].as_str().unwrap_or("pending").to_owned(),
        })
    }

    async fn charge_saved_method(
        &self,
        req: &TopUp,
    ) -> Result<tally::payments::TopUpPayment, PaymentsError> {
        // Stripe answers a repeated idempotency key with the first answer, and refuses it
        // for different parameters.
        let mut made = self.off_session.lock().await;
        let asked = format!(
            "{}|{}|{}|{}|{}|{}",
            req.workspace,
            req.customer,
            req.payment_method,
            req.pack,
            req.credits,
            req.amount.get()
        );
        if let Some((first, answer)) = made.get(&req.idempotency_key) {
            if *first != asked {
                return Err(PaymentsError::refused(IDEMPOTENCY_MISMATCH));
            }
            let answer = answer.clone().map_err(PaymentsError::refused)?;
            return self.answer(tally::payments::TopUpPayment::Succeeded(answer));
        }
        // A card Stripe keeps for no one (entered once on a hosted invoice page) cannot be
        // charged again.
        if req.payment_method.as_str() != card_of(&req.customer) {
            made.insert(
                req.idempotency_key.clone(),
                (asked, Err(NOT_ATTACHED.to_owned())),
            );
            return Err(PaymentsError::refused(NOT_ATTACHED));
        }
        if self.declines(&req.customer) {
            made.insert(
                req.idempotency_key.clone(),
                (asked, Err(DECLINED.to_owned())),
            );
            return Err(PaymentsError::refused(DECLINED));
        }
        let now = self.now();
        let id: PaymentIntentId = new_stripe_id("pi");
        made.insert(req.idempotency_key.clone(), (asked, Ok(id.clone())));
        drop(made);
        let metadata = json!({"org_id": req.workspace.to_string(), "kind": "pack", "pack": req.pack,
            "quantity": "1", "credits": req.credits.to_string(), "topup": "true"});
        let mut intent = fixture("payment_intent");
        intent["id"] = json!(id);
        intent["created"] = json!(now);
        intent["amount"] = json!(req.amount);
        intent["amount_received"] = json!(req.amount);
        intent["customer"] = json!(req.customer);
        intent["payment_method"] = json!(req.payment_method);
        intent["status"] = json!("succeeded");
        intent["metadata"] = metadata.clone();
        let mut charge = charge_object(
            &req.customer,
            req.amount.get() as i64,
            now,
            metadata,
            req.payment_method.as_str(),
            false,
        );
        charge["payment_intent"] = json!(id);
        self.deliver("payment_intent.succeeded", intent).await;
        self.deliver("charge.succeeded", charge).await;
        self.answer(tally::payments::TopUpPayment::Succeeded(id))
    }

    async fn collection(
        &self,
        intent: &PaymentIntentId,
    ) -> Result<tally::payments::Collection, PaymentsError> {
        // Its off-session payments are taken at once.
        let made = self.off_session.lock().await;
        if made
            .values()
            .any(|(_, answer)| answer.as_ref().is_ok_and(|id| id == intent))
        {
            return self.answer(tally::payments::Collection::Taken);
        }
        Err(PaymentsError::refused(format!(
            "404: No such payment_intent: '{intent}'"
        )))
    }

    async fn card_saved_for(
        &self,
        card: &PaymentMethodId,
        customer: &CustomerId,
    ) -> Result<bool, PaymentsError> {
        // One saved card per customer; a card entered on a hosted invoice page is kept
        // for no one.
        self.answer(card.as_str() == card_of(customer))
    }

    async fn create_custom_invoice(
        &self,
        req: &CustomInvoice,
    ) -> Result<InvoiceLink, PaymentsError> {
        let link = |id: &InvoiceId| self.invoice_link(id);
        if let Some(id) = self.invoice_by_key(&req.idempotency_key) {
            return Ok(link(&id));
        }
        // Sent for payment (`collection_method=send_invoice`): Stripe refuses to make it for
        // a customer without an email.
        if self
            .emailless
            .lock()
            .expect("sim lock")
            .contains(&req.customer)
        {
            return Err(PaymentsError::refused(
                "Missing email. In order to create invoices that are sent to the customer, \
                 the customer must have a valid email.",
            ));
        }
        self.customers
            .lock()
            .expect("sim lock")
            .insert(req.customer.clone());
        let now = self.now();
        let id: InvoiceId = new_stripe_id("in");
        let item = SimItem {
            id: new_id("ii"),
            price: new_id("price"),
            product: "tally_custom_payment".into(),
            name: req.description.clone(),
            unit_amount: req.amount.get(),
            interval: tally::ledger::Interval::Monthly,
            quantity: 1,
            created: now,
        };
        let line = Line {
            description: req.description.clone(),
            amount: req.amount.get() as i64,
            quantity: 1,
            period: (now, now),
            item,
            proration: false,
        };
        let mut inv = invoice_object(
            &self.base_url,
            &id,
            &req.customer,
            now,
            "manual",
            &[line],
            None,
        );
        invoice_item_lines(&mut inv);
        inv["lines"]["data"][0]["pricing"]["price_details"]["price"] = Value::Null;
        inv["collection_method"] = json!("send_invoice");
        inv["description"] = json!(req.description);
        inv["due_date"] = json!(now + req.days_until_due as i64 * 86_400);
        inv["metadata"] = json!({"org_id": req.workspace.to_string(), "kind": "custom_payment", "issued_by": req.staff, "credits": req.credits.to_string(), "amount_cents": req.amount.get().to_string()});
        self.finalize(&mut inv, now);
        self.store_invoice(&inv, Some(req.idempotency_key.clone()));
        self.deliver("invoice.finalized", inv).await;
        Ok(link(&id))
    }

    async fn subscription(&self, id: &SubscriptionId) -> Result<LiveSubscription, PaymentsError> {
        self.subscriptions
            .lock()
            .expect("sim lock")
            .get(id)
            .map(SimSubscription::live)
            .ok_or_else(|| PaymentsError::refused(format!("No such subscription: '{id}'")))
    }

    async fn update_subscription(
        &self,
        change: &SubscriptionChange,
    ) -> Result<Option<BilledInvoice>, PaymentsError> {
        if self
            .unreachable_updates
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(PaymentsError::unavailable("could not connect to Stripe"));
        }
        let key = &change.idempotency_key;
        // What Stripe is sent (the expected items are the adapter's own check).
        let asked = format!(
            "{:?}",
            SubscriptionChange {
                expect: None,
                ..change.clone()
            }
        );
        // The same key answers as the first time, as Stripe does, and is refused with
        // other parameters.
        if let Some((first, answer)) = self.updates.lock().expect("sim lock").get(key).cloned()
            && !key.is_empty()
        {
            if first != asked {
                return Err(PaymentsError::refused(IDEMPOTENCY_MISMATCH));
            }
            // A replayed answer can be lost on its way too.
            return answer
                .map_err(PaymentsError::refused)
                .and_then(|a| self.answer(a));
        }
        let result = self.apply_update(change);
        if !key.is_empty()
            && let Ok(_) | Err(PaymentsError::Refused { .. }) = &result
        {
            let answer = match &result {
                Ok((_, billed)) => Ok(billed.clone()),
                Err(e) => Err(e.message().to_owned()),
            };
            self.updates
                .lock()
                .expect("sim lock")
                .insert(key.clone(), (asked, answer));
        }
        let (events, billed) = result?;
        self.deliver_all(events).await;
        self.answer(billed)
    }

    async fn preview_change(
        &self,
        change: &SubscriptionChange,
    ) -> Result<BilledInvoice, PaymentsError> {
        let now = self.now();
        let current = self
            .subscriptions
            .lock()
            .expect("sim lock")
            .get(&change.subscription)
            .cloned()
            .ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
        let (_, mut lines) = self.plan_update(&current, change, now)?;
        if !lines.is_empty() {
            lines.extend(current.pending.iter().cloned());
        }
        let total: i64 = lines.iter().map(|l| l.amount).sum();
        let id: InvoiceId = new_stripe_id("in");
        let mut preview = billed_invoice(&invoice_object(
            &self.base_url,
            &id,
            &current.customer,
            now,
            "subscription_update",
            &lines,
            Some(&current),
        ));
        preview.id = None;
        preview.subtotal = total;
        preview.total = total;
        preview.amount_paid = tally::money::Cents::ZERO;
        preview.paid = false;
        Ok(preview)
    }

    async fn schedule_renewal_change(&self, change: &RenewalChange) -> Result<(), PaymentsError> {
        let events = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let sub = subs.get_mut(&change.subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
            if sub.status == SubStatus::Canceled {
                return Err(PaymentsError::refused(
                    "A canceled subscription cannot be scheduled.",
                ));
            }
            let before = sub.object();
            let id = sub.schedule_id().unwrap_or_else(|| new_id("sub_sched"));
            sub.schedule = Some((id, change.clone()));
            sub.last_phase = None;
            for (k, v) in &change.metadata {
                if v.is_empty() {
                    sub.metadata.remove(k);
                } else {
                    sub.metadata.insert(k.clone(), v.clone());
                }
            }
            updated(before, sub.object())
        };
        self.deliver_all(events).await;
        Ok(())
    }

    async fn cancel_renewal_change(
        &self,
        subscription: &SubscriptionId,
        _key: &str,
    ) -> Result<(), PaymentsError> {
        let events = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let sub = subs.get_mut(subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{subscription}'"))
            })?;
            let attached = sub.schedule.take().is_some() | sub.last_phase.take().is_some();
            if !attached {
                return Ok(());
            }
            for k in tally::subscriptions::meta::SCHEDULED_KEYS {
                sub.metadata.remove(k);
            }
            vec![("customer.subscription.updated", sub.object())]
        };
        self.deliver_all(events).await;
        Ok(())
    }

    async fn create_customer(
        &self,
        workspace: &WorkspaceId,
        email: Option<&str>,
        key: &str,
    ) -> Result<CustomerId, PaymentsError> {
        // Stripe answers a repeated idempotency key with the customer it made, and refuses
        // the key for different parameters.
        let asked = format!("{workspace}|{}", email.unwrap_or_default());
        let mut keys = self.customer_keys.lock().expect("sim lock");
        if let Some((first, id)) = keys.get(key) {
            if *first != asked {
                return Err(PaymentsError::refused(IDEMPOTENCY_MISMATCH));
            }
            return Ok(id.clone());
        }
        let id: CustomerId = new_stripe_id("cus");
        keys.insert(key.to_owned(), (asked, id.clone()));
        self.customers.lock().expect("sim lock").insert(id.clone());
        if email.is_none_or(str::is_empty) {
            self.emailless.lock().expect("sim lock").insert(id.clone());
        }
        Ok(id)
    }

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError> {
        self.customers
            .lock()
            .expect("sim lock")
            .insert(req.customer.clone());
        let mut sessions = self.sessions.lock().expect("sim lock");
        // Same idempotency key, same session, as with Stripe; the key with other
        // parameters is refused.
        if let Some((id, s)) = sessions
            .iter()
            .find(|(_, s)| s.request.idempotency_key == req.idempotency_key)
        {
            if s.request != *req {
                return Err(PaymentsError::refused(IDEMPOTENCY_MISMATCH));
            }
            return Ok(CheckoutLink {
                id: id.clone(),
                url: format!("{}/sim/checkout/{id}", self.base_url),
                expired: !s.paid && self.now() >= s.expires_at,
            });
        }
        let id: CheckoutSessionId = new_stripe_id("cs");
        sessions.insert(
            id.clone(),
            SimSession {
                request: req.clone(),
                paid: false,
                expires_at: self.now() + CHECKOUT_LIFETIME_SECS,
            },
        );
        self.answer(CheckoutLink {
            url: format!("{}/sim/checkout/{id}", self.base_url),
            id,
            expired: false,
        })
    }

    async fn clear_plan_checkouts(
        &self,
        customer: &CustomerId,
        keep: &str,
    ) -> Result<PlanCheckouts, PaymentsError> {
        let now = self.now();
        for s in self.sessions.lock().expect("sim lock").values_mut() {
            let plan = matches!(s.request.purchase, tally::payments::Purchase::Plan { .. });
            if plan
                && s.request.customer == *customer
                && !s.paid
                && now < s.expires_at
                && s.request.idempotency_key != keep
            {
                // Expired now: it can no longer be paid.
                s.expires_at = now;
            }
        }
        Ok(self
            .subscriptions
            .lock()
            .expect("sim lock")
            .iter()
            .find(|(_, sub)| sub.customer == *customer && sub.status != SubStatus::Canceled)
            .map_or(PlanCheckouts::Clear, |(id, _)| {
                PlanCheckouts::Subscribed(id.clone())
            }))
    }

    async fn expire_pack_checkouts(
        &self,
        customer: &CustomerId,
        above_pct: u8,
    ) -> Result<u32, PaymentsError> {
        use std::sync::atomic::Ordering;
        if self
            .unreachable_expiries
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PaymentsError::unavailable("could not connect to Stripe"));
        }
        // Stripe is asked by the discount the session's metadata names; here the request
        // it was made from says the same.
        let now = self.now();
        let mut expired = 0;
        for s in self.sessions.lock().expect("sim lock").values_mut() {
            let priced_above = match &s.request.purchase {
                tally::payments::Purchase::Pack { discount_pct, .. } => *discount_pct > above_pct,
                tally::payments::Purchase::Plan { .. } => false,
            };
            if priced_above && s.request.customer == *customer && !s.paid && now < s.expires_at {
                s.expires_at = now;
                expired += 1;
            }
        }
        Ok(expired)
    }

    async fn billing_portal(
        &self,
        customer: &CustomerId,
        return_url: &str,
        _key: &str,
    ) -> Result<String, PaymentsError> {
        Ok(format!(
            "{}/sim/done?portal={customer}&return={}",
            self.base_url,
            return_url.replace('&', "%26")
        ))
    }
}

/// The instant of a Unix timestamp.
fn at(ts: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(ts, 0).unwrap_or_default()
}
