//! The pure ledger engine: given a state and a command, decide the journal entries.
//!
//! Every command first settles the workspace lazily (overdue holds released, lapsed lots
//! expired) so correctness never waits for a schedule, then performs its operation, then
//! settles again (credits released back onto an already-lapsed lot expire at once).

use super::*;
use crate::catalog::Catalog;
use crate::ids::IdempotencyKey;
use crate::money::{CreditDelta, Credits};
use std::collections::BTreeMap;

/// At most this many overdue holds are released by one operation, which keeps one
/// operation inside a single store transaction: each release writes a journal entry,
/// its generation and the removal of its hold item (75 items), and the operation itself
/// at most 8 more, within DynamoDB's 100. Unreleased overdue holds only make the balance
/// look lower until the next operation, never negative, and reads settle them all in view.
pub const MAX_HOLDS_SETTLED_PER_OPERATION: usize = 25;

/// One ledger operation, with everything needed to make it exactly-once and auditable.
#[derive(Debug, Clone)]
pub struct Command {
    pub key: IdempotencyKey,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    pub refs: Refs,
    pub op: Operation,
}

#[derive(Debug, Clone)]
pub enum Operation {
    /// Adds a lot of credits.
    Grant {
        source: LotSource,
        credits: Credits,
        expires_at: Option<DateTime<Utc>>,
        note: Option<String>,
        /// The subscription billing month (its start) the credits are for.
        month: Option<DateTime<Utc>>,
    },
    /// A yearly month's plan or add-on credits, granted by the credit refresh: what the
    /// month owes back ([`WorkspaceState::owed_by_months`]) is withheld first, and what
    /// earlier months still owed is dropped (their allotments were never granted).
    Allotment {
        source: LotSource,
        credits: Credits,
        expires_at: DateTime<Utc>,
        note: String,
        /// The month's start (the allotment's date).
        month: DateTime<Utc>,
        /// The month's last grant (plan, then add-ons): after it the month counts as
        /// granted, and a change credited back in it takes from its lots instead of
        /// owing.
        last: bool,
    },
    /// Support staff's signed correction: positive grants a never-expiring lot, negative
    /// takes credits from available lots in burn order (never below zero).
    Adjust {
        credits: CreditDelta,
        note: String,
    },
    SetPlan {
        plan: Option<PlanState>,
    },
    /// Reserves the estimate of a generation.
    Hold {
        generation: GenerationId,
        estimate: Estimate,
        deadline: DateTime<Utc>,
    },
    /// Charges the exact cost (default: the held estimate) and closes the hold. `record`
    /// is the stored generation, needed when the hold is already gone.
    Complete {
        generation: GenerationId,
        credits: Option<Credits>,
        record: Option<Generation>,
    },
    /// Releases the hold without charge.
    Fail {
        generation: GenerationId,
        reason: String,
        record: Option<Generation>,
    },
    /// Only settles: releases overdue holds (at most [`MAX_HOLDS_SETTLED_PER_OPERATION`])
    /// and expires lapsed lots, which every operation does first anyway. The credit-refresh
    /// worker repeats it until the workspace is settled, so holds nobody touches again are
    /// still released on time. With nothing due it produces no entry.
    Settle,
    /// A refund: `refunded` of the `paid` cents of the lot's payment are back with the
    /// customer. The cents not yet taken back from this lot take their share of its unspent
    /// credits, frozen ones included (rounded down):
    /// `(refunded - already) / (paid - already - lost)`, where `lost` is what lost
    /// disputes took ([`Lot::lost_cents`]); the free
    /// ones at once, then frozen ones (a dispute's claim moving onto held ones), and those
    /// running generations hold as they release them ([`Lot::owed`]). Nothing more when
    /// the lot already followed that much; a lot spent out takes nothing (the entry still
    /// records the refund).
    TakeBack {
        lot: u64,
        refunded: u64,
        paid: u64,
        note: String,
    },
    /// A paid change whose lines are worth less than nothing in credits: Stripe credited
    /// the customer (to their balance) for unused time worth `credits` more than the new
    /// time. Takes up to `credits` of the free plan and add-on credits back, latest
    /// expiring first (the month the credited time belongs to, not an older month's
    /// rollover, which a refund of its own invoice may still take); what running
    /// generations hold goes as they release it, credits already spent stay so, and packs
    /// are never touched. Zero records that nothing is taken.
    ///
    /// `month_from`: the change fell in a yearly billing month that began then and whose
    /// allotment had not been granted when the change was recorded. Only plan and add-on
    /// credits granted since then are taken (the month's own, and a rise's made in it);
    /// while the ledger has not granted the month's allotment, that allotment owes the rest
    /// back ([`WorkspaceState::owed_by_months`]), so the month comes to what was paid for
    /// it whatever order the changes arrive in.
    ChangeCredited {
        credits: Credits,
        note: String,
        month_from: Option<DateTime<Utc>>,
    },
    /// A dispute opened: freezes `share` of the lot's unspent credits (rounded down), the
    /// free ones at once and those running generations hold as they release them.
    Freeze {
        lot: u64,
        share: Share,
        /// The share is of all that was paid: what the lot has already followed of the
        /// payment (refunded or credited and taken back, lost in a dispute) comes off both
        /// sides, so a freeze followed before or after a refund is the same share.
        of_rest: bool,
        note: String,
    },
    /// A dispute closed: the lot's frozen credits become spendable again (won) or are
    /// taken back (lost).
    Unfreeze {
        lot: u64,
        take_back: bool,
        /// Lost: the cents the dispute took ([`Lot::lost_cents`]); won, zero.
        lost_cents: u64,
        note: String,
    },
    /// Gives back the charge of a completed generation whose output was faulty, once.
    Reverse {
        generation: GenerationId,
        record: Option<Generation>,
        reason: String,
    },
    /// Retires a trained custom model: the custom-model slot its training took is free
    /// again (the plan counts active models). Only a model whose training completed; the
    /// journal records it, and no credits move.
    RetireModel {
        generation: GenerationId,
    },
}

