//! `/v1/subscription`: the subscription as Stripe last described it, and changing it: plan
//! and interval, add-on units, cancel, resume, pause. The rules and their application live
//! in `tally::subscriptions` and `tally::billing::changes`; these handlers parse, check
//! who asks, apply the `Idempotency-Key`, call and map.

use super::{ApiResult, Buyer, buyer, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use tally::billing::changes::{
    ChangeError, ChangeView, MAX_ADDON_UNITS, PreviewView, StatusView, SubscriptionChanges,
};
use tally::billing::records::*;
use tally::http::{
    ApiBytes, ApiJson, Identity, Problem, ProblemDetails, idempotency, idempotency_key,
};
use tally::ids::{CustomerId, IdempotencyKey, WorkspaceId};
use tally::ledger::Interval;
use tally::store::docs;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    pub plan: String,
    pub interval: Interval,
}

/// A change to preview; unset fields keep their current value.
#[derive(Debug, Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PreviewBody {
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub interval: Option<Interval>,
    #[serde(default)]
    #[schema(maximum = 100)]
    pub addon_units: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddonsBody {
    /// 0-100.
    #[schema(maximum = 100)]
    pub units: u32,
}

fn changes(st: &PurchasesState) -> SubscriptionChanges {
    SubscriptionChanges {
        ledger: st.ledger.clone(),
        docs: st.docs.clone(),
        payments: st.payments.clone(),
    }
}

/// A refused or failed change as the client sees it.
fn refused(e: ChangeError) -> Problem {
    match e {
        ChangeError::NoSubscription => Problem::not_found(e.to_string()),
        ChangeError::Ended | ChangeError::NotActive(_) => Problem::conflict(e.to_string()),
        ChangeError::Busy => Problem::new(
            axum::http::StatusCode::CONFLICT,
            "change_in_progress",
            e.to_string(),
        ),
        ChangeError::Unrecognised => Problem::conflict(format!(
            "{e}; change it in the billing portal or contact support"
        )),
        ChangeError::UnknownPlan(_) => Problem::validation("plan", &e.to_string()),
        ChangeError::TooManyUnits => {
            Problem::validation("units", &format!("must be between 0 and {MAX_ADDON_UNITS}"))
        }
        ChangeError::NoAddon(_) => Problem::internal(),
        ChangeError::Provider(p) => provider(p),
        ChangeError::Store(s) => s.into(),
        ChangeError::Ledger(l) => l.into(),
    }
}

/// The Stripe idempotency key of a change: derived from the client's key when there is
/// one, so a retry after a lost answer cannot change the subscription twice.
fn stripe_key(scope: &str, workspace: &WorkspaceId, key: Option<&IdempotencyKey>) -> String {
    match key {
        Some(k) => format!("tally-{scope}-{workspace}-{}", k.as_str()),
        None => format!("tally-{scope}-{workspace}-{}", ulid::Ulid::new()),
    }
}

/// The subscription as Stripe last described it, and the workspace's Stripe customer; both
/// `null` before the first purchase.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub subscription: Option<SubscriptionRecord>,
    pub customer: Option<CustomerId>,
}

#[utoipa::path(get, path = "/v1/subscription", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 403, body = ProblemDetails)))]
/// The subscription as Stripe last described it (`null` before the first purchase).
pub async fn subscription(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
) -> ApiResult<Json<SubscriptionView>> {
    let pk = workspace_pk(&workspace);
    Ok(Json(SubscriptionView {
        subscription: docs::get(st.docs.as_ref(), &pk, SUBSCRIPTION_SK).await?,
        customer: docs::get::<BillingProfile>(st.docs.as_ref(), &pk, PROFILE_SK)
            .await?
            .and_then(|p| p.customer),
    }))
}

#[utoipa::path(post, path = "/v1/subscription/change", tag = "billing", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first result; another body is a 409")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Changes plan or billing interval: upgrades now (prorated, credits at once), downgrades at
/// the next renewal (benefits kept until then).
pub async fn change(
    State(st): State<PurchasesState>,
    Buyer { who, workspace }: Buyer,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChangeBody>,
) -> ApiResult<Json<ChangeView>> {
    if st.ledger.catalog.plan(&body.plan).is_none() {
        return Err(Problem::validation(
            "plan",
            &format!("unknown plan {:?}", body.plan),
        ));
    }
    let key = idempotency_key(&headers, "change")?;
    let now = st.ledger.clock.now();
    let view = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &body,
        now,
        || async {
            changes(&st)
                .change(
                    &workspace,
                    &who.actor(),
                    &body.plan,
                    body.interval,
                    &stripe_key("change", &workspace, key.as_ref()),
                )
                .await
                .map_err(refused)
        },
    )
    .await?;
    Ok(Json(view))
}

