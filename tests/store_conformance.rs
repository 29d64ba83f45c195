//! One conformance suite, run against every `LedgerStore` adapter: the embedded redb store
//! and the DynamoDB store on a DynamoDB-compatible server on loopback.

use chrono::Duration;
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::ids::{GenerationId, IdempotencyKey};
use tally::ledger::{
    Actor, Applied, Command, GenerationStatus, LotSource, Operation, Refs, WorkspaceState, execute,
};
use tally::money::Credits;
use tally::store::{
    Commit, CommitError, DocStore, EntryQuery, GenerationQuery, IdempotencyRecord, LedgerStore,
};
use tally_tests::{t0, workspace};

/// Runs an operation on `state` with the engine and turns it into a commit.
fn prepare(state: &WorkspaceState, key: &str, op: Operation, minutes: i64) -> (Commit, Applied) {
    let cmd = Command {
        key: IdempotencyKey::derived(key.into()),
        at: t0() + Duration::minutes(minutes),
        actor: Actor::system(),
        refs: Refs::default(),
        op: op.clone(),
    };
    let applied = execute(state, &cmd, &Catalog::builtin()).expect("engine accepts");
    let mut next = applied.state.clone();
    next.version = state.version + 1;
    let new_generations = match op {
        Operation::Hold { generation, .. } => vec![generation],
        _ => vec![],
    };
    let commit = Commit {
        state: next,
        entries: applied.entries.clone(),
        idempotency: IdempotencyRecord {
            key: cmd.key.clone(),
            fingerprint: key.into(),
            outcome: applied.outcome.clone(),
            created_at: cmd.at,
            expires_at: Some(cmd.at + Duration::hours(72)),
        },
        generations: applied.generations.clone(),
        placed: applied.placed.clone(),
        closed: applied.closed.clone(),
        new_generations,
    };
    (commit, applied)
}

fn grant(credits: u64) -> Operation {
    Operation::Grant {
        month: None,
        source: LotSource::Pack,
        credits: Credits::new(credits),
        expires_at: None,
        note: None,
    }
}

fn hold(g: GenerationId, model: &str, credits: u64) -> Operation {
    let catalog = Catalog::builtin();
    let mut estimate = catalog
        .estimate(&tally::catalog::GenerationSpec {
            workflow: tally::catalog::Workflow::Image,
            model: model.into(),
            resolution: None,
            duration_s: None,
            count: None,
        })
        .unwrap();
    estimate.credits = Credits::new(credits);
    Operation::Hold {
        generation: g,
        estimate,
        deadline: t0() + Duration::hours(10),
    }
}

/// Commits an operation and returns the new stored state.
async fn apply(
    store: &dyn LedgerStore,
    state: &WorkspaceState,
    key: &str,
    op: Operation,
) -> WorkspaceState {
    let (commit, _) = prepare(state, key, op, 0);
    let next = commit.state.clone();
    store.commit(commit).await.expect("commit");
    next
}

