//! The ledger at scale: the state item stays small with ten thousand open holds (on AWS's
//! DynamoDB Local), a thousand overdue holds never make a transaction too large and read
//! right at once, and every operation costs one read round trip and one transaction.

use chrono::Duration;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tally::catalog::{Estimate, GenerationSpec, Workflow};
use tally::clock::Clock;
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{
    Actor, ActorKind, Entry, Generation, GenerationStatus, Hold, LedgerError, Operation, Reason,
    Refs, WorkspaceState,
};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest, ServiceError};
use tally::store::dynamo::DynamoStore;
use tally::store::{
    Commit, CommitError, EntryQuery, GenerationQuery, IdempotencyRecord, LedgerStore,
    MAX_COMMIT_ITEMS, OpRead, StoreError,
};
use tally_tests::{
    dynamo_local_table, dynamo_table, embedded_store, grant, ledger_over, t0, workspace,
};

/// A real store, counting what the ledger asks of it.
struct Counting {
    inner: Arc<dyn LedgerStore>,
    /// The same store as DynamoDB, to read raw items.
    raw: Option<DynamoStore>,
    reads: AtomicUsize,
    commits: Mutex<Vec<usize>>,
}

impl Counting {
    fn dynamo(inner: DynamoStore) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(inner.clone()),
            raw: Some(inner),
            reads: AtomicUsize::new(0),
            commits: Mutex::new(Vec::new()),
        })
    }

    fn over(inner: Arc<dyn LedgerStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            raw: None,
            reads: AtomicUsize::new(0),
            commits: Mutex::new(Vec::new()),
        })
    }

    /// Read round trips and the item counts of the commits since the last call.
    fn take(&self) -> (usize, Vec<usize>) {
        let reads = self.reads.swap(0, Ordering::SeqCst);
        let commits = std::mem::take(&mut *self.commits.lock().unwrap());
        (reads, commits)
    }

    fn read(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
    }

    /// The stored state item's size in bytes (its JSON body), read raw from the table.
    async fn state_bytes(&self, ws: &WorkspaceId) -> usize {
        let raw = self.raw.as_ref().expect("a DynamoDB store");
        let item = raw
            .client()
            .get_item()
            .table_name(raw.table())
            .key(
                "PK",
                aws_sdk_dynamodb::types::AttributeValue::S(format!("WORKSPACE#{ws}")),
            )
            .key(
                "SK",
                aws_sdk_dynamodb::types::AttributeValue::S("STATE".into()),
            )
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap();
        item.values()
            .map(|v| match v {
                aws_sdk_dynamodb::types::AttributeValue::S(s) => s.len(),
                aws_sdk_dynamodb::types::AttributeValue::N(n) => n.len(),
                _ => 0,
            })
            .sum::<usize>()
            + item.keys().map(String::len).sum::<usize>()
    }
}

#[async_trait::async_trait]
impl LedgerStore for Counting {
    async fn load(&self, w: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError> {
        self.read();
        self.inner.load(w).await
    }
    async fn read_op(
        &self,
        w: &WorkspaceId,
        k: &IdempotencyKey,
        g: Option<GenerationId>,
    ) -> Result<OpRead, StoreError> {
        self.read();
        self.inner.read_op(w, k, g).await
    }
    async fn open_holds(
        &self,
        w: &WorkspaceId,
        until: Option<chrono::DateTime<chrono::Utc>>,
        limit: usize,
    ) -> Result<Vec<Hold>, StoreError> {
        self.read();
        self.inner.open_holds(w, until, limit).await
    }
    async fn commit(&self, c: Commit) -> Result<(), CommitError> {
        self.commits.lock().unwrap().push(c.items());
        self.inner.commit(c).await
    }
    async fn idempotency(
        &self,
        w: &WorkspaceId,
        k: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.read();
        self.inner.idempotency(w, k).await
    }
    async fn generation(
        &self,
        w: &WorkspaceId,
        id: GenerationId,
    ) -> Result<Option<Generation>, StoreError> {
        self.read();
        self.inner.generation(w, id).await
    }
    async fn generation_owner(&self, id: GenerationId) -> Result<Option<WorkspaceId>, StoreError> {
        self.read();
        self.inner.generation_owner(id).await
    }
    async fn generations(
        &self,
        w: &WorkspaceId,
        q: &GenerationQuery,
    ) -> Result<Vec<Generation>, StoreError> {
        self.read();
        self.inner.generations(w, q).await
    }
    async fn entries(&self, w: &WorkspaceId, q: &EntryQuery) -> Result<Vec<Entry>, StoreError> {
        self.read();
        self.inner.entries(w, q).await
    }
    async fn entries_by_seq(
        &self,
        w: &WorkspaceId,
        seqs: &[u64],
    ) -> Result<Vec<Entry>, StoreError> {
        self.read();
        self.inner.entries_by_seq(w, seqs).await
    }
}

fn estimate(ledger: &Ledger) -> Estimate {
    ledger
        .catalog
        .estimate(&GenerationSpec {
            workflow: Workflow::Image,
            model: "imagen-3".into(),
            resolution: None,
            duration_s: None,
            count: None,
        })
        .unwrap()
}

async fn hold(
    ledger: &Ledger,
    ws: &str,
    generation: GenerationId,
    estimate: &Estimate,
    deadline: chrono::DateTime<chrono::Utc>,
) -> Result<tally::ledger::Outcome, ServiceError> {
    ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("gen:{generation}:hold")),
            fingerprint: "hold".into(),
            actor: Actor::new(ActorKind::Member, "m1"),
            refs: Refs::default(),
            op: Operation::Hold {
                generation,
                estimate: estimate.clone(),
                deadline,
            },
        })
        .await
}

