//! Refund requests end to end: asked over HTTP, decided from Tally's records or by staff,
//! refunded through the simulated Stripe by the refunds worker, and the credits following
//! Stripe's refund events. The worker's retries run against a fake of Stripe's API.

use serde_json::{Value, json};
use std::sync::Arc;
use tally::clock::Clock;
use tally::ids::WorkspaceId;
use tally::money::Cents;
use tally::queue::{ConsumeError, Consumer, Delivery};
use tally::refund_requests::worker::RefundWorker;
use tally::refund_requests::{NewRequest, RefundReason, RefundRequests, RequestStatus};
use tally_tests::{TestApp, fixture, member, owner, support};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Buys `quantity` × pack_500 for `ws`; returns the charge id that paid.
async fn buy_packs(app: &TestApp, ws: &str, quantity: u32) -> String {
    let s = app
        .post(
            "/v1/checkout/sessions",
            &owner(ws),
            json!({"kind": "pack", "pack": "pack_500", "quantity": quantity}),
        )
        .await;
    assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
    app.pay(s.body["url"].as_str().unwrap()).await;
    let charges = app.sim_events("charge.succeeded");
    charges.last().unwrap()["id"].as_str().unwrap().to_owned()
}

/// The cardholder's bank disputes the charge (all of it not refunded), and billing follows.
async fn dispute(app: &TestApp, charge: &str) {
    app.send(
        axum::http::Method::POST,
        &format!("/sim/charges/{charge}/dispute"),
        None,
        None,
        &[("content-length", "0")],
    )
    .await;
    app.settle_billing().await;
}

/// A customer's request (by `u1`) for `payment`, under a fresh id.
fn request_for(payment: &str, reason: RefundReason) -> NewRequest {
    NewRequest {
        payment: payment.to_owned(),
        reason,
        details: "x".into(),
        requested_by: "u1".into(),
        id: None,
    }
}

/// Files a "technical issue" request for `charge` through `requests`.
async fn file_technical(
    requests: &RefundRequests,
    workspace: &WorkspaceId,
    charge: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<tally::refund_requests::RefundRequest, tally::http::problem::Problem> {
    requests
        .create(
            workspace,
            request_for(charge, RefundReason::TechnicalIssue),
            now,
        )
        .await
}

/// A pack bought by `ws` and a request to refund it, filed directly and approved by
/// staff, its refund parked: the requests, the workspace, the charge and the request.
async fn approved_parked(
    app: &TestApp,
    ws: &str,
) -> (
    RefundRequests,
    WorkspaceId,
    String,
    tally::refund_requests::RefundRequest,
) {
    let charge = buy_packs(app, ws, 1).await;
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(app);
    let now = app.clock.now();
    let r = requests
        .create(&workspace, request_for(&charge, RefundReason::Other), now)
        .await
        .unwrap();
    let r = requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap();
    assert_eq!(r.status, RequestStatus::Approved);
    (requests, workspace, charge, r)
}

/// Refund requests over the app's documents and ledger whose approvals wait in a queue
/// nobody consumes, so the worker under test is the only one that sees them.
fn parked_requests(app: &TestApp) -> RefundRequests {
    RefundRequests {
        docs: app.docs.clone(),
        ledger: app.ledger.clone(),
        queue: tally::queue::local::LocalQueue::new("parked.fifo", true, 5),
        duplicate_window: chrono::Duration::minutes(30),
    }
}

/// The Stripe adapter pointed at a fake of Stripe's API.
fn stripe_at(server: &MockServer) -> Arc<tally::payments::stripe_api::StripePayments> {
    Arc::new(
        tally::payments::stripe_api::StripePayments::new(
            "sk_test_tally",
            Some(&format!("{}/", server.uri())),
        )
        .unwrap(),
    )
}

/// Waits until approved refunds are made and Stripe's events about them applied.
async fn settle(app: &TestApp) {
    app.local.refunds_queue.until_idle().await;
    app.settle_billing().await;
    app.local.notifications_queue.until_idle().await;
}

async fn ask(app: &TestApp, ws: &str, body: Value, key: Option<&str>) -> tally_tests::Answer {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    let a = app
        .send(
            axum::http::Method::POST,
            "/v1/refund-requests",
            Some(&owner(ws)),
            Some(&body.to_string()),
            &headers,
        )
        .await;
    settle(app).await;
    a
}

fn charge_of(app: &TestApp, charge: &str) -> Value {
    app.local
        .simulator
        .as_ref()
        .unwrap()
        .charge(charge)
        .unwrap()
}

#[tokio::test]
async fn a_verified_duplicate_charge_is_refunded_at_once_and_takes_its_unspent_credits_back() {
    let app = TestApp::new();
    let ws = "org_rr1";
    let first = buy_packs(&app, ws, 1).await;
    let second = buy_packs(&app, ws, 1).await;
    assert_eq!(app.available(ws).await, 1000);
    let price = charge_of(&app, &second)["amount"].as_i64().unwrap();

    // The first of the two is not the duplicate: it waits for staff.
    let r1 = ask(
        &app,
        ws,
        json!({"payment": first, "reason": "duplicate_charge", "details": "charged twice"}),
        None,
    )
    .await;
    assert_eq!(r1.status.as_u16(), 201, "{:#}", r1.body);
    assert_eq!(r1.body["status"], "in_review");
    app.post(
        &format!(
            "/v1/admin/refund-requests/{}/deny",
            r1.body["id"].as_str().unwrap()
        ),
        &support(),
        json!({"note": "the second one is the duplicate"}),
    )
    .await;

    let body = json!({"payment": second, "reason": "duplicate_charge", "details": "charged twice"});
    let r = ask(&app, ws, body.clone(), Some("dup-1")).await;
    assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
    assert_eq!(r.body["status"], "approved", "{:#}", r.body);
    assert_eq!(r.body["amount"], price);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let steps: Vec<&str> = r.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["by"].as_str().unwrap())
        .collect();
    assert_eq!(steps[1], "tally", "approved from the records: {steps:?}");

    // The worker refunded it through Stripe; Stripe's events took the credits back.
    let done = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(done.body["status"], "succeeded", "{:#}", done.body);
    assert!(done.body["refund"].as_str().unwrap().starts_with("re_"));
    assert_eq!(done.body["credits_taken_back"], 500);
    assert_eq!(charge_of(&app, &second)["amount_refunded"], price);
    assert_eq!(app.available(ws).await, 500);
    let confirmations: Vec<Value> = app
        .local
        .notifications
        .all()
        .into_iter()
        .filter(|n| n["type"] == "refund.confirmed" && n["request"] == id.as_str())
        .collect();
    assert_eq!(confirmations.len(), 1, "one confirmation");
    assert!(
        confirmations[0]["message"]
            .as_str()
            .unwrap()
            .contains("5-10 business days")
    );
    let times: Vec<&str> = done.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["at"].as_str().unwrap())
        .collect();
    assert!(times.iter().all(|t| t.ends_with('Z')), "UTC: {times:?}");

    // The same request again: the same answer, no second refund.
    let again = ask(&app, ws, body, Some("dup-1")).await;
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(charge_of(&app, &second)["amount_refunded"], price);
    // Nothing is left to refund of that payment.
    ask(
        &app,
        ws,
        json!({"payment": second, "reason": "other", "details": "again"}),
        None,
    )
    .await
    .assert_problem(409, "not_refundable");
    // The billing history shows the refund with the credits it took back.
    let h = app.get("/v1/billing/history?kind=refund", &owner(ws)).await;
    assert_eq!(h.body["items"][0]["credits_taken_back"], 500);
    assert_eq!(h.body["items"][0]["charge"], second.as_str());
}

