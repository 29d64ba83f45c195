//! `/v1/generations`: start a generation (a hold on its estimate), complete or fail it,
//! and read the creation history. Each handler parses and checks its input completely
//! before it asks the ledger to change anything.
//!
//! The ledger call of each request runs instrumented with the request's span rather than
//! inside an entered one: a guard held across `.await` would leave the span current while
//! other requests on the thread run, and their log lines would land under it.

use super::{ApiResult, MAX_REASON_CHARS, page_limit};
use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use tally::catalog::{GenerationSpec, Workflow};
use tally::http::auth::{Settler, WorkspaceMember};
use tally::http::{
    ApiBytes, ApiJson, ApiPath, ApiQuery, Identity, Problem, ProblemDetails, idempotency_key,
    optional_json,
};
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Entry, Generation, GenerationStatus, Operation, Refs};
use tally::money::Credits;
use tally::service::{LedgerRequest, fingerprint};
use tally::store::GenerationQuery;
use tracing::Instrument;
use utoipa::{IntoParams, ToSchema};

pub(crate) fn parse_generation_id(raw: &str) -> ApiResult<GenerationId> {
    GenerationId::parse(raw).map_err(|e| Problem::validation("id", &e.to_string()))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The exact cost; defaults to the held estimate.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub credits: Option<i64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    /// Defaults to `failed`.
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationView {
    #[serde(flatten)]
    pub generation: Generation,
    /// The journal entries that moved this generation's credits (detail view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_entries: Option<Vec<Entry>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationPage {
    pub items: Vec<GenerationView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GenerationListQuery {
    /// Only generations in this state.
    #[param(inline)]
    pub status: Option<GenerationStatus>,
    /// Only generations of this model.
    #[param(max_length = 200)]
    pub model: Option<String>,
    /// Only generations started by this member (their user id, the token's `sub`).
    #[param(max_length = 200)]
    pub started_by: Option<String>,
    /// Only generations of this workflow.
    #[param(inline)]
    pub workflow: Option<Workflow>,
    /// Only generations created at or after this instant (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: Option<DateTime<FixedOffset>>,
    /// Only generations created before this instant (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: Option<DateTime<FixedOffset>>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub cursor: Option<String>,
    /// 1-100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

/// The `{id}` of a generation route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct GenerationPath {
    /// `gen_` and a ULID in canonical form.
    #[param(pattern = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub id: String,
}

#[utoipa::path(post, path = "/v1/generations", tag = "credits", security(("bearer" = [])),
    request_body = GenerationSpec,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key return the first result")),
    responses((status = 201, body = Generation), (status = 402, body = ProblemDetails),
        (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Starts a generation: reserves its estimated cost as a hold.
pub async fn start_generation(
    State(app): State<AppState>,
    WorkspaceMember { who, workspace }: WorkspaceMember,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<GenerationSpec>,
) -> ApiResult<(StatusCode, Json<Generation>)> {
    let estimate = app
        .ledger
        .catalog
        .estimate(&spec)
        .map_err(|e| Problem::validation(e.field, &e.message))?;
    let generation = GenerationId::at(app.ledger.clock.now());
    let key = match idempotency_key(&headers, "generations")? {
        Some(k) => k,
        None => IdempotencyKey::derived(format!("gen:{generation}:hold")),
    };
    let span =
        tracing::info_span!("start_generation", workspace = %workspace, generation = %generation);
    let deadline = app.ledger.clock.now() + app.ledger.catalog.hold_lifetime(estimate.workflow);
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace,
            key,
            fingerprint: fingerprint(&(&who.sub, &spec)),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Hold {
                generation,
                estimate,
                deadline,
            },
        })
        .instrument(span)
        .await?;
    let generation = outcome.generation.ok_or_else(Problem::internal)?;
    Ok((StatusCode::CREATED, Json(generation)))
}

/// Finds the workspace of a generation to settle. Settling belongs to the generation
/// service (the [`Settler`] extractor): it alone knows whether the work succeeded and what
/// it cost, so members (even the one who started it) cannot fail it while it runs or
/// complete it at the estimate.
///
/// A token that names its workspace costs no read here: the ledger's own read finds the
/// generation there or answers 404 (another workspace's generation is as missing).
async fn settle_target(app: &AppState, who: &Identity, id: GenerationId) -> ApiResult<WorkspaceId> {
    match &who.workspace {
        Some(ws) => Ok(ws.clone()),
        None => app
            .ledger
            .store
            .generation_owner(id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("generation {id} does not exist"))),
    }
}

#[utoipa::path(post, path = "/v1/generations/{id}/complete", tag = "credits", security(("bearer" = [])),
    params(GenerationPath), request_body(content = CompleteRequest, description = "Optional: an empty body means the defaults"),
    responses((status = 200, body = Generation), (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails)))]
