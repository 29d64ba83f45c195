//! stripe-webhook Lambda: secrets and queue from the environment, then serve.

use std::sync::Arc;
use tally::env;
use tally::queue::sqs::SqsQueue;
use tally_stripe_webhook::{WebhookState, router};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tally::telemetry::init_lambda();
    let secrets = WebhookState::parse_secrets(&std::env::var(env::STRIPE_WEBHOOK_SECRET)?);
    if secrets.is_empty() {
        return Err("STRIPE_WEBHOOK_SECRET holds no secret".into());
    }
    let queue_url = std::env::var(env::BILLING_EVENTS_QUEUE_URL)?;
    let client = SqsQueue::client_from_env().await;
    let state = WebhookState {
        secrets: Arc::new(secrets),
        queue: Arc::new(SqsQueue::new(client, queue_url)),
        clock: Arc::new(tally::clock::SystemClock),
    };
    lambda_http::run(router(state)).await
}
