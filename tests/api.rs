//! The credits API as a client sees it, through the same router `make run` serves.

use axum::http::Method;
use chrono::Duration;
use serde_json::{Value, json};
use tally::clock::Clock;
use tally_tests::{TestApp, grant, member, owner, service, support, token};

fn video() -> Value {
    json!({"workflow": "video", "model": "video-pro", "duration_s": 10, "resolution": "2k"})
}

async fn start(app: &TestApp, tok: &str, body: Value) -> Value {
    let a = app.post("/v1/generations", tok, body).await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    a.body
}

async fn available(app: &TestApp, tok: &str) -> u64 {
    app.get("/v1/balance", tok).await.body["available"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn health_openapi_and_catalog_need_no_token() {
    let app = TestApp::new();
    let h = app.send(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(h.body["status"], "ok");
    let doc = app
        .send(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(doc.body["openapi"], "3.1.0");
    for path in [
        "/v1/balance",
        "/v1/generations",
        "/v1/generations/{id}/complete",
        "/v1/ledger",
    ] {
        assert!(doc.body["paths"][path].is_object(), "{path} documented");
    }
    let c = app.send(Method::GET, "/v1/catalog", None, None, &[]).await;
    assert_eq!(c.status.as_u16(), 200);
    let max = c.body["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "max")
        .unwrap();
    assert_eq!(max["monthly_credits"], 400);
    assert_eq!(max["yearly_price_cents"], 20880);
    let workflows: Vec<&str> = c.body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["workflow"].as_str().unwrap())
        .collect();
    for w in ["image", "video", "avatar", "training"] {
        assert!(workflows.contains(&w), "{w}");
    }
    let res: Vec<&str> = c.body["resolutions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(res, vec!["1080p", "2k", "4k"]);
}

#[tokio::test]
async fn missing_forged_and_expired_tokens_get_401_problems() {
    let app = TestApp::new();
    app.send(Method::GET, "/v1/balance", None, None, &[])
        .await
        .assert_problem(401, "unauthorized");
    let forged = tally::http::auth::dev_token(
        b"not-the-secret",
        &json!({"sub": "x", "org_id": "a", "role": "owner", "exp": chrono::Utc::now().timestamp() + 60}),
    );
    app.get("/v1/balance", &forged)
        .await
        .assert_problem(401, "unauthorized");
    let expired = tally::http::auth::dev_token(
        tally_tests::SECRET.as_bytes(),
        &json!({"sub": "x", "org_id": "a", "role": "owner", "exp": 1}),
    );
    app.get("/v1/balance", &expired)
        .await
        .assert_problem(401, "unauthorized");
    // A staff token without a workspace cannot read balances.
    app.get("/v1/balance", &service())
        .await
        .assert_problem(403, "forbidden");
}

#[tokio::test]
async fn estimates_price_by_model_resolution_duration_and_count() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 20).await;
    let tok = member("org_a", "m1");
    let e = app.post("/v1/estimates", &tok, video()).await;
    assert_eq!(e.body["credits"], 24);
    assert_eq!(e.body["multiplier"], 2);
    assert_eq!(e.body["sufficient"], false);
    assert_eq!(e.body["available"], 20);
    let img = app
        .post(
            "/v1/estimates",
            &tok,
            json!({"workflow": "image", "model": "flux-schnell", "count": 4, "resolution": "4k"}),
        )
        .await;
    assert_eq!(img.body["credits"], 24);
    let train = app
        .post(
            "/v1/estimates",
            &tok,
            json!({"workflow": "training", "model": "custom-model"}),
        )
        .await;
    assert_eq!(train.body["credits"], 400);
}

#[tokio::test]
async fn a_generation_holds_its_estimate_then_charges_the_exact_cost_once() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let m = member("org_a", "m1");
    let g = start(&app, &m, video()).await;
    assert_eq!(
        (g["status"].as_str(), g["held"].as_u64()),
        (Some("held"), Some(24))
    );
    let bal = app.get("/v1/balance", &m).await.body;
    assert_eq!(
        (bal["available"].as_u64(), bal["held"].as_u64()),
        (Some(76), Some(24))
    );
    let id = g["id"].as_str().unwrap();
    let done = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": 18}),
        )
        .await;
    assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
    assert_eq!(
        (done.body["status"].as_str(), done.body["charged"].as_u64()),
        (Some("completed"), Some(18))
    );
    // A repeat returns the first result and charges nothing more; another amount under
    // the same completion is a conflict, not the first result.
    let again = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": 18}),
        )
        .await;
    assert_eq!(again.body, done.body);
    app.post(
        &format!("/v1/generations/{id}/complete"),
        &service(),
        json!({"credits": 5}),
    )
    .await
    .assert_problem(409, "conflict");
    // No amount means the estimate (24), which is not what was charged: a conflict too.
    app.post(
        &format!("/v1/generations/{id}/complete"),
        &service(),
        json!({}),
    )
    .await
    .assert_problem(409, "conflict");
    app.post(&format!("/v1/generations/{id}/complete"), &m, json!({}))
        .await
        .assert_problem(403, "forbidden");
    assert_eq!(available(&app, &m).await, 82);
    // Both spellings of a completion at the estimate are the same request, either way round.
    for (first, second) in [
        (json!({}), json!({"credits": 24})),
        (json!({"credits": 24}), json!({})),
    ] {
        let g = start(&app, &m, video()).await;
        let id = g["id"].as_str().unwrap();
        let path = format!("/v1/generations/{id}/complete");
        let a = app.post(&path, &service(), first).await;
        assert_eq!(a.status.as_u16(), 200, "{:#}", a.body);
        let b = app.post(&path, &service(), second).await;
        assert_eq!(b.body, a.body, "the first result, not a conflict");
        app.post(&path, &service(), json!({"credits": 23}))
            .await
            .assert_problem(409, "conflict");
    }
    assert_eq!(available(&app, &m).await, 82 - 48);
    app.post(
        &format!("/v1/generations/{id}/fail"),
        &service(),
        json!({"reason": "late"}),
    )
    .await
    .assert_problem(409, "conflict");
    let detail = app.get(&format!("/v1/generations/{id}"), &m).await.body;
    let reasons: Vec<&str> = detail["ledger_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["hold_placed", "generation_charged"]);
    assert_eq!(detail["estimate"]["model"], "video-pro");
}

#[tokio::test]
async fn a_failed_generation_costs_nothing_and_cannot_be_completed_afterwards() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 50).await;
    let m = member("org_a", "m1");
    let g = start(
        &app,
        &m,
        json!({"workflow": "image", "model": "imagen-3", "count": 2}),
    )
    .await;
    let id = g["id"].as_str().unwrap();
    let f = app
        .post(
            &format!("/v1/generations/{id}/fail"),
            &service(),
            json!({"reason": "provider timeout"}),
        )
        .await;
    assert_eq!(
        (f.body["status"].as_str(), f.body["charged"].as_u64()),
        (Some("failed"), Some(0))
    );
    assert_eq!(f.body["failure_reason"], "provider timeout");
    let again = app
        .post(
            &format!("/v1/generations/{id}/fail"),
            &service(),
            json!({"reason": "other"}),
        )
        .await;
    assert_eq!(again.body, f.body);
    app.post(
        &format!("/v1/generations/{id}/complete"),
        &service(),
        json!({}),
    )
    .await
    .assert_problem(409, "conflict");
    assert_eq!(available(&app, &m).await, 50);
}

