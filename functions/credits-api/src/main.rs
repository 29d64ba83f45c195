//! credits-api Lambda: reads its configuration once, wires the DynamoDB store, the system
//! clock and the catalog into the router and serves it with `lambda_http`.

use credits_api::{AppState, router};
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::config::ApiConfig;
use tally::http::AuthMode;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("credits-api");
    let cfg = ApiConfig::from_env()?;
    let catalog = Arc::new(Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    let mut staff_ledger = ledger.clone();
    staff_ledger.observer =
        Some(tally::alerts::alerts_only(store.clone(), catalog.clone(), &cfg.alerts).await);
    ledger.observer = Some(tally::alerts::from_config(store.clone(), catalog, &cfg.alerts).await);
    let docs = store.clone();
    let state = AppState {
        ledger,
        staff_ledger,
        docs,
        export_limit: Some(credits_api::LAMBDA_EXPORT_LIMIT),
    };
    lambda_http::run(router(state, AuthMode::ApiGateway)).await
}
