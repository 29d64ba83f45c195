//! Deliveries signed the way Stripe signs them, built from Stripe's example objects.

use super::*;
use async_trait::async_trait;
use axum::body::Body;
use http_body_util::BodyExt;
use std::sync::Mutex;
use tally::queue::local::LocalQueue;
use tally::queue::{ConsumeError, Consumer, Delivery};
use tower::ServiceExt;

const SECRET: &str = "whsec_test_current";
const OLD_SECRET: &str = "whsec_test_previous";

struct Received(Mutex<Vec<Delivery>>);

#[async_trait]
impl Consumer for Received {
    async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
        self.0.lock().unwrap().push(d.clone());
        Ok(())
    }
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../fixtures/stripe/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("fixture");
    serde_json::from_str(&text).unwrap()
}

fn event(id: &str) -> String {
    let mut e = fixture("event.json");
    let mut session = fixture("checkout.session.json");
    session["customer"] = "cus_T4lly".into();
    e["id"] = id.into();
    e["type"] = "checkout.session.completed".into();
    e["data"]["object"] = session;
    serde_json::to_string_pretty(&e).unwrap()
}

fn header(payload: &str, secret: &str, age_s: i64) -> String {
    let t = chrono_now() - age_s;
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(t))
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Setup {
    app: Router,
    queue: Arc<LocalQueue>,
    received: Arc<Received>,
}

fn setup() -> Setup {
    let queue = LocalQueue::new("billing-events.fifo", true, 3);
    let received = Arc::new(Received(Mutex::new(Vec::new())));
    queue.start(received.clone());
    let state = WebhookState {
        secrets: Arc::new(vec![SECRET.into(), OLD_SECRET.into()]),
        queue: queue.clone(),
        clock: Arc::new(tally::clock::SystemClock),
    };
    Setup {
        app: router(state),
        queue,
        received,
    }
}

async fn deliver(s: &Setup, body: &str, signature: Option<&str>) -> (u16, Value) {
    let mut req =
        axum::http::Request::post("/webhooks/stripe").header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let res = s
        .app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
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
async fn a_signed_delivery_is_queued_byte_for_byte_by_customer_and_event_id() {
    let s = setup();
    let body = event("evt_1");
    let (status, answer) = deliver(&s, &body, Some(&header(&body, SECRET, 0))).await;
    assert_eq!((status, answer["id"].as_str()), (200, Some("evt_1")));
    s.queue.until_idle().await;
    let got = s.received.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].group_id.as_deref(), Some("cus_T4lly"));
}

/// SQS refuses a message with U+FFFE or U+FFFF in it (a cardholder's name could carry
/// one): such an event is queued with those characters as JSON escapes, the same event.
#[tokio::test]
async fn characters_sqs_refuses_are_queued_as_json_escapes_of_the_same_event() {
    let s = setup();
    let mut e: Value = serde_json::from_str(&event("evt_ffff")).unwrap();
    e["data"]["object"]["customer_details"]["name"] = "Ann\u{FFFF}Lee\u{FFFE}".into();
    let body = serde_json::to_string(&e).unwrap();
    assert!(body.contains('\u{FFFF}'), "serde_json writes it as it is");
    let (status, _) = deliver(&s, &body, Some(&header(&body, SECRET, 0))).await;
    assert_eq!(status, 200);
    s.queue.until_idle().await;
    let got = s.received.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert!(!got[0].body.contains(['\u{FFFE}', '\u{FFFF}']));
    assert_eq!(serde_json::from_str::<Value>(&got[0].body).unwrap(), e);
}

