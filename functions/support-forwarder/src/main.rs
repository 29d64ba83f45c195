//! support-forwarder Lambda: delivers one SQS FIFO batch of ticket changes to the help
//! desk and reports the messages that failed, so only they are redelivered (and
//! dead-lettered after repeated failure). On its schedule it sweeps for tickets whose
//! change never reached the queue and hands them to it.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use support_forwarder::WebhookSink;
use tally::clock::SystemClock;
use tally::config::ForwarderConfig;
use tally::queue::sqs::LazySqsQueue;
use tally::support::Tickets;
use tally::support::forward::HelpDesk;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("support-forwarder");
    let cfg = ForwarderConfig::from_env()?;
    let store = Arc::new(tally::store::dynamo::from_config(&cfg.store).await);
    let desk = HelpDesk {
        tickets: Tickets {
            docs: store,
            // Only the sweep sends: deliveries never wait for the queue's client.
            queue: Arc::new(LazySqsQueue::new(
                cfg.sqs_endpoint.clone(),
                cfg.support_queue_url.as_str(),
            )),
        },
        sink: Arc::new(WebhookSink::new(cfg.helpdesk_webhook_url.as_str())?),
        secret: cfg.helpdesk_webhook_secret.expose().as_bytes().to_vec(),
        clock: Arc::new(SystemClock),
        attempts: 3,
        backoff: std::time::Duration::from_millis(200),
    };
    let desk = &desk;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            desk.handle_event(event.payload).await
        },
    ))
    .await
}
