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
    /// When the subscription was created (Stripe's `created`; unknown from an invoice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
    /// The start of a period whose renewal invoice Stripe voided (collection paused, or
    /// voided by staff): never paid, so an active plan in it gives no benefits. Kept until
    /// the subscription moves past that period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_period: Option<DateTime<Utc>>,
    /// When the level shown (plan, interval, units, scheduled change) was the
    /// subscription's, if before `as_of`: facts read off an invoice show the level the
    /// invoice was made with. A subscription event newer than that brings its level even
    /// when the status here is newer (see [`merge`](Self::merge)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_as_of: Option<i64>,
}

impl SubscriptionRecord {
    fn order(&self) -> (i64, u8, &str) {
        let terminal = u8::from(self.status == PlanStatus::Canceled);
        (self.as_of, terminal, self.as_of_event.as_str())
    }

    /// When the level shown was the subscription's.
    fn level_time(&self) -> i64 {
        self.level_as_of.unwrap_or(self.as_of).min(self.as_of)
    }

    /// The document with the level of `incoming`, a subscription event older than the
    /// document's facts but newer than the level they show, in the same period: a change
    /// made while a renewal's draft waited to be charged, whose event came after the
    /// renewal's payment. The status stays the document's.
    fn with_newer_level(current: &Self, incoming: &Self) -> Option<Self> {
        (current.id == incoming.id
            && current.period_start == incoming.period_start
            && current.period_end == incoming.period_end
            && current.order() >= incoming.order()
            && incoming.as_of > current.level_time())
        .then(|| Self {
            plan: incoming.plan.clone(),
            interval: incoming.interval,
            addon_units: incoming.addon_units,
            scheduled: incoming.scheduled.clone(),
            level_as_of: Some(incoming.as_of),
            ..current.clone()
        })
    }

    /// Whether `incoming`, an active subscription's own event, is about the subscription
    /// that replaced the current one, whatever order their events came in (the old one's
    /// deletion may arrive after the new one's first events): created after it, once the
    /// current one was ended, set to end, or past its period. A trial, an incomplete first
    /// payment, or a second subscription made while the current one runs replaces nothing.
    fn replaces(current: &Self, incoming: &Self) -> bool {
        let Some((new, old)) = incoming.created.zip(current.created) else {
            return false;
        };
        incoming.status == PlanStatus::Active
            && incoming.stripe_status == "active"
            && new > old
            && (current.status == PlanStatus::Canceled
                || current.cancel_at_period_end
                || current.period_end <= new)
    }

    /// The newer of two descriptions of the same subscription, from a subscription event.
    /// A different subscription replaces the current one once that has ended and its facts
    /// are newer, or when it was created after it (see [`replaces`](Self::replaces)).
    pub fn merge(current: Option<Self>, incoming: Self) -> Option<Self> {
        // Stripe never makes a subscription incomplete again: it is incomplete only until
        // its first invoice is paid. Checkout sends its creation (incomplete) and its
        // activation in the same second, in no order, with ids that do not follow time:
        // the creation says nothing once another status of the subscription is known (but
        // when it was made, if that is not known yet), and another status from the same
        // second on replaces it. Only Stripe's own incomplete: one an invoice's facts set
        // (a failed first invoice, whatever Stripe said) carries the time of its lines
        // (`level_as_of`), which nothing sets on an incomplete subscription otherwise
        // (Stripe changes nothing but metadata of one), and goes by time as before.
        if let Some(c) = &current
            && c.id == incoming.id
            && c.status != PlanStatus::Canceled
            && incoming.status != PlanStatus::Canceled
        {
            let (was, now) = (
                c.stripe_status == "incomplete",
                incoming.stripe_status == "incomplete",
            );
            if now && !was {
                return (c.created.is_none() && incoming.created.is_some()).then(|| Self {
                    created: incoming.created,
                    ..c.clone()
                });
            }
            if was && !now && c.level_as_of.is_none() && incoming.as_of >= c.as_of {
                return Self::keep_voided_period(current.as_ref(), Some(incoming));
            }
        }
        if let Some(c) = &current
            && c.id != incoming.id
            && Self::replaces(c, &incoming)
        {
            return Some(incoming);
        }
        if let Some(c) = &current
            && let Some(leveled) = Self::with_newer_level(c, &incoming)
        {
            return Some(leveled);
        }
        let merged = Self::merge_facts(current.clone(), incoming);
        Self::keep_voided_period(current.as_ref(), merged)
    }

