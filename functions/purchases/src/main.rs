//! purchases Lambda: Stripe client, store and catalog from the environment, then serve.

use purchases::{PurchasesState, ReturnUrls, router};
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::env;
use tally::http::AuthMode;
use tally::payments::stripe::StripePayments;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    let catalog = Arc::new(Catalog::from_env()?);
    let store = Arc::new(tally::store::dynamo::from_env().await?);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.observer = Some(tally::alerts::from_env(store.clone(), catalog).await?);
    let payments = StripePayments::new(&std::env::var(env::STRIPE_SECRET_KEY)?, None)?;
    let base = std::env::var(env::APP_URL)?;
    let state = PurchasesState {
        ledger,
        docs: store,
        payments: Arc::new(payments),
        urls: ReturnUrls::from_env(&base),
    };
    lambda_http::run(router(state, AuthMode::ApiGateway)).await
}