impl Operation {
    /// A stable name of the kind of operation (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::Grant { .. } => "grant",
            Operation::Allotment { .. } => "allotment",
            Operation::Adjust { .. } => "adjust",
            Operation::SetPlan { .. } => "set_plan",
            Operation::Hold { .. } => "hold",
            Operation::Complete { .. } => "complete",
            Operation::Fail { .. } => "fail",
            Operation::Settle => "settle",
            Operation::TakeBack { .. } => "take_back",
            Operation::ChangeCredited { .. } => "change_credited",
            Operation::Freeze { .. } => "freeze",
            Operation::Unfreeze { .. } => "unfreeze",
            Operation::Reverse { .. } => "reverse",
            Operation::RetireModel { .. } => "retire_model",
        }
    }
}

/// A fraction of a lot, from money: the refunded (or disputed) amount over the amount not
/// yet refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub numerator: u64,
    pub denominator: u64,
}

impl Share {
    /// `credits × numerator / denominator`, rounded down, never more than `credits`.
    pub fn of(self, credits: Credits) -> Credits {
        if self.denominator == 0 {
            return Credits::ZERO;
        }
        let n = self.numerator.min(self.denominator);
        let v = u128::from(credits.get()) * u128::from(n) / u128::from(self.denominator);
        Credits::new(u64::try_from(v).unwrap_or(u64::MAX)).min(credits)
    }
}

/// What a command did, in the form the first caller saw it; replays return this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub entries: Vec<u64>,
    pub balance: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
    /// Credits this operation took back (refunds, lost disputes).
    #[serde(default, skip_serializing_if = "Credits::is_zero")]
    pub clawed_back: Credits,
    /// Credits a grant added (an allotment's, less what its month owed back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Credits>,
}

/// The result of a command: new state, the entries to append, generation records to
/// write, and the outcome to hand back (and remember under the idempotency key).
#[derive(Debug, Clone)]
pub struct Applied {
    pub state: WorkspaceState,
    pub entries: Vec<Entry>,
    /// Generation records to write, each with the status it had when read (`None` for a
    /// new one), so the write only lands on the record the operation saw.
    pub generations: Vec<(Option<GenerationStatus>, Generation)>,
    /// Holds this operation placed (each gets an item of its own).
    pub placed: Vec<Hold>,
    /// Holds this operation closed (their items go).
    pub closed: Vec<Hold>,
    pub outcome: Outcome,
    /// The balance once the operation's own settlement ran (overdue holds released, at
    /// most [`MAX_HOLDS_SETTLED_PER_OPERATION`], lapsed lots expired), before the
    /// operation itself.
    pub settled: Balance,
}

struct Tx<'a> {
    state: WorkspaceState,
    cmd: &'a Command,
    entries: Vec<Entry>,
    generations: BTreeMap<GenerationId, (Option<GenerationStatus>, Generation)>,
    placed: Vec<Hold>,
    closed: Vec<Hold>,
    /// Overdue holds released so far by this operation (bounded by
    /// [`MAX_HOLDS_SETTLED_PER_OPERATION`] across both of its settlements).
    released: usize,
}

struct Draft {
    reason: Reason,
    credits: CreditDelta,
    lots: Vec<LotChange>,
    hold: Option<HoldChange>,
    totals: Totals,
    plan: Option<Option<PlanState>>,
    custom_model_slot: Option<bool>,
    month_owes: Option<MonthOwes>,
    allotted: Option<DateTime<Utc>>,
    actor: Actor,
    generation: Option<GenerationId>,
    note: Option<String>,
    /// Written by the settling every operation does first (an overdue hold released, lapsed
    /// credits expired), not by the operation: it carries none of the operation's
    /// references (its payment, invoice, event, ticket), only its own generation and the
    /// key of the transaction that wrote it; unless the operation is a settlement itself.
    settlement: bool,
}

impl Draft {
    fn new(reason: Reason, actor: Actor) -> Self {
        Self {
            reason,
            credits: CreditDelta::ZERO,
            lots: Vec::new(),
            hold: None,
            totals: Totals::default(),
            plan: None,
            custom_model_slot: None,
            month_owes: None,
            allotted: None,
            actor,
            generation: None,
            note: None,
            settlement: false,
        }
    }
}

/// Runs one command against a state. Pure: no I/O, no clock but `cmd.at`.
pub fn execute(
    state: &WorkspaceState,
    cmd: &Command,
    catalog: &Catalog,
) -> Result<Applied, LedgerError> {
    let mut tx = Tx {
        state: state.clone(),
        cmd,
        entries: Vec::new(),
        generations: BTreeMap::new(),
        placed: Vec::new(),
        closed: Vec::new(),
        released: 0,
    };
    tx.settle()?;
    let settled = tx.state.balance();
    let first = tx.entries.len();
    let (generation, lot) = tx.operate(catalog)?;
    let own = tx.entries.len();
    tx.settle()?;
    let outcome = Outcome {
        entries: tx.entries.iter().map(|e| e.seq).collect(),
        balance: tx.state.balance(),
        generation,
        lot,
        granted: matches!(
            cmd.op,
            Operation::Grant { .. } | Operation::Allotment { .. }
        )
        .then(|| tx.entries[first..own].iter().map(|e| e.totals.issued).sum()),
        // The operation's own entries only: a settlement around it may take back credits
        // other money went back for (held then, released now).
        clawed_back: tx.entries[first..own]
            .iter()
            .try_fold(Credits::ZERO, |acc, e| {
                acc.checked_add(e.totals.clawed_back)
            })
            .ok_or_else(|| LedgerError::Corrupt("clawed-back credits overflow".into()))?,
    };
    Ok(Applied {
        state: tx.state,
        entries: tx.entries,
        generations: tx.generations.into_values().collect(),
        placed: tx.placed,
        closed: tx.closed,
        outcome,
        settled,
    })
}

/// The state settled at `now`, for reads. Nothing is written.
pub(super) fn settle_view(
    state: &WorkspaceState,
    now: DateTime<Utc>,
) -> Result<WorkspaceState, LedgerError> {
    let cmd = Command {
        key: IdempotencyKey::derived("view".into()),
        at: now,
        actor: Actor::system(),
        refs: Refs::default(),
        op: Operation::SetPlan { plan: None },
    };
    let mut tx = Tx {
        state: state.clone(),
        cmd: &cmd,
        entries: Vec::new(),
        generations: BTreeMap::new(),
        placed: Vec::new(),
        closed: Vec::new(),
        released: 0,
    };
    // Release every overdue hold, not just one transaction's worth.
    while tx.state.known_holds().any(|h| h.deadline <= now) {
        tx.released = 0;
        tx.settle()?;
    }
    tx.settle()?;
    Ok(tx.state)
}