#[tokio::test]
async fn a_generation_beyond_the_balance_is_refused_with_402_and_nothing_changes() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 10).await;
    let m = member("org_a", "m1");
    let before = app.entry_count("org_a").await;
    let a = app.post("/v1/generations", &m, video()).await;
    a.assert_problem(402, "insufficient_credits");
    assert_eq!(a.body["facts"], json!({"needed": 24, "available": 10}));
    assert_eq!(app.entry_count("org_a").await, before);
    assert!(
        app.get("/v1/generations", &m).await.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn only_the_generation_service_settles_even_the_starter_cannot() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let g = start(&app, &member("org_a", "m1"), video()).await;
    let id = g["id"].as_str().unwrap();
    let before = app.entry_count("org_a").await;
    // Neither the starter (at the estimate or at a price), another member nor the owner
    // may settle: the work is still running and only the service knows how it ended.
    for (who, body) in [
        (member("org_a", "m1"), json!({"credits": 1})),
        (member("org_a", "m1"), json!({})),
        (member("org_a", "m2"), json!({})),
        (owner("org_a"), json!({})),
    ] {
        app.post(&format!("/v1/generations/{id}/complete"), &who, body)
            .await
            .assert_problem(403, "forbidden");
        app.post(
            &format!("/v1/generations/{id}/fail"),
            &who,
            json!({"reason": "x"}),
        )
        .await
        .assert_problem(403, "forbidden");
    }
    assert_eq!(app.entry_count("org_a").await, before);
    let done = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({}),
        )
        .await;
    assert_eq!(done.body["charged"], 24);
}

#[tokio::test]
async fn no_request_reaches_another_workspaces_data() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    grant(&app.ledger, "org_b", 7).await;
    let a = member("org_a", "m1");
    let b = member("org_b", "intruder");
    let g = start(&app, &a, video()).await;
    let id = g["id"].as_str().unwrap();
    app.get(&format!("/v1/generations/{id}"), &b)
        .await
        .assert_problem(404, "not_found");
    // Members settle nothing, theirs or not: the same 403 for an existing generation of
    // another workspace as for one that does not exist.
    for target in [id.to_owned(), tally::ids::GenerationId::new().to_string()] {
        app.post(&format!("/v1/generations/{target}/complete"), &b, json!({}))
            .await
            .assert_problem(403, "forbidden");
        app.post(
            &format!("/v1/generations/{target}/fail"),
            &b,
            json!({"reason": "x"}),
        )
        .await
        .assert_problem(403, "forbidden");
    }
    // A settle token bound to another workspace cannot reach it either.
    let bound = token(json!({"sub": "svc", "org_id": "org_b", "scope": "credits:settle"}));
    app.post(&format!("/v1/generations/{id}/complete"), &bound, json!({}))
        .await
        .assert_problem(404, "not_found");
    assert!(
        app.get("/v1/generations", &b).await.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let b_ledger = app.get("/v1/ledger", &b).await.body;
    assert_eq!(b_ledger["items"].as_array().unwrap().len(), 1);
    assert_eq!(available(&app, &b).await, 7);
    let a_view = app.get(&format!("/v1/generations/{id}"), &a).await;
    assert_eq!(a_view.body["status"], "held");
}

