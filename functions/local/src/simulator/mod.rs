//! Offline stand-in for Stripe, used by the local runner when no `STRIPE_SECRET_KEY` is set.
//!
//! Checkout URLs point to `GET /sim/checkout/{id}`, a page with a Pay button. Paying builds
//! the events Stripe would send (from Stripe's own example objects), signs them with the
//! webhook secret exactly as Stripe does, and delivers them to `POST /webhooks/stripe`, so
//! they take the same path as real deliveries: signature check, billing queue, worker.
//! `GET /sim/events` lists every delivered event; `POST /sim/events/{id}/redeliver` sends
//! one again (with a fresh signature) to see duplicates handled.
//!
//! It lives in the local runner rather than in `tally` so that no Lambda binary carries it.
//! The Stripe-shaped objects it sends are built in `objects`, its pages served by `pages`.

mod objects;
mod pages;

pub use objects::stripe_signature;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use chrono::{Duration, Utc};
use objects::{SimSubscription, fixture, new_id, new_stripe_id};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tally::ids::{
    CheckoutSessionId, CustomerId, InvoiceId, PaymentIntentId, SubscriptionId, WorkspaceId,
};
use tally::money::Cents;
use tally::payments::{
    BilledInvoice, CheckoutLink, CheckoutRequest, CustomInvoice, InvoiceLink, LiveSubscription,
    Payments, PaymentsError, Purchase, RenewalChange, SubscriptionChange, TopUp,
};
use tower::ServiceExt;

#[derive(Debug, Clone)]
struct SimSession {
    request: CheckoutRequest,
    paid: bool,
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

pub struct Simulator {
    base_url: String,
    secret: String,
    webhook: Router,
    sessions: Mutex<HashMap<CheckoutSessionId, SimSession>>,
    subscriptions: Mutex<HashMap<SubscriptionId, SimSubscription>>,
    invoices: Mutex<HashMap<InvoiceId, (CustomInvoice, Value)>>,
    events: Mutex<Vec<SimEvent>>,
}

impl Simulator {
    /// `base_url` is where the local runner serves `/sim`; `webhook` is the router that
    /// serves `POST /webhooks/stripe`.
    pub fn new(base_url: &str, secret: &str, webhook: Router) -> Arc<Self> {
        Arc::new(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            secret: secret.to_owned(),
            webhook,
            sessions: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            invoices: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
        })
    }

    pub fn events(&self) -> Vec<SimEvent> {
        self.events.lock().expect("sim lock").clone()
    }

