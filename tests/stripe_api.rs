//! The Stripe adapter against a local fake of Stripe's API: the exact form parameters and
//! headers it sends, Stripe's own response objects, and how Stripe's errors are read.

use serde_json::json;
use std::collections::BTreeMap;
use tally::ids::{CustomerId, PaymentMethodId, SubscriptionId, WorkspaceId};
use tally::ledger::Interval;
use tally::money::{Cents, Credits};
use tally::payments::stripe_api::StripePayments;
use tally::payments::{CheckoutRequest, Payments, PaymentsError, Purchase};
use tally_tests::fixture;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const KEY: &str = "sk_test_tally";

fn form(req: &Request) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect()
}

fn header<'a>(req: &'a Request, name: &str) -> &'a str {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

async fn client(server: &MockServer) -> StripePayments {
    StripePayments::new(KEY, Some(&format!("{}/", server.uri()))).unwrap()
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn creating_a_customer_sends_its_workspace_and_an_idempotency_key() {
    let server = MockServer::start().await;
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_New");
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer))
        .expect(1)
        .mount(&server)
        .await;
    let id = client(&server)
        .await
        .create_customer(
            &WorkspaceId::parse("org_a").unwrap(),
            Some("owner@a.example"),
            "tally-customer-org_a",
        )
        .await
        .unwrap();
    assert_eq!(id.as_str(), "cus_New");
    let req = &server.received_requests().await.unwrap()[0];
    assert_eq!(
        form(req),
        expected(&[("email", "owner@a.example"), ("metadata[org_id]", "org_a")])
    );
    assert_eq!(header(req, "authorization"), format!("Bearer {KEY}"));
    assert_eq!(header(req, "idempotency-key"), "tally-customer-org_a");
    assert_eq!(
        header(req, "content-type"),
        "application/x-www-form-urlencoded"
    );
    assert!(!header(req, "stripe-version").is_empty());
}

fn session_response(id: &str) -> serde_json::Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!(id);
    s["url"] = json!(format!("https://checkout.stripe.com/c/pay/{id}"));
    s
}

#[tokio::test]
async fn a_pack_checkout_is_a_one_off_payment_with_tax_metadata_and_a_saved_card() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(session_response("cs_pack")))
        .mount(&server)
        .await;
    let link = client(&server)
        .await
        .create_checkout(&CheckoutRequest {
            workspace: WorkspaceId::parse("org_a").unwrap(),
            customer: CustomerId::parse("cus_A").unwrap(),
            purchase: Purchase::Pack {
                pack: "pack_500".into(),
                name: "500 credits".into(),
                quantity: 2,
                unit_amount: Cents::new(3280),
                credits: Credits::new(500),
            },
            success_url: "https://studio.example/billing?done=1".into(),
            cancel_url: "https://studio.example/billing".into(),
            idempotency_key: "tally-checkout-org_a-k1".into(),
        })
        .await
        .unwrap();
    assert_eq!(link.id.as_str(), "cs_pack");
    assert_eq!(link.url, "https://checkout.stripe.com/c/pay/cs_pack");
    let req = &server.received_requests().await.unwrap()[0];
    assert_eq!(header(req, "idempotency-key"), "tally-checkout-org_a-k1");
    assert_eq!(
        form(req),
        expected(&[
            ("mode", "payment"),
            ("customer", "cus_A"),
            ("client_reference_id", "org_a"),
            ("success_url", "https://studio.example/billing?done=1"),
            ("cancel_url", "https://studio.example/billing"),
            ("line_items[0][price_data][currency]", "usd"),
            ("line_items[0][price_data][unit_amount]", "3280"),
            (
                "line_items[0][price_data][product_data][name]",
                "500 credits"
            ),
            ("line_items[0][quantity]", "2"),
            ("metadata[kind]", "pack"),
            ("metadata[org_id]", "org_a"),
            ("metadata[pack]", "pack_500"),
            ("metadata[quantity]", "2"),
            ("automatic_tax[enabled]", "true"),
            ("customer_update[address]", "auto"),
            ("payment_intent_data[metadata][kind]", "pack"),
            ("payment_intent_data[metadata][org_id]", "org_a"),
            ("payment_intent_data[metadata][pack]", "pack_500"),
            ("payment_intent_data[metadata][quantity]", "2"),
            ("payment_intent_data[setup_future_usage]", "off_session"),
        ])
    );
}

