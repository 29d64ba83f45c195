//! The configuration of the Lambda functions, read once at start-up from the environment
//! the SAM template sets, into typed values. A missing or malformed variable stops the
//! function before it serves anything, with an error that names the variable.
//!
//! Each function has its own struct ([`ApiConfig`], [`PurchasesConfig`], [`WebhookConfig`],
//! [`WorkerConfig`], [`RefreshConfig`]) made of shared parts, and lists the variables its deployment must set
//! ([`required_vars`]); a test holds the template to that list.

use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

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
/// Stripe secret API key (purchases; auto top-up elsewhere).
pub const STRIPE_SECRET_KEY: &str = "STRIPE_SECRET_KEY";
/// Base URL of the studio's web app (purchases).
pub const APP_URL: &str = "TALLY_APP_URL";
/// Where Stripe Checkout sends the customer after paying (purchases, optional).
pub const CHECKOUT_SUCCESS_URL: &str = "TALLY_CHECKOUT_SUCCESS_URL";
/// Where Stripe Checkout sends the customer who gives up (purchases, optional).
pub const CHECKOUT_CANCEL_URL: &str = "TALLY_CHECKOUT_CANCEL_URL";
/// Where the Stripe customer portal's "return" link goes (purchases, optional).
pub const PORTAL_RETURN_URL: &str = "TALLY_PORTAL_RETURN_URL";
/// URL of the notifications queue (credit alerts, top-up results).
pub const NOTIFICATIONS_QUEUE_URL: &str = "NOTIFICATIONS_QUEUE_URL";
/// URL of the top-ups FIFO queue: crossings of the auto top-up threshold (credits-api
/// sends; billing-events charges). Without it auto top-up is
/// off.
pub const TOPUPS_QUEUE_URL: &str = "TOPUPS_QUEUE_URL";
/// Path of a catalog JSON replacing the shipped one (all, optional).
pub const CATALOG: &str = "TALLY_CATALOG";
/// URL of the refresh jobs queue (credit-refresh).
pub const REFRESH_JOBS_QUEUE_URL: &str = "REFRESH_JOBS_QUEUE_URL";
/// Shards of the due index (credit-refresh, optional; default 16).
pub const DUE_SHARDS: &str = "TALLY_DUE_SHARDS";
/// URL of the refunds FIFO queue (refunds).
pub const REFUNDS_QUEUE_URL: &str = "REFUNDS_QUEUE_URL";
/// The `support-tickets` FIFO queue: tickets to forward to the help desk.
pub const SUPPORT_QUEUE_URL: &str = "SUPPORT_QUEUE_URL";
/// Where the support forwarder delivers tickets (the help desk's webhook).
pub const HELPDESK_WEBHOOK_URL: &str = "HELPDESK_WEBHOOK_URL";
/// The secret the support forwarder signs deliveries with (HMAC-SHA256).
pub const HELPDESK_WEBHOOK_SECRET: &str = "HELPDESK_WEBHOOK_SECRET";
/// Minutes within which a second identical payment is a duplicate charge (refunds,
/// optional; default 30, at most 10080).
pub const DUPLICATE_CHARGE_MINUTES: &str = "TALLY_DUPLICATE_CHARGE_MINUTES";

/// Why the configuration could not be read.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
}

fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        reason: reason.into(),
    }
}

/// Reads variables through a lookup (the process environment, or a map in tests).
/// An empty value counts as unset for optional variables and is refused for required ones.
pub struct Vars<F>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    pub fn new(lookup: F) -> Self {
        Self(lookup)
    }

    /// The value, or `None` when unset or empty.
    pub fn optional(&self, var: &'static str) -> Option<String> {
        (self.0)(var).filter(|v| !v.is_empty())
    }

    pub fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        match (self.0)(var) {
            None => Err(ConfigError::Missing(var)),
            Some(v) if v.trim().is_empty() => Err(invalid(var, "must not be empty")),
            Some(v) => Ok(v),
        }
    }

    pub fn required_url(&self, var: &'static str) -> Result<HttpUrl, ConfigError> {
        HttpUrl::parse(&self.required(var)?).map_err(|reason| invalid(var, reason))
    }

    pub fn optional_url(&self, var: &'static str) -> Result<Option<HttpUrl>, ConfigError> {
        self.optional(var)
            .map(|v| HttpUrl::parse(&v).map_err(|reason| invalid(var, reason)))
            .transpose()
    }
}