#[tokio::test]
async fn staff_decide_other_reasons_and_partial_refunds_never_add_up_to_more_than_was_paid() {
    let app = TestApp::new();
    let ws = "org_rr2";
    let charge = buy_packs(&app, ws, 2).await;
    let price = charge_of(&app, &charge)["amount"].as_u64().unwrap();
    let pi = charge_of(&app, &charge)["payment_intent"]
        .as_str()
        .unwrap()
        .to_owned();
    // Named by its payment intent this time.
    let r = ask(
        &app,
        ws,
        json!({"payment": pi, "reason": "technical_issue", "details": "videos never rendered"}),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "in_review", "{:#}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    // One open request per payment; the refused one writes nothing, not even where it
    // would have lived.
    ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "x"}),
        Some("second-ask"),
    )
    .await
    .assert_problem(409, "already_requested");
    let refused = tally::refund_requests::id_for_key(
        &WorkspaceId::parse(ws).unwrap(),
        "client:refund-request:second-ask",
    );
    let link: Option<Value> = tally::store::docs::get(
        app.docs.as_ref(),
        &format!("REFUND_REQUEST#{refused}"),
        "LINK",
    )
    .await
    .unwrap();
    assert!(link.is_none(), "{link:?}");
    let filed: Option<Value> =
        tally::store::docs::get(app.docs.as_ref(), &format!("REFUND_REQUEST#{id}"), "LINK")
            .await
            .unwrap();
    assert!(
        filed.is_some(),
        "a filed request's link is where the test looks"
    );
    // Members cannot ask; another workspace cannot name this payment; a customer cannot
    // approve their own request.
    app.post(
        "/v1/refund-requests",
        &member(ws, "u1"),
        json!({"payment": charge, "reason": "other", "details": "x"}),
    )
    .await
    .assert_problem(403, "forbidden");
    ask(
        &app,
        "org_rr_other",
        json!({"payment": charge, "reason": "other", "details": "x"}),
        None,
    )
    .await
    .assert_problem(404, "not_found");
    app.get(&format!("/v1/refund-requests/{id}"), &owner("org_rr_other"))
        .await
        .assert_problem(404, "not_found");
    app.post(
        &format!("/v1/admin/refund-requests/{id}/approve"),
        &owner(ws),
        json!({}),
    )
    .await
    .assert_problem(403, "forbidden");
    // More than was paid is refused, and changes nothing.
    let over = app
        .post(
            &format!("/v1/admin/refund-requests/{id}/approve"),
            &support(),
            json!({"amount_cents": price + 1}),
        )
        .await;
    over.assert_problem(422, "validation_failed");
    assert_eq!(charge_of(&app, &charge)["amount_refunded"], 0);
    // A quarter now.
    let ok = app
        .post(
            &format!("/v1/admin/refund-requests/{id}/approve"),
            &support(),
            json!({"amount_cents": price / 4, "note": "partial, as agreed"}),
        )
        .await;
    assert_eq!(ok.status.as_u16(), 200, "{:#}", ok.body);
    settle(&app).await;
    let done = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(done.body["status"], "succeeded", "{:#}", done.body);
    assert_eq!(done.body["credits_taken_back"], 250);
    assert_eq!(done.body["credits_bought"], 250);
    assert_eq!(done.body["credits_already_spent"], 0);
    assert_eq!(app.available(ws).await, 750);
    // Approving a finished request again is refused.
    app.post(
        &format!("/v1/admin/refund-requests/{id}/approve"),
        &support(),
        json!({}),
    )
    .await
    .assert_problem(409, "conflict");
    // A second request for the rest, denied first, then another approved for all that is left.
    let r2 = ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "the rest"}),
        None,
    )
    .await;
    assert_eq!(r2.body["amount"], price - price / 4, "{:#}", r2.body);
    let id2 = r2.body["id"].as_str().unwrap();
    let deny = |note: &'static str| {
        let path = format!("/v1/admin/refund-requests/{id2}/deny");
        let app = &app;
        async move {
            app.send(
                axum::http::Method::POST,
                &path,
                Some(&support()),
                Some(&json!({ "note": note }).to_string()),
                &[("idempotency-key", "deny-1")],
            )
            .await
        }
    };
    let denied = deny("outside policy").await;
    assert_eq!(denied.body["status"], "denied");
    // The same key: the first answer again; with another body, a 409.
    assert_eq!(deny("outside policy").await.body, denied.body);
    deny("changed my mind")
        .await
        .assert_problem(409, "conflict");
    let r3 = ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "please"}),
        None,
    )
    .await;
    let id3 = r3.body["id"].as_str().unwrap();
    app.post(
        &format!("/v1/admin/refund-requests/{id3}/approve"),
        &support(),
        json!({}),
    )
    .await;
    settle(&app).await;
    assert_eq!(charge_of(&app, &charge)["amount_refunded"], price);
    assert_eq!(app.available(ws).await, 0);
    // Everything is back: no further request.
    ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "x"}),
        None,
    )
    .await
    .assert_problem(409, "not_refundable");
    // The workspace's list, newest first; staff see the same.
    let list = app.get("/v1/refund-requests", &owner(ws)).await;
    let ids: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id3, id2, id.as_str()]);
    let staff = app
        .get(
            &format!("/v1/admin/workspaces/{ws}/refund-requests"),
            &support(),
        )
        .await;
    assert_eq!(staff.body["items"], list.body["items"]);
    let one = app.get("/v1/refund-requests?limit=1", &owner(ws)).await;
    assert_eq!(one.body["next_cursor"], id3);
    let rest = app
        .get(
            &format!("/v1/refund-requests?limit=5&cursor={id3}"),
            &owner(ws),
        )
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn add_ons_disputed_payments_and_bad_input_are_refused_with_clear_reasons() {
    let app = TestApp::new();
    let ws = "org_rr3";
    app.subscribe(ws, "plus", "monthly").await;
    let units = app.set_units(ws, 2).await;
    assert!(units.status.is_success(), "{:#}", units.body);
    app.settle_billing().await;
    // The add-on change's invoice is add-ons only: nothing of it is refundable.
    let h = app
        .get("/v1/billing/history?kind=subscription", &owner(ws))
        .await;
    let addon = h.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["billing_reason"] == "subscription_update")
        .unwrap_or_else(|| panic!("an add-on invoice: {:#}", h.body))
        .clone();
    let a = ask(
        &app,
        ws,
        json!({"payment": addon["invoice"], "reason": "other", "details": "changed my mind"}),
        None,
    )
    .await;
    a.assert_problem(409, "not_refundable");
    assert!(
        a.body["detail"].as_str().unwrap().contains("add-on"),
        "{:#}",
        a.body
    );
    // Calling it a duplicate does not make it one: add-ons come back only with a charge
    // the records confirm as a mistake (this one has no twin).
    ask(
        &app,
        ws,
        json!({"payment": addon["invoice"], "reason": "duplicate_charge", "details": "twice?"}),
        None,
    )
    .await
    .assert_problem(409, "not_refundable");
    // A disputed payment: the dispute decides.
    let charge = buy_packs(&app, ws, 1).await;
    dispute(&app, &charge).await;
    let d = ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "x"}),
        None,
    )
    .await;
    d.assert_problem(409, "not_refundable");
    assert!(d.body["detail"].as_str().unwrap().contains("disputed"));
    // Bad input is a 422 and files nothing.
    for bad in [
        json!({"payment": "cus_1", "reason": "other", "details": "x"}),
        json!({"payment": charge, "reason": "because", "details": "x"}),
        json!({"payment": charge, "reason": "other", "details": "bell\u{0007}"}),
        json!({"payment": charge, "reason": "other", "details": "x".repeat(501)}),
        json!({"payment": charge, "reason": "other", "details": "x", "amount": 5}),
        json!({"payment": 12, "reason": "other", "details": "x"}),
    ] {
        let a = ask(&app, ws, bad.clone(), None).await;
        assert_eq!(a.status.as_u16(), 422, "{bad} -> {:#}", a.body);
    }
    let list = app.get("/v1/refund-requests", &owner(ws)).await;
    assert_eq!(list.body["items"], json!([]));
    for (path, body) in [
        ("/v1/admin/refund-requests/rr_nope/approve", json!({})),
        ("/v1/admin/refund-requests/rr_nope/deny", json!({})),
    ] {
        app.post(path, &support(), body)
            .await
            .assert_problem(404, "not_found");
    }
    app.get("/v1/refund-requests/not-an-id", &owner(ws))
        .await
        .assert_problem(422, "validation_failed");
}

/// A keyed request whose first attempt stored the request and then failed (its key is
/// free again for a retry): the same key for another payment or reason is a 409, not the
/// first request's answer; the same payment and reason answer the request filed.
#[tokio::test]
async fn a_refund_key_reused_for_another_payment_is_a_conflict_even_after_a_failed_attempt() {
    let app = TestApp::new();
    let ws = "org_rrkey";
    let first = buy_packs(&app, ws, 1).await;
    let second = buy_packs(&app, ws, 1).await;
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let keyed = |payment: &str, details: &str| NewRequest {
        id: Some("rr_kreused".into()),
        details: details.into(),
        ..request_for(payment, RefundReason::Other)
    };
    let filed = requests
        .create(&workspace, keyed(&first, "x"), now)
        .await
        .unwrap();
    let other_reason = NewRequest {
        reason: RefundReason::TechnicalIssue,
        ..keyed(&first, "x")
    };
    for other in [keyed(&second, "x"), other_reason] {
        let e = requests.create(&workspace, other, now).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 409, "{e:?}");
    }
    // The same payment and reason in other words (another ticket's) is the same request.
    for same in [keyed(&first, "x"), keyed(&first, "in other words")] {
        let again = requests.create(&workspace, same, now).await.unwrap();
        assert_eq!(again.id, filed.id);
        assert_eq!(again.details, "x");
    }
    let list = app.get("/v1/refund-requests", &owner(ws)).await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "{:#}",
        list.body
    );
}

#[tokio::test]
async fn approving_an_approved_request_again_is_harmless_and_for_another_amount_a_409() {
    let app = TestApp::new();
    let ws = "org_rr_again";
    let charge = buy_packs(&app, ws, 1).await;
    let workspace = WorkspaceId::parse(ws).unwrap();
    // The approval's refund waits in a queue nobody consumes: the request stays approved.
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let filed = requests
        .create(&workspace, request_for(&charge, RefundReason::Other), now)
        .await
        .unwrap();
    let approved = requests
        .approve(&filed.id, "s1", None, Some(Cents::new(100)), now)
        .await
        .unwrap();
    assert_eq!(approved.status, RequestStatus::Approved);
    for again in [None, Some(Cents::new(100))] {
        let same = requests
            .approve(&filed.id, "s2", None, again, now)
            .await
            .unwrap();
        assert_eq!(
            (same.status, same.amount),
            (RequestStatus::Approved, approved.amount)
        );
    }
    let other = requests
        .approve(&filed.id, "s2", None, Some(Cents::new(200)), now)
        .await
        .unwrap_err();
    assert_eq!(other.status.as_u16(), 409, "{other:?}");
    assert!(
        format!("{other:?}").contains("already approved for 100 cents"),
        "{other:?}"
    );
}

/// Stripe's refund of a request, as the fake answers it.
fn stripe_refund(id: &str, charge: &str, amount: i64) -> Value {
    let mut r = fixture("refund");
    r["id"] = json!(id);
    r["charge"] = json!(charge);
    r["amount"] = json!(amount);
    r["status"] = json!("succeeded");
    r
}

