//! Credits follow money back out: refunds take back what the refunded money bought and is
//! still unspent, disputes freeze it until they close, and a faulty generation's charge is
//! given back once. Every case runs through the simulated Stripe, signed events, the
//! webhook and the billing queue.

use axum::http::Method;
use serde_json::{Value, json};
use tally::clock::Clock;
use tally_tests::{TestApp, member, owner, service, support};

/// Buys `quantity` × pack_500 for `ws`; returns the charge id that paid.
/// What Stripe charged for `charge`, in cents.
fn paid_amount(app: &TestApp, charge: &str) -> i64 {
    let sim = app.local.simulator.as_ref().unwrap();
    sim.charge(charge).unwrap()["amount"].as_i64().unwrap()
}

async fn buy_packs(app: &TestApp, ws: &str, quantity: u32) -> String {
    app.pay(&app.pack_checkout(ws, quantity).await).await;
    let charges = app.sim_events("charge.succeeded");
    charges.last().unwrap()["id"].as_str().unwrap().to_owned()
}

/// Starts and completes a generation that costs `credits` (held at the estimate, charged
/// exactly); returns its id.
async fn spend(app: &TestApp, ws: &str, credits: u64) -> String {
    let g = app
        .post(
            "/v1/generations",
            &member(ws, "u1"),
            json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
        )
        .await;
    assert_eq!(g.status.as_u16(), 201, "{:#}", g.body);
    let id = g.body["id"].as_str().unwrap().to_owned();
    let done = app
        .post(
            &format!("/v1/generations/{id}/complete"),
            &service(),
            json!({"credits": credits}),
        )
        .await;
    assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
    id
}

async fn sim_post(app: &TestApp, path: &str, body: Option<Value>) -> tally_tests::Answer {
    let body = body.map(|b| b.to_string());
    let a = app
        .send(
            Method::POST,
            path,
            None,
            body.as_deref(),
            if body.is_some() {
                &[]
            } else {
                &[("content-length", "0")]
            },
        )
        .await;
    app.settle_billing().await;
    a
}

/// Closes a dispute in the simulated Stripe (`won` or `lost`; an inquiry closes as won).
async fn close_dispute(app: &TestApp, id: &str, outcome: &str) -> Value {
    let closed = sim_post(
        app,
        &format!("/sim/disputes/{id}/close"),
        Some(json!({"outcome": outcome})),
    )
    .await;
    assert_eq!(closed.status.as_u16(), 200, "{:#}", closed.body);
    closed.body
}

async fn balance(app: &TestApp, ws: &str) -> Value {
    app.get("/v1/balance", &owner(ws)).await.body
}

/// Journal entries of one reason, newest first.
async fn entries(app: &TestApp, ws: &str, reason: &str) -> Vec<Value> {
    let j = app.get("/v1/ledger?limit=100", &owner(ws)).await.body;
    j["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == reason)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_half_spent_pack_refunded_in_full_loses_only_its_unspent_credits() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_rf1", 2).await;
    assert_eq!(app.available("org_rf1").await, 1000);
    spend(&app, "org_rf1", 400).await;
    assert_eq!(app.available("org_rf1").await, 600);
    let r = sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    assert_eq!(app.available("org_rf1").await, 0, "the unspent 600 go back");
    let taken = entries(&app, "org_rf1", "refund_take_back").await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["credits"], -600);
    assert!(
        taken[0]["note"]
            .as_str()
            .unwrap()
            .contains("bought 1000 credits"),
        "the spent part is on the record: {:#}",
        taken[0]
    );
    // Redelivering every event changes nothing.
    for e in app.local.simulator.as_ref().unwrap().events() {
        assert_eq!(app.deliver_signed(&e.payload).await, 200);
    }
    app.settle_billing().await;
    assert_eq!(app.available("org_rf1").await, 0);
    assert_eq!(entries(&app, "org_rf1", "refund_take_back").await.len(), 1);
    // Nothing more can be refunded, and the balance never went below zero.
    let again = sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(again.status.as_u16(), 409);
}

#[tokio::test]
async fn partial_refunds_add_up_to_everything_unspent_and_no_more() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_rf2", 2).await;
    let paid = paid_amount(&app, &charge);
    let quarter = paid / 4;
    let r = sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({"amount": quarter})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    assert_eq!(
        app.available("org_rf2").await,
        750,
        "a quarter of the money"
    );
    spend(&app, "org_rf2", 150).await;
    assert_eq!(app.available("org_rf2").await, 600);
    // A third of what is left of the money: a third of what is left unspent.
    let r = sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({"amount": (paid - quarter) / 3})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(app.available("org_rf2").await, 400);
    let rest = paid - quarter - (paid - quarter) / 3;
    sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({"amount": rest})),
    )
    .await;
    assert_eq!(app.available("org_rf2").await, 0);
    let taken: i64 = entries(&app, "org_rf2", "refund_take_back")
        .await
        .iter()
        .map(|e| -e["credits"].as_i64().unwrap())
        .sum();
    assert_eq!(taken, 850, "never more than was unspent");
}