    async fn deliver(&self, kind: &str, object: Value) -> SimEvent {
        let created = Utc::now().timestamp();
        let mut e = fixture("event");
        e["id"] = json!(new_id("evt"));
        e["type"] = json!(kind);
        e["created"] = json!(created);
        e["livemode"] = json!(false);
        e["data"] = json!({"object": object});
        let status = self.post_signed(&e).await;
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

    async fn post_signed(&self, event: &Value) -> u16 {
        let payload = event.to_string();
        let signature = stripe_signature(&payload, &self.secret, Utc::now().timestamp());
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

    /// Plays Stripe's side of a completed checkout. Paying twice delivers nothing new.
    pub async fn complete(&self, session_id: &str) -> Option<String> {
        let request = {
            let mut sessions = self.sessions.lock().expect("sim lock");
            let s = sessions.get_mut(session_id)?;
            if s.paid {
                return Some(s.request.success_url.clone());
            }
            s.paid = true;
            s.request.clone()
        };
        let now = Utc::now().timestamp();
        let ws = request.workspace.to_string();
        let customer = request.customer.clone();
        let meta = tally::payments::stripe_api::checkout_metadata(&request);
        let mut session = fixture("checkout.session");
        session["id"] = json!(session_id);
        session["customer"] = json!(customer);
        session["client_reference_id"] = json!(ws);
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["metadata"] = json!(meta);
        session["success_url"] = json!(request.success_url);
        session["cancel_url"] = json!(request.cancel_url);
        session["url"] = Value::Null;
        let mut charge = fixture("charge");
        charge["id"] = json!(new_id("ch"));
        charge["customer"] = json!(customer);
        charge["created"] = json!(now);
        charge["metadata"] = json!({"org_id": ws});
        charge["amount_refunded"] = json!(0);
        // A workspace id may hold characters a Stripe id may not ('-', '.', ':').
        let workspace_part: String = request
            .workspace
            .as_str()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        charge["payment_method"] = json!(format!("pm_sim_{workspace_part}"));
        charge["refunded"] = json!(false);
        charge["refunds"] =
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"});
        match &request.purchase {
            Purchase::Pack {
                quantity,
                unit_amount,
                ..
            } => {
                let amount = quantity * unit_amount.get();
                session["mode"] = json!("payment");
                session["amount_total"] = json!(amount);
                session["amount_subtotal"] = json!(amount);
                session["subscription"] = Value::Null;
                charge["amount"] = json!(amount);
                charge["amount_captured"] = json!(amount);
                self.deliver("charge.succeeded", charge).await;
                self.deliver("checkout.session.completed", session).await;
            }
            Purchase::Plan {
                plan,
                interval,
                unit_amount,
                ..
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
                    interval: *interval,
                    unit_amount: unit_amount.get(),
                    addon_units: 0,
                    addon_unit_amount: 0,
                    period_start: now,
                    period_end: now,
                    cancel_at_period_end: false,
                    paused: false,
                    plan_product: tally::payments::stripe_api::product_id("plan", plan),
                    addon_product: None,
                    next: None,
                    latest_invoice: None,
                };
                sub.period_end = now + Duration::days(sub.days()).num_seconds();
                self.subscriptions
                    .lock()
                    .expect("sim lock")
                    .insert(sub.id.clone(), sub.clone());
                let open = sub.invoice(
                    &self.base_url,
                    "subscription_create",
                    unit_amount.get(),
                    false,
                );
                sub.latest_invoice = open["id"].as_str().map(str::to_owned);
                self.subscriptions
                    .lock()
                    .expect("sim lock")
                    .insert(sub.id.clone(), sub.clone());
                let mut paid = open.clone();
                paid["status"] = json!("paid");
                paid["amount_paid"] = json!(unit_amount);
                paid["amount_remaining"] = json!(0);
                paid["status_transitions"]["paid_at"] = json!(now);
                session["mode"] = json!("subscription");
                session["subscription"] = json!(sub.id);
                session["invoice"] = paid["id"].clone();
                session["amount_total"] = json!(unit_amount);
                charge["amount"] = json!(unit_amount);
                charge["amount_captured"] = json!(unit_amount);
                self.deliver("customer.subscription.created", sub.object())
                    .await;
                self.deliver("invoice.finalized", open).await;
                self.deliver("invoice.paid", paid).await;
                self.deliver("charge.succeeded", charge).await;
                self.deliver("checkout.session.completed", session).await;
            }
        }
        Some(request.success_url)
    }
}

impl Simulator {
    /// Plays a renewal: the next period starts and its invoice is paid.
    pub async fn renew(&self, subscription: &str) -> bool {
        let sub = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let Some(sub) = subs.get_mut(subscription) else {
                return false;
            };
            if let Some(next) = sub.next.take() {
                // The schedule's next phase starts: its prices from this renewal on.
                sub.unit_amount = next.plan.unit_amount.get();
                sub.interval = next.plan.interval;
                sub.plan_product = next.plan.product.clone();
                sub.addon_units = next.addons.0;
                sub.addon_unit_amount = next.addons.1.unit_amount.get();
                sub.addon_product = (next.addons.0 > 0).then(|| next.addons.1.product.clone());
                for (k, v) in &next.next_metadata {
                    sub.metadata.insert(k.clone(), v.clone());
                }
                for k in tally::subscriptions::meta::SCHEDULED_KEYS {
                    sub.metadata.remove(k);
                }
                if let Some(plan) = next.plan.product.strip_prefix("tally_plan_") {
                    sub.metadata.insert("plan".into(), plan.into());
                }
                sub.metadata
                    .insert("interval".into(), next.plan.interval.as_str().into());
                sub.metadata
                    .insert("addon_units".into(), next.addons.0.to_string());
            }
            let length = Duration::days(sub.days()).num_seconds();
            sub.period_start = sub.period_end;
            sub.period_end += length;
            sub.clone()
        };
        let amount = sub.unit_amount + sub.addon_units * sub.addon_unit_amount;
        let invoice = sub.invoice(&self.base_url, "subscription_cycle", amount, true);
        self.deliver("customer.subscription.updated", sub.object())
            .await;
        self.deliver("invoice.paid", invoice).await;
        true
    }
}

