//! Names of the environment variables the Lambda functions read. The SAM template sets
//! them; a test checks it sets every one a function needs.

/// DynamoDB table name (every function that touches the ledger).
pub const TABLE: &str = "TALLY_TABLE";
/// Endpoint override for a DynamoDB-compatible server (local and tests only).
pub const DYNAMODB_ENDPOINT: &str = "DYNAMODB_ENDPOINT";
/// Endpoint override for an SQS-compatible server (local and tests only).
pub const SQS_ENDPOINT: &str = "SQS_ENDPOINT";
/// URL of the billing-events FIFO queue (stripe-webhook).
pub const BILLING_EVENTS_QUEUE_URL: &str = "BILLING_EVENTS_QUEUE_URL";
/// Stripe webhook signing secret(s), comma-separated while rotating (stripe-webhook).
pub const STRIPE_WEBHOOK_SECRET: &str = "STRIPE_WEBHOOK_SECRET";
/// Stripe secret API key (purchases).
pub const STRIPE_SECRET_KEY: &str = "STRIPE_SECRET_KEY";
/// Base URL of the studio's web app (purchases).
pub const APP_URL: &str = "TALLY_APP_URL";
/// URL of the notifications queue (credit alerts, top-up results).
pub const NOTIFICATIONS_QUEUE_URL: &str = "NOTIFICATIONS_QUEUE_URL";
/// Path of a catalog JSON replacing the shipped one (all, optional).
pub const CATALOG: &str = "TALLY_CATALOG";

/// What each function needs from its environment, by binary name. Functions that run
/// ledger operations also need `NOTIFICATIONS_QUEUE_URL` (alerts) and `STRIPE_SECRET_KEY`
/// (auto top-up).
pub const REQUIRED: [(&str, &[&str]); 4] = [
    (
        "credits-api",
        &[TABLE, NOTIFICATIONS_QUEUE_URL, STRIPE_SECRET_KEY],
    ),
    (
        "purchases",
        &[TABLE, STRIPE_SECRET_KEY, APP_URL, NOTIFICATIONS_QUEUE_URL],
    ),
    (
        "stripe-webhook",
        &[BILLING_EVENTS_QUEUE_URL, STRIPE_WEBHOOK_SECRET],
    ),
    (
        "billing-events",
        &[TABLE, NOTIFICATIONS_QUEUE_URL, STRIPE_SECRET_KEY],
    ),
];
