//! Auto top-up: buys the chosen pack off-session with the workspace's saved card, at most
//! once per cooldown, at the price the plan in effect gives.

use super::observer::CreditAlerts;
use super::{ALERTS_SK, AlertSettings, AutoTopUp, TOPUP_COOLDOWN_MINUTES};
use crate::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
use crate::ids::{PaymentIntentId, WorkspaceId};
use crate::ledger::WorkspaceState;
use crate::payments::TopUp;
use crate::store::docs;
use crate::subscriptions::Entitlements;
use serde_json::json;

/// Why a top-up was not charged when the stored settings no longer ask for it.
const SETTINGS_CHANGED: &str = "the auto top-up settings changed";

impl CreditAlerts {
    pub(super) async fn top_up(
        &self,
        workspace: &WorkspaceId,
        state: &WorkspaceState,
        topup: &AutoTopUp,
        entry: u64,
    ) {
        // The settings the charge follows: those stored when it is claimed.
        let mut topup = topup.clone();
        let outcome = self.try_top_up(workspace, state, &mut topup, entry).await;
        if outcome.as_ref().is_err_and(|why| why == SETTINGS_CHANGED) {
            // Turned off or changed since this process read the settings: nothing to tell.
            tracing::info!(workspace = %workspace, "auto top-up settings changed; not charged");
            return;
        }
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
        topup: &mut AutoTopUp,
        entry: u64,
    ) -> Result<PaymentIntentId, String> {
        let payments = self
            .payments
            .as_ref()
            .ok_or("payments are not configured here")?;
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
        let mut changed = false;
        let mut unknown = false;
        let mut chosen: Option<AutoTopUp> = None;
        let available = state.balance().available;
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            ALERTS_SK,
            |cur: Option<AlertSettings>| {
                // Run again when a concurrent write wins: nothing from an earlier run counts.
                (claimed, changed, unknown, chosen) = (false, true, false, None);
                let mut s = cur?;
                // The settings as stored now, not as this process remembers them: a top-up
                // turned off since is not charged; one changed since is charged as it stands
                // now, if the balance is below its threshold.
                changed = match &s.auto_topup {
                    Some(stored) if stored == &*topup => false,
                    Some(stored) => available >= stored.below_credits,
                    None => true,
                };
                if changed {
                    return None;
                }
                chosen = s.auto_topup.clone();
                // A pack that no longer exists is not claimed: the cooldown stays free for
                // a charge once the settings name one that does.
                if chosen
                    .as_ref()
                    .is_some_and(|t| self.catalog.pack(&t.pack).is_none())
                {
                    unknown = true;
                    return None;
                }
                if s.last_topup_at
                    .is_some_and(|t| now - t < chrono::Duration::minutes(TOPUP_COOLDOWN_MINUTES))
                {
                    return None;
                }
                s.last_topup_at = Some(now);
                claimed = true;
                Some(s)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        if changed {
            return Err(SETTINGS_CHANGED.to_owned());
        }
        if unknown {
            if let Some(stored) = chosen {
                *topup = stored;
            }
            return Err("the pack no longer exists".to_owned());
        }
        if !claimed {
            return Err(format!(
                "a top-up was charged less than {TOPUP_COOLDOWN_MINUTES} minutes ago"
            ));
        }
        if let Some(stored) = chosen {
            *topup = stored;
        }
        let pack = self
            .catalog
            .pack(&topup.pack)
            .ok_or("the pack no longer exists")?;
        let discount = Entitlements::of(state.plan.as_ref(), &self.catalog).pack_discount_pct;
        let amount = pack.price_cents.discounted(discount);
        let key = format!("tally-topup-{workspace}-{entry}");
        let paid = payments
            .charge_saved_method(&TopUp {
                workspace: workspace.clone(),
                customer: customer.clone(),
                payment_method,
                pack: pack.id.clone(),
                amount,
                idempotency_key: key.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        // Its invoice, paid by the payment just made (never a second charge). Without one
        // the payment still stands; support can issue it (the help pages' "the transaction
        // exists but no invoice").
        let invoice = crate::payments::PaidInvoice {
            workspace: workspace.clone(),
            customer,
            lines: vec![(
                format!("Auto top-up: {} ({} credits)", pack.id, pack.credits),
                amount.get() as i64,
            )],
            description: format!("Auto top-up, paid by {paid}"),
            metadata: std::collections::BTreeMap::from([
                ("kind".to_owned(), "top_up".to_owned()),
                ("payment_intent".to_owned(), paid.to_string()),
            ]),
            idempotency_key: format!("{key}-receipt"),
        };
        if let Err(e) = payments.paid_invoice(&invoice).await {
            tracing::error!(workspace = %workspace, payment = %paid, error = %e, "auto top-up paid but its invoice was not created");
        }
        Ok(paid)
    }
}
