//! stripe-webhook: `POST /webhooks/stripe`. Verifies the `Stripe-Signature` header on the
//! raw body bytes (any of the configured secrets, so secrets can rotate; any `v1=`
//! signature; 300 s tolerance; constant-time comparison), then queues the untouched body on
//! the billing FIFO queue (group: the Stripe customer, or the payment for events that name
//! none; deduplication: the event id) and
//! answers at once. It writes nothing to the ledger.

pub mod signature;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use signature::{HeaderError, SignatureHeader};
use std::sync::Arc;
use tally::clock::Clock;
use tally::http::{ApiBytes, Problem, ProblemDetails};
use tally::queue::{Message, Queue};
use utoipa::OpenApi;

/// Largest delivery accepted (SQS's message limit).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct WebhookState {
    /// Signing secrets (`whsec_...`); more than one while a secret is being rotated.
    pub secrets: Arc<Vec<String>>,
    pub queue: Arc<dyn Queue>,
    /// Signature timestamps are checked against this clock.
    pub clock: Arc<dyn Clock>,
}

impl WebhookState {
    /// Secrets from a comma-separated list, e.g. `STRIPE_WEBHOOK_SECRET`.
    pub fn parse_secrets(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

pub fn routes(state: WebhookState) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_EVENT_BYTES))
        .with_state(state)
}

/// The function as Lambda serves it.
pub fn router(state: WebhookState) -> Router {
    tally::http::finish(routes(state).merge(tally::http::service_routes(openapi)))
}

#[derive(OpenApi)]
#[openapi(info(title = "Tally Stripe webhook", version = "1"), paths(receive))]
pub struct ApiDoc;

/// The document `GET /openapi.json` serves.
pub fn openapi() -> Value {
    tally::http::contract::document(ApiDoc::openapi())
}

fn invalid(detail: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_signature", detail)
}

/// Checks the signature against every secret; `Ok` means the body is authentic. The header
/// is read first: a timestamp that is missing, unreadable or outside the tolerance is
/// refused before any signature is computed. Then one HMAC per secret, each compared in
/// constant time with every `v1` signature.
pub fn verify(payload: &str, header: &str, secrets: &[String], now: i64) -> Result<(), Problem> {
    let parsed = SignatureHeader::parse(header).map_err(|e| invalid(&e.to_string()))?;
    if !parsed.is_fresh(now) {
        return Err(invalid(&HeaderError::Stale.to_string()));
    }
    if secrets
        .iter()
        .any(|secret| signature::signed_by(secret, parsed.t, payload, &parsed.v1))
    {
        Ok(())
    } else {
        Err(invalid("no signature matches this payload"))
    }
}

/// What the webhook reads of an event: its id, its type and the Stripe customer it is
/// about. Everything else is skipped unread; the body is queued as it came. (The strings
/// are copied: serde borrows only fields typed exactly `Cow<str>`.)
#[derive(Debug, serde::Deserialize)]
struct EventHead<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<DataHead<'a>>,
}

#[derive(Debug, serde::Deserialize)]
struct DataHead<'a> {
    #[serde(borrow)]
    object: Option<ObjectHead<'a>>,
}

#[derive(Debug, serde::Deserialize)]
struct ObjectHead<'a> {
    #[serde(borrow)]
    object: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    customer: Option<CustomerRef>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum CustomerRef {
    Id(String),
    Expanded { id: String },
    Other(serde::de::IgnoredAny),
}