#[tokio::test]
async fn a_stripe_outage_is_retried_with_the_same_key_and_a_refusal_fails_the_request_for_staff() {
    let app = TestApp::new();
    let ws = "org_rr4";
    let (requests, workspace, charge, r) = approved_parked(&app, ws).await;
    let now = app.clock.now();

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "try again"}})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    // A delivery after a failed call looks for the refund first: none made yet.
    Mock::given(method("GET"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(stripe_refund("re_Made", &charge, 1)),
        )
        .mount(&server)
        .await;
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: stripe_at(&server),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    let job = json!({"workspace": ws, "request": r.id, "attempt": 1}).to_string();
    let delivery = |n| Delivery {
        message_id: format!("m{n}"),
        body: job.clone(),
        group_id: Some(r.id.clone()),
        receive_count: n,
    };
    // Stripe's client retries a 500 itself; whatever reaches the worker is a retry.
    let mut outcome = worker.consume(&delivery(1)).await;
    let mut n = 1;
    while matches!(outcome, Err(ConsumeError::Retry(_))) && n < 5 {
        n += 1;
        outcome = worker.consume(&delivery(n)).await;
    }
    outcome.expect("made on a retry");
    // Every attempt carried the same idempotency key, so Stripe made one refund.
    let sent: Vec<_> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|q| q.method.as_str() == "POST")
        .collect();
    let keys: std::collections::BTreeSet<String> = sent
        .iter()
        .map(|q| {
            q.headers
                .get("idempotency-key")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(sent.len() >= 2, "{} calls", sent.len());
    assert_eq!(keys.len(), 1, "{keys:?}");
    let form: std::collections::BTreeMap<String, String> =
        url::form_urlencoded::parse(&sent[0].body)
            .into_owned()
            .collect();
    assert_eq!(form["charge"], charge);
    assert_eq!(form["reason"], "requested_by_customer");
    assert_eq!(form["metadata[org_id]"], ws);
    assert_eq!(form["metadata[refund_request]"], r.id);
    assert_eq!(form["metadata[refund_attempt]"], "1");
    let made = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(made.status, RequestStatus::Succeeded);
    assert_eq!(made.refund.as_ref().map(|r| r.as_str()), Some("re_Made"));
    // A redelivery of the same job asks Stripe nothing more.
    let calls = server.received_requests().await.unwrap().len();
    worker.consume(&delivery(9)).await.unwrap();
    assert_eq!(server.received_requests().await.unwrap().len(), calls);

    // A refusal: the request fails, its claim is freed, and staff may approve it again.
    let c2 = buy_packs(&app, ws, 1).await;
    let r2 = requests
        .create(&workspace, request_for(&c2, RefundReason::Other), now)
        .await
        .unwrap();
    requests
        .approve(&r2.id, "staff1", None, None, now)
        .await
        .unwrap();
    let refusing = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "charge_disputed",
            "message": "Charge has been disputed"}})))
        .mount(&refusing)
        .await;
    let refused = RefundWorker {
        payments: stripe_at(&refusing),
        ..worker
    };
    let job2 = json!({"workspace": ws, "request": r2.id, "attempt": 1}).to_string();
    refused
        .consume(&Delivery {
            message_id: "x".into(),
            body: job2,
            group_id: None,
            receive_count: 1,
        })
        .await
        .unwrap();
    let failed = requests.get(&workspace, &r2.id).await.unwrap().unwrap();
    assert_eq!(failed.status, RequestStatus::Failed);
    assert!(
        failed
            .steps
            .last()
            .unwrap()
            .note
            .as_deref()
            .unwrap()
            .contains("disputed"),
        "{failed:?}"
    );
    let again = requests
        .approve(&r2.id, "staff1", Some("card fixed".into()), None, now)
        .await
        .unwrap();
    assert_eq!((again.status, again.attempt), (RequestStatus::Approved, 2));
    // A late event about the first approval's refund changes nothing of the second.
    let stale = tally::refund_requests::stripe_refund_status(
        app.docs.as_ref(),
        &workspace,
        &r2.id,
        1,
        &"re_Old".parse().unwrap(),
        "failed",
        now,
    )
    .await
    .unwrap();
    assert_eq!(stale, None);
    assert_eq!(
        requests
            .get(&workspace, &r2.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        RequestStatus::Approved
    );

    // Stripe keeps idempotency keys a day: an approval sent more than 23 hours ago whose
    // outcome never arrived is not sent again (it could make a second refund).
    let silent = MockServer::start().await;
    let waiting = RefundWorker {
        payments: stripe_at(&silent),
        ..refused
    };
    let job3 = json!({"workspace": ws, "request": r2.id, "attempt": 2}).to_string();
    let stuck = |n| Delivery {
        message_id: format!("s{n}"),
        body: job3.clone(),
        group_id: None,
        receive_count: n,
    };
    // The first try marks when it was sent, then Stripe is unreachable.
    assert!(matches!(
        waiting.consume(&stuck(1)).await,
        Err(ConsumeError::Retry(_))
    ));
    let asked = silent.received_requests().await.unwrap().len();
    assert!(asked >= 1);
    // A day later the worker looks for the refund instead of asking again: Stripe lists
    // none for this approval, so it fails and staff may approve it again.
    Mock::given(method("GET"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"}),
        ))
        .mount(&silent)
        .await;
    app.clock.advance(chrono::Duration::hours(24));
    waiting.consume(&stuck(2)).await.unwrap();
    let after: Vec<(String, String)> = silent
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|q| (q.method.to_string(), q.url.path().to_owned()))
        .collect();
    assert_eq!(after.len(), asked + 1);
    assert_eq!(after[asked], ("GET".to_owned(), "/v1/refunds".to_owned()));
    assert!(
        after[asked].0 == "GET",
        "no refund is asked for after a day: {after:?}"
    );
    let failed = requests.get(&workspace, &r2.id).await.unwrap().unwrap();
    assert_eq!(failed.status, RequestStatus::Failed);
    // The customer is told, as for any failed refund.
    app.local.notifications_queue.until_idle().await;
    let told = format!("refund.failed:{}:2", r2.id);
    let notices: Vec<Value> = app
        .local
        .notifications
        .all()
        .into_iter()
        .filter(|n| n["id"] == told.as_str())
        .collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(
        notices[0]["reason"],
        "Stripe made no refund for this approval within a day"
    );
    let again = requests
        .approve(&r2.id, "staff1", None, None, app.clock.now())
        .await
        .unwrap();
    assert_eq!((again.status, again.attempt), (RequestStatus::Approved, 3));
    assert_eq!(again.sent_at, None, "a new approval is sent afresh");

    // Found: the refund Stripe made for the approval is recorded, nothing is asked again.
    let found = MockServer::start().await;
    let mut made = stripe_refund("re_Found", &c2, 100);
    made["metadata"] = json!({"org_id": ws, "refund_request": r2.id, "refund_attempt": "3"});
    Mock::given(method("GET"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [made], "has_more": false, "url": "/v1/refunds"}),
        ))
        .mount(&found)
        .await;
    let finder = RefundWorker {
        payments: stripe_at(&found),
        ..waiting
    };
    // Sent once (its outcome lost), then a day passes.
    tally::store::docs::update(
        app.docs.as_ref(),
        &format!("WORKSPACE#{ws}"),
        &format!("REFUND_REQUEST#{}", r2.id),
        |cur: Option<tally::refund_requests::RefundRequest>| {
            let mut c = cur?;
            c.sent_at = Some(app.clock.now());
            Some(c)
        },
    )
    .await
    .unwrap();
    app.clock.advance(chrono::Duration::hours(24));
    let job4 = json!({"workspace": ws, "request": r2.id, "attempt": 3}).to_string();
    finder
        .consume(&Delivery {
            message_id: "f1".into(),
            body: job4,
            group_id: None,
            receive_count: 1,
        })
        .await
        .unwrap();
    let recorded = requests.get(&workspace, &r2.id).await.unwrap().unwrap();
    assert_eq!(recorded.status, RequestStatus::Succeeded);
    assert_eq!(
        recorded.refund.as_ref().map(|r| r.as_str()),
        Some("re_Found")
    );
    assert!(
        found
            .received_requests()
            .await
            .unwrap()
            .iter()
            .all(|q| q.method.as_str() == "GET")
    );
}

#[tokio::test]
async fn concurrent_requests_and_staff_decisions_never_claim_more_than_one_refund() {
    let app = TestApp::new();
    let ws = "org_rr5";
    let charge = buy_packs(&app, ws, 2).await;
    let price = charge_of(&app, &charge)["amount"].as_i64().unwrap();
    // Two requests for the same payment at once: one is filed, the other told it is open;
    // or, coming between the first one's claim and its document, the other takes that
    // request over and both answer with it. Never two requests.
    let body = json!({"payment": charge, "reason": "technical_issue", "details": "broken"});
    let o = owner(ws);
    let (a, b) = tokio::join!(
        app.post("/v1/refund-requests", &o, body.clone()),
        app.post("/v1/refund-requests", &o, body.clone()),
    );
    let mut codes = vec![a.status.as_u16(), b.status.as_u16()];
    codes.sort();
    match codes[..] {
        [201, 409] => {}
        [201, 201] => assert_eq!(a.body["id"], b.body["id"], "{:#} {:#}", a.body, b.body),
        _ => panic!("{codes:?}: {:#} {:#}", a.body, b.body),
    }
    let listed = app.get("/v1/refund-requests", &o).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let filed = if a.status.as_u16() == 201 { &a } else { &b };
    let id = filed.body["id"].as_str().unwrap().to_owned();
    // Two staff approve different amounts at once: one decision stands, and the refund
    // made is exactly the amount on the request. The later approval, for another amount,
    // is refused: as already approved for the standing amount, or once the refund is
    // done, as any approval of a finished request is.
    let path = format!("/v1/admin/refund-requests/{id}/approve");
    let staff = support();
    let (x, y) = tokio::join!(
        app.post(&path, &staff, json!({"amount_cents": price / 4})),
        app.post(&path, &staff, json!({"amount_cents": price / 2})),
    );
    assert!(
        x.status.is_success() || y.status.is_success(),
        "{:#} {:#}",
        x.body,
        y.body
    );
    for answer in [&x, &y].into_iter().filter(|a| !a.status.is_success()) {
        answer.assert_problem(409, "conflict");
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("succeeded")
                    || d.contains("pending")
                    || d.contains("already approved")),
            "{:#}",
            answer.body
        );
    }
    settle(&app).await;
    let done = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(
        done.body["status"], "succeeded",
        "{:#} after {:#} {:#}",
        done.body, x.body, y.body
    );
    assert_eq!(done.body["attempt"], 1);
    let refunded = charge_of(&app, &charge)["amount_refunded"]
        .as_i64()
        .unwrap();
    assert_eq!(refunded, done.body["amount"].as_i64().unwrap());
    assert!(refunded == price / 4 || refunded == price / 2);
    // Deny racing approve on a new request: exactly one wins, and money moves only if it
    // was the approval.
    let r = ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "the rest"}),
        None,
    )
    .await;
    let id2 = r.body["id"].as_str().unwrap().to_owned();
    let (approve, deny) = (
        format!("/v1/admin/refund-requests/{id2}/approve"),
        format!("/v1/admin/refund-requests/{id2}/deny"),
    );
    let (ap, de) = tokio::join!(
        app.post(&approve, &staff, json!({})),
        app.post(&deny, &staff, json!({})),
    );
    settle(&app).await;
    let final_ = app
        .get(&format!("/v1/refund-requests/{id2}"), &owner(ws))
        .await;
    let after = charge_of(&app, &charge)["amount_refunded"]
        .as_i64()
        .unwrap();
    match final_.body["status"].as_str().unwrap() {
        "succeeded" => {
            assert!(ap.status.is_success());
            de.assert_problem(409, "conflict");
            assert_eq!(after, price);
        }
        "denied" => {
            assert!(de.status.is_success());
            assert_eq!(after, refunded, "no money moved");
            // The payment is free for another request.
            let again = ask(
                &app,
                ws,
                json!({"payment": charge, "reason": "other", "details": "again"}),
                None,
            )
            .await;
            assert_eq!(again.status.as_u16(), 201, "{:#}", again.body);
        }
        other => panic!("{other}: {:#}", final_.body),
    }
}

#[tokio::test]
async fn a_duplicate_whose_credits_were_used_or_whose_twin_is_disputed_waits_for_staff() {
    let app = TestApp::new();
    let ws = "org_rr6";
    let _first = buy_packs(&app, ws, 1).await;
    let second = buy_packs(&app, ws, 1).await;
    // Spend into the second pack's credits (everything of the first, and some more).
    let g = app
        .post(
            "/v1/generations",
            &member(ws, "u1"),
            json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
        )
        .await;
    let gid = g.body["id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/generations/{gid}/complete"),
        &tally_tests::service(),
        json!({"credits": 600}),
    )
    .await;
    let r = ask(
        &app,
        ws,
        json!({"payment": second, "reason": "duplicate_charge", "details": "twice"}),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "in_review", "{:#}", r.body);
    assert!(
        r.body["steps"][0]["note"]
            .as_str()
            .unwrap()
            .contains("were used"),
        "{:#}",
        r.body
    );

    let ws = "org_rr7";
    let first = buy_packs(&app, ws, 1).await;
    let second = buy_packs(&app, ws, 1).await;
    dispute(&app, &first).await;
    let r = ask(
        &app,
        ws,
        json!({"payment": second, "reason": "duplicate_charge", "details": "twice"}),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "in_review", "{:#}", r.body);
    assert_eq!(charge_of(&app, &second)["amount_refunded"], 0);
}