#[tokio::test]
async fn a_refund_takes_back_only_the_refunded_payments_lot() {
    let app = TestApp::new();
    let first = buy_packs(&app, "org_rf3", 1).await;
    buy_packs(&app, "org_rf3", 1).await;
    assert_eq!(app.available("org_rf3").await, 1000);
    sim_post(
        &app,
        &format!("/sim/charges/{first}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(app.available("org_rf3").await, 500);
}

#[tokio::test]
async fn a_dispute_freezes_the_credits_until_it_is_won() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_dp1", 2).await;
    spend(&app, "org_dp1", 200).await;
    let d = sim_post(&app, &format!("/sim/charges/{charge}/dispute"), None).await;
    assert_eq!(d.status.as_u16(), 200, "{:#}", d.body);
    let b = balance(&app, "org_dp1").await;
    assert_eq!(
        (b["available"].as_u64(), b["frozen"].as_u64()),
        (Some(0), Some(800))
    );
    // Frozen credits cannot be spent.
    let g = app
        .post(
            "/v1/generations",
            &member("org_dp1", "u1"),
            json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
        )
        .await;
    g.assert_problem(402, "insufficient_credits");
    let id = d.body["id"].as_str().unwrap();
    let won = sim_post(
        &app,
        &format!("/sim/disputes/{id}/close"),
        Some(json!({"outcome": "won"})),
    )
    .await;
    assert_eq!(won.status.as_u16(), 200);
    let b = balance(&app, "org_dp1").await;
    assert_eq!(b["available"], 800);
    assert_eq!(b["frozen"], 0, "{b:#}");
    assert_eq!(entries(&app, "org_dp1", "dispute_won").await.len(), 1);
}

/// Two fifths of a pack refunded, then the rest disputed: however the refund's and the
/// dispute's events are ordered when they reach Tally (they travel in different queue
/// groups), the credits end as what the money kept bought.
#[tokio::test]
async fn a_refund_followed_after_the_dispute_of_the_rest_takes_its_own_share() {
    for outcome in ["lost", "won"] {
        let app = TestApp::new();
        let ws = "org_rfd";
        let charge = buy_packs(&app, ws, 2).await;
        let paid = app.sim_events("charge.succeeded")[0]["amount"]
            .as_i64()
            .unwrap();
        let r = sim_post(
            &app,
            &format!("/sim/charges/{charge}/refund"),
            Some(json!({"amount": paid * 2 / 5})),
        )
        .await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        assert_eq!(app.available(ws).await, 600);
        let d = sim_post(&app, &format!("/sim/charges/{charge}/dispute"), None).await;
        assert_eq!(d.status.as_u16(), 200, "{:#}", d.body);
        assert_eq!(balance(&app, ws).await["frozen"], 600);
        close_dispute(&app, d.body["id"].as_str().unwrap(), outcome).await;
        let kept = if outcome == "won" { 600 } else { 0 };
        assert_eq!(app.available(ws).await, kept);

        // The purchase first, then the dispute's events, then the charge's (refunded, and
        // updated as disputed, both showing the refund), into fresh systems; the dispute
        // may even have closed first.
        let events = app.local.simulator.as_ref().unwrap().events();
        let (disputes, rest): (Vec<_>, Vec<_>) = events
            .iter()
            .partition(|e| e.kind.starts_with("charge.dispute."));
        let (refunds, purchase): (Vec<_>, Vec<_>) = rest.into_iter().partition(|e| {
            ["charge.refunded", "charge.updated"].contains(&e.kind.as_str())
                || e.kind.starts_with("refund.")
        });
        assert!(!refunds.is_empty() && !disputes.is_empty());
        for dispute_order in [false, true] {
            let fresh = TestApp::new();
            for e in &purchase {
                assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
            }
            fresh.settle_billing().await;
            assert_eq!(fresh.available(ws).await, 1000);
            let mut late: Vec<_> = disputes.clone();
            if dispute_order {
                // The dispute's closing first, then its opening.
                late.reverse();
            }
            late.extend(refunds.iter());
            for e in late {
                assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
                fresh.settle_billing().await;
            }
            assert!(fresh.local.billing_queue.dead_letters().is_empty());
            let b = balance(&fresh, ws).await;
            assert_eq!(
                (b["available"].as_u64(), b["frozen"].as_u64()),
                (Some(kept), Some(0)),
                "{outcome}, closing first: {dispute_order}: {b:#}"
            );
        }
    }
}

#[tokio::test]
async fn a_lost_dispute_takes_the_frozen_credits_back_even_when_events_arrive_out_of_order() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_dp2", 2).await;
    spend(&app, "org_dp2", 300).await;
    let d = sim_post(&app, &format!("/sim/charges/{charge}/dispute"), None).await;
    let id = d.body["id"].as_str().unwrap();
    sim_post(
        &app,
        &format!("/sim/disputes/{id}/close"),
        Some(json!({"outcome": "lost"})),
    )
    .await;
    assert_eq!(app.available("org_dp2").await, 0);
    assert_eq!(balance(&app, "org_dp2").await["held"], 0);
    let lost = entries(&app, "org_dp2", "dispute_lost").await;
    assert_eq!(lost.len(), 1);

    // The same events, newest first and each twice, into a fresh system: same outcome.
    let fresh = TestApp::new();
    let events = app.local.simulator.as_ref().unwrap().events();
    for e in events.iter().rev() {
        fresh.deliver_signed(&e.payload).await;
        fresh.deliver_signed(&e.payload).await;
    }
    fresh.settle_billing().await;
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
    // The fresh system never saw the generation, so everything bought is taken back.
    assert_eq!(fresh.available("org_dp2").await, 0);
    let b = balance(&fresh, "org_dp2").await;
    assert_eq!(b["frozen"], 0, "{b:#}");
}

/// An inquiry the bank turns into a chargeback: Stripe makes the chargeback a dispute of
/// its own, opened while the inquiry has every credit of the payment frozen, so the
/// chargeback freezes none itself. The credits stay frozen until the chargeback closes,
/// whether the inquiry is closed first or left open: won, they are spendable again; lost,
/// they are taken back. Delivered in any order, each event twice, the end is the same.
#[tokio::test]
async fn an_inquiry_turned_into_a_chargeback_keeps_the_credits_frozen_until_the_chargeback_closes()
{
    for (close_inquiry, outcome) in [
        (true, "lost"),
        (true, "won"),
        (false, "lost"),
        (false, "won"),
    ] {
        let case = format!("inquiry closed first: {close_inquiry}, chargeback {outcome}");
        let app = TestApp::new();
        let ws = "org_esc";
        let charge = buy_packs(&app, ws, 2).await;
        spend(&app, ws, 200).await;
        let inquiry = sim_post(&app, &format!("/sim/charges/{charge}/inquiry"), None).await;
        assert_eq!(inquiry.status.as_u16(), 200, "{:#}", inquiry.body);
        assert_eq!(balance(&app, ws).await["frozen"], 800);
        let chargeback = sim_post(&app, &format!("/sim/charges/{charge}/dispute"), None).await;
        assert_eq!(chargeback.status.as_u16(), 200, "{:#}", chargeback.body);
        if close_inquiry {
            let closed = close_dispute(&app, inquiry.body["id"].as_str().unwrap(), "won").await;
            assert_eq!(closed["status"], "warning_closed");
        }
        let b = balance(&app, ws).await;
        assert_eq!(
            (b["available"].as_u64(), b["frozen"].as_u64()),
            (Some(0), Some(800)),
            "{case}: {b:#}"
        );
        close_dispute(&app, chargeback.body["id"].as_str().unwrap(), outcome).await;
        let kept = if outcome == "won" { 800 } else { 0 };
        let b = balance(&app, ws).await;
        assert_eq!(
            (b["available"].as_u64(), b["frozen"].as_u64()),
            (Some(kept), Some(0)),
            "{case}: {b:#}"
        );
        let lost = entries(&app, ws, "dispute_lost").await.len();
        assert_eq!(lost, usize::from(outcome == "lost"), "{case}");

        // The same events into fresh systems, in Stripe's order and newest first, each
        // twice. The fresh systems never saw the generation: all 1,000 credits are at stake.
        for newest_first in [false, true] {
            let fresh = TestApp::new();
            let mut events = app.local.simulator.as_ref().unwrap().events();
            if newest_first {
                events.reverse();
            }
            for e in &events {
                assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
                assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
            }
            fresh.settle_billing().await;
            assert!(fresh.local.billing_queue.dead_letters().is_empty());
            let b = balance(&fresh, ws).await;
            let kept = if outcome == "won" { 1000 } else { 0 };
            assert_eq!(
                (b["available"].as_u64(), b["frozen"].as_u64()),
                (Some(kept), Some(0)),
                "{case}, newest first: {newest_first}: {b:#}"
            );
        }
    }
}

