//! The paid periods of a subscription, as its paid invoices say: the period Stripe was paid
//! for and the level (plan, add-on units) in force, kept for the current period and the one
//! before it. A change's proration lines are valued against the period they bill (the one
//! before, after an interval switch), and the credit refresh grants a yearly plan's months
//! from it. One document per subscription, two periods at most: it never grows.

use super::records::workspace_pk;
use crate::ids::{InvoiceId, SubscriptionId, WorkspaceId};
use crate::refresh::{Billed, PartsSet};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use crate::subscriptions::paid::Level;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A paid period and where its level came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidPeriod {
    pub level: Level,
    /// The invoice that opened the period.
    pub invoice: InvoiceId,
    /// When the level was last set (the period start, or the time of a paid change), so a
    /// late change never overwrites a newer one.
    pub level_as_of: DateTime<Utc>,
    /// The order of the change that set it among changes of the same second
    /// (`billing::change_rank`); none for the period's own level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_rank: Option<u64>,
    /// Its place among the subscription's periods that begin in the same second
    /// ([`period_rank`](crate::refresh::period_rank)), when its own invoice opened it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    /// Which change last set each part of the level; `None` for a period recorded before
    /// they were kept (a change older than its level then changes nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<PartsSet>,
}

impl PaidPeriod {
    /// Its place among periods from the same second: its invoice's, or for one a paid
    /// change opened, the change's as a switch's (as the credit refresh orders them).
    fn order(&self) -> Option<u64> {
        self.rank
            .or(self.level_rank.map(|r| crate::refresh::SWITCH | r))
    }
}

/// The current paid period of a subscription and the one before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidPeriods {
    pub subscription: SubscriptionId,
    pub current: PaidPeriod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PaidPeriod>,
}

impl PaidPeriods {
    /// The periods known, newest first.
    pub fn levels(&self) -> Vec<Level> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .map(|p| p.level.clone())
            .collect()
    }

    /// Merges a newly paid period: a later one becomes current (the old current becomes
    /// previous); the same period is a replay; an earlier one is kept only as previous.
    /// Periods from the same second are told apart by their end and ordered by
    /// [`PaidPeriod::order`] once both are known; until then the same start is a replay.
    pub fn open(current: Option<Self>, sub: &SubscriptionId, period: PaidPeriod) -> Option<Self> {
        let Some(mut doc) = current else {
            return Some(Self {
                subscription: sub.clone(),
                current: period,
                previous: None,
            });
        };
        let start = period.level.period_start;
        let same = |p: &PaidPeriod| {
            let distinct = matches!((p.rank, period.rank), (Some(a), Some(b)) if a != b);
            p.level.period_start == start
                && (p.order().is_none()
                    || period.order().is_none()
                    || (p.level.period_end == period.level.period_end && !distinct))
        };
        if same(&doc.current) || doc.previous.as_ref().is_some_and(same) {
            return None;
        }
        let later = |p: &PaidPeriod| (start, period.order()) > (p.level.period_start, p.order());
        if later(&doc.current) {
            doc.previous = Some(std::mem::replace(&mut doc.current, period));
        } else if doc.previous.as_ref().is_none_or(later) {
            doc.previous = Some(period);
        } else {
            return None;
        }
        Some(doc)
    }

    /// Sets the level a paid change leads to, in the period it belongs to, unless a later
    /// change already set it.
    /// With no document yet, or none for a period later than those recorded (the change's
    /// invoice applied before the period's own), the period is recorded at the changed
    /// level, opened by `invoice`.
    /// A change older than the level still sets the parts it billed that no later change
    /// billed (units added, then an upgrade billing no add-on lines, applied first).
    pub fn change(
        current: Option<Self>,
        sub: &SubscriptionId,
        invoice: &InvoiceId,
        level: &Level,
        at: DateTime<Utc>,
        rank: u64,
        billed: Billed,
    ) -> Option<Self> {
        let opened = || {
            let mut parts = PartsSet::default();
            parts.set_by(billed, at, rank);
            PaidPeriod {
                level: level.clone(),
                invoice: invoice.clone(),
                level_as_of: at,
                level_rank: Some(rank),
                rank: None,
                parts: Some(parts),
            }
        };
        let Some(mut doc) = current else {
            return Some(Self {
                subscription: sub.clone(),
                current: opened(),
                previous: None,
            });
        };
        for p in std::iter::once(&mut doc.current).chain(doc.previous.as_mut()) {
            if p.level.period_start == level.period_start && p.level.period_end == level.period_end
            {
                // Of two changes in the same second, the later by rank (an earlier one's
                // event delivered again must not undo the later one).
                let newer =
                    p.level_as_of < at || (p.level_as_of == at && p.level_rank.unwrap_or(0) < rank);
                if !newer {
                    let Some(parts) = &mut p.parts else {
                        return None;
                    };
                    let sets = parts.newer_than_set(billed, at, rank);
                    let mut next = p.level.clone();
                    if sets.plan {
                        next.plan = level.plan.clone();
                    }
                    if sets.addon {
                        next.addon_units = level.addon_units;
                    }
                    let before = parts.clone();
                    parts.set_by(sets, at, rank);
                    if next == p.level && *parts == before {
                        return None;
                    }
                    p.level = next;
                    return Some(doc);
                }
                if p.level == *level && p.parts.is_none() {
                    return None;
                }
                p.level = level.clone();
                p.level_as_of = at;
                p.level_rank = Some(rank);
                if let Some(parts) = &mut p.parts {
                    parts.set_by(billed, at, rank);
                }
                return Some(doc);
            }
        }
        // A change in a period whose own invoice is not applied yet (Stripe charges a
        // renewal up to an hour after the period starts): the period is recorded at the
        // changed level; its own invoice, when it comes, leaves that level as it is.
        // One from the same second as the current period is a switch's (see
        // `PaidPeriod::order`), later than the current one if its change is.
        let current = &doc.current;
        let switch = Some(crate::refresh::SWITCH | rank);
        if (level.period_start, switch) > (current.level.period_start, current.order()) {
            doc.previous = Some(std::mem::replace(&mut doc.current, opened()));
            return Some(doc);
        }
        None
    }
}