/// The refunds function as Lambda runs it, fed the API Gateway events of `events/refunds/`.
async fn invoke_refunds(app: &TestApp, file: &str) -> (u16, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let state = refunds::RefundsState {
        requests: RefundRequests {
            docs: app.docs.clone(),
            ledger: app.ledger.clone(),
            queue: app.local.refunds_queue.clone(),
            duplicate_window: chrono::Duration::minutes(30),
        },
        clock: app.clock.clone(),
    };
    let router = refunds::router(state, tally::http::AuthMode::ApiGateway);
    let path = format!("{}/../events/refunds/{file}", env!("CARGO_MANIFEST_DIR"));
    let req = lambda_http::request::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let res = router
        .oneshot(req.map(|b| axum::body::Body::from(b.as_ref().to_vec())))
        .await
        .unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_sample_events_reach_the_refunds_function_and_worker_as_lambda_delivers_them() {
    let app = TestApp::new();
    // The claims API Gateway's authorizer passed: an owner of "acme" with no such invoice.
    let (status, body) = invoke_refunds(&app, "post-refund-request.json").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("in_acme_renewal"));
    let (status, body) = invoke_refunds(&app, "post-refund-request-member-forbidden.json").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, body) = invoke_refunds(&app, "get-refund-requests.json").await;
    assert_eq!((status, &body["items"]), (200, &json!([])));

    // The worker's SQS batch: an unreadable message and a job for an unknown request are
    // reported as failures, each alone.
    let path = format!(
        "{}/../events/refunds-worker/poison-and-job.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let event: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids: Vec<String> = event
        .records
        .iter()
        .map(|r| r.message_id.clone().unwrap())
        .collect();
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: app.local.simulator.clone().unwrap(),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    let answer = tally::queue::lambda::process_batch(
        &worker,
        event,
        tally::refund_requests::REFUNDS_MAX_RECEIVES,
    )
    .await;
    let failed: Vec<String> = answer
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(failed, ids);
}

#[tokio::test]
async fn stripe_events_before_the_workers_record_and_in_any_order_settle_the_request_once() {
    let app = TestApp::new();
    let ws = "org_rr8";
    let charge = buy_packs(&app, ws, 1).await;
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let r = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap();
    requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap();
    // Approved: the credits the money bought go back at once, so they cannot be spent
    // while the refund is on its way.
    assert_eq!(app.available(ws).await, 0);
    app.post(
        "/v1/generations",
        &member(ws, "u1"),
        json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
    )
    .await
    .assert_problem(402, "insufficient_credits");
    // Stripe's events arrive before the worker recorded anything (it crashed after asking
    // Stripe, say): succeeded, then a late pending, then succeeded again.
    let refund: tally::ids::RefundId = "re_Early".parse().unwrap();
    for status in ["succeeded", "pending", "succeeded"] {
        tally::refund_requests::stripe_refund_status(
            app.docs.as_ref(),
            &workspace,
            &r.id,
            1,
            &refund,
            status,
            now,
        )
        .await
        .unwrap();
    }
    let got = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(got.status, RequestStatus::Succeeded);
    assert_eq!(got.refund.as_ref(), Some(&refund));
    let settled: Vec<RequestStatus> = got.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        settled,
        vec![
            RequestStatus::InReview,
            RequestStatus::Approved,
            RequestStatus::Succeeded
        ],
        "one step per change, none for repeats"
    );
    // The worker's delivery then asks Stripe nothing and only confirms.
    let server = MockServer::start().await;
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: stripe_at(&server),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    worker
        .consume(&Delivery {
            message_id: "m1".into(),
            body: json!({"workspace": ws, "request": r.id, "attempt": 1}).to_string(),
            group_id: None,
            receive_count: 1,
        })
        .await
        .unwrap();
    assert!(server.received_requests().await.unwrap().is_empty());
    app.local.notifications_queue.until_idle().await;
    assert!(
        app.local
            .notifications
            .all()
            .iter()
            .any(|n| n["type"] == "refund.confirmed" && n["request"] == r.id.as_str())
    );
    // The payment is fully claimed by the refund: no further request.
    let again = requests
        .create(&workspace, request_for(&charge, RefundReason::Other), now)
        .await;
    assert_eq!(again.unwrap_err().details().code, "not_refundable");
}

#[tokio::test]
async fn credits_taken_back_at_approval_are_recorded_and_stay_taken_back_when_a_failed_refund_is_denied()
 {
    let app = TestApp::new();
    let ws = "org_rr9";
    let charge = buy_packs(&app, ws, 1).await;
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let r = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap();
    let approved = requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap();
    assert_eq!(approved.credits_held.get(), 0, "recorded as it is sent");
    let approved = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(approved.credits_held.get(), 500);
    assert_eq!(app.available(ws).await, 0);
    // Stripe refuses the refund; staff decide not to try again.
    tally::refund_requests::refused(app.docs.as_ref(), &approved, "card closed", now)
        .await
        .unwrap();
    assert_eq!(app.available(ws).await, 0, "held until staff decide");
    // Approving again for less than the credits taken back are worth would lose the rest.
    let paid = approved.amount.get();
    let less = requests
        .approve(&r.id, "staff1", None, Some(Cents::new(paid / 2)), now)
        .await
        .unwrap_err();
    assert_eq!(less.status.as_u16(), 409, "{less:?}");
    assert_eq!(
        requests
            .get(&workspace, &r.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        RequestStatus::Failed
    );
    let denied = requests
        .deny(&r.id, "staff1", Some("customer agreed".into()), now)
        .await
        .unwrap();
    assert_eq!(denied.status, RequestStatus::Denied);
    assert_eq!(
        denied.credits_held.get(),
        500,
        "on record for the adjustment"
    );
    assert_eq!(app.available(ws).await, 0);
    // Again: nothing more.
    requests.deny(&r.id, "staff1", None, now).await.unwrap();
    assert_eq!(app.available(ws).await, 0);
}

/// A refund Stripe made for an approval whose status never reached the request (the worker
/// stopped after Stripe answered): approving again sends it again, and its credits are
/// taken back once, not a second share for the same money.
#[tokio::test]
async fn sending_an_approval_again_after_stripe_made_its_refund_takes_its_credits_once() {
    let app = TestApp::new();
    let ws = "org_rr_resend";
    let workspace = WorkspaceId::parse(ws).unwrap();
    let charge = buy_packs(&app, ws, 1).await;
    app.settle_billing().await;
    assert_eq!(app.available(ws).await, 500);
    let price = charge_of(&app, &charge)["amount"].as_u64().unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let r = requests
        .create(&workspace, request_for(&charge, RefundReason::Other), now)
        .await
        .unwrap();
    let half = tally::money::Cents::new(price / 2);
    requests
        .approve(&r.id, "staff1", None, Some(half), now)
        .await
        .unwrap();
    assert_eq!(app.available(ws).await, 250, "half taken back at approval");
    // Stripe made the refund: its charge says so, and the refund (named by its metadata)
    // is on the payment, before its status has reached the request.
    let charge_id = tally::ids::ChargeId::parse(&charge).unwrap();
    tally::store::docs::update(
        app.docs.as_ref(),
        &tally::billing::records::charge_pk(&charge_id),
        tally::billing::records::PAYMENT_SK,
        |cur: Option<tally::billing::records::PaymentRecord>| {
            let mut p = cur.expect("the payment is recorded");
            p.amount_refunded = half;
            p.refunds.push(tally::billing::records::RefundFact {
                id: tally::ids::RefundId::parse("re_made_for_the_request").unwrap(),
                amount: half,
                status: Some("succeeded".into()),
                reason: Some("requested_by_customer".into()),
                created: now,
                request: Some(r.id.clone()),
                attempt: Some(1),
            });
            Some(p)
        },
    )
    .await
    .unwrap();
    let again = requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap();
    assert_eq!(again.status, RequestStatus::Approved);
    assert_eq!(
        app.available(ws).await,
        250,
        "the same half of the money takes its credits once"
    );
}

/// `ws` buys a pack and asks for it back for a reason staff decide: the charge and the
/// request's id (in review).
async fn in_review(app: &TestApp, ws: &str) -> (String, String) {
    let charge = buy_packs(app, ws, 1).await;
    app.settle_billing().await;
    let filed = ask(
        app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "not what I expected"}),
        None,
    )
    .await;
    assert_eq!(filed.status.as_u16(), 201, "{:#}", filed.body);
    assert_eq!(filed.body["status"], "in_review", "{:#}", filed.body);
    let id = filed.body["id"].as_str().unwrap().to_owned();
    (charge, id)
}

/// A dispute (an inquiry, which Stripe does not stop refunds of) opened after staff
/// approved a request but before the refunds worker made its refund: the worker makes no
/// refund, the approval fails with the dispute as its reason, and the customer is told.
#[tokio::test]
async fn an_approval_whose_payment_is_disputed_before_its_refund_is_made_fails_without_one() {
    let app = TestApp::new();
    let ws = "org_rr_disputed_before_sent";
    let (charge, id) = in_review(&app, ws).await;
    // Approved, its refund job waiting in a queue no worker reads yet.
    let waiting = tally::queue::local::LocalQueue::new("refunds-waiting.fifo", true, 5);
    let requests = RefundRequests {
        docs: app.docs.clone(),
        ledger: app.ledger.clone(),
        queue: waiting.clone(),
        duplicate_window: chrono::Duration::minutes(30),
    };
    let approved = requests
        .approve(&id, "staff_1", None, None, app.clock.now())
        .await
        .unwrap();
    assert_eq!(approved.status, RequestStatus::Approved);
    let inquiry = app
        .send(
            axum::http::Method::POST,
            &format!("/sim/charges/{charge}/inquiry"),
            None,
            None,
            &[("content-length", "0")],
        )
        .await;
    assert_eq!(inquiry.status.as_u16(), 200, "{:#}", inquiry.body);
    assert_eq!(inquiry.body["is_charge_refundable"], true);
    app.settle_billing().await;
    let payments: Arc<dyn tally::payments::Payments> = app.local.simulator.clone().unwrap();
    waiting.start(Arc::new(RefundWorker {
        docs: app.docs.clone(),
        payments,
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    }));
    waiting.until_idle().await;
    settle(&app).await;
    assert_eq!(charge_of(&app, &charge)["amount_refunded"], 0);
    let failed = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(failed.body["status"], "failed", "{:#}", failed.body);
    assert!(
        failed.body.to_string().contains("disputed"),
        "{:#}",
        failed.body
    );
    assert!(
        app.local
            .notifications
            .all()
            .iter()
            .any(|n| n["type"] == "refund.failed" && n["request"] == id.as_str()),
        "the customer is told"
    );
}

