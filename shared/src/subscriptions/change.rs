//! What a change of plan, interval or add-on units means: whether it applies now or at the
//! renewal, what Stripe is asked to bill, and how many credits it grants now.
//!
//! Upgrades and more add-on units apply now: Stripe invoices the prorated difference and
//! the extra credits are granted at once. Downgrades and fewer units wait for the renewal,
//! so the current benefits are kept until then.
//!
//! Credits granted now for an upgrade: the difference between the two plans' monthly
//! allowances (above what the billing month already received), prorated over what is left
//! of that month, rounded up. Add-on units: the full credits of each new unit, expiring at
//! the end of the billing month.

use super::{Interval, calendar};
use crate::catalog::{Catalog, Plan};
use crate::money::{Cents, Credits};
use chrono::{DateTime, Utc};

/// How a requested change relates to the current terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The current terms: cancels a scheduled downgrade, if any.
    Same,
    /// A bigger allowance, or the same plan on another interval: applies now.
    Upgrade,
    /// A smaller (or equal) allowance: applies at the renewal.
    Downgrade,
}

impl ChangeKind {
    pub fn of(current: (&Plan, Interval), target: (&Plan, Interval)) -> Self {
        let ((cur, cur_iv), (to, to_iv)) = (current, target);
        if cur.id == to.id && cur_iv == to_iv {
            ChangeKind::Same
        } else if to.monthly_credits > cur.monthly_credits || (cur.id == to.id && cur_iv != to_iv) {
            ChangeKind::Upgrade
        } else {
            ChangeKind::Downgrade
        }
    }
}

/// What Stripe bills for a plan per interval.
pub fn plan_unit_price(catalog: &Catalog, plan: &Plan, interval: Interval) -> Cents {
    match interval {
        Interval::Monthly => plan.monthly_price_cents,
        Interval::Yearly => catalog.yearly_price(plan),
    }
}

/// What Stripe bills for one add-on unit of the plan per interval; `None` if the catalog
/// has no add-on for the plan.
pub fn addon_unit_price(catalog: &Catalog, plan: &Plan, interval: Interval) -> Option<Cents> {
    let addon = catalog.addon(&plan.addon)?;
    Some(match interval {
        Interval::Monthly => addon.unit_price_cents,
        Interval::Yearly => addon
            .unit_price_cents
            .checked_mul(12)
            .expect("catalog validation bounds add-on prices"),
    })
}

/// The billing month of a period that contains `now`, cut at the period's end: credits
/// granted now are prorated over it and lapse at its end. A period of one month or less
/// is its own billing month: its start may already be clamped to a short month's end (an
/// anchor on the 31st renews on Feb 28), so months counted from it would end early. Longer
/// (yearly) periods start on the anchor's own day, and their months are counted from it.
pub fn allowance_window(
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    // No calendar month is longer than 31 days; anything longer is a multi-month period.
    if period_end - period_start <= chrono::Duration::days(31) {
        return (period_start, period_end);
    }
    let (start, end) = calendar::month_containing(period_start, now);
    (start, end.min(period_end))
}

/// `credits` prorated over what is left of `window` at `now`, rounded up.
pub fn prorate(
    credits: Credits,
    window: (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Credits {
    let (start, end) = window;
    let total = (end - start).num_seconds().max(1) as u64;
    let left = (end - now).num_seconds().clamp(0, total as i64) as u64;
    // In u128 the product cannot overflow; `left <= total`, so the share fits back in u64.
    let share = (u128::from(credits.get()) * u128::from(left)).div_ceil(u128::from(total));
    Credits::new(share as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn bigger_allowances_and_interval_switches_are_upgrades() {
        let c = Catalog::builtin();
        let (plus, max) = (c.plan("plus").unwrap(), c.plan("max").unwrap());
        let m = Interval::Monthly;
        assert_eq!(ChangeKind::of((plus, m), (max, m)), ChangeKind::Upgrade);
        assert_eq!(ChangeKind::of((max, m), (plus, m)), ChangeKind::Downgrade);
        assert_eq!(ChangeKind::of((max, m), (max, m)), ChangeKind::Same);
        assert_eq!(
            ChangeKind::of((max, m), (max, Interval::Yearly)),
            ChangeKind::Upgrade
        );
    }

    #[test]
    fn the_allowance_window_is_the_billing_month_cut_at_the_period_end() {
        let start = Utc.with_ymd_and_hms(2027, 1, 31, 0, 0, 0).unwrap();
        let end = Utc.with_ymd_and_hms(2028, 1, 31, 0, 0, 0).unwrap();
        let feb = Utc.with_ymd_and_hms(2027, 2, 15, 0, 0, 0).unwrap();
        assert_eq!(
            allowance_window(start, end, feb),
            (start, Utc.with_ymd_and_hms(2027, 2, 28, 0, 0, 0).unwrap())
        );
        let short_end = Utc.with_ymd_and_hms(2027, 2, 10, 0, 0, 0).unwrap();
        assert_eq!(allowance_window(start, short_end, start).1, short_end);
    }

    #[test]
    fn a_monthly_period_starting_on_a_clamped_month_end_is_one_window() {
        // Anchored on Jan 31: the period after February runs Feb 28 -> Mar 31.
        let start = Utc.with_ymd_and_hms(2027, 2, 28, 9, 30, 0).unwrap();
        let end = Utc.with_ymd_and_hms(2027, 3, 31, 9, 30, 0).unwrap();
        let late = Utc.with_ymd_and_hms(2027, 3, 29, 9, 30, 0).unwrap();
        assert_eq!(allowance_window(start, end, late), (start, end));
        // Two days of 31 left: about 2/31 of the difference, not 2/3 of it.
        let credits = prorate(Credits::new(250), allowance_window(start, end, late), late);
        assert_eq!(credits, Credits::new(17));
    }

    #[test]
    fn proration_rounds_up_and_never_exceeds_the_whole() {
        let start = Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap();
        let end = Utc.with_ymd_and_hms(2027, 3, 31, 0, 0, 0).unwrap();
        assert_eq!(
            prorate(Credits::new(300), (start, end), start),
            Credits::new(300)
        );
        assert_eq!(
            prorate(
                Credits::new(300),
                (start, end),
                start + chrono::Duration::days(15)
            ),
            Credits::new(150)
        );
        assert_eq!(prorate(Credits::new(300), (start, end), end), Credits::ZERO);
        assert_eq!(
            prorate(
                Credits::new(300),
                (start, end),
                end - chrono::Duration::seconds(1)
            ),
            Credits::new(1)
        );
        assert_eq!(
            prorate(
                Credits::new(300),
                (start, end),
                start - chrono::Duration::days(1)
            ),
            Credits::new(300)
        );
    }
}