#[tokio::test]
async fn bad_input_is_refused_with_problem_details_and_changes_nothing() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let m = member("org_a", "m1");
    let before = app.entry_count("org_a").await;
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "malformed_request"),
        // A key named twice: readers disagree on which one counts.
        (
            r#"{"workflow":"image","model":"imagen-3","count":1,"count":4}"#,
            400,
            "malformed_request",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","inputs":{"a":1,"a":2}}"#,
            400,
            "malformed_request",
        ),
        (
            r#"{"workflow":"video","model":"video-pro","duration_s":"ten"}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"video","model":"video-pro","duration_s":-5}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"video","model":"video-pro","duration_s":99999999999}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"video","model":"video-pro"}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"image","model":"nope"}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","count":0}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","count":1000}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","resolution":"8k"}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","credits":1}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"workflow":"music","model":"imagen-3"}"#,
            422,
            "validation_failed",
        ),
        (r#"[]"#, 422, "validation_failed"),
    ];
    for (body, status, code) in cases {
        let a = app
            .send(Method::POST, "/v1/generations", Some(&m), Some(body), &[])
            .await;
        a.assert_problem(status, code);
    }
    // A value of the wrong type or range names its field.
    for (body, field) in [
        (
            r#"{"workflow":"video","model":"video-pro","duration_s":-5}"#,
            "duration_s",
        ),
        (
            r#"{"workflow":"video","model":"video-pro","duration_s":"ten"}"#,
            "duration_s",
        ),
        (
            r#"{"workflow":"image","model":"imagen-3","count":-1}"#,
            "count",
        ),
    ] {
        let a = app
            .send(Method::POST, "/v1/estimates", Some(&m), Some(body), &[])
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{}", a.body);
        assert!(
            a.body["detail"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}: ")),
            "{}",
            a.body
        );
    }
    let no_type = app
        .send(Method::POST, "/v1/generations", Some(&m), None, &[])
        .await;
    no_type.assert_problem(415, "unsupported_media_type");
    let big = format!(
        r#"{{"workflow":"image","model":"{}"}}"#,
        "x".repeat(100_000)
    );
    app.send(Method::POST, "/v1/generations", Some(&m), Some(&big), &[])
        .await
        .assert_problem(413, "payload_too_large");

    let g = start(&app, &m, video()).await;
    let id = g["id"].as_str().unwrap();
    let held = app.entry_count("org_a").await;
    for (body, status) in [
        (json!({"credits": -1}), 422),
        (json!({"credits": 0}), 422),
        (json!({"credits": 1e12}), 422),
        (json!({"credits": "5"}), 422),
        (json!({"credits": 10_000_001}), 422),
    ] {
        let a = app
            .post(&format!("/v1/generations/{id}/complete"), &service(), body)
            .await;
        assert_eq!(a.status.as_u16(), status, "{:#}", a.body);
        assert_eq!(a.content_type, "application/problem+json");
    }
    app.post("/v1/generations/not-an-id/complete", &service(), json!({}))
        .await
        .assert_problem(422, "validation_failed");
    app.post(
        &format!(
            "/v1/generations/{}/complete",
            tally::ids::GenerationId::new()
        ),
        &service(),
        json!({}),
    )
    .await
    .assert_problem(404, "not_found");
    app.post(
        &format!("/v1/generations/{id}/fail"),
        &service(),
        json!({"reason": ""}),
    )
    .await
    .assert_problem(422, "validation_failed");
    app.get("/v1/generations?limit=0", &m)
        .await
        .assert_problem(422, "validation_failed");
    app.get("/v1/generations?status=lost", &m)
        .await
        .assert_problem(422, "validation_failed");
    app.get("/v1/generations?cursor=zzz", &m)
        .await
        .assert_problem(422, "validation_failed");
    app.get("/v1/ledger?cursor=-4", &m)
        .await
        .assert_problem(422, "validation_failed");
    app.get("/v1/ledger?limit=abc", &m)
        .await
        .assert_problem(422, "validation_failed");
    app.send(Method::DELETE, "/v1/balance", Some(&m), None, &[])
        .await
        .assert_problem(405, "method_not_allowed");
    app.get("/v1/nowhere", &m)
        .await
        .assert_problem(404, "not_found");
    assert_eq!(app.entry_count("org_a").await, held);
    assert_eq!(held, before + 1, "only the one valid hold was written");
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_generation_and_refuses_a_different_body() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 30).await;
    let m = member("org_a", "m1");
    let send = |body: Value| {
        let m = m.clone();
        let app = &app;
        async move {
            app.send(
                Method::POST,
                "/v1/generations",
                Some(&m),
                Some(&body.to_string()),
                &[("idempotency-key", "retry-1")],
            )
            .await
        }
    };
    let first = send(video()).await;
    assert_eq!(first.status.as_u16(), 201);
    // The balance (6) no longer covers a second hold, yet the retry gets the first answer.
    let second = send(video()).await;
    assert_eq!(second.status.as_u16(), 201);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(available(&app, &m).await, 6);
    let other = send(json!({"workflow": "image", "model": "imagen-3"})).await;
    other.assert_problem(409, "conflict");
    let bad_key = app
        .send(
            Method::POST,
            "/v1/generations",
            Some(&m),
            Some(&video().to_string()),
            &[("idempotency-key", "has spaces")],
        )
        .await;
    bad_key.assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn held_and_expired_filters_read_their_index_not_the_whole_history() {
    let app = TestApp::new();
    grant(&app.ledger, "org_idx", 100_000).await;
    let m = member("org_idx", "m1");
    let image = json!({"workflow": "image", "model": "imagen-3"});
    // The oldest generation of the history is the one still running; one more expires.
    let running = start(
        &app,
        &m,
        json!({"workflow": "video", "model": "video-pro", "duration_s": 10}),
    )
    .await["id"]
        .clone();
    let lapsing = start(&app, &m, image.clone()).await["id"].clone();
    // Far more finished generations after them than one page may read (1,000).
    for _ in 0..1_100 {
        let id = start(&app, &m, image.clone()).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let done = app
            .post(
                &format!("/v1/generations/{id}/complete"),
                &service(),
                json!({}),
            )
            .await;
        assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
    }
    app.clock.advance(Duration::minutes(16));
    let held = app.get("/v1/generations?status=held", &m).await.body;
    let ids: Vec<&Value> = held["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["id"])
        .collect();
    assert_eq!(ids, vec![&running], "{held:#}");
    assert!(held["next_cursor"].is_null());
    let expired = app.get("/v1/generations?status=expired", &m).await.body;
    let ids: Vec<&Value> = expired["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["id"])
        .collect();
    assert_eq!(ids, vec![&lapsing], "{expired:#}");
    assert!(expired["next_cursor"].is_null());
    // Settled by the next write, it is read from the expired index.
    start(&app, &m, image.clone()).await;
    let expired = app.get("/v1/generations?status=expired", &m).await.body;
    assert_eq!(expired["items"][0]["id"], lapsing);
    assert_eq!(expired["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_abandoned_hold_is_released_at_its_deadline_and_shown_as_expired() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 40).await;
    let m = member("org_a", "m1");
    let g = start(
        &app,
        &m,
        json!({"workflow": "image", "model": "imagen-3", "count": 10}),
    )
    .await;
    let id = g["id"].as_str().unwrap();
    assert_eq!(available(&app, &m).await, 10);
    app.clock.advance(Duration::minutes(16));
    // Reads see the release before any write happens.
    assert_eq!(available(&app, &m).await, 40);
    assert_eq!(
        app.get(&format!("/v1/generations/{id}"), &m).await.body["status"],
        "expired"
    );
    let expired = app.get("/v1/generations?status=expired", &m).await.body;
    assert_eq!(expired["items"].as_array().unwrap().len(), 1);
    // The next write settles it in the journal.
    start(
        &app,
        &m,
        json!({"workflow": "image", "model": "flux-schnell"}),
    )
    .await;
    let reasons: Vec<String> = app.get("/v1/ledger", &m).await.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons[..2],
        ["hold_placed".to_string(), "hold_expired".to_string()]
    );
    // A completion arriving after the deadline is still charged, from what is available.
    let late = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({}),
        )
        .await;
    assert_eq!(
        (late.body["status"].as_str(), late.body["charged"].as_u64()),
        (Some("completed"), Some(30))
    );
    assert_eq!(available(&app, &m).await, 8);
}

#[tokio::test]
async fn creation_history_pages_newest_first_and_filters_by_status_and_model() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 1000).await;
    let m = member("org_a", "m1");
    let mut ids = Vec::new();
    for i in 0..5 {
        let model = if i % 2 == 0 {
            "imagen-3"
        } else {
            "flux-schnell"
        };
        let g = start(&app, &m, json!({"workflow": "image", "model": model})).await;
        ids.push(g["id"].as_str().unwrap().to_owned());
    }
    app.post(
        &format!("/v1/generations/{}/complete", ids[1]),
        &service(),
        json!({}),
    )
    .await;
    let p1 = app.get("/v1/generations?limit=2", &m).await.body;
    let got: Vec<&str> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()]);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let p2 = app
        .get(&format!("/v1/generations?limit=2&cursor={cursor}"), &m)
        .await
        .body;
    let got: Vec<&str> = p2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);
    let p3 = app
        .get(
            &format!(
                "/v1/generations?limit=2&cursor={}",
                p2["next_cursor"].as_str().unwrap()
            ),
            &m,
        )
        .await
        .body;
    assert_eq!(p3["items"].as_array().unwrap().len(), 1);
    assert!(p3["next_cursor"].is_null());
    let done = app.get("/v1/generations?status=completed", &m).await.body;
    assert_eq!(done["items"][0]["id"], ids[1].as_str());
    assert_eq!(done["items"].as_array().unwrap().len(), 1);
    let imagen = app
        .get("/v1/generations?model=imagen-3&status=held", &m)
        .await
        .body;
    assert_eq!(imagen["items"].as_array().unwrap().len(), 3);
    // The ledger pages too.
    let l1 = app.get("/v1/ledger?limit=3", &m).await.body;
    assert_eq!(l1["items"].as_array().unwrap().len(), 3);
    let l2 = app
        .get(
            &format!(
                "/v1/ledger?limit=10&cursor={}",
                l1["next_cursor"].as_str().unwrap()
            ),
            &m,
        )
        .await
        .body;
    assert_eq!(l2["items"].as_array().unwrap().len(), 4);
    assert!(l2["next_cursor"].is_null());
}

