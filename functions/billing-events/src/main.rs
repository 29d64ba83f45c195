//! billing-events Lambda: applies the Stripe events of one SQS FIFO batch and reports the
//! messages that failed, so only they are redelivered.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tally::billing::BillingEvents;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::config::WorkerConfig;
use tally::queue::lambda::process_batch;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("billing-events");
    let cfg = WorkerConfig::from_env()?;
    let catalog = Arc::new(Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer = Some(tally::alerts::from_config(store.clone(), catalog, &cfg.alerts).await?);
    let consumer = BillingEvents::new(ledger, store);
    let consumer = &consumer;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(process_batch(consumer, event.payload).await)
    }))
    .await
}
