//! Changing a subscription through Stripe: plan and interval, add-on units, cancel,
//! resume and pause. The rules (what is an upgrade, which billing month a change falls
//! in, how credits are prorated, how terms are written into Stripe's metadata) are in
//! [`crate::subscriptions`]; this applies them through the payments port, the document
//! store and the ledger. Handlers only parse, call this and map its errors.
//!
//! Credits granted now are recorded per billing month (`GRANTS#<sub>#<month start>`): a
//! change grants only the increase above what the month already received, so quick
//! successive changes grant the right total even before Stripe's events have updated the
//! subscription document.

use super::records::*;
use crate::catalog::Plan;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::ledger::{Actor, Interval, LotSource, Operation, PlanStatus, Refs};
use crate::money::Credits;
use crate::payments::stripe_api::product_id;
use crate::payments::{ItemPrice, Payments, PaymentsError, SubscriptionChange};
use crate::service::{Ledger, LedgerRequest, ServiceError};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use crate::subscriptions::change::{
    ChangeKind, addon_unit_price, allowance_window, plan_unit_price, prorate,
};
use crate::subscriptions::terms::metadata;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;
use utoipa::ToSchema;

/// The period has ended and Stripe's renewal has not been recorded yet: a change now would
/// be prorated over nothing and the new month's level recorded without its credits.
const RENEWING: &str = "the subscription is renewing right now; retry in a minute";

/// Most add-on units a workspace may hold.
pub const MAX_ADDON_UNITS: u32 = 100;

/// Why a change was not made. Nothing was changed in any of these cases except
/// `Provider`, `Store` and `Ledger`, which are safe to retry with the same key.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("the workspace has no subscription; start one with POST /v1/checkout/sessions")]
    NoSubscription,
    #[error("the subscription has ended; start a new one with POST /v1/checkout/sessions")]
    Ended,
    #[error("{0}")]
    NotActive(&'static str),
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    #[error("add-on units must be between 0 and {MAX_ADDON_UNITS}")]
    TooManyUnits,
    #[error("the catalog has no add-on for plan {0}")]
    NoAddon(String),
    #[error(transparent)]
    Provider(#[from] PaymentsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] ServiceError),
}

/// The outcome of a change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangeView {
    /// `now` or `at_renewal`.
    pub effective: String,
    pub effective_at: DateTime<Utc>,
    /// Credits granted right away (upgrades, more add-on units).
    pub credits_granted: Credits,
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
}

/// The subscription's renewal and pause state after a status change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    pub cancel_at_period_end: bool,
    pub paused: bool,
    pub period_end: DateTime<Utc>,
}

/// What a billing month has been granted so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WindowGrants {
    /// Monthly allowance of the best plan granted in the month.
    plan_credits: Credits,
    /// Most add-on units granted in the month.
    addon_units: u32,
}

/// Credits granted by a subscription change, under a key naming the change.
struct ChangeGrant {
    key: String,
    source: LotSource,
    credits: Credits,
    expires_at: DateTime<Utc>,
    note: String,
}

/// Subscription changes over the ports.
#[derive(Clone)]
pub struct SubscriptionChanges {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    pub payments: Arc<dyn Payments>,
}

fn window_sk(sub: &SubscriptionRecord, window_start: DateTime<Utc>) -> String {
    format!("GRANTS#{}#{}", sub.id, window_start.timestamp())
}

impl SubscriptionChanges {
    /// The workspace's live subscription.
    pub async fn live(&self, workspace: &WorkspaceId) -> Result<SubscriptionRecord, ChangeError> {
        let sub: SubscriptionRecord = docs::get(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            SUBSCRIPTION_SK,
        )
        .await?
        .ok_or(ChangeError::NoSubscription)?;
        if sub.status == PlanStatus::Canceled {
            return Err(ChangeError::Ended);
        }
        Ok(sub)
    }

    fn plan_price(&self, plan: &Plan, interval: Interval) -> ItemPrice {
        ItemPrice {
            product: product_id("plan", &plan.id),
            product_name: format!("{} plan", plan.name),
            unit_amount: plan_unit_price(&self.ledger.catalog, plan, interval),
            interval,
        }
    }

    fn addon_price(&self, plan: &Plan, interval: Interval) -> Result<ItemPrice, ChangeError> {
        let catalog = &self.ledger.catalog;
        let addon = catalog
            .addon(&plan.addon)
            .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?;
        let unit = addon_unit_price(catalog, plan, interval)
            .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?;
        Ok(ItemPrice {
            product: product_id("addon", &addon.id),
            product_name: format!("{} add-on credits", addon.credits_per_unit),
            unit_amount: unit,
            interval,
        })
    }

    fn plan(&self, id: &str) -> Result<Plan, ChangeError> {
        self.ledger
            .catalog
            .plan(id)
            .cloned()
            .ok_or_else(|| ChangeError::UnknownPlan(id.to_owned()))
    }

