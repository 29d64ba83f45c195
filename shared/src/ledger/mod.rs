//! The ledger: lots of credits, holds on them, and the append-only journal that moves them.
//!
//! State is event-sourced: the engine ([`engine`]) decides which [`Entry`]s an operation
//! produces, and [`WorkspaceState::apply`] is the only code that changes state. Applying the
//! journal from the first entry therefore rebuilds exactly the stored state.

pub mod engine;

use crate::catalog::Estimate;
use crate::ids::{GenerationId, InvoiceId, RefundId, StripeEventId, WorkspaceId};
use crate::money::{CreditDelta, Credits};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use utoipa::ToSchema;

pub use crate::subscriptions::{Interval, PlanState, PlanStatus};
pub use engine::{Applied, Command, Operation, Outcome, Share, execute};

/// Where a lot of credits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LotSource {
    /// A plan's allowance for one billing period.
    PlanPeriod,
    /// Recurring add-on units for one billing period.
    Addon,
    /// A one-off credit pack.
    Pack,
    Promo,
    /// A goodwill grant or correction by support staff.
    Adjustment,
    /// Credits given back by reversing an earlier debit.
    Reversal,
}

/// A grant of credits that is spent down over time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lot {
    /// Sequence number of the journal entry that created the lot; shown as `lot_<seq>`.
    pub seq: u64,
    pub source: LotSource,
    pub original: Credits,
    /// Credits not yet spent, expired or taken back; includes the `held` part.
    pub remaining: Credits,
    /// Part of `remaining` reserved by open holds.
    pub held: Credits,
    /// Part of `remaining` that cannot be spent while the payment that bought it is
    /// disputed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frozen: Credits,
    /// Cents of the payment that bought the lot already refunded and taken back from it
    /// (so each refunded cent takes its share once, whatever order refunds are seen in).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub refunded_cents: u64,
    /// Cents of the payment that bought the lot that a lost dispute took, with its share of
    /// the lot's credits: a refund followed after it takes its share of what the rest of
    /// the payment bought.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub lost_cents: u64,
    /// Part of `held` whose money went back while a generation held it (a refund, a lost
    /// dispute, a change credited back): what the hold releases of it is taken back
    /// instead of becoming free again; what the hold spends stays spent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub owed: Credits,
    /// Part of `held` that a dispute of the lot's payment would have frozen: what the hold
    /// releases of it is frozen instead of becoming free again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub owed_frozen: Credits,
    pub granted_at: DateTime<Utc>,
    /// The subscription billing month (its start) the lot's credits are for: a yearly
    /// month's allotment, an invoice's first month, a change's rest of the month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<DateTime<Utc>>,
    /// `None` for credits that never expire while the workspace is active.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Lot {
    pub fn id(&self) -> String {
        format!("lot_{}", self.seq)
    }
    pub fn free(&self) -> Credits {
        // `apply` refuses any entry that would leave `held + frozen` above `remaining`.
        self.remaining - self.held - self.frozen
    }
    /// Held credits not already owed (to a refund, a lost dispute or a credited change, or
    /// to a dispute's freeze) when their hold releases them.
    pub fn claimable_held(&self) -> Credits {
        self.held
            .saturating_sub(self.owed)
            .saturating_sub(self.owed_frozen)
    }
    /// Burn order: earliest expiry first, never-expiring last, then oldest first.
    pub fn burn_key(&self) -> (bool, Option<DateTime<Utc>>, u64) {
        (self.expires_at.is_none(), self.expires_at, self.seq)
    }
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// A field that is present, even as `null`: `Some(value)`; an absent one is `None` (by
/// `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn is_zero(c: &Credits) -> bool {
    *c == Credits::ZERO
}

fn is_zero_delta(c: &CreditDelta) -> bool {
    *c == CreditDelta::ZERO
}

fn is_zero_u64(c: &u64) -> bool {
    *c == 0
}

/// Part of a hold reserved on one lot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Allocation {
    pub lot: u64,
    pub amount: Credits,
}

/// Credits reserved for a running generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Hold {
    pub generation: GenerationId,
    pub amount: Credits,
    pub allocations: Vec<Allocation>,
    pub placed_seq: u64,
    pub created_at: DateTime<Utc>,
    /// After this the hold is released without charge by the next operation on the workspace.
    pub deadline: DateTime<Utc>,
    /// The `sub` of the member who started the generation.
    pub started_by: String,
    pub estimate: Estimate,
}

