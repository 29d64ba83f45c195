//! A seeded lifecycle simulation: random workspaces through months of plan changes, add-on
//! changes (some of monthly plans made in Stripe's dashboard, their prorations left for the
//! next invoice),
//! interval switches, cancels, resumes, pauses, renewals, declined cards, pack
//! purchases, auto top-ups, generations, refunds, disputes and inquiries, staff credit
//! notes and duplicated or reordered webhooks (a step's events held back and delivered
//! shuffled; the webhook endpoint down for a few steps while the clock moves up to about
//! three days, then every event delivered shuffled and what waited in vain redriven from
//! the dead letters; a redelivery reaches the worker, as Stripe's resend past the queue's
//! deduplication window does).
//! Half the seeds start on an edge of the calendar (the first or last days of a month,
//! February of a leap year, at midnight or a second before it), and the clock moves by
//! hours, by minutes onto holds' deadlines, and exactly onto lots' expiries. The
//! invariants of "credits follow paid money" are checked after every step:
//!
//! - subscription credits kept by now (granted, less taken back) never exceed what the
//!   paid invoice lines allow by now: each line's credits
//!   at its own price, over the billing months of its period begun so far, each month less
//!   the share of the invoice's money given back (refunded, credited, lost in a dispute)
//!   before it began (see `paid_lines_allow`);
//! - every paid period's first month is granted exactly once, every allotment at most once,
//!   and every month of a paid year that has begun at least once (unless the subscription
//!   ended or a later period replaced it first, the year's money had all gone back, or
//!   the month ended while the schedule was late);
//! - pack credits are exactly what the paid pack checkouts and auto top-ups sold: one lot
//!   per checkout or top-up; auto top-up charges only while it is on, at most once every
//!   ten minutes;
//! - the credit refresh never fails;
//! - Tally's subscription shows the plan, interval and add-on units Stripe has;
//! - a canceled subscription is never charged again and never granted again, a paused one
//!   is never charged for a renewal;
//! - the balance is never negative, conservation holds, the journal rebuilds the state,
//!   and every open hold in it has its item (its allocations within its lots);
//! - credits taken back for refunds, credit notes and lost disputes never exceed what the
//!   money given back bought (the lot's credits times the share of its payment given back);
//! - while a payment is disputed (a chargeback, or an inquiry, which the bank may turn
//!   into a chargeback of its own), no unspent credit it bought is free to spend, and
//!   once its dispute is lost none is left at all;
//! - every generation is charged once: a completed one exactly the cost asked (what the
//!   balance could not pay recorded as its shortfall), a failed or expired one nothing,
//!   and the generations' charges add up to the journal's credits spent. Some generations
//!   are left running past their hold's deadline (the generation service down) and
//!   completed or failed late, above or below their estimate. A shortfall is recorded
//!   only when the charge left nothing available.
//!
//! Crashes between the Stripe call and the ledger write are changes made at Stripe with no
//! grant of their own: their credits come from the paid invoice's event alone. They go to
//! any plan, billed at once, so they also stand for downgrades made in Stripe's dashboard
//! (credited back: the credits of the time credited are taken back as far as unspent).
//!
//! `TALLY_SIM_SEEDS` (default 2000) seeds of `TALLY_SIM_STEPS` (default 20) steps run in
//! `make test`; `make soak` runs more. A failing seed prints how to replay it alone:
//! `TALLY_SIM_SEED=<n> cargo test -p tally-tests --test suite simulation` (add
//! `TALLY_SIM_TRACE=1` to see each step and the subscription after it).

use axum::http::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use tally::catalog::Catalog;
use tally::ledger::{LotChange, LotSource, WorkspaceState};
use tally::store::EntryQuery;
use tally::subscriptions::paid::Item;
use tally_tests::{TestApp, owner, service, workspace};

const PLANS: [&str; 4] = ["plus", "max", "generative", "team"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone)]
enum Step {
    Subscribe(usize, bool),
    Change(usize, bool),
    Units(u32),
    Cancel,
    Resume,
    Pause,
    Unpause,
    /// Moves the clock some hours; `true`: without the credit refresh running until the
    /// next advance.
    Advance(i64, bool),
    Declines(bool),
    Pack(u64),
    Generate(u64, bool),
    /// Starts a generation the generation service does not settle for now.
    Abandon(u64),
    /// Settles one of the generations left running: completed at the given percentage of
    /// its estimate, or failed.
    Late(usize, Option<u64>),
    Redeliver(usize),
    /// A change whose request died after Stripe made it (before any grant of its own).
    Crash(usize),
    /// A change made in Stripe's dashboard that leaves its prorations for the next invoice
    /// (the subscription's renewal, or a change billed at once): to another plan of the
    /// same interval, or (`Some`) to that many add-on units.
    Deferred(usize, Option<u32>),
    /// Refunds a percentage of what is left of one of the charges so far.
    Refund(usize, i64),
    /// Disputes one of the charges so far: a chargeback, or an inquiry (which the
    /// cardholder's bank may turn into a chargeback, a dispute of its own, at once or
    /// later).
    Dispute(usize, bool),
    /// Closes one of the open disputes, won or lost.
    CloseDispute(usize, bool),
    /// Staff credit a percentage of what is left of one of the paid invoices outside
    /// Stripe (a credit note made in the dashboard).
    CreditNote(usize, i64),
    /// The owner turns auto top-up on (buy a 100-credit pack below this percentage of the
    /// balance now, so that the next generations cross it) or off.
    AutoTopUp(Option<u64>),
    /// Moves the clock some minutes (onto a hold's deadline, an hour after it started).
    AdvanceMinutes(i64),
    /// Spends the balance down with the longest videos until one is refused, so that what
    /// follows meets an empty balance (refusals, shortfalls).
    Burn,
    /// Moves the clock exactly onto one of the lots' expiry (or a second before or after).
    ToExpiry(usize, i64),
    /// A step whose Stripe events are delivered after it, in a shuffled order (of the
    /// seed given): Stripe promises no order, and retries a failed delivery later.
    Reordered(Box<Step>, u64),
    /// Tally's webhook endpoint is down for a few steps, with the clock moving about three
    /// days at most (how long Stripe retries a failed delivery): the events of every step
    /// are delivered after the last, in a shuffled order (of the seed given), while the
    /// credit refresh, the API and the generation service go on meanwhile; what waited in
    /// vain for an event behind it is redriven from the dead letters afterwards.
    Outage(Vec<Step>, u64),
}

fn random_step(rng: &mut fastrand::Rng) -> Step {
    match rng.u32(0..119) {
        0..=9 => Step::Subscribe(rng.usize(0..PLANS.len()), rng.bool()),
        10..=24 => Step::Change(rng.usize(0..PLANS.len()), rng.u32(0..4) == 0),
        25..=34 => Step::Units(rng.u32(0..12)),
        35..=38 => Step::Cancel,
        39..=41 => Step::Resume,
        42..=44 => Step::Pause,
        45..=47 => Step::Unpause,
        48..=61 => Step::Advance(rng.i64(1..=24 * 40), rng.u32(0..4) == 0),
        62..=64 => Step::Abandon(rng.u64(1..=60)),
        65..=67 => Step::Late(
            rng.usize(0..10_000),
            rng.bool().then(|| [10, 50, 100, 150, 400][rng.usize(0..5)]),
        ),
        68..=71 => Step::Declines(rng.u32(0..3) == 0),
        72..=76 => Step::Pack(rng.u64(1..=3)),
        77..=86 => Step::Generate(rng.u64(1..=60), rng.bool()),
        87..=90 => Step::Crash(rng.usize(0..PLANS.len())),
        91..=93 => Step::Refund(rng.usize(0..10_000), [25, 50, 100][rng.usize(0..3)]),
        94 => Step::Dispute(rng.usize(0..10_000), rng.u32(0..3) == 0),
        95 => Step::CloseDispute(rng.usize(0..10_000), rng.bool()),
        96 => Step::CreditNote(rng.usize(0..10_000), [25, 50, 100][rng.usize(0..3)]),
        97..=99 => Step::Redeliver(rng.usize(0..10_000)),
        100..=103 => Step::AdvanceMinutes([1, 30, 59, 60, 61, 119, 120][rng.usize(0..7)]),
        104..=105 => Step::ToExpiry(rng.usize(0..10_000), rng.i64(-1..=1)),
        106 => Step::Burn,
        107..=108 => Step::AutoTopUp(rng.bool().then(|| [50, 90, 99, 100, 120][rng.usize(0..5)])),
        112..=114 => Step::Deferred(
            rng.usize(0..PLANS.len()),
            rng.bool().then(|| rng.u32(0..12)),
        ),
        115.. => {
            // Stripe retries a failed delivery for up to three days.
            let mut hours_left = 72;
            let mut inner = Vec::new();
            let steps = rng.usize(2..=4);
            while inner.len() < steps {
                match random_step(rng) {
                    Step::Advance(_, late) => {
                        let hours = rng.i64(1..=36).min(hours_left);
                        if hours > 0 {
                            hours_left -= hours;
                            inner.push(Step::Advance(hours, late));
                        }
                    }
                    // Nothing that releases the held deliveries or jumps the clock past
                    // Stripe's retries; a crash's simulated change reads Stripe's
                    // subscription as Tally last saw it, which is stale meanwhile.
                    Step::Reordered(..)
                    | Step::Outage(..)
                    | Step::ToExpiry(..)
                    | Step::Crash(_)
                    | Step::Deferred(..) => {}
                    s => inner.push(s),
                }
            }
            Step::Outage(inner, rng.u64(..))
        }
        _ => {
            let inner = loop {
                match random_step(rng) {
                    Step::Advance(..)
                    | Step::AdvanceMinutes(_)
                    | Step::ToExpiry(..)
                    | Step::Burn
                    | Step::Outage(..) => {}
                    inner => break inner,
                }
            };
            Step::Reordered(Box::new(inner), rng.u64(..))
        }
    }
}

