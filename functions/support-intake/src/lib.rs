//! support-intake: customers file support tickets; Tally captures who, where and when by
//! itself, stores what its records say about the question ([`tally::support::enrich`]),
//! fixes what is certain, and forwards the ticket to the help desk through the
//! `support-tickets` queue. Support staff (scope `credits:admin`) read every ticket,
//! answer and change statuses.

pub mod routes;

use axum::Router;
use axum::routing::{get, post};
use std::sync::Arc;
use tally::clock::Clock;
use tally::http::BearerAuth;
use tally::http::{AuthMode, auth::authenticate};
use tally::support::Tickets;
use tally::support::enrich::Context;
use utoipa::OpenApi;

#[derive(Clone)]
pub struct SupportState {
    pub tickets: Tickets,
    pub context: Context,
    pub clock: Arc<dyn Clock>,
}

/// Routes that need an identity.
pub fn protected_routes(state: SupportState) -> Router {
    Router::new()
        .route(
            "/v1/support/tickets",
            post(routes::create).get(routes::list),
        )
        .route("/v1/support/tickets/{id}", get(routes::get_one))
        .route(
            "/v1/support/tickets/{id}/messages",
            post(routes::add_message),
        )
        .route(
            "/v1/admin/support/tickets/{id}/status",
            post(routes::set_status),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/support/tickets",
            get(routes::admin_list),
        )
        .with_state(state)
}

/// The function as Lambda serves it.
pub fn router(state: SupportState, auth: AuthMode) -> Router {
    let protected = protected_routes(state)
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    tally::http::finish(protected.merge(tally::http::service_routes(|| {
        tally::http::contract::document(ApiDoc::openapi())
    })))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally support API", version = "1", description = "Support tickets with what Tally already knows."),
    paths(routes::create, routes::list, routes::get_one, routes::add_message, routes::set_status, routes::admin_list),
    modifiers(&BearerAuth),
    tags((name = "support", description = "Asking for help"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;