/// Running totals that make conservation checkable:
/// `issued = Σ lot.remaining + spent + expired + clawed_back + adjusted_out`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Totals {
    pub issued: Credits,
    pub spent: Credits,
    pub expired: Credits,
    pub clawed_back: Credits,
    pub adjusted_out: Credits,
}

impl Totals {
    fn add(&mut self, d: &Totals) -> Result<(), LedgerError> {
        let add = |a: &mut Credits, b: Credits| {
            *a = a
                .checked_add(b)
                .ok_or_else(|| LedgerError::Corrupt("totals overflow".into()))?;
            Ok::<_, LedgerError>(())
        };
        add(&mut self.issued, d.issued)?;
        add(&mut self.spent, d.spent)?;
        add(&mut self.expired, d.expired)?;
        add(&mut self.clawed_back, d.clawed_back)?;
        add(&mut self.adjusted_out, d.adjusted_out)
    }
    fn is_zero(&self) -> bool {
        *self == Totals::default()
    }
}

/// Everything the ledger holds for one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceState {
    pub workspace: WorkspaceId,
    /// Store version for optimistic concurrency: 0 means never written.
    pub version: u64,
    /// Sequence number the next journal entry gets; entries start at 1.
    pub next_seq: u64,
    pub plan: Option<PlanState>,
    pub lots: Vec<Lot>,
    /// Open holds kept inside the state item by releases before holds got items of their
    /// own. Nothing adds to this list any more; it empties as those holds close. Written
    /// under a new name: the release before hold items must fail to read a state it would
    /// write back without the hold count, rather than lose track of the hold items.
    #[serde(
        default,
        rename = "inline_holds",
        alias = "holds",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub holds: Vec<Hold>,
    /// Open holds this operation has read from their own items (the store keeps each in
    /// a hold item beside its generation), or, for a state rebuilt from the journal, every
    /// open hold. Never part of the state item, so the item does not grow with holds.
    #[serde(skip)]
    pub loaded: Vec<Hold>,
    /// How many holds are open, wherever they are kept.
    #[serde(default)]
    pub open_holds: u64,
    /// No open hold has a deadline before this (a lower bound, exact after a settlement
    /// has read the holds that end first); `None` when no hold is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
    pub totals: Totals,
    /// Training generations (held or completed) occupying custom-model slots.
    pub custom_models: Vec<GenerationId>,
    /// Credits yearly months' allotments owe back before they grant anything: money for
    /// unused time credited back by a change made in a month whose allotment the credit
    /// refresh had not granted yet (there was nothing of that month to take back). One
    /// per such month; an allotment's grant withholds its month's and drops those of
    /// earlier months (never granted: nothing is owed for them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed_by_months: Vec<MonthOwes>,
    /// The latest yearly month whose allotment was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allotted_through: Option<DateTime<Utc>>,
}

/// Credits a yearly month's allotment owes back (or, on an entry, the change to that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MonthOwes {
    /// The month's start (its allotment's date).
    pub month: DateTime<Utc>,
    pub credits: CreditDelta,
}

impl WorkspaceState {
    /// What the allotment of the month starting at `month` owes back.
    pub fn owed_by_month(&self, month: DateTime<Utc>) -> Credits {
        self.owed_by_months
            .iter()
            .find(|o| o.month == month)
            .map_or(Credits::ZERO, |o| o.credits.unsigned_abs())
    }
}

/// What a workspace can spend right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    pub available: Credits,
    pub held: Credits,
    /// Credits of disputed payments: not spendable until the dispute closes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frozen: Credits,
}

/// Why a journal entry was written. Stable codes: finance reports key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    PlanCredits,
    AddonCredits,
    PackPurchase,
    PromoCredits,
    AdjustmentCredit,
    AdjustmentDebit,
    Reversal,
    HoldPlaced,
    GenerationCharged,
    HoldReleased,
    HoldExpired,
    LotsExpired,
    PlanChanged,
    /// Unspent credits of a lot taken back because the payment that bought it was refunded.
    RefundTakeBack,
    /// Unspent credits of a lot frozen while its payment is disputed.
    DisputeFreeze,
    /// A dispute won: the lot's frozen credits are spendable again.
    DisputeWon,
    /// A dispute lost: the lot's frozen credits are taken back.
    DisputeLost,
    /// A trained custom model retired: its custom-model slot is free again.
    ModelRetired,
}

