//! The SAM template and the code must describe the same system: table keys and TTL,
//! queues and their redrive, one binary per function with the environment it reads, every
//! HTTP route (and which are public), batch-failure reporting and alarms. And the function
//! crates stay independent of each other (what they share lives in `tally`), with none of
//! the local runner's stand-ins in the Lambda binaries.

use serde_yaml::Value;
use std::collections::BTreeSet;
use tally::queue::{BILLING_EVENTS_DLQ, BILLING_EVENTS_MAX_RECEIVES, BILLING_EVENTS_QUEUE};
use tally::refresh::jobs::{REFRESH_JOBS_DLQ, REFRESH_JOBS_MAX_RECEIVES, REFRESH_JOBS_QUEUE};
use tally::store::dynamo::{DUE_AT, DUE_INDEX, DUE_SHARD, PK, SK, STATUS_INDEX, TTL};
use utoipa::OpenApi;

fn template() -> Value {
    let path = format!("{}/../infra/template.yaml", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn resource<'a>(t: &'a Value, name: &str) -> &'a Value {
    &t["Resources"][name]
}

/// The text of a scalar or of an intrinsic (`!Sub "..."`, `!Ref X`).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Tagged(t) => text(&t.value),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn functions(t: &Value) -> Vec<(String, &Value)> {
    t["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
        .map(|(k, r)| (k.as_str().unwrap().to_owned(), r))
        .collect()
}

fn function_for_binary<'a>(t: &'a Value, binary: &str) -> (String, &'a Value) {
    functions(t)
        .into_iter()
        .find(|(_, f)| f["Metadata"]["BuildProperties"]["Binary"] == binary)
        .unwrap_or_else(|| panic!("no function builds binary {binary}"))
}

