//! Auto top-up: buys the chosen pack off-session with the workspace's saved card, at most
//! once per cooldown, at the price the plan in effect gives.
//!
//! The commit observer only asks for it: a [`TopUpRequest`] on the top-ups queue, named by
//! the journal entry that crossed the threshold. [`TopUps`] consumes the queue: it claims the
//! charge on the workspace's settings (recording the entry), charges, records the payment,
//! issues the invoice, and reports. Each step can be run again: a failure Stripe may get
//! over (a timeout, a 5xx) or a store hiccup leaves the message to be delivered again, and
//! the rerun continues the same claim, with the same Stripe idempotency key, without a
//! second charge. The request that crossed the threshold never waits for Stripe.

use super::observer::notify;
use super::{
    ALERTS_SK, AlertSettings, AutoTopUp, TOPUP_COOLDOWN_MINUTES, TOPUP_CREDITS_WAIT_HOURS,
    TopUpClaim,
};
use crate::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::ids::{CustomerId, PaymentIntentId, PaymentMethodId, WorkspaceId};
use crate::money::{Cents, Credits};
use crate::payments::{Collection, Payments, PaymentsError, TopUp, TopUpPayment};
use crate::queue::{ConsumeError, Consumer, Delivery, Message, Queue};
use crate::store::{DocStore, StoreError, docs};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

/// The local name of the top-ups queue.
pub const TOPUPS_QUEUE: &str = "topups";
/// Deliveries of one request before it moves to the dead-letter queue.
pub const TOPUPS_MAX_RECEIVES: u32 = 5;
/// A claim never confirmed this long after it was made is left to a person: Stripe keeps
/// an idempotency key for 24 hours, so charging again later could charge twice.
pub const UNCONFIRMED_HOURS: i64 = 23;
/// What a top-up request's `kind` says, telling it apart from a Stripe event.
pub const TOPUP_REQUEST_KIND: &str = "auto_topup";

/// A crossing of the auto top-up threshold, as the observer saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpRequest {
    /// Always [`TOPUP_REQUEST_KIND`].
    pub kind: String,
    pub workspace: WorkspaceId,
    /// The journal entry that crossed: the charge's identity (its Stripe idempotency key).
    pub entry: u64,
    /// The settings the observer followed.
    pub topup: AutoTopUp,
    /// The available balance after the crossing.
    pub available: Credits,
    /// The pack discount of the plan in effect at the crossing.
    pub discount_pct: u8,
}

impl TopUpRequest {
    pub fn message(&self) -> Message {
        let ws = queue_name(&self.workspace);
        Message {
            body: serde_json::to_string(self).expect("a top-up request serialises"),
            group_id: Some(format!("topup-{ws}")),
            dedup_id: Some(format!("topup-{ws}-{}", self.entry)),
        }
    }

    /// Whether `body` is a top-up request (rather than a Stripe event).
    pub fn is_request(body: &str) -> bool {
        #[derive(Deserialize)]
        struct Kind {
            kind: Option<String>,
        }
        serde_json::from_str::<Kind>(body)
            .is_ok_and(|k| k.kind.as_deref() == Some(TOPUP_REQUEST_KIND))
    }
}

/// The workspace as it names a top-up's message group and deduplication id, which SQS
/// caps at 128 characters: the id itself up to 96 characters (a workspace id may have
/// 128), else its first 64 and a digest of the whole.
fn queue_name(workspace: &WorkspaceId) -> String {
    let s = workspace.as_str();
    if s.len() <= 96 {
        s.to_owned()
    } else {
        format!(
            "{}~{}",
            &s[..64],
            crate::payments::stripe_api::short_digest(s)
        )
    }
}

fn disputed_reason(dispute: &str) -> String {
    format!(
        "a payment of the workspace is disputed ({dispute}): auto top-up is stopped until the \
         alert settings are saved again"
    )
}

/// Consumes top-up requests: claims, charges and reports each once.
pub struct TopUps {
    pub docs: Arc<dyn DocStore>,
    /// The ledger's states, read for the balance when a request is taken up (never written).
    pub states: Arc<dyn crate::store::LedgerStore>,
    /// `None` where no Stripe key is configured: every request is reported as not charged.
    pub payments: Option<Arc<dyn Payments>>,
    pub catalog: Arc<Catalog>,
    pub notifications: Arc<dyn Queue>,
    pub clock: Arc<dyn Clock>,
}