/// Who caused an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Member,
    Service,
    Admin,
    Stripe,
    System,
}

impl Actor {
    pub fn new(kind: ActorKind, id: impl Into<String>) -> Self {
        Self {
            kind,
            id: id.into(),
        }
    }
    pub fn system() -> Self {
        Self::new(ActorKind::System, "tally")
    }
}

/// Links from an entry to the things that caused it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Refs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub generation: Option<GenerationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_event: Option<StripeEventId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice: Option<InvoiceId>,
    /// The Stripe payment behind a pack. Checkouts and top-ups record the payment intent
    /// (`pi_...`) here, not a charge, so it stays a plain string rather than a `ChargeId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<RefundId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A change to one lot inside an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum LotChange {
    Created {
        lot: Lot,
    },
    Changed {
        lot: u64,
        remaining: CreditDelta,
        held: CreditDelta,
        /// More credits of the same kind added to a lot that bought nothing (a reversal or
        /// a staff grant that never expires, on the lot of earlier ones): `original` grows
        /// with `remaining`, so such grants keep one lot however many there are.
        #[serde(default, skip_serializing_if = "is_zero_delta")]
        original: CreditDelta,
    },
    /// Credits of the lot frozen (positive) or unfrozen (negative) by a dispute.
    Frozen {
        lot: u64,
        frozen: CreditDelta,
    },
    /// How much of the lot's payment has been refunded and taken back from it (only grows),
    /// and how much lost disputes took with their share (`lost`, only grows).
    Refunded {
        lot: u64,
        cents: u64,
        #[serde(default, skip_serializing_if = "is_zero_u64")]
        lost: u64,
    },
    /// Held credits of the lot that go when their hold releases them: taken back (`take`)
    /// or frozen (`freeze`), as [`Lot::owed`] and [`Lot::owed_frozen`] change.
    Owed {
        lot: u64,
        #[serde(default, skip_serializing_if = "is_zero_delta")]
        take: CreditDelta,
        #[serde(default, skip_serializing_if = "is_zero_delta")]
        freeze: CreditDelta,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum HoldChange {
    Placed {
        hold: Hold,
    },
    Closed {
        #[schema(value_type = String)]
        generation: GenerationId,
    },
}

/// An immutable journal entry. Corrections are new entries, never edits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    pub seq: u64,
    /// Deterministic: the operation's idempotency key and the entry's position in it.
    pub id: String,
    pub at: DateTime<Utc>,
    pub reason: Reason,
    /// Net change to the available balance.
    pub credits: CreditDelta,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lots: Vec<LotChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldChange>,
    #[serde(default, skip_serializing_if = "Totals::is_zero")]
    pub totals: Totals,
    /// `Some(new plan)` when the entry changes the plan (`Some(None)`, stored as `null`,
    /// removes it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub plan: Option<Option<PlanState>>,
    /// A custom-model slot taken (`true`) or given back (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_model_slot: Option<bool>,
    /// Credits a yearly month's allotment owes back (see [`WorkspaceState::owed_by_months`]):
    /// more (a change credited back in that month before its allotment was granted) or
    /// fewer (withheld from the allotment's grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month_owes: Option<MonthOwes>,
    /// The yearly month (its start) whose allotment this entry grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allotted: Option<DateTime<Utc>>,
    pub balance_after: Balance,
    pub actor: Actor,
    #[serde(default)]
    pub refs: Refs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The lifecycle of a generation's charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GenerationStatus {
    Held,
    Completed,
    Failed,
    /// Neither completed nor failed before its deadline: released without charge.
    Expired,
}

impl GenerationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationStatus::Held => "held",
            GenerationStatus::Completed => "completed",
            GenerationStatus::Failed => "failed",
            GenerationStatus::Expired => "expired",
        }
    }
}

/// A generation as creation history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Generation {
    #[schema(value_type = String)]
    pub id: GenerationId,
    #[schema(value_type = String)]
    pub workspace: WorkspaceId,
    pub started_by: String,
    pub estimate: Estimate,
    pub held: Credits,
    pub status: GenerationStatus,
    pub charged: Credits,
    /// Credits of the exact cost that could not be collected because the balance ran out.
    pub shortfall: Credits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<DateTime<Utc>>,
    /// Journal entries (by sequence number) that moved this generation's credits.
    pub entries: Vec<u64>,
    /// Credits given back by reversing the charge (a faulty output); at most `charged`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reversed: Credits,
}

