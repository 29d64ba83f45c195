//! One home for each rule: every door that asks the same question gets the same answer.
//! Each test here drives two or more routes that once decided a rule separately.

use axum::http::Method;
use serde_json::{Value, json};
use tally::ids::IdempotencyKey;
use tally::ledger::{Actor, Interval, Operation, PlanState, PlanStatus, Refs};
use tally::service::LedgerRequest;
use tally_tests::{TestApp, grant, member, owner, service, workspace};

async fn set_plan(app: &TestApp, ws: &str, status: PlanStatus) {
    let now = app.ledger.clock.now();
    app.ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("test-plan:{ws}:{status:?}")),
            fingerprint: format!("plan:{status:?}"),
            actor: Actor::system(),
            refs: Refs::default(),
            op: Operation::SetPlan {
                plan: Some(PlanState {
                    plan: "max".into(),
                    interval: Interval::Monthly,
                    status,
                    period_start: now,
                    period_end: now + chrono::Duration::days(30),
                    cancel_at_period_end: false,
                    paid_through: None,
                }),
            },
        })
        .await
        .expect("set plan");
}

/// The unit price a pack checkout shows on the (simulated) Stripe page.
async fn pack_page(app: &TestApp, ws: &str) -> String {
    let path = app.open_pack_checkout(ws, "pack_100").await;
    let page = app.send(Method::GET, &path, None, None, &[]).await;
    page.body.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn entitlements_estimates_training_slots_and_pack_discounts_agree_on_the_plan_in_effect() {
    let train = json!({"workflow": "training", "model": "custom-model"});
    for (status, in_effect) in [
        (PlanStatus::Active, true),
        (PlanStatus::PastDue, true),
        (PlanStatus::Paused, false),
        (PlanStatus::Canceled, false),
    ] {
        let app = TestApp::new();
        let ws = "org_rule";
        grant(&app.ledger, ws, 5_000).await;
        set_plan(&app, ws, status).await;
        let ent = app.get("/v1/entitlements", &owner(ws)).await.body;
        let (slots, discount) = if in_effect { (3, 20) } else { (0, 0) };
        assert_eq!(ent["custom_model_slots"], slots, "{status:?}: {ent:#}");
        assert_eq!(ent["pack_discount_pct"], discount, "{status:?}: {ent:#}");
        let estimate = app
            .post("/v1/estimates", &member(ws, "m1"), train.clone())
            .await;
        assert_eq!(estimate.status.as_u16(), 200, "{:#}", estimate.body);
        let start = app
            .post("/v1/generations", &member(ws, "m1"), train.clone())
            .await;
        assert_eq!(
            estimate.body["sufficient"].as_bool().unwrap(),
            start.status.as_u16() == 201,
            "{status:?}: the estimate must say what the start does: {:#} vs {:#}",
            estimate.body,
            start.body
        );
        assert_eq!(start.status.as_u16() == 201, in_effect, "{status:?}");
        // $10.00 at list price; $8.00 with the plan's 20% off.
        let page = pack_page(&app, ws).await;
        let price = if in_effect { "$8.00" } else { "$10.00" };
        assert!(
            page.contains(price),
            "{status:?}: expected {price} in {page}"
        );
    }
}

#[tokio::test]
async fn an_estimate_for_a_training_without_a_free_slot_says_why_it_would_be_refused() {
    let app = TestApp::new();
    let ws = "org_slots";
    grant(&app.ledger, ws, 5_000).await;
    set_plan(&app, ws, PlanStatus::Active).await;
    let train = json!({"workflow": "training", "model": "custom-model"});
    for _ in 0..3 {
        let s = app
            .post("/v1/generations", &member(ws, "m1"), train.clone())
            .await;
        assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
    }
    let estimate = app
        .post("/v1/estimates", &member(ws, "m1"), train.clone())
        .await;
    assert_eq!(estimate.body["sufficient"], false, "{:#}", estimate.body);
    assert_eq!(estimate.body["refusal"]["code"], "no_custom_model_slot");
    app.post("/v1/generations", &member(ws, "m1"), train)
        .await
        .assert_problem(403, "no_custom_model_slot");
}

fn plan_lot_expiries(balance: &Value) -> Vec<String> {
    balance["lots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["source"] == "plan_period")
        .map(|l| l["expires_at"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_first_allowance_and_an_upgrade_in_the_same_billing_month_lapse_together() {
    let app = TestApp::new();
    let ws = "org_month";
    app.subscribe(ws, "max", "yearly").await;
    let r = app
        .post(
            "/v1/subscription/change",
            &owner(ws),
            json!({"plan": "generative", "interval": "yearly"}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    app.settle_billing().await;
    let balance = app.get("/v1/balance", &owner(ws)).await.body;
    let expiries = plan_lot_expiries(&balance);
    assert_eq!(expiries.len(), 2, "{balance:#}");
    assert_eq!(
        expiries[0], expiries[1],
        "one billing month for the invoice's allowance and the upgrade's: {balance:#}"
    );
}

async fn send_keyed(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    body: Value,
) -> tally_tests::Answer {
    app.send(
        method,
        path,
        Some(&owner_of(path)),
        Some(&body.to_string()),
        &[("idempotency-key", key)],
    )
    .await
}

fn owner_of(_path: &str) -> String {
    owner("org_keys")
}

#[tokio::test]
async fn every_mutating_billing_route_answers_a_reused_key_the_same_way() {
    let app = TestApp::new();
    app.subscribe("org_keys", "max", "monthly").await;
    let routes = [
        (
            Method::POST,
            "/v1/checkout/sessions",
            json!({"kind": "pack", "pack": "pack_100"}),
            json!({"kind": "pack", "pack": "pack_500"}),
        ),
        (
            Method::POST,
            "/v1/subscription/change",
            json!({"plan": "generative", "interval": "monthly"}),
            json!({"plan": "team", "interval": "monthly"}),
        ),
        (
            Method::PUT,
            "/v1/subscription/addons",
            json!({"units": 2}),
            json!({"units": 3}),
        ),
    ];
    for (method, path, body, other) in routes {
        let key = format!("key{}", path.replace('/', "-"));
        let first = send_keyed(&app, method.clone(), path, &key, body.clone()).await;
        assert!(first.status.is_success(), "{path}: {:#}", first.body);
        app.settle_billing().await;
        let events_before = app
            .get("/sim/events", "")
            .await
            .body
            .as_array()
            .map(Vec::len);
        let again = send_keyed(&app, method.clone(), path, &key, body.clone()).await;
        assert_eq!(again.status, first.status, "{path}");
        assert_eq!(
            again.body, first.body,
            "{path}: same key, same body: the first answer"
        );
        app.settle_billing().await;
        let events_after = app
            .get("/sim/events", "")
            .await
            .body
            .as_array()
            .map(Vec::len);
        assert_eq!(
            events_before, events_after,
            "{path}: a replay calls Stripe for nothing new"
        );
        send_keyed(&app, method.clone(), path, &key, other)
            .await
            .assert_problem(409, "conflict");
    }
}

#[tokio::test]
async fn only_the_generation_service_settles_and_a_different_amount_is_a_conflict() {
    let app = TestApp::new();
    let ws = "org_settle";
    grant(&app.ledger, ws, 1_000).await;
    let video =
        json!({"workflow": "video", "model": "video-pro", "duration_s": 10, "resolution": "2k"});
    let g = app.post("/v1/generations", &member(ws, "m1"), video).await;
    assert_eq!(g.status.as_u16(), 201, "{:#}", g.body);
    let id = g.body["id"].as_str().unwrap().to_owned();
    let entries = app.entry_count(ws).await;
    for who in [member(ws, "m1"), owner(ws)] {
        app.post(
            &format!("/v1/generations/{id}/fail"),
            &who,
            json!({"reason": "bored"}),
        )
        .await
        .assert_problem(403, "forbidden");
        app.post(&format!("/v1/generations/{id}/complete"), &who, json!({}))
            .await
            .assert_problem(403, "forbidden");
    }
    assert_eq!(app.entry_count(ws).await, entries, "refusals wrote nothing");
    let done = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": 22}),
        )
        .await;
    assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
    assert_eq!(done.body["charged"], 22);
    let replay = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": 22}),
        )
        .await;
    assert_eq!(replay.body, done.body);
    app.post(
        &format!("/v1/generations/{id}/complete"),
        &service(),
        json!({"credits": 23}),
    )
    .await
    .assert_problem(409, "conflict");
    app.post(
        &format!("/v1/generations/{id}/fail"),
        &service(),
        json!({"reason": "late"}),
    )
    .await
    .assert_problem(409, "conflict");
}
