//! Credit alerts and auto top-up. After an operation commits, a fall of the available
//! balance below a workspace's threshold emits one alert on the `notifications` queue per
//! crossing (the balance must rise above the threshold again to re-arm it), and a crossing
//! of the auto top-up threshold buys the chosen pack off-session with the saved card.
//!
//! The top-up's Stripe idempotency key is derived from the journal entry that crossed the
//! threshold, so a retried request cannot charge twice; the credits arrive like any other
//! purchase, through the webhook (`payment_intent.succeeded`), once per payment.

use crate::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
use crate::catalog::Catalog;
use crate::ids::WorkspaceId;
use crate::ledger::{Balance, Outcome, PlanStatus, WorkspaceState};
use crate::money::Cents;
use crate::payments::{Payments, TopUp};
use crate::queue::{Message, Queue};
use crate::store::DocStore;
use crate::store::docs;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use utoipa::ToSchema;

pub const ALERTS_SK: &str = "ALERTS";
/// Most thresholds a workspace may set.
pub const MAX_THRESHOLDS: usize = 10;

/// A workspace's alert settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertSettings {
    /// Alert when the available balance falls below each of these.
    pub below_credits: Vec<u64>,
    pub auto_topup: Option<AutoTopUp>,
    /// When auto top-up last charged: at most one charge per [`TOPUP_COOLDOWN_MINUTES`],
    /// so a burst of crossings before the first pack's credits arrive cannot stack charges.
    #[serde(default)]
    pub last_topup_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Minimum time between two auto top-up charges of one workspace.
pub const TOPUP_COOLDOWN_MINUTES: i64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AutoTopUp {
    /// Which pack to buy.
    pub pack: String,
    /// Buy it when the available balance falls below this.
    pub below_credits: u64,
}

/// Told about every committed ledger operation (not about replays).
#[async_trait]
pub trait CommitObserver: Send + Sync {
    async fn committed(
        &self,
        workspace: &WorkspaceId,
        before: Balance,
        after: &WorkspaceState,
        outcome: &Outcome,
    );
}

pub struct CreditAlerts {
    pub docs: Arc<dyn DocStore>,
    pub notifications: Arc<dyn Queue>,
    pub payments: Option<Arc<dyn Payments>>,
    pub catalog: Arc<Catalog>,
}

fn crossed(before: u64, after: u64, threshold: u64) -> bool {
    before >= threshold && after < threshold
}

#[async_trait]
impl CommitObserver for CreditAlerts {
    async fn committed(
        &self,
        workspace: &WorkspaceId,
        before: Balance,
        after: &WorkspaceState,
        outcome: &Outcome,
    ) {
        let now = outcome.balance.available;
        if now >= before.available {
            return;
        }
        let settings: AlertSettings = match docs::get(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            ALERTS_SK,
        )
        .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(workspace = %workspace, error = %e, "could not read alert settings");
                return;
            }
        };
        let entry = outcome.entries.last().copied().unwrap_or_default();
        for t in settings
            .below_credits
            .iter()
            .filter(|t| crossed(before.available, now, **t))
        {
            self.notify(json!({
                "type": "credits.below_threshold",
                "workspace": workspace,
                "threshold": t,
                "available": now,
                "entry": entry,
            }))
            .await;
        }
        if let Some(topup) = settings
            .auto_topup
            .filter(|a| crossed(before.available, now, a.below_credits))
        {
            self.top_up(workspace, after, &topup, entry).await;
        }
    }
}

impl CreditAlerts {
    async fn notify(&self, body: serde_json::Value) {
        let message = Message {
            body: body.to_string(),
            group_id: None,
            dedup_id: None,
        };
        if let Err(e) = self.notifications.send(message).await {
            tracing::error!(error = %e, notification = %body, "could not queue a notification");
        }
    }

    async fn top_up(
        &self,
        workspace: &WorkspaceId,
        state: &WorkspaceState,
        topup: &AutoTopUp,
        entry: u64,
    ) {
        let outcome = self.try_top_up(workspace, state, topup, entry).await;
        let body = match &outcome {
            Ok(payment) => {
                json!({"type": "topup.charged", "workspace": workspace, "pack": topup.pack, "payment": payment, "entry": entry})
            }
            Err(why) => {
                json!({"type": "topup.failed", "workspace": workspace, "pack": topup.pack, "reason": why, "entry": entry})
            }
        };
        match &outcome {
            Ok(payment) => {
                tracing::info!(workspace = %workspace, payment = %payment, "auto top-up charged")
            }
            Err(why) => {
                tracing::warn!(workspace = %workspace, reason = %why, "auto top-up not charged")
            }
        }
        self.notify(body).await;
    }

    async fn try_top_up(
        &self,
        workspace: &WorkspaceId,
        state: &WorkspaceState,
        topup: &AutoTopUp,
        entry: u64,
    ) -> Result<String, String> {
        let payments = self
            .payments
            .as_ref()
            .ok_or("payments are not configured here")?;
        let pack = self
            .catalog
            .pack(&topup.pack)
            .ok_or("the pack no longer exists")?;
        let profile: BillingProfile =
            docs::get(self.docs.as_ref(), &workspace_pk(workspace), PROFILE_SK)
                .await
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
        let customer = profile.customer.ok_or("the workspace has never paid")?;
        let payment_method = profile.payment_method.ok_or("no saved card")?;
        // Claim the charge with a versioned write: concurrent crossings race for one claim.
        let now = chrono::Utc::now();
        let mut claimed = false;
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            ALERTS_SK,
            |cur: Option<AlertSettings>| {
                let mut s = cur?;
                if s.last_topup_at
                    .is_some_and(|t| now - t < chrono::Duration::minutes(TOPUP_COOLDOWN_MINUTES))
                {
                    claimed = false;
                    return None;
                }
                s.last_topup_at = Some(now);
                claimed = true;
                Some(s)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        if !claimed {
            return Err(format!(
                "a top-up was charged less than {TOPUP_COOLDOWN_MINUTES} minutes ago"
            ));
        }
        let discount = state
            .plan
            .as_ref()
            .filter(|p| matches!(p.status, PlanStatus::Active | PlanStatus::PastDue))
            .and_then(|p| self.catalog.plan(&p.plan))
            .map_or(0, |p| p.pack_discount_pct);
        payments
            .charge_saved_method(&TopUp {
                workspace: workspace.clone(),
                customer,
                payment_method,
                pack: pack.id.clone(),
                amount: Cents::new(pack.price_cents).discounted(discount).get(),
                idempotency_key: format!("tally-topup-{workspace}-{entry}"),
            })
            .await
            .map_err(|e| e.to_string())
    }
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
        Some(key) => Some(Arc::new(crate::payments::stripe::StripePayments::new(
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
    }))
}

#[cfg(test)]
mod tests {
    use super::crossed;

    #[test]
    fn a_threshold_is_crossed_only_on_the_way_down_through_it() {
        assert!(crossed(100, 99, 100));
        assert!(crossed(150, 20, 100));
        assert!(!crossed(99, 50, 100), "already below: no second alert");
        assert!(!crossed(100, 100, 100));
        assert!(!crossed(50, 150, 100));
    }
}