impl Generation {
    /// The generation as of `now`: a hold past its deadline shows as expired even before
    /// the next write on the workspace settles it.
    pub fn as_of(mut self, now: DateTime<Utc>) -> Self {
        if self.status == GenerationStatus::Held && self.deadline <= now {
            self.status = GenerationStatus::Expired;
        }
        self
    }
}

/// Ways an operation can be refused. Refusals change nothing.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("this needs {needed} credits but only {available} are available")]
    InsufficientCredits { needed: Credits, available: Credits },
    #[error("all {slots} custom-model slots of the plan are in use")]
    NoCustomModelSlot { slots: u32 },
    #[error("generation {0} does not exist")]
    GenerationNotFound(GenerationId),
    #[error("generation {0} already exists")]
    GenerationExists(GenerationId),
    #[error("generation {0} is not an active custom model of this workspace")]
    NotACustomModel(GenerationId),
    #[error("generation {0} is still training; its model can be retired once it completes")]
    ModelInTraining(GenerationId),
    #[error("generation {0} was already reversed")]
    AlreadyReversed(GenerationId),
    #[error(
        "generation {id} is {status}; only a completed generation with a charge can be reversed"
    )]
    NotReversible {
        id: GenerationId,
        status: &'static str,
    },
    #[error("generation {id} is already {status}")]
    AlreadySettled {
        id: GenerationId,
        status: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("journal is inconsistent: {0}")]
    Corrupt(String),
}

/// The lot an entry changes; an unknown one means the journal is inconsistent.
fn lot_mut(lots: &mut [Lot], lot: u64) -> Result<&mut Lot, LedgerError> {
    lots.iter_mut()
        .find(|l| l.seq == lot)
        .ok_or_else(|| LedgerError::Corrupt(format!("unknown lot {lot}")))
}

/// Holds and freezes are backed by the lot's remaining credits.
fn backed(l: &mut Lot) -> Result<(), LedgerError> {
    if l.held.checked_add(l.frozen).is_none_or(|t| t > l.remaining) {
        return Err(LedgerError::Corrupt(format!("lot {} out of range", l.seq)));
    }
    // What stays held owes at most what it holds. The engine lowers what is owed before a
    // release; an entry written by an earlier release of the ledger, which did not know
    // owed credits, releases them without doing so, and must still apply (rebuilding the
    // journal).
    l.owed = l.owed.min(l.held);
    l.owed_frozen = l.owed_frozen.min(l.held - l.owed);
    Ok(())
}

impl WorkspaceState {
    pub fn new(workspace: WorkspaceId) -> Self {
        Self {
            workspace,
            version: 0,
            next_seq: 1,
            plan: None,
            lots: Vec::new(),
            holds: Vec::new(),
            loaded: Vec::new(),
            open_holds: 0,
            next_due: None,
            totals: Totals::default(),
            custom_models: Vec::new(),
            owed_by_months: Vec::new(),
            allotted_through: None,
        }
    }

    /// Rebuilds state from the journal alone.
    pub fn from_journal<'a>(
        workspace: WorkspaceId,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> Result<Self, LedgerError> {
        let mut state = Self::new(workspace);
        for e in entries {
            state.apply(e)?;
        }
        Ok(state)
    }