/// The process environment as a lookup. A value that is not UTF-8 is passed on with its
/// bad bytes replaced, so it is refused as malformed rather than reported missing.
pub fn process_env(var: &str) -> Option<String> {
    std::env::var_os(var).map(|v| v.to_string_lossy().into_owned())
}

/// An absolute `http` or `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(String);

impl HttpUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("{text:?} is not an http(s) URL")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{text:?} has no host"));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A credential. Its `Debug` does not show it, so configurations can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Webhook signing secrets from a comma-separated list (more than one while a secret is
/// being rotated); blanks around and between commas are ignored.
pub fn parse_secret_list(list: &str) -> Vec<Secret> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect()
}

/// Where the ledger and documents live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub table: String,
    /// A DynamoDB-compatible server instead of AWS (local and tests).
    pub endpoint: Option<HttpUrl>,
}

impl StoreConfig {
    pub fn from_vars<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<Self, ConfigError> {
        Ok(Self {
            table: v.required(TABLE)?,
            endpoint: v.optional_url(DYNAMODB_ENDPOINT)?,
        })
    }
}

/// Credit alerts, which every function running ledger operations sends, and auto top-up,
/// which credits-api asks for (its generations spend; everywhere else a crossing is
/// credits expiring or money going back, which only alert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertsConfig {
    pub notifications_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
    /// Where crossings of the auto top-up threshold go; without it auto top-up is off.
    pub topups_queue_url: Option<HttpUrl>,
}

impl AlertsConfig {
    pub fn from_vars<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<Self, ConfigError> {
        Ok(Self {
            notifications_queue_url: v.required_url(NOTIFICATIONS_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
            topups_queue_url: v.optional_url(TOPUPS_QUEUE_URL)?,
        })
    }
}

/// The catalog file replacing the shipped one, if any.
fn catalog_path<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Option<PathBuf> {
    v.optional(CATALOG).map(PathBuf::from)
}

/// Overrides of the pages Stripe sends the customer back to; unset ones default to pages
/// under the app URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReturnUrlOverrides {
    pub checkout_success: Option<HttpUrl>,
    pub checkout_cancel: Option<HttpUrl>,
    pub portal_return: Option<HttpUrl>,
}

impl ReturnUrlOverrides {
    pub fn from_vars<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<Self, ConfigError> {
        Ok(Self {
            checkout_success: v.optional_url(CHECKOUT_SUCCESS_URL)?,
            checkout_cancel: v.optional_url(CHECKOUT_CANCEL_URL)?,
            portal_return: v.optional_url(PORTAL_RETURN_URL)?,
        })
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_vars(&Vars::new(lookup))
    }
}

/// credits-api.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub alerts: AlertsConfig,
}

impl ApiConfig {
    /// What the deployment sets. `TOPUPS_QUEUE_URL` is among them for auto top-up, though
    /// the function starts without it (top-ups then stay off).
    pub const REQUIRED: &[&str] = &[TABLE, NOTIFICATIONS_QUEUE_URL, TOPUPS_QUEUE_URL];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            catalog_path: catalog_path(&v),
            alerts: AlertsConfig::from_vars(&v)?,
        })
    }
}

/// purchases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchasesConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub alerts: AlertsConfig,
    pub stripe_secret_key: Secret,
    /// The studio's web app; Stripe's return pages default to pages under it.
    pub app_url: HttpUrl,
    pub return_urls: ReturnUrlOverrides,
}