#[utoipa::path(post, path = "/v1/subscription/preview", tag = "billing", security(("bearer" = [])),
    request_body = PreviewBody,
    responses((status = 200, body = PreviewView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// What a change of plan, interval or add-on units would charge now (Stripe's invoice
/// preview: the upgrade and the credit for unused time, tax), what the renewal would
/// charge, and the credits granted now and per month. Nothing changes.
pub async fn preview(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    ApiJson(body): ApiJson<PreviewBody>,
) -> ApiResult<Json<PreviewView>> {
    if let Some(p) = &body.plan
        && st.ledger.catalog.plan(p).is_none()
    {
        return Err(Problem::validation("plan", &format!("unknown plan {p:?}")));
    }
    if body.addon_units.is_some_and(|u| u > MAX_ADDON_UNITS) {
        return Err(Problem::validation(
            "addon_units",
            &format!("must be between 0 and {MAX_ADDON_UNITS}"),
        ));
    }
    let view = changes(&st)
        .preview(
            &workspace,
            body.plan.as_deref(),
            body.interval,
            body.addon_units,
        )
        .await
        .map_err(refused)?;
    Ok(Json(view))
}

#[utoipa::path(put, path = "/v1/subscription/addons", tag = "billing", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first result; another body is a 409")),
    request_body = AddonsBody,
    responses((status = 200, body = ChangeView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails),
        (status = 409, description = "Paused, past due, set to cancel, in a period never paid, or another change running", body = ProblemDetails),
        (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Sets the number of add-on credit units: more apply now (prorated charge, credits at
/// once), fewer from the next renewal.
pub async fn addons(
    State(st): State<PurchasesState>,
    Buyer { who, workspace }: Buyer,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AddonsBody>,
) -> ApiResult<Json<ChangeView>> {
    if body.units > MAX_ADDON_UNITS {
        return Err(refused(ChangeError::TooManyUnits));
    }
    let key = idempotency_key(&headers, "addons")?;
    let now = st.ledger.clock.now();
    let view = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &body,
        now,
        || async {
            changes(&st)
                .set_addons(
                    &workspace,
                    &who.actor(),
                    body.units,
                    &stripe_key("addons", &workspace, key.as_ref()),
                )
                .await
                .map_err(refused)
        },
    )
    .await?;
    Ok(Json(view))
}

async fn set_status(
    st: &PurchasesState,
    who: &Identity,
    headers: &HeaderMap,
    scope: &'static str,
    cancel: Option<bool>,
    pause: Option<bool>,
) -> ApiResult<Json<StatusView>> {
    let workspace = buyer(who)?;
    let key = idempotency_key(headers, scope)?;
    let now = st.ledger.clock.now();
    let view = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &scope,
        now,
        || async {
            changes(st)
                .set_status(
                    &workspace,
                    cancel,
                    pause,
                    &stripe_key(scope, &workspace, key.as_ref()),
                )
                .await
                .map_err(refused)
        },
    )
    .await?;
    Ok(Json(view))
}

#[utoipa::path(post, path = "/v1/subscription/cancel", tag = "billing", security(("bearer" = [])),
    request_body(content = Option<tally::http::NoBody>, description = "Optional: none, or an empty object"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first result; another body is a 409")),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Cancels renewal at the end of the period; the workspace keeps its plan until then. Add-on
/// units end with the subscription.
pub async fn cancel(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<StatusView>> {
    tally::http::no_body(&headers, &body)?;
    set_status(&st, &who, &headers, "cancel", Some(true), None).await
}

#[utoipa::path(post, path = "/v1/subscription/resume", tag = "billing", security(("bearer" = [])),
    request_body(content = Option<tally::http::NoBody>, description = "Optional: none, or an empty object"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first result; another body is a 409")),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Undoes a cancellation or a pause.
pub async fn resume(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<StatusView>> {
    tally::http::no_body(&headers, &body)?;
    set_status(&st, &who, &headers, "resume", Some(false), Some(false)).await
}

#[utoipa::path(post, path = "/v1/subscription/pause", tag = "billing", security(("bearer" = [])),
    request_body(content = Option<tally::http::NoBody>, description = "Optional: none, or an empty object"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first result; another body is a 409")),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Pauses collection: renewals are not charged (and grant nothing) until resumed.
pub async fn pause(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<StatusView>> {
    tally::http::no_body(&headers, &body)?;
    set_status(&st, &who, &headers, "pause", None, Some(true)).await
}
