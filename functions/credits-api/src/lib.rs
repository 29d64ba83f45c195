//! credits-api: balance, cost estimates, generation holds (reserve, complete, fail),
//! creation history, the ledger journal, entitlements and support adjustments.
//!
//! [`routes`] is the function's routes without authentication; [`router`] is what the
//! Lambda serves (routes behind the identity layer, plus `/health` and `/openapi.json`).
//! The local runner merges [`routes`] of every function behind one identity layer.

mod handlers;
pub mod views;

use axum::Router;
use axum::routing::{get, post};
use tally::http::{AuthMode, BearerAuth, auth::authenticate, service_routes};
use tally::service::Ledger;
use utoipa::OpenApi;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
}

/// Routes anyone may call.
pub fn public_routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/catalog", get(handlers::catalog))
        .with_state(state)
}

/// Routes that need an identity (added by the layer in [`router`] or the local runner).
pub fn protected_routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/balance", get(handlers::balance))
        .route("/v1/estimates", post(handlers::estimate))
        .route(
            "/v1/generations",
            post(handlers::start_generation).get(handlers::list_generations),
        )
        .route("/v1/generations/{id}", get(handlers::get_generation))
        .route(
            "/v1/generations/{id}/complete",
            post(handlers::complete_generation),
        )
        .route("/v1/generations/{id}/fail", post(handlers::fail_generation))
        .route("/v1/ledger", get(handlers::ledger))
        .route("/v1/entitlements", get(handlers::entitlements))
        .route(
            "/v1/admin/workspaces/{workspace_id}/adjustments",
            post(handlers::adjust),
        )
        .with_state(state)
}

/// The whole function as Lambda serves it.
pub fn router(state: AppState, auth: AuthMode) -> Router {
    let protected = protected_routes(state.clone())
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    tally::http::finish(
        public_routes(state)
            .merge(protected)
            .merge(service_routes(ApiDoc::openapi())),
    )
}

/// The OpenAPI 3.1 document of this function, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tally credits API", version = "1", description = "Credits: balance, estimates, generation charges, history and ledger."),
    paths(
        handlers::catalog,
        handlers::balance,
        handlers::estimate,
        handlers::start_generation,
        handlers::list_generations,
        handlers::get_generation,
        handlers::complete_generation,
        handlers::fail_generation,
        handlers::ledger,
        handlers::entitlements,
        handlers::adjust,
    ),
    modifiers(&BearerAuth),
    tags((name = "credits", description = "Spending and reading credits"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;

#[cfg(test)]
mod lambda_events;