impl PurchasesConfig {
    /// Its operations only grant: its credit alerts never ask for a top-up.
    pub const REQUIRED: &[&str] = &[TABLE, STRIPE_SECRET_KEY, APP_URL, NOTIFICATIONS_QUEUE_URL];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            catalog_path: catalog_path(&v),
            alerts: AlertsConfig::from_vars(&v)?,
            stripe_secret_key: Secret::new(v.required(STRIPE_SECRET_KEY)?.trim()),
            app_url: v.required_url(APP_URL)?,
            return_urls: ReturnUrlOverrides::from_vars(&v)?,
        })
    }
}

/// stripe-webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Never empty.
    pub webhook_secrets: Vec<Secret>,
    pub billing_events_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
}

impl WebhookConfig {
    pub const REQUIRED: &[&str] = &[BILLING_EVENTS_QUEUE_URL, STRIPE_WEBHOOK_SECRET];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        let webhook_secrets = parse_secret_list(&v.required(STRIPE_WEBHOOK_SECRET)?);
        if webhook_secrets.is_empty() {
            return Err(invalid(STRIPE_WEBHOOK_SECRET, "holds no secret"));
        }
        Ok(Self {
            webhook_secrets,
            billing_events_queue_url: v.required_url(BILLING_EVENTS_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
        })
    }
}

/// billing-events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub alerts: AlertsConfig,
    /// Charges the auto top-ups the top-ups queue asks for; without a key each is
    /// reported as not charged.
    pub stripe_secret_key: Option<Secret>,
}

impl WorkerConfig {
    /// `STRIPE_SECRET_KEY` is for auto top-up (the top-ups queue is its event source; its
    /// own credit alerts never ask for one) and for expiring discounted pack checkouts.
    pub const REQUIRED: &[&str] = &[TABLE, NOTIFICATIONS_QUEUE_URL, STRIPE_SECRET_KEY];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            catalog_path: catalog_path(&v),
            alerts: AlertsConfig::from_vars(&v)?,
            stripe_secret_key: v
                .optional(STRIPE_SECRET_KEY)
                .filter(|k| !k.trim().is_empty())
                .map(|k| Secret::new(k.trim())),
        })
    }
}

/// credit-refresh: the scheduler (due shards to jobs) and the worker (one job each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub jobs_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
    /// Shards of the due index, 1 to 1000.
    pub due_shards: u32,
    /// Lots expiring on schedule lower balances too: credit alerts follow, but no top-up
    /// (credits expiring with nobody using them are no reason to charge a card).
    pub alerts: AlertsConfig,
}

impl RefreshConfig {
    pub const REQUIRED: &[&str] = &[TABLE, REFRESH_JOBS_QUEUE_URL, NOTIFICATIONS_QUEUE_URL];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        let due_shards = match v.optional(DUE_SHARDS) {
            None => crate::refresh::DEFAULT_DUE_SHARDS,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| invalid(DUE_SHARDS, format!("{text:?} is not 1 to 1000")))?,
        };
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            catalog_path: catalog_path(&v),
            jobs_queue_url: v.required_url(REFRESH_JOBS_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
            due_shards,
            alerts: AlertsConfig::from_vars(&v)?,
        })
    }
}

/// refunds: refund requests over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundsConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub refunds_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
    pub duplicate_charge_minutes: u32,
    /// A refund taken back from a lot lowers the balance: credit alerts follow, but no
    /// top-up (a refund of a top-up must not buy it again).
    pub alerts: AlertsConfig,
}

impl RefundsConfig {
    pub const REQUIRED: &[&str] = &[TABLE, REFUNDS_QUEUE_URL, NOTIFICATIONS_QUEUE_URL];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        let duplicate_charge_minutes = match v.optional(DUPLICATE_CHARGE_MINUTES) {
            None => 30,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=10_080).contains(n))
                .ok_or_else(|| {
                    invalid(
                        DUPLICATE_CHARGE_MINUTES,
                        format!("{text:?} is not 1 to 10080 minutes"),
                    )
                })?,
        };
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            catalog_path: catalog_path(&v),
            refunds_queue_url: v.required_url(REFUNDS_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
            duplicate_charge_minutes,
            alerts: AlertsConfig::from_vars(&v)?,
        })
    }
}

