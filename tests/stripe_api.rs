//! The Stripe adapter against a local fake of Stripe's API: the exact form parameters and
//! headers it sends, Stripe's own response objects, and how Stripe's errors are read.

use serde_json::json;
use std::collections::BTreeMap;
use tally::ids::{CustomerId, PaymentMethodId, SubscriptionId, WorkspaceId};
use tally::ledger::Interval;
use tally::money::{Cents, Credits};
use tally::payments::stripe_api::StripePayments;
use tally::payments::{CheckoutRequest, Payments, PaymentsError, PlanCheckouts, Purchase};
use tally_tests::fixture;
use wiremock::matchers::{method, path, query_param, query_param_is_missing};
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
    // Made by this request.
    s["created"] = json!(chrono::Utc::now().timestamp());
    s
}

/// `quantity` packs of 500 credits at Max's 20% off, for org_a under key `k1`.
fn pack_checkout(quantity: u64) -> CheckoutRequest {
    CheckoutRequest {
        workspace: WorkspaceId::parse("org_a").unwrap(),
        customer: CustomerId::parse("cus_A").unwrap(),
        purchase: Purchase::Pack {
            pack: "pack_500".into(),
            name: "500 credits".into(),
            quantity,
            unit_amount: Cents::new(3280),
            credits: Credits::new(500),
            discount_pct: 20,
        },
        success_url: "https://studio.example/billing?done=1".into(),
        cancel_url: "https://studio.example/billing".into(),
        idempotency_key: "tally-checkout-org_a-k1".into(),
    }
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
        .create_checkout(&pack_checkout(2))
        .await
        .unwrap();
    assert_eq!(link.id.as_str(), "cs_pack");
    assert_eq!(link.url, "https://checkout.stripe.com/c/pay/cs_pack");
    assert!(!link.expired, "Stripe's example session is open");
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
            ("metadata[credits]", "500"),
            ("metadata[pack_discount_pct]", "20"),
            ("automatic_tax[enabled]", "true"),
            ("customer_update[address]", "auto"),
            ("payment_intent_data[metadata][kind]", "pack"),
            ("payment_intent_data[metadata][org_id]", "org_a"),
            ("payment_intent_data[metadata][pack]", "pack_500"),
            ("payment_intent_data[metadata][quantity]", "2"),
            ("payment_intent_data[metadata][credits]", "500"),
            ("payment_intent_data[metadata][pack_discount_pct]", "20"),
            ("payment_intent_data[setup_future_usage]", "off_session"),
            // Every purchase has an invoice with a PDF.
            ("invoice_creation[enabled]", "true"),
            ("invoice_creation[invoice_data][metadata][kind]", "pack"),
            ("invoice_creation[invoice_data][metadata][org_id]", "org_a"),
            ("invoice_creation[invoice_data][metadata][pack]", "pack_500"),
            ("invoice_creation[invoice_data][metadata][quantity]", "2"),
            ("invoice_creation[invoice_data][metadata][credits]", "500"),
            (
                "invoice_creation[invoice_data][metadata][pack_discount_pct]",
                "20"
            ),
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
    Mock::given(method("POST"))
        .and(path("/v1/products"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("product")))
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
    let requests = server.received_requests().await.unwrap();
    // The plan is Tally's own product, created once (whatever door changes the
    // subscription later names the same catalog item).
    assert_eq!(requests[0].url.path(), "/v1/products");
    assert_eq!(form(&requests[0])["id"], "tally_plan_generative");
    let f = form(&requests[1]);
    assert_eq!(f["mode"], "subscription");
    assert_eq!(
        f["line_items[0][price_data][product]"],
        "tally_plan_generative"
    );
    assert!(!f.contains_key("line_items[0][price_data][product_data][name]"));
    assert_eq!(f["line_items[0][price_data][recurring][interval]"], "year");
    assert_eq!(f["line_items[0][price_data][unit_amount]"], "42480");
    assert_eq!(f["subscription_data[metadata][plan]"], "generative");
    assert_eq!(f["subscription_data[metadata][interval]"], "yearly");
    assert_eq!(f["subscription_data[metadata][org_id]"], "org_a");
    assert_eq!(f["subscription_data[metadata][addon_units]"], "0");
    assert!(!f.contains_key("payment_intent_data[setup_future_usage]"));
    assert!(!f.contains_key("subscription_data[metadata][kind]"));
    // The session names the request it was made for; the subscription does not.
    assert_eq!(f["metadata[tally_request]"], "tally-checkout-org_a-k2");
    assert!(!f.contains_key("subscription_data[metadata][tally_request]"));
}

/// Stripe answers a key used before with the body it saved then: a session made long ago
/// reads `open` there, so its state now is read, and one expired since is reported so.
#[tokio::test]
async fn a_checkout_answered_with_an_older_session_reads_whether_it_has_expired() {
    for (now, expired) in [("open", false), ("expired", true)] {
        let server = MockServer::start().await;
        let mut saved = session_response("cs_old");
        saved["created"] = json!(chrono::Utc::now().timestamp() - 3600);
        saved["status"] = json!("open");
        Mock::given(method("POST"))
            .and(path("/v1/checkout/sessions"))
            .respond_with(ResponseTemplate::new(200).set_body_json(saved.clone()))
            .mount(&server)
            .await;
        let mut current = saved;
        current["status"] = json!(now);
        Mock::given(method("GET"))
            .and(path("/v1/checkout/sessions/cs_old"))
            .respond_with(ResponseTemplate::new(200).set_body_json(current))
            .expect(1)
            .mount(&server)
            .await;
        let link = client(&server)
            .await
            .create_checkout(&pack_checkout(1))
            .await
            .unwrap();
        assert_eq!((link.id.as_str(), link.expired), ("cs_old", expired));
    }
}

fn session_row(id: &str, mode: &str, status: &str, request: &str) -> serde_json::Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!(id);
    s["mode"] = json!(mode);
    s["status"] = json!(status);
    s["metadata"] = json!({"org_id": "org_a", "tally_request": request});
    s
}

