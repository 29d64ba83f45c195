//! Log lines land on the request that caused them. Requests on one thread interleave at
//! every `.await`, so a handler's span must be current only while its own future runs: a
//! span entered with a guard held across an `.await` stays current while other requests
//! run, and their lines (and spans) end up nested under it.
//!
//! Sixteen generations are started, then settled, concurrently through the local router on
//! a current-thread runtime, and support staff adjust sixteen workspaces at once; a
//! recording layer notes, for every "operation applied" line the ledger logs, the
//! `generation` and `workspace` fields of the spans around it.

use axum::http::Method;
use serde_json::{Value, json};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tally_tests::{TestApp, grant, member, service, support};
use tokio::task::JoinSet;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

const REQUESTS: usize = 16;

/// The fields this test reads, from a span or an event.
#[derive(Default)]
struct Fields {
    generation: Option<String>,
    workspace: Option<String>,
    key: Option<String>,
    message: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field, format!("{value:?}"));
    }
}

impl Fields {
    fn set(&mut self, field: &Field, value: String) {
        match field.name() {
            "generation" => self.generation = Some(value),
            "workspace" => self.workspace = Some(value),
            "key" => self.key = Some(value),
            "message" => self.message = Some(value),
            _ => {}
        }
    }
}

/// One "operation applied" line: the idempotency key of the ledger call that logged it,
/// and every `generation` and `workspace` field in its span scope, nearest first.
#[derive(Debug)]
struct Applied {
    key: Option<String>,
    generations: Vec<String>,
    workspaces: Vec<String>,
}

/// Records "operation applied" lines, and how many request spans (those with a
/// `generation`) were open at once, which shows the requests really overlapped.
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<Applied>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
}

#[derive(Clone)]
struct RecorderLayer(Arc<Recorder>);

impl<S> Layer<S> for RecorderLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if fields.generation.is_some() {
            let open = self.0.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.0.most_open.fetch_max(open, Ordering::SeqCst);
        }
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span
            .extensions()
            .get::<Fields>()
            .is_some_and(|f| f.generation.is_some())
        {
            self.0.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message.as_deref() != Some("operation applied") {
            return;
        }
        let mut applied = Applied {
            key: None,
            generations: Vec::new(),
            workspaces: Vec::new(),
        };
        for span in ctx.event_scope(event).into_iter().flatten() {
            let extensions = span.extensions();
            let Some(f) = extensions.get::<Fields>() else {
                continue;
            };
            if applied.key.is_none() {
                applied.key = f.key.clone();
            }
            applied.generations.extend(f.generation.clone());
            applied.workspaces.extend(f.workspace.clone());
        }
        self.0.applied.lock().unwrap().push(applied);
    }
}

/// One request of a concurrent batch.
struct Call {
    path: String,
    token: String,
    body: Value,
    idempotency_key: Option<String>,
}

/// Sends every call at once and returns the answers in order.
async fn concurrently(app: &Arc<TestApp>, calls: Vec<Call>) -> Vec<Value> {
    let mut set = JoinSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let app = app.clone();
        set.spawn(async move {
            let headers: Vec<(&str, &str)> = call
                .idempotency_key
                .as_deref()
                .map(|k| ("idempotency-key", k))
                .into_iter()
                .collect();
            let body = call.body.to_string();
            let answer = app
                .send(
                    Method::POST,
                    &call.path,
                    Some(&call.token),
                    Some(&body),
                    &headers,
                )
                .await;
            assert!(
                answer.status.is_success(),
                "{}: {:#}",
                call.path,
                answer.body
            );
            (i, answer.body)
        });
    }
    let mut answers = set.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, body)| body).collect()
}

/// The generation an "operation applied" line is about, from its ledger key
/// (`gen:<id>:hold`, `gen:<id>:complete`, `gen:<id>:fail`).
fn generation_of(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("gen:")?;
    rest.split_once(':')
}

