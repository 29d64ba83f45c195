//! The ledger at scale: the state item stays small with ten thousand open holds (on AWS's
//! DynamoDB Local), a thousand overdue holds never make a transaction too large and read
//! right at once, and every operation costs one read round trip and one transaction.

use chrono::Duration;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tally::catalog::Estimate;
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
    dynamo_local_table, dynamo_table, embedded_store, grant, image_estimate, ledger_over, t0,
    workspace,
};

/// A real store, counting what the ledger asks of it; on request its next commits lose to
/// a concurrent writer, or its next operation read returns a generation as an earlier read
/// saw it (BatchGetItem is no snapshot: the generation may be read before a concurrent
/// commit and the state after it).
struct Counting {
    inner: Arc<dyn LedgerStore>,
    /// The same store as DynamoDB, to read raw items.
    raw: Option<DynamoStore>,
    reads: AtomicUsize,
    commits: Mutex<Vec<usize>>,
    losses: AtomicUsize,
    stale: Mutex<Option<tally::store::StoredGeneration>>,
    /// A generation every read returns from now on (a broken item, not a stale read).
    broken: Mutex<Option<tally::store::StoredGeneration>>,
}

impl Counting {
    fn dynamo(inner: DynamoStore) -> Arc<Self> {
        Self::with(Arc::new(inner.clone()), Some(inner))
    }

    fn over(inner: Arc<dyn LedgerStore>) -> Arc<Self> {
        Self::with(inner, None)
    }

    fn with(inner: Arc<dyn LedgerStore>, raw: Option<DynamoStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            raw,
            reads: AtomicUsize::new(0),
            commits: Mutex::new(Vec::new()),
            losses: AtomicUsize::new(0),
            stale: Mutex::new(None),
            broken: Mutex::new(None),
        })
    }

    /// The next `n` commits lose to a concurrent writer.
    fn lose(&self, n: usize) {
        self.losses.store(n, Ordering::SeqCst);
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
        let mut read = self.inner.read_op(w, k, g).await?;
        if let Some(stale) = self.stale.lock().unwrap().take() {
            read.generation = Some(stale);
        } else if let Some(broken) = self.broken.lock().unwrap().clone() {
            read.generation = Some(broken);
        }
        Ok(read)
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
        if self
            .losses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(CommitError::Conflict);
        }
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

async fn hold(
    ledger: &Ledger,
    ws: &str,
    generation: GenerationId,
    estimate: &Estimate,
    deadline: chrono::DateTime<chrono::Utc>,
) -> Result<tally::ledger::Outcome, ServiceError> {
    ledger
        .execute(tally_tests::hold_request(
            ws, generation, estimate, deadline,
        ))
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
    let est = image_estimate(&ledger);
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
    let est = image_estimate(&ledger);
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

/// Every metric line the ledger wrote in this process (the sink is process-wide).
fn metric_lines() -> &'static Mutex<Vec<serde_json::Value>> {
    static LINES: std::sync::OnceLock<Mutex<Vec<serde_json::Value>>> = std::sync::OnceLock::new();
    LINES.get_or_init(|| {
        tally::metrics::set_sink("tests", |line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object a line");
            metric_lines().lock().unwrap().push(v);
        });
        Mutex::new(Vec::new())
    })
}