/// A dispute opened while a request waits for staff decides where the money goes: the
/// approval is refused, and nothing is taken back or refunded.
#[tokio::test]
async fn a_request_whose_payment_is_disputed_after_filing_cannot_be_approved() {
    let app = TestApp::new();
    let ws = "org_rr_disputed_later";
    let (charge, id) = in_review(&app, ws).await;
    let dispute = app
        .send(
            axum::http::Method::POST,
            &format!("/sim/charges/{charge}/dispute"),
            None,
            None,
            &[("content-length", "0")],
        )
        .await;
    let dispute = dispute.body["id"].as_str().unwrap().to_owned();
    app.settle_billing().await;
    let frozen = app.available(ws).await;
    let approval = app
        .post(
            &format!("/v1/admin/refund-requests/{id}/approve"),
            &support(),
            json!({}),
        )
        .await;
    approval.assert_problem(409, "not_refundable");
    assert!(
        approval.body["detail"]
            .as_str()
            .unwrap()
            .contains("disputed"),
        "{:#}",
        approval.body
    );
    settle(&app).await;
    assert_eq!(charge_of(&app, &charge)["amount_refunded"], 0);
    assert_eq!(app.available(ws).await, frozen);
    let still = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(still.body["status"], "in_review", "{:#}", still.body);
    // Won by the merchant, the dispute no longer decides: staff may approve.
    let won = app
        .send(
            axum::http::Method::POST,
            &format!("/sim/disputes/{dispute}/close"),
            None,
            Some(r#"{"outcome":"won"}"#),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(won.status.as_u16(), 200, "{:#}", won.body);
    app.settle_billing().await;
    let ok = app
        .post(
            &format!("/v1/admin/refund-requests/{id}/approve"),
            &support(),
            json!({}),
        )
        .await;
    assert_eq!(ok.status.as_u16(), 200, "{:#}", ok.body);
    // Approved by staff. The refunds worker runs at once beside the answer, so the answer
    // may already show what Stripe then said of the refund: the approval step is what
    // this test is about.
    let approved = ok.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["status"] == "approved" && s["by"] == "staff:support-1");
    assert!(approved, "{:#}", ok.body);
}

/// A request whose claim was written but whose own document was not (the store failed in
/// between) is neither lost nor a block on the payment: the customer's next attempt,
/// without the first one's key, takes it over, and staff can find and decide it.
#[tokio::test]
async fn a_request_claimed_but_never_written_is_taken_over_by_the_next_attempt() {
    let app = TestApp::new();
    let ws = "org_rr_orphan";
    let workspace = WorkspaceId::parse(ws).unwrap();
    let charge = buy_packs(&app, ws, 1).await;
    app.settle_billing().await;
    let requests = RefundRequests {
        docs: tally_tests::OnWrite::new(
            app.docs.clone(),
            |pk, sk| pk.starts_with("WORKSPACE#") && sk.starts_with("REFUND_REQUEST#"),
            tally_tests::fails_first_write(),
        ),
        ..parked_requests(&app)
    };
    let ask_once = || request_for(&charge, RefundReason::Other);
    let now = app.clock.now();
    requests
        .create(&workspace, ask_once(), now)
        .await
        .expect_err("the request's document was not written");
    let second = requests
        .create(&workspace, ask_once(), now)
        .await
        .expect("taken over, not refused as already requested");
    assert_eq!(second.status, RequestStatus::InReview);
    // Staff see it and can decide it; only one request exists for the payment.
    let listed = app.get("/v1/refund-requests", &owner(ws)).await;
    assert_eq!(
        listed.body["items"].as_array().unwrap().len(),
        1,
        "{:#}",
        listed.body
    );
    assert_eq!(listed.body["items"][0]["id"], second.id.as_str());
    let approved = requests
        .approve(&second.id, "staff1", None, None, now)
        .await
        .unwrap();
    assert_eq!(approved.status, RequestStatus::Approved);
    assert_eq!(app.available(ws).await, 0, "its credits taken back once");
}

/// Two packs of 500 bought by `ws`: its id, and the charge of the second.
async fn charged_twice(app: &TestApp, ws: &str) -> (WorkspaceId, String) {
    buy_packs(app, ws, 1).await;
    let second = buy_packs(app, ws, 1).await;
    app.settle_billing().await;
    (WorkspaceId::parse(ws).unwrap(), second)
}

/// Refund requests over the app's documents where 600 credits are used just as the first
/// request's document is written (after the rules looked, before the take-back), and the
/// `fail`th write of a request document fails as a store outage would.
fn used_while_approved(
    app: &TestApp,
    workspace: &WorkspaceId,
    fail: Option<usize>,
) -> RefundRequests {
    use tally::ledger::{Actor, Operation, Refs};
    let (ledger, w) = (app.ledger.clone(), workspace.clone());
    RefundRequests {
        docs: tally_tests::OnWrite::new(
            app.docs.clone(),
            |pk, sk| pk.starts_with("WORKSPACE#") && sk.starts_with("REFUND_REQUEST#"),
            Box::new(move |n| {
                let (ledger, w) = (ledger.clone(), w.clone());
                Box::pin(async move {
                    if Some(n) == fail {
                        return tally_tests::timed_out();
                    }
                    if n == 0 {
                        // All of the first pack and some of the second, used meanwhile.
                        ledger
                            .execute(tally::service::LedgerRequest {
                                workspace: w,
                                key: tally::ids::IdempotencyKey::derived("used-meanwhile".into()),
                                fingerprint: "used-meanwhile".into(),
                                actor: Actor::system(),
                                refs: Refs::default(),
                                op: Operation::Adjust {
                                    credits: tally::money::CreditDelta::new(-600),
                                    note: "used meanwhile".into(),
                                },
                            })
                            .await
                            .unwrap();
                    }
                    Ok(())
                })
            }),
        ),
        ..parked_requests(app)
    }
}

/// A verified duplicate whose credits are used between the rules' look at them and the
/// take-back (a generation at that very moment) is not refunded with those credits kept:
/// the approval goes to support staff, nothing is sent, and only the credits still unused
/// are taken back (as at any approval). Staff then decide knowing what was used.
#[tokio::test]
async fn a_duplicate_whose_credits_are_used_while_it_is_approved_goes_to_staff() {
    let app = TestApp::new();
    let ws = "org_rr_race";
    let (workspace, second) = charged_twice(&app, ws).await;
    let requests = used_while_approved(&app, &workspace, None);
    let now = app.clock.now();
    let r = requests
        .create(
            &workspace,
            request_for(&second, RefundReason::DuplicateCharge),
            now,
        )
        .await
        .unwrap();
    assert_eq!(r.status, RequestStatus::InReview, "{r:#?}");
    assert!(
        r.steps
            .last()
            .and_then(|s| s.note.as_deref())
            .is_some_and(|n| n.contains("used while it was being approved")
                && n.contains("the 400 credits still unused were taken back")),
        "{r:#?}"
    );
    assert_eq!(r.credits_held.get(), 400);
    assert_eq!(app.available(ws).await, 0, "the unused part taken back");
    assert_eq!(charge_of(&app, &second)["amount_refunded"], 0);
    // Asked again (the same request): still with staff, still nothing taken.
    let again = requests
        .create(
            &workspace,
            NewRequest {
                id: Some(r.id.clone()),
                ..request_for(&second, RefundReason::DuplicateCharge)
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(again.status, RequestStatus::InReview);
    assert_eq!(again.steps.len(), r.steps.len());
    // A refund worth less than the 400 credits taken back would leave the customer without
    // the credits of the difference: refused, nothing changes.
    let worth = (400 * r.amount.get()).div_ceil(500);
    let less = requests
        .approve(&r.id, "staff1", None, Some(Cents::new(worth - 1)), now)
        .await
        .unwrap_err();
    assert_eq!(less.status.as_u16(), 409, "{less:?}");
    assert!(
        less.detail.contains("approve at least that much"),
        "{less:?}"
    );
    let unchanged = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(unchanged.status, RequestStatus::InReview);
    assert_eq!(unchanged.steps.len(), r.steps.len());
    assert_eq!(charge_of(&app, &second)["amount_refunded"], 0);
    // Staff approve knowing, for what the unused credits are worth: the refund is sent,
    // nothing more is taken.
    let approved = requests
        .approve(&r.id, "staff1", None, Some(Cents::new(worth)), now)
        .await
        .unwrap();
    assert_eq!(approved.status, RequestStatus::Approved);
    assert_eq!(approved.amount.get(), worth);
    assert_eq!(app.available(ws).await, 0);
    assert_eq!(approved.credits_held.get(), 400);
}

/// The same, with the store failing as the request's document is sent to staff (its claim
/// already is): asked again, the request goes by its claim and is not refunded.
#[tokio::test]
async fn an_approval_sent_to_staff_is_not_refunded_when_its_document_lags_behind() {
    let app = TestApp::new();
    let ws = "org_rr_race2";
    let (workspace, second) = charged_twice(&app, ws).await;
    // Writes of the request's document: 0 filed, 1 the credits taken back, 2 to staff.
    let requests = used_while_approved(&app, &workspace, Some(2));
    let now = app.clock.now();
    let ask = NewRequest {
        id: Some("rr_kduplicate2".into()),
        ..request_for(&second, RefundReason::DuplicateCharge)
    };
    requests
        .create(&workspace, ask.clone(), now)
        .await
        .expect_err("the store failed");
    let lagging = requests
        .get(&workspace, "rr_kduplicate2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lagging.status, RequestStatus::Approved, "the document lags");
    let again = requests.create(&workspace, ask, now).await.unwrap();
    assert_eq!(again.status, RequestStatus::InReview, "{again:#?}");
    assert_eq!(charge_of(&app, &second)["amount_refunded"], 0);
    // The worker, handed the lagging approval, does not make it either.
    let server = MockServer::start().await;
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: stripe_at(&server),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    let job = json!({"workspace": ws, "request": "rr_kduplicate2", "attempt": 1});
    worker
        .consume(&Delivery {
            message_id: "m1".into(),
            body: job.to_string(),
            group_id: Some("rr_kduplicate2".into()),
            receive_count: 1,
        })
        .await
        .unwrap();
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// Subscribes `ws` to Plus monthly: its month of credits, and the sign-up invoice as Stripe
/// sent it with its id and the cents it was paid.
async fn subscribed(app: &TestApp, ws: &str) -> (u64, Value, String, u64) {
    app.subscribe(ws, "plus", "monthly").await;
    let month = app.available(ws).await;
    let invoice = app.sim_events("invoice.paid").last().unwrap().clone();
    let id = invoice["id"].as_str().unwrap().to_owned();
    let paid = invoice["amount_paid"].as_u64().unwrap();
    (month, invoice, id, paid)
}

/// A post-payment credit note of `invoice` for `post` cents, `refunded` of them by a refund,
/// the rest outside Stripe, built from Stripe's example object.
fn post_payment_note(id: &str, invoice: &str, post: u64, refunded: u64) -> Value {
    let mut note = fixture("credit_note");
    note["id"] = json!(id);
    note["invoice"] = json!(invoice);
    note["type"] = json!("post_payment");
    note["status"] = json!("issued");
    note["total"] = json!(post);
    note["post_payment_amount"] = json!(post);
    note["pre_payment_amount"] = json!(0);
    note["out_of_band_amount"] = json!(post - refunded);
    note["refunds"] = if refunded > 0 {
        json!([{"amount_refunded": refunded, "refund": format!("re_{id}")}])
    } else {
        json!([])
    };
    note["memo"] = Value::Null;
    note
}

/// Delivers one signed Stripe event and lets every queue settle.
async fn deliver(app: &TestApp, id: &str, kind: &str, object: Value) {
    let now = app.clock.now().timestamp();
    let e = tally_tests::stripe_event(id, kind, now, object);
    assert_eq!(app.deliver_signed(&e).await, 200);
    settle(app).await;
}

#[tokio::test]
async fn a_credit_note_that_gives_money_back_without_a_refund_takes_its_credits_back_once() {
    let app = TestApp::new();
    let ws = "org_cn";
    let (month, _, id, paid) = subscribed(&app, ws).await;
    let charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Staff credit a quarter of the invoice outside Stripe: a quarter of its credits go.
    let note = app
        .dashboard(
            &format!("/sim/invoices/{id}/credit-note"),
            json!({"amount": paid / 4}),
        )
        .await;
    assert_eq!(note.status.as_u16(), 200, "{:#}", note.body);
    let quarter = month * (paid / 4) / paid;
    assert_eq!(app.available(ws).await, month - quarter);
    // More than is left to credit is refused by Stripe.
    app.dashboard(
        &format!("/sim/invoices/{id}/credit-note"),
        json!({"amount": paid}),
    )
    .await
    .assert_problem(409, "conflict");
    // The event again, and once more signed as a new delivery: nothing more.
    let created = app.sim_events("credit_note.created");
    assert_eq!(created.len(), 1);
    app.redeliver_first("credit_note.created").await;
    assert_eq!(app.available(ws).await, month - quarter);
    let line = app
        .get("/v1/billing/history?limit=50", &owner(ws))
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(line["amount_credited"], paid / 4, "{line:#}");
    assert_eq!(line["amount_refunded"], 0, "{line:#}");
    assert_eq!(line["credits_taken_back"], quarter, "{line:#}");

    // What a refund request may still return excludes what the note gave back.
    let r = ask(
        &app,
        ws,
        json!({"payment": charge, "reason": "other", "details": "not what we expected"}),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "in_review", "{:#}", r.body);
    let rid = r.body["id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/admin/refund-requests/{rid}/approve"),
        &support(),
        json!({"amount_cents": paid}),
    )
    .await
    .assert_problem(422, "validation_failed");
    assert_eq!(charge_of(&app, &charge)["amount_refunded"], 0);
    let ok = app
        .post(
            &format!("/v1/admin/refund-requests/{rid}/approve"),
            &support(),
            json!({"amount_cents": paid - paid / 4}),
        )
        .await;
    assert_eq!(ok.status.as_u16(), 200, "{:#}", ok.body);
    settle(&app).await;
    let done = app
        .get(&format!("/v1/refund-requests/{rid}"), &owner(ws))
        .await;
    assert_eq!(done.body["status"], "succeeded", "{:#}", done.body);
    // The refund and the note give back all that was paid: every credit it bought goes.
    assert_eq!(app.available(ws).await, 0);
    assert_eq!(
        charge_of(&app, &charge)["amount_refunded"],
        paid - paid / 4,
        "never more than was paid comes back"
    );

    // Voiding the note later takes nothing further and gives nothing back by itself.
    let mut voided = created[0].clone();
    voided["status"] = json!("void");
    voided["voided_at"] = json!(app.clock.now().timestamp());
    deliver(&app, "evt_cn_void", "credit_note.voided", voided).await;
    assert_eq!(app.available(ws).await, 0);
}

#[tokio::test]
async fn a_credit_note_with_a_refund_counts_the_refund_once_and_a_reissue_note_takes_nothing() {
    let app = TestApp::new();
    let ws = "org_cn2";
    let (month, _, id, paid) = subscribed(&app, ws).await;
    // A note made in the dashboard: half to the customer's balance, a tenth refunded (the
    // refund reaches the charge's `amount_refunded` by its own events, not here).
    let mut note = post_payment_note("cn_balance_1", &id, paid / 2 + paid / 10, paid / 10);
    note["out_of_band_amount"] = Value::Null;
    note["customer_balance_transaction"] = json!("cbtxn_1");
    deliver(&app, "evt_cn_bal", "credit_note.created", note).await;
    let half = month * (paid / 2) / paid;
    assert_eq!(app.available(ws).await, month - half);

    // A note with the reissue's memo is the reissue's own: nothing was given back.
    let mut reissue = post_payment_note("cn_reissue_1", &id, paid - paid / 2, 0);
    reissue["memo"] = json!(tally::payments::REISSUE_MEMO);
    deliver(&app, "evt_cn_re", "credit_note.created", reissue).await;
    assert_eq!(app.available(ws).await, month - half);
    assert!(app.local.billing_queue.dead_letters().is_empty());

    // A note of an API version that names one `refund` without its amount cannot say what
    // it gave back without it: a person decides, nothing is taken.
    let mut old = post_payment_note("cn_old_1", &id, paid / 10, 0);
    old.as_object_mut().unwrap().remove("refunds");
    old["refund"] = json!("re_old_1");
    deliver(&app, "evt_cn_old", "credit_note.created", old).await;
    assert_eq!(app.available(ws).await, month - half);
    let dead = app.local.billing_queue.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].body.contains("evt_cn_old"));
}

#[tokio::test]
async fn a_credit_note_waits_for_an_open_dispute_and_one_on_a_replacement_follows_the_original() {
    let app = TestApp::new();
    let ws = "org_cn3";
    let (month, _, id, paid) = subscribed(&app, ws).await;
    let charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A dispute freezes every credit; a note made meanwhile takes nothing yet.
    let d = app
        .dashboard(&format!("/sim/charges/{charge}/dispute"), json!({}))
        .await;
    assert_eq!(d.status.as_u16(), 200, "{:#}", d.body);
    let dispute = d.body["id"].as_str().unwrap().to_owned();
    let note = app
        .dashboard(
            &format!("/sim/invoices/{id}/credit-note"),
            json!({"amount": paid / 2}),
        )
        .await;
    assert_eq!(note.status.as_u16(), 200, "{:#}", note.body);
    assert_eq!(app.available(ws).await, 0, "all frozen");
    // Won: the credits come back, less what the note's money bought.
    let won = app
        .dashboard(
            &format!("/sim/disputes/{dispute}/close"),
            json!({"outcome": "won"}),
        )
        .await;
    assert_eq!(won.status.as_u16(), 200, "{:#}", won.body);
    let half = month * (paid / 2) / paid;
    assert_eq!(app.available(ws).await, month - half);

    // Reissued with corrected details, then a note on the replacement: the original's
    // payment paid it, so its credits go back as for the original.
    let ws = "org_cn4";
    let (month, _, id, paid) = subscribed(&app, ws).await;
    let r = app
        .send(
            axum::http::Method::POST,
            &format!("/v1/admin/invoices/{id}/reissue"),
            Some(&support()),
            Some(&json!({"name": "Acme GmbH"}).to_string()),
            &[("idempotency-key", "reissue-cn4")],
        )
        .await;
    assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
    settle(&app).await;
    assert_eq!(app.available(ws).await, month, "a reissue moves no credits");
    let replacement = r.body["replacement"].as_str().unwrap().to_owned();
    let note = app
        .dashboard(
            &format!("/sim/invoices/{replacement}/credit-note"),
            json!({"amount": paid / 4}),
        )
        .await;
    assert_eq!(note.status.as_u16(), 200, "{:#}", note.body);
    let quarter = month * (paid / 4) / paid;
    assert_eq!(app.available(ws).await, month - quarter);
    assert!(app.local.billing_queue.dead_letters().is_empty());
}

#[tokio::test]
async fn a_refund_that_failed_after_it_succeeded_leaves_the_payment_refundable_again() {
    let app = TestApp::new();
    let ws = "org_rrf";
    let charge = buy_packs(&app, ws, 1).await;
    let price = charge_of(&app, &charge)["amount"].as_i64().unwrap();
    // Refunded in full from the dashboard: the credits go.
    let made = app
        .dashboard(&format!("/sim/charges/{charge}/refund"), json!({}))
        .await;
    assert_eq!(made.status.as_u16(), 200, "{:#}", made.body);
    assert_eq!(app.available(ws).await, 0);
    // Nothing is left to ask for.
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let refused = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap_err();
    assert_eq!(refused.status.as_u16(), 409, "{refused:?}");
    // The bank returns the refund: Stripe reports it failed, its money back on the balance.
    let mut failed = made.body.clone();
    failed["status"] = json!("failed");
    failed["failure_reason"] = json!("expired_or_canceled_card");
    deliver(&app, "evt_rf_failed", "refund.failed", failed).await;
    // The customer can ask again, and staff can refund all of it.
    let r = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap();
    assert_eq!(r.status, RequestStatus::InReview);
    let approved = requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap();
    assert_eq!(approved.status, RequestStatus::Approved);
    assert_eq!(approved.amount.get(), price as u64);
    // The credits the failed refund took stay taken; none are taken twice.
    assert_eq!(app.available(ws).await, 0);
}

/// Stripe answers the refund as failed at once: the request fails, and the customer is
/// told so, once, and never that it is on its way.
#[tokio::test]
async fn a_refund_stripe_answers_failed_fails_the_request_and_tells_the_customer_once() {
    let app = TestApp::new();
    let ws = "org_rraf";
    let (requests, workspace, charge, r) = approved_parked(&app, ws).await;
    let server = MockServer::start().await;
    let mut failed = stripe_refund("re_Bad", &charge, 1);
    failed["status"] = json!("failed");
    failed["failure_reason"] = json!("lost_or_stolen_card");
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(failed))
        .mount(&server)
        .await;
    // The notifications queue refuses the first send: the notice goes with the next
    // delivery, once.
    let queue = Arc::new(OutageQueue {
        down: std::sync::atomic::AtomicU32::new(1),
        sent: std::sync::Mutex::new(Vec::new()),
    });
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: stripe_at(&server),
        notifications: queue.clone(),
        clock: app.clock.clone(),
    };
    let job = json!({"workspace": ws, "request": r.id, "attempt": 1}).to_string();
    let delivery = |n| Delivery {
        message_id: format!("m{n}"),
        body: job.clone(),
        group_id: None,
        receive_count: n,
    };
    assert!(matches!(
        worker.consume(&delivery(1)).await,
        Err(ConsumeError::Retry(_))
    ));
    let after = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(after.status, RequestStatus::Failed);
    for n in 2..=3 {
        worker.consume(&delivery(n)).await.unwrap();
    }
    let told: Vec<Value> = queue
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| serde_json::from_str(&m.body).unwrap())
        .collect();
    assert_eq!(told.len(), 1, "{told:#?}");
    assert_eq!(told[0]["type"], "refund.failed");
    assert_eq!(told[0]["id"], format!("refund.failed:{}:1", r.id));
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "one refund call"
    );
}

