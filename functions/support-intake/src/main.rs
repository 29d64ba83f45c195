//! support-intake Lambda: reads its configuration once, then the store and the queues
//! from it, then serve.

use std::sync::Arc;
use support_intake::{SupportState, router};
use tally::clock::SystemClock;
use tally::config::SupportConfig;
use tally::http::AuthMode;
use tally::queue::sqs::SqsQueue;
use tally::refund_requests::RefundRequests;
use tally::support::Tickets;
use tally::support::enrich::Context;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("support-intake");
    let cfg = SupportConfig::from_env()?;
    let catalog = Arc::new(tally::catalog::Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger =
        tally::service::Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer = Some(tally::alerts::alerts_only(store.clone(), catalog, &cfg.alerts).await);
    let sqs = SqsQueue::client(cfg.sqs_endpoint.as_ref()).await;
    let tickets = SqsQueue::new(sqs.clone(), cfg.support_queue_url.as_str());
    let refunds = SqsQueue::new(sqs, cfg.refunds_queue_url.as_str());
    let state = SupportState {
        tickets: Tickets {
            docs: store.clone(),
            queue: Arc::new(tickets),
        },
        context: Context {
            ledger: ledger.clone(),
            docs: store.clone(),
            refunds: Some(RefundRequests {
                docs: store,
                ledger,
                queue: Arc::new(refunds),
                duplicate_window: chrono::Duration::minutes(i64::from(
                    cfg.duplicate_charge_minutes,
                )),
            }),
        },
        clock: Arc::new(SystemClock),
    };
    lambda_http::run(router(state, AuthMode::ApiGateway)).await
}