impl Tx<'_> {
    fn now(&self) -> DateTime<Utc> {
        self.cmd.at
    }

    fn push(&mut self, mut d: Draft) -> Result<u64, LedgerError> {
        self.follow_owed(&mut d);
        let seq = self.state.next_seq;
        // A settlement asked for (support settling a ticket's generation) is the
        // operation's own doing: it keeps the operation's references, the ticket among
        // them. Each names its own generation only.
        let mut refs = if d.settlement && !matches!(self.cmd.op, Operation::Settle) {
            Refs::default()
        } else {
            self.cmd.refs.clone()
        };
        if d.settlement || d.generation.is_some() {
            refs.generation = d.generation;
        }
        refs.idempotency_key = Some(self.cmd.key.to_string());
        match &d.hold {
            Some(HoldChange::Placed { hold }) => self.placed.push(hold.clone()),
            Some(HoldChange::Closed { generation }) => {
                if let Some(h) = self.state.known_hold(*generation) {
                    self.closed.push(h.clone());
                }
            }
            None => {}
        }
        let mut entry = Entry {
            seq,
            id: format!("{}/{}", self.cmd.key, self.entries.len()),
            at: self.now(),
            reason: d.reason,
            credits: d.credits,
            lots: d.lots,
            hold: d.hold,
            totals: d.totals,
            plan: d.plan,
            custom_model_slot: d.custom_model_slot,
            month_owes: d.month_owes,
            allotted: d.allotted,
            balance_after: Balance::default(),
            actor: d.actor,
            refs,
            note: d.note,
        };
        self.state.apply(&entry)?;
        entry.balance_after = self.state.balance();
        self.entries.push(entry);
        Ok(seq)
    }

    fn lot(&self, seq: u64) -> Option<&Lot> {
        self.state.lots.iter().find(|l| l.seq == seq)
    }

    /// Credits a draft releases from holds on lots that owe part of their held credits
    /// ([`Lot::owed`], [`Lot::owed_frozen`]): taken back or frozen instead of becoming free
    /// again, in the same entry. What stays held owes at most what it holds (what a hold
    /// spends stays spent).
    fn follow_owed(&self, d: &mut Draft) {
        // Per lot: credits off `remaining` and off `held` (only releases lower `held`).
        let mut moved: BTreeMap<u64, (Credits, Credits)> = BTreeMap::new();
        for c in &d.lots {
            if let LotChange::Changed {
                lot,
                remaining,
                held,
                ..
            } = c
                && held.get() < 0
            {
                let e = moved.entry(*lot).or_default();
                if remaining.get() < 0 {
                    e.0 += remaining.unsigned_abs();
                }
                e.1 += held.unsigned_abs();
            }
        }
        let (mut first, mut last) = (Vec::new(), Vec::new());
        let (mut taken, mut frozen) = (Credits::ZERO, Credits::ZERO);
        for (seq, (burnt, unheld)) in moved {
            let Some(l) = self.lot(seq) else { continue };
            if l.owed == Credits::ZERO && l.owed_frozen == Credits::ZERO {
                continue;
            }
            let released = unheld.saturating_sub(burnt);
            let held_after = l.held.saturating_sub(unheld);
            let take = l.owed.min(released);
            let freeze = l.owed_frozen.min(released - take);
            let owed = (l.owed - take).min(held_after);
            let owed_frozen = (l.owed_frozen - freeze).min(held_after - owed);
            if (owed, owed_frozen) == (l.owed, l.owed_frozen) {
                continue;
            }
            first.push(LotChange::Owed {
                lot: seq,
                take: CreditDelta::net(owed, l.owed),
                freeze: CreditDelta::net(owed_frozen, l.owed_frozen),
            });
            if take > Credits::ZERO {
                last.push(LotChange::Changed {
                    lot: seq,
                    remaining: CreditDelta::decrease(take),
                    held: CreditDelta::ZERO,
                    original: CreditDelta::ZERO,
                });
            }
            if freeze > Credits::ZERO {
                last.push(LotChange::Frozen {
                    lot: seq,
                    frozen: CreditDelta::increase(freeze),
                });
            }
            taken += take;
            frozen += freeze;
        }
        if first.is_empty() {
            return;
        }
        first.append(&mut d.lots);
        first.append(&mut last);
        d.lots = first;
        d.credits = CreditDelta::new(d.credits.get() - CreditDelta::increase(taken + frozen).get());
        d.totals.clawed_back += taken;
        if taken + frozen > Credits::ZERO {
            let what = format!(
                "{taken} of the credits released taken back and {frozen} frozen: their money went back, or is disputed, since the generation held them"
            );
            d.note = Some(match d.note.take() {
                Some(n) => format!("{n}; {what}"),
                None => what,
            });
        }
    }

    /// Free credits on usable lots, in burn order.
    fn spendable(&self) -> Vec<(u64, Credits)> {
        let now = self.now();
        let mut lots: Vec<&Lot> = self
            .state
            .lots
            .iter()
            .filter(|l| l.usable_at(now) && l.free() > Credits::ZERO)
            .collect();
        lots.sort_by_key(|l| l.burn_key());
        lots.iter().map(|l| (l.seq, l.free())).collect()
    }

    fn available(&self) -> Credits {
        self.spendable().iter().map(|&(_, f)| f).sum()
    }

    /// Takes up to `amount` from free credits in burn order.
    fn take(&self, amount: Credits) -> Vec<(u64, Credits)> {
        let mut left = amount;
        let mut taken = Vec::new();
        for (lot, free) in self.spendable() {
            if left == Credits::ZERO {
                break;
            }
            let t = free.min(left);
            taken.push((lot, t));
            left -= t;
        }
        taken
    }

    fn settle(&mut self) -> Result<(), LedgerError> {
        let now = self.now();
        let mut overdue: Vec<Hold> = self
            .state
            .known_holds()
            .filter(|h| h.deadline <= now)
            .cloned()
            .collect();
        overdue.sort_by_key(|h| (h.deadline, h.placed_seq));
        overdue.truncate(MAX_HOLDS_SETTLED_PER_OPERATION.saturating_sub(self.released));
        self.released += overdue.len();
        for hold in overdue {
            let mut d = Draft::new(Reason::HoldExpired, Actor::system());
            d.credits = CreditDelta::increase(hold.amount);
            d.lots = release(&hold);
            d.hold = Some(HoldChange::Closed {
                generation: hold.generation,
            });
            d.generation = Some(hold.generation);
            d.custom_model_slot = is_training(&hold).then_some(false);
            d.note = Some("hold passed its deadline without completing".into());
            d.settlement = true;
            let seq = self.push(d)?;
            let mut g = record_from_hold(&self.state.workspace, &hold);
            g.status = GenerationStatus::Expired;
            g.settled_at = Some(now);
            g.entries.push(seq);
            self.record(Some(GenerationStatus::Held), g);
        }
        let lapsed: Vec<(u64, Credits)> = self
            .state
            .lots
            .iter()
            .filter(|l| !l.usable_at(now) && l.free() > Credits::ZERO)
            .map(|l| (l.seq, l.free()))
            .collect();
        if !lapsed.is_empty() {
            let total: Credits = lapsed.iter().map(|&(_, f)| f).sum();
            let mut d = Draft::new(Reason::LotsExpired, Actor::system());
            d.credits = CreditDelta::decrease(total);
            d.lots = lapsed
                .iter()
                .map(|&(lot, free)| LotChange::Changed {
                    lot,
                    remaining: CreditDelta::decrease(free),
                    held: CreditDelta::ZERO,
                    original: CreditDelta::ZERO,
                })
                .collect();
            d.totals.expired = total;
            d.settlement = true;
            self.push(d)?;
        }
        Ok(())
    }

    fn operate(
        &mut self,
        catalog: &Catalog,
    ) -> Result<(Option<Generation>, Option<String>), LedgerError> {
        let actor = self.cmd.actor.clone();
        match &self.cmd.op {
            Operation::Grant {
                source,
                credits,
                expires_at,
                note,
                month,
            } => {
                let lot = self.grant(
                    *source,
                    *credits,
                    (*expires_at, *month),
                    note.clone(),
                    actor,
                )?;
                Ok((None, Some(lot)))
            }
            Operation::Allotment {
                source,
                credits,
                expires_at,
                note,
                month,
                last,
            } => {
                let lot =
                    self.allot(*source, *credits, *expires_at, note, (*month, *last), actor)?;
                Ok((None, lot))
            }
            Operation::Adjust { credits, note } => {
                let credits = *credits;
                let amount = credits.unsigned_abs();
                if amount == Credits::ZERO || amount.get() > crate::money::MAX_CREDITS_PER_REQUEST {
                    return Err(LedgerError::Invalid(
                        "an adjustment must be a non-zero number of credits within limits".into(),
                    ));
                }
                if credits > CreditDelta::ZERO {
                    let lot = self.grant(
                        LotSource::Adjustment,
                        amount,
                        (None, None),
                        Some(note.clone()),
                        actor,
                    )?;
                    return Ok((None, Some(lot)));
                }
                let available = self.available();
                if available < amount {
                    return Err(LedgerError::InsufficientCredits {
                        needed: amount,
                        available,
                    });
                }
                let mut d = Draft::new(Reason::AdjustmentDebit, actor);
                d.credits = credits;
                d.lots = self
                    .take(amount)
                    .into_iter()
                    .map(|(lot, t)| LotChange::Changed {
                        lot,
                        remaining: CreditDelta::decrease(t),
                        held: CreditDelta::ZERO,
                        original: CreditDelta::ZERO,
                    })
                    .collect();
                d.totals.adjusted_out = amount;
                d.note = Some(note.clone());
                self.push(d)?;
                Ok((None, None))
            }
            // The settlement around every operation is all it does.
            Operation::Settle => Ok((None, None)),
            Operation::TakeBack {
                lot,
                refunded,
                paid,
                note,
            } => {
                let Some(l) = self.lot(*lot) else {
                    // Spent out: nothing left to take; the refund is still on the record.
                    let mut d = Draft::new(Reason::RefundTakeBack, actor);
                    d.note = Some(format!("{note}; nothing of the lot was left unspent"));
                    self.push(d)?;
                    return Ok((None, Some(format!("lot_{lot}"))));
                };
                let already = l.refunded_cents;
                let refunded = (*refunded).min(*paid);
                if refunded <= already {
                    return Ok((None, Some(format!("lot_{lot}"))));
                }
                // The share of the lot's unspent credits: the free ones now, those a running
                // generation holds when it releases them (what it spends stays spent), and
                // those a dispute froze: a refund made before the dispute may be followed
                // after it, and what the dispute froze is its share of the rest.
                let usable = l.usable_at(self.now());
                let (claimable, pending) = if usable {
                    (l.claimable_held(), l.owed_frozen)
                } else {
                    (Credits::ZERO, Credits::ZERO)
                };
                let free = l.free();
                let numerator = refunded - already;
                // What a lost dispute took was its share of the money not refunded then.
                let rest = (*paid - already).saturating_sub(l.lost_cents);
                let wanted = Share {
                    numerator,
                    denominator: rest.max(numerator),
                }
                .of(free + l.frozen + claimable + pending);
                // Free credits first. Then frozen ones, the dispute's claim moving onto
                // credits a running generation holds (frozen as it releases them, spent if
                // it spends them, as if the refund had been followed first); then held
                // ones, owed.
                let taken = wanted.min(free);
                let unfrozen = (wanted - taken).min(l.frozen);
                let pledged = unfrozen.min(claimable);
                let owed = (wanted - taken - unfrozen).min(claimable - pledged);
                let unpending = (wanted - taken - unfrozen - owed).min(pending + pledged);
                let mut d = Draft::new(Reason::RefundTakeBack, actor);
                d.credits = CreditDelta::decrease(taken);
                d.lots = vec![LotChange::Refunded {
                    lot: *lot,
                    cents: refunded,
                    lost: l.lost_cents,
                }];
                if unfrozen > Credits::ZERO {
                    d.lots.push(LotChange::Frozen {
                        lot: *lot,
                        frozen: CreditDelta::decrease(unfrozen),
                    });
                }
                if taken + unfrozen > Credits::ZERO {
                    d.lots.push(LotChange::Changed {
                        lot: *lot,
                        remaining: CreditDelta::decrease(taken + unfrozen),
                        held: CreditDelta::ZERO,
                        original: CreditDelta::ZERO,
                    });
                }
                if pledged > Credits::ZERO {
                    d.lots.push(LotChange::Owed {
                        lot: *lot,
                        take: CreditDelta::ZERO,
                        freeze: CreditDelta::increase(pledged),
                    });
                }
                if owed + unpending > Credits::ZERO {
                    d.lots.push(LotChange::Owed {
                        lot: *lot,
                        take: CreditDelta::increase(owed + unpending),
                        freeze: CreditDelta::decrease(unpending),
                    });
                }
                let owed = owed + unpending;
                d.totals.clawed_back = taken + unfrozen;
                d.note = Some(if owed > Credits::ZERO {
                    format!(
                        "{note}; {owed} more held by running generations are taken back as they are released"
                    )
                } else {
                    note.clone()
                });
                self.push(d)?;
                Ok((None, Some(format!("lot_{lot}"))))
            }
            Operation::ChangeCredited {
                credits,
                note,
                month_from,
            } => {
                if credits.get() > crate::money::MAX_CREDITS_PER_REQUEST {
                    return Err(LedgerError::Invalid(
                        "credits credited back must be within limits".into(),
                    ));
                }
                // Plan and add-on credits; of a month not granted yet, only those granted
                // since it began.
                let of_change = |l: &Lot| {
                    matches!(l.source, LotSource::PlanPeriod | LotSource::Addon)
                        && month_from.is_none_or(|from| match l.month {
                            // The month's own (its allotment, a change's grant for the rest
                            // of it); not another month's, however late granted.
                            Some(month) => month == from,
                            // Granted before lots named their month: since it began.
                            None => l.granted_at >= from,
                        })
                };
                let mut left = *credits;
                let mut d = Draft::new(Reason::PlanChanged, actor);
                for (lot, free) in self.spendable().into_iter().rev() {
                    if left == Credits::ZERO || !self.lot(lot).is_some_and(of_change) {
                        continue;
                    }
                    let t = free.min(left);
                    d.lots.push(LotChange::Changed {
                        lot,
                        remaining: CreditDelta::decrease(t),
                        held: CreditDelta::ZERO,
                        original: CreditDelta::ZERO,
                    });
                    left -= t;
                }
                let taken = *credits - left;
                // What running generations hold goes as they release it (latest expiring
                // first again); what they spend stays spent.
                let mut held: Vec<&Lot> = self
                    .state
                    .lots
                    .iter()
                    .filter(|l| of_change(l))
                    .filter(|l| l.usable_at(self.cmd.at) && l.claimable_held() > Credits::ZERO)
                    .collect();
                held.sort_by_key(|l| std::cmp::Reverse(l.burn_key()));
                let mut owed = Credits::ZERO;
                for l in held {
                    let o = l.claimable_held().min(left);
                    if o == Credits::ZERO {
                        break;
                    }
                    d.lots.push(LotChange::Owed {
                        lot: l.seq,
                        take: CreditDelta::increase(o),
                        freeze: CreditDelta::ZERO,
                    });
                    left -= o;
                    owed += o;
                }
                // The month's allotment not granted yet: it owes the rest back.
                let waiting = month_from.filter(|m| self.state.allotted_through < Some(*m));
                let later = match waiting {
                    Some(_) => std::mem::replace(&mut left, Credits::ZERO),
                    None => Credits::ZERO,
                };
                if let (Some(month), true) = (waiting, later > Credits::ZERO) {
                    d.month_owes = Some(MonthOwes {
                        month,
                        credits: CreditDelta::increase(later),
                    });
                }
                d.credits = CreditDelta::decrease(taken);
                d.totals.clawed_back = taken;
                d.note = Some(if taken == *credits {
                    format!("{note}: {taken} credits taken back")
                } else if waiting.is_some() {
                    format!(
                        "{note}: {taken} of {credits} credits taken back, {owed} held by running generations taken back as they are released, {later} withheld from the month's allotment when it is granted"
                    )
                } else {
                    format!(
                        "{note}: {taken} of {credits} credits taken back, {owed} held by running generations taken back as they are released, {left} already spent"
                    )
                });
                self.push(d)?;
                Ok((None, None))
            }
            Operation::Freeze {
                lot,
                share,
                of_rest,
                note,
            } => {
                let share = match self.lot(*lot) {
                    Some(l) if *of_rest => {
                        let rest = share
                            .denominator
                            .saturating_sub(l.refunded_cents)
                            .saturating_sub(l.lost_cents);
                        Share {
                            numerator: share.numerator.min(rest),
                            denominator: rest,
                        }
                    }
                    _ => *share,
                };
                // The share of the lot's unspent credits: the free ones now, those a running
                // generation holds as it releases them.
                let (free, claimable) =
                    self.lot(*lot).map_or((Credits::ZERO, Credits::ZERO), |l| {
                        let usable = l.usable_at(self.cmd.at);
                        (
                            l.free(),
                            if usable {
                                l.claimable_held()
                            } else {
                                Credits::ZERO
                            },
                        )
                    });
                let wanted = share.of(free + claimable);
                let frozen = wanted.min(free);
                let owed = (wanted - frozen).min(claimable);
                let mut d = Draft::new(Reason::DisputeFreeze, actor);
                d.credits = CreditDelta::decrease(frozen);
                if frozen > Credits::ZERO {
                    d.lots = vec![LotChange::Frozen {
                        lot: *lot,
                        frozen: CreditDelta::increase(frozen),
                    }];
                }
                if owed > Credits::ZERO {
                    d.lots.push(LotChange::Owed {
                        lot: *lot,
                        take: CreditDelta::ZERO,
                        freeze: CreditDelta::increase(owed),
                    });
                }
                d.note = Some(if owed > Credits::ZERO {
                    format!(
                        "{note}; {owed} more held by running generations are frozen as they are released"
                    )
                } else {
                    note.clone()
                });
                self.push(d)?;
                Ok((None, Some(format!("lot_{lot}"))))
            }
            Operation::Unfreeze {
                lot,
                take_back,
                lost_cents,
                note,
            } => {
                let (frozen, pending) =
                    self.lot(*lot).map_or((Credits::ZERO, Credits::ZERO), |l| {
                        (l.frozen, l.owed_frozen)
                    });
                let reason = if *take_back {
                    Reason::DisputeLost
                } else {
                    Reason::DisputeWon
                };
                let mut d = Draft::new(reason, actor);
                if let Some(l) = self.lot(*lot).filter(|_| *take_back && *lost_cents > 0) {
                    // A refund followed later takes its share of the rest of the payment.
                    d.lots.push(LotChange::Refunded {
                        lot: *lot,
                        cents: l.refunded_cents,
                        lost: l.lost_cents.saturating_add(*lost_cents),
                    });
                }
                if frozen > Credits::ZERO {
                    // Unfreeze first so the lot never holds and freezes more than it has.
                    d.lots.push(LotChange::Frozen {
                        lot: *lot,
                        frozen: CreditDelta::decrease(frozen),
                    });
                    if *take_back {
                        d.lots.push(LotChange::Changed {
                            lot: *lot,
                            remaining: CreditDelta::decrease(frozen),
                            held: CreditDelta::ZERO,
                            original: CreditDelta::ZERO,
                        });
                        d.totals.clawed_back = frozen;
                    } else {
                        d.credits = CreditDelta::increase(frozen);
                    }
                }
                if pending > Credits::ZERO {
                    // Held credits still to be frozen as released: lost, they are taken
                    // back as released instead; won, they are free when released.
                    d.lots.push(LotChange::Owed {
                        lot: *lot,
                        take: if *take_back {
                            CreditDelta::increase(pending)
                        } else {
                            CreditDelta::ZERO
                        },
                        freeze: CreditDelta::decrease(pending),
                    });
                }
                d.note = Some(note.clone());
                self.push(d)?;
                Ok((None, Some(format!("lot_{lot}"))))
            }
            Operation::Reverse {
                generation,
                record,
                reason,
            } => {
                let g = self.reverse(*generation, record.as_ref(), reason, actor)?;
                Ok((Some(g), None))
            }
            Operation::RetireModel { generation } => {
                if self.state.known_hold(*generation).is_some() {
                    return Err(LedgerError::ModelInTraining(*generation));
                }
                if !self.state.custom_models.contains(generation) {
                    return Err(LedgerError::NotACustomModel(*generation));
                }
                let mut d = Draft::new(Reason::ModelRetired, actor);
                d.custom_model_slot = Some(false);
                d.generation = Some(*generation);
                d.note = Some(format!(
                    "custom model {generation} retired: its slot is free again"
                ));
                self.push(d)?;
                Ok((None, None))
            }
            Operation::SetPlan { plan } => {
                if &self.state.plan == plan {
                    return Ok((None, None));
                }
                let mut d = Draft::new(Reason::PlanChanged, actor);
                d.plan = Some(plan.clone());
                self.push(d)?;
                Ok((None, None))
            }
            Operation::Hold {
                generation,
                estimate,
                deadline,
            } => {
                let g = self.hold(catalog, *generation, estimate, *deadline, actor)?;
                Ok((Some(g), None))
            }
            Operation::Complete {
                generation,
                credits,
                record,
            } => {
                let g = self.complete(*generation, *credits, record.as_ref(), actor)?;
                Ok((Some(g), None))
            }
            Operation::Fail {
                generation,
                reason,
                record,
            } => {
                let g = self.fail(*generation, reason, record.as_ref(), actor)?;
                Ok((Some(g), None))
            }
        }
    }

    fn grant(
        &mut self,
        source: LotSource,
        credits: Credits,
        (expires_at, month): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        note: Option<String>,
        actor: Actor,
    ) -> Result<String, LedgerError> {
        self.check_grant(credits, expires_at)?;
        let seq = self.state.next_seq;
        let mut d = Draft::new(
            match source {
                LotSource::PlanPeriod => Reason::PlanCredits,
                LotSource::Addon => Reason::AddonCredits,
                LotSource::Pack => Reason::PackPurchase,
                LotSource::Promo => Reason::PromoCredits,
                LotSource::Adjustment => Reason::AdjustmentCredit,
                LotSource::Reversal => Reason::Reversal,
            },
            actor,
        );
        d.credits = CreditDelta::increase(credits);
        d.totals.issued = credits;
        d.note = note;
        let (mut change, lot) = self.new_credits(seq, source, credits, expires_at);
        if let LotChange::Created { lot } = &mut change {
            lot.month = month;
        }
        d.lots = vec![change];
        self.push(d)?;
        Ok(format!("lot_{lot}"))
    }

    /// A grant's amount and expiry within limits.
    fn check_grant(
        &self,
        credits: Credits,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), LedgerError> {
        if credits == Credits::ZERO || credits.get() > crate::money::MAX_CREDITS_PER_REQUEST {
            return Err(LedgerError::Invalid(
                "a grant must be a positive number of credits within limits".into(),
            ));
        }
        if expires_at.is_some_and(|t| t <= self.now()) {
            return Err(LedgerError::Invalid(
                "a grant cannot expire in the past".into(),
            ));
        }
        Ok(())
    }

    /// A yearly month's allotment: withholds what the month owes back, drops what earlier
    /// months owed, grants the rest (no lot when nothing is left).
    fn allot(
        &mut self,
        source: LotSource,
        credits: Credits,
        expires_at: DateTime<Utc>,
        note: &str,
        (month, last): (DateTime<Utc>, bool),
        actor: Actor,
    ) -> Result<Option<String>, LedgerError> {
        if !matches!(source, LotSource::PlanPeriod | LotSource::Addon) {
            return Err(LedgerError::Invalid(
                "an allotment grants plan or add-on credits".into(),
            ));
        }
        self.check_grant(credits, Some(expires_at))?;
        let withheld = self.state.owed_by_month(month).min(credits);
        let granted = credits - withheld;
        let seq = self.state.next_seq;
        let mut d = Draft::new(
            match source {
                LotSource::Addon => Reason::AddonCredits,
                _ => Reason::PlanCredits,
            },
            actor,
        );
        d.credits = CreditDelta::increase(granted);
        d.totals.issued = granted;
        d.allotted = last.then_some(month);
        d.month_owes = (withheld > Credits::ZERO).then_some(MonthOwes {
            month,
            credits: CreditDelta::decrease(withheld),
        });
        d.note = Some(if withheld > Credits::ZERO {
            format!(
                "{note}; {credits} credits less {withheld} owed for unused time of the month credited back before they were granted"
            )
        } else {
            note.to_owned()
        });
        let lot = (granted > Credits::ZERO).then(|| {
            let (mut change, lot) = self.new_credits(seq, source, granted, Some(expires_at));
            if let LotChange::Created { lot } = &mut change {
                lot.month = Some(month);
            }
            d.lots = vec![change];
            format!("lot_{lot}")
        });
        self.push(d)?;
        Ok(lot)
    }

    /// The lot change that adds `credits` of `source`: a new lot, or, for credits that
    /// never expire and were bought by no payment (reversals, staff grants), the lot of
    /// earlier ones of the same kind, so the state does not grow with every such grant.
    /// Payment lots stay apart: a refund or dispute follows the lot its payment bought.
    fn new_credits(
        &self,
        seq: u64,
        source: LotSource,
        credits: Credits,
        expires_at: Option<DateTime<Utc>>,
    ) -> (LotChange, u64) {
        let shared =
            expires_at.is_none() && matches!(source, LotSource::Reversal | LotSource::Adjustment);
        if let Some(l) = self.state.lots.iter().rev().find(|l| {
            shared
                && l.source == source
                && l.expires_at.is_none()
                && l.frozen == Credits::ZERO
                && l.refunded_cents == 0
                && l.lost_cents == 0
                && l.original.checked_add(credits).is_some()
                && l.remaining.checked_add(credits).is_some()
        }) {
            let grown = CreditDelta::increase(credits);
            let change = LotChange::Changed {
                lot: l.seq,
                remaining: grown,
                held: CreditDelta::ZERO,
                original: grown,
            };
            return (change, l.seq);
        }
        let lot = Lot {
            seq,
            source,
            original: credits,
            remaining: credits,
            held: Credits::ZERO,
            frozen: Credits::ZERO,
            refunded_cents: 0,
            lost_cents: 0,
            owed: Credits::ZERO,
            owed_frozen: Credits::ZERO,
            granted_at: self.now(),
            month: None,
            expires_at,
        };
        (LotChange::Created { lot }, seq)
    }

    fn hold(
        &mut self,
        catalog: &Catalog,
        generation: GenerationId,
        estimate: &Estimate,
        deadline: DateTime<Utc>,
        actor: Actor,
    ) -> Result<Generation, LedgerError> {
        if self.state.known_hold(generation).is_some() {
            return Err(LedgerError::GenerationExists(generation));
        }
        let training = estimate.workflow == crate::catalog::Workflow::Training;
        if training {
            let slots = crate::subscriptions::Entitlements::of(self.state.plan.as_ref(), catalog)
                .custom_model_slots;
            if self.state.custom_models.len() as u64 >= slots as u64 {
                return Err(LedgerError::NoCustomModelSlot { slots });
            }
        }
        let amount = estimate.credits;
        if amount == Credits::ZERO {
            return Err(LedgerError::Invalid(
                "a hold must be for at least 1 credit".into(),
            ));
        }
        if deadline <= self.now() {
            return Err(LedgerError::Invalid(
                "a hold deadline must be in the future".into(),
            ));
        }
        let available = self.available();
        if available < amount {
            return Err(LedgerError::InsufficientCredits {
                needed: amount,
                available,
            });
        }
        let allocations: Vec<Allocation> = self
            .take(amount)
            .into_iter()
            .map(|(lot, amount)| Allocation { lot, amount })
            .collect();
        let placed_seq = self.state.next_seq;
        let hold = Hold {
            generation,
            amount,
            allocations: allocations.clone(),
            placed_seq,
            created_at: self.now(),
            deadline,
            started_by: actor.id.clone(),
            estimate: estimate.clone(),
        };
        let mut d = Draft::new(Reason::HoldPlaced, actor);
        d.credits = CreditDelta::decrease(amount);
        d.lots = allocations
            .iter()
            .map(|a| LotChange::Changed {
                lot: a.lot,
                remaining: CreditDelta::ZERO,
                held: CreditDelta::increase(a.amount),
                original: CreditDelta::ZERO,
            })
            .collect();
        d.hold = Some(HoldChange::Placed { hold: hold.clone() });
        d.generation = Some(generation);
        d.custom_model_slot = training.then_some(true);
        self.push(d)?;
        let g = record_from_hold(&self.state.workspace, &hold);
        self.record(None, g.clone());
        Ok(g)
    }

    /// Files a generation record to write; the first status seen for it is what the
    /// store must still hold when the write lands.
    fn record(&mut self, prior: Option<GenerationStatus>, g: Generation) {
        match self.generations.get_mut(&g.id) {
            Some((_, stored)) => *stored = g,
            None => {
                self.generations.insert(g.id, (prior, g));
            }
        }
    }

    /// The generation as this transaction or the store last saw it.
    fn known_record(&self, id: GenerationId, record: Option<&Generation>) -> Option<Generation> {
        self.generations
            .get(&id)
            .map(|(_, g)| g.clone())
            .or_else(|| record.cloned())
    }

    fn complete(
        &mut self,
        generation: GenerationId,
        credits: Option<Credits>,
        record: Option<&Generation>,
        actor: Actor,
    ) -> Result<Generation, LedgerError> {
        let now = self.now();
        if let Some(hold) = self.state.known_hold(generation).cloned() {
            let cost = credits.unwrap_or(hold.amount);
            // Burn the hold's own allocations first (in burn order), release the rest,
            // then take any excess over the estimate from free credits.
            let mut allocations = hold.allocations.clone();
            allocations.sort_by_key(|a| self.lot(a.lot).map(Lot::burn_key));
            // Per lot: credits burnt (off `remaining`) and released (off `held`); both
            // only ever fall here.
            let mut deltas: BTreeMap<u64, (Credits, Credits)> = BTreeMap::new();
            let mut left = cost;
            for a in &allocations {
                let burn = a.amount.min(left);
                left -= burn;
                let e = deltas.entry(a.lot).or_default();
                e.0 += burn;
                e.1 += a.amount;
            }
            // Credits this hold releases are free again once the entry applies; anything
            // beyond the hold comes from lots that are free now.
            let extra = self.take(left);
            let extra_total: Credits = extra.iter().map(|&(_, t)| t).sum();
            for (lot, t) in extra {
                deltas.entry(lot).or_default().0 += t;
            }
            let charged = cost - left + extra_total;
            let mut d = Draft::new(Reason::GenerationCharged, actor);
            d.credits = CreditDelta::net(hold.amount, charged);
            d.lots = deltas
                .into_iter()
                .map(|(lot, (burnt, released))| LotChange::Changed {
                    lot,
                    remaining: CreditDelta::decrease(burnt),
                    held: CreditDelta::decrease(released),
                    original: CreditDelta::ZERO,
                })
                .collect();
            d.hold = Some(HoldChange::Closed { generation });
            d.totals.spent = charged;
            d.generation = Some(generation);
            let seq = self.push(d)?;
            let mut g = record_from_hold(&self.state.workspace, &hold);
            g.status = GenerationStatus::Completed;
            g.charged = charged;
            g.shortfall = cost - charged;
            g.settled_at = Some(now);
            g.entries.push(seq);
            self.record(Some(GenerationStatus::Held), g.clone());
            return Ok(g);
        }
        let mut g = self
            .known_record(generation, record)
            .ok_or(LedgerError::GenerationNotFound(generation))?;
        match g.status {
            GenerationStatus::Completed => Ok(g),
            GenerationStatus::Failed => Err(LedgerError::AlreadySettled {
                id: generation,
                status: "failed",
            }),
            GenerationStatus::Held => Err(LedgerError::Corrupt(format!(
                "generation {generation} is held but has no hold"
            ))),
            GenerationStatus::Expired => {
                // The work finished after its hold lapsed: the debit is still owed, so
                // collect what the balance allows and record the rest as shortfall.
                let cost = credits.unwrap_or(g.estimate.credits);
                let taken = self.take(cost);
                let charged: Credits = taken.iter().map(|&(_, t)| t).sum();
                let mut d = Draft::new(Reason::GenerationCharged, actor);
                d.credits = CreditDelta::decrease(charged);
                d.lots = taken
                    .into_iter()
                    .map(|(lot, t)| LotChange::Changed {
                        lot,
                        remaining: CreditDelta::decrease(t),
                        held: CreditDelta::ZERO,
                        original: CreditDelta::ZERO,
                    })
                    .collect();
                d.totals.spent = charged;
                d.generation = Some(generation);
                // A trained model occupies a custom-model slot again, as it did while held
                // (the expiry gave the slot back): even when another training has taken
                // it since, the model exists, so the plan's slots show as full until one
                // is given back.
                d.custom_model_slot = (g.estimate.workflow == crate::catalog::Workflow::Training
                    && !self.state.custom_models.contains(&generation))
                .then_some(true);
                d.note = Some("completed after the hold had expired".into());
                let seq = self.push(d)?;
                g.status = GenerationStatus::Completed;
                g.charged = charged;
                g.shortfall = cost - charged;
                g.settled_at = Some(now);
                g.entries.push(seq);
                self.record(Some(GenerationStatus::Expired), g.clone());
                Ok(g)
            }
        }
    }

    fn fail(
        &mut self,
        generation: GenerationId,
        reason: &str,
        record: Option<&Generation>,
        actor: Actor,
    ) -> Result<Generation, LedgerError> {
        let now = self.now();
        if let Some(hold) = self.state.known_hold(generation).cloned() {
            let mut d = Draft::new(Reason::HoldReleased, actor);
            d.credits = CreditDelta::increase(hold.amount);
            d.lots = release(&hold);
            d.hold = Some(HoldChange::Closed { generation });
            d.generation = Some(generation);
            d.custom_model_slot = is_training(&hold).then_some(false);
            d.note = Some(reason.to_owned());
            let seq = self.push(d)?;
            let mut g = record_from_hold(&self.state.workspace, &hold);
            g.status = GenerationStatus::Failed;
            g.failure_reason = Some(reason.to_owned());
            g.settled_at = Some(now);
            g.entries.push(seq);
            self.record(Some(GenerationStatus::Held), g.clone());
            return Ok(g);
        }
        let mut g = self
            .known_record(generation, record)
            .ok_or(LedgerError::GenerationNotFound(generation))?;
        match g.status {
            GenerationStatus::Failed => Ok(g),
            GenerationStatus::Completed => Err(LedgerError::AlreadySettled {
                id: generation,
                status: "completed",
            }),
            GenerationStatus::Held => Err(LedgerError::Corrupt(format!(
                "generation {generation} is held but has no hold"
            ))),
            GenerationStatus::Expired => {
                // Already released without charge; record why it ended.
                g.status = GenerationStatus::Failed;
                g.failure_reason = Some(reason.to_owned());
                self.record(Some(GenerationStatus::Expired), g.clone());
                Ok(g)
            }
        }
    }
}