/// A refund made for a request that Stripe later reports failed (the bank returned it):
/// the customer, told it was on its way, is told it failed, once however often the
/// event comes; the request is failed.
#[tokio::test]
async fn a_requests_refund_that_fails_after_it_was_made_is_reported_to_the_customer_once() {
    let app = TestApp::new();
    let ws = "org_rfb";
    buy_packs(&app, ws, 1).await;
    let second = buy_packs(&app, ws, 1).await;
    let r = ask(
        &app,
        ws,
        json!({"payment": second, "reason": "duplicate_charge", "details": "charged twice"}),
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let done = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(done.body["status"], "succeeded", "{:#}", done.body);
    let refund = app
        .sim_events("refund.created")
        .into_iter()
        .find(|f| f["metadata"]["refund_request"] == id.as_str())
        .unwrap();
    let notices = |kind: &str| {
        app.local
            .notifications
            .all()
            .into_iter()
            .filter(|n| n["type"] == kind && n["request"] == id.as_str())
            .count()
    };
    assert_eq!(notices("refund.confirmed"), 1);
    assert_eq!(notices("refund.failed"), 0);
    let mut failed = refund.clone();
    failed["status"] = json!("failed");
    failed["failure_reason"] = json!("expired_or_canceled_card");
    deliver(&app, "evt_rfb_failed", "refund.failed", failed.clone()).await;
    deliver(&app, "evt_rfb_updated", "refund.updated", failed).await;
    let after = app
        .get(&format!("/v1/refund-requests/{id}"), &owner(ws))
        .await;
    assert_eq!(after.body["status"], "failed", "{:#}", after.body);
    assert!(after.body.get("failure_told").is_none(), "{:#}", after.body);
    assert_eq!(
        notices("refund.failed"),
        1,
        "{:#?}",
        app.local.notifications.all()
    );
    let notice = app
        .local
        .notifications
        .all()
        .into_iter()
        .find(|n| n["type"] == "refund.failed")
        .unwrap();
    assert_eq!(notice["workspace"], ws);
    assert_eq!(notice["id"], format!("refund.failed:{id}:1"));
    assert!(
        notice["reason"].as_str().unwrap().contains("failed"),
        "{notice:#}"
    );
}

/// SQS out of service for the first `down` sends, then a queue nobody consumes.
struct OutageQueue {
    down: std::sync::atomic::AtomicU32,
    sent: std::sync::Mutex<Vec<tally::queue::Message>>,
}

#[async_trait::async_trait]
impl tally::queue::Queue for OutageQueue {
    async fn send(&self, message: tally::queue::Message) -> Result<(), tally::queue::QueueError> {
        use std::sync::atomic::Ordering;
        if self
            .down
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok()
        {
            return Err(tally::queue::QueueError::unavailable("SQS is down"));
        }
        self.sent.lock().unwrap().push(message);
        Ok(())
    }
}

#[tokio::test]
async fn an_approval_the_queue_lost_is_queued_again_when_the_payment_is_asked_for_again() {
    let app = TestApp::new();
    let ws = "org_rrq";
    let charge = buy_packs(&app, ws, 1).await;
    let queue = Arc::new(OutageQueue {
        down: std::sync::atomic::AtomicU32::new(1),
        sent: std::sync::Mutex::new(Vec::new()),
    });
    let requests = RefundRequests {
        queue: queue.clone(),
        ..parked_requests(&app)
    };
    let workspace = WorkspaceId::parse(ws).unwrap();
    let now = app.clock.now();
    let r = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap();
    // Approved, but the worker's message is lost; the client gives up.
    let lost = requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap_err();
    assert_eq!(lost.status.as_u16(), 503, "{lost:?}");
    let stuck = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(stuck.status, RequestStatus::Approved);
    assert!(queue.sent.lock().unwrap().is_empty());
    // Asking again at once: the approval may still be on its way; nothing is sent twice.
    let again = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap_err();
    assert_eq!(again.status.as_u16(), 409, "{again:?}");
    assert!(queue.sent.lock().unwrap().is_empty());
    // Minutes later the request is found stuck and queued again, for this attempt.
    let later = now + chrono::Duration::minutes(tally::refund_requests::STUCK_AFTER_MINUTES);
    let again = file_technical(&requests, &workspace, &charge, later)
        .await
        .unwrap_err();
    assert_eq!(again.status.as_u16(), 409, "{again:?}");
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].dedup_id.as_deref(),
        Some(format!("{}-{}", r.id, stuck.attempt).as_str())
    );
    // Taken back once, whatever was sent.
    assert_eq!(app.available(ws).await, 0);

    // Stuck the same way, then refunded by staff in the dashboard meanwhile: never sent a
    // second time; staff decide.
    let ws = "org_rrq2";
    let charge = buy_packs(&app, ws, 1).await;
    queue.down.store(1, std::sync::atomic::Ordering::SeqCst);
    let workspace = WorkspaceId::parse(ws).unwrap();
    let r = file_technical(&requests, &workspace, &charge, now)
        .await
        .unwrap();
    requests
        .approve(&r.id, "staff1", None, None, now)
        .await
        .unwrap_err();
    let made = app
        .dashboard(&format!("/sim/charges/{charge}/refund"), json!({}))
        .await;
    assert_eq!(made.status.as_u16(), 200, "{:#}", made.body);
    let sent_before = queue.sent.lock().unwrap().len();
    let again = file_technical(&requests, &workspace, &charge, later)
        .await
        .unwrap_err();
    assert_eq!(again.status.as_u16(), 409, "{again:?}");
    assert_eq!(
        queue.sent.lock().unwrap().len(),
        sent_before,
        "not sent again"
    );
    let review = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(review.status, RequestStatus::InReview, "{review:#?}");
    assert!(
        review
            .steps
            .last()
            .unwrap()
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("left to refund"),
        "{review:#?}"
    );
}