#[test]
fn the_table_has_the_keys_ttl_and_protection_the_store_relies_on() {
    let t = template();
    let table = &resource(&t, "Table")["Properties"];
    let keys: Vec<(String, String)> = table["KeySchema"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| (text(&k["AttributeName"]), text(&k["KeyType"])))
        .collect();
    assert_eq!(
        keys,
        vec![
            (PK.to_owned(), "HASH".to_owned()),
            (SK.to_owned(), "RANGE".to_owned())
        ]
    );
    for a in table["AttributeDefinitions"].as_sequence().unwrap() {
        // Keys are strings; only the due index sorts by a number (the due time).
        let expected = if a["AttributeName"] == DUE_AT {
            "N"
        } else {
            "S"
        };
        assert_eq!(a["AttributeType"], expected);
    }
    assert_eq!(
        text(&table["TimeToLiveSpecification"]["AttributeName"]),
        TTL
    );
    assert_eq!(table["TimeToLiveSpecification"]["Enabled"], true);
    assert_eq!(
        table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(table["DeletionProtectionEnabled"], true);
    assert_eq!(resource(&t, "Table")["DeletionPolicy"], "Retain");
}

#[test]
fn the_billing_queue_is_fifo_with_the_redrive_the_consumers_expect() {
    let t = template();
    let q = &resource(&t, "BillingEventsQueue")["Properties"];
    assert!(text(&q["QueueName"]).ends_with(&format!("-{BILLING_EVENTS_QUEUE}")));
    assert_eq!(q["FifoQueue"], true);
    assert_eq!(
        q["ContentBasedDeduplication"], false,
        "dedup by Stripe event id, not body"
    );
    let redrive = &q["RedrivePolicy"];
    assert_eq!(
        redrive["maxReceiveCount"].as_u64(),
        Some(BILLING_EVENTS_MAX_RECEIVES as u64)
    );
    assert!(text(&redrive["deadLetterTargetArn"]).starts_with("BillingEventsDeadLetterQueue"));
    let dlq = &resource(&t, "BillingEventsDeadLetterQueue")["Properties"];
    assert!(text(&dlq["QueueName"]).ends_with(&format!("-{BILLING_EVENTS_DLQ}")));
    assert_eq!(dlq["FifoQueue"], true);
    // SQS-triggered Lambdas need a visibility timeout of at least six function timeouts.
    let timeout = t["Globals"]["Function"]["Timeout"].as_u64().unwrap();
    assert!(q["VisibilityTimeout"].as_u64().unwrap() >= 6 * timeout);
}

/// Alerts and auto top-ups: every function that runs ledger operations (any of which can
/// take a balance down across a threshold) tells the alerts observer and may send credit
/// alerts. Those whose crossings may buy a pack (credits-api, purchases, billing-events)
/// have the top-ups queue and may send to it; the others (refund requests, support's
/// settlements, the scheduled sweep) wire an observer that only alerts, and have neither.
/// billing-events consumes the queue, with a redrive the consumer expects and a visibility
/// timeout of at least six of its timeouts.
#[test]
fn every_ledger_function_alerts_and_the_top_ups_queue_is_sent_to_and_consumed_as_expected() {
    let t = template();
    let q = &resource(&t, "TopUpsQueue")["Properties"];
    assert_eq!(q["FifoQueue"], true);
    assert_eq!(q["ContentBasedDeduplication"], false, "dedup by crossing");
    assert_eq!(
        q["RedrivePolicy"]["maxReceiveCount"].as_u64(),
        Some(tally::alerts::TOPUPS_MAX_RECEIVES as u64)
    );
    assert!(text(&q["RedrivePolicy"]["deadLetterTargetArn"]).starts_with("TopUpsDeadLetterQueue"));
    let observers: Vec<String> = functions(&t)
        .into_iter()
        .map(|(_, f)| text(&f["Metadata"]["BuildProperties"]["Binary"]))
        .filter(|binary| runs_the_ledger(binary))
        .collect();
    assert_eq!(observers.len(), 6, "{observers:?}");
    let mut buyers = Vec::new();
    for binary in observers.iter().map(String::as_str) {
        let main =
            std::fs::read_to_string(repo(&format!("functions/{binary}/src/main.rs"))).unwrap();
        let main: String = main.split_whitespace().collect();
        // The ledger itself (a staff ledger beside it, in credits-api, only alerts).
        let buys = main.contains(";ledger.observer=Some(tally::alerts::from_config(");
        let alerts_only = main.contains(";ledger.observer=Some(tally::alerts::alerts_only(");
        if binary == "credits-api" {
            assert!(
                main.contains(";staff_ledger.observer=Some(tally::alerts::alerts_only("),
                "staff corrections only alert"
            );
        }
        assert!(
            buys != alerts_only,
            "{binary} runs the ledger without the alerts observer"
        );
        if buys {
            buyers.push(binary);
        }
        let (_, f) = function_for_binary(&t, binary);
        let env = &f["Properties"]["Environment"]["Variables"];
        assert!(
            text(&env[tally::config::NOTIFICATIONS_QUEUE_URL]).starts_with("NotificationsQueue"),
            "{binary}"
        );
        assert_eq!(
            text(&env[tally::config::TOPUPS_QUEUE_URL]).starts_with("TopUpsQueue"),
            buys,
            "{binary} and the top-ups queue"
        );
        let sends = f["Properties"]["Policies"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|p| p["Statement"].as_sequence().into_iter().flatten())
            .filter(|st| {
                st["Action"]
                    .as_sequence()
                    .is_some_and(|a| a.iter().any(|a| a == "sqs:SendMessage"))
            })
            .flat_map(|st| match st["Resource"].as_sequence() {
                Some(list) => list.iter().map(text).collect::<Vec<_>>(),
                None => vec![text(&st["Resource"])],
            })
            .collect::<Vec<_>>();
        assert_eq!(
            sends.iter().any(|r| r.starts_with("TopUpsQueue")),
            buys,
            "{binary} and sending to the top-ups queue: {sends:?}"
        );
        assert!(
            sends.iter().any(|r| r.starts_with("NotificationsQueue")),
            "{binary} may not send credit alerts: {sends:?}"
        );
    }
    buyers.sort();
    assert_eq!(buyers, ["credits-api"], "only generations ask for top-ups");
    let (_, f) = function_for_binary(&t, "billing-events");
    let timeout = f["Properties"]["Timeout"].as_u64().unwrap();
    assert!(q["VisibilityTimeout"].as_u64().unwrap() >= 6 * timeout);
    let polls = f["Properties"]["Policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|p| p["SQSPollerPolicy"].is_mapping())
        .map(|p| text(&p["SQSPollerPolicy"]["QueueName"]))
        .collect::<Vec<_>>();
    assert!(
        polls.iter().any(|p| p.starts_with("TopUpsQueue")),
        "{polls:?}"
    );
}

#[test]
fn every_function_is_one_binary_with_the_environment_it_reads() {
    let t = template();
    let global: BTreeSet<String> = t["Globals"]["Function"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(functions(&t).len(), tally::config::FUNCTIONS.len());
    for (binary, vars) in tally::config::FUNCTIONS {
        let (_, f) = function_for_binary(&t, binary);
        assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda");
        let main = format!(
            "{}/../functions/{binary}/src/main.rs",
            env!("CARGO_MANIFEST_DIR")
        );
        assert!(std::path::Path::new(&main).exists(), "{main}");
        let mut set = global.clone();
        if let Some(m) = f["Properties"]["Environment"]["Variables"].as_mapping() {
            set.extend(m.keys().map(|k| k.as_str().unwrap().to_owned()));
        }
        for v in vars.iter() {
            assert!(set.contains(*v), "{binary} needs {v}");
        }
    }
    let g = &t["Globals"]["Function"];
    assert_eq!(g["Runtime"], "provided.al2023");
    assert_eq!(g["Architectures"][0], "arm64");
    assert_eq!(g["LoggingConfig"]["LogFormat"], "JSON");
}

fn routes(f: &Value) -> BTreeSet<(String, String, bool)> {
    f["Properties"]["Events"]
        .as_mapping()
        .unwrap()
        .values()
        .filter(|e| e["Type"] == "HttpApi")
        .map(|e| {
            let p = &e["Properties"];
            let public = p["Auth"]["Authorizer"] == "NONE";
            (text(&p["Method"]).to_uppercase(), text(&p["Path"]), public)
        })
        .collect()
}

fn documented(doc: utoipa::openapi::OpenApi) -> BTreeSet<(String, String)> {
    let v = serde_json::to_value(doc).unwrap();
    v["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

#[test]
fn every_route_in_the_code_is_routed_by_the_api_and_only_public_ones_skip_the_authorizer() {
    let t = template();
    let public: BTreeSet<(String, String)> = [
        ("GET", "/health"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/catalog"),
        ("POST", "/webhooks/stripe"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    let mut seen_public = BTreeSet::new();
    for (binary, mut doc) in [
        ("credits-api", documented(credits_api::ApiDoc::openapi())),
        ("purchases", documented(purchases::ApiDoc::openapi())),
        (
            "stripe-webhook",
            documented(tally_stripe_webhook::ApiDoc::openapi()),
        ),
        ("refunds", documented(refunds::ApiDoc::openapi())),
        (
            "support-intake",
            documented(support_intake::ApiDoc::openapi()),
        ),
    ] {
        if binary == "credits-api" {
            doc.insert(("GET".into(), "/health".into()));
            doc.insert(("GET".into(), "/openapi.json".into()));
        }
        let (_, f) = function_for_binary(&t, binary);
        let r = routes(f);
        let in_template: BTreeSet<(String, String)> =
            r.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
        assert_eq!(
            in_template, doc,
            "{binary}: template routes differ from the code's"
        );
        for (m, p, is_public) in r {
            assert_eq!(
                is_public,
                public.contains(&(m.clone(), p.clone())),
                "{m} {p}"
            );
            if is_public {
                seen_public.insert((m, p));
            }
        }
    }
    assert_eq!(seen_public, public);
    let auth = &resource(&t, "HttpApi")["Properties"]["Auth"];
    assert_eq!(auth["DefaultAuthorizer"], "StudioJwt");
    assert!(auth["Authorizers"]["StudioJwt"]["JwtConfiguration"]["issuer"].is_tagged());
}

trait Tagged {
    fn is_tagged(&self) -> bool;
}
impl Tagged for Value {
    fn is_tagged(&self) -> bool {
        matches!(self, Value::Tagged(_))
    }
}

#[test]
fn the_queue_workers_report_partial_batch_failures_and_everything_has_an_alarm() {
    let t = template();
    for (binary, event, queue) in [
        ("billing-events", "Billing", "BillingEventsQueue"),
        ("billing-events", "TopUps", "TopUpsQueue"),
        ("refunds-worker", "Refunds", "RefundsQueue"),
        ("support-forwarder", "Tickets", "SupportTicketsQueue"),
    ] {
        let (_, f) = function_for_binary(&t, binary);
        let sqs = &f["Properties"]["Events"][event];
        assert_eq!(sqs["Type"], "SQS", "{binary}");
        assert_eq!(
            sqs["Properties"]["FunctionResponseTypes"][0],
            "ReportBatchItemFailures"
        );
        assert!(text(&sqs["Properties"]["Queue"]).starts_with(queue));
        let q = resource(&t, queue);
        assert_eq!(q["Properties"]["FifoQueue"], true, "{queue}");
    }
    // The support forwarder's sweep: a schedule, handing tickets to the queue it consumes.
    let (_, f) = function_for_binary(&t, "support-forwarder");
    assert_eq!(f["Properties"]["Events"]["Sweep"]["Type"], "Schedule");
    let sends = f["Properties"]["Policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["Statement"].as_sequence())
        .flatten()
        .any(|s| {
            text(&s["Action"][0]) == "sqs:SendMessage"
                && text(&s["Resource"]).starts_with("SupportTicketsQueue")
        });
    assert!(sends, "the sweep may not send to the support queue");
    let alarms: Vec<&Value> = t["Resources"]
        .as_mapping()
        .unwrap()
        .values()
        .filter(|r| r["Type"] == "AWS::CloudWatch::Alarm")
        .collect();
    for (fname, _) in functions(&t) {
        assert!(
            alarms
                .iter()
                .any(|a| a["Properties"]["MetricName"] == "Errors"
                    && text(&a["Properties"]["Dimensions"][0]["Value"]) == fname),
            "no error alarm for {fname}"
        );
    }
    // The ledger's own metrics: busy answers and the conflict rate, service-wide.
    let busy = resource(&t, "LedgerBusyAlarm");
    assert_eq!(busy["Properties"]["Namespace"], "Tally");
    assert_eq!(busy["Properties"]["MetricName"], "Busy");
    // Every message moved to a dead-letter queue alarms, even while others wait there
    // (the queues' depth alarms stay in alarm and tell only the first).
    let dead = resource(&t, "DeadLetteredAlarm");
    assert_eq!(dead["Properties"]["Namespace"], "Tally");
    assert_eq!(dead["Properties"]["MetricName"], "DeadLettered");
    assert_eq!(dead["Properties"]["Threshold"].as_u64(), Some(0));
    assert_eq!(text(&dead["Properties"]["AlarmActions"][0]), "AlarmTopic");
    // A broken invariant pages at once, whichever function met it.
    let corrupt = resource(&t, "LedgerCorruptAlarm");
    assert_eq!(corrupt["Properties"]["Namespace"], "Tally");
    assert_eq!(corrupt["Properties"]["MetricName"], "Corrupt");
    assert_eq!(corrupt["Properties"]["Threshold"].as_u64(), Some(0));
    assert_eq!(
        text(&corrupt["Properties"]["AlarmActions"][0]),
        "AlarmTopic"
    );
    // Queues holding money events outlive the stack (a delete or a replacement).
    for q in [
        "BillingEventsQueue",
        "BillingEventsDeadLetterQueue",
        "TopUpsQueue",
        "TopUpsDeadLetterQueue",
        "RefundsQueue",
        "RefundsDeadLetterQueue",
    ] {
        let r = resource(&t, q);
        assert_eq!(r["DeletionPolicy"], "Retain", "{q}");
        assert_eq!(r["UpdateReplacePolicy"], "Retain", "{q}");
    }
    // Purchases' chains of Stripe calls get the longest the HTTP API waits.
    let purchases = resource(&t, "PurchasesFunction");
    assert_eq!(purchases["Properties"]["Timeout"].as_u64(), Some(29));
    let rate = resource(&t, "LedgerConflictRateAlarm");
    let metrics = rate["Properties"]["Metrics"].as_sequence().unwrap();
    let names: Vec<String> = metrics
        .iter()
        .filter_map(|m| {
            m["MetricStat"]["Metric"]["MetricName"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(names, vec!["Conflicts", "LedgerOperations"]);
    for m in metrics.iter().filter(|m| m["MetricStat"].is_mapping()) {
        assert_eq!(m["MetricStat"]["Metric"]["Namespace"], "Tally");
        assert_eq!(
            m["MetricStat"]["Metric"]["Dimensions"][0]["Value"],
            tally::metrics::SERVICE
        );
    }
    for dlq in [
        "BillingEventsDeadLetterQueue",
        "TopUpsDeadLetterQueue",
        "RefundsDeadLetterQueue",
        "SupportTicketsDeadLetterQueue",
    ] {
        assert!(
            alarms.iter().any(|a| {
                a["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
                    && text(&a["Properties"]["Dimensions"][0]["Value"]).starts_with(dlq)
            }),
            "no alarm on {dlq}"
        );
    }
}

#[tokio::test]
async fn the_table_the_code_creates_locally_matches_the_templates() {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").expect("run the suite with `make test`");
    let client = tally::store::dynamo::DynamoStore::local_client(&endpoint);
    let table = format!(
        "tally-infra-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    tally::store::dynamo::DynamoStore::create_table(&client, &table)
        .await
        .unwrap();
    let described = client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let keys: Vec<(String, String)> = described
        .table()
        .unwrap()
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_owned(),
                k.key_type().as_str().to_owned(),
            )
        })
        .collect();
    let t = template();
    let expected: Vec<(String, String)> = resource(&t, "Table")["Properties"]["KeySchema"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| (text(&k["AttributeName"]), text(&k["KeyType"])))
        .collect();
    assert_eq!(keys, expected);
    // Every index of the template (the due index and the status index), as the code makes it.
    let gsis = resource(&t, "Table")["Properties"]["GlobalSecondaryIndexes"]
        .as_sequence()
        .unwrap();
    let names: Vec<String> = gsis.iter().map(|g| text(&g["IndexName"])).collect();
    assert_eq!(names, vec![DUE_INDEX.to_owned(), STATUS_INDEX.to_owned()]);
    assert_eq!(
        described.table().unwrap().global_secondary_indexes().len(),
        gsis.len()
    );
    for gsi in gsis {
        let index = described
            .table()
            .unwrap()
            .global_secondary_indexes()
            .iter()
            .find(|i| i.index_name() == Some(text(&gsi["IndexName"]).as_str()))
            .expect("the index exists locally");
        let index_keys: Vec<(String, String)> = index
            .key_schema()
            .iter()
            .map(|k| {
                (
                    k.attribute_name().to_owned(),
                    k.key_type().as_str().to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = gsi["KeySchema"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|k| (text(&k["AttributeName"]), text(&k["KeyType"])))
            .collect();
        assert_eq!(index_keys, expected);
        assert_eq!(
            index
                .projection()
                .and_then(|p| p.projection_type())
                .map(|p| p.as_str()),
            Some(text(&gsi["Projection"]["ProjectionType"]).as_str())
        );
    }
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.attribute_name()),
        Some(TTL)
    );
}

/// The crates a manifest depends on, from its `[dependencies]`, `[build-dependencies]` and
/// `[target.'...'.dependencies]` sections (inline and `[dependencies.name]` forms): each as
/// the name it is declared under, its `package = "..."` rename if any, and its `path` if
/// any. A line-based reading, enough for the manifests of this workspace.
fn normal_dependencies(manifest: &str) -> Vec<(String, Option<String>, Option<String>)> {
    fn quoted_after(line: &str, key: &str) -> Option<String> {
        let at = line.find(key)?;
        let rest = line[at + key.len()..].trim_start().strip_prefix('=')?;
        let rest = rest.trim_start().strip_prefix('"')?;
        Some(rest[..rest.find('"')?].to_owned())
    }
    fn is_dependency_table(header: &str) -> bool {
        header == "dependencies"
            || header == "build-dependencies"
            || (header.starts_with("target.") && header.ends_with(".dependencies"))
    }
    let mut deps: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    // Inside a dependency table, or inside `[dependencies.<name>]` (then its index).
    let mut in_table = false;
    let mut in_single: Option<usize> = None;
    for raw in manifest.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.trim();
            in_table = is_dependency_table(header);
            in_single = None;
            if let Some((table, name)) = header.rsplit_once('.')
                && is_dependency_table(table)
            {
                deps.push((name.trim_matches('"').to_owned(), None, None));
                in_single = Some(deps.len() - 1);
            }
            continue;
        }
        if let Some(i) = in_single {
            if line.starts_with("package") {
                deps[i].1 = quoted_after(line, "package");
            }
            if line.starts_with("path") {
                deps[i].2 = quoted_after(line, "path");
            }
        } else if in_table {
            let key = line
                .split(['=', '.'])
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            deps.push((
                key.to_owned(),
                quoted_after(line, "package"),
                quoted_after(line, "path"),
            ));
        }
    }
    deps
}

#[test]
fn no_function_crate_depends_on_another() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Every crate under functions/, by package name and by folder.
    let mut crates: Vec<(String, String)> = Vec::new();
    for dir in std::fs::read_dir(root.join("functions")).unwrap() {
        let dir = dir.unwrap().path();
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        let package = manifest
            .lines()
            .skip_while(|l| l.trim() != "[package]")
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "name").then(|| v.trim().trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| panic!("{} has no package name", dir.display()));
        let folder = dir.file_name().unwrap().to_str().unwrap().to_owned();
        crates.push((folder, package));
    }
    let folders: BTreeSet<&str> = crates.iter().map(|(f, _)| f.as_str()).collect();
    for expected in [
        "credits-api",
        "purchases",
        "stripe-webhook",
        "billing-events",
        "credit-refresh",
    ] {
        assert!(folders.contains(expected), "functions/{expected} not found");
    }
    // Workspace dependencies resolve to paths in the root manifest.
    let workspace_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let workspace_paths: Vec<(String, String)> = workspace_manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.dependencies]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| {
            let name = l.split(['=', '.']).next()?.trim().trim_matches('"');
            let path = l.split_once("path")?.1.split('"').nth(1)?;
            Some((name.to_owned(), path.to_owned()))
        })
        .collect();
    let is_function = |name: &str, package: Option<&str>, path: Option<&str>| {
        let path = path.map(str::to_owned).or_else(|| {
            workspace_paths
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| format!("../../{p}"))
        });
        crates.iter().any(|(folder, pkg)| {
            let named = [name, package.unwrap_or(name)].contains(&pkg.as_str());
            let under = path.as_deref().is_some_and(|p| {
                let p = p.trim_end_matches('/');
                p.ends_with(&format!("functions/{folder}")) || p == format!("../{folder}")
            });
            named || under
        })
    };
    // The reading catches each way a manifest can name a function crate.
    let sample = "[package]\nname = \"x\"\n[dependencies]\ntally.workspace = true\n\
        credits-api.workspace = true\nwebhook = { package = \"stripe-webhook\", version = \"0.1\" }\n\
        sibling = { path = \"../purchases\" }\n[dev-dependencies]\nbilling-events = { path = \"../billing-events\" }\n\
        [dependencies.tally-local]\npath = \"../local\"\n";
    let caught: Vec<String> = normal_dependencies(sample)
        .into_iter()
        .filter(|(n, p, path)| is_function(n, p.as_deref(), path.as_deref()))
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(caught, ["credits-api", "webhook", "sibling", "tally-local"]);
    // The local runner is the one crate meant to assemble every function.
    for (folder, package) in crates.iter().filter(|(f, _)| f != "local") {
        let manifest =
            std::fs::read_to_string(root.join("functions").join(folder).join("Cargo.toml"))
                .unwrap();
        let deps = normal_dependencies(&manifest);
        assert!(
            deps.iter().any(|(n, _, _)| n == "tally"),
            "{package}: the manifest reading found no dependency on tally"
        );
        for (name, renamed, path) in deps {
            assert!(
                !is_function(&name, renamed.as_deref(), path.as_deref()),
                "{package} depends on the function crate {name}; move what they share into tally"
            );
        }
    }
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The `tally` and `tally-local` entries of a manifest's normal dependency tables
/// (`[dependencies]`, `[target.'..'.dependencies]`, `[dependencies.<name>]`), which are the
/// ones linked into its binary; `[dev-dependencies]` only reach its tests.
fn linked_dependency_lines(manifest: &str) -> Vec<String> {
    let mut section = String::new();
    let mut lines = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            section = header.trim_end_matches(']').trim().to_owned();
            continue;
        }
        let normal = section == "dependencies" || section.ends_with(".dependencies");
        let whole_table = ["dependencies.tally", "dependencies.tally-local"]
            .iter()
            .any(|t| section == *t || section.ends_with(&format!(".{t}")));
        let names_ours = ["tally", "tally-local"].iter().any(|name| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '=', '.']))
        });
        if whole_table || (normal && names_ours) {
            lines.push(line.to_owned());
        }
    }
    lines
}

