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
//!   while the subscription has not ended (paused and past-due ones get the months their
//!   invoice paid; canceled or replaced ones get nothing more);
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
use crate::money::Credits;
use crate::store::StoreError;
use crate::store::docs::{self, DocStore, DueMark, shard_of};
use crate::subscriptions::Interval;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Sort key of a workspace's refresh document (beside its other documents).
pub const REFRESH_SK: &str = "REFRESH";
/// Sort-key prefix of reconciliation items: `RECONCILE#<subscription>#<period start>`.
pub const RECONCILE_PREFIX: &str = "RECONCILE#";
/// Shards of the due index unless configured otherwise.
pub const DEFAULT_DUE_SHARDS: u32 = 16;

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

/// What a plan's month was sold as when it was paid for: its credits and how long they
/// roll over past the month's end. A yearly plan's later months are granted from these,
/// not from the catalog of the day they fall due, which staff may have edited since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTerms {
    pub monthly_credits: Credits,
    pub rollover_days: u32,
}

impl PlanTerms {
    /// The catalog's terms for `plan`, if it knows the plan.
    pub fn of(plan: &str, catalog: &crate::catalog::Catalog) -> Option<Self> {
        catalog.plan(plan).map(|p| Self {
            monthly_credits: p.monthly_credits,
            rollover_days: p.rollover_days,
        })
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
    /// What the add-on units are worth a month, each valued as the add-on it was billed
    /// as (`None`: as the plan's add-on).
    #[serde(default)]
    pub addon_credits: Option<Credits>,
    /// The plan's terms in the catalog when the invoice was paid (`None`: unknown then).
    #[serde(default)]
    pub plan_terms: Option<PlanTerms>,
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
    /// What the add-on units are worth a month as billed (`None`: as the plan's add-on).
    #[serde(default)]
    pub addon_credits: Option<Credits>,
    /// When the level (plan, add-on units) was last set: the period start, or the time of
    /// a paid change. A late change never overwrites a newer one.
    #[serde(default)]
    pub level_as_of: Option<DateTime<Utc>>,
    /// How the level compares with another set at the same instant (higher wins).
    #[serde(default)]
    pub level_rank: Option<u64>,
    /// The first allotment the worker has not dealt with yet (granted, or forfeited
    /// because the subscription had ended when it came).
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
    /// Cents of the period's invoice given back (refunded, or lost in a dispute), of the
    /// cents paid: the remaining allotments shrink by that share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_back: Option<(u64, u64)>,
    /// Each part's share of it, as [`PaidChange::given_back_parts`] (kept for when the
    /// document's invoice turns out to be a change's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_back_parts: Option<(u64, u64)>,
    /// The level in effect when the first allotment not granted yet fell due, kept when a
    /// change paid after that date raised or lowered the level before the worker came:
    /// allotments dated before the change follow it, not the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier: Option<EarlierLevel>,
    /// The period's paid changes of level, oldest first (at most [`MAX_CHANGES`]): what
    /// each paid for, so money given back for its invoice lowers the allotments after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<PaidChange>,
    /// The document was opened by a paid change whose invoice was applied before the
    /// period's own (a change made while Stripe had not charged the renewal yet): that
    /// change, so the period's own invoice, when it comes, takes its place as the period's
    /// and the change becomes one of its changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_by: Option<OpeningChange>,
    /// The period of the same subscription this one replaced, kept while months of it
    /// that fell due before this period began are not granted yet (a new period recorded
    /// before the worker came to them: a switch to monthly, a billing-cycle reset). Never
    /// holds a previous period of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<RefreshDoc>>,
    /// The place of the period's own invoice among the periods of the subscription that
    /// begin in the same second ([`period_rank`]), once known: of two (an interval switch
    /// in a period's first second), the later is the period in force, whatever order their
    /// events arrive in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_rank: Option<u64>,
    /// Which change last billed each part of the level, the opening change's included:
    /// a change older than the level still sets a part no later change billed. `None` for
    /// a document recorded before they were kept (a late change then only takes its place
    /// among the changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<PartsSet>,
    /// The terms each plan of the period was paid for at, by plan id: the first recorded
    /// for it in the period (at most one per plan of the catalog). A plan missing here (a
    /// document recorded before terms were kept) follows the catalog.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plan_terms: BTreeMap<String, PlanTerms>,
}

/// Whether `kept` is a period kept as `previous` by the period that began at `start` (it
/// ends there, or a second later when a month of it is dated `start`; one kept before
/// such months were owed ends at `start`).
pub fn kept_until(kept: &RefreshDoc, start: DateTime<Utc>) -> bool {
    kept.period_end == start || kept.period_end == start + Duration::seconds(1)
}

/// An invoice's place among the customer's invoices, from the number Stripe gives it as it
/// finalizes it (`PREFIX-0001`); the same scale as a numbered change's rank
/// (`billing::change_rank`). `None` for an invoice without a number.
pub fn invoice_rank(number: Option<&str>) -> Option<u64> {
    const NUMBERED: u64 = 1 << 62;
    number
        .and_then(|n| n.rsplit_once('-'))
        .and_then(|(_, seq)| seq.parse::<u64>().ok())
        .filter(|seq| *seq < NUMBERED)
        .map(|seq| NUMBERED | seq)
}

/// Above every invoice's and change's rank: the periods an interval switch opens.
pub(crate) const SWITCH: u64 = 1 << 63;

/// The order of a period among the periods of its subscription that begin in the same
/// second. A subscription's period is opened once by its sign-up or renewal
/// (`subscription_create`, `subscription_cycle`); any other period from that second is an
/// interval switch made after it (`subscription_update`). The number does not say so:
/// Stripe numbers a renewal's invoice as it finalizes it, up to an hour after a switch
/// made in the renewal's second was numbered. Switches, finalized at once, follow their
/// numbers.
pub fn period_rank(billing_reason: Option<&str>, number: Option<&str>) -> Option<u64> {
    let rank = invoice_rank(number);
    if billing_reason == Some("subscription_update") {
        Some(SWITCH | rank.unwrap_or(0))
    } else {
        rank
    }
}

/// The paid change that opened a refresh document (see [`RefreshDoc::opened_by`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpeningChange {
    pub at: DateTime<Utc>,
    pub rank: u64,
    /// The level it paid for.
    pub level: LevelParts,
    /// The parts it billed (unknown for a document opened before they were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed: Option<Billed>,
}