/// refunds-worker: makes approved refunds through Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundsWorkerConfig {
    pub store: StoreConfig,
    pub stripe_secret_key: Secret,
    pub notifications_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
}

impl RefundsWorkerConfig {
    pub const REQUIRED: &[&str] = &[TABLE, STRIPE_SECRET_KEY, NOTIFICATIONS_QUEUE_URL];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            stripe_secret_key: Secret::new(v.required(STRIPE_SECRET_KEY)?.trim()),
            notifications_queue_url: v.required_url(NOTIFICATIONS_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
        })
    }
}

/// support-intake: support tickets, their enrichment and automatic fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportConfig {
    pub store: StoreConfig,
    pub catalog_path: Option<PathBuf>,
    pub support_queue_url: HttpUrl,
    /// Refund requests a verified duplicate charge opens go here.
    pub refunds_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
    pub duplicate_charge_minutes: u32,
    /// Settling a workspace while enriching a ticket can expire lots, and a verified
    /// duplicate charge takes its credits back: credit alerts follow, but no top-up.
    pub alerts: AlertsConfig,
}

impl SupportConfig {
    pub const REQUIRED: &[&str] = &[
        TABLE,
        SUPPORT_QUEUE_URL,
        REFUNDS_QUEUE_URL,
        NOTIFICATIONS_QUEUE_URL,
    ];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let refunds = RefundsConfig::from_lookup(&lookup)?;
        let v = Vars::new(lookup);
        Ok(Self {
            store: refunds.store,
            catalog_path: refunds.catalog_path,
            support_queue_url: v.required_url(SUPPORT_QUEUE_URL)?,
            refunds_queue_url: refunds.refunds_queue_url,
            sqs_endpoint: refunds.sqs_endpoint,
            duplicate_charge_minutes: refunds.duplicate_charge_minutes,
            alerts: refunds.alerts,
        })
    }
}

/// support-forwarder: delivers tickets to the help desk's webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    pub store: StoreConfig,
    pub helpdesk_webhook_url: HttpUrl,
    pub helpdesk_webhook_secret: Secret,
    /// Where the schedule's sweep hands tickets whose forward failed.
    pub support_queue_url: HttpUrl,
    /// An SQS-compatible server instead of AWS (local and tests).
    pub sqs_endpoint: Option<HttpUrl>,
}

impl ForwarderConfig {
    pub const REQUIRED: &[&str] = &[
        TABLE,
        HELPDESK_WEBHOOK_URL,
        HELPDESK_WEBHOOK_SECRET,
        SUPPORT_QUEUE_URL,
    ];

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars::new(lookup);
        let secret = v.required(HELPDESK_WEBHOOK_SECRET)?.trim().to_owned();
        if secret.len() < 16 {
            return Err(invalid(
                HELPDESK_WEBHOOK_SECRET,
                "must be at least 16 characters".to_owned(),
            ));
        }
        Ok(Self {
            store: StoreConfig::from_vars(&v)?,
            helpdesk_webhook_url: v.required_url(HELPDESK_WEBHOOK_URL)?,
            helpdesk_webhook_secret: Secret::new(&secret),
            support_queue_url: v.required_url(SUPPORT_QUEUE_URL)?,
            sqs_endpoint: v.optional_url(SQS_ENDPOINT)?,
        })
    }
}