#[tokio::test]
async fn a_credit_note_on_a_replacement_that_arrives_before_the_replacement_follows_the_original() {
    let app = TestApp::new();
    let ws = "org_cn5";
    let (month, invoice, original, paid) = subscribed(&app, ws).await;
    // The note on the replacement comes first: nothing says yet whose payment paid it.
    let mut note = post_payment_note("cn_on_replacement", "in_replacement_1", paid / 2, 0);
    note["customer"] = invoice["customer"].clone();
    deliver(&app, "evt_cn_r1", "credit_note.created", note).await;
    assert_eq!(app.available(ws).await, month);
    // Then the replacement itself, naming the invoice it replaces.
    let mut replacement = invoice.clone();
    replacement["id"] = json!("in_replacement_1");
    replacement["metadata"] = json!({"kind": "reissue", "reissue_of": original});
    replacement["parent"] = Value::Null;
    deliver(&app, "evt_rep_1", "invoice.finalized", replacement).await;
    let half = month * (paid / 2) / paid;
    assert_eq!(app.available(ws).await, month - half);
    assert!(app.local.billing_queue.dead_letters().is_empty());
}

#[tokio::test]
async fn a_credit_note_and_a_lost_partial_dispute_take_back_what_each_gave_back_in_any_order() {
    let app = TestApp::new();
    for (ws, note_first) in [("org_cnd1", true), ("org_cnd2", false)] {
        let (month, _, id, paid) = subscribed(&app, ws).await;
        let charge = charge_of(
            &app,
            app.sim_events("charge.succeeded").last().unwrap()["id"]
                .as_str()
                .unwrap(),
        );
        let now = app.clock.now().timestamp();
        // Half the charge disputed with the bank (Stripe's dispute object).
        let mut dispute = fixture("dispute");
        dispute["id"] = json!(format!("dp_{ws}"));
        dispute["amount"] = json!(paid / 2);
        dispute["charge"] = charge["id"].clone();
        dispute["payment_intent"] = charge["payment_intent"].clone();
        dispute["currency"] = json!("usd");
        dispute["created"] = json!(now);
        dispute["status"] = json!("needs_response");
        let note = async || {
            let n = app
                .dashboard(
                    &format!("/sim/invoices/{id}/credit-note"),
                    json!({"amount": paid / 4}),
                )
                .await;
            assert_eq!(n.status.as_u16(), 200, "{:#}", n.body);
        };
        if note_first {
            note().await;
        }
        let opened = format!("evt_{ws}_dp1");
        deliver(&app, &opened, "charge.dispute.created", dispute.clone()).await;
        if !note_first {
            note().await;
        }
        dispute["status"] = json!("lost");
        let lost = format!("evt_{ws}_dp2");
        deliver(&app, &lost, "charge.dispute.closed", dispute).await;
        // Three quarters of the money went back (half by the bank, a quarter by the note):
        // a quarter of the month's credits stays, give or take the rounding of two shares,
        // whether the note was followed before the dispute or waited for it to close.
        let left = app.available(ws).await;
        assert!(
            (month / 4 - 2..=month / 4 + 2).contains(&left),
            "{ws}: {left} of {month}"
        );
        assert!(app.local.billing_queue.dead_letters().is_empty());
    }
}

/// A subscription's first invoice, a request for its payment approved for half of it by
/// staff, its refund not made yet (the approval parked): (requests, the request, charge,
/// cents paid).
async fn approved_for_half(
    app: &TestApp,
    ws: &str,
) -> (
    RefundRequests,
    tally::refund_requests::RefundRequest,
    String,
    u64,
) {
    let (_, _, _, paid) = subscribed(app, ws).await;
    let charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(app);
    let now = app.clock.now();
    let r = requests
        .create(&workspace, request_for(&charge, RefundReason::Other), now)
        .await
        .unwrap();
    let r = requests
        .approve(&r.id, "staff1", None, Some(Cents::new(paid / 2)), now)
        .await
        .unwrap();
    assert_eq!(r.status, RequestStatus::Approved);
    (requests, r, charge, paid)
}

/// Another member of staff credits three quarters of the latest paid invoice to the
/// customer's Stripe balance, in the dashboard.
async fn credit_most_of_it(app: &TestApp) {
    let invoice = app.sim_events("invoice.paid").last().unwrap().clone();
    let paid = invoice["amount_paid"].as_u64().unwrap();
    let note = app
        .dashboard(
            &format!(
                "/sim/invoices/{}/credit-note",
                invoice["id"].as_str().unwrap()
            ),
            json!({"amount": paid - paid / 4}),
        )
        .await;
    assert_eq!(note.status.as_u16(), 200, "{:#}", note.body);
}

/// The fake of Stripe answers a refund, and expects to be asked for none.
async fn no_refund_asked(stripe: &MockServer, charge: &str, amount: u64) {
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(stripe_refund(
            "re_Twice",
            charge,
            amount as i64,
        )))
        .expect(0)
        .mount(stripe)
        .await;
}

