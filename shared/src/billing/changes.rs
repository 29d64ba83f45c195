//! Changing a subscription through Stripe: plan and interval, add-on units, cancel,
//! resume and pause. Every decision is made against the subscription as Stripe has it now
//! (retrieved, never a local record that may be stale), one change at a time per
//! subscription (a lease in the document store), and credits follow what Stripe charged:
//! upgrades and more add-on units are invoiced and collected at once, and the credits are
//! the paid invoice's lines valued by [`crate::subscriptions::paid`], granted under the
//! invoice's own keys (so the webhook's copy of the same invoice grants nothing more).
//! Downgrades, fewer units and a yearly-to-monthly switch wait for the renewal in a Stripe
//! subscription schedule: today's price stays as it is, so a later upgrade is prorated
//! from what was actually paid.
//!
//! Add-on units follow the plan: moving between plans with different add-on kinds
//! converts the units so they are worth no more credits than before (rounded down; see
//! [`convert_units`]); there is never more than one add-on item.

use super::grants::{self, CreditGrant};
use super::records::*;
use crate::catalog::Plan;
use crate::ids::{IdempotencyKey, InvoiceId, SubscriptionId, WorkspaceId};
use crate::ledger::{Actor, Interval, Operation, PlanStatus, Refs};
use crate::money::{Cents, Credits};
use crate::payments::stripe_api::product_id;
use crate::payments::{
    BilledInvoice, ItemPrice, LiveSubscription, Payments, PaymentsError, RenewalChange,
    SubscriptionChange,
};
use crate::service::{Ledger, LedgerRequest, ServiceError};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use crate::subscriptions::ScheduledChange;
use crate::subscriptions::change::{ChangeKind, addon_unit_price, plan_unit_price};
use crate::subscriptions::paid::{Item, Level, PaidLine};
use crate::subscriptions::terms::metadata;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;
use utoipa::ToSchema;

/// The period has ended and Stripe's renewal has not happened yet: a change now would be
/// prorated over nothing.
const RENEWING: &str = "the subscription is renewing right now; retry in a minute";
const UNPAID_PERIOD: &str = "the current period was never paid (its invoice was voided while collection was paused); changes wait for the next paid renewal";

/// Most add-on units a workspace may hold.
pub const MAX_ADDON_UNITS: u32 = 100;

/// How long one change may hold a subscription before another may start.
const LEASE: i64 = 60;

/// Why a change was not made. Nothing was changed in any of these cases except
/// `Provider`, `Store` and `Ledger`, which are safe to retry with the same key.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("the workspace has no subscription; start one with POST /v1/checkout/sessions")]
    NoSubscription,
    #[error("the subscription has ended; start a new one with POST /v1/checkout/sessions")]
    Ended,
    #[error("{0}")]
    NotActive(&'static str),
    #[error("another change to this subscription is in progress; retry shortly")]
    Busy,
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    #[error("add-on units must be between 0 and {MAX_ADDON_UNITS}")]
    TooManyUnits,
    #[error("the catalog has no add-on for plan {0}")]
    NoAddon(String),
    #[error("the subscription's items name no plan of the catalog")]
    Unrecognised,
    #[error(transparent)]
    Provider(#[from] PaymentsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] ServiceError),
}

/// The outcome of a change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangeView {
    /// `now` or `at_renewal`.
    pub effective: String,
    pub effective_at: DateTime<Utc>,
    /// Credits the change's paid invoice granted (upgrades, more add-on units).
    pub credits_granted: Credits,
    /// What Stripe charged for the change now, in cents (0 for changes at renewal).
    pub charged_cents: Cents,
    /// The invoice Stripe created for the change, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub invoice: Option<InvoiceId>,
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
}

/// The subscription's renewal and pause state after a status change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    pub cancel_at_period_end: bool,
    pub paused: bool,
    pub period_end: DateTime<Utc>,
}

/// What a change would cost and grant, from Stripe's invoice preview; nothing changes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewView {
    /// `now` or `at_renewal`.
    pub effective: String,
    pub effective_at: DateTime<Utc>,
    /// The invoice lines Stripe would charge now (empty for changes at renewal).
    pub lines: Vec<PreviewLine>,
    /// Charged now, before and after tax, in cents (may be below zero: a credit).
    pub subtotal_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    /// Credits granted now, if the invoice is paid.
    pub credits_now: Credits,
    /// The recurring charge from the next renewal on, before tax, in cents.
    pub next_renewal_cents: Cents,
    pub next_renewal_at: DateTime<Utc>,
    /// Credits per billing month from the next renewal on (plan allowance plus add-ons).
    pub credits_per_month: Credits,
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewLine {
    pub description: String,
    pub amount_cents: i64,
    pub quantity: u64,
    pub proration: bool,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// Who is changing a subscription, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    key: String,
    until: DateTime<Utc>,
}