#[test]
fn the_lambda_functions_link_neither_the_local_feature_nor_the_local_runner() {
    for (binary, _) in tally::config::FUNCTIONS {
        let path = repo(&format!("functions/{binary}/Cargo.toml"));
        let manifest = std::fs::read_to_string(&path).unwrap();
        let linked = linked_dependency_lines(&manifest);
        assert!(
            linked.iter().any(|l| l.starts_with("tally")),
            "{binary} depends on tally: {linked:?}"
        );
        for line in &linked {
            assert!(!line.contains("\"local\""), "{binary}: {line}");
            assert!(!line.starts_with("tally-local"), "{binary}: {line}");
        }
        // A feature of the function's own that switches tally's on would link it too.
        assert!(!manifest.contains("tally/local"), "{binary}");
        assert!(!manifest.contains("tally?/local"), "{binary}");
    }
}

#[test]
fn the_library_includes_no_file_from_the_tests() {
    let tests = repo("tests").canonicalize().unwrap();
    let mut dirs = vec![repo("shared/src")];
    let mut checked = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for mac in ["include_str!(", "include_bytes!("] {
                for (at, _) in text.match_indices(mac) {
                    let rest = &text[at + mac.len()..];
                    let literal = rest.split('"').nth(1).unwrap_or_default();
                    assert!(!literal.contains("tests/"), "{}: {literal}", path.display());
                    let target = path.parent().unwrap().join(literal).canonicalize();
                    let target = target.unwrap_or_else(|e| panic!("{literal}: {e}"));
                    assert!(!target.starts_with(&tests), "{}: {literal}", path.display());
                    checked += 1;
                }
            }
        }
    }
    // The catalog is included; if nothing were found the search itself would be broken.
    assert!(checked > 0);
}