/// The event id (`evt_...`), type and customer of a signed payload. The fields are read
/// straight from the text; a body of an unusual shape (a field of another type than
/// Stripe's) is read the slow way, as any JSON, so nothing genuine is refused for it.
pub fn read_event(payload: &str) -> Result<(String, String, Option<String>), Problem> {
    if !payload.trim_start().starts_with('{') {
        return Err(Problem::malformed("signed payload is not a JSON object"));
    }
    let (id, kind, customer) = match serde_json::from_str::<EventHead<'_>>(payload) {
        Ok(head) => {
            let customer = head.data.and_then(|d| d.object).and_then(|o| {
                if o.object.as_deref() == Some("customer") {
                    return o.id.map(|i| i.into_owned());
                }
                match o.customer {
                    Some(CustomerRef::Id(s)) => Some(s),
                    Some(CustomerRef::Expanded { id }) => Some(id),
                    _ => None,
                }
            });
            (
                head.id.map(|i| i.into_owned()),
                head.kind.map(|k| k.into_owned()),
                customer,
            )
        }
        Err(_) => {
            let event: Value = serde_json::from_str(payload)
                .map_err(|e| Problem::malformed(format!("signed payload is not JSON: {e}")))?;
            (
                event["id"].as_str().map(str::to_owned),
                event["type"].as_str().map(str::to_owned),
                customer_of(&event),
            )
        }
    };
    let id = id
        .filter(|id| id.starts_with("evt_"))
        .ok_or_else(|| Problem::malformed("signed payload has no event id"))?;
    Ok((id, kind.unwrap_or_default(), customer))
}

/// The Stripe customer an event read as any JSON is about.
fn customer_of(event: &Value) -> Option<String> {
    let object = &event["data"]["object"];
    if object["object"] == "customer" {
        return object["id"].as_str().map(str::to_owned);
    }
    match &object["customer"] {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// The FIFO group of an event whose object names no customer (refunds, disputes, invoice
/// payments): the payment it is about, so one such event that cannot be processed yet holds
/// back only the events of its own payment, not every workspace's refunds and disputes.
pub fn payment_group(payload: &str) -> String {
    let event: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
    let object = &event["data"]["object"];
    let id_of = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    };
    [
        ("charge", &object["charge"]),
        ("payment", &object["payment_intent"]),
        ("invoice", &object["invoice"]),
        ("object", &object["id"]),
    ]
    .into_iter()
    .find_map(|(kind, v)| id_of(v).map(|id| format!("{kind}-{id}")))
    .unwrap_or_else(|| "no-customer".into())
}

/// What the webhook answers a queued delivery.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // documents the answer `receive` builds with `json!`
pub struct Received {
    pub received: bool,
    /// The Stripe event id.
    pub id: String,
}

#[utoipa::path(post, path = "/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature: t=<unix seconds>,v1=<hex HMAC-SHA256>")),
    request_body(content = serde_json::Value, content_type = "application/json", description = "A Stripe event, exactly as Stripe sent it (at most 256 KiB)"),
    responses((status = 200, description = "Queued", body = Received),
        (status = 400, description = "Signature missing, stale or not matching; or the signed body is not an event", body = ProblemDetails),
        (status = 413, body = ProblemDetails), (status = 415, body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Receives a Stripe event delivery.
pub async fn receive(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<axum::Json<Value>, Problem> {
    if !tally::http::problem::is_json(&headers) {
        return Err(tally::http::problem::unsupported_media_type());
    }
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| invalid("missing Stripe-Signature header"))?;
    let payload =
        std::str::from_utf8(&body).map_err(|_| invalid("the payload is not UTF-8 text"))?;
    verify(
        payload,
        header,
        &state.secrets,
        state.clock.now().timestamp(),
    )?;
    let (id, kind, customer) = read_event(payload)?;
    let group = customer.unwrap_or_else(|| payment_group(payload));
    state
        .queue
        .send(Message {
            body: queueable(payload),
            group_id: Some(group.clone()),
            dedup_id: Some(id.clone()),
        })
        .await
        .map_err(|e| {
            tracing::error!(event = %id, error = %e, "could not queue a Stripe event");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "could not queue the event; Stripe will deliver it again",
            )
        })?;
    tracing::info!(event = %id, kind = %kind, customer = %group, "Stripe event queued");
    Ok(axum::Json(json!({"received": true, "id": id})))
}

/// The event as SQS takes it: SQS refuses a message containing U+FFFE or U+FFFF (the only
/// characters outside its set that UTF-8 JSON can hold, and only inside strings), so those
/// are written as JSON escapes, which read back as the same event. Anything else is queued
/// byte for byte (the consumer does not check the signature again).
fn queueable(payload: &str) -> String {
    if !payload.contains(['\u{FFFE}', '\u{FFFF}']) {
        return payload.to_owned();
    }
    payload
        .replace('\u{FFFE}', "\\ufffe")
        .replace('\u{FFFF}', "\\uffff")
}

#[cfg(test)]
mod tests;