#[tokio::test]
async fn training_a_custom_model_needs_a_free_slot_on_the_plan() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 5000).await;
    let m = member("org_a", "m1");
    let ent = app.get("/v1/entitlements", &m).await.body;
    assert_eq!(
        (ent["custom_model_slots"].as_u64(), ent["plan"].is_null()),
        (Some(0), true)
    );
    let train = json!({"workflow": "training", "model": "custom-model"});
    app.post("/v1/generations", &m, train.clone())
        .await
        .assert_problem(403, "no_custom_model_slot");
    tally_local::seed_demo(&app.ledger).await.unwrap();
    grant(&app.ledger, "demo", 2000).await;
    let d = owner("demo");
    let ent = app.get("/v1/entitlements", &d).await.body;
    assert_eq!(
        (
            ent["custom_model_slots"].as_u64(),
            ent["pack_discount_pct"].as_u64(),
            ent["support"].as_str()
        ),
        (Some(3), Some(20), Some("priority"))
    );
    let mut trainings = Vec::new();
    for _ in 0..3 {
        trainings.push(start(&app, &d, train.clone()).await["id"].clone());
    }
    let fourth = app.post("/v1/generations", &d, train.clone()).await;
    fourth.assert_problem(403, "no_custom_model_slot");
    let ent = app.get("/v1/entitlements", &d).await.body;
    assert_eq!(ent["custom_models_used"], 3);
    assert_eq!(ent["custom_models"], json!(trainings));

    // A finished model is retired by an owner or billing admin: its slot is free again.
    let first = trainings[0].as_str().unwrap();
    let retire = format!("/v1/generations/{first}/retire-model");
    app.post(&retire, &d, json!({}))
        .await
        .assert_problem(409, "conflict");
    // It takes no body: one that says something is refused before anything is read.
    app.post(&retire, &d, json!({"model": "x"}))
        .await
        .assert_problem(422, "validation_failed");
    let done = app
        .post(
            &format!("/v1/generations/{first}/complete"),
            &service(),
            json!({"credits": 400}),
        )
        .await;
    assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
    app.post(&retire, &member("demo", "m2"), json!({}))
        .await
        .assert_problem(403, "forbidden");
    let before = app.get("/v1/balance", &d).await.body["available"].clone();
    for _ in 0..2 {
        let r = app.post(&retire, &d, json!({})).await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        assert_eq!(r.body["custom_models_used"], 2, "{:#}", r.body);
        assert_eq!(r.body["custom_models"], json!(trainings[1..]));
    }
    assert_eq!(app.get("/v1/balance", &d).await.body["available"], before);
    let journal = app.get("/v1/ledger?limit=1", &d).await.body;
    assert_eq!(journal["items"][0]["reason"], "model_retired");
    // Another workspace's model, or no model at all, is not found.
    for other in [
        format!("/v1/generations/{first}/retire-model"),
        format!(
            "/v1/generations/{}/retire-model",
            trainings[1].as_str().unwrap()
        ),
    ] {
        app.post(&other, &owner("org_a"), json!({}))
            .await
            .assert_problem(404, "not_found");
    }
    app.post(
        "/v1/generations/not-a-generation/retire-model",
        &d,
        json!({}),
    )
    .await
    .assert_problem(422, "validation_failed");
    start(&app, &d, train).await;
}