fn lease_sk(sub: &SubscriptionId) -> String {
    format!("CHANGE#{sub}")
}

/// Add-on units converted to another add-on kind: as many whole new units as the old ones
/// were worth in credits, rounded down (so the credits never grow by the conversion), at
/// most [`MAX_ADDON_UNITS`]. 10 individual units (600 credits) become 3 team units (600);
/// 3 team units (600) become 10 individual ones.
pub fn convert_units(units: u32, from_credits: Credits, to_credits: Credits) -> u32 {
    if to_credits == Credits::ZERO {
        return 0;
    }
    let worth = u128::from(units) * u128::from(from_credits.get());
    let converted = worth / u128::from(to_credits.get());
    u32::try_from(converted)
        .unwrap_or(u32::MAX)
        .min(MAX_ADDON_UNITS)
}

/// Where a subscription is now, as read from Stripe's items.
struct Now {
    live: LiveSubscription,
    plan: Plan,
    interval: Interval,
    units: u32,
}

impl Now {
    /// Today's terms.
    fn terms(&self) -> Terms3 {
        Terms3 {
            plan: self.plan.clone(),
            interval: self.interval,
            units: self.units,
        }
    }

    /// The current period and its level: what a change's lines are valued against.
    fn level(&self) -> Level {
        Level {
            plan: self.plan.id.clone(),
            interval: self.interval,
            addon_units: self.units,
            period_start: self.live.period_start,
            period_end: self.live.period_end,
        }
    }
}

/// Subscription changes over the ports.
#[derive(Clone)]
pub struct SubscriptionChanges {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    pub payments: Arc<dyn Payments>,
}

/// What a requested change amounts to against Stripe's current subscription. `keep` is
/// the change that waits for the renewal afterwards (a pending downgrade or unit reduction
/// the request did not replace), re-installed after the change.
enum Decision {
    Same {
        keep: Option<RenewalChange>,
    },
    Now {
        change: Box<SubscriptionChange>,
        keep: Option<RenewalChange>,
    },
    AtRenewal(RenewalChange),
}

/// Terms a subscription has or will have: plan, interval, add-on units.
#[derive(Debug, Clone)]
struct Terms3 {
    plan: Plan,
    interval: Interval,
    units: u32,
}

impl PartialEq for Terms3 {
    fn eq(&self, other: &Self) -> bool {
        (self.plan.id.as_str(), self.interval, self.units)
            == (other.plan.id.as_str(), other.interval, other.units)
    }
}

impl SubscriptionChanges {
    /// The workspace's live subscription, as the documents know it (its id, and whether it
    /// has ended).
    pub async fn live(&self, workspace: &WorkspaceId) -> Result<SubscriptionRecord, ChangeError> {
        let sub: SubscriptionRecord = docs::get(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            SUBSCRIPTION_SK,
        )
        .await?
        .ok_or(ChangeError::NoSubscription)?;
        if sub.status == PlanStatus::Canceled {
            return Err(ChangeError::Ended);
        }
        Ok(sub)
    }

    fn plan_price(&self, plan: &Plan, interval: Interval) -> ItemPrice {
        ItemPrice {
            product: product_id("plan", &plan.id),
            product_name: format!("{} plan", plan.name),
            unit_amount: plan_unit_price(&self.ledger.catalog, plan, interval),
            interval,
        }
    }

    fn addon_price(&self, plan: &Plan, interval: Interval) -> Result<ItemPrice, ChangeError> {
        let catalog = &self.ledger.catalog;
        let addon = catalog
            .addon(&plan.addon)
            .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?;
        let unit = addon_unit_price(catalog, plan, interval)
            .ok_or_else(|| ChangeError::NoAddon(plan.id.clone()))?;
        Ok(ItemPrice {
            product: product_id("addon", &addon.id),
            product_name: format!("{} add-on credits", addon.credits_per_unit),
            unit_amount: unit,
            interval,
        })
    }

    fn plan(&self, id: &str) -> Result<Plan, ChangeError> {
        self.ledger
            .catalog
            .plan(id)
            .cloned()
            .ok_or_else(|| ChangeError::UnknownPlan(id.to_owned()))
    }

