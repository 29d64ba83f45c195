//! `GET /v1/billing/history`: every money movement of the workspace, newest first; support
//! staff read any workspace's at `GET /v1/admin/workspaces/{workspace_id}/billing/history`.

use super::ApiResult;
use super::custom_payments::WorkspacePath;
use super::{Buyer, page_limit};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use tally::billing::history::{self, HISTORY_PREFIX, HistoryQuery, Movement, MovementKind};
use tally::http::auth::Staff;
use tally::http::{ApiPath, ApiQuery, Problem, ProblemDetails};
use tally::ids::WorkspaceId;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// Only these kinds, comma-separated: `subscription`, `pack`, `top_up`,
    /// `custom_payment`, `invoice`, `refund`, `dispute`.
    #[param(
        pattern = "^(subscription|pack|top_up|custom_payment|invoice|refund|dispute)(,(subscription|pack|top_up|custom_payment|invoice|refund|dispute))*$"
    )]
    pub kind: Option<String>,
    /// Movements created at or after this time (RFC 3339, years 2000 to 2099).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: Option<DateTime<FixedOffset>>,
    /// Movements created before this time (RFC 3339, years 2000 to 2099); at or before
    /// `from`, nothing.
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: Option<DateTime<FixedOffset>>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,12}-[A-Za-z0-9_]{1,100}$")]
    pub cursor: Option<String>,
    /// 1-100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    pub items: Vec<Movement>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/billing/history", tag = "billing", security(("bearer" = [])),
    params(HistoryParams),
    responses((status = 200, body = HistoryPage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Billing history: invoices (sign-up, renewal, changes), pack purchases, auto top-ups,
/// custom payments, refunds and disputes, newest first, each with its amount, status, the
/// credits it granted or took back, its invoice and receipt links and its payment.
pub async fn history(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> ApiResult<Json<HistoryPage>> {
    read(&st, &workspace, q).await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/billing/history", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, HistoryParams),
    responses((status = 200, body = HistoryPage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: any workspace's billing history.
pub async fn admin_history(
    State(st): State<PurchasesState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: axum::http::Uri,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> ApiResult<Json<HistoryPage>> {
    let staff = tally::audit::staff_read(
        st.docs.as_ref(),
        st.ledger.store.as_ref(),
        st.ledger.clock.now(),
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/billing/history",
        uri.query().unwrap_or(""),
    )
    .await?;
    // Recorded once the answer is ready: an invalid query records nothing.
    let page = read(&st, &staff.workspace, q).await;
    staff.answered(st.docs.as_ref(), page).await
}

async fn read(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    q: HistoryParams,
) -> ApiResult<Json<HistoryPage>> {
    let limit = page_limit(q.limit)?;
    let kinds = match &q.kind {
        None => Vec::new(),
        Some(k) => k
            .split(',')
            .map(|k| {
                MovementKind::parse(k)
                    .ok_or_else(|| Problem::validation("kind", &format!("unknown kind {k:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            history::sk_of(c, HISTORY_PREFIX)
                .ok_or_else(|| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    let (items, next) = history::page(
        st.docs.as_ref(),
        workspace,
        &HistoryQuery {
            kinds,
            from: tally::http::text::instant("from", q.from)?,
            to: tally::http::text::instant("to", q.to)?,
            cursor,
            limit,
        },
    )
    .await?;
    Ok(Json(HistoryPage {
        items,
        next_cursor: next.and_then(|sk| history::cursor_of(&sk, HISTORY_PREFIX)),
    }))
}
