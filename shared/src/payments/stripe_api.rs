//! Stripe API adapter on async-stripe's client: our exact form parameters, Stripe's own
//! response types, and a Stripe idempotency key on every mutating call.

use super::*;
use crate::ids::IdError;
use ::stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::str::FromStr;
use stripe_client_core::{RequestBuilder, StripeMethod};

/// An id Stripe answered with, checked like any Stripe id Tally keeps. One that does not
/// parse means the answer is not what Stripe sends, treated like an answer without an id.
fn returned<T: FromStr<Err = IdError>>(id: &str) -> Result<T, PaymentsError> {
    id.parse().map_err(|e: IdError| {
        PaymentsError::unavailable(format!("Stripe answered with a bad id: {e}"))
    })
}

/// The fields of a Stripe charge that reconciliation reads.
#[derive(miniserde::Deserialize)]
struct ChargeRow {
    id: String,
    amount: i64,
    amount_refunded: i64,
    currency: String,
    paid: bool,
    status: String,
    created: i64,
    payment_intent: Option<String>,
    customer: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

impl ChargeRow {
    fn fact(self) -> Result<ChargeFact, PaymentsError> {
        let cents = |v: i64| {
            u64::try_from(v)
                .map(Cents::new)
                .map_err(|_| PaymentsError::unavailable("Stripe answered a negative amount"))
        };
        Ok(ChargeFact {
            id: returned(&self.id)?,
            payment_intent: self.payment_intent.as_deref().map(returned).transpose()?,
            customer: self.customer.as_deref().map(returned).transpose()?,
            amount: cents(self.amount)?,
            amount_refunded: cents(self.amount_refunded)?,
            currency: self.currency,
            succeeded: self.paid && self.status == "succeeded",
            created: DateTime::from_timestamp(self.created, 0)
                .ok_or_else(|| PaymentsError::unavailable("Stripe answered a bad created time"))?,
            workspace: self
                .metadata
                .as_ref()
                .and_then(|m| m.get("org_id"))
                .and_then(|w| WorkspaceId::parse(w).ok()),
        })
    }
}

pub struct StripePayments {
    client: Client,
}

/// How long one request to Stripe may take before it counts as failed: inside the HTTP
/// functions' 10 s (purchases, which chains several, has 29 s). Every request carries an idempotency key, so one that timed out after
/// Stripe acted is answered with the same result when it is sent again.
pub const STRIPE_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7);

impl StripePayments {
    /// A client for Stripe's API, or for another base URL (tests point it at a fake).
    pub fn new(secret_key: &str, base_url: Option<&str>) -> Result<Self, PaymentsError> {
        Self::with_timeout(secret_key, base_url, STRIPE_ATTEMPT_TIMEOUT)
    }

    /// Like [`new`](Self::new), with another limit on each request.
    pub fn with_timeout(
        secret_key: &str,
        base_url: Option<&str>,
        timeout: std::time::Duration,
    ) -> Result<Self, PaymentsError> {
        let mut builder = ClientBuilder::new(secret_key)
            .app_info("tally", None, None)
            .timeout(timeout);
        if let Some(url) = base_url {
            builder = builder.url(url);
        }
        let client = builder.build().map_err(|e| {
            PaymentsError::refused(format!("Stripe client configuration: {e}")).caused_by(e)
        })?;
        Ok(Self { client })
    }

    async fn post<F: Serialize, T: miniserde::Deserialize>(
        &self,
        path: &str,
        form: &F,
        key: &str,
    ) -> Result<T, PaymentsError> {
        let key = IdempotencyKey::new(stripe_key(key))
            .map_err(|e| PaymentsError::refused(format!("idempotency key: {e}")).caused_by(e))?;
        RequestBuilder::new(StripeMethod::Post, path)
            .form(form)
            .customize::<T>()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(classify)
    }
}

/// Stripe takes idempotency keys of at most 255 characters. Ours are derived from the
/// workspace and the caller's own key (each up to a few hundred characters), plus a step
/// suffix: a longer one is sent as its SHA-256, the same for the same key, so retries stay
/// idempotent and no valid request is refused for its length.
pub fn stripe_key(key: &str) -> String {
    const STRIPE_MAX: usize = 255;
    if key.len() <= STRIPE_MAX {
        return key.to_owned();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("tally-sha256-{hex}")
}

/// Pages of an invoice's lines read (100 each).
const MAX_LINE_PAGES: usize = 10;

/// Pages of open checkout sessions read before a plan checkout (100 each).
const MAX_SESSION_PAGES: usize = 20;

/// A short digest of `s` (the first 16 hex digits of its SHA-256), for idempotency keys
/// that must differ when a parameter does.
pub fn short_digest(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Client errors are refusals: the same request will be refused again (a declined card,
/// an invalid parameter). What may pass is not: rate limits (429), a request with the same
/// idempotency key still in progress (409), a service Stripe depends on failing (424),
/// server errors, failures to reach Stripe or read its answer, and a key Stripe does not
/// take (401: revoked or rolled; 403: a restricted key without the permission), which is
/// the deployment's to mend, never the customer's card's fault.
fn classify(e: StripeError) -> PaymentsError {
    match &e {
        StripeError::Stripe(err, status)
            if *status < 500 && !matches!(status, 401 | 403 | 409 | 424 | 429) =>
        {
            let message = format!("{status}: {}", err.message.as_deref().unwrap_or_default());
            PaymentsError::refused(message).caused_by(e)
        }
        StripeError::Stripe(err, status) if matches!(status, 401 | 403) => {
            let message = format!("{status}: {}", err.message.as_deref().unwrap_or_default());
            PaymentsError::unavailable(message).caused_by(e)
        }
        other => PaymentsError::unavailable(other.to_string()).caused_by(e),
    }
}

#[derive(Serialize)]
struct RefundForm<'a> {
    charge: &'a str,
    amount: u64,
    reason: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct CustomerForm<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct ProductData<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct RecurringForm {
    interval: &'static str,
}

#[derive(Serialize)]
struct PriceData<'a> {
    currency: &'static str,
    unit_amount: u64,
    /// Tally's own product (plans: so every door that changes the subscription later
    /// names the same catalog item).
    #[serde(skip_serializing_if = "Option::is_none")]
    product: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    product_data: Option<ProductData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recurring: Option<RecurringForm>,
}

#[derive(Serialize)]
struct LineItem<'a> {
    price_data: PriceData<'a>,
    quantity: u64,
}

#[derive(Serialize)]
struct Enabled {
    enabled: bool,
}

#[derive(Serialize)]
struct CustomerUpdate {
    address: &'static str,
}

#[derive(Serialize)]
struct WithMetadata<'a> {
    metadata: BTreeMap<&'a str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    setup_future_usage: Option<&'static str>,
}

#[derive(Serialize)]
struct CheckoutForm<'a> {
    mode: &'static str,
    customer: &'a str,
    client_reference_id: &'a str,
    success_url: &'a str,
    cancel_url: &'a str,
    line_items: Vec<LineItem<'a>>,
    metadata: BTreeMap<&'a str, String>,
    automatic_tax: Enabled,
    customer_update: CustomerUpdate,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_data: Option<WithMetadata<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_intent_data: Option<WithMetadata<'a>>,
    /// One-off payments get an invoice (with its PDF) once paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    invoice_creation: Option<InvoiceCreation<'a>>,
}