/// How a request ended, when it ended.
enum Ended {
    Charged(PaymentIntentId),
    /// Not charged, for a reason the workspace is told.
    Failed(String),
    /// Not charged because the settings no longer ask for it, or the balance is no longer
    /// below their threshold: nothing to tell.
    Withdrawn,
}

fn retry_store(e: StoreError) -> ConsumeError {
    ConsumeError::retry(e)
}

/// A payment Stripe is still collecting: the request is delivered again to ask once more
/// (the queue's visibility timeout apart, up to its last delivery).
fn still_processing(paid: &PaymentIntentId) -> ConsumeError {
    ConsumeError::retry(format!("top-up payment {paid} is still processing"))
}

#[async_trait]
impl Consumer for TopUps {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        let req: TopUpRequest = serde_json::from_str(&delivery.body)
            .map_err(|e| ConsumeError::poison(format!("not a top-up request: {e}")))?;
        if req.kind != TOPUP_REQUEST_KIND {
            return Err(ConsumeError::poison(format!(
                "not a top-up request: kind {:?}",
                req.kind
            )));
        }
        let mut pack = req.topup.pack.clone();
        let ended = self.run(&req, &mut pack).await?;
        let workspace = &req.workspace;
        let body = match &ended {
            Ended::Withdrawn => {
                tracing::info!(workspace = %workspace, entry = req.entry,
                    "auto top-up not charged: turned off, or the balance is no longer below its threshold");
                return Ok(());
            }
            Ended::Charged(payment) => {
                tracing::info!(workspace = %workspace, payment = %payment, "auto top-up charged");
                json!({"type": "topup.charged", "workspace": workspace, "pack": pack, "payment": payment, "entry": req.entry})
            }
            Ended::Failed(why) => {
                tracing::warn!(workspace = %workspace, reason = %why, "auto top-up not charged");
                json!({"type": "topup.failed", "workspace": workspace, "pack": pack, "reason": why, "entry": req.entry})
            }
        };
        notify(self.notifications.as_ref(), body).await;
        Ok(())
    }
}

