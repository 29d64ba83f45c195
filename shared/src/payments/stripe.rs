//! Stripe API adapter on async-stripe's client: our exact form parameters, Stripe's own
//! response types, and a Stripe idempotency key on every mutating call.

use super::*;
use ::stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use serde::Serialize;
use std::collections::BTreeMap;
use stripe_client_core::{RequestBuilder, StripeMethod};

pub struct StripePayments {
    client: Client,
}

impl StripePayments {
    /// A client for Stripe's API, or for another base URL (tests point it at a fake).
    pub fn new(secret_key: &str, base_url: Option<&str>) -> Result<Self, PaymentsError> {
        let mut builder = ClientBuilder::new(secret_key).app_info("tally", None, None);
        if let Some(url) = base_url {
            builder = builder.url(url);
        }
        let client = builder
            .build()
            .map_err(|e| PaymentsError::Refused(format!("Stripe client configuration: {e}")))?;
        Ok(Self { client })
    }

    async fn post<F: Serialize, T: miniserde::Deserialize>(
        &self,
        path: &str,
        form: &F,
        key: &str,
    ) -> Result<T, PaymentsError> {
        let key = IdempotencyKey::new(key)
            .map_err(|e| PaymentsError::Refused(format!("idempotency key: {e}")))?;
        RequestBuilder::new(StripeMethod::Post, path)
            .form(form)
            .customize::<T>()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(classify)
    }
}

fn classify(e: StripeError) -> PaymentsError {
    match e {
        StripeError::Stripe(err, status) if status < 500 && status != 429 => {
            PaymentsError::Refused(format!("{status}: {}", err.message.unwrap_or_default()))
        }
        other => PaymentsError::Unavailable(other.to_string()),
    }
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
    product_data: ProductData<'a>,
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
}

/// The metadata every checkout carries so Stripe's events name the workspace and the
/// purchase without any lookup.
pub fn checkout_metadata(req: &CheckoutRequest) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::from([("org_id", req.account.to_string())]);
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
        Purchase::Pack { pack, quantity, .. } => {
            m.insert("kind", "pack".into());
            m.insert("pack", pack.clone());
            m.insert("quantity", quantity.to_string());
        }
    }
    m
}

#[async_trait]
impl Payments for StripePayments {
    async fn create_customer(
        &self,
        account: &AccountId,
        email: Option<&str>,
        idempotency_key: &str,
    ) -> Result<String, PaymentsError> {
        let form = CustomerForm {
            email,
            metadata: BTreeMap::from([("org_id", account.as_str())]),
        };
        let customer: stripe_shared::Customer =
            self.post("/customers", &form, idempotency_key).await?;
        Ok(customer.id.to_string())
    }

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError> {
        let metadata = checkout_metadata(req);
        let (mode, line) = match &req.purchase {
            Purchase::Plan {
                name,
                interval,
                unit_amount,
                ..
            } => (
                "subscription",
                LineItem {
                    price_data: PriceData {
                        currency: "usd",
                        unit_amount: *unit_amount,
                        product_data: ProductData { name },
                        recurring: Some(RecurringForm {
                            interval: match interval {
                                Interval::Monthly => "month",
                                Interval::Yearly => "year",
                            },
                        }),
                    },
                    quantity: 1,
                },
            ),
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
                        unit_amount: *unit_amount,
                        product_data: ProductData { name },
                        recurring: None,
                    },
                    quantity: *quantity,
                },
            ),
        };
        let subscription = mode == "subscription";
        let form = CheckoutForm {
            mode,
            customer: &req.customer,
            client_reference_id: req.account.as_str(),
            success_url: &req.success_url,
            cancel_url: &req.cancel_url,
            line_items: vec![line],
            metadata: metadata.clone(),
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
        };
        let session: stripe_shared::CheckoutSession = self
            .post("/checkout/sessions", &form, &req.idempotency_key)
            .await?;
        let url = session
            .url
            .ok_or_else(|| PaymentsError::Unavailable("checkout session without a URL".into()))?;
        Ok(CheckoutLink {
            id: session.id.to_string(),
            url,
        })
    }

    async fn billing_portal(
        &self,
        customer: &str,
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
                    customer,
                    return_url,
                },
                idempotency_key,
            )
            .await?;
        Ok(session.url)
    }
}