#[tokio::test]
async fn a_refund_before_the_purchase_is_applied_still_takes_the_credits_back() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_rf4", 2).await;
    sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(app.available("org_rf4").await, 0);
    let events = app.local.simulator.as_ref().unwrap().events();
    let fresh = TestApp::new();
    // Refund first, then the charge, then the checkout that grants.
    let order = [
        "charge.refunded",
        "refund.created",
        "charge.succeeded",
        "checkout.session.completed",
    ];
    for kind in order {
        for e in events.iter().filter(|e| e.kind == kind) {
            assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
        }
    }
    fresh.settle_billing().await;
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
    assert_eq!(fresh.available("org_rf4").await, 0);
    let granted = entries(&fresh, "org_rf4", "pack_purchase").await;
    assert_eq!(granted.len(), 1, "the purchase is in the journal");
    assert_eq!(
        entries(&fresh, "org_rf4", "refund_take_back").await.len(),
        1
    );
}

/// A refund made in the dashboard is followed from its own event: the charge's event
/// (`charge.refunded`, with the charge's refunded total) travels in the customer's queue
/// group and may wait behind an event being retried, and the credits would stay spendable
/// meanwhile. When it comes it takes nothing twice.
#[tokio::test]
async fn a_refund_takes_its_credits_back_from_its_own_event_before_the_charges() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_rf5", 1).await;
    sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    let events = app.local.simulator.as_ref().unwrap().events();
    let fresh = TestApp::new();
    for kind in ["charge.succeeded", "checkout.session.completed"] {
        for e in events.iter().filter(|e| e.kind == kind) {
            assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
        }
    }
    fresh.settle_billing().await;
    assert_eq!(fresh.available("org_rf5").await, 500);
    for kind in ["refund.created", "charge.refunded"] {
        for e in events.iter().filter(|e| e.kind == kind) {
            assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
        }
        fresh.settle_billing().await;
        assert_eq!(fresh.available("org_rf5").await, 0, "after {kind}");
    }
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
    let taken = entries(&fresh, "org_rf5", "refund_take_back").await;
    assert_eq!(taken.len(), 1, "{taken:#?}");
}

