//! purchases: Stripe Checkout for plans and packs, the subscription as Stripe last
//! described it, the Stripe customer portal and billing history. Owners and billing
//! admins only. Credits are never granted here: they follow Stripe's events through the
//! billing queue, so a purchase is credited exactly once whatever the browser does.
//!
//! The handlers and their request and response bodies live in [`routes`], one file per
//! resource.

pub mod contract;
pub mod routes;

use axum::Router;
use axum::routing::{get, post};
use routes::{
    alerts, billing_portal, checkout, custom_payments, history, invoices, reconciliation, reissue,
    subscription,
};
use std::sync::Arc;
use tally::config::{HttpUrl, ReturnUrlOverrides};
use tally::http::BearerAuth;
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
    /// The configured pages (`TALLY_CHECKOUT_SUCCESS_URL`, `TALLY_CHECKOUT_CANCEL_URL`,
    /// `TALLY_PORTAL_RETURN_URL`), with defaults under `base` for those not set.
    pub fn new(base: &str, overrides: &ReturnUrlOverrides) -> Self {
        let or = |url: &Option<HttpUrl>, default: String| {
            url.as_ref().map_or(default, |u| u.as_str().to_owned())
        };
        Self {
            success: or(
                &overrides.checkout_success,
                format!("{base}/sim/done?session={{CHECKOUT_SESSION_ID}}"),
            ),
            cancel: or(
                &overrides.checkout_cancel,
                format!("{base}/sim/done?cancelled=1"),
            ),
            portal_return: or(&overrides.portal_return, format!("{base}/sim/done")),
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
        .route("/v1/checkout/sessions", post(checkout::create_checkout))
        .route("/v1/subscription", get(subscription::subscription))
        .route("/v1/billing-portal", post(billing_portal::billing_portal))
        .route("/v1/invoices", get(invoices::invoices))
        .route("/v1/billing/history", get(history::history))
        .route(
            "/v1/admin/workspaces/{workspace_id}/billing/history",
            get(history::admin_history),
        )
        .route("/v1/subscription/change", post(subscription::change))
        .route("/v1/subscription/preview", post(subscription::preview))
        .route(
            "/v1/subscription/addons",
            axum::routing::put(subscription::addons),
        )
        .route("/v1/subscription/cancel", post(subscription::cancel))
        .route("/v1/subscription/resume", post(subscription::resume))
        .route("/v1/subscription/pause", post(subscription::pause))
        .route(
            "/v1/alerts",
            get(alerts::get_alerts).put(alerts::put_alerts),
        )
        .route(
            "/v1/admin/workspaces/{workspace_id}/custom-payments",
            post(custom_payments::custom_payment),
        )
        .route("/v1/admin/invoices/{id}/reissue", post(reissue::reissue))
        .route(
            "/v1/admin/reconciliation",
            get(reconciliation::reconciliation),
        )
        .with_state(state)
}

/// The function as Lambda serves it.
pub fn router(state: PurchasesState, auth: AuthMode) -> Router {
    let catalog = state.ledger.catalog.clone();
    let protected = protected_routes(state)
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    tally::http::finish(protected.merge(tally::http::service_routes(move || {
        contract::openapi(&catalog)
    })))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally purchases API", version = "1", description = "Plans, packs, subscription, billing portal and invoices."),
    paths(checkout::create_checkout, subscription::subscription, billing_portal::billing_portal, invoices::invoices,
        history::history, history::admin_history,
        subscription::change, subscription::preview, subscription::addons, subscription::cancel, subscription::resume, subscription::pause,
        custom_payments::custom_payment, reissue::reissue, alerts::put_alerts, alerts::get_alerts,
        reconciliation::reconciliation),
    // Its operations name the `bearer` scheme; the document served alone must define it.
    modifiers(&BearerAuth),
    tags((name = "billing", description = "Buying credits and managing the subscription"), (name = "admin", description = "Support staff"))
)]
pub struct ApiDoc;