impl Simulator {
    /// Pays a custom-payment invoice (once; paying again delivers nothing new).
    pub async fn pay_invoice(&self, id: &str) -> bool {
        let invoice = {
            let mut invoices = self.invoices.lock().expect("sim lock");
            let Some((_, inv)) = invoices.get_mut(id) else {
                return false;
            };
            if inv["status"] == "paid" {
                return true;
            }
            let now = Utc::now().timestamp();
            inv["status"] = json!("paid");
            inv["amount_paid"] = inv["amount_due"].clone();
            inv["amount_remaining"] = json!(0);
            inv["status_transitions"]["paid_at"] = json!(now);
            inv.clone()
        };
        self.deliver("invoice.paid", invoice).await;
        true
    }
}

#[async_trait]
impl Payments for Simulator {
    async fn charge_saved_method(&self, req: &TopUp) -> Result<PaymentIntentId, PaymentsError> {
        let id: PaymentIntentId = new_stripe_id("pi");
        let metadata = json!({"org_id": req.workspace.to_string(), "kind": "pack", "pack": req.pack,
            "quantity": "1", "topup": "true"});
        let mut intent = fixture("payment_intent");
        intent["id"] = json!(id);
        intent["amount"] = json!(req.amount);
        intent["amount_received"] = json!(req.amount);
        intent["customer"] = json!(req.customer);
        intent["payment_method"] = json!(req.payment_method);
        intent["status"] = json!("succeeded");
        intent["metadata"] = metadata.clone();
        let mut charge = fixture("charge");
        charge["id"] = json!(new_id("ch"));
        charge["customer"] = json!(req.customer);
        charge["amount"] = json!(req.amount);
        charge["amount_captured"] = json!(req.amount);
        charge["amount_refunded"] = json!(0);
        charge["payment_intent"] = json!(id);
        charge["payment_method"] = json!(req.payment_method);
        charge["created"] = json!(Utc::now().timestamp());
        charge["metadata"] = metadata;
        charge["refunds"] =
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"});
        self.deliver("payment_intent.succeeded", intent).await;
        self.deliver("charge.succeeded", charge).await;
        Ok(id)
    }

    async fn create_custom_invoice(
        &self,
        req: &CustomInvoice,
    ) -> Result<InvoiceLink, PaymentsError> {
        if let Some((id, _)) = self
            .invoices
            .lock()
            .expect("sim lock")
            .iter()
            .find(|(_, (r, _))| r.idempotency_key == req.idempotency_key)
        {
            return Ok(InvoiceLink {
                id: id.clone(),
                hosted_invoice_url: format!("{}/sim/invoices/{id}", self.base_url),
            });
        }
        let id: InvoiceId = new_stripe_id("in");
        let mut inv = fixture("invoice");
        inv["id"] = json!(id);
        inv["customer"] = json!(req.customer);
        inv["billing_reason"] = json!("manual");
        inv["collection_method"] = json!("send_invoice");
        inv["created"] = json!(Utc::now().timestamp());
        inv["currency"] = json!("usd");
        inv["description"] = json!(req.description);
        inv["metadata"] = json!({"org_id": req.workspace.to_string(), "kind": "custom_payment", "credits": req.credits.to_string()});
        let text = id.as_str();
        inv["number"] = json!(format!("SIM-{}", &text[text.len() - 6..]));
        inv["hosted_invoice_url"] = json!(format!("{}/sim/invoices/{id}", self.base_url));
        inv["invoice_pdf"] = json!(format!("{}/sim/invoices/{id}.pdf", self.base_url));
        inv["parent"] = Value::Null;
        inv["lines"]["data"][0]["amount"] = json!(req.amount);
        inv["lines"]["data"][0]["period"] =
            json!({"start": Utc::now().timestamp(), "end": Utc::now().timestamp()});
        for k in ["amount_due", "total", "subtotal", "amount_remaining"] {
            inv[k] = json!(req.amount);
        }
        inv["amount_paid"] = json!(0);
        inv["status"] = json!("open");
        inv["status_transitions"]["paid_at"] = Value::Null;
        self.invoices
            .lock()
            .expect("sim lock")
            .insert(id.clone(), (req.clone(), inv.clone()));
        self.deliver("invoice.finalized", inv).await;
        Ok(InvoiceLink {
            hosted_invoice_url: format!("{}/sim/invoices/{id}", self.base_url),
            id,
        })
    }

    async fn subscription(&self, id: &SubscriptionId) -> Result<LiveSubscription, PaymentsError> {
        let subs = self.subscriptions.lock().expect("sim lock");
        let sub = subs
            .get(id)
            .ok_or_else(|| PaymentsError::refused(format!("No such subscription: '{id}'")))?;
        Ok(sub.live())
    }

