//! Handlers of the purchases API.

use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::MAX_PACK_QUANTITY;
use tally::billing::records::*;
use tally::http::{ApiJson, ApiQuery, Identity, Problem, ProblemDetails, idempotency_key};
use tally::ids::WorkspaceId;
use tally::ledger::{Interval, PlanStatus};
use tally::money::Cents;
use tally::payments::{CheckoutLink, CheckoutRequest, PaymentsError, Purchase};
use tally::store::docs;
use utoipa::{IntoParams, ToSchema};

type ApiResult<T> = Result<T, Problem>;

/// Owners and billing admins buy; members are refused.
pub(crate) fn buyer(who: &Identity) -> ApiResult<WorkspaceId> {
    let workspace = who.member_workspace()?.clone();
    if !who.can_manage_billing() {
        return Err(Problem::forbidden(
            "only the workspace owner or a billing admin can manage billing",
        ));
    }
    Ok(workspace)
}

pub(crate) fn provider(e: PaymentsError) -> Problem {
    match e {
        PaymentsError::Refused { message: m, .. } => {
            tracing::error!(error = %m, "payment provider refused a request");
            Problem::new(StatusCode::BAD_GATEWAY, "payment_provider_error", m)
        }
        PaymentsError::Unavailable { message: m, .. } => {
            tracing::warn!(error = %m, "payment provider unavailable");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the payment provider is unavailable; retry with the same Idempotency-Key",
            )
        }
    }
}

/// What to buy.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckoutBody {
    Plan { plan: String, interval: Interval },
    Pack { pack: String, quantity: Option<u64> },
}

/// The workspace's Stripe customer, created on first purchase (exactly once: the Stripe
/// idempotency key is the workspace, and the first stored id wins).
async fn customer(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    email: Option<&str>,
) -> ApiResult<String> {
    let pk = workspace_pk(workspace);
    if let Some(c) = docs::get::<BillingProfile>(st.docs.as_ref(), &pk, PROFILE_SK)
        .await?
        .and_then(|p| p.customer)
    {
        return Ok(c);
    }
    let created = st
        .payments
        .create_customer(workspace, email, &format!("tally-customer-{workspace}"))
        .await
        .map_err(provider)?;
    Ok(tally::billing::link_customer(st.docs.as_ref(), &created, workspace).await?)
}

