//! Stripe events applied in any order, any number of times, give one final state.

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::Arc;
use tally::billing::BillingEvents;
use tally::billing::records::*;
use tally::ids::ChargeId;
use tally::ledger::{Interval, PlanStatus};
use tally::queue::{ConsumeError, Consumer, Delivery};
use tally::store::docs;
use tally::store::embedded::EmbeddedStore;
use tally_tests::{fixture, ledger_over, stripe_event, t0, workspace};

const WS: &str = "acme";
const CUS: &str = "cus_Acme";
const SUB: &str = "sub_Acme";

fn at(days: i64) -> i64 {
    (t0() + Duration::days(days)).timestamp()
}

fn sub_meta(units: u32) -> Value {
    json!({"org_id": WS, "plan": "max", "interval": "monthly", "addon_units": units.to_string()})
}

fn subscription_checkout() -> Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!("cs_sub_1");
    s["mode"] = json!("subscription");
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["customer"] = json!(CUS);
    s["subscription"] = json!(SUB);
    s["client_reference_id"] = json!(WS);
    s["metadata"] = json!({"org_id": WS, "kind": "plan", "plan": "max", "interval": "monthly"});
    stripe_event("evt_checkout_sub", "checkout.session.completed", at(0), s)
}

fn pack_checkout() -> Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!("cs_pack_1");
    s["mode"] = json!("payment");
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["customer"] = json!(CUS);
    s["metadata"] = json!({"org_id": WS, "kind": "pack", "pack": "pack_500", "quantity": "2"});
    stripe_event("evt_checkout_pack", "checkout.session.completed", at(1), s)
}

fn subscription(id: &str, kind: &str, created: i64, status: &str, cancel: bool) -> Value {
    let mut s = fixture("subscription");
    s["id"] = json!(SUB);
    s["customer"] = json!(CUS);
    s["status"] = json!(status);
    s["cancel_at_period_end"] = json!(cancel);
    s["pause_collection"] = Value::Null;
    s["metadata"] = sub_meta(2);
    s["items"]["data"][0]["current_period_start"] = json!(at(0));
    s["items"]["data"][0]["current_period_end"] = json!(at(30));
    stripe_event(id, kind, created, s)
}

fn invoice(id: &str, kind: &str, created: i64, status: &str) -> Value {
    let mut i = fixture("invoice");
    i["id"] = json!("in_first");
    i["customer"] = json!(CUS);
    i["status"] = json!(status);
    i["billing_reason"] = json!("subscription_create");
    i["collection_method"] = json!("charge_automatically");
    i["created"] = json!(at(0));
    i["amount_due"] = json!(2900 + 2000);
    i["amount_paid"] = json!(if status == "paid" { 4900 } else { 0 });
    i["amount_remaining"] = json!(if status == "paid" { 0 } else { 4900 });
    i["total"] = json!(4900);
    i["hosted_invoice_url"] = json!("https://invoice.stripe.com/i/acct_1/in_first");
    i["invoice_pdf"] = json!("https://pay.stripe.com/invoice/acct_1/in_first/pdf");
    i["metadata"] = json!({});
    i["parent"] = json!({"type": "subscription_details", "quote_details": null,
        "subscription_details": {"subscription": SUB, "metadata": sub_meta(2)}});
    i["lines"]["data"][0]["period"] = json!({"start": at(0), "end": at(30)});
    i["status_transitions"]["paid_at"] = if status == "paid" {
        json!(at(0))
    } else {
        Value::Null
    };
    stripe_event(id, kind, created, i)
}

fn charge(id: &str, kind: &str, created: i64, refunded: i64) -> Value {
    let mut c = fixture("charge");
    c["id"] = json!("ch_first");
    c["customer"] = json!(CUS);
    c["amount"] = json!(4900);
    c["amount_refunded"] = json!(refunded);
    c["created"] = json!(at(0));
    c["metadata"] = json!({});
    let mut r = fixture("refund");
    r["id"] = json!("re_1");
    r["amount"] = json!(refunded);
    r["status"] = json!("succeeded");
    r["created"] = json!(at(3));
    c["refunds"] = json!({"object": "list", "data": if refunded > 0 { vec![r] } else { vec![] }, "has_more": false, "url": "/v1/charges/ch_first/refunds"});
    stripe_event(id, kind, created, c)
}

fn dispute() -> Value {
    let mut d = fixture("dispute");
    d["id"] = json!("dp_1");
    d["charge"] = json!("ch_first");
    d["amount"] = json!(1000);
    d["reason"] = json!("duplicate");
    d["status"] = json!("needs_response");
    d["created"] = json!(at(4));
    stripe_event("evt_dispute", "charge.dispute.created", at(4), d)
}

/// Everything that happens to one workspace in its first days.
fn history() -> Vec<Value> {
    vec![
        subscription_checkout(),
        subscription(
            "evt_sub_created",
            "customer.subscription.created",
            at(0),
            "active",
            false,
        ),
        invoice("evt_inv_finalized", "invoice.finalized", at(0), "open"),
        invoice("evt_inv_paid", "invoice.paid", at(0) + 5, "paid"),
        pack_checkout(),
        charge("evt_charge_ok", "charge.succeeded", at(0), 0),
        charge("evt_charge_refunded", "charge.refunded", at(3), 1500),
        dispute(),
        subscription(
            "evt_sub_cancel",
            "customer.subscription.updated",
            at(5),
            "active",
            true,
        ),
    ]
}

/// What a workspace ends up with, in comparable form.
#[derive(Debug, PartialEq)]
struct Outcome {
    available: u64,
    lots: Vec<(String, u64, Option<DateTime<Utc>>)>,
    plan: Option<tally::ledger::PlanState>,
    invoices: Vec<InvoiceRecord>,
    payment: Option<PaymentRecord>,
    subscription: Option<SubscriptionRecord>,
    /// The dispute that stopped auto top-up.
    topup_stopped_by: Option<String>,
    /// The non-refundable cents (add-on units) of the first invoice's history line.
    non_refundable: Option<u64>,
    /// The workspace's billing history over its first year.
    history: Vec<tally::billing::history::HistoryEntry>,
}

async fn run(order: &[Value]) -> Outcome {
    run_with(order, None).await
}

