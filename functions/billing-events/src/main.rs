//! billing-events Lambda: applies the Stripe events of one SQS FIFO batch, and charges the
//! auto top-ups of the top-ups queue, reporting the messages that failed so only they are
//! redelivered.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tally::alerts::TopUps;
use tally::billing::{BillingEvents, BillingWork};
use tally::catalog::Catalog;
use tally::clock::SystemClock;
use tally::config::WorkerConfig;
use tally::payments::Payments;
use tally::queue::lambda::process_batch;
use tally::queue::sqs::SqsQueue;
use tally::service::Ledger;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("billing-events");
    let cfg = WorkerConfig::from_env()?;
    let catalog = Arc::new(Catalog::load(cfg.catalog_path.as_deref())?);
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let mut ledger = Ledger::new(store.clone(), Arc::new(SystemClock), catalog.clone());
    // Stripe's events grant, set plans and take money's credits back: a crossing here is
    // credits expiring or money going back, which only alert; auto top-ups are asked for
    // by generations (credits-api) and charged here, from the top-ups queue.
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    ledger.observer =
        Some(tally::alerts::alerts_only(store.clone(), catalog.clone(), &cfg.alerts).await);
    // Money going back alerts the same way: one observer for both.
    let money_back = ledger.observer.clone();
    let payments: Option<Arc<dyn Payments>> = match &cfg.stripe_secret_key {
        Some(key) => Some(Arc::new(tally::payments::stripe_api::StripePayments::new(
            key.expose(),
            None,
        )?)),
        None => None,
    };
    let notifications = SqsQueue::new(
        SqsQueue::client(cfg.alerts.sqs_endpoint.as_ref()).await,
        cfg.alerts.notifications_queue_url.as_str(),
    );
    let notifications: Arc<dyn tally::queue::Queue> = Arc::new(notifications);
    let mut events = BillingEvents::new(ledger, store.clone(), money_back);
    events.stripe = payments.clone();
    events.notifications = Some(notifications.clone());
    events.livemode = cfg
        .stripe_secret_key
        .as_ref()
        .and_then(|k| tally::payments::stripe_api::key_livemode(k.expose()));
    let consumer = BillingWork {
        events,
        topups: TopUps {
            states: store.clone(),
            docs: store,
            payments,
            catalog,
            notifications,
            clock: Arc::new(SystemClock),
        },
    };
    let consumer = &consumer;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(
            process_batch(
                consumer,
                event.payload,
                tally::queue::BILLING_EVENTS_MAX_RECEIVES,
            )
            .await,
        )
    }))
    .await
}