#[test]
fn the_refresh_schedule_has_its_index_queue_redrive_alarm_and_least_privilege() {
    let t = template();
    // The sparse due index: keyed by shard and due time, keys only.
    let table = &resource(&t, "Table")["Properties"];
    let gsi = &table["GlobalSecondaryIndexes"][0];
    assert_eq!(text(&gsi["IndexName"]), DUE_INDEX);
    let keys: Vec<(String, String)> = gsi["KeySchema"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| (text(&k["AttributeName"]), text(&k["KeyType"])))
        .collect();
    assert_eq!(
        keys,
        [
            (DUE_SHARD.to_owned(), "HASH".to_owned()),
            (DUE_AT.to_owned(), "RANGE".to_owned())
        ]
    );
    assert_eq!(gsi["Projection"]["ProjectionType"], "KEYS_ONLY");
    let types: Vec<(String, String)> = table["AttributeDefinitions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| (text(&a["AttributeName"]), text(&a["AttributeType"])))
        .collect();
    assert!(types.contains(&(DUE_SHARD.to_owned(), "S".to_owned())));
    assert!(types.contains(&(DUE_AT.to_owned(), "N".to_owned())));

    // The jobs queue, its redrive and the alarm on its dead letters.
    let q = &resource(&t, "RefreshJobsQueue")["Properties"];
    assert!(text(&q["QueueName"]).ends_with(&format!("-{REFRESH_JOBS_QUEUE}")));
    assert_eq!(
        q["RedrivePolicy"]["maxReceiveCount"].as_u64(),
        Some(REFRESH_JOBS_MAX_RECEIVES as u64)
    );
    assert!(
        text(&q["RedrivePolicy"]["deadLetterTargetArn"]).starts_with("RefreshJobsDeadLetterQueue")
    );
    let dlq = &resource(&t, "RefreshJobsDeadLetterQueue")["Properties"];
    assert!(text(&dlq["QueueName"]).ends_with(&format!("-{REFRESH_JOBS_DLQ}")));
    let (_, f) = function_for_binary(&t, "credit-refresh");
    let timeout = f["Properties"]["Timeout"]
        .as_u64()
        .or_else(|| t["Globals"]["Function"]["Timeout"].as_u64())
        .unwrap();
    assert!(q["VisibilityTimeout"].as_u64().unwrap() >= 6 * timeout);
    assert!(t["Resources"].as_mapping().unwrap().values().any(|r| {
        r["Type"] == "AWS::CloudWatch::Alarm"
            && r["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
            && text(&r["Properties"]["Dimensions"][0]["Value"])
                .starts_with("RefreshJobsDeadLetterQueue")
    }));

    // Its two triggers: the 15-minute schedule and the jobs queue with partial batches.
    let events = &f["Properties"]["Events"];
    let tick = events
        .as_mapping()
        .unwrap()
        .values()
        .find(|e| e["Type"] == "Schedule")
        .expect("a schedule");
    assert_eq!(text(&tick["Properties"]["Schedule"]), "rate(15 minutes)");
    let jobs = events
        .as_mapping()
        .unwrap()
        .values()
        .find(|e| e["Type"] == "SQS")
        .expect("the jobs queue trigger");
    assert!(text(&jobs["Properties"]["Queue"]).starts_with("RefreshJobsQueue"));
    assert_eq!(
        jobs["Properties"]["FunctionResponseTypes"][0],
        "ReportBatchItemFailures"
    );

    // Least privilege: named resources only, no wildcard actions, no scans. (It deletes
    // only the items of the holds it releases; see the test of every function's calls.)
    let policies = serde_yaml::to_string(&f["Properties"]["Policies"]).unwrap();
    for forbidden in [
        "dynamodb:*",
        "sqs:*",
        "Scan",
        "Resource: '*'",
        "Resource: \"*\"",
    ] {
        assert!(!policies.contains(forbidden), "{forbidden} in {policies}");
    }
    assert!(policies.contains("/index/due"), "{policies}");
    assert!(policies.contains("RefreshJobsQueue"), "{policies}");
    // Its jobs and the credit alerts of the balances it lowers; nothing else (its
    // crossings never buy a pack).
    assert!(policies.contains("NotificationsQueue"));
    for other in ["TopUpsQueue", "BillingEventsQueue", "RefundsQueue"] {
        assert!(!policies.contains(other), "{other}");
    }
}

/// The IAM actions (with the table or one of its indexes) that DynamoDB calls need, as AWS
/// authorises them: a transaction's elements each as the single-item action they are
/// (`Put` as `PutItem`, `Delete` as `DeleteItem`, ...), a query of an index on the index.
#[derive(Debug, Clone, Default)]
struct Calls(std::sync::Arc<std::sync::Mutex<BTreeSet<(String, String)>>>);

impl Calls {
    fn taken(&self) -> BTreeSet<(String, String)> {
        self.0.lock().unwrap().clone()
    }
}

impl aws_sdk_dynamodb::config::Intercept for Calls {
    fn name(&self) -> &'static str {
        "iam-actions"
    }

    fn read_before_execution(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextRef<
            '_,
        >,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        use aws_sdk_dynamodb::operation::*;
        let input = context.input();
        let table = || "table".to_owned();
        let mut calls = Vec::new();
        if input.downcast_ref::<get_item::GetItemInput>().is_some() {
            calls.push(("GetItem", table()));
        } else if input.downcast_ref::<put_item::PutItemInput>().is_some() {
            calls.push(("PutItem", table()));
        } else if input
            .downcast_ref::<update_item::UpdateItemInput>()
            .is_some()
        {
            calls.push(("UpdateItem", table()));
        } else if input
            .downcast_ref::<delete_item::DeleteItemInput>()
            .is_some()
        {
            calls.push(("DeleteItem", table()));
        } else if input
            .downcast_ref::<batch_get_item::BatchGetItemInput>()
            .is_some()
        {
            calls.push(("BatchGetItem", table()));
        } else if let Some(q) = input.downcast_ref::<query::QueryInput>() {
            let on = q.index_name().map_or_else(table, |i| format!("index/{i}"));
            calls.push(("Query", on));
        } else if let Some(t) =
            input.downcast_ref::<transact_write_items::TransactWriteItemsInput>()
        {
            for item in t.transact_items() {
                if item.put().is_some() {
                    calls.push(("PutItem", table()));
                }
                if item.update().is_some() {
                    calls.push(("UpdateItem", table()));
                }
                if item.delete().is_some() {
                    calls.push(("DeleteItem", table()));
                }
                if item.condition_check().is_some() {
                    calls.push(("ConditionCheckItem", table()));
                }
            }
        } else {
            // Any other call is new to this list: it must be added here (and to the
            // policies) rather than pass unnoticed.
            calls.push(("a call this test does not know", format!("{input:?}")));
        }
        let mut taken = self.0.lock().unwrap();
        for (action, on) in calls {
            taken.insert((format!("dynamodb:{action}"), on));
        }
        Ok(())
    }
}

/// The same table through a client that records its calls in `calls`.
fn recorded(
    plain: &tally::store::dynamo::DynamoStore,
    calls: &Calls,
) -> tally::store::dynamo::DynamoStore {
    let config = plain
        .client()
        .config()
        .to_builder()
        .interceptor(calls.clone())
        .build();
    tally::store::dynamo::DynamoStore::new(
        aws_sdk_dynamodb::Client::from_conf(config),
        plain.table(),
    )
}

/// What a function's policies allow on the table: `(action, "table" | "index/<name>")`.
fn table_grants(f: &Value) -> BTreeSet<(String, String)> {
    let mut grants = BTreeSet::new();
    for policy in f["Properties"]["Policies"].as_sequence().unwrap() {
        let Some(statements) = policy["Statement"].as_sequence() else {
            continue;
        };
        for s in statements {
            let on = text(&s["Resource"]);
            let on = if on == "Table.Arn" {
                "table".to_owned()
            } else if let Some(index) = on.strip_prefix("${Table.Arn}/") {
                index.to_owned()
            } else {
                continue;
            };
            assert_eq!(s["Effect"], "Allow");
            for action in s["Action"].as_sequence().unwrap() {
                grants.insert((text(action), on.clone()));
            }
        }
    }
    grants
}

/// Whether a function's own sources run ledger operations.
fn runs_the_ledger(binary: &str) -> bool {
    source_contains(binary, "Ledger::new(")
}

/// Whether a source file of the function's crate contains `text`.
fn source_contains(binary: &str, text: &str) -> bool {
    let dir = repo(&format!("functions/{binary}/src"));
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read_to_string(&p).unwrap().contains(text) {
                return true;
            }
        }
    }
    false
}

