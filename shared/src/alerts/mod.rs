//! Credit alerts and auto top-up: a workspace's settings ([`AlertSettings`]), the commit
//! observer that notices crossings ([`observer`]) and the off-session pack purchase it
//! makes ([`topup`]).
//!
//! After an operation commits, a fall of the available balance below a workspace's
//! threshold emits one alert on the `notifications` queue per crossing (the balance must
//! rise above the threshold again to re-arm it), and a crossing of the auto top-up
//! threshold asks for the chosen pack to be bought off-session with the saved card: a
//! request on the top-ups queue, which [`TopUps`] consumes (the billing-events function
//! in AWS), so the operation that crossed never waits for Stripe.
//!
//! The top-up's Stripe idempotency key is derived from the journal entry that crossed the
//! threshold, and the claim on the settings records that entry and then the payment, so
//! neither a retried request nor a redelivered top-up can charge twice; the credits arrive
//! like any other purchase, through the webhook (`payment_intent.succeeded`), once per
//! payment.

pub mod observer;
pub mod topup;

pub use observer::{CreditAlerts, SettingsCache};
pub use topup::{TOPUPS_MAX_RECEIVES, TOPUPS_QUEUE, TopUpRequest, TopUps};

use crate::catalog::Catalog;
use crate::money::Credits;
use crate::service::CommitObserver;
use crate::store::DocStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

pub const ALERTS_SK: &str = "ALERTS";
/// Most thresholds a workspace may set.
pub const MAX_THRESHOLDS: usize = 10;

/// Crossings [`AlertSettings::topup_claims`] keeps (a top-up claims at most one per
/// cooldown; a request waits in its queue at most about half an hour).
pub const RECENT_TOPUP_CLAIMS: usize = 16;

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
    /// The last top-up claimed: which crossing claimed it, and the payment once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topup_claim: Option<TopUpClaim>,
    /// The crossings (journal entries) that claimed a top-up lately, oldest first, at most
    /// [`RECENT_TOPUP_CLAIMS`]; begun with the claim made before the list was kept, or 0
    /// when there was none. A crossing's request reaching the queue after a later one
    /// claimed, and newer than the first here, is known never to have claimed (and ends)
    /// or to have claimed (and needs a person); an older one, or one when there is no
    /// list, is unknown (a person).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topup_claims: Option<Vec<u64>>,
    /// The saved card (`pm_...`) Stripe refused at the last top-up (declined, expired):
    /// it is not tried again, so a declining card is not charged at every crossing. A
    /// card saved since (at a checkout) is tried; saving these settings tries this one
    /// again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_card: Option<String>,
    /// A dispute (`dp_...`) of one of the workspace's payments, seen while auto top-up was
    /// on: no card is charged off-session until these settings are saved again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by_dispute: Option<String>,
}

/// A dispute of a payment of `workspace`: auto top-up, if on, stops until the owner saves
/// the settings again (a card whose holder disputes a charge is not charged again).
pub async fn stop_for_dispute(
    docs: &dyn DocStore,
    workspace: &crate::ids::WorkspaceId,
    dispute: &str,
) -> Result<(), crate::store::StoreError> {
    crate::store::docs::update(
        docs,
        &crate::billing::records::workspace_pk(workspace),
        ALERTS_SK,
        |cur: Option<AlertSettings>| {
            let mut s = cur?;
            if s.auto_topup.is_none() || s.stopped_by_dispute.is_some() {
                return None;
            }
            s.stopped_by_dispute = Some(dispute.to_owned());
            Some(s)
        },
    )
    .await?;
    Ok(())
}

/// A top-up claimed by the crossing at journal entry `entry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TopUpClaim {
    /// The journal entry whose operation crossed the threshold.
    pub entry: u64,
    /// The pack being bought.
    pub pack: String,
    pub claimed_at: chrono::DateTime<chrono::Utc>,
    /// The Stripe customer and saved card charged, and the amount: decided at the claim,
    /// kept for every retry of the same charge.
    pub customer: String,
    pub payment_method: String,
    pub amount_cents: u64,
    /// The pack's credits, as its invoice line says.
    pub credits: u64,
    /// The payment intent, once charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<String>,
    /// Stripe answered the payment as still being collected (`processing`): the request
    /// asks Stripe again at each delivery, and makes the receipt once it is taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub processing: bool,
    /// The payment Stripe was collecting failed: nothing was taken, and the card counts
    /// as refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub declined: bool,
}

/// Minimum time between two auto top-up charges of one workspace.
pub const TOPUP_COOLDOWN_MINUTES: i64 = 10;

/// How long a top-up's credits may take to arrive before a later crossing buys again
/// anyway (their event stuck, for a person to redrive).
pub const TOPUP_CREDITS_WAIT_HOURS: i64 = 24;

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

/// The observer for a Lambda function: alerts to the notifications queue, top-up requests
/// to the top-ups queue when one is configured.
pub async fn from_config(
    docs: Arc<dyn DocStore>,
    catalog: Arc<Catalog>,
    cfg: &crate::config::AlertsConfig,
) -> Arc<dyn CommitObserver> {
    Arc::new(observer(docs, catalog, cfg, true).await)
}

/// The observer for a function that sends credit alerts but never asks for a top-up (see
/// [`CreditAlerts::asks_for_top_ups`]).
pub async fn alerts_only(
    docs: Arc<dyn DocStore>,
    catalog: Arc<Catalog>,
    cfg: &crate::config::AlertsConfig,
) -> Arc<dyn CommitObserver> {
    Arc::new(observer(docs, catalog, cfg, false).await)
}

async fn observer(
    docs: Arc<dyn DocStore>,
    catalog: Arc<Catalog>,
    cfg: &crate::config::AlertsConfig,
    asks_for_top_ups: bool,
) -> CreditAlerts {
    let client = crate::queue::sqs::SqsQueue::client(cfg.sqs_endpoint.as_ref()).await;
    let topups: Option<Arc<dyn crate::queue::Queue>> = cfg.topups_queue_url.as_ref().map(|url| {
        Arc::new(crate::queue::sqs::SqsQueue::new(
            client.clone(),
            url.as_str(),
        )) as Arc<dyn crate::queue::Queue>
    });
    CreditAlerts {
        docs,
        notifications: Arc::new(crate::queue::sqs::SqsQueue::new(
            client,
            cfg.notifications_queue_url.as_str(),
        )),
        topups: topups.filter(|_| asks_for_top_ups),
        asks_for_top_ups,
        catalog,
        settings_ttl: std::time::Duration::from_secs(SETTINGS_TTL_SECONDS),
        cache: Default::default(),
    }
}