#[tokio::test]
async fn a_plan_checkout_is_a_subscription_whose_metadata_names_plan_and_interval() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(session_response("cs_plan")))
        .mount(&server)
        .await;
    client(&server)
        .await
        .create_checkout(&CheckoutRequest {
            workspace: WorkspaceId::parse("org_a").unwrap(),
            customer: CustomerId::parse("cus_A").unwrap(),
            purchase: Purchase::Plan {
                plan: "generative".into(),
                name: "Generative".into(),
                interval: Interval::Yearly,
                unit_amount: Cents::new(42480),
            },
            success_url: "https://s.example/ok".into(),
            cancel_url: "https://s.example/no".into(),
            idempotency_key: "tally-checkout-org_a-k2".into(),
        })
        .await
        .unwrap();
    let req = &server.received_requests().await.unwrap()[0];
    let f = form(req);
    assert_eq!(f["mode"], "subscription");
    assert_eq!(f["line_items[0][price_data][recurring][interval]"], "year");
    assert_eq!(f["line_items[0][price_data][unit_amount]"], "42480");
    assert_eq!(f["subscription_data[metadata][plan]"], "generative");
    assert_eq!(f["subscription_data[metadata][interval]"], "yearly");
    assert_eq!(f["subscription_data[metadata][org_id]"], "org_a");
    assert_eq!(f["subscription_data[metadata][addon_units]"], "0");
    assert!(!f.contains_key("payment_intent_data[setup_future_usage]"));
    assert!(!f.contains_key("subscription_data[metadata][kind]"));
}

#[tokio::test]
async fn stripe_refusals_and_outages_are_told_apart() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/sessions"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "resource_missing",
            "message": "No such customer: 'cus_gone'", "param": "customer"}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .mount(&server)
        .await;
    let c = client(&server).await;
    let refused = c
        .billing_portal(
            &CustomerId::parse("cus_gone").unwrap(),
            "https://s.example",
            "k",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, PaymentsError::Refused { message: m, .. } if m.contains("No such customer")),
        "{refused}"
    );
    let down = c
        .create_customer(&WorkspaceId::parse("org_a").unwrap(), None, "k2")
        .await
        .unwrap_err();
    assert!(matches!(down, PaymentsError::Unavailable { .. }), "{down}");
}

#[tokio::test]
async fn the_billing_portal_returns_stripes_url() {
    let server = MockServer::start().await;
    let mut portal = fixture("billing_portal.session");
    portal["url"] = json!("https://billing.stripe.com/p/session/test_123");
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(portal))
        .mount(&server)
        .await;
    let url = client(&server)
        .await
        .billing_portal(
            &CustomerId::parse("cus_A").unwrap(),
            "https://s.example/back",
            "k3",
        )
        .await
        .unwrap();
    assert_eq!(url, "https://billing.stripe.com/p/session/test_123");
    let req = &server.received_requests().await.unwrap()[0];
    assert_eq!(
        form(req),
        expected(&[
            ("customer", "cus_A"),
            ("return_url", "https://s.example/back")
        ])
    );
    assert_eq!(header(req, "idempotency-key"), "k3");
}

fn subscription_response() -> serde_json::Value {
    let mut s = fixture("subscription");
    s["id"] = json!("sub_A");
    let plan_item = s["items"]["data"][0].clone();
    let mut addon_item = plan_item.clone();
    addon_item["id"] = json!("si_addon");
    addon_item["price"]["product"] = json!("tally_addon_individual");
    s["items"]["data"] = json!([plan_item, addon_item]);
    s
}

