//! Credit alerts and auto top-up: a workspace's settings ([`AlertSettings`]), the commit
//! observer that notices crossings ([`observer`]) and the off-session pack purchase it
//! makes ([`topup`]).
//!
//! After an operation commits, a fall of the available balance below a workspace's
//! threshold emits one alert on the `notifications` queue per crossing (the balance must
//! rise above the threshold again to re-arm it), and a crossing of the auto top-up
//! threshold buys the chosen pack off-session with the saved card.
//!
//! The top-up's Stripe idempotency key is derived from the journal entry that crossed the
//! threshold, so a retried request cannot charge twice; the credits arrive like any other
//! purchase, through the webhook (`payment_intent.succeeded`), once per payment.

pub mod observer;
pub mod topup;

pub use observer::{CreditAlerts, SettingsCache};

use crate::catalog::Catalog;
use crate::money::Credits;
use crate::payments::Payments;
use crate::service::CommitObserver;
use crate::store::DocStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

pub const ALERTS_SK: &str = "ALERTS";
/// Most thresholds a workspace may set.
pub const MAX_THRESHOLDS: usize = 10;

/// A workspace's alert settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertSettings {
    /// Alert when the available balance falls below each of these.
    pub below_credits: Vec<Credits>,
    pub auto_topup: Option<AutoTopUp>,
    /// When auto top-up last charged: at most one charge per [`TOPUP_COOLDOWN_MINUTES`],
    /// so a burst of crossings before the first pack's credits arrive cannot stack charges.
    #[serde(default)]
    pub last_topup_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Minimum time between two auto top-up charges of one workspace.
pub const TOPUP_COOLDOWN_MINUTES: i64 = 10;

/// How long a Lambda function reuses a workspace's alert settings before reading them
/// again; a change takes effect within this long.
pub const SETTINGS_TTL_SECONDS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AutoTopUp {
    /// Which pack to buy.
    pub pack: String,
    /// Buy it when the available balance falls below this.
    pub below_credits: Credits,
}

/// The observer for a Lambda function: alerts to the notifications queue, top-ups through
/// Stripe when a Stripe key is configured.
pub async fn from_config(
    docs: Arc<dyn DocStore>,
    catalog: Arc<Catalog>,
    cfg: &crate::config::AlertsConfig,
) -> Result<Arc<dyn CommitObserver>, crate::payments::PaymentsError> {
    let client = crate::queue::sqs::SqsQueue::client(cfg.sqs_endpoint.as_ref()).await;
    let payments: Option<Arc<dyn Payments>> = match &cfg.stripe_secret_key {
        Some(key) => Some(Arc::new(crate::payments::stripe_api::StripePayments::new(
            key.expose(),
            None,
        )?)),
        None => None,
    };
    Ok(Arc::new(CreditAlerts {
        docs,
        notifications: Arc::new(crate::queue::sqs::SqsQueue::new(
            client,
            cfg.notifications_queue_url.as_str(),
        )),
        payments,
        catalog,
        settings_ttl: std::time::Duration::from_secs(SETTINGS_TTL_SECONDS),
        cache: Default::default(),
    }))
}
