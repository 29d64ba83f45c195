//! The subscription as the latest Stripe facts describe it, and how facts that arrive in
//! any order merge into one document.

use super::{Interval, PlanState, PlanStatus};
use crate::ids::{CustomerId, StripeEventId, SubscriptionId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The subscription as the latest Stripe facts describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionRecord {
    pub id: SubscriptionId,
    pub customer: Option<CustomerId>,
    pub plan: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub stripe_status: String,
    pub cancel_at_period_end: bool,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub addon_units: u32,
    /// A downgrade or add-on reduction waiting for the next renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<ScheduledChange>,
    /// Stripe `created` time of the event these facts came from, and its id.
    pub as_of: i64,
    pub as_of_event: StripeEventId,
    /// When a canceled subscription ended (Stripe's `ended_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
}

impl SubscriptionRecord {
    fn order(&self) -> (i64, u8, &str) {
        let terminal = u8::from(self.status == PlanStatus::Canceled);
        (self.as_of, terminal, self.as_of_event.as_str())
    }

    /// The newer of two descriptions of the same subscription; a different (newer)
    /// subscription id replaces the old one only when its facts are newer.
    pub fn merge(current: Option<Self>, incoming: Self) -> Option<Self> {
        match current {
            // Another subscription only takes over once the current one has ended: a late
            // event about an old subscription must not bring it back.
            Some(c) if c.id != incoming.id && c.status != PlanStatus::Canceled => None,
            // Stripe never brings a canceled subscription back: a later invoice of it
            // (an open one paid from its page after dunning ended it, or a declined
            // attempt) says nothing about its status.
            Some(c)
                if c.id == incoming.id
                    && c.status == PlanStatus::Canceled
                    && incoming.status != PlanStatus::Canceled =>
            {
                None
            }
            Some(c) if c.order() >= incoming.order() => None,
            _ => Some(incoming),
        }
    }

    /// Like [`merge`](Self::merge) for facts read off an invoice, which say nothing about
    /// cancellation: the known `cancel_at_period_end` is kept.
    pub fn merge_invoice_facts(current: Option<Self>, mut incoming: Self) -> Option<Self> {
        if let Some(c) = &current
            && c.id == incoming.id
        {
            incoming.cancel_at_period_end = c.cancel_at_period_end;
        }
        Self::merge(current, incoming)
    }

    /// The add-on units Stripe bills from the next renewal (a scheduled reduction already
    /// changed the quantity there).
    pub fn billed_addon_units(&self) -> u32 {
        self.scheduled
            .as_ref()
            .map_or(self.addon_units, |s| s.addon_units)
    }

    /// A pending add-on reduction, carried over to new terms; `None` when there is none.
    pub fn pending_addon_reduction(
        &self,
        plan: &str,
        interval: Interval,
    ) -> Option<ScheduledChange> {
        let units = self.billed_addon_units();
        (units != self.addon_units).then(|| ScheduledChange {
            plan: plan.to_owned(),
            interval,
            addon_units: units,
            from: self.period_end,
        })
    }

    pub fn plan_state(&self) -> PlanState {
        PlanState {
            plan: self.plan.clone(),
            interval: self.interval,
            status: self.status,
            period_start: self.period_start,
            period_end: self.period_end,
            cancel_at_period_end: self.cancel_at_period_end,
            paid_through: None,
        }
    }
}

/// Terms that take effect at the start of the next period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScheduledChange {
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
    pub from: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: PlanStatus, as_of: i64, cancel: bool) -> SubscriptionRecord {
        SubscriptionRecord {
            id: SubscriptionId::parse(id).unwrap(),
            customer: None,
            plan: "max".into(),
            interval: Interval::Monthly,
            status,
            stripe_status: "active".into(),
            cancel_at_period_end: cancel,
            period_start: DateTime::from_timestamp(0, 0).unwrap(),
            period_end: DateTime::from_timestamp(100, 0).unwrap(),
            addon_units: 0,
            scheduled: None,
            as_of,
            as_of_event: StripeEventId::parse(&format!("evt_{as_of}")).unwrap(),
            ended_at: None,
        }
    }

    #[test]
    fn a_late_event_about_an_old_subscription_does_not_replace_the_live_one() {
        let live = record("sub_new", PlanStatus::Active, 10, false);
        let late = record("sub_old", PlanStatus::PastDue, 20, false);
        assert_eq!(SubscriptionRecord::merge(Some(live), late), None);
        // Once the current one has ended, a newer subscription takes over.
        let ended = record("sub_old", PlanStatus::Canceled, 10, false);
        let next = record("sub_new", PlanStatus::Active, 20, false);
        assert_eq!(
            SubscriptionRecord::merge(Some(ended), next.clone()),
            Some(next)
        );
    }

    #[test]
    fn a_canceled_subscription_stays_canceled_whatever_comes_later() {
        let ended = record("sub_a", PlanStatus::Canceled, 10, false);
        // Its open invoice paid (or declined again) from the hosted page afterwards.
        for status in [PlanStatus::Active, PlanStatus::PastDue, PlanStatus::Paused] {
            let late = record("sub_a", status, 20, false);
            assert_eq!(
                SubscriptionRecord::merge_invoice_facts(Some(ended.clone()), late.clone()),
                None
            );
            assert_eq!(SubscriptionRecord::merge(Some(ended.clone()), late), None);
        }
        // Another subscription still takes over.
        let next = record("sub_b", PlanStatus::Active, 30, false);
        assert_eq!(
            SubscriptionRecord::merge(Some(ended), next.clone()),
            Some(next)
        );
    }

    #[test]
    fn invoice_facts_keep_a_known_cancellation() {
        let cancelling = record("sub_a", PlanStatus::Active, 10, true);
        let from_invoice = record("sub_a", PlanStatus::Active, 20, false);
        let merged =
            SubscriptionRecord::merge_invoice_facts(Some(cancelling), from_invoice).unwrap();
        assert!(merged.cancel_at_period_end);
        assert_eq!(merged.as_of, 20);
    }
}