    /// Carries the voided period over to the merged document while the subscription has
    /// not moved past it.
    fn keep_voided_period(current: Option<&Self>, merged: Option<Self>) -> Option<Self> {
        let mut m = merged?;
        m.voided_period = current
            .filter(|c| c.id == m.id)
            .and_then(|c| c.voided_period)
            .filter(|p| m.period_start <= *p);
        Some(m)
    }

    /// The document once Stripe voided the renewal invoice of the period from `start`:
    /// `None` when it says nothing new (another subscription, a period already past).
    pub fn with_voided_period(&self, sub: &SubscriptionId, start: DateTime<Utc>) -> Option<Self> {
        (&self.id == sub
            && self.period_start <= start
            && self.voided_period.is_none_or(|v| v < start))
        .then(|| Self {
            voided_period: Some(start),
            ..self.clone()
        })
    }

    fn merge_facts(current: Option<Self>, incoming: Self) -> Option<Self> {
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
    /// cancellation or when the subscription was created: the known ones are kept, an
    /// invoice of an earlier period changes nothing, and an invoice never makes another
    /// subscription replace the current one before it ended.
    ///
    /// `lines_as_of`: when the invoice was made (Stripe's `created`). Its lines show the
    /// subscription's level then; facts of the same period from then on (a change made
    /// while a renewal's draft waited to be charged, up to an hour or, for a bank debit,
    /// days) keep their level, and the invoice brings only its status. Facts of the very
    /// second the draft was made are the period's start (the level the draft was made
    /// with) or a change made after it. The same period is the same start and end: an
    /// interval switch in a period's first second starts a period of its own.
    ///
    /// `switch`: the invoice is an interval switch's (`subscription_update`). A sign-up's or
    /// renewal's invoice for another period from the same second as the one known, made
    /// no later than the facts known, is of the period a switch in that second replaced
    /// (Stripe charges a renewal's draft up to an hour after it made it): it says nothing
    /// about the subscription now.
    pub fn merge_invoice_facts(
        current: Option<Self>,
        mut incoming: Self,
        lines_as_of: i64,
        switch: bool,
    ) -> Option<Self> {
        incoming.level_as_of = Some(lines_as_of);
        if let Some(c) = &current
            && c.id == incoming.id
        {
            // An invoice of an earlier period (retried, or paid late) says nothing about
            // the period the subscription is in now.
            if incoming.period_start < c.period_start {
                return None;
            }
            if !switch
                && incoming.period_start == c.period_start
                && incoming.period_end != c.period_end
                && c.level_time() >= lines_as_of
            {
                return None;
            }
            if incoming.period_start == c.period_start
                && incoming.period_end == c.period_end
                && c.level_time() >= lines_as_of
            {
                incoming.plan = c.plan.clone();
                incoming.interval = c.interval;
                incoming.addon_units = c.addon_units;
                incoming.scheduled = c.scheduled.clone();
                incoming.level_as_of = Some(c.level_time());
            }
            incoming.cancel_at_period_end = c.cancel_at_period_end;
            incoming.ended_at = incoming.ended_at.or(c.ended_at);
            incoming.created = incoming.created.or(c.created);
        }
        let merged = Self::merge_facts(current.clone(), incoming);
        Self::keep_voided_period(current.as_ref(), merged)
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
            created: None,
            voided_period: None,
            level_as_of: None,
        }
    }

