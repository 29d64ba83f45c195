//! credits-api: balance, cost estimates, generation holds (reserve, complete, fail),
//! creation history, the ledger journal, entitlements and support adjustments.
//!
//! [`public_routes`] and [`protected_routes`] are the function's routes without
//! authentication; [`router`] is what the Lambda serves (protected routes behind the
//! identity layer, plus `/health` and `/openapi.json`). The local runner merges the routes
//! of every function behind one identity layer. The handlers and their request and
//! response bodies live in [`routes`], one file per resource.

pub mod contract;
pub mod routes;

use axum::Router;
use axum::routing::{get, post};
use routes::{
    adjustments, admin, balance, catalog, entitlements, estimates, generations, ledger, reports,
};
use tally::http::{AuthMode, BearerAuth, auth::authenticate, service_routes};
use tally::service::Ledger;
use utoipa::OpenApi;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
    /// The ledger staff corrections run on: the same store, with an observer that only
    /// alerts. A staff debit (often taking back credits whose money went back) is no
    /// reason to charge the customer's card.
    pub staff_ledger: Ledger,
    /// Billing documents: whether a workspace has a billing profile.
    pub docs: std::sync::Arc<dyn tally::store::DocStore>,
    /// How large (and how long to build) a CSV export may be, built whole before it is
    /// sent; `None` streams exports of any size. Behind API Gateway a Lambda answer is one
    /// buffer of at most 6 MB ([`LAMBDA_EXPORT_LIMIT`]).
    pub export_limit: Option<ExportLimit>,
}

/// The limits of an export answered in one piece. A range past either is refused with
/// `export_too_large` (ask for shorter ones) before anything is sent.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimit {
    /// The answer's size as the Lambda response carries it: the CSV as a JSON string.
    pub bytes: usize,
    /// Time to read and write it, well inside the function's timeout.
    pub time: std::time::Duration,
}

/// What a Lambda function answers: API Gateway takes at most 6 MB, headers included, and
/// the function has 10 s.
pub const LAMBDA_EXPORT_LIMIT: ExportLimit = ExportLimit {
    bytes: 5_000_000,
    time: std::time::Duration::from_secs(6),
};

/// Routes anyone may call.
pub fn public_routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/catalog", get(catalog::catalog))
        .with_state(state)
}

/// Routes that need an identity (added by the layer in [`router`] or the local runner).
pub fn protected_routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/balance", get(balance::balance))
        .route("/v1/estimates", post(estimates::estimate))
        .route(
            "/v1/generations",
            post(generations::start_generation).get(generations::list_generations),
        )
        .route("/v1/generations/export", get(reports::export_generations))
        .route("/v1/generations/{id}", get(generations::get_generation))
        .route(
            "/v1/generations/{id}/complete",
            post(generations::complete_generation),
        )
        .route(
            "/v1/generations/{id}/fail",
            post(generations::fail_generation),
        )
        .route(
            "/v1/generations/{id}/reverse",
            post(generations::reverse_generation),
        )
        .route(
            "/v1/generations/{id}/retire-model",
            post(entitlements::retire_model),
        )
        .route("/v1/ledger", get(ledger::ledger))
        .route("/v1/ledger/export", get(reports::export_ledger))
        .route("/v1/usage", get(reports::usage_report))
        .route("/v1/entitlements", get(entitlements::entitlements))
        .route(
            "/v1/admin/workspaces/{workspace_id}/adjustments",
            post(adjustments::adjust),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/balance",
            get(admin::balance),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/ledger",
            get(admin::ledger),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/ledger/export",
            get(admin::export_ledger),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/generations",
            get(admin::generations),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/generations/export",
            get(admin::export_generations),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/generations/{id}",
            get(admin::generation),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/usage",
            get(admin::usage),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/audit",
            get(admin::audit),
        )
        .with_state(state)
}

/// The whole function as Lambda serves it.
pub fn router(state: AppState, auth: AuthMode) -> Router {
    let protected = protected_routes(state.clone())
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    let catalog = state.ledger.catalog.clone();
    tally::http::finish(
        public_routes(state)
            .merge(protected)
            .merge(service_routes(move || contract::openapi(&catalog))),
    )
}

/// The OpenAPI 3.1 document of this function, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tally credits API", version = "1", description = "Credits: balance, estimates, generation charges, history and ledger."),
    paths(
        catalog::catalog,
        balance::balance,
        estimates::estimate,
        generations::start_generation,
        generations::list_generations,
        generations::get_generation,
        generations::complete_generation,
        generations::fail_generation,
        generations::reverse_generation,
        ledger::ledger,
        entitlements::entitlements,
        entitlements::retire_model,
        adjustments::adjust,
        reports::usage_report,
        reports::export_generations,
        reports::export_ledger,
        admin::balance,
        admin::ledger,
        admin::generations,
        admin::generation,
        admin::usage,
        admin::export_generations,
        admin::export_ledger,
        admin::audit,
    ),
    modifiers(&BearerAuth),
    tags((name = "credits", description = "Spending and reading credits"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;

#[cfg(test)]
mod lambda_events;
