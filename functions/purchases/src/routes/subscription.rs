//! `/v1/subscription`: the subscription as Stripe last described it, and changing it: plan
//! and interval, add-on units, cancel, resume, pause.
//!
//! Upgrades and more add-on units apply now: Stripe invoices the prorated difference and
//! the extra credits are granted at once. Downgrades and fewer units wait for the renewal:
//! the Stripe price changes without proration (the next invoice bills the new amount) and
//! the subscription's metadata schedules the new terms from the renewal on, so the current
//! benefits are kept until then.
//!
//! Credits granted now for an upgrade: the difference between the two plans' monthly
//! allowances, prorated over what is left of the current month of the period, rounded up.
//! Add-on units: the full credits of each new unit (they expire at the end of the period
//! and do not roll over).

use super::{ApiResult, buyer, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tally::billing::records::*;
use tally::catalog::Plan;
use tally::http::{ApiJson, Identity, Problem, ProblemDetails, idempotency_key};
use tally::ids::{IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, Interval, LotSource, Operation, PlanStatus, Refs};
use tally::money::Credits;
use tally::payments::stripe::product_id;
use tally::payments::{ItemPrice, SubscriptionChange};
use tally::service::LedgerRequest;
use tally::store::docs;
use tally::subscriptions::meta;
use utoipa::ToSchema;

/// Most add-on units a workspace may hold.
pub const MAX_ADDON_UNITS: u32 = 100;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    pub plan: String,
    pub interval: Interval,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddonsBody {
    pub units: u32,
}

/// The outcome of a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeView {
    /// `now` or `at_renewal`.
    pub effective: &'static str,
    pub effective_at: DateTime<Utc>,
    /// Credits granted right away (upgrades, more add-on units).
    pub credits_granted: u64,
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
}

/// The workspace's live subscription, or 404 / 409.
async fn live(st: &PurchasesState, workspace: &WorkspaceId) -> ApiResult<SubscriptionRecord> {
    let sub: SubscriptionRecord =
        docs::get(st.docs.as_ref(), &workspace_pk(workspace), SUBSCRIPTION_SK)
            .await?
            .ok_or_else(|| {
                Problem::not_found(
                    "the workspace has no subscription; start one with POST /v1/checkout/sessions",
                )
            })?;
    if sub.status == PlanStatus::Canceled {
        return Err(Problem::conflict(
            "the subscription has ended; start a new one with POST /v1/checkout/sessions",
        ));
    }
    Ok(sub)
}

fn plan_price(st: &PurchasesState, plan: &Plan, interval: Interval) -> ItemPrice {
    ItemPrice {
        product: product_id("plan", &plan.id),
        product_name: format!("{} plan", plan.name),
        unit_amount: match interval {
            Interval::Monthly => plan.monthly_price_cents,
            Interval::Yearly => st.ledger.catalog.yearly_price(plan).get(),
        },
        interval,
    }
}

fn addon_price(st: &PurchasesState, plan: &Plan, interval: Interval) -> ApiResult<ItemPrice> {
    let addon = st
        .ledger
        .catalog
        .addon(&plan.addon)
        .ok_or_else(Problem::internal)?;
    Ok(ItemPrice {
        product: product_id("addon", &addon.id),
        product_name: format!("{} add-on credits", addon.credits_per_unit),
        unit_amount: match interval {
            Interval::Monthly => addon.unit_price_cents,
            Interval::Yearly => addon.unit_price_cents * 12,
        },
        interval,
    })
}

/// The metadata describing the terms, with any schedule set or cleared.
fn metadata(
    workspace: &WorkspaceId,
    plan: &str,
    interval: Interval,
    units: u32,
    scheduled: Option<&ScheduledChange>,
) -> BTreeMap<String, String> {
    let iv = |i: Interval| match i {
        Interval::Monthly => "monthly".to_string(),
        Interval::Yearly => "yearly".to_string(),
    };
    let mut m = BTreeMap::from([
        (meta::WORKSPACE.to_string(), workspace.to_string()),
        (meta::PLAN.to_string(), plan.to_string()),
        (meta::INTERVAL.to_string(), iv(interval)),
        (meta::ADDON_UNITS.to_string(), units.to_string()),
    ]);
    let (sp, si, su, sf) = match scheduled {
        Some(s) => (
            s.plan.clone(),
            iv(s.interval),
            s.addon_units.to_string(),
            s.from.timestamp().to_string(),
        ),
        None => (String::new(), String::new(), String::new(), String::new()),
    };
    m.insert(meta::SCHEDULED_PLAN.into(), sp);
    m.insert(meta::SCHEDULED_INTERVAL.into(), si);
    m.insert(meta::SCHEDULED_ADDON_UNITS.into(), su);
    m.insert(meta::SCHEDULED_FROM.into(), sf);
    m
}

