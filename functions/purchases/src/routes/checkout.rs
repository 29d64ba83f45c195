//! `POST /v1/checkout/sessions`: Stripe Checkout for a plan (subscription) or credit packs
//! (one-off payment).

use super::{ApiResult, Buyer, customer, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::MAX_PACK_QUANTITY;
use tally::http::{ApiJson, Identity, Problem, ProblemDetails, idempotency, idempotency_key};
use tally::ids::{CheckoutSessionId, IdempotencyKey, WorkspaceId};
use tally::ledger::Interval;
use tally::payments::{CheckoutLink, CheckoutRequest, Purchase};
use tally::subscriptions::Entitlements;
use tally::subscriptions::change::plan_unit_price;
use utoipa::ToSchema;

/// What to buy.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckoutBody {
    Plan {
        plan: String,
        interval: Interval,
    },
    Pack {
        pack: String,
        /// 1-100, default 1.
        #[schema(minimum = 1, maximum = 100)]
        quantity: Option<u64>,
    },
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckoutLinkView {
    pub id: CheckoutSessionId,
    /// Send the customer's browser here.
    pub url: String,
}

#[utoipa::path(post, path = "/v1/checkout/sessions", tag = "billing", security(("bearer" = [])),
    request_body = CheckoutBody,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same body return the same session; another body under the same key is a 409")),
    responses((status = 201, description = "Checkout session", body = inline(CheckoutLinkView)),
        (status = 403, body = ProblemDetails), (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Starts a Stripe Checkout for a plan (subscription) or credit packs (one-off payment).
pub async fn create_checkout(
    State(st): State<PurchasesState>,
    Buyer { who, workspace }: Buyer,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> ApiResult<(StatusCode, Json<CheckoutLinkView>)> {
    let key = idempotency_key(&headers, "checkout")?;
    let now = st.ledger.clock.now();
    let view = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &body,
        now,
        || checkout(&st, &who, &workspace, &body, key.as_ref()),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn checkout(
    st: &PurchasesState,
    who: &Identity,
    workspace: &WorkspaceId,
    body: &CheckoutBody,
    key: Option<&IdempotencyKey>,
) -> ApiResult<CheckoutLinkView> {
    let catalog = &st.ledger.catalog;
    let state = st.ledger.workspace_now(workspace).await?;
    let purchase = match body {
        CheckoutBody::Plan { plan, interval } => {
            let def = catalog
                .plan(plan)
                .ok_or_else(|| Problem::validation("plan", &format!("unknown plan {plan:?}")))?;
            if state.plan.as_ref().is_some_and(|p| p.status.is_live()) {
                return Err(Problem::conflict(
                    "the workspace already has a subscription; change it with POST /v1/subscription/change",
                ));
            }
            Purchase::Plan {
                plan: def.id.clone(),
                name: def.name.clone(),
                interval: *interval,
                unit_amount: plan_unit_price(catalog, def, *interval),
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
            let discount = Entitlements::of(state.plan.as_ref(), catalog).pack_discount_pct;
            Purchase::Pack {
                pack: def.id.clone(),
                name: format!("{} credits", def.credits),
                quantity,
                unit_amount: def.price_cents.discounted(discount),
                credits: def.credits,
            }
        }
    };
    let stripe_key = match key {
        Some(k) => format!("tally-checkout-{workspace}-{}", k.as_str()),
        None => format!("tally-checkout-{workspace}-{}", ulid::Ulid::new()),
    };
    let customer = customer(st, workspace, who.email.as_deref()).await?;
    let link: CheckoutLink = st
        .payments
        .create_checkout(&CheckoutRequest {
            workspace: workspace.clone(),
            customer,
            purchase,
            success_url: st.urls.success.clone(),
            cancel_url: st.urls.cancel.clone(),
            idempotency_key: stripe_key,
        })
        .await
        .map_err(provider)?;
    tracing::info!(workspace = %workspace, session = %link.id, "checkout session created");
    Ok(CheckoutLinkView {
        id: link.id,
        url: link.url,
    })
}