/// Stripe's answers to making way for a plan checkout: the open sessions, the expiry of
/// `cs_old` (refused when `paid`), and the customer's subscriptions not canceled.
async fn clearing(paid: bool, subscriptions: serde_json::Value) -> (PlanCheckouts, Vec<String>) {
    let server = MockServer::start().await;
    let list = |data: serde_json::Value| json!({"object": "list", "data": data, "has_more": false, "url": "/v1/x"});
    // Newest first, a page at a time: the older plan session is on the second page.
    let first = json!({"object": "list", "has_more": true, "url": "/v1/checkout/sessions", "data": [
        session_row("cs_pack", "payment", "open", "x"),
        session_row("cs_mine", "subscription", "open", "tally-checkout-org_a-k2"),
    ]});
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param("starting_after", "cs_mine"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(list(json!([session_row(
                "cs_old",
                "subscription",
                "open",
                "tally-checkout-org_a-k1"
            )]))),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(ResponseTemplate::new(200).set_body_json(first))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions/cs_old/expire"))
        .respond_with(if paid {
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "invalid_request_error",
                "message": "Only Checkout Sessions with a status in [\"open\"] can be expired."}}))
        } else {
            ResponseTemplate::new(200).set_body_json(session_row(
                "cs_old",
                "subscription",
                "expired",
                "tally-checkout-org_a-k1",
            ))
        })
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions/cs_old"))
        .respond_with(ResponseTemplate::new(200).set_body_json(session_row(
            "cs_old",
            "subscription",
            "complete",
            "tally-checkout-org_a-k1",
        )))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(list(subscriptions)))
        .mount(&server)
        .await;
    let answer = client(&server)
        .await
        .clear_plan_checkouts(
            &CustomerId::parse("cus_A").unwrap(),
            "tally-checkout-org_a-k2",
        )
        .await
        .unwrap();
    let calls = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let q = r.url.query().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{} {}{q}", r.method, r.url.path())
        })
        .collect();
    (answer, calls)
}

#[tokio::test]
async fn making_way_for_a_plan_checkout_expires_the_other_open_plan_sessions() {
    let mut ended = fixture("subscription");
    ended["id"] = json!("sub_old");
    ended["status"] = json!("incomplete_expired");
    let (answer, calls) = clearing(false, json!([ended.clone()])).await;
    assert_eq!(answer, PlanCheckouts::Clear);
    assert_eq!(
        calls,
        vec![
            "GET /v1/checkout/sessions?customer=cus_A&status=open&limit=100",
            "GET /v1/checkout/sessions?customer=cus_A&status=open&limit=100&starting_after=cs_mine",
            "POST /v1/checkout/sessions/cs_old/expire",
            "GET /v1/subscriptions?customer=cus_A&limit=100",
        ]
    );
    // A subscription not ended, which the ledger may not show yet.
    let mut live = fixture("subscription");
    live["id"] = json!("sub_live");
    live["status"] = json!("past_due");
    let (answer, _) = clearing(false, json!([ended, live])).await;
    assert_eq!(
        answer,
        PlanCheckouts::Subscribed(SubscriptionId::parse("sub_live").unwrap())
    );
    // Paid while being expired.
    let (answer, calls) = clearing(true, json!([])).await;
    assert_eq!(answer, PlanCheckouts::JustPaid("cs_old".parse().unwrap()));
    assert_eq!(calls.last().unwrap(), "GET /v1/checkout/sessions/cs_old");
}

fn pack_row(id: &str, discount: Option<&str>) -> serde_json::Value {
    let mut s = session_row(id, "payment", "open", "x");
    s["metadata"] = json!({"org_id": "org_a", "kind": "pack", "pack": "pack_500"});
    if let Some(d) = discount {
        s["metadata"]["pack_discount_pct"] = json!(d);
    }
    s
}

#[tokio::test]
async fn a_plan_that_stops_giving_its_discount_expires_the_pack_sessions_priced_with_it() {
    let server = MockServer::start().await;
    let page = |data: serde_json::Value, more: bool| json!({"object": "list", "data": data, "has_more": more, "url": "/v1/checkout/sessions"});
    // Newest first: a pack at 20% and one without a discount, then on the next page a
    // pack at 10%, a plan session and a pack at 20% paid while it is being expired.
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(
            json!([pack_row("cs_20", Some("20")), pack_row("cs_full", None)]),
            true,
        )))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param("starting_after", "cs_full"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(
            json!([
                pack_row("cs_10", Some("10")),
                session_row("cs_plan", "subscription", "open", "tally-checkout-org_a-k1"),
                pack_row("cs_paid", Some("20")),
            ]),
            false,
        )))
        .mount(&server)
        .await;
    for id in ["cs_20", "cs_10"] {
        Mock::given(method("POST"))
            .and(path(format!("/v1/checkout/sessions/{id}/expire")))
            .respond_with(ResponseTemplate::new(200).set_body_json(pack_row(id, Some("20"))))
            .mount(&server)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions/cs_paid/expire"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error",
            "message": "Only Checkout Sessions with a status in [\"open\"] can be expired."}})))
        .mount(&server)
        .await;
    let mut paid = pack_row("cs_paid", Some("20"));
    paid["status"] = json!("complete");
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions/cs_paid"))
        .respond_with(ResponseTemplate::new(200).set_body_json(paid))
        .mount(&server)
        .await;
    let stripe = client(&server).await;
    let customer = CustomerId::parse("cus_A").unwrap();
    // The expiries asked, each under a key of its own (Stripe keeps a failure under its
    // key, so a retry under the same one could never succeed).
    let calls = || async {
        let posts: Vec<(String, String)> = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .map(|r| {
                (
                    r.url.path().to_owned(),
                    header(r, "idempotency-key").to_owned(),
                )
            })
            .collect();
        for (path, key) in &posts {
            let session = path.split('/').nth(4).unwrap();
            assert!(
                key.starts_with(&format!("tally-expire-{session}-")),
                "{key}"
            );
        }
        let keys: std::collections::BTreeSet<_> = posts.iter().map(|(_, k)| k).collect();
        assert_eq!(keys.len(), posts.len(), "{posts:?}");
        posts.into_iter().map(|(p, _)| p).collect::<Vec<_>>()
    };
    // Listed for this customer's open sessions only.
    let lists = || async {
        server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.method.as_str() == "GET" && r.url.path() == "/v1/checkout/sessions")
            .map(|r| r.url.query().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    // No plan discount any more: every discounted pack session goes, the one paid stays
    // paid, the full-price one and the plan session are left open.
    assert_eq!(stripe.expire_pack_checkouts(&customer, 0).await.unwrap(), 2);
    assert_eq!(
        calls().await,
        vec![
            "/v1/checkout/sessions/cs_20/expire",
            "/v1/checkout/sessions/cs_10/expire",
            "/v1/checkout/sessions/cs_paid/expire",
        ]
    );
    assert_eq!(
        lists().await,
        vec![
            "customer=cus_A&status=open&limit=100",
            "customer=cus_A&status=open&limit=100&starting_after=cs_full",
        ]
    );
    // A plan still giving 10%: only sessions priced above it.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(
            json!([pack_row("cs_20", Some("20")), pack_row("cs_10", Some("10"))]),
            false,
        )))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions/cs_20/expire"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pack_row("cs_20", Some("20"))))
        .mount(&server)
        .await;
    assert_eq!(
        stripe.expire_pack_checkouts(&customer, 10).await.unwrap(),
        1
    );
    assert_eq!(calls().await, vec!["/v1/checkout/sessions/cs_20/expire"]);
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
    // A declined card is refused; a key Stripe does not take, or a service it depends on
    // failing, is not the request's fault: it may pass once mended.
    for (status, kind, refused) in [
        (402, "card_error", true),
        (401, "invalid_request_error", false),
        (403, "invalid_request_error", false),
        (424, "api_error", false),
        (429, "invalid_request_error", false),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/customers"))
            .respond_with(
                ResponseTemplate::new(status).set_body_json(json!({"error": {
                "type": kind, "message": format!("answered {status}")}})),
            )
            .mount(&server)
            .await;
        let e = client(&server)
            .await
            .create_customer(&WorkspaceId::parse("org_a").unwrap(), None, "k3")
            .await
            .unwrap_err();
        assert_eq!(
            matches!(e, PaymentsError::Refused { .. }),
            refused,
            "{status}: {e}"
        );
    }
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
            ("expand[0]", "latest_invoice"),
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