/// The generation service charges the exact cost (default: the estimate) and closes the
/// hold. A repeat with the same amount returns the first result; another amount is a 409.
pub async fn complete_generation(
    State(app): State<AppState>,
    // Who may settle is decided before the request is read: others learn nothing.
    Settler(who): Settler,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<Generation>> {
    let id = parse_generation_id(&id)?;
    let req: CompleteRequest = optional_json(&headers, &body)?;
    let credits = req
        .credits
        .map(|c| Credits::parse_request_amount(c as i128))
        .transpose()
        .map_err(|m| Problem::validation("credits", &m))?;
    let workspace = settle_target(&app, &who, id).await?;
    let span = tracing::info_span!("complete_generation", workspace = %workspace, generation = %id);
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace,
            key: IdempotencyKey::derived(format!("gen:{id}:complete")),
            // The amount is part of the request: a replay with another amount is a
            // conflict, not the first result. No amount means the estimate, so both
            // spellings of the same completion are the same request (the ledger compares
            // the cost asked for with the one recorded).
            fingerprint: fingerprint(&("complete", credits.map(Credits::get))),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Complete {
                generation: id,
                credits,
                record: None,
            },
        })
        .instrument(span)
        .await?;
    outcome.generation.map(Json).ok_or_else(Problem::internal)
}

#[utoipa::path(post, path = "/v1/generations/{id}/fail", tag = "credits", security(("bearer" = [])),
    params(GenerationPath), request_body(content = FailRequest, description = "Optional: an empty body means the defaults"),
    responses((status = 200, body = Generation), (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails)))]
/// The generation service releases the hold without charge. Repeats return the first
/// result.
pub async fn fail_generation(
    State(app): State<AppState>,
    // Who may settle is decided before the request is read: others learn nothing.
    Settler(who): Settler,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Json<Generation>> {
    let id = parse_generation_id(&id)?;
    let req: FailRequest = optional_json(&headers, &body)?;
    let reason = match &req.reason {
        Some(r) => tally::http::text::one_line("reason", r, MAX_REASON_CHARS)?.to_owned(),
        None => "failed".to_owned(),
    };
    let workspace = settle_target(&app, &who, id).await?;
    let span = tracing::info_span!("fail_generation", workspace = %workspace, generation = %id);
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace,
            key: IdempotencyKey::derived(format!("gen:{id}:fail")),
            fingerprint: "fail".into(),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Fail {
                generation: id,
                reason,
                record: None,
            },
        })
        .instrument(span)
        .await?;
    outcome.generation.map(Json).ok_or_else(Problem::internal)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReverseRequest {
    /// Why the charge is given back (the faulty output), kept on the journal entry.
    #[schema(schema_with = tally::http::text::text_schema)]
    pub reason: String,
    /// The support ticket that asked for it (`tkt_...`, a ticket of the generation's
    /// workspace; from the generation service, another is left out).
    #[schema(pattern = "^tkt_[A-Za-z0-9]{26}$")]
    pub ticket: Option<String>,
}

#[utoipa::path(post, path = "/v1/generations/{id}/reverse", tag = "credits", security(("bearer" = [])),
    params(GenerationPath), request_body = ReverseRequest,
    responses((status = 200, body = Generation), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails),
        (status = 422, body = ProblemDetails)))]
