//! `GET /v1/balance`: available and held credits, and the lots behind them.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally::http::{Identity, ProblemDetails};
use tally::ledger::{Lot, LotSource};
use tally::money::Credits;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct LotView {
    pub id: String,
    pub source: LotSource,
    pub original: Credits,
    pub remaining: Credits,
    pub held: Credits,
    /// Credits of a disputed payment: not spendable until the dispute closes.
    pub frozen: Credits,
    pub granted_at: DateTime<Utc>,
    /// Absent for credits that never expire while the workspace is active.
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceView {
    pub available: Credits,
    pub held: Credits,
    /// Credits of disputed payments: not spendable until their disputes close.
    pub frozen: Credits,
    /// Lots in burn order (spent first at the top).
    pub lots: Vec<LotView>,
}

#[utoipa::path(get, path = "/v1/balance", tag = "credits", security(("bearer" = [])),
    responses((status = 200, body = BalanceView), (status = 401, body = ProblemDetails)))]
/// Available and held credits, and the lots behind them in burn order.
pub async fn balance(State(app): State<AppState>, who: Identity) -> ApiResult<Json<BalanceView>> {
    let workspace = who.member_workspace()?;
    balance_of(&app, workspace).await.map(Json)
}

/// `workspace`'s balance and lots as of now.
pub(crate) async fn balance_of(
    app: &AppState,
    workspace: &tally::ids::WorkspaceId,
) -> ApiResult<BalanceView> {
    let state = app.ledger.workspace_now(workspace).await?;
    let b = state.balance();
    let mut lots: Vec<&Lot> = state.lots.iter().collect();
    lots.sort_by_key(|l| l.burn_key());
    Ok(BalanceView {
        available: b.available,
        held: b.held,
        frozen: b.frozen,
        lots: lots
            .into_iter()
            .map(|l| LotView {
                id: l.id(),
                source: l.source,
                original: l.original,
                remaining: l.remaining,
                held: l.held,
                frozen: l.frozen,
                granted_at: l.granted_at,
                expires_at: l.expires_at,
            })
            .collect(),
    })
}
