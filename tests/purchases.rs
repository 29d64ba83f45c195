//! Buying through the local system: checkout, the simulated Stripe page, signed events
//! through the webhook and billing queue, credits at once and exactly once.

use axum::http::Method;
use serde_json::{Value, json};
use tally_tests::{TestApp, member, owner};

mod lambda_events;

async fn checkout(app: &TestApp, tok: &str, body: Value) -> Value {
    let a = app.post("/v1/checkout/sessions", tok, body).await;
    assert_eq!(a.status.as_u16(), 201, "{:#}", a.body);
    a.body
}

/// The owner of `ws` buys one `pack` on the simulated page (which saves the card); returns
/// the owner's token.
async fn buy_pack(app: &TestApp, ws: &str, pack: &str) -> String {
    let o = owner(ws);
    let s = checkout(app, &o, json!({"kind": "pack", "pack": pack})).await;
    app.pay(s["url"].as_str().unwrap()).await;
    o
}

/// The add-on credits on the balance of the workspace owned by `o`.
async fn addon_credits(app: &TestApp, o: &str) -> u64 {
    let lots = app.get("/v1/balance", o).await.body["lots"].clone();
    lots.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["source"] == "addon")
        .map(|l| l["remaining"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn buying_packs_credits_them_at_once_and_only_once() {
    let app = TestApp::new();
    let o = owner("org_p");
    let s = checkout(
        &app,
        &o,
        json!({"kind": "pack", "pack": "pack_500", "quantity": 2}),
    )
    .await;
    assert!(
        s["url"]
            .as_str()
            .unwrap()
            .starts_with("http://tally.test/sim/checkout/cs_")
    );
    assert_eq!(app.available("org_p").await, 0, "nothing before payment");
    assert_eq!(app.pay(s["url"].as_str().unwrap()).await, 303);
    assert_eq!(app.available("org_p").await, 1000);
    let sim = app.local.simulator.as_ref().unwrap();
    let kinds: Vec<String> = sim.events().iter().map(|e| e.kind.clone()).collect();
    // Checkout's post-payment invoice documents the purchase; it grants nothing itself, nor
    // does the payment intent (only a top-up's grants).
    assert_eq!(
        kinds,
        vec![
            "charge.succeeded",
            "payment_intent.succeeded",
            "invoice.finalized",
            "invoice.paid",
            "invoice_payment.paid",
            "checkout.session.completed"
        ]
    );
    assert!(sim.events().iter().all(|e| e.delivered_status == 200));
    // Paying again and redelivering every event change nothing.
    app.pay(s["url"].as_str().unwrap()).await;
    for e in sim.events() {
        let r = app
            .send(
                Method::POST,
                &format!("/sim/events/{}/redeliver", e.id),
                None,
                None,
                &[],
            )
            .await;
        assert_eq!(r.body["delivered_status"], 200);
    }
    app.settle_billing().await;
    assert_eq!(app.available("org_p").await, 1000);
    let listed = app.send(Method::GET, "/sim/events", None, None, &[]).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 6);
    assert_eq!(
        listed.body[5]["payload"]["data"]["object"]["metadata"]["pack"],
        "pack_500"
    );
    // The purchase has a paid invoice with a PDF that resolves locally.
    let inv = app.get("/v1/invoices", &o).await.body;
    assert_eq!(inv["items"].as_array().unwrap().len(), 1, "{inv:#}");
    assert_eq!(inv["items"][0]["status"], "paid");
    assert_eq!(inv["items"][0]["amount_paid"], 2 * 4100);
    let pdf = inv["items"][0]["invoice_pdf"].as_str().unwrap();
    let pdf = app
        .send(
            Method::GET,
            pdf.strip_prefix("http://tally.test").unwrap(),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(pdf.status.as_u16(), 200);
    assert_eq!(pdf.content_type, "application/pdf");
    let lots = app.get("/v1/balance", &o).await.body["lots"].clone();
    assert_eq!(lots[0]["source"], "pack");
    assert!(lots[0]["expires_at"].is_null(), "packs never expire");
    assert!(app.local.billing_queue.dead_letters().is_empty());
}

/// Every plan session paid is a subscription: two paid would be two subscriptions, each
/// charged every period. A new plan checkout expires the older open ones, and one paid
/// but not yet seen by the ledger stops the next.
#[tokio::test]
async fn only_the_latest_plan_checkout_can_be_paid_and_none_after_a_subscription() {
    let app = TestApp::new();
    let o = owner("org_two");
    let plan = |plan: &str| json!({"kind": "plan", "plan": plan, "interval": "monthly"});
    let first = checkout(&app, &o, plan("max")).await;
    let pack = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_100"})).await;
    let second = checkout(&app, &o, plan("plus")).await;
    let path = |s: &Value| {
        s["url"]
            .as_str()
            .unwrap()
            .strip_prefix("http://tally.test")
            .unwrap()
            .to_owned()
    };
    // The older plan session (another tab) can no longer be paid; the pack's still can.
    let stale = app
        .send(
            Method::POST,
            &format!("{}/pay", path(&first)),
            None,
            Some(""),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(stale.status.as_u16(), 410);
    // Paid, its events acknowledged but not applied: the ledger knows no plan yet.
    assert_eq!(
        app.pay_acknowledged(second["url"].as_str().unwrap()).await,
        303
    );
    let third = app.post("/v1/checkout/sessions", &o, plan("team")).await;
    third.assert_problem(409, "conflict");
    assert!(
        third.body["detail"].as_str().unwrap().contains("sub_"),
        "{}",
        third.body
    );
    // A retry of the same request keeps its own session.
    let app = &app;
    let keyed = |key: &'static str| async move {
        app.send(
            Method::POST,
            "/v1/checkout/sessions",
            Some(&owner("org_solo")),
            Some(&plan("max").to_string()),
            &[("idempotency-key", key)],
        )
        .await
    };
    let a = keyed("tab-1").await;
    assert_eq!(a.status.as_u16(), 201, "{}", a.body);
    assert_eq!(keyed("tab-1").await.body["id"], a.body["id"]);
    let b = keyed("tab-2").await;
    assert_ne!(b.body["id"], a.body["id"]);
    app.settle_billing().await;
    assert_eq!(app.pay(pack["url"].as_str().unwrap()).await, 303);
    assert_eq!(app.available("org_two").await, 150 + 100);
    let subs = app
        .sim_events("customer.subscription.created")
        .into_iter()
        .filter(|s| s["metadata"]["org_id"] == "org_two")
        .count();
    assert_eq!(subs, 1);
}

/// Checkout makes a subscription incomplete and activates it once its first invoice is
/// paid (`customer.subscription.created` says incomplete, an update says active), in one
/// second. Stripe promises no order and its event ids do not follow time: whether the
/// incomplete creation comes first or last, with the id that wins a tie of the second,
/// the paid plan shows active and gives its benefits and its credits.
#[tokio::test]
async fn a_checkouts_incomplete_creation_never_outlasts_its_activation() {
    let app = TestApp::new();
    let sim = app.local.simulator.as_ref().unwrap();
    for (ws, reversed) in [("org_reversed", true), ("org_in_order", false)] {
        let o = owner(ws);
        let s = app
            .post(
                "/v1/checkout/sessions",
                &o,
                json!({"kind": "plan", "plan": "max", "interval": "monthly"}),
            )
            .await;
        assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
        sim.hold_deliveries();
        app.pay_acknowledged(s.body["url"].as_str().unwrap()).await;
        let created = |e: &Value| e["type"] == "customer.subscription.created";
        let delivered = sim
            .release_deliveries(|held| {
                assert!(
                    held.iter()
                        .any(|e| created(e) && e["data"]["object"]["status"] == "incomplete"),
                    "{held:#?}"
                );
                if reversed {
                    held.reverse();
                }
                let creation = held.iter_mut().find(|e| created(e)).unwrap();
                // This one sorts after the others of its second: it wins a tie.
                creation["id"] = json!(format!("evt_zzzzzzzzzzzzzzzzzzzz{ws}"));
            })
            .await;
        assert!(delivered > 0);
        app.settle_billing().await;
        let ent = app.get("/v1/entitlements", &o).await.body;
        assert_eq!(ent["plan"]["status"], "active", "{ws}: {ent:#}");
        assert_eq!(ent["pack_discount_pct"], 20, "{ws}: {ent:#}");
        assert_eq!(app.available(ws).await, 400, "{ws}");
    }
}

#[tokio::test]
async fn subscribing_grants_the_plan_credits_records_the_invoice_and_discounts_packs() {
    let app = TestApp::new();
    let o = owner("org_s");
    let s = checkout(
        &app,
        &o,
        json!({"kind": "plan", "plan": "max", "interval": "monthly"}),
    )
    .await;
    app.pay(s["url"].as_str().unwrap()).await;
    assert_eq!(app.available("org_s").await, 400);
    let ent = app.get("/v1/entitlements", &o).await.body;
    assert_eq!(
        (ent["plan"]["plan"].as_str(), ent["plan"]["status"].as_str()),
        (Some("max"), Some("active"))
    );
    let sub = app.get("/v1/subscription", &o).await.body;
    assert_eq!(sub["subscription"]["plan"], "max");
    assert!(sub["customer"].as_str().unwrap().starts_with("cus_"));
    let inv = app.get("/v1/invoices", &o).await.body;
    assert_eq!(inv["items"].as_array().unwrap().len(), 1);
    assert_eq!(inv["items"][0]["status"], "paid");
    assert_eq!(inv["items"][0]["amount_paid"], 2900);
    assert!(
        inv["items"][0]["invoice_pdf"]
            .as_str()
            .unwrap()
            .ends_with(".pdf")
    );
    // A second plan checkout is refused: plan changes go through the subscription.
    app.post(
        "/v1/checkout/sessions",
        &o,
        json!({"kind": "plan", "plan": "team", "interval": "yearly"}),
    )
    .await
    .assert_problem(409, "conflict");
    // Max members get 20% off packs: 4100 -> 3280 cents.
    let p = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_500"})).await;
    let path = p["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://tally.test")
        .unwrap()
        .to_owned();
    let page = app.send(Method::GET, &path, None, None, &[]).await;
    assert!(
        page.body.as_str().unwrap().contains("$32.80"),
        "{}",
        page.body
    );
    app.pay(p["url"].as_str().unwrap()).await;
    assert_eq!(app.available("org_s").await, 900);
    let portal = app.post("/v1/billing-portal", &o, json!({})).await;
    assert_eq!(portal.status.as_u16(), 201);
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_checkout_session() {
    let app = TestApp::new();
    let o = owner("org_i");
    let body = json!({"kind": "pack", "pack": "pack_100"}).to_string();
    let a = app
        .send(
            Method::POST,
            "/v1/checkout/sessions",
            Some(&o),
            Some(&body),
            &[("idempotency-key", "buy-1")],
        )
        .await;
    let b = app
        .send(
            Method::POST,
            "/v1/checkout/sessions",
            Some(&o),
            Some(&body),
            &[("idempotency-key", "buy-1")],
        )
        .await;
    assert_eq!(a.body["id"], b.body["id"]);
    let c = app
        .send(
            Method::POST,
            "/v1/checkout/sessions",
            Some(&o),
            Some(&body),
            &[("idempotency-key", "buy-2")],
        )
        .await;
    assert_ne!(a.body["id"], c.body["id"]);
    // A refused order leaves its key free for the corrected one; once that is answered,
    // the key is its own.
    let send = |body: Value| {
        let app = &app;
        let o = o.clone();
        async move {
            app.send(
                Method::POST,
                "/v1/checkout/sessions",
                Some(&o),
                Some(&body.to_string()),
                &[("idempotency-key", "buy-3")],
            )
            .await
        }
    };
    send(json!({"kind": "pack", "pack": "pack_999"}))
        .await
        .assert_problem(422, "validation_failed");
    let corrected = send(json!({"kind": "pack", "pack": "pack_100"})).await;
    assert_eq!(corrected.status.as_u16(), 201, "{:#}", corrected.body);
    send(json!({"kind": "pack", "pack": "pack_500"}))
        .await
        .assert_problem(409, "conflict");
}

#[tokio::test]
async fn only_owners_and_billing_admins_buy_and_bad_orders_are_refused() {
    let app = TestApp::new();
    let m = member("org_b", "m1");
    app.post(
        "/v1/checkout/sessions",
        &m,
        json!({"kind": "pack", "pack": "pack_100"}),
    )
    .await
    .assert_problem(403, "forbidden");
    app.get("/v1/invoices", &m)
        .await
        .assert_problem(403, "forbidden");
    app.get("/v1/subscription", &m)
        .await
        .assert_problem(403, "forbidden");
    let admin =
        tally_tests::token(json!({"sub": "fin", "org_id": "org_b", "role": "billing_admin"}));
    let o = owner("org_b");
    for (body, status) in [
        (json!({"kind": "pack", "pack": "pack_7"}), 422),
        (
            json!({"kind": "pack", "pack": "pack_100", "quantity": 0}),
            422,
        ),
        (
            json!({"kind": "pack", "pack": "pack_100", "quantity": 101}),
            422,
        ),
        (
            json!({"kind": "pack", "pack": "pack_100", "quantity": -1}),
            422,
        ),
        (
            json!({"kind": "plan", "plan": "max", "interval": "weekly"}),
            422,
        ),
        (
            json!({"kind": "plan", "plan": "ultra", "interval": "monthly"}),
            422,
        ),
        (json!({"kind": "gift", "pack": "pack_100"}), 422),
        (json!({"kind": "pack", "pack": "pack_100", "price": 1}), 422),
    ] {
        let a = app
            .post("/v1/checkout/sessions", &admin, body.clone())
            .await;
        assert_eq!(a.status.as_u16(), status, "{body} -> {:#}", a.body);
        assert_eq!(a.content_type, "application/problem+json");
    }
    app.send(
        Method::POST,
        "/v1/checkout/sessions",
        Some(&o),
        Some("{oops"),
        &[],
    )
    .await
    .assert_problem(400, "malformed_request");
    app.post("/v1/billing-portal", &o, json!({}))
        .await
        .assert_problem(404, "not_found");
    assert!(app.local.simulator.as_ref().unwrap().events().is_empty());
    assert_eq!(app.available("org_b").await, 0);
    let ok = app
        .post(
            "/v1/checkout/sessions",
            &admin,
            json!({"kind": "pack", "pack": "pack_100"}),
        )
        .await;
    assert_eq!(ok.status.as_u16(), 201);
}

#[tokio::test]
async fn forged_and_stale_deliveries_to_the_local_webhook_change_nothing() {
    let app = TestApp::new();
    buy_pack(&app, "org_f", "pack_500").await;
    let sim = app.local.simulator.as_ref().unwrap();
    let completed = sim
        .events()
        .into_iter()
        .find(|e| e.kind == "checkout.session.completed")
        .unwrap();
    // The same event re-sent with a new id and another session: forged, then stale.
    let mut forged = completed.payload.clone();
    forged["id"] = json!("evt_forged");
    forged["data"]["object"]["id"] = json!("cs_forged");
    let body = forged.to_string();
    // Signatures are checked against the local system's clock.
    use tally::clock::Clock;
    let now = app.clock.now().timestamp();
    for sig in [
        tally_local::simulator::stripe_signature(&body, "whsec_wrong", now),
        tally_local::simulator::stripe_signature(&body, tally_tests::WEBHOOK_SECRET, now - 600),
        "t=1,v1=00".to_string(),
    ] {
        let a = app
            .send(
                Method::POST,
                "/webhooks/stripe",
                None,
                Some(&body),
                &[
                    ("stripe-signature", &sig),
                    ("content-type", "application/json"),
                ],
            )
            .await;
        a.assert_problem(400, "invalid_signature");
    }
    let unsigned = app
        .send(
            Method::POST,
            "/webhooks/stripe",
            None,
            Some(&body),
            &[("content-type", "application/json")],
        )
        .await;
    unsigned.assert_problem(400, "invalid_signature");
    app.settle_billing().await;
    assert_eq!(app.available("org_f").await, 500);
}

/// Billing movements are dated to the second, as Stripe dates them: a range bound within a
/// second counts the movement of that second as before it (`to` includes it, `from` does
/// not), not as at it.
#[tokio::test]
async fn billing_history_ranges_bounded_within_a_second_place_its_movements_right() {
    let app = TestApp::new();
    let ws = "org_subsecond";
    let url = app.open_pack_checkout(ws, "pack_100").await;
    app.pay(&format!("http://tally.test{url}")).await;
    let at = tally::clock::Clock::now(app.clock.as_ref());
    let half = (at + chrono::Duration::milliseconds(500))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let count = |q: String| {
        let app = &app;
        async move {
            let r = app
                .get(&format!("/v1/billing/history?{q}"), &owner(ws))
                .await;
            assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
            r.body["items"].as_array().unwrap().len()
        }
    };
    let all = count(String::new()).await;
    assert!(all > 0);
    assert_eq!(count(format!("to={half}")).await, all);
    assert_eq!(count(format!("from={half}")).await, 0);
}

mod subscription {
    //! Plan changes, add-on units, cancel, resume and pause, through the simulator.
    use super::*;

    async fn plan_of(app: &TestApp, ws: &str) -> Value {
        app.get("/v1/entitlements", &owner(ws)).await.body["plan"].clone()
    }

    async fn renew(app: &TestApp, sub: &str) {
        app.renew(sub).await;
    }

    #[tokio::test]
    async fn an_upgrade_applies_now_and_grants_the_difference_at_once() {
        let app = TestApp::new();
        app.subscribe("org_u", "max", "monthly").await;
        let o = owner("org_u");
        let r = app
            .post(
                "/v1/subscription/change",
                &o,
                json!({"plan": "generative", "interval": "monthly"}),
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        assert_eq!(r.body["effective"], "now");
        // Upgraded at the start of the period: the whole difference, 900 - 400.
        let granted = r.body["credits_granted"].as_u64().unwrap();
        assert!((499..=500).contains(&granted), "{granted}");
        app.settle_billing().await;
        assert_eq!(app.available("org_u").await, 400 + granted);
        assert_eq!(plan_of(&app, "org_u").await["plan"], "generative");
        // Asking again changes nothing and grants nothing more.
        let again = app
            .post(
                "/v1/subscription/change",
                &o,
                json!({"plan": "generative", "interval": "monthly"}),
            )
            .await;
        assert_eq!(again.body["credits_granted"], 0);
        app.settle_billing().await;
        assert_eq!(app.available("org_u").await, 400 + granted);
        let invoices = app.get("/v1/invoices", &o).await.body;
        assert!(
            invoices["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["billing_reason"] == "subscription_update")
        );
    }

    #[tokio::test]
    async fn quick_successive_upgrades_grant_the_total_difference_once() {
        let app = TestApp::new();
        app.subscribe("org_q", "plus", "monthly").await;
        let o = owner("org_q");
        // No waiting for Stripe's events between the two changes.
        let a = app
            .post(
                "/v1/subscription/change",
                &o,
                json!({"plan": "max", "interval": "monthly"}),
            )
            .await;
        let b = app
            .post(
                "/v1/subscription/change",
                &o,
                json!({"plan": "generative", "interval": "monthly"}),
            )
            .await;
        let granted = a.body["credits_granted"].as_u64().unwrap()
            + b.body["credits_granted"].as_u64().unwrap();
        assert!(
            (749..=750).contains(&granted),
            "900 - 150, not (400 - 150) + (900 - 150): {granted}"
        );
        // Units the same way: 0 -> 3 -> 5 grants five units, not eight.
        let u3 = app
            .send(
                Method::PUT,
                "/v1/subscription/addons",
                Some(&o),
                Some(&json!({"units": 3}).to_string()),
                &[],
            )
            .await;
        let u5 = app
            .send(
                Method::PUT,
                "/v1/subscription/addons",
                Some(&o),
                Some(&json!({"units": 5}).to_string()),
                &[],
            )
            .await;
        assert_eq!(
            u3.body["credits_granted"].as_u64().unwrap()
                + u5.body["credits_granted"].as_u64().unwrap(),
            5 * 60
        );
        app.settle_billing().await;
        assert_eq!(app.available("org_q").await, 150 + granted + 300);
    }

    #[tokio::test]
    async fn a_downgrade_keeps_the_current_plan_until_renewal_then_grants_the_new_allowance() {
        let app = TestApp::new();
        let sub = app.subscribe("org_d", "generative", "monthly").await;
        let o = owner("org_d");
        let r = app
            .post(
                "/v1/subscription/change",
                &o,
                json!({"plan": "plus", "interval": "monthly"}),
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.body["effective"].as_str()),
            (200, Some("at_renewal"))
        );
        app.settle_billing().await;
        assert_eq!(
            plan_of(&app, "org_d").await["plan"],
            "generative",
            "benefits kept"
        );
        let s = app.get("/v1/subscription", &o).await.body["subscription"].clone();
        assert_eq!(s["scheduled"]["plan"], "plus");
        assert_eq!(app.available("org_d").await, 900);
        renew(&app, &sub).await;
        assert_eq!(plan_of(&app, "org_d").await["plan"], "plus");
        // The renewal grants Plus's allowance; Generative's credits roll over.
        assert_eq!(app.available("org_d").await, 900 + 150);
        assert!(app.get("/v1/subscription", &o).await.body["subscription"]["scheduled"].is_null());
        assert!(app.local.billing_queue.dead_letters().is_empty());
    }

    /// An upgrade Stripe made and charged whose answer was lost (a timeout) while fewer
    /// units waited for the renewal: asked again under the same key, Stripe answers what it
    /// did, and the reduction waits on top of the upgrade. When that answer is lost too,
    /// nothing is put back: the old waiting change (Max) would take the paid upgrade back
    /// at the renewal.
    #[tokio::test]
    async fn an_upgrade_made_but_unanswered_is_not_undone_at_the_renewal() {
        let app = TestApp::new();
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        for (ws, lost) in [("org_lost_once", 1), ("org_lost_twice", 2)] {
            let o = owner(ws);
            app.subscribe(ws, "max", "monthly").await;
            let more = app.set_units(ws, 10).await;
            assert_eq!(more.status.as_u16(), 200, "{:#}", more.body);
            let fewer = app.set_units(ws, 4).await;
            assert_eq!(fewer.status.as_u16(), 200, "{:#}", fewer.body);
            app.settle_billing().await;
            let s = app.get("/v1/subscription", &o).await.body["subscription"].clone();
            assert_eq!(s["scheduled"]["addon_units"], 4, "{s:#}");
            sim.lose_answers(lost);
            let up = app.change_plan(ws, "generative", "monthly").await;
            app.settle_billing().await;
            let s = app.get("/v1/subscription", &o).await.body["subscription"].clone();
            assert_eq!(s["plan"], "generative", "{s:#}");
            if lost == 1 {
                assert_eq!(up.status.as_u16(), 200, "{:#}", up.body);
                assert_eq!(
                    (&s["scheduled"]["plan"], &s["scheduled"]["addon_units"]),
                    (&json!("generative"), &json!(4)),
                    "{s:#}"
                );
            } else {
                assert_eq!(up.status.as_u16(), 503, "{:#}", up.body);
                assert!(
                    s["scheduled"].is_null() || s["scheduled"]["plan"] != "max",
                    "the paid upgrade would be taken back at the renewal: {s:#}"
                );
            }
            renew(&app, s["id"].as_str().unwrap()).await;
            assert_eq!(plan_of(&app, ws).await["plan"], "generative");
        }
    }

    /// A change billed now that first finds Stripe unreachable is sent again, and the card
    /// is declined then: nothing was made, so the change that waited for the renewal is
    /// put back, as after a decline at the first try.
    #[tokio::test]
    async fn a_resent_change_that_is_declined_puts_the_waiting_change_back() {
        let app = TestApp::new();
        let ws = "org_resent_declined";
        let o = owner(ws);
        app.subscribe(ws, "max", "monthly").await;
        assert_eq!(app.set_units(ws, 10).await.status.as_u16(), 200);
        assert_eq!(app.set_units(ws, 4).await.status.as_u16(), 200);
        app.settle_billing().await;
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        let customer = app.get("/v1/subscription", &o).await.body["subscription"]["customer"]
            .as_str()
            .expect("the subscription's customer")
            .to_owned();
        assert!(sim.set_card_declines(&customer, true));
        sim.unreachable_for_updates(1);
        app.change_plan(ws, "generative", "monthly")
            .await
            .assert_problem(502, "payment_provider_error");
        app.settle_billing().await;
        let s = app.get("/v1/subscription", &o).await.body["subscription"].clone();
        assert_eq!(s["plan"], "max", "{s:#}");
        assert_eq!(
            (&s["scheduled"]["plan"], &s["scheduled"]["addon_units"]),
            (&json!("max"), &json!(4)),
            "{s:#}"
        );
    }

    #[tokio::test]
    async fn more_add_on_units_credit_now_fewer_wait_for_renewal_and_back_again_costs_nothing() {
        let app = TestApp::new();
        let sub = app.subscribe("org_a", "max", "monthly").await;
        let o = owner("org_a");
        let more = app
            .send(
                Method::PUT,
                "/v1/subscription/addons",
                Some(&o),
                Some(&json!({"units": 2}).to_string()),
                &[],
            )
            .await;
        assert_eq!(
            (more.status.as_u16(), more.body["credits_granted"].as_u64()),
            (200, Some(120))
        );
        app.settle_billing().await;
        assert_eq!(app.available("org_a").await, 520);
        let fewer = app
            .send(
                Method::PUT,
                "/v1/subscription/addons",
                Some(&o),
                Some(&json!({"units": 1}).to_string()),
                &[],
            )
            .await;
        assert_eq!(fewer.body["effective"], "at_renewal");
        let back = app
            .send(
                Method::PUT,
                "/v1/subscription/addons",
                Some(&o),
                Some(&json!({"units": 2}).to_string()),
                &[],
            )
            .await;
        assert_eq!(
            (
                back.body["effective"].as_str(),
                back.body["credits_granted"].as_u64()
            ),
            (Some("now"), Some(0))
        );
        app.settle_billing().await;
        assert_eq!(app.available("org_a").await, 520);
        app.send(
            Method::PUT,
            "/v1/subscription/addons",
            Some(&o),
            Some(&json!({"units": 1}).to_string()),
            &[],
        )
        .await;
        app.settle_billing().await;
        renew(&app, &sub).await;
        // Next period: 400 plan credits and one unit (60); the old add-on credits lapsed at period end.
        let addon_now = addon_credits(&app, &o).await;
        assert_eq!(
            addon_now, 60,
            "renewing moves the clock to the period end, where the old period's units lapse"
        );
        for bad in [
            json!({"units": 101}),
            json!({"units": -1}),
            json!({"units": "2"}),
            json!({}),
        ] {
            let a = app
                .send(
                    Method::PUT,
                    "/v1/subscription/addons",
                    Some(&o),
                    Some(&bad.to_string()),
                    &[],
                )
                .await;
            a.assert_problem(422, "validation_failed");
        }
    }

    #[tokio::test]
    async fn cancel_keeps_access_until_period_end_resume_undoes_it_and_pause_pauses() {
        let app = TestApp::new();
        app.subscribe("org_c", "max", "monthly").await;
        let o = owner("org_c");
        // These routes take no body: one that is not JSON, malformed, or names a field is
        // refused and changes nothing (a request meant for another route is not taken).
        for (path, body, status) in [
            ("/v1/subscription/cancel", "{", 400),
            (
                "/v1/subscription/cancel",
                r#"{"cancel_at_period_end":false}"#,
                422,
            ),
            ("/v1/subscription/pause", "[]", 422),
            ("/v1/subscription/resume", r#"{"x":1}"#, 422),
            ("/v1/billing-portal", "{", 400),
        ] {
            let a = app
                .send(
                    Method::POST,
                    path,
                    Some(&o),
                    Some(body),
                    &[("content-type", "application/json")],
                )
                .await;
            assert_eq!(a.status.as_u16(), status, "{path} {body}: {:#}", a.body);
            assert_eq!(a.content_type, "application/problem+json");
        }
        let plain = app
            .send(
                Method::POST,
                "/v1/subscription/cancel",
                Some(&o),
                Some("x"),
                &[("content-type", "text/plain")],
            )
            .await;
        assert_eq!(plain.status.as_u16(), 415, "{:#}", plain.body);
        app.settle_billing().await;
        let p = plan_of(&app, "org_c").await;
        assert_eq!(p["cancel_at_period_end"].as_bool(), Some(false), "{p:#}");
        let c = app.post("/v1/subscription/cancel", &o, json!({})).await;
        assert_eq!(c.body["cancel_at_period_end"], true);
        app.settle_billing().await;
        let p = plan_of(&app, "org_c").await;
        assert_eq!(
            (p["status"].as_str(), p["cancel_at_period_end"].as_bool()),
            (Some("active"), Some(true))
        );
        app.post("/v1/subscription/resume", &o, json!({})).await;
        app.settle_billing().await;
        assert_eq!(plan_of(&app, "org_c").await["cancel_at_period_end"], false);
        app.post("/v1/subscription/pause", &o, json!({})).await;
        app.settle_billing().await;
        assert_eq!(plan_of(&app, "org_c").await["status"], "paused");
        // No upgrade (and no upgrade credits) while nothing is being collected.
        app.change_plan("org_c", "team", "monthly")
            .await
            .assert_problem(409, "conflict");
        app.set_units("org_c", 1)
            .await
            .assert_problem(409, "conflict");
        app.post("/v1/subscription/resume", &o, json!({})).await;
        app.settle_billing().await;
        assert_eq!(plan_of(&app, "org_c").await["status"], "active");
        assert_eq!(app.available("org_c").await, 400, "no credits moved");
    }

    /// Stripe refuses any cancellation setting on a subscription a schedule manages: a
    /// paused subscription with a downgrade waiting for the renewal still resumes, and a
    /// subscription set to cancel takes no change until it is resumed.
    #[tokio::test]
    async fn a_paused_subscription_with_a_waiting_downgrade_resumes_and_a_canceling_one_takes_no_change()
     {
        let app = TestApp::new();
        let ws = "org_pd";
        app.subscribe(ws, "max", "monthly").await;
        let o = owner(ws);
        let r = app.change_plan(ws, "plus", "monthly").await;
        assert_eq!(r.body["effective"], "at_renewal", "{:#}", r.body);
        let p = app.post("/v1/subscription/pause", &o, json!({})).await;
        assert_eq!(p.status.as_u16(), 200, "{:#}", p.body);
        let r = app.post("/v1/subscription/resume", &o, json!({})).await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        assert_eq!(r.body["paused"], false);
        app.settle_billing().await;
        assert_eq!(plan_of(&app, ws).await["status"], "active");
        let s = app.get("/v1/subscription", &o).await.body["subscription"].clone();
        assert_eq!(
            s["scheduled"]["plan"], "plus",
            "the downgrade still waits: {s:#}"
        );
        // Resuming what is not paused or canceled asks nothing of Stripe.
        let again = app.post("/v1/subscription/resume", &o, json!({})).await;
        assert_eq!(again.status.as_u16(), 200, "{:#}", again.body);

        // Canceled at the period end (the waiting downgrade goes with it): no change until
        // resumed, neither one for the renewal nor one billed now.
        let c = app.post("/v1/subscription/cancel", &o, json!({})).await;
        assert_eq!(c.body["cancel_at_period_end"], true, "{:#}", c.body);
        let before = app.available(ws).await;
        for (plan, interval) in [("plus", "monthly"), ("max", "yearly")] {
            app.change_plan(ws, plan, interval)
                .await
                .assert_problem(409, "conflict");
        }
        app.set_units(ws, 1).await.assert_problem(409, "conflict");
        app.settle_billing().await;
        assert_eq!(
            app.available(ws).await,
            before,
            "nothing charged or granted"
        );
        let r = app.post("/v1/subscription/resume", &o, json!({})).await;
        assert_eq!(r.body["cancel_at_period_end"], false, "{:#}", r.body);
        let r = app.change_plan(ws, "plus", "monthly").await;
        assert_eq!(r.body["effective"], "at_renewal", "{:#}", r.body);
        assert!(app.local.billing_queue.dead_letters().is_empty());
    }

    /// `ws` on Max monthly, set to cancel at the period end, with the clock an hour before
    /// it; the owner's token.
    async fn max_ending_in_an_hour(app: &TestApp, ws: &str) -> String {
        app.subscribe(ws, "max", "monthly").await;
        let o = owner(ws);
        let c = app.post("/v1/subscription/cancel", &o, json!({})).await;
        assert_eq!(c.body["cancel_at_period_end"], true, "{:#}", c.body);
        let end: chrono::DateTime<chrono::Utc> = plan_of(app, ws).await["period_end"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        app.advance_clock(json!({"until": end - chrono::Duration::hours(1)}))
            .await;
        o
    }

    /// A pack checkout is priced with the plan's pack discount when it is made, and a
    /// session can be paid for 24 hours: one left open when the plan stops giving the
    /// discount is expired, so the discount is not paid for after the plan that gave it.
    #[tokio::test]
    async fn a_pack_checkout_priced_with_the_plan_discount_cannot_be_paid_after_the_plan_ends() {
        let app = TestApp::new();
        let ws = "org_pk";
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        // An hour before the plan ends: still 20% off (4,100 cents less 20%).
        let o = max_ending_in_an_hour(&app, ws).await;
        let discounted = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_500"})).await;
        let paid = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_100"})).await;
        let page = |url: &Value| {
            url.as_str()
                .unwrap()
                .strip_prefix("http://tally.test")
                .unwrap()
                .to_owned()
        };
        let shown = app
            .send(Method::GET, &page(&discounted["url"]), None, None, &[])
            .await;
        assert!(
            shown.body.as_str().unwrap().contains("$32.80"),
            "{}",
            shown.body
        );
        let before = app.available(ws).await;
        // One of them is paid while the plan still gives the discount: it is credited.
        app.pay(paid["url"].as_str().unwrap()).await;
        assert_eq!(app.available(ws).await, before + 100);
        // The plan ends an hour later, well inside the sessions' 24 hours.
        app.advance_clock(json!({"hours": 2})).await;
        assert_eq!(plan_of(&app, ws).await["status"], "canceled");
        assert!(
            sim.expired(discounted["id"].as_str().unwrap()),
            "the discounted session can no longer be paid"
        );
        let gone = app
            .send(
                Method::POST,
                &format!("{}/pay", page(&discounted["url"])),
                None,
                Some(""),
                &[("content-type", "application/x-www-form-urlencoded")],
            )
            .await;
        assert_eq!(gone.status.as_u16(), 410, "{}", gone.body);
        // A new checkout is at the full price, and can be paid.
        let full = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_500"})).await;
        let shown = app
            .send(Method::GET, &page(&full["url"]), None, None, &[])
            .await;
        assert!(
            shown.body.as_str().unwrap().contains("$41.00"),
            "{}",
            shown.body
        );
        let before = app.available(ws).await;
        app.pay(full["url"].as_str().unwrap()).await;
        assert_eq!(app.available(ws).await, before + 500);
        assert!(app.local.billing_queue.dead_letters().is_empty());
    }

    /// Stripe unreachable while billing-events expires the discounted sessions holds
    /// nothing up: the plan is set, nothing is dead-lettered or retried, and the
    /// workspace's record keeps the discount, so the next time the event (or a later one)
    /// is applied it asks again, and only then lowers the record.
    #[tokio::test]
    async fn a_stripe_failure_while_expiring_discounted_checkouts_is_asked_again_later() {
        use tally::billing::checkouts::{DiscountOffered, OFFERED_SK};
        let app = TestApp::new();
        let ws = "org_pf";
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        let record = || async {
            tally::store::docs::get::<DiscountOffered>(
                app.docs.as_ref(),
                &tally::billing::records::workspace_pk(
                    &tally::ids::WorkspaceId::parse(ws).unwrap(),
                ),
                OFFERED_SK,
            )
            .await
            .unwrap()
        };
        let o = max_ending_in_an_hour(&app, ws).await;
        assert_eq!(record().await, None, "no discounted checkout yet");
        let s = checkout(&app, &o, json!({"kind": "pack", "pack": "pack_500"})).await;
        assert_eq!(record().await.map(|r| r.pct), Some(20));
        // The plan ends while Stripe cannot be reached.
        sim.unreachable_for_expiries(1);
        app.advance_clock(json!({"hours": 2})).await;
        assert_eq!(plan_of(&app, ws).await["status"], "canceled");
        assert!(app.local.billing_queue.dead_letters().is_empty());
        assert!(!sim.expired(s["id"].as_str().unwrap()), "not expired yet");
        assert_eq!(record().await.map(|r| r.pct), Some(20), "asked again later");
        // The cancellation delivered again (a resend from the dashboard): asked again, the
        // session is expired, and the record is lowered.
        let deleted = sim
            .events()
            .into_iter()
            .rev()
            .find(|e| e.kind == "customer.subscription.deleted")
            .expect("the cancellation's event");
        let r = app
            .dashboard(&format!("/sim/events/{}/redeliver", deleted.id), json!({}))
            .await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        assert_eq!(record().await.map(|r| r.pct), Some(0));
        assert!(sim.expired(s["id"].as_str().unwrap()));
        assert!(app.local.billing_queue.dead_letters().is_empty());
    }

    /// A session expired with its discount is not handed out: when the first answer was
    /// lost (Stripe made the session, the request failed), a retry under the same key once
    /// the discount is given again is Stripe's answer for that key, the expired session,
    /// and answers 409 `checkout_expired`; a new key gets a new session.
    #[tokio::test]
    async fn a_checkout_retried_under_the_key_of_an_expired_session_is_refused() {
        let app = TestApp::new();
        let ws = "org_px";
        app.subscribe(ws, "max", "monthly").await;
        let o = owner(ws);
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        let body = json!({"kind": "pack", "pack": "pack_500"}).to_string();
        let ask = |key: &'static str| {
            let (app, o, body) = (&app, o.clone(), body.clone());
            async move {
                app.send(
                    Method::POST,
                    "/v1/checkout/sessions",
                    Some(&o),
                    Some(&body),
                    &[("idempotency-key", key)],
                )
                .await
            }
        };
        let discount = || async {
            app.get("/v1/entitlements", &o).await.body["pack_discount_pct"]
                .as_u64()
                .unwrap()
        };
        sim.lose_answers(1);
        let lost = ask("buy-1").await;
        assert_eq!(lost.status.as_u16(), 503, "{:#}", lost.body);
        assert_eq!(lost.retry_after.as_deref(), Some("2"));
        // Paused, then renewed: the plan gives no discount past its paid period, and the
        // session made for the lost answer is expired.
        app.post("/v1/subscription/pause", &o, json!({})).await;
        let sub = app.get("/v1/subscription", &o).await.body["subscription"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.renew(&sub).await;
        assert_eq!(discount().await, 0);
        // Resumed and renewed (paid): the discount is given again, so the same key and
        // body are the same Stripe request as the lost one.
        let r = app.post("/v1/subscription/resume", &o, json!({})).await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        app.renew(&sub).await;
        assert_eq!(discount().await, 20);
        ask("buy-1").await.assert_problem(409, "checkout_expired");
        let again = ask("buy-2").await;
        assert_eq!(again.status.as_u16(), 201, "{:#}", again.body);
        assert!(!sim.expired(again.body["id"].as_str().unwrap()));
    }

    /// A checkout whose answer was lost (Stripe made the session), asked again under the
    /// same `Idempotency-Key` with another body: the key stays its first request's (whose
    /// work may be done), and the client hears a 409 naming the key, not a provider error;
    /// the same body under that key still gets the session Stripe made.
    #[tokio::test]
    async fn a_key_reused_for_another_checkout_after_a_lost_answer_is_a_conflict() {
        let app = TestApp::new();
        let ws = "org_reuse";
        let o = owner(ws);
        let sim = app.local.simulator.clone().expect("simulated Stripe");
        let ask = |pack: &'static str| {
            let (app, o) = (&app, o.clone());
            async move {
                app.send(
                    Method::POST,
                    "/v1/checkout/sessions",
                    Some(&o),
                    Some(&json!({"kind": "pack", "pack": pack}).to_string()),
                    &[("idempotency-key", "buy-once")],
                )
                .await
            }
        };
        sim.lose_answers(1);
        let lost = ask("pack_100").await;
        assert_eq!(lost.status.as_u16(), 503, "{:#}", lost.body);
        let other = ask("pack_500").await;
        other.assert_problem(409, "conflict");
        assert!(
            other.body["detail"].as_str().unwrap().contains("new key"),
            "{:#}",
            other.body
        );
        let same = ask("pack_100").await;
        assert_eq!(same.status.as_u16(), 201, "{:#}", same.body);
    }

    #[tokio::test]
    async fn subscription_changes_need_a_subscription_and_billing_rights() {
        let app = TestApp::new();
        let o = owner("org_n");
        app.post("/v1/subscription/cancel", &o, json!({}))
            .await
            .assert_problem(404, "not_found");
        app.post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "max", "interval": "monthly"}),
        )
        .await
        .assert_problem(404, "not_found");
        app.subscribe("org_n", "max", "monthly").await;
        app.post(
            "/v1/subscription/change",
            &member("org_n", "m"),
            json!({"plan": "team", "interval": "monthly"}),
        )
        .await
        .assert_problem(403, "forbidden");
        app.post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "mega", "interval": "monthly"}),
        )
        .await
        .assert_problem(422, "validation_failed");
        app.post(
            "/v1/subscription/change",
            &o,
            json!({"plan": "team", "interval": "daily"}),
        )
        .await
        .assert_problem(422, "validation_failed");
        assert_eq!(app.available("org_n").await, 400);
    }
}

