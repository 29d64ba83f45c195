//! `GET /v1/ledger`: the workspace's journal, newest first.

use super::{ApiResult, page_limit};
use crate::AppState;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use tally::http::auth::WorkspaceMember;
use tally::http::{ApiQuery, Problem, ProblemDetails};
use tally::ledger::Entry;
use tally::store::EntryQuery;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
    /// 1-100, default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntryPage {
    pub items: Vec<Entry>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/ledger", tag = "credits", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = EntryPage), (status = 422, body = ProblemDetails)))]
/// Journal entries, newest first.
pub async fn ledger(
    State(app): State<AppState>,
    // Who may ask is decided before the query is read.
    member: WorkspaceMember,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<EntryPage>> {
    let workspace = &member.workspace;
    ledger_page(&app, workspace, q).await.map(Json)
}

/// A page of `workspace`'s journal.
pub(crate) async fn ledger_page(
    app: &AppState,
    workspace: &tally::ids::WorkspaceId,
    q: PageQuery,
) -> ApiResult<EntryPage> {
    let limit = page_limit(q.limit, 50)?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            // Digits only: `u64::from_str` would also take a sign.
            (!c.is_empty() && c.len() <= 19 && c.bytes().all(|b| b.is_ascii_digit()))
                .then(|| c.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    let mut items = app
        .ledger
        .store
        .entries(
            workspace,
            &EntryQuery {
                before,
                limit: limit + 1,
            },
        )
        .await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(EntryPage { items, next_cursor })
}