async fn settle(ledger: &Ledger, ws: &str, key: String, op: Operation) -> tally::ledger::Outcome {
    ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(key),
            fingerprint: "settle".into(),
            actor: Actor::new(ActorKind::Service, "generation-service"),
            refs: Refs::default(),
            op,
        })
        .await
        .unwrap()
}

/// How many open holds: `TALLY_SCALE_HOLDS` (10,000 by default).
fn open_hold_count() -> usize {
    std::env::var("TALLY_SCALE_HOLDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[tokio::test]
async fn ten_thousand_open_holds_keep_the_state_item_small_and_each_operation_one_round_trip() {
    let store = Counting::dynamo(dynamo_local_table().await);
    let (ledger, _clock) = ledger_over(store.clone());
    let ws = "org_scale";
    let count = open_hold_count();
    let est = estimate(&ledger);
    let per = est.credits.get();
    let granted = per * count as u64 + 1_000;
    grant(&ledger, ws, granted).await;
    store.take();
    let empty = store.state_bytes(&workspace(ws)).await;
    let deadline = t0() + Duration::hours(2);
    let mut ids = Vec::with_capacity(count);
    let mut at_300 = 0;
    for i in 0..count {
        let g = GenerationId::new();
        hold(&ledger, ws, g, &est, deadline).await.unwrap();
        ids.push(g);
        let (reads, commits) = store.take();
        assert_eq!(reads, 1, "a hold is one read round trip (hold {i})");
        // Idempotency record, state, entry, generation, hold item, owner.
        assert_eq!(commits, vec![6], "a hold is one transaction of six items");
        if i + 1 == 300 {
            at_300 = store.state_bytes(&workspace(ws)).await;
        }
    }
    let full = store.state_bytes(&workspace(ws)).await;
    eprintln!("state item bytes: {empty} with no hold, {at_300} with 300, {full} with {count}");
    assert!(
        full < 1_500,
        "the state item is {full} bytes with {count} open holds"
    );
    assert!(
        full.abs_diff(at_300) < 32,
        "{at_300} bytes at 300 holds, {full} at {count}: only counters may change"
    );
    let state = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(state.open_holds, count as u64);
    assert_eq!(state.balance().held.get(), per * count as u64);
    store.take();

    // A completion by the generation service: one read round trip (state, idempotency
    // record and the generation with its hold together) and one transaction.
    let done = ids[count / 2];
    let outcome = settle(
        &ledger,
        ws,
        format!("gen:{done}:complete"),
        Operation::Complete {
            generation: done,
            credits: Some(Credits::new(per - 1)),
            record: None,
        },
    )
    .await;
    let (reads, commits) = store.take();
    assert_eq!(
        (reads, commits),
        (1, vec![5]),
        "state, idempotency record, entry, generation, hold item"
    );
    let g = outcome.generation.unwrap();
    assert_eq!(
        (g.status, g.charged),
        (GenerationStatus::Completed, Credits::new(per - 1))
    );
    // A failure releases another.
    let failed = ids[0];
    settle(
        &ledger,
        ws,
        format!("gen:{failed}:fail"),
        Operation::Fail {
            generation: failed,
            reason: "model crashed".into(),
            record: None,
        },
    )
    .await;
    let (reads, commits) = store.take();
    assert_eq!((reads, commits), (1, vec![5]));
    // A replay costs the one read and writes nothing.
    settle(
        &ledger,
        ws,
        format!("gen:{failed}:fail"),
        Operation::Fail {
            generation: failed,
            reason: "model crashed".into(),
            record: None,
        },
    )
    .await;
    assert_eq!(store.take(), (1, vec![]));
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    let open = count as u64 - 2;
    assert_eq!(state.open_holds, open);
    assert_eq!(state.balance().held.get(), per * open);
    assert_eq!(
        state.balance().available.get(),
        granted - per * open - (per - 1)
    );
    state.check_invariants().unwrap();
    store.take();
    // Reusing a generation id (under another key) is refused by the transaction's own
    // condition.
    let refused = ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::client("generations", "retry-with-a-new-key").unwrap(),
            fingerprint: "hold again".into(),
            actor: Actor::new(ActorKind::Member, "m1"),
            refs: Refs::default(),
            op: Operation::Hold {
                generation: ids[1],
                estimate: est.clone(),
                deadline,
            },
        })
        .await;
    assert!(matches!(
        refused,
        Err(ServiceError::Refused(LedgerError::GenerationExists(_)))
    ));
    let (reads, commits) = store.take();
    assert_eq!(
        (reads, commits.len()),
        (2, 1),
        "the refusal costs the commit and one more read"
    );
}

