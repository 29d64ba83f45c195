//! `/v1/admin/workspaces/{workspace_id}/...`: support staff and finance (scope
//! `credits:admin`) read any workspace: balance and lots, journal, creation history, usage,
//! exports and the audit log. A workspace that does not exist is a 404, and every read is
//! recorded in the audit log before it is answered.

use super::ApiResult;
use super::adjustments::WorkspacePath;
use super::balance::BalanceView;
use super::generations::{GenerationListQuery, GenerationPage, GenerationView};
use super::ledger::{EntryPage, PageQuery};
use super::reports::{GenerationExportQuery, LedgerExportQuery, UsageQuery};
use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tally::audit::AuditRecord;
use tally::http::auth::Staff;
use tally::http::{ApiPath, ApiQuery, Identity, Problem, ProblemDetails};
use tally::ids::WorkspaceId;
use tally::reports::usage::Usage;
use utoipa::{IntoParams, ToSchema};

/// A staff read: the workspace must exist; `answer` reads; the read is recorded in the
/// workspace's audit log once the answer is ready (an invalid query records nothing).
async fn read<T, F, Fut>(
    app: &AppState,
    who: &Identity,
    workspace_id: &str,
    action: &str,
    uri: &Uri,
    answer: F,
) -> ApiResult<T>
where
    F: FnOnce(WorkspaceId) -> Fut,
    Fut: std::future::Future<Output = ApiResult<T>>,
{
    let read = tally::audit::staff_read(
        app.docs.as_ref(),
        app.ledger.store.as_ref(),
        app.ledger.clock.now(),
        who,
        workspace_id,
        action,
        uri.query().unwrap_or(""),
    )
    .await?;
    let out = answer(read.workspace.clone()).await;
    read.answered(app.docs.as_ref(), out).await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/balance", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath),
    responses((status = 200, body = BalanceView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's balance and lots.
pub async fn balance(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
) -> ApiResult<Json<BalanceView>> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/balance",
        &uri,
        |ws| async move { super::balance::balance_of(app, &ws).await.map(Json) },
    )
    .await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/ledger", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, PageQuery),
    responses((status = 200, body = EntryPage), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's journal, newest first.
pub async fn ledger(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<EntryPage>> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/ledger",
        &uri,
        |ws| async move { super::ledger::ledger_page(app, &ws, q).await.map(Json) },
    )
    .await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/generations", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, GenerationListQuery),
    responses((status = 200, body = GenerationPage), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's creation history, with the same filters as members have.
pub async fn generations(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<GenerationListQuery>,
) -> ApiResult<Json<GenerationPage>> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/generations",
        &uri,
        |ws| async move {
            super::generations::generations_page(app, &ws, q)
                .await
                .map(Json)
        },
    )
    .await
}

/// The `{workspace_id}` and `{id}` of an admin generation route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspaceGenerationPath {
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    pub workspace_id: String,
    #[param(pattern = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub id: String,
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/generations/{id}", tag = "admin",
    security(("bearer" = [])), params(WorkspaceGenerationPath),
    responses((status = 200, body = GenerationView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: one generation of a workspace with its journal entries.
pub async fn generation(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath((workspace_id, id)): ApiPath<(String, String)>,
    uri: Uri,
) -> ApiResult<Json<GenerationView>> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/generations/{id}",
        &uri,
        |ws| async move {
            super::generations::generation_detail(app, &ws, &id)
                .await
                .map(Json)
        },
    )
    .await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/usage", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, UsageQuery),
    responses((status = 200, body = Usage), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's credits spent, grouped.
pub async fn usage(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Usage>> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/usage",
        &uri,
        |ws| async move { super::reports::usage_of(app, &ws, q).await.map(Json) },
    )
    .await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/generations/export", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, GenerationExportQuery),
    responses((status = 200, description = "CSV (RFC 4180), newest first", content_type = "text/csv"),
        (status = 403, body = ProblemDetails), (status = 404, body = ProblemDetails),
        (status = 422, description = "invalid filters, or (`export_too_large`) a range too large for one answer", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Support staff and finance: a workspace's creation history as CSV.
pub async fn export_generations(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<GenerationExportQuery>,
) -> ApiResult<Response> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/generations/export",
        &uri,
        |ws| async move { super::reports::generations_export(app, ws, q).await },
    )
    .await
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/ledger/export", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, LedgerExportQuery),
    responses((status = 200, description = "CSV (RFC 4180), newest first", content_type = "text/csv"),
        (status = 403, body = ProblemDetails), (status = 404, body = ProblemDetails),
        (status = 422, description = "invalid filters, or (`export_too_large`) a range too large for one answer", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Support staff and finance: a workspace's journal as CSV.
pub async fn export_ledger(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<LedgerExportQuery>,
) -> ApiResult<Response> {
    let app = &app;
    read(
        app,
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/ledger/export",
        &uri,
        |ws| async move { super::reports::ledger_export(app, ws, q).await },
    )
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{13}#aud_[0-9A-HJKMNP-TV-Z]{26}$")]
    pub cursor: Option<String>,
    /// 1-100, default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/audit", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: who read this workspace, when and what, newest first (this read
/// included).
pub async fn audit(
    State(app): State<AppState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: Uri,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = super::page_limit(q.limit, 50)?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            tally::audit::cursor_sk(c)
                .ok_or_else(|| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    // This read is in its own answer: recorded first (the query is checked above).
    let ws = tally::audit::staff_read(
        app.docs.as_ref(),
        app.ledger.store.as_ref(),
        app.ledger.clock.now(),
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/audit",
        uri.query().unwrap_or(""),
    )
    .await?
    .record(app.docs.as_ref())
    .await?;
    let (items, next_cursor) =
        tally::audit::page(app.docs.as_ref(), &ws, before.as_deref(), limit).await?;
    Ok(Json(AuditPage { items, next_cursor }))
}
