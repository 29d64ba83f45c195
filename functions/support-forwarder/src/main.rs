//! support-forwarder Lambda: delivers one SQS FIFO batch of ticket changes to the help
//! desk and reports the messages that failed, so only they are redelivered (and
//! dead-lettered after repeated failure).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use support_forwarder::WebhookSink;
use tally::clock::SystemClock;
use tally::config::ForwarderConfig;
use tally::queue::lambda::process_batch;
use tally::support::Tickets;
use tally::support::forward::HelpDesk;

/// Forwarding never sends: the consumer only reads tickets.
struct NoQueue;

#[async_trait::async_trait]
impl tally::queue::Queue for NoQueue {
    async fn send(&self, _: tally::queue::Message) -> Result<(), tally::queue::QueueError> {
        Err(tally::queue::QueueError::unavailable(
            "the forwarder does not queue",
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("support-forwarder");
    let cfg = ForwarderConfig::from_env()?;
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let desk = HelpDesk {
        tickets: Tickets {
            docs: store,
            queue: Arc::new(NoQueue),
        },
        sink: Arc::new(WebhookSink::new(cfg.helpdesk_webhook_url.as_str())?),
        secret: cfg.helpdesk_webhook_secret.expose().as_bytes().to_vec(),
        clock: Arc::new(SystemClock),
        attempts: 3,
        backoff: std::time::Duration::from_millis(200),
    };
    let desk = &desk;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(process_batch(desk, event.payload).await)
    }))
    .await
}