#[tokio::test]
async fn support_adjustments_need_the_admin_scope_and_an_idempotency_key() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 10).await;
    let path = "/v1/admin/workspaces/org_a/adjustments";
    let body = json!({"credits": 25, "reason": "goodwill for ticket T-1"}).to_string();
    app.send(
        Method::POST,
        path,
        Some(&member("org_a", "m1")),
        Some(&body),
        &[("idempotency-key", "a1")],
    )
    .await
    .assert_problem(403, "forbidden");
    app.send(Method::POST, path, Some(&support()), Some(&body), &[])
        .await
        .assert_problem(422, "validation_failed");
    let first = app
        .send(
            Method::POST,
            path,
            Some(&support()),
            Some(&body),
            &[("idempotency-key", "a1")],
        )
        .await;
    assert_eq!(first.status.as_u16(), 201, "{:#}", first.body);
    assert_eq!(first.body["balance"]["available"], 35);
    let again = app
        .send(
            Method::POST,
            path,
            Some(&support()),
            Some(&body),
            &[("idempotency-key", "a1")],
        )
        .await;
    assert_eq!(again.body, first.body);
    let m = member("org_a", "m1");
    assert_eq!(available(&app, &m).await, 35);
    let entry = &app.get("/v1/ledger?limit=1", &m).await.body["items"][0];
    assert_eq!(entry["reason"], "adjustment_credit");
    assert_eq!(entry["actor"], json!({"kind": "admin", "id": "support-1"}));
    assert_eq!(entry["note"], "goodwill for ticket T-1");
    let take = json!({"credits": -36, "reason": "correction"}).to_string();
    app.send(
        Method::POST,
        path,
        Some(&support()),
        Some(&take),
        &[("idempotency-key", "a2")],
    )
    .await
    .assert_problem(402, "insufficient_credits");
    for bad in [
        json!({"credits": 0, "reason": "x"}),
        json!({"credits": 5, "reason": " "}),
        json!({"credits": 99_999_999_999i64, "reason": "x"}),
        json!({"credits": 1.5, "reason": "x"}),
    ] {
        app.send(
            Method::POST,
            path,
            Some(&support()),
            Some(&bad.to_string()),
            &[("idempotency-key", "a3")],
        )
        .await
        .assert_problem(422, "validation_failed");
    }
    app.send(
        Method::POST,
        "/v1/admin/workspaces/bad%23id/adjustments",
        Some(&support()),
        Some(&body),
        &[("idempotency-key", "a4")],
    )
    .await
    .assert_problem(422, "validation_failed");
    assert_eq!(available(&app, &m).await, 35);
    // The refused debit's key is free for the corrected one.
    let fixed = app
        .send(
            Method::POST,
            path,
            Some(&support()),
            Some(&json!({"credits": -5, "reason": "correction"}).to_string()),
            &[("idempotency-key", "a2")],
        )
        .await;
    assert_eq!(fixed.status.as_u16(), 201, "{:#}", fixed.body);
    assert_eq!(available(&app, &m).await, 30);
    // A key names one request, whatever workspace: sent for another workspace, a 409, and
    // nothing is granted there.
    grant(&app.ledger, "org_b", 10).await;
    app.send(
        Method::POST,
        "/v1/admin/workspaces/org_b/adjustments",
        Some(&support()),
        Some(&body),
        &[("idempotency-key", "a1")],
    )
    .await
    .assert_problem(409, "conflict");
    assert_eq!(available(&app, &member("org_b", "m1")).await, 10);
    let replay = app
        .send(
            Method::POST,
            path,
            Some(&support()),
            Some(&body),
            &[("idempotency-key", "a1")],
        )
        .await;
    assert_eq!(replay.body, first.body);
}