#[derive(Serialize)]
struct InvoiceCreation<'a> {
    enabled: bool,
    invoice_data: InvoiceData<'a>,
}

#[derive(Serialize)]
struct InvoiceData<'a> {
    metadata: BTreeMap<&'a str, String>,
}

/// The Stripe mode a secret or restricted key belongs to: `Some(true)` for live
/// (`sk_live_`, `rk_live_`), `Some(false)` for test (`sk_test_`, `rk_test_`), `None` for
/// anything else (a local stand-in).
pub fn key_livemode(key: &str) -> Option<bool> {
    match key.get(..8) {
        Some("sk_live_" | "rk_live_") => Some(true),
        Some("sk_test_" | "rk_test_") => Some(false),
        _ => None,
    }
}

/// Session metadata: the plan's pack discount a pack checkout is priced with, in percent
/// (absent without one).
pub const PACK_DISCOUNT_KEY: &str = "pack_discount_pct";

/// A session Stripe answers that was made this long before the request is the answer
/// Stripe saved for the idempotency key (its body as it was then, `open`): its state now
/// is read.
const REPLAYED_AFTER_SECS: i64 = 60;

/// The metadata every checkout carries so Stripe's events name the workspace and the
/// purchase without any lookup.
pub fn checkout_metadata(req: &CheckoutRequest) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::from([("org_id", req.workspace.to_string())]);
    match &req.purchase {
        Purchase::Plan { plan, interval, .. } => {
            m.insert("kind", "plan".into());
            m.insert("plan", plan.clone());
            m.insert(
                "interval",
                match interval {
                    Interval::Monthly => "monthly",
                    Interval::Yearly => "yearly",
                }
                .into(),
            );
        }
        Purchase::Pack {
            pack,
            quantity,
            credits,
            discount_pct,
            ..
        } => {
            m.insert("kind", "pack".into());
            m.insert("pack", pack.clone());
            m.insert("quantity", quantity.to_string());
            // The credits sold with each pack: what the payment grants, whatever the
            // catalog says by the time it is paid.
            m.insert("credits", credits.to_string());
            if *discount_pct > 0 {
                // What the session is priced at: it is expired if the plan stops giving it.
                m.insert(PACK_DISCOUNT_KEY, discount_pct.to_string());
            }
        }
    }
    m
}

pub use crate::subscriptions::paid::product_id;

/// An open checkout session as listed.
#[derive(miniserde::Deserialize)]
struct SessionRow {
    id: String,
    mode: Option<String>,
    status: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// How a session asked to expire ended.
#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    Expired,
    /// Expired before this request (by Stripe, or by an earlier request).
    WasExpired,
    Paid,
}

impl StripePayments {
    /// Every line of `invoice`, page by page, each as Stripe's JSON (see
    /// [`Payments::invoice_lines`]); `None`: Stripe has no such invoice. More than
    /// [`MAX_LINE_PAGES`] pages is an error: a caller must not value part of an invoice as
    /// all of it.
    async fn all_lines(&self, invoice: &str) -> Result<Option<Vec<String>>, PaymentsError> {
        use miniserde::json::Value;
        #[derive(miniserde::Deserialize)]
        struct Lines {
            data: Vec<Value>,
            has_more: bool,
        }
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for page in 0.. {
            if page == MAX_LINE_PAGES {
                return Err(PaymentsError::unavailable(format!(
                    "invoice {invoice} has more than {} lines",
                    MAX_LINE_PAGES * 100
                )));
            }
            let mut path = format!("/invoices/{invoice}/lines?limit=100");
            if let Some(a) = &after {
                path.push_str(&format!("&starting_after={a}"));
            }
            let lines: Lines = match self.get(&path).await {
                Ok(l) => l,
                Err(PaymentsError::Refused { message, .. }) if message.starts_with("404:") => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            after = match lines.data.last() {
                Some(Value::Object(line)) => match line.get("id") {
                    Some(Value::String(id)) => Some(id.clone()),
                    _ => None,
                },
                _ => None,
            };
            if lines.has_more && after.is_none() {
                // A page to go on from without a line to go on after: never take part of
                // the lines for all of them.
                return Err(PaymentsError::unavailable(format!(
                    "Stripe listed more lines of invoice {invoice} after a page without a line id"
                )));
            }
            all.extend(lines.data.iter().map(miniserde::json::to_string));
            if !lines.has_more {
                break;
            }
        }
        Ok(Some(all))
    }

    /// `inv`'s lines, all of them: those it carries, or, when it says there are more, the
    /// invoice's whole line list.
    async fn whole_lines(
        &self,
        inv: &stripe_shared::Invoice,
    ) -> Result<Vec<stripe_shared::InvoiceLineItem>, PaymentsError> {
        if !inv.lines.has_more {
            return Ok(inv.lines.data.clone());
        }
        let id = inv.id.as_ref().ok_or_else(|| {
            PaymentsError::unavailable("Stripe answered an invoice without an id")
        })?;
        self.all_lines(id.as_str())
            .await?
            .ok_or_else(|| {
                PaymentsError::unavailable(format!("Stripe has no lines of invoice {id}"))
            })?
            .iter()
            .map(|l| {
                miniserde::json::from_str(l).map_err(|_| {
                    PaymentsError::unavailable(format!(
                        "Stripe answered an unreadable line of invoice {id}"
                    ))
                })
            })
            .collect()
    }

    /// Every open checkout session of `customer`, page by page (newest first). More than
    /// [`MAX_SESSION_PAGES`] pages is an error: a caller must not take a partial list for
    /// all of them.
    async fn open_sessions(&self, customer: &CustomerId) -> Result<Vec<SessionRow>, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct Sessions {
            data: Vec<SessionRow>,
            has_more: bool,
        }
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for page in 0.. {
            if page == MAX_SESSION_PAGES {
                return Err(PaymentsError::unavailable(format!(
                    "customer {customer} has more than {} open checkout sessions",
                    MAX_SESSION_PAGES * 100
                )));
            }
            let mut path = format!("/checkout/sessions?customer={customer}&status=open&limit=100");
            if let Some(a) = &after {
                path.push_str(&format!("&starting_after={a}"));
            }
            let open: Sessions = self.get(&path).await?;
            after = open.data.last().map(|s| s.id.clone());
            let more = open.has_more && after.is_some();
            all.extend(open.data);
            if !more {
                break;
            }
        }
        Ok(all)
    }

    /// Expires an open session. Stripe expires only an open one: one paid meanwhile is
    /// complete, one expired meanwhile stays so.
    async fn expire_session(&self, id: &str, key: &str) -> Result<SessionEnd, PaymentsError> {
        let asked: Result<SessionRow, _> = self
            .post(&format!("/checkout/sessions/{id}/expire"), &NoForm {}, key)
            .await;
        let Err(e) = asked else {
            return Ok(SessionEnd::Expired);
        };
        let now: SessionRow = self.get(&format!("/checkout/sessions/{id}")).await?;
        match now.status.as_deref() {
            Some("complete") => Ok(SessionEnd::Paid),
            Some("expired") => Ok(SessionEnd::WasExpired),
            _ => Err(e),
        }
    }

