//! refunds-worker Lambda: makes the approved refunds of one SQS FIFO batch through Stripe
//! and reports the messages that failed, so only they are redelivered.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tally::clock::SystemClock;
use tally::config::RefundsWorkerConfig;
use tally::payments::stripe_api::StripePayments;
use tally::queue::lambda::process_batch;
use tally::queue::sqs::SqsQueue;
use tally::refund_requests::worker::RefundWorker;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("refunds-worker");
    let cfg = RefundsWorkerConfig::from_env()?;
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let notifications = SqsQueue::new(
        SqsQueue::client(cfg.sqs_endpoint.as_ref()).await,
        cfg.notifications_queue_url.as_str(),
    );
    let worker = RefundWorker {
        docs: store,
        payments: Arc::new(StripePayments::new(cfg.stripe_secret_key.expose(), None)?),
        notifications: Arc::new(notifications),
        clock: Arc::new(SystemClock),
    };
    let worker = &worker;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(
            process_batch(
                worker,
                event.payload,
                tally::refund_requests::REFUNDS_MAX_RECEIVES,
            )
            .await,
        )
    }))
    .await
}