/// [`run`], with Stripe's API at hand (to read what events do not carry).
async fn run_with(order: &[Value], stripe: Option<Arc<dyn tally::payments::Payments>>) -> Outcome {
    let store = Arc::new(EmbeddedStore::in_memory());
    let (ledger, _) = ledger_over(store.clone());
    let mut worker = BillingEvents::new(ledger.clone(), store.clone(), None);
    worker.stripe = stripe;
    // Auto top-up on: a dispute stops it, whichever of its events comes first.
    docs::update(
        store.as_ref(),
        &workspace_pk(&workspace(WS)),
        tally::alerts::ALERTS_SK,
        |_: Option<tally::alerts::AlertSettings>| {
            Some(tally::alerts::AlertSettings {
                auto_topup: Some(tally::alerts::AutoTopUp {
                    pack: "pack_100".into(),
                    below_credits: tally::money::Credits::new(30),
                }),
                ..Default::default()
            })
        },
    )
    .await
    .unwrap();
    // A delivery whose workspace is not known yet is redelivered, as SQS would.
    let mut pending: Vec<Value> = order.to_vec();
    for _round in 0..5 {
        let mut again = Vec::new();
        for e in pending {
            let d = Delivery {
                message_id: "m".into(),
                body: e.to_string(),
                group_id: Some(CUS.into()),
                receive_count: 1,
            };
            match worker.consume(&d).await {
                Ok(()) => {}
                Err(ConsumeError::Retry(_)) => again.push(e),
                Err(ConsumeError::Poison(p)) => panic!("poison: {p}"),
            }
        }
        pending = again;
    }
    assert!(pending.is_empty(), "every event eventually applies");
    let a = workspace(WS);
    let state = ledger.workspace_now(&a).await.unwrap();
    state.check_invariants().unwrap();
    let mut lots: Vec<_> = state
        .lots
        .iter()
        .map(|l| (format!("{:?}", l.source), l.original.get(), l.expires_at))
        .collect();
    lots.sort();
    let invoices: Vec<InvoiceRecord> =
        docs::list(store.as_ref(), &workspace_pk(&a), INVOICE_PREFIX, 100)
            .await
            .unwrap();
    let non_refundable = tally::billing::history::get(store.as_ref(), &a, "in_first")
        .await
        .unwrap()
        .map(|e| e.non_refundable.get());
    let history = tally::billing::history::around(
        store.as_ref(),
        &a,
        t0() - Duration::days(1),
        t0() + Duration::days(365),
    )
    .await
    .unwrap();
    Outcome {
        history,
        non_refundable,
        available: state.balance().available.get(),
        lots,
        plan: state.plan.clone(),
        invoices,
        payment: docs::get(
            store.as_ref(),
            &charge_pk(&ChargeId::parse("ch_first").unwrap()),
            PAYMENT_SK,
        )
        .await
        .unwrap(),
        subscription: docs::get(store.as_ref(), &workspace_pk(&a), SUBSCRIPTION_SK)
            .await
            .unwrap(),
        topup_stopped_by: docs::get::<tally::alerts::AlertSettings>(
            store.as_ref(),
            &workspace_pk(&a),
            tally::alerts::ALERTS_SK,
        )
        .await
        .unwrap()
        .and_then(|s| s.stopped_by_dispute),
    }
}

#[tokio::test]
async fn a_subscription_and_a_pack_grant_their_credits_once_and_record_billing_history() {
    let o = run(&history()).await;
    // Max plan 400 + 2 add-on units of 60 + two 500-credit packs.
    assert_eq!(o.available, 400 + 120 + 1000);
    assert_eq!(o.topup_stopped_by.as_deref(), Some("dp_1"));
    let period_end = t0() + Duration::days(30);
    assert_eq!(
        o.lots,
        vec![
            ("Addon".to_string(), 120, Some(period_end)),
            ("Pack".to_string(), 1000, None),
            (
                "PlanPeriod".to_string(),
                400,
                Some(period_end + Duration::days(30))
            ),
        ]
    );
    let plan = o.plan.unwrap();
    assert_eq!(
        (
            plan.plan.as_str(),
            plan.interval,
            plan.status,
            plan.cancel_at_period_end
        ),
        ("max", Interval::Monthly, PlanStatus::Active, true)
    );
    assert_eq!(o.invoices.len(), 1);
    assert_eq!(o.invoices[0].status, "paid");
    assert_eq!(
        o.invoices[0].invoice_pdf.as_deref(),
        Some("https://pay.stripe.com/invoice/acct_1/in_first/pdf")
    );
    let payment = o.payment.unwrap();
    assert_eq!(
        (payment.amount.get(), payment.amount_refunded.get()),
        (4900, 1500)
    );
    assert_eq!(payment.workspace, Some(workspace(WS)));
    assert_eq!(payment.refunds.len(), 1);
    assert_eq!(payment.disputes.len(), 1);
    assert_eq!(payment.disputes[0].reason.as_deref(), Some("duplicate"));
    assert_eq!(o.subscription.unwrap().addon_units, 2);
}

/// A one-off invoice staff made in Stripe's dashboard (no Tally metadata, no
/// subscription) grants nothing, and its refund still shows in the billing history: on the
/// invoice's line and as a line of its own.
#[tokio::test]
async fn a_refund_of_an_invoice_that_granted_nothing_shows_in_the_billing_history() {
    let mut paid = invoice("evt_other_paid", "invoice.paid", at(1), "paid");
    let i = &mut paid["data"]["object"];
    i["billing_reason"] = json!("manual");
    i["parent"] = Value::Null;
    i["lines"]["data"][0]["parent"] = Value::Null;
    let mut pay = fixture("invoice_payment");
    pay["id"] = json!("inpay_1");
    pay["invoice"] = json!("in_first");
    pay["payment"] = json!({"type": "payment_intent", "payment_intent": "pi_first"});
    pay["status"] = json!("paid");
    pay["amount_paid"] = json!(4900);
    pay["created"] = json!(at(1));
    let with_intent = |mut e: Value| {
        e["data"]["object"]["payment_intent"] = json!("pi_first");
        e
    };
    let mut refund = fixture("refund");
    refund["id"] = json!("re_1");
    refund["charge"] = json!("ch_first");
    refund["payment_intent"] = json!("pi_first");
    refund["amount"] = json!(1500);
    refund["status"] = json!("succeeded");
    refund["created"] = json!(at(3));
    let o = run(&[
        subscription_checkout(),
        paid,
        stripe_event("evt_inpay", "invoice_payment.paid", at(1), pay),
        with_intent(charge("evt_charge_ok", "charge.succeeded", at(1), 0)),
        stripe_event("evt_refund", "refund.created", at(3), refund),
        with_intent(charge(
            "evt_charge_refunded",
            "charge.refunded",
            at(3),
            1500,
        )),
    ])
    .await;
    assert_eq!(o.available, 0, "the invoice granted nothing");
    let line = o.history.iter().find(|e| e.id == "in_first").unwrap();
    assert_eq!(
        (line.amount.get(), line.amount_refunded.get()),
        (4900, 1500),
        "{line:#?}"
    );
    let refunds: Vec<_> = o.history.iter().filter(|e| e.id == "re_1").collect();
    assert_eq!(refunds.len(), 1, "{:#?}", o.history);
    assert_eq!(refunds[0].amount.get(), 1500);
}

/// The first invoice of [`history`], billing Max with three add-on units (the
/// subscription's metadata still says two) after ten one-off items of no credits: twelve
/// lines, each as Stripe shows it.
fn twelve_lines() -> Vec<Value> {
    let template = fixture("invoice")["lines"]["data"][0].clone();
    let line = |n: usize, product: Option<&str>, quantity: u64, amount: i64| {
        let mut l = template.clone();
        l["id"] = json!(format!("il_{n:02}"));
        l["invoice"] = json!("in_first");
        l["amount"] = json!(amount);
        l["quantity"] = json!(quantity);
        l["period"] = json!({"start": at(0), "end": at(30)});
        match product {
            Some(product) => {
                l["pricing"] = json!({"type": "price_details",
                    "price_details": {"price": format!("price_{product}"), "product": product},
                    "unit_amount_decimal": (amount / quantity as i64).to_string()});
                l["parent"] = json!({"type": "subscription_item_details",
                    "invoice_item_details": null,
                    "subscription_item_details": {"invoice_item": null, "proration": false,
                        "proration_details": {"credited_items": null},
                        "subscription": SUB, "subscription_item": format!("si_{n}")}});
            }
            None => {
                l["description"] = json!(format!("Onboarding note {n}"));
                l["pricing"] = json!({"type": "price_details", "price_details": null,
                    "unit_amount_decimal": "0"});
                l["parent"] = json!({"type": "invoice_item_details",
                    "subscription_item_details": null,
                    "invoice_item_details": {"invoice_item": format!("ii_{n}"),
                        "proration": false, "proration_details": {"credited_items": null},
                        "subscription": null}});
            }
        }
        l
    };
    let mut lines: Vec<Value> = (0..10).map(|n| line(n, None, 1, 0)).collect();
    lines.push(line(10, Some("tally_plan_max"), 1, 2900));
    lines.push(line(11, Some("tally_addon_individual"), 3, 3000));
    lines
}

