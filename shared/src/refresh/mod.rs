//! Credit refresh: the monthly allotments of yearly plans, lapsed lots and overdue holds,
//! on a schedule.
//!
//! A yearly invoice grants its first month when Stripe reports it paid; the other eleven
//! months are owed by the paid period itself. The billing-events worker records each paid
//! period ([`record_paid_period`]) in one small document per workspace (the current period
//! only). That document is filed in the sparse, sharded due index
//! ([`crate::store::docs::DueMark`]) under the time it next needs attention. Every 15
//! minutes the scheduler reads the due shards and sends one job per workspace to the
//! `refresh-jobs` queue; the worker ([`Refresher`]) then, for that workspace:
//!
//! - grants each allotment whose anniversary has come, under a ledger key derived from the
//!   subscription, the period start and the allotment number, so repeated, late or missed
//!   ticks grant each exactly once (late ones skip what would already have expired), and
//!   only while the subscription is active (canceled, paused or unpaid ones get nothing);
//! - for monthly and yearly periods alike, once the period has ended (plus a grace time),
//!   checks that Stripe's renewal came with a paid period, and records a reconciliation
//!   item if it did not (never granting);
//! - settles the ledger (releases overdue holds, expires lapsed lots) in bounded
//!   transactions ([`crate::ledger::Operation::Settle`]);
//! - files the document again under its next due time, or takes it out of the index.
//!
//! Everything reads the ledger's clock, never the system's, so the local system's clock
//! drives the schedule as it drives the ledger.

pub mod jobs;
pub mod schedule;
pub mod worker;

pub use jobs::{Job, JobSink, SqsJobs};
pub use worker::{JobReport, Refresher, RunReport, run_due};

use crate::billing::records::workspace_pk;
use crate::ids::{InvoiceId, SubscriptionId, WorkspaceId};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore, DueMark, shard_of};
use crate::subscriptions::Interval;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Sort key of a workspace's refresh document (beside its other documents).
pub const REFRESH_SK: &str = "REFRESH";
/// Sort-key prefix of reconciliation items: `RECONCILE#<subscription>#<period start>`.
pub const RECONCILE_PREFIX: &str = "RECONCILE#";
/// Shards of the due index unless configured otherwise.
pub const DEFAULT_DUE_SHARDS: u32 = 16;
/// Most raised plans a period remembers (the catalog has far fewer).
const MAX_RAISED_PLANS: usize = 8;

/// How the schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Shards of the due index (`DUE#0` .. `DUE#<n-1>`).
    pub shards: u32,
    /// How long after a period ends its renewal's paid period may take to arrive before
    /// its absence is recorded for reconciliation.
    pub grace: Duration,
    /// How soon a subscription that is not in effect, or a renewal Stripe has not
    /// reported yet, is looked at again.
    pub recheck: Duration,
    /// Most jobs one tick takes from one shard; the rest wait for the next tick.
    pub max_jobs_per_shard: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            shards: DEFAULT_DUE_SHARDS,
            grace: Duration::hours(6),
            recheck: Duration::days(1),
            max_jobs_per_shard: 10_000,
        }
    }
}

impl Settings {
    /// The shards the scheduler reads: the configured ones, and at least the default ones
    /// under which [`record_paid_period`] files new documents.
    pub fn shards_to_read(&self) -> u32 {
        self.shards.max(DEFAULT_DUE_SHARDS)
    }
}

/// A subscription period Stripe reports paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidPeriod {
    pub workspace: WorkspaceId,
    pub subscription: SubscriptionId,
    pub invoice: InvoiceId,
    pub interval: Interval,
    pub plan: String,
    pub addon_units: u32,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// A workspace's current paid period and how far the worker got with it. One per
/// workspace (so one per subscription), the current period only: it never grows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshDoc {
    pub workspace: WorkspaceId,
    pub subscription: SubscriptionId,
    /// The invoice that paid the period (its own grant is allotment 0).
    pub invoice: InvoiceId,
    pub interval: Interval,
    pub plan: String,
    pub addon_units: u32,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Plans paid mid-period upgrades raised the remaining allotments to.
    #[serde(default)]
    pub raised_plans: Vec<String>,
    /// Add-on units paid mid-period for the remaining allotments.
    #[serde(default)]
    pub raised_addon_units: u32,
    /// The first allotment the worker has not dealt with yet (granted, or forfeited
    /// because the subscription was not in effect when it came).
    pub next_allotment: u32,
    /// Whether the renewal after this period has been checked.
    #[serde(default)]
    pub renewal_checked: bool,
    /// When to look for the renewal again (Stripe had not reported it yet).
    #[serde(default)]
    pub renewal_retry_at: Option<DateTime<Utc>>,
    /// The ledger's next settlement (hold deadline, lot expiry) as the worker last saw it.
    #[serde(default)]
    pub settle_at: Option<DateTime<Utc>>,
}