/// Paid changes of one period the document remembers (a busier period forgets its oldest:
/// a refund of one of those no longer lowers the allotments, and a warning says which).
/// A change is about 250 bytes: the document stays far below DynamoDB's item limit with
/// its previous period's changes too.
pub const MAX_CHANGES: usize = 100;

/// Keeps at most [`MAX_CHANGES`] changes, forgetting the oldest.
fn forget_oldest(changes: &mut Vec<PaidChange>) {
    while changes.len() > MAX_CHANGES {
        let gone = changes.remove(0);
        tracing::warn!(
            invoice = %gone.invoice,
            at = %gone.at,
            "the period's oldest paid change is forgotten: a refund of its invoice will not lower the later months"
        );
    }
}

/// A level: plan, add-on units, and what the units are worth as billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelParts {
    pub plan: String,
    pub addon_units: u32,
    #[serde(default)]
    pub addon_credits: Option<Credits>,
}

/// The parts of a level a paid change billed: its positive proration lines name the plan,
/// or its proration lines (either sign) name the add-on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    pub plan: bool,
    pub addon: bool,
}

/// The change (its time and rank) that last billed the plan, and the add-on, of a period's
/// level; `None`: no change since the period's own invoice set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartsSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<(DateTime<Utc>, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addon: Option<(DateTime<Utc>, u64)>,
}

impl PartsSet {
    /// The parts a change at `at`, ranked `rank`, billing `billed`, sets from here.
    pub(crate) fn set_by(&mut self, billed: Billed, at: DateTime<Utc>, rank: u64) {
        if billed.plan {
            self.plan = self.plan.max(Some((at, rank)));
        }
        if billed.addon {
            self.addon = self.addon.max(Some((at, rank)));
        }
    }