/// Staff bill $2,500 for 30,000 credits under `key`.
fn enterprise_invoice(key: &str) -> tally::payments::CustomInvoice {
    tally::payments::CustomInvoice {
        workspace: WorkspaceId::parse("org_e").unwrap(),
        customer: CustomerId::parse("cus_E").unwrap(),
        amount: Cents::new(250000),
        credits: Credits::new(30000),
        description: "Enterprise credits".into(),
        days_until_due: 30,
        staff: "staff_1".into(),
        idempotency_key: key.into(),
    }
}

/// Stripe shows `invoice` with `status` when it is read.
async fn shows_invoice(server: &MockServer, invoice: &serde_json::Value, status: &str) {
    let mut shown = invoice.clone();
    shown["status"] = json!(status);
    let id = invoice["id"].as_str().unwrap();
    Mock::given(method("GET"))
        .and(path(format!("/v1/invoices/{id}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(shown))
        .mount(server)
        .await;
}

#[tokio::test]
async fn a_custom_payment_is_an_invoice_sent_for_payment_with_its_credits_in_metadata() {
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
    shows_invoice(&server, &invoice, "open").await;
    let link = client(&server)
        .await
        .create_custom_invoice(&enterprise_invoice("tally-custom-org_e-po-1"))
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
            "/v1/invoices/in_custom",
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
            ("auto_advance", "false"),
            ("metadata[org_id]", "org_e"),
            ("metadata[kind]", "custom_payment"),
            ("metadata[issued_by]", "staff_1"),
            ("metadata[credits]", "30000"),
            ("metadata[amount_cents]", "250000"),
        ])
    );
    assert_eq!(
        form(&reqs[2]),
        expected(&[
            ("customer", "cus_E"),
            ("invoice", "in_custom"),
            ("amount", "250000"),
            ("currency", "usd"),
            ("description", "Enterprise credits")
        ])
    );
    // Payable only once this request finalizes it, with Stripe's collection from then on.
    assert_eq!(form(&reqs[3]), expected(&[("auto_advance", "true")]));
    let keys: Vec<&str> = reqs.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys,
        vec![
            "tally-custom-org_e-po-1-invoice",
            "",
            "tally-custom-org_e-po-1-item",
            "tally-custom-org_e-po-1-finalize",
            "tally-custom-org_e-po-1-send"
        ]
    );
}

/// A custom payment whose `failing` step Stripe refuses (or, `down`, cannot answer),
/// after the invoice was created, while Stripe shows the invoice as `status`: whether it
/// was refused, and the requests made, with the last one's form.
async fn custom_payment_failing_at(
    failing: Option<&str>,
    down: bool,
    status: &str,
) -> (bool, Vec<(String, String)>, BTreeMap<String, String>) {
    let server = MockServer::start().await;
    let mut invoice = fixture("invoice");
    invoice["id"] = json!("in_left");
    let refusal = if down {
        ResponseTemplate::new(503).set_body_string("upstream unavailable")
    } else {
        ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error",
            "message": "Customer cus_E has no email address; add one to send an invoice"}}))
    };
    for p in [
        "/v1/invoices",
        "/v1/invoiceitems",
        "/v1/invoices/in_left/finalize",
        "/v1/invoices/in_left/send",
        "/v1/invoices/in_left/void",
        "/v1/invoices/in_left",
    ] {
        let answer = if Some(p) == failing {
            refusal.clone()
        } else {
            ResponseTemplate::new(200).set_body_json(invoice.clone())
        };
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(answer)
            .mount(&server)
            .await;
    }
    shows_invoice(&server, &invoice, status).await;
    let made = client(&server)
        .await
        .create_custom_invoice(&enterprise_invoice("tally-custom-org_e-po-2"))
        .await;
    let refused = matches!(made, Err(PaymentsError::Refused { .. }));
    assert_eq!(made.is_err(), refused || down, "{made:?}");
    let reqs = server.received_requests().await.unwrap();
    (
        refused,
        reqs.iter()
            .map(|r| (r.method.to_string(), r.url.path().to_owned()))
            .collect(),
        form(reqs.last().unwrap()),
    )
}