#[tokio::test]
async fn the_balance_lists_lots_in_burn_order() {
    let app = TestApp::new();
    tally_local::seed_demo(&app.ledger).await.unwrap();
    grant(&app.ledger, "demo", 100).await;
    let b = app.get("/v1/balance", &owner("demo")).await.body;
    let sources: Vec<&str> = b["lots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, vec!["plan_period", "pack"]);
    assert!(b["lots"][1]["expires_at"].is_null());
    assert_eq!(b["available"], 500);
    // Seeding again changes nothing.
    tally_local::seed_demo(&app.ledger).await.unwrap();
    assert_eq!(
        app.get("/v1/balance", &owner("demo")).await.body["available"],
        500
    );
}

#[tokio::test]
async fn an_adjustment_to_a_workspace_that_does_not_exist_is_refused_and_links_its_ticket() {
    let app = TestApp::new();
    let body = json!({"credits": 50, "reason": "goodwill"}).to_string();
    let adjust = |ws: &'static str, body: String, key: &'static str| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                &format!("/v1/admin/workspaces/{ws}/adjustments"),
                Some(&support()),
                Some(&body),
                &[("idempotency-key", key)],
            )
            .await
        }
    };
    // A mistyped id: no journal, no billing profile, nothing written.
    adjust("org_typo", body.clone(), "p1")
        .await
        .assert_problem(404, "not_found");
    assert_eq!(app.entry_count("org_typo").await, 0);
    assert!(
        app.ledger
            .store
            .load(&tally_tests::workspace("org_typo"))
            .await
            .unwrap()
            .is_none()
    );
    // A workspace with a billing profile but no credits yet may be adjusted.
    tally::store::docs::update(
        app.docs.as_ref(),
        &tally::billing::records::workspace_pk(&tally_tests::workspace("org_new")),
        tally::billing::records::PROFILE_SK,
        |_: Option<tally::billing::records::BillingProfile>| {
            Some(tally::billing::records::BillingProfile::default())
        },
    )
    .await
    .unwrap();
    let ok = adjust("org_new", body.clone(), "p2").await;
    assert_eq!(ok.status.as_u16(), 201, "{:#}", ok.body);
    // Links to the ticket and to a generation of the workspace; another's is refused.
    grant(&app.ledger, "org_gen", 100).await;
    let g = start(
        &app,
        &member("org_gen", "u1"),
        json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
    )
    .await;
    let id = g["id"].as_str().unwrap();
    let ticket = app
        .post(
            "/v1/support/tickets",
            &member("org_gen", "u1"),
            json!({"category": "generation", "subject": "slow job", "message": "it took ages",
                "generation_id": id}),
        )
        .await;
    assert_eq!(ticket.status.as_u16(), 201, "{:#}", ticket.body);
    let tkt = ticket.body["id"].as_str().unwrap();
    let linked = json!({"credits": 5, "reason": "slow job", "ticket": tkt, "generation": id});
    adjust("org_new", linked.to_string(), "p3")
        .await
        .assert_problem(404, "not_found");
    // Not a ticket id at all, or a ticket that does not exist: refused, nothing written.
    let free_text = json!({"credits": 5, "reason": "slow job", "ticket": "T-9"});
    adjust("org_gen", free_text.to_string(), "p5")
        .await
        .assert_problem(422, "validation_failed");
    let unknown = json!({"credits": 5, "reason": "slow job",
        "ticket": "tkt_01ARZ3NDEKTSV4RRFFQ69G5FAV"});
    adjust("org_gen", unknown.to_string(), "p6")
        .await
        .assert_problem(404, "not_found");
    let r = adjust("org_gen", linked.to_string(), "p4").await;
    assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
    let entry = &app
        .get("/v1/ledger?limit=1", &member("org_gen", "u1"))
        .await
        .body["items"][0];
    assert_eq!(entry["refs"]["ticket"], tkt);
    assert_eq!(entry["refs"]["generation"], id);
}

