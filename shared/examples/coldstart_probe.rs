//! The yardstick for cold starts (`make measure`): a Lambda function that builds the same
//! AWS SDK clients (DynamoDB, SQS) and Stripe client as Tally's functions, and nothing else,
//! then polls the Runtime API and answers every request with an empty 200.

use lambda_http::{Body, Error, Request, Response, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let _dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let _sqs = aws_sdk_sqs::Client::new(&config);
    let key = std::env::var("STRIPE_SECRET_KEY").unwrap_or_else(|_| "sk_test_probe".into());
    let _stripe = tally::payments::stripe_api::StripePayments::new(&key, None)?;
    lambda_http::run(service_fn(|_: Request| async {
        Ok::<_, Error>(Response::new(Body::Empty))
    }))
    .await
}
