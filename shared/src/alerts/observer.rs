//! Watches committed ledger operations for threshold crossings.

use super::ALERTS_SK;
use super::{AlertSettings, AutoTopUp, TopUpRequest};
use crate::billing::records::workspace_pk;
use crate::catalog::Catalog;
use crate::ids::WorkspaceId;
use crate::ledger::{Outcome, WorkspaceState};
use crate::money::Credits;
use crate::queue::{Message, Queue};
use crate::service::{Before, CommitObserver};
use crate::store::DocStore;
use crate::store::docs;
use crate::subscriptions::Entitlements;
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;

pub struct CreditAlerts {
    pub docs: Arc<dyn DocStore>,
    pub notifications: Arc<dyn Queue>,
    /// Where crossings of the auto top-up threshold are sent ([`super::TopUps`] charges);
    /// `None`: auto top-up is off here.
    pub topups: Option<Arc<dyn Queue>>,
    /// Whether crossings seen here ask for a top-up at all: only generations' (credits-api)
    /// do. Functions whose operations grant, take credits back or expire them (billing
    /// events, purchases, refund requests, support's settlements, the scheduled sweep) send
    /// alerts only: a refund of a top-up must not buy it again, and credits expiring with
    /// nobody using them are no reason to charge a card. Even here only the operation's own
    /// drop buys (see [`Before::settled`]).
    pub asks_for_top_ups: bool,
    pub catalog: Arc<Catalog>,
    /// How long a workspace's settings, once read, are reused by this process (zero:
    /// read after every operation that lowers the balance). A change made elsewhere takes
    /// effect within this long; a top-up re-reads the settings before it charges.
    pub settings_ttl: std::time::Duration,
    pub cache: SettingsCache,
}

/// Alert settings recently read, per workspace (bounded: cleared when full).
#[derive(Default)]
pub struct SettingsCache(
    std::sync::Mutex<
        std::collections::HashMap<WorkspaceId, (std::time::Instant, Option<AlertSettings>)>,
    >,
);

/// Workspaces whose settings one process keeps at most.
const CACHED_WORKSPACES: usize = 10_000;

impl SettingsCache {
    fn get(
        &self,
        workspace: &WorkspaceId,
        ttl: std::time::Duration,
    ) -> Option<Option<AlertSettings>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(workspace)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, s)| s.clone())
    }

    fn put(&self, workspace: &WorkspaceId, settings: Option<AlertSettings>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CACHED_WORKSPACES {
            map.clear();
        }
        map.insert(workspace.clone(), (std::time::Instant::now(), settings));
    }
}

fn crossed(before: Credits, after: Credits, threshold: Credits) -> bool {
    before >= threshold && after < threshold
}

#[async_trait]
impl CommitObserver for CreditAlerts {
    async fn committed(
        &self,
        workspace: &WorkspaceId,
        before: Before,
        after: &WorkspaceState,
        outcome: &Outcome,
    ) {
        let now = outcome.balance.available;
        if now >= before.balance.available {
            return;
        }
        let cached = if self.settings_ttl.is_zero() {
            None
        } else {
            self.cache.get(workspace, self.settings_ttl)
        };
        let settings: Option<AlertSettings> = match cached {
            Some(s) => s,
            None => {
                match docs::get(self.docs.as_ref(), &workspace_pk(workspace), ALERTS_SK).await {
                    Ok(s) => {
                        if !self.settings_ttl.is_zero() {
                            self.cache.put(workspace, s.clone());
                        }
                        s
                    }
                    Err(e) => {
                        tracing::error!(workspace = %workspace, error = %e, "could not read alert settings");
                        return;
                    }
                }
            }
        };
        let Some(settings) = settings else {
            return;
        };
        let entry = outcome.entries.last().copied().unwrap_or_default();
        for t in settings
            .below_credits
            .iter()
            .filter(|t| crossed(before.balance.available, now, **t))
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
        // Only a drop the operation itself made buys: credits that lapsed before it (which
        // it merely records) only alert, whichever operation records them first.
        if let Some(topup) = settings.auto_topup.filter(|a| {
            self.asks_for_top_ups && crossed(before.settled.available, now, a.below_credits)
        }) {
            self.request_top_up(workspace, after, topup, entry).await;
        }
    }
}

impl CreditAlerts {
    async fn notify(&self, body: serde_json::Value) {
        notify(self.notifications.as_ref(), body).await
    }

    async fn request_top_up(
        &self,
        workspace: &WorkspaceId,
        after: &WorkspaceState,
        topup: AutoTopUp,
        entry: u64,
    ) {
        let request = TopUpRequest {
            kind: super::topup::TOPUP_REQUEST_KIND.to_owned(),
            workspace: workspace.clone(),
            entry,
            topup,
            available: after.balance().available,
            discount_pct: Entitlements::of(after.plan.as_ref(), &self.catalog).pack_discount_pct,
        };
        let Some(queue) = &self.topups else {
            self.notify(json!({"type": "topup.failed", "workspace": workspace, "pack": request.topup.pack, "reason": "auto top-up is not available here", "entry": entry}))
                .await;
            return;
        };
        if let Err(e) = queue.send(request.message()).await {
            // The operation has committed: no top-up is asked for until the balance rises to
            // the threshold and is crossed again (the log names the workspace).
            tracing::error!(workspace = %workspace, entry, error = %e, "could not ask for an auto top-up");
        }
    }
}

/// Queues a notification for the studio; a failure is logged, never the caller's.
pub(super) async fn notify(queue: &dyn Queue, body: serde_json::Value) {
    let message = Message {
        body: body.to_string(),
        group_id: None,
        dedup_id: None,
    };
    if let Err(e) = queue.send(message).await {
        tracing::error!(error = %e, notification = %body, "could not queue a notification");
    }
}

#[cfg(test)]
mod tests {
    use super::crossed;
    use crate::money::Credits;

    #[test]
    fn a_threshold_is_crossed_only_on_the_way_down_through_it() {
        let crossed = |b, a, t| crossed(Credits::new(b), Credits::new(a), Credits::new(t));
        assert!(crossed(100, 99, 100));
        assert!(crossed(150, 20, 100));
        assert!(!crossed(99, 50, 100), "already below: no second alert");
        assert!(!crossed(100, 100, 100));
        assert!(!crossed(50, 150, 100));
    }
}