/// A range in the past starts below everything made after it: the generations of an old
/// month come in the first page even behind more newer ones than a page may read.
#[tokio::test]
async fn an_old_range_of_the_history_reads_none_of_what_came_after_it() {
    let app = TestApp::new();
    let ws = "org_oldrange";
    grant(&app.ledger, ws, 100_000).await;
    let est = tally_tests::image_estimate(&app.ledger);
    let deadline = |app: &TestApp| app.clock.now() + Duration::hours(1);
    let mut old = Vec::new();
    for _ in 0..3 {
        let g = tally::ids::GenerationId::at(app.clock.now());
        app.ledger
            .execute(tally_tests::hold_request(ws, g, &est, deadline(&app)))
            .await
            .unwrap();
        old.push(g.to_string());
    }
    let to = app.clock.now() + Duration::hours(1);
    app.clock.advance(Duration::days(40));
    // More newer generations than one page reads while filtering.
    for _ in 0..credits_api::routes::generations::MAX_SCANNED + 20 {
        let g = tally::ids::GenerationId::at(app.clock.now());
        app.ledger
            .execute(tally_tests::hold_request(ws, g, &est, deadline(&app)))
            .await
            .unwrap();
    }
    let m = member(ws, "m1");
    let to = to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let page = app
        .get(&format!("/v1/generations?limit=100&to={to}"), &m)
        .await;
    assert_eq!(page.status.as_u16(), 200, "{:#}", page.body);
    let mut ids: Vec<String> = page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_owned())
        .collect();
    ids.reverse();
    assert_eq!(ids, old, "{:#}", page.body["next_cursor"]);
    assert!(page.body["next_cursor"].is_null());
}

/// Every range a query names is in the years 2000 to 2099 as written, as the document's
/// pattern says: the last hours of 1999 in UTC are refused, though they are 2000 somewhere
/// east; and 2000 written with an offset is taken, though it is 1999 in UTC.
#[tokio::test]
async fn range_dates_are_the_years_2000_to_2099_as_written() {
    let app = TestApp::new();
    let ws = "org_years";
    let in_2000 = "2000-01-01T00%3A00%3A00%2B05%3A00";
    let end = "2026-06-01T00%3A00%3A00Z";
    let routes = [
        ("/v1/generations?", owner(ws)),
        ("/v1/usage?", owner(ws)),
        ("/v1/generations/export?format=csv&", owner(ws)),
        ("/v1/ledger/export?format=csv&", owner(ws)),
        ("/v1/billing/history?", owner(ws)),
        ("/v1/admin/reconciliation?", support()),
    ];
    for (path, tok) in &routes {
        let ok = app
            .get(&format!("{path}from={in_2000}&to={end}"), tok)
            .await;
        assert_eq!(ok.status.as_u16(), 200, "{path}: {:#}", ok.body);
        for bad in ["1999-12-31T19%3A00%3A00Z", "1999-12-31T12%3A00%3A00Z"] {
            let r = app.get(&format!("{path}from={bad}&to={end}"), tok).await;
            assert_eq!(r.status.as_u16(), 422, "{path} {bad}: {:#}", r.body);
            assert_eq!(r.body["field"], "from", "{path}: {:#}", r.body);
        }
        let late = "2100-01-01T04%3A59%3A59Z";
        let r = app
            .get(&format!("{path}from={in_2000}&to={late}"), tok)
            .await;
        assert_eq!(r.status.as_u16(), 422, "{path}: {:#}", r.body);
    }
}

/// The ledger's store, except that reads by status can be interleaved: `between` runs
/// after the first read by status returns (a write landing between the two reads of an
/// `expired` filter), and `lagging` is returned beside what a read of held generations
/// finds (an eventually consistent index still showing a generation's old entry).
struct StatusReads {
    inner: std::sync::Arc<tally::store::embedded::EmbeddedStore>,
    between:
        std::sync::Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
    lagging: std::sync::Mutex<Vec<tally::ledger::Generation>>,
}

