//! credits-api Lambda: wires the DynamoDB store, the system clock and the catalog into the
//! router and serves it with `lambda_http`.

use credits_api::{AppState, router};
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::http::AuthMode;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    let catalog = Arc::new(Catalog::from_env()?);
    let store = tally::store::dynamo::from_env().await?;
    let store = Arc::new(store);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.observer = Some(tally::alerts::from_env(store, catalog).await?);
    lambda_http::run(router(AppState { ledger }, AuthMode::ApiGateway)).await
}