fn stripe_key(headers: &HeaderMap, scope: &str, workspace: &WorkspaceId) -> ApiResult<String> {
    Ok(match idempotency_key(headers, scope)? {
        Some(k) => format!("tally-{scope}-{workspace}-{}", k.as_str()),
        None => format!("tally-{scope}-{workspace}-{}", ulid::Ulid::new()),
    })
}

/// Length of one monthly allowance window.
const MONTH: i64 = 30;

/// The allowance window (a month of the period) that contains `now`: credits granted now
/// are prorated over it and lapse at its end.
fn month_window(sub: &SubscriptionRecord, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let elapsed = (now - sub.period_start).num_days().max(0);
    let start = sub.period_start + Duration::days(elapsed / MONTH * MONTH);
    (start, (start + Duration::days(MONTH)).min(sub.period_end))
}

/// What an allowance window has been granted so far: credits for a change are the increase
/// above it, so quick successive changes grant the right total even before Stripe's events
/// have updated the subscription document.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WindowGrants {
    /// Monthly allowance of the best plan granted in the window.
    plan_credits: u64,
    /// Most add-on units granted in the window.
    addon_units: u32,
}

fn window_sk(sub: &SubscriptionRecord, window_start: DateTime<Utc>) -> String {
    format!("GRANTS#{}#{}", sub.id, window_start.timestamp())
}

/// The window's grants so far (what the period's invoice granted, if nothing since).
async fn window_grants(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    sub: &SubscriptionRecord,
    window_start: DateTime<Utc>,
    plan_credits: u64,
) -> ApiResult<WindowGrants> {
    Ok(docs::get(
        st.docs.as_ref(),
        &workspace_pk(workspace),
        &window_sk(sub, window_start),
    )
    .await?
    .unwrap_or(WindowGrants {
        plan_credits,
        addon_units: sub.addon_units,
    }))
}

/// Records a raised level once its credits are granted (levels only go up).
async fn raise_window(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    sub: &SubscriptionRecord,
    window_start: DateTime<Utc>,
    base: WindowGrants,
    raise: impl Fn(&mut WindowGrants),
) -> ApiResult<()> {
    docs::update(
        st.docs.as_ref(),
        &workspace_pk(workspace),
        &window_sk(sub, window_start),
        |cur: Option<WindowGrants>| {
            let mut g = cur.unwrap_or_else(|| base.clone());
            let before = (g.plan_credits, g.addon_units);
            raise(&mut g);
            (before != (g.plan_credits, g.addon_units)).then_some(g)
        },
    )
    .await?;
    Ok(())
}

/// Credits granted by a subscription change, under a key naming the change.
struct ChangeGrant {
    key: String,
    source: LotSource,
    credits: u64,
    expires_at: DateTime<Utc>,
    note: String,
}

async fn grant(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    who: &Identity,
    g: ChangeGrant,
) -> ApiResult<()> {
    if g.credits == 0 {
        return Ok(());
    }
    st.ledger
        .execute(LedgerRequest {
            workspace: workspace.clone(),
            key: IdempotencyKey::derived(g.key.clone()),
            fingerprint: g.key,
            actor: Actor::new(who.actor().kind, who.sub.clone()),
            refs: Refs::default(),
            op: Operation::Grant {
                source: g.source,
                credits: Credits::new(g.credits),
                expires_at: Some(g.expires_at),
                note: Some(g.note),
            },
        })
        .await?;
    Ok(())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub subscription: Option<SubscriptionRecord>,
    pub customer: Option<String>,
}

