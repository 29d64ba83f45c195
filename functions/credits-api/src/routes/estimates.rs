//! `POST /v1/estimates`: what a generation would cost, and whether it is affordable now.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use tally::catalog::{Estimate, GenerationSpec};
use tally::http::auth::WorkspaceMember;
use tally::http::{ApiJson, Problem, ProblemDetails};
use tally::ids::GenerationId;
use tally::ledger::Operation;
use tally::money::Credits;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct EstimateView {
    #[serde(flatten)]
    pub estimate: Estimate,
    pub available: Credits,
    /// Whether the workspace can start this generation now.
    pub sufficient: bool,
    /// Why starting it now would be refused (the same code and detail `POST
    /// /v1/generations` would answer); absent when it would start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<RefusalView>,
}

/// A refusal the start of a generation would meet.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefusalView {
    /// The problem code, e.g. `insufficient_credits` or `no_custom_model_slot`.
    pub code: String,
    pub detail: String,
}

#[utoipa::path(post, path = "/v1/estimates", tag = "credits", security(("bearer" = [])),
    request_body = GenerationSpec,
    responses((status = 200, body = EstimateView), (status = 422, body = ProblemDetails)))]
/// What a generation would cost, and whether the workspace can afford it now.
pub async fn estimate(
    State(app): State<AppState>,
    WorkspaceMember { who, workspace }: WorkspaceMember,
    ApiJson(spec): ApiJson<GenerationSpec>,
) -> ApiResult<Json<EstimateView>> {
    let workspace = &workspace;
    let estimate = app
        .ledger
        .catalog
        .estimate(&spec)
        .map_err(|e| Problem::validation(e.field, &e.message))?;
    // Ask the ledger exactly what the start would ask it, and keep its answer.
    let deadline = app.ledger.clock.now() + app.ledger.catalog.hold_lifetime(estimate.workflow);
    let preview = app
        .ledger
        .preview(
            workspace,
            who.actor(),
            Operation::Hold {
                generation: GenerationId::at(app.ledger.clock.now()),
                estimate: estimate.clone(),
                deadline,
            },
        )
        .await?;
    let available = app
        .ledger
        .workspace_now(workspace)
        .await?
        .balance()
        .available;
    let refusal = preview.err().map(|e| {
        let p = Problem::from(e);
        RefusalView {
            code: p.code.to_owned(),
            detail: p.detail,
        }
    });
    Ok(Json(EstimateView {
        sufficient: refusal.is_none(),
        refusal,
        available,
        estimate,
    }))
}
