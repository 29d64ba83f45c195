//! purchases Lambda: reads its configuration once, then the Stripe client, store and
//! catalog from it, then serve.

use purchases::{PurchasesState, ReturnUrls, router};
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::config::PurchasesConfig;
use tally::http::AuthMode;
use tally::payments::stripe_api::StripePayments;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("purchases");
    let cfg = PurchasesConfig::from_env()?;
    let catalog = Arc::new(Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    // Its operations only grant: a crossing here is credits expiring, which only alerts.
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer = Some(tally::alerts::alerts_only(store.clone(), catalog, &cfg.alerts).await);
    let payments = StripePayments::new(cfg.stripe_secret_key.expose(), None)?;
    let state = PurchasesState {
        ledger,
        docs: store,
        payments: Arc::new(payments),
        urls: ReturnUrls::new(cfg.app_url.as_str(), &cfg.return_urls),
    };
    lambda_http::run(router(state, AuthMode::ApiGateway)).await
}
