//! stripe-webhook Lambda: reads its configuration once (secrets and queue), then serve.

use std::sync::Arc;
use tally::config::WebhookConfig;
use tally::queue::sqs::SqsQueue;
use tally_stripe_webhook::{WebhookState, router};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    tally::metrics::init("stripe-webhook");
    let cfg = WebhookConfig::from_env()?;
    let secrets = cfg
        .webhook_secrets
        .iter()
        .map(|s| s.expose().to_owned())
        .collect();
    let client = SqsQueue::client(cfg.sqs_endpoint.as_ref()).await;
    let state = WebhookState {
        secrets: Arc::new(secrets),
        queue: Arc::new(SqsQueue::new(client, cfg.billing_events_queue_url.as_str())),
        clock: Arc::new(tally::clock::SystemClock),
    };
    lambda_http::run(router(state)).await
}
