//! `POST /v1/admin/workspaces/{workspace_id}/adjustments`: goodwill grants and corrections
//! by support staff.

use super::{ApiResult, MAX_REASON_CHARS};
use crate::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::http::auth::SCOPE_ADMIN;
use tally::http::{ApiJson, Identity, Problem, ProblemDetails, idempotency_key};
use tally::ids::WorkspaceId;
use tally::ledger::{Balance, Operation, Refs};
use tally::money::CreditDelta;
use tally::service::{LedgerRequest, fingerprint};
use tracing::Instrument;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Signed: positive grants credits (never expiring), negative takes them back.
    pub credits: i64,
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentView {
    pub entries: Vec<u64>,
    pub balance: Balance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
}

#[utoipa::path(post, path = "/v1/admin/workspaces/{workspace_id}/adjustments", tag = "admin",
    security(("bearer" = [])), params(("workspace_id" = String, Path),
        ("Idempotency-Key" = String, Header, description = "Required: adjustments move money")),
    request_body = AdjustmentRequest,
    responses((status = 201, body = AdjustmentView), (status = 402, body = ProblemDetails),
        (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// A goodwill grant (positive) or correction (negative) by support staff.
pub async fn adjust(
    State(app): State<AppState>,
    who: Identity,
    Path(workspace_id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AdjustmentRequest>,
) -> ApiResult<(StatusCode, Json<AdjustmentView>)> {
    who.require_scope(SCOPE_ADMIN)?;
    let workspace = WorkspaceId::parse(&workspace_id)
        .map_err(|e| Problem::validation("workspace_id", &e.to_string()))?;
    let key = idempotency_key(&headers, "adjustments")?
        .ok_or_else(|| Problem::validation("Idempotency-Key", "required for adjustments"))?;
    if req.credits == 0 || req.credits.unsigned_abs() > tally::money::MAX_CREDITS_PER_REQUEST {
        return Err(Problem::validation(
            "credits",
            &format!(
                "must be non-zero and at most {} either way",
                tally::money::MAX_CREDITS_PER_REQUEST
            ),
        ));
    }
    let reason = req.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Err(Problem::validation(
            "reason",
            &format!("must be 1 to {MAX_REASON_CHARS} characters"),
        ));
    }
    // Instrumented, not entered: the span is current only while this request's future runs.
    let span = tracing::info_span!("adjust", workspace = %workspace, admin = %who.sub);
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace: workspace.clone(),
            key,
            fingerprint: fingerprint(&(&workspace, &req)),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Adjust {
                credits: CreditDelta::new(req.credits),
                note: reason.to_owned(),
            },
        })
        .instrument(span)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(AdjustmentView {
            entries: outcome.entries,
            balance: outcome.balance,
            lot: outcome.lot,
        }),
    ))
}