#[tokio::test]
async fn a_custom_payment_that_fails_halfway_leaves_no_payable_invoice() {
    let calls = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    };
    let sent = [
        ("POST", "/v1/invoices"),
        ("GET", "/v1/invoices/in_left"),
        ("POST", "/v1/invoiceitems"),
        ("POST", "/v1/invoices/in_left/finalize"),
        ("POST", "/v1/invoices/in_left/send"),
    ];
    let then = |more: &[(&'static str, &'static str)]| {
        let mut c = sent.to_vec();
        c.extend_from_slice(more);
        calls(&c)
    };
    // Finalized, then the sending refused, or Stripe out of reach: the open invoice is
    // voided.
    for down in [false, true] {
        let (refused, made, _) =
            custom_payment_failing_at(Some("/v1/invoices/in_left/send"), down, "open").await;
        assert_eq!(refused, !down);
        assert_eq!(
            made,
            then(&[
                ("GET", "/v1/invoices/in_left"),
                ("POST", "/v1/invoices/in_left/void")
            ])
        );
    }
    // The line refused: the draft (which Stripe would finalize an hour later) is kept
    // from finalizing.
    let (_, made, hold) = custom_payment_failing_at(Some("/v1/invoiceitems"), false, "draft").await;
    assert_eq!(
        made,
        calls(&[
            ("POST", "/v1/invoices"),
            ("GET", "/v1/invoices/in_left"),
            ("POST", "/v1/invoiceitems"),
            ("GET", "/v1/invoices/in_left"),
            ("POST", "/v1/invoices/in_left"),
        ])
    );
    assert_eq!(hold, expected(&[("auto_advance", "false")]));
    // A retry under the same key that Stripe answers from its records, for an invoice
    // voided since: refused before anything is sent again.
    let (refused, made, _) = custom_payment_failing_at(None, false, "void").await;
    assert!(refused);
    assert_eq!(
        made,
        calls(&[
            ("POST", "/v1/invoices"),
            ("GET", "/v1/invoices/in_left"),
            ("GET", "/v1/invoices/in_left"),
        ])
    );
}

#[tokio::test]
async fn an_auto_top_up_is_a_confirmed_off_session_payment_flagged_as_top_up() {
    use tally::payments::TopUp;
    let server = MockServer::start().await;
    let mut pi = fixture("payment_intent");
    pi["id"] = json!("pi_topup");
    pi["status"] = json!("succeeded");
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pi))
        .mount(&server)
        .await;
    let topup = |key: &str| TopUp {
        workspace: WorkspaceId::parse("org_t").unwrap(),
        customer: CustomerId::parse("cus_T").unwrap(),
        payment_method: PaymentMethodId::parse("pm_card").unwrap(),
        pack: "pack_100".into(),
        credits: tally::money::Credits::new(100),
        amount: Cents::new(800),
        idempotency_key: key.into(),
    };
    let paid = client(&server)
        .await
        .charge_saved_method(&topup("tally-topup-org_t-42"))
        .await
        .unwrap();
    assert_eq!(
        paid,
        tally::payments::TopUpPayment::Succeeded("pi_topup".parse().unwrap())
    );
    let req = &server.received_requests().await.unwrap()[0];
    assert_eq!(header(req, "idempotency-key"), "tally-topup-org_t-42");
    assert_eq!(
        form(req),
        expected(&[
            ("amount", "800"),
            ("currency", "usd"),
            ("customer", "cus_T"),
            ("payment_method", "pm_card"),
            ("payment_method_types[0]", "card"),
            ("off_session", "true"),
            ("confirm", "true"),
            ("description", "Auto top-up: pack_100"),
            ("metadata[org_id]", "org_t"),
            ("metadata[kind]", "pack"),
            ("metadata[pack]", "pack_100"),
            ("metadata[quantity]", "1"),
            ("metadata[credits]", "100"),
            ("metadata[topup]", "true"),
        ])
    );

    // A key longer than Stripe takes (255) goes as its digest: the same one every time.
    let long = format!("tally-topup-{}", "k".repeat(300));
    for _ in 0..2 {
        client(&server)
            .await
            .charge_saved_method(&topup(&long))
            .await
            .unwrap();
    }
    let sent = server.received_requests().await.unwrap();
    let (a, b) = (
        header(&sent[1], "idempotency-key"),
        header(&sent[2], "idempotency-key"),
    );
    assert_eq!(a, b);
    assert!(a.len() <= 255 && a.starts_with("tally-sha256-"), "{a}");
    assert_ne!(
        a,
        tally::payments::stripe_api::stripe_key(&format!("{long}x")),
        "another key, another digest"
    );

    // A payment Stripe is still collecting is the top-up's, told apart from a taken one.
    let server = MockServer::start().await;
    let mut pi = fixture("payment_intent");
    pi["id"] = json!("pi_slow");
    pi["status"] = json!("processing");
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pi))
        .mount(&server)
        .await;
    assert_eq!(
        client(&server)
            .await
            .charge_saved_method(&topup("tally-topup-org_t-44"))
            .await
            .unwrap(),
        tally::payments::TopUpPayment::Processing("pi_slow".parse().unwrap())
    );

    // One that needs the customer, or another method, was not paid: refused.
    for status in [
        "requires_action",
        "requires_payment_method",
        "requires_confirmation",
        "canceled",
    ] {
        let server = MockServer::start().await;
        let mut pi = fixture("payment_intent");
        pi["status"] = json!(status);
        Mock::given(method("POST"))
            .and(path("/v1/payment_intents"))
            .respond_with(ResponseTemplate::new(200).set_body_json(pi))
            .mount(&server)
            .await;
        let e = client(&server)
            .await
            .charge_saved_method(&topup("tally-topup-org_t-43"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, tally::payments::PaymentsError::Refused { .. }),
            "{status}: {e}"
        );
    }
}