    async fn get<T: miniserde::Deserialize>(&self, path: &str) -> Result<T, PaymentsError> {
        RequestBuilder::new(StripeMethod::Get, path)
            .customize::<T>()
            .send(&self.client)
            .await
            .map_err(classify)
    }

    /// Adds the custom payment's line to its draft invoice, finalizes it and sends it.
    async fn issue_custom_invoice(
        &self,
        req: &CustomInvoice,
        id: &InvoiceId,
    ) -> Result<InvoiceLink, PaymentsError> {
        let key = &req.idempotency_key;
        // Stripe answers a retry under the same key with what it answered first: an
        // invoice voided since, after a failure, is not one to send the customer to.
        let now: stripe_shared::Invoice = self.get(&format!("/invoices/{id}")).await?;
        if now.status == Some(stripe_shared::InvoiceStatus::Void) {
            return Err(PaymentsError::refused(format!(
                "invoice {id} was voided after an earlier attempt failed; retry with a new Idempotency-Key"
            )));
        }
        #[derive(miniserde::Deserialize)]
        struct Created {
            #[allow(dead_code)]
            id: String,
        }
        let _: Created = self
            .post(
                "/invoiceitems",
                &InvoiceItemForm {
                    customer: req.customer.as_str(),
                    invoice: id.as_str(),
                    amount: req.amount.get(),
                    currency: "usd",
                    description: &req.description,
                },
                &format!("{key}-item"),
            )
            .await?;
        // Finalized explicitly, with Stripe's collection (reminders, due date) from then on.
        let _: stripe_shared::Invoice = self
            .post(
                &format!("/invoices/{id}/finalize"),
                &AutoAdvance { auto_advance: true },
                &format!("{key}-finalize"),
            )
            .await?;
        let sent: stripe_shared::Invoice = self.invoice_step(id, "send", key).await?;
        Ok(InvoiceLink {
            id: id.clone(),
            hosted_invoice_url: sent.hosted_invoice_url.unwrap_or_default(),
        })
    }

    /// Leaves a custom payment's invoice unpayable after a failed request: voided when
    /// open, kept from finalizing while a draft. A failure here is logged for a person.
    async fn leave_unpayable(&self, id: &InvoiceId, key: &str) {
        #[derive(miniserde::Deserialize)]
        struct Left {
            #[allow(dead_code)]
            id: String,
        }
        let left = match self
            .get::<stripe_shared::Invoice>(&format!("/invoices/{id}"))
            .await
        {
            Ok(i) => match i.status {
                Some(stripe_shared::InvoiceStatus::Open) => {
                    self.invoice_step::<Left>(id, "void", key).await.map(|_| ())
                }
                Some(stripe_shared::InvoiceStatus::Draft) => self
                    .post::<_, Left>(
                        &format!("/invoices/{id}"),
                        &AutoAdvance {
                            auto_advance: false,
                        },
                        &format!("{key}-hold"),
                    )
                    .await
                    .map(|_| ()),
                _ => Ok(()),
            },
            Err(e) => Err(e),
        };
        if let Err(v) = left {
            tracing::error!(invoice = %id, error = %v, "a custom payment invoice left by a failed request may still be payable: void it in the dashboard");
        }
    }

    /// One step of an invoice's life (`finalize`, `send`, `void`), under the request's key
    /// with the step's name after it.
    async fn invoice_step<T: miniserde::Deserialize>(
        &self,
        id: &InvoiceId,
        step: &str,
        key: &str,
    ) -> Result<T, PaymentsError> {
        self.post(
            &format!("/invoices/{id}/{step}"),
            &NoForm {},
            &format!("{key}-{step}"),
        )
        .await
    }

    /// A POST that changes nothing (previews): no idempotency key needed.
    async fn post_unkeyed<F: Serialize, T: miniserde::Deserialize>(
        &self,
        path: &str,
        form: &F,
    ) -> Result<T, PaymentsError> {
        RequestBuilder::new(StripeMethod::Post, path)
            .form(form)
            .customize::<T>()
            .send(&self.client)
            .await
            .map_err(classify)
    }