#[async_trait::async_trait]
impl tally::store::LedgerStore for StatusReads {
    async fn load(
        &self,
        w: &tally::ids::WorkspaceId,
    ) -> Result<Option<tally::ledger::WorkspaceState>, tally::store::StoreError> {
        self.inner.load(w).await
    }
    async fn read_op(
        &self,
        w: &tally::ids::WorkspaceId,
        k: &tally::ids::IdempotencyKey,
        g: Option<tally::ids::GenerationId>,
    ) -> Result<tally::store::OpRead, tally::store::StoreError> {
        self.inner.read_op(w, k, g).await
    }
    async fn open_holds(
        &self,
        w: &tally::ids::WorkspaceId,
        until: Option<chrono::DateTime<chrono::Utc>>,
        limit: usize,
    ) -> Result<Vec<tally::ledger::Hold>, tally::store::StoreError> {
        self.inner.open_holds(w, until, limit).await
    }
    async fn commit(&self, c: tally::store::Commit) -> Result<(), tally::store::CommitError> {
        self.inner.commit(c).await
    }
    async fn idempotency(
        &self,
        w: &tally::ids::WorkspaceId,
        k: &tally::ids::IdempotencyKey,
    ) -> Result<Option<tally::store::IdempotencyRecord>, tally::store::StoreError> {
        self.inner.idempotency(w, k).await
    }
    async fn generation(
        &self,
        w: &tally::ids::WorkspaceId,
        id: tally::ids::GenerationId,
    ) -> Result<Option<tally::ledger::Generation>, tally::store::StoreError> {
        self.inner.generation(w, id).await
    }
    async fn generation_owner(
        &self,
        id: tally::ids::GenerationId,
    ) -> Result<Option<tally::ids::WorkspaceId>, tally::store::StoreError> {
        self.inner.generation_owner(id).await
    }
    async fn generations(
        &self,
        w: &tally::ids::WorkspaceId,
        q: &tally::store::GenerationQuery,
    ) -> Result<Vec<tally::ledger::Generation>, tally::store::StoreError> {
        let mut found = self.inner.generations(w, q).await?;
        if q.status == Some(tally::ledger::GenerationStatus::Held) {
            found.extend(self.lagging.lock().unwrap().iter().cloned());
            found.sort_by_key(|g| std::cmp::Reverse(g.id));
        }
        if q.status.is_some() {
            let between = self.between.lock().unwrap().take();
            if let Some(write) = between {
                write.await;
            }
        }
        Ok(found)
    }
    async fn entries(
        &self,
        w: &tally::ids::WorkspaceId,
        q: &tally::store::EntryQuery,
    ) -> Result<Vec<tally::ledger::Entry>, tally::store::StoreError> {
        self.inner.entries(w, q).await
    }
    async fn entries_by_seq(
        &self,
        w: &tally::ids::WorkspaceId,
        seqs: &[u64],
    ) -> Result<Vec<tally::ledger::Entry>, tally::store::StoreError> {
        self.inner.entries_by_seq(w, seqs).await
    }
}

/// An overdue hold settled by a write landing between the two reads of an `expired`
/// filter is listed once, not missed; and a generation an index still shows under its old
/// status beside its new one is listed once, not twice.
#[tokio::test]
async fn an_expired_filter_lists_a_generation_settled_while_it_reads_once() {
    use tally::store::LedgerStore;
    let inner = std::sync::Arc::new(tally::store::embedded::EmbeddedStore::in_memory());
    let store = std::sync::Arc::new(StatusReads {
        inner: inner.clone(),
        between: Default::default(),
        lagging: Default::default(),
    });
    let app = TestApp::with_ledger_store(inner.clone(), store.clone());
    let ws = "org_between";
    grant(&app.ledger, ws, 1000).await;
    let m = member(ws, "m1");
    let lapsing = start(&app, &m, json!({"workflow": "image", "model": "imagen-3"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id: tally::ids::GenerationId = lapsing.parse().unwrap();
    let workspace = tally::ids::WorkspaceId::parse(ws).unwrap();
    let held = inner.generation(&workspace, id).await.unwrap().unwrap();
    assert_eq!(held.status, tally::ledger::GenerationStatus::Held);
    app.clock.advance(Duration::minutes(16));
    // Another request's write settles the overdue hold while the list reads.
    let (other, clock) = tally_tests::ledger_over(inner.clone());
    clock.set(app.clock.now());
    *store.between.lock().unwrap() = Some(Box::pin(async move {
        grant(&other, "org_between", 1).await;
    }));
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let page = app.get("/v1/generations?status=expired", &m).await.body;
    assert!(store.between.lock().unwrap().is_none(), "the write ran");
    let settled = inner.generation(&workspace, id).await.unwrap().unwrap();
    assert_eq!(settled.status, tally::ledger::GenerationStatus::Expired);
    assert_eq!(ids(&page), vec![lapsing.clone()], "{page:#}");
    // The held index entry lags behind the settled generation.
    *store.lagging.lock().unwrap() = vec![held];
    let page = app.get("/v1/generations?status=expired", &m).await.body;
    assert_eq!(ids(&page), vec![lapsing.clone()], "{page:#}");
    assert_eq!(page["items"][0]["status"], "expired");
    let all = app.get("/v1/generations", &m).await.body;
    assert_eq!(ids(&all), [lapsing], "{all:#}");
}