/// Add-on units are not refundable: their share of what the invoice was paid, their lines
/// net of all lines net, so the customer's balance paying part of it weighs on both parts
/// alike, a coupon or a tax for one product on that product's part, and add-on time
/// credited back comes off the add-on units' part.
#[tokio::test]
async fn the_non_refundable_part_is_the_add_on_units_share_of_what_was_paid() {
    let plan_and_units = twelve_lines();
    let mut credited_back = plan_and_units.clone();
    let mut unused = credited_back[11].clone();
    unused["id"] = json!("il_12");
    unused["amount"] = json!(-3500);
    credited_back.push(unused);
    // A coupon for the plan only: half off the plan's line.
    let mut plan_coupon = plan_and_units.clone();
    plan_coupon[10]["discount_amounts"] = json!([{"amount": 1450, "discount": "di_plan"}]);
    // A tax on top of the add-on units only, and one included in the plan's price.
    let mut addon_tax = plan_and_units.clone();
    addon_tax[11]["taxes"] = json!([{"amount": 300, "tax_behavior": "exclusive",
        "taxability_reason": "standard_rated", "taxable_amount": 3000, "type": "tax_rate_details"}]);
    addon_tax[10]["taxes"] = json!([{"amount": 200, "tax_behavior": "inclusive",
        "taxability_reason": "standard_rated", "taxable_amount": 2700, "type": "tax_rate_details"}]);
    for (lines, paid, expected) in [
        // Max at 2,900 and three units at 3,000, paid in full.
        (&plan_and_units, 5900, 3000),
        // Half paid by a coupon or the customer's balance: half of each part.
        (&plan_and_units, 2950, 1500),
        // More add-on time credited back than charged: none of it is add-on money.
        (&credited_back, 2400, 0),
        // The plan's coupon leaves the add-on units' money whole.
        (&plan_coupon, 4450, 3000),
        // The add-on units' tax is theirs; the plan's is in its price.
        (&addon_tax, 6200, 3300),
        // And a quarter of that paid from the customer's balance: a quarter off each.
        (&addon_tax, 4650, 2475),
    ] {
        let mut order = history();
        for e in order.iter_mut() {
            let i = &mut e["data"]["object"];
            if i["object"] == "invoice" {
                i["lines"]["data"] = json!(lines);
                i["lines"]["has_more"] = json!(false);
                i["total"] = json!(paid);
                i["amount_paid"] = json!(paid);
                i["amount_due"] = json!(paid);
            }
        }
        let o = run(&order).await;
        assert_eq!(o.non_refundable, Some(expected), "paid {paid}");
    }
}

