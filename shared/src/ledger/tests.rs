//! Engine behaviour, one rule per test, and property tests over random operation sequences.

use super::*;
use crate::catalog::{Catalog, GenerationSpec, Workflow};
use crate::ids::IdempotencyKey;
use crate::money::{CreditDelta, Credits};
use chrono::{Duration, TimeZone};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

struct World {
    state: WorkspaceState,
    journal: Vec<Entry>,
    now: DateTime<Utc>,
    catalog: Catalog,
    n: u64,
}

impl World {
    fn new() -> Self {
        Self {
            state: WorkspaceState::new(WorkspaceId::parse("org_t").unwrap()),
            journal: Vec::new(),
            now: t0(),
            catalog: Catalog::builtin(),
            n: 0,
        }
    }

    fn run(&mut self, op: Operation) -> Result<Outcome, LedgerError> {
        self.n += 1;
        let cmd = Command {
            key: IdempotencyKey::derived(format!("k{}", self.n)),
            at: self.now,
            actor: Actor::new(ActorKind::Member, "u1"),
            refs: Refs::default(),
            op,
        };
        let before = self.state.clone();
        match execute(&self.state, &cmd, &self.catalog) {
            Ok(applied) => {
                self.state = applied.state;
                self.journal.extend(applied.entries);
                self.state.check_invariants().unwrap();
                Ok(applied.outcome)
            }
            Err(e) => {
                assert_eq!(self.state, before);
                Err(e)
            }
        }
    }

    fn grant(&mut self, source: LotSource, credits: u64, expires_in_h: Option<i64>) -> String {
        let expires_at = expires_in_h.map(|h| self.now + Duration::hours(h));
        self.run(Operation::Grant {
            month: None,
            source,
            credits: Credits::new(credits),
            expires_at,
            note: None,
        })
        .unwrap()
        .lot
        .unwrap()
    }

    fn estimate(&self, credits: u64) -> Estimate {
        Estimate {
            credits: Credits::new(credits),
            workflow: Workflow::Image,
            model: "imagen-3".into(),
            resolution: None,
            multiplier: 1,
            duration_s: None,
            count: 1,
            per_item: Credits::new(credits),
        }
    }

    fn hold(&mut self, credits: u64) -> Result<GenerationId, LedgerError> {
        let generation = GenerationId::new();
        let estimate = self.estimate(credits);
        self.run(Operation::Hold {
            generation,
            estimate,
            deadline: self.now + Duration::hours(1),
        })
        .map(|_| generation)
    }

    fn complete(
        &mut self,
        g: GenerationId,
        credits: Option<u64>,
        record: Option<Generation>,
    ) -> Generation {
        self.run(Operation::Complete {
            generation: g,
            credits: credits.map(Credits::new),
            record,
        })
        .unwrap()
        .generation
        .unwrap()
    }

    fn available(&self) -> Credits {
        self.state.balance().available
    }

    fn lot(&self, id: &str) -> &Lot {
        self.state.lots.iter().find(|l| l.id() == id).unwrap()
    }
}

#[test]
fn a_hold_burns_the_earliest_expiring_lot_first_and_packs_last() {
    let mut w = World::new();
    let pack = w.grant(LotSource::Pack, 100, None);
    let late = w.grant(LotSource::PlanPeriod, 50, Some(48));
    let soon = w.grant(LotSource::Addon, 30, Some(24));
    let g = w.hold(60).unwrap();
    assert_eq!(w.lot(&soon).held, Credits::new(30));
    assert_eq!(w.lot(&late).held, Credits::new(30));
    assert_eq!(w.lot(&pack).held, Credits::ZERO);
    w.complete(g, None, None);
    assert!(
        w.state.lots.iter().all(|l| l.id() != soon),
        "spent lot leaves state"
    );
    assert_eq!(w.lot(&late).remaining, Credits::new(20));
    assert_eq!(w.available(), Credits::new(120));
}

#[test]
fn completing_below_the_estimate_charges_the_exact_cost_and_releases_the_rest() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 100, None);
    let g = w.hold(24).unwrap();
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::new(76),
            held: Credits::new(24),
            frozen: Credits::ZERO
        }
    );
    let done = w.complete(g, Some(20), None);
    assert_eq!(
        (done.status, done.charged, done.shortfall),
        (GenerationStatus::Completed, Credits::new(20), Credits::ZERO)
    );
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::new(80),
            held: Credits::ZERO,
            frozen: Credits::ZERO
        }
    );
    assert_eq!(w.state.totals.spent, Credits::new(20));
}

#[test]
fn completing_above_the_estimate_takes_the_excess_but_never_goes_below_zero() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 30, None);
    let g = w.hold(20).unwrap();
    let done = w.complete(g, Some(45), None);
    assert_eq!(
        (done.charged, done.shortfall),
        (Credits::new(30), Credits::new(15))
    );
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::ZERO,
            held: Credits::ZERO,
            frozen: Credits::ZERO
        }
    );
}

#[test]
fn a_failed_generation_is_never_charged() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 50, None);
    let g = w.hold(40).unwrap();
    let out = w
        .run(Operation::Fail {
            generation: g,
            reason: "model crashed".into(),
            record: None,
        })
        .unwrap();
    let rec = out.generation.unwrap();
    assert_eq!(
        (rec.status, rec.charged),
        (GenerationStatus::Failed, Credits::ZERO)
    );
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::new(50),
            held: Credits::ZERO,
            frozen: Credits::ZERO
        }
    );
    assert_eq!(w.state.totals.spent, Credits::ZERO);
    // Completing a failed generation is a conflict, not a charge.
    let err = w
        .run(Operation::Complete {
            generation: g,
            credits: None,
            record: Some(rec),
        })
        .unwrap_err();
    assert!(matches!(
        err,
        LedgerError::AlreadySettled {
            status: "failed",
            ..
        }
    ));
}

#[test]
fn holds_beyond_the_balance_are_refused_and_change_nothing() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 10, None);
    w.hold(8).unwrap();
    assert_eq!(
        w.hold(3).unwrap_err(),
        LedgerError::InsufficientCredits {
            needed: Credits::new(3),
            available: Credits::new(2)
        }
    );
    assert_eq!(w.available(), Credits::new(2));
}