#[tokio::test]
async fn a_thousand_overdue_holds_settle_in_bounded_transactions_and_read_right_at_once() {
    overdue_holds(Counting::over(embedded_store()), 1_000).await;
}

/// The same on the DynamoDB-compatible server, whose transactions take 100 items (fewer
/// holds: that server slows down as one workspace's items grow).
#[tokio::test]
async fn overdue_holds_settle_in_transactions_dynamodb_accepts() {
    overdue_holds(Counting::dynamo(dynamo_table().await), 120).await;
}

async fn overdue_holds(store: Arc<Counting>, overdue: u64) {
    let (ledger, clock) = ledger_over(store.clone());
    let ws = "org_overdue";
    let est = estimate(&ledger);
    let per = est.credits.get();
    let granted = per * overdue + 500;
    grant(&ledger, ws, granted).await;
    let mut ids = Vec::new();
    for _ in 0..overdue {
        let g = GenerationId::new();
        hold(&ledger, ws, g, &est, t0() + Duration::minutes(30))
            .await
            .unwrap();
        ids.push(g);
    }
    // One more that is not overdue later.
    let late = GenerationId::new();
    hold(&ledger, ws, late, &est, t0() + Duration::hours(5))
        .await
        .unwrap();
    // The generation service stops; the deadlines pass.
    clock.set(t0() + Duration::hours(1));
    store.take();

    // Reads are right at once: every overdue hold released in the view.
    let view = ledger.workspace_now(&workspace(ws)).await.unwrap();
    assert_eq!(view.balance().held.get(), per);
    assert_eq!(view.balance().available.get(), granted - per);
    assert_eq!(view.open_holds, 1);

    // The credit-refresh sweeper settles a batch per transaction.
    for round in 0..2 {
        settle(&ledger, ws, format!("settle:{round}"), Operation::Settle).await;
        let (_, commits) = store.take();
        assert_eq!(commits.len(), 1);
        assert!(commits[0] <= MAX_COMMIT_ITEMS, "{commits:?}");
        let view = ledger.workspace_now(&workspace(ws)).await.unwrap();
        assert_eq!(view.balance().available.get(), granted - per);
    }
    let state = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(state.open_holds, overdue + 1 - 50);
    // The next operation releases the rest first, a batch per transaction, so it sees
    // every credit: a hold that needs nearly all of them is placed, with the exact balance.
    let g = GenerationId::new();
    let mut big = est.clone();
    big.credits = Credits::new(granted - 2 * per);
    let placed = hold(&ledger, ws, g, &big, t0() + Duration::hours(3))
        .await
        .unwrap();
    assert_eq!(placed.balance.available.get(), per);
    let (_, commits) = store.take();
    let left = overdue - 50;
    assert_eq!(
        commits.len() as u64,
        left.div_ceil(25),
        "{left} overdue holds left, 25 per transaction, the last batch with the hold"
    );
    assert!(
        commits.iter().all(|n| *n <= MAX_COMMIT_ITEMS),
        "{commits:?}"
    );
    let state = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert!(!state.needs_settling(clock.now()));
    let state = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(state.open_holds, 2);
    assert_eq!(state.next_due, Some(t0() + Duration::hours(3)));
    assert_eq!(state.balance().available.get(), per);
    let left = ledger
        .store
        .open_holds(&workspace(ws), None, 100)
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|h| h.generation).collect::<Vec<_>>(),
        vec![g, late]
    );
    let mut journal = ledger
        .store
        .entries(
            &workspace(ws),
            &EntryQuery {
                before: None,
                limit: 100_000,
            },
        )
        .await
        .unwrap();
    journal.reverse();
    assert_eq!(
        journal
            .iter()
            .filter(|e| e.reason == Reason::HoldExpired)
            .count() as u64,
        overdue
    );
    let rebuilt = WorkspaceState::from_journal(workspace(ws), &journal).unwrap();
    assert_eq!(rebuilt.as_stored_like(&state), state);
    for id in ids.iter().step_by(97) {
        let g = ledger
            .store
            .generation(&workspace(ws), *id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.status, GenerationStatus::Expired);
    }
    // A completion that arrives after its hold expired still charges (what the balance
    // allows) exactly once.
    let first = ids[0];
    let outcome = settle(
        &ledger,
        ws,
        format!("gen:{first}:complete"),
        Operation::Complete {
            generation: first,
            credits: None,
            record: None,
        },
    )
    .await;
    assert_eq!(outcome.generation.unwrap().charged, Credits::new(per));
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    state.check_invariants().unwrap();
    assert_eq!(state.balance().available.get(), 0);
}
