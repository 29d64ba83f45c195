//! `GET /v1/entitlements`: what the plan includes and how much of it is used.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally::http::Identity;
use tally::ledger::{Interval, PlanStatus};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub plan: String,
    pub name: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsView {
    pub plan: Option<SubscriptionView>,
    pub custom_model_slots: u32,
    pub custom_models_used: u32,
    pub support: String,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
}

#[utoipa::path(get, path = "/v1/entitlements", tag = "credits", security(("bearer" = [])),
    responses((status = 200, body = EntitlementsView)))]
/// What the plan includes and how much of it is used.
pub async fn entitlements(
    State(app): State<AppState>,
    who: Identity,
) -> ApiResult<Json<EntitlementsView>> {
    let workspace = who.member_workspace()?;
    let state = app.ledger.workspace_now(workspace).await?;
    let catalog = &app.ledger.catalog;
    let plan = state
        .plan
        .as_ref()
        .and_then(|p| catalog.plan(&p.plan).map(|def| (p, def)));
    Ok(Json(EntitlementsView {
        plan: plan.map(|(p, def)| SubscriptionView {
            plan: def.id.clone(),
            name: def.name.clone(),
            interval: p.interval,
            status: p.status,
            period_end: p.period_end,
            cancel_at_period_end: p.cancel_at_period_end,
        }),
        custom_model_slots: plan.map_or(0, |(_, d)| d.custom_model_slots),
        custom_models_used: state.custom_models.len() as u32,
        support: plan.map_or_else(|| "community".into(), |(_, d)| d.support.clone()),
        pack_discount_pct: plan.map_or(0, |(_, d)| d.pack_discount_pct),
        rollover_days: plan.map_or(0, |(_, d)| d.rollover_days),
    }))
}
