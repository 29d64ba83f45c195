//! HTTP plumbing every HTTP function shares: identity from JWT claims, RFC 9457 problem
//! details, a JSON extractor whose refusals are problem details, request fingerprints, and
//! the `/health` and `/openapi.json` routes.

pub mod auth;
pub mod contract;
pub mod idempotency;
pub mod problem;
pub mod service;
pub mod text;

pub use auth::{AuthMode, Identity, Role};
pub use problem::{
    ApiBytes, ApiJson, ApiPath, ApiQuery, NoBody, Problem, ProblemDetails, no_body, optional_json,
};
pub use service::{BearerAuth, service_routes};

use axum::Router;
use axum::http::HeaderMap;

use crate::ids::IdempotencyKey;

/// Largest request body accepted by any route.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A page size from a `limit` query parameter: 1 to 100, `default` when absent.
pub fn page_limit(limit: Option<i64>, default: usize) -> Result<usize, Problem> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n as usize),
        Some(_) => Err(Problem::validation("limit", "must be between 1 and 100")),
    }
}

/// The `Idempotency-Key` header as a route-scoped key, if the client sent one.
pub fn idempotency_key(
    headers: &HeaderMap,
    scope: &str,
) -> Result<Option<IdempotencyKey>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Problem::validation("Idempotency-Key", "must be visible ASCII"))?;
    IdempotencyKey::client(scope, text)
        .map(Some)
        .map_err(|e| Problem::validation("Idempotency-Key", &e.to_string()))
}

/// Adds what every HTTP function answers the same way: body-size limit and problem+json
/// for unknown routes.
pub fn finish(router: Router) -> Router {
    router
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}