impl RefreshDoc {
    fn from_period(p: &PaidPeriod) -> Self {
        Self {
            workspace: p.workspace.clone(),
            subscription: p.subscription.clone(),
            invoice: p.invoice.clone(),
            interval: p.interval,
            plan: p.plan.clone(),
            addon_units: p.addon_units,
            period_start: p.period_start,
            period_end: p.period_end,
            raised_plans: Vec::new(),
            raised_addon_units: 0,
            next_allotment: 1,
            renewal_checked: false,
            renewal_retry_at: None,
            settle_at: None,
        }
    }

    fn same_period(&self, subscription: &SubscriptionId, start: DateTime<Utc>) -> bool {
        &self.subscription == subscription && self.period_start == start
    }

    /// Where the document is filed in the due index, if anything is due.
    pub fn due_mark(&self, shards: u32, grace: Duration) -> Option<DueMark> {
        schedule::next_due(self, grace).map(|at| DueMark {
            shard: shard_of(self.workspace.as_str(), shards),
            at,
        })
    }

    fn raise(&mut self, plan: &str, addon_units: u32) -> bool {
        let mut changed = false;
        if plan != self.plan
            && !self.raised_plans.iter().any(|p| p == plan)
            && self.raised_plans.len() < MAX_RAISED_PLANS
        {
            self.raised_plans.push(plan.to_owned());
            changed = true;
        }
        if addon_units > self.raised_addon_units.max(self.addon_units) {
            self.raised_addon_units = addon_units;
            changed = true;
        }
        changed
    }
}

/// Records a paid period and files the workspace under its next due time. Idempotent and
/// order-free: the same period again merges (the level only rises), an earlier period
/// than the one recorded is ignored, a later one replaces it.
pub async fn record_paid_period(
    docs: &dyn DocStore,
    p: &PaidPeriod,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let settings = Settings::default();
    docs::update_due(
        docs,
        &workspace_pk(&p.workspace),
        REFRESH_SK,
        |current: Option<RefreshDoc>| {
            let next = match current {
                Some(c) if c.same_period(&p.subscription, p.period_start) => {
                    let mut merged = c.clone();
                    merged.raise(&p.plan, p.addon_units);
                    if merged == c {
                        return None;
                    }
                    merged
                }
                Some(c) if c.period_start >= p.period_start => return None,
                current => {
                    let mut fresh = RefreshDoc::from_period(p);
                    // The ledger's next settlement does not depend on the period.
                    fresh.settle_at = current.and_then(|c| c.settle_at);
                    fresh
                }
            };
            let due = next.due_mark(settings.shards, settings.grace);
            Some((next, due))
        },
    )
    .await?;
    tracing::info!(
        workspace = %p.workspace,
        subscription = %p.subscription,
        period_start = %p.period_start,
        at = %now,
        "paid period recorded"
    );
    Ok(())
}

/// A paid mid-period upgrade or add-on increase: the remaining allotments of that period
/// follow the higher level. Never lowers; ignored for any other period.
pub async fn raise_level(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    subscription: &SubscriptionId,
    period_start: DateTime<Utc>,
    plan: &str,
    addon_units: u32,
) -> Result<(), StoreError> {
    let settings = Settings::default();
    docs::update_due(
        docs,
        &workspace_pk(workspace),
        REFRESH_SK,
        |current: Option<RefreshDoc>| {
            let mut doc = current.filter(|c| c.same_period(subscription, period_start))?;
            if !doc.raise(plan, addon_units) {
                return None;
            }
            let due = doc.due_mark(settings.shards, settings.grace);
            Some((doc, due))
        },
    )
    .await?;
    Ok(())
}

/// The refresh document of a workspace, if it has a paid period recorded.
pub async fn refresh_doc(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
) -> Result<Option<RefreshDoc>, StoreError> {
    docs::get(docs, &workspace_pk(workspace), REFRESH_SK).await
}

/// A renewal Stripe reported without a paid period reaching the ledger: recorded for
/// finance and support to reconcile, never granted automatically. One per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub workspace: WorkspaceId,
    pub subscription: SubscriptionId,
    /// The period Stripe says started, for which no paid period was recorded.
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The last paid period recorded.
    pub recorded_period_start: DateTime<Utc>,
    pub noticed_at: DateTime<Utc>,
}

pub fn reconcile_sk(subscription: &SubscriptionId, period_start: DateTime<Utc>) -> String {
    format!(
        "{RECONCILE_PREFIX}{subscription}#{:012}",
        period_start.timestamp()
    )
}