fn records_of(ws: &str) -> Vec<serde_json::Value> {
    metric_lines()
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["workspace"] == ws)
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_ledger_operation_reports_its_metrics_in_embedded_metric_format() {
    metric_lines();
    let store = Counting::over(embedded_store());
    let (mut ledger, _clock) = ledger_over(store.clone());
    ledger.retry.base_ms = 0;
    ledger.retry.cap_ms = 1;
    let ws = "org_metrics";
    let est = image_estimate(&ledger);
    let per = est.credits.get();
    grant(&ledger, ws, 3 * per).await;
    let g = GenerationId::new();
    store.lose(2);
    hold(&ledger, ws, g, &est, t0() + Duration::hours(1))
        .await
        .unwrap();
    hold(&ledger, ws, g, &est, t0() + Duration::hours(1))
        .await
        .unwrap();
    let mut big = est.clone();
    big.credits = Credits::new(10 * per);
    let refused = hold(
        &ledger,
        ws,
        GenerationId::new(),
        &big,
        t0() + Duration::hours(1),
    )
    .await;
    assert!(matches!(refused, Err(ServiceError::Refused(_))));
    settle(
        &ledger,
        ws,
        format!("gen:{g}:complete"),
        Operation::Complete {
            generation: g,
            credits: Some(Credits::new(per - 1)),
            record: None,
        },
    )
    .await;
    ledger.retry.max_attempts = 3;
    store.lose(5);
    let busy = hold(
        &ledger,
        ws,
        GenerationId::new(),
        &est,
        t0() + Duration::hours(1),
    )
    .await;
    assert!(matches!(busy, Err(ServiceError::Contention)));
    // A hold read with credits of a lot the state does not have: the ledger refuses to
    // write, and says so.
    ledger.retry.max_attempts = 80;
    let broken = GenerationId::new();
    hold(&ledger, ws, broken, &est, t0() + Duration::hours(1))
        .await
        .unwrap();
    let mut read = store
        .inner
        .read_op(
            &workspace(ws),
            &IdempotencyKey::derived("x".into()),
            Some(broken),
        )
        .await
        .unwrap()
        .generation
        .unwrap();
    read.hold.as_mut().unwrap().allocations[0].lot = 999;
    *store.broken.lock().unwrap() = Some(read);
    let corrupt = ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("gen:{broken}:complete")),
            fingerprint: "complete".into(),
            actor: Actor::new(ActorKind::Service, "generation-service"),
            refs: Refs::default(),
            op: Operation::Complete {
                generation: broken,
                credits: None,
                record: None,
            },
        })
        .await;
    assert!(
        matches!(
            corrupt,
            Err(ServiceError::Refused(tally::ledger::LedgerError::Corrupt(
                _
            )))
        ),
        "{corrupt:?}"
    );

    let records = records_of(ws);
    let summary: Vec<(String, String, f64)> = records
        .iter()
        .map(|r| {
            (
                r["Operation"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["Conflicts"].as_f64().unwrap(),
            )
        })
        .collect();
    let expect =
        |op: &str, outcome: &str, conflicts: f64| (op.to_owned(), outcome.to_owned(), conflicts);
    assert_eq!(
        summary,
        vec![
            expect("grant", "applied", 0.0),
            expect("hold", "applied", 2.0),
            expect("hold", "replayed", 0.0),
            expect("hold", "refused", 0.0),
            expect("complete", "applied", 0.0),
            expect("hold", "busy", 3.0),
            // The two losses the busy hold left.
            expect("hold", "applied", 2.0),
            // Read again three times, as a stale read would be, then reported.
            expect("complete", "corrupt", 3.0),
        ]
    );
    assert_eq!(records[7]["Corrupt"], 1.0);
    assert_eq!(records[7]["Refusals"], 0.0);
    assert_eq!(records[3]["Corrupt"], 0.0);
    assert_eq!(records[0]["CreditsGranted"], (3 * per) as f64);
    assert_eq!(records[3]["Refusals"], 1.0);
    assert_eq!(records[2]["Replays"], 1.0);
    assert_eq!(records[4]["CreditsSpent"], (per - 1) as f64);
    assert_eq!(records[5]["Busy"], 1.0);
    for r in &records {
        assert_eq!(r["LedgerOperations"], 1.0);
        let d = &r["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(d["Namespace"], "Tally");
        for m in d["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(r[name].is_number(), "{name} has its value");
        }
    }
}

#[tokio::test]
async fn queue_batches_report_their_failures() {
    use tally::queue::{ConsumeError, Consumer, Delivery};
    metric_lines();
    struct FailsOdd;
    #[async_trait::async_trait]
    impl Consumer for FailsOdd {
        async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
            if d.body.parse::<u32>().unwrap() % 2 == 1 {
                Err(ConsumeError::retry("odd"))
            } else {
                Ok(())
            }
        }
    }
    // Messages 0-6; 5 and 6 on their fifth receive, the last before the dead-letter queue.
    let records: Vec<_> = (0..7)
        .map(|i| {
            let mut r = aws_lambda_events::event::sqs::SqsMessage::default();
            r.message_id = Some(format!("m{i}"));
            r.body = Some(i.to_string());
            r.attributes.insert(
                "ApproximateReceiveCount".into(),
                if i >= 5 { "5" } else { "1" }.into(),
            );
            r
        })
        .collect();
    let mut event = aws_lambda_events::event::sqs::SqsEvent::default();
    event.records = records;
    let response = tally::queue::lambda::process_batch(&FailsOdd, event, 5).await;
    assert_eq!(response.batch_item_failures.len(), 3);
    let lines = metric_lines().lock().unwrap().clone();
    // Each message that failed on its last receive counts once: every one the queue moves
    // to its dead-letter queue is told, not only the first one waiting there.
    assert!(
        lines.iter().any(|r| r["Operation"] == "queue_batch"
            && r["QueueMessages"] == 7.0
            && r["BatchItemFailures"] == 3.0
            && r["DeadLettered"] == 1.0),
        "no queue batch record"
    );
}

