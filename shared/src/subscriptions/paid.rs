//! Credits from what Stripe charged: the lines of a paid subscription invoice, read as
//! catalog items (Tally's Stripe products are `tally_plan_<plan>` and `tally_addon_<addon>`),
//! quantities and service periods.
//!
//! The rules, one place for every door (our API, the customer portal, Stripe's dashboard):
//! - A full-period line (a new period: sign-up, renewal, interval switch) pays for the
//!   period; its first billing month's allowance is granted with the invoice, the other
//!   months of a yearly period by the credit refresh, at the level recorded here.
//! - Proration lines (a change inside a period) pay for the rest of the period at the new
//!   level and credit the unused rest at the old one. Credits for the change are the same
//!   lines valued in credits over what is left of the current billing month: each line is
//!   worth `quantity x monthly credits x (seconds of the line in the month / seconds of the
//!   month)`. Charges round down and credits to the customer round up, so a change never
//!   grants more than it paid for. A change whose lines are worth nothing or less grants
//!   nothing and takes nothing back (a credit to the customer's balance is money, not
//!   credits). Later months of a yearly period come from the refresh at the raised level.
//! - Add-on units follow the same rule as plans: both the money and the credits of a
//!   mid-period change are prorated; at renewal both are whole.

use super::{Interval, calendar};
use crate::catalog::Catalog;
use crate::money::Credits;
use chrono::{DateTime, Duration, Utc};

/// Prefix of the Stripe product ids Tally owns for catalog plans.
pub const PLAN_PRODUCT: &str = "tally_plan_";
/// Prefix of the Stripe product ids Tally owns for add-on units.
pub const ADDON_PRODUCT: &str = "tally_addon_";

/// The id of the Stripe product Tally keeps for a catalog item (`kind` is `plan` or `addon`).
pub fn product_id(kind: &str, id: &str) -> String {
    format!("tally_{kind}_{id}")
}

/// What a Stripe product is in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Plan(String),
    Addon(String),
    /// A subscription item on a product that names no catalog item (a subscription created
    /// before Tally named its products). Worth nothing when charged; a credit for it is
    /// valued as the plan in force (see [`change_value`]).
    Other,
}

impl Item {
    /// The catalog item a product id names, if it is one of Tally's and in the catalog.
    pub fn of_product(product: &str, catalog: &Catalog) -> Option<Self> {
        if let Some(id) = product.strip_prefix(PLAN_PRODUCT) {
            return catalog.plan(id).map(|p| Item::Plan(p.id.clone()));
        }
        let id = product.strip_prefix(ADDON_PRODUCT)?;
        catalog.addon(id).map(|a| Item::Addon(a.id.clone()))
    }

    /// Credits one unit of the item is worth per billing month.
    pub fn monthly_credits(&self, catalog: &Catalog) -> Credits {
        match self {
            Item::Plan(id) => catalog
                .plan(id)
                .map_or(Credits::ZERO, |p| p.monthly_credits),
            Item::Addon(id) => catalog
                .addon(id)
                .map_or(Credits::ZERO, |a| a.credits_per_unit),
            Item::Other => Credits::ZERO,
        }
    }
}

/// One line of a paid invoice, as billing reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidLine {
    pub item: Item,
    pub quantity: u64,
    /// Signed cents: below zero for a credit ("unused time on ...").
    pub amount: i64,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub proration: bool,
}

/// A paid service period and the level paid for: the plan and add-on units in force.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Level {
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// Interval of a full period: anything longer than a calendar month is a year.
pub fn interval_of_period(start: DateTime<Utc>, end: DateTime<Utc>) -> Interval {
    if end - start > Duration::days(31) {
        Interval::Yearly
    } else {
        Interval::Monthly
    }
}

/// The new period a paid invoice opens, from its full-period lines (none for a change
/// inside a period). The plan line is required; add-on units default to zero.
pub fn new_period(lines: &[PaidLine]) -> Option<Level> {
    let full: Vec<&PaidLine> = lines.iter().filter(|l| !l.proration).collect();
    let plan = full.iter().find_map(|l| match &l.item {
        Item::Plan(p) if l.quantity > 0 => Some((p.clone(), l.start, l.end)),
        _ => None,
    })?;
    let (plan, start, end) = plan;
    let addon_units = full
        .iter()
        .filter(|l| matches!(l.item, Item::Addon(_)) && l.start == start && l.end == end)
        .map(|l| l.quantity)
        .sum::<u64>();
    Some(Level {
        plan,
        interval: interval_of_period(start, end),
        addon_units: u32::try_from(addon_units).unwrap_or(u32::MAX),
        period_start: start,
        period_end: end,
    })
}