    /// Applies one entry. This is the only place state changes.
    pub fn apply(&mut self, e: &Entry) -> Result<(), LedgerError> {
        if e.seq != self.next_seq {
            return Err(LedgerError::Corrupt(format!(
                "entry {} applied when {} was expected",
                e.seq, self.next_seq
            )));
        }
        for change in &e.lots {
            match change {
                LotChange::Created { lot } => self.lots.push(lot.clone()),
                LotChange::Changed {
                    lot,
                    remaining,
                    held,
                    original,
                } => {
                    let l = lot_mut(&mut self.lots, *lot)?;
                    let corrupt = || LedgerError::Corrupt(format!("lot {lot} out of range"));
                    l.original = l
                        .original
                        .checked_add_delta(*original)
                        .ok_or_else(corrupt)?;
                    l.remaining = l
                        .remaining
                        .checked_add_delta(*remaining)
                        .ok_or_else(corrupt)?;
                    l.held = l.held.checked_add_delta(*held).ok_or_else(corrupt)?;
                    backed(l)?;
                }
                LotChange::Refunded { lot, cents, lost } => {
                    let l = lot_mut(&mut self.lots, *lot)?;
                    if *cents < l.refunded_cents {
                        return Err(LedgerError::Corrupt(format!(
                            "lot {lot} refunded cents would fall"
                        )));
                    }
                    l.refunded_cents = *cents;
                    // An entry written by a release before lost disputes were counted
                    // names none: it keeps what the lot counted.
                    l.lost_cents = l.lost_cents.max(*lost);
                }
                LotChange::Frozen { lot, frozen } => {
                    let l = lot_mut(&mut self.lots, *lot)?;
                    l.frozen = l
                        .frozen
                        .checked_add_delta(*frozen)
                        .ok_or_else(|| LedgerError::Corrupt(format!("lot {lot} out of range")))?;
                    backed(l)?;
                }
                LotChange::Owed { lot, take, freeze } => {
                    let l = lot_mut(&mut self.lots, *lot)?;
                    let corrupt = || LedgerError::Corrupt(format!("lot {lot} out of range"));
                    l.owed = l.owed.checked_add_delta(*take).ok_or_else(corrupt)?;
                    l.owed_frozen = l
                        .owed_frozen
                        .checked_add_delta(*freeze)
                        .ok_or_else(corrupt)?;
                    if l.owed.checked_add(l.owed_frozen).is_none_or(|o| o > l.held) {
                        return Err(corrupt());
                    }
                }
            }
        }
        match &e.hold {
            Some(HoldChange::Placed { hold }) => {
                self.open_holds += 1;
                self.next_due = Some(
                    self.next_due
                        .map_or(hold.deadline, |d| d.min(hold.deadline)),
                );
                self.loaded.push(hold.clone());
            }
            Some(HoldChange::Closed { generation }) => {
                let before = self.holds.len() + self.loaded.len();
                self.holds.retain(|h| h.generation != *generation);
                self.loaded.retain(|h| h.generation != *generation);
                if self.holds.len() + self.loaded.len() == before || self.open_holds == 0 {
                    return Err(LedgerError::Corrupt(format!("no hold for {generation}")));
                }
                self.open_holds -= 1;
                if self.open_holds == 0 {
                    self.next_due = None;
                }
            }
            None => {}
        }
        self.totals.add(&e.totals)?;
        if let Some(change) = e.month_owes {
            let owed = self
                .owed_by_month(change.month)
                .checked_add_delta(change.credits)
                .ok_or_else(|| {
                    LedgerError::Corrupt("credits owed by a month out of range".into())
                })?;
            self.owed_by_months.retain(|o| o.month != change.month);
            if owed > Credits::ZERO {
                self.owed_by_months.push(MonthOwes {
                    month: change.month,
                    credits: CreditDelta::increase(owed),
                });
                self.owed_by_months.sort_by_key(|o| o.month);
            }
        }
        if let Some(month) = e.allotted {
            self.allotted_through = self.allotted_through.max(Some(month));
            self.owed_by_months.retain(|o| o.month >= month);
        }
        if let Some(plan) = &e.plan {
            self.plan = plan.clone();
        }
        if let (Some(taken), Some(generation)) = (e.custom_model_slot, e.refs.generation) {
            if taken {
                self.custom_models.push(generation);
            } else {
                self.custom_models.retain(|g| *g != generation);
            }
        }
        // Spent-out lots leave the state (the journal keeps their history) so the state
        // item stays small however long the workspace lives.
        self.lots.retain(|l| l.remaining > Credits::ZERO);
        self.next_seq = e.seq + 1;
        Ok(())
    }

    /// Balance from the stored state, without settling anything.
    pub fn balance(&self) -> Balance {
        let held: Credits = self.lots.iter().map(|l| l.held).sum();
        let remaining: Credits = self.lots.iter().map(|l| l.remaining).sum();
        let frozen: Credits = self.lots.iter().map(|l| l.frozen).sum();
        Balance {
            // Holds and freezes are backed by lot credits (`check_invariants`), so never
            // below zero.
            available: remaining - held - frozen,
            held,
            frozen,
        }
    }

    /// The state as it is at `now`: overdue holds released, lapsed lots expired. Used by
    /// reads so they are right even before the next write settles the workspace.
    pub fn settled_at(&self, now: DateTime<Utc>) -> Result<WorkspaceState, LedgerError> {
        engine::settle_view(self, now)
    }

    /// Whether settling at `now` would change anything: an overdue hold to release or a
    /// lapsed lot with free credits to expire.
    pub fn needs_settling(&self, now: DateTime<Utc>) -> bool {
        self.holds_due(now)
            || self
                .lots
                .iter()
                .any(|l| !l.usable_at(now) && l.free() > Credits::ZERO)
    }

