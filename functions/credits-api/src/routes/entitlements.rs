//! `GET /v1/entitlements`: what the plan includes and how much of it is used.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally::http::auth::BillingManager;
use tally::http::{ApiPath, Identity, ProblemDetails};
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Interval, Operation, PlanStatus, Refs};
use tally::service::LedgerRequest;
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
    /// The custom models that take a slot (each named by the training that made it, a
    /// training still running included), oldest first; an owner or billing admin retires a
    /// finished one to free its slot.
    pub custom_models: Vec<GenerationId>,
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
    view(&app, workspace).await.map(Json)
}

#[utoipa::path(post, path = "/v1/generations/{id}/retire-model", tag = "credits", security(("bearer" = [])),
    params(super::generations::GenerationPath),
    request_body(content = Option<tally::http::NoBody>, description = "Optional: none, or an empty object"),
    responses((status = 200, body = EntitlementsView), (status = 403, body = ProblemDetails),
        (status = 404, description = "not an active custom model of this workspace", body = ProblemDetails),
        (status = 409, description = "its training is still running", body = ProblemDetails),
        (status = 422, body = ProblemDetails)))]
/// Owners and billing admins retire a trained custom model (named by its training's
/// generation id): its slot is free for another training. Once per model: a repeat
/// answers the same. The journal records it; no credits move.
pub async fn retire_model(
    State(app): State<AppState>,
    // Who may ask is decided before the id is read.
    manager: BillingManager,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    tally::http::ApiBytes(body): tally::http::ApiBytes,
) -> ApiResult<Json<EntitlementsView>> {
    let id = super::generations::parse_generation_id(&id)?;
    tally::http::no_body(&headers, &body)?;
    let key = format!("gen:{id}:retire");
    app.ledger
        .execute(LedgerRequest {
            workspace: manager.workspace.clone(),
            key: IdempotencyKey::derived(key.clone()),
            fingerprint: key,
            actor: manager.who.actor(),
            refs: Refs::default(),
            op: Operation::RetireModel { generation: id },
        })
        .await?;
    view(&app, &manager.workspace).await.map(Json)
}

async fn view(app: &AppState, workspace: &WorkspaceId) -> ApiResult<EntitlementsView> {
    let state = app.ledger.workspace_now(workspace).await?;
    let catalog = &app.ledger.catalog;
    // The plan is shown whatever its status; what it gives comes from the one rule for
    // the plan in effect, so a paused or canceled plan shows no slots or discounts.
    let given = Entitlements::of(state.plan.as_ref(), catalog);
    Ok(EntitlementsView {
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
        custom_models: state.custom_models.clone(),
        support: given.support.to_owned(),
        pack_discount_pct: given.pack_discount_pct,
        rollover_days: given.rollover_days,
    })
}