#[tokio::test]
async fn a_card_is_saved_for_a_customer_only_when_stripe_has_it_attached_to_that_customer() {
    let server = MockServer::start().await;
    for (id, customer, status) in [
        ("pm_kept", json!("cus_T"), 200),
        ("pm_other", json!("cus_U"), 200),
        ("pm_page", serde_json::Value::Null, 200),
        ("pm_gone", serde_json::Value::Null, 404),
        ("pm_down", serde_json::Value::Null, 503),
    ] {
        let body = if status == 404 {
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
                "message": format!("No such PaymentMethod: '{id}'")}})
        } else if status == 503 {
            json!({"error": {"type": "api_error", "message": "unavailable"}})
        } else {
            json!({"id": id, "object": "payment_method", "type": "card", "customer": customer,
                "card": {"brand": "visa", "last4": "4242"}})
        };
        Mock::given(method("GET"))
            .and(path(format!("/v1/payment_methods/{id}")))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
    }
    let stripe = client(&server).await;
    let customer = CustomerId::parse("cus_T").unwrap();
    let saved = |id: &str| {
        let stripe = &stripe;
        let customer = &customer;
        let id = PaymentMethodId::parse(id).unwrap();
        async move { stripe.card_saved_for(&id, customer).await }
    };
    assert!(saved("pm_kept").await.unwrap());
    assert!(!saved("pm_other").await.unwrap(), "another customer's");
    assert!(!saved("pm_page").await.unwrap(), "kept for no one");
    assert!(!saved("pm_gone").await.unwrap(), "unknown to Stripe");
    assert!(
        matches!(
            saved("pm_down").await,
            Err(PaymentsError::Unavailable { .. })
        ),
        "an outage is not an answer"
    );
}

/// A subscription_update invoice as Stripe returns it expanded on the update: one credit
/// line for the old plan, one charge for the new.
fn change_invoice(id: &str) -> serde_json::Value {
    let mut inv = fixture("invoice");
    inv["id"] = json!(id);
    inv["billing_reason"] = json!("subscription_update");
    let template = inv["lines"]["data"][0].clone();
    let line = |product: &str, amount: i64, q: u64| {
        let mut l = template.clone();
        l["amount"] = json!(amount);
        l["quantity"] = json!(q);
        l["period"] = json!({"start": 1_900_000_000, "end": 1_901_000_000});
        l["pricing"] = json!({"type": "price_details", "unit_amount_decimal": null,
            "price_details": {"price": "price_x", "product": product}});
        l["parent"] = json!({"type": "subscription_item_details", "invoice_item_details": null,
            "subscription_item_details": {"invoice_item": null, "proration": true,
            "proration_details": {"credited_items": null}, "subscription": "sub_A",
            "subscription_item": "si_1"}});
        l
    };
    inv["lines"]["data"] = json!([
        line("tally_plan_plus", -600, 1),
        line("tally_plan_generative", 2950, 1)
    ]);
    inv["amount_paid"] = json!(2350);
    inv["subtotal"] = json!(2350);
    inv["total"] = json!(2350);
    inv
}

#[tokio::test]
async fn the_live_subscription_is_read_from_stripes_items() {
    let server = MockServer::start().await;
    let mut sub = subscription_response();
    sub["items"]["data"][0]["price"]["product"] = json!("tally_plan_max");
    sub["items"]["data"][1]["quantity"] = json!(4);
    sub["items"]["data"][0]["current_period_start"] = json!(1_900_000_000);
    sub["items"]["data"][0]["current_period_end"] = json!(1_902_592_000);
    sub["schedule"] = json!("sub_sched_1");
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(sub))
        .mount(&server)
        .await;
    let live = client(&server)
        .await
        .subscription(&SubscriptionId::parse("sub_A").unwrap())
        .await
        .unwrap();
    assert_eq!(live.item("plan").unwrap().product, "tally_plan_max");
    assert_eq!(live.item("addon").unwrap().quantity, 4);
    assert_eq!(live.period_start.timestamp(), 1_900_000_000);
    assert_eq!(live.period_end.timestamp(), 1_902_592_000);
    assert_eq!(live.schedule.as_deref(), Some("sub_sched_1"));
    assert_eq!(live.status, "active");
}

/// Stripe's answers to a change billed now: the subscription before it (its latest
/// invoice an older one), and after it, with `invoice` expanded as its latest.
async fn mount_update(server: &MockServer, invoice: serde_json::Value) {
    let mut before = subscription_response();
    before["latest_invoice"] = json!("in_old");
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(before))
        .mount(server)
        .await;
    let mut after = subscription_response();
    after["latest_invoice"] = invoice;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(after))
        .mount(server)
        .await;
}

/// A change billed now, answered with the invoice Stripe made for it.
async fn prorated_update(stripe: &StripePayments) -> tally::payments::BilledInvoice {
    stripe
        .update_subscription(&tally::payments::SubscriptionChange {
            prorate_now: true,
            idempotency_key: "k".into(),
            ..tally::payments::SubscriptionChange::to(SubscriptionId::parse("sub_A").unwrap())
        })
        .await
        .unwrap()
        .expect("the change's invoice")
}

#[tokio::test]
async fn an_update_returns_the_invoice_stripe_created_for_it() {
    let server = MockServer::start().await;
    mount_update(&server, change_invoice("in_change")).await;
    let billed = prorated_update(&client(&server).await).await;
    assert_eq!(billed.id.unwrap().as_str(), "in_change");
    assert_eq!(billed.amount_paid, Cents::new(2350));
    let lines: Vec<(String, i64, bool)> = billed
        .lines
        .iter()
        .map(|l| (l.product.clone(), l.amount, l.proration))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("tally_plan_plus".into(), -600, true),
            ("tally_plan_generative".into(), 2950, true)
        ]
    );
}

/// Stripe's invoice objects carry the first lines only (`has_more`): the change's invoice
/// is the whole line list, read a page at a time after the last line's id.
#[tokio::test]
async fn an_updates_invoice_with_more_lines_than_it_carries_is_read_whole() {
    let server = MockServer::start().await;
    let whole = change_invoice("in_change");
    let mut lines = whole["lines"]["data"].as_array().unwrap().clone();
    lines[0]["id"] = json!("il_unused");
    lines[1]["id"] = json!("il_remaining");
    let mut carried = whole.clone();
    carried["lines"]["data"] = json!([lines[0].clone()]);
    carried["lines"]["has_more"] = json!(true);
    mount_update(&server, carried).await;
    let page = |data: serde_json::Value, more: bool| {
        ResponseTemplate::new(200).set_body_json(json!({"object": "list", "data": data,
            "has_more": more, "url": "/v1/invoices/in_change/lines"}))
    };
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_change/lines"))
        .and(query_param("limit", "100"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(page(json!([lines[0].clone()]), true))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_change/lines"))
        .and(query_param("limit", "100"))
        .and(query_param("starting_after", "il_unused"))
        .respond_with(page(json!([lines[1].clone()]), false))
        .mount(&server)
        .await;
    let billed = prorated_update(&client(&server).await).await;
    let read: Vec<(String, i64)> = billed
        .lines
        .iter()
        .map(|l| (l.product.clone(), l.amount))
        .collect();
    assert_eq!(
        read,
        vec![
            ("tally_plan_plus".into(), -600),
            ("tally_plan_generative".into(), 2950)
        ]
    );
    // The same list through the port, as Stripe's JSON; an invoice Stripe does not have
    // is none.
    let stripe = client(&server).await;
    let listed = stripe
        .invoice_lines(&tally::ids::InvoiceId::parse("in_change").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed, lines);
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_gone/lines"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "resource_missing",
            "message": "No such invoice: 'in_gone'"}})))
        .mount(&server)
        .await;
    assert_eq!(
        stripe
            .invoice_lines(&tally::ids::InvoiceId::parse("in_gone").unwrap())
            .await
            .unwrap(),
        None
    );
}

