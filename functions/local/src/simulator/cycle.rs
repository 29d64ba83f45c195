//! The simulated clock, like a Stripe test clock: advancing it plays, in time order across
//! every subscription and each at its own instant, what Stripe does in that span.
//!
//! - **Renewal** at period end, on calendar anchors (`add_months`): the period moves on,
//!   `customer.subscription.updated`, then the `subscription_cycle` invoice is created as a
//!   draft (`invoice.created`); an hour later ([`FINALIZE_AFTER_SECS`]) Stripe finalizes and
//!   charges it (`invoice.finalized`, `charge.succeeded`, `invoice.paid`,
//!   `invoice_payment.paid`). A change made in that hour is invoiced on its own meanwhile.
//! - **`cancel_at_period_end`**: no renewal; `customer.subscription.deleted` (status
//!   `canceled`) at period end.
//! - **`pause_collection` (`void`)**: the period still moves on and the subscription stays
//!   `active`; the invoice is created then voided (`invoice.voided`), nothing is charged.
//! - **Declined card**: `charge.failed`, `invoice.payment_failed`, status `past_due`; the
//!   invoice is retried [`RETRY_DAYS`] days after the first failure. A successful retry
//!   pays it (`invoice.paid`, status `active`); when the last retry fails the subscription
//!   is canceled (`customer.subscription.deleted`).
//!
//! Between instants, at least once per simulated day and at the end, Tally's own schedule
//! runs through the [`ScheduleHook`].

use super::objects::{
    Line, SimSubscription, SubStatus, card_of, charge_object, invoice_object, invoice_payment,
    mark_failed, mark_paid,
};
use super::{Events, Simulator, at};
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use tally::ids::{InvoiceId, SubscriptionId};
use thiserror::Error;

/// How long Stripe leaves a renewal's invoice a draft before it finalizes and charges it.
pub const FINALIZE_AFTER_SECS: i64 = 3_600;

/// When a declined subscription invoice is tried again, in days after its first failure.
/// After the last failed retry the subscription is canceled.
pub const RETRY_DAYS: [i64; 3] = [3, 5, 7];

/// Tally's own schedule (allotments, expiry, overdue holds), run by the simulator as the
/// clock moves.
#[async_trait]
pub trait ScheduleHook: Send + Sync {
    async fn run(&self, now: DateTime<Utc>);
}

/// No schedule: the default.
pub struct NoSchedule;

#[async_trait]
impl ScheduleHook for NoSchedule {
    async fn run(&self, _now: DateTime<Utc>) {}
}

/// The clock as `GET /sim/clock` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClockView {
    pub now: DateTime<Utc>,
    /// Seconds the clock has been moved forward in total.
    pub offset: i64,
}

#[derive(Debug, Error)]
pub enum AdvanceError {
    #[error("the clock never goes backwards: it is {now}, not {to}")]
    Backwards {
        now: DateTime<Utc>,
        to: DateTime<Utc>,
    },
}

/// Something Stripe does at an instant. Retries sort before renewals at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Retry,
    Finalize,
    Renewal,
}

impl Simulator {
    /// Replaces Tally's schedule run as the clock moves (nothing by default).
    pub fn set_schedule(&self, hook: Arc<dyn ScheduleHook>) {
        *self.schedule.lock().expect("sim lock") = hook;
    }

    /// Tally's schedule as it is run now (to put back after running without it for a while).
    pub fn schedule(&self) -> Arc<dyn ScheduleHook> {
        self.schedule.lock().expect("sim lock").clone()
    }

    pub fn clock_view(&self) -> ClockView {
        ClockView {
            now: self.clock.now(),
            offset: self.clock.offset().num_seconds(),
        }
    }

    async fn settle(&self) {
        if let Some(q) = &self.billing_queue {
            q.until_idle().await;
        }
    }

    async fn run_schedule(&self) {
        let hook = self.schedule.lock().expect("sim lock").clone();
        hook.run(self.clock.now()).await;
        self.settle().await;
    }

    /// The earliest thing due at or before `until`.
    fn next_due(&self, until: i64) -> Option<(i64, Due, SubscriptionId)> {
        let subs = self.subscriptions.lock().expect("sim lock");
        subs.values()
            .filter(|s| s.status != SubStatus::Canceled)
            .flat_map(|s| {
                let retry = s.dunning.as_ref().and_then(|d| {
                    RETRY_DAYS
                        .get(d.retries)
                        .map(|days| (d.first_failed + days * 86_400, Due::Retry, s.id.clone()))
                });
                let finalize = s
                    .draft
                    .as_ref()
                    .map(|(_, at)| (*at, Due::Finalize, s.id.clone()));
                retry.into_iter().chain(finalize).chain([(
                    s.period_end,
                    Due::Renewal,
                    s.id.clone(),
                )])
            })
            .filter(|(t, _, _)| *t <= until)
            .min()
    }

    /// Moves the clock forward to `to`, playing everything due on the way in time order.
    pub async fn advance_to(&self, to: DateTime<Utc>) -> Result<ClockView, AdvanceError> {
        let _one_at_a_time = self.advancing.lock().await;
        let now = self.clock.now();
        if to < now {
            return Err(AdvanceError::Backwards { now, to });
        }
        let mut tick = now;
        loop {
            let day = tick + Duration::days(1);
            match self.next_due(to.timestamp()) {
                Some((t, due, sub)) if at(t) <= day => {
                    self.clock.advance_to(at(t));
                    let events = self.play(due, &sub, t);
                    self.deliver_all(events).await;
                    self.settle().await;
                    self.run_schedule().await;
                    tick = tick.max(at(t));
                }
                _ if day < to => {
                    self.clock.advance_to(day);
                    self.run_schedule().await;
                    tick = day;
                }
                _ => break,
            }
        }
        self.clock.advance_to(to);
        self.run_schedule().await;
        Ok(self.clock_view())
    }

