//! refunds: a workspace's owner or billing admin asks for a payment of the billing history
//! back; Tally approves what its records verify (duplicate charges, renewals charged after
//! a cancellation took effect) and support staff decide the rest. Approved refunds go to
//! the refunds worker through the `refunds` FIFO queue; credits follow Stripe's refund
//! events through the billing queue.

pub mod routes;

use axum::Router;
use axum::routing::{get, post};
use std::sync::Arc;
use tally::clock::Clock;
use tally::http::BearerAuth;
use tally::http::{AuthMode, auth::authenticate};
use tally::refund_requests::RefundRequests;
use utoipa::OpenApi;

#[derive(Clone)]
pub struct RefundsState {
    pub requests: RefundRequests,
    pub clock: Arc<dyn Clock>,
}

/// Routes that need an identity.
pub fn protected_routes(state: RefundsState) -> Router {
    Router::new()
        .route(
            "/v1/refund-requests",
            post(routes::create).get(routes::list),
        )
        .route("/v1/refund-requests/{id}", get(routes::get_one))
        .route("/v1/admin/refund-requests/{id}", get(routes::admin_get))
        .route(
            "/v1/admin/refund-requests/{id}/approve",
            post(routes::approve),
        )
        .route("/v1/admin/refund-requests/{id}/deny", post(routes::deny))
        .route(
            "/v1/admin/workspaces/{workspace_id}/refund-requests",
            get(routes::admin_list),
        )
        .with_state(state)
}

/// The function as Lambda serves it.
pub fn router(state: RefundsState, auth: AuthMode) -> Router {
    let protected = protected_routes(state)
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    tally::http::finish(protected.merge(tally::http::service_routes(|| {
        tally::http::contract::document(ApiDoc::openapi())
    })))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally refunds API", version = "1", description = "Refund requests and their decisions."),
    paths(routes::create, routes::list, routes::get_one, routes::admin_get, routes::approve, routes::deny, routes::admin_list),
    modifiers(&BearerAuth),
    tags((name = "refunds", description = "Asking for money back"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;
