//! The offline Stripe simulator and the local system's one clock: calendar renewals,
//! cancellation, pause, failed payments with retries, proration and interval switches,
//! invoice pages and PDFs, and every payload typed as Stripe's own objects.

use axum::http::Method;
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tally_local::simulator::{FINALIZE_AFTER_SECS, RETRY_DAYS, ScheduleHook, SimEvent};
use tally_tests::{TestApp, owner};

fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// Subscribes `ws` through checkout and the simulated Pay button; returns the Stripe
/// subscription and customer ids.
async fn subscribe(app: &TestApp, ws: &str, plan: &str, interval: &str) -> (String, String) {
    let sub = app.subscribe(ws, plan, interval).await;
    let customer = app.get("/v1/subscription", &owner(ws)).await.body["customer"]
        .as_str()
        .unwrap()
        .to_owned();
    (sub, customer)
}

async fn advance(app: &TestApp, body: Value) -> tally_tests::Answer {
    app.dashboard("/sim/clock/advance", body).await
}

async fn advance_days(app: &TestApp, days: i64) {
    let a = advance(app, json!({"days": days})).await;
    assert_eq!(a.status.as_u16(), 200, "{:#}", a.body);
}

fn events(app: &TestApp) -> Vec<SimEvent> {
    app.local.simulator.as_ref().unwrap().events()
}

fn object(e: &SimEvent) -> &Value {
    &e.payload["data"]["object"]
}

/// Events about one subscription (its own events and its invoices'), in delivery order.
fn of_subscription<'a>(all: &'a [SimEvent], sub: &str) -> Vec<&'a SimEvent> {
    all.iter()
        .filter(|e| {
            let o = object(e);
            o["id"] == sub || o["parent"]["subscription_details"]["subscription"] == sub
        })
        .collect()
}