#[utoipa::path(post, path = "/v1/checkout/sessions", tag = "billing", security(("bearer" = [])),
    request_body = CheckoutBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries return the same session")),
    responses((status = 201, description = "Checkout session", body = inline(CheckoutLinkView)),
        (status = 403, body = ProblemDetails), (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Starts a Stripe Checkout for a plan (subscription) or credit packs (one-off payment).
pub async fn create_checkout(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> ApiResult<(StatusCode, Json<CheckoutLinkView>)> {
    let workspace = buyer(&who)?;
    let catalog = &st.ledger.catalog;
    let state = st.ledger.workspace_now(&workspace).await?;
    let current = state.plan.as_ref().filter(|p| {
        matches!(
            p.status,
            PlanStatus::Active | PlanStatus::PastDue | PlanStatus::Paused
        )
    });
    let purchase = match &body {
        CheckoutBody::Plan { plan, interval } => {
            let def = catalog
                .plan(plan)
                .ok_or_else(|| Problem::validation("plan", &format!("unknown plan {plan:?}")))?;
            if current.is_some() {
                return Err(Problem::conflict(
                    "the workspace already has a subscription; change it with POST /v1/subscription/change",
                ));
            }
            Purchase::Plan {
                plan: def.id.clone(),
                name: def.name.clone(),
                interval: *interval,
                unit_amount: match interval {
                    Interval::Monthly => def.monthly_price_cents,
                    Interval::Yearly => catalog.yearly_price(def).get(),
                },
            }
        }
        CheckoutBody::Pack { pack, quantity } => {
            let def = catalog
                .pack(pack)
                .ok_or_else(|| Problem::validation("pack", &format!("unknown pack {pack:?}")))?;
            let quantity = quantity.unwrap_or(1);
            if quantity == 0 || quantity > MAX_PACK_QUANTITY {
                return Err(Problem::validation(
                    "quantity",
                    &format!("must be between 1 and {MAX_PACK_QUANTITY}"),
                ));
            }
            let discount = current
                .and_then(|p| catalog.plan(&p.plan))
                .map_or(0, |p| p.pack_discount_pct);
            Purchase::Pack {
                pack: def.id.clone(),
                name: format!("{} credits", def.credits),
                quantity,
                unit_amount: Cents::new(def.price_cents).discounted(discount).get(),
                credits: def.credits,
            }
        }
    };
    let key = match idempotency_key(&headers, "checkout")? {
        Some(k) => format!("tally-checkout-{workspace}-{}", k.as_str()),
        None => format!("tally-checkout-{workspace}-{}", ulid::Ulid::new()),
    };
    let customer = customer(&st, &workspace, who.email.as_deref()).await?;
    let link: CheckoutLink = st
        .payments
        .create_checkout(&CheckoutRequest {
            workspace: workspace.clone(),
            customer,
            purchase,
            success_url: st.urls.success.clone(),
            cancel_url: st.urls.cancel.clone(),
            idempotency_key: key,
        })
        .await
        .map_err(provider)?;
    tracing::info!(workspace = %workspace, session = %link.id, "checkout session created");
    Ok((
        StatusCode::CREATED,
        Json(CheckoutLinkView {
            id: link.id,
            url: link.url,
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckoutLinkView {
    pub id: String,
    /// Send the customer's browser here.
    pub url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub subscription: Option<SubscriptionRecord>,
    pub customer: Option<String>,
}

#[utoipa::path(get, path = "/v1/subscription", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 403, body = ProblemDetails)))]
/// The subscription as Stripe last described it (`null` before the first purchase).
pub async fn subscription(
    State(st): State<PurchasesState>,
    who: Identity,
) -> ApiResult<Json<SubscriptionView>> {
    let workspace = buyer(&who)?;
    let pk = workspace_pk(&workspace);
    Ok(Json(SubscriptionView {
        subscription: docs::get(st.docs.as_ref(), &pk, SUBSCRIPTION_SK).await?,
        customer: docs::get::<BillingProfile>(st.docs.as_ref(), &pk, PROFILE_SK)
            .await?
            .and_then(|p| p.customer),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortalView {
    pub url: String,
}

#[utoipa::path(post, path = "/v1/billing-portal", tag = "billing", security(("bearer" = [])),
    responses((status = 201, body = PortalView), (status = 403, body = ProblemDetails), (status = 404, body = ProblemDetails)))]
/// A Stripe customer-portal session: payment methods, invoices, plan and frequency.
pub async fn billing_portal(
    State(st): State<PurchasesState>,
    who: Identity,
) -> ApiResult<(StatusCode, Json<PortalView>)> {
    let workspace = buyer(&who)?;
    let customer =
        docs::get::<BillingProfile>(st.docs.as_ref(), &workspace_pk(&workspace), PROFILE_SK)
            .await?
            .and_then(|p| p.customer)
            .ok_or_else(|| Problem::not_found("the workspace has not bought anything yet"))?;
    let url = st
        .payments
        .billing_portal(
            &customer,
            &st.urls.portal_return,
            &format!("tally-portal-{workspace}-{}", ulid::Ulid::new()),
        )
        .await
        .map_err(provider)?;
    Ok((StatusCode::CREATED, Json(PortalView { url })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InvoiceQuery {
    /// 1-100, default 20.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoicePage {
    pub items: Vec<InvoiceRecord>,
}

#[utoipa::path(get, path = "/v1/invoices", tag = "billing", security(("bearer" = [])),
    params(InvoiceQuery),
    responses((status = 200, body = InvoicePage), (status = 403, body = ProblemDetails)))]
/// Billing history: open and paid invoices (and voided ones), newest first, with links to
/// the hosted invoice and its PDF.
pub async fn invoices(
    State(st): State<PurchasesState>,
    who: Identity,
    ApiQuery(q): ApiQuery<InvoiceQuery>,
) -> ApiResult<Json<InvoicePage>> {
    let workspace = buyer(&who)?;
    let limit = match q.limit {
        None => 20,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(_) => return Err(Problem::validation("limit", "must be between 1 and 100")),
    };
    let mut items: Vec<InvoiceRecord> = docs::list(
        st.docs.as_ref(),
        &workspace_pk(&workspace),
        INVOICE_PREFIX,
        200,
    )
    .await?;
    items.retain(|i| i.status != "draft");
    items.truncate(limit);
    Ok(Json(InvoicePage { items }))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomPaymentBody {
    /// The agreed amount, integer cents.
    pub amount_cents: u64,
    /// Credits granted when the invoice is paid.
    pub credits: u64,
    pub description: String,
    /// 1-90, default 30.
    pub days_until_due: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CustomPaymentView {
    pub invoice: String,
    pub hosted_invoice_url: String,
    pub credits: u64,
}

/// Largest custom payment: $1,000,000.
pub const MAX_CUSTOM_PAYMENT_CENTS: u64 = 100_000_000;

#[utoipa::path(post, path = "/v1/admin/workspaces/{workspace_id}/custom-payments", tag = "admin",
    security(("bearer" = [])), params(("workspace_id" = String, Path),
        ("Idempotency-Key" = String, Header, description = "Required: one invoice per key")),
    request_body = CustomPaymentBody,
    responses((status = 201, body = CustomPaymentView), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff bill an agreed amount for agreed credits: Stripe sends the invoice, and the
/// credits are granted when it is paid.
pub async fn custom_payment(
    State(st): State<PurchasesState>,
    who: Identity,
    axum::extract::Path(workspace_id): axum::extract::Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CustomPaymentBody>,
) -> ApiResult<(StatusCode, Json<CustomPaymentView>)> {
    who.require_scope(tally::http::auth::SCOPE_ADMIN)?;
    let workspace = WorkspaceId::parse(&workspace_id)
        .map_err(|e| Problem::validation("workspace_id", &e.to_string()))?;
    let key = idempotency_key(&headers, "custom-payment")?
        .ok_or_else(|| Problem::validation("Idempotency-Key", "required for custom payments"))?;
    if body.amount_cents == 0 || body.amount_cents > MAX_CUSTOM_PAYMENT_CENTS {
        return Err(Problem::validation(
            "amount_cents",
            &format!("must be between 1 and {MAX_CUSTOM_PAYMENT_CENTS}"),
        ));
    }
    if body.credits == 0 || body.credits > tally::money::MAX_CREDITS_PER_REQUEST {
        return Err(Problem::validation(
            "credits",
            &format!(
                "must be between 1 and {}",
                tally::money::MAX_CREDITS_PER_REQUEST
            ),
        ));
    }
    let description = body.description.trim();
    if description.is_empty() || description.chars().count() > 500 {
        return Err(Problem::validation(
            "description",
            "must be 1 to 500 characters",
        ));
    }
    let days = body.days_until_due.unwrap_or(30);
    if !(1..=90).contains(&days) {
        return Err(Problem::validation(
            "days_until_due",
            "must be between 1 and 90",
        ));
    }
    let customer = customer(&st, &workspace, None).await?;
    let link = st
        .payments
        .create_custom_invoice(&tally::payments::CustomInvoice {
            workspace: workspace.clone(),
            customer,
            amount: body.amount_cents,
            credits: body.credits,
            description: description.to_owned(),
            days_until_due: days,
            idempotency_key: format!("tally-custom-{workspace}-{}", key.as_str()),
        })
        .await
        .map_err(provider)?;
    tracing::info!(workspace = %workspace, invoice = %link.id, admin = %who.sub, "custom payment invoice sent");
    Ok((
        StatusCode::CREATED,
        Json(CustomPaymentView {
            invoice: link.id,
            hosted_invoice_url: link.hosted_invoice_url,
            credits: body.credits,
        }),
    ))
}

/// Alert settings as sent by the client.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsBody {
    /// Up to 10 thresholds, each 1 to 10,000,000 credits.
    pub below_credits: Vec<u64>,
    /// Buy this pack with the saved card when the balance falls below the threshold.
    pub auto_topup: Option<tally::alerts::AutoTopUp>,
}

#[utoipa::path(put, path = "/v1/alerts", tag = "billing", security(("bearer" = [])),
    request_body = AlertsBody,
    responses((status = 200, body = tally::alerts::AlertSettings), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Sets credit alert thresholds and the optional auto top-up.
pub async fn put_alerts(
    State(st): State<PurchasesState>,
    who: Identity,
    ApiJson(body): ApiJson<AlertsBody>,
) -> ApiResult<Json<tally::alerts::AlertSettings>> {
    let workspace = buyer(&who)?;
    let limit = tally::money::MAX_CREDITS_PER_REQUEST;
    if body.below_credits.len() > tally::alerts::MAX_THRESHOLDS {
        return Err(Problem::validation(
            "below_credits",
            "at most 10 thresholds",
        ));
    }
    if body.below_credits.iter().any(|t| *t == 0 || *t > limit) {
        return Err(Problem::validation(
            "below_credits",
            &format!("each must be between 1 and {limit}"),
        ));
    }
    if let Some(t) = &body.auto_topup {
        if st.ledger.catalog.pack(&t.pack).is_none() {
            return Err(Problem::validation(
                "auto_topup.pack",
                &format!("unknown pack {:?}", t.pack),
            ));
        }
        if t.below_credits == 0 || t.below_credits > limit {
            return Err(Problem::validation(
                "auto_topup.below_credits",
                &format!("must be between 1 and {limit}"),
            ));
        }
    }
    let mut below = body.below_credits;
    below.sort_unstable();
    below.dedup();
    let stored = docs::update(
        st.docs.as_ref(),
        &workspace_pk(&workspace),
        tally::alerts::ALERTS_SK,
        |cur: Option<tally::alerts::AlertSettings>| {
            let next = tally::alerts::AlertSettings {
                below_credits: below.clone(),
                auto_topup: body.auto_topup.clone(),
                last_topup_at: cur.as_ref().and_then(|c| c.last_topup_at),
            };
            (cur.as_ref() != Some(&next)).then_some(next)
        },
    )
    .await?
    .unwrap_or_default();
    Ok(Json(stored))
}

#[utoipa::path(get, path = "/v1/alerts", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = tally::alerts::AlertSettings), (status = 403, body = ProblemDetails)))]
/// The workspace's credit alert settings.
pub async fn get_alerts(
    State(st): State<PurchasesState>,
    who: Identity,
) -> ApiResult<Json<tally::alerts::AlertSettings>> {
    let workspace = buyer(&who)?;
    Ok(Json(
        docs::get(
            st.docs.as_ref(),
            &workspace_pk(&workspace),
            tally::alerts::ALERTS_SK,
        )
        .await?
        .unwrap_or_default(),
    ))
}
