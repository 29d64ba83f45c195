//! Hold + complete, the hot path of every generation: on the pure engine, and through the
//! ledger service over the embedded store (in memory and on disk).

use chrono::{Duration, TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use tally::catalog::{Catalog, GenerationSpec, Workflow};
use tally::clock::SystemClock;
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, Command, LotSource, Operation, Refs, WorkspaceState, execute};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest};
use tally::store::LedgerStore;
use tally::store::embedded::EmbeddedStore;

fn spec() -> GenerationSpec {
    GenerationSpec {
        workflow: Workflow::Video,
        model: "video-pro".into(),
        resolution: None,
        duration_s: Some(10),
        count: None,
    }
}

fn engine(c: &mut Criterion) {
    let catalog = Catalog::builtin();
    let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut state = WorkspaceState::new(WorkspaceId::parse("bench").unwrap());
    // A realistic workspace: a plan lot, an add-on lot and two packs.
    for (i, (source, credits, days)) in [
        (LotSource::PlanPeriod, 900u64, Some(60)),
        (LotSource::Addon, 120, Some(30)),
        (LotSource::Pack, 500, None),
        (LotSource::Pack, 100, None),
    ]
    .into_iter()
    .enumerate()
    {
        let cmd = Command {
            key: IdempotencyKey::derived(format!("grant{i}")),
            at,
            actor: Actor::system(),
            refs: Refs::default(),
            op: Operation::Grant {
                month: None,
                source,
                credits: Credits::new(credits),
                expires_at: days.map(|d| at + Duration::days(d)),
                note: None,
            },
        };
        state = execute(&state, &cmd, &catalog).unwrap().state;
    }
    let estimate = catalog.estimate(&spec()).unwrap();
    c.bench_function("engine: hold + complete", |b| {
        b.iter(|| {
            let generation = GenerationId::new();
            let hold = Command {
                key: IdempotencyKey::derived("h".into()),
                at,
                actor: Actor::system(),
                refs: Refs::default(),
                op: Operation::Hold {
                    generation,
                    estimate: estimate.clone(),
                    deadline: at + Duration::hours(1),
                },
            };
            let held = execute(&state, &hold, &catalog).unwrap();
            let complete = Command {
                key: IdempotencyKey::derived("c".into()),
                op: Operation::Complete {
                    generation,
                    credits: Some(Credits::new(10)),
                    record: None,
                },
                ..hold
            };
            execute(&held.state, &complete, &catalog).unwrap()
        })
    });
}

fn through_store(c: &mut Criterion, name: &str, store: Arc<dyn LedgerStore>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let catalog = Arc::new(Catalog::builtin());
    let estimate = catalog.estimate(&spec()).unwrap();
    let ledger = Ledger::new(store, Arc::new(SystemClock), catalog);
    let workspace = WorkspaceId::parse("bench").unwrap();
    let request = |key: String, op: Operation| LedgerRequest {
        workspace: workspace.clone(),
        key: IdempotencyKey::derived(key),
        fingerprint: String::new(),
        actor: Actor::system(),
        refs: Refs::default(),
        op,
    };
    rt.block_on(ledger.execute(request(
        "grant".into(),
        Operation::Grant {
            month: None,
            source: LotSource::Pack,
            credits: Credits::new(9_000_000),
            expires_at: None,
            note: None,
        },
    )))
    .unwrap();
    c.bench_function(name, |b| {
        b.iter(|| {
            rt.block_on(async {
                let generation = GenerationId::new();
                ledger
                    .execute(request(
                        format!("gen:{generation}:hold"),
                        Operation::Hold {
                            generation,
                            estimate: estimate.clone(),
                            deadline: Utc::now() + Duration::hours(1),
                        },
                    ))
                    .await
                    .unwrap();
                ledger
                    .execute(request(
                        format!("gen:{generation}:complete"),
                        Operation::Complete {
                            generation,
                            credits: None,
                            record: None,
                        },
                    ))
                    .await
                    .unwrap()
            })
        })
    });
}

fn embedded(c: &mut Criterion) {
    through_store(
        c,
        "embedded store (memory): hold + complete",
        Arc::new(EmbeddedStore::in_memory()),
    );
    let dir = std::env::temp_dir().join(format!("tally-bench-{}", ulid::Ulid::new()));
    through_store(
        c,
        "embedded store (file): hold + complete",
        Arc::new(EmbeddedStore::open(&dir).unwrap()),
    );
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, engine, embedded);
criterion_main!(benches);