    /// Advances the clock to when a subscription's renewal is charged, an hour after its
    /// period end, or its waiting draft's (playing the renewal and anything due before).
    /// `None` for an unknown subscription.
    pub async fn renew(&self, subscription: &str) -> Option<Result<ClockView, AdvanceError>> {
        // A renewal made already and waiting as a draft is the one to charge.
        let charged = self
            .subscriptions
            .lock()
            .expect("sim lock")
            .get(subscription)
            .map(|s| {
                s.draft
                    .as_ref()
                    .map_or(s.period_end + FINALIZE_AFTER_SECS, |(_, at)| *at)
            })?;
        Some(self.advance_to(at(charged).max(self.clock.now())).await)
    }

    /// What Stripe does for one subscription at `now`; the events to deliver.
    fn play(&self, due: Due, id: &SubscriptionId, now: i64) -> Events {
        let mut subs = self.subscriptions.lock().expect("sim lock");
        let Some(sub) = subs.get_mut(id) else {
            return Vec::new();
        };
        match due {
            Due::Renewal => self.renewal(sub, now),
            Due::Finalize => self.finalize_draft(sub, now),
            Due::Retry => self.retry(sub, now),
        }
    }

    /// Stripe finalizes a renewal's draft an hour after creating it and charges it (voids
    /// it while collection is paused).
    fn finalize_draft(&self, sub: &mut SimSubscription, now: i64) -> Events {
        let Some((id, _)) = sub.draft.take() else {
            return Vec::new();
        };
        let Some(inv) = self.invoice(id.as_str()).filter(|i| i["status"] == "draft") else {
            return Vec::new();
        };
        let before = sub.status;
        // Made before any pause: collected, as Stripe collects invoices created before it.
        let mut events = self.attempt(sub, inv, now, false);
        if sub.status != before {
            // A declined charge makes the subscription past due.
            events.push(("customer.subscription.updated", sub.object()));
        }
        events
    }

    fn renewal(&self, sub: &mut SimSubscription, now: i64) -> Events {
        if sub.cancel_at_period_end {
            sub.status = SubStatus::Canceled;
            sub.ended_at = Some(now);
            sub.dunning = None;
            return vec![("customer.subscription.deleted", sub.object())];
        }
        if sub.enter_next_phase(now) {
            // A phase with another interval restarts the billing cycle at the phase start.
            sub.set_cycle(now, 0);
        } else {
            sub.set_cycle(sub.anchor, sub.cycle + 1);
        }
        // The new period's lines, then the prorations waiting for an invoice.
        let mut lines: Vec<Line> = sub
            .items
            .iter()
            .map(|i| Line::full(i, (sub.period_start, sub.period_end)))
            .collect();
        lines.append(&mut sub.pending);
        let id: InvoiceId = super::new_stripe_id("in");
        let mut inv = invoice_object(
            &self.base_url,
            &id,
            &sub.customer,
            now,
            "subscription_cycle",
            &lines,
            Some(sub),
        );
        let mut events = if sub.paused {
            // Collection paused (`void`): voided as it is created.
            self.collect(sub, inv, now)
        } else {
            inv["automatically_finalizes_at"] = json!(now + FINALIZE_AFTER_SECS);
            self.store_invoice(&inv, None);
            sub.latest_invoice = Some(id.clone());
            sub.draft = Some((id, now + FINALIZE_AFTER_SECS));
            vec![("invoice.created", inv)]
        };
        events.insert(0, ("customer.subscription.updated", sub.object()));
        events
    }

    fn retry(&self, sub: &mut SimSubscription, now: i64) -> Events {
        let Some(mut dunning) = sub.dunning.take() else {
            return Vec::new();
        };
        let Some(mut inv) = self.invoice(dunning.invoice.as_str()) else {
            return Vec::new();
        };
        if inv["status"] != "open" {
            return Vec::new();
        }
        let due = inv["amount_remaining"].as_i64().unwrap_or_default();
        // The invoice's payment carries no metadata of the subscription's.
        let meta = json!({});
        let card = card_of(&sub.customer);
        let mut events: Events = Vec::new();
        if self.declines(&sub.customer) {
            dunning.retries += 1;
            let next = RETRY_DAYS
                .get(dunning.retries)
                .map(|d| dunning.first_failed + d * 86_400);
            events.push((
                "charge.failed",
                charge_object(&sub.customer, due, now, meta, &card, true),
            ));
            mark_failed(&mut inv, next);
            events.push(("invoice.payment_failed", inv.clone()));
            if next.is_some() {
                sub.dunning = Some(dunning);
            } else {
                sub.status = SubStatus::Canceled;
                sub.ended_at = Some(now);
                events.push(("customer.subscription.deleted", sub.object()));
            }
        } else {
            let charge = charge_object(&sub.customer, due, now, meta, &card, false);
            let paid_by = invoice_payment(&inv, &charge, now);
            events.push(("charge.succeeded", charge));
            mark_paid(&mut inv, now);
            events.push(("invoice.paid", inv.clone()));
            events.push(("invoice_payment.paid", paid_by));
            sub.status = SubStatus::Active;
            events.push(("customer.subscription.updated", sub.object()));
        }
        self.store_invoice(&inv, None);
        events
    }
}