/// The level a change inside a period leads to: the items of its positive proration lines
/// (the "remaining time on ..." side). `None` when the lines name no plan.
pub fn level_after_change(lines: &[PaidLine], current: &Level) -> Level {
    let mut level = current.clone();
    let charged = lines.iter().filter(|l| l.proration && l.amount > 0);
    let mut units: Option<u64> = None;
    for l in charged {
        match &l.item {
            Item::Plan(p) => level.plan = p.clone(),
            Item::Addon(_) => *units.get_or_insert(0) += l.quantity,
            Item::Other => {}
        }
    }
    // Add-on lines only appear when the add-on item changed; a removed item leaves only its
    // credit line.
    let removed = lines
        .iter()
        .any(|l| l.proration && l.amount < 0 && matches!(l.item, Item::Addon(_)));
    if let Some(u) = units {
        level.addon_units = u32::try_from(u).unwrap_or(u32::MAX);
    } else if removed {
        level.addon_units = 0;
    }
    level
}

/// The level the changes an invoice bills lead to, one after the other by the moment each
/// was made (its lines' start): a change billed at once takes into its invoice the
/// prorations an earlier change left for the next invoice (one made in the dashboard
/// without invoicing it), so one invoice may carry several changes.
pub fn level_after_changes(lines: &[PaidLine], current: &Level) -> Level {
    let mut starts: Vec<DateTime<Utc>> = lines
        .iter()
        .filter(|l| l.proration)
        .map(|l| l.start)
        .collect();
    starts.sort();
    starts.dedup();
    starts.iter().fold(current.clone(), |level, start| {
        let change: Vec<PaidLine> = lines
            .iter()
            .filter(|l| l.proration && l.start == *start)
            .cloned()
            .collect();
        level_after_change(&change, &level)
    })
}

/// The monthly credits of the add-on units the changes an invoice bills lead to (those of
/// the last change that billed the add-on, by its lines' start), when one did; zero when
/// that change removed the add-on.
pub fn addon_credits_after_changes(lines: &[PaidLine], catalog: &Catalog) -> Option<Credits> {
    let addon = |l: &&PaidLine| l.proration && matches!(l.item, Item::Addon(_));
    let last = lines.iter().filter(addon).map(|l| l.start).max()?;
    Some(
        lines
            .iter()
            .filter(addon)
            .filter(|l| l.start == last && l.amount > 0)
            .fold(Credits::ZERO, |acc, l| {
                l.item
                    .monthly_credits(catalog)
                    .checked_mul(l.quantity)
                    .and_then(|c| acc.checked_add(c))
                    .unwrap_or(acc)
            }),
    )
}

/// What a change's proration lines are worth in credits in the current billing month of
/// `period`, signed, as (plan, add-on) parts. A credit line for an item that names no
/// catalog product is valued as the period's plan (what was in force), so an old
/// subscription's unused time is never left out.
pub fn change_value(lines: &[PaidLine], period: &Level, catalog: &Catalog) -> (i128, i128) {
    change_value_through(lines, period, None, catalog)
}