/// Every Lambda function by binary name, with the variables its deployment must set.
pub const FUNCTIONS: [(&str, &[&str]); 9] = [
    ("credits-api", ApiConfig::REQUIRED),
    ("purchases", PurchasesConfig::REQUIRED),
    ("stripe-webhook", WebhookConfig::REQUIRED),
    ("billing-events", WorkerConfig::REQUIRED),
    ("credit-refresh", RefreshConfig::REQUIRED),
    ("refunds", RefundsConfig::REQUIRED),
    ("refunds-worker", RefundsWorkerConfig::REQUIRED),
    ("support-intake", SupportConfig::REQUIRED),
    ("support-forwarder", ForwarderConfig::REQUIRED),
];

/// The variables the deployment of the function built as `binary` must set.
pub fn required_vars(binary: &str) -> Option<&'static [&'static str]> {
    FUNCTIONS
        .iter()
        .find(|(name, _)| *name == binary)
        .map(|(_, vars)| *vars)
}

/// The AWS SDK configuration (region, credentials) from the Lambda environment, loaded once
/// per process and shared by every client built from it, with [`aws_timeouts`].
pub async fn aws_sdk_config() -> &'static aws_config::SdkConfig {
    static CONFIG: tokio::sync::OnceCell<aws_config::SdkConfig> =
        tokio::sync::OnceCell::const_new();
    CONFIG
        .get_or_init(|| {
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .timeout_config(aws_timeouts())
                .load()
        })
        .await
}