    /// The month's grants so far (what the period's invoice granted, if nothing since).
    async fn window_grants(
        &self,
        workspace: &WorkspaceId,
        sub: &SubscriptionRecord,
        window_start: DateTime<Utc>,
        plan_credits: Credits,
    ) -> Result<WindowGrants, ChangeError> {
        Ok(docs::get(
            self.docs.as_ref(),
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
        &self,
        workspace: &WorkspaceId,
        sub: &SubscriptionRecord,
        window_start: DateTime<Utc>,
        base: WindowGrants,
        raise: impl Fn(&mut WindowGrants),
    ) -> Result<(), ChangeError> {
        docs::update(
            self.docs.as_ref(),
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

    async fn grant(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        g: ChangeGrant,
    ) -> Result<(), ChangeError> {
        if g.credits == Credits::ZERO {
            return Ok(());
        }
        self.ledger
            .execute(LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived(g.key.clone()),
                fingerprint: g.key,
                actor: actor.clone(),
                refs: Refs::default(),
                op: Operation::Grant {
                    source: g.source,
                    credits: g.credits,
                    expires_at: Some(g.expires_at),
                    note: Some(g.note),
                },
            })
            .await?;
        Ok(())
    }

    /// Changes plan or billing interval: upgrades now (prorated, credits at once),
    /// downgrades at the next renewal (benefits kept until then).
    pub async fn change(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        plan: &str,
        interval: Interval,
        stripe_key: &str,
    ) -> Result<ChangeView, ChangeError> {
        let target = self.plan(plan)?;
        let sub = self.live(workspace).await?;
        let current = self.plan(&sub.plan)?;
        let now = self.ledger.clock.now();
        if sub.status != PlanStatus::Active {
            return Err(ChangeError::NotActive(
                "the subscription is paused or past due; resume it or settle the open invoice first",
            ));
        }
        if now >= sub.period_end {
            return Err(ChangeError::NotActive(RENEWING));
        }
        if target.id == current.id && interval == sub.interval {
            // Asking for the current terms cancels a scheduled downgrade, if any.
            if sub
                .scheduled
                .as_ref()
                .is_some_and(|s| s.plan != sub.plan || s.interval != sub.interval)
            {
                let keep = sub.pending_addon_reduction(&sub.plan, sub.interval);
                self.payments
                    .update_subscription(&SubscriptionChange {
                        plan: Some(self.plan_price(&current, sub.interval)),
                        prorate_now: false,
                        metadata: metadata(
                            workspace,
                            &sub.plan,
                            sub.interval,
                            sub.addon_units,
                            keep.as_ref(),
                        ),
                        idempotency_key: stripe_key.to_owned(),
                        ..SubscriptionChange::to(sub.id.clone())
                    })
                    .await?;
            }
            return Ok(ChangeView {
                effective: "now".into(),
                effective_at: now,
                credits_granted: Credits::ZERO,
                plan: sub.plan,
                interval: sub.interval,
                addon_units: sub.addon_units,
            });
        }
        let upgrade =
            ChangeKind::of((&current, sub.interval), (&target, interval)) == ChangeKind::Upgrade;
        let key = stripe_key.to_owned();
        if upgrade {
            let units = sub.billed_addon_units();
            // A pending add-on reduction stays pending: Stripe already bills `units`.
            let keep = sub.pending_addon_reduction(&target.id, interval);
            self.payments
                .update_subscription(&SubscriptionChange {
                    plan: Some(self.plan_price(&target, interval)),
                    prorate_now: true,
                    metadata: metadata(
                        workspace,
                        &target.id,
                        interval,
                        sub.addon_units,
                        keep.as_ref(),
                    ),
                    addons: (sub.addon_units > 0 && interval != sub.interval)
                        .then(|| {
                            self.addon_price(&target, interval)
                                .map(|p| (units as u64, p))
                        })
                        .transpose()?,
                    idempotency_key: key,
                    ..SubscriptionChange::to(sub.id.clone())
                })
                .await?;
            let (window_start, window_end) =
                allowance_window(sub.period_start, sub.period_end, now);
            let level = self
                .window_grants(workspace, &sub, window_start, current.monthly_credits)
                .await?;
            let diff = target.monthly_credits.saturating_sub(level.plan_credits);
            let credits = prorate(diff, (window_start, window_end), now);
            self.grant(
                workspace,
                actor,
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
            self.raise_window(workspace, &sub, window_start, level, |g| {
                g.plan_credits = g.plan_credits.max(to)
            })
            .await?;
            tracing::info!(workspace = %workspace, from = %current.id, to = %target.id, credits = credits.get(), "plan upgraded");
            return Ok(ChangeView {
                effective: "now".into(),
                effective_at: now,
                credits_granted: credits,
                plan: target.id,
                interval,
                addon_units: sub.addon_units,
            });
        }
        let scheduled = ScheduledChange {
            plan: target.id.clone(),
            interval,
            addon_units: sub.billed_addon_units(),
            from: sub.period_end,
        };
        self.payments
            .update_subscription(&SubscriptionChange {
                plan: Some(self.plan_price(&target, interval)),
                prorate_now: false,
                metadata: metadata(
                    workspace,
                    &sub.plan,
                    sub.interval,
                    sub.addon_units,
                    Some(&scheduled),
                ),
                idempotency_key: key,
                ..SubscriptionChange::to(sub.id.clone())
            })
            .await?;
        tracing::info!(workspace = %workspace, from = %current.id, to = %target.id, at = %sub.period_end, "downgrade scheduled");
        Ok(ChangeView {
            effective: "at_renewal".into(),
            effective_at: sub.period_end,
            credits_granted: Credits::ZERO,
            plan: target.id,
            interval,
            addon_units: scheduled.addon_units,
        })
    }

    /// Sets the number of add-on credit units: more apply now (prorated charge, credits at
    /// once), fewer from the next renewal.
    pub async fn set_addons(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        units: u32,
        stripe_key: &str,
    ) -> Result<ChangeView, ChangeError> {
        if units > MAX_ADDON_UNITS {
            return Err(ChangeError::TooManyUnits);
        }
        let sub = self.live(workspace).await?;
        if sub.status != PlanStatus::Active {
            return Err(ChangeError::NotActive(
                "add-ons need an active subscription",
            ));
        }
        let plan = self.plan(&sub.plan)?;
        let addon = self
            .ledger
            .catalog
            .addon(&plan.addon)
            .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?
            .clone();
        let price = self.addon_price(&plan, sub.interval)?;
        let now = self.ledger.clock.now();
        let key = stripe_key.to_owned();
        let next_plan = sub.scheduled.clone();
        if units > sub.addon_units {
            let keep = next_plan.map(|s| ScheduledChange {
                addon_units: units,
                ..s
            });
            self.payments
                .update_subscription(&SubscriptionChange {
                    addons: Some((units as u64, price)),
                    prorate_now: true,
                    metadata: metadata(workspace, &sub.plan, sub.interval, units, keep.as_ref()),
                    idempotency_key: key,
                    ..SubscriptionChange::to(sub.id.clone())
                })
                .await?;
            let (window_start, window_end) =
                allowance_window(sub.period_start, sub.period_end, now);
            let level = self
                .window_grants(workspace, &sub, window_start, plan.monthly_credits)
                .await?;
            // The catalog bounds credits_per_unit so that MAX_ADDON_UNITS units stay within
            // the grant limit; this cannot fail for a catalog that loaded.
            let credits = addon
                .credits_per_unit
                .checked_mul(units.saturating_sub(level.addon_units) as u64)
                .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?;
            self.grant(
                workspace,
                actor,
                ChangeGrant {
                    key: format!("addons:{}:{}:to{}", sub.id, window_start.timestamp(), units),
                    source: LotSource::Addon,
                    credits,
                    expires_at: window_end,
                    note: format!("add-on units {} -> {}", level.addon_units, units),
                },
            )
            .await?;
            self.raise_window(workspace, &sub, window_start, level, |g| {
                g.addon_units = g.addon_units.max(units)
            })
            .await?;
            return Ok(ChangeView {
                effective: "now".into(),
                effective_at: now,
                credits_granted: credits,
                plan: sub.plan,
                interval: sub.interval,
                addon_units: units,
            });
        }
        // Fewer (or the same) units: keep this period's, bill and grant the new count from the
        // renewal on. The same count as now cancels a scheduled reduction.
        let schedule = ScheduledChange {
            plan: next_plan
                .as_ref()
                .map_or(sub.plan.clone(), |s| s.plan.clone()),
            interval: next_plan.as_ref().map_or(sub.interval, |s| s.interval),
            addon_units: units,
            from: sub.period_end,
        };
        let unchanged = schedule.plan == sub.plan
            && schedule.interval == sub.interval
            && units == sub.addon_units;
        self.payments
            .update_subscription(&SubscriptionChange {
                addons: Some((units as u64, price)),
                prorate_now: false,
                metadata: metadata(
                    workspace,
                    &sub.plan,
                    sub.interval,
                    sub.addon_units,
                    (!unchanged).then_some(&schedule),
                ),
                idempotency_key: key,
                ..SubscriptionChange::to(sub.id.clone())
            })
            .await?;
        Ok(ChangeView {
            effective: if unchanged { "now" } else { "at_renewal" }.into(),
            effective_at: if unchanged { now } else { sub.period_end },
            credits_granted: Credits::ZERO,
            plan: sub.plan,
            interval: sub.interval,
            addon_units: units,
        })
    }

    /// Cancels renewal at period end (`cancel`), or pauses/resumes collection (`pause`).
    pub async fn set_status(
        &self,
        workspace: &WorkspaceId,
        cancel: Option<bool>,
        pause: Option<bool>,
        stripe_key: &str,
    ) -> Result<StatusView, ChangeError> {
        let sub = self.live(workspace).await?;
        self.payments
            .update_subscription(&SubscriptionChange {
                cancel_at_period_end: cancel,
                pause,
                idempotency_key: stripe_key.to_owned(),
                ..SubscriptionChange::to(sub.id.clone())
            })
            .await?;
        Ok(StatusView {
            cancel_at_period_end: cancel.unwrap_or(sub.cancel_at_period_end),
            paused: pause.unwrap_or(sub.status == PlanStatus::Paused),
            period_end: sub.period_end,
        })
    }
}