#[tokio::test]
async fn an_applied_stripe_event_reports_its_lag_from_stripe_to_the_ledger() {
    metric_lines();
    let app = tally_tests::TestApp::new();
    let s = app
        .post(
            "/v1/checkout/sessions",
            &tally_tests::owner("org_lag"),
            serde_json::json!({"kind": "pack", "pack": "pack_500", "quantity": 1}),
        )
        .await;
    assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
    app.pay(s.body["url"].as_str().unwrap()).await;
    let id = app
        .local
        .simulator
        .as_ref()
        .unwrap()
        .events()
        .into_iter()
        .rfind(|e| e.kind == "checkout.session.completed")
        .unwrap()
        .payload["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lines = metric_lines().lock().unwrap().clone();
    let record = lines
        .iter()
        .find(|r| r["Operation"] == "stripe_event" && r["event"] == id.as_str())
        .expect("a record for the applied event");
    assert_eq!(record["type"], "checkout.session.completed");
    assert!(record["WebhookToLedgerLag"].as_f64().unwrap() >= 0.0);
}

/// Generation `g` of `ws` as an operation's read sees it now, while its hold is open.
async fn held_as_read(
    store: &Counting,
    ws: &str,
    g: GenerationId,
) -> tally::store::StoredGeneration {
    let read = store
        .inner
        .read_op(
            &workspace(ws),
            &IdempotencyKey::derived("x".into()),
            Some(g),
        )
        .await
        .unwrap()
        .generation
        .unwrap();
    assert!(read.hold.is_some());
    read
}

#[tokio::test]
async fn a_generation_read_before_its_hold_closed_is_read_again_not_closed_twice() {
    let store = Counting::over(embedded_store());
    let (ledger, _clock) = ledger_over(store.clone());
    let ws = "org_stale";
    let est = image_estimate(&ledger);
    grant(&ledger, ws, 10 * est.credits.get()).await;
    let g = GenerationId::new();
    hold(&ledger, ws, g, &est, t0() + Duration::hours(1))
        .await
        .unwrap();
    let before = held_as_read(&store, ws, g).await;
    settle(
        &ledger,
        ws,
        format!("gen:{g}:fail"),
        Operation::Fail {
            generation: g,
            reason: "crashed".into(),
            record: None,
        },
    )
    .await;
    // The completion reads the generation as it was before the failure closed its hold.
    *store.stale.lock().unwrap() = Some(before);
    let complete = ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("gen:{g}:complete")),
            fingerprint: "complete".into(),
            actor: Actor::new(ActorKind::Service, "generation-service"),
            refs: Refs::default(),
            op: Operation::Complete {
                generation: g,
                credits: None,
                record: None,
            },
        })
        .await;
    assert!(
        matches!(
            complete,
            Err(ServiceError::Refused(LedgerError::AlreadySettled { .. }))
        ),
        "{complete:?}"
    );
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    assert_eq!(state.balance().available.get(), 10 * est.credits.get());
    state.check_invariants().unwrap();
}

/// Notifications the alerts send, kept.
#[derive(Default)]
struct Outbox(Mutex<Vec<serde_json::Value>>);

#[async_trait::async_trait]
impl tally::queue::Queue for Outbox {
    async fn send(&self, m: tally::queue::Message) -> Result<(), tally::queue::QueueError> {
        self.0
            .lock()
            .unwrap()
            .push(serde_json::from_str(&m.body).unwrap());
        Ok(())
    }
}