    /// The parts of `billed` no later change than (`at`, `rank`) billed.
    pub(crate) fn newer_than_set(&self, billed: Billed, at: DateTime<Utc>, rank: u64) -> Billed {
        let newer = |set: Option<(DateTime<Utc>, u64)>| set.is_none_or(|s| s < (at, rank));
        Billed {
            plan: billed.plan && newer(self.plan),
            addon: billed.addon && newer(self.addon),
        }
    }
}

impl LevelParts {
    /// The level a change billing the parts `billed`, to the values of `p`, leads to from
    /// this one: the parts it did not bill stay as they were.
    fn with_billed(&self, p: &PaidPeriod, billed: Billed) -> LevelParts {
        LevelParts {
            plan: if billed.plan {
                p.plan.clone()
            } else {
                self.plan.clone()
            },
            addon_units: if billed.addon {
                p.addon_units
            } else {
                self.addon_units
            },
            addon_credits: if billed.addon {
                p.addon_credits
            } else {
                self.addon_credits
            },
        }
    }

    /// The level the paid change `p` leads to from this one: a change that did not bill
    /// the add-on item leaves its value as it was.
    fn changed_by(&self, p: &PaidPeriod) -> LevelParts {
        let billed = p.addon_credits.is_some() || p.addon_units != self.addon_units;
        LevelParts {
            plan: p.plan.clone(),
            addon_units: p.addon_units,
            addon_credits: if billed {
                p.addon_credits
            } else {
                self.addon_credits
            },
        }
    }
}

/// A paid change of a period's level, by the invoice that paid it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidChange {
    pub invoice: InvoiceId,
    pub at: DateTime<Utc>,
    pub before: LevelParts,
    pub after: LevelParts,
    /// Cents of the change's invoice given back (refunded, or lost in a dispute), of the
    /// cents paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_back: Option<(u64, u64)>,
    /// Of an invoice with add-on units and more, what each part gave back, on the
    /// payment's scale (of the cents paid): the rest's (the plan's), then the add-on
    /// units' (see `billing::refunds::Pools`). Unknown for money given back before it was
    /// kept, and for an invoice of one part: `given_back` then counts for both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_back_parts: Option<(u64, u64)>,
    /// The parts it billed (unknown for changes recorded before they were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed: Option<Billed>,
    /// Its order among changes of the same second (`billing::change_rank`); unknown for
    /// changes recorded before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
}

impl PaidChange {
    /// Whether it was made after a change at `at` ranked `rank`.
    fn after(&self, at: DateTime<Utc>, rank: u64) -> bool {
        self.at > at || (self.at == at && self.rank.is_some_and(|r| r > rank))
    }
}

