//! `POST /v1/billing-portal`: a Stripe customer-portal session.

use super::{ApiResult, Buyer, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::records::*;
use tally::http::{ApiBytes, Problem, ProblemDetails, idempotency, idempotency_key};
use tally::ids::{IdempotencyKey, WorkspaceId};
use tally::store::docs;
use utoipa::ToSchema;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PortalView {
    pub url: String,
}

#[utoipa::path(post, path = "/v1/billing-portal", tag = "billing", security(("bearer" = [])),
    request_body(content = Option<tally::http::NoBody>, description = "Optional: none, or an empty object"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key return the same session")),
    responses((status = 201, body = PortalView), (status = 403, body = ProblemDetails), (status = 404, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// A Stripe customer-portal session: payment methods, invoices, plan and frequency.
pub async fn billing_portal(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<(StatusCode, Json<PortalView>)> {
    tally::http::no_body(&headers, &body)?;
    let key = idempotency_key(&headers, "billing-portal")?;
    let now = st.ledger.clock.now();
    let view = idempotency::once(st.docs.as_ref(), &workspace, key.as_ref(), &(), now, || {
        portal(&st, &workspace, key.as_ref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn portal(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    key: Option<&IdempotencyKey>,
) -> ApiResult<PortalView> {
    let customer =
        docs::get::<BillingProfile>(st.docs.as_ref(), &workspace_pk(workspace), PROFILE_SK)
            .await?
            .and_then(|p| p.customer)
            .ok_or_else(|| Problem::not_found("the workspace has not bought anything yet"))?;
    let url = st
        .payments
        .billing_portal(
            &customer,
            &st.urls.portal_return,
            &match key {
                Some(k) => format!("tally-portal-{workspace}-{}", k.as_str()),
                None => format!("tally-portal-{workspace}-{}", ulid::Ulid::new()),
            },
        )
        .await
        .map_err(provider)?;
    Ok(PortalView { url })
}