/// Support staff (scope `credits:admin`) or the generation service (scope
/// `credits:settle`) give back the charge of a completed generation whose output was
/// faulty. Once per generation: a repeat answers with the first result.
pub async fn reverse_generation(
    State(app): State<AppState>,
    tally::http::auth::StaffOrSettler(who): tally::http::auth::StaffOrSettler,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ReverseRequest>,
) -> ApiResult<Json<Generation>> {
    let staff = who.has_scope(tally::http::auth::SCOPE_ADMIN);
    let id = parse_generation_id(&id)?;
    let reason = tally::http::text::one_line("reason", &req.reason, MAX_REASON_CHARS)?;
    if let Some(t) = req.ticket.as_deref()
        && !tally::support::valid_id(t)
    {
        return Err(Problem::validation(
            "ticket",
            "must be a support ticket id (tkt_...)",
        ));
    }
    // Staff act on any workspace: the generation says which.
    let workspace = if staff {
        let mut anyone = who.clone();
        anyone.workspace = None;
        settle_target(&app, &anyone, id).await?
    } else {
        settle_target(&app, &who, id).await?
    };
    // The ticket, for the audit trail: one of the generation's workspace. Staff naming
    // another are told; one the generation service names that is not the workspace's is
    // left out (a reversal of a faulty output never fails for it).
    let ticket = match req.ticket.as_deref() {
        Some(t) if staff => {
            Some(tally::support::ticket_of(app.docs.as_ref(), "ticket", t, &workspace).await?)
        }
        Some(t) => {
            match tally::support::ticket_of(app.docs.as_ref(), "ticket", t, &workspace).await {
                Ok(t) => Some(t),
                // Not a ticket of the workspace; anything else (the store out of reach) is
                // an error, retried with the same answer.
                Err(p) if p.status.is_client_error() => {
                    tracing::warn!(generation = %id, "a reversal named no ticket of its workspace; not recorded");
                    None
                }
                Err(p) => return Err(p),
            }
        }
        None => None,
    };
    let span = tracing::info_span!("reverse_generation", workspace = %workspace, generation = %id);
    let outcome = tally::service::reverse_generation(
        &app.ledger,
        workspace.clone(),
        id,
        who.actor(),
        reason.to_owned(),
        ticket,
    )
    .instrument(span)
    .await?;
    match outcome.generation {
        Some(g) => Ok(Json(g)),
        // Support intake gave this charge back first, under the same key: the answer is
        // the generation as that left it, and no second credit.
        None => app
            .ledger
            .store
            .generation(&workspace, id)
            .await?
            .map(|g| Json(as_of_now(g, app.ledger.clock.now())))
            .ok_or_else(Problem::internal),
    }
}

/// A stored generation as of now: a hold past its deadline is shown as expired even before
/// the next write on the workspace settles it.
fn as_of_now(g: Generation, now: chrono::DateTime<chrono::Utc>) -> Generation {
    g.as_of(now)
}

#[utoipa::path(get, path = "/v1/generations", tag = "credits", security(("bearer" = [])),
    params(GenerationListQuery),
    responses((status = 200, body = GenerationPage), (status = 422, body = ProblemDetails)))]
/// Creation history, newest first.
pub async fn list_generations(
    State(app): State<AppState>,
    // Who may ask is decided before the query is read.
    member: WorkspaceMember,
    ApiQuery(q): ApiQuery<GenerationListQuery>,
) -> ApiResult<Json<GenerationPage>> {
    let workspace = &member.workspace;
    generations_page(&app, workspace, q).await.map(Json)
}

/// The filters of a creation-history query, checked.
pub(crate) fn filters(
    model: Option<&str>,
    started_by: Option<&str>,
    workflow: Option<Workflow>,
    from: Option<DateTime<FixedOffset>>,
    to: Option<DateTime<FixedOffset>>,
) -> ApiResult<GenerationQuery> {
    // Text filters match exactly; they are only bounded (a filter matching nothing finds
    // nothing).
    let text = |field: &str, v: Option<&str>| {
        v.map(|v| {
            if v.chars().count() > 200 {
                Err(Problem::validation(field, "must be at most 200 characters"))
            } else {
                Ok(v.to_owned())
            }
        })
        .transpose()
    };
    // A range that ends before it starts holds nothing.
    let from = tally::http::text::instant("from", from)?;
    let to = tally::http::text::instant("to", to)?;
    Ok(GenerationQuery {
        model: text("model", model)?,
        started_by: text("started_by", started_by)?,
        workflow,
        from,
        to,
        ..GenerationQuery::default()
    })
}

/// Most generations one page reads while filtering.
pub const MAX_SCANNED: usize = 1_000;

