//! RFC 9457 problem details with a stable `code`, and the one mapping from internal errors
//! to HTTP statuses.

use crate::ledger::LedgerError;
use crate::service::ServiceError;
use axum::extract::rejection::JsonRejection;
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
            "something went wrong on our side; nothing was changed",
        )
    }
    pub fn with_facts(mut self, facts: serde_json::Value) -> Self {
        self.facts = Some(Box::new(facts));
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
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
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
            LedgerError::GenerationNotFound(_) => Problem::not_found(e.to_string()),
            LedgerError::GenerationExists(_) | LedgerError::AlreadySettled { .. } => {
                Problem::conflict(e.to_string())
            }
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
                "the workspace is busy; retry with the same Idempotency-Key",
            ),
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

/// `Json<T>` whose refusals are problem details: malformed JSON is a 400
/// `malformed_request`, well-formed JSON of the wrong shape is a 422 `validation_failed`.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                e.body_text(),
            )),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(Problem::malformed(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(e)) => Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.body_text(),
            )),
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

/// Parses an optional JSON body: empty means `T::default()`; malformed JSON is a 400,
/// JSON of the wrong shape a 422.
pub fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            e.to_string(),
        ),
        _ => Problem::malformed(e.to_string()),
    })
}
