//! The purchases function as Lambda runs it, fed the API Gateway events of
//! `events/purchases/`. It pays through the local runner's simulator, which is why these
//! tests live here rather than in the function's own crate.

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use purchases::{PurchasesState, ReturnUrls, router};
use serde_json::Value;
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::OffsetClock;
use tally::http::AuthMode;
use tally::service::Ledger;
use tally::store::embedded::EmbeddedStore;
use tally_local::simulator::Simulator;
use tower::ServiceExt;

fn app() -> Router {
    let store = Arc::new(EmbeddedStore::in_memory());
    let clock = Arc::new(OffsetClock::new());
    let ledger = Ledger::new(store.clone(), clock.clone(), Arc::new(Catalog::builtin()));
    let state = PurchasesState {
        ledger,
        docs: store,
        payments: Simulator::new("https://pay.example", "whsec_x", Router::new(), clock, None),
        urls: ReturnUrls::new("https://studio.example", &Default::default()),
    };
    router(state, AuthMode::ApiGateway)
}

async fn invoke(app: &Router, file: &str) -> (u16, Value) {
    let path = format!("{}/../events/purchases/{file}", env!("CARGO_MANIFEST_DIR"));
    let req = lambda_http::request::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let res = app
        .clone()
        .oneshot(req.map(|b| Body::from(b.as_ref().to_vec())))
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
async fn the_owner_events_open_checkouts_and_repeat_with_the_same_key() {
    let app = app();
    let (status, first) = invoke(&app, "post-checkout-pack.json").await;
    assert_eq!(status, 201, "{first}");
    assert!(
        first["url"]
            .as_str()
            .unwrap()
            .starts_with("https://pay.example/sim/checkout/cs_")
    );
    let (_, again) = invoke(&app, "post-checkout-pack.json").await;
    assert_eq!(
        again["id"], first["id"],
        "same Idempotency-Key, same session"
    );
    let (status, plan) = invoke(&app, "post-checkout-plan.json").await;
    assert_eq!(status, 201, "{plan}");
    let (status, sub) = invoke(&app, "get-subscription.json").await;
    assert_eq!(status, 200);
    assert!(sub["subscription"].is_null());
    assert!(sub["customer"].as_str().unwrap().starts_with("cus_"));
    let (status, inv) = invoke(&app, "get-invoices.json").await;
    assert_eq!(
        (status, inv["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, portal) = invoke(&app, "post-billing-portal.json").await;
    assert_eq!(status, 201, "{portal}");
}

#[tokio::test]
async fn a_member_event_is_forbidden_to_buy() {
    let (status, body) = invoke(&app(), "post-checkout-member-forbidden.json").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
}