/// Like [`change_value`], over every billing month of `period` from the one a line starts
/// in through the last one that began before `until` (when given): the months granted at
/// the old level by the time the invoice billing the lines opened its new period.
/// Prorations left for the next invoice (a change made in the dashboard without invoicing
/// it) reach the renewal with every month since the change behind them; a change billed
/// at once has only the rest of its own month. Each month is rounded on its own (charges
/// down, credits to the customer up).
pub fn change_value_through(
    lines: &[PaidLine],
    period: &Level,
    until: Option<DateTime<Utc>>,
    catalog: &Catalog,
) -> (i128, i128) {
    let (mut plan, mut addon) = (0i128, 0i128);
    for l in lines
        .iter()
        .filter(|l| l.proration && l.end == period.period_end)
    {
        let item = match (&l.item, l.amount < 0) {
            (Item::Other, true) => Item::Plan(period.plan.clone()),
            (item, _) => item.clone(),
        };
        let per_month = i128::from(item.monthly_credits(catalog).get()) * i128::from(l.quantity);
        let mut at = l.start;
        let mut first = true;
        loop {
            let (m0, m1) = billing_month(period, at);
            if !first && until.is_none_or(|u| m0 >= u) {
                break;
            }
            let month = (m1 - m0).num_seconds().max(1) as i128;
            let from = at.max(m0);
            let secs = (m1.min(l.end) - from).num_seconds().clamp(0, month as i64) as i128;
            let worth = per_month * secs;
            let signed = if l.amount >= 0 {
                worth / month
            } else {
                -(worth + month - 1) / month
            };
            match item {
                Item::Addon(_) => addon += signed,
                _ => plan += signed,
            }
            if m1 >= l.end || m1 <= at {
                break;
            }
            first = false;
            at = m1;
        }
    }
    (plan, addon)
}

/// What credit lines are worth when the period they bill is not known (an interval switch
/// applied before the old period was recorded): each line as if its time were part of a
/// 28-day month, at most a whole month, valued as `fallback_plan` when its product names
/// nothing. Never less than the exact value, so nothing is granted that was not paid for.
pub fn credit_value_unknown_period(
    lines: &[PaidLine],
    fallback_plan: &str,
    catalog: &Catalog,
) -> i128 {
    let month = Duration::days(28).num_seconds() as i128;
    lines
        .iter()
        .filter(|l| l.proration && l.amount < 0)
        .map(|l| {
            let item = match &l.item {
                Item::Other => Item::Plan(fallback_plan.to_owned()),
                other => other.clone(),
            };
            let per_month =
                i128::from(item.monthly_credits(catalog).get()) * i128::from(l.quantity);
            let secs = ((l.end - l.start).num_seconds() as i128).clamp(0, month);
            -((per_month * secs + month - 1) / month)
        })
        .sum()
}

/// Signed (plan, add-on) credits netted: a negative part is taken from the other one, and
/// nothing below zero remains.
pub fn net(plan: i128, addon: i128) -> (Credits, Credits) {
    let (mut plan, mut addon) = (plan, addon);
    if addon < 0 {
        plan += addon;
        addon = 0;
    }
    if plan < 0 {
        addon += plan;
        plan = 0;
    }
    let clamp = |v: i128| Credits::new(u64::try_from(v.max(0)).unwrap_or(u64::MAX));
    (clamp(plan), clamp(addon))
}

/// Credits a change's proration lines pay for in the current billing month of `period`,
/// split into plan and add-on credits. Never below zero in total.
pub fn change_credits(lines: &[PaidLine], period: &Level, catalog: &Catalog) -> (Credits, Credits) {
    let (plan, addon) = change_value(lines, period, catalog);
    net(plan, addon)
}

/// The billing month of a period that contains `at`: the period itself for a monthly plan,
/// the calendar month counted from the period start for a yearly one.
pub fn billing_month(period: &Level, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    if period.period_end - period.period_start <= Duration::days(31) {
        return (period.period_start, period.period_end);
    }
    let (start, end) = calendar::month_containing(period.period_start, at);
    // The twelfth month ends with the period, which may be a day after its anniversary
    // (a year anchored on the 29th of February into a leap year), as the credit refresh's
    // twelfth allotment does.
    let twelfth = calendar::add_months(period.period_start, 12);
    if start >= twelfth && start < period.period_end {
        let (last, _) =
            calendar::month_containing(period.period_start, start - Duration::seconds(1));
        return (last, period.period_end);
    }
    if end == twelfth {
        return (start, end.max(period.period_end));
    }
    (start, end.min(period.period_end))
}

/// Credits of a new period's first billing month from its full-period lines: the plan
/// line's allowance, and each add-on line valued as its own add-on (whatever the plan).
pub fn first_month_of_lines(
    lines: &[PaidLine],
    level: &Level,
    catalog: &Catalog,
) -> (Credits, Credits) {
    let full = lines
        .iter()
        .filter(|l| !l.proration && l.start == level.period_start && l.end == level.period_end);
    let mut addon = Credits::ZERO;
    for l in full {
        if let Item::Addon(_) = l.item {
            addon = l
                .item
                .monthly_credits(catalog)
                .checked_mul(l.quantity)
                .and_then(|c| addon.checked_add(c))
                .unwrap_or(addon);
        }
    }
    (
        Item::Plan(level.plan.clone()).monthly_credits(catalog),
        addon,
    )
}