pub async fn an_unknown_workspace_has_no_state_entries_or_records(store: Arc<dyn LedgerStore>) {
    let a = workspace("org_nobody");
    assert!(store.load(&a).await.unwrap().is_none());
    assert!(
        store
            .entries(
                &a,
                &EntryQuery {
                    before: None,
                    limit: 10
                }
            )
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .idempotency(&a, &IdempotencyKey::derived("x".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .generation(&a, GenerationId::new())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .generation_owner(GenerationId::new())
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn a_commit_stores_state_entries_and_the_idempotency_record_together(
    store: Arc<dyn LedgerStore>,
) {
    let a = workspace("org_a");
    let s0 = WorkspaceState::new(a.clone());
    let (commit, applied) = prepare(&s0, "k1", grant(100), 0);
    store.commit(commit.clone()).await.unwrap();
    let loaded = store.load(&a).await.unwrap().unwrap();
    assert_eq!(loaded, commit.state);
    assert_eq!(loaded.version, 1);
    let rec = store
        .idempotency(&a, &IdempotencyKey::derived("k1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.outcome, applied.outcome);
    assert_eq!(rec.expires_at, commit.idempotency.expires_at);
    let entries = store
        .entries(
            &a,
            &EntryQuery {
                before: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(entries, applied.entries);
}

pub async fn a_commit_on_a_stale_version_is_a_conflict_and_writes_nothing(
    store: Arc<dyn LedgerStore>,
) {
    let a = workspace("org_b");
    let s0 = WorkspaceState::new(a.clone());
    let s1 = apply(store.as_ref(), &s0, "k1", grant(100)).await;
    // A second writer that also read version 0.
    let (stale, _) = prepare(&s0, "k2", grant(5), 1);
    assert!(matches!(
        store.commit(stale).await,
        Err(CommitError::Conflict)
    ));
    assert_eq!(store.load(&a).await.unwrap().unwrap(), s1);
    assert!(
        store
            .idempotency(&a, &IdempotencyKey::derived("k2".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .entries(
                &a,
                &EntryQuery {
                    before: None,
                    limit: 10
                }
            )
            .await
            .unwrap()
            .len(),
        1
    );
    // Same for an existing workspace read at an old version.
    let _s2 = apply(store.as_ref(), &s1, "k3", grant(7)).await;
    let (stale, _) = prepare(&s1, "k4", grant(9), 2);
    assert!(matches!(
        store.commit(stale).await,
        Err(CommitError::Conflict)
    ));
    assert_eq!(store.load(&a).await.unwrap().unwrap().version, 2);
}

pub async fn a_repeated_idempotency_key_is_reported_as_duplicate_and_writes_nothing(
    store: Arc<dyn LedgerStore>,
) {
    let a = workspace("org_c");
    let s0 = WorkspaceState::new(a.clone());
    let s1 = apply(store.as_ref(), &s0, "same", grant(100)).await;
    // The same operation again, prepared on fresh state: the key already exists.
    let (again, _) = prepare(&s1, "same", grant(100), 1);
    assert!(matches!(
        store.commit(again).await,
        Err(CommitError::Duplicate)
    ));
    assert_eq!(store.load(&a).await.unwrap().unwrap(), s1);
    assert_eq!(
        store
            .entries(
                &a,
                &EntryQuery {
                    before: None,
                    limit: 10
                }
            )
            .await
            .unwrap()
            .len(),
        1
    );
}

pub async fn journal_pages_run_newest_first_and_fetch_by_sequence(store: Arc<dyn LedgerStore>) {
    let a = workspace("org_d");
    let mut s = WorkspaceState::new(a.clone());
    for i in 0..7 {
        s = apply(store.as_ref(), &s, &format!("g{i}"), grant(10 + i)).await;
    }
    let first = store
        .entries(
            &a,
            &EntryQuery {
                before: None,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![7, 6, 5]
    );
    let next = store
        .entries(
            &a,
            &EntryQuery {
                before: Some(5),
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 3, 2]
    );
    let last = store
        .entries(
            &a,
            &EntryQuery {
                before: Some(2),
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(last.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
    let picked = store.entries_by_seq(&a, &[2, 6, 99]).await.unwrap();
    assert_eq!(picked.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 6]);
    // The journal alone rebuilds the stored state.
    let mut all = store
        .entries(
            &a,
            &EntryQuery {
                before: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    all.reverse();
    let rebuilt = WorkspaceState::from_journal(a.clone(), &all).unwrap();
    let stored = store.load(&a).await.unwrap().unwrap();
    assert_eq!(stored.version, s.version);
    assert_eq!(rebuilt.as_stored_like(&stored), stored);
    // The hold items are exactly the open holds the journal shows.
    let items = store.open_holds(&a, None, 1_000).await.unwrap();
    let mut open: Vec<_> = rebuilt.known_holds().cloned().collect();
    open.sort_by_key(|h| (h.deadline, h.generation));
    assert_eq!(items, open);
}

pub async fn generations_list_newest_first_with_filters_and_cursor(store: Arc<dyn LedgerStore>) {
    let a = workspace("org_e");
    let mut s = apply(
        store.as_ref(),
        &WorkspaceState::new(a.clone()),
        "grant",
        grant(1000),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        let g = GenerationId::from_ulid(ulid::Ulid::from_parts(1_000 + i, 7));
        let model = if i % 2 == 0 {
            "imagen-3"
        } else {
            "flux-schnell"
        };
        s = apply(store.as_ref(), &s, &format!("h{i}"), hold(g, model, 10)).await;
        ids.push(g);
    }
    s = apply(
        store.as_ref(),
        &s,
        "c0",
        Operation::Complete {
            generation: ids[0],
            credits: None,
            record: None,
        },
    )
    .await;
    let _ = s;
    let all = store
        .generations(
            &a,
            &GenerationQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|g| g.id).collect::<Vec<_>>(),
        ids.iter().rev().copied().collect::<Vec<_>>()
    );
    let page = store
        .generations(
            &a,
            &GenerationQuery {
                before: Some(ids[3]),
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );
    let imagen = store
        .generations(
            &a,
            &GenerationQuery {
                model: Some("imagen-3".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        imagen.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![ids[4], ids[2], ids[0]]
    );
    let done = store
        .generations(
            &a,
            &GenerationQuery {
                status: Some(GenerationStatus::Completed),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, ids[0]);
    assert_eq!(done[0].charged.get(), 10);
    assert_eq!(
        store.generation(&a, ids[0]).await.unwrap().unwrap().status,
        GenerationStatus::Completed
    );
    assert_eq!(
        store.generation_owner(ids[3]).await.unwrap(),
        Some(a.clone())
    );
    // Another workspace sees none of it.
    let other = workspace("org_e2");
    assert!(store.generation(&other, ids[0]).await.unwrap().is_none());
    assert!(
        store
            .generations(
                &other,
                &GenerationQuery {
                    limit: 10,
                    ..Default::default()
                }
            )
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn a_generation_id_cannot_be_claimed_by_two_workspaces(store: Arc<dyn LedgerStore>) {
    let g = GenerationId::new();
    let a = workspace("org_f");
    let b = workspace("org_g");
    let sa = apply(
        store.as_ref(),
        &WorkspaceState::new(a.clone()),
        "ga",
        grant(100),
    )
    .await;
    let sb = apply(
        store.as_ref(),
        &WorkspaceState::new(b.clone()),
        "gb",
        grant(100),
    )
    .await;
    let _ = apply(store.as_ref(), &sa, "ha", hold(g, "imagen-3", 5)).await;
    let (twin, _) = prepare(&sb, "hb", hold(g, "imagen-3", 5), 1);
    assert!(matches!(
        store.commit(twin).await,
        Err(CommitError::GenerationExists)
    ));
    assert_eq!(store.load(&b).await.unwrap().unwrap(), sb);
    assert_eq!(store.generation_owner(g).await.unwrap(), Some(a));
}

/// The generation record's status is the commit's own guard against settling one hold
/// twice: the state and the generation are not read as one snapshot, so an operation may
/// read the state after a completion and the generation from before it. Releasing that
/// hold again would free another running generation's credits.
pub async fn a_generation_settled_since_it_was_read_is_a_conflict_and_writes_nothing(
    store: Arc<dyn LedgerStore>,
) {
    let a = workspace("org_settled");
    let s1 = apply(
        store.as_ref(),
        &WorkspaceState::new(a.clone()),
        "grant",
        grant(200),
    )
    .await;
    let g1 = GenerationId::new();
    let (commit, held) = prepare(&s1, "h1", hold(g1, "imagen-3", 100), 0);
    let s2 = commit.state.clone();
    store.commit(commit).await.expect("hold");
    let (hold1, record1) = (held.placed[0].clone(), held.generations[0].1.clone());
    assert_eq!(record1.status, GenerationStatus::Held);
    let _ = apply(
        store.as_ref(),
        &s2,
        "h2",
        hold(GenerationId::new(), "imagen-3", 100),
    )
    .await;

    // The completion, as the service makes it: the stored state and the generation's hold.
    let mut state = store.load(&a).await.unwrap().unwrap();
    state.load_holds([hold1.clone()]);
    let complete = Operation::Complete {
        generation: g1,
        credits: None,
        record: Some(record1.clone()),
    };
    let (done, _) = prepare(&state, "c1", complete, 2);
    store.commit(done).await.expect("completion");
    let completed = store.load(&a).await.unwrap().unwrap();
    assert_eq!(completed.balance().available, Credits::ZERO);

    // A failure that read the state after the completion and the generation before it.
    let mut state = completed.clone();
    state.load_holds([hold1]);
    let fail = Operation::Fail {
        generation: g1,
        reason: "stale read".into(),
        record: Some(record1),
    };
    let (stale, applied) = prepare(&state, "f1", fail, 3);
    // The engine alone cannot tell: the other hold's credits cover the release.
    assert_eq!(applied.state.balance().available, Credits::new(100));
    assert!(matches!(
        store.commit(stale).await,
        Err(CommitError::Conflict)
    ));
    assert_eq!(store.load(&a).await.unwrap().unwrap(), completed);
    assert!(
        store
            .idempotency(&a, &IdempotencyKey::derived("f1".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.generation(&a, g1).await.unwrap().unwrap().status,
        GenerationStatus::Completed
    );
}

pub async fn documents_are_versioned_and_list_by_prefix_newest_first(store: Arc<dyn DocStore>) {
    let pk = "WORKSPACE#org_docs";
    assert!(store.get_doc(pk, "BILLING").await.unwrap().is_none());
    assert!(store.put_doc(pk, "BILLING", "{\"a\":1}", 0).await.unwrap());
    assert!(
        !store.put_doc(pk, "BILLING", "{\"a\":2}", 0).await.unwrap(),
        "create twice"
    );
    assert!(
        !store.put_doc(pk, "BILLING", "{\"a\":2}", 7).await.unwrap(),
        "stale version"
    );
    assert!(store.put_doc(pk, "BILLING", "{\"a\":3}", 1).await.unwrap());
    let d = store.get_doc(pk, "BILLING").await.unwrap().unwrap();
    assert_eq!((d.body.as_str(), d.version), ("{\"a\":3}", 2));
    for (sk, body) in [
        ("INVOICE#000000000002#in_b", "2"),
        ("INVOICE#000000000001#in_a", "1"),
        ("INVOICE#000000000003#in_c", "3"),
        ("PAYMENT", "x"),
    ] {
        assert!(store.put_doc(pk, sk, body, 0).await.unwrap());
    }
    let listed: Vec<String> = store
        .list_docs(pk, "INVOICE#", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.body)
        .collect();
    assert_eq!(listed, vec!["3", "2", "1"]);
    assert_eq!(store.list_docs(pk, "INVOICE#", 2).await.unwrap().len(), 2);
    assert!(
        store
            .list_docs("WORKSPACE#other", "INVOICE#", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A listing larger than one of DynamoDB's 1 MB query pages still answers `limit`
/// documents, and the next page starts where it ended.
pub async fn large_documents_list_in_full(store: Arc<dyn DocStore>) {
    let pk = "WORKSPACE#org_large_docs";
    let body = |i: usize| format!("{{\"n\":{i},\"text\":\"{}\"}}", "x".repeat(150_000));
    for i in 0..12 {
        assert!(
            store
                .put_doc(pk, &format!("MSG#{i:04}"), &body(i), 0)
                .await
                .unwrap()
        );
    }
    let first = store.list_docs(pk, "MSG#", 9).await.unwrap();
    let sks: Vec<&str> = first.iter().map(|d| d.sk.as_str()).collect();
    assert_eq!(sks.len(), 9, "a listing over 1 MB is not cut short");
    assert_eq!(sks.first(), Some(&"MSG#0011"));
    assert_eq!(sks.last(), Some(&"MSG#0003"));
    assert_eq!(first[0].body, body(11));
    let rest = store
        .list_docs_before(pk, "MSG#", Some("MSG#0003"), 100)
        .await
        .unwrap();
    let sks: Vec<&str> = rest.iter().map(|d| d.sk.as_str()).collect();
    assert_eq!(sks, ["MSG#0002", "MSG#0001", "MSG#0000"]);
}

pub async fn concurrent_document_updates_all_land(store: Arc<dyn DocStore>) {
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                tally::store::docs::update(
                    store.as_ref(),
                    "WORKSPACE#org_count",
                    "COUNTER",
                    |cur: Option<Vec<u64>>| {
                        let mut v = cur.unwrap_or_default();
                        v.push(i);
                        Some(v)
                    },
                )
                .await
                .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut all: Vec<u64> =
        tally::store::docs::get(store.as_ref(), "WORKSPACE#org_count", "COUNTER")
            .await
            .unwrap()
            .unwrap();
    all.sort();
    assert_eq!(all, (0..16).collect::<Vec<_>>());
}

pub async fn a_commit_over_one_transactions_items_is_refused_and_writes_nothing(
    store: Arc<dyn LedgerStore>,
) {
    let a = workspace("org_big");
    let state = apply(
        store.as_ref(),
        &WorkspaceState::new(a.clone()),
        "g",
        grant(10),
    )
    .await;
    let (mut commit, _) = prepare(&state, "big", grant(5), 1);
    // Entries padded to one item more than DynamoDB takes in a transaction.
    let entry = commit.entries[0].clone();
    while commit.items() <= tally::store::MAX_COMMIT_ITEMS {
        let mut e = entry.clone();
        e.seq = entry.seq + commit.entries.len() as u64;
        commit.entries.push(e);
    }
    let err = store.commit(commit).await.unwrap_err();
    assert!(
        matches!(&err, CommitError::Store(e) if e.to_string().contains("exceeds one transaction")),
        "{err:?}"
    );
    let stored = store.load(&a).await.unwrap().unwrap();
    assert_eq!(stored.version, state.version);
    assert!(
        store
            .idempotency(&a, &IdempotencyKey::derived("big".into()))
            .await
            .unwrap()
            .is_none()
    );
}

macro_rules! conformance {
    ($adapter:ident, $make:expr, $docs:expr) => {
        mod $adapter {
            #[allow(unused_imports)]
            use tally_tests::{dynamo_store, embedded_store};

            #[tokio::test]
            async fn an_unknown_workspace_has_no_state_entries_or_records() {
                super::an_unknown_workspace_has_no_state_entries_or_records($make).await;
            }
            #[tokio::test]
            async fn a_commit_stores_state_entries_and_the_idempotency_record_together() {
                super::a_commit_stores_state_entries_and_the_idempotency_record_together($make)
                    .await;
            }
            #[tokio::test]
            async fn a_commit_on_a_stale_version_is_a_conflict_and_writes_nothing() {
                super::a_commit_on_a_stale_version_is_a_conflict_and_writes_nothing($make).await;
            }
            #[tokio::test]
            async fn a_repeated_idempotency_key_is_reported_as_duplicate_and_writes_nothing() {
                super::a_repeated_idempotency_key_is_reported_as_duplicate_and_writes_nothing(
                    $make,
                )
                .await;
            }
            #[tokio::test]
            async fn journal_pages_run_newest_first_and_fetch_by_sequence() {
                super::journal_pages_run_newest_first_and_fetch_by_sequence($make).await;
            }
            #[tokio::test]
            async fn generations_list_newest_first_with_filters_and_cursor() {
                super::generations_list_newest_first_with_filters_and_cursor($make).await;
            }
            #[tokio::test]
            async fn a_generation_id_cannot_be_claimed_by_two_workspaces() {
                super::a_generation_id_cannot_be_claimed_by_two_workspaces($make).await;
            }
            #[tokio::test]
            async fn a_generation_settled_since_it_was_read_is_a_conflict_and_writes_nothing() {
                super::a_generation_settled_since_it_was_read_is_a_conflict_and_writes_nothing(
                    $make,
                )
                .await;
            }
            #[tokio::test]
            async fn a_commit_over_one_transactions_items_is_refused_and_writes_nothing() {
                super::a_commit_over_one_transactions_items_is_refused_and_writes_nothing($make)
                    .await;
            }
            #[tokio::test]
            async fn documents_are_versioned_and_list_by_prefix_newest_first() {
                super::documents_are_versioned_and_list_by_prefix_newest_first($docs).await;
            }
            #[tokio::test]
            async fn large_documents_list_in_full() {
                super::large_documents_list_in_full($docs).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_document_updates_all_land() {
                super::concurrent_document_updates_all_land($docs).await;
            }
        }
    };
}

conformance!(embedded, embedded_store(), tally_tests::embedded_docs());
conformance!(
    dynamodb,
    dynamo_store().await,
    tally_tests::dynamo_docs().await
);
conformance!(
    dynamodb_local,
    tally_tests::dynamo_local_store().await,
    tally_tests::dynamo_local_docs().await
);