#[test]
fn an_overdue_hold_is_released_by_the_next_operation_and_a_late_completion_still_pays() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 50, None);
    let g = w.hold(20).unwrap();
    let view = w.state.settled_at(w.now + Duration::hours(2)).unwrap();
    assert_eq!(
        view.balance(),
        Balance {
            available: Credits::new(50),
            held: Credits::ZERO,
            frozen: Credits::ZERO
        },
        "reads see the release at once"
    );
    w.now += Duration::hours(2);
    let out = w.run(Operation::SetPlan { plan: None }).unwrap();
    assert_eq!(
        out.entries.len(),
        1,
        "only the hold_expired entry: setting the plan it already has writes nothing"
    );
    assert_eq!(
        w.journal[out.entries[0] as usize - 1].reason,
        Reason::HoldExpired
    );
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::new(50),
            held: Credits::ZERO,
            frozen: Credits::ZERO
        }
    );
    let expired = Generation {
        status: GenerationStatus::Expired,
        ..record_for(&w, g, 20)
    };
    let done = w.complete(g, Some(15), Some(expired));
    assert_eq!(
        (done.status, done.charged),
        (GenerationStatus::Completed, Credits::new(15))
    );
    assert_eq!(w.available(), Credits::new(35));
}

/// An active monthly plus plan from `now`.
fn plus_plan(now: DateTime<Utc>) -> PlanState {
    PlanState {
        plan: "plus".into(),
        interval: Interval::Monthly,
        status: PlanStatus::Active,
        period_start: now,
        period_end: now + Duration::days(30),
        cancel_at_period_end: false,
        paid_through: None,
    }
}

fn record_for(w: &World, g: GenerationId, held: u64) -> Generation {
    Generation {
        id: g,
        workspace: w.state.workspace.clone(),
        started_by: "u1".into(),
        estimate: w.estimate(held),
        held: Credits::new(held),
        status: GenerationStatus::Held,
        charged: Credits::ZERO,
        shortfall: Credits::ZERO,
        failure_reason: None,
        created_at: t0(),
        deadline: t0() + Duration::hours(1),
        settled_at: None,
        entries: vec![],
        reversed: Credits::ZERO,
    }
}

#[test]
fn lapsed_lots_expire_lazily_but_credits_held_on_them_stay_spendable_by_that_hold() {
    let mut w = World::new();
    let lot = w.grant(LotSource::PlanPeriod, 100, Some(2));
    let gid = GenerationId::new();
    let e = w.estimate(40);
    w.run(Operation::Hold {
        generation: gid,
        estimate: e,
        deadline: w.now + Duration::hours(5),
    })
    .unwrap();
    w.now += Duration::hours(3);
    w.run(Operation::SetPlan { plan: None }).unwrap();
    assert_eq!(
        w.lot(&lot).remaining,
        Credits::new(40),
        "only the free part expired"
    );
    assert_eq!(w.state.totals.expired, Credits::new(60));
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::ZERO,
            held: Credits::new(40),
            frozen: Credits::ZERO
        }
    );
    let done = w.complete(gid, Some(30), None);
    assert_eq!(
        (done.charged, done.shortfall),
        (Credits::new(30), Credits::ZERO)
    );
    // The 10 credits released back onto the lapsed lot expire in the same operation.
    assert_eq!(w.state.totals.expired, Credits::new(70));
    assert!(w.state.lots.is_empty());
}

#[test]
fn credits_released_onto_a_lapsed_lot_expire_in_the_same_operation() {
    let mut w = World::new();
    let short = w.grant(LotSource::PlanPeriod, 100, Some(1));
    let gid = GenerationId::new();
    let e = w.estimate(40);
    w.run(Operation::Hold {
        generation: gid,
        estimate: e,
        deadline: w.now + Duration::hours(5),
    })
    .unwrap();
    w.now += Duration::hours(2);
    w.run(Operation::Fail {
        generation: gid,
        reason: "gpu lost".into(),
        record: None,
    })
    .unwrap();
    assert!(w.state.lots.iter().all(|l| l.id() != short));
    assert_eq!(w.state.totals.expired, Credits::new(100));
    assert_eq!(w.state.totals.spent, Credits::ZERO);
    assert_eq!(w.available(), Credits::ZERO);
}

#[test]
fn training_needs_a_free_custom_model_slot() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 5000, None);
    let training = |w: &World| Estimate {
        workflow: Workflow::Training,
        model: "custom-model".into(),
        ..w.estimate(400)
    };
    let e = training(&w);
    let err = w
        .run(Operation::Hold {
            generation: GenerationId::new(),
            estimate: e,
            deadline: w.now + Duration::hours(1),
        })
        .unwrap_err();
    assert_eq!(err, LedgerError::NoCustomModelSlot { slots: 0 });
    w.run(Operation::SetPlan {
        plan: Some(plus_plan(w.now)),
    })
    .unwrap();
    let first = GenerationId::new();
    let e = training(&w);
    w.run(Operation::Hold {
        generation: first,
        estimate: e,
        deadline: w.now + Duration::hours(1),
    })
    .unwrap();
    let e = training(&w);
    assert!(matches!(
        w.run(Operation::Hold {
            generation: GenerationId::new(),
            estimate: e,
            deadline: w.now + Duration::hours(1)
        }),
        Err(LedgerError::NoCustomModelSlot { slots: 1 })
    ));
    // A failed training gives its slot back.
    w.run(Operation::Fail {
        generation: first,
        reason: "bad data".into(),
        record: None,
    })
    .unwrap();
    assert!(w.state.custom_models.is_empty());
}

#[test]
fn a_retired_model_frees_its_slot_once_and_only_after_its_training_completed() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 5000, None);
    w.run(Operation::SetPlan {
        plan: Some(plus_plan(w.now)),
    })
    .unwrap();
    let training = |w: &World| Estimate {
        workflow: Workflow::Training,
        model: "custom-model".into(),
        ..w.estimate(400)
    };
    let hold = |w: &mut World, g: GenerationId| {
        let estimate = training(w);
        w.run(Operation::Hold {
            generation: g,
            estimate,
            deadline: w.now + Duration::hours(1),
        })
    };
    let first = GenerationId::new();
    hold(&mut w, first).unwrap();
    // Still training: it cannot be retired (its completion would find no slot).
    assert_eq!(
        w.run(Operation::RetireModel { generation: first }),
        Err(LedgerError::ModelInTraining(first))
    );
    w.complete(first, None, None);
    assert_eq!(
        hold(&mut w, GenerationId::new()).unwrap_err(),
        LedgerError::NoCustomModelSlot { slots: 1 }
    );
    let available = w.available();
    w.run(Operation::RetireModel { generation: first }).unwrap();
    assert!(w.state.custom_models.is_empty());
    assert_eq!(w.available(), available, "no credits move");
    let last = w.journal.last().unwrap();
    assert_eq!(last.reason, Reason::ModelRetired);
    assert_eq!(last.refs.generation, Some(first));
    // Once: again, or a generation that is no model, is refused and changes nothing.
    for g in [first, GenerationId::new()] {
        assert_eq!(
            w.run(Operation::RetireModel { generation: g }),
            Err(LedgerError::NotACustomModel(g))
        );
    }
    // The slot is free for another training; the journal rebuilds the same.
    let second = GenerationId::new();
    hold(&mut w, second).unwrap();
    assert_eq!(w.state.custom_models, vec![second]);
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.custom_models, vec![second]);
}