    #[test]
    fn a_voided_renewal_marks_its_period_until_the_subscription_moves_past_it() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let in_period = |status, as_of, start: i64| SubscriptionRecord {
            period_start: t(start),
            period_end: t(start + 100),
            ..record("sub_p", status, as_of, false)
        };
        let sub = SubscriptionId::parse("sub_p").unwrap();
        // The renewal's invoice voided before the renewal's own event: kept for period 100.
        let paused = in_period(PlanStatus::Paused, 10, 0);
        let marked = paused.with_voided_period(&sub, t(100)).unwrap();
        assert_eq!(marked.with_voided_period(&sub, t(100)), None, "said once");
        // A mark only moves forward: an older void delivered again leaves a later one.
        let ahead = paused.with_voided_period(&sub, t(200)).unwrap();
        assert_eq!(ahead.with_voided_period(&sub, t(100)), None);
        let other = SubscriptionId::parse("sub_q").unwrap();
        assert_eq!(marked.with_voided_period(&other, t(100)), None);
        let renewed =
            SubscriptionRecord::merge(Some(marked), in_period(PlanStatus::Paused, 20, 100))
                .unwrap();
        assert_eq!(renewed.voided_period, Some(t(100)));
        // Resumed in it: still marked; an older period's void says nothing.
        let resumed =
            SubscriptionRecord::merge(Some(renewed), in_period(PlanStatus::Active, 30, 100))
                .unwrap();
        assert_eq!(resumed.voided_period, Some(t(100)));
        assert_eq!(resumed.with_voided_period(&sub, t(0)), None);
        // An invoice of an earlier period (a retry of an old one) changes nothing.
        let old = invoice_facts(Some(resumed.clone()), in_period(PlanStatus::PastDue, 40, 0));
        assert_eq!(old, None);
        let same = invoice_facts(
            Some(resumed.clone()),
            in_period(PlanStatus::Active, 45, 100),
        )
        .unwrap();
        assert_eq!(same.voided_period, Some(t(100)));
        // The next renewal moves past it.
        let next = SubscriptionRecord::merge(Some(resumed), in_period(PlanStatus::Active, 50, 200))
            .unwrap();
        assert_eq!(next.voided_period, None);
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
            assert_eq!(invoice_facts(Some(ended.clone()), late.clone()), None);
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
    fn a_subscription_created_after_the_current_one_replaces_it_whatever_the_order() {
        let at = |s: i64| DateTime::from_timestamp(s, 0);
        // Set to end at its period end (100); the new one created before that.
        let mut old = record("sub_old", PlanStatus::Active, 10, true);
        old.created = at(1);
        let mut new = record("sub_new", PlanStatus::Active, 20, false);
        new.created = at(15);
        // A second subscription made while the old one runs on, or a trial, or one whose
        // first payment is incomplete, replaces nothing.
        let mut running = old.clone();
        running.cancel_at_period_end = false;
        assert_eq!(
            SubscriptionRecord::merge(Some(running.clone()), new.clone()),
            None
        );
        let mut trial = new.clone();
        trial.stripe_status = "trialing".into();
        assert_eq!(SubscriptionRecord::merge(Some(old.clone()), trial), None);
        let mut incomplete = new.clone();
        incomplete.status = PlanStatus::PastDue;
        incomplete.stripe_status = "incomplete".into();
        assert_eq!(
            SubscriptionRecord::merge(Some(old.clone()), incomplete),
            None
        );
        // Past the running one's period, it does.
        let mut after = new.clone();
        after.created = at(100);
        assert_eq!(
            SubscriptionRecord::merge(Some(running), after.clone()),
            Some(after)
        );
        // The new one's first events before the old one's deletion.
        let merged = SubscriptionRecord::merge(Some(old.clone()), new.clone()).unwrap();
        assert_eq!(merged.id.as_str(), "sub_new");
        // The old one's deletion, and any late event of it, change nothing then.
        let mut deleted = record("sub_old", PlanStatus::Canceled, 30, false);
        deleted.created = at(1);
        assert_eq!(
            SubscriptionRecord::merge(Some(merged.clone()), deleted.clone()),
            None
        );
        assert_eq!(
            SubscriptionRecord::merge(Some(merged.clone()), old.clone()),
            None
        );
        // The new one's events created before the old one's deletion still land after it.
        let mut earlier = new.clone();
        earlier.as_of = 5;
        assert_eq!(
            SubscriptionRecord::merge(Some(deleted.clone()), earlier.clone()),
            Some(earlier)
        );
        // An invoice never makes another subscription replace a live one.
        let mut from_invoice = new.clone();
        from_invoice.created = None;
        assert_eq!(invoice_facts(Some(old.clone()), from_invoice), None);
        // Nor does a newer subscription that is already canceled.
        let mut gone = new;
        gone.status = PlanStatus::Canceled;
        assert_eq!(SubscriptionRecord::merge(Some(old), gone), None);
    }

    /// Facts of an invoice made when its event was sent.
    fn invoice_facts(
        current: Option<SubscriptionRecord>,
        incoming: SubscriptionRecord,
    ) -> Option<SubscriptionRecord> {
        let made = incoming.as_of;
        SubscriptionRecord::merge_invoice_facts(current, incoming, made, false)
    }

