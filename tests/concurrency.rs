//! Many generations racing for one workspace's balance: exactly as many holds succeed as
//! the balance covers, the rest are refused, and the final balance is exact.

use std::sync::Arc;
use tally::catalog::{GenerationSpec, Workflow};
use tally::ids::{GenerationId, IdempotencyKey};
use tally::ledger::{Actor, ActorKind, LedgerError, Operation, Refs};
use tally::service::{Ledger, LedgerRequest, ServiceError};
use tally::store::LedgerStore;
use tally_tests::{grant, ledger_over, workspace};

async fn race(store: Arc<dyn LedgerStore>, holds: usize, balance: u64) {
    let (ledger, _) = ledger_over(store);
    grant(&ledger, "org_race", balance).await;
    let spec = GenerationSpec {
        workflow: Workflow::Image,
        model: "imagen-3".into(),
        resolution: Some(tally::catalog::Resolution::K4),
        duration_s: None,
        count: None,
    };
    let estimate = ledger.catalog.estimate(&spec).unwrap();
    assert_eq!(estimate.credits.get(), 9);
    let tasks: Vec<_> = (0..holds)
        .map(|i| {
            let ledger: Ledger = ledger.clone();
            let estimate = estimate.clone();
            tokio::spawn(async move {
                let generation = GenerationId::new();
                ledger
                    .execute(LedgerRequest {
                        workspace: workspace("org_race"),
                        key: IdempotencyKey::derived(format!("gen:{generation}:hold")),
                        fingerprint: format!("race-{i}"),
                        actor: Actor::new(ActorKind::Member, format!("m{i}")),
                        refs: Refs::default(),
                        op: Operation::Hold {
                            generation,
                            estimate,
                            deadline: tally_tests::t0() + chrono::Duration::hours(1),
                        },
                    })
                    .await
            })
        })
        .collect();
    let mut ok = 0u64;
    let mut refused = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ServiceError::Refused(LedgerError::InsufficientCredits { .. })) => refused += 1,
            Err(other) => panic!("unexpected outcome: {other}"),
        }
    }
    let covered = balance / 9;
    assert_eq!(ok, covered);
    assert_eq!(refused, holds as u64 - covered);
    let state = ledger
        .store
        .load(&workspace("org_race"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.balance().held.get(), covered * 9);
    assert_eq!(state.balance().available.get(), balance - covered * 9);
    assert_eq!(state.open_holds, covered);
    let items = ledger
        .store
        .open_holds(&workspace("org_race"), None, 1_000)
        .await
        .unwrap();
    assert_eq!(items.len() as u64, covered, "one hold item per open hold");
    state.check_invariants().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_holds_through_dynamodb_never_overspend() {
    race(tally_tests::dynamo_store().await, 64, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_holds_through_dynamodb_local_never_overspend() {
    race(tally_tests::dynamo_local_store().await, 64, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_holds_through_the_embedded_store_never_overspend() {
    race(tally_tests::embedded_store(), 64, 300).await;
}