#[test]
fn a_training_completed_after_its_hold_expired_takes_its_slot_again() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 5000, None);
    w.run(Operation::SetPlan {
        plan: Some(plus_plan(w.now)),
    })
    .unwrap();
    let estimate = Estimate {
        workflow: Workflow::Training,
        model: "custom-model".into(),
        ..w.estimate(400)
    };
    let first = GenerationId::new();
    w.run(Operation::Hold {
        generation: first,
        estimate: estimate.clone(),
        deadline: w.now + Duration::hours(1),
    })
    .unwrap();
    w.now += Duration::hours(2);
    w.run(Operation::Settle).unwrap();
    assert!(w.state.custom_models.is_empty(), "the expiry gave it back");
    let expired = Generation {
        status: GenerationStatus::Expired,
        estimate: estimate.clone(),
        ..record_for(&w, first, 400)
    };
    let done = w.complete(first, None, Some(expired));
    assert_eq!(done.status, GenerationStatus::Completed);
    assert_eq!(w.state.custom_models, vec![first]);
    // The plan's one slot is taken by the model that exists.
    assert_eq!(
        w.run(Operation::Hold {
            generation: GenerationId::new(),
            estimate,
            deadline: w.now + Duration::hours(1),
        }),
        Err(LedgerError::NoCustomModelSlot { slots: 1 })
    );
    // Rebuilt from the journal, the slot is still taken.
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.custom_models, vec![first]);
}

#[test]
fn an_entry_that_removes_the_plan_removes_it_when_read_back() {
    let mut w = World::new();
    w.run(Operation::SetPlan {
        plan: Some(plus_plan(w.now)),
    })
    .unwrap();
    w.run(Operation::SetPlan { plan: None }).unwrap();
    assert_eq!(w.state.plan, None);
    let stored: Vec<Entry> = w
        .journal
        .iter()
        .map(|e| serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap())
        .collect();
    assert_eq!(stored, w.journal);
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &stored).unwrap();
    assert_eq!(rebuilt.plan, None);
}

#[test]
fn reversals_and_staff_grants_keep_one_lot_each_however_many_there_are() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 100_000, None);
    let pack_lots = w.state.lots.len();
    let mut first = None;
    for i in 0..3_000u64 {
        let out = w
            .run(Operation::Adjust {
                credits: CreditDelta::increase(Credits::new(1 + i % 7)),
                note: "goodwill".into(),
            })
            .unwrap();
        assert_eq!(
            *first.get_or_insert(out.lot.clone()),
            out.lot,
            "the same lot"
        );
    }
    for _ in 0..300 {
        let g = w.hold(20).unwrap();
        let done = w.complete(g, Some(15), None);
        w.run(Operation::Reverse {
            generation: g,
            record: Some(done),
            reason: "faulty output".into(),
        })
        .unwrap();
    }
    assert_eq!(w.state.lots.len(), pack_lots + 2, "{:?}", w.state.lots);
    let adjustment = w
        .state
        .lots
        .iter()
        .find(|l| l.source == LotSource::Adjustment)
        .unwrap();
    let granted: u64 = (0..3_000u64).map(|i| 1 + i % 7).sum();
    assert_eq!(adjustment.original.get(), granted);
    let reversal = w
        .state
        .lots
        .iter()
        .find(|l| l.source == LotSource::Reversal)
        .unwrap();
    assert_eq!(reversal.original.get(), 300 * 15);
    // Expiring staff grants and payment lots stay apart.
    w.grant(LotSource::Adjustment, 10, Some(24));
    w.grant(LotSource::Pack, 10, None);
    assert_eq!(w.state.lots.len(), pack_lots + 4);
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
    assert_eq!(rebuilt.totals, w.state.totals);
    rebuilt.check_invariants().unwrap();
}

#[test]
fn a_negative_adjustment_cannot_take_more_than_is_available() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 10, None);
    w.hold(6).unwrap();
    assert_eq!(
        w.run(Operation::Adjust {
            credits: CreditDelta::new(-5),
            note: "fix".into()
        })
        .unwrap_err(),
        LedgerError::InsufficientCredits {
            needed: Credits::new(5),
            available: Credits::new(4)
        }
    );
    w.run(Operation::Adjust {
        credits: CreditDelta::new(-4),
        note: "fix".into(),
    })
    .unwrap();
    assert_eq!(w.state.totals.adjusted_out, Credits::new(4));
    w.run(Operation::Adjust {
        credits: CreditDelta::new(7),
        note: "goodwill".into(),
    })
    .unwrap();
    assert_eq!(w.available(), Credits::new(7));
}

#[test]
fn the_journal_alone_rebuilds_the_state() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 100, None);
    w.grant(LotSource::PlanPeriod, 40, Some(5));
    let g = w.hold(70).unwrap();
    w.complete(g, Some(65), None);
    w.now += Duration::hours(6);
    w.run(Operation::Adjust {
        credits: CreditDelta::new(3),
        note: "x".into(),
    })
    .unwrap();
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt, w.state);
}

