//! Credits follow paid money over a subscription's life: each observation that once gave
//! credits without payment (or took a payment without credits) is a named test here,
//! driven through the API and the simulated Stripe.

use serde_json::{Value, json};
use tally_tests::{TestApp, owner};

/// The paid `subscription_update` invoices, oldest first.
fn change_invoices(app: &TestApp) -> Vec<Value> {
    app.sim_events("invoice.paid")
        .into_iter()
        .filter(|i| i["billing_reason"] == "subscription_update")
        .collect()
}

fn lines(invoice: &Value) -> Vec<(String, i64, u64)> {
    invoice["lines"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["pricing"]["price_details"]["product"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                l["amount"].as_i64().unwrap(),
                l["quantity"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The items of the subscription as Stripe last described it.
fn items(app: &TestApp) -> Vec<(String, u64)> {
    let sub = app
        .sim_events("customer.subscription.updated")
        .pop()
        .expect("an update");
    sub["items"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["price"]["product"].as_str().unwrap().to_owned(),
                i["quantity"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn undoing_an_upgrade_before_its_event_is_a_downgrade_at_renewal_not_a_second_upgrade() {
    let app = TestApp::new();
    app.subscribe("org_undo", "plus", "monthly").await;
    // No waiting for Stripe's events between the two requests.
    let up = app.change_plan("org_undo", "generative", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    let back = app.change_plan("org_undo", "max", "monthly").await;
    assert_eq!(
        back.body["effective"], "at_renewal",
        "Stripe already bills Generative: Max is a downgrade"
    );
    assert_eq!(back.body["credits_granted"], 0);
    app.settle_billing().await;
    assert_eq!(change_invoices(&app).len(), 1, "one change was billed");
    let granted = up.body["credits_granted"].as_u64().unwrap();
    assert!(granted <= 750, "{granted}");
    assert_eq!(app.available("org_undo").await, 150 + granted);
    // Generative stays billed and in effect until the renewal.
    assert_eq!(items(&app)[0].0, "tally_plan_generative");

    // The same with add-on units: 100 now, then 1 is a reduction at renewal, no refund.
    let more = app.set_units("org_undo", 100).await;
    assert_eq!(more.body["effective"], "now", "{:#}", more.body);
    let fewer = app.set_units("org_undo", 1).await;
    assert_eq!(fewer.body["effective"], "at_renewal", "{:#}", fewer.body);
    assert_eq!(fewer.body["credits_granted"], 0);
    app.settle_billing().await;
    let units = more.body["credits_granted"].as_u64().unwrap();
    assert!(units <= 100 * 60);
    assert_eq!(app.available("org_undo").await, 150 + granted + units);
    assert_eq!(change_invoices(&app).len(), 2);
}

#[tokio::test]
async fn moving_to_team_swaps_the_add_on_item_and_converts_units_without_gaining_credits() {
    let app = TestApp::new();
    app.subscribe("org_swap", "max", "monthly").await;
    let ten = app.set_units("org_swap", 10).await;
    assert_eq!(ten.status.as_u16(), 200, "{:#}", ten.body);
    let team = app.change_plan("org_swap", "team", "monthly").await;
    assert_eq!(team.status.as_u16(), 200, "{:#}", team.body);
    // 10 individual units (600 credits) are 3 team units (600 credits).
    assert_eq!(team.body["addon_units"], 3);
    assert_eq!(
        items(&app),
        vec![
            ("tally_plan_team".to_owned(), 1),
            ("tally_addon_team".to_owned(), 3)
        ],
        "one plan item and one add-on item"
    );
    let inv = change_invoices(&app).pop().unwrap();
    let l = lines(&inv);
    assert!(
        l.iter()
            .any(|(p, a, q)| p == "tally_addon_individual" && *a < 0 && *q == 10)
    );
    assert!(
        l.iter()
            .any(|(p, a, q)| p == "tally_addon_team" && *a > 0 && *q == 3)
    );
    // A later add-on change re-prices the same item: still one add-on item.
    let four = app.set_units("org_swap", 4).await;
    assert_eq!(four.body["effective"], "now", "{:#}", four.body);
    let addons: Vec<_> = items(&app)
        .into_iter()
        .filter(|(p, _)| p.starts_with("tally_addon_"))
        .collect();
    assert_eq!(addons, vec![("tally_addon_team".to_owned(), 4)]);
}

#[tokio::test]
async fn two_changes_at_once_never_grant_more_than_was_paid() {
    let app = TestApp::new();
    app.subscribe("org_race", "plus", "monthly").await;
    let (a, b) = tokio::join!(
        app.change_plan("org_race", "max", "monthly"),
        app.change_plan("org_race", "generative", "monthly"),
    );
    app.settle_billing().await;
    let statuses = [a.status.as_u16(), b.status.as_u16()];
    assert!(statuses.contains(&200), "{statuses:?}");
    for r in [&a, &b] {
        if r.status.as_u16() == 409 {
            r.assert_problem(409, "change_in_progress");
        }
    }
    let granted: u64 = [&a, &b]
        .iter()
        .filter_map(|r| r.body["credits_granted"].as_u64())
        .sum();
    // Plus -> Generative at most: 900 - 150, never 250 + 750.
    assert!(granted <= 750, "{granted}");
    assert_eq!(app.available("org_race").await, 150 + granted);
}

#[tokio::test]
async fn credits_come_from_stripes_events_alone_so_a_lost_grant_is_granted_by_the_event() {
    // Everything a workspace went through, replayed as Stripe's events into a system that
    // never saw the requests (as if every request's own grant had failed after Stripe
    // succeeded), ends with the same credits.
    let app = TestApp::new();
    app.subscribe("org_replay", "plus", "monthly").await;
    app.change_plan("org_replay", "max", "monthly").await;
    app.set_units("org_replay", 3).await;
    app.change_plan("org_replay", "generative", "monthly").await;
    app.settle_billing().await;
    let expected = app.available("org_replay").await;
    assert!(expected > 150);

    let fresh = TestApp::new();
    let sim = app.local.simulator.as_ref().unwrap();
    for e in sim.events() {
        let status = fresh.deliver_signed(&e.payload).await;
        assert_eq!(status, 200);
    }
    fresh.settle_billing().await;
    assert_eq!(fresh.available("org_replay").await, expected);
    assert!(fresh.local.billing_queue.dead_letters().is_empty());
}

#[tokio::test]
async fn a_scheduled_downgrade_keeps_todays_price_so_a_later_upgrade_credits_what_was_paid() {
    let app = TestApp::new();
    app.subscribe("org_sched", "generative", "monthly").await;
    let down = app.change_plan("org_sched", "plus", "monthly").await;
    assert_eq!(down.body["effective"], "at_renewal", "{:#}", down.body);
    assert_eq!(
        items(&app)[0].0,
        "tally_plan_generative",
        "still billed at Generative"
    );
    let up = app.change_plan("org_sched", "team", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    let inv = change_invoices(&app).pop().unwrap();
    let credit = lines(&inv)
        .into_iter()
        .find(|(_, a, _)| *a < 0)
        .expect("a credit for unused time");
    assert_eq!(
        credit.0, "tally_plan_generative",
        "the unused time is credited at the price actually paid"
    );
    // The upgrade replaced the scheduled downgrade.
    app.settle_billing().await;
    let s = app.get("/v1/subscription", &owner("org_sched")).await.body;
    assert_eq!(s["subscription"]["plan"], "team");
    assert!(s["subscription"]["scheduled"].is_null(), "{s:#}");
}

/// Stripe keeps a schedule attached through its last phase (a billing interval after the
/// change took effect) and releases it only then. A change made in that time is not
/// mistaken for one waiting in the portal: an upgrade applies now, a downgrade waits.
#[tokio::test]
async fn after_a_scheduled_downgrade_takes_effect_the_plan_can_change_again_at_once() {
    let app = TestApp::new();
    let o = owner("org_after");
    app.subscribe("org_after", "generative", "monthly").await;
    let down = app.change_plan("org_after", "max", "monthly").await;
    assert_eq!(down.body["effective"], "at_renewal", "{:#}", down.body);
    advance_days(&app, 31).await;
    let s = app.get("/v1/subscription", &o).await.body;
    assert_eq!(s["subscription"]["plan"], "max", "{s:#}");
    assert_eq!(items(&app)[0].0, "tally_plan_max");
    // Another downgrade, then an upgrade, in the period the schedule's last phase runs.
    let again = app.change_plan("org_after", "plus", "monthly").await;
    assert_eq!(again.body["effective"], "at_renewal", "{:#}", again.body);
    let up = app.change_plan("org_after", "team", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    assert!(
        up.body["credits_granted"].as_u64().unwrap() > 0,
        "{:#}",
        up.body
    );
    app.settle_billing().await;
    let s = app.get("/v1/subscription", &o).await.body;
    assert_eq!(s["subscription"]["plan"], "team", "{s:#}");
    assert!(s["subscription"]["scheduled"].is_null(), "{s:#}");
}

#[tokio::test]
async fn yearly_to_monthly_waits_for_the_renewal_and_monthly_to_yearly_restarts_the_period() {
    let app = TestApp::new();
    app.subscribe("org_iv", "max", "monthly").await;
    let yearly = app.change_plan("org_iv", "max", "yearly").await;
    assert_eq!(yearly.body["effective"], "now", "{:#}", yearly.body);
    app.settle_billing().await;
    let inv = change_invoices(&app).pop().unwrap();
    let full: Vec<_> = inv["lines"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["parent"]["subscription_item_details"]["proration"] == false)
        .collect();
    assert_eq!(full.len(), 1, "the new yearly period billed whole, once");
    let (start, end) = (
        full[0]["period"]["start"].as_i64().unwrap(),
        full[0]["period"]["end"].as_i64().unwrap(),
    );
    assert!(end - start >= 365 * 86_400, "a year from now");
    let sub = app.get("/v1/subscription", &owner("org_iv")).await.body;
    assert_eq!(sub["subscription"]["interval"], "yearly");
    let monthly = app.change_plan("org_iv", "max", "monthly").await;
    assert_eq!(
        monthly.body["effective"], "at_renewal",
        "{:#}",
        monthly.body
    );
}

#[tokio::test]
async fn a_preview_says_what_a_change_costs_and_grants_and_changes_nothing() {
    let app = TestApp::new();
    app.subscribe("org_prev", "plus", "monthly").await;
    let before = app.sim_events("customer.subscription.updated").len();
    let p = app
        .post(
            "/v1/subscription/preview",
            &owner("org_prev"),
            serde_json::json!({"plan": "max"}),
        )
        .await;
    assert_eq!(p.status.as_u16(), 200, "{:#}", p.body);
    assert_eq!(p.body["effective"], "now");
    assert!(p.body["total_cents"].as_i64().unwrap() > 0);
    assert!(p.body["lines"].as_array().unwrap().len() >= 2);
    assert_eq!(p.body["credits_per_month"], 400);
    assert_eq!(p.body["next_renewal_cents"], 2900);
    assert_eq!(
        app.sim_events("customer.subscription.updated").len(),
        before
    );
    let credits_now = p.body["credits_now"].as_u64().unwrap();
    let done = app.change_plan("org_prev", "max", "monthly").await;
    assert_eq!(done.body["credits_granted"].as_u64().unwrap(), credits_now);
    let down = app
        .post(
            "/v1/subscription/preview",
            &owner("org_prev"),
            serde_json::json!({"plan": "plus", "addon_units": 2}),
        )
        .await;
    assert_eq!(down.body["effective"], "at_renewal");
    assert_eq!(down.body["total_cents"], 0);
    assert_eq!(down.body["credits_per_month"], 150 + 120);
    for (bad, field) in [
        (serde_json::json!({"plan": "gold"}), Some("plan")),
        (serde_json::json!({"addon_units": 101}), Some("addon_units")),
        (serde_json::json!({"color": "red"}), None),
    ] {
        let r = app
            .post("/v1/subscription/preview", &owner("org_prev"), bad)
            .await;
        r.assert_problem(422, "validation_failed");
        if let Some(field) = field {
            assert_eq!(r.body["field"], field, "{}", r.body);
        }
    }
}

/// Lots of one source created in the workspace's journal, oldest first: (entry id, credits).
async fn grants_of(
    app: &TestApp,
    ws: &str,
    source: tally::ledger::LotSource,
) -> Vec<(String, u64)> {
    use tally::ledger::LotChange;
    let mut journal = app
        .ledger
        .store
        .entries(
            &tally_tests::workspace(ws),
            &tally::store::EntryQuery {
                before: None,
                limit: 10_000,
            },
        )
        .await
        .unwrap();
    journal.reverse();
    journal
        .iter()
        .flat_map(|e| {
            e.lots.iter().filter_map(move |c| match c {
                LotChange::Created { lot } if lot.source == source => {
                    Some((e.id.clone(), lot.original.get()))
                }
                _ => None,
            })
        })
        .collect()
}

/// Plan-allowance grants in the workspace's journal, oldest first.
async fn plan_grants(app: &TestApp, ws: &str) -> Vec<(String, u64)> {
    grants_of(app, ws, tally::ledger::LotSource::PlanPeriod).await
}

async fn advance_days(app: &TestApp, days: i64) {
    app.advance_clock(serde_json::json!({ "days": days })).await;
}

/// Units added, then an upgrade whose invoice bills no add-on lines; the units change's
/// events delivered after the upgrade's (a failed delivery Stripe retried later): the
/// year's later months carry both, the new plan and the units.
#[tokio::test]
async fn changes_of_different_parts_applied_out_of_order_both_reach_the_later_months() {
    let app = TestApp::new();
    let ws = "org_parts";
    app.subscribe(ws, "plus", "yearly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    sim.hold_deliveries();
    let before = sim.events().len();
    let units = app.set_units(ws, 5).await;
    assert!(units.status.is_success(), "{:#}", units.body);
    let of_units = sim.events().len() - before;
    assert!(of_units > 0);
    advance_days(&app, 1).await;
    let up = app.change_plan(ws, "max", "yearly").await;
    assert!(up.status.is_success(), "{:#}", up.body);
    // The upgrade's events first, then the units change's.
    sim.release_deliveries(|events| events.rotate_left(of_units))
        .await;
    app.settle_billing().await;
    let doc = tally::refresh::refresh_doc(app.docs.as_ref(), &tally_tests::workspace(ws))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((doc.plan.as_str(), doc.addon_units), ("max", 5), "{doc:#?}");
    // Month 2 comes at both: Max's 400 and the 5 units' 300.
    advance_days(&app, 31).await;
    let month = |source| {
        let app = &app;
        async move {
            grants_of(app, ws, source)
                .await
                .into_iter()
                .filter(|(key, _)| key.starts_with("refresh:"))
                .map(|(_, credits)| credits)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(month(tally::ledger::LotSource::PlanPeriod).await, [400]);
    assert_eq!(month(tally::ledger::LotSource::Addon).await, [300]);
    // The paid periods document (what later changes are valued against) has the units too.
    let sub = tally::ids::SubscriptionId::parse(doc.subscription.as_str()).unwrap();
    let paid = tally::billing::periods::get(app.docs.as_ref(), &tally_tests::workspace(ws), &sub)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            paid.current.level.plan.as_str(),
            paid.current.level.addon_units
        ),
        ("max", 5)
    );
}

#[tokio::test]
async fn a_yearly_plan_gets_twelve_monthly_allotments_as_the_clock_moves() {
    let app = TestApp::new();
    app.subscribe("org_year", "max", "yearly").await;
    assert_eq!(plan_grants(&app, "org_year").await.len(), 1);
    // Day 61: three allotments, never zero.
    advance_days(&app, 61).await;
    assert_eq!(plan_grants(&app, "org_year").await.len(), 3);
    assert!(app.available("org_year").await > 0);
    // Just before the anniversary: twelve, each 400 credits, once.
    advance_days(&app, 363 - 61).await;
    let grants = plan_grants(&app, "org_year").await;
    assert_eq!(grants.len(), 12, "{grants:#?}");
    assert!(grants.iter().all(|(_, c)| *c == 400));
    // Moving the clock again within the year grants nothing more.
    advance_days(&app, 1).await;
    assert_eq!(plan_grants(&app, "org_year").await.len(), 12);
}

#[tokio::test]
async fn a_monthly_plan_anchored_on_the_31st_gets_one_grant_a_month() {
    let app = TestApp::new();
    app.advance_clock(serde_json::json!({"until": "2027-01-31T12:00:00Z"}))
        .await;
    let sub = app.subscribe("org_a31", "max", "monthly").await;
    // Stripe's periods for this anchor: 31 Jan to 28 Feb, 28 Feb to 31 Mar, 31 Mar to
    // 30 Apr. The one from 28 Feb is longer than a month of its start; its renewal
    // invoice grants it, the credit refresh adds nothing on 28 Mar.
    advance_days(&app, 29).await;
    assert_eq!(plan_grants(&app, "org_a31").await.len(), 2);
    // 30 Mar: still the sign-up's and the 28 Feb renewal's.
    advance_days(&app, 29).await;
    assert_eq!(plan_grants(&app, "org_a31").await.len(), 2);
    advance_days(&app, 3).await;
    let cycles: Vec<_> = app
        .sim_events("invoice.paid")
        .into_iter()
        .filter(|i| {
            i["billing_reason"] == "subscription_cycle"
                && i["parent"]["subscription_details"]["subscription"] == sub.as_str()
        })
        .collect();
    assert_eq!(cycles.len(), 2, "renewed on 28 Feb and 31 Mar");
    let grants = plan_grants(&app, "org_a31").await;
    assert_eq!(grants.len(), 3, "{grants:#?}");
    assert!(grants.iter().all(|(_, c)| *c == 400), "{grants:#?}");
}

#[tokio::test]
async fn a_canceled_plan_does_not_renew_and_a_paused_yearly_plan_keeps_its_paid_months_only() {
    let app = TestApp::new();
    app.subscribe("org_stop", "max", "monthly").await;
    let r = app
        .post(
            "/v1/subscription/cancel",
            &owner("org_stop"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
    advance_days(&app, 70).await;
    assert_eq!(
        plan_grants(&app, "org_stop").await.len(),
        1,
        "no renewal after cancel"
    );
    assert!(
        app.sim_events("invoice.paid")
            .iter()
            .all(|i| i["billing_reason"] != "subscription_cycle")
    );

    app.subscribe("org_pause", "max", "yearly").await;
    let p = app
        .post(
            "/v1/subscription/pause",
            &owner("org_pause"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(p.status.as_u16(), 200, "{:#}", p.body);
    app.settle_billing().await;
    let ent = app.get("/v1/entitlements", &owner("org_pause")).await.body;
    assert_eq!(ent["plan"]["status"], "paused", "{ent:#}");
    assert!(ent["pack_discount_pct"].as_u64().unwrap() > 0, "{ent:#}");
    assert!(ent["custom_model_slots"].as_u64().unwrap() > 0, "{ent:#}");
    // The year is paid: its months keep coming while collection is paused ("accessible
    // until the period expires"), each once, at the paid level.
    advance_days(&app, 95).await;
    let grants = plan_grants(&app, "org_pause").await;
    assert_eq!(grants.len(), 4, "{grants:#?}");
    assert!(grants.iter().all(|(_, c)| *c == 400), "{grants:#?}");
    // After the year nothing more: the renewal's invoice is voided, never paid.
    advance_days(&app, 300).await;
    assert_eq!(plan_grants(&app, "org_pause").await.len(), 12);
    // Stripe moved on to a period it did not collect: the benefits end with the paid one.
    let ent = app.get("/v1/entitlements", &owner("org_pause")).await.body;
    assert_eq!(ent["plan"]["status"], "paused", "{ent:#}");
    assert_eq!(ent["pack_discount_pct"], 0, "{ent:#}");
    assert_eq!(ent["custom_model_slots"], 0, "{ent:#}");
    assert!(
        app.sim_events("invoice.paid")
            .iter()
            .all(|i| i["billing_reason"] != "subscription_cycle")
    );
}

/// Add-on units are items of the plan's subscription: cancelled at the period's end, a
/// monthly plan's units bring no credits past it, and a yearly plan's units come monthly
/// through the paid year and then stop with it; the last month's unit credits lapse at
/// that month's end like the others.
#[tokio::test]
async fn add_on_credits_end_with_a_cancelled_plan() {
    let app = TestApp::new();
    for (ws, interval) in [("org_units_m", "monthly"), ("org_units_y", "yearly")] {
        app.subscribe(ws, "max", interval).await;
        let units = app.set_units(ws, 2).await;
        assert_eq!(units.status.as_u16(), 200, "{:#}", units.body);
        app.settle_billing().await;
        let cancel = app
            .post("/v1/subscription/cancel", &owner(ws), serde_json::json!({}))
            .await;
        assert_eq!(cancel.status.as_u16(), 200, "{:#}", cancel.body);
    }
    // The year's paid invoice recorded the terms Max was sold at, which its later months
    // follow.
    let doc =
        tally::refresh::refresh_doc(app.docs.as_ref(), &tally_tests::workspace("org_units_y"))
            .await
            .unwrap()
            .expect("a yearly period recorded");
    assert_eq!(
        doc.plan_terms.get("max").map(|t| t.monthly_credits.get()),
        Some(400),
        "{doc:#?}"
    );
    advance_days(&app, 430).await;
    for (ws, months) in [("org_units_m", 1), ("org_units_y", 12)] {
        let s = app.get("/v1/subscription", &owner(ws)).await.body["subscription"].clone();
        assert_eq!(s["status"], "canceled", "{ws}: {s:#}");
        assert_eq!(plan_grants(&app, ws).await.len(), months, "{ws}");
        let addon = grants_of(&app, ws, tally::ledger::LotSource::Addon).await;
        assert_eq!(addon.len(), months, "{ws}: {addon:#?}");
        assert!(
            addon.iter().all(|(_, c)| *c > 0 && *c <= 120),
            "{ws}: {addon:#?}"
        );
        let lots = app.get("/v1/balance", &owner(ws)).await.body["lots"].clone();
        assert!(
            lots.as_array()
                .unwrap()
                .iter()
                .all(|l| l["source"] != "addon"),
            "{ws}: no add-on credits left a year on: {lots:#}"
        );
    }
}

/// Resuming collection does not pay the period Stripe moved on to while paused (its
/// invoice was voided): the plan gives its benefits again once a renewal is paid.
#[tokio::test]
async fn a_plan_resumed_in_a_period_begun_while_paused_gives_nothing_until_paid() {
    let app = TestApp::new();
    let o = owner("org_resume");
    app.subscribe("org_resume", "max", "monthly").await;
    let benefits = || async {
        let ent = app.get("/v1/entitlements", &o).await.body;
        (
            ent["plan"]["status"].as_str().unwrap().to_owned(),
            ent["pack_discount_pct"].as_u64().unwrap(),
            ent["custom_model_slots"].as_u64().unwrap(),
        )
    };
    let (_, discount, slots) = benefits().await;
    assert!(discount > 0 && slots > 0);
    // Paused and resumed within the paid period: nothing changes.
    for step in ["pause", "resume"] {
        let r = app
            .post(
                &format!("/v1/subscription/{step}"),
                &o,
                serde_json::json!({}),
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "{step}: {:#}", r.body);
        app.settle_billing().await;
    }
    advance_days(&app, 3).await;
    assert_eq!(benefits().await, ("active".to_owned(), discount, slots));
    let paused = app
        .post("/v1/subscription/pause", &o, serde_json::json!({}))
        .await;
    assert_eq!(paused.status.as_u16(), 200, "{:#}", paused.body);
    // Past the renewal (voided while paused), then resumed in that period.
    advance_days(&app, 35).await;
    let resumed = app
        .post("/v1/subscription/resume", &o, serde_json::json!({}))
        .await;
    assert_eq!(resumed.status.as_u16(), 200, "{:#}", resumed.body);
    app.settle_billing().await;
    assert_eq!(benefits().await, ("active".to_owned(), 0, 0));
    assert_eq!(plan_grants(&app, "org_resume").await.len(), 1);
    // No change through the API in it: Stripe would credit its unpaid time.
    let more = app.set_units("org_resume", 1).await;
    more.assert_problem(409, "conflict");
    assert!(
        more.body["detail"].as_str().unwrap().contains("never paid"),
        "{:#}",
        more.body
    );
    assert_eq!(
        app.change_plan("org_resume", "team", "monthly")
            .await
            .status
            .as_u16(),
        409
    );
    // The next renewal is collected: its month, and the benefits, come back.
    advance_days(&app, 30).await;
    assert_eq!(plan_grants(&app, "org_resume").await.len(), 2);
    assert_eq!(benefits().await, ("active".to_owned(), discount, slots));
}

/// The same for a yearly plan, where a change made elsewhere (the portal) in the unpaid
/// year opens the year's record of paid months: the change pays for its prorated part,
/// not for the year's benefits.
#[tokio::test]
async fn a_change_in_a_yearly_period_begun_while_paused_does_not_pay_for_it() {
    let app = TestApp::new();
    let o = owner("org_resume_y");
    app.subscribe("org_resume_y", "max", "yearly").await;
    let slots = || async {
        app.get("/v1/entitlements", &o).await.body["custom_model_slots"]
            .as_u64()
            .unwrap()
    };
    assert!(slots().await > 0);
    let paused = app
        .post("/v1/subscription/pause", &o, serde_json::json!({}))
        .await;
    assert_eq!(paused.status.as_u16(), 200, "{:#}", paused.body);
    advance_days(&app, 370).await;
    let resumed = app
        .post("/v1/subscription/resume", &o, serde_json::json!({}))
        .await;
    assert_eq!(resumed.status.as_u16(), 200, "{:#}", resumed.body);
    app.settle_billing().await;
    assert_eq!(slots().await, 0);
    portal_change(
        &app,
        "org_resume_y",
        "team",
        tally::ledger::Interval::Yearly,
    )
    .await;
    assert_eq!(slots().await, 0);
    // Any later event recomputes the plan: still the unpaid year.
    let cancel = app
        .post("/v1/subscription/cancel", &o, serde_json::json!({}))
        .await;
    assert_eq!(cancel.status.as_u16(), 200, "{:#}", cancel.body);
    app.settle_billing().await;
    assert_eq!(slots().await, 0);
}

#[tokio::test]
async fn an_upgrade_on_the_last_day_of_a_31_day_period_grants_a_day_not_a_month() {
    let app = TestApp::new();
    // The test clock starts on Nov 1: advance to Dec 1, a 31-day period to Jan 1.
    app.subscribe("org_d31", "max", "monthly").await;
    advance_days(&app, 30).await;
    let before = app.available("org_d31").await;
    advance_days(&app, 30).await;
    let up = app.change_plan("org_d31", "team", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    app.settle_billing().await;
    let granted = up.body["credits_granted"].as_u64().unwrap();
    // One day of 31: (6000 - 400) / 31 is about 180; never the month's 5,600.
    assert!((150..=181).contains(&granted), "{granted}");
    assert!(app.available("org_d31").await <= before + 400 + granted);
}

#[tokio::test]
async fn add_on_units_an_hour_before_renewal_cost_and_grant_an_hour() {
    let app = TestApp::new();
    app.subscribe("org_hour", "max", "monthly").await;
    // The period runs Nov 1 12:00 -> Dec 1 12:00; stop an hour before its end.
    app.advance_clock(serde_json::json!({"until": "2026-12-01T11:00:00Z"}))
        .await;
    let more = app.set_units("org_hour", 100).await;
    assert_eq!(more.body["effective"], "now", "{:#}", more.body);
    let charged = more.body["charged_cents"].as_u64().unwrap();
    let granted = more.body["credits_granted"].as_u64().unwrap();
    // 100 units are $1,000 and 6,000 credits a month; an hour of 720 is about $1.39 and 8.
    assert!(charged <= 140, "{charged}");
    assert!(granted <= 6000 / 720, "{granted}");
}

/// A change made in Stripe's customer portal (or dashboard): Stripe changes the
/// subscription with the portal's settings and sends its events; Tally gets no request.
async fn portal_change(app: &TestApp, ws: &str, plan: &str, interval: tally::ledger::Interval) {
    use tally::payments::{ItemPrice, Payments, SubscriptionChange};
    let sub = app.get("/v1/subscription", &owner(ws)).await.body["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let catalog = app.ledger.catalog.clone();
    let p = catalog.plan(plan).unwrap();
    let sim = app.local.simulator.as_ref().unwrap();
    sim.update_subscription(&SubscriptionChange {
        plan: Some(ItemPrice {
            product: tally::payments::stripe_api::product_id("plan", plan),
            product_name: format!("{} plan", p.name),
            unit_amount: tally::subscriptions::change::plan_unit_price(&catalog, p, interval),
            interval,
        }),
        // The portal's "invoice immediately" for upgrades.
        prorate_now: true,
        idempotency_key: format!("portal-{ws}-{plan}-{}", interval.as_str()),
        ..SubscriptionChange::to(sub.parse().unwrap())
    })
    .await
    .unwrap();
    app.settle_billing().await;
}

#[tokio::test]
async fn a_change_made_in_the_portal_grants_exactly_as_the_same_change_through_the_api() {
    use tally::ledger::Interval;
    let app = TestApp::new();
    app.subscribe("org_api", "plus", "monthly").await;
    app.subscribe("org_portal", "plus", "monthly").await;
    advance_days(&app, 9).await;
    let api = app.change_plan("org_api", "generative", "monthly").await;
    assert_eq!(api.body["effective"], "now", "{:#}", api.body);
    portal_change(&app, "org_portal", "generative", Interval::Monthly).await;
    app.settle_billing().await;
    assert_eq!(
        app.available("org_portal").await,
        app.available("org_api").await
    );
    let s = app.get("/v1/subscription", &owner("org_portal")).await.body;
    assert_eq!(s["subscription"]["plan"], "generative");
    // An interval switch made in the portal: the same as through the API.
    let api = app.change_plan("org_api", "generative", "yearly").await;
    assert_eq!(api.body["effective"], "now", "{:#}", api.body);
    portal_change(&app, "org_portal", "generative", Interval::Yearly).await;
    app.settle_billing().await;
    assert!(app.local.billing_queue.dead_letters().is_empty());
    assert_eq!(
        app.available("org_portal").await,
        app.available("org_api").await
    );
    // And cancelling there: no renewal, no more credits.
    use tally::payments::{Payments, SubscriptionChange};
    let sub = s["subscription"]["id"].as_str().unwrap();
    let sim = app.local.simulator.as_ref().unwrap();
    sim.update_subscription(&SubscriptionChange {
        cancel_at_period_end: Some(true),
        idempotency_key: "portal-cancel".into(),
        ..SubscriptionChange::to(sub.parse().unwrap())
    })
    .await
    .unwrap();
    app.settle_billing().await;
    let before = plan_grants(&app, "org_portal").await.len();
    advance_days(&app, 400).await;
    let s = app.get("/v1/subscription", &owner("org_portal")).await.body;
    assert_eq!(s["subscription"]["status"], "canceled");
    assert!(plan_grants(&app, "org_portal").await.len() <= before + 11);
    assert!(
        app.sim_events("invoice.paid")
            .iter()
            .filter(|i| i["parent"]["subscription_details"]["subscription"] == sub)
            .all(|i| i["billing_reason"] != "subscription_cycle"),
        "no renewal after a cancel in the portal"
    );
}

#[tokio::test]
async fn yearly_add_on_units_are_granted_monthly_like_the_plan() {
    let app = TestApp::new();
    app.subscribe("org_yunits", "max", "yearly").await;
    let two = app.set_units("org_yunits", 2).await;
    assert_eq!(two.body["effective"], "now", "{:#}", two.body);
    advance_days(&app, 363).await;
    let addon: Vec<u64> = grants_of(&app, "org_yunits", tally::ledger::LotSource::Addon)
        .await
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    // The first month prorated with the charge, then eleven monthly allotments of 2 x 60.
    assert_eq!(addon.len(), 12, "{addon:?}");
    assert!(addon[1..].iter().all(|c| *c == 120), "{addon:?}");
    assert!(addon[0] <= 120);
}

#[tokio::test]
async fn a_switch_to_yearly_applies_a_pending_unit_reduction_with_the_new_period() {
    let app = TestApp::new();
    app.subscribe("org_swred", "max", "monthly").await;
    assert_eq!(
        app.set_units("org_swred", 10).await.body["effective"],
        "now"
    );
    assert_eq!(
        app.set_units("org_swred", 3).await.body["effective"],
        "at_renewal"
    );
    let y = app.change_plan("org_swred", "max", "yearly").await;
    assert_eq!(y.body["effective"], "now", "{:#}", y.body);
    assert_eq!(y.body["addon_units"], 3);
    let inv = change_invoices(&app).pop().unwrap();
    let full: Vec<_> = inv["lines"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["parent"]["subscription_item_details"]["proration"] == false)
        .filter(|l| {
            l["pricing"]["price_details"]["product"]
                .as_str()
                .unwrap()
                .starts_with("tally_addon_")
        })
        .map(|l| l["quantity"].as_u64().unwrap())
        .collect();
    assert_eq!(full, vec![3], "the new year bills the reduced count");
}

/// Credit changes (reason `plan_changed`, credits taken) in the workspace's journal.
async fn credited_back(app: &TestApp, ws: &str) -> Vec<i64> {
    let j = app.get("/v1/ledger?limit=100", &owner(ws)).await.body;
    j["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "plan_changed" && e["credits"] != 0)
        .map(|e| e["credits"].as_i64().unwrap())
        .collect()
}

/// A switch to yearly that applies a pending unit reduction credits the unused old month
/// (ten units) and bills the new year's first month (three): the money credited back for
/// seven units takes their credits back, so the month keeps what is paid for.
#[tokio::test]
async fn a_change_that_credits_more_than_it_bills_takes_the_difference_back() {
    let app = TestApp::new();
    let ws = "org_swcred";
    app.subscribe(ws, "max", "monthly").await;
    assert_eq!(app.set_units(ws, 10).await.body["effective"], "now");
    assert_eq!(app.set_units(ws, 3).await.body["effective"], "at_renewal");
    app.settle_billing().await;
    let before = app.available(ws).await;
    let y = app.change_plan(ws, "max", "yearly").await;
    assert_eq!(y.body["effective"], "now", "{:#}", y.body);
    app.settle_billing().await;
    let catalog = app.ledger.catalog.clone();
    let unit = catalog
        .addon(&catalog.plan("max").unwrap().addon)
        .unwrap()
        .credits_per_unit
        .get();
    assert_eq!(app.available(ws).await, before - 7 * unit);
    assert_eq!(credited_back(&app, ws).await, vec![-(7 * unit as i64)]);
    // The invoice's event again: nothing twice.
    let paid = app.sim_events("invoice.paid");
    let last = paid.last().unwrap()["id"].as_str().unwrap().to_owned();
    let event = app.sim_event("invoice.paid", |i| i["id"] == last.as_str());
    app.send(
        axum::http::Method::POST,
        &format!("/sim/events/{}/redeliver", event.id),
        None,
        None,
        &[("content-length", "0")],
    )
    .await;
    app.settle_billing().await;
    assert_eq!(app.available(ws).await, before - 7 * unit);
    assert_eq!(credited_back(&app, ws).await.len(), 1);
}

/// A downgrade made in the portal or dashboard and billed at once credits the richer
/// plan's unused time: its credits follow that money out, as far as they are unspent.
#[tokio::test]
async fn a_downgrade_billed_at_once_elsewhere_takes_back_the_credits_of_the_time_credited() {
    use tally::ledger::Interval;
    let app = TestApp::new();
    let ws = "org_portal_down";
    app.subscribe(ws, "generative", "monthly").await;
    let catalog = app.ledger.catalog.clone();
    let credits = |p: &str| catalog.plan(p).unwrap().monthly_credits.get();
    assert_eq!(app.available(ws).await, credits("generative"));
    // An auto top-up the take-back will cross: money that went back buys nothing.
    let set = app
        .send(
            axum::http::Method::PUT,
            "/v1/alerts",
            Some(&owner(ws)),
            Some(
                &serde_json::json!({"below_credits": [],
                    "auto_topup": {"pack": "pack_100", "below_credits": credits("plus") + 1}})
                .to_string(),
            ),
            &[],
        )
        .await;
    assert_eq!(set.status.as_u16(), 200, "{:#}", set.body);
    portal_change(&app, ws, "plus", Interval::Monthly).await;
    // The whole month was credited (the change came at its start): plus's month is left.
    assert_eq!(app.available(ws).await, credits("plus"));
    assert_eq!(
        credited_back(&app, ws).await,
        vec![-((credits("generative") - credits("plus")) as i64)]
    );
    app.local.topups_queue.until_idle().await;
    app.local.notifications_queue.until_idle().await;
    let sent = app.local.notifications.all();
    assert!(!TestApp::mentions_top_up(&sent), "{sent:#?}");
}

#[tokio::test]
async fn going_back_to_the_current_plan_keeps_its_add_on_units() {
    let app = TestApp::new();
    app.subscribe("org_back", "team", "monthly").await;
    assert_eq!(app.set_units("org_back", 1).await.body["effective"], "now");
    let down = app.change_plan("org_back", "plus", "monthly").await;
    assert_eq!(down.body["effective"], "at_renewal", "{:#}", down.body);
    let back = app.change_plan("org_back", "team", "monthly").await;
    assert_eq!(back.body["effective"], "now", "{:#}", back.body);
    assert_eq!(back.body["addon_units"], 1);
    app.settle_billing().await;
    let s = app.get("/v1/subscription", &owner("org_back")).await.body;
    assert!(s["subscription"]["scheduled"].is_null(), "{s:#}");
    assert_eq!(s["subscription"]["addon_units"], 1);
}

#[tokio::test]
async fn a_change_scheduled_in_the_portal_is_not_dropped_by_an_api_change() {
    use tally::payments::{ItemPrice, Payments, RenewalChange};
    let app = TestApp::new();
    let sub = app.subscribe("org_pschd", "generative", "monthly").await;
    let catalog = app.ledger.catalog.clone();
    let max = catalog.plan("max").unwrap();
    let addon = catalog.addon(&max.addon).unwrap();
    let price = |product: String, cents| ItemPrice {
        product,
        product_name: "portal".into(),
        unit_amount: tally::money::Cents::new(cents),
        interval: tally::ledger::Interval::Monthly,
    };
    // The portal schedules a downgrade at period end (no Tally metadata).
    app.local
        .simulator
        .as_ref()
        .unwrap()
        .schedule_renewal_change(&RenewalChange {
            subscription: sub.parse().unwrap(),
            plan: price(
                tally::payments::stripe_api::product_id("plan", "max"),
                max.monthly_price_cents.get(),
            ),
            addons: (
                0,
                price(
                    tally::payments::stripe_api::product_id("addon", &addon.id),
                    addon.unit_price_cents.get(),
                ),
            ),
            metadata: Default::default(),
            next_metadata: Default::default(),
            idempotency_key: "portal-schedule".into(),
        })
        .await
        .unwrap();
    app.settle_billing().await;
    let r = app.set_units("org_pschd", 2).await;
    r.assert_problem(409, "conflict");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("billing portal")
    );
}

/// A yearly month falls due, and before the credit refresh grants it the plan is lowered
/// elsewhere (billed at once) and raised back through the API: the month comes to what was
/// paid for it. The fall's money back is withheld from the month's allotment (granted at the
/// level of the month's date), never taken from last month's rollover, and the rise's grant
/// pays the rest of the month: nothing is granted twice.
#[tokio::test]
async fn a_fall_and_a_rise_before_the_refresh_grants_a_waiting_month_pay_it_once() {
    use tally::clock::Clock;
    use tally::ledger::Interval;
    let app = TestApp::new();
    let ws = "org_fallrise";
    let start = app.clock.now();
    app.subscribe(ws, "generative", "yearly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    sim.set_schedule(std::sync::Arc::new(tally_local::simulator::NoSchedule));
    let month = tally::subscriptions::calendar::add_months(start, 1);
    app.advance_clock(serde_json::json!({ "until": month + chrono::Duration::hours(1) }))
        .await;
    let before = app.available(ws).await;
    portal_change(&app, ws, "plus", Interval::Yearly).await;
    let up = app.change_plan(ws, "generative", "yearly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    app.settle_billing().await;
    let j = app.get("/v1/ledger?limit=100", &owner(ws)).await.body;
    let fall = j["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["reason"] == "plan_changed"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("credited unused time"))
        })
        .cloned()
        .expect("the fall's money back is on the journal");
    assert_eq!(fall["credits"], 0, "{fall:#}");
    assert!(
        fall["note"]
            .as_str()
            .is_some_and(|n| n.contains("withheld from the month's allotment")),
        "{fall:#}"
    );
    let catalog = app.ledger.catalog.clone();
    let credits = |p: &str| catalog.plan(p).unwrap().monthly_credits.get();
    // Last month's rollover is untouched; the rise's grant is a lot of its own.
    assert!(app.available(ws).await >= before);
    // The rise's grant names the month it is for (whichever of the API's answer and the
    // invoice's event made it).
    let rise_month: Vec<chrono::DateTime<chrono::Utc>> = j["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            app.get("/v1/ledger?limit=100", &owner(ws)).await.body["items"]
                .as_array()
                .unwrap(),
        )
        .filter(|e| {
            e["refs"]["idempotency_key"]
                .as_str()
                .is_some_and(|k| k.ends_with(":change:plan"))
        })
        .filter_map(|e| e["lots"][0]["lot"]["month"].as_str())
        .map(|m| m.parse().unwrap())
        .collect();
    assert!(!rise_month.is_empty() && rise_month.iter().all(|m| *m == month));
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    app.settle_billing().await;
    let month_grants: Vec<u64> = plan_grants(&app, ws)
        .await
        .into_iter()
        .filter(|(id, _)| id.starts_with("refresh:"))
        .map(|(_, c)| c)
        .collect();
    assert_eq!(month_grants.len(), 1);
    // The month: generative's, as paid (the fall's money back and the rise's charge cover
    // the same rest of the month, to a credit of rounding on each of their two lines).
    let gained = app.available(ws).await - before;
    assert!(
        gained <= credits("generative") && gained + 2 >= credits("generative"),
        "the month gained {gained}"
    );
    // The refresh again: nothing twice.
    let granted = plan_grants(&app, ws).await;
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    assert_eq!(plan_grants(&app, ws).await, granted);
    assert_eq!(app.available(ws).await - before, gained);
}

/// A yearly month falls due, and before the credit refresh grants it the plan is switched
/// to a cheaper monthly one (billed at once, its unused time credited to the customer's
/// balance). The refresh still grants the month, but the credits of the time credited back
/// are withheld from it: with the older credits spent, nothing comes that was not paid for.
#[tokio::test]
async fn a_switch_to_monthly_before_the_refresh_grants_a_waiting_month_withholds_its_credited_time()
{
    switch_to_monthly_with_a_month_waiting("org_switchwait", chrono::Duration::hours(1)).await;
}

/// The same switch in the very second the month falls due: Stripe credits the whole month
/// as unused, and the month is still granted (and withheld by that credit), so the
/// customer keeps the new plan's month, as a second later, never less.
#[tokio::test]
async fn a_switch_in_the_second_a_yearly_month_falls_due_loses_no_month() {
    switch_to_monthly_with_a_month_waiting("org_switchsecond", chrono::Duration::zero()).await;
}

/// A Generative yearly plan whose first month is spent, switched in the portal to Plus
/// monthly `after` its second month fell due, before the credit refresh came.
async fn switch_to_monthly_with_a_month_waiting(ws: &str, after: chrono::Duration) {
    use tally::clock::Clock;
    use tally::ledger::Interval;
    let app = TestApp::new();
    let start = app.clock.now();
    app.subscribe(ws, "generative", "yearly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    sim.set_schedule(std::sync::Arc::new(tally_local::simulator::NoSchedule));
    // The first month's credits are spent.
    let spent = app.available(ws).await;
    let debit = app
        .send(
            axum::http::Method::POST,
            &format!("/v1/admin/workspaces/{ws}/adjustments"),
            Some(&tally_tests::support()),
            Some(&serde_json::json!({"credits": -(spent as i64), "reason": "spent"}).to_string()),
            &[("idempotency-key", "spent")],
        )
        .await;
    assert_eq!(debit.status.as_u16(), 201, "{:#}", debit.body);
    let month = tally::subscriptions::calendar::add_months(start, 1);
    app.advance_clock(serde_json::json!({ "until": month + after }))
        .await;
    assert_eq!(app.available(ws).await, 0, "month 2 waits for the refresh");
    portal_change(&app, ws, "plus", Interval::Monthly).await;
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    app.settle_billing().await;
    let month_grants: Vec<(String, u64)> = plan_grants(&app, ws)
        .await
        .into_iter()
        .filter(|(id, _)| id.starts_with("refresh:"))
        .collect();
    assert_eq!(month_grants.len(), 1, "{month_grants:?}");
    // What stays: the hour of month 2 used at generative's level and plus's first month,
    // not generative's whole month 2 (900) on top of the time credited to the balance.
    let catalog = app.ledger.catalog.clone();
    let plus = catalog.plan("plus").unwrap().monthly_credits.get();
    let kept = app.available(ws).await;
    assert!(kept <= plus + 5, "kept {kept}: {month_grants:?}");
    // And never less than the new plan's month, to a credit of rounding on each line.
    assert!(kept + 5 >= plus, "kept {kept}: {month_grants:?}");
    // Again: nothing twice.
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    assert_eq!(app.available(ws).await, kept);
}

#[tokio::test]
async fn a_renewal_is_charged_an_hour_after_its_draft_and_an_upgrade_meanwhile_is_billed_apart() {
    let app = TestApp::new();
    let sub = app.subscribe("org_draft", "max", "monthly").await;
    // The period runs Nov 1 12:00 -> Dec 1 12:00: at its end Stripe makes a draft.
    app.advance_clock(serde_json::json!({"until": "2026-12-01T12:00:00Z"}))
        .await;
    let draft = app
        .sim_events("invoice.created")
        .into_iter()
        .rfind(|i| i["billing_reason"] == "subscription_cycle")
        .unwrap();
    assert_eq!(draft["status"], "draft");
    let finalizes = draft["automatically_finalizes_at"].as_i64().unwrap();
    assert_eq!(finalizes - draft["created"].as_i64().unwrap(), 3_600);
    assert!(
        app.sim_events("invoice.paid")
            .iter()
            .all(|i| i["billing_reason"] != "subscription_cycle"),
        "nothing charged yet"
    );
    assert_eq!(plan_grants(&app, "org_draft").await.len(), 1);
    // An upgrade in that hour is invoiced and paid on its own, at once.
    let up = app.change_plan("org_draft", "team", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    app.settle_billing().await;
    let change = up.body["credits_granted"].as_u64().unwrap();
    // Then the draft is finalized and charged, with the lines it was made with.
    app.renew(&sub).await;
    let paid: Vec<_> = app
        .sim_events("invoice.paid")
        .into_iter()
        .filter(|i| i["billing_reason"] == "subscription_cycle")
        .collect();
    assert_eq!(paid.len(), 1, "{paid:#?}");
    assert_eq!(paid[0]["id"], draft["id"]);
    assert_eq!(
        paid[0]["status_transitions"]["paid_at"].as_i64().unwrap(),
        finalizes
    );
    // The month is the new plan's: the renewal's old-plan month and the change's
    // difference, never a month of each.
    let grants = plan_grants(&app, "org_draft").await;
    assert_eq!(grants.len(), 3, "sign-up, change, renewal: {grants:#?}");
    let renewal = grants
        .iter()
        .find(|(key, _)| key.contains(draft["id"].as_str().unwrap()))
        .unwrap();
    assert_eq!(renewal.1, 400, "the renewal grants what it billed");
    let month = renewal.1 + change;
    assert!((5_900..=6_000).contains(&month), "{month}");
    assert!(app.local.billing_queue.dead_letters().is_empty());
    // The renewal's lines were made before the upgrade: paid after it, they do not put the
    // subscription (and the benefits the plan gives) back on the old plan.
    let o = tally_tests::owner("org_draft");
    let shown = app.get("/v1/subscription", &o).await.body;
    assert_eq!(shown["subscription"]["plan"], "team", "{shown:#}");
    assert_eq!(shown["subscription"]["status"], "active", "{shown:#}");
    let state = app
        .ledger
        .workspace_now(&tally_tests::workspace("org_draft"))
        .await
        .unwrap();
    let plan = state.plan.expect("the ledger knows the plan");
    assert_eq!(plan.plan, "team", "{plan:?}");
}

#[tokio::test]
async fn a_renewal_drafted_before_a_pause_is_still_charged_and_grants_its_month() {
    let app = TestApp::new();
    app.subscribe("org_dp", "max", "monthly").await;
    app.advance_clock(serde_json::json!({"until": "2026-12-01T12:30:00Z"}))
        .await;
    let p = app
        .post(
            "/v1/subscription/pause",
            &owner("org_dp"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(p.status.as_u16(), 200, "{:#}", p.body);
    advance_days(&app, 1).await;
    // Stripe collects an invoice created before the pause; the pause voids later ones.
    let cycle = |kind: &str| {
        app.sim_events(kind)
            .into_iter()
            .filter(|i| i["billing_reason"] == "subscription_cycle")
            .count()
    };
    assert_eq!(cycle("invoice.paid"), 1);
    assert_eq!(cycle("invoice.voided"), 0);
    assert_eq!(plan_grants(&app, "org_dp").await.len(), 2);
    advance_days(&app, 31).await;
    assert_eq!(cycle("invoice.paid"), 1);
    assert_eq!(
        cycle("invoice.voided"),
        1,
        "the next renewal, made while paused"
    );
    assert_eq!(plan_grants(&app, "org_dp").await.len(), 2);
}

/// A change's paid invoice sent again two renewals later (resent by hand from Stripe's
/// dashboard, or a dead letter redriven a month on) bills a period no longer kept. One
/// applied before is acknowledged and changes nothing; one never applied, or stopped half
/// way, goes to the dead-letter queue for a person, and grants nothing.
#[tokio::test]
async fn a_change_invoice_sent_again_after_two_renewals_is_a_duplicate_or_goes_to_a_person() {
    let app = TestApp::new();
    let sub = app.subscribe("org_resent", "plus", "monthly").await;
    let up = app.change_plan("org_resent", "max", "monthly").await;
    assert_eq!(up.body["effective"], "now", "{:#}", up.body);
    app.settle_billing().await;
    app.renew(&sub).await;
    app.renew(&sub).await;
    let change = app.sim_event("invoice.paid", |i| {
        i["billing_reason"] == "subscription_update"
    });
    let available = app.available("org_resent").await;
    let entries = app.entry_count("org_resent").await;

    let again = app
        .dashboard(&format!("/sim/events/{}/redeliver", change.id), json!({}))
        .await;
    assert!(again.status.is_success(), "{:#}", again.body);
    app.settle_billing().await;
    assert!(app.local.billing_queue.dead_letters().is_empty());
    assert_eq!(app.available("org_resent").await, available);
    assert_eq!(app.entry_count("org_resent").await, entries);

    // One that stopped half way (its steps not all done): for a person too.
    let invoice: tally::ids::InvoiceId = change.payload["data"]["object"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    tally::store::docs::update(
        app.docs.as_ref(),
        &tally::billing::refunds::invoice_lots_pk(&invoice),
        tally::billing::refunds::LINK_SK,
        |l: Option<tally::billing::refunds::InvoiceLots>| {
            let mut l = l.expect("the change's invoice is linked");
            assert!(l.applied);
            l.applied = false;
            Some(l)
        },
    )
    .await
    .unwrap();
    app.dashboard(&format!("/sim/events/{}/redeliver", change.id), json!({}))
        .await;
    app.settle_billing().await;
    let dead = app.local.billing_queue.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");

    // The same invoice under an id Tally never saw: never applied.
    let mut never = change.payload.clone();
    never["id"] = json!("evt_never_applied_change");
    never["data"]["object"]["id"] = json!("in_never_applied_change");
    assert_eq!(app.deliver_signed(&never).await, 200);
    app.settle_billing().await;
    let dead = app.local.billing_queue.dead_letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead[1].body.contains("in_never_applied_change"));
    assert_eq!(app.available("org_resent").await, available);
    assert_eq!(app.entry_count("org_resent").await, entries);
}

/// A yearly month the credit refresh granted but could not link to the year's invoice
/// (the job failed in between), and the year refunded in full before the job ran again:
/// the retry grants nothing (nothing is paid for any more) but links the month it
/// granted, so the refund takes those credits back too.
#[tokio::test]
async fn a_month_granted_but_not_linked_is_taken_back_by_a_refund_before_the_retry() {
    use tally::clock::Clock;
    let app = TestApp::new();
    let ws = "org_unlinked";
    let start = app.clock.now();
    app.subscribe(ws, "max", "yearly").await;
    let sim = app.local.simulator.as_ref().unwrap();
    sim.set_schedule(std::sync::Arc::new(tally_local::simulator::NoSchedule));
    let month = tally::subscriptions::calendar::add_months(start, 1);
    app.advance_clock(json!({ "until": month + chrono::Duration::hours(1) }))
        .await;
    assert_eq!(
        app.available(ws).await,
        400,
        "month 2 waits for the refresh"
    );
    // The first write of the year's lot links fails.
    let failing: std::sync::Arc<dyn tally::store::DocStore> = tally_tests::OnWrite::new(
        app.docs.clone(),
        |pk, _| pk.starts_with("INVOICE_LOTS#"),
        tally_tests::fails_first_write(),
    );
    assert!(
        tally::refresh::run_due(&app.ledger, &failing, app.clock.now())
            .await
            .is_err()
    );
    assert_eq!(app.available(ws).await, 800, "month 2 granted, not linked");
    // The year's payment refunded in full.
    let charge = app
        .sim_events("charge.succeeded")
        .iter()
        .find(|c| c["amount"].as_i64().is_some_and(|a| a > 0))
        .and_then(|c| c["id"].as_str().map(str::to_owned))
        .expect("the year's charge");
    let refund = app
        .dashboard(&format!("/sim/charges/{charge}/refund"), json!({}))
        .await;
    assert_eq!(refund.status.as_u16(), 200, "{:#}", refund.body);
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    app.settle_billing().await;
    assert_eq!(
        app.available(ws).await,
        0,
        "every credit the refunded year bought is taken back"
    );
    // Nothing granted or taken twice when the refresh runs again.
    tally::refresh::run_due(&app.ledger, &app.docs, app.clock.now())
        .await
        .unwrap();
    assert_eq!(app.available(ws).await, 0);
    assert_eq!(
        plan_grants(&app, ws)
            .await
            .iter()
            .filter(|(id, _)| id.starts_with("refresh:"))
            .count(),
        1
    );
}
