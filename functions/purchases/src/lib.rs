//! purchases: Stripe Checkout for plans and packs, the subscription as Stripe last
//! described it, the Stripe customer portal and billing history. Owners and billing
//! admins only. Credits are never granted here: they follow Stripe's events through the
//! billing queue, so a purchase is credited exactly once whatever the browser does.

mod handlers;
pub mod subscription;

use axum::Router;
use axum::routing::{get, post};
use std::sync::Arc;
use tally::http::{AuthMode, auth::authenticate};
use tally::payments::Payments;
use tally::service::Ledger;
use tally::store::DocStore;
use utoipa::OpenApi;

/// Where Stripe sends the customer back to.
#[derive(Debug, Clone)]
pub struct ReturnUrls {
    pub success: String,
    pub cancel: String,
    pub portal_return: String,
}

impl ReturnUrls {
    /// From `TALLY_CHECKOUT_SUCCESS_URL`, `TALLY_CHECKOUT_CANCEL_URL` and
    /// `TALLY_PORTAL_RETURN_URL`, with defaults under `base`.
    pub fn from_env(base: &str) -> Self {
        let var = |k: &str, d: String| std::env::var(k).unwrap_or(d);
        Self {
            success: var(
                "TALLY_CHECKOUT_SUCCESS_URL",
                format!("{base}/sim/done?session={{CHECKOUT_SESSION_ID}}"),
            ),
            cancel: var(
                "TALLY_CHECKOUT_CANCEL_URL",
                format!("{base}/sim/done?cancelled=1"),
            ),
            portal_return: var("TALLY_PORTAL_RETURN_URL", format!("{base}/sim/done")),
        }
    }
}

#[derive(Clone)]
pub struct PurchasesState {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    pub payments: Arc<dyn Payments>,
    pub urls: ReturnUrls,
}

/// Routes that need an identity.
pub fn protected_routes(state: PurchasesState) -> Router {
    Router::new()
        .route("/v1/checkout/sessions", post(handlers::create_checkout))
        .route("/v1/subscription", get(handlers::subscription))
        .route("/v1/billing-portal", post(handlers::billing_portal))
        .route("/v1/invoices", get(handlers::invoices))
        .route("/v1/subscription/change", post(subscription::change))
        .route(
            "/v1/subscription/addons",
            axum::routing::put(subscription::addons),
        )
        .route("/v1/subscription/cancel", post(subscription::cancel))
        .route("/v1/subscription/resume", post(subscription::resume))
        .route("/v1/subscription/pause", post(subscription::pause))
        .route(
            "/v1/alerts",
            get(handlers::get_alerts).put(handlers::put_alerts),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/custom-payments",
            post(handlers::custom_payment),
        )
        .with_state(state)
}

/// The function as Lambda serves it.
pub fn router(state: PurchasesState, auth: AuthMode) -> Router {
    let protected = protected_routes(state)
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    tally::http::finish(protected.merge(credits_api::service_routes(ApiDoc::openapi())))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally purchases API", version = "1", description = "Plans, packs, subscription, billing portal and invoices."),
    paths(handlers::create_checkout, handlers::subscription, handlers::billing_portal, handlers::invoices,
        subscription::change, subscription::addons, subscription::cancel, subscription::resume, subscription::pause,
        handlers::custom_payment, handlers::put_alerts, handlers::get_alerts),
    tags((name = "billing", description = "Buying credits and managing the subscription"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;