#[test]
fn grant_specs_from_the_catalog_flow_through_a_hold() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 100, None);
    let spec = GenerationSpec {
        workflow: Workflow::Video,
        model: "video-ultra".into(),
        resolution: Some(crate::catalog::Resolution::K4),
        duration_s: Some(10),
        count: None,
    };
    let estimate = w.catalog.estimate(&spec).unwrap();
    assert_eq!(estimate.credits.get(), 60);
    let generation = GenerationId::new();
    w.run(Operation::Hold {
        generation,
        estimate,
        deadline: w.now + Duration::hours(1),
    })
    .unwrap();
    assert_eq!(
        w.state.balance(),
        Balance {
            available: Credits::new(40),
            held: Credits::new(60),
            frozen: Credits::ZERO
        }
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Grant {
            pack: bool,
            credits: u64,
            expires_in_h: Option<i64>,
        },
        Hold {
            slot: usize,
            credits: u64,
            deadline_h: i64,
        },
        Complete {
            slot: usize,
            credits: Option<u64>,
        },
        Fail {
            slot: usize,
        },
        Adjust {
            credits: i64,
        },
        Advance {
            hours: i64,
        },
        /// Money of the `lot`-th live lot's payment given back or disputed.
        Refund {
            lot: usize,
            refunded: u64,
        },
        Freeze {
            lot: usize,
            tenths: u64,
        },
        Unfreeze {
            lot: usize,
            lost: bool,
        },
        Credited {
            credits: u64,
            month: bool,
        },
        Allot {
            credits: u64,
            addon: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (any::<bool>(), 1u64..300, proptest::option::of(1i64..72)).prop_map(
                |(pack, credits, expires_in_h)| Step::Grant {
                    pack,
                    credits,
                    expires_in_h
                }
            ),
            (0usize..6, 1u64..150, 1i64..24).prop_map(|(slot, credits, deadline_h)| Step::Hold {
                slot,
                credits,
                deadline_h
            }),
            (0usize..6, proptest::option::of(1u64..200))
                .prop_map(|(slot, credits)| Step::Complete { slot, credits }),
            (0usize..6).prop_map(|slot| Step::Fail { slot }),
            (-200i64..200)
                .prop_filter("non-zero", |c| *c != 0)
                .prop_map(|credits| Step::Adjust { credits }),
            (1i64..30).prop_map(|hours| Step::Advance { hours }),
            (0usize..8, 0u64..=1000).prop_map(|(lot, refunded)| Step::Refund { lot, refunded }),
            (0usize..8, 1u64..=10).prop_map(|(lot, tenths)| Step::Freeze { lot, tenths }),
            (0usize..8, any::<bool>()).prop_map(|(lot, lost)| Step::Unfreeze { lot, lost }),
            (0u64..300, any::<bool>())
                .prop_map(|(credits, month)| Step::Credited { credits, month }),
            (1u64..300, any::<bool>()).prop_map(|(credits, addon)| Step::Allot { credits, addon }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_sequence_of_operations_breaks_the_ledger(steps in proptest::collection::vec(step(), 1..60)) {
            let mut w = World::new();
            let slots: Vec<GenerationId> = (0..6).map(|_| GenerationId::new()).collect();
            let mut records: std::collections::HashMap<GenerationId, Generation> = Default::default();
            for s in steps {
                let op = match s {
                    Step::Grant { pack, credits, expires_in_h } => Operation::Grant {
                        month: None,
                        source: if pack { LotSource::Pack } else { LotSource::PlanPeriod },
                        credits: Credits::new(credits),
                        expires_at: expires_in_h.map(|h| w.now + Duration::hours(h)),
                        note: None,
                    },
                    Step::Hold { slot, credits, deadline_h } => Operation::Hold {
                        generation: slots[slot],
                        estimate: w.estimate(credits),
                        deadline: w.now + Duration::hours(deadline_h),
                    },
                    Step::Complete { slot, credits } => Operation::Complete {
                        generation: slots[slot],
                        credits: credits.map(Credits::new),
                        record: records.get(&slots[slot]).cloned(),
                    },
                    Step::Fail { slot } => Operation::Fail {
                        generation: slots[slot],
                        reason: "failed".into(),
                        record: records.get(&slots[slot]).cloned(),
                    },
                    Step::Adjust { credits } => Operation::Adjust { credits: CreditDelta::new(credits), note: "p".into() },
                    Step::Advance { hours } => {
                        w.now += Duration::hours(hours);
                        continue;
                    }
                    Step::Refund { lot, refunded } => {
                        let Some(l) = w.state.lots.get(lot % w.state.lots.len().max(1)) else {
                            continue;
                        };
                        Operation::TakeBack { lot: l.seq, refunded, paid: 1000, note: "r".into() }
                    }
                    Step::Freeze { lot, tenths } => {
                        let Some(l) = w.state.lots.get(lot % w.state.lots.len().max(1)) else {
                            continue;
                        };
                        Operation::Freeze {
                            lot: l.seq,
                            share: Share { numerator: tenths, denominator: 10 },
                            of_rest: false,
                            note: "d".into(),
                        }
                    }
                    Step::Unfreeze { lot, lost } => {
                        let Some(l) = w.state.lots.get(lot % w.state.lots.len().max(1)) else {
                            continue;
                        };
                        Operation::Unfreeze {
                            lot: l.seq,
                            take_back: lost,
                            lost_cents: if lost { 100 } else { 0 },
                            note: "c".into(),
                        }
                    }
                    Step::Credited { credits, month } => Operation::ChangeCredited {
                        credits: Credits::new(credits),
                        note: "c".into(),
                        month_from: month.then(|| w.now - Duration::hours(10)),
                    },
                    Step::Allot { credits, addon } => Operation::Allotment {
                        source: if addon { LotSource::Addon } else { LotSource::PlanPeriod },
                        credits: Credits::new(credits),
                        expires_at: w.now + Duration::hours(48),
                        note: "a".into(),
                        month: w.now - Duration::hours(10),
                        last: !addon,
                    },
                };
                let before = w.state.clone();
                let cmd = Command {
                    key: IdempotencyKey::derived(format!("p{}", w.journal.len())),
                    at: w.now,
                    actor: Actor::system(),
                    refs: Refs::default(),
                    op,
                };
                match execute(&w.state, &cmd, &w.catalog) {
                    Ok(applied) => {
                        for (_, g) in &applied.generations {
                            records.insert(g.id, g.clone());
                        }
                        // Balance after each entry is never negative (u64 and consistent).
                        for e in &applied.entries {
                            prop_assert!(e.balance_after.available.get() as i128 >= 0);
                        }
                        w.state = applied.state;
                        w.journal.extend(applied.entries);
                    }
                    Err(LedgerError::Corrupt(m)) => prop_assert!(false, "corrupt: {m}"),
                    Err(_) => prop_assert_eq!(&w.state, &before),
                }
                prop_assert_eq!(w.state.check_invariants(), Ok(()));
                let remaining: i128 = w.state.lots.iter().map(|l| l.remaining.get() as i128).sum();
                let held: i128 = w.state.known_holds().map(|h| h.amount.get() as i128).sum();
                prop_assert!(remaining - held >= 0, "available went negative");
            }
            let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
            prop_assert_eq!(rebuilt, w.state);
        }
    }
}

#[test]
fn settling_releases_at_most_one_transaction_of_overdue_holds_and_does_nothing_when_nothing_is_due()
{
    let mut w = World::new();
    w.grant(LotSource::Pack, 100, None);
    let nothing = w.run(Operation::Settle).unwrap();
    assert!(nothing.entries.is_empty(), "nothing due: no entry");
    for _ in 0..60 {
        w.hold(1).unwrap();
    }
    w.now += Duration::hours(2);
    assert!(w.state.needs_settling(w.now));
    let mut rounds = Vec::new();
    while w.state.needs_settling(w.now) {
        let out = w.run(Operation::Settle).unwrap();
        assert!(out.entries.len() <= engine::MAX_HOLDS_SETTLED_PER_OPERATION);
        rounds.push(out.entries.len());
    }
    assert_eq!(rounds, [25, 25, 10]);
    assert_eq!(w.available(), Credits::new(100));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.balance(), w.state.balance());
    assert_eq!(w.state.next_settlement_after(w.now), None);
}

/// A dispute's freeze of `numerator / denominator` of the lot (of what it has not followed
/// back yet, `of_rest`).
fn freeze_op(lot: u64, numerator: u64, denominator: u64, of_rest: bool) -> Operation {
    Operation::Freeze {
        lot,
        share: Share {
            numerator,
            denominator,
        },
        of_rest,
        note: "disputed".into(),
    }
}