/// A change Stripe made and charged is answered as made even when the rest of its
/// invoice's lines cannot be read (nothing is valued on the first ones alone: the
/// invoice's event grants); a line list that says it goes on after a line without an id is
/// an error, never taken for all of the lines.
#[tokio::test]
async fn an_updates_invoice_whose_lines_cannot_be_read_is_marked_incomplete() {
    let server = MockServer::start().await;
    let mut carried = change_invoice("in_change");
    carried["status"] = json!("paid");
    let first = carried["lines"]["data"][0].clone();
    carried["lines"]["data"] = json!([first.clone()]);
    carried["lines"]["has_more"] = json!(true);
    mount_update(&server, carried).await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_change/lines"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"error": {
            "type": "api_error", "message": "An unknown error occurred"}})))
        .mount(&server)
        .await;
    let stripe = client(&server).await;
    let billed = prorated_update(&stripe).await;
    assert!(billed.paid);
    assert!(!billed.lines_complete);
    assert_eq!(billed.lines.len(), 1);

    let mut no_id = first;
    no_id.as_object_mut().unwrap().remove("id");
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_odd/lines"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "list",
            "data": [no_id], "has_more": true, "url": "/v1/invoices/in_odd/lines"})),
        )
        .mount(&server)
        .await;
    let odd = stripe
        .invoice_lines(&tally::ids::InvoiceId::parse("in_odd").unwrap())
        .await;
    assert!(matches!(odd, Err(ref e) if e.is_retryable()), "{odd:?}");
}

#[tokio::test]
async fn a_change_at_renewal_is_a_two_phase_schedule_and_cancelling_it_releases_it() {
    use tally::payments::{ItemPrice, RenewalChange};
    let server = MockServer::start().await;
    let mut sub = subscription_response();
    sub["items"]["data"][0]["current_period_start"] = json!(1_900_000_000);
    sub["items"]["data"][0]["current_period_end"] = json!(1_902_592_000);
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(sub.clone()))
        .mount(&server)
        .await;
    let mut schedule = fixture("subscription_schedule");
    schedule["id"] = json!("sub_sched_1");
    Mock::given(method("POST"))
        .and(path("/v1/subscription_schedules"))
        .respond_with(ResponseTemplate::new(200).set_body_json(schedule.clone()))
        .mount(&server)
        .await;
    for p in [
        "/v1/subscription_schedules/sub_sched_1",
        "/v1/subscription_schedules/sub_sched_1/release",
    ] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(schedule.clone()))
            .mount(&server)
            .await;
    }
    for p in ["/v1/products", "/v1/subscriptions/sub_A"] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(if p.contains("products") {
                    fixture("product")
                } else {
                    sub.clone()
                }),
            )
            .mount(&server)
            .await;
    }
    let price = |product: &str, amount| ItemPrice {
        product: product.into(),
        product_name: "n".into(),
        unit_amount: Cents::new(amount),
        interval: Interval::Monthly,
    };
    let c = client(&server).await;
    c.schedule_renewal_change(&RenewalChange {
        subscription: SubscriptionId::parse("sub_A").unwrap(),
        plan: price("tally_plan_plus", 1200),
        addons: (2, price("tally_addon_individual", 1000)),
        metadata: [("scheduled_plan", "plus")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        next_metadata: [("plan", "plus")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        idempotency_key: "k".into(),
    })
    .await
    .unwrap();
    let requests = server.received_requests().await.unwrap();
    let phases = requests
        .iter()
        .find(|r| r.url.path() == "/v1/subscription_schedules/sub_sched_1")
        .unwrap();
    let f = form(phases);
    assert_eq!(f["end_behavior"], "release");
    assert_eq!(f["proration_behavior"], "none");
    // Today's items stay at today's amounts until the period ends.
    assert_eq!(f["phases[0][items][0][price_data][unit_amount]"], "2000");
    assert_eq!(f["phases[1][metadata][plan]"], "plus");
    assert_eq!(f["phases[0][start_date]"], "1900000000");
    assert_eq!(f["phases[0][end_date]"], "1902592000");
    assert_eq!(
        f["phases[1][items][0][price_data][product]"],
        "tally_plan_plus"
    );
    assert_eq!(f["phases[1][items][0][price_data][unit_amount]"], "1200");
    assert_eq!(
        f["phases[1][items][1][price_data][product]"],
        "tally_addon_individual"
    );
    assert_eq!(f["phases[1][items][1][quantity]"], "2");
    let created = requests
        .iter()
        .find(|r| r.url.path() == "/v1/subscription_schedules")
        .unwrap();
    assert_eq!(form(created)["from_subscription"], "sub_A");

    // With the schedule in place, cancelling the change releases it.
    let mut scheduled = sub.clone();
    scheduled["schedule"] = json!("sub_sched_1");
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(scheduled.clone()))
        .mount(&server)
        .await;
    for (p, body) in [
        ("/v1/subscription_schedules/sub_sched_1/release", schedule),
        ("/v1/subscriptions/sub_A", scheduled),
    ] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
    }
    c.cancel_renewal_change(&SubscriptionId::parse("sub_A").unwrap(), "k2")
        .await
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    let release = requests
        .iter()
        .find(|r| r.url.path().ends_with("/release"))
        .expect("released");
    assert_eq!(header(release, "idempotency-key"), "k2");
    let cleared = requests
        .iter()
        .find(|r| r.method.as_str() == "POST" && r.url.path() == "/v1/subscriptions/sub_A")
        .unwrap();
    assert_eq!(form(cleared)["metadata[scheduled_plan]"], "");
}