/// Pays an invoice on its hosted page (`url`, as Tally answered it), by card.
async fn pay_invoice_page(app: &TestApp, url: &Value) {
    let page = url
        .as_str()
        .unwrap()
        .strip_prefix("http://tally.test")
        .unwrap();
    app.send(
        Method::POST,
        &format!("{page}/pay"),
        None,
        Some(""),
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
}

#[tokio::test]
async fn a_custom_payment_grants_its_credits_once_when_the_invoice_is_paid() {
    let app = TestApp::new();
    let path = "/v1/admin/workspaces/org_e/custom-payments";
    let body =
        json!({"amount_cents": 250000, "credits": 30000, "description": "Enterprise credits, Q1"})
            .to_string();
    let support = tally_tests::support();
    app.send(
        Method::POST,
        path,
        Some(&owner("org_e")),
        Some(&body),
        &[("idempotency-key", "po-1")],
    )
    .await
    .assert_problem(403, "forbidden");
    app.send(Method::POST, path, Some(&support), Some(&body), &[])
        .await
        .assert_problem(422, "validation_failed");
    // A workspace without a Stripe customer (a mistyped id, or no checkout yet) is not
    // billed, and nothing is made for it.
    app.send(
        Method::POST,
        path,
        Some(&support),
        Some(&body),
        &[("idempotency-key", "po-1")],
    )
    .await
    .assert_problem(404, "not_found");
    let profile: Option<tally::billing::records::BillingProfile> = tally::store::docs::get(
        app.docs.as_ref(),
        &tally::billing::records::workspace_pk(&tally_tests::workspace("org_e")),
        tally::billing::records::PROFILE_SK,
    )
    .await
    .unwrap();
    assert!(profile.is_none(), "{profile:?}");
    // The owner opens a checkout: Stripe has a customer with an email to send invoices to.
    let with_email = tally_tests::token(json!({"sub": "org_e-owner", "org_id": "org_e",
        "role": "owner", "email": "owner@org-e.example"}));
    let session = app
        .post(
            "/v1/checkout/sessions",
            &with_email,
            json!({"kind": "pack", "pack": "pack_100", "quantity": 1}),
        )
        .await;
    assert_eq!(session.status.as_u16(), 201, "{:#}", session.body);
    for bad in [
        json!({"amount_cents": 0, "credits": 1, "description": "x"}),
        json!({"amount_cents": 49, "credits": 1, "description": "below Stripe's minimum"}),
        json!({"amount_cents": 100, "credits": 0, "description": "x"}),
        json!({"amount_cents": 100, "credits": 5, "description": " "}),
        json!({"amount_cents": 100, "credits": 5, "description": "x", "days_until_due": 365}),
        json!({"amount_cents": -5, "credits": 5, "description": "x"}),
        json!({"amount_cents": 100_000_000, "credits": 5, "description": "over Stripe's 8 digits"}),
    ] {
        app.send(
            Method::POST,
            path,
            Some(&support),
            Some(&bad.to_string()),
            &[("idempotency-key", "po-bad")],
        )
        .await
        .assert_problem(422, "validation_failed");
    }
    let first = app
        .send(
            Method::POST,
            path,
            Some(&support),
            Some(&body),
            &[("idempotency-key", "po-1")],
        )
        .await;
    assert_eq!(first.status.as_u16(), 201, "{:#}", first.body);
    let again = app
        .send(
            Method::POST,
            path,
            Some(&support),
            Some(&body),
            &[("idempotency-key", "po-1")],
        )
        .await;
    assert_eq!(
        again.body["invoice"], first.body["invoice"],
        "one invoice per key"
    );
    // Who billed it, on the invoice itself.
    let sim = app.local.simulator.as_ref().unwrap();
    let issued = sim
        .invoice(first.body["invoice"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued["metadata"]["issued_by"], "support-1");
    app.settle_billing().await;
    let invoices = app.get("/v1/invoices", &owner("org_e")).await.body;
    assert_eq!(invoices["items"][0]["status"], "open");
    assert_eq!(app.available("org_e").await, 0, "nothing before payment");
    for _ in 0..2 {
        pay_invoice_page(&app, &first.body["hosted_invoice_url"]).await;
    }
    app.settle_billing().await;
    assert_eq!(app.available("org_e").await, 30000);
    let invoices = app.get("/v1/invoices", &owner("org_e")).await.body;
    assert_eq!(invoices["items"][0]["status"], "paid");
    assert_eq!(invoices["items"][0]["amount_paid"], 250000);
    // Paid by card on the page: one charge, tied to the invoice, whose refunds credits follow.
    let invoice = first.body["invoice"].as_str().unwrap();
    let charges: Vec<Value> = app
        .sim_events("charge.succeeded")
        .into_iter()
        .filter(|c| c["amount"] == 250000)
        .collect();
    assert_eq!(charges.len(), 1, "{charges:#?}");
    let links = app.sim_events("invoice_payment.paid");
    let link = links.iter().find(|l| l["invoice"] == invoice).unwrap();
    assert_eq!(
        link["payment"]["payment_intent"],
        charges[0]["payment_intent"]
    );
    let charge = charges[0]["id"].as_str().unwrap();
    let refund = app
        .send(
            Method::POST,
            &format!("/sim/charges/{charge}/refund"),
            None,
            Some(&json!({"amount": 125000}).to_string()),
            &[],
        )
        .await;
    assert_eq!(refund.status.as_u16(), 200, "{:#}", refund.body);
    app.settle_billing().await;
    assert_eq!(app.available("org_e").await, 15000);
}

mod alerts {
    //! Credit alerts once per crossing, and auto top-up with the saved card.
    use super::*;

    fn video() -> Value {
        json!({"workflow": "video", "model": "video-pro", "duration_s": 10, "resolution": "2k"})
    }

    async fn notifications(app: &TestApp) -> Vec<Value> {
        app.local.topups_queue.until_idle().await;
        app.local.notifications_queue.until_idle().await;
        app.settle_billing().await;
        app.local.notifications.all()
    }

    /// `ws` buys a 100-credit pack (which saves its card), then sets `alerts`; returns the
    /// owner's token and the settings as stored.
    async fn with_saved_card(app: &TestApp, ws: &str, alerts: Value) -> (String, Value) {
        let o = buy_pack(app, ws, "pack_100").await;
        let set = save_alerts(app, &o, alerts).await;
        (o, set.body)
    }

    /// The owner `o` saves `alerts`; the answer, a 200.
    async fn save_alerts(app: &TestApp, o: &str, alerts: Value) -> tally_tests::Answer {
        let set = app
            .send(
                Method::PUT,
                "/v1/alerts",
                Some(o),
                Some(&alerts.to_string()),
                &[],
            )
            .await;
        assert_eq!(set.status.as_u16(), 200, "{:#}", set.body);
        set
    }

    fn top_up_below_30() -> Value {
        json!({"below_credits": [], "auto_topup": {"pack": "pack_100", "below_credits": 30}})
    }

    #[tokio::test]
    async fn alerts_fire_once_per_crossing_and_auto_top_up_buys_the_pack_once() {
        let app = TestApp::new();
        let (o, set) = with_saved_card(
            &app,
            "org_al",
            json!({"below_credits": [80, 50, 80], "auto_topup": {"pack": "pack_100", "below_credits": 30}}),
        )
        .await;
        assert_eq!(set["below_credits"], json!([50, 80]));
        assert_eq!(app.get("/v1/alerts", &o).await.body, set);
        let m = member("org_al", "m1");
        app.post("/v1/generations", &m, video()).await; // 100 -> 76: below 80
        assert_eq!(notifications(&app).await.len(), 1);
        let replay = app
            .send(
                Method::POST,
                "/v1/generations",
                Some(&m),
                Some(&video().to_string()),
                &[("idempotency-key", "r1")],
            )
            .await;
        assert_eq!(replay.status.as_u16(), 201); // 76 -> 52: nothing crossed
        app.send(
            Method::POST,
            "/v1/generations",
            Some(&m),
            Some(&video().to_string()),
            &[("idempotency-key", "r1")],
        )
        .await;
        assert_eq!(
            notifications(&app).await.len(),
            1,
            "a replay crosses nothing"
        );
        app.post("/v1/generations", &m, video()).await; // 52 -> 28: below 50 and below 30
        let all = notifications(&app).await;
        let kinds: Vec<(String, Option<u64>)> = all
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().to_owned(),
                    n["threshold"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("credits.below_threshold".to_string(), Some(80)),
                ("credits.below_threshold".to_string(), Some(50)),
                ("topup.charged".to_string(), None),
            ]
        );
        // The top-up's 100 credits arrived through Stripe's events, once.
        assert_eq!(app.available("org_al").await, 128);
        let sim = app.local.simulator.as_ref().unwrap();
        assert_eq!(
            sim.events()
                .iter()
                .filter(|e| e.kind == "payment_intent.succeeded")
                // Top-ups' (a pack checkout's payment intent succeeds too).
                .filter(|e| e.payload["data"]["object"]["metadata"]["topup"] == "true")
                .count(),
            1
        );
        let lots = app.get("/v1/balance", &o).await.body["lots"].clone();
        assert_eq!(
            lots.as_array()
                .unwrap()
                .iter()
                .filter(|l| l["source"] == "pack")
                .count(),
            2
        );
        // The top-up has its invoice, paid by its own payment (no second charge), on its line
        // of the billing history; the invoice granted nothing more.
        let topups = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"].clone();
        assert_eq!(topups.as_array().unwrap().len(), 1, "{topups:#}");
        let line = &topups[0];
        assert_eq!(line["credits_granted"], 100);
        assert!(line["payment_intent"].as_str().unwrap().starts_with("pi_"));
        let invoice = line["invoice"].as_str().unwrap();
        let invoices = app.get("/v1/invoices", &o).await.body["items"].clone();
        let listed = invoices
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == invoice)
            .expect("the top-up's invoice is listed");
        assert_eq!(listed["status"], "paid");
        assert_eq!(listed["amount_paid"], line["amount"]);
        let pdf = line["invoice_pdf"].as_str().unwrap();
        let pdf = app
            .send(
                Method::GET,
                pdf.strip_prefix("http://tally.test").unwrap(),
                None,
                None,
                &[],
            )
            .await;
        assert_eq!(pdf.content_type, "application/pdf");
        assert_eq!(
            sim.events()
                .iter()
                .filter(|e| e.kind == "charge.succeeded")
                .count(),
            2,
            "the pack and the top-up: no charge for the invoice"
        );
        assert_eq!(app.available("org_al").await, 128);
        // Back above every threshold, then down again at once: alerts re-arm, but a second
        // top-up within the cooldown is refused rather than charged.
        for _ in 0..5 {
            app.post("/v1/generations", &m, video()).await; // 128 -> 8
        }
        let all = notifications(&app).await;
        let later: Vec<&str> = all[3..]
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            later,
            vec![
                "credits.below_threshold",
                "credits.below_threshold",
                "topup.failed"
            ]
        );
        assert!(
            all[5]["reason"]
                .as_str()
                .unwrap()
                .contains("less than 10 minutes ago")
        );
        assert_eq!(app.available("org_al").await, 8);
        assert_eq!(
            sim.events()
                .iter()
                .filter(|e| e.kind == "payment_intent.succeeded")
                // Top-ups' (a pack checkout's payment intent succeeds too).
                .filter(|e| e.payload["data"]["object"]["metadata"]["topup"] == "true")
                .count(),
            1
        );
    }

    /// A plan's pack discount applies to the packs auto top-up buys (the help centre's
    /// "20% off every credit pack"): a Max workspace's 100-credit pack is charged $8, on
    /// the card its subscription was paid with, and brings its 100 credits.
    #[tokio::test]
    async fn auto_top_up_buys_the_pack_at_the_plans_discount() {
        let app = TestApp::new();
        let ws = "org_topup_discount";
        app.subscribe(ws, "max", "monthly").await;
        let o = owner(ws);
        assert_eq!(
            app.get("/v1/entitlements", &o).await.body["pack_discount_pct"],
            20
        );
        let start = app.available(ws).await;
        save_alerts(
            &app,
            &o,
            json!({"below_credits": [], "auto_topup": {"pack": "pack_100", "below_credits": start - 10}}),
        )
        .await;
        let m = member(ws, "m1");
        let held = app.post("/v1/generations", &m, video()).await; // 24 credits: crosses
        assert_eq!(held.status.as_u16(), 201, "{:#}", held.body);
        let kinds: Vec<String> = notifications(&app)
            .await
            .iter()
            .map(|n| n["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, vec!["topup.charged".to_string()]);
        let sim = app.local.simulator.as_ref().unwrap();
        let amounts: Vec<i64> = sim
            .events()
            .iter()
            .filter(|e| e.kind == "payment_intent.succeeded")
            .filter(|e| e.payload["data"]["object"]["metadata"]["topup"] == "true")
            .map(|e| e.payload["data"]["object"]["amount"].as_i64().unwrap())
            .collect();
        assert_eq!(amounts, vec![800], "the 100-credit pack's $10 less 20%");
        assert_eq!(app.available(ws).await, start - 24 + 100);
        let topups = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"].clone();
        assert_eq!(topups.as_array().unwrap().len(), 1, "{topups:#}");
        assert_eq!(
            (&topups[0]["amount"], &topups[0]["credits_granted"]),
            (&json!(800), &json!(100)),
            "{topups:#}"
        );
    }

    /// A top-up charged whose credits are late (its payment's event waiting, as behind a
    /// failing event of the same customer): the balance rises above the threshold without
    /// them (a generation fails) and a later generation crosses it again. That is the same
    /// drop: no second pack. Once the credits arrive, a new crossing buys again.
    #[tokio::test]
    async fn a_crossing_while_the_last_top_ups_credits_are_on_their_way_buys_nothing() {
        let app = TestApp::new();
        let ws = "org_late_topup";
        let (_, _) = with_saved_card(&app, ws, top_up_below_30()).await;
        let m = member(ws, "m1");
        let topups = |app: &TestApp| app.top_ups_charged().len();
        let video_done = async |app: &TestApp| {
            let g = app.post("/v1/generations", &m, video()).await;
            assert_eq!(g.status.as_u16(), 201, "{:#}", g.body);
            g.body["id"].as_str().unwrap().to_owned()
        };
        let sim = app.local.simulator.as_ref().unwrap();
        sim.hold_deliveries();
        for _ in 0..2 {
            let g = video_done(&app).await;
            let done = app
                .post(
                    &format!("/v1/generations/{g}/complete"),
                    &tally_tests::service(),
                    json!({}),
                )
                .await;
            assert_eq!(done.status.as_u16(), 200, "{:#}", done.body);
        }
        let crossing = video_done(&app).await; // 52 -> 28: below 30, a pack is charged
        let sent = notifications(&app).await;
        assert_eq!(topups(&app), 1, "{sent:#?} {}", app.available(ws).await);
        assert_eq!(app.available(ws).await, 28, "its credits are on their way");
        let failed = app
            .post(
                &format!("/v1/generations/{crossing}/fail"),
                &tally_tests::service(),
                json!({"reason": "provider error"}),
            )
            .await;
        assert_eq!(failed.status.as_u16(), 200, "{:#}", failed.body);
        assert_eq!(app.available(ws).await, 52);
        let later = app.ledger.clock.now() + chrono::Duration::minutes(11);
        app.advance_clock(json!({"until": later})).await;
        let again = video_done(&app).await; // 52 -> 28 again
        let sent = notifications(&app).await;
        assert_eq!(topups(&app), 1, "no second pack for the same drop");
        let last = sent.last().unwrap();
        assert_eq!(last["type"], "topup.failed", "{sent:#?}");
        assert!(
            last["reason"].as_str().unwrap().contains("recorded yet"),
            "{last:#}"
        );

        // The credits arrive; the next crossing, ten minutes on, buys.
        sim.release_deliveries(|_| {}).await;
        app.settle_billing().await;
        assert_eq!(app.available(ws).await, 128);
        app.post(
            &format!("/v1/generations/{again}/fail"),
            &tally_tests::service(),
            json!({"reason": "x"}),
        )
        .await;
        let later = app.ledger.clock.now() + chrono::Duration::minutes(11);
        app.advance_clock(json!({"until": later})).await;
        while app.available(ws).await >= 30 {
            video_done(&app).await;
        }
        notifications(&app).await;
        assert_eq!(topups(&app), 2);
    }

    /// Credits expiring in an operation of Stripe's events (an add-on unit's credits, as the
    /// renewal's subscription update sets the plan, an hour before the renewal is charged)
    /// cross the threshold: that alerts, but buys nothing. Auto top-up is for credits
    /// spent, not for credits nobody used.
    #[tokio::test]
    async fn credits_expiring_as_stripes_events_are_applied_alert_but_buy_no_top_up() {
        let app = TestApp::new();
        let ws = "org_lapse";
        let (o, _) = with_saved_card(&app, ws, json!({"below_credits": []})).await;
        app.subscribe(ws, "plus", "monthly").await;
        let units = app.set_units(ws, 1).await;
        assert_eq!(units.status.as_u16(), 200, "{:#}", units.body);
        app.settle_billing().await;
        let addon = addon_credits(&app, &o).await;
        assert!(addon > 2, "{addon}");
        // Below the balance by less than the add-on credits: their expiry crosses it.
        let threshold = app.available(ws).await - addon / 2;
        save_alerts(
            &app,
            &o,
            json!({"below_credits": [threshold], "auto_topup": {"pack": "pack_100", "below_credits": threshold}}),
        )
        .await;
        let before = notifications(&app).await.len();
        // Past the period's end and its renewal charge an hour later.
        app.advance_clock(json!({"days": 32})).await;
        let sent = notifications(&app).await;
        let sent = &sent[before..];
        assert!(
            sent.iter().any(|n| n["type"] == "credits.below_threshold"
                && n["threshold"].as_u64() == Some(threshold)),
            "the crossing alerts: {sent:#?}"
        );
        assert!(!TestApp::mentions_top_up(sent), "{sent:#?}");
        let sim = app.local.simulator.as_ref().unwrap();
        assert!(
            sim.events()
                .iter()
                .filter(|e| e.kind == "payment_intent.created")
                .all(|e| e.payload["data"]["object"]["metadata"]["topup"] != "true"),
            "no top-up was charged"
        );
    }

    /// Credits that lapsed before a generation started, recorded by that generation's hold
    /// (nothing else had touched the ledger since): their drop through the threshold only
    /// alerts, as it would had the schedule recorded it first. A generation's own drop from
    /// what was left still buys.
    #[tokio::test]
    async fn credits_lapsed_before_a_generation_only_alert_and_its_own_spending_buys() {
        use tally::clock::Clock;
        for (ws, topup_below, buys) in [("org_lapsed", 150, false), ("org_spent", 90, true)] {
            let app = TestApp::new();
            // 100 pack credits that never expire, and 60 that lapse in an hour.
            let (o, _) = with_saved_card(&app, ws, json!({"below_credits": []})).await;
            app.ledger
                .execute(tally::service::LedgerRequest {
                    workspace: tally_tests::workspace(ws),
                    key: tally::ids::IdempotencyKey::derived(format!("{ws}:lapsing")),
                    fingerprint: "lapsing".into(),
                    actor: tally::ledger::Actor::system(),
                    refs: tally::ledger::Refs::default(),
                    op: tally::ledger::Operation::Grant {
                        month: None,
                        source: tally::ledger::LotSource::Addon,
                        credits: tally::money::Credits::new(60),
                        expires_at: Some(app.clock.now() + chrono::Duration::hours(1)),
                        note: None,
                    },
                })
                .await
                .unwrap();
            assert_eq!(app.available(ws).await, 160);
            save_alerts(
                &app,
                &o,
                json!({"below_credits": [150], "auto_topup": {"pack": "pack_100", "below_credits": topup_below}}),
            )
            .await;
            app.advance_clock(json!({"hours": 2})).await;
            assert_eq!(app.available(ws).await, 100, "reads show the lapse at once");
            let before = notifications(&app).await.len();
            // The hold (24 credits) is the first operation since the lapse: 160 stored, 76
            // after it.
            let started = app
                .post("/v1/generations", &member(ws, "m1"), video())
                .await;
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
            let sent = notifications(&app).await;
            let kinds: Vec<&str> = sent[before..]
                .iter()
                .map(|n| n["type"].as_str().unwrap())
                .collect();
            if buys {
                // 100 -> 76 crosses 90: the generation's own spending.
                assert_eq!(kinds, ["credits.below_threshold", "topup.charged"], "{ws}");
            } else {
                // 160 -> 100 crossed 150 as the credits lapsed: an alert, no top-up.
                assert_eq!(kinds, ["credits.below_threshold"], "{ws}");
            }
        }
    }

    /// A process that read the settings a while ago (they are reused for a time in Lambda)
    /// follows the settings as stored when it claims the charge: a top-up turned off since
    /// is neither charged nor reported, one whose threshold the balance is no longer below
    /// is not charged, and one changed but still asking for it is charged as it stands.
    #[tokio::test]
    async fn a_top_up_follows_the_settings_as_stored_when_it_is_claimed() {
        use tally::catalog::{GenerationSpec, Workflow};
        use tally::clock::Clock;
        use tally::ids::GenerationId;
        use tally::money::Credits;

        // What the settings become, and what the crossing then does.
        let cases = [
            ("org_off", Value::Null, "nothing"),
            (
                "org_lower",
                json!({"pack": "pack_100", "below_credits": 10}),
                "nothing",
            ),
            (
                "org_raise",
                json!({"pack": "pack_100", "below_credits": 40}),
                "charged",
            ),
            // A pack withdrawn from the catalogue since (stored settings can name one).
            (
                "org_gone",
                json!({"pack": "pack_gone", "below_credits": 40}),
                "failed",
            ),
        ];
        for (ws, later, expect) in cases {
            let app = TestApp::new();
            let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
            let sim = app.local.simulator.clone().unwrap();
            let paid = |sim: &tally_local::simulator::Simulator| {
                sim.events()
                    .iter()
                    .filter(|e| e.kind == "payment_intent.succeeded")
                    // Top-ups' (a pack checkout's payment intent succeeds too).
                    .filter(|e| e.payload["data"]["object"]["metadata"]["topup"] == "true")
                    .count()
            };
            let paid_before = paid(&sim);
            // A second process whose settings live for an hour.
            let mut ledger = app.ledger.clone();
            ledger.observer = Some(std::sync::Arc::new(tally::alerts::CreditAlerts {
                docs: app.docs.clone(),
                notifications: app.local.notifications_queue.clone(),
                topups: Some(app.local.topups_queue.clone()),
                asks_for_top_ups: true,
                catalog: ledger.catalog.clone(),
                settings_ttl: std::time::Duration::from_secs(3600),
                cache: Default::default(),
            }));
            let hold = |credits: u64| {
                let mut estimate = ledger
                    .catalog
                    .estimate(&GenerationSpec {
                        workflow: Workflow::Image,
                        model: "imagen-3".into(),
                        resolution: None,
                        duration_s: None,
                        count: None,
                    })
                    .unwrap();
                estimate.credits = Credits::new(credits);
                let deadline = app.clock.now() + chrono::Duration::hours(1);
                tally_tests::hold_request(ws, GenerationId::new(), &estimate, deadline)
            };
            // 100 -> 95: nothing crossed; the settings (top-up below 30) are now remembered.
            ledger.execute(hold(5)).await.unwrap();
            if later["pack"] == "pack_gone" {
                tally::store::docs::update(
                    app.docs.as_ref(),
                    &tally::billing::records::workspace_pk(&tally_tests::workspace(ws)),
                    tally::alerts::ALERTS_SK,
                    |s: Option<tally::alerts::AlertSettings>| {
                        let mut s = s?;
                        s.auto_topup = serde_json::from_value(later.clone()).unwrap();
                        Some(s)
                    },
                )
                .await
                .unwrap();
            } else {
                let set = app
                    .send(
                        Method::PUT,
                        "/v1/alerts",
                        Some(&o),
                        Some(&json!({"below_credits": [], "auto_topup": later}).to_string()),
                        &[],
                    )
                    .await;
                assert_eq!(set.status.as_u16(), 200, "{:#}", set.body);
            }
            // 95 -> 25: below the remembered threshold of 30.
            ledger.execute(hold(70)).await.unwrap();
            let topups: Vec<Value> = notifications(&app)
                .await
                .into_iter()
                .filter(|n| n["type"].as_str().unwrap().starts_with("topup."))
                .collect();
            let last = app.get("/v1/alerts", &o).await.body["last_topup_at"].clone();
            if expect == "charged" {
                assert_eq!(topups.len(), 1, "{ws}: {topups:#?}");
                assert_eq!(topups[0]["type"], "topup.charged");
                assert_eq!(topups[0]["pack"], "pack_100");
                assert_eq!(paid(&sim), paid_before + 1, "{ws}: charged once");
                assert_eq!(app.available(ws).await, 125);
                assert!(last.is_string(), "{ws}: {last}");
            } else if expect == "failed" {
                assert_eq!(topups.len(), 1, "{ws}: {topups:#?}");
                assert_eq!(topups[0]["type"], "topup.failed");
                assert_eq!(topups[0]["reason"], "the pack no longer exists");
                assert_eq!(topups[0]["pack"], "pack_gone");
                assert_eq!(paid(&sim), paid_before, "{ws}: nothing charged");
                assert_eq!(last, Value::Null, "{ws}: the cooldown is not taken");
            } else {
                assert!(topups.is_empty(), "{ws}: {topups:#?}");
                assert_eq!(paid(&sim), paid_before, "{ws}: nothing charged");
                assert_eq!(app.available(ws).await, 25);
                assert_eq!(last, Value::Null, "{ws}");
            }
        }
    }

    /// More overdue holds than one operation releases: each operation compares the balance
    /// after its own releases with the balance it leaves, so the holds it does not release
    /// never look like a drop.
    #[tokio::test]
    async fn a_backlog_of_overdue_holds_sends_no_alert_for_what_operations_leave_held() {
        let app = TestApp::new();
        let ws = "org_backlog_alert";
        with_saved_card(&app, ws, json!({"below_credits": [91]})).await;
        let m = member(ws, "m1");
        let image = json!({"workflow": "image", "model": "flux-schnell"});
        for _ in 0..30 {
            let r = app.post("/v1/generations", &m, image.clone()).await;
            assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
        }
        // 100 -> 40 in two-credit holds: 91 crossed once.
        let first = notifications(&app).await;
        assert_eq!(
            first
                .iter()
                .filter(|n| n["type"] == "credits.below_threshold")
                .count(),
            1,
            "{first:#?}"
        );
        // Every hold overdue: reads show the credits back; one operation releases 25.
        app.clock.advance(chrono::Duration::minutes(16));
        assert_eq!(app.available(ws).await, 100);
        for _ in 0..3 {
            let r = app.post("/v1/generations", &m, image.clone()).await;
            assert_eq!(r.status.as_u16(), 201, "{:#}", r.body);
        }
        let after = notifications(&app).await;
        assert_eq!(after.len(), first.len(), "{after:#?}");
    }

    /// A hold gone overdue re-arms the alert as reads show its credits back; the next
    /// charge that takes the balance below again alerts again.
    #[tokio::test]
    async fn a_crossing_after_an_overdue_hold_alerts_again_although_the_stored_balance_did_not_move()
     {
        let app = TestApp::new();
        let ws = "org_overdue_alert";
        let (_, _) = with_saved_card(&app, ws, json!({"below_credits": [80]})).await;
        let m = member(ws, "m1");
        let first = app.post("/v1/generations", &m, video()).await; // 100 -> 76: below 80
        assert_eq!(first.status.as_u16(), 201, "{:#}", first.body);
        assert_eq!(notifications(&app).await.len(), 1);
        // The generation service never settles it. Once its hold is overdue reads show the
        // credits back (the alert re-arms), before any operation has released it.
        app.clock.advance(chrono::Duration::minutes(61));
        assert_eq!(app.available(ws).await, 100);
        let second = app.post("/v1/generations", &m, video()).await; // 100 -> 76 again
        assert_eq!(second.status.as_u16(), 201, "{:#}", second.body);
        assert_eq!(app.available(ws).await, 76);
        let sent = notifications(&app).await;
        let thresholds: Vec<_> = sent.iter().map(|n| n["threshold"].clone()).collect();
        assert_eq!(thresholds, vec![json!(80), json!(80)], "{sent:#?}");
    }

    /// Credits taken back for a refund request (here, of the very pack that saved the card)
    /// take the balance below both thresholds: the alert says so, but no pack is bought, as
    /// the refunds function's observer only alerts (a refund of a top-up must not buy it
    /// again). Stripe's refund event later runs the same take-back as a replay, which
    /// nobody observes. A generation's crossing afterwards still buys one.
    #[tokio::test]
    async fn a_refund_taking_credits_back_alerts_but_buys_no_pack() {
        let app = TestApp::new();
        let ws = "org_refund_alert";
        let (o, _) = with_saved_card(
            &app,
            ws,
            json!({"below_credits": [50], "auto_topup": {"pack": "pack_100", "below_credits": 30}}),
        )
        .await;
        assert_eq!(app.available(ws).await, 100);
        let sim = app.local.simulator.as_ref().unwrap();
        let charge = app.sim_events("charge.succeeded").last().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let asked = app
            .post(
                "/v1/refund-requests",
                &o,
                json!({"payment": charge, "reason": "other", "details": "not needed after all"}),
            )
            .await;
        assert_eq!(asked.status.as_u16(), 201, "{:#}", asked.body);
        let id = asked.body["id"].as_str().unwrap().to_owned();
        let paid_before = paid_intents(sim);
        let approved = app
            .post(
                &format!("/v1/admin/refund-requests/{id}/approve"),
                &tally_tests::support(),
                json!({"note": "refunded as asked"}),
            )
            .await;
        assert_eq!(approved.status.as_u16(), 200, "{:#}", approved.body);
        app.local.refunds_queue.until_idle().await;
        let sent = notifications(&app).await;
        assert_eq!(
            app.available(ws).await,
            0,
            "the pack's credits are taken back"
        );
        let alerts: Vec<&Value> = sent
            .iter()
            .filter(|n| n["type"] == "credits.below_threshold")
            .collect();
        assert_eq!(alerts.len(), 1, "{sent:#?}");
        assert_eq!(alerts[0]["threshold"], 50);
        assert!(!TestApp::mentions_top_up(&sent), "{sent:#?}");
        assert_eq!(paid_intents(sim), paid_before, "no card charged");

        // A generation crossing the threshold still buys one.
        buy_pack(&app, ws, "pack_100").await;
        let paid_before = paid_intents(sim);
        let m = member(ws, "m1");
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await;
        }
        let sent = notifications(&app).await;
        assert_eq!(
            sent.iter().filter(|n| n["type"] == "topup.charged").count(),
            1,
            "{sent:#?}"
        );
        assert_eq!(paid_intents(sim), paid_before + 1);
    }

    /// Money going back outside refund requests, applied by the billing events: a refund
    /// made in Stripe's dashboard, and a dispute. Their crossings alert but never charge
    /// the card the money went back to (least of all one whose holder disputes a charge).
    #[tokio::test]
    async fn a_dispute_or_a_dashboard_refund_taking_credits_back_buys_no_pack() {
        for (ws, action) in [("org_disputed", "dispute"), ("org_dash_refund", "refund")] {
            let app = TestApp::new();
            with_saved_card(
                &app,
                ws,
                json!({"below_credits": [50], "auto_topup": {"pack": "pack_100", "below_credits": 30}}),
            )
            .await;
            let sim = app.local.simulator.as_ref().unwrap();
            let paid = app.sim_events("charge.succeeded").last().unwrap().clone();
            let charge = paid["id"].as_str().unwrap().to_owned();
            let paid_before = paid_intents(sim);
            let body = if action == "refund" {
                json!({"amount": paid["amount"]})
            } else {
                json!({})
            };
            let made = app
                .dashboard(&format!("/sim/charges/{charge}/{action}"), body)
                .await;
            assert_eq!(made.status.as_u16(), 200, "{action}: {:#}", made.body);
            let sent = notifications(&app).await;
            assert_eq!(app.available(ws).await, 0, "{action}: taken back or frozen");
            assert!(
                sent.iter().any(|n| n["type"] == "credits.below_threshold"),
                "{action}: {sent:#?}"
            );
            assert!(!TestApp::mentions_top_up(&sent), "{action}: {sent:#?}");
            assert_eq!(paid_intents(sim), paid_before, "{action}: no card charged");
        }
    }

    /// Staff give a top-up's money back with a credit note on its receipt (paid out of
    /// band, no charge of its own): the top-up's credits go, once, the history line says
    /// so, and a refund request can no longer claim the same money.
    #[tokio::test]
    async fn a_credit_note_on_a_top_ups_receipt_takes_its_credits_back() {
        let app = TestApp::new();
        let ws = "org_topup_note";
        let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
        let m = member(ws, "m1");
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await; // 100 -> 28: buys a pack
        }
        let sent = notifications(&app).await;
        assert!(
            sent.iter().any(|n| n["type"] == "topup.charged"),
            "{sent:#?}"
        );
        assert_eq!(app.available(ws).await, 128);
        let history = app.get("/v1/billing/history?kind=top_up", &o).await.body;
        let line = history["items"][0].clone();
        let receipt = line["invoice"].as_str().unwrap().to_owned();
        let pi = line["payment_intent"].as_str().unwrap().to_owned();
        let amount = line["amount"].as_u64().unwrap();
        let note = app
            .dashboard(
                &format!("/sim/invoices/{receipt}/credit-note"),
                json!({"amount": amount}),
            )
            .await;
        assert_eq!(note.status.as_u16(), 200, "{:#}", note.body);
        app.settle_billing().await;
        assert_eq!(app.available(ws).await, 28, "the top-up's 100 credits went");
        // Delivered again: nothing more.
        app.redeliver_first("credit_note.created").await;
        app.settle_billing().await;
        assert_eq!(app.available(ws).await, 28);
        let line = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"][0].clone();
        assert_eq!(line["amount_credited"], json!(amount), "{line:#}");
        app.post(
            "/v1/refund-requests",
            &o,
            json!({"payment": pi, "reason": "other", "details": "want the money back too"}),
        )
        .await
        .assert_problem(409, "not_refundable");
    }

    /// A staff debit (taking back credits whose money went back, or a correction) that
    /// crosses the threshold alerts but never charges the customer's card.
    #[tokio::test]
    async fn a_staff_debit_crossing_the_threshold_alerts_but_buys_no_pack() {
        let app = TestApp::new();
        let ws = "org_staff_debit";
        with_saved_card(
            &app,
            ws,
            json!({"below_credits": [50], "auto_topup": {"pack": "pack_100", "below_credits": 30}}),
        )
        .await;
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        let debit = app
            .send(
                Method::POST,
                &format!("/v1/admin/workspaces/{ws}/adjustments"),
                Some(&tally_tests::support()),
                Some(&json!({"credits": -80, "reason": "refunded outside Stripe"}).to_string()),
                &[("idempotency-key", "debit-1")],
            )
            .await;
        assert_eq!(debit.status.as_u16(), 201, "{:#}", debit.body);
        let sent = notifications(&app).await;
        assert!(
            sent.iter().any(|n| n["type"] == "credits.below_threshold"),
            "{sent:#?}"
        );
        assert!(!TestApp::mentions_top_up(&sent), "{sent:#?}");
        assert_eq!(paid_intents(&sim), before, "no card charged");
        assert_eq!(app.available(ws).await, 20);
    }

    /// Spends with videos until the balance is below 30 (the top-up threshold); the
    /// top-up notifications sent by then.
    async fn spend_below_30(app: &TestApp, ws: &str) -> Vec<Value> {
        let m = member(ws, "m1");
        while app.available(ws).await >= 30 {
            let started = app.post("/v1/generations", &m, video()).await;
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
        }
        notifications(app)
            .await
            .into_iter()
            .filter(|n| n["type"].as_str().unwrap().starts_with("topup."))
            .collect()
    }

    /// A card Stripe declined at a top-up is not tried again at the next crossing (card
    /// networks limit retries of declined cards); saving the settings tries it again.
    #[tokio::test]
    async fn a_declined_card_is_not_charged_again_at_every_crossing() {
        let app = TestApp::new();
        let ws = "org_declines";
        let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        let customer = app.sim_events("charge.succeeded").last().unwrap()["customer"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(sim.set_card_declines(&customer, true));
        let sent = spend_below_30(&app, ws).await;
        assert_eq!(sent.len(), 1, "{sent:#?}");
        assert_eq!(sent[0]["type"], "topup.failed");
        let settings = app.get("/v1/alerts", &o).await.body;
        let card = settings["topup_claim"]["payment_method"].clone();
        assert!(card.is_string(), "{settings:#}");
        assert_eq!(settings["refused_card"], card, "{settings:#}");
        // Back above the threshold, past the cooldown, and below it again: refused without
        // asking Stripe.
        credit_back_above_30(&app, ws, "credit-1").await;
        let sent = spend_below_30(&app, ws).await;
        assert_eq!(sent.len(), 2, "{sent:#?}");
        assert_eq!(sent[1]["type"], "topup.failed");
        assert!(
            sent[1]["reason"]
                .as_str()
                .unwrap()
                .contains("refused the saved card"),
            "{sent:#?}"
        );
        // Saved again (the owner fixed the card with the bank): tried, and charged.
        assert!(sim.set_card_declines(&customer, false));
        let saved = save_alerts(&app, &o, top_up_below_30()).await;
        assert!(saved.body.get("refused_card").is_none(), "{:#}", saved.body);
        let before = paid_intents(&sim);
        credit_back_above_30(&app, ws, "credit-2").await;
        let sent = spend_below_30(&app, ws).await;
        assert_eq!(sent.last().unwrap()["type"], "topup.charged", "{sent:#?}");
        assert_eq!(paid_intents(&sim), before + 1);
    }

    async fn credit_back_above_30(app: &TestApp, ws: &str, key: &str) {
        let credit = app
            .send(
                Method::POST,
                &format!("/v1/admin/workspaces/{ws}/adjustments"),
                Some(&tally_tests::support()),
                Some(&json!({"credits": 100, "reason": "goodwill"}).to_string()),
                &[("idempotency-key", key)],
            )
            .await;
        assert_eq!(credit.status.as_u16(), 201, "{:#}", credit.body);
        app.advance_clock(json!({"hours": 1})).await;
    }

    /// A dispute of any of the workspace's payments stops auto top-up: the card whose
    /// holder disputes a charge is not charged off-session, even at a crossing a
    /// generation makes; saving the settings again resumes it.
    #[tokio::test]
    async fn a_dispute_stops_auto_top_up_until_the_settings_are_saved_again() {
        let app = TestApp::new();
        let ws = "org_dispute_stop";
        let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
        buy_pack(&app, ws, "pack_100").await;
        assert_eq!(app.available(ws).await, 200);
        let sim = app.local.simulator.clone().unwrap();
        let first = app.sim_events("charge.succeeded")[0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let disputed = app
            .dashboard(&format!("/sim/charges/{first}/dispute"), json!({}))
            .await;
        assert_eq!(disputed.status.as_u16(), 200, "{:#}", disputed.body);
        assert_eq!(
            app.available(ws).await,
            100,
            "one pack frozen, nothing crossed"
        );
        let stopped = app.get("/v1/alerts", &o).await.body;
        assert!(stopped["stopped_by_dispute"].is_string(), "{stopped:#}");
        let before = paid_intents(&sim);
        let sent = spend_below_30(&app, ws).await;
        assert_eq!(sent.len(), 1, "{sent:#?}");
        assert_eq!(sent[0]["type"], "topup.failed");
        assert!(
            sent[0]["reason"].as_str().unwrap().contains("disputed"),
            "{sent:#?}"
        );
        assert_eq!(paid_intents(&sim), before, "no card charged");
        // The owner saves the settings again: the next crossing buys a pack.
        save_alerts(&app, &o, top_up_below_30()).await;
        // Later events of the same dispute (evidence submitted, a redrive) change nothing now.
        let dispute = app.sim_events("charge.dispute.created")[0].clone();
        for (id, kind) in [
            ("evt_dp_again", "charge.dispute.created"),
            ("evt_dp_updated", "charge.dispute.updated"),
        ] {
            let now = tally::clock::Clock::now(app.clock.as_ref()).timestamp();
            let e = tally_tests::stripe_event(id, kind, now, dispute.clone());
            assert_eq!(app.deliver_signed(&e).await, 200);
        }
        app.settle_billing().await;
        let resumed = app.get("/v1/alerts", &o).await.body;
        assert!(resumed.get("stopped_by_dispute").is_none(), "{resumed:#}");
        credit_back_above_30(&app, ws, "credit-1").await;
        let sent = spend_below_30(&app, ws).await;
        assert_eq!(sent.last().unwrap()["type"], "topup.charged", "{sent:#?}");
        assert_eq!(paid_intents(&sim), before + 1);
    }

    fn paid_intents(sim: &tally_local::simulator::Simulator) -> usize {
        sim.events()
            .iter()
            .filter(|e| e.kind == "payment_intent.succeeded")
            // Top-ups' (a pack checkout's payment intent succeeds too).
            .filter(|e| e.payload["data"]["object"]["metadata"]["topup"] == "true")
            .count()
    }

    /// Stripe made the payment but its answer was lost, twice, and then the invoice's: the top-up
    /// is delivered again until it is done, and the card is charged once. The request that
    /// crossed the threshold waited for none of it.
    #[tokio::test]
    async fn a_top_up_whose_answers_were_lost_is_charged_once_when_delivered_again() {
        let app = TestApp::new();
        let (o, _) = with_saved_card(&app, "org_lost", top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        // The payment's answer, its replay's, then the invoice's.
        sim.lose_answers(3);
        let m = member("org_lost", "m1");
        for _ in 0..3 {
            let started = app.post("/v1/generations", &m, video()).await; // 100 -> 28
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
        }
        let topups: Vec<Value> = notifications(&app)
            .await
            .into_iter()
            .filter(|n| n["type"].as_str().unwrap().starts_with("topup."))
            .collect();
        assert_eq!(topups.len(), 1, "{topups:#?}");
        assert_eq!(topups[0]["type"], "topup.charged");
        assert_eq!(paid_intents(&sim), before + 1, "charged once");
        assert_eq!(app.available("org_lost").await, 128);
        let history = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"].clone();
        assert_eq!(history.as_array().unwrap().len(), 1, "{history:#}");
        assert!(history[0]["invoice"].is_string(), "{history:#}");
        // The claim keeps the payment: a later delivery of the same crossing (a redrive,
        // after Stripe has forgotten the key) does not charge again.
        let claim = app.get("/v1/alerts", &o).await.body["topup_claim"].clone();
        assert_eq!(claim["payment"], topups[0]["payment"], "{claim:#}");
        sim.forget_idempotency_keys().await;
        let entry = topups[0]["entry"].as_u64().unwrap();
        redeliver_top_up(&app, "org_lost", entry)
            .await
            .expect("done again without a charge");
        // An earlier crossing's request that never claimed, delivered after this claim:
        // it ends, not charged (one that had claimed is left to a person: see
        // `a_crossings_request_after_a_later_claim_ends_unless_it_claimed_itself`).
        redeliver_top_up(&app, "org_lost", entry - 1)
            .await
            .expect("ends without a charge");
        app.settle_billing().await;
        assert_eq!(paid_intents(&sim), before + 1, "no second charge");
        assert_eq!(app.available("org_lost").await, 128);
        let history = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"].clone();
        assert_eq!(history.as_array().unwrap().len(), 1, "{history:#}");
    }

    /// A crossing's request taken up after the balance rose above the threshold again (a
    /// pack bought while the request waited behind a failing message in its queue) charges
    /// nothing; taken up while the balance is still below, it charges once.
    #[tokio::test]
    async fn a_top_up_request_taken_up_after_the_balance_recovered_charges_nothing() {
        let app = TestApp::new();
        let ws = "org_recovered";
        let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        // The request of a crossing the balance (100, above 30) has left behind.
        assert_eq!(app.available(ws).await, 100);
        redeliver_top_up(&app, ws, 900)
            .await
            .expect("ends without a charge");
        assert_eq!(paid_intents(&sim), before, "not charged");
        assert!(app.get("/v1/alerts", &o).await.body["topup_claim"].is_null());
        // Below the threshold now: the crossing's own request charges, once.
        let m = member(ws, "m1");
        for _ in 0..3 {
            let started = app.post("/v1/generations", &m, video()).await; // 100 -> 28
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
        }
        notifications(&app).await;
        assert_eq!(paid_intents(&sim), before + 1, "the crossing's own top-up");
        assert_eq!(app.available(ws).await, 128);
        sim.forget_idempotency_keys().await;
        app.clock.advance(chrono::Duration::hours(2));
        // The first three holds are overdue now and released first: 200 -> 128 -> 56.
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await;
        }
        redeliver_top_up(&app, ws, 901)
            .await
            .expect("ends without a charge");
        notifications(&app).await;
        assert_eq!(
            paid_intents(&sim),
            before + 1,
            "no charge above the threshold"
        );
    }

    /// Holds past their deadline count as held when a request is taken up: their
    /// generations may still complete and charge, and no later crossing would come.
    #[tokio::test]
    async fn a_top_up_request_counts_overdue_holds_as_still_held() {
        let app = TestApp::new();
        let ws = "org_overdue";
        with_saved_card(&app, ws, top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        let m = member(ws, "m1");
        // 100 -> 28: the crossing charges its top-up (128); four more holds -> 32.
        for n in 0..7 {
            let started = app.post("/v1/generations", &m, video()).await;
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
            if n == 2 {
                notifications(&app).await;
            }
        }
        let before = paid_intents(&sim);
        assert_eq!(app.available(ws).await, 32);
        // One more -> 8: its crossing meets the ten-minute cooldown.
        app.post("/v1/generations", &m, video()).await;
        notifications(&app).await;
        assert_eq!(paid_intents(&sim), before);
        // Every hold overdue, none released yet (nothing has run on the workspace): a
        // redriven request still sees 8, below 30, and charges.
        app.clock.advance(chrono::Duration::hours(2));
        redeliver_top_up(&app, ws, 900).await.expect("charged");
        notifications(&app).await;
        assert_eq!(paid_intents(&sim), before + 1);
    }

    /// `ws` buys a pack, asks for auto top-up below 30 and spends below it: topped up once.
    /// The owner's token and the top-up's line in the billing history.
    async fn topped_up(app: &TestApp, ws: &str) -> (String, Value) {
        let (o, _) = with_saved_card(app, ws, top_up_below_30()).await;
        let m = member(ws, "m1");
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await; // 100 -> 28: topped up
        }
        notifications(app).await;
        let history = app.get("/v1/billing/history?kind=top_up", &o).await.body["items"].clone();
        assert_eq!(history.as_array().map(Vec::len), Some(1), "{history:#}");
        (o, history[0].clone())
    }

    /// A top-up's receipt documents its payment: once that payment is partly refunded, the
    /// receipt is not reissued as paid in full.
    #[tokio::test]
    async fn a_refunded_top_ups_receipt_is_not_reissued() {
        let app = TestApp::new();
        let ws = "org_receipt";
        let (_, topped_up) = topped_up(&app, ws).await;
        let receipt = topped_up["invoice"].as_str().unwrap().to_owned();
        let charge = topped_up["charge"].as_str().unwrap().to_owned();
        let refund = app
            .send(
                Method::POST,
                &format!("/sim/charges/{charge}/refund"),
                None,
                Some(&json!({"amount": 100}).to_string()),
                &[],
            )
            .await;
        assert_eq!(refund.status.as_u16(), 200, "{:#}", refund.body);
        app.settle_billing().await;
        app.send(
            Method::POST,
            &format!("/v1/admin/invoices/{receipt}/reissue"),
            Some(&tally_tests::support()),
            Some(&json!({"name": "Acme GmbH"}).to_string()),
            &[("idempotency-key", "receipt-1")],
        )
        .await
        .assert_problem(409, "not_reissuable");
    }

    /// A top-up's receipt is paid out of band by the top-up's payment: seen open (before its
    /// marking as paid arrives) it is listed without a page to pay it again.
    #[tokio::test]
    async fn an_open_top_up_receipt_is_never_offered_for_payment() {
        let app = TestApp::new();
        let ws = "org_open_receipt";
        let (o, topped_up) = topped_up(&app, ws).await;
        let receipt = topped_up["invoice"].as_str().unwrap().to_owned();
        let fresh = TestApp::new();
        let events = app.local.simulator.as_ref().unwrap().events();
        for e in events.iter().filter(|e| {
            !(e.kind == "invoice.paid" && e.payload["data"]["object"]["id"] == receipt.as_str())
        }) {
            assert_eq!(fresh.deliver_signed(&e.payload).await, 200);
        }
        fresh.settle_billing().await;
        let items = fresh.get("/v1/invoices", &o).await.body["items"].clone();
        let listed = items
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == receipt.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{items:#}"));
        assert_eq!(listed["status"], "open");
        assert!(listed["hosted_invoice_url"].is_null(), "{listed:#}");
    }

    /// Two operations crossing the threshold one after the other, whose top-up requests
    /// reach the queue in the other order: the later crossing claims and charges, and the
    /// earlier one's request, which never claimed, ends without a charge (before, it was
    /// refused as needing a person and held its queue group for half an hour). A crossing
    /// that did claim, redriven after a later claim, still goes to a person.
    #[tokio::test]
    async fn a_crossings_request_after_a_later_claim_ends_unless_it_claimed_itself() {
        let app = TestApp::new();
        let ws = "org_late_request";
        let (o, _) = topped_up(&app, ws).await;
        let first = app.get("/v1/alerts", &o).await.body["topup_claim"]["entry"]
            .as_u64()
            .unwrap();
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        redeliver_top_up(&app, ws, first - 1)
            .await
            .expect("ends without a charge");
        assert_eq!(paid_intents(&sim), before, "not charged");
        // Past the cooldown, another crossing claims and charges.
        app.clock.advance(chrono::Duration::minutes(11));
        let m = member(ws, "m1");
        while app.available(ws).await >= 30 {
            let started = app.post("/v1/generations", &m, video()).await;
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
        }
        notifications(&app).await;
        assert_eq!(paid_intents(&sim), before + 1);
        let second = app.get("/v1/alerts", &o).await.body["topup_claim"]["entry"]
            .as_u64()
            .unwrap();
        assert!(second > first);
        let redriven = redeliver_top_up(&app, ws, first).await;
        assert!(
            matches!(redriven, Err(tally::queue::ConsumeError::Poison(_))),
            "{redriven:?}"
        );
        assert_eq!(paid_intents(&sim), before + 1);
        // Settings from before the crossings were kept: the list begins with the claim
        // it replaced, and a crossing before that one is unknown (a person looks).
        let app = TestApp::new();
        let ws = "org_late_legacy";
        let (o, _) = topped_up(&app, ws).await;
        let first = app.get("/v1/alerts", &o).await.body["topup_claim"]["entry"]
            .as_u64()
            .unwrap();
        tally::store::docs::update::<tally::alerts::AlertSettings, _>(
            app.docs.as_ref(),
            &tally::billing::records::workspace_pk(&tally_tests::workspace(ws)),
            tally::alerts::ALERTS_SK,
            |cur| {
                cur.map(|mut s| {
                    s.topup_claims = None;
                    s
                })
            },
        )
        .await
        .unwrap();
        app.clock.advance(chrono::Duration::minutes(11));
        let m = member(ws, "m1");
        while app.available(ws).await >= 30 {
            app.post("/v1/generations", &m, video()).await;
        }
        notifications(&app).await;
        let settings = app.get("/v1/alerts", &o).await.body;
        let second = settings["topup_claim"]["entry"].as_u64().unwrap();
        assert_eq!(
            settings["topup_claims"],
            json!([first, second]),
            "{settings:#}"
        );
        let unknown = redeliver_top_up(&app, ws, first - 1).await;
        assert!(
            matches!(unknown, Err(tally::queue::ConsumeError::Poison(_))),
            "{unknown:?}"
        );
        redeliver_top_up(&app, ws, first + 1)
            .await
            .expect("between two known claims: never claimed");
    }

    /// Delivers the top-up request of `ws`'s crossing at `entry` once more, as a redrive of
    /// the dead-letter queue does.
    async fn redeliver_top_up(
        app: &TestApp,
        ws: &str,
        entry: u64,
    ) -> Result<(), tally::queue::ConsumeError> {
        deliver_top_up(app, app.local.simulator.clone().unwrap(), ws, entry, 1).await
    }

    /// Delivers the top-up request of `ws`'s crossing at `entry` (its `attempt`-th
    /// delivery) to a consumer charging through `payments`.
    async fn deliver_top_up(
        app: &TestApp,
        payments: std::sync::Arc<dyn tally::payments::Payments>,
        ws: &str,
        entry: u64,
        attempt: u32,
    ) -> Result<(), tally::queue::ConsumeError> {
        let again = tally::alerts::TopUpRequest {
            kind: "auto_topup".into(),
            workspace: tally_tests::workspace(ws),
            entry,
            topup: tally::alerts::AutoTopUp {
                pack: "pack_100".into(),
                below_credits: tally::money::Credits::new(30),
            },
            available: tally::money::Credits::new(28),
            discount_pct: 0,
        };
        let consumer = tally::alerts::TopUps {
            docs: app.docs.clone(),
            states: app.ledger.store.clone(),
            payments: Some(payments),
            catalog: app.ledger.catalog.clone(),
            notifications: app.local.notifications_queue.clone(),
            clock: app.clock.clone(),
        };
        let delivery = tally::queue::Delivery {
            message_id: format!("redrive-{entry}-{attempt}"),
            body: again.message().body,
            group_id: None,
            receive_count: attempt,
        };
        tally::queue::Consumer::consume(&consumer, &delivery).await
    }

    /// Stores a top-up claim of `ws`'s saved card (as `claim` shapes it), made now, with
    /// the cooldown taken; returns the card.
    async fn set_claim(
        app: &TestApp,
        ws: &str,
        claim: impl FnOnce(&mut tally::alerts::TopUpClaim),
    ) -> String {
        use tally::alerts::{AlertSettings, TopUpClaim};
        use tally::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
        let pk = workspace_pk(&tally_tests::workspace(ws));
        let profile: BillingProfile = tally::store::docs::get(app.docs.as_ref(), &pk, PROFILE_SK)
            .await
            .unwrap()
            .unwrap();
        let card = profile.payment_method.clone().unwrap().to_string();
        let now = tally::clock::Clock::now(app.clock.as_ref());
        let mut made = TopUpClaim {
            entry: 1,
            pack: "pack_100".into(),
            claimed_at: now,
            customer: profile.customer.clone().unwrap().to_string(),
            payment_method: card.clone(),
            amount_cents: 1000,
            credits: 100,
            payment: None,
            processing: false,
            declined: false,
        };
        claim(&mut made);
        tally::store::docs::update(
            app.docs.as_ref(),
            &pk,
            tally::alerts::ALERTS_SK,
            |cur: Option<AlertSettings>| {
                let mut s = cur.unwrap();
                s.last_topup_at = Some(made.claimed_at);
                s.topup_claim = Some(made.clone());
                Some(s)
            },
        )
        .await
        .unwrap();
        card
    }

    /// Stripe's answer with payment intent `pi_slow` in `status` (declined, if it asks for
    /// another method).
    fn slow_intent(status: &str) -> wiremock::ResponseTemplate {
        let mut pi = tally_tests::fixture("payment_intent");
        pi["id"] = json!("pi_slow");
        pi["status"] = json!(status);
        if status == "requires_payment_method" {
            pi["last_payment_error"] =
                json!({"type": "card_error", "message": "Your card was declined."});
        }
        wiremock::ResponseTemplate::new(200).set_body_json(pi)
    }

    /// The Stripe adapter against `server`.
    fn stripe_at(server: &wiremock::MockServer) -> std::sync::Arc<dyn tally::payments::Payments> {
        std::sync::Arc::new(
            tally::payments::stripe_api::StripePayments::new(
                "sk_test_tally",
                Some(&format!("{}/", server.uri())),
            )
            .unwrap(),
        )
    }

    /// A claim made but not charged (Stripe out of reach), then auto top-up turned off or
    /// stopped by a dispute: a later delivery of the request does not charge; while it is
    /// still on, it does.
    #[tokio::test]
    async fn a_claim_not_charged_before_auto_top_up_was_turned_off_is_not_charged() {
        use tally::alerts::{AlertSettings, AutoTopUp, TopUpClaim};
        use tally::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
        for (turned_off, disputed) in [(true, false), (false, true), (false, false)] {
            let app = TestApp::new();
            let ws = "org_off";
            with_saved_card(&app, ws, top_up_below_30()).await;
            let sim = app.local.simulator.clone().unwrap();
            let before = paid_intents(&sim);
            let pk = workspace_pk(&tally_tests::workspace(ws));
            let profile: BillingProfile =
                tally::store::docs::get(app.docs.as_ref(), &pk, PROFILE_SK)
                    .await
                    .unwrap()
                    .unwrap();
            let now = tally::clock::Clock::now(app.clock.as_ref());
            tally::store::docs::update(
                app.docs.as_ref(),
                &pk,
                tally::alerts::ALERTS_SK,
                |cur: Option<AlertSettings>| {
                    let mut s = cur.unwrap();
                    s.last_topup_at = Some(now);
                    s.topup_claim = Some(TopUpClaim {
                        entry: 40,
                        pack: "pack_100".into(),
                        claimed_at: now,
                        customer: profile.customer.clone().unwrap().to_string(),
                        payment_method: profile.payment_method.clone().unwrap().to_string(),
                        amount_cents: 1000,
                        credits: 100,
                        payment: None,
                        processing: false,
                        declined: false,
                    });
                    if disputed {
                        s.stopped_by_dispute = Some("dp_1".into());
                    }
                    if turned_off {
                        s.auto_topup = None;
                    } else {
                        s.auto_topup = Some(AutoTopUp {
                            pack: "pack_100".into(),
                            below_credits: tally::money::Credits::new(30),
                        });
                    }
                    Some(s)
                },
            )
            .await
            .unwrap();
            redeliver_top_up(&app, ws, 40).await.unwrap();
            app.settle_billing().await;
            let charged = usize::from(!turned_off && !disputed);
            assert_eq!(
                paid_intents(&sim),
                before + charged,
                "turned off: {turned_off}, disputed: {disputed}"
            );
            let sent = notifications(&app).await;
            assert_eq!(
                sent.iter().any(|n| n["type"] == "topup.failed"
                    && n["reason"].as_str().unwrap().contains("disputed")),
                disputed,
                "{sent:#?}"
            );
            assert_eq!(app.available(ws).await, 100 + 100 * charged as u64);
        }
    }

    /// A custom payment paid on its hosted invoice page with a card entered there: Stripe
    /// keeps that card for no one, so it does not replace the saved card auto top-up
    /// charges (which Stripe would refuse off-session); the next top-up charges the saved
    /// card.
    #[tokio::test]
    async fn a_card_entered_on_a_custom_payment_page_does_not_become_the_top_up_card() {
        use tally::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
        let app = TestApp::new();
        let ws = "org_page_card";
        with_saved_card(&app, ws, top_up_below_30()).await;
        let pk = workspace_pk(&tally_tests::workspace(ws));
        let saved = || async {
            let p: BillingProfile = tally::store::docs::get(app.docs.as_ref(), &pk, PROFILE_SK)
                .await
                .unwrap()
                .unwrap();
            p.payment_method.unwrap().to_string()
        };
        let card = saved().await;
        let issued = app
            .send(
                Method::POST,
                &format!("/v1/admin/workspaces/{ws}/custom-payments"),
                Some(&tally_tests::support()),
                Some(
                    &json!({"amount_cents": 5000, "credits": 500, "description": "Extra"})
                        .to_string(),
                ),
                &[("idempotency-key", "page-card")],
            )
            .await;
        assert_eq!(issued.status.as_u16(), 201, "{:#}", issued.body);
        pay_invoice_page(&app, &issued.body["hosted_invoice_url"]).await;
        app.settle_billing().await;
        assert_eq!(
            app.available(ws).await,
            600,
            "the payment's credits arrived"
        );
        let paid_with = app
            .sim_events("charge.succeeded")
            .into_iter()
            .find(|c| c["amount"] == 5000)
            .unwrap()["payment_method"]
            .clone();
        assert_ne!(paid_with, json!(card), "entered on the page");
        assert_eq!(saved().await, card, "the saved card stays");
        // The next top-up charges the saved card.
        let m = member(ws, "m1");
        while app.available(ws).await >= 30 {
            let started = app.post("/v1/generations", &m, video()).await;
            assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
        }
        let sent = notifications(&app).await;
        assert!(
            sent.iter().any(|n| n["type"] == "topup.charged"),
            "{sent:#?}"
        );
        let topup = app
            .sim_events("payment_intent.succeeded")
            .into_iter()
            .filter(|pi| pi["metadata"]["topup"] == "true")
            .collect::<Vec<_>>();
        assert_eq!(topup.len(), 1);
        assert_eq!(topup[0]["payment_method"], json!(card));
    }

    /// Stripe answers a top-up's payment as still being collected (`processing`). It is
    /// not a refusal: the card is not marked refused, the payment is kept on the claim (no
    /// second charge), nothing is reported and no receipt says paid what may yet fail; the
    /// request is delivered again and asks Stripe where the payment stands. Taken: the
    /// receipt and `topup.charged`. Failed: `topup.failed`, the card refused, and a later
    /// crossing does not wait for credits that will never come.
    #[tokio::test]
    async fn a_top_up_stripe_is_still_collecting_is_settled_when_stripe_has_decided() {
        use tally::queue::ConsumeError;
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        for taken in [true, false] {
            let app = TestApp::new();
            let ws = "org_slow";
            // (The claim names the pack's grant, journal entry 1, as its crossing: a later
            // crossing's entry is above it.)
            let (o, _) = with_saved_card(&app, ws, top_up_below_30()).await;
            let card = set_claim(&app, ws, |_| {}).await;
            let stripe = MockServer::start().await;
            Mock::given(method("POST"))
                .and(path("/v1/payment_intents"))
                .respond_with(slow_intent("processing"))
                .mount(&stripe)
                .await;
            // Still processing when first asked, then decided.
            Mock::given(method("GET"))
                .and(path("/v1/payment_intents/pi_slow"))
                .respond_with(slow_intent("processing"))
                .up_to_n_times(1)
                .mount(&stripe)
                .await;
            Mock::given(method("GET"))
                .and(path("/v1/payment_intents/pi_slow"))
                .respond_with(slow_intent(if taken {
                    "succeeded"
                } else {
                    "requires_payment_method"
                }))
                .mount(&stripe)
                .await;
            // The receipt (which first reads the customer's balance): Stripe refuses it
            // here, which leaves the payment standing.
            Mock::given(method("GET"))
                .and(wiremock::matchers::path_regex("^/v1/customers/"))
                .respond_with(ResponseTemplate::new(400).set_body_json(
                    json!({"error": {"type": "invalid_request_error", "code": "parameter_invalid_empty", "message": "Not a receipt here", "param": "customer"}}),
                ))
                .mount(&stripe)
                .await;
            let payments = stripe_at(&stripe);
            let deliver = |attempt: u32| deliver_top_up(&app, payments.clone(), ws, 1, attempt);
            let asked = || async {
                stripe
                    .received_requests()
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.url.path()))
                    .collect::<Vec<_>>()
            };
            // Charged, still processing; then asked again, still processing.
            for attempt in 1..=2 {
                let outcome = deliver(attempt).await;
                assert!(
                    matches!(outcome, Err(ConsumeError::Retry(_))),
                    "{outcome:?}"
                );
                let sent = notifications(&app).await;
                assert!(
                    sent.iter()
                        .all(|n| !n["type"].as_str().unwrap().starts_with("topup.")),
                    "nothing reported yet: {sent:#?}"
                );
                let settings = app.get("/v1/alerts", &o).await.body;
                assert_eq!(
                    settings["topup_claim"]["payment"], "pi_slow",
                    "{settings:#}"
                );
                assert_eq!(settings["topup_claim"]["processing"], true, "{settings:#}");
                assert!(settings["refused_card"].is_null(), "{settings:#}");
            }
            assert_eq!(
                asked().await,
                [
                    "POST /v1/payment_intents",
                    "GET /v1/payment_intents/pi_slow"
                ],
                "charged once"
            );
            // Decided, and delivered a day after the claim (a redrive from the dead-letter
            // queue): asking Stripe is a read, safe at any age.
            app.clock.advance(chrono::Duration::hours(24));
            deliver(3).await.unwrap();
            let sent = notifications(&app).await;
            let last = sent.last().unwrap();
            let settings = app.get("/v1/alerts", &o).await.body;
            assert_eq!(
                settings["topup_claim"]["payment"], "pi_slow",
                "{settings:#}"
            );
            assert!(
                settings["topup_claim"]["processing"].is_null(),
                "{settings:#}"
            );
            let mut expected = vec![
                "POST /v1/payment_intents".to_string(),
                "GET /v1/payment_intents/pi_slow".to_string(),
                "GET /v1/payment_intents/pi_slow".to_string(),
            ];
            if taken {
                assert_eq!(last["type"], "topup.charged", "{sent:#?}");
                assert_eq!(last["payment"], "pi_slow");
                assert!(settings["refused_card"].is_null(), "{settings:#}");
                expected.push(format!(
                    "GET /v1/customers/{}",
                    settings["topup_claim"]["customer"].as_str().unwrap()
                ));
            } else {
                assert_eq!(last["type"], "topup.failed", "{sent:#?}");
                assert!(
                    last["reason"].as_str().unwrap().contains("declined"),
                    "{last:#}"
                );
                assert_eq!(settings["refused_card"], json!(card), "{settings:#}");
                assert_eq!(settings["topup_claim"]["declined"], true, "{settings:#}");
            }
            assert_eq!(asked().await, expected, "taken: {taken}");
            // Delivered once more: decided already, nothing asked of Stripe. (Taken, the
            // receipt's key is older than Stripe keeps keys: left to a person.)
            let again = deliver(4).await;
            if taken {
                assert!(matches!(again, Err(ConsumeError::Poison(_))), "{again:?}");
            } else {
                again.unwrap();
            }
            assert_eq!(asked().await, expected, "taken: {taken}");
        }
    }

    /// A top-up whose request gave up while Stripe was still collecting its payment (left
    /// in the dead-letter queue): a later crossing asks Stripe about it rather than waiting
    /// for its credits. Failed, the card counts as refused and the claim as declined; a
    /// crossing after that does not wait either. Still processing, the crossing waits.
    #[tokio::test]
    async fn a_later_crossing_asks_stripe_about_a_top_up_left_processing() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        for status in ["requires_payment_method", "processing", "succeeded"] {
            let failed = status == "requires_payment_method";
            let app = TestApp::new();
            let ws = "org_left";
            // No auto top-up while the balance drops below 30; then it is turned on.
            let (o, _) = with_saved_card(&app, ws, json!({"below_credits": []})).await;
            let m = member(ws, "m1");
            while app.available(ws).await >= 30 {
                app.post("/v1/generations", &m, video()).await;
            }
            save_alerts(&app, &o, top_up_below_30()).await;
            let card = set_claim(&app, ws, |c| {
                c.payment = Some("pi_slow".into());
                c.processing = true;
                c.claimed_at -= chrono::Duration::hours(1);
            })
            .await;
            let stripe = MockServer::start().await;
            Mock::given(method("GET"))
                .and(path("/v1/payment_intents/pi_slow"))
                .respond_with(slow_intent(status))
                .mount(&stripe)
                .await;
            let payments = stripe_at(&stripe);
            for entry in [100, 101] {
                deliver_top_up(&app, payments.clone(), ws, entry, 1)
                    .await
                    .unwrap();
                let sent = notifications(&app).await;
                let last = sent.last().unwrap();
                assert_eq!(last["type"], "topup.failed", "{sent:#?}");
                assert_eq!(last["entry"], entry, "{sent:#?}");
                let reason = last["reason"].as_str().unwrap();
                assert_eq!(reason.contains("not recorded yet"), !failed, "{reason}");
                assert_eq!(reason.contains("refused"), failed, "{reason}");
            }
            let settings = app.get("/v1/alerts", &o).await.body;
            assert_eq!(settings["topup_claim"]["entry"], 1, "{settings:#}");
            assert_eq!(settings["topup_claim"]["declined"] == true, failed);
            // Taken, it stays processing for its own request, which makes its receipt.
            assert_eq!(settings["topup_claim"]["processing"] == true, !failed);
            assert_eq!(settings["refused_card"] == json!(card), failed);
            // Asked once when it failed (then known), at each crossing otherwise; never
            // charged.
            let asked = stripe.received_requests().await.unwrap();
            assert_eq!(asked.len(), if failed { 1 } else { 2 });
            assert!(asked.iter().all(|r| r.method.as_str() == "GET"));
            if status == "succeeded" {
                // Its own request, redriven two days after its claim, makes its receipt
                // (which first reads the customer's balance; refused here) and reports it.
                Mock::given(method("GET"))
                    .and(wiremock::matchers::path_regex("^/v1/customers/"))
                    .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
                        "type": "invalid_request_error", "code": "parameter_invalid_empty",
                        "message": "Not a receipt here", "param": "customer"}})))
                    .mount(&stripe)
                    .await;
                app.clock.advance(chrono::Duration::hours(48));
                deliver_top_up(&app, payments.clone(), ws, 1, 1)
                    .await
                    .unwrap();
                let sent = notifications(&app).await;
                let last = sent.last().unwrap();
                assert_eq!(last["type"], "topup.charged", "{sent:#?}");
                assert_eq!(last["payment"], "pi_slow");
                let asked = stripe.received_requests().await.unwrap();
                assert!(
                    asked
                        .last()
                        .unwrap()
                        .url
                        .path()
                        .starts_with("/v1/customers/"),
                    "the receipt was made"
                );
            }
        }
    }

    /// Every answer lost: the payment was made, but no delivery learnt of it, and the
    /// request ends in the dead-letter queue with the cooldown taken. A redrive the next
    /// day, when Stripe has forgotten the key, would charge again: it is left to a person.
    #[tokio::test]
    async fn a_top_up_never_confirmed_within_a_day_is_not_charged_again() {
        let app = TestApp::new();
        with_saved_card(&app, "org_unconfirmed", top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        sim.lose_answers(tally::alerts::TOPUPS_MAX_RECEIVES);
        let m = member("org_unconfirmed", "m1");
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await; // 100 -> 28
        }
        let reports = notifications(&app).await;
        assert!(
            reports.iter().all(|n| n["type"] != "topup.charged"),
            "{reports:#?}"
        );
        let dead = app.local.topups_queue.dead_letters();
        assert_eq!(dead.len(), 1, "in the dead-letter queue");
        assert_eq!(paid_intents(&sim), before + 1, "charged, unknown to Tally");
        let claim =
            app.get("/v1/alerts", &owner("org_unconfirmed")).await.body["topup_claim"].clone();
        assert!(claim["payment"].is_null(), "{claim:#}");
        let entry = claim["entry"].as_u64().unwrap();
        // A day later it is refused, and stays for a person.
        app.clock.advance(chrono::Duration::hours(24));
        sim.forget_idempotency_keys().await;
        let redrive_later = redeliver_top_up(&app, "org_unconfirmed", entry).await;
        assert!(
            matches!(redrive_later, Err(tally::queue::ConsumeError::Poison(_))),
            "{redrive_later:?}"
        );
        app.settle_billing().await;
        assert_eq!(paid_intents(&sim), before + 1, "no second charge");
    }

    /// A top-up whose key Stripe already knows with other parameters (an attempt by an
    /// earlier release, whose answer was lost): that attempt may have charged the card, so
    /// the request is neither reported failed nor charged again; it is left to a person.
    #[tokio::test]
    async fn a_top_up_key_stripe_knows_with_other_parameters_is_left_to_a_person() {
        use tally::payments::Payments;
        let app = TestApp::new();
        with_saved_card(&app, "org_keyed", top_up_below_30()).await;
        let sim = app.local.simulator.clone().unwrap();
        sim.lose_answers(tally::alerts::TOPUPS_MAX_RECEIVES);
        let m = member("org_keyed", "m1");
        for _ in 0..3 {
            app.post("/v1/generations", &m, video()).await; // 100 -> 28
        }
        // The top-ups queue runs (every answer lost, so it ends in the dead-letter queue).
        notifications(&app).await;
        assert_eq!(app.local.topups_queue.dead_letters().len(), 1);
        let o = owner("org_keyed");
        let claim = app.get("/v1/alerts", &o).await.body["topup_claim"].clone();
        assert!(claim["payment"].is_null(), "{claim:#}");
        let entry = claim["entry"].as_u64().unwrap();
        // What Stripe remembers under the key: the same charge asked for differently.
        sim.forget_idempotency_keys().await;
        let profile: tally::billing::records::BillingProfile = tally::store::docs::get(
            app.docs.as_ref(),
            &tally::billing::records::workspace_pk(&tally_tests::workspace("org_keyed")),
            tally::billing::records::PROFILE_SK,
        )
        .await
        .unwrap()
        .unwrap();
        sim.charge_saved_method(&tally::payments::TopUp {
            workspace: tally_tests::workspace("org_keyed"),
            customer: profile.customer.unwrap(),
            payment_method: profile.payment_method.unwrap(),
            pack: "pack_100".into(),
            credits: tally::money::Credits::new(99),
            amount: tally::money::Cents::new(1),
            idempotency_key: format!("tally-topup-org_keyed-{entry}"),
        })
        .await
        .unwrap();
        let before = paid_intents(&sim);
        let again = redeliver_top_up(&app, "org_keyed", entry).await;
        assert!(
            matches!(&again, Err(tally::queue::ConsumeError::Poison(p)) if p.to_string().contains("idempotency key")),
            "{again:?}"
        );
        assert_eq!(paid_intents(&sim), before, "no charge");
        let reports = notifications(&app).await;
        assert!(
            reports.iter().all(|n| n["type"] != "topup.failed"),
            "{reports:#?}"
        );
    }

    /// As Stripe does, the simulator answers a repeated idempotency key with the first
    /// payment, and refuses the key for a different payment.
    #[tokio::test]
    async fn an_off_session_payment_is_made_once_per_idempotency_key() {
        use tally::payments::{Payments, TopUp};
        let app = TestApp::new();
        buy_pack(&app, "org_key", "pack_100").await;
        let profile: tally::billing::records::BillingProfile = tally::store::docs::get(
            app.docs.as_ref(),
            &tally::billing::records::workspace_pk(&tally_tests::workspace("org_key")),
            tally::billing::records::PROFILE_SK,
        )
        .await
        .unwrap()
        .unwrap();
        let sim = app.local.simulator.clone().unwrap();
        let before = paid_intents(&sim);
        let available = app.available("org_key").await;
        // Sold with other credits than the catalog's now (a catalog changed meanwhile):
        // the payment grants what it was sold with.
        let topup = TopUp {
            workspace: tally_tests::workspace("org_key"),
            customer: profile.customer.unwrap(),
            payment_method: profile.payment_method.unwrap(),
            pack: "pack_100".into(),
            credits: tally::money::Credits::new(137),
            amount: tally::money::Cents::new(1000),
            idempotency_key: "tally-topup-org_key-7".into(),
        };
        let first = sim.charge_saved_method(&topup).await.unwrap();
        assert_eq!(sim.charge_saved_method(&topup).await.unwrap(), first);
        let other = TopUp {
            amount: tally::money::Cents::new(900),
            ..topup.clone()
        };
        assert!(matches!(
            sim.charge_saved_method(&other).await,
            Err(tally::payments::PaymentsError::Refused { .. })
        ));
        app.settle_billing().await;
        assert_eq!(paid_intents(&sim), before + 1);
        assert_eq!(app.available("org_key").await, available + 137);
    }

    #[tokio::test]
    async fn without_a_saved_card_the_top_up_is_reported_not_charged() {
        let app = TestApp::new();
        tally_tests::grant(&app.ledger, "org_nc", 40).await;
        let o = owner("org_nc");
        app.send(Method::PUT, "/v1/alerts", Some(&o), Some(&json!({"below_credits": [], "auto_topup": {"pack": "pack_100", "below_credits": 30}}).to_string()), &[]).await;
        app.post("/v1/generations", &member("org_nc", "m"), video())
            .await;
        let all = notifications(&app).await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0]["type"], "topup.failed");
        assert_eq!(app.available("org_nc").await, 16);
    }

    #[tokio::test]
    async fn alert_settings_are_validated_and_only_for_billing_roles() {
        let app = TestApp::new();
        let o = owner("org_av");
        for bad in [
            json!({"below_credits": [0]}),
            json!({"below_credits": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}),
            json!({"below_credits": [-5]}),
            json!({"below_credits": [10], "auto_topup": {"pack": "pack_9", "below_credits": 5}}),
            json!({"below_credits": [10], "auto_topup": {"pack": "pack_100", "below_credits": 0}}),
            json!({"below_credits": [10], "extra": true}),
        ] {
            app.send(
                Method::PUT,
                "/v1/alerts",
                Some(&o),
                Some(&bad.to_string()),
                &[],
            )
            .await
            .assert_problem(422, "validation_failed");
        }
        app.send(
            Method::PUT,
            "/v1/alerts",
            Some(&member("org_av", "m")),
            Some(&json!({"below_credits": [5]}).to_string()),
            &[],
        )
        .await
        .assert_problem(403, "forbidden");
        assert_eq!(
            app.get("/v1/alerts", &o).await.body,
            json!({"below_credits": [], "auto_topup": null, "last_topup_at": null})
        );
    }
}
