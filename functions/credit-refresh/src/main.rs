//! credit-refresh Lambda. Two triggers, one binary:
//! - the EventBridge schedule (every 15 minutes): reads the due index shard by shard and
//!   sends one job per due workspace to the `refresh-jobs` queue, ten per batch call;
//! - the `refresh-jobs` SQS queue: runs each job and reports the ones that failed, so only
//!   they are redelivered.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::config::RefreshConfig;
use tally::queue::sqs::SqsQueue;
use tally::refresh::{Refresher, Settings, SqsJobs};
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("credit-refresh");
    let cfg = RefreshConfig::from_env()?;
    let catalog = Arc::new(Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer = Some(tally::alerts::alerts_only(store.clone(), catalog, &cfg.alerts).await);
    let mut refresher = Refresher::new(ledger, store);
    refresher.settings = Settings {
        shards: cfg.due_shards,
        ..Settings::default()
    };
    let sink = SqsJobs::new(
        SqsQueue::client(cfg.sqs_endpoint.as_ref()).await,
        cfg.jobs_queue_url.as_str(),
    );
    let (refresher, sink) = (&refresher, &sink);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(refresher.handle_event(sink, event.payload).await?)
    }))
    .await
}
