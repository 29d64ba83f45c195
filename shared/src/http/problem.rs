//! RFC 9457 problem details with a stable `code`, and the one mapping from internal errors
//! to HTTP statuses.

use crate::ledger::LedgerError;
use crate::service::ServiceError;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An error answer: what went wrong, as a status and a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    /// Stable machine-readable code (see [`ProblemDetails::code`]).
    pub code: &'static str,
    pub detail: String,
    pub field: Option<String>,
    pub facts: Option<Box<serde_json::Value>>,
    /// Seconds after which a retry may succeed, sent as `Retry-After` (busy, unavailable,
    /// rate limited, a twin request still in progress).
    pub retry_after: Option<u64>,
}

/// The problem+json body (RFC 9457) every error answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProblemDetails {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// Stable machine-readable code: insufficient_credits, validation_failed, forbidden,
    /// unauthorized, not_found, conflict, invalid_signature, malformed_request, ...
    pub code: String,
    pub detail: String,
    /// The offending field for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Extra facts, e.g. `needed` and `available` for insufficient credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            field: None,
            facts: None,
            retry_after: None,
        }
    }
    pub fn validation(field: &str, detail: &str) -> Self {
        let mut p = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("{field}: {detail}"),
        );
        p.field = Some(field.to_string());
        p
    }
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side; retrying with the same Idempotency-Key is safe \
             (a request sent without one may have taken effect: check before sending it again)",
        )
    }
    pub fn with_facts(mut self, facts: serde_json::Value) -> Self {
        self.facts = Some(Box::new(facts));
        self
    }
    /// Says when a retry may succeed (`Retry-After`, at least one second).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn details(&self) -> ProblemDetails {
        ProblemDetails {
            kind: format!("urn:tally:problem:{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: self.code.to_string(),
            detail: self.detail.clone(),
            field: self.field.clone(),
            facts: self.facts.as_deref().cloned(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.details()).unwrap_or_default();
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        // Every 503 is worth retrying soon.
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        r
    }
}

impl From<LedgerError> for Problem {
    fn from(e: LedgerError) -> Self {
        match &e {
            LedgerError::InsufficientCredits { needed, available } => Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                e.to_string(),
            )
            .with_facts(serde_json::json!({"needed": needed, "available": available})),
            LedgerError::NoCustomModelSlot { slots } => {
                Problem::new(StatusCode::FORBIDDEN, "no_custom_model_slot", e.to_string())
                    .with_facts(serde_json::json!({"slots": slots}))
            }
            LedgerError::GenerationNotFound(_) | LedgerError::NotACustomModel(_) => {
                Problem::not_found(e.to_string())
            }
            LedgerError::GenerationExists(_)
            | LedgerError::ModelInTraining(_)
            | LedgerError::AlreadySettled { .. }
            | LedgerError::AlreadyReversed(_)
            | LedgerError::NotReversible { .. } => Problem::conflict(e.to_string()),
            LedgerError::Invalid(m) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                m.clone(),
            ),
            LedgerError::Corrupt(_) => {
                tracing::error!(error = %e, "ledger invariant broken");
                Problem::internal()
            }
        }
    }
}

impl From<ServiceError> for Problem {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Refused(l) => l.into(),
            ServiceError::KeyReused => {
                Problem::conflict("this Idempotency-Key was already used for a different request")
            }
            ServiceError::Contention => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the workspace is busy; retry with the same Idempotency-Key (a request sent \
                 without one may have taken effect: check before sending it again)",
            )
            .with_retry_after(1),
            // Throttling or a timeout: a write may or may not have landed, and a retry
            // finds out (the idempotency record answers it if it did).
            ServiceError::Store(s @ crate::store::StoreError::Unavailable(_)) => {
                tracing::warn!(error = %s, "store unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage is briefly unavailable and whether a write took effect is not \
                     known; retry with the same Idempotency-Key (a request sent without one \
                     may have taken effect: check before sending it again)",
                )
                .with_retry_after(1)
            }
            ServiceError::Store(s) => {
                tracing::error!(error = %s, "store failure");
                Problem::internal()
            }
        }
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        ServiceError::Store(e).into()
    }
}

/// The one media type request bodies are read as.
pub const JSON: &str = "application/json";

/// Whether the request says its body is JSON: `application/json`, with parameters
/// (`; charset=utf-8`) or not. Other JSON-based types (`application/problem+json`) are
/// not what the routes take.
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == JSON
}