/// A dispute closed: won (`None`) or lost, taking `Some(cents)`.
fn close_op(lot: u64, lost: Option<u64>) -> Operation {
    Operation::Unfreeze {
        lot,
        take_back: lost.is_some(),
        lost_cents: lost.unwrap_or(0),
        note: "closed".into(),
    }
}

/// `refunded` of the `paid` cents of the lot's payment refunded.
fn refund_op(lot: u64, refunded: u64, paid: u64) -> Operation {
    Operation::TakeBack {
        lot,
        refunded,
        paid,
        note: "refunded".into(),
    }
}

fn lot_seq(id: &str) -> u64 {
    id.strip_prefix("lot_").unwrap().parse().unwrap()
}

#[test]
fn refunds_take_each_refunded_cent_once_whatever_order_and_however_often_they_are_seen() {
    let take = |w: &mut World, lot: u64, refunded: u64| {
        w.run(Operation::TakeBack {
            lot,
            refunded,
            paid: 1000,
            note: "refund".into(),
        })
        .unwrap();
    };
    // In order: a quarter, the same quarter seen again under another key, then the rest.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    take(&mut w, lot, 250);
    assert_eq!(w.available(), Credits::new(750));
    take(&mut w, lot, 250);
    assert_eq!(
        w.available(),
        Credits::new(750),
        "the same refund takes nothing twice"
    );
    take(&mut w, lot, 1000);
    assert_eq!(w.available(), Credits::ZERO);
    // A stale, smaller total after a larger one takes nothing.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    take(&mut w, lot, 600);
    take(&mut w, lot, 250);
    assert_eq!(w.available(), Credits::new(400));
    assert_eq!(w.state.totals.clawed_back, Credits::new(600));
    // Spent credits are not taken: half spent, then all refunded, takes the unspent half.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(500).unwrap();
    w.complete(g, None, None);
    take(&mut w, lot, 1000);
    assert_eq!(w.available(), Credits::ZERO);
    assert_eq!(w.state.totals.clawed_back, Credits::new(500));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
}

#[test]
fn a_change_credited_back_takes_free_plan_and_add_on_credits_only_and_records_the_rest() {
    let credited = |credits: u64| Operation::ChangeCredited {
        credits: Credits::new(credits),
        note: "invoice credited unused time".into(),
        month_from: None,
    };
    let mut w = World::new();
    w.grant(LotSource::Pack, 500, None);
    let rollover = lot_seq(&w.grant(LotSource::PlanPeriod, 100, Some(24 * 5)));
    w.grant(LotSource::PlanPeriod, 300, Some(24 * 30));
    w.grant(LotSource::Addon, 100, Some(24 * 20));
    // 150 held by a running generation: the older month's rollover, then the add-on lot.
    let _g = w.hold(150).unwrap();
    // The month's own lots go first, latest-expiring first: 300 of the plan's, then the
    // 50 free of the add-on lot; the rollover is left for a refund of its own month, and
    // the pack is never touched.
    let o = w.run(credited(400)).unwrap();
    assert_eq!(o.clawed_back, Credits::new(350));
    assert_eq!(w.available(), Credits::new(500));
    let e = w.journal.last().unwrap();
    assert_eq!(e.reason, Reason::PlanChanged);
    assert!(
        e.note.as_deref().is_some_and(|n| n.contains("350 of 400")
            && n.contains("50 held by running generations")
            && n.contains("0 already spent")),
        "{e:?}"
    );
    assert!(
        !e.lots
            .iter()
            .any(|c| matches!(c, LotChange::Changed { lot, .. } if *lot == rollover))
    );
    // The generation fails: the 50 it held of the add-on lot go too; the rollover's 100
    // are free again.
    w.run(Operation::Fail {
        generation: _g,
        reason: "failed".into(),
        record: None,
    })
    .unwrap();
    assert_eq!(w.available(), Credits::new(600));
    assert_eq!(w.state.totals.clawed_back, Credits::new(400));
    // Nothing to take (the month follows the lower level): an entry that says so.
    let o = w.run(credited(0)).unwrap();
    assert_eq!(o.clawed_back, Credits::ZERO);
    assert!(matches!(
        w.run(credited(crate::money::MAX_CREDITS_PER_REQUEST + 1)),
        Err(LedgerError::Invalid(_))
    ));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
    assert_eq!(rebuilt.totals, w.state.totals);
}

#[test]
fn a_change_credited_back_in_a_month_not_granted_yet_is_withheld_from_that_months_allotment() {
    let mut w = World::new();
    // Last month's rollover, still usable; the new month began half an hour ago and its
    // allotment is not granted yet.
    let rollover = w.grant(LotSource::PlanPeriod, 200, Some(24 * 20));
    w.now += Duration::hours(1);
    let month = w.now - Duration::minutes(30);
    let credited = |credits: u64| Operation::ChangeCredited {
        credits: Credits::new(credits),
        note: "invoice credited unused time".into(),
        month_from: Some(month),
    };
    let allot = |credits: u64, month: DateTime<Utc>| Operation::Allotment {
        source: LotSource::PlanPeriod,
        credits: Credits::new(credits),
        expires_at: month + Duration::days(45),
        note: "plan credits".into(),
        month,
        last: true,
    };
    // A fall: nothing of the month's to take yet, and the rollover is not the month's:
    // the month's allotment owes it all back.
    let o = w.run(credited(300)).unwrap();
    assert_eq!(o.clawed_back, Credits::ZERO);
    assert_eq!(w.state.owed_by_month(month), Credits::new(300));
    assert_eq!(w.lot(&rollover).remaining, Credits::new(200));
    // A rise back grants 250 for the rest of the month: a lot of its own (its invoice's
    // refunds follow it), which the next fall of the month takes from.
    let rise = w.grant(LotSource::PlanPeriod, 250, Some(24 * 30));
    assert_eq!(w.state.owed_by_month(month), Credits::new(300));
    let o = w.run(credited(100)).unwrap();
    assert_eq!(o.clawed_back, Credits::new(100));
    assert_eq!(w.lot(&rise).remaining, Credits::new(150));
    // The month's allotment withholds what it owes and grants the rest.
    let o = w.run(allot(900, month)).unwrap();
    let month_lot = o.lot.unwrap();
    assert_eq!(w.lot(&month_lot).original, Credits::new(600));
    assert!(w.state.owed_by_months.is_empty());
    let e = w.journal.last().unwrap();
    assert_eq!(e.allotted, Some(month));
    assert!(
        e.note
            .as_deref()
            .is_some_and(|n| n.contains("900 credits less 300"))
    );
    assert_eq!(w.available(), Credits::new(200 + 150 + 600));
    // Once it is granted, a later change of the month takes from the month's credits,
    // never from the rollover, and owes nothing more.
    let o = w.run(credited(700)).unwrap();
    assert_eq!(o.clawed_back, Credits::new(700));
    assert_eq!(w.lot(&rollover).remaining, Credits::new(200));
    assert!(w.state.owed_by_months.is_empty());
    // A month whose allotment never came (forfeited): what it owed is dropped by the next
    // month's allotment, never taken from it.
    let next = month + Duration::days(31);
    let later = month + Duration::days(62);
    w.now = next + Duration::hours(1);
    w.run(Operation::ChangeCredited {
        credits: Credits::new(50),
        note: "credited".into(),
        month_from: Some(next),
    })
    .unwrap();
    assert_eq!(w.state.owed_by_month(next), Credits::new(50));
    w.now = later + Duration::hours(1);
    let o = w.run(allot(400, later)).unwrap();
    assert_eq!(w.lot(&o.lot.unwrap()).original, Credits::new(400));
    assert!(w.state.owed_by_months.is_empty());
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.owed_by_months, w.state.owed_by_months);
    assert_eq!(rebuilt.allotted_through, w.state.allotted_through);
    assert_eq!(rebuilt.totals, w.state.totals);
    assert_eq!(rebuilt.lots, w.state.lots);
}