async fn set_threshold(docs: &dyn tally::store::DocStore, ws: &str, below: u64) {
    tally::store::docs::update(
        docs,
        &tally::billing::records::workspace_pk(&workspace(ws)),
        tally::alerts::ALERTS_SK,
        |_: Option<tally::alerts::AlertSettings>| {
            Some(tally::alerts::AlertSettings {
                below_credits: vec![Credits::new(below)],
                ..Default::default()
            })
        },
    )
    .await
    .unwrap();
}

/// Alert settings are read once per `settings_ttl`, not after every operation: a change
/// made elsewhere counts once the time has passed (at once when it is zero).
#[tokio::test]
async fn alert_settings_are_reused_for_their_time_to_live() {
    for ttl in [
        std::time::Duration::from_secs(3600),
        std::time::Duration::ZERO,
    ] {
        let store = embedded_store();
        let docs = tally_tests::embedded_docs();
        let outbox = Arc::new(Outbox::default());
        let (mut ledger, _clock) = ledger_over(store);
        ledger.observer = Some(Arc::new(tally::alerts::CreditAlerts {
            docs: docs.clone(),
            notifications: outbox.clone(),
            topups: None,
            asks_for_top_ups: true,
            catalog: ledger.catalog.clone(),
            settings_ttl: ttl,
            cache: Default::default(),
        }));
        let ws = "org_alerts";
        let est = image_estimate(&ledger);
        let per = est.credits.get();
        grant(&ledger, ws, 10 * per).await;
        set_threshold(docs.as_ref(), ws, 9 * per + 1).await;
        hold(
            &ledger,
            ws,
            GenerationId::new(),
            &est,
            t0() + Duration::hours(1),
        )
        .await
        .unwrap();
        assert_eq!(
            outbox.0.lock().unwrap().len(),
            1,
            "9 x per crossed the first threshold"
        );
        // Changed elsewhere (the purchases function): the next crossing is of the new one.
        set_threshold(docs.as_ref(), ws, 8 * per + 1).await;
        hold(
            &ledger,
            ws,
            GenerationId::new(),
            &est,
            t0() + Duration::hours(1),
        )
        .await
        .unwrap();
        let sent = outbox.0.lock().unwrap().len();
        if ttl.is_zero() {
            assert_eq!(sent, 2, "read again: the new threshold was crossed");
        } else {
            assert_eq!(
                sent, 1,
                "the settings read first are reused within their time"
            );
        }
    }
}

/// A workspace granted `granted` holds' worth of credits with sixty holds placed, all due
/// half an hour after `t0`.
async fn sixty_holds(
    ws: &str,
    granted: u64,
) -> (
    Arc<Counting>,
    Ledger,
    Arc<tally::clock::ManualClock>,
    Vec<GenerationId>,
) {
    let store = Counting::over(embedded_store());
    let (ledger, clock) = ledger_over(store.clone());
    let est = image_estimate(&ledger);
    grant(&ledger, ws, granted * est.credits.get()).await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        let g = GenerationId::new();
        hold(&ledger, ws, g, &est, t0() + Duration::minutes(30))
            .await
            .unwrap();
        ids.push(g);
    }
    (store, ledger, clock, ids)
}

/// A hold that needs the credits of more overdue holds than one request releases (40
/// batches of 25) is answered `busy`, not refused: its retry releases the rest and places it.
#[tokio::test]
async fn a_hold_behind_more_overdue_holds_than_one_request_releases_is_busy_then_placed() {
    let ws = "org_backlog_deep";
    let store = Counting::over(embedded_store());
    let (ledger, clock) = ledger_over(store.clone());
    let est = image_estimate(&ledger);
    let n = 1_100u64;
    grant(&ledger, ws, n * est.credits.get()).await;
    for _ in 0..n {
        hold(
            &ledger,
            ws,
            GenerationId::new(),
            &est,
            t0() + Duration::minutes(30),
        )
        .await
        .unwrap();
    }
    clock.advance(Duration::hours(1));
    let mut everything = est.clone();
    everything.credits = Credits::new(n * est.credits.get());
    let deadline = t0() + Duration::hours(3);
    let first = hold(&ledger, ws, GenerationId::new(), &everything, deadline).await;
    assert!(
        matches!(first, Err(ServiceError::Contention)),
        "busy while holds are still overdue: {first:?}"
    );
    let placed = hold(&ledger, ws, GenerationId::new(), &everything, deadline)
        .await
        .expect("the retry releases the rest and places it");
    assert_eq!(placed.balance.available, Credits::ZERO);
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    state.check_invariants().unwrap();
    assert_eq!(state.open_holds, 1);
}

