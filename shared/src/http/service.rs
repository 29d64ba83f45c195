//! What every HTTP function serves the same way besides its own routes: `/health`,
//! `/openapi.json`, and the bearer-token security scheme its OpenAPI document declares.
//!
//! It lives here, not in one of the functions, so no function crate has to depend on
//! another to serve them.

use axum::Router;
use axum::routing::get;
use std::sync::{Arc, OnceLock};
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// `GET /health` and `GET /openapi.json` (serving the document `doc` builds, as
/// [`super::contract::document`] completes it). The document is built on its first request,
/// not when the function starts: a cold start does not pay for it.
pub fn service_routes(doc: impl Fn() -> serde_json::Value + Send + Sync + 'static) -> Router {
    let built = Arc::new(OnceLock::new());
    let doc = Arc::new(doc);
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/openapi.json",
            get(move || {
                let (built, doc) = (built.clone(), doc.clone());
                async move { axum::Json(built.get_or_init(|| doc()).clone()) }
            }),
        )
}

/// OpenAPI modifier declaring the `bearer` security scheme (a JWT in the `Authorization`
/// header) that operations refer to with `security(("bearer" = []))`.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}