#[tokio::test]
async fn a_preview_asks_stripe_for_the_invoice_the_change_would_create() {
    use tally::payments::{ItemPrice, SubscriptionChange};
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_response()))
        .mount(&server)
        .await;
    let mut preview = change_invoice("in_x");
    preview["id"] = serde_json::Value::Null;
    Mock::given(method("POST"))
        .and(path("/v1/invoices/create_preview"))
        .respond_with(ResponseTemplate::new(200).set_body_json(preview))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/products"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("product")))
        .mount(&server)
        .await;
    let billed = client(&server)
        .await
        .preview_change(&SubscriptionChange {
            plan: Some(ItemPrice {
                product: "tally_plan_generative".into(),
                product_name: "n".into(),
                unit_amount: Cents::new(5900),
                interval: Interval::Monthly,
            }),
            prorate_now: true,
            ..SubscriptionChange::to(SubscriptionId::parse("sub_A").unwrap())
        })
        .await
        .unwrap();
    assert_eq!(billed.id, None);
    assert_eq!(billed.total, 2350);
    let requests = server.received_requests().await.unwrap();
    let p = requests
        .iter()
        .find(|r| r.url.path() == "/v1/invoices/create_preview")
        .unwrap();
    let f = form(p);
    assert_eq!(f["subscription"], "sub_A");
    assert_eq!(
        f["subscription_details[proration_behavior]"],
        "always_invoice"
    );
    assert_eq!(
        f["subscription_details[items][0][price_data][product]"],
        "tally_plan_generative"
    );
    // Nothing changes: no subscription update was sent.
    assert!(
        !requests
            .iter()
            .any(|r| r.method.as_str() == "POST" && r.url.path() == "/v1/subscriptions/sub_A")
    );
}

#[tokio::test]
async fn a_receipt_invoice_is_paid_out_of_band_and_never_charges() {
    use tally::payments::PaidInvoice;
    let server = MockServer::start().await;
    let mut invoice = fixture("invoice");
    invoice["id"] = json!("in_receipt");
    invoice["hosted_invoice_url"] = json!("https://invoice.stripe.com/i/in_receipt");
    for p in [
        "/v1/invoices",
        "/v1/invoices/in_receipt/finalize",
        "/v1/invoices/in_receipt/pay",
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
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_T");
    customer["balance"] = json!(0);
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_T"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer.clone()))
        .mount(&server)
        .await;
    let receipt = PaidInvoice {
        workspace: WorkspaceId::parse("org_t").unwrap(),
        customer: CustomerId::parse("cus_T").unwrap(),
        lines: vec![("Auto top-up: pack_100".into(), 1100)],
        description: "Auto top-up, paid by pi_T".into(),
        metadata: BTreeMap::from([
            ("kind".to_owned(), "top_up".to_owned()),
            ("payment_intent".to_owned(), "pi_T".to_owned()),
        ]),
        idempotency_key: "tally-topup-org_t-7-receipt".into(),
    };
    let link = client(&server).await.paid_invoice(&receipt).await.unwrap();
    assert_eq!(link.id.as_str(), "in_receipt");
    let all = server.received_requests().await.unwrap();
    assert_eq!(
        all[0].url.path(),
        "/v1/customers/cus_T",
        "the balance is read first"
    );
    let reqs = &all[1..];
    let paths: Vec<&str> = reqs.iter().map(|r| r.url.path()).collect();
    assert_eq!(
        paths,
        vec![
            "/v1/invoices",
            "/v1/invoiceitems",
            "/v1/invoices/in_receipt/finalize",
            "/v1/invoices/in_receipt/pay"
        ],
        "no payment intent, no charge"
    );
    assert_eq!(
        form(&reqs[0]),
        expected(&[
            ("customer", "cus_T"),
            ("collection_method", "charge_automatically"),
            ("auto_advance", "false"),
            ("pending_invoice_items_behavior", "exclude"),
            ("description", "Auto top-up, paid by pi_T"),
            ("metadata[org_id]", "org_t"),
            ("metadata[kind]", "top_up"),
            ("metadata[payment_intent]", "pi_T"),
        ])
    );
    assert_eq!(
        form(&reqs[1]),
        expected(&[
            ("customer", "cus_T"),
            ("invoice", "in_receipt"),
            ("amount", "1100"),
            ("currency", "usd"),
            ("description", "Auto top-up: pack_100")
        ])
    );
    assert_eq!(form(&reqs[3]), expected(&[("paid_out_of_band", "true")]));
    let keys: Vec<&str> = reqs.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys,
        vec![
            "tally-topup-org_t-7-receipt-invoice",
            "tally-topup-org_t-7-receipt-item-0",
            "tally-topup-org_t-7-receipt-finalize",
            "tally-topup-org_t-7-receipt-pay"
        ]
    );
    // A customer with a balance: an invoice would apply it, so none is made.
    let owed = MockServer::start().await;
    customer["balance"] = json!(-500);
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_T"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer))
        .mount(&owed)
        .await;
    let refused = client(&owed).await.paid_invoice(&receipt).await;
    assert!(
        matches!(&refused, Err(PaymentsError::Refused { message, .. }) if message.contains("balance")),
        "{refused:?}"
    );
    assert_eq!(owed.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_reissue_corrects_the_customer_credit_notes_the_original_out_of_band_and_replaces_it() {
    use tally::payments::{Address, BillingDetails, Reissue};
    let server = MockServer::start().await;
    let mut original = fixture("invoice");
    original["id"] = json!("in_orig");
    original["status"] = json!("paid");
    original["number"] = json!("A-0001");
    // Paid with 328 cents of tax on top of its one line.
    original["amount_paid"] = json!(4428);
    original["lines"]["data"][0]["amount"] = json!(4100);
    original["lines"]["data"][0]["description"] = json!("1 × 500 credits");
    let mut replacement = fixture("invoice");
    replacement["id"] = json!("in_new");
    replacement["hosted_invoice_url"] = json!("https://invoice.stripe.com/i/in_new");
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_orig"))
        .respond_with(ResponseTemplate::new(200).set_body_json(original))
        .mount(&server)
        .await;
    let mut customer = fixture("customer");
    customer["balance"] = json!(0);
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_R"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer))
        .mount(&server)
        .await;
    for (p, body) in [
        ("/v1/customers/cus_R", fixture("customer")),
        (
            "/v1/credit_notes",
            json!({"id": "cn_1", "object": "credit_note"}),
        ),
        ("/v1/invoices", replacement.clone()),
        (
            "/v1/invoiceitems",
            json!({"id": "ii_1", "object": "invoiceitem"}),
        ),
        ("/v1/invoices/in_new/finalize", replacement.clone()),
        ("/v1/invoices/in_new/pay", replacement.clone()),
    ] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
    }
    let made = client(&server)
        .await
        .reissue_invoice(&Reissue {
            workspace: WorkspaceId::parse("org_r").unwrap(),
            customer: CustomerId::parse("cus_R").unwrap(),
            invoice: "in_orig".parse().unwrap(),
            staff: "staff_1".into(),
            details: BillingDetails {
                name: Some("Acme GmbH".into()),
                email: None,
                address: Some(Address {
                    line1: "Hauptstr. 1".into(),
                    country: "DE".into(),
                    ..Address::default()
                }),
            },
            idempotency_key: "tally-reissue-in_orig-k".into(),
        })
        .await
        .unwrap();
    assert_eq!(made.replacement.id.as_str(), "in_new");
    assert_eq!(made.credit_note, "cn_1");
    let reqs = server.received_requests().await.unwrap();
    let calls: Vec<(String, &str)> = reqs
        .iter()
        .map(|r| (r.method.to_string(), r.url.path()))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("GET".to_string(), "/v1/customers/cus_R"),
            ("POST".to_string(), "/v1/customers/cus_R"),
            ("GET".to_string(), "/v1/invoices/in_orig"),
            ("POST".to_string(), "/v1/credit_notes"),
            ("GET".to_string(), "/v1/customers/cus_R"),
            ("POST".to_string(), "/v1/invoices"),
            ("POST".to_string(), "/v1/invoiceitems"),
            ("POST".to_string(), "/v1/invoiceitems"),
            ("POST".to_string(), "/v1/invoices/in_new/finalize"),
            ("POST".to_string(), "/v1/invoices/in_new/pay"),
        ],
        "no charge anywhere"
    );
    // The corrected address replaces the old one whole: the parts not given are emptied.
    assert_eq!(
        form(&reqs[1]),
        expected(&[
            ("name", "Acme GmbH"),
            ("address[line1]", "Hauptstr. 1"),
            ("address[line2]", ""),
            ("address[city]", ""),
            ("address[postal_code]", ""),
            ("address[state]", ""),
            ("address[country]", "DE"),
        ])
    );
    let note = form(&reqs[3]);
    assert_eq!(note["invoice"], "in_orig");
    assert_eq!(note["out_of_band_amount"], "4428");
    assert_eq!(note["lines[0][type]"], "custom_line_item");
    assert_eq!(note["lines[0][unit_amount]"], "4428");
    let inv = form(&reqs[5]);
    assert_eq!(inv["metadata[kind]"], "reissue");
    assert_eq!(inv["metadata[reissue_of]"], "in_orig");
    assert_eq!(inv["metadata[reissued_by]"], "staff_1");
    assert_eq!(inv["description"], "Corrected invoice replacing A-0001");
    // The replacement totals what was paid: the line, then the tax.
    assert_eq!(form(&reqs[6])["amount"], "4100");
    assert_eq!(form(&reqs[7])["amount"], "328");
    assert_eq!(form(&reqs[7])["description"], "Tax and adjustments");
    assert_eq!(form(&reqs[9]), expected(&[("paid_out_of_band", "true")]));
}