/// A page of `workspace`'s creation history.
pub(crate) async fn generations_page(
    app: &AppState,
    workspace: &WorkspaceId,
    q: GenerationListQuery,
) -> ApiResult<GenerationPage> {
    let limit = page_limit(q.limit, 20)?;
    let status = q.status;
    let base = filters(
        q.model.as_deref(),
        q.started_by.as_deref(),
        q.workflow,
        q.from,
        q.to,
    )?;
    let to = base.to;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            GenerationId::parse(c).map_err(|_| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    // Overdue holds are still stored as held until the workspace is next written; they are
    // shown (and filtered) as expired. A status is read from the store's status index, so
    // a filter reads only generations that had it, not the whole history. Held is read
    // first: a generation settled between the two reads is then found by both (and listed
    // once), never by neither, since nothing goes back to held.
    let stored_statuses = match status {
        None => vec![None],
        Some(GenerationStatus::Expired) => {
            vec![
                Some(GenerationStatus::Held),
                Some(GenerationStatus::Expired),
            ]
        }
        Some(s) => vec![Some(s)],
    };
    let now = app.ledger.clock.now();
    let mut items = Vec::new();
    // A range in the past starts below everything made after it.
    let mut cursor = GenerationQuery {
        before,
        to,
        ..GenerationQuery::default()
    }
    .upper();
    // A filter that matches little must not read the whole history in one request: past
    // this many generations read, the page ends (perhaps short) with a cursor to go on.
    let mut scanned = 0usize;
    let mut stopped = false;
    let filter = base.clone();
    loop {
        // Raw pages, filtered here: every generation read is counted.
        const RAW_PAGE: usize = 100;
        let mut page = Vec::new();
        let mut exhausted = true;
        for stored in &stored_statuses {
            let part = app
                .ledger
                .store
                .generations(
                    workspace,
                    &GenerationQuery {
                        before: cursor,
                        status: *stored,
                        limit: RAW_PAGE,
                        ..GenerationQuery::default()
                    },
                )
                .await?;
            exhausted &= part.len() < RAW_PAGE;
            page.extend(part);
        }
        // Two statuses merged newest first: what is past this page comes next time. A
        // generation both found (settled between the reads, or an index still showing its
        // old entry beside the new) is listed once, as settled.
        page.sort_by_key(|g| (std::cmp::Reverse(g.id), g.status == GenerationStatus::Held));
        page.dedup_by_key(|g| g.id);
        exhausted &= page.len() <= RAW_PAGE;
        page.truncate(RAW_PAGE);
        for g in page {
            scanned += 1;
            cursor = Some(g.id);
            if base.past_range(&g) {
                exhausted = true;
                break;
            }
            if !tally::store::matches_query(&g, &filter) {
                continue;
            }
            let g = as_of_now(g, now);
            if status.is_none_or(|s| g.status == s) {
                items.push(g);
            }
            if items.len() > limit {
                break;
            }
        }
        if items.len() > limit || exhausted {
            break;
        }
        if scanned >= MAX_SCANNED {
            stopped = true;
            break;
        }
    }
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|g| g.id.to_string())
    } else if stopped {
        cursor.map(|c| c.to_string())
    } else {
        None
    };
    Ok(GenerationPage {
        items: items
            .into_iter()
            .map(|generation| GenerationView {
                generation,
                ledger_entries: None,
            })
            .collect(),
        next_cursor,
    })
}

/// One generation of `workspace` with its journal entries.
pub(crate) async fn generation_detail(
    app: &AppState,
    workspace: &WorkspaceId,
    id: &str,
) -> ApiResult<GenerationView> {
    let id = parse_generation_id(id)?;
    let g = app
        .ledger
        .store
        .generation(workspace, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("generation {id} does not exist")))?;
    let entries = app
        .ledger
        .store
        .entries_by_seq(workspace, &g.entries)
        .await?;
    Ok(GenerationView {
        generation: as_of_now(g, app.ledger.clock.now()),
        ledger_entries: Some(entries),
    })
}

#[utoipa::path(get, path = "/v1/generations/{id}", tag = "credits", security(("bearer" = [])),
    params(GenerationPath),
    responses((status = 200, body = GenerationView), (status = 404, body = ProblemDetails)))]
/// One generation: model, estimate, charge, times and the journal entries behind it.
pub async fn get_generation(
    State(app): State<AppState>,
    who: Identity,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<GenerationView>> {
    let workspace = who.member_workspace()?;
    generation_detail(&app, workspace, &id).await.map(Json)
}