/// How long a call to DynamoDB or SQS may take. Without a bound a request that gets no
/// answer waits until the function's own timeout (10 s for the API), so an answer already
/// committed is lost with the rest of the invocation; with one it fails as a transient
/// error (`StoreError::Unavailable`, `QueueError`), which every caller retries safely.
/// One attempt gets 3 s, all of the SDK's attempts together 6 s.
pub fn aws_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(2))
        .operation_attempt_timeout(std::time::Duration::from_secs(3))
        .operation_timeout(std::time::Duration::from_secs(6))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[tokio::test]
    async fn aws_clients_are_built_with_the_timeouts() {
        assert_eq!(
            aws_sdk_config().await.timeout_config(),
            Some(&aws_timeouts())
        );
    }

    /// A server that accepts connections and never answers: a call with the timeouts ends
    /// with a transient error instead of waiting for ever.
    #[tokio::test]
    async fn a_call_that_gets_no_answer_fails_as_transient() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .endpoint_url(format!("http://{addr}"))
            .timeout_config(aws_timeouts())
            .build();
        let queue = crate::queue::sqs::SqsQueue::new(
            aws_sdk_sqs::Client::from_conf(config),
            format!("http://{addr}/1/q"),
        );
        let sent = crate::queue::Queue::send(
            &queue,
            crate::queue::Message {
                body: "{}".into(),
                group_id: None,
                dedup_id: None,
            },
        );
        // Far beyond the 6 s bound: only a call that never ends reaches this.
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(120), sent)
            .await
            .expect("the call ended");
        let err = outcome.expect_err("nothing answered");
        assert!(format!("{err:?}").contains("TimeoutError"), "{err:?}");
        held.abort();
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// A plausible value for each variable a deployment sets.
    fn sample(var: &str) -> &'static str {
        match var {
            TABLE => "tally-prod",
            NOTIFICATIONS_QUEUE_URL => "https://sqs.eu-west-1.amazonaws.com/1/tally-notifications",
            BILLING_EVENTS_QUEUE_URL => {
                "https://sqs.eu-west-1.amazonaws.com/1/tally-billing-events.fifo"
            }
            TOPUPS_QUEUE_URL => "https://sqs.eu-west-1.amazonaws.com/1/tally-topups.fifo",
            STRIPE_SECRET_KEY => "sk_test_123",
            STRIPE_WEBHOOK_SECRET => "whsec_old, whsec_new",
            APP_URL => "https://studio.example",
            REFRESH_JOBS_QUEUE_URL => "https://sqs.eu-west-1.amazonaws.com/1/tally-refresh-jobs",
            REFUNDS_QUEUE_URL => "https://sqs.eu-west-1.amazonaws.com/1/tally-refunds.fifo",
            SUPPORT_QUEUE_URL => "https://sqs.eu-west-1.amazonaws.com/1/tally-support-tickets.fifo",
            HELPDESK_WEBHOOK_URL => "https://helpdesk.example/hooks/tally",
            HELPDESK_WEBHOOK_SECRET => "hd_secret_0123456789abcdef",
            other => panic!("no sample value for {other}"),
        }
    }

    fn parse(binary: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        match binary {
            "credits-api" => ApiConfig::from_lookup(lookup).map(drop),
            "purchases" => PurchasesConfig::from_lookup(lookup).map(drop),
            "stripe-webhook" => WebhookConfig::from_lookup(lookup).map(drop),
            "billing-events" => WorkerConfig::from_lookup(lookup).map(drop),
            "credit-refresh" => RefreshConfig::from_lookup(lookup).map(drop),
            "refunds" => RefundsConfig::from_lookup(lookup).map(drop),
            "refunds-worker" => RefundsWorkerConfig::from_lookup(lookup).map(drop),
            "support-intake" => SupportConfig::from_lookup(lookup).map(drop),
            "support-forwarder" => ForwarderConfig::from_lookup(lookup).map(drop),
            other => panic!("unknown function {other}"),
        }
    }

    #[test]
    fn each_function_starts_with_what_its_deployment_sets_and_names_what_is_missing() {
        for (binary, vars) in FUNCTIONS {
            let all: Vec<(&str, &str)> = vars.iter().map(|v| (*v, sample(v))).collect();
            parse(binary, env(&all)).unwrap_or_else(|e| panic!("{binary}: {e}"));
            for missing in vars {
                let rest: Vec<(&str, &str)> =
                    all.iter().copied().filter(|(k, _)| k != missing).collect();
                let result = parse(binary, env(&rest));
                // Only auto top-up needs the Stripe key outside purchases and the refunds
                // worker, and the top-ups queue anywhere; without them it stays off.
                if *missing == TOPUPS_QUEUE_URL
                    || *missing == STRIPE_SECRET_KEY
                        && !["purchases", "refunds-worker"].contains(&binary)
                {
                    assert_eq!(result, Ok(()), "{binary} without {missing}");
                } else {
                    assert_eq!(result, Err(ConfigError::Missing(missing)), "{binary}");
                }
            }
        }
        assert_eq!(required_vars("purchases"), Some(PurchasesConfig::REQUIRED));
        assert_eq!(required_vars("local"), None);
    }

    #[test]
    fn values_are_typed_and_optional_ones_default() {
        let cfg = PurchasesConfig::from_lookup(env(&[
            (TABLE, "tally-prod"),
            (NOTIFICATIONS_QUEUE_URL, sample(NOTIFICATIONS_QUEUE_URL)),
            (STRIPE_SECRET_KEY, " sk_test_123\n"),
            (APP_URL, "https://studio.example"),
            (DYNAMODB_ENDPOINT, "http://127.0.0.1:8000"),
            (SQS_ENDPOINT, ""),
            (CATALOG, "/opt/catalog.json"),
            (
                CHECKOUT_SUCCESS_URL,
                "https://studio.example/billing?ok={CHECKOUT_SESSION_ID}",
            ),
        ]))
        .unwrap();
        assert_eq!(cfg.store.table, "tally-prod");
        assert_eq!(
            cfg.store.endpoint.as_ref().map(HttpUrl::as_str),
            Some("http://127.0.0.1:8000")
        );
        assert_eq!(cfg.alerts.sqs_endpoint, None, "empty means unset");
        assert_eq!(cfg.catalog_path, Some(PathBuf::from("/opt/catalog.json")));
        assert_eq!(cfg.stripe_secret_key.expose(), "sk_test_123");
        assert_eq!(cfg.alerts.topups_queue_url, None, "auto top-up off");
        assert_eq!(cfg.app_url.as_str(), "https://studio.example");
        assert_eq!(
            cfg.return_urls
                .checkout_success
                .as_ref()
                .map(HttpUrl::as_str),
            Some("https://studio.example/billing?ok={CHECKOUT_SESSION_ID}")
        );
        assert_eq!(cfg.return_urls.checkout_cancel, None);
        assert!(
            !format!("{cfg:?}").contains("sk_test"),
            "secrets stay out of logs"
        );

        let hook = WebhookConfig::from_lookup(env(&[
            (STRIPE_WEBHOOK_SECRET, " whsec_old,, whsec_new ,"),
            (BILLING_EVENTS_QUEUE_URL, sample(BILLING_EVENTS_QUEUE_URL)),
        ]))
        .unwrap();
        let secrets: Vec<&str> = hook.webhook_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["whsec_old", "whsec_new"]);
        assert_eq!(hook.sqs_endpoint, None);
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        let api = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = vec![
                (TABLE, "tally-prod"),
                (NOTIFICATIONS_QUEUE_URL, sample(NOTIFICATIONS_QUEUE_URL)),
            ];
            pairs.extend_from_slice(extra);
            ApiConfig::from_lookup(env(&pairs))
        };
        let var_of = |r: Result<ApiConfig, ConfigError>| match r {
            Err(ConfigError::Invalid { var, .. }) => var,
            other => panic!("expected an invalid variable, got {other:?}"),
        };
        assert!(api(&[]).is_ok());
        assert_eq!(var_of(api(&[(TABLE, "  ")])), TABLE);
        assert_eq!(
            var_of(api(&[(DYNAMODB_ENDPOINT, "localhost:8000")])),
            DYNAMODB_ENDPOINT
        );
        assert_eq!(
            var_of(api(&[(SQS_ENDPOINT, "ftp://queue.example")])),
            SQS_ENDPOINT
        );
        assert_eq!(
            var_of(api(&[(NOTIFICATIONS_QUEUE_URL, "tally-notifications")])),
            NOTIFICATIONS_QUEUE_URL
        );

        let purchases = PurchasesConfig::from_lookup(env(&[
            (TABLE, "tally-prod"),
            (NOTIFICATIONS_QUEUE_URL, sample(NOTIFICATIONS_QUEUE_URL)),
            (STRIPE_SECRET_KEY, "sk_test_123"),
            (APP_URL, "studio.example"),
        ]));
        assert!(
            matches!(&purchases, Err(ConfigError::Invalid { var: APP_URL, .. })),
            "{purchases:?}"
        );
        let message = purchases.unwrap_err().to_string();
        assert!(message.starts_with("TALLY_APP_URL is invalid"), "{message}");

        let hook = WebhookConfig::from_lookup(env(&[
            (STRIPE_WEBHOOK_SECRET, " , "),
            (BILLING_EVENTS_QUEUE_URL, sample(BILLING_EVENTS_QUEUE_URL)),
        ]));
        assert_eq!(
            hook,
            Err(ConfigError::Invalid {
                var: STRIPE_WEBHOOK_SECRET,
                reason: "holds no secret".into()
            })
        );
        assert_eq!(
            ConfigError::Missing(TABLE).to_string(),
            "TALLY_TABLE is not set"
        );

        let refresh = |shards: &'static str| {
            RefreshConfig::from_lookup(env(&[
                (TABLE, "tally-prod"),
                (REFRESH_JOBS_QUEUE_URL, sample(REFRESH_JOBS_QUEUE_URL)),
                (NOTIFICATIONS_QUEUE_URL, sample(NOTIFICATIONS_QUEUE_URL)),
                (DUE_SHARDS, shards),
            ]))
        };
        assert_eq!(
            refresh("").unwrap().due_shards,
            16,
            "empty means the default"
        );
        assert_eq!(refresh(" 64 ").unwrap().due_shards, 64);
        for bad in ["0", "1001", "many"] {
            assert!(
                matches!(
                    refresh(bad),
                    Err(ConfigError::Invalid {
                        var: DUE_SHARDS,
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