/// A level that allotments dated before `until` follow (see [`RefreshDoc::earlier`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierLevel {
    #[serde(flatten)]
    pub level: LevelParts,
    /// When the first change after the allotment's date was made.
    pub until: DateTime<Utc>,
    /// When this level was set, and its rank among changes of the same second (a change
    /// before the allotment's date that arrives late replaces it if it is newer).
    #[serde(default)]
    pub as_of: Option<DateTime<Utc>>,
    #[serde(default)]
    pub rank: Option<u64>,
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
            addon_credits: p.addon_credits,
            level_as_of: Some(p.period_start),
            level_rank: None,
            next_allotment: 1,
            renewal_checked: false,
            renewal_retry_at: None,
            settle_at: None,
            given_back: None,
            given_back_parts: None,
            earlier: None,
            changes: Vec::new(),
            opened_by: None,
            previous: None,
            period_rank: None,
            parts: Some(PartsSet::default()),
            plan_terms: p
                .plan_terms
                .map(|t| BTreeMap::from([(p.plan.clone(), t)]))
                .unwrap_or_default(),
        }
    }

    /// Keeps the terms `p`'s plan was paid for at, unless the period already has that
    /// plan's; whether they were new.
    fn remember_terms(&mut self, p: &PaidPeriod) -> bool {
        match p.plan_terms {
            Some(t) if !self.plan_terms.contains_key(&p.plan) => {
                self.plan_terms.insert(p.plan.clone(), t);
                true
            }
            _ => false,
        }
    }

    /// The end a period replaced by one beginning at `start` is kept with (see
    /// [`Self::owed_before`]): its own end if sooner, else the second after `start`, so
    /// the month dated `start` is still its own.
    fn kept_end(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        self.period_end.min(start + Duration::seconds(1))
    }

    /// What the period `p` replacing this document keeps as its `previous`: this
    /// document if months of it fell due by the time `p` began (in that very second
    /// included) and were not granted yet, else the `previous` this one kept, if it still
    /// owes such months (two new periods before the worker came).
    ///
    /// A month dated the second `p` began is this period's: Stripe credits the unused
    /// time of the old period from that second, and the new period's first grant is
    /// lowered by the old month's unused rest as if that month had been granted (see
    /// `billing::grants::line_grants`), as it is a second later.
    fn owed_before(&self, p: &PaidPeriod) -> Option<Box<Self>> {
        // Due by the time `p` began, whatever the clock says when it is recorded: a clock
        // a moment behind Stripe's must not drop the month dated `p`'s first second
        // (billing-events withholds the credited time from it all the same).
        let owes = |d: &Self| {
            d.subscription == p.subscription
                && d.opened_by.is_none()
                && !schedule::due_allotments(d, p.period_start).is_empty()
        };
        if owes(self) {
            // It ended just after `p` began: the month dated that second is still its
            // own, months after it are `p`'s.
            return Some(Box::new(Self {
                previous: None,
                period_end: self.kept_end(p.period_start),
                ..self.clone()
            }));
        }
        self.previous.clone().filter(|prev| owes(prev))
    }

    /// The period's own invoice, for a document a change opened before it: the period's
    /// invoice becomes the period's, the opening change the first of its changes (from the
    /// level the invoice opened the period with), the later changes as they were, each
    /// with what was given back for it; the level and the worker's progress stay (`None`
    /// for any other document).
    fn reopened_by_own_invoice(&self, p: &PaidPeriod) -> Option<Self> {
        let opening = self.opened_by.as_ref()?;
        if p.invoice == self.invoice {
            return None;
        }
        let mut doc = self.clone();
        doc.invoice = p.invoice.clone();
        doc.opened_by = None;
        doc.given_back = None;
        doc.given_back_parts = None;
        let own = Self::from_period(p).parts();
        // What the change led to from the period's own level: a change that did not bill
        // the add-on item leaves the value the period's invoice gave its units.
        let mut after = own.changed_by(&PaidPeriod {
            invoice: self.invoice.clone(),
            plan: opening.level.plan.clone(),
            addon_units: opening.level.addon_units,
            addon_credits: opening.level.addon_credits,
            ..p.clone()
        });
        // A part the change did not bill: what a change made before it set (its event
        // applied late, after this document opened), which the level holds as no change
        // since billed it; else the period's own. Never the opening level's: that came
        // from the subscription as Stripe showed it when the change was applied, which may
        // already hold a later change (its invoice applied after this one).
        if let (Some(parts), Some(billed)) = (&self.parts, opening.billed) {
            let before_opening = |set: Option<(DateTime<Utc>, u64)>| {
                set.is_some_and(|s| s < (opening.at, opening.rank))
            };
            if !billed.plan {
                after.plan = if before_opening(parts.plan) {
                    self.plan.clone()
                } else {
                    own.plan.clone()
                };
            }
            if !billed.addon {
                let from = if before_opening(parts.addon) {
                    (self.addon_units, self.addon_credits)
                } else {
                    (own.addon_units, own.addon_credits)
                };
                (after.addon_units, after.addon_credits) = from;
            }
        }
        // The changes after it started from the level it left. A part it did not bill
        // stays as it left it through every later change that did not bill that part
        // either (they took it from the opening level too), and into the document's level
        // when none did.
        // (Not when changes may have been forgotten: one of those may have billed it.)
        let unbilled = opening
            .billed
            .filter(|_| doc.changes.len() < MAX_CHANGES)
            .map_or(Billed::default(), |b| Billed {
                plan: !b.plan,
                addon: !b.addon,
            });
        let (mut plan, mut addon) = (true, true);
        for next in &mut doc.changes {
            next.before = LevelParts {
                plan: if plan {
                    after.plan.clone()
                } else {
                    next.before.plan.clone()
                },
                ..if addon {
                    after.clone()
                } else {
                    next.before.clone()
                }
            };
            let billed = next.billed.unwrap_or(Billed {
                plan: true,
                addon: true,
            });
            // Only what the opening change did not bill goes on past the first change.
            plan &= unbilled.plan && !billed.plan;
            addon &= unbilled.addon && !billed.addon;
            if plan {
                next.after.plan = after.plan.clone();
            }
            if addon {
                (next.after.addon_units, next.after.addon_credits) =
                    (after.addon_units, after.addon_credits);
            }
            if !plan && !addon {
                break;
            }
        }
        if plan {
            doc.plan = after.plan.clone();
        }
        if addon {
            doc.addon_units = after.addon_units;
            doc.addon_credits = after.addon_credits;
        }
        doc.changes.insert(
            0,
            PaidChange {
                invoice: self.invoice.clone(),
                at: opening.at,
                before: own,
                after,
                given_back: self.given_back,
                given_back_parts: self.given_back_parts,
                billed: opening.billed,
                rank: Some(opening.rank),
            },
        );
        forget_oldest(&mut doc.changes);
        Some(doc)
    }

    /// A paid change whose event arrived after a later change's: recorded before the first
    /// later one, from the level that one started from, which now starts from it. A part it billed that no later
    /// change billed (by the document's [`PartsSet`], which knows the opening change and
    /// forgotten ones too) carries through the later changes into the level: units added,
    /// then an upgrade whose invoice bills no add-on lines, the upgrade's event applied
    /// first, leave the new plan with the units.
    fn insert_late_change(&mut self, p: &PaidPeriod, at: DateTime<Utc>, rank: u64, billed: Billed) {
        if p.invoice == self.invoice || self.changes.iter().any(|c| c.invoice == p.invoice) {
            return;
        }
        let carry = match &mut self.parts {
            Some(parts) => {
                let carry = parts.newer_than_set(billed, at, rank);
                parts.set_by(carry, at, rank);
                carry
            }
            None => Billed::default(),
        };
        let Some(i) = self.changes.iter().position(|c| c.after(at, rank)) else {
            // No later change remembered (the one that opened the document, or one in
            // the same second recorded before ranks were kept): the level alone.
            let level = self.parts().with_billed(p, carry);
            (self.plan, self.addon_units, self.addon_credits) =
                (level.plan, level.addon_units, level.addon_credits);
            return;
        };
        let before = self.changes[i].before.clone();
        let after = before.with_billed(p, billed);
        self.changes.insert(
            i,
            PaidChange {
                invoice: p.invoice.clone(),
                at,
                before,
                after: after.clone(),
                given_back: None,
                given_back_parts: None,
                billed: Some(billed),
                rank: Some(rank),
            },
        );
        // Changes the list does not hold may lie between this one and the first it holds
        // after it (the one that opened the document, those forgotten): those start from
        // what they left, so only the parts no later change billed go on.
        let unlisted_between = i == 0
            && (self.changes.len() > MAX_CHANGES
                || self
                    .opened_by
                    .as_ref()
                    .is_some_and(|o| (o.at, o.rank) > (at, rank)));
        let walk = if unlisted_between { carry } else { billed };
        // Each later change started from this one's parts until one billed the part again
        // (that one started from it too); one recorded before billed parts were kept is
        // taken as billing everything.
        let mut going = walk;
        for c in &mut self.changes[i + 1..] {
            if !going.plan && !going.addon {
                break;
            }
            c.before = c.before.with_billed(p, going);
            let theirs = c.billed.unwrap_or(Billed {
                plan: true,
                addon: true,
            });
            let through = Billed {
                plan: going.plan && !theirs.plan,
                addon: going.addon && !theirs.addon,
            };
            c.after = c.after.with_billed(p, through);
            going = through;
        }
        let level = self.parts().with_billed(p, carry);
        (self.plan, self.addon_units, self.addon_credits) =
            (level.plan, level.addon_units, level.addon_credits);
        forget_oldest(&mut self.changes);
    }

    /// The level now, as parts.
    fn parts(&self) -> LevelParts {
        LevelParts {
            plan: self.plan.clone(),
            addon_units: self.addon_units,
            addon_credits: self.addon_credits,
        }
    }

    /// Money given back for `invoice`: the period's own invoice or one of its changes.
    /// Only ever grows; whether anything changed.
    fn give_back(&mut self, invoice: &InvoiceId, g: GivenBack) -> bool {
        let given = (g.back.min(g.paid), g.paid);
        let (slot, parts) = if &self.invoice == invoice {
            (&mut self.given_back, &mut self.given_back_parts)
        } else if let Some(c) = self.changes.iter_mut().find(|c| &c.invoice == invoice) {
            (&mut c.given_back, &mut c.given_back_parts)
        } else {
            return false;
        };
        let mut changed = false;
        if slot.is_none_or(|(b, _)| b < given.0) {
            *slot = Some(given);
            changed = true;
        }
        if let Some((plan, addon)) = g.parts {
            let next = match *parts {
                Some((p, a)) => (p.max(plan), a.max(addon)),
                None => (plan, addon),
            };
            let next = (next.0.min(g.paid), next.1.min(g.paid));
            if *parts != Some(next) {
                *parts = Some(next);
                changed = true;
            }
        }
        changed
    }

    /// The first allotment the worker has not dealt with yet, if the period owes one.
    fn pending_allotment(&self) -> Option<schedule::Allotment> {
        schedule::of(self)
            .into_iter()
            .find(|a| a.k >= self.next_allotment)
    }

    /// The date of the latest allotment dated at or before `at` that the worker has not
    /// dealt with yet: a change made at `at` falls in that allotment's billing month, which
    /// is still to be granted.
    pub fn waiting_at(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        schedule::of(self)
            .into_iter()
            .filter(|a| a.k >= self.next_allotment && a.at <= at)
            .map(|a| a.at)
            .next_back()
    }

    /// The worker dealt with the allotments before `next`: the earlier level goes once no
    /// allotment left is dated before its change.
    fn advance(&mut self, next: u32) {
        self.next_allotment = self.next_allotment.max(next);
        if let Some(e) = &self.earlier
            && self.pending_allotment().is_none_or(|a| a.at > e.until)
        {
            self.earlier = None;
        }
    }

    /// Whether the period of `subscription` from `start` to `end` (opened by an invoice
    /// ranked `rank`, when known) is this document's. Two periods that begin in the same
    /// second are told apart by their end and, once both are known, their rank (two
    /// switches in one second can make a third period with an earlier one's start and end);
    /// a document from before ranks were kept knows its period by its start alone.
    pub fn same_period(
        &self,
        subscription: &SubscriptionId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        rank: Option<u64>,
    ) -> bool {
        if &self.subscription != subscription || self.period_start != start {
            return false;
        }
        if self.known_rank().is_none() {
            return true;
        }
        let distinct = matches!((self.period_rank, rank), (Some(a), Some(b)) if a != b);
        self.period_end == end && !distinct
    }

    /// The document's [`period_rank`]; for one a paid change opened, the change's, as a
    /// switch's: a period other than the sign-up's or renewal's from the same second is a
    /// switch's.
    fn known_rank(&self) -> Option<u64> {
        self.period_rank
            .or(self.opened_by.as_ref().map(|o| SWITCH | o.rank))
    }

    /// Whether a period from `start`, ranked `rank` ([`period_rank`]), comes after this
    /// document's (which it is not): it begins later, or in the same second and later.
    fn followed_by(&self, start: DateTime<Utc>, rank: Option<u64>) -> bool {
        self.period_start < start || (self.period_start == start && rank > self.known_rank())
    }

    /// Where the document is filed in the due index, if anything is due.
    pub fn due_mark(&self, shards: u32, grace: Duration) -> Option<DueMark> {
        schedule::next_due(self, grace).map(|at| DueMark {
            shard: shard_of(self.workspace.as_str(), shards),
            at,
        })
    }

    /// Sets the level the remaining allotments follow, as of `at`, unless a later change
    /// already set it. A paid change sets it both ways (an upgrade raises it; a prorated
    /// downgrade made elsewhere lowers it), so allotments follow what was last paid for.
    fn set_level(&mut self, p: &PaidPeriod, at: DateTime<Utc>, rank: u64, billed: Billed) -> bool {
        // Two changes in the same second: the later by rank (the invoice Stripe numbered
        // later; see `billing::change_rank`), whatever order they arrive in.
        if self.level_as_of.is_some_and(|t| t > at)
            || (self.level_as_of == Some(at) && self.level_rank.unwrap_or(0) >= rank)
        {
            let (changes_before, level_before, parts_before) =
                (self.changes.clone(), self.parts(), self.parts.clone());
            // Older than the level, but still a paid change of the period: it goes in its
            // place among the changes (the next one started from its level), so a refund
            // of either takes back what each added, and the parts no later change billed
            // are the level's.
            self.insert_late_change(p, at, rank, billed);
            // And it may be the level an allotment waiting for the worker had on its date
            // (a change before that date whose event arrived after a later change's).
            let pending = self.pending_allotment();
            if let (Some(e), Some(a)) = (&mut self.earlier, pending)
                && at < a.at
                && e.as_of
                    .is_some_and(|t| t < at || (t == at && e.rank.unwrap_or(0) < rank))
            {
                e.level = e.level.with_billed(p, billed);
                e.as_of = Some(at);
                e.rank = Some(rank);
                return true;
            }
            return changes_before != self.changes
                || level_before != self.parts()
                || parts_before != self.parts;
        }
        self.level_rank = Some(rank);
        // An allotment already due when the change was made, and not granted yet, is owed
        // at the level of its date.
        if self.earlier.is_none() && self.pending_allotment().is_some_and(|a| a.at <= at) {
            self.earlier = Some(EarlierLevel {
                level: self.parts(),
                until: at,
                as_of: self.level_as_of,
                rank: self.level_rank,
            });
        }
        let (before, was_as_of) = (self.parts(), self.level_as_of);
        let after = before.with_billed(p, billed);
        if let Some(parts) = &mut self.parts {
            parts.set_by(billed, at, rank);
        }
        self.plan = after.plan.clone();
        self.addon_units = after.addon_units;
        self.addon_credits = after.addon_credits;
        self.level_as_of = Some(at);
        if p.invoice != self.invoice && !self.changes.iter().any(|c| c.invoice == p.invoice) {
            self.changes.push(PaidChange {
                invoice: p.invoice.clone(),
                at,
                before: before.clone(),
                after: after.clone(),
                given_back: None,
                given_back_parts: None,
                billed: Some(billed),
                rank: Some(rank),
            });
            forget_oldest(&mut self.changes);
        }
        (before, was_as_of) != (after, self.level_as_of)
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
    record_ranked_period(docs, p, None, now).await
}