/// What the simulation knows of its workspace (the answers it got, nothing more).
struct Model {
    ws: String,
    customer: Option<String>,
    /// The subscription whose collection is paused, and since when.
    paused_since: Option<(String, i64)>,
    /// Subscriptions Stripe deleted, with when.
    ended: BTreeMap<String, i64>,
    /// Generations started and not settled yet, with their estimate.
    running: Vec<(String, u64)>,
    /// The cost each completion asked for, by generation.
    asked: BTreeMap<String, u64>,
    /// Tally's schedule while the clock moves without it (the credit refresh late): what
    /// happens meanwhile meets yearly months that fell due and are not granted yet.
    late_schedule: Option<std::sync::Arc<dyn tally_local::simulator::ScheduleHook>>,
    /// Auto top-up turned off, with how many top-ups had been charged by then.
    topups_off: Option<usize>,
    /// When the schedule was late (from, until; `None` while it still is): a yearly month
    /// that began then may have lapsed before the schedule came back, and is not granted.
    late: Vec<(i64, Option<i64>)>,
}

/// A video generation of `seconds` started by the owner.
async fn start_video(app: &TestApp, owner: &str, seconds: u64) -> tally_tests::Answer {
    generation_call(
        app,
        "/v1/generations",
        owner,
        json!({"workflow": "video", "model": "video-lite", "duration_s": seconds}),
    )
    .await
}

/// A call to the generations API, then whatever auto top-up it asked for, charged and
/// granted before the next step (so a seed replays the same way).
async fn generation_call(
    app: &TestApp,
    path: &str,
    token: &str,
    body: Value,
) -> tally_tests::Answer {
    let a = app.post(path, token, body).await;
    app.local.topups_queue.until_idle().await;
    app.settle_billing().await;
    a
}