#[tokio::test]
async fn charges_are_listed_by_creation_range_a_page_at_a_time() {
    let server = MockServer::start().await;
    let mut paid = fixture("charge");
    paid["id"] = json!("ch_paid");
    paid["payment_intent"] = json!("pi_paid");
    paid["customer"] = json!("cus_paid");
    paid["metadata"] = json!({"org_id": "acme"});
    paid["amount"] = json!(1500);
    paid["created"] = json!(1_795_000_100);
    let mut failed = fixture("charge");
    failed["id"] = json!("ch_failed");
    failed["paid"] = json!(false);
    failed["status"] = json!("failed");
    failed["created"] = json!(1_795_000_000);
    Mock::given(method("GET"))
        .and(path("/v1/charges"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "url": "/v1/charges", "has_more": true, "data": [paid, failed]}),
        ))
        .mount(&server)
        .await;
    let from = chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap();
    let to = chrono::DateTime::from_timestamp(1_795_086_400, 0).unwrap();
    let after: tally::ids::ChargeId = "ch_prev".parse().unwrap();
    let page = client(&server)
        .await
        .charges_between(from, to, Some(&after))
        .await
        .unwrap();
    assert!(page.has_more);
    assert_eq!(page.charges.len(), 2);
    let c = &page.charges[0];
    assert_eq!(c.id.as_str(), "ch_paid");
    assert!(c.succeeded);
    assert_eq!(c.amount, Cents::new(1500));
    assert_eq!(
        c.payment_intent.as_ref().map(|p| p.as_str()),
        Some("pi_paid")
    );
    assert_eq!(c.workspace, Some(WorkspaceId::parse("acme").unwrap()));
    assert!(!page.charges[1].succeeded);
    let req = &server.received_requests().await.unwrap()[0];
    let query: BTreeMap<String, String> = req.url.query_pairs().into_owned().collect();
    assert_eq!(
        query,
        expected(&[
            ("created[gte]", "1795000000"),
            ("created[lt]", "1795086400"),
            ("limit", "100"),
            ("starting_after", "ch_prev"),
        ])
    );
    assert_eq!(header(req, "authorization"), format!("Bearer {KEY}"));
}

/// A Stripe that does not answer in time is a failure that may pass (retried under the same
/// idempotency key), not a request that runs until the function's own timeout.
#[tokio::test]
async fn a_request_stripe_does_not_answer_in_time_fails_as_retryable() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(fixture("customer"))
                .set_delay(std::time::Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let slow = StripePayments::with_timeout(
        KEY,
        Some(&format!("{}/", server.uri())),
        std::time::Duration::from_millis(200),
    )
    .unwrap();
    let e = slow
        .create_customer(
            &WorkspaceId::parse("org_a").unwrap(),
            None,
            "tally-customer-slow",
        )
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
}