/// Checks the lines recorded since the last check: one per expected `(generation, step)`,
/// each under its own request's span and no other's.
fn assert_own_lines(recorder: &Recorder, expected: &[(String, &str)]) {
    let applied = std::mem::take(&mut *recorder.applied.lock().unwrap());
    let mut seen: Vec<(String, &str)> = Vec::new();
    for line in &applied {
        let key = line.key.as_deref().expect("the ledger call has a key");
        // Other ledger calls (the test's own grant) belong to no request.
        let Some((generation, step)) = generation_of(key) else {
            assert!(line.generations.is_empty(), "{line:?}");
            continue;
        };
        assert_eq!(
            line.generations,
            [generation.to_owned()],
            "the line applying {key} must sit under that request's span only"
        );
        let step = ["hold", "complete", "fail"]
            .into_iter()
            .find(|s| *s == step)
            .unwrap_or_else(|| panic!("unexpected ledger key {key}"));
        seen.push((generation.to_owned(), step));
    }
    seen.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(seen, expected, "one line per generation and step");
}

/// Checks the adjustment lines recorded since the last check: one per workspace, each
/// under that workspace's request span and no other's.
fn assert_own_adjustment_lines(recorder: &Recorder, workspaces: &[String]) {
    let applied = std::mem::take(&mut *recorder.applied.lock().unwrap());
    let mut seen: Vec<String> = Vec::new();
    for line in &applied {
        let key = line.key.as_deref().expect("the ledger call has a key");
        let Some(workspace) = key.strip_prefix("client:adjustments:adjust-") else {
            continue;
        };
        // The ledger's own span and the request's both name the workspace.
        assert_eq!(
            line.workspaces,
            [workspace, workspace],
            "the line applying {key} must sit under that request's span only"
        );
        assert!(line.generations.is_empty(), "{line:?}");
        seen.push(workspace.to_owned());
    }
    seen.sort();
    let mut expected = workspaces.to_vec();
    expected.sort();
    assert_eq!(seen, expected, "one line per adjustment");
}

#[test]
fn concurrent_requests_log_under_their_own_request() {
    let recorder = Arc::new(Recorder::default());
    let subscriber = tracing_subscriber::registry().with(RecorderLayer(recorder.clone()));
    // For this thread only: other tests run on other threads at the same time.
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let app = Arc::new(TestApp::new());
        grant(&app.ledger, "org_logs", 1000).await;
        let token = member("org_logs", "m1");
        let video = json!({"workflow": "video", "model": "video-pro", "duration_s": 10, "resolution": "2k"});

        let started = concurrently(
            &app,
            (0..REQUESTS)
                .map(|_| Call {
                    path: "/v1/generations".into(),
                    token: token.clone(),
                    body: video.clone(),
                    idempotency_key: None,
                })
                .collect(),
        )
        .await;
        let ids: Vec<String> = started
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect();
        let holds: Vec<(String, &str)> = ids.iter().map(|id| (id.clone(), "hold")).collect();
        assert_own_lines(&recorder, &holds);

        // Half complete, half fail, all at once.
        let (completing, failing) = ids.split_at(REQUESTS / 2);
        let settler = service();
        let settle = |path: String, body: Value| Call {
            path,
            token: settler.clone(),
            body,
            idempotency_key: None,
        };
        let calls = completing
            .iter()
            .map(|id| settle(format!("/v1/generations/{id}/complete"), json!({})))
            .chain(failing.iter().map(|id| {
                settle(
                    format!("/v1/generations/{id}/fail"),
                    json!({"reason": "x"}),
                )
            }))
            .collect();
        concurrently(&app, calls).await;
        let settled: Vec<(String, &str)> = completing
            .iter()
            .map(|id| (id.clone(), "complete"))
            .chain(failing.iter().map(|id| (id.clone(), "fail")))
            .collect();
        assert_own_lines(&recorder, &settled);

        // Support staff adjust many workspaces at once.
        // Only workspaces that exist are adjusted.
        let workspaces: Vec<String> = (0..REQUESTS).map(|i| format!("org_adj{i}")).collect();
        for ws in &workspaces {
            grant(&app.ledger, ws, 1).await;
        }
        let calls = workspaces
            .iter()
            .map(|ws| Call {
                path: format!("/v1/admin/workspaces/{ws}/adjustments"),
                token: support(),
                body: json!({"credits": 5, "reason": "goodwill"}),
                idempotency_key: Some(format!("adjust-{ws}")),
            })
            .collect();
        concurrently(&app, calls).await;
        assert_own_adjustment_lines(&recorder, &workspaces);
    });
    assert!(
        recorder.most_open.load(Ordering::SeqCst) > 1,
        "the requests never overlapped, so this test proves nothing"
    );
}
