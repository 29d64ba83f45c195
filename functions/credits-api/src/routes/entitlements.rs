//! `GET /v1/entitlements`: what the plan includes and how much of it is used.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally::http::{Identity, ProblemDetails};
use tally::ledger::{Interval, PlanStatus};
use tally::subscriptions::Entitlements;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
/// The plan in effect as the ledger knows it (the payment side is `GET /v1/subscription`).
pub struct PlanInEffect {
    pub plan: String,
    pub name: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsView {
    pub plan: Option<PlanInEffect>,
    pub custom_model_slots: u32,
    pub custom_models_used: u32,
    pub support: String,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
}

#[utoipa::path(get, path = "/v1/entitlements", tag = "credits", security(("bearer" = [])),
    responses((status = 200, body = EntitlementsView), (status = 403, body = ProblemDetails)))]
/// What the plan includes and how much of it is used.
pub async fn entitlements(
    State(app): State<AppState>,
    who: Identity,
) -> ApiResult<Json<EntitlementsView>> {
    let workspace = who.member_workspace()?;
    let state = app.ledger.workspace_now(workspace).await?;
    let catalog = &app.ledger.catalog;
    // The plan is shown whatever its status; what it gives comes from the one rule for
    // the plan in effect, so a paused or canceled plan shows no slots or discounts.
    let given = Entitlements::of(state.plan.as_ref(), catalog);
    Ok(Json(EntitlementsView {
        plan: state.plan.as_ref().map(|p| PlanInEffect {
            plan: p.plan.clone(),
            name: catalog
                .plan(&p.plan)
                .map_or_else(|| p.plan.clone(), |d| d.name.clone()),
            interval: p.interval,
            status: p.status,
            period_end: p.period_end,
            cancel_at_period_end: p.cancel_at_period_end,
        }),
        custom_model_slots: given.custom_model_slots,
        custom_models_used: state.custom_models.len() as u32,
        support: given.support.to_owned(),
        pack_discount_pct: given.pack_discount_pct,
        rollover_days: given.rollover_days,
    }))
}
