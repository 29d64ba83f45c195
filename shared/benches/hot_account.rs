//! One hot team account on AWS's DynamoDB Local: many clients doing hold + complete on one
//! workspace, measured beside the ceiling the server itself sets for any design that writes
//! one account item per operation (conditional writes to one item), in the same run, and
//! beside the best a design without a read could do with the items a hold writes, and beside
//! the counter design's operations at the server (with and without a read, with and
//! without the generation's owner item), and beside the same writes spread over one item
//! per client (what sharded sub-balances could gain on this server).
//!
//! `DYNAMODB_LOCAL_ENDPOINT` names the server (`make bench` starts one);
//! `TALLY_BENCH_CLIENTS` (64) and `TALLY_BENCH_SECONDS` (60) set the load. Each client has
//! a ledger of its own, as separate Lambda instances would; they share nothing but the
//! table.

use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally::catalog::{Catalog, GenerationSpec, Workflow};
use tally::clock::SystemClock;
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, ActorKind, LotSource, Operation, Refs};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest, ServiceError};
use tally::store::LedgerStore;
use tally::store::dynamo::DynamoStore;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A transaction element putting a new item `BENCH`/`sk` (refused if it exists).
fn new_item(table: &str, sk: String) -> TransactWriteItem {
    let put = Put::builder()
        .table_name(table)
        .item("PK", s("BENCH"))
        .item("SK", s(&sk))
        .condition_expression("attribute_not_exists(PK)")
        .build()
        .unwrap();
    TransactWriteItem::builder().put(put).build()
}

/// Writes the item `BENCH`/`sk` with the number `value` in `attribute`.
async fn seed(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    sk: &str,
    attribute: &str,
    value: &str,
) {
    client
        .put_item()
        .table_name(table)
        .item("PK", s("BENCH"))
        .item("SK", s(sk))
        .item(attribute, AttributeValue::N(value.into()))
        .send()
        .await
        .unwrap();
}

/// Runs `clients` loops of `write` until `seconds` pass; the writes per second that landed
/// and how many did not.
async fn ceiling<F, Fut>(clients: u64, seconds: u64, write: F) -> (f64, u64)
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let write = write.clone();
            let (done, failed) = (done.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    let landed = if write(c * 1_000_000_000 + n).await {
                        &done
                    } else {
                        &failed
                    };
                    landed.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (
        done.load(Ordering::Relaxed) as f64 / seconds as f64,
        failed.load(Ordering::Relaxed),
    )
}

/// Conditional updates by `clients` loops, client `c` adding to counter `c % items`; the
/// updates per second that landed and how many did not.
async fn updates_on(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    clients: u64,
    seconds: u64,
    items: u64,
) -> (f64, u64) {
    for i in 0..items {
        seed(client, table, &counter_key(i), "v", "0").await;
    }
    let (c, t) = (client.clone(), table.to_string());
    ceiling(clients, seconds, move |n| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            c.update_item()
                .table_name(&t)
                .key("PK", s("BENCH"))
                .key("SK", s(&counter_key(n / 1_000_000_000 % items)))
                .update_expression("ADD v :one")
                .condition_expression("attribute_exists(PK)")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .send()
                .await
                .is_ok()
        }
    })
    .await
}

/// The one-item counter the ceiling writes, or the `i`th of several.
fn counter_key(i: u64) -> String {
    if i == 0 {
        "COUNTER".into()
    } else {
        format!("COUNTER#{i}")
    }
}

/// The best a hold that does not read could do: the balance as a counter, taken under a
/// condition on the amount (`available >= :amount`, no version, so concurrent holds do not
/// collide), and the four items a hold writes beside it (its hold, generation, journal
/// entry and idempotency record) as new items. Client `c` takes from balance `c % items`.
async fn read_free_holds(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    clients: u64,
    seconds: u64,
    items: u64,
) -> (f64, u64) {
    for i in 0..items {
        seed(
            client,
            table,
            &format!("BALANCE#{i}"),
            "available",
            "100000000000000",
        )
        .await;
    }
    let (c, t) = (client.clone(), table.to_string());
    // New items of this run, whatever ran before.
    let run = Arc::new(ulid::Ulid::new().to_string());
    ceiling(clients, seconds, move |n| {
        let (c, t, run) = (c.clone(), t.clone(), run.clone());
        async move {
            let take = Update::builder()
                .table_name(&t)
                .key("PK", s("BENCH"))
                .key("SK", s(&format!("BALANCE#{}", n / 1_000_000_000 % items)))
                .update_expression("SET available = available - :amount ADD next_seq :one")
                .condition_expression("available >= :amount")
                .expression_attribute_values(":amount", AttributeValue::N("20".into()))
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .build()
                .unwrap();
            let mut tx = c
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(take).build());
            for part in ["HOLD", "GEN", "ENTRY", "IDEM"] {
                tx = tx.transact_items(new_item(&t, format!("{part}#{run}#{n}")));
            }
            tx.send().await.is_ok()
        }
    })
    .await
}