impl TopUps {
    /// Claims, charges and invoices; `Err` when a step may succeed if run again.
    async fn run(&self, req: &TopUpRequest, pack: &mut String) -> Result<Ended, ConsumeError> {
        let Some(payments) = self.payments.as_ref() else {
            return Ok(Ended::Failed("payments are not configured here".into()));
        };
        let workspace = &req.workspace;
        // A redelivery continues its own claim, with what was decided then (card, amount),
        // whatever the profile, the catalog or the settings say now.
        let settings: Option<AlertSettings> =
            docs::get(self.docs.as_ref(), &workspace_pk(workspace), ALERTS_SK)
                .await
                .map_err(retry_store)?;
        let turned_off = settings.as_ref().is_none_or(|s| s.auto_topup.is_none());
        let below = settings
            .as_ref()
            .and_then(|s| s.auto_topup.as_ref())
            .map(|a| a.below_credits);
        let disputed = settings.as_ref().and_then(|s| s.stopped_by_dispute.clone());
        let recent = settings.as_ref().and_then(|s| s.topup_claims.clone());
        let earlier = settings.and_then(|s| s.topup_claim);
        // The last top-up charged, when another crossing's: its credits may not have
        // arrived yet (unless its payment failed).
        let last_charged = earlier
            .as_ref()
            .filter(|c| c.entry != req.entry && !c.declined && c.payment.is_some())
            .cloned();
        let claim = match earlier {
            // Claimed but not charged yet (Stripe was out of reach), and auto top-up turned
            // off or stopped by a dispute since: not charged now. Should the earlier attempt
            // have reached Stripe after all, its payment stands and its credits arrive
            // through the webhook.
            Some(c) if c.entry == req.entry && c.payment.is_none() && turned_off => {
                tracing::warn!(workspace = %workspace, entry = req.entry,
                    "auto top-up turned off before its claim was charged; not charged");
                return Ok(Ended::Withdrawn);
            }
            Some(c) if c.entry == req.entry && c.payment.is_none() && disputed.is_some() => {
                return Ok(Ended::Failed(disputed_reason(
                    disputed.as_deref().unwrap_or_default(),
                )));
            }
            Some(c) if c.entry == req.entry => c,
            // A later crossing claimed first (two operations' requests reach the queue in
            // the other order) and this one never did: that claim dealt with the drop.
            // (The list keeps the latest claims only: a crossing before its first is
            // unknown, as is one when there is no list.)
            Some(c)
                if c.entry > req.entry
                    && recent.as_ref().is_some_and(|r| {
                        r.first().is_some_and(|&oldest| oldest < req.entry)
                            && !r.contains(&req.entry)
                    }) =>
            {
                tracing::info!(workspace = %workspace, entry = req.entry, later = c.entry,
                    "a later crossing claimed the top-up first; this one never claimed");
                return Ok(Ended::Withdrawn);
            }
            Some(c) if c.entry > req.entry => {
                // A later crossing has claimed since this one did (a redrive): whether this
                // one was charged is no longer on record here.
                return Err(ConsumeError::poison(format!(
                    "a later crossing (entry {}) has claimed since: look for a payment intent with \
                     idempotency key tally-topup-{workspace}-{} in Stripe",
                    c.entry, req.entry
                )));
            }
            _ => {
                let profile: BillingProfile =
                    docs::get(self.docs.as_ref(), &workspace_pk(workspace), PROFILE_SK)
                        .await
                        .map_err(retry_store)?
                        .unwrap_or_default();
                let Some(customer) = profile.customer else {
                    return Ok(Ended::Failed("the workspace has never paid".into()));
                };
                let Some(payment_method) = profile.payment_method else {
                    return Ok(Ended::Failed("no saved card".into()));
                };
                // The balance now, not at the crossing: a pack bought while the request
                // waited in its queue may have lifted it above the threshold. Lapsed lots
                // count as expired, but overdue holds as still held: a generation may yet
                // complete and charge one.
                let available = self
                    .states
                    .load(workspace)
                    .await
                    .map_err(retry_store)?
                    .unwrap_or_else(|| crate::ledger::WorkspaceState::new(workspace.clone()))
                    .settled_at(self.clock.now())
                    .map_err(|e| ConsumeError::poison(format!("the workspace's state: {e}")))?
                    .balance()
                    .available;
                // A crossing while the last top-up's credits are still on their way (its
                // payment's event waiting in its queue) is the same drop: no second pack.
                // (Turned off, disputed or no longer below the threshold, the claim ends
                // the request silently, as before.)
                if let Some(last) = &last_charged
                    && !turned_off
                    && disputed.is_none()
                    && below.is_some_and(|b| available < b)
                    && self.clock.now() - last.claimed_at
                        < chrono::Duration::hours(TOPUP_CREDITS_WAIT_HOURS)
                    && let Some(payment) = &last.payment
                    && !self.granted(payment).await.map_err(retry_store)?
                    // One Stripe was still collecting when its request gave up (left in
                    // the dead-letter queue): asked now, so a failed one does not hold
                    // the top-up back (its card then counts as refused).
                    && !(last.processing
                        && matches!(
                            self.collect(payments.as_ref(), req, last).await?,
                            Collection::Failed(_)
                        ))
                {
                    return Ok(Ended::Failed(format!(
                        "the last top-up ({payment}) was charged and its credits are not \
                         recorded yet; no second pack is bought for the same drop"
                    )));
                }
                let (claimed, stored) = self
                    .claim(req, &customer, &payment_method, available)
                    .await
                    .map_err(retry_store)?;
                if let Some(stored) = stored {
                    // The settings as stored name the pack the report is about.
                    *pack = stored;
                }
                match claimed {
                    Ok(claim) => claim,
                    Err(ended) => return Ok(ended),
                }
            }
        };
        *pack = claim.pack.clone();
        let key = format!("tally-topup-{workspace}-{}", req.entry);
        let customer = CustomerId::parse(&claim.customer)
            .map_err(|e| ConsumeError::poison(format!("the claim's customer: {e}")))?;
        // A payment Stripe was collecting that failed: decided, at any age.
        if let (true, Some(paid)) = (claim.declined, &claim.payment) {
            return Ok(Ended::Failed(format!("the payment {paid} failed")));
        }
        // One it was still collecting is asked about first: a read, never a second
        // charge, so safe at any age; its receipt waits until the money is taken, and is
        // safe at any age then too (its key was never used before).
        let mut just_taken = false;
        if claim.processing
            && let Some(Ok(paid)) = claim.payment.as_deref().map(PaymentIntentId::parse)
        {
            match self.collect(payments.as_ref(), req, &claim).await? {
                Collection::Taken => just_taken = true,
                Collection::Processing => return Err(still_processing(&paid)),
                Collection::Failed(why) => {
                    return Ok(Ended::Failed(format!("the payment {paid} failed: {why}")));
                }
            }
        }
        if !just_taken
            && self.clock.now() - claim.claimed_at > chrono::Duration::hours(UNCONFIRMED_HOURS)
        {
            // Stripe keeps an idempotency key for a day: past that, charging or invoicing
            // again could do it twice. A person looks the payment up first.
            return Err(ConsumeError::poison(format!(
                "claimed at {} and not finished: look for a payment intent with idempotency \
                 key {key} (metadata topup) and its invoice in Stripe before anything else",
                claim.claimed_at
            )));
        }
        let paid = match claim.payment.as_deref().map(PaymentIntentId::parse) {
            // Charged by an earlier delivery of this request: never a second charge.
            Some(Ok(paid)) => paid,
            _ => {
                let payment_method = PaymentMethodId::parse(&claim.payment_method)
                    .map_err(|e| ConsumeError::poison(format!("the claim's card: {e}")))?;
                let paid = match payments
                    .charge_saved_method(&TopUp {
                        workspace: workspace.clone(),
                        customer: customer.clone(),
                        payment_method,
                        pack: claim.pack.clone(),
                        credits: Credits::new(claim.credits),
                        amount: Cents::new(claim.amount_cents),
                        idempotency_key: key.clone(),
                    })
                    .await
                {
                    Ok(paid) => paid,
                    Err(e @ PaymentsError::Unavailable { .. }) => {
                        return Err(ConsumeError::retry(e));
                    }
                    // Stripe knows the key from an earlier attempt with other parameters
                    // (one made by an earlier release): that attempt may have charged the
                    // card. Neither "failed" nor a second charge: a person looks it up.
                    Err(e @ PaymentsError::Refused { .. }) if e.is_key_reused() => {
                        let message = e.message();
                        return Err(ConsumeError::poison(format!(
                            "Stripe refused idempotency key {key} for other parameters: look for \
                             its payment intent (metadata topup) before anything else ({message})"
                        )));
                    }
                    Err(e) => {
                        // Not tried again at the next crossing (card networks limit retries
                        // of a declined card).
                        self.record_refused(req, &claim.payment_method)
                            .await
                            .map_err(retry_store)?;
                        return Ok(Ended::Failed(e.to_string()));
                    }
                };
                self.record_payment(req, &paid).await.map_err(retry_store)?;
                match paid {
                    TopUpPayment::Succeeded(paid) => paid,
                    // Not taken yet: a receipt would say paid what may yet fail. Delivered
                    // again, the request asks Stripe where it stands.
                    TopUpPayment::Processing(paid) => return Err(still_processing(&paid)),
                }
            }
        };
        // Its invoice, paid by the payment just made (never a second charge). Without one
        // the payment still stands; support can issue it (the help pages' "the transaction
        // exists but no invoice").
        let invoice = crate::payments::PaidInvoice {
            workspace: workspace.clone(),
            customer,
            lines: vec![(
                format!("Auto top-up: {} ({} credits)", claim.pack, claim.credits),
                claim.amount_cents as i64,
            )],
            description: format!("Auto top-up, paid by {paid}"),
            metadata: std::collections::BTreeMap::from([
                ("kind".to_owned(), "top_up".to_owned()),
                ("payment_intent".to_owned(), paid.to_string()),
            ]),
            idempotency_key: format!("{key}-receipt"),
        };
        match payments.paid_invoice(&invoice).await {
            Ok(_) => {}
            Err(e @ PaymentsError::Unavailable { .. }) => return Err(ConsumeError::retry(e)),
            Err(e) => {
                tracing::error!(workspace = %workspace, payment = %paid, error = %e, "auto top-up paid but its invoice was not created");
            }
        }
        Ok(Ended::Charged(paid))
    }