/// A hold refused for credits that overdue holds still keep is answered `busy`, not
/// refused, when the time to release them has run out: its retry goes on releasing them.
#[tokio::test]
async fn a_hold_behind_a_backlog_out_of_time_is_busy_not_refused() {
    let ws = "org_backlog_busy";
    let (_store, mut ledger, clock, _ids) = sixty_holds(ws, 60).await;
    clock.advance(Duration::hours(1));
    // More than one transaction's release (25 holds) frees.
    let mut est = image_estimate(&ledger);
    est.credits = Credits::new(30 * est.credits.get());
    let before = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    ledger.retry.budget = Some(std::time::Duration::ZERO);
    let late = hold(
        &ledger,
        ws,
        GenerationId::new(),
        &est,
        clock.now() + Duration::hours(1),
    )
    .await;
    assert!(matches!(late, Err(ServiceError::Contention)), "{late:?}");
    assert_eq!(
        ledger.store.load(&workspace(ws)).await.unwrap().unwrap(),
        before
    );
    // With time, the backlog is released and the hold placed.
    ledger.retry.budget = None;
    hold(
        &ledger,
        ws,
        GenerationId::new(),
        &est,
        clock.now() + Duration::hours(1),
    )
    .await
    .unwrap();
}

/// A completion that arrives late takes free credits without being refused: with more
/// overdue holds than one transaction releases, it releases them all first (a batch per
/// transaction) and charges in full, never a shortfall the balance could have paid.
#[tokio::test]
async fn a_late_completion_behind_a_backlog_of_overdue_holds_charges_in_full() {
    let ws = "org_late";
    let (store, ledger, clock, ids) = sixty_holds(ws, 60).await;
    let est = image_estimate(&ledger);
    let per = est.credits.get();
    clock.set(t0() + Duration::hours(1));
    store.take();
    // It reports more than its estimate: 40 holds' worth, which only the released backlog
    // can pay.
    let outcome = settle(
        &ledger,
        ws,
        format!("gen:{}:complete", ids[0]),
        Operation::Complete {
            generation: ids[0],
            credits: Some(Credits::new(40 * per)),
            record: None,
        },
    )
    .await;
    let g = outcome.generation.unwrap();
    assert_eq!(g.charged, Credits::new(40 * per));
    assert_eq!(g.shortfall, Credits::ZERO);
    let (_, commits) = store.take();
    assert_eq!(
        commits.len(),
        3,
        "two batches of 25, then the rest with the completion"
    );
    assert!(
        commits.iter().all(|n| *n <= MAX_COMMIT_ITEMS),
        "{commits:?}"
    );
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    state.check_invariants().unwrap();
    assert_eq!(state.open_holds, 0);
    assert_eq!(state.balance().available.get(), 20 * per);
}

/// Holds kept inside the state item by an earlier release are read under either name and
/// written under a new one, so the release before hold items cannot read a state item it
/// would write back without its count of hold items.
#[tokio::test]
async fn inline_holds_of_an_earlier_release_read_and_written_under_a_new_name() {
    let (ledger, _clock) = ledger_over(embedded_store());
    let ws = "org_legacy";
    let est = image_estimate(&ledger);
    grant(&ledger, ws, 10 * est.credits.get()).await;
    let g = GenerationId::new();
    hold(&ledger, ws, g, &est, t0() + Duration::hours(1))
        .await
        .unwrap();
    let state = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    let now = serde_json::to_value(&state).unwrap();
    assert!(
        now.get("holds").is_none() && now.get("inline_holds").is_none(),
        "{now}"
    );
    assert_eq!(now["open_holds"], 1);

    // An item as the release with inline holds wrote it.
    let holds = ledger
        .store
        .open_holds(&workspace(ws), None, 10)
        .await
        .unwrap();
    let mut legacy = now.clone();
    legacy["holds"] = serde_json::to_value(&holds).unwrap();
    legacy["open_holds"] = 0.into();
    legacy.as_object_mut().unwrap().remove("next_due");
    let read: WorkspaceState = serde_json::from_value(legacy).unwrap();
    let read = read.normalized();
    assert_eq!(read.holds, holds);
    assert_eq!(read.open_holds, 1);
    assert_eq!(read.next_due, Some(t0() + Duration::hours(1)));
    let written = serde_json::to_value(&read).unwrap();
    assert!(written.get("holds").is_none(), "{written}");
    assert_eq!(
        written["inline_holds"],
        serde_json::to_value(&holds).unwrap()
    );
}

