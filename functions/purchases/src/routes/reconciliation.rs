//! `GET /v1/admin/reconciliation`: finance compares the ledger with Stripe's charges for a
//! range of at most 31 days (see `tally::billing::reconcile`).

use super::{ApiResult, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use chrono::{DateTime, Duration, FixedOffset};
use serde::Deserialize;
use tally::billing::reconcile::{MAX_DAYS, ReconcileError, Report, reconcile};
use tally::http::auth::Staff;
use tally::http::{ApiQuery, ProblemDetails};
use utoipa::IntoParams;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Start (inclusive, RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: DateTime<FixedOffset>,
    /// End (exclusive, RFC 3339); at most 31 days after `from` (a later end is moved back:
    /// the answer's `to` says where it ends).
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: DateTime<FixedOffset>,
}

#[utoipa::path(get, path = "/v1/admin/reconciliation", tag = "admin", security(("bearer" = [])),
    params(RangeQuery),
    responses((status = 200, body = Report), (status = 403, body = ProblemDetails),
        (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Finance: what Stripe collected in the range that granted no credits, and what granted
/// credits without a collected charge (the read is recorded in the global audit log).
pub async fn reconciliation(
    State(st): State<PurchasesState>,
    Staff(who): Staff,
    uri: Uri,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> ApiResult<Json<Report>> {
    use chrono::SubsecRound;
    // Whole seconds, as Stripe's times are.
    let from = tally::http::text::instant("from", Some(q.from))?
        .unwrap_or_else(|| q.from.to_utc())
        .trunc_subsecs(0);
    let to = tally::http::text::instant("to", Some(q.to))?
        .unwrap_or_else(|| q.to.to_utc())
        .trunc_subsecs(0);
    // At most 31 days from `from` (the answer's `to` says where it ends); a range that
    // ends before it starts holds nothing.
    let to = to.min(from + Duration::days(MAX_DAYS)).max(from);
    tally::audit::record_global(
        st.docs.as_ref(),
        st.ledger.clock.now(),
        &tally::audit::Reader::from(&who),
        "GET /v1/admin/reconciliation",
        uri.query().unwrap_or(""),
    )
    .await?;
    match reconcile(st.docs.as_ref(), st.payments.as_ref(), from, to).await {
        Ok(r) => Ok(Json(r)),
        Err(ReconcileError::Store(e)) => Err(e.into()),
        Err(ReconcileError::Payments(e)) => Err(provider(e)),
    }
}