    async fn update_subscription(
        &self,
        change: &SubscriptionChange,
    ) -> Result<Option<BilledInvoice>, PaymentsError> {
        let now = Utc::now().timestamp();
        let (sub, lines) = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let sub = subs.get_mut(&change.subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
            let lines = sub.apply(change, now);
            (sub.clone(), lines)
        };
        let mut billed = None;
        let invoice = (change.prorate_now && !lines.is_empty())
            .then(|| sub.change_invoice(&self.base_url, &lines));
        if let Some(inv) = &invoice {
            let id = inv["id"].as_str().unwrap_or_default().to_owned();
            if let Some(s) = self
                .subscriptions
                .lock()
                .expect("sim lock")
                .get_mut(&change.subscription)
            {
                s.latest_invoice = Some(id.clone());
            }
            billed = Some(BilledInvoice {
                id: id.parse().ok(),
                lines: lines.iter().map(|l| l.billed()).collect(),
                subtotal: inv["subtotal"].as_i64().unwrap_or_default(),
                tax: 0,
                total: inv["total"].as_i64().unwrap_or_default(),
                amount_paid: Cents::new(inv["amount_paid"].as_u64().unwrap_or_default()),
                paid: inv["status"] == "paid",
            });
        }
        self.deliver("customer.subscription.updated", sub.object())
            .await;
        if let Some(inv) = invoice {
            self.deliver("invoice.paid", inv).await;
        }
        Ok(billed)
    }

    async fn preview_change(
        &self,
        change: &SubscriptionChange,
    ) -> Result<BilledInvoice, PaymentsError> {
        let mut sub = self
            .subscriptions
            .lock()
            .expect("sim lock")
            .get(&change.subscription)
            .cloned()
            .ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
        let lines = sub.apply(change, Utc::now().timestamp());
        let total: i64 = lines.iter().map(|l| l.amount).sum();
        Ok(BilledInvoice {
            id: None,
            lines: lines.iter().map(|l| l.billed()).collect(),
            subtotal: total,
            tax: 0,
            total,
            amount_paid: Cents::ZERO,
            paid: false,
        })
    }

    async fn schedule_renewal_change(&self, change: &RenewalChange) -> Result<(), PaymentsError> {
        let sub = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let sub = subs.get_mut(&change.subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{}'", change.subscription))
            })?;
            sub.next = Some(change.clone());
            for (k, v) in &change.metadata {
                if v.is_empty() {
                    sub.metadata.remove(k);
                } else {
                    sub.metadata.insert(k.clone(), v.clone());
                }
            }
            sub.clone()
        };
        self.deliver("customer.subscription.updated", sub.object())
            .await;
        Ok(())
    }

    async fn cancel_renewal_change(
        &self,
        subscription: &SubscriptionId,
        _key: &str,
    ) -> Result<(), PaymentsError> {
        let sub = {
            let mut subs = self.subscriptions.lock().expect("sim lock");
            let sub = subs.get_mut(subscription).ok_or_else(|| {
                PaymentsError::refused(format!("No such subscription: '{subscription}'"))
            })?;
            if sub.next.take().is_none() {
                return Ok(());
            }
            for k in tally::subscriptions::meta::SCHEDULED_KEYS {
                sub.metadata.remove(k);
            }
            sub.clone()
        };
        self.deliver("customer.subscription.updated", sub.object())
            .await;
        Ok(())
    }

    async fn create_customer(
        &self,
        _workspace: &WorkspaceId,
        _email: Option<&str>,
        _key: &str,
    ) -> Result<CustomerId, PaymentsError> {
        Ok(new_stripe_id("cus"))
    }

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError> {
        let mut sessions = self.sessions.lock().expect("sim lock");
        // Same idempotency key, same session, as with Stripe.
        if let Some((id, _)) = sessions
            .iter()
            .find(|(_, s)| s.request.idempotency_key == req.idempotency_key)
        {
            return Ok(CheckoutLink {
                id: id.clone(),
                url: format!("{}/sim/checkout/{id}", self.base_url),
            });
        }
        let id: CheckoutSessionId = new_stripe_id("cs");
        sessions.insert(
            id.clone(),
            SimSession {
                request: req.clone(),
                paid: false,
            },
        );
        Ok(CheckoutLink {
            url: format!("{}/sim/checkout/{id}", self.base_url),
            id,
        })
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