/// A completion its own hold pays for, before the hold's deadline, needs nothing else free:
/// it runs at once, in one transaction, however long the backlog of other overdue holds.
/// One whose hold is overdue is late: the backlog (its hold with it) is released first,
/// then it charges from what is free, in full.
#[tokio::test]
async fn a_completion_within_its_hold_runs_at_once_and_a_late_one_after_the_backlog() {
    let ws = "org_own";
    let (store, ledger, clock, ids) = sixty_holds(ws, 61).await;
    let est = image_estimate(&ledger);
    let per = est.credits.get();
    let mine = GenerationId::new();
    hold(&ledger, ws, mine, &est, t0() + Duration::hours(5))
        .await
        .unwrap();
    clock.set(t0() + Duration::hours(1));
    store.take();
    for (id, credits, transactions) in [
        (mine, Some(Credits::new(per - 1)), 1),
        // 35 overdue left: one batch of 25, then the last 10 with the completion.
        (ids[59], None, 2),
    ] {
        let outcome = settle(
            &ledger,
            ws,
            format!("gen:{id}:complete"),
            Operation::Complete {
                generation: id,
                credits,
                record: None,
            },
        )
        .await;
        let g = outcome.generation.unwrap();
        assert_eq!(g.charged, credits.unwrap_or(est.credits));
        assert_eq!(g.shortfall, Credits::ZERO);
        let (_, commits) = store.take();
        assert_eq!(commits.len(), transactions, "{commits:?}");
        assert!(
            commits.iter().all(|n| *n <= MAX_COMMIT_ITEMS),
            "{commits:?}"
        );
    }
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    state.check_invariants().unwrap();
    assert_eq!(state.open_holds, 0);
    assert_eq!(state.balance().available.get(), 59 * per + 1);
}

/// A busy workspace is answered `busy` once the retry budget has passed, however many
/// attempts are left (the functions' budget is well inside their timeout), and nothing is
/// written.
#[tokio::test]
async fn retries_end_with_busy_when_the_time_budget_is_spent() {
    let store = Counting::over(embedded_store());
    let (mut ledger, _clock) = ledger_over(store.clone());
    let ws = "org_budget";
    let est = image_estimate(&ledger);
    grant(&ledger, ws, 10 * est.credits.get()).await;
    let before = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    // Every commit loses, and the attempts never run out: only the budget ends it.
    ledger.retry.max_attempts = u32::MAX;
    ledger.retry.base_ms = 1;
    ledger.retry.cap_ms = 2;
    ledger.retry.budget = Some(std::time::Duration::from_millis(50));
    store.lose(usize::MAX);
    let busy = hold(
        &ledger,
        ws,
        GenerationId::new(),
        &est,
        t0() + Duration::hours(1),
    )
    .await;
    assert!(matches!(busy, Err(ServiceError::Contention)), "{busy:?}");
    store.lose(0);
    let after = ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(tally::service::RetryPolicy::default().budget, None);
    assert!(tally::service::LAMBDA_RETRY_BUDGET < std::time::Duration::from_secs(10));
}

/// The waits between attempts double from 100 ms up to 3 s, and never run past what is
/// left of the budget: the last attempt starts as the budget ends, not a full wait later
/// (which could carry an operation in Lambda past its 10 s timeout).
#[test]
fn retry_waits_grow_to_their_cap_and_never_past_the_budget() {
    use std::time::Duration as Std;
    let policy = tally::service::RetryPolicy::default();
    let ms = |d: Std| d.as_millis() as u64;
    let mut longest = [0u64; 8];
    for _ in 0..2_000 {
        for (attempt, most) in longest.iter_mut().enumerate() {
            let w = ms(policy.wait(attempt as u32 + 1, None));
            assert!(
                w <= (100u64 << attempt).min(3_000),
                "attempt {attempt}: {w} ms"
            );
            *most = (*most).max(w);
            let left = Std::from_millis(40);
            assert!(policy.wait(attempt as u32 + 1, Some(left)) <= left);
            assert_eq!(policy.wait(attempt as u32 + 1, Some(Std::ZERO)), Std::ZERO);
        }
    }
    // Full jitter reaches near each ceiling: the first wait up to 100 ms, the sixth 3 s.
    assert!(longest[0] >= 90, "{longest:?}");
    assert!(longest[5] >= 2_700, "{longest:?}");
}