/// Every call the store makes in AWS must be allowed by the policies of the functions that
/// make it, or the function fails there with `AccessDenied` while every local test passes
/// (neither emulator checks IAM). The calls are recorded from a real workload against the
/// DynamoDB-compatible server: every ledger operation kind that writes (a hold closed by a
/// completion, a failure and by running past its deadline deletes its hold item), every
/// read of the ledger and every document call.
#[tokio::test]
async fn every_function_may_make_every_dynamodb_call_its_code_makes_and_no_other() {
    use tally::clock::Clock;
    use tally::ids::{GenerationId, IdempotencyKey};
    use tally::ledger::{Actor, ActorKind, GenerationStatus, Operation, Refs};
    use tally::service::LedgerRequest;
    use tally::store::docs::{DocStore, DueMark};
    use tally::store::{EntryQuery, GenerationQuery, LedgerStore};

    let plain = tally_tests::dynamo_table().await;
    let calls = Calls::default();
    let store = std::sync::Arc::new(recorded(&plain, &calls));
    let (ledger, clock) = tally_tests::ledger_over(store.clone());
    let ws = "org_iam";
    tally_tests::grant(&ledger, ws, 1_000).await;
    let estimate = tally_tests::image_estimate(&ledger);
    let hour = chrono::Duration::hours(1);
    let settle = |key: &str, op: Operation| LedgerRequest {
        workspace: tally_tests::workspace(ws),
        key: IdempotencyKey::derived(key.into()),
        fingerprint: key.into(),
        actor: Actor::new(ActorKind::Service, "generation-service"),
        refs: Refs::default(),
        op,
    };
    let (done, failed, late) = (
        GenerationId::new(),
        GenerationId::new(),
        GenerationId::new(),
    );
    for g in [done, failed, late] {
        let hold = tally_tests::hold_request(ws, g, &estimate, clock.now() + hour);
        ledger.execute(hold.clone()).await.unwrap();
        ledger.execute(hold).await.unwrap(); // a replay
    }
    let complete = Operation::Complete {
        generation: done,
        credits: None,
        record: None,
    };
    ledger.execute(settle("complete", complete)).await.unwrap();
    let fail = Operation::Fail {
        generation: failed,
        reason: "worker crashed".into(),
        record: None,
    };
    ledger.execute(settle("fail", fail)).await.unwrap();
    clock.advance(hour * 2);
    ledger
        .execute(settle("settle", Operation::Settle))
        .await
        .unwrap();
    let mut huge = estimate.clone();
    huge.credits = tally::money::Credits::new(1_000_000);
    let refused = tally_tests::hold_request(ws, GenerationId::new(), &huge, clock.now() + hour);
    assert!(ledger.execute(refused).await.is_err());

    let w = tally_tests::workspace(ws);
    ledger.workspace_now(&w).await.unwrap();
    assert!(store.generation(&w, late).await.unwrap().is_some());
    assert!(store.generation_owner(late).await.unwrap().is_some());
    let all = GenerationQuery {
        limit: 10,
        ..GenerationQuery::default()
    };
    assert_eq!(store.generations(&w, &all).await.unwrap().len(), 3);
    let entries = store
        .entries(
            &w,
            &EntryQuery {
                before: None,
                limit: 5,
            },
        )
        .await
        .unwrap();
    store.entries_by_seq(&w, &[entries[0].seq]).await.unwrap();
    store.open_holds(&w, None, 10).await.unwrap();

    let pk = format!("WORKSPACE#{ws}");
    assert!(store.put_doc(&pk, "DOC#a", "{}", 0).await.unwrap());
    assert!(store.get_doc(&pk, "DOC#a").await.unwrap().is_some());
    store.list_docs(&pk, "DOC#", 10).await.unwrap();
    let due = DueMark {
        shard: 0,
        at: clock.now(),
    };
    assert!(
        store
            .put_doc_due(&pk, "DOC#b", "{}", 0, Some(due))
            .await
            .unwrap()
    );
    store.due_docs(0, clock.now() + hour, 10).await.unwrap();

    // Creation history filtered by status (credits-api only), over a generation item as
    // the release before the status index wrote it, which the read files into the index.
    tally_tests::as_before_the_status_index(&plain, ws, &[late]).await;
    let filtered = Calls::default();
    let history = recorded(&plain, &filtered).with_status_settling(chrono::Duration::zero());
    let expired = GenerationQuery {
        status: Some(GenerationStatus::Expired),
        limit: 10,
        ..GenerationQuery::default()
    };
    for _ in 0..2 {
        let listed = history.generations(&w, &expired).await.unwrap();
        assert_eq!(listed.iter().map(|g| g.id).collect::<Vec<_>>(), [late]);
    }
    let filtered = filtered.taken();
    assert!(filtered.contains(&("dynamodb:UpdateItem".to_owned(), "table".to_owned())));

    let taken = calls.taken();
    assert!(
        !taken.iter().any(|(a, _)| a.contains("does not know")),
        "{taken:?}"
    );
    let on_table: BTreeSet<_> = taken
        .iter()
        .filter(|(_, on)| on == "table")
        .cloned()
        .collect();
    // Without these the ledger cannot work in AWS at all: its read is a `BatchGetItem` and
    // closing a hold deletes the hold's item.
    for needed in ["dynamodb:BatchGetItem", "dynamodb:DeleteItem"] {
        assert!(on_table.contains(&(needed.to_owned(), "table".to_owned())));
    }

    let t = template();
    let mut ledger_functions = Vec::new();
    for (name, f) in functions(&t) {
        let binary = text(&f["Metadata"]["BuildProperties"]["Binary"]);
        let grants = table_grants(f);
        // Least privilege: nothing the code never asks for.
        let asked: BTreeSet<_> = taken.union(&filtered).cloned().collect();
        let unused: Vec<_> = grants.difference(&asked).collect();
        assert!(
            unused.is_empty(),
            "{name} is allowed {unused:?}, which no code calls"
        );
        if runs_the_ledger(&binary) {
            ledger_functions.push(binary.clone());
            let missing: Vec<_> = on_table.difference(&grants).collect();
            assert!(
                missing.is_empty(),
                "{name} runs ledger operations but may not call {missing:?}"
            );
        }
        if binary == "credits-api" {
            let missing: Vec<_> = filtered.difference(&grants).collect();
            assert!(
                missing.is_empty(),
                "{name} lists creation history by status but may not call {missing:?}"
            );
        }
        let index = |i: &str| (String::from("dynamodb:Query"), format!("index/{i}"));
        // Only creation history filtered by status reads the status index; only the
        // schedules (the credit refresh's, the support forwarder's sweep) read the due
        // index.
        assert_eq!(
            grants.contains(&index(STATUS_INDEX)),
            binary == "credits-api",
            "{name} and the status index"
        );
        assert_eq!(
            grants.contains(&index(DUE_INDEX)),
            ["credit-refresh", "support-forwarder"].contains(&binary.as_str()),
            "{name} and the due index"
        );
    }
    assert!(filtered.contains(&("dynamodb:Query".to_owned(), format!("index/{STATUS_INDEX}"))));
    assert!(taken.contains(&("dynamodb:Query".to_owned(), format!("index/{DUE_INDEX}"))));
    ledger_functions.sort();
    assert_eq!(
        ledger_functions,
        [
            "billing-events",
            "credit-refresh",
            "credits-api",
            "purchases",
            "refunds",
            "support-intake"
        ]
    );
}