#[tokio::test]
async fn a_faulty_generation_is_reversed_once_by_staff_or_the_generation_service() {
    let app = TestApp::new();
    buy_packs(&app, "org_rv", 1).await;
    let id = spend(&app, "org_rv", 120).await;
    assert_eq!(app.available("org_rv").await, 380);
    let path = format!("/v1/generations/{id}/reverse");
    // Members cannot give themselves credits back.
    app.post(&path, &member("org_rv", "u1"), json!({"reason": "blurry"}))
        .await
        .assert_problem(403, "forbidden");
    app.post(&path, &support(), json!({"reason": "blank\u{0007}"}))
        .await
        .assert_problem(422, "validation_failed");
    // The ticket named for the audit trail is one of the generation's workspace.
    let file = |ws: &str| {
        let ws = ws.to_owned();
        let app = &app;
        async move {
            let t = app
                .post(
                    "/v1/support/tickets",
                    &member(&ws, "u1"),
                    json!({"category": "generation", "subject": "blank output",
                        "message": "the video came out blank"}),
                )
                .await;
            assert_eq!(t.status.as_u16(), 201, "{:#}", t.body);
            t.body["id"].as_str().unwrap().to_owned()
        }
    };
    let mine = file("org_rv").await;
    let theirs = file("org_other").await;
    for (ticket, status) in [("T-9", 422), (theirs.as_str(), 404)] {
        let r = app
            .post(
                &path,
                &support(),
                json!({"reason": "output was blank", "ticket": ticket}),
            )
            .await;
        assert_eq!(r.status.as_u16(), status, "{:#}", r.body);
    }
    assert_eq!(
        app.available("org_rv").await,
        380,
        "refused: nothing given back"
    );
    let r = app
        .post(
            &path,
            &support(),
            json!({"reason": "output was blank", "ticket": mine}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    assert_eq!(r.body["reversed"], 120);
    assert_eq!(app.available("org_rv").await, 500);
    // Again, by anyone allowed, with any reason: the first answer, no second credit.
    let again = app
        .post(&path, &service(), json!({"reason": "retry"}))
        .await;
    assert_eq!(again.status.as_u16(), 200);
    assert_eq!(again.body["reversed"], 120);
    assert_eq!(app.available("org_rv").await, 500);
    let rev = entries(&app, "org_rv", "reversal").await;
    assert_eq!(rev.len(), 1);
    assert_eq!(rev[0]["refs"]["generation"], id.as_str());
    assert_eq!(rev[0]["refs"]["ticket"], mine.as_str());
    assert_eq!(rev[0]["note"], "output was blank");
    // The generation service naming a ticket that is not the workspace's: the reversal is
    // made, the ticket left out of the audit trail. One not shaped as a ticket is refused.
    let other = spend(&app, "org_rv", 20).await;
    let reverse = |ticket: &str| {
        let path = format!("/v1/generations/{other}/reverse");
        let body = json!({"reason": "render crashed", "ticket": ticket});
        let app = &app;
        async move { app.post(&path, &service(), body).await }
    };
    reverse("job-7781")
        .await
        .assert_problem(422, "validation_failed");
    let by_service = reverse(&theirs).await;
    assert_eq!(by_service.status.as_u16(), 200, "{:#}", by_service.body);
    let rev = entries(&app, "org_rv", "reversal").await;
    let latest = rev
        .iter()
        .find(|e| e["refs"]["generation"] == other.as_str())
        .unwrap();
    assert!(latest["refs"]["ticket"].is_null(), "{latest:#}");
    // A generation still running or failed has nothing to give back.
    let g = app
        .post(
            "/v1/generations",
            &member("org_rv", "u1"),
            json!({"workflow": "image", "model": "flux-schnell", "count": 1}),
        )
        .await;
    let held = g.body["id"].as_str().unwrap();
    app.post(
        &format!("/v1/generations/{held}/reverse"),
        &support(),
        json!({"reason": "x"}),
    )
    .await
    .assert_problem(409, "conflict");
    // Unknown generations are 404.
    app.post(
        "/v1/generations/gen_01HZZZZZZZZZZZZZZZZZZZZZZZ/reverse",
        &support(),
        json!({"reason": "x"}),
    )
    .await
    .assert_problem(404, "not_found");
}

#[tokio::test]
async fn a_refunded_renewal_takes_back_the_unspent_part_of_that_periods_allowance() {
    let app = TestApp::new();
    app.subscribe("org_rn", "plus", "monthly").await;
    let first = app.available("org_rn").await;
    assert!(first > 0);
    // The renewal a month later grants the next month; then it is refunded in full.
    let sim = app.local.simulator.as_ref().unwrap();
    let sub = app.get("/v1/subscription", &owner("org_rn")).await.body["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = sim_post(&app, &format!("/sim/subscriptions/{sub}/renew"), None).await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    let renewed = app.available("org_rn").await;
    assert_eq!(renewed, 2 * first, "the renewal grants another month");
    // Spending burns the earlier month first.
    spend(&app, "org_rn", first / 2).await;
    let paid_by = app.sim_events("invoice_payment.paid");
    assert_eq!(paid_by.len(), 2, "sign-up and renewal");
    let renewal_charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        sim.charge(&renewal_charge).unwrap()["payment_intent"],
        paid_by[1]["payment"]["payment_intent"]
    );
    let r = sim_post(
        &app,
        &format!("/sim/charges/{renewal_charge}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    assert_eq!(
        app.available("org_rn").await,
        first - first / 2,
        "the renewal's month goes back; what is left of the earlier one stays"
    );
    let taken = entries(&app, "org_rn", "refund_take_back").await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["credits"], -(first as i64));
}

#[tokio::test]
async fn a_refunded_yearly_plan_gets_smaller_allotments_for_the_rest_of_its_year() {
    let app = TestApp::new();
    app.subscribe("org_yr", "plus", "yearly").await;
    let month = app.available("org_yr").await;
    assert!(month > 0);
    advance_days(&app, 32).await;
    assert_eq!(
        plan_allotments(&app, "org_yr").await,
        vec![month as i64; 2],
        "month 2 as paid"
    );
    let before = app.available("org_yr").await;
    let charge = app.sim_events("charge.succeeded")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let paid = paid_amount(&app, &charge);
    let r = sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({"amount": paid / 2})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    // Half of each unspent month the year's invoice bought (the first, still in its
    // rollover, and the second) goes back.
    assert_eq!(app.available("org_yr").await, before - month);
    assert_eq!(taken_back(&app, "org_yr").await, vec![month as i64 / 2; 2]);
    // Month 3 is granted and loses the refunded half at once: half the money, half a month.
    advance_days(&app, 31).await;
    assert_eq!(plan_allotments(&app, "org_yr").await.len(), 3);
    let taken = taken_back(&app, "org_yr").await;
    assert_eq!(taken.len(), 3, "{taken:?}");
    assert_eq!(taken[0], month as i64 / 2);
    // A full refund stops the rest of the year.
    sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    advance_days(&app, 62).await;
    assert_eq!(
        plan_allotments(&app, "org_yr").await.len(),
        3,
        "nothing paid for, nothing granted"
    );
    // The year's line in the billing history counts every month it paid for, and what its
    // refunds took back from them.
    let history = app
        .get("/v1/billing/history?kind=subscription", &owner("org_yr"))
        .await
        .body;
    let line = &history["items"][0];
    let granted: i64 = plan_allotments(&app, "org_yr").await.iter().sum();
    let taken: i64 = taken_back(&app, "org_yr").await.iter().sum();
    assert_eq!(line["credits_granted"].as_i64(), Some(granted), "{line:#}");
    assert_eq!(line["credits_taken_back"].as_i64(), Some(taken), "{line:#}");
}

/// Credits taken back for refunds, newest first.
async fn taken_back(app: &TestApp, ws: &str) -> Vec<i64> {
    entries(app, ws, "refund_take_back")
        .await
        .iter()
        .map(|e| -e["credits"].as_i64().unwrap())
        .collect()
}

/// Plan credits granted so far (sign-up months and allotments), newest first.
/// Moves the simulated clock `days` on and lets billing catch up.
async fn advance_days(app: &TestApp, days: i64) {
    app.advance_clock(serde_json::json!({"days": days})).await;
}

/// Refunds the newest charge in full through the simulated Stripe.
async fn refund_last_charge(app: &TestApp) {
    let charges = app.sim_events("charge.succeeded");
    let charge = charges.last().unwrap()["id"].as_str().unwrap().to_owned();
    let r = sim_post(
        app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
}

async fn plan_allotments(app: &TestApp, ws: &str) -> Vec<i64> {
    entries(app, ws, "plan_credits")
        .await
        .iter()
        .map(|e| e["credits"].as_i64().unwrap())
        .collect()
}

// ---------------------------------------------------------------- billing history

/// Every movement of the billing history, newest first, read a page of `limit` at a time.
async fn history(app: &TestApp, ws: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/billing/history?limit={limit}{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path, &owner(ws)).await;
        assert_eq!(page.status.as_u16(), 200, "{:#}", page.body);
        let got = page.body["items"].as_array().unwrap();
        assert!(got.len() <= limit);
        items.extend(got.iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return items,
        }
    }
}

#[tokio::test]
async fn the_billing_history_shows_a_pack_its_partial_refund_and_the_credits_each_moved() {
    let app = TestApp::new();
    let charge = buy_packs(&app, "org_hi1", 2).await;
    spend(&app, "org_hi1", 200).await;
    // A quarter of the money back: a quarter of the 800 unspent credits go with it.
    let paid = paid_amount(&app, &charge);
    sim_post(
        &app,
        &format!("/sim/charges/{charge}/refund"),
        Some(json!({"amount": paid / 4})),
    )
    .await;
    let items = history(&app, "org_hi1", "", 20).await;
    assert_eq!(items.len(), 2, "{items:#?}");
    let (refund, pack) = (&items[0], &items[1]);
    assert_eq!(pack["kind"], "pack");
    assert_eq!(pack["status"], "paid");
    // Its line is its invoice's, with the PDF.
    assert!(pack["id"].as_str().unwrap().starts_with("in_"));
    assert_eq!(pack["invoice"], pack["id"]);
    assert!(pack["invoice_pdf"].as_str().unwrap().ends_with(".pdf"));
    assert_eq!(pack["amount"], paid);
    assert_eq!(pack["amount_refunded"], paid / 4);
    assert_eq!(pack["credits_granted"], 1000);
    assert_eq!(pack["credits_taken_back"], 200);
    assert_eq!(pack["charge"], charge.as_str());
    assert!(pack["payment_intent"].as_str().unwrap().starts_with("pi_"));
    assert_eq!(refund["kind"], "refund");
    assert_eq!(refund["status"], "succeeded");
    assert_eq!(refund["amount"], paid / 4);
    assert_eq!(refund["credits_taken_back"], 200);
    assert_eq!(refund["charge"], charge.as_str());
    assert_eq!(refund["payment_intent"], pack["payment_intent"]);
    assert!(
        refund["created"].as_str().unwrap() >= pack["created"].as_str().unwrap(),
        "newest first"
    );
    // The receipt link resolves locally and shows the refund.
    let receipt = pack["receipt_url"].as_str().unwrap();
    let path = &receipt[receipt.find("/sim/receipts/").unwrap()..];
    let page = app.send(Method::GET, path, None, None, &[]).await;
    assert_eq!(page.status.as_u16(), 200);
    let html = page.body.as_str().unwrap();
    assert!(
        html.contains(&format!("{}.{:02}", (paid / 4) / 100, (paid / 4) % 100)),
        "{html}"
    );

    // The same events, newest first and each twice, into a fresh system: the same history
    // (the fresh one never saw the generation, so the refund takes back a quarter of 1000).
    let fresh = TestApp::new();
    let events = app.local.simulator.as_ref().unwrap().events();
    for e in events.iter().rev() {
        fresh.deliver_signed(&e.payload).await;
        fresh.deliver_signed(&e.payload).await;
    }
    fresh.settle_billing().await;
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
    let again = history(&fresh, "org_hi1", "", 20).await;
    let strip = |v: &[Value]| {
        v.iter()
            .map(|m| {
                let mut m = m.clone();
                let o = m.as_object_mut().unwrap();
                o.remove("updated");
                o.remove("credits_taken_back");
                m
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&again), strip(&items));
    assert_eq!(again[0]["credits_taken_back"], 250);
}

/// Two refunds of one payment, the second's own event delivered after the charge's event
/// that counts it: the credits its take-back took are on its line only once its own event
/// says it reached that total, never on the first refund's line too.
#[tokio::test]
async fn each_refund_line_shows_only_what_its_own_refund_took_back_whatever_the_order() {
    let app = TestApp::new();
    let ws = "org_hi3";
    let charge = buy_packs(&app, ws, 2).await;
    let paid = paid_amount(&app, &charge);
    for _ in 0..2 {
        let r = sim_post(
            &app,
            &format!("/sim/charges/{charge}/refund"),
            Some(json!({"amount": paid / 4})),
        )
        .await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    }
    let lines = |items: &[Value]| -> (Value, Vec<i64>) {
        let pack = items.iter().find(|m| m["kind"] == "pack").unwrap().clone();
        let refunds = items
            .iter()
            .filter(|m| m["kind"] == "refund")
            .map(|m| m["credits_taken_back"].as_i64().unwrap())
            .collect();
        (pack, refunds)
    };
    let (pack, refunds) = lines(&history(&app, ws, "", 20).await);
    assert_eq!(pack["credits_taken_back"], 500);
    assert_eq!(refunds, [250, 250]);

    // Into a fresh system, the second refund's own event last.
    let fresh = TestApp::new();
    let events = app.local.simulator.as_ref().unwrap().events();
    let refunds_created: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "refund.created")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(refunds_created.len(), 2);
    let last = refunds_created[1];
    let mut order: Vec<usize> = (0..events.len()).filter(|i| *i != last).collect();
    order.push(last);
    for i in order {
        fresh.deliver_signed(&events[i].payload).await;
        fresh.settle_billing().await;
    }
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
    let (pack, refunds) = lines(&history(&fresh, ws, "", 20).await);
    assert_eq!(pack["credits_taken_back"], 500);
    assert_eq!(refunds, [250, 250], "{pack:#}");
}

/// A pack is in the billing history as of when it was paid, not when its checkout page was
/// opened (Stripe dates the session then).
#[tokio::test]
async fn a_packs_line_is_dated_when_it_was_paid() {
    let app = TestApp::new();
    let ws = "org_hi4";
    let url = app.pack_checkout(ws, 1).await;
    app.clock.advance(chrono::Duration::hours(3));
    let paid_at = app.clock.now();
    app.pay(&url).await;
    app.settle_billing().await;
    let session = &app.sim_events("checkout.session.completed")[0];
    assert_eq!(
        session["created"].as_i64(),
        Some((paid_at - chrono::Duration::hours(3)).timestamp()),
        "Stripe dates the session when it was made"
    );
    let dated = |items: Vec<Value>| -> chrono::DateTime<chrono::Utc> {
        let pack = items.iter().find(|m| m["kind"] == "pack").unwrap();
        pack["created"].as_str().unwrap().parse().unwrap()
    };
    assert!(dated(history(&app, ws, "", 20).await) >= paid_at - chrono::Duration::seconds(1));
    // The checkout's event first (Stripe keeps no order), into a fresh system: the same.
    let fresh = TestApp::new();
    let mut events = app.local.simulator.as_ref().unwrap().events();
    events.sort_by_key(|e| e.kind != "checkout.session.completed");
    for e in &events {
        fresh.deliver_signed(&e.payload).await;
        fresh.settle_billing().await;
    }
    assert!(dated(history(&fresh, ws, "", 20).await) >= paid_at - chrono::Duration::seconds(1));
}

#[tokio::test]
async fn the_billing_history_pages_and_filters_every_kind_of_movement_and_refuses_bad_input() {
    let app = TestApp::new();
    let ws = "org_hi2";
    app.subscribe(ws, "plus", "monthly").await;
    let first = buy_packs(&app, ws, 1).await;
    buy_packs(&app, ws, 1).await;
    sim_post(
        &app,
        &format!("/sim/charges/{first}/refund"),
        Some(json!({})),
    )
    .await;
    let third = buy_packs(&app, ws, 1).await;
    let d = sim_post(&app, &format!("/sim/charges/{third}/dispute"), None).await;
    let dispute = d.body["id"].as_str().unwrap().to_owned();
    sim_post(
        &app,
        &format!("/sim/disputes/{dispute}/close"),
        Some(json!({"outcome": "lost"})),
    )
    .await;

    let all = history(&app, ws, "", 100).await;
    let kinds: Vec<&str> = all.iter().map(|m| m["kind"].as_str().unwrap()).collect();
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(
        (
            count("subscription"),
            count("pack"),
            count("refund"),
            count("dispute")
        ),
        (1, 3, 1, 1),
        "{kinds:?}"
    );
    let sub = all.iter().find(|m| m["kind"] == "subscription").unwrap();
    assert_eq!(sub["status"], "paid");
    assert!(sub["credits_granted"].as_u64().unwrap() > 0);
    assert!(sub["invoice"].as_str().unwrap().starts_with("in_"));
    assert!(sub["invoice_pdf"].as_str().unwrap().ends_with(".pdf"));
    assert!(sub["charge"].as_str().unwrap().starts_with("ch_"));
    let lost = all.iter().find(|m| m["kind"] == "dispute").unwrap();
    assert_eq!(lost["status"], "lost");
    assert_eq!(lost["credits_taken_back"], 500);
    assert_eq!(lost["charge"], third.as_str());
    // Newest first, and a page at a time gives the same list without repeats.
    let times: Vec<&str> = all.iter().map(|m| m["created"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert_eq!(history(&app, ws, "", 1).await, all);
    assert_eq!(history(&app, ws, "", 4).await, all);
    // By kind.
    let packs = history(&app, ws, "&kind=pack,refund", 2).await;
    assert_eq!(packs.len(), 4);
    assert!(
        packs
            .iter()
            .all(|m| m["kind"] == "pack" || m["kind"] == "refund")
    );
    // By date: `from` is inclusive, `to` exclusive.
    let oldest = all.last().unwrap()["created"].as_str().unwrap().to_owned();
    let since = history(
        &app,
        ws,
        &format!("&from={}", oldest.replace('+', "%2B")),
        3,
    )
    .await;
    assert_eq!(since, all);
    let before = history(&app, ws, &format!("&to={}", oldest.replace('+', "%2B")), 3).await;
    assert!(before.is_empty());
    let reversed = history(
        &app,
        ws,
        "&from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        3,
    )
    .await;
    assert!(reversed.is_empty(), "an empty range is empty, not an error");
    // Invoices alone keep their own list, with a cursor too.
    let mut invoices = Vec::new();
    let mut path = "/v1/invoices?limit=1".to_owned();
    loop {
        let page = app.get(&path, &owner(ws)).await;
        assert_eq!(page.status.as_u16(), 200, "{:#}", page.body);
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 1);
        invoices.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/invoices?limit=1&cursor={c}"),
            None => break,
        }
    }
    // The sign-up and the three pack purchases, each once, newest first.
    let expected: Vec<String> = all
        .iter()
        .filter(|m| m["kind"] == "subscription" || m["kind"] == "pack")
        .map(|m| m["invoice"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(invoices.len(), 4);
    assert_eq!(invoices, expected);

    // Bad input is a 422 problem; members may not read billing; another workspace's owner
    // sees only their own (empty) history; staff read any workspace's.
    for bad in [
        "kind=pack,nope",
        "cursor=zzz",
        "cursor=1-a%23b",
        "limit=0",
        "limit=101",
        "from=yesterday",
        "other=1",
    ] {
        app.get(&format!("/v1/billing/history?{bad}"), &owner(ws))
            .await
            .assert_problem(422, "validation_failed");
    }
    app.get("/v1/billing/history", &member(ws, "u1"))
        .await
        .assert_problem(403, "forbidden");
    let other = app.get("/v1/billing/history", &owner("org_hi_other")).await;
    assert_eq!(other.body["items"], json!([]));
    let staff = app
        .get(
            &format!("/v1/admin/workspaces/{ws}/billing/history?limit=100"),
            &support(),
        )
        .await;
    assert_eq!(staff.status.as_u16(), 200);
    assert_eq!(staff.body["items"].as_array().unwrap(), &all);
    app.get(
        &format!("/v1/admin/workspaces/{ws}/billing/history"),
        &owner(ws),
    )
    .await
    .assert_problem(403, "forbidden");
}

// ---------------------------------------------------------------- corrected reissue

/// Support staff reissue `invoice` with a corrected name, under `key`.
async fn reissue(app: &TestApp, invoice: &str, key: &str) -> tally_tests::Answer {
    app.send(
        Method::POST,
        &format!("/v1/admin/invoices/{invoice}/reissue"),
        Some(&support()),
        Some(&json!({"name": "Acme GmbH"}).to_string()),
        &[("idempotency-key", key)],
    )
    .await
}

/// A correction's replacement is open only until it is marked paid by the original's
/// payment (or for good, after a reissue stopped between the two): it is never listed
/// with a page to pay it.
#[tokio::test]
async fn an_open_replacement_is_never_offered_for_payment() {
    let app = TestApp::new();
    let ws = "org_ri2";
    buy_packs(&app, ws, 1).await;
    let original = history(&app, ws, "", 20).await[0]["invoice"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = reissue(&app, &original, "ri2").await;
    assert_eq!(done.status.as_u16(), 201, "{:#}", done.body);
    let replacement = done.body["replacement"].as_str().unwrap().to_owned();
    // A system that saw the replacement finalized but not yet paid.
    let fresh = TestApp::new();
    let events = app.local.simulator.as_ref().unwrap().events();
    let (paid, rest): (Vec<_>, Vec<_>) = events.iter().partition(|e| {
        e.kind == "invoice.paid" && e.payload["data"]["object"]["id"] == replacement.as_str()
    });
    assert_eq!(paid.len(), 1);
    for e in &rest {
        assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
    }
    fresh.settle_billing().await;
    let listed = async |app: &TestApp| {
        let items = app.get("/v1/invoices", &owner(ws)).await.body["items"].clone();
        let find = |id: &str| {
            items
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["id"] == id)
                .cloned()
                .unwrap()
        };
        (find(&replacement), find(&original))
    };
    let (open, first) = listed(&fresh).await;
    assert_eq!(open["status"], "open");
    assert!(open["hosted_invoice_url"].is_null(), "{open:#}");
    assert!(first["hosted_invoice_url"].is_string(), "{first:#}");
    // Marked paid: its page (a receipt now) is listed.
    assert_eq!(fresh.deliver_signed(&paid[0].payload).await, 200);
    fresh.settle_billing().await;
    let (settled, _) = listed(&fresh).await;
    assert_eq!(settled["status"], "paid");
    assert!(settled["hosted_invoice_url"].is_string(), "{settled:#}");
}

/// A replacement is marked paid with all the original was paid: an invoice whose money
/// partly went back (a refund, a dispute) is not reissued, nor is a replacement of it made
/// before the money went back.
#[tokio::test]
async fn a_refunded_or_disputed_invoice_is_not_reissued() {
    for (ws, how, replaced_first) in [
        ("org_ri3", "refund", false),
        ("org_ri4", "dispute", false),
        ("org_ri5", "refund", true),
    ] {
        let app = TestApp::new();
        let charge = buy_packs(&app, ws, 1).await;
        let mut invoice = history(&app, ws, "", 20).await[0]["invoice"]
            .as_str()
            .unwrap()
            .to_owned();
        if replaced_first {
            let r = reissue(&app, &invoice, "ri-first").await;
            assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
            app.settle_billing().await;
            invoice = r.body["replacement"].as_str().unwrap().to_owned();
        }
        let notes = app.sim_events("credit_note.created").len();
        let body = (how == "refund").then(|| json!({"amount": 100}));
        let r = sim_post(&app, &format!("/sim/charges/{charge}/{how}"), body).await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        reissue(&app, &invoice, "ri3")
            .await
            .assert_problem(409, "not_reissuable");
        assert_eq!(app.sim_events("credit_note.created").len(), notes, "{ws}");
    }
}

#[tokio::test]
async fn staff_reissue_a_paid_invoice_with_corrected_details_without_a_second_charge() {
    let app = TestApp::new();
    let ws = "org_ri";
    buy_packs(&app, ws, 1).await;
    let before = history(&app, ws, "", 20).await;
    let original = before[0]["invoice"].as_str().unwrap().to_owned();
    let balance = app.available(ws).await;
    let charges = app.sim_events("charge.succeeded").len();
    let path = format!("/v1/admin/invoices/{original}/reissue");
    let body = json!({"name": "Acme GmbH", "email": "billing@acme.example",
        "address": {"line1": "Hauptstr. 1", "city": "Berlin", "postal_code": "10115", "country": "DE"}});
    let send = |token: String, body: Value, key: Option<&'static str>| {
        let app = &app;
        let path = path.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                key.map(|k| ("idempotency-key", k)).into_iter().collect();
            let a = app
                .send(
                    Method::POST,
                    &path,
                    Some(&token),
                    Some(&body.to_string()),
                    &headers,
                )
                .await;
            app.settle_billing().await;
            a
        }
    };
    // Members and owners cannot; a key is required; bad details are refused.
    send(owner(ws), body.clone(), Some("r1"))
        .await
        .assert_problem(403, "forbidden");
    send(support(), body.clone(), None)
        .await
        .assert_problem(422, "validation_failed");
    send(
        support(),
        json!({"address": {"line1": "x", "country": "Germany"}}),
        Some("r0"),
    )
    .await
    .assert_problem(422, "validation_failed");
    let done = send(support(), body.clone(), Some("r1")).await;
    assert_eq!(done.status.as_u16(), 201, "{:#}", done.body);
    let replacement = done.body["replacement"].as_str().unwrap().to_owned();
    assert_ne!(replacement, original);
    assert!(
        done.body["credit_note"]
            .as_str()
            .unwrap()
            .starts_with("cn_")
    );
    // The same key: the same answer, nothing made twice.
    let again = send(support(), body.clone(), Some("r1")).await;
    assert_eq!(again.body, done.body);
    // No second charge, credits untouched.
    assert_eq!(app.sim_events("charge.succeeded").len(), charges);
    assert_eq!(app.sim_events("credit_note.created").len(), 1);
    assert_eq!(app.available(ws).await, balance);
    // Both in the history: the replacement names the original and the other way round.
    let after = history(&app, ws, "", 20).await;
    assert_eq!(after.len(), before.len() + 1);
    let new = after
        .iter()
        .find(|m| m["id"] == replacement.as_str())
        .unwrap();
    assert_eq!(new["replaces"], original.as_str());
    assert_eq!(new["status"], "paid");
    assert_eq!(new["credits_granted"], 0);
    let old = after.iter().find(|m| m["id"] == original.as_str()).unwrap();
    assert_eq!(old["replaced_by"], replacement.as_str());
    assert_eq!(old["credits_granted"], 500);
    // The corrected invoice carries the details and the original's lines and amount.
    let sim = app.local.simulator.as_ref().unwrap();
    let inv = sim.invoice(&replacement).unwrap();
    assert_eq!(inv["customer_name"], "Acme GmbH");
    // Who asked for it, on the replacement itself.
    assert_eq!(inv["metadata"]["reissued_by"], "support-1");
    assert_eq!(inv["customer_address"]["country"], "DE");
    assert_eq!(
        inv["amount_paid"],
        sim.invoice(&original).unwrap()["amount_paid"]
    );
    // A refund request names the original payment, not the replacement.
    app.post(
        "/v1/refund-requests",
        &owner(ws),
        json!({"payment": replacement, "reason": "other", "details": "x"}),
    )
    .await
    .assert_problem(409, "not_refundable");
    // Reissued once: the replacement is what is reissued next.
    let twice = send(support(), body.clone(), Some("r2")).await;
    twice.assert_problem(409, "not_reissuable");
    assert!(
        twice.body["detail"]
            .as_str()
            .unwrap()
            .contains(&replacement)
    );
    let next = app
        .send(
            Method::POST,
            &format!("/v1/admin/invoices/{replacement}/reissue"),
            Some(&support()),
            Some(&json!({"name": "Acme Holding GmbH"}).to_string()),
            &[("idempotency-key", "r4")],
        )
        .await;
    assert_eq!(next.status.as_u16(), 201, "{:#}", next.body);
    app.settle_billing().await;
    assert_eq!(app.available(ws).await, balance);
    // Unknown invoices are 404.
    let unknown = app
        .send(
            Method::POST,
            "/v1/admin/invoices/in_unknown1/reissue",
            Some(&support()),
            Some(&body.to_string()),
            &[("idempotency-key", "r3")],
        )
        .await;
    unknown.assert_problem(404, "not_found");
}

/// A yearly plan upgraded mid-year whose upgrade is refunded: the rest of the year's
/// allotments go back to the plan that is still paid for, and the month the upgrade's own
/// grant bought is taken back.
#[tokio::test]
async fn a_refunded_yearly_upgrade_takes_the_rest_of_the_year_back_to_the_plan_still_paid() {
    let app = TestApp::new();
    let ws = "org_yup";
    app.subscribe(ws, "plus", "yearly").await;
    advance_days(&app, 10).await;
    let up = app.change_plan(ws, "max", "yearly").await;
    assert!(up.status.is_success(), "{:#}", up.body);
    app.settle_billing().await;
    advance_days(&app, 25).await;
    // Newest first: month 2 at max, the upgrade's rest of month 1, month 1 at plus.
    let months = plan_allotments(&app, ws).await;
    assert_eq!(months.first(), Some(&400), "upgraded: {months:?}");
    // The upgrade's invoice refunded in full.
    refund_last_charge(&app).await;
    app.settle_billing().await;
    advance_days(&app, 62).await;
    let months = plan_allotments(&app, ws).await;
    assert_eq!(
        &months[..2],
        &[150, 150],
        "back to plus once the upgrade's money is back: {months:?}"
    );
}

/// An upgrade in the last hour of a yearly plan's month grants nothing of its own (the
/// rest of that month is worth less than a credit), but it raises every later month. A
/// refund of its invoice still takes the later months back to the plan still paid for.
#[tokio::test]
async fn a_refunded_upgrade_that_granted_nothing_of_its_own_still_lowers_the_later_months() {
    let app = TestApp::new();
    let ws = "org_yup0";
    app.subscribe(ws, "plus", "yearly").await;
    let start = app.ledger.clock.now();
    let anniversary = start.checked_add_months(chrono::Months::new(1)).unwrap();
    app.advance_clock(serde_json::json!({"until": anniversary - chrono::Duration::minutes(30)}))
        .await;
    let before = plan_allotments(&app, ws).await;
    let up = app.change_plan(ws, "max", "yearly").await;
    assert!(up.status.is_success(), "{:#}", up.body);
    app.settle_billing().await;
    assert_eq!(
        plan_allotments(&app, ws).await,
        before,
        "the upgrade's own half hour is worth less than a credit"
    );
    advance_days(&app, 2).await;
    assert_eq!(
        plan_allotments(&app, ws).await.first(),
        Some(&400),
        "month 2 at max"
    );
    refund_last_charge(&app).await;
    advance_days(&app, 62).await;
    let months = plan_allotments(&app, ws).await;
    assert_eq!(
        &months[..2],
        &[150, 150],
        "back to plus once the upgrade's money is back: {months:?}"
    );
}

#[tokio::test]
async fn a_yearly_month_granted_after_a_refund_and_a_lost_dispute_keeps_what_the_money_left_paid() {
    let app = TestApp::new();
    let ws = "org_yrd";
    app.subscribe(ws, "plus", "yearly").await;
    let month = app.available(ws).await;
    let charge = app.sim_events("charge.succeeded")[0].clone();
    let id = charge["id"].as_str().unwrap().to_owned();
    let paid = charge["amount"].as_i64().unwrap();
    // A fifth refunded, then two fifths disputed and lost.
    let r = sim_post(
        &app,
        &format!("/sim/charges/{id}/refund"),
        Some(json!({"amount": paid / 5})),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    let now = app.clock.now().timestamp();
    let mut dispute = tally_tests::fixture("dispute");
    dispute["id"] = json!("dp_yrd");
    dispute["amount"] = json!(paid * 2 / 5);
    dispute["charge"] = json!(id);
    dispute["payment_intent"] = charge["payment_intent"].clone();
    dispute["currency"] = json!("usd");
    dispute["created"] = json!(now);
    for (event, status) in [("evt_yrd_1", "needs_response"), ("evt_yrd_2", "lost")] {
        dispute["status"] = json!(status);
        let kind = if status == "lost" {
            "charge.dispute.closed"
        } else {
            "charge.dispute.created"
        };
        let e = tally_tests::stripe_event(event, kind, now, dispute.clone());
        assert_eq!(app.deliver_signed(&e).await, 200);
        app.settle_billing().await;
    }
    // The next month meets the refund and the lost dispute at once: three fifths of the
    // money went back, two fifths of each month's credits stay (the first month's too).
    advance_days(&app, 32).await;
    assert_eq!(plan_allotments(&app, ws).await.len(), 2);
    let left = app.available(ws).await;
    let expected = 2 * (month * 2 / 5);
    assert!(
        (expected.saturating_sub(2)..=expected + 2).contains(&left),
        "{left}, expected about {expected}"
    );
}