async fn step(app: &TestApp, m: &mut Model, s: &Step) {
    let o = owner(&m.ws);
    match s {
        Step::Subscribe(p, yearly) => {
            let r = app
                .post(
                    "/v1/checkout/sessions",
                    &o,
                    json!({"kind": "plan", "plan": PLANS[*p],
                        "interval": if *yearly { "yearly" } else { "monthly" }}),
                )
                .await;
            if r.status.as_u16() == 201 {
                app.pay(r.body["url"].as_str().unwrap()).await;
            }
        }
        Step::Change(p, yearly) => {
            app.change_plan(&m.ws, PLANS[*p], if *yearly { "yearly" } else { "monthly" })
                .await;
        }
        Step::Units(u) => {
            app.set_units(&m.ws, *u).await;
        }
        Step::Cancel | Step::Resume | Step::Pause | Step::Unpause => {
            let path = match s {
                Step::Cancel => "/v1/subscription/cancel",
                Step::Resume | Step::Unpause => "/v1/subscription/resume",
                _ => "/v1/subscription/pause",
            };
            app.post(path, &o, json!({})).await;
        }
        Step::Advance(hours, late) => {
            let sim = app.local.simulator.as_ref().unwrap();
            if *late {
                if m.late_schedule.is_none() {
                    m.late_schedule = Some(sim.schedule());
                    sim.set_schedule(std::sync::Arc::new(tally_local::simulator::NoSchedule));
                    m.late.push((app.ledger.clock.now().timestamp(), None));
                }
            } else if let Some(hook) = m.late_schedule.take() {
                sim.set_schedule(hook);
                if let Some(l) = m.late.last_mut() {
                    l.1 = Some(app.ledger.clock.now().timestamp());
                }
            }
            let r = app
                .send(
                    Method::POST,
                    "/sim/clock/advance",
                    None,
                    Some(&json!({"hours": hours}).to_string()),
                    &[],
                )
                .await;
            assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        }
        Step::Declines(d) => {
            if let Some(c) = &m.customer {
                app.send(
                    Method::POST,
                    &format!("/sim/customers/{c}/card"),
                    None,
                    Some(&json!({"declines": d}).to_string()),
                    &[],
                )
                .await;
            }
        }
        Step::Pack(q) => {
            let r = app
                .post(
                    "/v1/checkout/sessions",
                    &o,
                    json!({"kind": "pack", "pack": "pack_100", "quantity": q}),
                )
                .await;
            if r.status.as_u16() == 201 {
                app.pay(r.body["url"].as_str().unwrap()).await;
            }
        }
        Step::Generate(seconds, ok) => {
            let g = start_video(app, &o, *seconds).await;
            if let Some(id) = g.body["id"].as_str() {
                let end = if *ok { "complete" } else { "fail" };
                let body = if *ok {
                    json!({})
                } else {
                    json!({"reason": "provider error"})
                };
                let r = generation_call(
                    app,
                    &format!("/v1/generations/{id}/{end}"),
                    &service(),
                    body,
                )
                .await;
                if *ok && r.status.is_success() {
                    let estimate = g.body["estimate"]["credits"].as_u64().unwrap();
                    m.asked.insert(id.to_owned(), estimate);
                }
            }
        }
        Step::Abandon(seconds) => {
            let g = start_video(app, &o, *seconds).await;
            if let (Some(id), Some(estimate)) = (
                g.body["id"].as_str(),
                g.body["estimate"]["credits"].as_u64(),
            ) {
                m.running.push((id.to_owned(), estimate));
            }
        }
        Step::Late(n, pct) => {
            if !m.running.is_empty() {
                let (id, estimate) = m.running.remove(n % m.running.len());
                let path = format!(
                    "/v1/generations/{id}/{}",
                    pct.map_or("fail", |_| "complete")
                );
                let body = match pct {
                    Some(pct) => json!({"credits": (estimate * pct / 100).max(1)}),
                    None => json!({"reason": "provider error"}),
                };
                let r = generation_call(app, &path, &service(), body).await;
                match pct {
                    Some(pct) if r.status.is_success() => {
                        m.asked.insert(id, (estimate * pct / 100).max(1));
                    }
                    _ if r.status.is_success() || r.status.as_u16() == 409 => {}
                    _ => panic!("settling {id} late answered {}: {}", r.status, r.body),
                }
            }
        }
        Step::Crash(p) => {
            use tally::payments::{ItemPrice, Payments, SubscriptionChange};
            let sub = app.get("/v1/subscription", &o).await.body;
            let (Some(id), Some(interval)) = (
                sub["subscription"]["id"].as_str(),
                sub["subscription"]["interval"].as_str(),
            ) else {
                return;
            };
            // Changes are made to active subscriptions only: a paused one bills nothing for
            // a change, and Stripe would later credit that unpaid time back as if paid.
            if sub["subscription"]["status"] != "active" {
                return;
            }
            let interval = if interval == "yearly" {
                tally::ledger::Interval::Yearly
            } else {
                tally::ledger::Interval::Monthly
            };
            let catalog = app.ledger.catalog.clone();
            let plan = catalog.plan(PLANS[*p]).unwrap();

            let sim = app.local.simulator.as_ref().unwrap();
            // Whatever Stripe answers (refused, declined, done), Tally never grants here.
            let _ = sim
                .update_subscription(&SubscriptionChange {
                    plan: Some(ItemPrice {
                        product: tally::payments::stripe_api::product_id("plan", &plan.id),
                        product_name: format!("{} plan", plan.name),
                        unit_amount: tally::subscriptions::change::plan_unit_price(
                            &catalog, plan, interval,
                        ),
                        interval,
                    }),
                    prorate_now: true,
                    idempotency_key: format!("crash-{}", ulid::Ulid::new()),
                    ..SubscriptionChange::to(id.parse().unwrap())
                })
                .await;
        }
        Step::Deferred(p, units) => {
            use tally::payments::{ItemPrice, SubscriptionChange};
            let sub = app.get("/v1/subscription", &o).await.body;
            let s = &sub["subscription"];
            let (Some(id), Some(interval), Some(current)) =
                (s["id"].as_str(), s["interval"].as_str(), s["plan"].as_str())
            else {
                return;
            };
            // As for a crash: an active subscription's change only. Monthly plans only: of
            // a yearly plan, prorations left over several months are taken back from one
            // month when that month waits for the credit refresh (billing.md, known limits).
            if s["status"] != "active" || interval != "monthly" {
                return;
            }
            // A person in the dashboard, a minute after whatever came before (a change
            // through the API in the same second is not what this step is about).
            advance_until(app, app.ledger.clock.now() + chrono::Duration::minutes(1)).await;
            let interval = if interval == "yearly" {
                tally::ledger::Interval::Yearly
            } else {
                tally::ledger::Interval::Monthly
            };
            let catalog = app.ledger.catalog.clone();
            let mut change = SubscriptionChange::to(id.parse().unwrap());
            match units {
                None => {
                    let plan = catalog.plan(PLANS[*p]).unwrap();
                    change.plan = Some(ItemPrice {
                        product: tally::payments::stripe_api::product_id("plan", &plan.id),
                        product_name: format!("{} plan", plan.name),
                        unit_amount: tally::subscriptions::change::plan_unit_price(
                            &catalog, plan, interval,
                        ),
                        interval,
                    });
                }
                Some(u) => {
                    let Some(plan) = catalog.plan(current) else {
                        return;
                    };
                    let addon = catalog.addon(&plan.addon).unwrap();
                    change.addons = Some((
                        u64::from(*u),
                        ItemPrice {
                            product: tally::payments::stripe_api::product_id("addon", &addon.id),
                            product_name: format!("{} add-on credits", addon.credits_per_unit),
                            unit_amount: tally::subscriptions::change::addon_unit_price(
                                &catalog, plan, interval,
                            )
                            .unwrap(),
                            interval,
                        },
                    ));
                }
            }
            let sim = app.local.simulator.as_ref().unwrap();
            // Refused or made, Tally learns of it from Stripe's events alone.
            let _ = sim.change_without_invoicing(&change).await;
            app.settle_billing().await;
            // And a minute before anything else: two changes in one second (this one's
            // prorations and an API change's on one invoice) cannot be told apart.
            advance_until(app, app.ledger.clock.now() + chrono::Duration::minutes(1)).await;
        }
        Step::Refund(n, pct) => {
            let sim = app.local.simulator.as_ref().unwrap();
            let charges = succeeded_charges(app);
            if !charges.is_empty() {
                let c = sim.charge(&charges[n % charges.len()]).unwrap();
                let left = c["amount"].as_i64().unwrap() - c["amount_refunded"].as_i64().unwrap();
                let amount = (left * pct / 100).max(1);
                // Refused when nothing is left or the charge is disputed, as Stripe would.
                let _ = sim
                    .refund_charge(c["id"].as_str().unwrap(), Some(amount))
                    .await;
            }
        }
        Step::CreditNote(n, pct) => {
            let sim = app.local.simulator.as_ref().unwrap();
            let paid: Vec<Value> = app
                .sim_events("invoice.paid")
                .into_iter()
                .filter(|i| i["amount_paid"].as_i64().unwrap_or(0) > 0)
                // Not an auto top-up's receipt (its notes follow the top-up's payment, which
                // the model here ties to invoices through `invoice_payment.paid` only).
                .filter(|i| i["metadata"]["kind"] != "top_up")
                .collect();
            if !paid.is_empty() {
                let id = paid[n % paid.len()]["id"].as_str().unwrap().to_owned();
                let inv = sim.invoice(&id).unwrap();
                // Not while its payment is disputed: the dispute decides where that money
                // goes first (the note's share waits for it; the model here does not
                // follow that, the examples in the refund tests do).
                let pi = app
                    .sim_events("invoice_payment.paid")
                    .into_iter()
                    .find(|p| p["invoice"] == id.as_str())
                    .map(|p| p["payment"]["payment_intent"].clone());
                let disputed = succeeded_charges(app)
                    .into_iter()
                    .filter_map(|c| sim.charge(&c))
                    .filter(|c| Some(&c["payment_intent"]) == pi.as_ref())
                    .any(|c| c["disputed"] == true || !open_disputes(app, &c["id"]).is_empty());
                if disputed {
                    return;
                }
                let left = inv["amount_paid"].as_i64().unwrap()
                    - inv["post_payment_credit_notes_amount"]
                        .as_i64()
                        .unwrap_or(0);
                // Refused when nothing is left, as Stripe would.
                let _ = sim.credit_note(&id, (left * pct / 100).max(1)).await;
            }
        }
        Step::Dispute(n, inquiry) => {
            let sim = app.local.simulator.as_ref().unwrap();
            let charges = succeeded_charges(app);
            // Half the chargebacks go to a payment under inquiry, if there is one: the bank
            // turning the inquiry into a chargeback.
            let inquired: Vec<String> = charges
                .iter()
                .filter(|c| !open_disputes(app, &json!(c)).is_empty())
                .cloned()
                .collect();
            let charges = if !*inquiry && !inquired.is_empty() && n % 2 == 0 {
                inquired
            } else {
                charges
            };
            if !charges.is_empty() {
                let charge = &charges[n / 2 % charges.len()];
                // Not one whose invoice has a credit note: while the dispute is open the
                // note's share waits for it, which the model here does not follow (the
                // examples in the refund tests do).
                let pi = sim.charge(charge).unwrap()["payment_intent"].clone();
                let noted = app
                    .sim_events("invoice_payment.paid")
                    .into_iter()
                    .filter(|p| p["payment"]["payment_intent"] == pi)
                    .any(|p| {
                        app.sim_events("credit_note.created")
                            .iter()
                            .any(|n| n["invoice"] == p["invoice"])
                    });
                if !noted && !*inquiry {
                    let _ = sim.dispute_charge(charge).await;
                } else if !noted {
                    // An inquiry; a third of them the bank turns into a chargeback at once,
                    // and a third also closes the inquiry then.
                    if let Ok(d) = sim.inquire_charge(charge).await {
                        if n % 3 >= 1 {
                            let _ = sim.dispute_charge(charge).await;
                        }
                        if n % 3 == 2 {
                            let _ = sim.close_dispute(d["id"].as_str().unwrap(), true).await;
                        }
                    }
                }
            }
        }
        Step::CloseDispute(n, won) => {
            let sim = app.local.simulator.as_ref().unwrap();
            let open: Vec<String> = sim
                .events()
                .iter()
                .filter(|e| e.kind == "charge.dispute.created")
                .map(|e| {
                    e.payload["data"]["object"]["id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            if !open.is_empty() {
                let _ = sim.close_dispute(&open[n % open.len()], *won).await;
            }
        }
        Step::AutoTopUp(pct) => {
            let available = app.available(&m.ws).await;
            let settings = match pct {
                Some(p) => json!({"below_credits": [],
                    "auto_topup": {"pack": "pack_100",
                        "below_credits": (available * p / 100).clamp(1, 10_000_000)}}),
                None => json!({"below_credits": []}),
            };
            let r = app
                .send(
                    Method::PUT,
                    "/v1/alerts",
                    Some(&o),
                    Some(&settings.to_string()),
                    &[],
                )
                .await;
            assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
            // From now on, no more top-ups than were charged so far.
            m.topups_off = pct.is_none().then(|| top_up_charges(app).len());
        }
        Step::AdvanceMinutes(minutes) => {
            let until = app.ledger.clock.now() + chrono::Duration::minutes(*minutes);
            advance_until(app, until).await;
        }
        Step::ToExpiry(n, offset) => {
            let now = app.ledger.clock.now();
            let expiries: Vec<_> = app
                .ledger
                .store
                .load(&workspace(&m.ws))
                .await
                .unwrap()
                .map(|state| {
                    state
                        .lots
                        .iter()
                        .filter_map(|l| l.expires_at)
                        .map(|at| at + chrono::Duration::seconds(*offset))
                        .filter(|at| *at >= now && *at - now <= chrono::Duration::days(400))
                        .collect()
                })
                .unwrap_or_default();
            if !expiries.is_empty() {
                advance_until(app, expiries[n % expiries.len()]).await;
            }
        }
        Step::Burn => {
            for _ in 0..500 {
                let g = generation_call(
                    app,
                    "/v1/generations",
                    &o,
                    json!({"workflow": "video", "model": "video-pro",
                        "duration_s": 60, "resolution": "2k"}),
                )
                .await;
                let (Some(id), Some(estimate)) = (
                    g.body["id"].as_str(),
                    g.body["estimate"]["credits"].as_u64(),
                ) else {
                    break;
                };
                let r = generation_call(
                    app,
                    &format!("/v1/generations/{id}/complete"),
                    &service(),
                    json!({}),
                )
                .await;
                if r.status.is_success() {
                    m.asked.insert(id.to_owned(), estimate);
                }
            }
        }
        Step::Reordered(inner, seed) => {
            let sim = app.local.simulator.as_ref().unwrap();
            sim.hold_deliveries();
            Box::pin(step(app, m, inner)).await;
            let mut rng = fastrand::Rng::with_seed(*seed);
            sim.release_deliveries(|events| rng.shuffle(events)).await;
        }
        Step::Outage(inner, seed) => {
            let sim = app.local.simulator.as_ref().unwrap();
            sim.hold_deliveries();
            for s in inner {
                Box::pin(step(app, m, s)).await;
            }
            let mut rng = fastrand::Rng::with_seed(*seed);
            sim.release_deliveries(|events| rng.shuffle(events)).await;
            // A change's invoice that came before every event of the period it bills waited
            // in vain (the queue's retries are over in seconds here, half an hour in AWS)
            // and went to the dead letters: once the rest has been applied, the operator
            // redrives them, as the runbook says.
            app.settle_billing().await;
            app.local
                .billing_queue
                .redrive()
                .await
                .expect("the billing queue takes the redriven events");
        }
        Step::Redeliver(n) => {
            let events = app.local.simulator.as_ref().unwrap().events();
            if !events.is_empty() {
                let e = &events[n % events.len()];
                app.send(
                    Method::POST,
                    &format!("/sim/events/{}/redeliver", e.id),
                    None,
                    None,
                    &[],
                )
                .await;
            }
        }
    }
    app.settle_billing().await;
    let sub = app.get("/v1/subscription", &o).await.body;
    m.customer = sub["customer"].as_str().map(str::to_owned);
    let paused = sub["subscription"]["status"] == "paused";
    let id = sub["subscription"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if m.paused_since.as_ref().is_some_and(|(s, _)| *s != id) {
        m.paused_since = None;
    }
    // A reordered step's pause or resume is seen once its events are delivered (here).
    let done = match s {
        Step::Reordered(inner, _) => std::slice::from_ref(inner.as_ref()),
        Step::Outage(inner, _) => inner.as_slice(),
        s => std::slice::from_ref(s),
    };
    // Seen only as the state after the last of them: a pause after a resume among them is
    // dated now (the latest it can have been).
    let resumed = done
        .iter()
        .any(|s| matches!(s, Step::Unpause | Step::Resume));
    let pause = done.iter().any(|s| matches!(s, Step::Pause));
    if paused {
        if pause && (m.paused_since.is_none() || resumed) {
            m.paused_since = Some((id, app.ledger.clock.now().timestamp()));
        }
    } else if resumed {
        m.paused_since = None;
    }
    for e in app.local.simulator.as_ref().unwrap().events() {
        if e.kind == "customer.subscription.deleted" {
            let id = e.payload["data"]["object"]["id"]
                .as_str()
                .unwrap()
                .to_owned();
            m.ended.entry(id).or_insert(e.created);
        }
    }
}

/// The auto top-ups Stripe charged (their payment intents succeeded), oldest first: when,
/// and the credits each bought.
fn top_up_charges(app: &TestApp) -> Vec<(i64, u128)> {
    app.top_ups_charged()
        .iter()
        .map(|pi| {
            (
                pi["created"].as_i64().unwrap(),
                pi["metadata"]["credits"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect()
}

/// Auto top-up charges only while it is on, at most one pack every ten minutes.
fn check_top_ups(app: &TestApp, m: &Model) -> Result<(), String> {
    let charges = top_up_charges(app);
    if let Some(n) = m.topups_off
        && charges.len() > n
    {
        return Err(format!(
            "{} top-ups charged after auto top-up was turned off",
            charges.len() - n
        ));
    }
    for pair in charges.windows(2) {
        if pair[1].0 - pair[0].0 < 600 {
            return Err(format!(
                "two top-ups charged {} seconds apart",
                pair[1].0 - pair[0].0
            ));
        }
    }
    Ok(())
}

/// Pack credits follow paid checkouts and auto top-ups exactly: one lot per paid pack
/// checkout, of the credits sold with it times the quantity paid for, one per top-up
/// charged, of its pack's credits, and no other pack lot.
fn check_packs(app: &TestApp, journal: &[tally::ledger::Entry]) -> Result<(), String> {
    let mut paid: u128 = 0;
    let mut sessions = 0usize;
    for (_, credits) in top_up_charges(app) {
        paid += credits;
        sessions += 1;
    }
    for e in app.local.simulator.as_ref().unwrap().events() {
        let session = &e.payload["data"]["object"];
        if e.kind != "checkout.session.completed"
            || session["mode"] != "payment"
            || session["payment_status"] != "paid"
            || session["amount_total"].as_i64().unwrap_or(0) <= 0
        {
            continue;
        }
        let meta = &session["metadata"];
        let per_pack: u128 = meta["credits"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .ok_or("a pack checkout without its credits")?;
        let quantity: u128 = meta["quantity"]
            .as_str()
            .and_then(|q| q.parse().ok())
            .ok_or("a pack checkout without its quantity")?;
        paid += per_pack * quantity;
        sessions += 1;
    }
    let lots: Vec<u64> = journal
        .iter()
        .flat_map(|e| &e.lots)
        .filter_map(|c| match c {
            LotChange::Created { lot } if lot.source == LotSource::Pack => Some(lot.original.get()),
            _ => None,
        })
        .collect();
    let granted: u128 = lots.iter().map(|c| u128::from(*c)).sum();
    if granted != paid || lots.len() != sessions {
        return Err(format!(
            "{} pack lots of {granted} credits where {sessions} paid checkouts and top-ups bought {paid}",
            lots.len()
        ));
    }
    Ok(())
}

/// Moves the clock to `until` through the simulator (which plays Stripe's schedule on the
/// way), the credit refresh running or not as the last `Advance` left it.
async fn advance_until(app: &TestApp, until: chrono::DateTime<chrono::Utc>) {
    let r = app
        .send(
            Method::POST,
            "/sim/clock/advance",
            None,
            Some(&json!({"until": until}).to_string()),
            &[],
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
}

/// The disputes of `charge` (a chargeback or an inquiry) open now, by their latest status
/// at Stripe, with their amounts and whether they are chargebacks. An inquiry followed by a
/// chargeback is not counted: the chargeback decides.
fn disputes_of(app: &TestApp, charge: &Value) -> Vec<(String, String, i64)> {
    let mut last: BTreeMap<String, (String, i64, i64)> = BTreeMap::new();
    for e in app.local.simulator.as_ref().unwrap().events() {
        let d = &e.payload["data"]["object"];
        if e.kind.starts_with("charge.dispute.") && &d["charge"] == charge {
            last.insert(
                d["id"].as_str().unwrap().to_owned(),
                (
                    d["status"].as_str().unwrap_or("").to_owned(),
                    d["created"].as_i64().unwrap(),
                    d["amount"].as_i64().unwrap(),
                ),
            );
        }
    }
    let chargebacks: Vec<i64> = last
        .values()
        .filter(|(s, ..)| !s.starts_with("warning_"))
        .map(|&(_, created, _)| created)
        .collect();
    last.into_iter()
        .map(|(id, (status, created, amount))| {
            let escalated =
                status.starts_with("warning_") && chargebacks.iter().any(|&c| c >= created);
            let status = if escalated {
                "warning_closed".to_owned()
            } else {
                status
            };
            (id, status, amount)
        })
        .collect()
}

/// The disputes of `charge` open now (see [`disputes_of`]).
fn open_disputes(app: &TestApp, charge: &Value) -> Vec<String> {
    disputes_of(app, charge)
        .into_iter()
        .filter(|(_, s, _)| !["won", "lost", "warning_closed"].contains(&s.as_str()))
        .map(|(id, ..)| id)
        .collect()
}

/// While a payment is disputed (a chargeback or an inquiry open at Stripe), none of the
/// unspent credits it bought can be spent: every lot it bought that has not lapsed keeps
/// no credit free (held ones are frozen as their generations release them).
async fn check_disputed_frozen(app: &TestApp, state: &WorkspaceState) -> Result<(), String> {
    use tally::billing::refunds::{InvoiceLots, LINK_SK, PaymentLink, invoice_lots_pk, payment_pk};
    use tally::store::docs;
    let sim = app.local.simulator.as_ref().unwrap();
    let now = app.ledger.clock.now();
    for id in succeeded_charges(app) {
        let charge = sim.charge(&id).unwrap();
        let open = open_disputes(app, &charge["id"]);
        // Every dispute here is of all the money not refunded when it opened (and a
        // chargeback refuses later refunds): once one is lost, nothing the payment bought
        // may be left unspent, frozen or not.
        let lost = disputes_of(app, &charge["id"])
            .iter()
            .any(|(_, s, _)| s == "lost");
        let Some(pi) = charge["payment_intent"].as_str() else {
            continue;
        };
        if open.is_empty() && !lost {
            continue;
        }
        let err = |e: tally::store::StoreError| e.to_string();
        let Some(link) = docs::get::<PaymentLink>(
            app.docs.as_ref(),
            &payment_pk(&pi.parse().unwrap()),
            LINK_SK,
        )
        .await
        .map_err(err)?
        else {
            continue;
        };
        let mut lots: Vec<u64> = link.lot.into_iter().collect();
        if let Some(invoice) = &link.invoice
            && let Some(doc) =
                docs::get::<InvoiceLots>(app.docs.as_ref(), &invoice_lots_pk(invoice), LINK_SK)
                    .await
                    .map_err(err)?
        {
            lots.extend(doc.lots.iter().map(|&(_, l, _)| l));
        }
        for seq in lots {
            let Some(l) = state.lots.iter().find(|l| l.seq == seq) else {
                continue;
            };
            if !l.usable_at(now) {
                continue;
            }
            if lost && l.free() + l.frozen > tally::money::Credits::ZERO {
                return Err(format!(
                    "lot_{seq} keeps {} credits unspent ({} frozen) after a dispute of its payment {id} was lost",
                    l.free() + l.frozen,
                    l.frozen
                ));
            }
            if l.free() > tally::money::Credits::ZERO {
                return Err(format!(
                    "lot_{seq} keeps {} credits free while its payment {id} is disputed ({open:?})",
                    l.free()
                ));
            }
        }
    }
    Ok(())
}

/// Ids of every charge that succeeded so far, oldest first.
fn succeeded_charges(app: &TestApp) -> Vec<String> {
    app.sim_events("charge.succeeded")
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Credits taken back never exceed what the money given back bought: per lot, the lot's
/// credits times the share of its payment refunded or lost in a dispute (plus one credit
/// of rounding per take-back).
fn check_take_backs(app: &TestApp, journal: &[tally::ledger::Entry]) -> Result<(), String> {
    use tally::ledger::Reason;
    let sim = app.local.simulator.as_ref().unwrap();
    let mut originals: BTreeMap<u64, u64> = BTreeMap::new();
    // Lots of add-on units: their money goes back last (see `Pools`).
    let mut addons: BTreeSet<u64> = BTreeSet::new();
    // lot -> (credits taken back, take-backs, payment intent)
    let mut taken: BTreeMap<u64, (u64, u64, String)> = BTreeMap::new();
    // Lots that owe held credits to a change credited back: what their releases take back
    // cannot be told apart from a refund's.
    let credited: BTreeSet<u64> = journal
        .iter()
        .filter(|e| e.reason == Reason::PlanChanged)
        .flat_map(|e| &e.lots)
        .filter_map(|c| match c {
            LotChange::Owed { lot, take, .. } if take.get() > 0 => Some(*lot),
            _ => None,
        })
        .collect();
    for e in journal {
        let followed = matches!(
            e.reason,
            Reason::RefundTakeBack | Reason::DisputeLost | Reason::DisputeFreeze
        );
        for change in &e.lots {
            match change {
                LotChange::Created { lot } => {
                    originals.insert(lot.seq, lot.original.get());
                    if lot.source == LotSource::Addon {
                        addons.insert(lot.seq);
                    }
                }
                LotChange::Changed { lot, remaining, .. }
                    if matches!(e.reason, Reason::RefundTakeBack | Reason::DisputeLost) =>
                {
                    let pi = e.refs.charge.clone().unwrap_or_default();
                    let t = taken.entry(*lot).or_insert((0, 0, pi));
                    t.0 += remaining.unsigned_abs().get();
                    t.1 += 1;
                }
                LotChange::Refunded { lot, .. }
                | LotChange::Owed { lot, .. }
                | LotChange::Frozen { lot, .. }
                    if followed =>
                {
                    let pi = e.refs.charge.clone().unwrap_or_default();
                    taken.entry(*lot).or_insert((0, 0, pi));
                }
                _ => {}
            }
        }
        // Held credits released after their money went back: taken back as released.
        for (lot, credits) in taken_on_release(e) {
            if credited.contains(&lot) {
                continue;
            }
            let t = taken
                .get_mut(&lot)
                .ok_or_else(|| format!("lot_{lot}: released credits taken back for no refund"))?;
            t.0 += credits;
        }
    }
    let lost: BTreeMap<String, i64> = sim
        .events()
        .iter()
        .filter(|e| e.kind == "charge.dispute.closed")
        .map(|e| &e.payload["data"]["object"])
        .filter(|d| d["status"] == "lost")
        .map(|d| {
            (
                d["charge"].as_str().unwrap().to_owned(),
                d["amount"].as_i64().unwrap(),
            )
        })
        .collect();
    // Money credit notes gave back outside Stripe, by the payment intent of the invoice.
    let mut pi_of_invoice: BTreeMap<String, String> = BTreeMap::new();
    for p in app.sim_events("invoice_payment.paid") {
        if let (Some(i), Some(pi)) = (
            p["invoice"].as_str(),
            p["payment"]["payment_intent"].as_str(),
        ) {
            pi_of_invoice.insert(i.to_owned(), pi.to_owned());
        }
    }
    let mut noted: BTreeMap<String, i64> = BTreeMap::new();
    for n in app.sim_events("credit_note.created") {
        if let Some(pi) = n["invoice"].as_str().and_then(|i| pi_of_invoice.get(i)) {
            *noted.entry(pi.clone()).or_default() += n["out_of_band_amount"].as_i64().unwrap_or(0);
        }
    }
    for (lot, (credits, takes, pi)) in taken {
        let charge = succeeded_charges(app)
            .into_iter()
            .filter_map(|id| sim.charge(&id))
            .find(|c| c["payment_intent"] == pi.as_str())
            .ok_or_else(|| format!("lot_{lot} taken back for an unknown payment {pi}"))?;
        let paid = charge["amount"].as_i64().unwrap() as u64;
        let given = (charge["amount_refunded"].as_i64().unwrap()
            + noted.get(&pi).copied().unwrap_or(0)) as u64;
        let lost = lost
            .get(charge["id"].as_str().unwrap())
            .copied()
            .unwrap_or(0) as u64;
        // An invoice's add-on units are not refundable: its money is the rest, then the
        // add-on units' share of what was paid (their lines net, of all lines net, as
        // Stripe's invoice shows them, every line). Money given back is the rest's first, a
        // lost dispute the add-on units' first; an add-on lot follows their part, any other
        // lot the rest.
        let non_refundable: u64 = pi_of_invoice
            .iter()
            .find(|(_, p)| p.as_str() == pi)
            .and_then(|(i, _)| sim.invoice(i))
            .map_or(0, |invoice| {
                let lines: Vec<&Value> = invoice["lines"]["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .collect();
                let amount = |l: &&Value| i128::from(l["amount"].as_i64().unwrap_or(0));
                let all: i128 = lines.iter().map(amount).sum();
                let addons: i128 = lines
                    .iter()
                    .filter(|l| {
                        l["pricing"]["price_details"]["product"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("tally_addon_"))
                    })
                    .map(amount)
                    .sum();
                let paid = i128::from(invoice["amount_paid"].as_i64().unwrap_or(0).max(0));
                if all > 0 && addons > 0 {
                    (paid * addons.min(all) / all) as u64
                } else {
                    0
                }
            });
        let (lo, hi) = match (
            non_refundable > 0 && non_refundable < paid,
            addons.contains(&lot),
        ) {
            (true, true) => (paid - non_refundable, paid),
            (true, false) => (0, paid - non_refundable),
            (false, _) => (0, paid),
        };
        let given_part = given.min(hi).saturating_sub(lo);
        let lost_part = hi.saturating_sub(paid.saturating_sub(lost).max(lo));
        let part = u128::from((given_part + lost_part).min(hi - lo));
        let bought = (u128::from(originals[&lot]) * part).div_ceil(u128::from((hi - lo).max(1)));
        if u128::from(credits) > bought + u128::from(takes) {
            return Err(format!(
                "lot_{lot}: {credits} credits taken back, but the {given} cents given back and {lost} lost of {paid} ({part} of its part's {}) bought {bought}",
                hi - lo
            ));
        }
    }
    Ok(())
}

/// Credits an entry took back as a hold released them (their money went back while the
/// generation held them): (lot, credits).
fn taken_on_release(e: &tally::ledger::Entry) -> Vec<(u64, u64)> {
    let owing: BTreeSet<u64> = e
        .lots
        .iter()
        .filter_map(|c| match c {
            LotChange::Owed { lot, take, .. } if take.get() < 0 => Some(*lot),
            _ => None,
        })
        .collect();
    e.lots
        .iter()
        .filter_map(|c| match c {
            LotChange::Changed {
                lot,
                remaining,
                held,
                ..
            } if held.get() == 0 && remaining.get() < 0 && owing.contains(lot) => {
                Some((*lot, remaining.unsigned_abs().get()))
            }
            _ => None,
        })
        .collect()
}

/// What the paid subscription lines allow to have been granted by `now`, and the
/// tolerance of that figure, in credits.
///
/// Each paid line is worth the credits its item gives for a whole period at the line's own
/// price (`amount / unit amount × credits per unit per period`; negative for Stripe's credit
/// for unused time). A line covers its period `[start, end)`, which the subscription's
/// monthly anniversaries cut into billing months; Tally grants each month at its start, so
/// by `now` the line allows its worth times the share of its billing months begun, each
/// month less the share of the invoice's money given back (refunds made, disputes lost)
/// before that month began. The tolerance: over a yearly period Stripe prorates by the
/// second and Tally by the billing month, which differ by up to a tenth of a month's worth
/// (February against a 365-day year); and a credit of rounding per line.
///
/// Also answers, per invoice, what its lines are worth in the billing month they begin in
/// (negative for a change credited back: Tally takes that back only as far as unspent).
fn paid_lines_allow(
    app: &TestApp,
    catalog: &Catalog,
    now: chrono::DateTime<chrono::Utc>,
) -> (f64, f64, BTreeMap<String, f64>, BTreeMap<String, i64>) {
    use chrono::{DateTime, Months, Utc};
    let at = |s: i64| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
    let events = app.local.simulator.as_ref().unwrap().events();
    let mut paid: BTreeMap<String, Value> = BTreeMap::new();
    let mut pi_of_invoice: BTreeMap<String, String> = BTreeMap::new();
    let mut charge_of_pi: BTreeMap<String, (String, i64)> = BTreeMap::new();
    // (charge, when) -> money given back so far, in event order
    let mut back: Vec<(String, i64, i64)> = Vec::new();
    let mut lost: Vec<(String, i64, i64)> = Vec::new();
    // (invoice, when, cents) a credit note gave back outside Stripe
    let mut noted: Vec<(String, i64, i64)> = Vec::new();
    for e in &events {
        let o = &e.payload["data"]["object"];
        match e.kind.as_str() {
            "invoice.paid" => {
                paid.insert(o["id"].as_str().unwrap().to_owned(), o.clone());
            }
            "invoice_payment.paid" => {
                if let (Some(i), Some(pi)) = (
                    o["invoice"].as_str(),
                    o["payment"]["payment_intent"].as_str(),
                ) {
                    pi_of_invoice.insert(i.to_owned(), pi.to_owned());
                }
            }
            "charge.succeeded" => {
                charge_of_pi.insert(
                    o["payment_intent"].as_str().unwrap_or_default().to_owned(),
                    (
                        o["id"].as_str().unwrap().to_owned(),
                        o["amount"].as_i64().unwrap_or(0),
                    ),
                );
            }
            "charge.refunded" | "charge.updated" => {
                back.push((
                    o["id"].as_str().unwrap().to_owned(),
                    e.created,
                    o["amount_refunded"].as_i64().unwrap_or(0),
                ));
            }
            "credit_note.created" => {
                noted.push((
                    o["invoice"].as_str().unwrap_or_default().to_owned(),
                    e.created,
                    o["out_of_band_amount"].as_i64().unwrap_or(0),
                ));
            }
            "charge.dispute.closed" if o["status"] == "lost" => {
                lost.push((
                    o["charge"].as_str().unwrap().to_owned(),
                    e.created,
                    o["amount"].as_i64().unwrap_or(0),
                ));
            }
            _ => {}
        }
    }
    // The share of an invoice's money given back before `when` (a refund in the very
    // second a month began may come after its grant).
    let given_back = |invoice: &str, when: DateTime<Utc>| -> f64 {
        let Some((charge, amount)) = pi_of_invoice
            .get(invoice)
            .and_then(|pi| charge_of_pi.get(pi))
        else {
            return 0.0;
        };
        let t = when.timestamp();
        let refunded = back
            .iter()
            .filter(|(c, created, _)| c == charge && *created < t)
            .map(|(_, _, r)| *r)
            .max()
            .unwrap_or(0);
        let lost: i64 = lost
            .iter()
            .filter(|(c, created, _)| c == charge && *created < t)
            .map(|(_, _, l)| *l)
            .sum();
        let noted: i64 = noted
            .iter()
            .filter(|(i, created, _)| i == invoice && *created < t)
            .map(|(_, _, n)| *n)
            .sum();
        ((refunded + lost + noted) as f64 / (*amount).max(1) as f64).min(1.0)
    };
    let line_item = |l: &Value| {
        l["pricing"]["price_details"]["product"]
            .as_str()
            .and_then(|p| Item::of_product(p, catalog))
    };
    let proration = |l: &Value| l["parent"]["subscription_item_details"]["proration"] == true;
    // Where each billing period began and the invoice that paid it, by (subscription,
    // period end), from its full lines.
    let mut periods: BTreeMap<(String, i64), (i64, String)> = BTreeMap::new();
    for (id, inv) in &paid {
        for l in inv["lines"]["data"].as_array().into_iter().flatten() {
            if !proration(l) {
                periods.insert(
                    (
                        l["subscription"].as_str().unwrap_or_default().to_owned(),
                        l["period"]["end"].as_i64().unwrap_or(0),
                    ),
                    (l["period"]["start"].as_i64().unwrap_or(0), id.clone()),
                );
            }
        }
    }
    // The invoices that paid for an item's time in a period, by (subscription, period end,
    // product): the period's own, and changes' remaining-time lines.
    let mut bought: BTreeMap<(String, i64, String), Vec<String>> = BTreeMap::new();
    for (id, inv) in &paid {
        for l in inv["lines"]["data"].as_array().into_iter().flatten() {
            if l["amount"].as_i64().unwrap_or(0) > 0 {
                bought
                    .entry((
                        l["subscription"].as_str().unwrap_or_default().to_owned(),
                        l["period"]["end"].as_i64().unwrap_or(0),
                        l["pricing"]["price_details"]["product"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ))
                    .or_default()
                    .push(id.clone());
            }
        }
    }
    let (mut allowed, mut tolerance) = (0.0f64, 0.0f64);
    let mut first_month: BTreeMap<String, f64> = BTreeMap::new();
    for (id, inv) in &paid {
        for l in inv["lines"]["data"].as_array().into_iter().flatten() {
            let Some(item) = line_item(l) else { continue };
            let (per_unit, monthly_price) = match &item {
                Item::Plan(p) => {
                    let p = catalog.plan(p).unwrap();
                    (p.monthly_credits.get(), p.monthly_price_cents.get())
                }
                Item::Addon(a) => {
                    let a = catalog.addon(a).unwrap();
                    (a.credits_per_unit.get(), a.unit_price_cents.get())
                }
                Item::Other => continue,
            };
            let unit: u64 = l["pricing"]["unit_amount_decimal"]
                .as_str()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0);
            let amount = l["amount"].as_i64().unwrap_or(0);
            if unit == 0 || amount == 0 {
                continue;
            }
            let months = if unit > monthly_price { 12 } else { 1 };
            let worth = amount as f64 / unit as f64 * (per_unit * u64::from(months)) as f64;
            let (start, end) = (
                l["period"]["start"].as_i64().unwrap(),
                l["period"]["end"].as_i64().unwrap(),
            );
            let sub = l["subscription"].as_str().unwrap_or_default().to_owned();
            let period = periods.get(&(sub, end));
            let anchor = period.map_or_else(
                || at(end).checked_sub_months(Months::new(months)).unwrap(),
                |(start, _)| at(*start),
            );
            // A credit for unused time gives back money the invoices that bought that time
            // paid (the period's own, or a change's): a refund of one of them already gave
            // it back (Stripe lets both happen; the credits cannot be taken twice). A refund
            // of its own invoice undoes it.
            let payers: Vec<&String> = bought
                .get(&(
                    l["subscription"].as_str().unwrap_or_default().to_owned(),
                    end,
                    l["pricing"]["price_details"]["product"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ))
                .into_iter()
                .flatten()
                .chain(period.map(|(_, invoice)| invoice))
                .collect();
            let back = |when: DateTime<Utc>| {
                let own = given_back(id, when);
                if amount < 0 {
                    payers
                        .iter()
                        .map(|p| given_back(p, when))
                        .fold(own, f64::max)
                } else {
                    own
                }
            };
            // The billing months the line covers: (when it begins for the line, weight).
            let mut slices = Vec::new();
            for k in 0..months {
                let from = anchor.checked_add_months(Months::new(k)).unwrap();
                // The last month ends with the period: a month from a period begun on the
                // 30th of September ends on the 31st of October when the anchor is the 31st.
                let to = if k + 1 == months {
                    at(end).max(from)
                } else {
                    anchor.checked_add_months(Months::new(k + 1)).unwrap()
                };
                let (a, b) = (from.max(at(start)), to.min(at(end)));
                if a < b {
                    let w = (b - a).num_seconds() as f64 / (to - from).num_seconds() as f64;
                    slices.push((a, w));
                }
            }
            let total: f64 = slices.iter().map(|(_, w)| w).sum();
            if total <= 0.0 {
                continue;
            }
            let begun: f64 = slices
                .iter()
                .filter(|(a, _)| *a <= now)
                .map(|(a, w)| w * (1.0 - back(*a)))
                .sum();
            let share = worth * begun / total;
            if let Some((a, w)) = slices.first()
                && *a <= now
            {
                *first_month.entry(id.clone()).or_default() += worth * w / total;
            }
            if std::env::var("TALLY_SIM_TRACE").is_ok() {
                eprintln!(
                    "  line {id} {} amount={amount} unit={unit} months={months} period=({},{}) anchor={anchor} worth={worth:.1} begun={begun:.3} total={total:.3} -> {share:.1}",
                    l["description"],
                    at(start),
                    at(end)
                );
            }
            allowed += share;
            // Within a monthly period Stripe and Tally prorate over the same month.
            if proration(l) && months == 12 {
                tolerance += share.abs() / 10.0;
            }
            tolerance += 1.0;
        }
    }
    // Invoices whose money all went back, and from when: their later months grant nothing.
    let mut times: Vec<i64> = back
        .iter()
        .chain(&lost)
        .chain(&noted)
        .map(|(_, t, _)| *t)
        .collect();
    times.sort_unstable();
    let all_back = paid
        .keys()
        .filter_map(|i| {
            times
                .iter()
                .find(|t| given_back(i, at(**t + 1)) >= 0.999)
                .map(|t| (i.clone(), *t))
        })
        .collect();
    (allowed, tolerance, first_month, all_back)
}

/// Every generation charged once, exactly what was asked (or nothing), by its own journal
/// entries, and the charges adding up to the journal's credits spent.
async fn check_generations(
    app: &TestApp,
    m: &Model,
    state: &WorkspaceState,
    journal: &[tally::ledger::Entry],
) -> Result<(), String> {
    let all = app
        .ledger
        .store
        .generations(
            &workspace(&m.ws),
            &tally::store::GenerationQuery {
                limit: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut charged = 0u64;
    for g in &all {
        use tally::ledger::GenerationStatus::*;
        let id = g.id.to_string();
        match g.status {
            Completed => {
                // Every completion the simulation made answered with what it asked.
                let asked = m.asked.get(&id).copied();
                let total = g.charged.get() + g.shortfall.get();
                if asked != Some(total) {
                    return Err(format!(
                        "{id} asked {asked:?} and was charged {} short {}",
                        g.charged, g.shortfall
                    ));
                }
            }
            Failed | Expired if g.charged.get() != 0 || g.shortfall.get() != 0 => {
                return Err(format!(
                    "{id} is {:?} but was charged {} short {}",
                    g.status, g.charged, g.shortfall
                ));
            }
            _ => {}
        }
        // A shortfall only when the balance could pay no more: after the charge, nothing
        // was left available (else a debit was lost).
        if g.shortfall.get() > 0
            && let Some(charge) = g
                .entries
                .iter()
                .filter_map(|seq| journal.iter().find(|e| e.seq == *seq))
                .find(|e| e.reason == tally::ledger::Reason::GenerationCharged)
            && charge.balance_after.available.get() > 0
        {
            return Err(format!(
                "{id} was recorded {} short with {} credits still available",
                g.shortfall, charge.balance_after.available
            ));
        }
        let by_entries: u64 = g
            .entries
            .iter()
            .filter_map(|seq| journal.iter().find(|e| e.seq == *seq))
            .map(|e| e.totals.spent.get())
            .sum();
        if by_entries != g.charged.get() {
            return Err(format!(
                "{id} was charged {} but its entries spent {by_entries}",
                g.charged
            ));
        }
        charged += g.charged.get();
    }
    if charged != state.totals.spent.get() {
        return Err(format!(
            "generations were charged {charged} but the journal spent {}",
            state.totals.spent
        ));
    }
    Ok(())
}

/// Tally's subscription document shows the level Stripe has: its plan, interval and add-on
/// units, once every event has been applied.
async fn check_level(app: &TestApp, m: &Model) -> Result<(), String> {
    use tally::payments::Payments;
    let shown = app.get("/v1/subscription", &owner(&m.ws)).await.body;
    let doc = &shown["subscription"];
    let Some(id) = doc["id"].as_str() else {
        return Ok(());
    };
    if doc["status"] == "canceled" {
        return Ok(());
    }
    let sim = app.local.simulator.as_ref().unwrap();
    let live = sim
        .subscription(&id.parse().map_err(|e| format!("{e:?}"))?)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if live.status == "canceled" || live.status == "incomplete_expired" {
        return Ok(());
    }
    let Some(plan) = live.item("plan") else {
        return Ok(());
    };
    let want = (
        plan.product.trim_start_matches("tally_plan_").to_owned(),
        format!("{:?}", plan.interval).to_lowercase(),
        live.item("addon").map_or(0, |a| a.quantity),
    );
    let got = (
        doc["plan"].as_str().unwrap_or_default().to_owned(),
        doc["interval"].as_str().unwrap_or_default().to_owned(),
        doc["addon_units"].as_u64().unwrap_or_default(),
    );
    if want != got {
        return Err(format!(
            "Stripe's subscription {id} is at {want:?}, Tally shows {got:?} ({})",
            live.status
        ));
    }
    Ok(())
}

async fn check(app: &TestApp, m: &Model) -> Result<(), String> {
    check_level(app, m).await?;
    let catalog = app.ledger.catalog.clone();
    let ws = workspace(&m.ws);
    let Some(state) = app
        .ledger
        .store
        .load(&ws)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    state.check_invariants()?;
    let mut journal = app
        .ledger
        .store
        .entries(
            &ws,
            &EntryQuery {
                before: None,
                limit: 100_000,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    journal.reverse();
    let rebuilt = WorkspaceState::from_journal(ws.clone(), &journal).map_err(|e| e.to_string())?;
    if rebuilt.as_stored_like(&state) != state {
        return Err("the journal does not rebuild the state".into());
    }
    // With its holds in view (the stored state keeps them as items of their own): every
    // open hold has its item and nothing else has one, and the invariants that hold
    // allocations must meet.
    let mut open: Vec<_> = rebuilt.known_holds().cloned().collect();
    open.sort_by_key(|h| (h.deadline, h.generation));
    let items = app
        .ledger
        .store
        .open_holds(&ws, None, 100_000)
        .await
        .map_err(|e| e.to_string())?;
    if items != open {
        return Err(format!(
            "{} hold items where the journal has {} open holds",
            items.len(),
            open.len()
        ));
    }
    rebuilt.check_invariants()?;

    let failures = app
        .local
        .refresh_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    if failures > 0 {
        return Err(format!("the credit refresh failed {failures} times"));
    }
    check_take_backs(app, &journal)?;
    check_disputed_frozen(app, &state).await?;
    check_generations(app, m, &state, &journal).await?;
    check_packs(app, &journal)?;
    check_top_ups(app, m)?;
    // Subscription credits granted, per operation key.
    let mut granted: u128 = 0;
    let mut keys: BTreeMap<String, u32> = BTreeMap::new();
    for e in &journal {
        for change in &e.lots {
            if let LotChange::Created { lot } = change
                && matches!(lot.source, LotSource::PlanPeriod | LotSource::Addon)
            {
                granted += u128::from(lot.original.get());
                let key = e.id.rsplit_once('/').map_or(e.id.as_str(), |(k, _)| k);
                *keys.entry(key.to_owned()).or_default() += 1;
            }
        }
    }
    if let Some((k, n)) = keys.iter().find(|(_, n)| **n > 1) {
        return Err(format!("{k} granted {n} times"));
    }
    // Less what refunds, lost disputes and changes credited back took back of them (a
    // refunded yearly period's later months are granted whole and lose the refunded share
    // at once).
    let subscription_lots: BTreeSet<u64> = journal
        .iter()
        .flat_map(|e| &e.lots)
        .filter_map(|c| match c {
            LotChange::Created { lot }
                if matches!(lot.source, LotSource::PlanPeriod | LotSource::Addon) =>
            {
                Some(lot.seq)
            }
            _ => None,
        })
        .collect();
    let taken_back: u128 = journal
        .iter()
        .filter(|e| {
            matches!(
                e.reason,
                tally::ledger::Reason::RefundTakeBack
                    | tally::ledger::Reason::DisputeLost
                    | tally::ledger::Reason::PlanChanged
            )
        })
        .flat_map(|e| &e.lots)
        .filter_map(|c| match c {
            LotChange::Changed { lot, remaining, .. } if subscription_lots.contains(lot) => {
                Some(u128::from(remaining.unsigned_abs().get()))
            }
            _ => None,
        })
        .sum::<u128>()
        + journal
            .iter()
            .flat_map(taken_on_release)
            .filter(|(lot, _)| subscription_lots.contains(lot))
            .map(|(_, c)| u128::from(c))
            .sum::<u128>();
    // Credits pledged to a take-back while a running generation holds them (owed) are on
    // their way out: taken as the hold is released, or spent by it.
    let owed_now: u128 = state
        .lots
        .iter()
        .filter(|l| subscription_lots.contains(&l.seq))
        .map(|l| u128::from(l.owed.get()))
        .sum();
    let kept = granted.saturating_sub(taken_back + owed_now);
    let (mut allowed, tolerance, first_month, all_back) =
        paid_lines_allow(app, &catalog, app.ledger.clock.now());
    // A change credited back takes back only what is unspent of its month: what was spent
    // already stays spent (as with refunds).
    // Only where the invoice's take-back ran: one that never ran excuses nothing.
    for (invoice, value) in first_month.iter().filter(|(_, v)| **v < 0.0) {
        let taken: Vec<u64> = journal
            .iter()
            .filter(|e| {
                e.reason == tally::ledger::Reason::PlanChanged
                    && e.refs
                        .invoice
                        .as_ref()
                        .is_some_and(|i| i.as_str() == invoice)
            })
            // Taken at once, owed by running generations' holds (taken as released), or
            // withheld from the month's allotment: none of it is excused as already spent.
            .map(|e| {
                let owed: u64 = e
                    .lots
                    .iter()
                    .map(|c| match c {
                        LotChange::Owed { take, .. } => take.get().max(0) as u64,
                        _ => 0,
                    })
                    .sum();
                let withheld = e.month_owes.map_or(0, |o| o.credits.get().max(0) as u64);
                e.totals.clawed_back.get() + owed + withheld
            })
            .collect();
        if !taken.is_empty() {
            allowed += (-value - taken.iter().sum::<u64>() as f64).max(0.0);
        }
    }
    if kept as f64 > allowed + tolerance {
        return Err(format!(
            "kept {kept} subscription credits ({granted} granted, {taken_back} taken back, \
             {owed_now} owed) where \
             the paid invoice lines allow {allowed:.1} (tolerance {tolerance:.1}) by now"
        ));
    }
    // Every paid period's first month is granted once.
    let mut paid: BTreeMap<String, Value> = BTreeMap::new();
    for e in app.local.simulator.as_ref().unwrap().events() {
        if e.kind == "invoice.paid" {
            let inv = e.payload["data"]["object"].clone();
            paid.insert(inv["id"].as_str().unwrap().to_owned(), inv);
        }
    }
    let mut first_months = BTreeSet::new();
    // Renewals carrying prorations a change left for them: the change's credit comes off
    // the new month first, which may net to nothing.
    let mut netted = BTreeSet::new();
    for (id, inv) in &paid {
        let credit: i64 = inv["lines"]["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["parent"]["subscription_item_details"]["proration"] == true)
            .map(|l| l["amount"].as_i64().unwrap_or(0))
            .sum();
        if credit < 0 {
            netted.insert(id.clone());
        }
        for l in inv["lines"]["data"].as_array().into_iter().flatten() {
            let Some(item) = l["pricing"]["price_details"]["product"]
                .as_str()
                .and_then(|p| Item::of_product(p, &catalog))
            else {
                continue;
            };
            let full = l["parent"]["subscription_item_details"]["proration"] == false;
            // A sign-up or renewal grants its first month; an interval switch grants it less
            // the unused old month, which may net to nothing.
            if full
                && matches!(item, Item::Plan(_))
                && inv["billing_reason"] != "subscription_update"
            {
                first_months.insert(id.clone());
            }
        }
    }
    for id in &first_months {
        let key = format!("stripe:invoice:{id}:plan");
        let n = keys.get(&key).copied().unwrap_or(0);
        if n > 1 || (n == 0 && !netted.contains(id)) {
            return Err(format!(
                "paid period of {id} granted {:?} times",
                keys.get(&key)
            ));
        }
    }
    check_allotments(app, m, &catalog, &paid, &all_back, &journal).await?;
    // Nothing charged or granted after Stripe deleted a subscription; no renewal charged
    // while collection is paused.
    for e in app.local.simulator.as_ref().unwrap().events() {
        if e.kind != "invoice.paid" {
            continue;
        }
        let inv = &e.payload["data"]["object"];
        let sub = inv["parent"]["subscription_details"]["subscription"]
            .as_str()
            .unwrap_or_default();
        if let Some(ended) = m.ended.get(sub)
            && e.created > *ended
        {
            return Err(format!("{sub} charged after it ended"));
        }
        // A renewal made while paused (its draft made before the pause is still collected).
        if let Some((paused_sub, since)) = &m.paused_since
            && paused_sub == sub
            && inv["created"].as_i64().unwrap_or(0) > *since
            && inv["billing_reason"] == "subscription_cycle"
            && inv["amount_paid"].as_i64().unwrap_or(0) > 0
        {
            return Err(format!("{sub} charged for a renewal while paused"));
        }
    }
    for (sub, ended) in &m.ended {
        if let Some(e) = journal.iter().find(|e| {
            e.at.timestamp() > *ended
                && e.id.starts_with(&format!("refresh:{sub}:"))
                && e.lots
                    .iter()
                    .any(|c| matches!(c, LotChange::Created { .. }))
        }) {
            return Err(format!("{sub} granted {} after it ended", e.id));
        }
    }
    Ok(())
}

/// A paid period in `check_allotments`: (subscription, start, end, (a switch's, its
/// invoice's number), when all its money had gone back).
type YearPeriod = (String, i64, i64, (bool, u64), Option<i64>);

/// Every month of a paid yearly period that has begun is granted, at least once (the
/// checks above say at most once): a paid year's months are owed until the subscription
/// ends or a later paid period replaces this one, whatever happens meanwhile (changes,
/// pauses, partial refunds, which take their share back after the grant), or all of the
/// period's money has gone back. Months that ended while the schedule was late are left
/// out: their credits may have lapsed before it came back. Of two periods that begin in
/// the same second (an interval switch then), the later invoice's is in force.
async fn check_allotments(
    app: &TestApp,
    m: &Model,
    catalog: &Catalog,
    paid: &BTreeMap<String, Value>,
    all_back: &BTreeMap<String, i64>,
    journal: &[tally::ledger::Entry],
) -> Result<(), String> {
    use chrono::{DateTime, Months, Utc};
    let at = |t: i64| DateTime::<Utc>::from_timestamp(t, 0).unwrap();
    let now = app.ledger.clock.now();
    // Each paid full period of a plan: (subscription, start, end, its place among the
    // periods beginning in its second, when all its money had gone back). A sign-up or
    // renewal opens a period once; any other period from that second is a switch made
    // after it, and switches follow their invoices' numbers (a renewal's is numbered
    // when Stripe finalizes it, up to an hour later).
    let mut periods: Vec<YearPeriod> = Vec::new();
    for inv in paid.values() {
        let sub = inv["parent"]["subscription_details"]["subscription"]
            .as_str()
            .unwrap_or_default();
        let number = inv["number"]
            .as_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or(0);
        let number = (inv["billing_reason"] == "subscription_update", number);
        let back = all_back
            .get(inv["id"].as_str().unwrap_or_default())
            .copied();
        for l in inv["lines"]["data"].as_array().into_iter().flatten() {
            let plan = l["pricing"]["price_details"]["product"]
                .as_str()
                .and_then(|p| Item::of_product(p, catalog))
                .is_some_and(|i| matches!(i, Item::Plan(_)));
            if plan && l["parent"]["subscription_item_details"]["proration"] == false {
                let (start, end) = (
                    l["period"]["start"].as_i64().unwrap(),
                    l["period"]["end"].as_i64().unwrap(),
                );
                periods.push((sub.to_owned(), start, end, number, back));
            }
        }
    }
    let keys: BTreeSet<&str> = journal
        .iter()
        .map(|e| e.id.rsplit_once('/').map_or(e.id.as_str(), |(k, _)| k))
        .collect();
    for (sub, start, end, number, back) in &periods {
        if end - start < 40 * 86_400 {
            continue;
        }
        // A later paid period of the subscription: a renewal, or an interval switch (one
        // made in the very second this one began ends it at once).
        let replaced = periods
            .iter()
            .filter(|(s, b, e, n, _)| {
                s == sub && (b > start || (b == start && e != end && n > number))
            })
            .map(|(_, b, ..)| *b)
            .min();
        for k in 1..12u32 {
            let month = at(*start).checked_add_months(Months::new(k)).unwrap();
            let t = month.timestamp();
            // Credits of a month that ended while the schedule was late may have lapsed
            // before it came back (a plan's last longer); a month still running when it
            // came back is granted.
            let month_end = at(*start)
                .checked_add_months(Months::new(k + 1))
                .unwrap()
                .timestamp()
                .min(*end);
            let late = m.late.iter().any(|(from, until)| {
                *from <= month_end && until.is_none_or(|u| t <= u && month_end <= u)
            });
            // When the schedule came to the month: at its start, or when it came back.
            let came = m
                .late
                .iter()
                .find(|(from, until)| *from <= t && until.is_none_or(|u| t <= u))
                .map_or(t, |(_, until)| until.unwrap_or(i64::MAX));
            if month > now
                || t >= *end
                || late
                || back.is_some_and(|b| b <= came)
                || replaced.is_some_and(|r| r <= t)
                || m.ended.get(sub).is_some_and(|e| *e <= t)
            {
                continue;
            }
            // Its plan credits, or only its add-on's (money given back for a raise of the
            // add-on units comes out of the plan's credits first).
            let prefix = format!("refresh:{sub}:{start}:{k}:");
            if !keys.iter().any(|key| key.starts_with(&prefix)) {
                let granted: Vec<&&str> = keys
                    .iter()
                    .filter(|k| k.starts_with(&format!("refresh:{sub}:")))
                    .collect();
                if std::env::var("TALLY_SIM_TRACE").is_ok() {
                    let ws = workspace(&m.ws);
                    for sk in ["REFRESH", "SUBSCRIPTION"] {
                        let doc = app.docs.get_doc(&format!("WORKSPACE#{ws}"), sk).await;
                        eprintln!("{sk}: {doc:?}");
                    }
                }
                return Err(format!(
                    "month {k} of {sub}'s year from {} began {month} and was never granted \
                     (granted: {granted:?})",
                    at(*start)
                ));
            }
        }
    }
    Ok(())
}

/// Where a seed's clock starts: half the seeds at the suite's usual instant, the others on
/// an edge of the calendar (the first or the last days of a month, February of a leap
/// year included, at midnight, noon or a second before midnight).
fn start_of(rng: &mut fastrand::Rng) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{Datelike, TimeZone};
    if rng.bool() {
        return None;
    }
    let year = [2027, 2028][rng.usize(0..2)];
    let month = rng.u32(1..=12);
    let next = if month == 12 {
        chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        chrono::NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .unwrap();
    let last = next.pred_opt().unwrap().day();
    let day = [1, 28, 29, 30, 31][rng.usize(0..5)].min(last);
    let (h, mi, sec) = [(0, 0, 0), (12, 0, 0), (23, 59, 59)][rng.usize(0..3)];
    Some(
        chrono::Utc
            .with_ymd_and_hms(year, month, day, h, mi, sec)
            .unwrap(),
    )
}

async fn run_seed(seed: u64, steps: u64) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let app = TestApp::new();
    if let Some(start) = start_of(&mut rng) {
        app.clock.set(start);
    }
    let mut m = Model {
        ws: format!("org_sim{seed}"),
        customer: None,
        paused_since: None,
        ended: BTreeMap::new(),
        running: Vec::new(),
        asked: BTreeMap::new(),
        late_schedule: None,
        late: Vec::new(),
        topups_off: None,
    };
    // Every seed starts subscribed, so most steps exercise a live subscription.
    step(
        &app,
        &mut m,
        &Step::Subscribe(rng.usize(0..PLANS.len()), rng.bool()),
    )
    .await;
    let trace = std::env::var("TALLY_SIM_TRACE").is_ok();
    for n in 0..steps {
        let s = random_step(&mut rng);
        step(&app, &mut m, &s).await;
        if trace {
            let sub = app.get("/v1/subscription", &owner(&m.ws)).await.body;
            eprintln!(
                "seed {seed} step {n} {s:?} at {}: {} {} {} paused_since={:?}",
                app.ledger.clock.now(),
                sub["subscription"]["id"],
                sub["subscription"]["status"],
                sub["subscription"]["plan"],
                m.paused_since
            );
        }
        check(&app, &m)
            .await
            .map_err(|e| format!("step {n} ({s:?}): {e}"))?;
    }
    let dead = app.local.billing_queue.dead_letters();
    if !dead.is_empty() {
        let events: Vec<String> = dead
            .iter()
            .map(|d| {
                let e: Value = serde_json::from_str(&d.body).unwrap_or_default();
                format!("{} {}", e["type"], e["id"])
            })
            .collect();
        return Err(format!("Stripe events were dead-lettered: {events:?}"));
    }
    Ok(())
}

/// A finished seed's task, as the join set hands it back.
type Joined = Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_follow_paid_money_through_random_lifecycles() {
    let steps = env_or("TALLY_SIM_STEPS", 20);
    let seeds: Vec<u64> = match std::env::var("TALLY_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("TALLY_SIM_SEED is a number")],
        Err(_) => (0..env_or("TALLY_SIM_SEEDS", 2000)).collect(),
    };
    let mut set = tokio::task::JoinSet::new();
    let mut running = std::collections::HashMap::new();
    let mut failures = Vec::new();
    let mut collect =
        |done: Option<Joined>, running: &mut std::collections::HashMap<tokio::task::Id, u64>| {
            match done {
                Some(Ok((id, result))) => {
                    let seed = running.remove(&id).unwrap_or_default();
                    if let Err(e) = result {
                        failures.push((seed, e));
                    }
                }
                Some(Err(e)) => {
                    let seed = running.remove(&e.id()).unwrap_or_default();
                    failures.push((seed, format!("panicked: {e}")));
                }
                None => {}
            }
        };
    for seed in seeds {
        if set.len() >= 8 {
            collect(set.join_next_with_id().await, &mut running);
        }
        let handle = set.spawn(run_seed(seed, steps));
        running.insert(handle.id(), seed);
    }
    while !set.is_empty() {
        collect(set.join_next_with_id().await, &mut running);
    }
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} seed(s) failed; replay one with TALLY_SIM_SEED=<n> TALLY_SIM_STEPS={steps} \
         cargo test -p tally-tests --test suite simulation\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .map(|(s, e)| format!("seed {s}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