fn sk(sub: &SubscriptionId) -> String {
    format!("PAID#{sub}")
}

pub async fn get(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    sub: &SubscriptionId,
) -> Result<Option<PaidPeriods>, StoreError> {
    docs::get(docs, &workspace_pk(workspace), &sk(sub)).await
}

/// Records a paid period (idempotent; any order).
pub async fn open(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    sub: &SubscriptionId,
    period: PaidPeriod,
) -> Result<Option<PaidPeriods>, StoreError> {
    docs::update(docs, &workspace_pk(workspace), &sk(sub), |cur| {
        PaidPeriods::open(cur, sub, period.clone())
    })
    .await
}

/// Records the level a paid change leads to (idempotent; a late one never wins).
pub async fn change(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    sub: &SubscriptionId,
    invoice: &InvoiceId,
    level: &Level,
    (at, rank): (DateTime<Utc>, u64),
    billed: Billed,
) -> Result<Option<PaidPeriods>, StoreError> {
    docs::update(docs, &workspace_pk(workspace), &sk(sub), |cur| {
        PaidPeriods::change(cur, sub, invoice, level, at, rank, billed)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::Interval;
    use chrono::TimeZone;

    fn period(start_day: u32, plan: &str) -> PaidPeriod {
        let start = Utc.with_ymd_and_hms(2027, 1, start_day, 0, 0, 0).unwrap();
        PaidPeriod {
            level: Level {
                plan: plan.into(),
                interval: Interval::Monthly,
                addon_units: 0,
                period_start: start,
                period_end: start + chrono::Duration::days(28),
            },
            invoice: format!("in_{start_day}").parse().unwrap(),
            level_as_of: start,
            level_rank: None,
            rank: None,
            parts: Some(PartsSet::default()),
        }
    }

    /// A change billing the plan alone.
    const PLAN: Billed = Billed {
        plan: true,
        addon: false,
    };

    /// The document after opening each period in `order`, then each again (duplicates).
    fn opened_twice(sub: &SubscriptionId, order: &[PaidPeriod]) -> PaidPeriods {
        let mut doc = None;
        for p in order.iter().chain(order) {
            if let Some(d) = PaidPeriods::open(doc.clone(), sub, p.clone()) {
                doc = Some(d);
            }
        }
        doc.unwrap()
    }

    #[test]
    fn periods_merge_in_any_order_and_keep_two() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let (a, b, c) = (period(1, "plus"), period(2, "max"), period(3, "team"));
        let orders = [
            [a.clone(), b.clone(), c.clone()],
            [c.clone(), a.clone(), b.clone()],
            [b.clone(), c.clone(), a.clone()],
        ];
        for order in orders {
            let doc = opened_twice(&sub, &order);
            assert_eq!(doc.current, c);
            assert_eq!(doc.previous, Some(b.clone()));
        }
    }

    /// A monthly renewal and a switch to a year made in its second. The renewal's invoice
    /// is numbered after the switch's (Stripe finalizes a renewal's up to an hour later).
    fn renewal_and_switch() -> (PaidPeriod, PaidPeriod) {
        let renewal = PaidPeriod {
            rank: crate::refresh::period_rank(Some("subscription_cycle"), Some("A-0006")),
            ..period(1, "plus")
        };
        let mut switch = period(1, "max");
        switch.invoice = "in_switch".parse().unwrap();
        switch.level.interval = Interval::Yearly;
        switch.level.period_end = switch.level.period_start + chrono::Duration::days(365);
        switch.rank = crate::refresh::period_rank(Some("subscription_update"), Some("A-0002"));
        (renewal, switch)
    }

    #[test]
    fn a_switch_in_the_second_a_period_began_becomes_current_in_any_order() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let (renewal, switch) = renewal_and_switch();
        for order in [
            [renewal.clone(), switch.clone()],
            [switch.clone(), renewal.clone()],
        ] {
            let doc = opened_twice(&sub, &order);
            assert_eq!(doc.current, switch);
            assert_eq!(doc.previous, Some(renewal.clone()));
        }
        // Without ranks (documents from before), the same start is a replay.
        let old = PaidPeriods::open(None, &sub, period(1, "plus")).unwrap();
        let unranked = PaidPeriod {
            rank: None,
            ..switch.clone()
        };
        assert!(PaidPeriods::open(Some(old), &sub, unranked).is_none());
    }

    #[test]
    fn a_change_in_a_switch_before_its_invoice_opens_the_switch_period() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let (renewal, switch) = renewal_and_switch();
        let doc = PaidPeriods::open(None, &sub, renewal.clone()).unwrap();
        // A change of the switch's year, numbered after the switch, arrives first.
        let mut changed = switch.level.clone();
        changed.plan = "team".into();
        let rank = crate::billing::change_rank(Some("A-0003"), 0);
        let at = switch.level.period_start;
        let doc = PaidPeriods::change(
            Some(doc),
            &sub,
            &"in_change".parse().unwrap(),
            &changed,
            at,
            rank,
            PLAN,
        )
        .unwrap();
        assert_eq!(doc.current.level, changed);
        assert_eq!(
            doc.previous.as_ref().map(|p| &p.level),
            Some(&renewal.level)
        );
        // The switch's own invoice leaves the changed level as it is.
        assert!(PaidPeriods::open(Some(doc.clone()), &sub, switch.clone()).is_none());
        // A change of the renewal's month from before the switch changes nothing now.
        let mut old = renewal.level.clone();
        old.plan = "generative".into();
        let early = crate::billing::change_rank(Some("A-0001"), 0);
        let after = PaidPeriods::change(
            Some(doc.clone()),
            &sub,
            &"in_early".parse().unwrap(),
            &old,
            at,
            early,
            PLAN,
        );
        assert!(after.is_none_or(|d| d.current.level == changed));
    }

    #[test]
    fn a_late_change_sets_the_parts_no_later_change_billed() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let p = period(1, "plus");
        let doc = PaidPeriods::open(None, &sub, p.clone()).unwrap();
        let t1 = p.level_as_of + chrono::Duration::days(3);
        let t2 = t1 + chrono::Duration::days(1);
        let units = Billed {
            plan: false,
            addon: true,
        };
        let inv = p.invoice.clone();
        // An upgrade billing no add-on lines, then the units added before it.
        let max = Level {
            plan: "max".into(),
            ..p.level.clone()
        };
        let up = PaidPeriods::change(Some(doc.clone()), &sub, &inv, &max, t2, 1, PLAN).unwrap();
        let five = Level {
            addon_units: 5,
            ..max.clone()
        };
        let both = PaidPeriods::change(Some(up.clone()), &sub, &inv, &five, t1, 1, units).unwrap();
        assert_eq!(
            (
                both.current.level.plan.as_str(),
                both.current.level.addon_units
            ),
            ("max", 5)
        );
        assert_eq!(both.current.level_as_of, t2);
        // Delivered again: nothing more.
        assert_eq!(
            PaidPeriods::change(Some(both.clone()), &sub, &inv, &five, t1, 1, units),
            None
        );
        // An even older plan change: the upgrade billed the plan after it.
        let generative = Level {
            plan: "generative".into(),
            ..both.current.level.clone()
        };
        let t0 = t1 - chrono::Duration::days(1);
        assert_eq!(
            PaidPeriods::change(Some(both), &sub, &inv, &generative, t0, 1, PLAN),
            None
        );
        // Units removed (a level equal to the one known), then the units added before it:
        // the removal is the later of the two, so none stay.
        let none =
            PaidPeriods::change(Some(doc.clone()), &sub, &inv, &p.level, t2, 1, units).unwrap();
        let five_plus = Level {
            addon_units: 5,
            ..p.level.clone()
        };
        let after = PaidPeriods::change(Some(none.clone()), &sub, &inv, &five_plus, t1, 1, units);
        assert!(after.is_none_or(|d| d.current.level.addon_units == 0));
        // A period recorded before the parts were kept: a late change changes nothing.
        let mut legacy = up;
        legacy.current.parts = None;
        assert_eq!(
            PaidPeriods::change(Some(legacy), &sub, &inv, &five, t1, 1, units),
            None
        );
    }

    #[test]
    fn the_latest_change_sets_the_level() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let p = period(1, "plus");
        let doc = PaidPeriods::open(None, &sub, p.clone()).unwrap();
        let t1 = p.level_as_of + chrono::Duration::days(3);
        let t2 = t1 + chrono::Duration::days(1);
        let max = Level {
            plan: "max".into(),
            ..p.level.clone()
        };
        let gen_ = Level {
            plan: "generative".into(),
            ..p.level.clone()
        };
        let inv = p.invoice.clone();
        let later = PaidPeriods::change(Some(doc.clone()), &sub, &inv, &gen_, t2, 1, PLAN).unwrap();
        assert_eq!(
            PaidPeriods::change(Some(later.clone()), &sub, &inv, &max, t1, 2, PLAN),
            None
        );
        assert_eq!(later.current.level.plan, "generative");
        // Two in the same second: the later by rank, whatever order they come in.
        let second =
            PaidPeriods::change(Some(later.clone()), &sub, &inv, &max, t2, 2, PLAN).unwrap();
        assert_eq!(second.current.level.plan, "max");
        assert_eq!(
            PaidPeriods::change(Some(second.clone()), &sub, &inv, &gen_, t2, 1, PLAN),
            None,
            "the first change delivered again does not undo the second"
        );
        // A change applied before its period's own invoice records the period at the level.
        let first = PaidPeriods::change(None, &sub, &inv, &max, t1, 1, PLAN).unwrap();
        assert_eq!(first.current.level.plan, "max");
        // The period's own invoice then finds it recorded and keeps the changed level.
        assert_eq!(PaidPeriods::open(Some(first), &sub, p.clone()), None);
    }

    #[test]
    fn a_change_before_a_renewal_is_charged_records_the_new_period_at_its_level() {
        let sub: SubscriptionId = "sub_1".parse().unwrap();
        let (old, renewal) = (period(1, "plus"), period(2, "plus"));
        let doc = PaidPeriods::open(None, &sub, old.clone()).unwrap();
        // An upgrade paid in the hour before Stripe charged the renewal.
        let at = renewal.level.period_start + chrono::Duration::minutes(20);
        let max = Level {
            plan: "max".into(),
            ..renewal.level.clone()
        };
        let inv: InvoiceId = "in_change".parse().unwrap();
        let changed = PaidPeriods::change(Some(doc), &sub, &inv, &max, at, 1, PLAN).unwrap();
        assert_eq!(changed.current.level, max);
        assert_eq!(changed.previous, Some(old));
        // The renewal's own invoice keeps the changed level.
        assert_eq!(PaidPeriods::open(Some(changed), &sub, renewal), None);
    }
}
