//! The one definition of a billing month: calendar months counted from an anchor (the
//! start of the subscription's period), each landing on the anchor's day of the month or,
//! when that month is shorter, on its last day. Jan 31 -> Feb 28 (29 in leap years) ->
//! Mar 31 -> Apr 30: every month is counted from the anchor itself, never from the
//! previous (clamped) month, so dates never drift. This is how Stripe renews
//! `interval=month` and `interval=year` prices.

use super::Interval;
use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};

/// The anchor moved `n` calendar months forward, clamped to the end of shorter months; the
/// time of day is kept.
pub fn add_months(anchor: DateTime<Utc>, n: u32) -> DateTime<Utc> {
    // chrono's `checked_add_months` clamps to the last day of the target month, counted
    // from the anchor, which is exactly the rule; it only fails beyond year 262143.
    anchor
        .checked_add_months(Months::new(n))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The end of the period that starts at `start` for a plan billed every `interval`.
pub fn period_end(start: DateTime<Utc>, interval: Interval) -> DateTime<Utc> {
    add_months(start, interval.months())
}

/// The billing month (counted from `anchor`) that contains `at`, as `(start, end)` with
/// `start <= at < end`. Before the anchor, the first month is returned.
pub fn month_containing(
    anchor: DateTime<Utc>,
    at: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    if at < anchor {
        return (anchor, add_months(anchor, 1));
    }
    // Start from the whole-month estimate and correct by at most one step either way.
    let mut n = months_between(anchor.date_naive(), at.date_naive());
    while n > 0 && add_months(anchor, n) > at {
        n -= 1;
    }
    while add_months(anchor, n + 1) <= at {
        n += 1;
    }
    (add_months(anchor, n), add_months(anchor, n + 1))
}

/// Index (0-based) of the billing month containing `at`.
pub fn month_index(anchor: DateTime<Utc>, at: DateTime<Utc>) -> u32 {
    let (start, _) = month_containing(anchor, at);
    months_between(anchor.date_naive(), start.date_naive())
}

fn months_between(from: NaiveDate, to: NaiveDate) -> u32 {
    let months = (to.year() - from.year()) * 12 + to.month() as i32 - from.month() as i32;
    months.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 9, 30, 0).unwrap()
    }

    #[test]
    fn month_ends_clamp_and_never_drift() {
        let anchor = t(2027, 1, 31);
        assert_eq!(add_months(anchor, 1), t(2027, 2, 28));
        assert_eq!(add_months(anchor, 2), t(2027, 3, 31));
        assert_eq!(add_months(anchor, 3), t(2027, 4, 30));
        assert_eq!(add_months(anchor, 12), t(2028, 1, 31));
        assert_eq!(add_months(anchor, 13), t(2028, 2, 29), "leap year");
    }

    #[test]
    fn a_leap_day_anchor_lands_on_feb_28_in_common_years_and_returns_to_29() {
        let anchor = t(2028, 2, 29);
        assert_eq!(add_months(anchor, 12), t(2029, 2, 28));
        assert_eq!(add_months(anchor, 48), t(2032, 2, 29));
        assert_eq!(add_months(anchor, 1), t(2028, 3, 29));
    }

    #[test]
    fn periods_follow_the_interval() {
        assert_eq!(
            period_end(t(2027, 1, 31), Interval::Monthly),
            t(2027, 2, 28)
        );
        assert_eq!(period_end(t(2027, 1, 31), Interval::Yearly), t(2028, 1, 31));
    }

    #[test]
    fn the_month_containing_an_instant_is_half_open() {
        let anchor = t(2027, 1, 31);
        assert_eq!(
            month_containing(anchor, anchor),
            (t(2027, 1, 31), t(2027, 2, 28))
        );
        assert_eq!(
            month_containing(anchor, t(2027, 2, 28)),
            (t(2027, 2, 28), t(2027, 3, 31)),
            "the boundary instant belongs to the next month"
        );
        let just_before = t(2027, 2, 28) - chrono::Duration::seconds(1);
        assert_eq!(month_containing(anchor, just_before).0, t(2027, 1, 31));
        assert_eq!(
            month_containing(anchor, t(2027, 12, 31)),
            (t(2027, 12, 31), t(2028, 1, 31))
        );
        assert_eq!(month_index(anchor, t(2027, 12, 31)), 11);
        assert_eq!(month_containing(anchor, t(2026, 5, 1)).0, anchor);
    }

    #[test]
    fn every_instant_of_a_year_falls_in_exactly_one_of_twelve_months() {
        let anchor = t(2027, 8, 31);
        let mut at = anchor;
        while at < add_months(anchor, 12) {
            let (start, end) = month_containing(anchor, at);
            assert!(start <= at && at < end);
            assert_eq!(start, add_months(anchor, month_index(anchor, at)));
            assert_eq!(end, add_months(anchor, month_index(anchor, at) + 1));
            at += chrono::Duration::hours(7);
        }
        assert_eq!(
            month_index(
                anchor,
                add_months(anchor, 12) - chrono::Duration::seconds(1)
            ),
            11
        );
    }
}
