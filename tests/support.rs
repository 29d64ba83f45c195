//! Support intake and the tools of support staff: tickets that capture and look up what
//! happened, fixes made once, forwarding to the help desk (signatures, retries, dead
//! letters), rate limits, cross-workspace refusals on every route, the staff audit log,
//! usage totals against the journal and CSV exports read back by a CSV parser.

use axum::http::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tally::clock::Clock;
use tally::queue::Queue;
use tally::queue::local::LocalQueue;
use tally::support::forward::{DeliveryError, HelpDesk, Signed, Sink, verify};
use tally_tests::*;

fn ticket_body(category: &str, subject: &str, message: &str) -> Value {
    json!({"category": category, "subject": subject, "message": message})
}

async fn file(app: &TestApp, tok: &str, body: Value) -> Value {
    let a = app.post("/v1/support/tickets", tok, body).await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    a.body
}

async fn buy_pack(app: &TestApp, ws: &str) -> String {
    app.pay(&app.pack_checkout(ws, 1).await).await;
    app.settle_billing().await;
    app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn start(app: &TestApp, tok: &str) -> String {
    let g = app
        .post(
            "/v1/generations",
            tok,
            json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
        )
        .await;
    assert_eq!(g.status.as_u16(), 201, "{:#}", g.body);
    g.body["id"].as_str().unwrap().to_owned()
}

/// The members a ticket's enrichment lists in its spending summary, in its order.
fn spenders(enrichment: &Value) -> Vec<&str> {
    enrichment["spending_by_member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["key"].as_str().unwrap())
        .collect()
}

/// A large team's spending summary lists its biggest spenders and counts the rest, so the
/// ticket stays a small item.
#[tokio::test]
async fn a_large_teams_spending_summary_lists_the_biggest_spenders() {
    use tally::support::enrich::MAX_MEMBERS_SHOWN;
    let app = TestApp::new();
    let ws = "org_s_team";
    tally_tests::grant(&app.ledger, ws, 100_000).await;
    let members = MAX_MEMBERS_SHOWN + 3;
    for i in 0..members {
        // Member m0 spends most, then m1, ...: one credit less each.
        let id = start(&app, &member(ws, &format!("m{i}"))).await;
        let c = app
            .post(
                &format!("/v1/generations/{id}/complete"),
                &service(),
                json!({"credits": 200 - i}),
            )
            .await;
        assert_eq!(c.status.as_u16(), 200, "{:#}", c.body);
    }
    let a = app
        .post(
            "/v1/support/tickets",
            &owner(ws),
            json!({"category": "credits", "subject": "Who spent it all?", "message": "Please check."}),
        )
        .await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    let e = &a.body["enrichment"];
    let shown = spenders(e);
    let want: Vec<String> = (0..MAX_MEMBERS_SHOWN).map(|i| format!("m{i}")).collect();
    assert_eq!(shown, want);
    let rest: u64 = (MAX_MEMBERS_SHOWN..members).map(|i| 200 - i as u64).sum();
    let findings = e["findings"].to_string();
    assert!(
        findings.contains(&format!("3 more members spent {rest} credits")),
        "{findings}"
    );
}

#[tokio::test]
async fn a_ticket_captures_who_where_and_when_and_what_the_records_say() {
    let app = TestApp::new();
    let ws = "org_s1";
    buy_pack(&app, ws).await;
    // Two members generate; one job is still running.
    for who in ["u1", "u2"] {
        let id = start(&app, &member(ws, who)).await;
        app.post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({}),
        )
        .await;
    }
    let running = start(&app, &member(ws, "u2")).await;
    let a = app
        .send(
            Method::POST,
            "/v1/support/tickets",
            Some(&owner(ws)),
            Some(
                &json!({"category": "credits", "subject": "Balance seems incorrect",
                    "message": "It dropped overnight.\nIs someone else generating?",
                    "route": "/app/billing",
                    "client": {"user_agent": "Firefox/133", "ad_blocker": true, "vpn": false}})
                .to_string(),
            ),
            &[
                ("user-agent", "Mozilla/5.0 Firefox/133"),
                ("x-request-id", "req-42"),
            ],
        )
        .await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    let t = &a.body;
    assert!(t["id"].as_str().unwrap().starts_with("tkt_"));
    assert_eq!(t["status"], "open");
    assert_eq!(t["captured"]["user"], format!("{ws}-owner"));
    assert_eq!(t["captured"]["request_id"], "req-42");
    assert_eq!(t["captured"]["user_agent"], "Mozilla/5.0 Firefox/133");
    assert_eq!(t["captured"]["at"], json!(app.clock.now()));
    // Filed on Sunday 1 November: the first answer is due by the end of Monday (24
    // weekday hours), and the staff list says so too.
    assert_eq!(app.clock.now().format("%a").to_string(), "Sun");
    assert_eq!(t["respond_by"], "2026-11-03T00:00:00Z");
    let listed = app
        .get(
            &format!("/v1/admin/workspaces/{ws}/support/tickets"),
            &tally_tests::support(),
        )
        .await;
    assert_eq!(listed.status.as_u16(), 200, "{:#}", listed.body);
    assert_eq!(listed.body["items"][0]["respond_by"], t["respond_by"]);
    assert_eq!(t["client"]["ad_blocker"], true);
    assert_eq!(t["route"], "/app/billing");
    assert_eq!(
        t["thread"][0]["body"],
        "It dropped overnight.\nIs someone else generating?"
    );
    let e = &t["enrichment"];
    let balance = app.get("/v1/balance", &owner(ws)).await.body;
    assert_eq!(e["balance"]["available"], balance["available"]);
    assert_eq!(e["balance"]["held"], balance["held"]);
    assert_eq!(e["pending_holds"][0]["generation"], running.as_str());
    assert_eq!(e["pending_hold_count"], 1);
    assert_eq!(e["pending_hold_credits"], balance["held"]);
    assert_eq!(e["recent_payments"][0]["kind"], "pack");
    // Spending by member equals the usage report over the same days.
    let members = spenders(e);
    assert_eq!(members.len(), 2, "{e:#}");
    assert!(members.contains(&"u1") && members.contains(&"u2"));
    assert!(
        e["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("2 members spent credits"))
    );
    // No plan: community support, low priority.
    assert_eq!(t["priority"], "low");
    assert!(t["captured"]["support_level"].is_null());
}

#[tokio::test]
async fn priority_follows_the_plan_and_a_negative_balance_report_goes_to_the_top() {
    let app = TestApp::new();
    let ws = "org_s2";
    app.subscribe(ws, "max", "monthly").await;
    app.settle_billing().await;
    let t = file(
        &app,
        &owner(ws),
        ticket_body("account", "Change email", "Please help"),
    )
    .await;
    assert_eq!(t["captured"]["plan"], "max");
    assert_eq!(t["captured"]["support_level"], "priority");
    assert_eq!(t["priority"], "high");
    assert!(t["enrichment"]["next_refresh"].is_string());
    let t = file(
        &app,
        &member(ws, "u9"),
        ticket_body(
            "credits",
            "Balance shows negative",
            "My balance is negative: -20",
        ),
    )
    .await;
    assert_eq!(t["priority"], "urgent");
    assert_eq!(t["enrichment"]["negative_balance_reported"], true);
    // A figure with a minus sign says the same; a hyphen or a range does not.
    for (subject, message, urgent) in [
        ("Balance shows -40 credits", "see subject", true),
        ("credits: - 15 after the render", "see subject", true),
        ("Pay-as-you-go credits, 4-5 packs", "see subject", false),
        ("Credits missing", "bought 4 - 5 packs", false),
        (
            "Credits not returned",
            "Renders:\n- 2 failed\n- 3 blank",
            false,
        ),
    ] {
        let t = file(
            &app,
            &member(ws, "u9"),
            ticket_body("credits", subject, message),
        )
        .await;
        assert_eq!(t["priority"] == "urgent", urgent, "{subject}: {t:#}");
    }
}

/// A yearly plan's month that fell due minutes ago and that the credit refresh (every 15
/// minutes) has not granted yet is the refresh the ticket names, not next month's.
#[tokio::test]
async fn a_ticket_names_the_monthly_refresh_that_is_due_but_not_granted_yet() {
    let app = TestApp::new();
    let ws = "org_due";
    app.subscribe(ws, "max", "yearly").await;
    app.settle_billing().await;
    let w = tally::ids::WorkspaceId::parse(ws).unwrap();
    let doc = tally::refresh::refresh_doc(app.docs.as_ref(), &w)
        .await
        .unwrap()
        .unwrap();
    let second = tally::refresh::schedule::of(&doc)
        .into_iter()
        .find(|a| a.k >= doc.next_allotment)
        .unwrap()
        .at;
    let t = file(&app, &owner(ws), ticket_body("credits", "s", "m")).await;
    assert_eq!(t["enrichment"]["next_refresh"], json!(second));
    app.clock.set(second + chrono::Duration::minutes(10));
    let t = file(
        &app,
        &owner(ws),
        ticket_body("credits", "My credits did not refresh", "m"),
    )
    .await;
    assert_eq!(t["enrichment"]["next_refresh"], json!(second), "{t:#}");
}

#[tokio::test]
async fn an_overdue_hold_is_released_once_however_many_tickets_ask() {
    let app = TestApp::new();
    let ws = "org_s3";
    grant(&app.ledger, ws, 100).await;
    let gen_id = start(&app, &member(ws, "u1")).await;
    let held = app.get("/v1/balance", &owner(ws)).await.body["held"]
        .as_u64()
        .unwrap();
    assert!(held > 0);
    app.clock.advance(chrono::Duration::hours(6));
    // A ticket about something else releases nothing, and tells the hold past its
    // deadline as holding nothing, as the balance does.
    let other = file(&app, &member(ws, "u1"), ticket_body("other", "hi", "hello")).await;
    let e = &other["enrichment"];
    assert_eq!(other["remediations"], json!([]), "{other:#}");
    assert_eq!(e["balance"]["held"], 0, "{other:#}");
    assert_eq!(e["pending_hold_count"], 0, "{other:#}");
    assert_eq!(e["pending_holds"][0]["generation"], gen_id.as_str());
    assert_eq!(e["pending_holds"][0]["overdue"], true);
    let findings = e["findings"].to_string();
    assert!(!findings.contains("until they finish"), "{other:#}");
    assert!(
        findings.contains("1 generation(s) passed their deadline"),
        "{other:#}"
    );
    let body = json!({"category": "generation", "subject": "job never finished",
        "message": "it spun forever", "generation_id": gen_id});
    let t = file(&app, &member(ws, "u1"), body.clone()).await;
    assert_eq!(t["remediations"][0]["action"], "hold_released", "{t:#}");
    assert_eq!(t["remediations"][0]["credits"], held);
    assert_eq!(t["status"], "waiting");
    assert_eq!(t["enrichment"]["generation"]["status"], "expired");
    // The ticket tells the balance and the holds as its fix left them.
    let e = &t["enrichment"];
    assert_eq!(
        (
            e["balance"]["available"].as_u64(),
            e["balance"]["held"].as_u64()
        ),
        (Some(100), Some(0)),
        "{t:#}"
    );
    assert_eq!(e["pending_hold_count"], 0, "{t:#}");
    assert_eq!(e["pending_hold_credits"], 0, "{t:#}");
    assert!(e["pending_holds"].is_null(), "{t:#}");
    assert!(
        !e["findings"].to_string().contains("until they finish"),
        "{t:#}"
    );
    let entries = app.entry_count(ws).await;
    // Again, and concurrently: nothing more is released or written.
    let tok = member(ws, "u1");
    let (a, b) = tokio::join!(
        app.post("/v1/support/tickets", &tok, body.clone()),
        app.post("/v1/support/tickets", &tok, body.clone()),
    );
    for r in [a, b] {
        assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
        assert_eq!(r.body["remediations"], json!([]), "{:#}", r.body);
    }
    assert_eq!(app.entry_count(ws).await, entries);
    let b = app.get("/v1/balance", &owner(ws)).await.body;
    assert_eq!(
        (b["available"].as_u64(), b["held"].as_u64()),
        (Some(100), Some(0))
    );
}

/// Behind more overdue holds than one settlement releases, the ticket's own hold is still
/// released and reported, and every other overdue hold with it.
#[tokio::test]
async fn an_overdue_hold_behind_a_backlog_is_released_for_the_ticket() {
    let app = TestApp::new();
    let ws = "org_s3b";
    grant(&app.ledger, ws, 1_000).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(start(&app, &member(ws, "u1")).await);
    }
    app.clock.advance(chrono::Duration::hours(6));
    // The last one started is released last.
    let last = ids.last().unwrap();
    let body = json!({"category": "generation", "subject": "job never finished",
        "message": "it spun forever", "generation_id": last});
    let t = file(&app, &member(ws, "u1"), body).await;
    assert_eq!(t["remediations"][0]["action"], "hold_released", "{t:#}");
    assert_eq!(t["enrichment"]["generation"]["status"], "expired");
    // The entry that released this hold, not those of the others released with it.
    let own = t["enrichment"]["generation"]["entries"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(t["remediations"][0]["entries"], json!([own]), "{t:#}");
    let b = app.get("/v1/balance", &owner(ws)).await.body;
    assert_eq!(
        (b["available"].as_u64(), b["held"].as_u64()),
        (Some(1_000), Some(0))
    );
    let state = app
        .ledger
        .store
        .load(&tally_tests::workspace(ws))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        state.open_holds, 0,
        "every overdue hold released in the ledger"
    );
}

#[tokio::test]
async fn a_completed_generation_is_explained_not_given_back() {
    let app = TestApp::new();
    let ws = "org_s4";
    grant(&app.ledger, ws, 100).await;
    let gen_id = start(&app, &member(ws, "u1")).await;
    app.post(
        &format!("/v1/generations/{gen_id}/complete"),
        &service(),
        json!({"credits": 3}),
    )
    .await;
    let before = app.entry_count(ws).await;
    let t = file(
        &app,
        &member(ws, "u1"),
        json!({"category": "generation", "subject": "was I charged for a failed job?",
            "message": "the output was blank", "generation_id": gen_id}),
    )
    .await;
    assert_eq!(t["remediations"], json!([]));
    let g = &t["enrichment"]["generation"];
    assert_eq!(
        (g["status"].as_str(), g["charged"].as_u64()),
        (Some("completed"), Some(3))
    );
    assert_eq!(
        g["journal"].as_array().unwrap().len(),
        2,
        "hold and charge: {g:#}"
    );
    assert_eq!(t["priority"], "high");
    assert_eq!(app.entry_count(ws).await, before);
    // Another workspace's generation is not found, and nothing is filed.
    let other = file(
        &app,
        &member("org_s4b", "x"),
        ticket_body("other", "hi", "hello"),
    )
    .await;
    assert!(other["enrichment"]["generation"].is_null());
    app.post(
        "/v1/support/tickets",
        &member("org_s4b", "x"),
        json!({"category": "generation", "subject": "x", "message": "y", "generation_id": gen_id}),
    )
    .await
    .assert_problem(404, "not_found");
}

#[tokio::test]
async fn a_verified_duplicate_charge_opens_one_refund_request() {
    let app = TestApp::new();
    let ws = "org_s5";
    let _first = buy_pack(&app, ws).await;
    let second = buy_pack(&app, ws).await;
    let body = json!({"category": "billing", "subject": "Double charged",
        "message": "I was charged twice", "payment": second});
    let t = file(&app, &owner(ws), body.clone()).await;
    let fix = &t["remediations"][0];
    assert_eq!(fix["action"], "refund_requested", "{t:#}");
    let rr = fix["refund_request"].as_str().unwrap().to_owned();
    assert_eq!(
        t["enrichment"]["duplicate_charges"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(t["status"], "waiting", "{t:#}");
    // A second ticket makes no second request. The refund made for the first is no fix of
    // this one: it stays open for staff, who see what became of that request.
    app.local.refunds_queue.until_idle().await;
    app.settle_billing().await;
    let again = file(&app, &owner(ws), body).await;
    assert_eq!(again["remediations"], json!([]), "{again:#}");
    assert_eq!(again["status"], "open", "{again:#}");
    assert!(
        again["enrichment"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .any(|f| f.starts_with(&format!("refund request {rr} "))
                && f.ends_with("was made before and is succeeded")),
        "{again:#}"
    );
    let list = app.get("/v1/refund-requests", &owner(ws)).await.body;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list["items"][0]["id"], rr.as_str(), "{list:#}");
    // A member may not ask for money back: the ticket says who can.
    let m = file(
        &app,
        &member(ws, "u3"),
        json!({"category": "billing", "subject": "Double charged", "message": "twice"}),
    )
    .await;
    // It sees no payments (the billing history is the owner's and billing admins').
    assert_eq!(m["remediations"], json!([]), "{m:#}");
    assert!(m["enrichment"]["recent_payments"].is_null(), "{m:#}");
    assert!(m["enrichment"]["duplicate_charges"].is_null(), "{m:#}");
    assert!(
        m["enrichment"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("owner and billing admins"))
    );
    app.post(
        "/v1/support/tickets",
        &member(ws, "u3"),
        json!({"category": "billing", "subject": "x", "message": "y", "payment": second}),
    )
    .await
    .assert_problem(403, "forbidden");
    // Another workspace's payment is not found.
    app.post(
        "/v1/support/tickets",
        &owner("org_s5b"),
        json!({"category": "billing", "subject": "x", "message": "y", "payment": second}),
    )
    .await
    .assert_problem(404, "not_found");
}

/// Two identical packs bought minutes apart may both be meant: a ticket about something
/// else reports the suspicion and asks no money back; one that names the payment and says
/// it was charged twice does.
#[tokio::test]
async fn only_a_ticket_that_says_it_was_charged_twice_asks_for_a_duplicates_money_back() {
    let app = TestApp::new();
    let ws = "org_s5n";
    let _first = buy_pack(&app, ws).await;
    let second = buy_pack(&app, ws).await;
    let before = app.get("/v1/balance", &owner(ws)).await.body["available"].clone();
    for body in [
        json!({"category": "credits", "subject": "How does rollover work?", "message": "?"}),
        json!({"category": "billing", "subject": "VAT number",
            "message": "Please add it to this invoice", "payment": second}),
    ] {
        let t = file(&app, &owner(ws), body).await;
        assert_eq!(t["remediations"], json!([]), "{t:#}");
        let suspected = t["enrichment"]["duplicate_charges"][0]["payment"]
            .as_str()
            .unwrap();
        assert!(
            t["enrichment"]["findings"]
                .to_string()
                .contains(&format!("no refund was asked for payment {suspected}")),
            "{t:#}"
        );
    }
    let list = app.get("/v1/refund-requests", &owner(ws)).await.body;
    assert_eq!(list["items"], json!([]), "{list:#}");
    assert_eq!(
        app.get("/v1/balance", &owner(ws)).await.body["available"],
        before
    );
    // Saying so without naming the payment moves no money either.
    let said = json!({"category": "billing", "subject": "Pack bought two times",
        "message": "I only wanted one"});
    let t = file(&app, &owner(ws), said.clone()).await;
    assert_eq!(t["remediations"], json!([]), "{t:#}");
    let mut named = said;
    named["payment"] = json!(second);
    let t = file(&app, &owner(ws), named).await;
    assert_eq!(t["remediations"][0]["action"], "refund_requested", "{t:#}");
    let rr = t["remediations"][0]["refund_request"].as_str().unwrap();
    // A later ticket about anything else is told of the request.
    let later = file(
        &app,
        &owner(ws),
        json!({"category": "billing", "subject": "Refund status", "message": "When?"}),
    )
    .await;
    assert_eq!(later["remediations"], json!([]), "{later:#}");
    assert!(
        later["enrichment"]["findings"]
            .to_string()
            .contains(&format!("refund request {rr} for payment")),
        "{later:#}"
    );
}

/// A canceled plan gives no support level and no credits to come: the ticket is filed as
/// one without a plan, whatever plan the workspace had.
#[tokio::test]
async fn a_canceled_plan_gives_a_ticket_no_support_level_and_no_refresh() {
    let app = TestApp::new();
    let ws = "org_s2c";
    app.subscribe(ws, "team", "monthly").await;
    app.settle_billing().await;
    let cancel = app
        .post("/v1/subscription/cancel", &owner(ws), json!({}))
        .await;
    assert_eq!(cancel.status.as_u16(), 200, "{:#}", cancel.body);
    app.settle_billing().await;
    // Set to cancel, the plan still gives its support until the period ends, but no
    // renewal is coming.
    let t = file(&app, &owner(ws), ticket_body("account", "Email", "Help")).await;
    assert_eq!(t["captured"]["support_level"], "dedicated", "{t:#}");
    assert_eq!(t["priority"], "high");
    assert!(t["enrichment"]["next_refresh"].is_null(), "{t:#}");
    app.advance_clock(json!({"days": 40})).await;
    let s = app.get("/v1/subscription", &owner(ws)).await.body["subscription"].clone();
    assert_eq!(s["status"], "canceled", "{s:#}");
    let t = file(&app, &owner(ws), ticket_body("account", "Email", "Help")).await;
    assert_eq!(t["captured"]["plan"], "team", "{t:#}");
    assert_eq!(t["enrichment"]["plan_status"], "canceled", "{t:#}");
    assert!(t["captured"]["support_level"].is_null(), "{t:#}");
    assert_eq!(t["priority"], "low", "{t:#}");
    assert!(t["enrichment"]["next_refresh"].is_null(), "{t:#}");
}

/// The refunds queue refuses the approval's job (asked twice): the verified duplicate's
/// request is approved with its credits taken back, but no refund is on its way, so the
/// ticket is no fix: its finding names the request and tells staff to approve it again.
#[tokio::test]
async fn a_duplicates_refund_that_could_not_be_sent_is_a_finding_for_staff() {
    let app = TestApp::new();
    let ws = "org_s5q";
    let _first = buy_pack(&app, ws).await;
    let second = buy_pack(&app, ws).await;
    app.local.refunds_queue.close();
    let t = file(
        &app,
        &owner(ws),
        json!({"category": "billing", "subject": "Double charged",
            "message": "I was charged twice", "payment": second}),
    )
    .await;
    assert_eq!(t["remediations"], json!([]), "{t:#}");
    // The ticket's balance is the one its request left (its credits taken back).
    let balance = app.get("/v1/balance", &owner(ws)).await.body;
    assert_eq!(
        t["enrichment"]["balance"]["available"],
        balance["available"]
    );
    assert_eq!(balance["available"], 500, "{balance:#}");
    let list = app.get("/v1/refund-requests", &owner(ws)).await.body;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list:#}");
    let rr = list["items"][0]["id"].as_str().unwrap();
    assert_eq!(list["items"][0]["status"], "approved", "{list:#}");
    assert!(
        t["enrichment"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .any(|f| f.contains(&format!("refund request {rr},"))
                && f.ends_with("approve it again to send it")),
        "{t:#}"
    );
    assert_eq!(t["status"], "open", "{t:#}");
}

/// A help desk that fails the first `fail` deliveries and keeps the rest.
struct FlakyDesk {
    fail: u32,
    calls: AtomicU32,
    got: std::sync::Mutex<Vec<Signed>>,
}

#[async_trait::async_trait]
impl Sink for FlakyDesk {
    async fn deliver(&self, d: &Signed) -> Result<(), DeliveryError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(DeliveryError("503 from the help desk".into()));
        }
        self.got.lock().unwrap().push(d.clone());
        Ok(())
    }
}

fn desk(app: &TestApp, sink: Arc<dyn Sink>, attempts: u32) -> HelpDesk {
    HelpDesk {
        tickets: tally::support::Tickets {
            docs: app.docs.clone(),
            queue: LocalQueue::new("unused.fifo", true, 3),
        },
        sink,
        secret: b"helpdesk-secret-for-tests".to_vec(),
        clock: app.clock.clone(),
        attempts,
        backoff: std::time::Duration::from_millis(1),
    }
}

#[tokio::test]
async fn tickets_reach_the_help_desk_signed_in_order_and_retried_then_dead_lettered() {
    let app = TestApp::new();
    let ws = "org_s6";
    let t = file(
        &app,
        &owner(ws),
        ticket_body("other", "Hello", "First message"),
    )
    .await;
    let id = t["id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/support/tickets/{id}/messages"),
        &support(),
        json!({"message": "We are on it"}),
    )
    .await;
    app.local.support_queue.until_idle().await;
    // The local runner's outbox got both changes, signed with the local secret.
    let out = app.get("/dev/outbox", &owner(ws)).await.body;
    let mine: Vec<&Value> = out
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["payload"]["ticket"]["id"] == id.as_str())
        .collect();
    assert_eq!(mine.len(), 2, "{out:#}");
    assert_eq!(mine[0]["payload"]["event"], "ticket.created");
    assert_eq!(mine[1]["payload"]["event"], "ticket.message");
    assert_eq!(mine[0]["payload"]["messages"][0]["body"], "First message");
    assert_eq!(mine[1]["payload"]["messages"][0]["body"], "We are on it");
    assert_eq!(mine[1]["payload"]["messages"].as_array().unwrap().len(), 1);
    assert_eq!(mine[1]["payload"]["ticket"]["status"], "waiting");

    // A flaky help desk: tried with backoff, redelivered by the queue, delivered once.
    let flaky = Arc::new(FlakyDesk {
        fail: 4,
        calls: AtomicU32::new(0),
        got: Default::default(),
    });
    let q = LocalQueue::new(
        "support-test.fifo",
        true,
        tally::support::SUPPORT_MAX_RECEIVES,
    );
    q.start(Arc::new(desk(&app, flaky.clone(), 3)));
    let job = json!({"event": "ticket.created", "ticket": id, "seq": 1, "from_seq": 1,
        "id": format!("{id}:ticket.created:1")});
    q.send(tally::queue::Message {
        body: job.to_string(),
        group_id: Some(id.clone()),
        dedup_id: Some("d1".into()),
    })
    .await
    .unwrap();
    q.until_idle().await;
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 5);
    let got = flaky.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let now = app.clock.now().timestamp();
    assert!(verify(
        b"helpdesk-secret-for-tests",
        &got[0].signature,
        &got[0].body,
        now,
        300
    ));
    assert!(!verify(
        b"another-secret-entirely",
        &got[0].signature,
        &got[0].body,
        now,
        300
    ));
    assert!(!verify(
        b"helpdesk-secret-for-tests",
        &got[0].signature,
        "tampered",
        now,
        300
    ));
    assert!(!verify(
        b"helpdesk-secret-for-tests",
        &got[0].signature,
        &got[0].body,
        now + 3600,
        300
    ));
    assert!(q.dead_letters().is_empty());

    // A help desk that never answers: dead-lettered after the receive limit.
    let down = Arc::new(FlakyDesk {
        fail: u32::MAX,
        calls: AtomicU32::new(0),
        got: Default::default(),
    });
    let q = LocalQueue::new(
        "support-down.fifo",
        true,
        tally::support::SUPPORT_MAX_RECEIVES,
    );
    q.start(Arc::new(desk(&app, down.clone(), 2)));
    q.send(tally::queue::Message {
        body: job.to_string(),
        group_id: Some(id.clone()),
        dedup_id: Some("d2".into()),
    })
    .await
    .unwrap();
    q.until_idle().await;
    assert_eq!(q.dead_letters().len(), 1);
    assert_eq!(
        down.calls.load(Ordering::SeqCst),
        2 * tally::support::SUPPORT_MAX_RECEIVES
    );
}