#[test]
fn a_month_counts_as_granted_only_after_its_last_grant() {
    let mut w = World::new();
    w.grant(LotSource::Pack, 10, None);
    let month = w.now;
    w.now += Duration::hours(1);
    let credited = |credits: u64| Operation::ChangeCredited {
        credits: Credits::new(credits),
        note: "credited".into(),
        month_from: Some(month),
    };
    let allot = |source, credits: u64, last| Operation::Allotment {
        source,
        credits: Credits::new(credits),
        expires_at: month + Duration::days(30),
        note: "allotment".into(),
        month,
        last,
    };
    w.run(credited(900)).unwrap();
    // The plan's grant, owed back in full: no lot, the entry says so.
    let o = w.run(allot(LotSource::PlanPeriod, 900, false)).unwrap();
    assert_eq!(o.lot, None);
    assert_eq!(o.granted, Some(Credits::ZERO));
    assert!(w.state.owed_by_months.is_empty());
    assert_eq!(w.state.allotted_through, None);
    // A change credited back between the plan's grant and the add-ons': the month is
    // still waiting, so its add-on grant owes it.
    let o = w.run(credited(250)).unwrap();
    assert_eq!(o.clawed_back, Credits::ZERO);
    assert_eq!(w.state.owed_by_month(month), Credits::new(250));
    let o = w.run(allot(LotSource::Addon, 300, true)).unwrap();
    assert_eq!(o.granted, Some(Credits::new(50)));
    assert_eq!(w.lot(&o.lot.unwrap()).month, Some(month));
    assert_eq!(w.available(), Credits::new(10 + 50));
    assert_eq!(w.state.allotted_through, Some(month));
    // Now granted: a change credited back in it takes from its lots and owes nothing.
    w.run(credited(2000)).unwrap();
    assert!(w.state.owed_by_months.is_empty());
    assert_eq!(w.available(), Credits::new(10));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.owed_by_months, w.state.owed_by_months);
    assert_eq!(rebuilt.allotted_through, w.state.allotted_through);
    assert_eq!(rebuilt.totals, w.state.totals);
}

#[test]
fn a_change_in_a_waiting_month_takes_nothing_from_another_months_allotment_granted_late() {
    let mut w = World::new();
    let earlier = w.now;
    w.now += Duration::days(31);
    let month = w.now;
    w.now += Duration::hours(1);
    // Last month's allotment, granted late (after this month began).
    let last_month = w
        .run(Operation::Allotment {
            source: LotSource::PlanPeriod,
            credits: Credits::new(400),
            expires_at: month + Duration::days(40),
            note: "allotment".into(),
            month: earlier,
            last: true,
        })
        .unwrap()
        .lot
        .unwrap();
    // And a rise made last month whose invoice's event came after this month began.
    let late_rise = w
        .run(Operation::Grant {
            source: LotSource::PlanPeriod,
            credits: Credits::new(250),
            expires_at: Some(month + Duration::days(40)),
            note: None,
            month: Some(earlier),
        })
        .unwrap()
        .lot
        .unwrap();
    // This month's own rise: taken from first.
    let rise = w
        .run(Operation::Grant {
            source: LotSource::PlanPeriod,
            credits: Credits::new(30),
            expires_at: Some(month + Duration::days(70)),
            note: None,
            month: Some(month),
        })
        .unwrap()
        .lot
        .unwrap();
    w.run(Operation::ChangeCredited {
        credits: Credits::new(100),
        note: "credited".into(),
        month_from: Some(month),
    })
    .unwrap();
    assert_eq!(w.lot(&last_month).remaining, Credits::new(400));
    assert_eq!(w.lot(&late_rise).remaining, Credits::new(250));
    assert!(w.state.lots.iter().all(|l| l.id() != rise), "spent out");
    assert_eq!(w.state.owed_by_month(month), Credits::new(70));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
}

#[test]
fn money_given_back_while_a_generation_holds_the_credits_takes_them_as_it_releases_them() {
    let refund = |lot: u64, refunded: u64| Operation::TakeBack {
        lot,
        refunded,
        paid: 1000,
        note: "refund".into(),
    };
    let fail = |g: GenerationId| Operation::Fail {
        generation: g,
        reason: "failed".into(),
        record: None,
    };
    let rebuilt = |w: &World| {
        let r = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
        assert_eq!(r.lots, w.state.lots);
        assert_eq!(r.totals, w.state.totals);
    };
    // All refunded while 600 are held: the 400 free go now, the 600 as the generation
    // fails (never free in between: the release and the take-back are one entry).
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(600).unwrap();
    let o = w.run(refund(lot, 1000)).unwrap();
    assert_eq!(o.clawed_back, Credits::new(400));
    assert_eq!(w.lot(&format!("lot_{lot}")).owed, Credits::new(600));
    let o = w.run(fail(g)).unwrap();
    assert_eq!(o.clawed_back, Credits::new(600));
    assert_eq!(w.available(), Credits::ZERO);
    assert_eq!(w.state.totals.clawed_back, Credits::new(1000));
    let e = w.journal.last().unwrap();
    assert_eq!(e.credits, CreditDelta::ZERO, "{e:?}");
    assert!(
        e.note
            .as_deref()
            .is_some_and(|n| n.contains("600 of the credits released taken back"))
    );
    rebuilt(&w);

    // Half refunded while 600 are held: half of the 1,000 unspent (500) goes, the 400
    // free now and 100 of what the generation releases; it spends 300 and releases 300.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(600).unwrap();
    w.run(refund(lot, 500)).unwrap();
    w.complete(g, Some(300), None);
    assert_eq!(w.available(), Credits::new(200));
    assert_eq!(w.state.totals.clawed_back, Credits::new(500));
    assert_eq!(w.state.totals.spent, Credits::new(300));
    rebuilt(&w);

    // Spent in full: what was spent before the money went back stays spent.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(1000).unwrap();
    w.run(refund(lot, 1000)).unwrap();
    w.complete(g, None, None);
    assert_eq!(w.state.totals.clawed_back, Credits::ZERO);
    assert_eq!(w.state.totals.spent, Credits::new(1000));
    assert!(w.state.lots.is_empty());
    rebuilt(&w);

    // Two generations: the one that completes spends its half, the one that expires gives
    // its half back to the refund; a second refund of the same money takes nothing more.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let a = w.hold(500).unwrap();
    let _b = w.hold(500).unwrap();
    w.run(refund(lot, 1000)).unwrap();
    w.complete(a, None, None);
    assert_eq!(w.lot(&format!("lot_{lot}")).owed, Credits::new(500));
    w.run(refund(lot, 1000)).unwrap();
    assert_eq!(w.lot(&format!("lot_{lot}")).owed, Credits::new(500));
    w.now += Duration::hours(2);
    w.run(Operation::Settle).unwrap();
    assert_eq!(w.available(), Credits::ZERO);
    assert_eq!(w.state.totals.clawed_back, Credits::new(500));
    assert!(w.state.lots.is_empty());
    rebuilt(&w);
}