/// Stripe's invoice objects carry the first ten lines (`has_more` says there are more):
/// the rest are read from Stripe before the invoice is valued. Valued on the ten alone,
/// the paid invoice granted nothing.
#[tokio::test]
async fn an_invoice_with_more_lines_than_its_event_carries_is_valued_on_all_of_them() {
    use wiremock::matchers::{method, path, query_param, query_param_is_missing};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let lines = twelve_lines();
    let with_lines = |e: &mut Value, shown: &[Value], more: bool| {
        let i = &mut e["data"]["object"];
        i["lines"]["data"] = json!(shown);
        i["lines"]["has_more"] = json!(more);
        i["lines"]["url"] = json!("/v1/invoices/in_first/lines");
        i["total"] = json!(5900);
        i["amount_paid"] = json!(5900);
        i["amount_due"] = json!(5900);
    };
    let events = |shown: &[Value], more: bool| {
        let mut order = history();
        for e in order.iter_mut() {
            if e["data"]["object"]["object"] == "invoice" {
                with_lines(e, shown, more);
            }
        }
        order
    };
    // Every line in the event: what the invoice is worth.
    let whole = run(&events(&lines, false)).await;
    assert_eq!(
        whole.lots.iter().find(|l| l.0 == "Addon").map(|l| l.1),
        Some(3 * 60)
    );

    // Stripe's line list, in two pages.
    let server = MockServer::start().await;
    let page = |data: &[Value], more: bool| {
        ResponseTemplate::new(200).set_body_json(json!({"object": "list", "data": data,
            "has_more": more, "url": "/v1/invoices/in_first/lines"}))
    };
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_first/lines"))
        .and(query_param("limit", "100"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(page(&lines[..7], true))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_first/lines"))
        .and(query_param("limit", "100"))
        .and(query_param("starting_after", "il_06"))
        .respond_with(page(&lines[7..], false))
        .mount(&server)
        .await;
    // The card the payment names, kept for the customer (it becomes the saved card).
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex("^/v1/payment_methods/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "pm_1", "object": "payment_method", "type": "card", "customer": CUS}),
        ))
        .mount(&server)
        .await;
    let stripe: Arc<dyn tally::payments::Payments> = Arc::new(
        tally::payments::stripe_api::StripePayments::new(
            "sk_test_tally",
            Some(&format!("{}/", server.uri())),
        )
        .unwrap(),
    );
    let carried = events(&lines[..10], true);
    assert_eq!(run_with(&carried, Some(stripe)).await, whole);

    // Without Stripe to read the rest from, the paid invoice waits: nothing is granted.
    let store = Arc::new(EmbeddedStore::in_memory());
    let (ledger, _) = ledger_over(store.clone());
    let worker = BillingEvents::new(ledger.clone(), store.clone(), None);
    let mut retried = 0;
    for e in &carried {
        let d = Delivery {
            message_id: "m".into(),
            body: e.to_string(),
            group_id: Some(CUS.into()),
            receive_count: 1,
        };
        if let Err(ConsumeError::Retry(_)) = worker.consume(&d).await
            && e["data"]["object"]["object"] == "invoice"
        {
            retried += 1;
        }
    }
    assert_eq!(retried, 2, "invoice.finalized and invoice.paid wait");
    let state = ledger.workspace_now(&workspace(WS)).await.unwrap();
    assert!(
        state
            .lots
            .iter()
            .all(|l| l.source == tally::ledger::LotSource::Pack),
        "{:?}",
        state.lots
    );
}

/// A change billed at once takes into its invoice the prorations an earlier change left
/// for the next invoice (units added in the dashboard without invoicing them): Stripe
/// lists them newest first. Each change is valued over its months since it was made (the
/// yearly months between were granted at the old level), the grant is this month's, and
/// the level is where the changes lead one after the other: before, both changes' units
/// were added up (5 -> 8 -> 10 became 18) and the older change counted its own month only.
#[test]
fn a_change_billed_with_an_earlier_changes_prorations_is_valued_change_by_change() {
    use tally::subscriptions::paid::{Item, PaidLine, addon_credits_after_changes};
    let catalog = tally::catalog::Catalog::builtin();
    let t = noon;
    let year = tally::subscriptions::paid::Level {
        addon_units: 5,
        ..paid_year("max", t(2027, 1, 15), t(2028, 1, 15))
    };
    let (earlier, now, end) = (t(2027, 3, 15), t(2027, 6, 20), year.period_end);
    let addon = catalog.plan("max").unwrap().addon.clone();
    let per_unit = catalog.addon(&addon).unwrap().credits_per_unit.get();
    let units = |quantity: u64, amount: i64, start| PaidLine {
        item: Item::Addon(addon.clone()),
        quantity,
        amount,
        start,
        end,
        proration: true,
    };
    let lines = [
        units(8, -8_000, now),
        units(10, 10_000, now),
        units(5, -6_000, earlier),
        units(8, 9_600, earlier),
    ];
    let out = line_credits("subscription_update", &lines, std::slice::from_ref(&year)).unwrap();
    let (level, at) = out.changes.clone().unwrap();
    assert_eq!((level.addon_units, at), (10, now));
    assert_eq!(
        addon_credits_after_changes(&lines, &catalog),
        Some(tally::money::Credits::new(10 * per_unit))
    );
    // One grant, of the month the change was made in (Jun 15 -> Jul 15).
    assert_eq!(out.grants.len(), 1, "{:?}", out.grants);
    let grant = &out.grants[0];
    assert_eq!(grant.month, Some(t(2027, 6, 15)));
    assert_eq!(grant.expires_at, Some(t(2027, 7, 15)));
    // Three more units for the four whole months Mar 15 -> Jul 15, and two more for the
    // 25 of the 30 days left of June's month (rounded down).
    let expected = 3 * per_unit * 4 + 2 * per_unit * 25 / 30;
    assert_eq!(grant.credits.get(), expected);

    // Plans the same way: Team -> Max left for the next invoice, then Max -> Generative
    // billed at once.
    let team = paid_year("team", year.period_start, year.period_end);
    let plans = [
        plan_line("max", -2_000, now, end, true),
        plan_line("generative", 4_000, now, end, true),
        plan_line("team", -30_000, earlier, end, true),
        plan_line("max", 3_000, earlier, end, true),
    ];
    let out = line_credits("subscription_update", &plans, std::slice::from_ref(&team)).unwrap();
    assert_eq!(out.changes.unwrap().0.plan, "generative");
}

/// A trial added in the dashboard bills its period at $0: nothing was paid, so nothing is
/// granted (the first invoice that bills the plan grants its month). A 100% coupon bills
/// the lines at their price and discounts them: that grants as paid.
#[test]
fn a_trial_period_billed_at_nothing_grants_nothing() {
    let catalog = tally::catalog::Catalog::builtin();
    let grants = |trial: bool| {
        let mut e = invoice("evt_trial", "invoice.paid", at(0), "paid");
        let i = &mut e["data"]["object"];
        for l in i["lines"]["data"].as_array_mut().unwrap() {
            if trial {
                l["amount"] = json!(0);
            }
        }
        i["total"] = json!(0);
        i["amount_paid"] = json!(0);
        i["amount_due"] = json!(0);
        let inv: tally::billing::objects::Invoice =
            serde_json::from_value(e["data"]["object"].clone()).unwrap();
        tally::billing::grants::invoice_grants(&inv, &catalog, &[])
            .unwrap()
            .grants
            .iter()
            .map(|g| g.credits.get())
            .sum::<u64>()
    };
    assert_eq!(grants(true), 0, "a trial");
    assert!(grants(false) > 0, "a 100% coupon");
}

/// Noon on a day, for invoice lines.
fn noon(y: i32, m: u32, d: u32) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    chrono::Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

/// A yearly period of `plan` without add-on units, as its paid invoice recorded it.
fn paid_year(
    plan: &str,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) -> tally::subscriptions::paid::Level {
    tally::subscriptions::paid::Level {
        plan: plan.into(),
        interval: tally::subscriptions::plan::Interval::Yearly,
        addon_units: 0,
        period_start: start,
        period_end: end,
    }
}

/// An invoice line for one unit of `plan`.
fn plan_line(
    plan: &str,
    amount: i64,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
    proration: bool,
) -> tally::subscriptions::paid::PaidLine {
    tally::subscriptions::paid::PaidLine {
        item: tally::subscriptions::paid::Item::Plan(plan.into()),
        quantity: 1,
        amount,
        start,
        end,
        proration,
    }
}

/// What a paid subscription invoice (`reason`) with `lines` grants, its old lines valued
/// against `known` paid periods.
fn line_credits(
    reason: &str,
    lines: &[tally::subscriptions::paid::PaidLine],
    known: &[tally::subscriptions::paid::Level],
) -> Result<tally::billing::grants::InvoiceCredits, ConsumeError> {
    let id = tally::ids::InvoiceId::parse("in_lines").unwrap();
    let catalog = tally::catalog::Catalog::builtin();
    tally::billing::grants::line_grants(&id, reason, lines, known, &catalog)
}

/// A trial added to a running subscription bills its period at $0 beside the credit for
/// the unused old time: nothing pays for the trial, so it grants nothing (before, a month
/// of credits), the unused time's credits go with the money credited for them, and the
/// trial replaces the old period as a month of its own, however long it runs, so a yearly
/// plan's later months stop (its allotments would grant months nobody paid for).
#[test]
fn a_trial_added_to_a_running_subscription_grants_nothing_and_ends_the_old_year() {
    use tally::subscriptions::plan::Interval;
    let catalog = tally::catalog::Catalog::builtin();
    let year = paid_year("max", noon(2027, 1, 15), noon(2028, 1, 15));
    let at = noon(2027, 3, 1);
    let lines = |new_amount: i64, days: i64| {
        [
            plan_line("max", -30_000, at, year.period_end, true),
            plan_line(
                "max",
                new_amount,
                at,
                at + chrono::Duration::days(days),
                false,
            ),
        ]
    };
    let invoice = |new_amount: i64, days: i64| {
        line_credits(
            "subscription_update",
            &lines(new_amount, days),
            std::slice::from_ref(&year),
        )
        .unwrap()
    };
    let max = catalog.plan("max").unwrap().monthly_credits.get();
    // The billing month of Mar 1 runs Feb 15 -> Mar 15: 14 of its 28 days were unused.
    let unused = (max * 14).div_ceil(28);
    for days in [14, 60] {
        let trial = invoice(0, days);
        assert!(trial.grants.is_empty(), "{:?}", trial.grants);
        assert_eq!(trial.credited.get(), unused);
        let opens = trial.opens.expect("the trial replaces the old period");
        assert_eq!(
            (opens.interval, opens.period_start, opens.plan.as_str()),
            (Interval::Monthly, at, "max")
        );
    }
    // With the old period not recorded yet (its own invoice applied later), the unused
    // time cannot be valued: the event waits for it rather than keep those credits.
    assert!(line_credits("subscription_update", &lines(0, 14), &[]).is_err());
    // The same switch billed (an interval switch to monthly) grants its month, less the
    // unused rest of the old one.
    let paid = invoice(9_900, 31);
    let granted: u64 = paid.grants.iter().map(|g| g.credits.get()).sum();
    assert_eq!(granted, max - unused);
}

/// A yearly plan downgraded in the dashboard with its prorations left for the next invoice
/// bills nothing until the renewal, so the credit refresh keeps granting the richer months.
/// The renewal invoice then credits their money back (unused Max from the change to the
/// year's end, less Plus for the same time): every month since the change is valued and
/// taken back, not only the change's own month. A change billed at once still counts only
/// the rest of its month.
#[test]
fn a_downgrade_billed_at_the_renewal_takes_back_every_richer_month_since_the_change() {
    use tally::subscriptions::paid::{Item, PaidLine};
    let catalog = tally::catalog::Catalog::builtin();
    let t = noon;
    let line = plan_line;
    let year = paid_year("max", t(2027, 1, 15), t(2028, 1, 15));
    let (changed, renewal) = (t(2027, 3, 1), year.period_end);
    let lines = [
        line("max", -20_000, changed, renewal, true),
        line("plus", 8_000, changed, renewal, true),
        line("plus", 10_440, renewal, t(2029, 1, 15), false),
    ];
    let out = line_credits("subscription_cycle", &lines, std::slice::from_ref(&year)).unwrap();
    let (max, plus) = (
        catalog.plan("max").unwrap().monthly_credits.get(),
        catalog.plan("plus").unwrap().monthly_credits.get(),
    );
    let unused_max = (max * 14).div_ceil(28) as i64;
    let (max, plus) = (max as i64, plus as i64);
    // Mar 1 -> Mar 15: 14 of the 28 days of its month; then ten whole months.
    let first = -unused_max + plus * 14 / 28;
    let over = -(first + 10 * (plus - max));
    assert!(out.grants.is_empty(), "{:?}", out.grants);
    assert_eq!(out.credited.get() as i64, over - plus);
    assert_eq!(out.opens.unwrap().period_start, renewal);
    // Down to Plus with add-on units up, left for the renewal: the units' months cost
    // more than the plan's gave back, so nothing is taken and the new month is whole.
    let addon = catalog.plan("plus").unwrap().addon.clone();
    let per_unit = catalog.addon(&addon).unwrap().credits_per_unit.get();
    let units = |amount: i64, start, end, proration| PaidLine {
        item: Item::Addon(addon.clone()),
        quantity: 5,
        amount,
        start,
        end,
        proration,
    };
    let mixed = [
        line("max", -20_000, changed, renewal, true),
        line("plus", 8_000, changed, renewal, true),
        units(45_000, changed, renewal, true),
        line("plus", 10_440, renewal, t(2029, 1, 15), false),
        units(60_000, renewal, t(2029, 1, 15), false),
    ];
    let out = line_credits("subscription_cycle", &mixed, std::slice::from_ref(&year)).unwrap();
    assert_eq!(out.credited, tally::money::Credits::ZERO);
    let granted: u64 = out.grants.iter().map(|g| g.credits.get()).sum();
    assert_eq!(granted, plus as u64 + 5 * per_unit);
    // A Team year taken down twice without invoicing, to Max on Mar 1 and to Plus on
    // Jul 1: each change valued from its own date, so every month since Mar 1 counts.
    let team_year = paid_year("team", year.period_start, year.period_end);
    let july = t(2027, 7, 1);
    let chained = [
        line("team", -60_000, changed, renewal, true),
        line("max", 20_000, changed, renewal, true),
        line("max", -14_000, july, renewal, true),
        line("plus", 6_000, july, renewal, true),
        line("plus", 10_440, renewal, t(2029, 1, 15), false),
    ];
    let out = line_credits(
        "subscription_cycle",
        &chained,
        std::slice::from_ref(&team_year),
    )
    .unwrap();
    let team = catalog.plan("team").unwrap().monthly_credits.get() as i64;
    // Mar 1 -> Mar 15: 14 of 28 days, then ten whole months; Jul 1 -> Jul 15: 14 of the
    // 30 days of Jun 15 -> Jul 15, then six whole months.
    let to_max = -(team * 14 + 27) / 28 + max * 14 / 28 + 10 * (max - team);
    let to_plus = -(max * 14 + 29) / 30 + plus * 14 / 30 + 6 * (plus - max);
    assert!(out.grants.is_empty(), "{:?}", out.grants);
    assert_eq!(out.credited.get() as i64, -(to_max + to_plus) - plus);
    // Billed at once (the new period starts at the change): only the change's own month.
    let at_once = [
        line("max", -20_000, changed, renewal, true),
        line("plus", 900, changed, t(2027, 4, 1), false),
    ];
    let switch =
        line_credits("subscription_update", &at_once, std::slice::from_ref(&year)).unwrap();
    // Plus's month less the unused rest of Max's: below nothing, so the rest is taken.
    assert!(switch.grants.is_empty(), "{:?}", switch.grants);
    assert_eq!(switch.credited.get() as i64, unused_max - plus);
}

/// A pack grants the credits it was sold with (recorded on the payment at sale), even
/// when the catalog changed or dropped the pack before a late payment came; a payment
/// from before they were recorded grants the catalog's.
#[tokio::test]
async fn a_pack_grants_the_credits_it_was_sold_with_whatever_the_catalog_says_later() {
    let sold = |pack: &str, credits: Option<&str>| {
        let mut e = pack_checkout();
        let m = &mut e["data"]["object"]["metadata"];
        m["pack"] = json!(pack);
        if let Some(c) = credits {
            m["credits"] = json!(c);
        }
        e
    };
    for (event, granted) in [
        (sold("pack_500", Some("450")), 900),
        (sold("pack_retired", Some("777")), 1554),
        (sold("pack_500", None), 1000),
    ] {
        let o = run(&[subscription_checkout(), event]).await;
        assert_eq!(o.available, granted);
    }
    let catalog = tally::catalog::Catalog::builtin();
    for bad in ["0", "-5", "lots", "100000000000"] {
        let e = sold("pack_500", Some(bad));
        let s: tally::billing::objects::CheckoutSession =
            serde_json::from_value(e["data"]["object"].clone()).unwrap();
        assert!(
            tally::billing::grants::checkout_grant(&s, &catalog).is_err(),
            "{bad}"
        );
    }
}

/// Auto top-up charges a card off-session: only a card paid with is saved for it, not a
/// bank debit or a wallet the customer paid with once.
#[tokio::test]
async fn only_a_card_a_payment_was_made_with_is_kept_for_auto_top_up() {
    for (kind, pm, saved) in [
        ("card", "pm_card_1", true),
        ("sepa_debit", "pm_sepa_1", false),
        ("us_bank_account", "pm_bank_1", false),
    ] {
        let store = Arc::new(EmbeddedStore::in_memory());
        let (ledger, _) = ledger_over(store.clone());
        let worker = BillingEvents::new(ledger, store.clone(), None);
        let mut c = charge("evt_charge_ok", "charge.succeeded", at(0), 0);
        c["data"]["object"]["payment_method"] = json!(pm);
        c["data"]["object"]["payment_method_details"] = json!({"type": kind, kind: {}});
        for e in [subscription_checkout(), c] {
            let d = Delivery {
                message_id: "m".into(),
                body: e.to_string(),
                group_id: Some(CUS.into()),
                receive_count: 1,
            };
            worker.consume(&d).await.unwrap();
        }
        let profile: Option<BillingProfile> =
            docs::get(store.as_ref(), &workspace_pk(&workspace(WS)), PROFILE_SK)
                .await
                .unwrap();
        let kept = profile
            .and_then(|p| p.payment_method)
            .map(|p| p.to_string());
        assert_eq!(kept, saved.then(|| pm.to_string()), "{kind}");
    }
}

/// A paid custom payment invoice of $50 for 700 credits, with the customer's Stripe balance
/// before and after it.
fn custom_invoice(starting_balance: i64, ending_balance: i64, amount_paid: i64) -> Value {
    let mut i = fixture("invoice");
    i["id"] = json!("in_custom");
    i["customer"] = json!(CUS);
    i["status"] = json!("paid");
    i["billing_reason"] = json!("manual");
    i["collection_method"] = json!("send_invoice");
    i["created"] = json!(at(1));
    i["total"] = json!(5000);
    i["starting_balance"] = json!(starting_balance);
    i["ending_balance"] = json!(ending_balance);
    i["amount_due"] = json!(amount_paid);
    i["amount_paid"] = json!(amount_paid);
    i["amount_remaining"] = json!(0);
    i["metadata"] = json!({"kind": "custom_payment", "credits": "700", "amount_cents": "5000"});
    i["lines"]["data"][0]["amount"] = json!(5000);
    i["parent"] = Value::Null;
    i
}

/// A custom payment whose whole total the customer's Stripe balance covered (money Stripe
/// held for them from credited time): Stripe marks it paid with `amount_paid` 0 and the
/// balance moved by the total. It was paid, so it grants its credits, once. One that a
/// credit note settled (nothing paid, the balance untouched) grants nothing.
#[tokio::test]
async fn a_custom_payment_paid_from_the_customers_balance_grants_its_credits() {
    let paid = stripe_event(
        "evt_custom_paid",
        "invoice.paid",
        at(1),
        custom_invoice(-6000, -1000, 0),
    );
    let o = run(&[subscription_checkout(), paid.clone(), paid]).await;
    assert_eq!(o.available, 700);
    assert_eq!(o.lots, vec![("Pack".to_string(), 700, None)]);

    let catalog = tally::catalog::Catalog::builtin();
    let grants = |v: Value| {
        let i: tally::billing::objects::Invoice = serde_json::from_value(v).unwrap();
        tally::billing::grants::invoice_grants(&i, &catalog, &[])
            .map(|c| c.grants.iter().map(|g| g.credits.get()).sum::<u64>())
    };
    assert_eq!(grants(custom_invoice(-6000, -1000, 0)).unwrap(), 700);
    assert_eq!(grants(custom_invoice(0, 0, 5000)).unwrap(), 700);
    assert!(
        grants(custom_invoice(0, 0, 0)).is_err(),
        "settled by a credit note: nothing paid"
    );
    assert!(grants(custom_invoice(-6000, -6000, 0)).is_err());
    // Less collected than agreed (a discount, a credit note before payment): the same
    // share of the credits, rounded down; part from the balance counts as paid.
    assert_eq!(grants(custom_invoice(0, 0, 1000)).unwrap(), 140);
    assert_eq!(grants(custom_invoice(-1000, 0, 1001)).unwrap(), 280);
    // A debt of $3 the customer owed was collected with a discounted payment: it paid the
    // debt, not the credits.
    assert_eq!(grants(custom_invoice(300, 0, 4300)).unwrap(), 560);
    assert!(
        grants(custom_invoice(0, 0, 7)).is_err(),
        "paid too little for one credit: to a person"
    );
    // An invoice made before the agreed amount was recorded: its line is the amount.
    let mut older = custom_invoice(0, 0, 2500);
    older["metadata"] = json!({"kind": "custom_payment", "credits": "700"});
    assert_eq!(grants(older).unwrap(), 350);
}

#[tokio::test]
async fn an_invoice_arriving_before_the_checkout_still_credits_the_right_workspace() {
    let mut order = history();
    order.reverse();
    let o = run(&order).await;
    assert_eq!(o.available, 1520);
}

#[tokio::test]
async fn a_stale_subscription_update_does_not_undo_a_newer_one() {
    let newer = subscription(
        "evt_b",
        "customer.subscription.updated",
        at(6),
        "past_due",
        false,
    );
    let older = subscription(
        "evt_a",
        "customer.subscription.updated",
        at(2),
        "active",
        true,
    );
    let o = run(&[newer.clone(), older.clone()]).await;
    let p = run(&[older, newer]).await;
    assert_eq!(o.plan, p.plan);
    assert_eq!(o.plan.unwrap().status, PlanStatus::PastDue);
}

/// A subscription whose first invoice is not paid (`incomplete`: a bank debit still
/// processing, a card needing authentication, a declined first payment) gives no benefits
/// (no pack discount, no custom-model slots). Its first paid invoice brings them, whichever
/// event comes first, even when an event stamped in the same second still says incomplete.
#[tokio::test]
async fn a_subscription_never_paid_gives_no_benefits_until_an_invoice_is() {
    let catalog = tally::catalog::Catalog::builtin();
    let benefits = |o: &Outcome| {
        let plan = o.plan.clone().unwrap();
        let e = tally::subscriptions::Entitlements::of(Some(&plan), &catalog);
        (plan.in_effect(), e.pack_discount_pct, e.custom_model_slots)
    };
    let incomplete = subscription(
        "evt_incomplete",
        "customer.subscription.created",
        at(0),
        "incomplete",
        false,
    );
    let o = run(&[subscription_checkout(), incomplete.clone()]).await;
    assert_eq!(o.plan.as_ref().unwrap().status, PlanStatus::PastDue);
    assert_eq!(benefits(&o), (false, 0, 0));
    // Its first payment declined: still nothing paid.
    let declined = invoice("evt_declined", "invoice.payment_failed", at(0), "open");
    let o = run(&[
        subscription_checkout(),
        incomplete.clone(),
        declined.clone(),
    ])
    .await;
    assert_eq!(benefits(&o), (false, 0, 0));
    // Paid: in either order, the same second as the incomplete event.
    let paid = invoice("evt_paid", "invoice.paid", at(0), "paid");
    for order in [
        vec![subscription_checkout(), incomplete.clone(), paid.clone()],
        vec![subscription_checkout(), paid.clone(), incomplete.clone()],
        vec![
            subscription_checkout(),
            incomplete.clone(),
            declined.clone(),
            paid.clone(),
        ],
    ] {
        let o = run(&order).await;
        assert!(benefits(&o).0, "{:?}", o.plan);
        assert!(benefits(&o).1 > 0);
    }
    // Reported active while a bank debit processed, then declined: the failed sign-up
    // invoice and the past-due update come in the same second, and whichever wins the
    // status (their ids decide a tie), nothing was ever paid.
    let created = |mut e: Value, at_: i64| {
        e["data"]["object"]["created"] = json!(at_);
        e
    };
    let active = created(
        subscription(
            "evt_created",
            "customer.subscription.created",
            at(0),
            "active",
            false,
        ),
        at(0),
    );
    for (failed_id, update_id) in [
        ("evt_a_failed", "evt_b_update"),
        ("evt_b_failed", "evt_a_update"),
    ] {
        let failed = invoice(failed_id, "invoice.payment_failed", at(1), "open");
        let update = created(
            subscription(
                update_id,
                "customer.subscription.updated",
                at(1),
                "past_due",
                false,
            ),
            at(0),
        );
        for order in [
            vec![
                subscription_checkout(),
                active.clone(),
                failed.clone(),
                update.clone(),
            ],
            vec![
                subscription_checkout(),
                active.clone(),
                update,
                failed.clone(),
            ],
            // No past-due update at all (an invoice sent for payment): the failed sign-up
            // invoice alone says so, even against an update in its second still saying
            // active.
            vec![subscription_checkout(), active.clone(), failed.clone()],
            vec![
                subscription_checkout(),
                active.clone(),
                failed,
                created(
                    subscription(
                        "evt_0_active",
                        "customer.subscription.updated",
                        at(1),
                        "active",
                        false,
                    ),
                    at(0),
                ),
            ],
        ] {
            let o = run(&order).await;
            assert_eq!(
                benefits(&o),
                (false, 0, 0),
                "{failed_id} {update_id}: {:?}",
                o.plan
            );
        }
    }
    // Past due in dunning after renewals (created two months before this period), with no
    // paid period on record (paid before those were recorded): it keeps its benefits.
    let renewal_failed = created(
        subscription(
            "evt_past_due",
            "customer.subscription.updated",
            at(1),
            "past_due",
            false,
        ),
        at(-60),
    );
    let o = run(&[subscription_checkout(), renewal_failed]).await;
    assert_eq!(o.plan.as_ref().unwrap().status, PlanStatus::PastDue);
    assert!(benefits(&o).0, "{:?}", o.plan);
}

#[tokio::test]
async fn a_cancelled_subscription_leaves_the_plan_cancelled() {
    let mut events = history();
    events.push(subscription(
        "evt_deleted",
        "customer.subscription.deleted",
        at(30),
        "canceled",
        false,
    ));
    let o = run(&events).await;
    assert_eq!(o.plan.unwrap().status, PlanStatus::Canceled);
    // Credits already granted stay: cancellation keeps access until the period ends.
    assert_eq!(o.available, 1520);
}

/// An event from Stripe's other mode (a test endpoint's signing secret configured beside
/// the live one) is never applied: it goes to a person, and nothing is granted.
#[tokio::test]
async fn an_event_from_the_other_stripe_mode_is_never_applied() {
    assert_eq!(
        tally::payments::stripe_api::key_livemode("sk_live_abc"),
        Some(true)
    );
    assert_eq!(
        tally::payments::stripe_api::key_livemode("rk_test_abc"),
        Some(false)
    );
    assert_eq!(tally::payments::stripe_api::key_livemode("sk_local"), None);
    let deliver = |body: String| Delivery {
        message_id: "m".into(),
        body,
        group_id: None,
        receive_count: 1,
    };
    let mut test_mode = pack_checkout();
    test_mode["livemode"] = json!(false);
    for (ours, applied) in [(Some(true), false), (Some(false), true), (None, true)] {
        let store = Arc::new(EmbeddedStore::in_memory());
        let (ledger, _) = ledger_over(store.clone());
        let mut worker = BillingEvents::new(ledger.clone(), store, None);
        worker.livemode = ours;
        let answer = worker.consume(&deliver(test_mode.to_string())).await;
        let balance = ledger
            .store
            .load(&workspace(WS))
            .await
            .unwrap()
            .map_or(0, |s| s.balance().available.get());
        if applied {
            assert!(answer.is_ok(), "{ours:?}: {answer:?}");
            assert!(balance > 0);
        } else {
            match answer {
                Err(ConsumeError::Poison(p)) => {
                    assert!(p.to_string().contains("test mode"), "{p}")
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(balance, 0);
        }
    }
}

#[tokio::test]
async fn events_that_name_no_known_workspace_or_unknown_things_are_refused_loudly() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let (ledger, _) = ledger_over(store.clone());
    let worker = BillingEvents::new(ledger, store, None);
    let deliver = |body: String| Delivery {
        message_id: "m".into(),
        body,
        group_id: None,
        receive_count: 1,
    };
    let mut orphan = fixture("charge");
    orphan["customer"] = json!("cus_nobody");
    orphan["metadata"] = json!({});
    let mut i = invoice("evt_x", "invoice.paid", at(0), "paid");
    i["data"]["object"]["parent"] = Value::Null;
    // An invoice for a customer nobody linked yet: retried (it may be linked later).
    assert!(matches!(
        worker.consume(&deliver(i.to_string())).await,
        Err(ConsumeError::Retry(_))
    ));
    let mut bad_pack = pack_checkout();
    bad_pack["data"]["object"]["metadata"]["pack"] = json!("pack_9999");
    assert!(matches!(
        worker.consume(&deliver(bad_pack.to_string())).await,
        Err(ConsumeError::Poison(_))
    ));
    let mut huge = pack_checkout();
    huge["data"]["object"]["metadata"]["quantity"] = json!("100000");
    assert!(matches!(
        worker.consume(&deliver(huge.to_string())).await,
        Err(ConsumeError::Poison(_))
    ));
    assert!(matches!(
        worker.consume(&deliver("{not json".into())).await,
        Err(ConsumeError::Poison(_))
    ));
    // Unrelated event types are acknowledged.
    let other = stripe_event("evt_plan", "plan.created", at(0), fixture("price"));
    assert!(worker.consume(&deliver(other.to_string())).await.is_ok());
    assert_eq!(
        worker
            .ledger
            .workspace_now(&workspace(WS))
            .await
            .unwrap()
            .balance()
            .available
            .get(),
        0
    );
}

#[tokio::test]
async fn an_event_naming_another_workspaces_customer_reaches_nothing_of_it() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let (ledger, _) = ledger_over(store.clone());
    let worker = BillingEvents::new(ledger, store.clone(), None);
    let deliver = |e: &Value| Delivery {
        message_id: "m".into(),
        body: e.to_string(),
        group_id: Some(CUS.into()),
        receive_count: 1,
    };
    worker
        .consume(&deliver(&subscription_checkout()))
        .await
        .unwrap();
    // The same customer under another workspace's id (metadata edited in the dashboard):
    // a subscription event and a checkout.
    let other = workspace("globex");
    let mut sub = subscription(
        "evt_sub_other",
        "customer.subscription.updated",
        at(1),
        "active",
        false,
    );
    sub["data"]["object"]["metadata"]["org_id"] = json!("globex");
    let mut pack = pack_checkout();
    pack["data"]["object"]["metadata"]["org_id"] = json!("globex");
    // Its renewal invoice and its charge, named for the other workspace too.
    let mut paid = invoice("evt_inv_other", "invoice.paid", at(1), "paid");
    paid["data"]["object"]["parent"]["subscription_details"]["metadata"]["org_id"] =
        json!("globex");
    let mut charged = charge("evt_charge_other", "charge.succeeded", at(1), 0);
    charged["data"]["object"]["metadata"] = json!({"org_id": "globex"});
    for e in [&sub, &pack, &paid, &charged] {
        assert!(
            matches!(
                worker.consume(&deliver(e)).await,
                Err(ConsumeError::Poison(_))
            ),
            "{e}"
        );
    }
    let profile: Option<BillingProfile> =
        docs::get(store.as_ref(), &workspace_pk(&other), PROFILE_SK)
            .await
            .unwrap();
    assert_eq!(profile.and_then(|p| p.customer), None);
    let subscription: Option<SubscriptionRecord> =
        docs::get(store.as_ref(), &workspace_pk(&other), SUBSCRIPTION_SK)
            .await
            .unwrap();
    assert!(subscription.is_none());
    let state = worker.ledger.workspace_now(&other).await.unwrap();
    assert_eq!(state.balance().available.get(), 0);
    let invoices: Vec<InvoiceRecord> =
        docs::list(store.as_ref(), &workspace_pk(&other), INVOICE_PREFIX, 100)
            .await
            .unwrap();
    assert!(invoices.is_empty(), "{invoices:?}");
    let payment: Option<PaymentRecord> = docs::get(
        store.as_ref(),
        &charge_pk(&ChargeId::parse("ch_first").unwrap()),
        PAYMENT_SK,
    )
    .await
    .unwrap();
    assert!(payment.is_none(), "{payment:?}");
    // The customer's own workspace keeps it.
    let own: BillingProfile = docs::get(store.as_ref(), &workspace_pk(&workspace(WS)), PROFILE_SK)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(own.customer.map(|c| c.to_string()), Some(CUS.to_owned()));
    // So does a direct claim: nothing is written for the claiming workspace.
    let cus = tally::ids::CustomerId::parse(CUS).unwrap();
    assert_eq!(
        tally::billing::link_customer(store.as_ref(), &cus, &other)
            .await
            .unwrap(),
        tally::billing::Linked::Elsewhere(workspace(WS))
    );
    let profile: Option<BillingProfile> =
        docs::get(store.as_ref(), &workspace_pk(&other), PROFILE_SK)
            .await
            .unwrap();
    assert_eq!(profile.and_then(|p| p.customer), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_order_with_any_duplicates_ends_in_the_same_state(
        order in Just((0..9usize).collect::<Vec<_>>()).prop_shuffle(),
        dups in proptest::collection::vec(0..9usize, 0..6),
    ) {
        let events = history();
        let mut deliveries: Vec<Value> = order.iter().map(|&i| events[i].clone()).collect();
        for (n, d) in dups.iter().enumerate() {
            let at = (n * 3) % (deliveries.len() + 1);
            deliveries.insert(at, events[*d].clone());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (reference, shuffled) = rt.block_on(async { (run(&history()).await, run(&deliveries).await) });
        prop_assert_eq!(shuffled, reference);
    }
}

mod sqs_batches {
    //! The checked-in SQS batches of `events/billing-events/`, through the same
    //! partial-batch runner the Lambda uses.
    use super::*;
    use aws_lambda_events::event::sqs::SqsEvent;
    use tally::queue::lambda::process_batch;

    fn batch(file: &str) -> SqsEvent {
        let path = format!(
            "{}/../events/billing-events/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_pack_checkout_batch_credits_the_workspace_once_even_when_redelivered() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let (ledger, _) = ledger_over(store.clone());
        let worker = BillingEvents::new(ledger.clone(), store, None);
        for _ in 0..2 {
            let r = process_batch(
                &worker,
                batch("pack-checkout.json"),
                tally::queue::BILLING_EVENTS_MAX_RECEIVES,
            )
            .await;
            assert!(r.batch_item_failures.is_empty());
        }
        let state = ledger.workspace_now(&workspace("acme")).await.unwrap();
        assert_eq!(state.balance().available.get(), 500);
    }

    #[tokio::test]
    async fn a_poison_message_fails_alone_and_holds_back_only_its_customers_later_events() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let (ledger, _) = ledger_over(store.clone());
        let worker = BillingEvents::new(ledger.clone(), store, None);
        let r = process_batch(
            &worker,
            batch("poison-then-valid.json"),
            tally::queue::BILLING_EVENTS_MAX_RECEIVES,
        )
        .await;
        let failed: Vec<&str> = r
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(
            failed,
            vec![
                "6f5e4d3c-2b1a-4c0e-9f8e-7d6c5b4a3f2e",
                "7a6b5c4d-3e2f-4a1b-8c9d-0e1f2a3b4c5d"
            ]
        );
        assert_eq!(
            ledger
                .workspace_now(&workspace("acme"))
                .await
                .unwrap()
                .balance()
                .available
                .get(),
            0
        );
        assert_eq!(
            ledger
                .workspace_now(&workspace("other"))
                .await
                .unwrap()
                .balance()
                .available
                .get(),
            500
        );
    }
}

/// The card auto top-up charges follows the latest card payment, whatever order their
/// events arrive in, and only a card Stripe keeps for the customer (not one entered once
/// on a hosted invoice page). A key that may not read payment methods keeps the saved card
/// and does not hold the event back; an outage does (the event is tried again).
#[tokio::test]
async fn the_saved_card_is_the_latest_card_stripe_keeps_whatever_order_payments_arrive() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    for (pm, status, customer) in [
        ("pm_old", 200, json!(CUS)),
        ("pm_new", 200, json!(CUS)),
        ("pm_page", 200, Value::Null),
        ("pm_denied", 403, Value::Null),
        ("pm_down", 503, Value::Null),
        ("pm_later", 200, json!(CUS)),
    ] {
        let body = match status {
            200 => {
                json!({"id": pm, "object": "payment_method", "type": "card", "customer": customer})
            }
            403 => json!({"error": {"type": "invalid_request_error",
                "message": "The provided key does not have the required permissions"}}),
            _ => json!({"error": {"type": "api_error", "message": "unavailable"}}),
        };
        Mock::given(method("GET"))
            .and(path(format!("/v1/payment_methods/{pm}")))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
    }
    let store = Arc::new(EmbeddedStore::in_memory());
    let (ledger, _) = ledger_over(store.clone());
    let mut worker = BillingEvents::new(ledger.clone(), store.clone(), None);
    worker.stripe = Some(Arc::new(
        tally::payments::stripe_api::StripePayments::new(
            "sk_test_tally",
            Some(&format!("{}/", server.uri())),
        )
        .unwrap(),
    ));
    let deliver = |e: Value| {
        let worker = &worker;
        async move {
            let d = Delivery {
                message_id: "m".into(),
                body: e.to_string(),
                group_id: Some(CUS.into()),
                receive_count: 1,
            };
            worker.consume(&d).await
        }
    };
    let paid_with = |pm: &str, day: i64| {
        let mut c = fixture("charge");
        c["id"] = json!(format!("ch_{pm}_{day}"));
        c["customer"] = json!(CUS);
        c["payment_method"] = json!(pm);
        c["created"] = json!(at(day));
        c["metadata"] = json!({});
        c["refunds"] = json!({"object": "list", "data": [], "has_more": false,
            "url": format!("/v1/charges/ch_{pm}_{day}/refunds")});
        stripe_event(&format!("evt_{pm}_{day}"), "charge.succeeded", at(day), c)
    };
    let saved = || async {
        let p: BillingProfile =
            docs::get(store.as_ref(), &workspace_pk(&workspace(WS)), PROFILE_SK)
                .await
                .unwrap()
                .unwrap();
        (p.payment_method.map(|m| m.to_string()), p.payment_method_at)
    };
    deliver(subscription_checkout()).await.unwrap();
    // The newer payment's event first, then the older one's: the newer card stays.
    deliver(paid_with("pm_new", 2)).await.unwrap();
    deliver(paid_with("pm_old", 1)).await.unwrap();
    assert_eq!(saved().await, (Some("pm_new".into()), Some(at(2))));
    // A card kept for no one, and one the key may not read: the saved card stays, and
    // both events are done with.
    deliver(paid_with("pm_page", 3)).await.unwrap();
    deliver(paid_with("pm_denied", 4)).await.unwrap();
    assert_eq!(saved().await, (Some("pm_new".into()), Some(at(2))));
    // Stripe out of reach: tried again.
    assert!(matches!(
        deliver(paid_with("pm_down", 5)).await,
        Err(ConsumeError::Retry(_))
    ));
    // A later payment with a kept card replaces it.
    deliver(paid_with("pm_later", 6)).await.unwrap();
    assert_eq!(saved().await, (Some("pm_later".into()), Some(at(6))));
    // The saved card paid again (its event first), then another card earlier: the saved
    // card made the latest payment and stays.
    deliver(paid_with("pm_later", 8)).await.unwrap();
    deliver(paid_with("pm_new", 7)).await.unwrap();
    assert_eq!(saved().await, (Some("pm_later".into()), Some(at(8))));
}