/// Money given back for the payment between an approval and its refund (a credit note to
/// the customer's balance made in the dashboard, which Stripe does not count against the
/// charge's refunds) leaves less to refund than was approved: the worker makes no refund
/// and sends the request to staff, so the same money does not go back twice, even when it
/// stopped half-way through that the first time.
#[tokio::test]
async fn a_credit_note_made_after_the_approval_stops_the_refund_and_sends_it_to_staff() {
    let app = TestApp::new();
    let ws = "org_cn_race";
    let (requests, r, charge, paid) = approved_for_half(&app, ws).await;
    let workspace = r.workspace.clone();
    credit_most_of_it(&app).await;
    let stripe = MockServer::start().await;
    no_refund_asked(&stripe, &charge, paid / 2).await;
    // The first delivery stops between sending the claim to staff and writing the request
    // document; the next one brings the document in line.
    let worker = RefundWorker {
        docs: tally_tests::OnWrite::new(
            app.docs.clone(),
            |pk, sk| pk.starts_with("WORKSPACE#") && sk.starts_with("REFUND_REQUEST#"),
            tally_tests::fails_first_write(),
        ),
        payments: stripe_at(&stripe),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    let job = json!({"workspace": ws, "request": r.id, "attempt": r.attempt}).to_string();
    for n in 1..=3 {
        let outcome = worker
            .consume(&Delivery {
                message_id: format!("m{n}"),
                body: job.clone(),
                group_id: Some(r.id.clone()),
                receive_count: n,
            })
            .await;
        assert_eq!(outcome.is_ok(), n > 1, "delivery {n}: {outcome:?}");
    }
    let after = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(after.status, RequestStatus::InReview, "{after:#?}");
    assert!(after.refund.is_none());
    let why = after.steps.last().unwrap().note.clone().unwrap_or_default();
    assert!(why.contains("support staff decide"), "{why}");
    stripe.verify().await;
}

/// The same when the worker's first call to Stripe failed (Stripe down) and the credit note
/// came before the queue delivered the approval again: the worker looks for its refund,
/// finds none, and sends the request to staff instead of asking again.
#[tokio::test]
async fn a_credit_note_made_between_a_failed_refund_call_and_its_retry_stops_the_retry() {
    let app = TestApp::new();
    let ws = "org_cn_retry";
    let (requests, r, charge, paid) = approved_for_half(&app, ws).await;
    let workspace = r.workspace.clone();
    let job = json!({"workspace": ws, "request": r.id, "attempt": r.attempt}).to_string();
    let delivery = |n| Delivery {
        message_id: format!("m{n}"),
        body: job.clone(),
        group_id: Some(r.id.clone()),
        receive_count: n,
    };
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "down"}})),
        )
        .mount(&down)
        .await;
    let worker = RefundWorker {
        docs: app.docs.clone(),
        payments: stripe_at(&down),
        notifications: app.local.notifications_queue.clone(),
        clock: app.clock.clone(),
    };
    let first = worker.consume(&delivery(1)).await;
    assert!(matches!(first, Err(ConsumeError::Retry(_))), "{first:?}");
    let sent = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert!(sent.sent_at.is_some() && sent.refund.is_none(), "{sent:#?}");
    credit_most_of_it(&app).await;
    let up = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"}),
        ))
        .expect(1)
        .mount(&up)
        .await;
    no_refund_asked(&up, &charge, paid / 2).await;
    let worker = RefundWorker {
        payments: stripe_at(&up),
        ..worker
    };
    worker.consume(&delivery(2)).await.unwrap();
    let after = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(after.status, RequestStatus::InReview, "{after:#?}");
    assert!(after.refund.is_none());
    up.verify().await;
}

/// The lots an invoice's payment bought, as the ledger has them now: (source, original,
/// unspent).
async fn invoice_lots(app: &TestApp, ws: &str, invoice: &str) -> Vec<(String, u64, u64)> {
    use tally::billing::refunds::{InvoiceLots, LINK_SK, invoice_lots_pk};
    let doc: InvoiceLots = tally::store::docs::get(
        app.docs.as_ref(),
        &invoice_lots_pk(&invoice.parse().unwrap()),
        LINK_SK,
    )
    .await
    .unwrap()
    .expect("the invoice's lots");
    let state = app
        .ledger
        .workspace_now(&WorkspaceId::parse(ws).unwrap())
        .await
        .unwrap();
    doc.lots
        .iter()
        .map(|(key, seq, credits)| {
            let unspent = state
                .lots
                .iter()
                .find(|l| l.seq == *seq)
                .map_or(0, |l| l.free().get() + l.frozen.get());
            (
                key.rsplit(':').next().unwrap().to_owned(),
                credits.get(),
                unspent,
            )
        })
        .collect()
}

/// A Team plan with one add-on unit, renewed: the renewal's `invoice.paid` object, and the
/// credits of its plan lot and add-on lot.
async fn team_renewal_with_a_unit(app: &TestApp, ws: &str) -> (Value, u64, u64) {
    let sub = app.subscribe(ws, "team", "monthly").await;
    let units = app.set_units(ws, 1).await;
    assert!(units.status.is_success(), "{:#}", units.body);
    app.settle_billing().await;
    app.renew(&sub).await;
    let renewal = app.sim_events("invoice.paid").last().unwrap().clone();
    let lots = invoice_lots(app, ws, renewal["id"].as_str().unwrap()).await;
    let plan = lots.iter().find(|l| l.0 == "plan").unwrap().1;
    let addon = lots.iter().find(|l| l.0 == "addon").unwrap().1;
    assert!(plan > 0 && addon > 0, "{lots:?}");
    (renewal, plan, addon)
}

/// Add-on units are not refundable: a refund of a renewal's plan money (approved without an
/// amount, so all but the add-on units) takes back the plan's credits, all of them, and
/// leaves the add-on units' credits alone; Stripe's refund event then takes nothing more.
/// A chargeback of what is left takes the add-on units' credits.
#[tokio::test]
async fn a_refund_of_a_plans_money_takes_the_plans_credits_and_leaves_the_add_ons() {
    let app = TestApp::new();
    let ws = "org_rr_addon";
    let (renewal, plan, addon) = team_renewal_with_a_unit(&app, ws).await;
    let invoice = renewal["id"].as_str().unwrap().to_owned();
    let paid = renewal["amount_paid"].as_u64().unwrap();
    let r = ask(
        &app,
        ws,
        json!({"payment": invoice, "reason": "technical_issue", "details": "renders failed"}),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "in_review", "{:#}", r.body);
    let rid = r.body["id"].as_str().unwrap().to_owned();
    let ok = app
        .post(
            &format!("/v1/admin/refund-requests/{rid}/approve"),
            &support(),
            json!({}),
        )
        .await;
    assert_eq!(ok.status.as_u16(), 200, "{:#}", ok.body);
    assert_eq!(ok.body["credits_held"], plan, "{:#}", ok.body);
    let mut expected = vec![
        ("plan".to_owned(), plan, 0),
        ("addon".to_owned(), addon, addon),
    ];
    expected.sort();
    let mut now = invoice_lots(&app, ws, &invoice).await;
    now.sort();
    assert_eq!(now, expected, "right after the approval");
    settle(&app).await;
    let done = app
        .get(&format!("/v1/refund-requests/{rid}"), &owner(ws))
        .await;
    assert_eq!(done.body["status"], "succeeded", "{:#}", done.body);
    let charge = app.sim_events("charge.refunded").last().unwrap().clone();
    let refunded = charge["amount_refunded"].as_u64().unwrap();
    assert!(0 < refunded && refunded < paid, "{charge:#}");
    let mut now = invoice_lots(&app, ws, &invoice).await;
    now.sort();
    assert_eq!(now, expected, "after Stripe's refund event");
    // The bank disputes the rest: the add-on units' credits are frozen, none free.
    let charge_id = charge["id"].as_str().unwrap().to_owned();
    dispute(&app, &charge_id).await;
    let doc: tally::billing::refunds::InvoiceLots = tally::store::docs::get(
        app.docs.as_ref(),
        &tally::billing::refunds::invoice_lots_pk(&invoice.parse().unwrap()),
        tally::billing::refunds::LINK_SK,
    )
    .await
    .unwrap()
    .unwrap();
    let state = app
        .ledger
        .workspace_now(&WorkspaceId::parse(ws).unwrap())
        .await
        .unwrap();
    let addon_lot = doc
        .lots
        .iter()
        .find(|(k, _, _)| k.ends_with(":addon"))
        .unwrap()
        .1;
    let lot = state.lots.iter().find(|l| l.seq == addon_lot).unwrap();
    assert_eq!((lot.free().get(), lot.frozen.get()), (0, addon));
}

/// What credits an earlier approval took back are worth is priced from where its money
/// starts: after the money given back besides it. Here the plan's money went back from the
/// dashboard first, so a request confirmed by staff as a mistake and approved for the add-on
/// units' money took the add-on units' credits; its refund failed. Approving it again must
/// refund all of that money: those credits are the add-on units', and priced as if the
/// money started at nothing (at the plan's rate) they would look cheaper.
#[tokio::test]
async fn approving_again_is_priced_after_the_money_given_back_besides_the_request() {
    let app = TestApp::new();
    let ws = "org_rr_floor";
    let (renewal, plan, addon) = team_renewal_with_a_unit(&app, ws).await;
    let invoice = renewal["id"].as_str().unwrap().to_owned();
    let paid = renewal["amount_paid"].as_u64().unwrap();
    let charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let addon_money = renewal["lines"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["description"].as_str().unwrap().contains("add-on"))
        .map(|l| l["amount"].as_u64().unwrap())
        .sum::<u64>();
    assert!(0 < addon_money && addon_money < paid, "{renewal:#}");
    // At the plan's rate the add-on units' credits would be worth clearly less.
    let at_plan_rate = (addon * (paid - addon_money)).div_ceil(plan);
    assert!(
        at_plan_rate < addon_money - 10,
        "{at_plan_rate} {addon_money}"
    );
    // Filed while the plan's money is refundable; staff look at it later.
    let workspace = WorkspaceId::parse(ws).unwrap();
    let requests = parked_requests(&app);
    let now = app.clock.now();
    let r = requests
        .create(
            &workspace,
            request_for(&charge, RefundReason::ChargedAfterCancellation),
            now,
        )
        .await
        .unwrap();
    assert_eq!(r.status, RequestStatus::InReview, "{r:#?}");
    let made = app
        .dashboard(
            &format!("/sim/charges/{charge}/refund"),
            json!({"amount": paid - addon_money}),
        )
        .await;
    assert_eq!(made.status.as_u16(), 200, "{:#}", made.body);
    settle(&app).await;
    let mut expected = vec![
        ("addon".to_owned(), addon, addon),
        ("plan".to_owned(), plan, 0),
    ];
    let mut now_lots = invoice_lots(&app, ws, &invoice).await;
    now_lots.sort();
    assert_eq!(
        now_lots, expected,
        "the dashboard refund took the plan's credits"
    );
    requests
        .approve(&r.id, "staff1", None, Some(Cents::new(addon_money)), now)
        .await
        .unwrap();
    let approved = requests.get(&workspace, &r.id).await.unwrap().unwrap();
    assert_eq!(approved.credits_held.get(), addon, "{approved:#?}");
    expected[0].2 = 0;
    let mut now_lots = invoice_lots(&app, ws, &invoice).await;
    now_lots.sort();
    assert_eq!(now_lots, expected);
    tally::refund_requests::refused(app.docs.as_ref(), &approved, "card closed", now)
        .await
        .unwrap();
    let less = requests
        .approve(
            &r.id,
            "staff1",
            None,
            Some(Cents::new(addon_money - 1)),
            now,
        )
        .await
        .unwrap_err();
    assert_eq!(less.status.as_u16(), 409, "{less:?}");
    assert_eq!(
        less.facts.as_ref().unwrap()["taken_back_worth"],
        addon_money,
        "{less:?}"
    );
    let again = requests
        .approve(&r.id, "staff1", None, Some(Cents::new(addon_money)), now)
        .await
        .unwrap();
    assert_eq!(again.status, RequestStatus::Approved, "{again:#?}");
}
