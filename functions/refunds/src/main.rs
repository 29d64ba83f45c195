//! refunds Lambda: reads its configuration once, then the store and the refunds queue from
//! it, then serve.

use refunds::{RefundsState, router};
use std::sync::Arc;
use tally::clock::SystemClock;
use tally::config::RefundsConfig;
use tally::http::AuthMode;
use tally::queue::sqs::SqsQueue;
use tally::refund_requests::RefundRequests;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("refunds");
    let cfg = RefundsConfig::from_env()?;
    let catalog = Arc::new(tally::catalog::Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger =
        tally::service::Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer = Some(tally::alerts::alerts_only(store.clone(), catalog, &cfg.alerts).await);
    let queue = SqsQueue::new(
        SqsQueue::client(cfg.sqs_endpoint.as_ref()).await,
        cfg.refunds_queue_url.as_str(),
    );
    let state = RefundsState {
        requests: RefundRequests {
            docs: store,
            ledger,
            queue: Arc::new(queue),
            duplicate_window: chrono::Duration::minutes(i64::from(cfg.duplicate_charge_minutes)),
        },
        clock: Arc::new(SystemClock),
    };
    lambda_http::run(router(state, AuthMode::ApiGateway)).await
}