#[test]
fn a_dispute_of_credits_a_generation_holds_freezes_them_as_it_releases_them() {
    let freeze = |lot: u64| freeze_op(lot, 1, 1, false);
    let close = |lot: u64, lost: bool| close_op(lot, lost.then_some(1000));
    let fail = |g: GenerationId| Operation::Fail {
        generation: g,
        reason: "failed".into(),
        record: None,
    };
    // A pack of 1,000 disputed in full while a generation holds 300 of it.
    let disputed_while_held = || {
        let mut w = World::new();
        let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
        let g = w.hold(300).unwrap();
        w.run(freeze(lot)).unwrap();
        (w, lot, g)
    };
    // Released while disputed: frozen, then taken back with the rest when lost.
    let (mut w, lot, g) = disputed_while_held();
    assert_eq!(w.state.balance().frozen, Credits::new(700));
    w.run(fail(g)).unwrap();
    assert_eq!(w.state.balance().frozen, Credits::new(1000));
    assert_eq!(w.available(), Credits::ZERO);
    w.run(close(lot, true)).unwrap();
    assert_eq!(w.state.totals.clawed_back, Credits::new(1000));
    assert!(w.state.lots.is_empty());
    // Lost while still held: taken back as released.
    let (mut w, lot, g) = disputed_while_held();
    w.run(close(lot, true)).unwrap();
    assert_eq!(w.lot(&format!("lot_{lot}")).owed, Credits::new(300));
    w.run(fail(g)).unwrap();
    assert_eq!(w.state.totals.clawed_back, Credits::new(1000));
    assert!(w.state.lots.is_empty());
    // Won while still held: free as released.
    let (mut w, lot, g) = disputed_while_held();
    w.run(close(lot, false)).unwrap();
    w.run(fail(g)).unwrap();
    assert_eq!(w.available(), Credits::new(1000));
    assert_eq!(w.state.totals.clawed_back, Credits::ZERO);
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
}

#[test]
fn a_dispute_freezes_free_credits_and_a_lost_one_takes_exactly_them_back() {
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(300).unwrap();
    w.run(freeze_op(lot, 1, 1, false)).unwrap();
    assert_eq!(w.state.balance().frozen, Credits::new(700));
    assert_eq!(w.available(), Credits::ZERO);
    // The running generation completes from its hold; frozen credits stay frozen.
    w.complete(g, None, None);
    assert_eq!(w.state.balance().frozen, Credits::new(700));
    w.run(close_op(lot, Some(1000))).unwrap();
    assert_eq!(w.state.balance(), Balance::default());
    assert_eq!(w.state.totals.clawed_back, Credits::new(700));
}

/// A refund of part of a payment and a dispute of the rest, followed in either order and
/// however the dispute ends, leave the lot with what the money kept bought.
#[test]
fn a_refund_followed_after_a_dispute_of_the_rest_takes_its_own_share() {
    // Stripe's order: 2,000 of 5,000 cents refunded, then the other 3,000 disputed; the
    // dispute's freeze is 3,000 of the 5,000 not refunded when it was followed.
    let take_back = |lot: u64, refunded: u64| refund_op(lot, refunded, 5000);
    let freeze =
        |lot: u64, numerator: u64, denominator: u64| freeze_op(lot, numerator, denominator, false);
    let close = |lot: u64, lost: bool| close_op(lot, lost.then_some(3000));
    for lost in [true, false] {
        for refund_first in [true, false] {
            let mut w = World::new();
            let lot = lot_seq(&w.grant(LotSource::Pack, 5000, None));
            if refund_first {
                w.run(take_back(lot, 2000)).unwrap();
                w.run(freeze(lot, 3000, 3000)).unwrap();
            } else {
                w.run(freeze(lot, 3000, 5000)).unwrap();
                w.run(take_back(lot, 2000)).unwrap();
            }
            assert_eq!(w.available(), Credits::ZERO, "{refund_first}");
            assert_eq!(w.state.balance().frozen, Credits::new(3000));
            w.run(close(lot, lost)).unwrap();
            let kept = if lost { 0 } else { 3000 };
            assert_eq!(w.available(), Credits::new(kept), "{lost} {refund_first}");
            assert_eq!(w.state.totals.clawed_back, Credits::new(5000 - kept));
            let rebuilt =
                WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
            assert_eq!(rebuilt.lots, w.state.lots);
        }
    }
    // The dispute lost and followed before the refund made before it: the refund takes
    // what is left, all of it paid by the refunded money.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 5000, None));
    w.run(freeze(lot, 3000, 5000)).unwrap();
    w.run(close(lot, true)).unwrap();
    assert_eq!(w.available(), Credits::new(2000));
    w.run(take_back(lot, 2000)).unwrap();
    assert_eq!(w.available(), Credits::ZERO);
    assert_eq!(w.state.totals.clawed_back, Credits::new(5000));
    // Part of the lot spent first: the refund takes its share of what is unspent.
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 5000, None));
    let g = w.hold(1000).unwrap();
    w.complete(g, None, None);
    w.run(freeze(lot, 3000, 5000)).unwrap();
    w.run(take_back(lot, 2000)).unwrap();
    // 2,000 of 5,000 cents bought 1,600 of the 4,000 unspent; the dispute froze 2,400.
    assert_eq!(w.available(), Credits::ZERO);
    assert_eq!(w.state.balance().frozen, Credits::new(2400));
    w.run(close(lot, false)).unwrap();
    assert_eq!(w.available(), Credits::new(2400));
}