#[tokio::test]
async fn a_repeated_delivery_is_acknowledged_but_queued_once() {
    let s = setup();
    let body = event("evt_dup");
    for _ in 0..3 {
        let (status, _) = deliver(&s, &body, Some(&header(&body, SECRET, 0))).await;
        assert_eq!(status, 200);
    }
    s.queue.until_idle().await;
    assert_eq!(s.received.0.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn during_rotation_either_secret_and_any_v1_signature_is_accepted() {
    let s = setup();
    let body = event("evt_rot");
    let (status, _) = deliver(&s, &body, Some(&header(&body, OLD_SECRET, 0))).await;
    assert_eq!(status, 200);
    let body = event("evt_multi");
    let good = header(&body, SECRET, 0);
    let (t, v1) = good.split_once(',').unwrap();
    let several = format!("{t},v1={},{v1}", "0".repeat(64));
    let (status, _) = deliver(&s, &body, Some(&several)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn forged_stale_tampered_and_unsigned_deliveries_are_refused_and_queue_nothing() {
    let s = setup();
    let body = event("evt_bad");
    let cases = [
        (
            Some(header(&body, "whsec_attacker", 0)),
            "no signature matches this payload",
        ),
        (
            Some(header(&body, SECRET, 301)),
            "the signature timestamp is outside the 300 s tolerance",
        ),
        (
            Some(header(&event("evt_other"), SECRET, 0)),
            "no signature matches this payload",
        ),
        (
            Some("t=123".to_owned()),
            "the Stripe-Signature header has no v1 signature",
        ),
        (
            Some("garbage".to_owned()),
            "the Stripe-Signature header is not a list of key=value pairs",
        ),
        (None, "missing Stripe-Signature header"),
    ];
    for (sig, detail) in cases {
        let (status, p) = deliver(&s, &body, sig.as_deref()).await;
        assert_eq!(
            (status, p["code"].as_str()),
            (400, Some("invalid_signature")),
            "{p}"
        );
        assert_eq!(p["detail"], detail);
    }
    s.queue.until_idle().await;
    assert!(s.received.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_signed_body_that_is_not_an_event_is_refused() {
    let s = setup();
    let body = "{\"hello\": 1}";
    let (status, p) = deliver(&s, body, Some(&header(body, SECRET, 0))).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (400, Some("malformed_request"))
    );
    s.queue.until_idle().await;
    assert!(s.received.0.lock().unwrap().is_empty());
}

mod lambda_events {
    //! The checked-in API Gateway events, decoded by `lambda_http` as in AWS. Their
    //! signatures were made at 2026-11-21T12:00:00Z, so the clock is set there.
    use super::*;
    use chrono::TimeZone;
    use tally::clock::ManualClock;

    const SIGNED_AT: i64 = 1_795_262_400;

    async fn invoke(file: &str, at: i64) -> (u16, Value, Arc<LocalQueue>, Arc<Received>) {
        let queue = LocalQueue::new("billing-events.fifo", true, 3);
        let received = Arc::new(Received(Mutex::new(Vec::new())));
        queue.start(received.clone());
        let clock = ManualClock::new(chrono::Utc.timestamp_opt(at, 0).unwrap());
        let app = router(WebhookState {
            secrets: Arc::new(vec!["whsec_tally_dev".into()]),
            queue: queue.clone(),
            clock: Arc::new(clock),
        });
        let path = format!(
            "{}/../../events/stripe-webhook/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let req = lambda_http::request::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let res = app
            .oneshot(req.map(|b| Body::from(b.as_ref().to_vec())))
            .await
            .unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        queue.until_idle().await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            queue,
            received,
        )
    }

    #[tokio::test]
    async fn the_signed_pack_delivery_is_queued_for_its_customer() {
        let (status, body, _q, got) =
            invoke("checkout-session-completed-pack.json", SIGNED_AT + 5).await;
        assert_eq!(
            (status, body["id"].as_str()),
            (200, Some("evt_test_pack_acme"))
        );
        let got = got.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].group_id.as_deref(), Some("cus_Acme"));
    }

    #[tokio::test]
    async fn the_same_delivery_six_minutes_later_is_stale() {
        let (status, body, _q, got) =
            invoke("checkout-session-completed-pack.json", SIGNED_AT + 360).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_signature"))
        );
        assert!(got.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn forged_and_unsigned_deliveries_are_refused() {
        for file in ["forged-signature.json", "unsigned.json"] {
            let (status, body, _q, got) = invoke(file, SIGNED_AT).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (400, Some("invalid_signature")),
                "{file}"
            );
            assert!(got.0.lock().unwrap().is_empty());
        }
    }
}

#[test]
fn an_event_of_an_unusual_shape_is_read_as_any_json_and_the_customer_found_the_same_way() {
    // `data.object.id` a number: not Stripe's shape, read the slow way.
    let odd = r#"{"id":"evt_1","type":7,"data":{"object":{"id":5,"customer":"cus_1"}}}"#;
    assert_eq!(
        crate::read_event(odd).unwrap(),
        ("evt_1".into(), String::new(), Some("cus_1".into()))
    );
    let expanded = r#"{"id":"evt_2","type":"x","data":{"object":{"customer":{"id":"cus_2"}}}}"#;
    assert_eq!(
        crate::read_event(expanded).unwrap().2.as_deref(),
        Some("cus_2")
    );
    let customer = r#"{"id":"evt_3","type":"customer.updated","data":{"object":{"object":"customer","id":"cus_3"}}}"#;
    assert_eq!(
        crate::read_event(customer).unwrap().2.as_deref(),
        Some("cus_3")
    );
    let escaped = r#"{"id":"evt_\u0034","type":"a","data":{"object":{"customer":"cus_\u0035"}}}"#;
    assert_eq!(
        crate::read_event(escaped).unwrap(),
        ("evt_4".into(), "a".into(), Some("cus_5".into()))
    );
    assert!(crate::read_event(r#"["evt_1","x"]"#).is_err());
    assert!(crate::read_event(r#"{"id":"ch_1"}"#).is_err());
}

#[test]
fn events_that_name_no_customer_are_grouped_by_their_payment() {
    let refund = r#"{"id":"evt_r","type":"refund.created","data":{"object":{"object":"refund","id":"re_1","charge":"ch_1","payment_intent":"pi_1"}}}"#;
    assert_eq!(crate::read_event(refund).unwrap().2, None);
    assert_eq!(crate::payment_group(refund), "charge-ch_1");
    let dispute = r#"{"id":"evt_d","type":"charge.dispute.created","data":{"object":{"object":"dispute","id":"dp_1","charge":{"id":"ch_2"}}}}"#;
    assert_eq!(crate::payment_group(dispute), "charge-ch_2");
    let payment = r#"{"id":"evt_p","type":"invoice_payment.paid","data":{"object":{"object":"invoice_payment","id":"inpay_1","invoice":"in_1"}}}"#;
    assert_eq!(crate::payment_group(payment), "invoice-in_1");
    let bare = r#"{"id":"evt_b","type":"x","data":{"object":{"object":"thing","id":"th_1"}}}"#;
    assert_eq!(crate::payment_group(bare), "object-th_1");
    assert_eq!(
        crate::payment_group(r#"{"id":"evt_n","type":"x"}"#),
        "no-customer"
    );
}