#[tokio::test]
async fn an_upgrade_replaces_the_plan_price_prorated_now_and_rewrites_the_metadata() {
    use tally::payments::{ItemPrice, SubscriptionChange};
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_response()))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/products"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "resource_already_exists",
            "message": "Product already exists."}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_response()))
        .mount(&server)
        .await;
    let price = |product: &str, amount| ItemPrice {
        product: product.into(),
        product_name: "n".into(),
        unit_amount: amount,
        interval: Interval::Monthly,
    };
    client(&server)
        .await
        .update_subscription(&SubscriptionChange {
            plan: Some(price("tally_plan_generative", Cents::new(5900))),
            addons: Some((0, price("tally_addon_individual", Cents::new(1000)))),
            prorate_now: true,
            metadata: [("plan", "generative"), ("scheduled_plan", "")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            idempotency_key: "tally-change-org_a-k".into(),
            ..SubscriptionChange::to(SubscriptionId::parse("sub_A").unwrap())
        })
        .await
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    let update = requests
        .iter()
        .find(|r| r.method.as_str() == "POST" && r.url.path() == "/v1/subscriptions/sub_A")
        .unwrap();
    assert_eq!(header(update, "idempotency-key"), "tally-change-org_a-k");
    assert_eq!(
        form(update),
        expected(&[
            ("items[0][id]", "si_QXhVnC2h0Jczwc"),
            ("items[0][price_data][currency]", "usd"),
            ("items[0][price_data][product]", "tally_plan_generative"),
            ("items[0][price_data][unit_amount]", "5900"),
            ("items[0][price_data][recurring][interval]", "month"),
            ("items[1][id]", "si_addon"),
            ("items[1][deleted]", "true"),
            ("proration_behavior", "always_invoice"),
            ("payment_behavior", "error_if_incomplete"),
            ("metadata[plan]", "generative"),
            ("metadata[scheduled_plan]", ""),
        ])
    );
    let product = requests
        .iter()
        .find(|r| r.url.path() == "/v1/products")
        .unwrap();
    assert_eq!(form(product)["id"], "tally_plan_generative");
}

#[tokio::test]
async fn cancel_and_pause_send_only_their_flags() {
    use tally::payments::SubscriptionChange;
    let server = MockServer::start().await;
    for m in ["GET", "POST"] {
        Mock::given(method(m))
            .and(path("/v1/subscriptions/sub_A"))
            .respond_with(ResponseTemplate::new(200).set_body_json(subscription_response()))
            .mount(&server)
            .await;
    }
    let c = client(&server).await;
    let send = |cancel, pause| SubscriptionChange {
        cancel_at_period_end: cancel,
        pause,
        idempotency_key: "k".into(),
        ..SubscriptionChange::to(SubscriptionId::parse("sub_A").unwrap())
    };
    c.update_subscription(&send(Some(true), None))
        .await
        .unwrap();
    c.update_subscription(&send(None, Some(true)))
        .await
        .unwrap();
    c.update_subscription(&send(Some(false), Some(false)))
        .await
        .unwrap();
    let posts: Vec<BTreeMap<String, String>> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .map(form)
        .collect();
    assert_eq!(
        posts[0],
        expected(&[
            ("proration_behavior", "none"),
            ("cancel_at_period_end", "true")
        ])
    );
    assert_eq!(
        posts[1],
        expected(&[
            ("proration_behavior", "none"),
            ("pause_collection[behavior]", "void")
        ])
    );
    assert_eq!(
        posts[2],
        expected(&[
            ("proration_behavior", "none"),
            ("cancel_at_period_end", "false"),
            ("pause_collection", "")
        ])
    );
}