    /// The first time after `now` at which settling will have something to do: a hold
    /// deadline or the expiry of a lot that still has credits. (Credits held on a lot that
    /// has already lapsed expire when their hold ends, so the hold's deadline covers them.)
    pub fn next_settlement_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let holds = self.next_due.into_iter();
        let lots = self
            .lots
            .iter()
            .filter(|l| l.remaining > Credits::ZERO)
            .filter_map(|l| l.expires_at);
        holds.chain(lots).filter(|t| *t > now).min()
    }

    /// The open holds at hand: those still inside the state item, then those read for this
    /// operation.
    pub fn known_holds(&self) -> impl Iterator<Item = &Hold> {
        self.holds.iter().chain(self.loaded.iter())
    }

    /// An open hold at hand, by generation.
    pub fn known_hold(&self, generation: GenerationId) -> Option<&Hold> {
        self.known_holds().find(|h| h.generation == generation)
    }

    /// Whether a hold may be past its deadline at `now`, so settling should read the holds
    /// that end first.
    pub fn holds_due(&self, now: DateTime<Utc>) -> bool {
        self.open_holds > 0 && self.next_due.is_none_or(|d| d <= now)
    }

    /// Adds holds read from their items, skipping any already at hand and any placed after
    /// this state was read (its lots do not carry those yet).
    pub fn load_holds(&mut self, holds: impl IntoIterator<Item = Hold>) {
        for h in holds {
            if h.placed_seq < self.next_seq && self.known_hold(h.generation).is_none() {
                self.loaded.push(h);
            }
        }
    }

    /// A state item written before holds had items of their own counts its inline holds.
    pub fn normalized(mut self) -> Self {
        if self.open_holds == 0 && !self.holds.is_empty() {
            self.open_holds = self.holds.len() as u64;
            self.next_due = self.holds.iter().map(|h| h.deadline).min();
        }
        self
    }

    /// The state as stored: without the holds read for an operation. A state rebuilt from
    /// the journal compares equal to the stored one once both are in this form (and the
    /// earliest deadline, which settling tightens from the hold items, is taken from
    /// `stored`).
    pub fn as_stored_like(&self, stored: &WorkspaceState) -> WorkspaceState {
        let mut s = self.clone();
        s.loaded.clear();
        s.version = stored.version;
        s.next_due = stored.next_due;
        s
    }

    /// Checks every invariant the ledger promises; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let remaining: Credits = self.lots.iter().map(|l| l.remaining).sum();
        let t = &self.totals;
        let out = remaining + t.spent + t.expired + t.clawed_back + t.adjusted_out;
        if t.issued != out {
            return Err(format!(
                "conservation: issued {} != accounted {out}",
                t.issued
            ));
        }
        let known = (self.holds.len() + self.loaded.len()) as u64;
        if known > self.open_holds {
            return Err(format!(
                "{known} holds known but {} counted open",
                self.open_holds
            ));
        }
        // With every open hold at hand (a state rebuilt from the journal), the lots hold
        // exactly what the holds add up to.
        if known == self.open_holds {
            let lot_held: Credits = self.lots.iter().map(|l| l.held).sum();
            let hold_sum: Credits = self.known_holds().map(|h| h.amount).sum();
            if lot_held != hold_sum {
                return Err(format!("lots hold {lot_held} but holds total {hold_sum}"));
            }
        }
        if let (Some(due), false) = (self.next_due, self.open_holds == 0) {
            if self.known_holds().any(|h| h.deadline < due) {
                return Err("a hold ends before the earliest deadline recorded".into());
            }
        } else if self.open_holds > 0 {
            return Err("open holds without an earliest deadline".into());
        }
        for h in self.known_holds() {
            let alloc: Credits = h.allocations.iter().map(|a| a.amount).sum();
            if alloc != h.amount {
                return Err(format!("hold {} allocations do not add up", h.generation));
            }
        }
        if self
            .lots
            .iter()
            .any(|l| l.held.checked_add(l.frozen).is_none_or(|t| t > l.remaining))
        {
            return Err("a lot holds or freezes more than it has".into());
        }
        if self
            .lots
            .iter()
            .any(|l| l.owed.checked_add(l.owed_frozen).is_none_or(|o| o > l.held))
        {
            return Err("a lot owes more of its held credits than it holds".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