/// A refund made while an inquiry freezes the whole payment takes its share from the
/// frozen credits, and from those a running generation holds for the freeze.
#[test]
fn a_refund_during_an_inquiry_takes_its_share_of_the_frozen_credits() {
    let mut w = World::new();
    let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
    let g = w.hold(300).unwrap();
    w.run(freeze_op(lot, 1, 1, false)).unwrap();
    assert_eq!(w.state.balance().frozen, Credits::new(700));
    // 900 of 1,000 cents refunded: 900 credits, 700 frozen and 200 of the 300 held.
    w.run(refund_op(lot, 900, 1000)).unwrap();
    assert_eq!(w.state.balance().frozen, Credits::ZERO);
    assert_eq!(w.state.totals.clawed_back, Credits::new(700));
    let l = w.lot(&format!("lot_{lot}"));
    assert_eq!(
        (l.owed, l.owed_frozen),
        (Credits::new(200), Credits::new(100))
    );
    w.run(Operation::Fail {
        generation: g,
        reason: "failed".into(),
        record: None,
    })
    .unwrap();
    assert_eq!(w.state.totals.clawed_back, Credits::new(900));
    assert_eq!(w.state.balance().frozen, Credits::new(100));
    // The inquiry closes without a dispute: the 100 cents kept bought 100 credits.
    w.run(close_op(lot, None)).unwrap();
    assert_eq!(w.available(), Credits::new(100));
    let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
    assert_eq!(rebuilt.lots, w.state.lots);
}

/// A refund made before a dispute of the rest but followed after it, while a generation
/// holds part of the lot: whether the generation fails or spends its hold, and whether the
/// dispute is won or lost, the lot ends as if the refund had been followed first.
#[test]
fn a_refund_followed_after_a_dispute_while_a_generation_holds_credits_ends_as_in_stripes_order() {
    let end = |refund_first: bool, spends: bool, lost: bool| {
        let mut w = World::new();
        let lot = lot_seq(&w.grant(LotSource::Pack, 1000, None));
        let g = w.hold(500).unwrap();
        let refund = refund_op(lot, 2000, 5000);
        let freeze = freeze_op(lot, 3000, 5000, true);
        if refund_first {
            w.run(refund).unwrap();
            w.run(freeze).unwrap();
        } else {
            w.run(freeze).unwrap();
            w.run(refund).unwrap();
        }
        if spends {
            w.complete(g, None, None);
        } else {
            w.run(Operation::Fail {
                generation: g,
                reason: "failed".into(),
                record: None,
            })
            .unwrap();
        }
        w.run(close_op(lot, lost.then_some(3000))).unwrap();
        let rebuilt = WorkspaceState::from_journal(w.state.workspace.clone(), &w.journal).unwrap();
        assert_eq!(rebuilt.lots, w.state.lots);
        (w.available(), w.state.balance().frozen)
    };
    for spends in [false, true] {
        for lost in [false, true] {
            let stripe_order = end(true, spends, lost);
            assert_eq!(
                end(false, spends, lost),
                stripe_order,
                "spends {spends}, lost {lost}"
            );
            // The 3,000 cents kept bought 600 credits, less what the generation spent.
            let kept = match (lost, spends) {
                (true, _) => 0,
                (false, false) => 600,
                (false, true) => 100,
            };
            assert_eq!(stripe_order, (Credits::new(kept), Credits::ZERO));
        }
    }
}

/// The settling an operation does first writes entries of its own: they carry none of
/// the operation's references (a renewal's invoice, payment and event did not expire the
/// hold or the lapsed lot), only their own generation.
#[test]
fn settlement_entries_carry_their_own_references_not_the_operations() {
    let mut w = World::new();
    w.grant(LotSource::Addon, 30, Some(1));
    w.grant(LotSource::Pack, 50, None);
    let g = w.hold(20).unwrap();
    w.now += Duration::hours(2);
    let refs = Refs {
        stripe_event: Some(StripeEventId::parse("evt_renewal").unwrap()),
        invoice: Some(InvoiceId::parse("in_renewal").unwrap()),
        charge: Some("ch_renewal".into()),
        ticket: Some("tkt_1".into()),
        generation: Some(GenerationId::new()),
        ..Refs::default()
    };
    let cmd = Command {
        key: IdempotencyKey::derived("renewal".into()),
        at: w.now,
        actor: Actor::system(),
        refs: refs.clone(),
        op: Operation::Grant {
            source: LotSource::PlanPeriod,
            credits: Credits::new(100),
            expires_at: Some(w.now + Duration::days(30)),
            note: None,
            month: None,
        },
    };
    let applied = execute(&w.state, &cmd, &w.catalog).unwrap();
    let by_reason = |r: Reason| {
        applied
            .entries
            .iter()
            .find(|e| e.reason == r)
            .unwrap_or_else(|| panic!("no {r:?} entry in {:#?}", applied.entries))
    };
    let key = Some(cmd.key.to_string());
    let expired_hold = by_reason(Reason::HoldExpired);
    assert_eq!(
        expired_hold.refs,
        Refs {
            generation: Some(g),
            idempotency_key: key.clone(),
            ..Refs::default()
        }
    );
    let lapsed = by_reason(Reason::LotsExpired);
    assert_eq!(
        lapsed.refs,
        Refs {
            idempotency_key: key.clone(),
            ..Refs::default()
        }
    );
    let grant = applied.entries.last().unwrap();
    assert_eq!(grant.refs.invoice, refs.invoice);
    assert_eq!(grant.refs.stripe_event, refs.stripe_event);
    assert_eq!(grant.refs.charge, refs.charge);
    assert_eq!(grant.refs.idempotency_key, key);
    // Support settling a ticket's generation: the ticket caused it, and stays named.
    let settle = Command {
        key: IdempotencyKey::derived("support-settle".into()),
        op: Operation::Settle,
        refs: Refs {
            ticket: Some("tkt_2".into()),
            generation: Some(GenerationId::new()),
            ..Refs::default()
        },
        ..cmd
    };
    let applied = execute(&w.state, &settle, &w.catalog).unwrap();
    let expired_hold = applied
        .entries
        .iter()
        .find(|e| e.reason == Reason::HoldExpired)
        .unwrap();
    assert_eq!(
        (
            expired_hold.refs.ticket.as_deref(),
            expired_hold.refs.generation
        ),
        (Some("tkt_2"), Some(g))
    );
    let lapsed = applied
        .entries
        .iter()
        .find(|e| e.reason == Reason::LotsExpired)
        .unwrap();
    assert_eq!(
        (lapsed.refs.ticket.as_deref(), lapsed.refs.generation),
        (Some("tkt_2"), None)
    );
}