/// [`record_paid_period`] for a period whose place is known ([`period_rank`]): a period
/// beginning in the same second as the recorded one replaces it when it came later.
pub async fn record_ranked_period(
    docs: &dyn DocStore,
    p: &PaidPeriod,
    rank: Option<u64>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let settings = Settings::default();
    docs::update_due(
        docs,
        &workspace_pk(&p.workspace),
        REFRESH_SK,
        |current: Option<RefreshDoc>| {
            let next = match current {
                // A change applied before the period's own invoice opened the document:
                // the period's invoice takes its place, the change becomes one of its.
                Some(c)
                    if c.same_period(&p.subscription, p.period_start, p.period_end, rank)
                        && c.opened_by.is_some() =>
                {
                    let mut doc = c.reopened_by_own_invoice(p)?;
                    doc.period_rank = doc.period_rank.or(rank);
                    doc.remember_terms(p);
                    doc
                }
                // The period's own invoice again: its level is the one it opened with, or a
                // paid change's since (the terms of its plan are kept if they were not).
                Some(mut c)
                    if c.same_period(&p.subscription, p.period_start, p.period_end, rank) =>
                {
                    if !c.remember_terms(p) {
                        return None;
                    }
                    c
                }
                Some(c) if !c.followed_by(p.period_start, rank) => return None,
                current => {
                    let mut fresh = RefreshDoc::from_period(p);
                    fresh.period_rank = rank;
                    // The ledger's next settlement does not depend on the period.
                    fresh.settle_at = current.as_ref().and_then(|c| c.settle_at);
                    // Months of the replaced period already due are still owed.
                    fresh.previous = current.and_then(|c| c.owed_before(p));
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

/// Money given back for an invoice: `back` of the `paid` cents, and of an invoice with add-on
/// units and more, each part's share (the rest's, the add-on units', on the payment's scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GivenBack {
    pub back: u64,
    pub paid: u64,
    pub parts: Option<(u64, u64)>,
}

/// Money given back for `invoice`: if it paid the current period, the period's remaining
/// allotments shrink by that share; if it paid a change of the period's level, the
/// allotments after the change lose that share of what it added (each part's share of
/// what it added to that part, when the invoice had add-on units and more). Only ever
/// grows.
pub async fn record_given_back(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    invoice: &InvoiceId,
    given: GivenBack,
) -> Result<(), StoreError> {
    let settings = Settings::default();
    docs::update_due(
        docs,
        &workspace_pk(workspace),
        REFRESH_SK,
        |current: Option<RefreshDoc>| {
            let mut next = current?;
            // The replaced period's months still owed follow its money too.
            let previous = next
                .previous
                .as_mut()
                .is_some_and(|p| p.give_back(invoice, given));
            if !next.give_back(invoice, given) && !previous {
                return None;
            }
            let due = next.due_mark(settings.shards, settings.grace);
            Some((next, due))
        },
    )
    .await?;
    Ok(())
}

/// A paid change inside a period (at `at`): the remaining allotments of that period follow
/// the level it paid for, unless a later change already set one. A change applied before
/// its period's own invoice records the period at that level (the period's invoice then
/// leaves it as it is).
pub async fn set_level(
    docs: &dyn DocStore,
    p: &PaidPeriod,
    at: DateTime<Utc>,
    rank: u64,
    billed: Billed,
) -> Result<(), StoreError> {
    let settings = Settings::default();
    docs::update_due(
        docs,
        &workspace_pk(&p.workspace),
        REFRESH_SK,
        |current: Option<RefreshDoc>| {
            let doc = match current {
                Some(mut c)
                    if c.same_period(&p.subscription, p.period_start, p.period_end, None) =>
                {
                    let learned = c.remember_terms(p);
                    if !c.set_level(p, at, rank, billed) && !learned {
                        return None;
                    }
                    c
                }
                // A change of a period the document's replaced (in the same second, by a
                // switch), or of an older one. A change of another period from the same
                // second is ranked as a switch's (see `known_rank`).
                Some(c) if !c.followed_by(p.period_start, Some(SWITCH | rank)) => return None,
                current => {
                    let mut fresh = RefreshDoc::from_period(p);
                    fresh.level_as_of = Some(at);
                    fresh.level_rank = Some(rank);
                    fresh.settle_at = current.as_ref().and_then(|c| c.settle_at);
                    // Months of the replaced period already due are still owed.
                    fresh.previous = current.and_then(|c| c.owed_before(p));
                    fresh.opened_by = Some(OpeningChange {
                        at,
                        rank,
                        level: fresh.parts(),
                        billed: Some(billed),
                    });
                    if let Some(parts) = &mut fresh.parts {
                        parts.set_by(billed, at, rank);
                    }
                    fresh
                }
            };
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