impl Tx<'_> {
    fn reverse(
        &mut self,
        generation: GenerationId,
        record: Option<&Generation>,
        reason: &str,
        actor: Actor,
    ) -> Result<Generation, LedgerError> {
        let mut g = self
            .known_record(generation, record)
            .ok_or(LedgerError::GenerationNotFound(generation))?;
        if g.status != GenerationStatus::Completed || g.charged == Credits::ZERO {
            return Err(LedgerError::NotReversible {
                id: generation,
                status: if g.status == GenerationStatus::Completed {
                    "completed without a charge"
                } else {
                    g.status.as_str()
                },
            });
        }
        if g.reversed > Credits::ZERO {
            return Err(LedgerError::AlreadyReversed(generation));
        }
        let credits = g.charged;
        let seq = self.state.next_seq;
        let mut d = Draft::new(Reason::Reversal, actor);
        d.credits = CreditDelta::increase(credits);
        d.lots = vec![self.new_credits(seq, LotSource::Reversal, credits, None).0];
        d.totals.issued = credits;
        d.generation = Some(generation);
        d.note = Some(reason.to_owned());
        self.push(d)?;
        g.reversed = credits;
        g.entries.push(seq);
        self.record(Some(GenerationStatus::Completed), g.clone());
        Ok(g)
    }
}

fn release(hold: &Hold) -> Vec<LotChange> {
    hold.allocations
        .iter()
        .map(|a| LotChange::Changed {
            lot: a.lot,
            remaining: CreditDelta::ZERO,
            held: CreditDelta::decrease(a.amount),
            original: CreditDelta::ZERO,
        })
        .collect()
}

fn is_training(hold: &Hold) -> bool {
    hold.estimate.workflow == crate::catalog::Workflow::Training
}

fn record_from_hold(workspace: &WorkspaceId, hold: &Hold) -> Generation {
    Generation {
        id: hold.generation,
        workspace: workspace.clone(),
        started_by: hold.started_by.clone(),
        estimate: hold.estimate.clone(),
        held: hold.amount,
        status: GenerationStatus::Held,
        charged: Credits::ZERO,
        shortfall: Credits::ZERO,
        failure_reason: None,
        created_at: hold.created_at,
        deadline: hold.deadline,
        settled_at: None,
        entries: vec![hold.placed_seq],
        reversed: Credits::ZERO,
    }
}