fn key(sk: &str) -> std::collections::HashMap<String, AttributeValue> {
    std::collections::HashMap::from([("PK".to_string(), s("BENCH")), ("SK".to_string(), s(sk))])
}

/// One hold and one completion of the counter design (see `main`), reading before each or
/// not, putting the owner item or not; whether both landed.
async fn counter_pair(
    c: &aws_sdk_dynamodb::Client,
    t: &str,
    n: u64,
    reads: bool,
    owner: bool,
) -> bool {
    let read = |keys: Vec<std::collections::HashMap<String, AttributeValue>>| {
        let wanted = aws_sdk_dynamodb::types::KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .build()
            .unwrap();
        c.batch_get_item().request_items(t, wanted).send()
    };
    let amount = AttributeValue::N("20".into());
    // Items of their own: the measurement before put `GEN#n`.
    let generation = format!("COUNTER-GEN#{n}");
    if reads && read(vec![key("POOL")]).await.is_err() {
        return false;
    }
    let take = Update::builder()
        .table_name(t)
        .key("PK", s("BENCH"))
        .key("SK", s("POOL"))
        .update_expression("ADD budget :minus, held :amount")
        .condition_expression("budget >= :amount")
        .expression_attribute_values(":amount", amount.clone())
        .expression_attribute_values(":minus", AttributeValue::N("-20".into()))
        .build()
        .unwrap();
    let mut hold = c
        .transact_write_items()
        .transact_items(TransactWriteItem::builder().update(take).build())
        .transact_items(
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(t)
                        .item("PK", s("BENCH"))
                        .item("SK", s(&generation))
                        .item("held", amount.clone())
                        .condition_expression("attribute_not_exists(PK)")
                        .build()
                        .unwrap(),
                )
                .build(),
        );
    if owner {
        hold = hold.transact_items(new_item(t, format!("COUNTER-OWNER#{n}")));
    }
    let held = hold.send().await;
    if held.is_err() || (reads && read(vec![key("POOL"), key(&generation)]).await.is_err()) {
        return false;
    }
    let give = Update::builder()
        .table_name(t)
        .key("PK", s("BENCH"))
        .key("SK", s("POOL"))
        .update_expression("ADD budget :unused, held :minus, spent :charged")
        .condition_expression("attribute_exists(PK)")
        .expression_attribute_values(":unused", AttributeValue::N("2".into()))
        .expression_attribute_values(":minus", AttributeValue::N("-20".into()))
        .expression_attribute_values(":charged", AttributeValue::N("18".into()))
        .build()
        .unwrap();
    let settle = Update::builder()
        .table_name(t)
        .key("PK", s("BENCH"))
        .key("SK", s(&generation))
        .update_expression("SET #status = :completed")
        .condition_expression("attribute_not_exists(#status) AND held = :amount")
        .expression_attribute_names("#status", "status")
        .expression_attribute_values(":completed", s("completed"))
        .expression_attribute_values(":amount", amount)
        .build()
        .unwrap();
    c.transact_write_items()
        .transact_items(TransactWriteItem::builder().update(give).build())
        .transact_items(TransactWriteItem::builder().update(settle).build())
        .send()
        .await
        .is_ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let endpoint = std::env::var("DYNAMODB_LOCAL_ENDPOINT")
        .expect("DYNAMODB_LOCAL_ENDPOINT names a DynamoDB Local server (make bench starts one)");
    let clients = env("TALLY_BENCH_CLIENTS", 64);
    let seconds = env("TALLY_BENCH_SECONDS", 60);
    let client = DynamoStore::local_client(&endpoint);
    let table = format!(
        "tally-bench-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    DynamoStore::create_table(&client, &table).await.unwrap();
    let store = DynamoStore::new(client.clone(), table.clone());

    // The server warms up first (its JIT): a cold server takes about half the updates it
    // takes a few seconds later, which would understate the ceiling.
    updates_on(&client, &table, clients, 5, 1).await;
    read_free_holds(&client, &table, clients, 5, 1).await;

    // The server's ceiling for one item: conditional updates, then two-item transactions.
    let ceiling_seconds = seconds.clamp(5, 20);
    let (updates, updates_failed) = updates_on(&client, &table, clients, ceiling_seconds, 1).await;
    let (c, t) = (client.clone(), table.clone());
    let (transactions, transactions_failed) = ceiling(clients, ceiling_seconds, move |n| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            let update = Update::builder()
                .table_name(&t)
                .key("PK", s("BENCH"))
                .key("SK", s("COUNTER"))
                .update_expression("ADD v :one")
                .condition_expression("attribute_exists(PK)")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .build()
                .unwrap();
            c.transact_write_items()
                .transact_items(TransactWriteItem::builder().update(update).build())
                .transact_items(new_item(&t, format!("ROW#{n}")))
                .send()
                .await
                .is_ok()
        }
    })
    .await;

    // The best a hold that does not read could do, on one balance item.
    let (read_free, read_free_failed) =
        read_free_holds(&client, &table, clients, ceiling_seconds, 1).await;

    // Sharding at this server: the same conditional updates and read-free holds, each client
    // on a balance item of its own (as sub-balances sharded as widely as the clients), so
    // no two requests touch one item. What this gains over one item is all that sharded
    // sub-balances could gain here.
    let (spread_updates, _) = updates_on(&client, &table, clients, ceiling_seconds, clients).await;
    let (spread_holds, _) =
        read_free_holds(&client, &table, clients, ceiling_seconds, clients).await;

    // The counter design at the server, in four variants: each operation reads first (the
    // state, and the generation for a completion, in one consistent `BatchGetItem`) or not,
    // and a hold puts the generation's owner item or not. Then one transaction: the hold
    // takes its estimate from a budget counter on the state item under
    // `budget >= :amount` and puts its generation; the completion gives the unused part
    // back, counts the charge, and settles the generation under a condition on its status.
    // No version: concurrent operations do not collide. None of them folds anything into
    // the journal, so each is an upper bound for a design of that shape.
    seed(&client, &table, "POOL", "budget", "100000000000000").await;
    let mut counter = Vec::new();
    for (i, (reads, owner)) in [(true, true), (true, false), (false, true), (false, false)]
        .into_iter()
        .enumerate()
    {
        let (c, t) = (client.clone(), table.clone());
        let base = i as u64 * 100_000_000_000_000;
        let (pairs, failed) = ceiling(clients, ceiling_seconds, move |n| {
            let (c, t) = (c.clone(), t.clone());
            async move { counter_pair(&c, &t, base + n, reads, owner).await }
        })
        .await;
        counter.push((reads, owner, pairs, failed));
    }

    // The hot account.
    let catalog = Arc::new(Catalog::builtin());
    let workspace = WorkspaceId::parse("org_hot").unwrap();
    let store: Arc<dyn LedgerStore> = Arc::new(store);
    let setup = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    let grants = 5u64;
    for i in 0..grants {
        setup
            .execute(LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived(format!("bench:grant:{i}")),
                fingerprint: "grant".into(),
                actor: Actor::system(),
                refs: Refs::default(),
                op: Operation::Grant {
                    month: None,
                    source: LotSource::Pack,
                    credits: Credits::new(tally::money::MAX_CREDITS_PER_REQUEST),
                    expires_at: None,
                    note: None,
                },
            })
            .await
            .unwrap();
    }
    let granted = grants * tally::money::MAX_CREDITS_PER_REQUEST;
    let estimate = catalog
        .estimate(&GenerationSpec {
            workflow: Workflow::Image,
            model: "imagen-3".into(),
            resolution: None,
            duration_s: None,
            count: None,
        })
        .unwrap();
    let conflicts = Arc::new(AtomicU64::new(0));
    let operations = Arc::new(AtomicU64::new(0));
    {
        let (conflicts, operations) = (conflicts.clone(), operations.clone());
        tally::metrics::set_sink("bench", move |line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["LedgerOperations"].is_number() {
                operations.fetch_add(1, Ordering::Relaxed);
                conflicts.fetch_add(v["Conflicts"].as_f64().unwrap() as u64, Ordering::Relaxed);
            }
        });
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
            ledger.retry.base_ms = env("TALLY_BENCH_BASE_MS", ledger.retry.base_ms);
            ledger.retry.cap_ms = env("TALLY_BENCH_CAP_MS", ledger.retry.cap_ms);
            let (workspace, estimate) = (workspace.clone(), estimate.clone());
            tokio::spawn(async move {
                let mut requests = Vec::new();
                let mut pairs = Vec::new();
                let mut failures = 0u64;
                let mut spent = 0u64;
                while Instant::now() < end {
                    let generation = GenerationId::new();
                    let started = Instant::now();
                    let hold = ledger
                        .execute(LedgerRequest {
                            workspace: workspace.clone(),
                            key: IdempotencyKey::derived(format!("gen:{generation}:hold")),
                            fingerprint: "hold".into(),
                            actor: Actor::new(ActorKind::Member, format!("m{c}")),
                            refs: Refs::default(),
                            op: Operation::Hold {
                                generation,
                                estimate: estimate.clone(),
                                deadline: chrono::Utc::now() + chrono::Duration::hours(1),
                            },
                        })
                        .await;
                    requests.push(started.elapsed().as_secs_f64() * 1e3);
                    if hold.is_err() {
                        failures += 1;
                        continue;
                    }
                    let second = Instant::now();
                    let complete = ledger
                        .execute(LedgerRequest {
                            workspace: workspace.clone(),
                            key: IdempotencyKey::derived(format!("gen:{generation}:complete")),
                            fingerprint: "complete".into(),
                            actor: Actor::new(ActorKind::Service, "generation-service"),
                            refs: Refs::default(),
                            op: Operation::Complete {
                                generation,
                                credits: None,
                                record: None,
                            },
                        })
                        .await;
                    requests.push(second.elapsed().as_secs_f64() * 1e3);
                    match complete {
                        Ok(o) => {
                            spent += o.generation.map_or(0, |g| g.charged.get());
                            pairs.push(started.elapsed().as_secs_f64() * 1e3);
                        }
                        Err(ServiceError::Contention) | Err(_) => failures += 1,
                    }
                }
                (requests, pairs, failures, spent)
            })
        })
        .collect();
    let mut requests = Vec::new();
    let mut pairs = Vec::new();
    let mut failures = 0;
    let mut spent = 0;
    for t in tasks {
        let (r, p, f, s) = t.await.unwrap();
        requests.extend(r);
        pairs.extend(p);
        failures += f;
        spent += s;
    }
    requests.sort_by(f64::total_cmp);
    pairs.sort_by(f64::total_cmp);
    let state = setup.workspace_now(&workspace).await.unwrap();
    state.check_invariants().unwrap();
    let overspend = state.balance().available.get() + state.balance().held.get() + spent != granted;
    let rate = pairs.len() as f64 / seconds as f64;
    let ops = operations.load(Ordering::Relaxed).max(1);
    println!("DynamoDB Local at {endpoint}, {clients} clients");
    println!("ceiling, conditional UpdateItem on one item: {updates:.0} writes/s");
    println!("ceiling, two-item TransactWriteItems on one item: {transactions:.0} transactions/s");
    println!(
        "a hold without a read at best, five-item TransactWriteItems under an amount condition: {read_free:.0} holds/s ({:.0} pairs/s, {:.0}% of the update ceiling's pairs)",
        read_free / 2.0,
        100.0 * read_free / updates
    );
    for (reads, owner, pairs, failed) in counter {
        println!(
            "counter design, {} a read before each operation, hold {} its owner item: {pairs:.0} pairs/s ({:.0}% of the update ceiling's pairs; {failed} pairs failed)",
            if reads { "with" } else { "without" },
            if owner { "with" } else { "without" },
            100.0 * pairs / (updates / 2.0)
        );
    }
    println!(
        "sharded as widely as the clients ({clients} items, one each): conditional UpdateItem {spread_updates:.0} writes/s ({:.2}x one item); read-free five-item holds {spread_holds:.0} holds/s ({:.2}x one item)",
        spread_updates / updates,
        spread_holds / read_free
    );
    println!(
        "failed attempts in the measurements above: updates {updates_failed}, two-item transactions {transactions_failed}, read-free holds {read_free_failed}"
    );
    println!(
        "hot account, hold + complete for {seconds} s: {rate:.1} pairs/s ({:.0}% of the {:.0} pairs/s the update ceiling allows)",
        100.0 * rate / (updates / 2.0),
        updates / 2.0
    );
    println!(
        "per request: p50 {:.1} ms, p99 {:.1} ms; per pair: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&requests, 0.5),
        percentile(&requests, 0.99),
        percentile(&pairs, 0.5),
        percentile(&pairs, 0.99)
    );
    println!(
        "retries per operation: {:.2}; failed requests (busy or errors): {failures}; overspend: {}",
        conflicts.load(Ordering::Relaxed) as f64 / ops as f64,
        if overspend { "YES" } else { "none" }
    );
    assert!(!overspend, "credits do not add up");
}
