//! Verifying and parsing a Stripe delivery, as the webhook does for every request: the
//! `Stripe-Signature` header read, HMAC-SHA256 over the raw body checked in constant time,
//! and the event read for what queueing needs (id, type, customer). `make bench` runs stripe-node's
//! `constructEvent` on the same delivery beside it (scripts/bench_webhook_node.js).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SECRET: &str = "whsec_bench_secret_0123456789";
const NOW: i64 = 1_795_000_000;

/// A `checkout.session.completed` delivery built from Stripe's own example objects.
pub fn delivery() -> (String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/stripe/");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{root}{name}.json")).unwrap())
            .unwrap()
    };
    let mut event = read("event");
    event["type"] = "checkout.session.completed".into();
    event["created"] = NOW.into();
    event["data"] = serde_json::json!({"object": read("checkout.session")});
    let body = event.to_string();
    let header = tally::support::forward::sign(SECRET.as_bytes(), NOW, &body);
    (body, header)
}

fn verify(c: &mut Criterion) {
    let (body, header) = delivery();
    let secrets = vec![SECRET.to_owned()];
    tally_stripe_webhook::verify(&body, &header, &secrets, NOW).expect("a valid delivery");
    let (id, kind, _) = tally_stripe_webhook::read_event(&body).unwrap();
    assert!(id.starts_with("evt_") && kind == "checkout.session.completed");
    let mut g = c.benchmark_group("webhook");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_and_parse", |b| {
        b.iter(|| {
            tally_stripe_webhook::verify(&body, &header, &secrets, NOW).unwrap();
            tally_stripe_webhook::read_event(&body).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
