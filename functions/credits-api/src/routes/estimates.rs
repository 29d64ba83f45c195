//! `POST /v1/estimates`: what a generation would cost, and whether it is affordable now.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use tally::catalog::{Estimate, GenerationSpec};
use tally::http::{ApiJson, Identity, Problem, ProblemDetails};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct EstimateView {
    #[serde(flatten)]
    pub estimate: Estimate,
    pub available: u64,
    /// Whether the workspace can start this generation now.
    pub sufficient: bool,
}

#[utoipa::path(post, path = "/v1/estimates", tag = "credits", security(("bearer" = [])),
    request_body = GenerationSpec,
    responses((status = 200, body = EstimateView), (status = 422, body = ProblemDetails)))]
/// What a generation would cost, and whether the workspace can afford it now.
pub async fn estimate(
    State(app): State<AppState>,
    who: Identity,
    ApiJson(spec): ApiJson<GenerationSpec>,
) -> ApiResult<Json<EstimateView>> {
    let workspace = who.member_workspace()?;
    let estimate = app
        .ledger
        .catalog
        .estimate(&spec)
        .map_err(|e| Problem::validation(e.field, &e.message))?;
    let available = app
        .ledger
        .workspace_now(workspace)
        .await?
        .balance()
        .available;
    Ok(Json(EstimateView {
        sufficient: available >= estimate.credits.get(),
        available,
        estimate,
    }))
}
