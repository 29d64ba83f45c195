//! `POST /v1/admin/workspaces/{workspace_id}/adjustments`: goodwill grants and corrections
//! by support staff.

use super::{ApiResult, MAX_REASON_CHARS};
use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::http::auth::Staff;
use tally::http::{ApiJson, ApiPath, Problem, ProblemDetails, idempotency_key};
use tally::ids::WorkspaceId;
use tally::ledger::{Balance, Operation, Refs};
use tally::money::CreditDelta;
use tally::service::{LedgerRequest, fingerprint};
use tracing::Instrument;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Signed: positive grants credits (never expiring), negative takes them back; never
    /// zero, at most 10,000,000 either way.
    #[schema(schema_with = adjustment_credits_schema)]
    pub credits: i64,
    #[schema(schema_with = tally::http::text::text_schema)]
    pub reason: String,
    /// The support ticket this adjustment answers (`tkt_...`); it must be a ticket of the
    /// workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^tkt_[A-Za-z0-9]{26}$")]
    pub ticket: Option<String>,
    /// The generation it concerns, if any (it must belong to the workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub generation: Option<String>,
}

/// Credits taken back (-10,000,000 to -1) or granted (1 to 10,000,000).
fn adjustment_credits_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    let max = tally::money::MAX_CREDITS_PER_REQUEST as f64;
    let range = |lo: f64, hi: f64| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(lo))
            .maximum(Some(hi))
    };
    OneOfBuilder::new()
        .item(range(-max, -1.0))
        .item(range(1.0, max))
        .build()
        .into()
}

/// The `{workspace_id}` of an admin route.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspacePath {
    /// A workspace id: letters, digits, `-`, `_`, `.` and `:`, starting with a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    pub workspace_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentView {
    pub entries: Vec<u64>,
    pub balance: Balance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
}

#[utoipa::path(post, path = "/v1/admin/workspaces/{workspace_id}/adjustments", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath,
        ("Idempotency-Key" = String, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Required: adjustments move money")),
    request_body = AdjustmentRequest,
    responses((status = 201, body = AdjustmentView), (status = 402, body = ProblemDetails),
        (status = 403, body = ProblemDetails), (status = 404, body = ProblemDetails),
        (status = 422, body = ProblemDetails)))]
/// A goodwill grant (positive) or correction (negative) by support staff.
pub async fn adjust(
    State(app): State<AppState>,
    // Who may adjust is decided before the request is read.
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AdjustmentRequest>,
) -> ApiResult<(StatusCode, Json<AdjustmentView>)> {
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
    let reason = tally::http::text::one_line("reason", &req.reason, MAX_REASON_CHARS)?;
    if let Some(t) = req.ticket.as_deref()
        && !tally::support::valid_id(t)
    {
        return Err(Problem::validation(
            "ticket",
            "must be a support ticket id (tkt_...)",
        ));
    }
    let generation = req
        .generation
        .as_deref()
        .map(|g| {
            tally::ids::GenerationId::parse(g)
                .map_err(|e| Problem::validation("generation", &e.to_string()))
        })
        .transpose()?;
    // A mistyped id must not create a workspace with credits nobody can reach: only a
    // workspace with a journal or a billing profile is adjusted.
    let exists =
        tally::audit::workspace_exists(app.ledger.store.as_ref(), app.docs.as_ref(), &workspace)
            .await?;
    if !exists {
        return Err(Problem::not_found(format!(
            "workspace {workspace} has no journal and no billing profile; check the id"
        )));
    }
    let ticket = match req.ticket.as_deref() {
        Some(t) => {
            Some(tally::support::ticket_of(app.docs.as_ref(), "ticket", t, &workspace).await?)
        }
        None => None,
    };
    if let Some(g) = generation {
        let owned = app.ledger.store.generation(&workspace, g).await?.is_some();
        if !owned {
            return Err(Problem::not_found(format!(
                "generation {g} does not belong to workspace {workspace}"
            )));
        }
    }
    let print = fingerprint(&(&workspace, &req));
    // Instrumented, not entered: the span is current only while this request's future runs.
    let span = tracing::info_span!("adjust", workspace = %workspace, admin = %who.sub);
    // On the staff ledger: a debit's crossing alerts but buys no pack.
    let run = app
        .staff_ledger
        .execute(LedgerRequest {
            workspace: workspace.clone(),
            key: key.clone(),
            fingerprint: print.clone(),
            actor: who.actor(),
            refs: Refs {
                ticket,
                generation,
                ..Refs::default()
            },
            op: Operation::Adjust {
                credits: CreditDelta::new(req.credits),
                note: reason.to_owned(),
            },
        })
        .instrument(span);
    // The key names this request whatever workspace it names.
    let outcome = tally::http::idempotency::under_staff_key(
        app.docs.as_ref(),
        "adjust",
        &key,
        &print,
        app.ledger.clock.now(),
        async { run.await.map_err(Problem::from) },
    )
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