/// 415 naming the accepted type.
pub fn unsupported_media_type() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("send the body as JSON with Content-Type: {JSON}"),
    )
}

/// 413 for a body over the route's limit.
pub fn payload_too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this route accepts",
    )
}

/// `Json<T>` whose refusals are problem details: a missing or wrong `Content-Type` is a 415,
/// a body over the limit a 413, malformed JSON a 400 `malformed_request`, and well-formed
/// JSON of the wrong shape a 422 `validation_failed`.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(unsupported_media_type());
        }
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        parse_json(&body).map(ApiJson)
    }
}

/// JSON from bytes: malformed is a 400, the wrong shape a 422. Numbers are read by value,
/// as JSON Schema reads them: `2.0` is the integer 2.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let Unique(mut value) =
        serde_json::from_slice(body).map_err(|e| Problem::malformed(e.to_string()))?;
    integral_numbers(&mut value);
    // The refusal names the field it is about (`duration_s`, `lines[2].amount`).
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let detail = e.inner().to_string();
        // A path made of the caller's own keys (an unknown field, say) is not named as a
        // field: only one that looks like the API's own.
        let named = field != "."
            && field.len() <= 64
            && field
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.[]".contains(&b));
        if named {
            Problem::validation(&field, &detail)
        } else {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                detail,
            )
        }
    })
}

/// A JSON value whose objects name each key once. `{"credits": 5, "credits": -9}` is
/// malformed: readers disagree on which one counts (the last one would win here, what a
/// log or a proxy shows may be the first).
struct Unique(serde_json::Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(items.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {key:?}"
                )));
            }
            let Unique(v) = map.next_value()?;
            fields.insert(key, v);
        }
        Ok(fields.into())
    }
}

/// Rewrites floats with no fractional part (and exactly representable) as integers.
fn integral_numbers(v: &mut serde_json::Value) {
    /// 2^53: every integer up to here is exact as a float.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() <= EXACT
            {
                *v = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// The raw body, refused with a 413 problem when it is over the route's limit.
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(ApiBytes(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(payload_too_large()),
            Err(e) => Err(Problem::malformed(e.body_text())),
        }
    }
}

/// `Query<T>` whose refusals are 422 `validation_failed` problem details.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation_failed",
                    e.body_text(),
                )
            })
    }
}

/// Parses an optional JSON body: empty means `T::default()`; otherwise it must say it is
/// JSON (415), and malformed JSON is a 400, JSON of the wrong shape a 422.
pub fn optional_json<T: DeserializeOwned + Default>(
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(unsupported_media_type());
    }
    parse_json(body)
}

/// The body of a route that takes none: empty, or an empty JSON object. Anything else
/// (malformed JSON, a field the route does not know) is refused as [`optional_json`]
/// refuses it, so a request meant for another route changes nothing.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// Checks that a route taking no body was sent none ([`NoBody`]).
pub fn no_body(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), Problem> {
    match optional_json::<Option<serde_json::Value>>(headers, body)? {
        None => Ok(()),
        Some(serde_json::Value::Object(fields)) if fields.is_empty() => Ok(()),
        Some(_) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "this request takes no body: send none, or {}",
        )),
    }
}

/// `Path<T>` whose refusals (a segment that is not valid UTF-8 once decoded, say) are 400
/// problem details.
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| Problem::malformed(e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn answers_a_retry_may_follow_say_when_in_retry_after_and_others_do_not() {
        let header = |p: Problem| {
            p.into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(header(ServiceError::Contention.into()), Some("1".into()));
        assert_eq!(
            header(StoreError::unavailable("throttled").into()),
            Some("1".into())
        );
        assert_eq!(header(StoreError::backend("item too large").into()), None);
        assert_eq!(header(Problem::conflict("no")), None);
        assert_eq!(
            header(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "any 503"
            )),
            Some("1".into())
        );
        assert_eq!(
            header(Problem::conflict("wait").with_retry_after(0)),
            Some("1".into()),
            "never zero"
        );
    }

    #[test]
    fn a_store_that_is_briefly_unavailable_is_a_503_and_a_broken_one_a_500() {
        let p = Problem::from(StoreError::unavailable("throttled"));
        assert_eq!(
            (p.status, p.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        let p = Problem::from(StoreError::backend("item too large"));
        assert_eq!(
            (p.status, p.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        let p = Problem::from(StoreError::decode("bad json"));
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