/// A generation item as the release before the status index wrote it: without its key.
async fn written_before_the_index(store: &DynamoStore, ws: &str, g: &Generation) {
    use aws_sdk_dynamodb::types::AttributeValue::S;
    store
        .client()
        .put_item()
        .table_name(store.table())
        .item("PK", S(format!("WORKSPACE#{ws}")))
        .item("SK", S(format!("GEN#{}", g.id)))
        .item("status", S(g.status.as_str().into()))
        .item("model", S(g.estimate.model.clone()))
        .item("body", S(serde_json::to_string(g).unwrap()))
        .send()
        .await
        .unwrap();
}

/// Generation items written before the status index existed lack its key. The filters still
/// list them (from the workspace's items) while each filtered read files the next page of
/// them; once none is left the workspace reads the index, and finds them all there.
#[tokio::test]
async fn generations_written_before_the_status_index_are_listed_and_filed_into_it() {
    use aws_sdk_dynamodb::types::AttributeValue::S;
    let store = Arc::new(dynamo_table().await);
    let (ledger, clock) = ledger_over(store.clone());
    let ws = "org_backfill";
    grant(&ledger, ws, 10_000).await;
    let est = image_estimate(&ledger);
    let (held, done, late) = (
        GenerationId::new(),
        GenerationId::new(),
        GenerationId::new(),
    );
    hold(&ledger, ws, held, &est, t0() + Duration::hours(5))
        .await
        .unwrap();
    hold(&ledger, ws, done, &est, t0() + Duration::hours(5))
        .await
        .unwrap();
    hold(&ledger, ws, late, &est, t0() + Duration::minutes(10))
        .await
        .unwrap();
    let complete = Operation::Complete {
        generation: done,
        credits: None,
        record: None,
    };
    settle(&ledger, ws, "complete".into(), complete).await;
    clock.advance(Duration::hours(1));
    settle(&ledger, ws, "settle".into(), Operation::Settle).await;

    // As the release before the index wrote them: the same items without `gen_status`,
    // and 450 more expired ones.
    let (client, table) = (store.client(), store.table());
    let pk = format!("WORKSPACE#{ws}");
    tally_tests::as_before_the_status_index(&store, ws, &[held, done, late]).await;
    let expired = store
        .generation(&workspace(ws), late)
        .await
        .unwrap()
        .unwrap();
    let mut old_expired = vec![late];
    for _ in 0..450 {
        let g = Generation {
            id: GenerationId::new(),
            ..expired.clone()
        };
        written_before_the_index(&store, ws, &g).await;
        old_expired.push(g.id);
    }
    let unfiled = || async {
        client
            .query()
            .table_name(table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :gen)")
            .filter_expression("attribute_not_exists(gen_status)")
            .expression_attribute_values(":pk", S(pk.clone()))
            .expression_attribute_values(":gen", S("GEN#".into()))
            .send()
            .await
            .unwrap()
            .count()
    };
    assert_eq!(unfiled().await, 453);

    let marker = || tally_tests::status_marker(&store, ws);
    let listed = |store: Arc<DynamoStore>, status| async move {
        let q = GenerationQuery {
            status: Some(status),
            limit: 1_000,
            ..GenerationQuery::default()
        };
        let mut ids: Vec<GenerationId> = store
            .generations(&workspace(ws), &q)
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        ids.sort();
        ids
    };
    old_expired.sort();

    // While instances of the earlier release may still write (ten minutes after the first
    // pass), complete passes are followed by more; every answer is complete meanwhile.
    let settling = Arc::new((*store).clone());
    for _ in 0..6 {
        assert_eq!(
            listed(settling.clone(), GenerationStatus::Expired).await,
            old_expired
        );
        assert_eq!(
            listed(settling.clone(), GenerationStatus::Held).await,
            vec![held]
        );
    }
    assert_eq!(unfiled().await, 0);
    let m = marker().await.unwrap();
    assert!(m.contains_key("first") && !m.contains_key("done"), "{m:?}");

    // A generation the earlier release writes meanwhile, without the key, is filed by the
    // next pass.
    let late_write = Generation {
        id: GenerationId::new(),
        ..expired.clone()
    };
    written_before_the_index(&store, ws, &late_write).await;
    old_expired.push(late_write.id);
    old_expired.sort();

    // Once the settling time has passed, the next complete pass is final: that read still
    // answers from the items, the following ones from the index.
    let settled = Arc::new((*store).clone().with_status_settling(Duration::zero()));
    let mut reads = 0;
    while !marker().await.unwrap().contains_key("done") {
        assert_eq!(
            listed(settled.clone(), GenerationStatus::Expired).await,
            old_expired
        );
        reads += 1;
        assert!(reads < 10, "the filing never ends");
    }
    assert_eq!(unfiled().await, 0);
    assert_eq!(
        listed(settled.clone(), GenerationStatus::Completed).await,
        vec![done]
    );

    // From now on the index answers: every generation is there under its status, and one
    // written since is found there too.
    assert_eq!(
        listed(settled.clone(), GenerationStatus::Expired).await,
        old_expired
    );
    assert_eq!(
        listed(settled.clone(), GenerationStatus::Held).await,
        vec![held]
    );
    let failed = Operation::Fail {
        generation: held,
        reason: "worker crashed".into(),
        record: None,
    };
    settle(&ledger, ws, "fail".into(), failed).await;
    assert!(
        listed(settled.clone(), GenerationStatus::Held)
            .await
            .is_empty()
    );
    assert_eq!(
        listed(settled.clone(), GenerationStatus::Failed).await,
        vec![held]
    );
    assert_eq!(
        listed(settled.clone(), GenerationStatus::Completed).await,
        vec![done]
    );
}