    fn addon_credits(&self, plan: &Plan) -> Credits {
        self.ledger
            .catalog
            .addon(&plan.addon)
            .map_or(Credits::ZERO, |a| a.credits_per_unit)
    }

    /// Takes the subscription's change lease for `key` (the same key may take it again:
    /// a retry of the same request).
    async fn lease(
        &self,
        workspace: &WorkspaceId,
        sub: &SubscriptionId,
        key: &str,
    ) -> Result<(), ChangeError> {
        let now = self.ledger.clock.now();
        let mut busy = false;
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &lease_sk(sub),
            |cur: Option<Lease>| {
                busy = cur.as_ref().is_some_and(|l| l.until > now && l.key != key);
                (!busy).then(|| Lease {
                    key: key.to_owned(),
                    until: now + Duration::seconds(LEASE),
                })
            },
        )
        .await?;
        if busy {
            return Err(ChangeError::Busy);
        }
        Ok(())
    }

    async fn release(&self, workspace: &WorkspaceId, sub: &SubscriptionId, key: &str) {
        let now = self.ledger.clock.now();
        let released = docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &lease_sk(sub),
            |cur: Option<Lease>| {
                cur.filter(|l| l.key == key && l.until > now)
                    .map(|l| Lease { until: now, ..l })
            },
        )
        .await;
        if let Err(e) = released {
            // The lease lapses on its own.
            tracing::warn!(error = %e, subscription = %sub, "change lease not released");
        }
    }

    /// Runs `f` holding the subscription's change lease.
    async fn exclusively<T, F, Fut>(
        &self,
        workspace: &WorkspaceId,
        key: &str,
        f: F,
    ) -> Result<T, ChangeError>
    where
        F: FnOnce(SubscriptionRecord) -> Fut,
        Fut: std::future::Future<Output = Result<T, ChangeError>>,
    {
        let record = self.live(workspace).await?;
        let sub = record.id.clone();
        self.lease(workspace, &sub, key).await?;
        let result = f(record).await;
        self.release(workspace, &sub, key).await;
        result
    }

    /// Stripe's subscription now, read as catalog terms.
    async fn now(&self, sub: &SubscriptionId) -> Result<Now, ChangeError> {
        let live = self.payments.subscription(sub).await?;
        if matches!(live.status.as_str(), "canceled" | "incomplete_expired") {
            return Err(ChangeError::Ended);
        }
        let item = live.item("plan").ok_or(ChangeError::Unrecognised)?;
        let plan = match Item::of_product(&item.product, &self.ledger.catalog) {
            Some(Item::Plan(p)) => self.plan(&p)?,
            _ => return Err(ChangeError::Unrecognised),
        };
        let interval = item.interval;
        let units = live
            .item("addon")
            .map_or(0, |i| u32::try_from(i.quantity).unwrap_or(u32::MAX));
        Ok(Now {
            live,
            plan,
            interval,
            units,
        })
    }

    fn require_active(&self, now: &Now, record: &SubscriptionRecord) -> Result<(), ChangeError> {
        if now.live.status != "active" || now.live.paused {
            return Err(ChangeError::NotActive(
                "the subscription is paused or past due; resume it or settle the open invoice first",
            ));
        }
        // A change waiting for the renewal would take the cancellation over (Stripe's
        // schedule decides how the subscription ends), and one billed now would charge for
        // a period that ends with the subscription.
        if now.live.cancel_at_period_end {
            return Err(ChangeError::NotActive(
                "the subscription is set to cancel at the end of the period; resume it first",
            ));
        }
        // Stripe would credit the unused time of a period nobody paid for (its renewal
        // invoice voided while collection was paused) against the change. The period is
        // Stripe's own (the document may lag behind it).
        if record.id == now.live.id && record.voided_period == Some(now.live.period_start) {
            return Err(ChangeError::NotActive(UNPAID_PERIOD));
        }
        if self.ledger.clock.now() >= now.live.period_end {
            return Err(ChangeError::NotActive(RENEWING));
        }
        Ok(())
    }

    /// The change waiting for the renewal, as Tally scheduled it (its terms are kept in the
    /// subscription's metadata while the schedule exists). A schedule Tally did not make
    /// (the dashboard) reads as none and is released by the next change.
    fn pending(&self, now: &Now) -> Option<Terms3> {
        now.live.schedule.as_ref()?;
        let t = crate::subscriptions::terms::terms(
            &now.live.metadata.clone().into_iter().collect(),
            now.live.period_start.timestamp(),
        )
        .ok()?;
        let s = t.scheduled?;
        Some(Terms3 {
            plan: self.plan(&s.plan).ok()?,
            interval: s.interval,
            units: s.addon_units,
        })
    }

    /// Whether the attached schedule is Tally's whose change has taken effect: Stripe keeps
    /// a schedule attached through its last phase (the period the change started, whose
    /// start is the `scheduled_from` Tally recorded) and releases it only then. Nothing
    /// waits in it any more; the next change releases it (or reuses it for a change of its
    /// own) as for any schedule. In a later period the keys are stale (Stripe released
    /// Tally's schedule without touching them): a schedule attached then is another's.
    fn spent(now: &Now) -> bool {
        now.live
            .metadata
            .get(crate::subscriptions::meta::SCHEDULED_FROM)
            .and_then(|f| f.parse::<i64>().ok())
            .is_some_and(|from| from == now.live.period_start.timestamp())
    }

    /// Units of `from`'s add-on kind expressed in `to`'s.
    fn units_for(&self, units: u32, from: &Plan, to: &Plan) -> u32 {
        if from.addon == to.addon {
            units
        } else {
            convert_units(units, self.addon_credits(from), self.addon_credits(to))
        }
    }

    /// A change from the renewal on, to `next`.
    fn renewal(
        &self,
        workspace: &WorkspaceId,
        now: &Now,
        current: &Terms3,
        next: &Terms3,
        key: &str,
    ) -> Result<RenewalChange, ChangeError> {
        let scheduled = ScheduledChange {
            plan: next.plan.id.clone(),
            interval: next.interval,
            addon_units: next.units,
            from: now.live.period_end,
        };
        Ok(RenewalChange {
            subscription: now.live.id.clone(),
            plan: self.plan_price(&next.plan, next.interval),
            addons: (
                u64::from(next.units),
                self.addon_price(&next.plan, next.interval)?,
            ),
            metadata: metadata(
                workspace,
                &current.plan.id,
                current.interval,
                current.units,
                Some(&scheduled),
            ),
            next_metadata: metadata(workspace, &next.plan.id, next.interval, next.units, None),
            idempotency_key: key.to_owned(),
        })
    }

    /// What moving to `target` means against Stripe's current subscription and the change
    /// already waiting for the renewal (`pending`). `then` is what should wait for the
    /// renewal after a change applied now.
    fn decide(
        &self,
        workspace: &WorkspaceId,
        now: &Now,
        target: Terms3,
        then: Terms3,
        key: &str,
    ) -> Result<Decision, ChangeError> {
        let current = Terms3 {
            plan: now.plan.clone(),
            interval: now.interval,
            units: now.units,
        };
        // What waits for the renewal after the change: nothing if it is what the change
        // leads to anyway.
        let keep = |after: &Terms3| -> Result<Option<RenewalChange>, ChangeError> {
            if then == *after {
                Ok(None)
            } else {
                self.renewal(workspace, now, after, &then, key).map(Some)
            }
        };
        if now.live.schedule.is_some() && self.pending(now).is_none() && !Self::spent(now) {
            return Err(ChangeError::NotActive(
                "a change made in the billing portal is waiting for the renewal; change or cancel it there first",
            ));
        }
        if target == current {
            return Ok(Decision::Same {
                keep: keep(&current)?,
            });
        }
        let kind = ChangeKind::of((&now.plan, now.interval), (&target.plan, target.interval));
        let same_plan = target.plan.id == now.plan.id && target.interval == now.interval;
        // Upgrades (and interval switches to yearly) apply now; so do more add-on units.
        // Everything that lowers what is billed waits for the renewal.
        let plan_now = kind == ChangeKind::Upgrade
            && !(target.interval == Interval::Monthly && now.interval == Interval::Yearly);
        let converted = self.units_for(now.units, &now.plan, &target.plan);
        // A switch to yearly starts a new period now, so fewer units can start with it.
        let switch = target.interval != now.interval;
        if (same_plan || plan_now) && (target.units >= converted || switch) {
            // The add-on item is re-priced only when its kind, interval or count changes
            // (a new price for the same terms would bill a pointless pair of lines).
            let reprice = target.plan.addon != now.plan.addon || target.interval != now.interval;
            let addons =
                if target.units != now.units || (reprice && (now.units > 0 || target.units > 0)) {
                    Some((
                        u64::from(target.units),
                        self.addon_price(&target.plan, target.interval)?,
                    ))
                } else {
                    None
                };
            let keep = keep(&target)?;
            let scheduled = keep.as_ref().map(|_| ScheduledChange {
                plan: then.plan.id.clone(),
                interval: then.interval,
                addon_units: then.units,
                from: now.live.period_end,
            });
            return Ok(Decision::Now {
                change: Box::new(SubscriptionChange {
                    plan: (!same_plan).then(|| self.plan_price(&target.plan, target.interval)),
                    addons,
                    prorate_now: true,
                    metadata: metadata(
                        workspace,
                        &target.plan.id,
                        target.interval,
                        target.units,
                        scheduled.as_ref(),
                    ),
                    expect: Some(now.live.items.clone()),
                    idempotency_key: key.to_owned(),
                    ..SubscriptionChange::to(now.live.id.clone())
                }),
                keep,
            });
        }
        Ok(Decision::AtRenewal(
            self.renewal(workspace, now, &current, &then, key)?,
        ))
    }

    /// Applies a decision: Stripe first, then the credits its paid invoice carries, then
    /// the change that still waits for the renewal.
    async fn apply(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        now: &Now,
        decision: Decision,
        key: &str,
        view: (String, Interval, u32),
    ) -> Result<ChangeView, ChangeError> {
        let (plan, interval, addon_units) = view;
        let at = self.ledger.clock.now();
        let release = format!("{key}-release");
        let mut out = ChangeView {
            effective: "now".into(),
            effective_at: at,
            credits_granted: Credits::ZERO,
            charged_cents: Cents::ZERO,
            invoice: None,
            plan,
            interval,
            addon_units,
        };
        match decision {
            Decision::Same { keep } => match keep {
                Some(k) => self.payments.schedule_renewal_change(&k).await?,
                None if now.live.schedule.is_some() => {
                    self.payments
                        .cancel_renewal_change(&now.live.id, &release)
                        .await?
                }
                None => {}
            },
            Decision::Now { change, keep } => {
                if now.live.schedule.is_some() {
                    // Stripe bills the change now; what waits for the renewal is installed
                    // again afterwards.
                    self.payments
                        .cancel_renewal_change(&now.live.id, &release)
                        .await?;
                }
                let outcome = match self.payments.update_subscription(&change).await {
                    // No answer (a timeout, an outage): Stripe may have made and charged
                    // it. Asked again under the same key, Stripe answers what it did, or
                    // makes it now; either way what waits for the renewal is installed
                    // after it below. The items are not compared again: made, the change
                    // itself changed them.
                    Err(e) if e.is_retryable() => {
                        let again = SubscriptionChange {
                            expect: None,
                            ..(*change).clone()
                        };
                        match self.payments.update_subscription(&again).await {
                            // Stripe ran the first one: the form sent again is built from
                            // the items it changed (an add-on item made or removed), so
                            // the key names another request. Made; its invoice's event
                            // grants.
                            Err(r) if r.is_key_reused() => Ok(None),
                            // Still no answer: nothing is put back (on top of a change that
                            // was made, the waiting change would take it back at the
                            // renewal).
                            Err(r) if r.is_retryable() => {
                                tracing::error!(error = %r, subscription = %now.live.id,
                                    "a change billed now got no answer; the change waiting for the renewal was not put back");
                                return Err(e.into());
                            }
                            // Refused (the first never reached Stripe): as below.
                            other => other,
                        }
                    }
                    other => other,
                };
                let invoice = match outcome {
                    Ok(i) => i,
                    Err(e) => {
                        // Refused (a declined card): nothing was made, and what waited for
                        // the renewal is put back. Not after a key Stripe saw with another
                        // request, nor when the items changed meanwhile (the portal):
                        // nothing is put back on top of a change that may have been made.
                        if matches!(e, PaymentsError::Refused { .. })
                            && !e.is_key_reused()
                            && now.live.schedule.is_some()
                            && let Some(p) = self.pending(now)
                            && let Ok(back) = self.renewal(
                                workspace,
                                now,
                                &now.terms(),
                                &p,
                                &format!("{key}-restore"),
                            )
                            && let Err(r) = self.payments.schedule_renewal_change(&back).await
                        {
                            tracing::error!(error = %r, subscription = %now.live.id, "the change waiting for the renewal could not be restored");
                        }
                        return Err(e.into());
                    }
                };
                if let Some(k) = keep {
                    // The change is billed; what waits for the renewal is installed after
                    // it, tried twice. A failure is logged loudly (it would renew at the
                    // terms billed now) but does not undo or hide the change.
                    let mut installed = self.payments.schedule_renewal_change(&k).await;
                    if installed.is_err() {
                        let again = RenewalChange {
                            idempotency_key: format!("{}-again", k.idempotency_key),
                            ..k.clone()
                        };
                        installed = self.payments.schedule_renewal_change(&again).await;
                    }
                    if let Err(e) = installed {
                        tracing::error!(error = %e, subscription = %now.live.id, "the change waiting for the renewal was not kept");
                    }
                }
                if let Some(inv) = &invoice {
                    out.credits_granted = self.grant_invoice(workspace, actor, now, inv).await?;
                    out.charged_cents = inv.amount_paid;
                    out.invoice = inv.id.clone();
                }
                tracing::info!(workspace = %workspace, plan = %out.plan, units = out.addon_units, credits = out.credits_granted.get(), "subscription changed now");
            }
            Decision::AtRenewal(change) => {
                self.payments.schedule_renewal_change(&change).await?;
                out.addon_units = u32::try_from(change.addons.0).unwrap_or(u32::MAX);
                tracing::info!(workspace = %workspace, plan = %out.plan, units = out.addon_units, at = %now.live.period_end, "change scheduled for the renewal");
                out.effective = "at_renewal".into();
                out.effective_at = now.live.period_end;
            }
        }
        Ok(out)
    }

    /// Grants what a change's paid invoice pays for, under the invoice's own keys: the same
    /// grants the invoice's `invoice.paid` event makes, so whichever comes first grants and
    /// the other finds them done. A failure here loses nothing: the event grants later.
    async fn grant_invoice(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        now: &Now,
        invoice: &BilledInvoice,
    ) -> Result<Credits, ChangeError> {
        let (Some(id), true, true) = (&invoice.id, invoice.paid, invoice.lines_complete) else {
            // Not collected yet (a bank debit still processing): the invoice's paid event
            // grants when the money arrives. Some lines not read: the event grants on all.
            return Ok(Credits::ZERO);
        };
        let period = now.level();
        let lines = paid_lines(&invoice.lines, &self.ledger.catalog);
        let credits = match grants::line_grants(
            id,
            "subscription_update",
            &lines,
            &[period],
            &self.ledger.catalog,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, invoice = %id, "change invoice not valued here; its event will grant");
                return Ok(Credits::ZERO);
            }
        };
        let mut total = Credits::ZERO;
        for g in credits.grants {
            total = total.checked_add(g.credits).unwrap_or(total);
            if let Err(e) = self.grant(workspace, actor, id, g).await {
                tracing::warn!(error = %e, invoice = %id, "change credits not granted yet; the invoice's event will grant them");
            }
        }
        Ok(total)
    }

    async fn grant(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        invoice: &InvoiceId,
        g: CreditGrant,
    ) -> Result<(), ChangeError> {
        if g.credits == Credits::ZERO || g.expires_at.is_some_and(|t| t <= self.ledger.clock.now())
        {
            return Ok(());
        }
        self.ledger
            .execute(LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived(g.key.clone()),
                fingerprint: g.key,
                actor: actor.clone(),
                refs: Refs {
                    invoice: Some(invoice.clone()),
                    ..Refs::default()
                },
                op: Operation::Grant {
                    month: g.month,
                    source: g.source,
                    credits: g.credits,
                    expires_at: g.expires_at,
                    note: Some(g.note),
                },
            })
            .await?;
        Ok(())
    }

    /// Changes plan or billing interval: upgrades now (prorated, credits from the paid
    /// invoice), downgrades and yearly-to-monthly at the renewal (benefits kept until then).
    /// Add-on units are kept (converted when the add-on kind changes); a unit reduction
    /// waiting for the renewal still waits.
    pub async fn change(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        plan: &str,
        interval: Interval,
        stripe_key: &str,
    ) -> Result<ChangeView, ChangeError> {
        let target = self.plan(plan)?;
        self.exclusively(workspace, stripe_key, |record| async move {
            let now = self.now(&record.id).await?;
            self.require_active(&now, &record)?;
            let (target, then) = self.plan_terms(&now, target, interval);
            let view = (target.plan.id.clone(), target.interval, target.units);
            let decision = self.decide(workspace, &now, target, then, stripe_key)?;
            self.apply(workspace, actor, &now, decision, stripe_key, view)
                .await
        })
        .await
    }

    /// The terms a plan change asks for now, and what should wait for the renewal after it.
    fn plan_terms(&self, now: &Now, target: Plan, interval: Interval) -> (Terms3, Terms3) {
        let pending = self.pending(now);
        let units = self.units_for(now.units, &now.plan, &target);
        // A pending change whose units are only today's units converted to its plan's
        // add-on kind reduces nothing.
        let pending_units = pending
            .as_ref()
            .filter(|p| p.units != self.units_for(now.units, &now.plan, &p.plan))
            .map(|p| self.units_for(p.units, &p.plan, &target));
        let then_units = pending_units.map_or(units, |u| u.min(units));
        // An interval switch starts a new period now: a reduction waiting for the end of
        // the old one applies with it.
        let switch = interval != now.interval;
        let target3 = Terms3 {
            plan: target.clone(),
            interval,
            units: if switch { then_units } else { units },
        };
        let then = Terms3 {
            plan: target,
            interval,
            units: then_units,
        };
        (target3, then)
    }

    /// Sets the number of add-on credit units: more apply now (prorated charge, prorated
    /// credits), fewer from the next renewal. A plan change waiting for the renewal still
    /// waits, with the new count.
    pub async fn set_addons(
        &self,
        workspace: &WorkspaceId,
        actor: &Actor,
        units: u32,
        stripe_key: &str,
    ) -> Result<ChangeView, ChangeError> {
        if units > MAX_ADDON_UNITS {
            return Err(ChangeError::TooManyUnits);
        }
        self.exclusively(workspace, stripe_key, |record| async move {
            let now = self.now(&record.id).await?;
            if now.live.status != "active" || now.live.paused {
                return Err(ChangeError::NotActive(
                    "add-ons need an active subscription",
                ));
            }
            self.require_active(&now, &record)?;
            let (target, then) = self.unit_terms(&now, units);
            let view = (target.plan.id.clone(), target.interval, target.units);
            let decision = self.decide(workspace, &now, target, then, stripe_key)?;
            self.apply(workspace, actor, &now, decision, stripe_key, view)
                .await
        })
        .await
    }

    /// The terms a unit change asks for, and what should wait for the renewal after it.
    /// Fewer units than now only wait for the renewal.
    fn unit_terms(&self, now: &Now, units: u32) -> (Terms3, Terms3) {
        let pending = self.pending(now);
        let (plan, interval) = pending
            .as_ref()
            .map_or((now.plan.clone(), now.interval), |p| {
                (p.plan.clone(), p.interval)
            });
        let then = Terms3 {
            units: self.units_for(units, &now.plan, &plan),
            plan,
            interval,
        };
        if units < now.units {
            // Nothing changes now: the reduction (with any pending plan change) waits.
            return (then.clone(), then);
        }
        (
            Terms3 {
                plan: now.plan.clone(),
                interval: now.interval,
                units,
            },
            then,
        )
    }

    /// What a change would charge now and grant, from Stripe's invoice preview; nothing
    /// changes. Unset fields keep their current value.
    pub async fn preview(
        &self,
        workspace: &WorkspaceId,
        plan: Option<&str>,
        interval: Option<Interval>,
        units: Option<u32>,
    ) -> Result<PreviewView, ChangeError> {
        if units.is_some_and(|u| u > MAX_ADDON_UNITS) {
            return Err(ChangeError::TooManyUnits);
        }
        let record = self.live(workspace).await?;
        let now = self.now(&record.id).await?;
        self.require_active(&now, &record)?;
        let (target, then) = match (plan, interval) {
            (None, None) => self.unit_terms(&now, units.unwrap_or(now.units)),
            _ => {
                let p = match plan {
                    Some(p) => self.plan(p)?,
                    None => now.plan.clone(),
                };
                let (mut target, mut then) =
                    self.plan_terms(&now, p, interval.unwrap_or(now.interval));
                if let Some(u) = units {
                    if u >= target.units {
                        target.units = u;
                    }
                    then.units = u;
                }
                (target, then)
            }
        };
        let catalog = &self.ledger.catalog;
        let per_month = then
            .plan
            .monthly_credits
            .checked_add(
                self.addon_credits(&then.plan)
                    .checked_mul(u64::from(then.units))
                    .unwrap_or(Credits::ZERO),
            )
            .unwrap_or(then.plan.monthly_credits);
        let renewal = plan_unit_price(catalog, &then.plan, then.interval)
            .checked_add(
                addon_unit_price(catalog, &then.plan, then.interval)
                    .unwrap_or(Cents::ZERO)
                    .checked_mul(u64::from(then.units))
                    .unwrap_or(Cents::ZERO),
            )
            .unwrap_or(Cents::ZERO);
        let (plan_id, interval, units) = (then.plan.id.clone(), then.interval, then.units);
        let decision = self.decide(workspace, &now, target, then, "preview")?;
        let mut view = PreviewView {
            effective: "now".into(),
            effective_at: self.ledger.clock.now(),
            lines: Vec::new(),
            subtotal_cents: 0,
            tax_cents: 0,
            total_cents: 0,
            credits_now: Credits::ZERO,
            next_renewal_cents: renewal,
            next_renewal_at: now.live.period_end,
            credits_per_month: per_month,
            plan: plan_id,
            interval,
            addon_units: units,
        };
        match decision {
            Decision::Same { .. } => {}
            Decision::AtRenewal(_) => {
                view.effective = "at_renewal".into();
                view.effective_at = now.live.period_end;
            }
            Decision::Now { change, .. } => {
                let inv = self.payments.preview_change(&change).await?;
                let period = now.level();
                let lines = paid_lines(&inv.lines, catalog);
                let id: InvoiceId = "in_preview".parse().expect("a valid invoice id");
                if let Ok(g) =
                    grants::line_grants(&id, "subscription_update", &lines, &[period], catalog)
                {
                    view.credits_now = g
                        .grants
                        .iter()
                        .fold(Credits::ZERO, |a, g| a.checked_add(g.credits).unwrap_or(a));
                }
                if let Some(l) = lines.iter().find(|l| !l.proration) {
                    // An interval switch starts a new period now.
                    view.next_renewal_at =
                        crate::subscriptions::calendar::period_end(l.start, interval);
                }
                view.subtotal_cents = inv.subtotal;
                view.tax_cents = inv.tax;
                view.total_cents = inv.total;
                view.lines = inv
                    .lines
                    .iter()
                    .map(|l| PreviewLine {
                        description: l.description.clone(),
                        amount_cents: l.amount,
                        quantity: l.quantity,
                        proration: l.proration,
                        period_start: l.period_start,
                        period_end: l.period_end,
                    })
                    .collect();
            }
        }
        Ok(view)
    }

    /// Cancels renewal at period end (`cancel`), or pauses/resumes collection (`pause`).
    pub async fn set_status(
        &self,
        workspace: &WorkspaceId,
        cancel: Option<bool>,
        pause: Option<bool>,
        stripe_key: &str,
    ) -> Result<StatusView, ChangeError> {
        self.exclusively(workspace, stripe_key, |record| async move {
            let now = self.now(&record.id).await?;
            if cancel == Some(true) && now.live.schedule.is_some() {
                // A canceled subscription does not renew; the change waiting for the
                // renewal goes with it (Stripe refuses to cancel a scheduled subscription).
                self.payments
                    .cancel_renewal_change(&now.live.id, &format!("{stripe_key}-release"))
                    .await?;
            }
            // Only what changes is sent: Stripe refuses any cancellation setting, even
            // `false`, on a subscription a schedule manages (a downgrade waiting for the
            // renewal), so resuming a paused one must not name it.
            let cancel = cancel.filter(|c| *c != now.live.cancel_at_period_end);
            let pause = pause.filter(|p| *p != now.live.paused);
            if cancel.is_some() || pause.is_some() {
                self.payments
                    .update_subscription(&SubscriptionChange {
                        cancel_at_period_end: cancel,
                        pause,
                        idempotency_key: stripe_key.to_owned(),
                        ..SubscriptionChange::to(now.live.id.clone())
                    })
                    .await?;
            }
            Ok(StatusView {
                cancel_at_period_end: cancel.unwrap_or(now.live.cancel_at_period_end),
                paused: pause.unwrap_or(now.live.paused),
                period_end: now.live.period_end,
            })
        })
        .await
    }
}

/// Billed lines naming Tally's catalog items, as paid lines.
fn paid_lines(
    lines: &[crate::payments::BilledLine],
    catalog: &crate::catalog::Catalog,
) -> Vec<PaidLine> {
    lines
        .iter()
        .map(|l| PaidLine {
            // Lines of a subscription update bill subscription items: one that names
            // no Tally product is an older item, valued as the plan in force.
            item: Item::of_product(&l.product, catalog).unwrap_or(Item::Other),
            quantity: l.quantity,
            amount: l.amount,
            start: l.period_start,
            end: l.period_end,
            proration: l.proration,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_convert_without_growing_their_credits() {
        let (individual, team) = (Credits::new(60), Credits::new(200));
        assert_eq!(convert_units(10, individual, team), 3);
        assert_eq!(convert_units(3, team, individual), 10);
        assert_eq!(convert_units(1, individual, team), 0);
        assert_eq!(convert_units(100, team, individual), MAX_ADDON_UNITS);
        for u in 0..=MAX_ADDON_UNITS {
            let c = convert_units(u, individual, team);
            assert!(u64::from(c) * 200 <= u64::from(u) * 60);
        }
    }
}
