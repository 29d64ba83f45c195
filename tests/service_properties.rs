//! Property tests through the ledger service and a real store: random operations with
//! replays of earlier requests. Replaying any request returns its first outcome and changes
//! nothing; the balance never goes negative; conservation holds; the stored journal alone
//! rebuilds the stored state.

use chrono::Duration;
use proptest::prelude::*;
use tally::catalog::{Estimate, Workflow};
use tally::ids::{GenerationId, IdempotencyKey};
use tally::ledger::{Actor, LotSource, Operation, Outcome, Refs, WorkspaceState};
use tally::money::Credits;
use tally::service::{LedgerRequest, ServiceError};
use tally::store::EntryQuery;
use tally_tests::{embedded_store, ledger_over, workspace};

#[derive(Debug, Clone)]
enum Step {
    Grant(u64, Option<i64>),
    Hold(usize, u64),
    Complete(usize, Option<u64>),
    Fail(usize),
    Adjust(i64),
    Advance(i64),
    Replay(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u64..300, proptest::option::of(1i64..48)).prop_map(|(c, e)| Step::Grant(c, e)),
        (0usize..5, 1u64..120).prop_map(|(s, c)| Step::Hold(s, c)),
        (0usize..5, proptest::option::of(1u64..150)).prop_map(|(s, c)| Step::Complete(s, c)),
        (0usize..5).prop_map(Step::Fail),
        (-100i64..100)
            .prop_filter("non-zero", |c| *c != 0)
            .prop_map(Step::Adjust),
        (1i64..6).prop_map(Step::Advance),
        (0usize..100).prop_map(Step::Replay),
    ]
}

fn estimate(credits: u64) -> Estimate {
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn replays_change_nothing_and_the_ledger_stays_consistent(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (ledger, clock) = ledger_over(embedded_store());
            let ws = workspace("org_prop");
            let gens: Vec<GenerationId> = (0..5).map(|_| GenerationId::new()).collect();
            let mut held_once = [false; 5];
            let mut done: Vec<(LedgerRequest, Outcome)> = Vec::new();
            for (i, s) in steps.into_iter().enumerate() {
                let key = IdempotencyKey::derived(format!("op{i}"));
                let op = match s {
                    Step::Grant(c, e) => Operation::Grant {
                        month: None,
                        source: if e.is_some() { LotSource::PlanPeriod } else { LotSource::Pack },
                        credits: Credits::new(c),
                        expires_at: e.map(|h| clock_now(&ledger) + Duration::hours(h)),
                        note: None,
                    },
                    Step::Hold(slot, c) => {
                        if held_once[slot] { continue; }
                        Operation::Hold { generation: gens[slot], estimate: estimate(c), deadline: clock_now(&ledger) + Duration::hours(3) }
                    }
                    Step::Complete(slot, c) => Operation::Complete { generation: gens[slot], credits: c.map(Credits::new), record: None },
                    Step::Fail(slot) => Operation::Fail { generation: gens[slot], reason: "failed".into(), record: None },
                    Step::Adjust(c) => Operation::Adjust { credits: tally::money::CreditDelta::new(c), note: "prop".into() },
                    Step::Advance(h) => { clock.advance(Duration::hours(h)); continue; }
                    Step::Replay(n) => {
                        if done.is_empty() { continue; }
                        let (req, first) = done[n % done.len()].clone();
                        let before = ledger.store.load(&ws).await.unwrap();
                        let again = ledger.execute(req).await.expect("a replay succeeds");
                        prop_assert_eq!(again, first);
                        prop_assert_eq!(ledger.store.load(&ws).await.unwrap(), before);
                        continue;
                    }
                };
                let slot_of = |g: GenerationId| gens.iter().position(|x| *x == g);
                let req = LedgerRequest {
                    workspace: ws.clone(),
                    key,
                    fingerprint: format!("{op:?}").chars().take(64).collect(),
                    actor: Actor::system(),
                    refs: Refs::default(),
                    op: op.clone(),
                };
                match ledger.execute(req.clone()).await {
                    Ok(outcome) => {
                        if let Operation::Hold { generation, .. } = &op {
                            held_once[slot_of(*generation).unwrap()] = true;
                        }
                        done.push((req, outcome));
                    }
                    Err(ServiceError::Refused(tally::ledger::LedgerError::Corrupt(m))) => prop_assert!(false, "corrupt: {}", m),
                    Err(ServiceError::Refused(_)) => {}
                    Err(other) => prop_assert!(false, "unexpected: {}", other),
                }
                if let Some(state) = ledger.store.load(&ws).await.unwrap() {
                    prop_assert_eq!(state.check_invariants(), Ok(()));
                }
            }
            // A reused key with a different request is refused, not answered wrongly.
            if let Some((req, _)) = done.first().cloned() {
                let mut other = req;
                other.fingerprint = "something else".into();
                prop_assert!(matches!(ledger.execute(other).await, Err(ServiceError::KeyReused)));
            }
            if let Some(state) = ledger.store.load(&ws).await.unwrap() {
                let mut journal = ledger.store.entries(&ws, &EntryQuery { before: None, limit: 10_000 }).await.unwrap();
                journal.reverse();
                let rebuilt = WorkspaceState::from_journal(ws.clone(), &journal).unwrap();
                prop_assert_eq!(rebuilt.as_stored_like(&state), state.clone());
                // Every open hold has its item, and nothing else has one.
                let mut open: Vec<_> = rebuilt.known_holds().cloned().collect();
                open.sort_by_key(|h| (h.deadline, h.generation));
                let items = ledger.store.open_holds(&ws, None, 10_000).await.unwrap();
                prop_assert_eq!(items, open);
                rebuilt.check_invariants().unwrap();
            }
            Ok(())
        })?;
    }
}

fn clock_now(ledger: &tally::service::Ledger) -> chrono::DateTime<chrono::Utc> {
    ledger.clock.now()
}