fn kinds(events: &[&SimEvent]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

/// Paid renewal invoices of a subscription: (paid at, line period).
fn renewals(all: &[SimEvent], sub: &str) -> Vec<(i64, (i64, i64))> {
    of_subscription(all, sub)
        .into_iter()
        .filter(|e| e.kind == "invoice.paid" && object(e)["billing_reason"] == "subscription_cycle")
        .map(|e| {
            let p = &object(e)["lines"]["data"][0]["period"];
            (
                e.created,
                (p["start"].as_i64().unwrap(), p["end"].as_i64().unwrap()),
            )
        })
        .collect()
}

async fn available(app: &TestApp, ws: &str) -> u64 {
    app.get("/v1/balance", &owner(ws)).await.body["available"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn monthly_renewals_follow_the_calendar_from_jan_31_through_a_leap_february() {
    let app = TestApp::new();
    app.clock.set(utc(2028, 1, 31, 10));
    let (sub, _) = subscribe(&app, "org_cal", "max", "monthly").await;
    assert_eq!(available(&app, "org_cal").await, 400);
    advance(&app, json!({"until": "2028-02-29T11:00:00Z"})).await;
    // The first renewal's allowance arrives; the first month's credits still roll over.
    assert_eq!(available(&app, "org_cal").await, 800);
    advance(&app, json!({"until": "2028-04-30T11:00:00Z"})).await;
    let r = renewals(&events(&app), &sub);
    let (feb29, mar31, apr30) = (
        ts(utc(2028, 2, 29, 10)),
        ts(utc(2028, 3, 31, 10)),
        ts(utc(2028, 4, 30, 10)),
    );
    // Each charged an hour after its period began, as Stripe finalizes a renewal's draft.
    let h = FINALIZE_AFTER_SECS;
    assert_eq!(
        r,
        vec![
            (feb29 + h, (feb29, mar31)),
            (mar31 + h, (mar31, apr30)),
            (apr30 + h, (apr30, ts(utc(2028, 5, 31, 10)))),
        ]
    );
    let all = events(&app);
    let updated = of_subscription(&all, &sub)
        .into_iter()
        .rfind(|e| e.kind == "customer.subscription.updated")
        .unwrap();
    let item = &object(updated)["items"]["data"][0];
    assert_eq!(item["current_period_start"], apr30);
    assert_eq!(
        object(updated)["billing_cycle_anchor"],
        ts(utc(2028, 1, 31, 10))
    );
    let plan = app.get("/v1/entitlements", &owner("org_cal")).await.body["plan"].clone();
    assert_eq!(plan["period_end"], "2028-05-31T10:00:00Z");
    assert!(app.local.billing_queue.dead_letters().is_empty());
}

#[tokio::test]
async fn yearly_plans_renew_on_their_anniversary_and_feb_29_falls_to_feb_28() {
    let app = TestApp::new();
    app.clock.set(utc(2028, 2, 29, 8));
    let (sub, _) = subscribe(&app, "org_yr", "max", "yearly").await;
    advance(&app, json!({"until": "2030-03-01T00:00:00Z"})).await;
    let (y1, y2) = (ts(utc(2029, 2, 28, 8)), ts(utc(2030, 2, 28, 8)));
    let h = FINALIZE_AFTER_SECS;
    assert_eq!(
        renewals(&events(&app), &sub),
        vec![(y1 + h, (y1, y2)), (y2 + h, (y2, ts(utc(2031, 2, 28, 8))))]
    );
    let all = events(&app);
    let first = of_subscription(&all, &sub)
        .into_iter()
        .find(|e| e.kind == "invoice.paid")
        .unwrap();
    assert_eq!(
        object(first)["lines"]["data"][0]["period"]["end"],
        json!(y1)
    );
}

#[tokio::test]
async fn a_cancel_at_period_end_ends_the_subscription_at_period_end_without_renewal() {
    let app = TestApp::new();
    let (sub, _) = subscribe(&app, "org_cx", "max", "monthly").await;
    let o = owner("org_cx");
    let c = app.post("/v1/subscription/cancel", &o, json!({})).await;
    assert_eq!(c.body["cancel_at_period_end"], true, "{:#}", c.body);
    app.settle_billing().await;
    advance_days(&app, 75).await;
    let all = events(&app);
    let mine = of_subscription(&all, &sub);
    assert!(renewals(&all, &sub).is_empty(), "no renewal invoice");
    let deleted: Vec<_> = mine
        .iter()
        .filter(|e| e.kind == "customer.subscription.deleted")
        .collect();
    assert_eq!(deleted.len(), 1);
    let period_end = ts(utc(2026, 12, 1, 12));
    assert_eq!(deleted[0].created, period_end);
    assert_eq!(object(deleted[0])["status"], "canceled");
    assert_eq!(object(deleted[0])["ended_at"], period_end);
    assert_eq!(
        kinds(&mine).last().unwrap(),
        "customer.subscription.deleted"
    );
    let plan = app.get("/v1/entitlements", &o).await.body["plan"].clone();
    assert_eq!(plan["status"], "canceled", "{plan:#}");
    assert_eq!(
        available(&app, "org_cx").await,
        0,
        "the one paid month has lapsed"
    );
}

#[tokio::test]
async fn paused_collection_voids_the_renewal_invoice_and_charges_nothing() {
    let app = TestApp::new();
    let (sub, _) = subscribe(&app, "org_pz", "max", "monthly").await;
    let o = owner("org_pz");
    let p = app.post("/v1/subscription/pause", &o, json!({})).await;
    assert_eq!(p.status.as_u16(), 200, "{:#}", p.body);
    app.settle_billing().await;
    let before = events(&app).len();
    advance_days(&app, 31).await;
    let all = events(&app);
    let later: Vec<&SimEvent> = all[before..].iter().collect();
    assert_eq!(
        kinds(&later),
        vec![
            "customer.subscription.updated",
            "invoice.created",
            "invoice.voided"
        ]
    );
    let sub_obj = object(later[0]);
    assert_eq!(sub_obj["id"], sub);
    assert_eq!(
        sub_obj["status"], "active",
        "Stripe keeps a paused subscription active"
    );
    assert_eq!(sub_obj["pause_collection"]["behavior"], "void");
    assert_eq!(
        sub_obj["items"]["data"][0]["current_period_start"],
        ts(utc(2026, 12, 1, 12))
    );
    let voided = object(later[2]);
    assert_eq!(voided["status"], "void");
    assert_eq!(voided["amount_paid"], 0);
    assert_eq!(voided["billing_reason"], "subscription_cycle");
    let plan = app.get("/v1/entitlements", &o).await.body["plan"].clone();
    assert_eq!(plan["status"], "paused");
    assert_eq!(
        available(&app, "org_pz").await,
        400,
        "no credits for a voided invoice"
    );
}

#[tokio::test]
async fn a_declining_card_fails_the_renewal_retries_on_schedule_then_cancels() {
    let app = TestApp::new();
    let (sub, customer) = subscribe(&app, "org_dc", "max", "monthly").await;
    let card = app
        .send(
            Method::POST,
            &format!("/sim/customers/{customer}/card"),
            None,
            Some(&json!({"declines": true}).to_string()),
            &[],
        )
        .await;
    assert_eq!(card.status.as_u16(), 200, "{:#}", card.body);
    app.send(
        Method::POST,
        "/sim/customers/cus_nobody/card",
        None,
        Some(&json!({"declines": true}).to_string()),
        &[],
    )
    .await
    .assert_problem(404, "not_found");
    // The renewal's draft is made at the period end, charged an hour later.
    let renewal = utc(2026, 12, 1, 13);
    advance(&app, json!({"until": "2026-12-01T13:00:00Z"})).await;
    let plan = app.get("/v1/entitlements", &owner("org_dc")).await.body["plan"].clone();
    assert_eq!(plan["status"], "past_due", "{plan:#}");
    advance_days(&app, 30).await;
    let all = events(&app);
    let mine = of_subscription(&all, &sub);
    let failed: Vec<i64> = mine
        .iter()
        .filter(|e| e.kind == "invoice.payment_failed")
        .map(|e| e.created)
        .collect();
    let mut expected = vec![ts(renewal)];
    expected.extend(RETRY_DAYS.iter().map(|d| ts(renewal + Duration::days(*d))));
    assert_eq!(failed, expected);
    let past_due = mine
        .iter()
        .find(|e| e.kind == "customer.subscription.updated" && e.created == ts(renewal))
        .unwrap();
    assert_eq!(object(past_due)["status"], "past_due");
    let deleted = mine
        .iter()
        .find(|e| e.kind == "customer.subscription.deleted")
        .unwrap();
    assert_eq!(deleted.created, *expected.last().unwrap());
    assert!(
        !mine
            .iter()
            .any(|e| e.kind == "invoice.paid" && e.created > ts(renewal) - 1),
        "nothing was paid"
    );
    assert!(renewals(&all, &sub).is_empty());
    let plan = app.get("/v1/entitlements", &owner("org_dc")).await.body["plan"].clone();
    assert_eq!(plan["status"], "canceled");
}

#[tokio::test]
async fn a_retry_that_succeeds_pays_the_invoice_and_reactivates_the_subscription() {
    let app = TestApp::new();
    let (sub, customer) = subscribe(&app, "org_rt", "max", "monthly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    assert!(sim.set_card_declines(&customer, true));
    advance_days(&app, 31).await;
    assert!(sim.set_card_declines(&customer, false));
    advance_days(&app, 3).await;
    let all = events(&app);
    let mine = of_subscription(&all, &sub);
    let paid = mine
        .iter()
        .find(|e| e.kind == "invoice.paid" && object(e)["billing_reason"] == "subscription_cycle")
        .unwrap();
    assert_eq!(paid.created, ts(utc(2026, 12, 4, 13)));
    assert_eq!(object(paid)["attempt_count"], 2);
    let last = mine
        .iter()
        .rfind(|e| e.kind == "customer.subscription.updated")
        .unwrap();
    assert_eq!(object(last)["status"], "active");
    let plan = app.get("/v1/entitlements", &owner("org_rt")).await.body["plan"].clone();
    assert_eq!(plan["status"], "active");
}

/// (description, amount, proration, period) of an invoice's lines.
fn lines(inv: &Value) -> Vec<(String, i64, bool, (i64, i64))> {
    inv["lines"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["amount"].as_i64().unwrap(),
                l["parent"]["subscription_item_details"]["proration"]
                    .as_bool()
                    .unwrap(),
                (
                    l["period"]["start"].as_i64().unwrap(),
                    l["period"]["end"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

fn prorated(cents: i64, remaining: i64, length: i64) -> i64 {
    ((2 * cents as i128 * remaining as i128 + length as i128) / (2 * length as i128)) as i64
}

#[tokio::test]
async fn an_upgrade_invoices_stripes_proration_lines_and_a_declined_card_refuses_it() {
    let app = TestApp::new();
    let (sub, customer) = subscribe(&app, "org_up", "max", "monthly").await;
    advance_days(&app, 10).await;
    let sim = app.local.simulator.as_ref().unwrap();
    assert!(sim.set_card_declines(&customer, true));
    let o = owner("org_up");
    let before = events(&app).len();
    let refused = app
        .post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "generative", "interval": "monthly"}),
        )
        .await;
    assert_ne!(refused.status.as_u16(), 200, "{:#}", refused.body);
    assert_eq!(
        events(&app).len(),
        before,
        "a refused update changes nothing"
    );
    assert!(sim.set_card_declines(&customer, false));
    let r = app
        .post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "generative", "interval": "monthly"}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    app.settle_billing().await;
    let all = events(&app);
    let paid = of_subscription(&all, &sub)
        .into_iter()
        .find(|e| e.kind == "invoice.paid" && object(e)["billing_reason"] == "subscription_update")
        .unwrap();
    let inv = object(paid);
    let (now, end) = (ts(utc(2026, 11, 11, 12)), ts(utc(2026, 12, 1, 12)));
    let (remaining, length) = (end - now, end - ts(utc(2026, 11, 1, 12)));
    let got = lines(inv);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got[0].0.starts_with("Unused time on Max plan after"),
        "{}",
        got[0].0
    );
    assert_eq!(got[0].1, -prorated(2900, remaining, length));
    assert!(
        got[1]
            .0
            .starts_with("Remaining time on 1 × Generative plan after")
    );
    assert_eq!(got[1].1, prorated(5900, remaining, length));
    assert!(got.iter().all(|l| l.2 && l.3 == (now, end)));
    let total = got[0].1 + got[1].1;
    assert_eq!(inv["total"], total);
    assert_eq!(inv["subtotal"], total);
    assert_eq!(inv["amount_due"], total);
    assert_eq!(inv["amount_paid"], total);
    assert_eq!(inv["status"], "paid");
    let l = &inv["lines"]["data"][1];
    assert_eq!(l["pricing"]["type"], "price_details");
    assert_eq!(
        l["pricing"]["price_details"]["product"],
        "tally_plan_generative"
    );
    assert!(
        l["pricing"]["price_details"]["price"]
            .as_str()
            .unwrap()
            .starts_with("price_sim")
    );
    assert_eq!(l["parent"]["type"], "subscription_item_details");
    assert_eq!(
        l["parent"]["subscription_item_details"]["subscription"],
        sub
    );
    assert_eq!(l["quantity"], 1);
}

#[tokio::test]
async fn an_interval_switch_resets_the_billing_anchor_with_one_correct_invoice() {
    let app = TestApp::new();
    let (sub, _) = subscribe(&app, "org_iv", "max", "monthly").await;
    advance_days(&app, 10).await;
    let before = events(&app).len();
    let r = app
        .post(
            "/v1/subscription/change",
            &owner("org_iv"),
            json!({"plan": "max", "interval": "yearly"}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    app.settle_billing().await;
    let all = events(&app);
    let later: Vec<&SimEvent> = of_subscription(&all[before..], &sub);
    let invoices: Vec<&&SimEvent> = later.iter().filter(|e| e.kind == "invoice.paid").collect();
    assert_eq!(invoices.len(), 1, "one invoice");
    let inv = object(invoices[0]);
    assert_eq!(inv["billing_reason"], "subscription_update");
    let now = ts(utc(2026, 11, 11, 12));
    let old_end = ts(utc(2026, 12, 1, 12));
    let new_end = ts(utc(2027, 11, 11, 12));
    let got = lines(inv);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(
        (got[0].1, got[0].2, got[0].3),
        (
            -prorated(2900, old_end - now, old_end - ts(utc(2026, 11, 1, 12))),
            true,
            (now, old_end)
        )
    );
    assert!(got[1].0.contains("/ year"), "{}", got[1].0);
    assert_eq!((got[1].2, got[1].3), (false, (now, new_end)));
    assert!(got[1].1 > 0);
    assert_eq!(inv["total"], got[0].1 + got[1].1);
    let updated = later
        .iter()
        .find(|e| e.kind == "customer.subscription.updated")
        .unwrap();
    let s = object(updated);
    assert_eq!(s["billing_cycle_anchor"], now);
    assert_eq!(s["items"]["data"][0]["current_period_end"], new_end);
    assert_eq!(
        s["items"]["data"][0]["price"]["recurring"]["interval"],
        "year"
    );
    // The next renewal is a year after the switch, not at the old monthly date.
    advance_days(&app, 60).await;
    assert!(renewals(&events(&app), &sub).is_empty());
}

#[tokio::test]
async fn subscription_invoice_links_resolve_to_a_page_and_a_pdf() {
    let app = TestApp::new();
    subscribe(&app, "org_ln", "max", "monthly").await;
    advance_days(&app, 31).await;
    let invoices = app.get("/v1/invoices", &owner("org_ln")).await.body["items"].clone();
    let invoices = invoices.as_array().unwrap();
    assert_eq!(invoices.len(), 2, "{invoices:#?}");
    for inv in invoices {
        let page = inv["hosted_invoice_url"]
            .as_str()
            .unwrap()
            .strip_prefix("http://tally.test")
            .unwrap()
            .to_owned();
        let html = app.send(Method::GET, &page, None, None, &[]).await;
        assert_eq!(html.status.as_u16(), 200);
        assert!(html.content_type.starts_with("text/html"));
        let text = html.body.as_str().unwrap();
        assert!(text.contains("1 × Max plan (at $29.00 / month)"), "{text}");
        assert!(text.contains("<td id=\"total\">$29.00</td>"), "{text}");
        assert!(text.contains("<td id=\"tax\">$0.00</td>"), "{text}");
        assert!(text.contains("<td id=\"status\">paid</td>"), "{text}");
        let pdf_path = inv["invoice_pdf"]
            .as_str()
            .unwrap()
            .strip_prefix("http://tally.test")
            .unwrap()
            .to_owned();
        let pdf = app.send(Method::GET, &pdf_path, None, None, &[]).await;
        assert_eq!(pdf.status.as_u16(), 200);
        assert_eq!(pdf.content_type, "application/pdf");
        let body = pdf.body.as_str().unwrap();
        assert!(body.starts_with("%PDF-1.4"));
        assert!(
            body.contains("(1 x Max plan (at $29.00 / month)") || body.contains("1 x Max plan")
        );
        assert!(body.contains("Total: $29.00"));
        assert!(body.trim_end().ends_with("%%EOF"));
    }
    let missing = app
        .send(Method::GET, "/sim/invoices/in_nope.pdf", None, None, &[])
        .await;
    assert_eq!(missing.status.as_u16(), 404);
}

/// Records every time Tally's schedule is run.
#[derive(Default)]
struct Recorder(Mutex<Vec<DateTime<Utc>>>);

#[async_trait::async_trait]
impl ScheduleHook for Recorder {
    async fn run(&self, now: DateTime<Utc>) {
        self.0.lock().unwrap().push(now);
    }
}

#[tokio::test]
async fn the_clock_never_goes_backwards_and_plays_subscriptions_in_time_order() {
    let app = TestApp::new();
    let recorder = Arc::new(Recorder::default());
    let sim = app.local.simulator.as_ref().unwrap();
    sim.set_schedule(recorder.clone());
    let (a, _) = subscribe(&app, "org_ta", "plus", "monthly").await;
    advance_days(&app, 10).await;
    let (b, _) = subscribe(&app, "org_tb", "plus", "monthly").await;
    for (bad, status) in [
        (json!({"until": "2026-11-01T00:00:00Z"}), 422),
        (json!({"days": -1}), 422),
        (json!({"hours": -3}), 422),
        (json!({}), 422),
        (json!({"days": 1, "hours": 2}), 422),
        (json!({"weeks": 1}), 422),
        (json!({"until": "yesterday"}), 422),
    ] {
        let r = advance(&app, bad.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{bad}: {:#}", r.body);
        assert_eq!(r.content_type, "application/problem+json");
    }
    let malformed = app
        .send(Method::POST, "/sim/clock/advance", None, Some("{days"), &[])
        .await;
    malformed.assert_problem(400, "malformed_request");
    let clock = app.send(Method::GET, "/sim/clock", None, None, &[]).await;
    assert_eq!(clock.body["now"], "2026-11-11T12:00:00Z");
    assert_eq!(clock.body["offset"], 10 * 86_400);
    let before = events(&app).len();
    let runs_before = recorder.0.lock().unwrap().len();
    let moved = advance(&app, json!({"hours": 24 * 50})).await;
    assert_eq!(moved.body["now"], "2026-12-31T12:00:00Z");
    assert_eq!(app.ledger.clock.now(), utc(2026, 12, 31, 12), "one clock");
    let all = events(&app);
    let later = &all[before..];
    assert!(later.windows(2).all(|w| w[0].created <= w[1].created));
    let order: Vec<(String, i64)> = later
        .iter()
        .filter(|e| e.kind == "invoice.paid")
        .map(|e| {
            let s = object(e)["parent"]["subscription_details"]["subscription"]
                .as_str()
                .unwrap();
            (
                if s == a {
                    "a"
                } else if s == b {
                    "b"
                } else {
                    "?"
                }
                .to_owned(),
                e.created,
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ("a".to_owned(), ts(utc(2026, 12, 1, 13))),
            ("b".to_owned(), ts(utc(2026, 12, 11, 13))),
        ]
    );
    let runs = recorder.0.lock().unwrap()[runs_before..].to_vec();
    assert!(
        runs.len() >= 50,
        "at least once a simulated day: {}",
        runs.len()
    );
    assert!(
        runs.windows(2)
            .all(|w| w[0] <= w[1] && w[1] - w[0] <= Duration::days(1))
    );
    assert_eq!(*runs.last().unwrap(), utc(2026, 12, 31, 12));
    // Renewing by hand is advancing to the renewal's charge, an hour after the period end.
    let renewed = app
        .send(
            Method::POST,
            &format!("/sim/subscriptions/{b}/renew"),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(renewed.status.as_u16(), 200, "{:#}", renewed.body);
    assert_eq!(renewed.body["clock"]["now"], "2027-01-11T13:00:00Z");
}

/// Every payload the simulator delivered, read as async-stripe's type for its object.
fn assert_typed(events: &[SimEvent]) {
    for e in events {
        let text = object(e).to_string();
        let kind = e.kind.as_str();
        let parsed = if kind.starts_with("charge.dispute.") {
            miniserde::json::from_str::<stripe_shared::Dispute>(&text).map(|_| ())
        } else if kind.starts_with("refund.") {
            miniserde::json::from_str::<stripe_shared::Refund>(&text).map(|_| ())
        } else if kind.starts_with("invoice_payment.") {
            miniserde::json::from_str::<stripe_shared::InvoicePayment>(&text).map(|_| ())
        } else if kind.starts_with("customer.subscription.") {
            miniserde::json::from_str::<stripe_shared::Subscription>(&text).map(|_| ())
        } else if kind.starts_with("invoice.") {
            miniserde::json::from_str::<stripe_shared::Invoice>(&text).map(|_| ())
        } else if kind.starts_with("charge.") {
            miniserde::json::from_str::<stripe_shared::Charge>(&text).map(|_| ())
        } else if kind.starts_with("payment_intent.") {
            miniserde::json::from_str::<stripe_shared::PaymentIntent>(&text).map(|_| ())
        } else if kind.starts_with("checkout.session.") {
            miniserde::json::from_str::<stripe_shared::CheckoutSession>(&text).map(|_| ())
        } else {
            panic!("no type checked for {kind}");
        };
        assert!(
            parsed.is_ok(),
            "{kind} {} is not a Stripe object: {text}",
            e.id
        );
    }
}

#[tokio::test]
async fn every_payload_of_a_full_lifecycle_is_a_stripe_object() {
    let app = TestApp::new();
    let ws = "org_lc";
    let o = owner(ws);
    let (_, customer) = subscribe(&app, ws, "plus", "monthly").await;
    advance_days(&app, 3).await;
    let put_units = |units: u64| {
        let app = &app;
        let o = o.clone();
        async move {
            let r = app
                .send(
                    Method::PUT,
                    "/v1/subscription/addons",
                    Some(&o),
                    Some(&json!({"units": units}).to_string()),
                    &[],
                )
                .await;
            assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
            app.settle_billing().await;
        }
    };
    let change = |plan: &'static str, interval: &'static str| {
        let app = &app;
        let o = o.clone();
        async move {
            let r = app
                .post(
                    "/v1/subscription/change",
                    &o,
                    json!({"plan": plan, "interval": interval}),
                )
                .await;
            assert_eq!(r.status.as_u16(), 200, "{plan} {interval}: {:#}", r.body);
            app.settle_billing().await;
        }
    };
    change("max", "monthly").await;
    put_units(2).await;
    advance_days(&app, 40).await;
    change("max", "yearly").await;
    for path in ["cancel", "resume", "pause", "resume"] {
        let r = app
            .post(&format!("/v1/subscription/{path}"), &o, json!({}))
            .await;
        assert_eq!(r.status.as_u16(), 200, "{path}: {:#}", r.body);
        app.settle_billing().await;
    }
    let sim = app.local.simulator.as_ref().unwrap();
    // A pack bought at checkout and an off-session top-up with the saved card.
    let path = app.open_pack_checkout(ws, "pack_100").await;
    pay_checkout(&app, &path).await;
    use tally::payments::Payments;
    sim.charge_saved_method(&tally::payments::TopUp {
        workspace: tally_tests::workspace(ws),
        customer: customer.parse().unwrap(),
        payment_method: saved_card(&app, ws).await.parse().unwrap(),
        pack: "pack_100".into(),
        credits: tally::money::Credits::new(100),
        amount: tally::money::Cents::new(900),
        idempotency_key: "topup-lifecycle".into(),
    })
    .await
    .unwrap();
    app.settle_billing().await;
    // Money going back: a renewal refunded in part, the top-up's charge disputed and lost.
    let charges: Vec<String> = events(&app)
        .iter()
        .filter(|e| e.kind == "charge.succeeded")
        .map(|e| object(e)["id"].as_str().unwrap().to_owned())
        .collect();
    sim.refund_charge(&charges[1], Some(100)).await.unwrap();
    let dispute = sim.dispute_charge(charges.last().unwrap()).await.unwrap();
    sim.close_dispute(dispute["id"].as_str().unwrap(), false)
        .await
        .unwrap();
    app.settle_billing().await;
    assert!(sim.set_card_declines(&customer, true));
    advance_days(&app, 380).await;
    let all = events(&app);
    let seen: std::collections::BTreeSet<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    for k in [
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_failed",
        "charge.succeeded",
        "charge.failed",
        "payment_intent.succeeded",
        "invoice_payment.paid",
        "charge.refunded",
        "refund.created",
        "charge.dispute.created",
        "charge.dispute.closed",
    ] {
        assert!(seen.contains(k), "{k} not seen in {seen:?}");
    }
    assert!(all.iter().all(|e| e.delivered_status == 200));
    assert_typed(&all);
    // The check can fail: a payload Stripe would not send is refused.
    let mut broken = all
        .iter()
        .find(|e| e.kind == "invoice.paid")
        .unwrap()
        .clone();
    broken.payload["data"]["object"]["created"] = json!("yesterday");
    assert!(std::panic::catch_unwind(|| assert_typed(&[broken])).is_err());
    assert!(app.local.billing_queue.dead_letters().is_empty());
}

#[tokio::test]
async fn changes_at_renewal_invoice_nothing_now_and_bill_the_new_items_at_renewal() {
    let app = TestApp::new();
    let (sub, _) = subscribe(&app, "org_np", "generative", "monthly").await;
    let o = owner("org_np");
    let units = |n: u64| {
        let app = &app;
        let o = o.clone();
        async move {
            let r = app
                .send(
                    Method::PUT,
                    "/v1/subscription/addons",
                    Some(&o),
                    Some(&json!({"units": n}).to_string()),
                    &[],
                )
                .await;
            assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
            app.settle_billing().await;
            r.body
        }
    };
    units(2).await;
    let with_units = of_subscription(&events(&app), &sub)
        .into_iter()
        .rfind(|e| e.kind == "invoice.paid")
        .map(|e| object(e).clone())
        .unwrap();
    assert_eq!(with_units["billing_reason"], "subscription_update");
    let added = lines(&with_units);
    assert_eq!(added.len(), 1, "a new item has no unused time: {added:#?}");
    assert!(
        added[0].0.starts_with("Remaining time on 2 × "),
        "{}",
        added[0].0
    );
    assert_eq!(
        added[0].1,
        2 * 1000,
        "added at the very start of the period"
    );
    let before = events(&app).len();
    let down = app
        .post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "plus", "interval": "monthly"}),
        )
        .await;
    assert_eq!(down.body["effective"], "at_renewal", "{:#}", down.body);
    app.settle_billing().await;
    assert_eq!(units(0).await["effective"], "at_renewal");
    let now: Vec<String> = events(&app)[before..]
        .iter()
        .map(|e| e.kind.clone())
        .collect();
    assert!(
        now.iter().all(|k| k == "customer.subscription.updated"),
        "no invoice without proration: {now:?}"
    );
    let updated = events(&app).last().cloned().unwrap();
    let items = object(&updated)["items"]["data"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        items.len(),
        2,
        "today's items stay billed until the renewal"
    );
    assert!(
        object(&updated)["schedule"].is_string(),
        "a schedule holds the change"
    );
    advance(&app, json!({"until": "2026-12-01T13:00:00Z"})).await;
    let renewal = of_subscription(&events(&app), &sub)
        .into_iter()
        .find(|e| e.kind == "invoice.paid" && object(e)["billing_reason"] == "subscription_cycle")
        .map(|e| object(e).clone())
        .unwrap();
    let got = lines(&renewal);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1, got[0].2),
        ("1 × Plus plan (at $12.00 / month)", 1200, false)
    );
    assert_eq!(renewal["amount_paid"], 1200);
}

#[tokio::test]
async fn a_switch_to_a_shorter_interval_credits_the_unused_year_and_bills_the_new_month() {
    let app = TestApp::new();
    let (sub, _) = subscribe(&app, "org_ym", "max", "yearly").await;
    advance_days(&app, 10).await;
    let before = events(&app).len();
    // Through the API this waits for the renewal; made directly (as the portal or the
    // dashboard may), Stripe switches at once.
    use tally::payments::{ItemPrice, Payments, SubscriptionChange};
    let sim = app.local.simulator.as_ref().unwrap();
    let change = SubscriptionChange {
        plan: Some(ItemPrice {
            product: "tally_plan_max".into(),
            product_name: "Max plan".into(),
            unit_amount: tally::money::Cents::new(2900),
            interval: tally::ledger::Interval::Monthly,
        }),
        prorate_now: true,
        idempotency_key: "switch".into(),
        ..SubscriptionChange::to(sub.parse().unwrap())
    };
    sim.update_subscription(&change).await.unwrap();
    app.settle_billing().await;
    let all = events(&app);
    let later = of_subscription(&all[before..], &sub);
    let paid: Vec<_> = later.iter().filter(|e| e.kind == "invoice.paid").collect();
    assert_eq!(paid.len(), 1, "{:?}", kinds(&later));
    let now = ts(utc(2026, 11, 11, 12));
    let (start, year_end) = (ts(utc(2026, 11, 1, 12)), ts(utc(2027, 11, 1, 12)));
    let inv = object(paid[0]);
    let got = lines(inv);
    let yearly = 12 * 2900 * 60 / 100; // Max yearly: twelve months less 40%
    let credit = -prorated(yearly, year_end - now, year_end - start);
    assert!(got[0].0.starts_with("Unused time on Max plan after"));
    assert_eq!(
        got.iter().map(|l| (l.1, l.2, l.3)).collect::<Vec<_>>(),
        vec![
            (credit, true, (now, year_end)),
            (2900, false, (now, ts(utc(2026, 12, 11, 12))))
        ],
        "Stripe resets the anchor, credits the unused year and bills the new month"
    );
    // The credit exceeds the charge: it goes to the customer's balance, nothing is charged.
    assert_eq!(inv["total"], credit + 2900);
    assert!(credit + 2900 < 0);
    assert_eq!(
        (inv["amount_due"].as_i64(), inv["amount_paid"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(!later.iter().any(|e| e.kind == "charge.succeeded"));
    let s = object(
        later
            .iter()
            .find(|e| e.kind == "customer.subscription.updated")
            .unwrap(),
    );
    assert_eq!(s["billing_cycle_anchor"], now);
    assert_eq!(
        s["items"]["data"][0]["price"]["recurring"]["interval"],
        "month"
    );
    // The same key again: the first answer, nothing done twice; with other parameters,
    // refused as Stripe refuses it.
    let count = events(&app).len();
    sim.update_subscription(&change).await.unwrap();
    assert_eq!(events(&app).len(), count);
    let other = SubscriptionChange {
        prorate_now: false,
        ..change
    };
    assert!(matches!(
        sim.update_subscription(&other).await,
        Err(tally::payments::PaymentsError::Refused { message, .. })
            if message.contains("same parameters")
    ));
}

/// The local system's parts hold one another (the ledger's observer pays through the
/// simulator, whose schedule runs the ledger; the support worker sends to its own queue):
/// dropping it must still free them, or every test's system stays in memory to the end.
#[tokio::test]
async fn a_dropped_local_system_frees_its_store() {
    let store = Arc::new(tally::store::embedded::EmbeddedStore::in_memory());
    {
        let app = TestApp::over(store.clone(), false);
        app.subscribe("org_drop", "max", "monthly").await;
        let ticket = app
            .post(
                "/v1/support/tickets",
                &owner("org_drop"),
                json!({"category": "credits", "subject": "Balance", "message": "Is it right?"}),
            )
            .await;
        assert_eq!(ticket.status.as_u16(), 201, "{:#}", ticket.body);
        app.local.support_queue.until_idle().await;
        assert!(
            Arc::strong_count(&store) > 1,
            "the running system uses the store"
        );
    }
    // The delivery tasks end on their own once their queues are closed.
    let freed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while Arc::strong_count(&store) > 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        freed.is_ok(),
        "{} holders of the store remain",
        Arc::strong_count(&store) - 1
    );
}

/// As Stripe does, the simulator answers a repeated idempotency key with the customer it
/// made, and refuses the key for other parameters.
#[tokio::test]
async fn a_customer_is_made_once_per_idempotency_key() {
    use tally::payments::Payments;
    let app = TestApp::new();
    let sim = app.local.simulator.as_ref().unwrap();
    let ws = tally_tests::workspace("org_cus");
    let first = sim
        .create_customer(&ws, Some("a@example.com"), "tally-customer-org_cus")
        .await
        .unwrap();
    let again = sim
        .create_customer(&ws, Some("a@example.com"), "tally-customer-org_cus")
        .await
        .unwrap();
    assert_eq!(first, again);
    assert!(matches!(
        sim.create_customer(&ws, Some("b@example.com"), "tally-customer-org_cus")
            .await,
        Err(tally::payments::PaymentsError::Refused { .. })
    ));
    let other = sim
        .create_customer(&ws, Some("b@example.com"), "tally-customer-other")
        .await
        .unwrap();
    assert_ne!(other, first);
}

async fn pay_checkout(app: &TestApp, path: &str) -> tally_tests::Answer {
    app.send(
        Method::POST,
        &format!("{path}/pay"),
        None,
        Some(""),
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await
}

/// As with Stripe's default, a checkout session not paid within 24 hours expires: paying
/// it then does nothing and grants nothing. One paid in time is paid.
#[tokio::test]
async fn a_checkout_session_expires_unpaid_after_a_day() {
    let app = TestApp::new();
    let late = app.open_pack_checkout("org_late", "pack_100").await;
    let a = advance(&app, json!({"hours": 25})).await;
    assert_eq!(a.status.as_u16(), 200, "{:#}", a.body);
    assert_eq!(pay_checkout(&app, &late).await.status.as_u16(), 410);
    app.settle_billing().await;
    assert_eq!(
        app.available("org_late").await,
        0,
        "nothing paid, nothing granted"
    );
    let in_time = app.open_pack_checkout("org_late", "pack_100").await;
    advance(&app, json!({"hours": 23})).await;
    let paid = pay_checkout(&app, &in_time).await;
    assert!(paid.status.is_redirection(), "{:#}", paid.body);
    app.settle_billing().await;
    assert_eq!(app.available("org_late").await, 100);
}

/// A change made in the dashboard without invoicing it (`create_prorations`) leaves its
/// proration lines for the subscription's next invoice: a change billed at once bills them
/// after its own (newest first), and otherwise the renewal bills them after the new
/// period; a subscription set to cancel refuses it here.
#[tokio::test]
async fn prorations_left_for_the_next_invoice_are_billed_by_it() {
    use tally::ledger::Interval;
    use tally::payments::{ItemPrice, SubscriptionChange};
    let app = TestApp::new();
    let ws = "org_pending";
    let (sub, _) = subscribe(&app, ws, "max", "monthly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    let catalog = app.ledger.catalog.clone();
    let dashboard = |plan: &str| {
        let p = catalog.plan(plan).unwrap();
        SubscriptionChange {
            plan: Some(ItemPrice {
                product: tally::payments::stripe_api::product_id("plan", plan),
                product_name: format!("{} plan", p.name),
                unit_amount: tally::subscriptions::change::plan_unit_price(
                    &catalog,
                    p,
                    Interval::Monthly,
                ),
                interval: Interval::Monthly,
            }),
            ..SubscriptionChange::to(sub.parse().unwrap())
        }
    };
    let invoices = |app: &TestApp| {
        events(app)
            .into_iter()
            .filter(|e| e.kind == "invoice.created" || e.kind == "invoice.paid")
            .count()
    };
    advance_days(&app, 10).await;
    let before = invoices(&app);
    sim.change_without_invoicing(&dashboard("generative"))
        .await
        .unwrap();
    app.settle_billing().await;
    assert_eq!(invoices(&app), before, "nothing invoiced now");
    let s = app.get("/v1/subscription", &owner(ws)).await.body["subscription"].clone();
    assert_eq!(s["plan"], "generative", "{s:#}");
    advance_days(&app, 5).await;
    let up = app.change_plan(ws, "team", "monthly").await;
    assert_eq!(up.status.as_u16(), 200, "{:#}", up.body);
    let (start, end) = (ts(utc(2026, 11, 1, 12)), ts(utc(2026, 12, 1, 12)));
    let (first, second) = (ts(utc(2026, 11, 11, 12)), ts(utc(2026, 11, 16, 12)));
    let all = events(&app);
    let change = of_subscription(&all, &sub)
        .into_iter()
        .rfind(|e| e.kind == "invoice.paid" && object(e)["billing_reason"] == "subscription_update")
        .unwrap();
    let got = lines(object(change));
    let described: Vec<(&str, (i64, i64))> = got
        .iter()
        .map(|l| (l.0.split(" after").next().unwrap(), l.3))
        .collect();
    assert_eq!(
        described,
        vec![
            ("Unused time on Generative plan", (second, end)),
            ("Remaining time on 1 × Team plan", (second, end)),
            ("Unused time on Max plan", (first, end)),
            ("Remaining time on 1 × Generative plan", (first, end)),
        ]
    );
    assert_eq!(got[2].1, -prorated(2900, end - first, end - start));
    assert_eq!(got[3].1, prorated(5900, end - first, end - start));
    assert_eq!(
        object(change)["total"],
        got.iter().map(|l| l.1).sum::<i64>()
    );
    // Left for the renewal instead: billed after the new period's line.
    advance_days(&app, 5).await;
    sim.change_without_invoicing(&dashboard("plus"))
        .await
        .unwrap();
    app.settle_billing().await;
    advance(&app, json!({"until": "2026-12-01T12:00:00Z"})).await;
    let all = events(&app);
    let renewal = of_subscription(&all, &sub)
        .into_iter()
        .rfind(|e| {
            e.kind == "invoice.created" && object(e)["billing_reason"] == "subscription_cycle"
        })
        .unwrap();
    let got = lines(object(renewal));
    let third = ts(utc(2026, 11, 21, 12));
    let described: Vec<(&str, bool, (i64, i64))> = got
        .iter()
        .map(|l| (l.0.split(" after").next().unwrap(), l.2, l.3))
        .collect();
    assert_eq!(
        described,
        vec![
            (
                "1 × Plus plan (at $12.00 / month)",
                false,
                (end, ts(utc(2027, 1, 1, 12)))
            ),
            ("Unused time on Team plan", true, (third, end)),
            ("Remaining time on 1 × Plus plan", true, (third, end)),
        ]
    );
    let cancel = app
        .post("/v1/subscription/cancel", &owner(ws), json!({}))
        .await;
    assert_eq!(cancel.status.as_u16(), 200, "{:#}", cancel.body);
    assert!(
        sim.change_without_invoicing(&dashboard("max"))
            .await
            .is_err()
    );
}

/// The card `ws` saved at checkout (what auto top-up charges).
async fn saved_card(app: &TestApp, ws: &str) -> String {
    let profile: tally::billing::records::BillingProfile = tally::store::docs::get(
        app.docs.as_ref(),
        &tally::billing::records::workspace_pk(&tally_tests::workspace(ws)),
        tally::billing::records::PROFILE_SK,
    )
    .await
    .unwrap()
    .unwrap();
    profile.payment_method.unwrap().to_string()
}
