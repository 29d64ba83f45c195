//! Handlers of the credits API. Each parses and checks its input completely before it asks
//! the ledger to change anything.

use crate::AppState;
use crate::views::*;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use tally::catalog::GenerationSpec;
use tally::http::auth::{SCOPE_ADMIN, SCOPE_SETTLE};
use tally::http::{
    ApiJson, ApiQuery, Identity, Problem, ProblemDetails, idempotency_key, optional_json,
};
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Generation, GenerationStatus, Lot, Operation, Refs};
use tally::money::Credits;
use tally::service::{LedgerRequest, fingerprint};
use tally::store::{EntryQuery, GenerationQuery};

type ApiResult<T> = Result<T, Problem>;

const MAX_REASON_CHARS: usize = 500;

fn page_limit(limit: Option<i64>, default: usize) -> ApiResult<usize> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n as usize),
        Some(_) => Err(Problem::validation("limit", "must be between 1 and 100")),
    }
}

fn parse_generation_id(raw: &str) -> ApiResult<GenerationId> {
    GenerationId::parse(raw).map_err(|e| Problem::validation("id", &e.to_string()))
}

#[utoipa::path(get, path = "/v1/catalog", tag = "credits",
    responses((status = 200, body = CatalogView)))]
/// Plans, packs, add-on units, models and resolutions, for the pricing page.
pub async fn catalog(State(app): State<AppState>) -> Json<CatalogView> {
    let c = &app.ledger.catalog;
    Json(CatalogView {
        currency: c.currency.clone(),
        yearly_discount_pct: c.yearly_discount_pct,
        plans: c
            .plans
            .iter()
            .map(|p| PlanView {
                plan: p.clone(),
                yearly_price_cents: c.yearly_price(p).get(),
            })
            .collect(),
        packs: c.packs.clone(),
        addons: c.addons.clone(),
        models: c
            .models
            .iter()
            .map(|m| ModelView {
                id: m.id.clone(),
                name: m.name.clone(),
                workflow: m.workflow,
                pricing: m.pricing,
                max_duration_s: m.max_duration_s,
            })
            .collect(),
        resolutions: c.resolutions.clone(),
    })
}

#[utoipa::path(get, path = "/v1/balance", tag = "credits", security(("bearer" = [])),
    responses((status = 200, body = BalanceView), (status = 401, body = ProblemDetails)))]
/// Available and held credits, and the lots behind them in burn order.
pub async fn balance(State(app): State<AppState>, who: Identity) -> ApiResult<Json<BalanceView>> {
    let workspace = who.member_workspace()?;
    let state = app.ledger.workspace_now(workspace).await?;
    let b = state.balance();
    let mut lots: Vec<&Lot> = state.lots.iter().collect();
    lots.sort_by_key(|l| l.burn_key());
    Ok(Json(BalanceView {
        available: b.available,
        held: b.held,
        lots: lots
            .into_iter()
            .map(|l| LotView {
                id: l.id(),
                source: l.source,
                original: l.original,
                remaining: l.remaining,
                held: l.held,
                granted_at: l.granted_at,
                expires_at: l.expires_at,
            })
            .collect(),
    }))
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

#[utoipa::path(post, path = "/v1/generations", tag = "credits", security(("bearer" = [])),
    request_body = GenerationSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key return the first result")),
    responses((status = 201, body = Generation), (status = 402, body = ProblemDetails),
        (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Starts a generation: reserves its estimated cost as a hold.
pub async fn start_generation(
    State(app): State<AppState>,
    who: Identity,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<GenerationSpec>,
) -> ApiResult<(StatusCode, Json<Generation>)> {
    let workspace = who.member_workspace()?.clone();
    let estimate = app
        .ledger
        .catalog
        .estimate(&spec)
        .map_err(|e| Problem::validation(e.field, &e.message))?;
    let generation = GenerationId::new();
    let key = match idempotency_key(&headers, "generations")? {
        Some(k) => k,
        None => IdempotencyKey::derived(format!("gen:{generation}:hold")),
    };
    let span =
        tracing::info_span!("start_generation", workspace = %workspace, generation = %generation);
    let _enter = span.enter();
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
        .await?;
    let generation = outcome.generation.ok_or_else(Problem::internal)?;
    Ok((StatusCode::CREATED, Json(generation)))
}

/// Finds the workspace of a generation the caller may settle.
async fn settle_target(
    app: &AppState,
    who: &Identity,
    id: GenerationId,
) -> ApiResult<(WorkspaceId, Generation)> {
    let service = who.has_scope(SCOPE_SETTLE);
    let workspace = match (&who.workspace, service) {
        (Some(ws), _) => ws.clone(),
        (None, true) => app
            .ledger
            .store
            .generation_owner(id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("generation {id} does not exist")))?,
        (None, false) => return Err(Problem::forbidden("no workspace in the token")),
    };
    let record = app
        .ledger
        .store
        .generation(&workspace, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("generation {id} does not exist")))?;
    if !service && (who.role.is_none() || record.started_by != who.sub) {
        return Err(Problem::forbidden(
            "only the member who started a generation, or the generation service, may settle it",
        ));
    }
    Ok((workspace, record))
}

#[utoipa::path(post, path = "/v1/generations/{id}/complete", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = CompleteRequest,
    responses((status = 200, body = Generation), (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails)))]