/// What only a deployed stack shows: secrets read again when they change, queue workers
/// given the time their batches can take, server errors of the API alarmed, and an origin
/// CORS can match.
#[test]
fn secrets_worker_timeouts_server_errors_and_the_app_origin_are_deployable() {
    let t = template();
    // A dynamic reference to a secret is resolved only when its function is updated: the
    // revision, a parameter every function's environment carries, updates them all.
    let global = &t["Globals"]["Function"]["Environment"]["Variables"];
    assert_eq!(text(&global["TALLY_SECRETS_REVISION"]), "SecretsRevision");
    assert!(t["Parameters"]["SecretsRevision"].is_mapping());
    let mut resolving = 0;
    for (name, f) in functions(&t) {
        let env = serde_yaml::to_string(&f["Properties"]["Environment"]).unwrap();
        if env.contains("{{resolve:secretsmanager:") {
            resolving += 1;
            assert!(
                f["Properties"]["Environment"]["Variables"]["TALLY_SECRETS_REVISION"].is_null(),
                "{name} must take the revision from the globals"
            );
        }
    }
    assert_eq!(resolving, 5);

    // A batch of the billing and refund workers fits in their timeout however each
    // message goes: a ledger operation out of retries and a Stripe call timing out; for a
    // top-up, each of its Stripe calls timing out.
    let stripe = tally::payments::stripe_api::STRIPE_ATTEMPT_TIMEOUT;
    let ledger_and_stripe = tally::service::LAMBDA_RETRY_BUDGET + stripe;
    for (binary, queue, per_message) in [
        ("billing-events", "BillingEventsQueue", ledger_and_stripe),
        // The charge, then the invoice: the customer, the invoice, its line, finalizing,
        // paying and, when paying fails, voiding.
        ("billing-events", "TopUpsQueue", stripe * 7),
        ("refunds-worker", "RefundsQueue", ledger_and_stripe),
    ] {
        let (name, f) = function_for_binary(&t, binary);
        let timeout = f["Properties"]["Timeout"].as_u64().unwrap();
        let trigger = f["Properties"]["Events"]
            .as_mapping()
            .unwrap()
            .values()
            .find(|e| e["Type"] == "SQS" && text(&e["Properties"]["Queue"]).starts_with(queue))
            .unwrap_or_else(|| panic!("{name} consumes {queue}"));
        let batch = trigger["Properties"]["BatchSize"].as_u64().unwrap();
        assert!(
            per_message.as_secs() * batch < timeout,
            "{name}: {batch} messages may take {} s, more than its {timeout} s",
            per_message.as_secs() * batch
        );
        let visibility = resource(&t, queue)["Properties"]["VisibilityTimeout"]
            .as_u64()
            .unwrap();
        assert!(visibility >= 6 * timeout, "{queue} {visibility} s");
    }

    // Server errors of the API: an alarm on API Gateway's own count.
    let alarm = resource(&t, "HttpApiServerErrorsAlarm");
    assert_eq!(alarm["Properties"]["Namespace"], "AWS/ApiGateway");
    assert_eq!(alarm["Properties"]["MetricName"], "5xx");
    let dims = alarm["Properties"]["Dimensions"].as_sequence().unwrap();
    assert!(
        dims.iter()
            .any(|d| d["Name"] == "ApiId" && text(&d["Value"]) == "HttpApi")
    );
    assert!(
        dims.iter()
            .any(|d| d["Name"] == "Stage" && d["Value"] == "$default")
    );
    assert_eq!(text(&alarm["Properties"]["AlarmActions"][0]), "AlarmTopic");

    // The app's URL is the origin CORS allows: no path, no trailing slash.
    assert_eq!(
        text(&t["Parameters"]["AppUrl"]["AllowedPattern"]),
        "^https?://[a-z0-9.-]+(:[0-9]+)?$"
    );
}

/// The help centre promises that the billing portal returns to the pricing page; checkout
/// returns to billing, where the purchase shows.
#[test]
fn the_billing_portal_returns_to_the_pricing_page() {
    let t = template();
    let (_, f) = function_for_binary(&t, "purchases");
    let env = &f["Properties"]["Environment"]["Variables"];
    assert_eq!(
        text(&env[tally::config::PORTAL_RETURN_URL]),
        "${AppUrl}/pricing"
    );
    assert_eq!(text(&env["TALLY_CHECKOUT_CANCEL_URL"]), "${AppUrl}/billing");
}