/// Credits of the first billing month of a new period: plan allowance and add-on units.
pub fn first_month_credits(level: &Level, catalog: &Catalog) -> (Credits, Credits) {
    let plan = Item::Plan(level.plan.clone()).monthly_credits(catalog);
    let addon = catalog
        .plan(&level.plan)
        .and_then(|p| catalog.addon(&p.addon))
        .map_or(Credits::ZERO, |a| {
            a.credits_per_unit
                .checked_mul(u64::from(level.addon_units))
                .unwrap_or(Credits::ZERO)
        });
    (plan, addon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    fn line(item: Item, q: u64, amount: i64, start: DateTime<Utc>, end: DateTime<Utc>) -> PaidLine {
        PaidLine {
            item,
            quantity: q,
            amount,
            start,
            end,
            proration: true,
        }
    }

    fn monthly(plan: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> Level {
        Level {
            plan: plan.into(),
            interval: interval_of_period(start, end),
            addon_units: 0,
            period_start: start,
            period_end: end,
        }
    }

    #[test]
    fn products_map_to_catalog_items_and_nothing_else() {
        let c = Catalog::builtin();
        assert_eq!(
            Item::of_product("tally_plan_max", &c),
            Some(Item::Plan("max".into()))
        );
        assert_eq!(Item::of_product("tally_plan_gold", &c), None);
        assert_eq!(Item::of_product("prod_123", &c), None);
        let addon = &c.plans[0].addon;
        assert_eq!(
            Item::of_product(&product_id("addon", addon), &c),
            Some(Item::Addon(addon.clone()))
        );
    }

    #[test]
    fn an_upgrade_on_the_last_day_of_a_31_day_month_grants_a_31st() {
        let c = Catalog::builtin();
        let (start, end) = (t(2027, 1, 1), t(2027, 2, 1));
        let at = end - Duration::days(1);
        let period = monthly("max", start, end);
        let lines = [
            line(Item::Plan("max".into()), 1, -94, at, end),
            line(Item::Plan("team".into()), 1, 300, at, end),
        ];
        let max = c.plan("max").unwrap().monthly_credits.get();
        let team = c.plan("team").unwrap().monthly_credits.get();
        let (plan, addon) = change_credits(&lines, &period, &c);
        // One day of 31, each side rounded against the customer.
        let expected = team / 31 - max.div_ceil(31);
        assert_eq!((plan.get(), addon), (expected, Credits::ZERO));
        assert!(plan.get() * 31 <= team - max + 31);
    }

    #[test]
    fn a_monthly_period_starting_on_a_clamped_month_end_is_its_own_billing_month() {
        let c = Catalog::builtin();
        // Anchored on Jan 31: the period after February runs Feb 28 -> Mar 31.
        let (start, end) = (t(2027, 2, 28), t(2027, 3, 31));
        let period = monthly("plus", start, end);
        let late = t(2027, 3, 29);
        assert_eq!(billing_month(&period, late), (start, end));
        // Two days of 31 left: about 2/31 of the difference, not 2/3 of it.
        let lines = [
            line(Item::Plan("plus".into()), 1, -77, late, end),
            line(Item::Plan("max".into()), 1, 187, late, end),
        ];
        let (plan, _) = change_credits(&lines, &period, &c);
        assert_eq!(plan.get(), 400 * 2 / 31 - (150 * 2_u64).div_ceil(31));
    }

    #[test]
    fn the_twelfth_billing_month_of_a_year_into_a_leap_year_ends_with_the_period() {
        // Anchored on Feb 29: Stripe bills Feb 28 2031 -> Feb 29 2032.
        let period = monthly("max", t(2031, 2, 28), t(2032, 2, 29));
        let last = (t(2032, 1, 28), t(2032, 2, 29));
        assert_eq!(billing_month(&period, t(2032, 2, 1)), last);
        assert_eq!(
            billing_month(&period, t(2032, 2, 28) + Duration::hours(6)),
            last,
            "the day after the anniversary is no month of its own"
        );
        assert_eq!(
            billing_month(&period, t(2032, 1, 27)),
            (t(2031, 12, 28), t(2032, 1, 28))
        );
        // An ordinary year is unchanged.
        let year = monthly("max", t(2027, 1, 15), t(2028, 1, 15));
        assert_eq!(
            billing_month(&year, t(2028, 1, 10)),
            (t(2027, 12, 15), t(2028, 1, 15))
        );
    }

    #[test]
    fn a_yearly_change_counts_only_the_current_billing_month() {
        let c = Catalog::builtin();
        // Anchored on Jan 31 of a leap year: the month of Feb 10 is Jan 31 -> Feb 29.
        let (start, end) = (t(2028, 1, 31), t(2029, 1, 31));
        let period = monthly("plus", start, end);
        let at = t(2028, 2, 15);
        let lines = [
            line(Item::Plan("plus".into()), 1, -1000, at, end),
            line(Item::Plan("max".into()), 1, 2000, at, end),
        ];
        let (plan, _) = change_credits(&lines, &period, &c);
        let diff = c.plan("max").unwrap().monthly_credits.get()
            - c.plan("plus").unwrap().monthly_credits.get();
        // 14 of 29 days left in the month (Feb 15 -> Feb 29).
        let approx = diff * 14 / 29;
        assert!(plan.get() + 1 >= approx && plan.get() <= approx, "{plan}");
    }

    #[test]
    fn credits_to_the_customer_grant_nothing_and_take_nothing() {
        let c = Catalog::builtin();
        let (start, end) = (t(2027, 3, 1), t(2027, 4, 1));
        let period = monthly("max", start, end);
        let at = t(2027, 3, 10);
        let lines = [
            line(Item::Plan("max".into()), 1, -2000, at, end),
            line(Item::Plan("plus".into()), 1, 1000, at, end),
        ];
        assert_eq!(
            change_credits(&lines, &period, &c),
            (Credits::ZERO, Credits::ZERO)
        );
    }

    #[test]
    fn add_on_units_are_prorated_like_their_charge() {
        let c = Catalog::builtin();
        let addon = c.plan("max").unwrap().addon.clone();
        let per_unit = c.addon(&addon).unwrap().credits_per_unit.get();
        let (start, end) = (t(2027, 4, 1), t(2027, 5, 1));
        let period = monthly("max", start, end);
        // An hour before renewal: 100 units are worth an hour of a 30-day month.
        let at = end - Duration::hours(1);
        let lines = [line(Item::Addon(addon), 100, 139, at, end)];
        let (_, credits) = change_credits(&lines, &period, &c);
        assert_eq!(credits.get(), 100 * per_unit / (30 * 24));
    }

    #[test]
    fn the_level_follows_the_charged_side_of_a_change() {
        let (start, end) = (t(2027, 4, 1), t(2027, 5, 1));
        let mut current = monthly("max", start, end);
        current.addon_units = 10;
        let at = t(2027, 4, 20);
        let lines = [
            line(Item::Plan("max".into()), 1, -500, at, end),
            line(Item::Plan("team".into()), 1, 900, at, end),
            line(Item::Addon("individual".into()), 10, -100, at, end),
            line(Item::Addon("team".into()), 3, 90, at, end),
        ];
        let level = level_after_change(&lines, &current);
        assert_eq!((level.plan.as_str(), level.addon_units), ("team", 3));
        let removed = [line(Item::Addon("individual".into()), 10, -100, at, end)];
        assert_eq!(level_after_change(&removed, &current).addon_units, 0);
    }

    #[test]
    fn a_new_period_is_read_from_its_full_lines() {
        let (start, end) = (t(2028, 2, 29), t(2029, 2, 28));
        let mut plan = line(Item::Plan("max".into()), 1, 20880, start, end);
        plan.proration = false;
        let mut units = line(Item::Addon("individual".into()), 4, 4000, start, end);
        units.proration = false;
        let credit = line(Item::Plan("plus".into()), 1, -300, start, t(2028, 3, 10));
        let level = new_period(&[credit, plan, units]).unwrap();
        assert_eq!(level.interval, Interval::Yearly);
        assert_eq!((level.plan.as_str(), level.addon_units), ("max", 4));
        assert_eq!((level.period_start, level.period_end), (start, end));
    }
}
