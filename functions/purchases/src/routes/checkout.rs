//! `POST /v1/checkout/sessions`: Stripe Checkout for a plan (subscription) or credit packs
//! (one-off payment).

use super::{ApiResult, Buyer, customer, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::MAX_PACK_QUANTITY;
use tally::billing::checkouts;
use tally::billing::records::workspace_pk;
use tally::http::{ApiJson, Identity, Problem, ProblemDetails, idempotency, idempotency_key};
use tally::ids::{CheckoutSessionId, IdempotencyKey, WorkspaceId};
use tally::ledger::Interval;
use tally::payments::{CheckoutLink, CheckoutRequest, PlanCheckouts, Purchase};
use tally::store::docs;
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
        (status = 403, body = ProblemDetails),
        (status = 409, description = "The workspace has a subscription (in Stripe too, or a plan checkout just paid), another plan checkout is being made (`checkout_in_progress`), the plan's pack discount ended while a pack checkout was made (`discount_ended`), or the session made under this key has expired (`checkout_expired`): start a new one under a new key", body = ProblemDetails),
        (status = 422, body = ProblemDetails),
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
                discount_pct: discount,
            }
        }
    };
    let stripe_key = match key {
        Some(k) => format!("tally-checkout-{workspace}-{}", k.as_str()),
        None => format!("tally-checkout-{workspace}-{}", ulid::Ulid::new()),
    };
    let customer = customer(st, workspace, who.email.as_deref()).await?;
    let request = CheckoutRequest {
        workspace: workspace.clone(),
        customer,
        purchase,
        success_url: st.urls.success.clone(),
        cancel_url: st.urls.cancel.clone(),
        idempotency_key: stripe_key,
    };
    let link: CheckoutLink = match request.purchase {
        Purchase::Plan { .. } => plan_checkout(st, &request).await?,
        Purchase::Pack { discount_pct, .. } => {
            if discount_pct > 0 {
                checkouts::offering(st.docs.as_ref(), workspace, &request.customer, discount_pct)
                    .await?;
            }
            let link = st
                .payments
                .create_checkout(&request)
                .await
                .map_err(provider)?;
            if discount_pct > 0 {
                discount_still_given(st, &request, discount_pct).await?;
            }
            link
        }
    };
    if link.expired {
        // Stripe answered the session first made under this key, which can no longer be
        // paid (expired with the discount it was priced at).
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "checkout_expired",
            "the checkout made under this Idempotency-Key has expired; start a new one under \
             a new key",
        ));
    }
    tracing::info!(workspace = %workspace, session = %link.id, "checkout session created");
    Ok(CheckoutLinkView {
        id: link.id,
        url: link.url,
    })
}

/// The longest a checkout spends expiring sessions priced with a discount that just
/// ended (within the function's 29 s).
const EXPIRE_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// A discounted pack session is made from the plan read before it. If the plan stopped
/// giving that discount meanwhile (canceled, paused), the billing worker's expiry of
/// discounted sessions may have run before the session existed, so the plan is read again
/// now that it does: a session priced above what the plan gives is expired, and the request
/// is refused (its URL is never handed out). Either this read or the worker's listing,
/// which follows its setting of the plan, sees the other's write.
async fn discount_still_given(
    st: &PurchasesState,
    req: &CheckoutRequest,
    priced_pct: u8,
) -> ApiResult<()> {
    let state = st.ledger.workspace_now(&req.workspace).await?;
    let now_pct = Entitlements::of(state.plan.as_ref(), &st.ledger.catalog).pack_discount_pct;
    if now_pct >= priced_pct {
        return Ok(());
    }
    let expiring = st.payments.expire_pack_checkouts(&req.customer, now_pct);
    let failed = match tokio::time::timeout(EXPIRE_BUDGET, expiring).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("timed out".to_owned()),
    };
    if let Some(e) = failed {
        // Left for a later subscription event (the session lapses within its 24 hours in
        // any case); its URL is not handed out.
        tracing::error!(workspace = %req.workspace, error = %e,
            "could not expire a pack checkout priced with a discount the plan no longer gives");
        checkouts::offering(st.docs.as_ref(), &req.workspace, &req.customer, priced_pct).await?;
    }
    Err(Problem::new(
        StatusCode::CONFLICT,
        "discount_ended",
        "the plan's pack discount ended while the checkout was made; start a new checkout \
         (with a new Idempotency-Key) at the price without it",
    ))
}

/// Who is making a plan checkout for a workspace, until when: one at a time, so two
/// requests at once (two tabs, a double click) cannot both leave a session to pay.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckoutLease {
    key: String,
    until: chrono::DateTime<chrono::Utc>,
}

const PLAN_CHECKOUT_SK: &str = "CHECKOUT#plan";
/// Seconds a plan checkout holds its lease (Stripe's answers take well under this).
const LEASE_SECS: i64 = 60;

/// A plan checkout, only when no other can be paid and Stripe has no subscription of the
/// customer that has not ended: every session paid is a subscription, so a second session
/// (an older one left open, or one made at the same time) would be a second subscription,
/// charged every period, that the API cannot reach. The older open sessions are expired
/// first; one paid meanwhile, or a subscription the ledger does not show yet, is a 409.
async fn plan_checkout(st: &PurchasesState, req: &CheckoutRequest) -> ApiResult<CheckoutLink> {
    let pk = workspace_pk(&req.workspace);
    let now = st.ledger.clock.now();
    let mut busy = false;
    docs::update(
        st.docs.as_ref(),
        &pk,
        PLAN_CHECKOUT_SK,
        |cur: Option<CheckoutLease>| {
            busy = cur
                .as_ref()
                .is_some_and(|l| l.until > now && l.key != req.idempotency_key);
            (!busy).then(|| CheckoutLease {
                key: req.idempotency_key.clone(),
                until: now + chrono::Duration::seconds(LEASE_SECS),
            })
        },
    )
    .await?;
    if busy {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "checkout_in_progress",
            "another plan checkout is being made for this workspace; use the one it answers",
        ));
    }
    let made = async {
        match st
            .payments
            .clear_plan_checkouts(&req.customer, &req.idempotency_key)
            .await
            .map_err(provider)?
        {
            PlanCheckouts::Clear => {}
            PlanCheckouts::Subscribed(sub) => {
                return Err(Problem::conflict(format!(
                    "the workspace already has a subscription ({sub}); change it with POST /v1/subscription/change"
                )));
            }
            PlanCheckouts::JustPaid(session) => {
                return Err(Problem::conflict(format!(
                    "a plan checkout ({session}) was just paid; its subscription shows shortly"
                )));
            }
        }
        st.payments.create_checkout(req).await.map_err(provider)
    }
    .await;
    let released = docs::update(
        st.docs.as_ref(),
        &pk,
        PLAN_CHECKOUT_SK,
        |cur: Option<CheckoutLease>| {
            cur.filter(|l| l.key == req.idempotency_key && l.until > now)
                .map(|l| CheckoutLease { until: now, ..l })
        },
    )
    .await;
    if let Err(e) = released {
        // The lease lapses on its own.
        tracing::warn!(error = %e, workspace = %req.workspace, "plan checkout lease not released");
    }
    made
}