    /// Whether the credits a top-up's payment bought were granted (its lot is recorded).
    async fn granted(&self, payment: &str) -> Result<bool, StoreError> {
        let Ok(pi) = PaymentIntentId::parse(payment) else {
            return Ok(true);
        };
        let link: Option<crate::billing::refunds::PaymentLink> = docs::get(
            self.docs.as_ref(),
            &crate::billing::refunds::payment_pk(&pi),
            crate::billing::refunds::LINK_SK,
        )
        .await?;
        Ok(link.is_some_and(|l| l.lot.is_some()))
    }

    /// Claims the charge on the settings as stored now, with a versioned write: concurrent
    /// crossings race for one claim. A request that claimed it before (a redelivery)
    /// continues its own claim. `Err` says how the request ends without a charge; beside
    /// it, the pack the stored settings name.
    async fn claim(
        &self,
        req: &TopUpRequest,
        customer: &CustomerId,
        payment_method: &PaymentMethodId,
        available: Credits,
    ) -> Result<(Result<TopUpClaim, Ended>, Option<String>), StoreError> {
        let now = self.clock.now();
        let mut result: Result<TopUpClaim, Ended> = Err(Ended::Withdrawn);
        let mut named: Option<String> = None;
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(&req.workspace),
            ALERTS_SK,
            |cur: Option<AlertSettings>| {
                // Run again when a concurrent write wins: nothing from an earlier run counts.
                result = Err(Ended::Withdrawn);
                named = None;
                let mut s = cur?;
                match s.topup_claim.as_ref() {
                    Some(claim) if claim.entry == req.entry => {
                        result = Ok(claim.clone());
                        return None;
                    }
                    // A later crossing's claim: `run` has turned this request away already.
                    Some(claim) if claim.entry > req.entry => return None,
                    _ => {}
                }
                // The settings as stored now, not as the observer read them: a top-up
                // turned off since is not charged; one changed since is charged as it
                // stands now. Either only while the balance is below its threshold now.
                let stored = match &s.auto_topup {
                    Some(stored) if available < stored.below_credits => stored.clone(),
                    _ => return None,
                };
                named = Some(stored.pack.clone());
                // A pack that no longer exists is not claimed: the cooldown stays free for
                // a charge once the settings name one that does.
                let Some(chosen) = self.catalog.pack(&stored.pack) else {
                    result = Err(Ended::Failed("the pack no longer exists".into()));
                    return None;
                };
                if let Some(dispute) = &s.stopped_by_dispute {
                    result = Err(Ended::Failed(disputed_reason(dispute)));
                    return None;
                }
                if s.refused_card.as_deref() == Some(payment_method.as_str()) {
                    result = Err(Ended::Failed(
                        "Stripe refused the saved card at the last top-up: it is tried again \
                         once the alert settings are saved again, or a new card is saved at \
                         checkout"
                            .into(),
                    ));
                    return None;
                }
                if s.last_topup_at
                    .is_some_and(|t| now - t < chrono::Duration::minutes(TOPUP_COOLDOWN_MINUTES))
                {
                    result = Err(Ended::Failed(format!(
                        "a top-up was tried less than {TOPUP_COOLDOWN_MINUTES} minutes ago"
                    )));
                    return None;
                }
                let claim = TopUpClaim {
                    entry: req.entry,
                    pack: stored.pack,
                    claimed_at: now,
                    customer: customer.to_string(),
                    payment_method: payment_method.to_string(),
                    amount_cents: chosen.price_cents.discounted(req.discount_pct).get(),
                    credits: chosen.credits.get(),
                    payment: None,
                    processing: false,
                    declined: false,
                };
                s.last_topup_at = Some(now);
                // A list begun now starts with the claim it replaces (made before the
                // list was kept), or 0 when there was none: the list then knows every claim.
                let replaced = s.topup_claim.replace(claim.clone()).map_or(0, |c| c.entry);
                let recent = s.topup_claims.get_or_insert_with(|| vec![replaced]);
                recent.push(req.entry);
                let over = recent.len().saturating_sub(super::RECENT_TOPUP_CLAIMS);
                recent.drain(..over);
                result = Ok(claim);
                Some(s)
            },
        )
        .await?;
        Ok((result, named))
    }

    /// Keeps the card Stripe refused for this request's claim on the settings.
    async fn record_refused(&self, req: &TopUpRequest, card: &str) -> Result<(), StoreError> {
        self.change_settings(req, |s| {
            let ours = s.topup_claim.as_ref().is_some_and(|c| c.entry == req.entry);
            (ours && s.refused_card.as_deref() != Some(card)) && {
                s.refused_card = Some(card.to_owned());
                true
            }
        })
        .await
    }

    /// Asks Stripe where the payment it was collecting for `claim` (this request's or the
    /// last one's) stands, and records it once decided: taken, or failed (the claim
    /// declined, its card refused).
    async fn collect(
        &self,
        payments: &dyn Payments,
        req: &TopUpRequest,
        claim: &TopUpClaim,
    ) -> Result<Collection, ConsumeError> {
        let paid = claim
            .payment
            .as_deref()
            .map(PaymentIntentId::parse)
            .and_then(Result::ok)
            .ok_or_else(|| ConsumeError::poison("a processing claim without its payment"))?;
        let collection = match payments.collection(&paid).await {
            Ok(c) => c,
            Err(e @ PaymentsError::Unavailable { .. }) => return Err(ConsumeError::retry(e)),
            Err(e) => {
                return Err(ConsumeError::poison(format!(
                    "could not read top-up payment {paid}, still processing when last seen \
                     (crossing {}): look it up in Stripe ({e})",
                    claim.entry
                )));
            }
        };
        let failed = match &collection {
            Collection::Processing => return Ok(collection),
            // Another crossing's claim stays processing: a redrive of its own request (at
            // any age) then still makes its receipt.
            Collection::Taken if claim.entry != req.entry => return Ok(collection),
            Collection::Taken => false,
            Collection::Failed(_) => true,
        };
        self.change_settings(req, |s| {
            let Some(stored) = s
                .topup_claim
                .as_mut()
                .filter(|c| c.entry == claim.entry && c.processing)
            else {
                return false;
            };
            stored.processing = false;
            if failed {
                stored.declined = true;
                s.refused_card = Some(claim.payment_method.clone());
            }
            true
        })
        .await
        .map_err(retry_store)?;
        Ok(collection)
    }

    /// Changes the workspace's stored settings where `change` says it did.
    async fn change_settings(
        &self,
        req: &TopUpRequest,
        mut change: impl FnMut(&mut AlertSettings) -> bool,
    ) -> Result<(), StoreError> {
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(&req.workspace),
            ALERTS_SK,
            |cur: Option<AlertSettings>| {
                let mut s = cur?;
                change(&mut s).then_some(s)
            },
        )
        .await
        .map(|_| ())
    }

    /// Keeps the payment on the claim, so a redelivery does not charge again even after
    /// Stripe has forgotten the idempotency key.
    async fn record_payment(
        &self,
        req: &TopUpRequest,
        paid: &TopUpPayment,
    ) -> Result<(), StoreError> {
        self.change_settings(req, |s| {
            match s.topup_claim.as_mut().filter(|c| c.entry == req.entry) {
                Some(claim) if claim.payment.is_none() => {
                    claim.payment = Some(paid.intent().to_string());
                    claim.processing = matches!(paid, TopUpPayment::Processing(_));
                    true
                }
                _ => false,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(workspace: &str, entry: u64) -> TopUpRequest {
        TopUpRequest {
            kind: TOPUP_REQUEST_KIND.into(),
            workspace: WorkspaceId::parse(workspace).unwrap(),
            entry,
            topup: AutoTopUp {
                pack: "pack_100".into(),
                below_credits: Credits::new(30),
            },
            available: Credits::new(10),
            discount_pct: 0,
        }
    }

    #[test]
    fn a_top_ups_message_ids_fit_sqs_for_every_workspace_id() {
        let short = request("org_1", 7).message();
        assert_eq!(short.group_id.as_deref(), Some("topup-org_1"));
        assert_eq!(short.dedup_id.as_deref(), Some("topup-org_1-7"));
        let a = format!("{}a", "x".repeat(127));
        let b = format!("{}b", "x".repeat(127));
        for ws in [&a, &b, &"y".repeat(96), &"z".repeat(97)] {
            let m = request(ws, u64::MAX).message();
            for id in [m.group_id.unwrap(), m.dedup_id.unwrap()] {
                assert!(id.len() <= 128, "{} characters: {id}", id.len());
            }
        }
        // Long ids sharing a prefix still name their own groups.
        assert_ne!(
            request(&a, 1).message().group_id,
            request(&b, 1).message().group_id
        );
    }
}