#[utoipa::path(get, path = "/v1/subscription", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 403, body = ProblemDetails)))]
/// The subscription as Stripe last described it (`null` before the first purchase).
pub async fn subscription(
    State(st): State<PurchasesState>,
    who: Identity,
) -> ApiResult<Json<SubscriptionView>> {
    let workspace = buyer(&who)?;
    let pk = workspace_pk(&workspace);
    Ok(Json(SubscriptionView {
        subscription: docs::get(st.docs.as_ref(), &pk, SUBSCRIPTION_SK).await?,
        customer: docs::get::<BillingProfile>(st.docs.as_ref(), &pk, PROFILE_SK)
            .await?
            .and_then(|p| p.customer),
    }))
}

#[utoipa::path(post, path = "/v1/subscription/change", tag = "billing", security(("bearer" = [])),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Changes plan or billing interval: upgrades now (prorated, credits at once), downgrades at
/// the next renewal (benefits kept until then).
pub async fn change(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChangeBody>,
) -> ApiResult<Json<ChangeView>> {
    let workspace = buyer(&who)?;
    let catalog = &st.ledger.catalog;
    let target = catalog
        .plan(&body.plan)
        .ok_or_else(|| Problem::validation("plan", &format!("unknown plan {:?}", body.plan)))?
        .clone();
    let sub = live(&st, &workspace).await?;
    let current = catalog
        .plan(&sub.plan)
        .ok_or_else(Problem::internal)?
        .clone();
    let now = st.ledger.clock.now();
    if sub.status != PlanStatus::Active {
        return Err(Problem::conflict(
            "the subscription is paused or past due; resume it or settle the open invoice first",
        ));
    }
    if target.id == current.id && body.interval == sub.interval {
        // Asking for the current terms cancels a scheduled downgrade, if any.
        if sub
            .scheduled
            .as_ref()
            .is_some_and(|s| s.plan != sub.plan || s.interval != sub.interval)
        {
            let keep = sub.pending_addon_reduction(&sub.plan, sub.interval);
            st.payments
                .update_subscription(&SubscriptionChange {
                    subscription: sub.id.clone(),
                    plan: Some(plan_price(&st, &current, sub.interval)),
                    prorate_now: false,
                    metadata: metadata(
                        &workspace,
                        &sub.plan,
                        sub.interval,
                        sub.addon_units,
                        keep.as_ref(),
                    ),
                    idempotency_key: stripe_key(&headers, "change", &workspace)?,
                    ..SubscriptionChange::default()
                })
                .await
                .map_err(provider)?;
        }
        return Ok(Json(ChangeView {
            effective: "now",
            effective_at: now,
            credits_granted: 0,
            plan: sub.plan,
            interval: sub.interval,
            addon_units: sub.addon_units,
        }));
    }
    let upgrade = target.monthly_credits > current.monthly_credits
        || (target.id == current.id && body.interval != sub.interval);
    let key = stripe_key(&headers, "change", &workspace)?;
    if upgrade {
        let units = sub.billed_addon_units();
        // A pending add-on reduction stays pending: Stripe already bills `units`.
        let keep = sub.pending_addon_reduction(&target.id, body.interval);
        st.payments
            .update_subscription(&SubscriptionChange {
                subscription: sub.id.clone(),
                plan: Some(plan_price(&st, &target, body.interval)),
                prorate_now: true,
                metadata: metadata(
                    &workspace,
                    &target.id,
                    body.interval,
                    sub.addon_units,
                    keep.as_ref(),
                ),
                addons: (sub.addon_units > 0 && body.interval != sub.interval)
                    .then(|| addon_price(&st, &target, body.interval).map(|p| (units as u64, p)))
                    .transpose()?,
                idempotency_key: key,
                ..SubscriptionChange::default()
            })
            .await
            .map_err(provider)?;
        let (window_start, window_end) = month_window(&sub, now);
        let level =
            window_grants(&st, &workspace, &sub, window_start, current.monthly_credits).await?;
        let diff = target.monthly_credits.saturating_sub(level.plan_credits);
        let total = (window_end - window_start).num_seconds().max(1) as u64;
        let left = (window_end - now).num_seconds().clamp(0, total as i64) as u64;
        let credits = (diff * left).div_ceil(total);
        grant(
            &st,
            &workspace,
            &who,
            ChangeGrant {
                key: format!(
                    "upgrade:{}:{}:{}",
                    sub.id,
                    window_start.timestamp(),
                    target.id
                ),
                source: LotSource::PlanPeriod,
                credits,
                expires_at: window_end + Duration::days(target.rollover_days as i64),
                note: format!("upgrade from {} to {}", current.name, target.name),
            },
        )
        .await?;
        let to = target.monthly_credits;
        raise_window(&st, &workspace, &sub, window_start, level, |g| {
            g.plan_credits = g.plan_credits.max(to)
        })
        .await?;
        tracing::info!(workspace = %workspace, from = %current.id, to = %target.id, credits, "plan upgraded");
        return Ok(Json(ChangeView {
            effective: "now",
            effective_at: now,
            credits_granted: credits,
            plan: target.id,
            interval: body.interval,
            addon_units: sub.addon_units,
        }));
    }
    let scheduled = ScheduledChange {
        plan: target.id.clone(),
        interval: body.interval,
        addon_units: sub.billed_addon_units(),
        from: sub.period_end,
    };
    st.payments
        .update_subscription(&SubscriptionChange {
            subscription: sub.id.clone(),
            plan: Some(plan_price(&st, &target, body.interval)),
            prorate_now: false,
            metadata: metadata(
                &workspace,
                &sub.plan,
                sub.interval,
                sub.addon_units,
                Some(&scheduled),
            ),
            idempotency_key: key,
            ..SubscriptionChange::default()
        })
        .await
        .map_err(provider)?;
    tracing::info!(workspace = %workspace, from = %current.id, to = %target.id, at = %sub.period_end, "downgrade scheduled");
    Ok(Json(ChangeView {
        effective: "at_renewal",
        effective_at: sub.period_end,
        credits_granted: 0,
        plan: target.id,
        interval: body.interval,
        addon_units: scheduled.addon_units,
    }))
}