#[tokio::test]
async fn the_webhook_sink_posts_signed_json_and_treats_non_2xx_as_failure() {
    use wiremock::matchers::{header_exists, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/ok"))
        .and(header_exists("tally-signature"))
        .and(header_exists("idempotency-key"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hooks/down"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let body = r#"{"id":"x"}"#.to_owned();
    let signed = Signed {
        id: "tkt_x:ticket.created:1".into(),
        signature: tally::support::forward::sign(b"k", 1_800_000_000, &body),
        body: body.clone(),
    };
    let ok = support_forwarder::WebhookSink::new(&format!("{}/hooks/ok", server.uri())).unwrap();
    ok.deliver(&signed).await.unwrap();
    let down =
        support_forwarder::WebhookSink::new(&format!("{}/hooks/down", server.uri())).unwrap();
    assert!(down.deliver(&signed).await.is_err());
    let got = &server.received_requests().await.unwrap()[0];
    assert_eq!(got.body, body.as_bytes());
    let sig = got
        .headers
        .get("tally-signature")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(verify(b"k", sig, &body, 1_800_000_000, 60));
    assert_eq!(
        got.headers.get("idempotency-key").unwrap(),
        "tkt_x:ticket.created:1"
    );
}

#[tokio::test]
async fn tickets_and_messages_are_rate_limited_per_user_and_replays_are_free() {
    let app = TestApp::new();
    let ws = "org_s7";
    let tok = member(ws, "busy");
    for i in 0..tally::support::limits::TICKETS.per_window {
        file(&app, &tok, ticket_body("other", &format!("t{i}"), "m")).await;
    }
    let r = app
        .post(
            "/v1/support/tickets",
            &tok,
            ticket_body("other", "one more", "m"),
        )
        .await;
    r.assert_problem(429, "rate_limited");
    assert!(r.body["facts"]["retry_after_seconds"].as_i64().unwrap() > 0);
    // The same as a header, for clients that back off by it.
    assert_eq!(
        r.retry_after.as_deref(),
        Some(r.body["facts"]["retry_after_seconds"].to_string().as_str())
    );
    // Someone else in the workspace is not limited by it; an hour later the user is not.
    file(&app, &member(ws, "calm"), ticket_body("other", "x", "m")).await;
    app.clock.advance(chrono::Duration::minutes(61));
    let t = file(&app, &tok, ticket_body("other", "later", "m")).await;
    // A retry with the same Idempotency-Key answers the same ticket without counting.
    let keyed = || {
        app.send(
            Method::POST,
            "/v1/support/tickets",
            Some(&tok),
            Some(r#"{"category":"other","subject":"k","message":"m"}"#),
            &[("idempotency-key", "same")],
        )
    };
    let a = keyed().await;
    let b = keyed().await;
    assert_eq!(a.body["id"], b.body["id"]);
    assert_ne!(a.body["id"], t["id"]);
    let tickets = app.get("/v1/support/tickets?limit=100", &tok).await.body;
    assert_eq!(
        tickets["items"].as_array().unwrap().len() as u32,
        tally::support::limits::TICKETS.per_window + 2,
        "a member lists the tickets they filed"
    );
}

/// The message limit protects the help desk from a customer's flood; support staff answer
/// as often as they need to.
#[tokio::test]
async fn support_staff_replies_are_not_rate_limited() {
    let app = TestApp::new();
    let tok = member("org_s7c", "asker");
    let t = file(&app, &tok, ticket_body("other", "help", "m")).await;
    let path = format!("/v1/support/tickets/{}/messages", t["id"].as_str().unwrap());
    let limit = tally::support::limits::MESSAGES.per_window;
    for i in 0..=limit {
        let r = app
            .post(&path, &support(), json!({"message": format!("reply {i}")}))
            .await;
        assert_eq!(r.status.as_u16(), 201, "reply {i}: {:#}", r.body);
    }
    // The customer's own messages still count.
    for i in 0..limit {
        let r = app
            .post(&path, &tok, json!({"message": format!("more {i}")}))
            .await;
        assert_eq!(r.status.as_u16(), 201, "message {i}: {:#}", r.body);
    }
    app.post(&path, &tok, json!({"message": "one more"}))
        .await
        .assert_problem(429, "rate_limited");
}

/// A ticket refused because it names another workspace's generation or payment files
/// nothing, so it does not count against the user's limit either.
#[tokio::test]
async fn refused_tickets_do_not_count_against_the_limit() {
    let app = TestApp::new();
    let tok = owner("org_s7b");
    let theirs = tally::ids::GenerationId::new();
    for _ in 0..tally::support::limits::TICKETS.per_window + 3 {
        app.post(
            "/v1/support/tickets",
            &tok,
            json!({"category": "generation", "subject": "s", "message": "m",
                "generation_id": theirs.to_string()}),
        )
        .await
        .assert_problem(404, "not_found");
        app.post(
            "/v1/support/tickets",
            &tok,
            json!({"category": "billing", "subject": "s", "message": "m",
                "payment": "ch_not_ours"}),
        )
        .await
        .assert_problem(404, "not_found");
    }
    file(&app, &tok, ticket_body("other", "real", "m")).await;
}

#[tokio::test]
async fn bad_text_is_refused_and_nothing_is_filed() {
    let app = TestApp::new();
    let tok = owner("org_s8");
    for (body, field) in [
        (ticket_body("other", "a\u{0}b", "m"), "subject"),
        (ticket_body("other", "ok", "x\u{1b}[31m"), "message"),
        (ticket_body("other", "ok", "  \n "), "message"),
        (ticket_body("other", &"s".repeat(201), "m"), "subject"),
        (ticket_body("other", "ok", &"m".repeat(5001)), "message"),
        (
            json!({"category": "other", "subject": "ok", "message": "m", "payment": "card_1"}),
            "payment",
        ),
        (
            json!({"category": "other", "subject": "ok", "message": "m", "generation_id": "gen_x"}),
            "generation_id",
        ),
    ] {
        let r = app.post("/v1/support/tickets", &tok, body).await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.body["field"], field);
    }
    let r = app
        .post(
            "/v1/support/tickets",
            &tok,
            json!({"category": "weird", "subject": "s", "message": "m"}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 422, "{:#}", r.body);
    // HTML is stored as text, as sent.
    let t = file(
        &app,
        &tok,
        ticket_body("other", "<b>hi</b>", "<script>alert(1)</script>"),
    )
    .await;
    assert_eq!(t["subject"], "<b>hi</b>");
    assert_eq!(t["thread"][0]["body"], "<script>alert(1)</script>");
    let list = app.get("/v1/support/tickets", &tok).await.body;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn no_route_crosses_workspaces_and_staff_reads_are_audited() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 50).await;
    grant(&app.ledger, "org_b", 50).await;
    let t = file(
        &app,
        &member("org_a", "u1"),
        ticket_body("other", "mine", "m"),
    )
    .await;
    let id = t["id"].as_str().unwrap();
    let b = member("org_b", "u2");
    app.get(&format!("/v1/support/tickets/{id}"), &b)
        .await
        .assert_problem(404, "not_found");
    app.post(
        &format!("/v1/support/tickets/{id}/messages"),
        &b,
        json!({"message": "hi"}),
    )
    .await
    .assert_problem(404, "not_found");
    let theirs = app.get("/v1/support/tickets", &b).await.body;
    assert_eq!(theirs["items"], json!([]));
    // Members never reach staff routes.
    for path in [
        "/v1/admin/workspaces/org_a/balance".to_owned(),
        "/v1/admin/workspaces/org_a/ledger".into(),
        "/v1/admin/workspaces/org_a/generations".into(),
        "/v1/admin/workspaces/org_a/usage".into(),
        "/v1/admin/workspaces/org_a/audit".into(),
        "/v1/admin/workspaces/org_a/billing/history".into(),
        "/v1/admin/workspaces/org_a/support/tickets".into(),
        "/v1/admin/workspaces/org_a/ledger/export?format=csv".into(),
    ] {
        app.get(&path, &b).await.assert_problem(403, "forbidden");
    }
    app.post(
        &format!("/v1/admin/support/tickets/{id}/status"),
        &b,
        json!({"status": "solved"}),
    )
    .await
    .assert_problem(403, "forbidden");
    // A staff member without the admin scope (the generation service) neither.
    app.get("/v1/admin/workspaces/org_a/balance", &service())
        .await
        .assert_problem(403, "forbidden");
    // Who may ask is decided before what they asked: 403, whatever the query says.
    app.get("/v1/refund-requests?limit=zero", &b)
        .await
        .assert_problem(403, "forbidden");
    for path in [
        "/v1/ledger?limit=zero",
        "/v1/generations?limit=zero",
        "/v1/usage?nonsense=1",
        "/v1/ledger/export?format=pdf",
        "/v1/generations/export?format=pdf",
        "/v1/support/tickets?limit=zero",
    ] {
        app.get(path, &service())
            .await
            .assert_problem(403, "forbidden");
    }

    // Staff read org_a: every read is in its audit log, none in org_b's.
    let staff = support();
    for path in [
        "/v1/admin/workspaces/org_a/balance",
        "/v1/admin/workspaces/org_a/ledger?limit=5",
        "/v1/admin/workspaces/org_a/generations",
        "/v1/admin/workspaces/org_a/usage?group_by=day",
        "/v1/admin/workspaces/org_a/billing/history",
        "/v1/admin/workspaces/org_a/support/tickets?status=open",
        &format!("/v1/support/tickets/{id}"),
    ] {
        let r = app.get(path, &staff).await;
        assert_eq!(r.status.as_u16(), 200, "{path}: {:#}", r.body);
    }
    // A refused query reads nothing and records nothing.
    for path in [
        "/v1/admin/workspaces/org_a/ledger?limit=0",
        "/v1/admin/workspaces/org_a/ledger?cursor=nope",
        "/v1/admin/workspaces/org_a/generations?limit=101",
        "/v1/admin/workspaces/org_a/billing/history?cursor=nope",
        "/v1/admin/workspaces/org_a/billing/history?from=1999-03-01T00:00:00Z",
        "/v1/admin/workspaces/org_a/refund-requests?limit=0",
        "/v1/admin/workspaces/org_a/support/tickets?limit=0",
    ] {
        let r = app.get(path, &staff).await;
        assert_eq!(r.status.as_u16(), 422, "{path}: {:#}", r.body);
    }
    let log = app
        .get("/v1/admin/workspaces/org_a/audit", &staff)
        .await
        .body;
    let actions: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.len(), 8, "{log:#}");
    assert_eq!(actions[0], "GET /v1/admin/workspaces/{workspace_id}/audit");
    assert!(actions.contains(&"GET /v1/support/tickets/{id}"));
    assert_eq!(log["items"][1]["staff"], "support-1");
    assert_eq!(log["items"][6]["detail"], "limit=5");
    assert_eq!(log["items"][2]["detail"], "status=open", "{log:#}");
    let other = app
        .get("/v1/admin/workspaces/org_b/audit", &staff)
        .await
        .body;
    assert_eq!(other["items"].as_array().unwrap().len(), 1);
    // Staff change the status; the ticket shows it to its workspace.
    let s = app
        .post(
            &format!("/v1/admin/support/tickets/{id}/status"),
            &staff,
            json!({"status": "solved"}),
        )
        .await;
    assert_eq!(s.body["status"], "solved", "{:#}", s.body);
    let mine = app
        .get(&format!("/v1/support/tickets/{id}"), &member("org_a", "u1"))
        .await;
    assert_eq!(mine.body["status"], "solved");
    let open = app
        .get("/v1/support/tickets?status=solved", &staff)
        .await
        .body;
    assert_eq!(open["items"][0]["id"], id);
}

#[tokio::test]
async fn staff_reads_of_a_workspace_that_does_not_exist_are_refused_and_recorded_nowhere() {
    let app = TestApp::new();
    for path in [
        "/v1/admin/workspaces/org_typo/balance",
        "/v1/admin/workspaces/org_typo/ledger",
        "/v1/admin/workspaces/org_typo/generations",
        "/v1/admin/workspaces/org_typo/usage",
        "/v1/admin/workspaces/org_typo/audit",
        "/v1/admin/workspaces/org_typo/billing/history",
        "/v1/admin/workspaces/org_typo/support/tickets",
        "/v1/admin/workspaces/org_typo/generations/export?format=csv",
    ] {
        app.get(path, &support())
            .await
            .assert_problem(404, "not_found");
    }
    let docs = app
        .docs
        .list_docs("WORKSPACE#org_typo", "", 10)
        .await
        .unwrap();
    assert!(docs.is_empty(), "{docs:?}");
    assert!(
        app.ledger
            .store
            .load(&workspace("org_typo"))
            .await
            .unwrap()
            .is_none()
    );
}

/// Sets up a workspace with charges by three members over three days and a reversal.
async fn busy_workspace(app: &TestApp, ws: &str) -> Vec<String> {
    grant(&app.ledger, ws, 1000).await;
    let mut ids = Vec::new();
    for day in 0..3 {
        for who in ["ana", "bo", "cy"] {
            let id = start(app, &member(ws, who)).await;
            app.post(
                &format!("/v1/generations/{id}/complete"),
                &service(),
                json!({"credits": 2 + day}),
            )
            .await;
            ids.push(id);
        }
        app.clock.advance(chrono::Duration::days(1));
    }
    // One failed, one reversed: a note with a comma, quotes and a formula.
    let failed = start(app, &member(ws, "ana")).await;
    app.post(
        &format!("/v1/generations/{failed}/fail"),
        &service(),
        json!({"reason": "=HYPERLINK(\"x\"), out of memory"}),
    )
    .await;
    app.post(
        &format!("/v1/generations/{}/reverse", ids[0]),
        &support(),
        json!({"reason": "blank output, \"sorry\""}),
    )
    .await;
    ids
}

#[tokio::test]
async fn usage_totals_are_the_journals_sums_and_filters_narrow_the_history() {
    let app = TestApp::new();
    let ws = "org_u1";
    let t0 = app.clock.now();
    busy_workspace(&app, ws).await;
    let to = app.clock.now() + chrono::Duration::seconds(1);
    let from = t0 + chrono::Duration::days(1);
    let q = |g: &str| {
        format!(
            "/v1/usage?group_by={g}&from={}&to={}",
            urlencode(&from.to_rfc3339()),
            urlencode(&to.to_rfc3339())
        )
    };
    // The journal's own sums over the range.
    let journal = app
        .ledger
        .store
        .entries(
            &workspace(ws),
            &tally::store::EntryQuery {
                before: None,
                limit: 1000,
            },
        )
        .await
        .unwrap();
    let in_range: Vec<_> = journal
        .iter()
        .filter(|e| e.at >= from && e.at < to)
        .collect();
    let spent: u64 = in_range.iter().map(|e| e.totals.spent.get()).sum();
    assert_eq!(spent, 3 * 3 + 3 * 4);
    for g in ["member", "model", "day"] {
        let u = app.get(&q(g), &member(ws, "bo")).await;
        assert_eq!(u.status.as_u16(), 200, "{:#}", u.body);
        assert_eq!(u.body["spent"], spent, "{g}: {:#}", u.body);
        let sum: u64 = u.body["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["spent"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, spent, "{g}");
    }
    let by_member = app.get(&q("member"), &member(ws, "bo")).await.body;
    assert_eq!(by_member["groups"].as_array().unwrap().len(), 3);
    // Two days of charges, and the day of the reversal (of a charge before the range).
    let by_day = app.get(&q("day"), &member(ws, "bo")).await.body;
    assert_eq!(by_day["groups"].as_array().unwrap().len(), 3, "{by_day:#}");
    assert_eq!(by_day["reversed"], 2);
    // A report covers at most a year, ending at `to`: it says where it starts.
    let long = app
        .get(
            &format!(
                "/v1/usage?from=2000-01-01T00:00:00Z&to={}",
                urlencode(&to.to_rfc3339())
            ),
            &member(ws, "bo"),
        )
        .await;
    assert_eq!(long.status.as_u16(), 200, "{:#}", long.body);
    assert_eq!(long.body["from"], json!(to - chrono::Duration::days(366)));
    // A range that ends before it starts holds nothing.
    let backwards = app
        .get(
            &format!(
                "/v1/usage?from={}&to={}",
                urlencode(&to.to_rfc3339()),
                urlencode(&from.to_rfc3339())
            ),
            &member(ws, "bo"),
        )
        .await;
    assert_eq!(
        (backwards.body["spent"].as_u64(), &backwards.body["groups"]),
        (Some(0), &json!([]))
    );
    // Filters: member, workflow, date range.
    let mine = app
        .get(
            "/v1/generations?started_by=bo&limit=100",
            &member(ws, "ana"),
        )
        .await
        .body;
    assert_eq!(mine["items"].as_array().unwrap().len(), 3);
    assert!(
        mine["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["started_by"] == "bo")
    );
    let ranged = app
        .get(
            &format!(
                "/v1/generations?limit=100&from={}&to={}",
                urlencode(&from.to_rfc3339()),
                urlencode(&(t0 + chrono::Duration::days(2)).to_rfc3339())
            ),
            &member(ws, "ana"),
        )
        .await
        .body;
    assert_eq!(ranged["items"].as_array().unwrap().len(), 3, "{ranged:#}");
    let video = app
        .get("/v1/generations?workflow=video", &member(ws, "ana"))
        .await
        .body;
    assert_eq!(video["items"], json!([]));
    app.get("/v1/generations?from=2026-13-01", &member(ws, "ana"))
        .await
        .assert_problem(422, "validation_failed");
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// `n` generations by dee, each completed at one credit, `apart` from the next.
async fn one_credit_generations(app: &TestApp, ws: &str, n: usize, apart: chrono::Duration) {
    for _ in 0..n {
        let id = start(app, &member(ws, "dee")).await;
        app.post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": 1}),
        )
        .await;
        app.clock.advance(apart);
    }
}

fn read_csv(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let header = r.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(str::to_owned).collect())
        .collect();
    (header, rows)
}

#[tokio::test]
async fn csv_exports_parse_back_to_the_history_and_the_journal() {
    let app = TestApp::new();
    let ws = "org_x1";
    busy_workspace(&app, ws).await;
    // More than one page of journal.
    one_credit_generations(&app, ws, 60, chrono::Duration::zero()).await;
    let tok = member(ws, "ana");
    let a = app.get("/v1/ledger/export?format=csv", &tok).await;
    assert_eq!(a.status.as_u16(), 200);
    assert_eq!(a.content_type, "text/csv; charset=utf-8");
    let text = a.body.as_str().unwrap();
    assert!(text.contains("\r\n"));
    let (header, rows) = read_csv(text);
    assert_eq!(header, tally::reports::export::LEDGER_COLUMNS);
    let count = app.entry_count(ws).await as usize;
    assert_eq!(rows.len(), count);
    // Newest first; every entry once; credits add up to the balance.
    let seqs: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(seqs, (1..=count as u64).rev().collect::<Vec<_>>());
    let net: i64 = rows.iter().map(|r| r[4].parse::<i64>().unwrap()).sum();
    let b = app.get("/v1/balance", &tok).await.body;
    assert_eq!(
        net,
        b["available"].as_i64().unwrap() + b["held"].as_i64().unwrap()
    );
    let reversal = rows.iter().find(|r| r[3] == "reversal").unwrap();
    assert_eq!(reversal[16], "blank output, \"sorry\"");
    // What each entry spent adds up to what the generations were charged.
    let spent: u64 = rows.iter().map(|r| r[17].parse::<u64>().unwrap()).sum();
    let charged: u64 = read_csv(
        app.get("/v1/generations/export?format=csv", &tok)
            .await
            .body
            .as_str()
            .unwrap(),
    )
    .1
    .iter()
    .map(|r| r[8].parse::<u64>().unwrap())
    .sum();
    assert_eq!(spent, charged);
    assert!(spent > 0);

    let g = app
        .get("/v1/generations/export?format=csv&started_by=ana", &tok)
        .await;
    let (header, rows) = read_csv(g.body.as_str().unwrap());
    assert_eq!(header, tally::reports::export::GENERATION_COLUMNS);
    assert_eq!(rows.len(), 4);
    let failed = rows.iter().find(|r| r[5] == "failed").unwrap();
    // The formula someone typed is defused; the comma and quotes survive.
    assert_eq!(failed[12], "'=HYPERLINK(\"x\"), out of memory");
    let all = app.get("/v1/generations/export?format=csv", &tok).await;
    assert_eq!(read_csv(all.body.as_str().unwrap()).1.len(), 10 + 60);
    // Bad format or range: a problem, not a file.
    app.get("/v1/ledger/export?format=xlsx", &tok)
        .await
        .assert_problem(422, "validation_failed");
    let backwards = app
        .get(
            "/v1/ledger/export?format=csv&from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z",
            &tok,
        )
        .await;
    assert_eq!(read_csv(backwards.body.as_str().unwrap()).1.len(), 0);
    // Staff export the same file; the read is audited.
    let s = app
        .get(
            &format!("/v1/admin/workspaces/{ws}/ledger/export?format=csv"),
            &support(),
        )
        .await;
    assert_eq!(read_csv(s.body.as_str().unwrap()).1.len(), count);
    let log = app
        .get(&format!("/v1/admin/workspaces/{ws}/audit"), &support())
        .await
        .body;
    assert_eq!(
        log["items"][1]["action"],
        "GET /v1/admin/workspaces/{workspace_id}/ledger/export"
    );
}

#[tokio::test]
async fn the_sample_events_reach_support_intake_and_the_forwarder_as_lambda_delivers_them() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let app = TestApp::new();
    let state = support_intake::SupportState {
        tickets: tally::support::Tickets {
            docs: app.docs.clone(),
            queue: app.local.support_queue.clone(),
        },
        context: tally::support::enrich::Context {
            ledger: app.ledger.clone(),
            docs: app.docs.clone(),
            refunds: None,
        },
        clock: app.clock.clone(),
    };
    let router = support_intake::router(state, tally::http::AuthMode::ApiGateway);
    let invoke = |file: &'static str| {
        let router = router.clone();
        async move {
            let path = format!(
                "{}/../events/support-intake/{file}",
                env!("CARGO_MANIFEST_DIR")
            );
            let req =
                lambda_http::request::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let res = router
                .oneshot(req.map(|b| axum::body::Body::from(b.as_ref().to_vec())))
                .await
                .unwrap();
            let status = res.status().as_u16();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = invoke("post-ticket.json").await;
    assert_eq!(status, 201, "{body:#}");
    assert_eq!(body["captured"]["request_id"], "KmT3gYbIAMEYtQ=");
    assert_eq!(body["captured"]["email"], "owner@acme.example");
    assert_eq!(body["client"]["ad_blocker"], true);
    let (status, again) = invoke("post-ticket.json").await;
    assert_eq!((status, &again["id"]), (201, &body["id"]));
    let (status, bad) = invoke("post-ticket-control-character.json").await;
    assert_eq!((status, bad["field"].as_str()), (422, Some("message")));
    let (status, list) = invoke("get-tickets-staff.json").await;
    assert_eq!(status, 200, "{list:#}");
    assert_eq!(list["items"][0]["id"], body["id"]);

    let path = format!(
        "{}/../events/support-forwarder/poison-and-job.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let event: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids: Vec<String> = event
        .records
        .iter()
        .map(|r| r.message_id.clone().unwrap())
        .collect();
    let sink = Arc::new(FlakyDesk {
        fail: 0,
        calls: AtomicU32::new(0),
        got: Default::default(),
    });
    // Through the function's one entry point, as Lambda hands it the batch.
    let answer = desk(&app, sink.clone(), 1)
        .handle_event(serde_json::to_value(&event).unwrap())
        .await
        .unwrap();
    let failed: Vec<String> = answer["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect();
    // The unreadable one and the one for a ticket that does not exist fail, each alone.
    assert_eq!(failed, ids);
    assert_eq!(sink.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn members_see_their_own_tickets_owners_see_the_workspaces() {
    let app = TestApp::new();
    let ws = "org_v1";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "mine", "m")).await;
    let id = t["id"].as_str().unwrap();
    file(&app, &member(ws, "u2"), ticket_body("other", "theirs", "m")).await;
    // Another member neither reads nor answers it, nor lists it.
    app.get(&format!("/v1/support/tickets/{id}"), &member(ws, "u2"))
        .await
        .assert_problem(404, "not_found");
    app.post(
        &format!("/v1/support/tickets/{id}/messages"),
        &member(ws, "u2"),
        json!({"message": "me too"}),
    )
    .await
    .assert_problem(404, "not_found");
    let u2 = app.get("/v1/support/tickets", &member(ws, "u2")).await.body;
    assert_eq!(u2["items"].as_array().unwrap().len(), 1);
    assert_eq!(u2["items"][0]["subject"], "theirs");
    // The owner sees both.
    let all = app.get("/v1/support/tickets", &owner(ws)).await.body;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let r = app
        .get(&format!("/v1/support/tickets/{id}"), &owner(ws))
        .await;
    assert_eq!(r.status.as_u16(), 200);
}

#[tokio::test]
async fn a_message_retried_with_its_key_is_added_once() {
    let app = TestApp::new();
    let ws = "org_v2";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "m")).await;
    let id = t["id"].as_str().unwrap();
    let path = format!("/v1/support/tickets/{id}/messages");
    let send = |body: &'static str| {
        app.send(
            Method::POST,
            &path,
            Some(Box::leak(member(ws, "u1").into_boxed_str())),
            Some(body),
            &[("idempotency-key", "msg-1")],
        )
    };
    let a = send(r#"{"message": "any news?"}"#).await;
    let b = send(r#"{"message": "any news?"}"#).await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    assert_eq!(a.body["message"]["seq"], 2);
    assert_eq!(b.body["message"]["seq"], 2);
    send(r#"{"message": "something else"}"#)
        .await
        .assert_problem(409, "conflict");
    let full = app
        .get(&format!("/v1/support/tickets/{id}"), &member(ws, "u1"))
        .await;
    assert_eq!(full.body["thread"].as_array().unwrap().len(), 2);
    assert_eq!(full.body["messages"], 2);
}

#[tokio::test]
async fn a_full_ticket_refuses_messages_without_counting_them_or_keeping_claims_of_their_keys() {
    use tally::support::{MAX_MESSAGES, TICKET_SK, Ticket, ticket_pk};
    let app = TestApp::new();
    let ws = "org_full";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "m")).await;
    let id = t["id"].as_str().unwrap();
    let pk = ticket_pk(id);
    // As if 200 messages had come (the rate limit lets one user add 30 an hour).
    tally::store::docs::update(app.docs.as_ref(), &pk, TICKET_SK, |t: Option<Ticket>| {
        t.map(|mut t| {
            t.messages = MAX_MESSAGES;
            t.last_message = MAX_MESSAGES;
            t.forwarded_messages = MAX_MESSAGES;
            t
        })
    })
    .await
    .unwrap();
    // More refusals than the hourly message limit, keyed and not: none counts against it.
    for n in 0..tally::support::limits::MESSAGES.per_window + 3 {
        let key = format!("full-{n}");
        let keyed = [("idempotency-key", key.as_str())];
        app.send(
            Method::POST,
            &format!("/v1/support/tickets/{id}/messages"),
            Some(&member(ws, "u1")),
            Some(r#"{"message": "one more"}"#),
            if n % 2 == 0 { &keyed[..] } else { &[] },
        )
        .await
        .assert_problem(409, "conflict");
    }
    let claims = app.docs.list_docs(&pk, "MSGKEY#", 10).await.unwrap();
    assert!(claims.is_empty(), "{} claims left behind", claims.len());
    let other = file(&app, &member(ws, "u1"), ticket_body("other", "s2", "m")).await;
    let r = app
        .post(
            &format!(
                "/v1/support/tickets/{}/messages",
                other["id"].as_str().unwrap()
            ),
            &member(ws, "u1"),
            json!({"message": "still heard"}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
}

#[tokio::test]
async fn dates_outside_any_sensible_range_are_refused_not_crashed_on() {
    let app = TestApp::new();
    let tok = member("org_v3", "u1");
    for path in [
        "/v1/usage?to=-262143-01-01T00:00:00Z",
        "/v1/usage?from=%2B262142-01-01T00:00:00Z",
        "/v1/generations?from=-262143-01-01T00:00:00Z",
        "/v1/generations?to=1900-01-01T00:00:00Z",
        "/v1/ledger/export?format=csv&from=-262143-01-01T00:00:00Z",
        "/v1/generations/export?format=csv&from=1970-01-01T00:00:00Z",
    ] {
        let r = app.get(path, &tok).await;
        assert_eq!(r.status.as_u16(), 422, "{path}: {:#}", r.body);
    }
}

/// Rewrites a generation's stored record as `edit` says (what a faulty generation service
/// or an old release could have left), in a commit of its own.
async fn rewrite_generation(
    app: &TestApp,
    ws: &str,
    gen_id: &str,
    edit: impl FnOnce(&mut tally::ledger::Generation),
) {
    use tally::store::Commit;
    let store = &app.ledger.store;
    let w = workspace(ws);
    let gid = tally::ids::GenerationId::parse(gen_id).unwrap();
    let mut g = store.generation(&w, gid).await.unwrap().unwrap();
    let prior = g.status;
    edit(&mut g);
    let mut state = store.load(&w).await.unwrap().unwrap();
    state.version += 1;
    let key = tally::ids::IdempotencyKey::derived(format!("gen:{gen_id}:hold"));
    let mut idem = store.idempotency(&w, &key).await.unwrap().unwrap();
    idem.key = tally::ids::IdempotencyKey::derived(format!("test:rewrite:{}", ulid::Ulid::new()));
    store
        .commit(Commit {
            state,
            entries: vec![],
            idempotency: idem,
            generations: vec![(Some(prior), g)],
            placed: vec![],
            closed: vec![],
            new_generations: vec![],
        })
        .await
        .unwrap();
}

async fn available_of(app: &TestApp, ws: &str) -> u64 {
    app.get("/v1/balance", &owner(ws)).await.body["available"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn a_charge_the_journal_took_for_a_failed_generation_is_given_back_once() {
    let app = TestApp::new();
    let ws = "org_v4";
    grant(&app.ledger, ws, 100).await;
    let gen_id = start(&app, &member(ws, "u1")).await;
    app.post(
        &format!("/v1/generations/{gen_id}/complete"),
        &service(),
        json!({"credits": 3}),
    )
    .await;
    // Charged in the journal, but recorded as failed.
    rewrite_generation(&app, ws, &gen_id, |g| {
        g.status = tally::ledger::GenerationStatus::Failed;
    })
    .await;
    let before = available_of(&app, ws).await;
    let body = json!({"category": "generation", "subject": "charged for a failed job",
        "message": "it failed", "generation_id": gen_id});
    let t = file(&app, &member(ws, "u1"), body.clone()).await;
    assert_eq!(t["remediations"][0]["action"], "credits_returned", "{t:#}");
    assert_eq!(t["remediations"][0]["credits"], 3);
    assert_eq!(available_of(&app, ws).await, before + 3);
    let entry = &app.get("/v1/ledger?limit=1", &owner(ws)).await.body["items"][0];
    assert_eq!(entry["refs"]["ticket"], t["id"]);
    assert_eq!(entry["refs"]["generation"], gen_id.as_str());
    // A second ticket, and staff reversing it, give nothing more.
    let again = file(&app, &member(ws, "u1"), body).await;
    assert_eq!(again["remediations"], json!([]), "{again:#}");
    let staff = app
        .post(
            &format!("/v1/generations/{gen_id}/reverse"),
            &support(),
            json!({"reason": "customer asked"}),
        )
        .await;
    assert_eq!(staff.status.as_u16(), 200, "{:#}", staff.body);
    assert_eq!(staff.body["id"], gen_id.as_str(), "{:#}", staff.body);
    assert_eq!(available_of(&app, ws).await, before + 3);
}

#[tokio::test]
async fn a_record_claiming_a_charge_its_journal_does_not_show_pays_nothing_and_goes_to_staff() {
    let app = TestApp::new();
    let ws = "org_v5";
    grant(&app.ledger, ws, 100).await;
    let gen_id = start(&app, &member(ws, "u1")).await;
    app.post(
        &format!("/v1/generations/{gen_id}/fail"),
        &service(),
        json!({}),
    )
    .await;
    rewrite_generation(&app, ws, &gen_id, |g| {
        g.charged = tally::money::Credits::new(4)
    })
    .await;
    let before = available_of(&app, ws).await;
    let entries = app.entry_count(ws).await;
    let t = file(
        &app,
        &member(ws, "u1"),
        json!({"category": "generation", "subject": "charged?", "message": "it failed",
            "generation_id": gen_id}),
    )
    .await;
    assert_eq!(t["remediations"], json!([]), "{t:#}");
    assert_eq!(t["priority"], "urgent");
    assert_eq!(available_of(&app, ws).await, before);
    assert_eq!(app.entry_count(ws).await, entries);
}

fn range_query(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "from={}&to={}",
        urlencode(&from.to_rfc3339()),
        urlencode(&to.to_rfc3339())
    )
}

/// Files a movement that granted credits for a charge Stripe never collected.
async fn ghost_grant(app: &TestApp, ws: &str) {
    let now = app.clock.now();
    tally::billing::history::record(
        app.docs.as_ref(),
        &workspace(ws),
        "pi_ghost",
        now,
        now,
        |e| {
            e.kind = Some(tally::billing::history::MovementKind::Pack);
            e.charge = Some("ch_ghost".parse().unwrap());
            e.amount = tally::money::Cents::new(900);
            e.granted
                .insert("ghost".into(), tally::money::Credits::new(500));
            true
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn reconciliation_finds_money_without_credits_and_credits_without_money() {
    let app = TestApp::new();
    let ws = "org_r1";
    buy_pack(&app, ws).await;
    buy_pack(&app, ws).await;
    let (from, to) = (
        app.clock.now() - chrono::Duration::hours(1),
        app.clock.now() + chrono::Duration::hours(1),
    );
    let r = app
        .get(
            &format!("/v1/admin/reconciliation?{}", range_query(from, to)),
            &support(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    assert_eq!(
        (r.body["charges"].as_u64(), r.body["matched"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(r.body["paid_without_credits"], json!([]));
    assert_eq!(r.body["credits_without_payment"], json!([]));

    // Stripe's charges against a ledger that never heard of them.
    let empty = TestApp::new();
    let sim = app.local.simulator.clone().unwrap();
    let report = tally::billing::reconcile::reconcile(empty.docs.as_ref(), sim.as_ref(), from, to)
        .await
        .unwrap();
    assert_eq!(report.paid_without_credits.len(), 2);
    assert_eq!(report.matched, 0);
    assert_eq!(
        report.paid_without_credits[0].workspace,
        Some(workspace(ws)),
        "the charge's metadata names the workspace"
    );

    // Credits granted for a payment Stripe does not list.
    ghost_grant(&app, ws).await;
    let r = app
        .get(
            &format!("/v1/admin/reconciliation?{}", range_query(from, to)),
            &support(),
        )
        .await;
    let ghost = &r.body["credits_without_payment"];
    assert_eq!(ghost.as_array().unwrap().len(), 1, "{:#}", r.body);
    assert_eq!(ghost[0]["movement"], "pi_ghost");
    assert_eq!(ghost[0]["credits_granted"], 500);
    assert_eq!(ghost[0]["workspace"], ws);

    // Only staff; at most 31 days; the read is in the global audit log.
    app.get(
        &format!("/v1/admin/reconciliation?{}", range_query(from, to)),
        &owner(ws),
    )
    .await
    .assert_problem(403, "forbidden");
    let long = app
        .get(
            &format!(
                "/v1/admin/reconciliation?{}",
                range_query(from, from + chrono::Duration::days(40))
            ),
            &support(),
        )
        .await;
    assert_eq!(long.body["to"], json!(from + chrono::Duration::days(31)));
    let global = app
        .docs
        .list_docs(tally::audit::GLOBAL_PK, "", 10)
        .await
        .unwrap();
    assert_eq!(global.len(), 3);
}

#[tokio::test]
async fn the_command_line_tool_reads_exports_and_reconciles_through_the_api() {
    use tally_admin::{Cli, Command, ExportKind, Read};
    let app = TestApp::new();
    let ws = "org_cli";
    buy_pack(&app, ws).await;
    busy_workspace(&app, ws).await;
    ghost_grant(&app, ws).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app.router.clone()).into_future());
    let run = |command: Command| {
        let api = api.clone();
        async move {
            let mut out = Vec::new();
            let r = tally_admin::run(
                Cli {
                    api,
                    token: support(),
                    command,
                },
                &mut out,
            )
            .await;
            (r, String::from_utf8(out).unwrap())
        }
    };
    let (r, out) = run(Command::Workspace {
        id: ws.into(),
        what: Read::Balance,
        from: None,
        to: None,
        limit: None,
    })
    .await;
    r.unwrap();
    let balance: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        balance["available"],
        app.get("/v1/balance", &owner(ws)).await.body["available"]
    );

    // An export over three months, stitched into one file with one header.
    let dir = std::env::temp_dir().join(format!("tally-cli-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ledger.csv");
    let from = (app.clock.now() - chrono::Duration::days(70)).to_rfc3339();
    let to = (app.clock.now() + chrono::Duration::days(1)).to_rfc3339();
    let (r, out) = run(Command::Export {
        what: ExportKind::Ledger,
        workspace: ws.into(),
        from: from.clone(),
        to: Some(to.clone()),
        output: file.clone(),
    })
    .await;
    r.unwrap();
    let count = app.entry_count(ws).await as usize;
    assert!(out.starts_with(&format!("{count} rows")), "{out}");
    let (header, rows) = read_csv(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(header, tally::reports::export::LEDGER_COLUMNS);
    assert_eq!(rows.len(), count);
    assert!(!dir.join("ledger.partial").exists());

    // Reconciliation day by day.
    let report = dir.join("reconciliation.json");
    let (r, out) = run(Command::Reconcile {
        from: (app.clock.now() - chrono::Duration::days(5)).to_rfc3339(),
        to: Some(to),
        output: Some(report.clone()),
    })
    .await;
    r.unwrap();
    assert!(
        out.contains("0 paid without credits; 1 credits without payment"),
        "{out}"
    );
    let full: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(full["credits_without_payment"][0]["movement"], "pi_ghost");

    // An error carries the API's status and reason.
    let (r, _) = {
        let mut out = Vec::new();
        let r = tally_admin::run(
            Cli {
                api: api.clone(),
                token: owner(ws),
                command: Command::Ticket {
                    id: "tkt_01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
                },
            },
            &mut out,
        )
        .await;
        (r, out)
    };
    let e = r.unwrap_err().to_string();
    assert!(e.contains("404"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A queue that refuses the sends it is told to and keeps the others.
#[derive(Default)]
struct FlakyQueue {
    refuse: std::sync::Mutex<bool>,
    sent: std::sync::Mutex<Vec<tally::support::ForwardJob>>,
}

#[async_trait::async_trait]
impl tally::queue::Queue for FlakyQueue {
    async fn send(&self, m: tally::queue::Message) -> Result<(), tally::queue::QueueError> {
        if *self.refuse.lock().unwrap() {
            return Err(tally::queue::QueueError::unavailable("queue down"));
        }
        self.sent
            .lock()
            .unwrap()
            .push(serde_json::from_str(&m.body).unwrap());
        Ok(())
    }
}

#[tokio::test]
async fn a_message_whose_forward_failed_reaches_the_help_desk_with_the_next_change() {
    use tally::support::{Author, Tickets};
    let app = TestApp::new();
    let ws = "org_f1";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
    let queue = Arc::new(FlakyQueue::default());
    let tickets = Tickets {
        docs: app.docs.clone(),
        queue: queue.clone(),
    };
    let ticket = tickets
        .get(t["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let now = app.clock.now();
    *queue.refuse.lock().unwrap() = true;
    let failed = tickets
        .add_message(&ticket, Author::Customer, "u1", "second", Some("k2"), now)
        .await;
    assert_eq!(failed.unwrap_err().status.as_u16(), 503);
    *queue.refuse.lock().unwrap() = false;
    // The retry with the same key finds the message (stored, not doubled) and forwards it.
    let (_, again) = tickets
        .add_message(&ticket, Author::Customer, "u1", "second", Some("k2"), now)
        .await
        .unwrap();
    assert_eq!(again.seq, 2);
    let (after, third) = tickets
        .add_message(&ticket, Author::Staff, "agent", "third", None, now)
        .await
        .unwrap();
    assert_eq!(
        (third.seq, after.messages, after.status),
        (3, 3, tally::support::TicketStatus::Waiting)
    );
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[0].from_seq, sent[0].seq), (2, 2));
    assert_eq!((sent[1].from_seq, sent[1].seq), (3, 3));
    // Had the retry never come, the next change would have carried message 2 along.
    let queue2 = Arc::new(FlakyQueue::default());
    let tickets2 = Tickets {
        docs: app.docs.clone(),
        queue: queue2.clone(),
    };
    *queue2.refuse.lock().unwrap() = true;
    let _ = tickets2
        .add_message(&ticket, Author::Customer, "u1", "fourth", None, now)
        .await;
    *queue2.refuse.lock().unwrap() = false;
    tickets2
        .add_message(&ticket, Author::Customer, "u1", "fifth", None, now)
        .await
        .unwrap();
    let job = queue2.sent.lock().unwrap()[0].clone();
    assert_eq!((job.from_seq, job.seq), (4, 5));
    let d = desk(
        &app,
        Arc::new(FlakyDesk {
            fail: 0,
            calls: AtomicU32::new(0),
            got: Default::default(),
        }),
        1,
    );
    let payload = d.payload(&job).await.unwrap().unwrap();
    let bodies: Vec<&str> = payload.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["fourth", "fifth"]);
    let thread = tickets.messages(&ticket.id).await.unwrap();
    assert_eq!(thread.len(), 5);
}

/// A change whose forward failed, on a ticket nobody opens again, is handed to the queue by
/// the forwarder's scheduled sweep once the grace time has passed; a sweep that cannot
/// hand it over leaves it for the next, and a forwarded ticket is swept no more.
#[tokio::test]
async fn a_ticket_whose_forward_failed_is_swept_to_the_queue_though_nobody_opens_it() {
    use tally::support::{Author, FORWARD_GRACE, SweepReport, Tickets};
    let app = TestApp::new();
    let ws = "org_sweep";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let queue = Arc::new(FlakyQueue::default());
    let tickets = Tickets {
        docs: app.docs.clone(),
        queue: queue.clone(),
    };
    // Filed and forwarded: nothing to sweep, however late.
    let later = app.clock.now() + FORWARD_GRACE * 3;
    assert_eq!(
        tickets.sweep(later, 100).await.unwrap(),
        SweepReport::default()
    );
    let ticket = tickets.get(&id).await.unwrap().unwrap();
    let now = app.clock.now();
    *queue.refuse.lock().unwrap() = true;
    let failed = tickets
        .add_message(&ticket, Author::Customer, "u1", "second", None, now)
        .await;
    assert_eq!(failed.unwrap_err().status.as_u16(), 503);
    assert!(tickets.get(&id).await.unwrap().unwrap().unforwarded());
    // Within the grace time the request's own retry is expected: no sweep yet.
    let early = tickets
        .sweep(now + FORWARD_GRACE - chrono::Duration::seconds(1), 100)
        .await
        .unwrap();
    assert_eq!(early, SweepReport::default());
    // The queue still down: the sweep fails it and it stays filed.
    let due = now + FORWARD_GRACE;
    let down = tickets.sweep(due, 100).await.unwrap();
    assert_eq!((down.forwarded.len(), down.failed), (0, vec![id.clone()]));
    assert!(queue.sent.lock().unwrap().is_empty());
    // The queue back: the forwarder's scheduled tick hands it over, with the message the
    // failed forward should have carried.
    *queue.refuse.lock().unwrap() = false;
    app.clock.set(due);
    let sink = Arc::new(FlakyDesk {
        fail: 0,
        calls: AtomicU32::new(0),
        got: Default::default(),
    });
    let d = HelpDesk {
        tickets: tickets.clone(),
        ..desk(&app, sink, 1)
    };
    let path = format!(
        "{}/../events/support-forwarder/scheduled-sweep.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let tick: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let answer = d.handle_event(tick.clone()).await.unwrap();
    assert_eq!(answer["forwarded"], json!([id]), "{answer:#}");
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].ticket.as_str(), sent[0].from_seq, sent[0].seq),
        (id.as_str(), 2, 2)
    );
    let payload = d.payload(&sent[0]).await.unwrap().unwrap();
    let bodies: Vec<&str> = payload.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["second"]);
    assert!(!tickets.get(&id).await.unwrap().unwrap().unforwarded());
    // Forwarded: out of the index, swept no more.
    let again = d.handle_event(tick).await.unwrap();
    assert_eq!(again, json!({"forwarded": [], "failed": []}));
    assert_eq!(queue.sent.lock().unwrap().len(), 1);
    // A sweep (or a read's catch-up) holding an older read of the ticket than a change
    // made meanwhile does not put the older summary back in the lists.
    let mut stale = tickets.get(&id).await.unwrap().unwrap();
    let later = app.clock.now() + chrono::Duration::minutes(1);
    tickets
        .add_message(&stale, Author::Staff, "agent", "third", None, later)
        .await
        .unwrap();
    stale.forwarded = false;
    tickets.catch_up(stale, later).await.unwrap();
    let w = tally::ids::WorkspaceId::parse(ws).unwrap();
    for list in [Some(&w), None] {
        let (page, _) = tickets
            .list(list, None, None, None, None, 10)
            .await
            .unwrap();
        let s = page.iter().find(|s| s.id == id).unwrap();
        assert_eq!(
            (s.messages, s.status),
            (3, tally::support::TicketStatus::Waiting)
        );
    }
}

/// Behind API Gateway an export is one answer of at most 6 MB. A range that makes more is
/// refused before anything is sent (`export_too_large`), and the command line asks for it
/// again in halves until each fits, so the file still holds every entry once, newest first.
#[tokio::test]
async fn an_export_too_large_for_one_answer_is_refused_and_the_command_line_splits_it() {
    use tally_admin::{Cli, Command, ExportKind};
    let app = TestApp::with_export_limit(credits_api::ExportLimit {
        bytes: 3_000,
        time: std::time::Duration::from_secs(60),
    });
    let ws = "org_big_export";
    busy_workspace(&app, ws).await;
    one_credit_generations(&app, ws, 20, chrono::Duration::hours(5)).await;
    let tok = member(ws, "ana");
    app.get("/v1/ledger/export?format=csv", &tok)
        .await
        .assert_problem(422, "export_too_large");
    // A short range still fits.
    let from = (app.clock.now() - chrono::Duration::hours(6)).to_rfc3339();
    let recent = app
        .get(
            &format!(
                "/v1/ledger/export?format=csv&from={}",
                from.replace('+', "%2B")
            ),
            &tok,
        )
        .await;
    assert_eq!(recent.status.as_u16(), 200);
    assert!(!read_csv(recent.body.as_str().unwrap()).1.is_empty());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app.router.clone()).into_future());
    let dir = std::env::temp_dir().join(format!("tally-cli-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ledger.csv");
    let mut out = Vec::new();
    tally_admin::run(
        Cli {
            api,
            token: support(),
            command: Command::Export {
                what: ExportKind::Ledger,
                workspace: ws.into(),
                from: (app.clock.now() - chrono::Duration::days(70)).to_rfc3339(),
                to: Some((app.clock.now() + chrono::Duration::days(1)).to_rfc3339()),
                output: file.clone(),
            },
        },
        &mut out,
    )
    .await
    .unwrap();
    let (header, rows) = read_csv(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(header, tally::reports::export::LEDGER_COLUMNS);
    let count = app.entry_count(ws).await;
    assert!(count > 40);
    let seqs: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(seqs, (1..=count).rev().collect::<Vec<_>>());

    // Out of time is the same answer: the range is too much for one.
    let slow = TestApp::with_export_limit(credits_api::ExportLimit {
        bytes: 3_000,
        time: std::time::Duration::ZERO,
    });
    grant(&slow.ledger, ws, 10).await;
    slow.get("/v1/ledger/export?format=csv", &tok)
        .await
        .assert_problem(422, "export_too_large");
}

/// The generations export takes the list's `status` filter, and shows a hold past its
/// deadline as expired, as the creation history does, before anything settles it.
#[tokio::test]
async fn the_generations_export_filters_by_status_as_the_creation_history_shows_it() {
    let app = TestApp::new();
    let ws = "org_export_status";
    grant(&app.ledger, ws, 100).await;
    let tok = member(ws, "ana");
    let body = json!({"workflow": "video", "model": "video-pro", "duration_s": 10});
    let started = app.post("/v1/generations", &tok, body).await;
    assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    let deadline: chrono::DateTime<chrono::Utc> =
        started.body["deadline"].as_str().unwrap().parse().unwrap();
    let ids = |status: &str| {
        let app = &app;
        let tok = tok.clone();
        let status = status.to_owned();
        async move {
            let a = app
                .get(
                    &format!("/v1/generations/export?format=csv&status={status}"),
                    &tok,
                )
                .await;
            assert_eq!(a.status.as_u16(), 200, "{status}: {:?}", a.body);
            read_csv(a.body.as_str().unwrap())
                .1
                .iter()
                .map(|r| (r[0].clone(), r[5].clone()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("held").await, vec![(id.clone(), "held".to_owned())]);
    assert!(ids("expired").await.is_empty());
    // Past its deadline, nothing written since: expired in the list and the export alike.
    app.clock.set(deadline + chrono::Duration::seconds(1));
    let listed = app.get("/v1/generations?status=expired", &tok).await.body;
    assert_eq!(listed["items"][0]["id"], json!(id), "{listed:#}");
    assert_eq!(
        ids("expired").await,
        vec![(id.clone(), "expired".to_owned())]
    );
    assert!(ids("held").await.is_empty());
    assert!(ids("failed").await.is_empty());
    app.get("/v1/generations/export?format=csv&status=lost", &tok)
        .await
        .assert_problem(422, "validation_failed");
}

/// In Lambda a usage report has the export's time: one too long to sum in it is refused
/// as a range too large (a shorter range answers), never cut off by the function's timeout.
#[tokio::test]
async fn a_usage_report_too_long_to_sum_in_one_answer_is_refused_not_cut_off() {
    let app = TestApp::with_export_limit(credits_api::ExportLimit {
        bytes: 5_000_000,
        time: std::time::Duration::ZERO,
    });
    let ws = "org_slow_usage";
    busy_workspace(&app, ws).await;
    let tok = member(ws, "ana");
    app.get("/v1/usage", &tok)
        .await
        .assert_problem(422, "range_too_large");
    let roomy = TestApp::with_export_limit(credits_api::LAMBDA_EXPORT_LIMIT);
    busy_workspace(&roomy, ws).await;
    let usage = roomy.get("/v1/usage", &tok).await;
    assert_eq!(usage.status.as_u16(), 200, "{:#}", usage.body);
    assert_eq!(usage.body["groups"].as_array().unwrap().len(), 3);
}

/// A list of tickets that ends exactly at a page's end has no cursor to an empty page; one
/// ticket more has, and the next page holds just it.
#[tokio::test]
async fn the_ticket_list_hands_out_a_cursor_only_when_more_follow() {
    let app = TestApp::new();
    let ws = "org_ticket_pages";
    grant(&app.ledger, ws, 10).await;
    for n in 0..3 {
        file(
            &app,
            &member(ws, &format!("u{n}")),
            ticket_body("other", &format!("t{n}"), "m"),
        )
        .await;
    }
    let admin = support();
    let path = format!("/v1/admin/workspaces/{ws}/support/tickets");
    let all = app.get(&format!("{path}?limit=3"), &admin).await.body;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(3), "{all:#}");
    assert!(all["next_cursor"].is_null(), "{all:#}");
    let first = app.get(&format!("{path}?limit=2"), &admin).await.body;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().expect("a cursor");
    let rest = app
        .get(
            &format!("{path}?limit=2&cursor={}", cursor.replace('#', "%23")),
            &admin,
        )
        .await
        .body;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1, "{rest:#}");
    assert!(rest["next_cursor"].is_null());
    assert_eq!(rest["items"][0]["subject"], "t0");
}

/// A message stored by a writer whose write of the ticket then failed (or that stopped in
/// between) is not lost: the ticket was filed for the sweep before the message was
/// stored, so a read of the ticket, or the sweep after the grace time, counts it, reopens
/// the ticket and hands it to the help desk. An announced slot whose message was never
/// stored is dropped by the sweep, and nothing is sent for it.
#[tokio::test]
async fn a_message_stored_but_not_counted_is_counted_and_forwarded_by_a_read_or_the_sweep() {
    use tally::support::{Author, FORWARD_GRACE, SweepReport, TicketStatus, Tickets};
    let app = TestApp::new();
    let ws = "org_stray";
    let ticket_with = |watched_sk: &'static str, fail_at: usize, id: &str| {
        let pk = tally::support::ticket_pk(id);
        tally_tests::OnWrite::new(
            app.docs.clone(),
            move |p, s| p == pk && s == watched_sk,
            Box::new(move |n| {
                Box::pin(async move {
                    if n == fail_at {
                        tally_tests::timed_out()
                    } else {
                        Ok(())
                    }
                })
            }),
        )
    };
    for by_read in [false, true] {
        let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
        let id = t["id"].as_str().unwrap().to_owned();
        // Staff answered: the ticket waits for the customer.
        let plain = Tickets {
            docs: app.docs.clone(),
            queue: Arc::new(FlakyQueue::default()),
        };
        let ticket = plain.get(&id).await.unwrap().unwrap();
        let now = app.clock.now();
        plain
            .add_message(&ticket, Author::Staff, "agent", "answer", None, now)
            .await
            .unwrap();
        // The customer's message is stored; the write that counts it (the ticket's second
        // write in the request, after the announcement) fails.
        let queue = Arc::new(FlakyQueue::default());
        let failing = Tickets {
            docs: ticket_with(tally::support::TICKET_SK, 1, &id),
            queue: queue.clone(),
        };
        let ticket = plain.get(&id).await.unwrap().unwrap();
        let failed = failing
            .add_message(&ticket, Author::Customer, "u1", "third", None, now)
            .await;
        assert_eq!(failed.unwrap_err().status.as_u16(), 503);
        assert_eq!(plain.messages(&id).await.unwrap().len(), 3);
        let stuck = plain.get(&id).await.unwrap().unwrap();
        assert_eq!((stuck.messages, stuck.status), (2, TicketStatus::Waiting));
        let tickets = Tickets {
            docs: app.docs.clone(),
            queue: queue.clone(),
        };
        let settled = if by_read {
            // The customer opens the ticket to check: the message is counted at once.
            tickets.catch_up(stuck, now).await.unwrap()
        } else {
            let early = now + FORWARD_GRACE - chrono::Duration::seconds(1);
            assert_eq!(
                tickets.sweep(early, 100).await.unwrap(),
                SweepReport::default()
            );
            let report = tickets.sweep(now + FORWARD_GRACE, 100).await.unwrap();
            assert_eq!(report.forwarded, vec![id.clone()]);
            tickets.get(&id).await.unwrap().unwrap()
        };
        assert_eq!((settled.messages, settled.status), (3, TicketStatus::Open));
        assert!(!settled.unforwarded());
        let sent = queue.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!((sent[0].from_seq, sent[0].seq), (3, 3));
        // Nothing left to sweep.
        let later = now + FORWARD_GRACE * 3;
        assert_eq!(
            tickets.sweep(later, 100).await.unwrap(),
            SweepReport::default()
        );
    }
    // A writer that announced its slot and then could not store the message: the sweep
    // finds nothing stored, drops the announcement and sends nothing.
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let queue = Arc::new(FlakyQueue::default());
    let failing = Tickets {
        docs: ticket_with("MSG#000002", 0, &id),
        queue: queue.clone(),
    };
    let ticket = failing.get(&id).await.unwrap().unwrap();
    let now = app.clock.now();
    let failed = failing
        .add_message(&ticket, Author::Customer, "u1", "second", None, now)
        .await;
    assert_eq!(failed.unwrap_err().status.as_u16(), 503);
    let tickets = Tickets {
        docs: app.docs.clone(),
        queue: queue.clone(),
    };
    assert!(
        tickets
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .adding_uncounted()
            .is_some()
    );
    let due = now + FORWARD_GRACE;
    assert_eq!(
        tickets.sweep(due, 100).await.unwrap(),
        SweepReport::default()
    );
    let after = tickets.get(&id).await.unwrap().unwrap();
    assert_eq!((after.messages, after.adding_uncounted()), (1, None));
    assert!(queue.sent.lock().unwrap().is_empty());
    assert_eq!(
        tickets.sweep(due + FORWARD_GRACE, 100).await.unwrap(),
        SweepReport::default()
    );
}

/// A queue that, on its first send, first runs `before_first` (another writer's change
/// landing between this writer's write of the ticket and its send), then keeps the message.
#[derive(Default)]
struct InterleavingQueue {
    before_first:
        std::sync::Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
    sent: std::sync::Mutex<Vec<tally::queue::Message>>,
}

#[async_trait::async_trait]
impl tally::queue::Queue for InterleavingQueue {
    async fn send(&self, m: tally::queue::Message) -> Result<(), tally::queue::QueueError> {
        let first = self.before_first.lock().unwrap().take();
        if let Some(other) = first {
            other.await;
        }
        self.sent.lock().unwrap().push(m);
        Ok(())
    }
}

/// A ticket filed by `u1` of `ws`, and tickets over the app's store forwarding through an
/// [`InterleavingQueue`].
async fn ticket_with_queue(
    app: &TestApp,
    ws: &str,
) -> (
    tally::support::Ticket,
    tally::support::Tickets,
    Arc<InterleavingQueue>,
) {
    let t = file(app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
    let queue = Arc::new(InterleavingQueue::default());
    let tickets = tally::support::Tickets {
        docs: app.docs.clone(),
        queue: queue.clone(),
    };
    let ticket = tickets
        .get(t["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    (ticket, tickets, queue)
}

/// A help desk that takes every delivery, and the forwarder delivering to it.
fn taking_desk(app: &TestApp) -> (HelpDesk, Arc<FlakyDesk>) {
    let sink = Arc::new(FlakyDesk {
        fail: 0,
        calls: AtomicU32::new(0),
        got: Default::default(),
    });
    (desk(app, sink.clone(), 1), sink)
}

/// The forwarder takes each of `sent` from the queue, in order.
async fn forward_each(d: &HelpDesk, sent: &[tally::queue::Message]) {
    for (n, m) in sent.iter().enumerate() {
        tally::queue::Consumer::consume(
            d,
            &tally::queue::Delivery {
                message_id: format!("m{n}"),
                body: m.body.clone(),
                group_id: m.group_id.clone(),
                receive_count: 1,
            },
        )
        .await
        .unwrap();
    }
}

/// What the help desk got: each delivery's payload.
fn payloads(sink: &FlakyDesk) -> Vec<Value> {
    sink.got
        .lock()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_str(&s.body).unwrap())
        .collect()
}

/// The bodies of the messages each payload carried.
fn bodies(payloads: &[Value]) -> Vec<Vec<Value>> {
    payloads
        .iter()
        .map(|p| {
            p["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|m| m["body"].clone())
                .collect()
        })
        .collect()
}

/// A customer's message and a staff status change made at once: both writers' jobs carry
/// the message (neither saw the other's forward), and the status change reaches the queue
/// first. The help desk gets the message once, and the message's job, arriving after the
/// later change was delivered, is not delivered at all (nor is a redelivery of either).
#[tokio::test]
async fn a_message_and_a_status_change_at_once_reach_the_help_desk_with_the_message_once() {
    use tally::support::{Author, TicketStatus};
    let app = TestApp::new();
    let (ticket, tickets, queue) = ticket_with_queue(&app, "org_twice").await;
    let now = app.clock.now();
    let staff = tickets.clone();
    let seen = ticket.clone();
    *queue.before_first.lock().unwrap() = Some(Box::pin(async move {
        staff
            .set_status(&seen, TicketStatus::Solved, now)
            .await
            .unwrap();
    }));
    tickets
        .add_message(&ticket, Author::Customer, "u1", "second", None, now)
        .await
        .unwrap();
    let sent = queue.sent.lock().unwrap().clone();
    let jobs: Vec<tally::support::ForwardJob> = sent
        .iter()
        .map(|m| serde_json::from_str(&m.body).unwrap())
        .collect();
    let shape: Vec<(&str, u32, u32)> = jobs
        .iter()
        .map(|j| (j.event.as_str(), j.from_seq, j.seq))
        .collect();
    assert_eq!(
        shape,
        [("ticket.status", 2, 2), ("ticket.message", 2, 2)],
        "the race this test is about did not happen: {jobs:?}"
    );
    let (d, sink) = taking_desk(&app);
    // In queue order, each twice (SQS delivers at least once).
    forward_each(&d, &[sent.clone(), sent].concat()).await;
    let got = payloads(&sink);
    assert_eq!(bodies(&got), [vec![json!("second")]], "{got:#?}");
    assert_eq!(got[0]["event"], "ticket.status");
    assert_eq!(got[0]["ticket"]["status"], "solved");
    // The next change carries only what is new.
    let (_, third) = tickets
        .add_message(&ticket, Author::Customer, "u1", "third", None, now)
        .await
        .unwrap();
    let next = queue.sent.lock().unwrap().last().unwrap().clone();
    forward_each(&d, &[next]).await;
    let last = payloads(&sink).pop().unwrap();
    assert_eq!(last["messages"].as_array().unwrap().len(), 1);
    assert_eq!(last["messages"][0]["seq"], third.seq);
}

/// A change whose delivery went to the dead-letter queue (the help desk refused it for a
/// while), redriven after later changes were delivered, still brings the message only it
/// carried; once delivered, a redelivery of it sends nothing again.
#[tokio::test]
async fn a_change_redriven_after_later_ones_were_delivered_still_brings_its_message() {
    use tally::support::Author;
    let app = TestApp::new();
    let (ticket, tickets, queue) = ticket_with_queue(&app, "org_redrive").await;
    let now = app.clock.now();
    for body in ["second", "third"] {
        tickets
            .add_message(&ticket, Author::Customer, "u1", body, None, now)
            .await
            .unwrap();
    }
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    let (d, sink) = taking_desk(&app);
    // The second message's job is dead-lettered; the third's is delivered; then the
    // second's is redriven, twice.
    forward_each(&d, &[sent[1].clone(), sent[0].clone(), sent[0].clone()]).await;
    let got = payloads(&sink);
    assert_eq!(
        bodies(&got),
        [vec![json!("third")], vec![json!("second")]],
        "{got:#?}"
    );
}

/// A ticket filed before changes were counted (`changes` 0, never marked forwarded): the
/// read that catches it up forwards it unnumbered, so its first counted change, a status
/// change with no message, is not taken for one already delivered.
#[tokio::test]
async fn a_ticket_from_before_changes_were_counted_has_its_first_change_delivered() {
    use tally::support::{Ticket, TicketStatus, Tickets};
    let app = TestApp::new();
    let ws = "org_old_ticket";
    let t = file(&app, &member(ws, "u1"), ticket_body("other", "s", "first")).await;
    let id = t["id"].as_str().unwrap().to_owned();
    tally::store::docs::update::<Ticket, _>(
        app.docs.as_ref(),
        &tally::support::ticket_pk(&id),
        tally::support::TICKET_SK,
        |cur| {
            cur.map(|mut t| {
                t.changes = 0;
                t.forwarded = false;
                t.forwarded_messages = 0;
                t.last_event.clear();
                t
            })
        },
    )
    .await
    .unwrap();
    // Nothing on record of what the help desk was sent, as before the record existed.
    app.local.support_queue.until_idle().await;
    tally::store::docs::update::<tally::support::Delivered, _>(
        app.docs.as_ref(),
        &tally::support::ticket_pk(&id),
        tally::support::DELIVERED_SK,
        |_| Some(tally::support::Delivered::default()),
    )
    .await
    .unwrap();
    let queue = Arc::new(InterleavingQueue::default());
    let tickets = Tickets {
        docs: app.docs.clone(),
        queue: queue.clone(),
    };
    let now = app.clock.now();
    let old = tickets.get(&id).await.unwrap().unwrap();
    let old = tickets.catch_up(old, now).await.unwrap();
    tickets
        .set_status(&old, TicketStatus::Solved, now)
        .await
        .unwrap();
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (d, sink) = taking_desk(&app);
    forward_each(&d, &sent).await;
    let events: Vec<Value> = payloads(&sink).iter().map(|p| p["event"].clone()).collect();
    assert_eq!(events, [json!("ticket.created"), json!("ticket.status")]);
}