/// Charges the exact cost (default: the estimate) and closes the hold. Repeats return the
/// first result.
pub async fn complete_generation(
    State(app): State<AppState>,
    who: Identity,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Generation>> {
    let id = parse_generation_id(&id)?;
    let req: CompleteRequest = optional_json(&body)?;
    let credits = req
        .credits
        .map(|c| Credits::parse_request_amount(c as i128))
        .transpose()
        .map_err(|m| Problem::validation("credits", &m))?;
    if credits.is_some() && !who.has_scope(SCOPE_SETTLE) {
        return Err(Problem::forbidden(
            "only the generation service sets the exact cost; complete without credits to charge the estimate",
        ));
    }
    let (workspace, _) = settle_target(&app, &who, id).await?;
    let span = tracing::info_span!("complete_generation", workspace = %workspace, generation = %id);
    let _enter = span.enter();
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace,
            key: IdempotencyKey::derived(format!("gen:{id}:complete")),
            fingerprint: "complete".into(),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Complete {
                generation: id,
                credits,
                record: None,
            },
        })
        .await?;
    outcome.generation.map(Json).ok_or_else(Problem::internal)
}

#[utoipa::path(post, path = "/v1/generations/{id}/fail", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = FailRequest,
    responses((status = 200, body = Generation), (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails)))]
/// Releases the hold without charge. Repeats return the first result.
pub async fn fail_generation(
    State(app): State<AppState>,
    who: Identity,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Generation>> {
    let id = parse_generation_id(&id)?;
    let req: FailRequest = optional_json(&body)?;
    let reason = req.reason.unwrap_or_else(|| "failed".into());
    if reason.trim().is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Err(Problem::validation(
            "reason",
            &format!("must be 1 to {MAX_REASON_CHARS} characters"),
        ));
    }
    let (workspace, _) = settle_target(&app, &who, id).await?;
    let span = tracing::info_span!("fail_generation", workspace = %workspace, generation = %id);
    let _enter = span.enter();
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
        .await?;
    outcome.generation.map(Json).ok_or_else(Problem::internal)
}

/// A stored generation as of now: a hold past its deadline is shown as expired even before
/// the next write on the workspace settles it.
fn as_of_now(mut g: Generation, now: chrono::DateTime<chrono::Utc>) -> Generation {
    if g.status == GenerationStatus::Held && g.deadline <= now {
        g.status = GenerationStatus::Expired;
    }
    g
}

#[utoipa::path(get, path = "/v1/generations", tag = "credits", security(("bearer" = [])),
    params(GenerationListQuery),
    responses((status = 200, body = GenerationPage), (status = 422, body = ProblemDetails)))]
/// Creation history, newest first.
pub async fn list_generations(
    State(app): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<GenerationListQuery>,
) -> ApiResult<Json<GenerationPage>> {
    let workspace = who.member_workspace()?;
    let limit = page_limit(q.limit, 20)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            serde_json::from_value::<GenerationStatus>(serde_json::Value::String(s.into())).map_err(
                |_| Problem::validation("status", "must be held, completed, failed or expired"),
            )
        })
        .transpose()?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            GenerationId::parse(c).map_err(|_| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    // Overdue holds are still stored as held until the workspace is next written; they are
    // shown (and filtered) as expired.
    let stored_status = match status {
        Some(GenerationStatus::Expired) | Some(GenerationStatus::Held) => None,
        other => other,
    };
    let now = app.ledger.clock.now();
    let mut items = Vec::new();
    let mut cursor = before;
    loop {
        let page = app
            .ledger
            .store
            .generations(
                workspace,
                &GenerationQuery {
                    before: cursor,
                    status: stored_status,
                    model: q.model.clone(),
                    limit: limit + 1,
                },
            )
            .await?;
        let exhausted = page.len() <= limit;
        for g in page {
            cursor = Some(g.id);
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
    }
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|g| g.id.to_string())
    } else {
        None
    };
    Ok(Json(GenerationPage {
        items: items
            .into_iter()
            .map(|generation| GenerationView {
                generation,
                ledger_entries: None,
            })
            .collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/generations/{id}", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = GenerationView), (status = 404, body = ProblemDetails)))]
/// One generation: model, estimate, charge, times and the journal entries behind it.
pub async fn get_generation(
    State(app): State<AppState>,
    who: Identity,
    Path(id): Path<String>,
) -> ApiResult<Json<GenerationView>> {
    let workspace = who.member_workspace()?;
    let id = parse_generation_id(&id)?;
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
    Ok(Json(GenerationView {
        generation: as_of_now(g, app.ledger.clock.now()),
        ledger_entries: Some(entries),
    }))
}

#[utoipa::path(get, path = "/v1/ledger", tag = "credits", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = EntryPage), (status = 422, body = ProblemDetails)))]
/// Journal entries, newest first.
pub async fn ledger(
    State(app): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<EntryPage>> {
    let workspace = who.member_workspace()?;
    let limit = page_limit(q.limit, 50)?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<u64>()
                .map_err(|_| Problem::validation("cursor", "unknown cursor"))
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
    Ok(Json(EntryPage { items, next_cursor }))
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
    let span = tracing::info_span!("adjust", workspace = %workspace, admin = %who.sub);
    let _enter = span.enter();
    let outcome = app
        .ledger
        .execute(LedgerRequest {
            workspace: workspace.clone(),
            key,
            fingerprint: fingerprint(&(&workspace, &req)),
            actor: who.actor(),
            refs: Refs::default(),
            op: Operation::Adjust {
                credits: req.credits,
                note: reason.to_owned(),
            },
        })
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