    #[test]
    fn a_renewal_paid_after_a_change_keeps_the_change_and_brings_its_status() {
        // A past-due renewal's draft made at 10 with the old level; an upgrade at 15; the
        // draft paid at 20.
        let mut upgraded = record("sub_a", PlanStatus::PastDue, 15, false);
        upgraded.plan = "team".into();
        upgraded.addon_units = 4;
        let mut renewal = record("sub_a", PlanStatus::Active, 20, false);
        renewal.plan = "max".into();
        let merged = SubscriptionRecord::merge_invoice_facts(
            Some(upgraded.clone()),
            renewal.clone(),
            10,
            false,
        )
        .unwrap();
        assert_eq!((merged.plan.as_str(), merged.addon_units), ("team", 4));
        assert_eq!((merged.status, merged.as_of), (PlanStatus::Active, 20));
        // Lines made after the facts known: the invoice's level.
        let merged = SubscriptionRecord::merge_invoice_facts(
            Some(upgraded.clone()),
            renewal.clone(),
            16,
            false,
        )
        .unwrap();
        assert_eq!((merged.plan.as_str(), merged.addon_units), ("max", 0));
        // The upgrade's own event delivered after the renewal's payment: older than the
        // status, newer than the renewal's lines, so its level comes in and the status
        // stays.
        let mut period_start = record("sub_a", PlanStatus::PastDue, 10, false);
        period_start.plan = "max".into();
        let paid = SubscriptionRecord::merge_invoice_facts(
            Some(period_start.clone()),
            renewal.clone(),
            10,
            false,
        )
        .unwrap();
        assert_eq!((paid.plan.as_str(), paid.level_as_of), ("max", Some(10)));
        let late = SubscriptionRecord::merge(Some(paid.clone()), upgraded.clone()).unwrap();
        assert_eq!((late.plan.as_str(), late.addon_units), ("team", 4));
        assert_eq!((late.status, late.as_of), (PlanStatus::Active, 20));
        assert_eq!(late.level_as_of, Some(15));
        // Delivered again, or an event older than the lines: nothing changes.
        assert_eq!(
            SubscriptionRecord::merge(Some(late), upgraded.clone()),
            None
        );
        let mut stale = record("sub_a", PlanStatus::Active, 9, false);
        stale.plan = "plus".into();
        assert_eq!(SubscriptionRecord::merge(Some(paid), stale), None);
        // An interval switch in the period's first second starts a period of its own
        // (same start, another end): its invoice's level, made in that second, comes in.
        let mut switch = renewal.clone();
        switch.plan = "team".into();
        switch.interval = Interval::Yearly;
        switch.period_end = DateTime::from_timestamp(1000, 0).unwrap();
        let stale = switch.clone();
        let switched =
            SubscriptionRecord::merge_invoice_facts(Some(upgraded.clone()), switch, 10, true)
                .unwrap();
        assert_eq!(
            (switched.plan.as_str(), switched.interval),
            ("team", Interval::Yearly)
        );
        // The renewal whose draft that second made (the old period, monthly), charged an
        // hour later: the switched period stays.
        let mut drafted = stale;
        drafted.plan = "max".into();
        drafted.interval = Interval::Monthly;
        drafted.period_end = DateTime::from_timestamp(100, 0).unwrap();
        drafted.as_of = 80;
        assert_eq!(
            SubscriptionRecord::merge_invoice_facts(Some(switched), drafted, 10, false),
            None
        );
        // Facts of an earlier period give way to the invoice's new one.
        let mut earlier = upgraded;
        earlier.period_start -= chrono::Duration::days(30);
        let mut next = renewal;
        next.period_start = earlier.period_start + chrono::Duration::days(30);
        let merged =
            SubscriptionRecord::merge_invoice_facts(Some(earlier), next, 10, false).unwrap();
        assert_eq!(merged.plan, "max");
    }

    #[test]
    fn invoice_facts_keep_a_known_cancellation() {
        let cancelling = record("sub_a", PlanStatus::Active, 10, true);
        let from_invoice = record("sub_a", PlanStatus::Active, 20, false);
        let merged = invoice_facts(Some(cancelling), from_invoice).unwrap();
        assert!(merged.cancel_at_period_end);
        assert_eq!(merged.as_of, 20);
    }
}
