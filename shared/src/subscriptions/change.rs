//! What a change of plan, interval or add-on units means: whether it applies now or at the
//! renewal, what Stripe is asked to bill, and how many credits it grants now.
//!
//! Upgrades and more add-on units apply now: Stripe invoices the prorated difference and
//! the credits follow from that paid invoice ([`super::paid`]). Downgrades and fewer units
//! wait for the renewal, so the current benefits are kept until then.

use super::Interval;
use crate::catalog::{Catalog, Plan};
use crate::money::Cents;

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
        // The same yearly discount as the plans: 12 months less the catalog's percentage.
        Interval::Yearly => addon
            .unit_price_cents
            .checked_mul(12)
            .expect("catalog validation bounds add-on prices")
            .discounted(catalog.yearly_discount_pct),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yearly_add_on_units_get_the_yearly_discount() {
        let c = Catalog::builtin();
        let max = c.plan("max").unwrap();
        let monthly = addon_unit_price(&c, max, Interval::Monthly).unwrap();
        let yearly = addon_unit_price(&c, max, Interval::Yearly).unwrap();
        assert_eq!(
            yearly,
            monthly
                .checked_mul(12)
                .unwrap()
                .discounted(c.yearly_discount_pct)
        );
        assert!(yearly.get() < monthly.get() * 12);
    }

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
}