/// Retiring a custom model whose training was completing at the same moment: the read of
/// the state saw the completion, the read of the generation (BatchGetItem is no snapshot)
/// the training still held. The retire reads again rather than answer that the model is
/// still training; a model genuinely in training is still refused.
#[tokio::test]
async fn a_model_retired_as_its_training_completes_is_read_again_not_refused() {
    let store = Counting::over(embedded_store());
    let (ledger, clock) = ledger_over(store.clone());
    let ws = "org_retire";
    grant(&ledger, ws, 5000).await;
    let now = clock.now();
    settle(
        &ledger,
        ws,
        "plan".into(),
        Operation::SetPlan {
            plan: Some(tally::ledger::PlanState {
                plan: "plus".into(),
                interval: tally::ledger::Interval::Monthly,
                status: tally::ledger::PlanStatus::Active,
                period_start: now,
                period_end: now + Duration::days(30),
                cancel_at_period_end: false,
                paid_through: None,
            }),
        },
    )
    .await;
    let est = ledger
        .catalog
        .estimate(&tally::catalog::GenerationSpec {
            workflow: tally::catalog::Workflow::Training,
            model: "custom-model".into(),
            resolution: None,
            duration_s: None,
            count: None,
        })
        .unwrap();
    let retire = |g: GenerationId| {
        ledger.execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("gen:{g}:retire")),
            fingerprint: "retire".into(),
            actor: Actor::new(ActorKind::Member, "u1"),
            refs: Refs::default(),
            op: Operation::RetireModel { generation: g },
        })
    };
    let g = GenerationId::new();
    hold(&ledger, ws, g, &est, now + Duration::hours(1))
        .await
        .unwrap();
    // Still training: refused, after reading again.
    let early = retire(g).await;
    assert!(
        matches!(
            early,
            Err(ServiceError::Refused(LedgerError::ModelInTraining(x))) if x == g
        ),
        "{early:?}"
    );
    let before = held_as_read(&store, ws, g).await;
    settle(
        &ledger,
        ws,
        format!("gen:{g}:complete"),
        Operation::Complete {
            generation: g,
            credits: None,
            record: None,
        },
    )
    .await;
    *store.stale.lock().unwrap() = Some(before);
    retire(g).await.unwrap();
    let state = ledger.workspace_now(&workspace(ws)).await.unwrap();
    assert!(state.custom_models.is_empty(), "{:?}", state.custom_models);
    state.check_invariants().unwrap();
}