#[utoipa::path(put, path = "/v1/subscription/addons", tag = "billing", security(("bearer" = [])),
    request_body = AddonsBody,
    responses((status = 200, body = ChangeView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Sets the number of add-on credit units: more apply now (prorated charge, credits at
/// once), fewer from the next renewal.
pub async fn addons(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AddonsBody>,
) -> ApiResult<Json<ChangeView>> {
    let workspace = buyer(&who)?;
    if body.units > MAX_ADDON_UNITS {
        return Err(Problem::validation(
            "units",
            &format!("must be between 0 and {MAX_ADDON_UNITS}"),
        ));
    }
    let sub = live(&st, &workspace).await?;
    if sub.status != PlanStatus::Active {
        return Err(Problem::conflict("add-ons need an active subscription"));
    }
    let plan = st
        .ledger
        .catalog
        .plan(&sub.plan)
        .ok_or_else(Problem::internal)?
        .clone();
    let addon = st
        .ledger
        .catalog
        .addon(&plan.addon)
        .ok_or_else(Problem::internal)?
        .clone();
    let price = addon_price(&st, &plan, sub.interval)?;
    let now = st.ledger.clock.now();
    let key = stripe_key(&headers, "addons", &workspace)?;
    let next_plan = sub.scheduled.clone();
    if body.units > sub.addon_units {
        let keep = next_plan.map(|s| ScheduledChange {
            addon_units: body.units,
            ..s
        });
        st.payments
            .update_subscription(&SubscriptionChange {
                subscription: sub.id.clone(),
                addons: Some((body.units as u64, price)),
                prorate_now: true,
                metadata: metadata(
                    &workspace,
                    &sub.plan,
                    sub.interval,
                    body.units,
                    keep.as_ref(),
                ),
                idempotency_key: key,
                ..SubscriptionChange::default()
            })
            .await
            .map_err(provider)?;
        let (window_start, window_end) = month_window(&sub, now);
        let level =
            window_grants(&st, &workspace, &sub, window_start, plan.monthly_credits).await?;
        let credits = body.units.saturating_sub(level.addon_units) as u64 * addon.credits_per_unit;
        grant(
            &st,
            &workspace,
            &who,
            ChangeGrant {
                key: format!(
                    "addons:{}:{}:to{}",
                    sub.id,
                    window_start.timestamp(),
                    body.units
                ),
                source: LotSource::Addon,
                credits,
                expires_at: window_end,
                note: format!("add-on units {} -> {}", level.addon_units, body.units),
            },
        )
        .await?;
        let units = body.units;
        raise_window(&st, &workspace, &sub, window_start, level, |g| {
            g.addon_units = g.addon_units.max(units)
        })
        .await?;
        return Ok(Json(ChangeView {
            effective: "now",
            effective_at: now,
            credits_granted: credits,
            plan: sub.plan,
            interval: sub.interval,
            addon_units: body.units,
        }));
    }
    // Fewer (or the same) units: keep this period's, bill and grant the new count from the
    // renewal on. The same count as now cancels a scheduled reduction.
    let schedule = ScheduledChange {
        plan: next_plan
            .as_ref()
            .map_or(sub.plan.clone(), |s| s.plan.clone()),
        interval: next_plan.as_ref().map_or(sub.interval, |s| s.interval),
        addon_units: body.units,
        from: sub.period_end,
    };
    let unchanged = schedule.plan == sub.plan
        && schedule.interval == sub.interval
        && body.units == sub.addon_units;
    st.payments
        .update_subscription(&SubscriptionChange {
            subscription: sub.id.clone(),
            addons: Some((body.units as u64, price)),
            prorate_now: false,
            metadata: metadata(
                &workspace,
                &sub.plan,
                sub.interval,
                sub.addon_units,
                (!unchanged).then_some(&schedule),
            ),
            idempotency_key: key,
            ..SubscriptionChange::default()
        })
        .await
        .map_err(provider)?;
    Ok(Json(ChangeView {
        effective: if unchanged { "now" } else { "at_renewal" },
        effective_at: if unchanged { now } else { sub.period_end },
        credits_granted: 0,
        plan: sub.plan,
        interval: sub.interval,
        addon_units: body.units,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusView {
    pub cancel_at_period_end: bool,
    pub paused: bool,
    pub period_end: DateTime<Utc>,
}

async fn set_status(
    st: &PurchasesState,
    who: &Identity,
    headers: &HeaderMap,
    cancel: Option<bool>,
    pause: Option<bool>,
) -> ApiResult<Json<StatusView>> {
    let workspace = buyer(who)?;
    let sub = live(st, &workspace).await?;
    st.payments
        .update_subscription(&SubscriptionChange {
            subscription: sub.id.clone(),
            cancel_at_period_end: cancel,
            pause,
            idempotency_key: stripe_key(headers, "status", &workspace)?,
            ..SubscriptionChange::default()
        })
        .await
        .map_err(provider)?;
    Ok(Json(StatusView {
        cancel_at_period_end: cancel.unwrap_or(sub.cancel_at_period_end),
        paused: pause.unwrap_or(sub.status == PlanStatus::Paused),
        period_end: sub.period_end,
    }))
}

#[utoipa::path(post, path = "/v1/subscription/cancel", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails)))]
/// Cancels renewal at the end of the period; the workspace keeps its plan until then. Add-on
/// units end with the subscription.
pub async fn cancel(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
) -> ApiResult<Json<StatusView>> {
    set_status(&st, &who, &headers, Some(true), None).await
}

#[utoipa::path(post, path = "/v1/subscription/resume", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails)))]
/// Undoes a cancellation or a pause.
pub async fn resume(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
) -> ApiResult<Json<StatusView>> {
    set_status(&st, &who, &headers, Some(false), Some(false)).await
}

#[utoipa::path(post, path = "/v1/subscription/pause", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = StatusView), (status = 404, body = ProblemDetails)))]
/// Pauses collection: renewals are not charged (and grant nothing) until resumed.
pub async fn pause(
    State(st): State<PurchasesState>,
    who: Identity,
    headers: HeaderMap,
) -> ApiResult<Json<StatusView>> {
    set_status(&st, &who, &headers, None, Some(true)).await
}