#[tokio::test]
async fn a_custom_payment_is_an_invoice_sent_for_payment_with_its_credits_in_metadata() {
    use tally::payments::CustomInvoice;
    let server = MockServer::start().await;
    let mut invoice = fixture("invoice");
    invoice["id"] = json!("in_custom");
    invoice["hosted_invoice_url"] = json!("https://invoice.stripe.com/i/in_custom");
    for p in [
        "/v1/invoices",
        "/v1/invoices/in_custom/finalize",
        "/v1/invoices/in_custom/send",
    ] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(invoice.clone()))
            .mount(&server)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/v1/invoiceitems"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "ii_1", "object": "invoiceitem"})),
        )
        .mount(&server)
        .await;
    let link = client(&server)
        .await
        .create_custom_invoice(&CustomInvoice {
            workspace: WorkspaceId::parse("org_e").unwrap(),
            customer: CustomerId::parse("cus_E").unwrap(),
            amount: Cents::new(250000),
            credits: Credits::new(30000),
            description: "Enterprise credits".into(),
            days_until_due: 30,
            idempotency_key: "tally-custom-org_e-po-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        link.hosted_invoice_url,
        "https://invoice.stripe.com/i/in_custom"
    );
    let reqs = server.received_requests().await.unwrap();
    let paths: Vec<&str> = reqs.iter().map(|r| r.url.path()).collect();
    assert_eq!(
        paths,
        vec![
            "/v1/invoices",
            "/v1/invoiceitems",
            "/v1/invoices/in_custom/finalize",
            "/v1/invoices/in_custom/send"
        ]
    );
    assert_eq!(
        form(&reqs[0]),
        expected(&[
            ("customer", "cus_E"),
            ("collection_method", "send_invoice"),
            ("days_until_due", "30"),
            ("description", "Enterprise credits"),
            ("auto_advance", "true"),
            ("metadata[org_id]", "org_e"),
            ("metadata[kind]", "custom_payment"),
            ("metadata[credits]", "30000"),
        ])
    );
    assert_eq!(
        form(&reqs[1]),
        expected(&[
            ("customer", "cus_E"),
            ("invoice", "in_custom"),
            ("amount", "250000"),
            ("currency", "usd"),
            ("description", "Enterprise credits")
        ])
    );
    let keys: Vec<&str> = reqs.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys,
        vec![
            "tally-custom-org_e-po-1-invoice",
            "tally-custom-org_e-po-1-item",
            "tally-custom-org_e-po-1-finalize",
            "tally-custom-org_e-po-1-send"
        ]
    );
}

#[tokio::test]
async fn an_auto_top_up_is_a_confirmed_off_session_payment_flagged_as_top_up() {
    use tally::payments::TopUp;
    let server = MockServer::start().await;
    let mut pi = fixture("payment_intent");
    pi["id"] = json!("pi_topup");
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pi))
        .mount(&server)
        .await;
    let id = client(&server)
        .await
        .charge_saved_method(&TopUp {
            workspace: WorkspaceId::parse("org_t").unwrap(),
            customer: CustomerId::parse("cus_T").unwrap(),
            payment_method: PaymentMethodId::parse("pm_card").unwrap(),
            pack: "pack_100".into(),
            amount: Cents::new(800),
            idempotency_key: "tally-topup-org_t-42".into(),
        })
        .await
        .unwrap();
    assert_eq!(id.as_str(), "pi_topup");
    let req = &server.received_requests().await.unwrap()[0];
    assert_eq!(header(req, "idempotency-key"), "tally-topup-org_t-42");
    assert_eq!(
        form(req),
        expected(&[
            ("amount", "800"),
            ("currency", "usd"),
            ("customer", "cus_T"),
            ("payment_method", "pm_card"),
            ("off_session", "true"),
            ("confirm", "true"),
            ("description", "Auto top-up: pack_100"),
            ("metadata[org_id]", "org_t"),
            ("metadata[kind]", "pack"),
            ("metadata[pack]", "pack_100"),
            ("metadata[quantity]", "1"),
            ("metadata[topup]", "true"),
        ])
    );
}