    /// Sets (or, with empty values, removes) subscription metadata.
    async fn set_metadata(
        &self,
        sub: &SubscriptionId,
        metadata: &BTreeMap<String, String>,
        key: &str,
    ) -> Result<(), PaymentsError> {
        #[derive(Serialize)]
        struct MetadataForm<'a> {
            metadata: BTreeMap<&'a str, &'a str>,
        }
        if metadata.is_empty() {
            return Ok(());
        }
        let _: stripe_shared::Subscription = self
            .post(
                &format!("/subscriptions/{sub}"),
                &MetadataForm {
                    metadata: metadata
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                },
                key,
            )
            .await?;
        Ok(())
    }

    /// The item parameters of a change: the plan item re-priced, the one add-on item
    /// re-priced (whatever add-on it was: moving between individual and team plans swaps
    /// it), added or removed.
    async fn item_forms(
        &self,
        current: &stripe_shared::Subscription,
        change: &SubscriptionChange,
    ) -> Result<Vec<ItemForm>, PaymentsError> {
        let product_of =
            |item: &stripe_shared::SubscriptionItem| item.price.product.id().to_string();
        let addon_item = current
            .items
            .data
            .iter()
            .find(|i| product_of(i).starts_with(crate::subscriptions::paid::ADDON_PRODUCT))
            .map(|i| i.id.to_string());
        let plan_item = current
            .items
            .data
            .iter()
            .find(|i| !product_of(i).starts_with(crate::subscriptions::paid::ADDON_PRODUCT))
            .map(|i| i.id.to_string());
        let mut items = Vec::new();
        if let Some(price) = &change.plan {
            self.ensure_product(price).await?;
            items.push(ItemForm {
                id: Some(
                    plan_item.ok_or_else(|| {
                        PaymentsError::refused("the subscription has no plan item")
                    })?,
                ),
                price_data: Some(price_data(price)),
                ..ItemForm::default()
            });
        }
        if let Some((quantity, price)) = &change.addons {
            match (addon_item, quantity) {
                (Some(id), 0) => items.push(ItemForm {
                    id: Some(id),
                    deleted: Some(true),
                    ..ItemForm::default()
                }),
                (None, 0) => {}
                (id, q) => {
                    self.ensure_product(price).await?;
                    items.push(ItemForm {
                        id,
                        price_data: Some(price_data(price)),
                        quantity: Some(*q),
                        ..ItemForm::default()
                    });
                }
            }
        }
        Ok(items)
    }

    /// Creates Tally's product for a price once; "already exists" is success.
    async fn ensure_product(&self, price: &ItemPrice) -> Result<(), PaymentsError> {
        #[derive(Serialize)]
        struct ProductForm<'a> {
            id: &'a str,
            name: &'a str,
        }
        let created: Result<stripe_shared::Product, _> = self
            .post(
                "/products",
                &ProductForm {
                    id: &price.product,
                    name: &price.product_name,
                },
                &format!("tally-product-{}", price.product),
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(PaymentsError::Refused { message, .. }) if message.contains("already exists") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[derive(Serialize)]
struct ItemPriceData {
    currency: &'static str,
    product: String,
    unit_amount: u64,
    recurring: RecurringForm,
}

#[derive(Serialize, Default)]
struct ItemForm {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_data: Option<ItemPriceData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum PauseForm {
    Pause { behavior: &'static str },
    Resume(&'static str),
}

#[derive(Serialize)]
struct SubscriptionForm<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    items: Vec<ItemForm>,
    proration_behavior: &'static str,
    /// With prorations invoiced now: refuse the update unless the invoice is paid, so no
    /// credits are granted for an unpaid upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_behavior: Option<&'static str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel_at_period_end: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_collection: Option<PauseForm>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    expand: Vec<&'static str>,
}

/// The lines of a replacement invoice: the original's, and one more for whatever else
/// made up what was paid (tax, discounts, lines beyond the first page), so the replacement
/// totals exactly what the original payment paid.
pub fn same_total(mut lines: Vec<(String, i64)>, paid: i64) -> Vec<(String, i64)> {
    let listed: i64 = lines.iter().map(|(_, a)| a).sum();
    if listed != paid {
        lines.push(("Tax and adjustments".to_owned(), paid - listed));
    }
    lines
}

fn interval_form(i: Interval) -> RecurringForm {
    RecurringForm {
        interval: match i {
            Interval::Monthly => "month",
            Interval::Yearly => "year",
        },
    }
}

fn price_data(p: &ItemPrice) -> ItemPriceData {
    ItemPriceData {
        currency: "usd",
        product: p.product.clone(),
        unit_amount: p.unit_amount.get(),
        recurring: interval_form(p.interval),
    }
}

/// The part of a subscription schedule the adapter reads back: its id.
#[derive(miniserde::Deserialize)]
struct ScheduleRef {
    id: String,
}

#[derive(Serialize)]
struct PhaseItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_data: Option<ItemPriceData>,
    quantity: u64,
}

fn ts(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// The current period, from the items (where Stripe keeps it since 2025).
fn item_period(sub: &stripe_shared::Subscription) -> Result<(i64, i64), PaymentsError> {
    let item = sub
        .items
        .data
        .first()
        .ok_or_else(|| PaymentsError::unavailable("subscription without items"))?;
    Ok((item.current_period_start, item.current_period_end))
}

fn interval_of(recurring: Option<&stripe_shared::Recurring>) -> Interval {
    match recurring.map(|r| r.interval.as_str()) {
        Some("year") => Interval::Yearly,
        _ => Interval::Monthly,
    }
}

/// A subscription as the port describes it.
fn live(sub: &stripe_shared::Subscription) -> Result<LiveSubscription, PaymentsError> {
    let (start, end) = item_period(sub)?;
    let items = sub
        .items
        .data
        .iter()
        .map(|i| {
            Ok(LiveItem {
                id: i.id.to_string(),
                price: i.price.id.to_string(),
                product: i.price.product.id().to_string(),
                unit_amount: Cents::try_from(i.price.unit_amount.unwrap_or(0)).map_err(|_| {
                    PaymentsError::unavailable("Stripe answered with a negative price")
                })?,
                interval: interval_of(i.price.recurring.as_ref()),
                quantity: i.quantity.unwrap_or(1),
            })
        })
        .collect::<Result<Vec<_>, PaymentsError>>()?;
    Ok(LiveSubscription {
        id: returned(sub.id.as_str())?,
        customer: returned(sub.customer.id().as_str())?,
        status: sub.status.as_str().to_owned(),
        paused: sub.pause_collection.is_some(),
        cancel_at_period_end: sub.cancel_at_period_end,
        period_start: ts(start),
        period_end: ts(end),
        items,
        schedule: sub.schedule.as_ref().map(|s| s.id().to_string()),
        metadata: sub
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// An invoice as the port describes it.
fn billed(
    inv: &stripe_shared::Invoice,
    lines: &[stripe_shared::InvoiceLineItem],
    lines_complete: bool,
) -> Result<BilledInvoice, PaymentsError> {
    let lines = lines
        .iter()
        .filter_map(|l| {
            let product = l.pricing.as_ref()?.price_details.as_ref()?.product.clone();
            let proration = l.parent.as_ref().is_some_and(|p| {
                p.subscription_item_details
                    .as_ref()
                    .map(|d| d.proration)
                    .or(p.invoice_item_details.as_ref().map(|d| d.proration))
                    .unwrap_or(false)
            });
            Some(BilledLine {
                product,
                quantity: l.quantity.unwrap_or(1),
                amount: l.amount,
                period_start: ts(l.period.start),
                period_end: ts(l.period.end),
                proration,
                description: l.description.clone().unwrap_or_default(),
            })
        })
        .collect();
    let tax = inv
        .total_taxes
        .as_ref()
        .map_or(0, |t| t.iter().map(|t| t.amount).sum());
    Ok(BilledInvoice {
        id: inv.id.as_ref().map(|i| returned(i.as_str())).transpose()?,
        lines,
        subtotal: inv.subtotal,
        tax,
        total: inv.total,
        amount_paid: Cents::try_from(inv.amount_paid)
            .map_err(|_| PaymentsError::unavailable("Stripe answered with a negative payment"))?,
        paid: inv.status.as_ref().map(|s| s.as_str()) == Some("paid"),
        lines_complete,
    })
}

#[derive(Serialize)]
struct InvoiceForm<'a> {
    customer: &'a str,
    collection_method: &'static str,
    days_until_due: u32,
    description: &'a str,
    auto_advance: bool,
    metadata: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct InvoiceItemForm<'a> {
    customer: &'a str,
    invoice: &'a str,
    amount: u64,
    currency: &'static str,
    description: &'a str,
}

#[derive(Serialize)]
struct NoForm {}

#[derive(Serialize)]
struct AutoAdvance {
    auto_advance: bool,
}

#[derive(Serialize)]
struct PaidInvoiceForm<'a> {
    customer: &'a str,
    collection_method: &'static str,
    auto_advance: bool,
    pending_invoice_items_behavior: &'static str,
    description: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct LineItemForm<'a> {
    customer: &'a str,
    invoice: &'a str,
    amount: i64,
    currency: &'static str,
    description: &'a str,
}

#[derive(Serialize)]
struct PayForm {
    paid_out_of_band: bool,
}

#[derive(Serialize)]
struct CustomerDetailsForm<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a Address>,
}

#[derive(Serialize)]
struct CreditNoteLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    unit_amount: u64,
    quantity: u64,
    description: &'a str,
}

#[derive(Serialize)]
struct CreditNoteForm<'a> {
    invoice: &'a str,
    lines: Vec<CreditNoteLine<'a>>,
    out_of_band_amount: u64,
    memo: &'a str,
}

#[derive(Serialize)]
struct PaymentIntentForm<'a> {
    amount: u64,
    currency: &'static str,
    customer: &'a str,
    payment_method: &'a str,
    /// The saved card only: without it Stripe would offer every method enabled in the
    /// dashboard, some of which need a redirect, and refuse to confirm without a
    /// `return_url`; a card is charged (or refused) at once, never left `processing`.
    payment_method_types: [&'static str; 1],
    off_session: bool,
    confirm: bool,
    description: String,
    metadata: BTreeMap<&'static str, String>,
}

#[async_trait]
impl Payments for StripePayments {
    async fn charges_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        starting_after: Option<&ChargeId>,
    ) -> Result<ChargePage, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct Charges {
            data: Vec<ChargeRow>,
            has_more: bool,
        }
        let mut path = format!(
            "/charges?created%5Bgte%5D={}&created%5Blt%5D={}&limit=100",
            from.timestamp(),
            to.timestamp()
        );
        if let Some(after) = starting_after {
            path.push_str(&format!("&starting_after={after}"));
        }
        let list: Charges = self.get(&path).await?;
        let charges = list
            .data
            .into_iter()
            .map(ChargeRow::fact)
            .collect::<Result<Vec<_>, PaymentsError>>()?;
        Ok(ChargePage {
            charges,
            has_more: list.has_more,
        })
    }

    async fn invoice_lines(
        &self,
        invoice: &InvoiceId,
    ) -> Result<Option<Vec<serde_json::Value>>, PaymentsError> {
        let Some(lines) = self.all_lines(invoice.as_str()).await? else {
            return Ok(None);
        };
        lines
            .iter()
            .map(|l| {
                serde_json::from_str(l).map_err(|_| {
                    PaymentsError::unavailable(format!(
                        "Stripe answered an unreadable line of invoice {invoice}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    async fn charge(&self, id: &ChargeId) -> Result<Option<ChargeFact>, PaymentsError> {
        match self.get::<ChargeRow>(&format!("/charges/{id}")).await {
            Ok(row) => row.fact().map(Some),
            // Stripe answers a charge it does not have with a 404 `resource_missing`; any
            // other refusal (a key without access) is an error, not an absence.
            Err(PaymentsError::Refused { message, .. }) if message.starts_with("404:") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn charge_saved_method(&self, req: &TopUp) -> Result<TopUpPayment, PaymentsError> {
        let intent: stripe_shared::PaymentIntent = self
            .post(
                "/payment_intents",
                &PaymentIntentForm {
                    amount: req.amount.get(),
                    currency: "usd",
                    customer: req.customer.as_str(),
                    payment_method: req.payment_method.as_str(),
                    payment_method_types: ["card"],
                    off_session: true,
                    confirm: true,
                    description: format!("Auto top-up: {}", req.pack),
                    metadata: BTreeMap::from([
                        ("org_id", req.workspace.to_string()),
                        ("kind", "pack".to_string()),
                        ("pack", req.pack.clone()),
                        ("quantity", "1".to_string()),
                        ("credits", req.credits.to_string()),
                        ("topup", "true".to_string()),
                    ]),
                },
                &req.idempotency_key,
            )
            .await?;
        // Taken, or still being collected (its card not refused; its credits follow
        // Stripe's payment events). Anything else (an authentication asked for, a method
        // to replace) was not paid: the top-up is refused.
        use stripe_shared::PaymentIntentStatus as Status;
        match intent.status {
            Status::Succeeded => returned(intent.id.as_str()).map(TopUpPayment::Succeeded),
            Status::Processing => returned(intent.id.as_str()).map(TopUpPayment::Processing),
            status => Err(PaymentsError::refused(format!(
                "payment intent {} is {status} (not succeeded)",
                intent.id.as_str(),
            ))),
        }
    }

    async fn collection(&self, intent: &PaymentIntentId) -> Result<Collection, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct Intent {
            status: String,
            last_payment_error: Option<LastError>,
        }
        #[derive(miniserde::Deserialize)]
        struct LastError {
            message: Option<String>,
        }
        let pi: Intent = self.get(&format!("/payment_intents/{intent}")).await?;
        Ok(match pi.status.as_str() {
            "succeeded" => Collection::Taken,
            "processing" => Collection::Processing,
            status => Collection::Failed(
                pi.last_payment_error
                    .and_then(|e| e.message)
                    .unwrap_or_else(|| format!("payment intent {intent} is {status}")),
            ),
        })
    }

    async fn card_saved_for(
        &self,
        card: &PaymentMethodId,
        customer: &CustomerId,
    ) -> Result<bool, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct Attached {
            customer: Option<String>,
        }
        match self
            .get::<Attached>(&format!("/payment_methods/{card}"))
            .await
        {
            Ok(pm) => Ok(pm.customer.as_deref() == Some(customer.as_str())),
            // A payment method Stripe does not have (deleted) is not kept for anyone.
            Err(PaymentsError::Refused { message, .. }) if message.starts_with("404:") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create_custom_invoice(
        &self,
        req: &CustomInvoice,
    ) -> Result<InvoiceLink, PaymentsError> {
        let key = &req.idempotency_key;
        let invoice: stripe_shared::Invoice = self
            .post(
                "/invoices",
                &InvoiceForm {
                    customer: req.customer.as_str(),
                    collection_method: "send_invoice",
                    days_until_due: req.days_until_due,
                    description: &req.description,
                    // A draft left behind by a request stopped before it finished (the
                    // function's timeout) is never finalized and sent by Stripe on its
                    // own: only this request's explicit finalize makes it payable.
                    auto_advance: false,
                    metadata: BTreeMap::from([
                        ("org_id", req.workspace.to_string()),
                        ("kind", "custom_payment".to_string()),
                        ("issued_by", req.staff.clone()),
                        ("credits", req.credits.to_string()),
                        ("amount_cents", req.amount.get().to_string()),
                    ]),
                },
                &format!("{key}-invoice"),
            )
            .await?;
        let id: InvoiceId = returned(
            invoice
                .id
                .as_ref()
                .ok_or_else(|| PaymentsError::unavailable("invoice without an id"))?
                .as_str(),
        )?;
        match self.issue_custom_invoice(req, &id).await {
            Ok(link) => Ok(link),
            // Whatever failed, the invoice left behind must not be payable beside the one
            // a retry under a new key makes: an open one is voided, a draft is kept from
            // finalizing (one an earlier release made with `auto_advance`; a retry under
            // the same key may still finalize it explicitly). A retry under the same key that Stripe
            // answers from its records with the voided invoice is refused (see
            // `issue_custom_invoice`).
            Err(e) => {
                self.leave_unpayable(&id, key).await;
                Err(e)
            }
        }
    }

    async fn subscription(&self, id: &SubscriptionId) -> Result<LiveSubscription, PaymentsError> {
        let sub: stripe_shared::Subscription = self.get(&format!("/subscriptions/{id}")).await?;
        live(&sub)
    }

    async fn update_subscription(
        &self,
        change: &SubscriptionChange,
    ) -> Result<Option<BilledInvoice>, PaymentsError> {
        let current: stripe_shared::Subscription = self
            .get(&format!("/subscriptions/{}", change.subscription))
            .await?;
        if let Some(expected) = &change.expect {
            let key = |i: &LiveItem| {
                (
                    i.product.clone(),
                    i.quantity,
                    i.unit_amount,
                    i.interval.as_str(),
                )
            };
            let mut now: Vec<_> = live(&current)?.items.iter().map(key).collect();
            let mut then: Vec<_> = expected.iter().map(key).collect();
            now.sort();
            then.sort();
            if now != then {
                return Err(PaymentsError::Changed {
                    message: "its items are not the ones the change was decided against".into(),
                });
            }
        }
        let before = current
            .latest_invoice
            .as_ref()
            .and_then(|i| i.id().as_ref().map(ToString::to_string));
        let items = self.item_forms(&current, change).await?;
        let form = SubscriptionForm {
            items,
            proration_behavior: if change.prorate_now {
                "always_invoice"
            } else {
                "none"
            },
            payment_behavior: change.prorate_now.then_some("error_if_incomplete"),
            metadata: change
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            cancel_at_period_end: change.cancel_at_period_end,
            pause_collection: change.pause.map(|p| {
                if p {
                    PauseForm::Pause { behavior: "void" }
                } else {
                    PauseForm::Resume("")
                }
            }),
            expand: if change.prorate_now {
                vec!["latest_invoice"]
            } else {
                Vec::new()
            },
        };
        let updated: stripe_shared::Subscription = self
            .post(
                &format!("/subscriptions/{}", change.subscription),
                &form,
                &change.idempotency_key,
            )
            .await?;
        // The invoice this update created, if any: a new latest invoice for the update.
        let invoice = match updated.latest_invoice.as_ref().and_then(|i| i.as_object()) {
            Some(inv)
                if inv.id.as_ref().map(|i| i.to_string()) != before
                    && inv.billing_reason.as_ref().map(|r| r.as_str())
                        == Some("subscription_update") =>
            {
                // The change is made and paid: lines that cannot be read now are no reason
                // to answer an error (the request would undo what it kept for the renewal).
                // Its invoice's event grants on all of them instead.
                match self.whole_lines(inv).await {
                    Ok(lines) => Some(billed(inv, &lines, true)?),
                    Err(e) => {
                        tracing::warn!(error = %e, invoice = ?inv.id.as_ref().map(|i| i.as_str()),
                            "lines of a change's invoice not read; its event grants");
                        Some(billed(inv, &inv.lines.data, false)?)
                    }
                }
            }
            _ => None,
        };
        Ok(invoice)
    }

    async fn preview_change(
        &self,
        change: &SubscriptionChange,
    ) -> Result<BilledInvoice, PaymentsError> {
        let current: stripe_shared::Subscription = self
            .get(&format!("/subscriptions/{}", change.subscription))
            .await?;
        let items = self.item_forms(&current, change).await?;
        #[derive(Serialize)]
        struct Details {
            items: Vec<ItemForm>,
            proration_behavior: &'static str,
        }
        #[derive(Serialize)]
        struct PreviewForm<'a> {
            customer: String,
            subscription: &'a str,
            subscription_details: Details,
            automatic_tax: Enabled,
        }
        let preview: stripe_shared::Invoice = self
            .post_unkeyed(
                "/invoices/create_preview",
                &PreviewForm {
                    customer: current.customer.id().to_string(),
                    subscription: change.subscription.as_str(),
                    subscription_details: Details {
                        items,
                        proration_behavior: if change.prorate_now {
                            "always_invoice"
                        } else {
                            "none"
                        },
                    },
                    automatic_tax: Enabled { enabled: true },
                },
            )
            .await?;
        // A preview has no id to read more lines by: it shows the first ten.
        billed(&preview, &preview.lines.data, !preview.lines.has_more)
    }

    async fn schedule_renewal_change(&self, change: &RenewalChange) -> Result<(), PaymentsError> {
        let current: stripe_shared::Subscription = self
            .get(&format!("/subscriptions/{}", change.subscription))
            .await?;
        let key = &change.idempotency_key;
        let schedule = match current.schedule.as_ref() {
            Some(s) => s.id().to_string(),
            None => {
                #[derive(Serialize)]
                struct FromSubscription<'a> {
                    from_subscription: &'a str,
                }
                let created: ScheduleRef = self
                    .post(
                        "/subscription_schedules",
                        &FromSubscription {
                            from_subscription: change.subscription.as_str(),
                        },
                        &format!("{key}-schedule"),
                    )
                    .await?;
                created.id
            }
        };
        self.ensure_product(&change.plan).await?;
        let (units, addon) = &change.addons;
        if *units > 0 {
            self.ensure_product(addon).await?;
        }
        // Today's items at today's amounts: price data rather than the price ids, since
        // prices created inline by earlier updates are inactive and schedules refuse them.
        let today: Vec<PhaseItem> = live(&current)?
            .items
            .iter()
            .map(|i| PhaseItem {
                price: None,
                price_data: Some(ItemPriceData {
                    currency: "usd",
                    product: i.product.clone(),
                    unit_amount: i.unit_amount.get(),
                    recurring: interval_form(i.interval),
                }),
                quantity: i.quantity,
            })
            .collect();
        let mut next = vec![PhaseItem {
            price: None,
            price_data: Some(price_data(&change.plan)),
            quantity: 1,
        }];
        if *units > 0 {
            next.push(PhaseItem {
                price: None,
                price_data: Some(price_data(addon)),
                quantity: *units,
            });
        }
        let (start, end) = item_period(&current)?;
        let mut form = BTreeMap::from([
            ("end_behavior".to_string(), "release".to_string()),
            ("proration_behavior".to_string(), "none".to_string()),
            ("phases[0][start_date]".to_string(), start.to_string()),
            ("phases[0][end_date]".to_string(), end.to_string()),
        ]);
        for (phase, items) in [(0, &today), (1, &next)] {
            for (n, item) in items.iter().enumerate() {
                let at = format!("phases[{phase}][items][{n}]");
                form.insert(format!("{at}[quantity]"), item.quantity.to_string());
                if let Some(price) = &item.price {
                    form.insert(format!("{at}[price]"), price.clone());
                }
                if let Some(p) = &item.price_data {
                    form.insert(format!("{at}[price_data][currency]"), p.currency.into());
                    form.insert(format!("{at}[price_data][product]"), p.product.clone());
                    form.insert(
                        format!("{at}[price_data][unit_amount]"),
                        p.unit_amount.to_string(),
                    );
                    form.insert(
                        format!("{at}[price_data][recurring][interval]"),
                        p.recurring.interval.into(),
                    );
                }
            }
        }
        for (k, v) in &change.next_metadata {
            if !v.is_empty() {
                form.insert(format!("phases[1][metadata][{k}]"), v.clone());
            }
        }
        let _: ScheduleRef = self
            .post(
                &format!("/subscription_schedules/{schedule}"),
                &form,
                &format!("{key}-phases"),
            )
            .await?;
        self.set_metadata(
            &change.subscription,
            &change.metadata,
            &format!("{key}-metadata"),
        )
        .await
    }

    async fn cancel_renewal_change(
        &self,
        subscription: &SubscriptionId,
        idempotency_key: &str,
    ) -> Result<(), PaymentsError> {
        let current: stripe_shared::Subscription =
            self.get(&format!("/subscriptions/{subscription}")).await?;
        if let Some(schedule) = current.schedule.as_ref() {
            let _: ScheduleRef = self
                .post(
                    &format!("/subscription_schedules/{}/release", schedule.id()),
                    &NoForm {},
                    idempotency_key,
                )
                .await?;
        }
        let cleared = crate::subscriptions::meta::SCHEDULED_KEYS
            .iter()
            .map(|k| (k.to_string(), String::new()))
            .collect();
        self.set_metadata(
            subscription,
            &cleared,
            &format!("{idempotency_key}-metadata"),
        )
        .await
    }

    async fn reissue_invoice(&self, req: &Reissue) -> Result<Reissued, PaymentsError> {
        let key = &req.idempotency_key;
        #[derive(miniserde::Deserialize)]
        struct Created {
            id: String,
        }
        // A balance would be applied to the replacement: refused before anything is made.
        let customer: stripe_shared::Customer =
            self.get(&format!("/customers/{}", req.customer)).await?;
        if let Some(balance) = customer.balance.filter(|b| *b != 0) {
            return Err(PaymentsError::refused(format!(
                "customer {} has a balance of {balance} cents, which a replacement invoice would apply; reissue it by hand",
                req.customer
            )));
        }
        let d = &req.details;
        let _: Created = self
            .post(
                &format!("/customers/{}", req.customer),
                &CustomerDetailsForm {
                    name: d.name.as_deref(),
                    email: d.email.as_deref(),
                    address: d.address.as_ref(),
                },
                &format!("{key}-customer"),
            )
            .await?;
        let original: stripe_shared::Invoice =
            self.get(&format!("/invoices/{}", req.invoice)).await?;
        if original.status != Some(stripe_shared::InvoiceStatus::Paid) {
            return Err(PaymentsError::refused(format!(
                "invoice {} is not paid; only paid invoices are reissued",
                req.invoice
            )));
        }
        let paid = u64::try_from(original.amount_paid).unwrap_or(0);
        let number = original
            .number
            .clone()
            .unwrap_or_else(|| req.invoice.to_string());
        let memo = super::REISSUE_MEMO;
        let note: Created = self
            .post(
                "/credit_notes",
                &CreditNoteForm {
                    invoice: req.invoice.as_str(),
                    lines: vec![CreditNoteLine {
                        kind: "custom_line_item",
                        unit_amount: paid,
                        quantity: 1,
                        description: "Reissued with corrected billing details",
                    }],
                    out_of_band_amount: paid,
                    memo,
                },
                &format!("{key}-credit-note"),
            )
            .await?;
        let lines = same_total(
            self.whole_lines(&original)
                .await?
                .iter()
                .map(|l| (l.description.clone().unwrap_or_default(), l.amount))
                .collect(),
            original.amount_paid,
        );
        let replacement = self
            .paid_invoice(&PaidInvoice {
                workspace: req.workspace.clone(),
                customer: req.customer.clone(),
                lines,
                description: format!("Corrected invoice replacing {number}"),
                metadata: std::collections::BTreeMap::from([
                    ("kind".to_owned(), "reissue".to_owned()),
                    ("reissue_of".to_owned(), req.invoice.to_string()),
                    ("reissued_by".to_owned(), req.staff.clone()),
                ]),
                idempotency_key: format!("{key}-replacement"),
            })
            .await?;
        Ok(Reissued {
            replacement,
            credit_note: note.id,
        })
    }

    async fn paid_invoice(&self, req: &PaidInvoice) -> Result<InvoiceLink, PaymentsError> {
        let key = &req.idempotency_key;
        // Finalizing applies the customer's balance to an invoice: a credit the customer
        // is owed would be used up by a payment already made. Such an invoice is left to a
        // person.
        let customer: stripe_shared::Customer =
            self.get(&format!("/customers/{}", req.customer)).await?;
        if let Some(balance) = customer.balance.filter(|b| *b != 0) {
            return Err(PaymentsError::refused(format!(
                "customer {} has a balance of {balance} cents, which an invoice would apply; issue this one by hand",
                req.customer
            )));
        }
        let mut metadata: BTreeMap<&str, &str> = req
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        metadata.insert("org_id", req.workspace.as_str());
        let invoice: stripe_shared::Invoice = self
            .post(
                "/invoices",
                &PaidInvoiceForm {
                    customer: req.customer.as_str(),
                    collection_method: "charge_automatically",
                    auto_advance: false,
                    pending_invoice_items_behavior: "exclude",
                    description: &req.description,
                    metadata,
                },
                &format!("{key}-invoice"),
            )
            .await?;
        let id: InvoiceId = returned(
            invoice
                .id
                .as_ref()
                .ok_or_else(|| PaymentsError::unavailable("invoice without an id"))?
                .as_str(),
        )?;
        #[derive(miniserde::Deserialize)]
        struct Created {
            #[allow(dead_code)]
            id: String,
        }
        for (n, (description, amount)) in req.lines.iter().enumerate() {
            let _: Created = self
                .post(
                    "/invoiceitems",
                    &LineItemForm {
                        customer: req.customer.as_str(),
                        invoice: id.as_str(),
                        amount: *amount,
                        currency: "usd",
                        description,
                    },
                    &format!("{key}-item-{n}"),
                )
                .await?;
        }
        let _: stripe_shared::Invoice = self.invoice_step(&id, "finalize", key).await?;
        let paid: stripe_shared::Invoice = match self
            .post(
                &format!("/invoices/{id}/pay"),
                &PayForm {
                    paid_out_of_band: true,
                },
                &format!("{key}-pay"),
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                // Never leave an open invoice for money already received: it could be paid
                // a second time from its page.
                let voided: Result<stripe_shared::Invoice, _> =
                    self.invoice_step(&id, "void", key).await;
                if let Err(v) = voided {
                    tracing::error!(invoice = %id, error = %v, "an open receipt invoice could not be voided");
                }
                return Err(e);
            }
        };
        Ok(InvoiceLink {
            id,
            hosted_invoice_url: paid.hosted_invoice_url.unwrap_or_default(),
        })
    }

    async fn find_refund(
        &self,
        charge: &ChargeId,
        request: &str,
        attempt: u32,
    ) -> Result<Option<RefundMade>, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct Refunds {
            data: Vec<stripe_shared::Refund>,
        }
        // A charge has a handful of refunds at most; the first hundred are all of them.
        let list: Refunds = self
            .get(&format!("/refunds?charge={charge}&limit=100"))
            .await?;
        let attempt = attempt.to_string();
        list.data
            .into_iter()
            .find(|r| {
                r.metadata.as_ref().is_some_and(|m| {
                    m.get("refund_request").map(String::as_str) == Some(request)
                        && m.get("refund_attempt") == Some(&attempt)
                })
            })
            .map(|r| {
                Ok(RefundMade {
                    id: returned(r.id.as_str())?,
                    status: r.status.unwrap_or_else(|| "pending".into()),
                })
            })
            .transpose()
    }

    async fn refund(&self, order: &RefundOrder) -> Result<RefundMade, PaymentsError> {
        let attempt = order.attempt.to_string();
        let form = RefundForm {
            charge: order.charge.as_str(),
            amount: order.amount.get(),
            reason: if order.duplicate {
                "duplicate"
            } else {
                "requested_by_customer"
            },
            metadata: BTreeMap::from([
                ("org_id", order.workspace.as_str()),
                ("refund_request", order.request.as_str()),
                ("refund_attempt", attempt.as_str()),
            ]),
        };
        let refund: stripe_shared::Refund =
            self.post("/refunds", &form, &order.idempotency_key).await?;
        Ok(RefundMade {
            id: returned(refund.id.as_str())?,
            status: refund.status.unwrap_or_else(|| "pending".into()),
        })
    }

    async fn create_customer(
        &self,
        workspace: &WorkspaceId,
        email: Option<&str>,
        idempotency_key: &str,
    ) -> Result<CustomerId, PaymentsError> {
        let form = CustomerForm {
            email,
            metadata: BTreeMap::from([("org_id", workspace.as_str())]),
        };
        let customer: stripe_shared::Customer =
            self.post("/customers", &form, idempotency_key).await?;
        returned(customer.id.as_str())
    }

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError> {
        let metadata = checkout_metadata(req);
        let (mode, line) = match &req.purchase {
            Purchase::Plan {
                plan,
                name,
                interval,
                unit_amount,
            } => {
                let price = ItemPrice {
                    product: product_id("plan", plan),
                    product_name: name.clone(),
                    unit_amount: *unit_amount,
                    interval: *interval,
                };
                self.ensure_product(&price).await?;
                (
                    "subscription",
                    LineItem {
                        price_data: PriceData {
                            currency: "usd",
                            unit_amount: unit_amount.get(),
                            product: Some(price.product),
                            product_data: None,
                            recurring: Some(interval_form(*interval)),
                        },
                        quantity: 1,
                    },
                )
            }
            Purchase::Pack {
                name,
                quantity,
                unit_amount,
                ..
            } => (
                "payment",
                LineItem {
                    price_data: PriceData {
                        currency: "usd",
                        unit_amount: unit_amount.get(),
                        product: None,
                        product_data: Some(ProductData { name }),
                        recurring: None,
                    },
                    quantity: *quantity,
                },
            ),
        };
        let subscription = mode == "subscription";
        // A plan checkout names the request it was made for, so making way for another one
        // keeps a retry's own session (see `clear_plan_checkouts`).
        let mut session_metadata = metadata.clone();
        if subscription {
            session_metadata.insert(CHECKOUT_REQUEST_KEY, stripe_key(&req.idempotency_key));
        }
        let form = CheckoutForm {
            mode,
            customer: req.customer.as_str(),
            client_reference_id: req.workspace.as_str(),
            success_url: &req.success_url,
            cancel_url: &req.cancel_url,
            line_items: vec![line],
            metadata: session_metadata,
            automatic_tax: Enabled { enabled: true },
            customer_update: CustomerUpdate { address: "auto" },
            subscription_data: subscription.then(|| WithMetadata {
                metadata: {
                    let mut m = metadata.clone();
                    m.remove("kind");
                    m.insert("addon_units", "0".into());
                    m
                },
                setup_future_usage: None,
            }),
            payment_intent_data: (!subscription).then(|| WithMetadata {
                metadata: metadata.clone(),
                // Saves the card so an opted-in auto top-up can charge it later.
                setup_future_usage: Some("off_session"),
            }),
            // The invoice documents the payment; its credits come from the session.
            invoice_creation: (!subscription).then(|| InvoiceCreation {
                enabled: true,
                invoice_data: InvoiceData {
                    metadata: metadata.clone(),
                },
            }),
        };
        let session: stripe_shared::CheckoutSession = self
            .post("/checkout/sessions", &form, &req.idempotency_key)
            .await?;
        let url = session
            .url
            .ok_or_else(|| PaymentsError::unavailable("checkout session without a URL"))?;
        // Stripe replays the body it saved for the key, so a session expired since (with
        // the discount it was priced at) would still read `open`: an older one is read
        // again.
        let replayed = session.created < chrono::Utc::now().timestamp() - REPLAYED_AFTER_SECS;
        let expired = if replayed {
            let now: SessionRow = self
                .get(&format!("/checkout/sessions/{}", session.id))
                .await?;
            now.status.as_deref() == Some("expired")
        } else {
            matches!(
                session.status,
                Some(stripe_shared::CheckoutSessionStatus::Expired)
            )
        };
        Ok(CheckoutLink {
            id: returned(session.id.as_str())?,
            url,
            expired,
        })
    }

    async fn clear_plan_checkouts(
        &self,
        customer: &CustomerId,
        keep: &str,
    ) -> Result<PlanCheckouts, PaymentsError> {
        #[derive(miniserde::Deserialize)]
        struct SubscriptionRow {
            id: String,
            status: String,
        }
        #[derive(miniserde::Deserialize)]
        struct Subscriptions {
            data: Vec<SubscriptionRow>,
        }
        let keep = stripe_key(keep);
        // Every open session first (pack checkouts too), then the plan ones expired: a plan
        // session left open could be paid beside the new one, so a list that does not end
        // is an error, never a clear way.
        let plan_sessions = self.open_sessions(customer).await?.into_iter().filter(|s| {
            s.mode.as_deref() == Some("subscription")
                && s.metadata
                    .as_ref()
                    .and_then(|m| m.get(CHECKOUT_REQUEST_KEY))
                    != Some(&keep)
        });
        for s in plan_sessions {
            // Keyed per request: a failure Stripe keeps for a key would answer every later
            // request the same way.
            let key = format!("tally-expire-{}-{}", s.id, short_digest(&keep));
            if self.expire_session(&s.id, &key).await? == SessionEnd::Paid {
                return Ok(PlanCheckouts::JustPaid(returned(&s.id)?));
            }
        }
        // Without a status, Stripe lists the subscriptions not canceled.
        let subs: Subscriptions = self
            .get(&format!("/subscriptions?customer={customer}&limit=100"))
            .await?;
        Ok(subs
            .data
            .into_iter()
            .find(|s| s.status != "canceled" && s.status != "incomplete_expired")
            .map(|s| returned(&s.id).map(PlanCheckouts::Subscribed))
            .transpose()?
            .unwrap_or(PlanCheckouts::Clear))
    }

    async fn expire_pack_checkouts(
        &self,
        customer: &CustomerId,
        above_pct: u8,
    ) -> Result<u32, PaymentsError> {
        let priced_above = |s: &SessionRow| {
            s.mode.as_deref() == Some("payment")
                && s.metadata.as_ref().is_some_and(|m| {
                    m.get("kind").map(String::as_str) == Some("pack")
                        && m.get(PACK_DISCOUNT_KEY)
                            .and_then(|p| p.parse::<u8>().ok())
                            .is_some_and(|p| p > above_pct)
                })
        };
        let mut expired = 0;
        for s in self.open_sessions(customer).await? {
            if priced_above(&s) {
                // A key per attempt: Stripe keeps a failure under its key, and expiring
                // again is harmless (an expired session is reported as such).
                let key = format!("tally-expire-{}-{}", s.id, ulid::Ulid::new());
                if self.expire_session(&s.id, &key).await? == SessionEnd::Expired {
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    async fn billing_portal(
        &self,
        customer: &CustomerId,
        return_url: &str,
        idempotency_key: &str,
    ) -> Result<String, PaymentsError> {
        #[derive(Serialize)]
        struct PortalForm<'a> {
            customer: &'a str,
            return_url: &'a str,
        }
        #[derive(miniserde::Deserialize)]
        struct PortalSession {
            url: String,
        }
        let session: PortalSession = self
            .post(
                "/billing_portal/sessions",
                &PortalForm {
                    customer: customer.as_str(),
                    return_url,
                },
                idempotency_key,
            )
            .await?;
        Ok(session.url)
    }
}
