//! The pure schedule of a paid period: which monthly allotments it owes and when, what
//! each grants, and when the workspace next needs the worker. No I/O, no clock: every
//! function takes the time it reasons about.

use super::{PlanTerms, RefreshDoc};
use crate::catalog::Catalog;
use crate::ledger::LotSource;
use crate::money::Credits;
use crate::subscriptions::calendar::add_months;
use chrono::{DateTime, Duration, Utc};

/// One monthly allotment of a paid period. Allotment 0 is the invoice's own grant (made
/// when Stripe reports the invoice paid); the worker grants 1..=11 of a yearly period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allotment {
    pub k: u32,
    /// The k-th monthly anniversary of the period start (clamped to month end).
    pub at: DateTime<Utc>,
    /// The end of that billing month: add-on credits expire here, plan credits roll
    /// over from here.
    pub month_end: DateTime<Utc>,
}

/// The allotments the worker owes for a period, in order: one on each monthly anniversary
/// of `start` before `end`, counted from `start` itself so dates never drift. A monthly
/// period owes none (its renewal invoice grants). The twelfth month ends with the period,
/// which may be a day after its anniversary: a year anchored on the 29th of February runs
/// from the 28th in other years to the 29th in a leap year.
pub fn allotments(start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<Allotment> {
    (1..12)
        .map(|k| Allotment {
            k,
            at: add_months(start, k),
            month_end: if k == 11 {
                add_months(start, k + 1).max(end)
            } else {
                add_months(start, k + 1)
            },
        })
        .take_while(|a| a.at < end)
        .collect()
}

/// The allotments the worker owes for the document's period. A monthly period owes none,
/// whatever its length: Stripe ends it on the anchor's day, so one starting on the 28th of
/// February for an anchor on the 31st ends on the 31st of March, more than a month of
/// `add_months` later, and its renewal invoice grants that month.
pub fn of(doc: &RefreshDoc) -> Vec<Allotment> {
    match doc.interval {
        crate::subscriptions::plan::Interval::Monthly => Vec::new(),
        crate::subscriptions::plan::Interval::Yearly => {
            allotments(doc.period_start, doc.period_end)
        }
    }
}

/// One ledger grant of an allotment, under a key derived from the subscription, the
/// period start and the allotment number, so it is granted at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllotmentGrant {
    pub key: String,
    pub source: LotSource,
    pub credits: Credits,
    pub expires_at: DateTime<Utc>,
    pub note: String,
    /// The allotment's date: the start of the month it grants.
    pub month: DateTime<Utc>,
}

/// The terms `plan` was paid for at in the period, else the catalog's.
fn terms_of(doc: &RefreshDoc, plan: &str, catalog: &Catalog) -> Option<PlanTerms> {
    doc.plan_terms
        .get(plan)
        .copied()
        .or_else(|| PlanTerms::of(plan, catalog))
}

/// A level as an allotment grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valued {
    /// The plan's id.
    pub plan: String,
    /// The plan's name (its id when the catalog no longer has it).
    pub name: String,
    /// The plan's monthly credits and rollover, as paid for.
    pub terms: PlanTerms,
    pub units: u32,
    /// What the add-on units are worth a month.
    pub addon: Credits,
}

/// A level's plan, add-on units and what those units are worth a month (as billed, or
/// as the plan's add-on when recorded without that value). The plan's credits and
/// rollover are those it was paid for at (`doc.plan_terms`), else the catalog's.
fn valued(
    doc: &RefreshDoc,
    plan: &str,
    units: u32,
    addon_credits: Option<Credits>,
    catalog: &Catalog,
) -> Result<Valued, String> {
    let listed = catalog.plan(plan);
    let terms = terms_of(doc, plan, catalog).ok_or_else(|| format!("unknown plan {plan:?}"))?;
    let addon = match (units, addon_credits) {
        (0, _) => Credits::ZERO,
        (_, Some(c)) => c,
        (_, None) => catalog
            .addon(
                &listed
                    .ok_or_else(|| format!("unknown plan {plan:?}"))?
                    .addon,
            )
            .ok_or("plan add-on missing from catalog")?
            .credits_per_unit
            .checked_mul(u64::from(units))
            .ok_or("add-on credits overflow")?,
    };
    Ok(Valued {
        plan: plan.to_owned(),
        name: listed.map_or_else(|| plan.to_owned(), |p| p.name.clone()),
        terms,
        units,
        addon,
    })
}

/// The plan an allotment dated `at` follows, its add-on units and their credits: the level
/// in effect on its date. That is the level last paid for, unless a change the worker has
/// not caught up with was made at or after the date: then the level that change started
/// from (the document keeps it as its earlier level, or a later change records it as where
/// it started). A change's own invoice settles the rest of the month that change falls in:
/// a rise's grant pays it, a fall's money back takes its credits back from that month
/// (those of a month not granted yet from its allotment, see
/// [`crate::ledger::Operation::ChangeCredited`]), so the allotment owes its date's level,
/// whatever changes follow and whatever order their events arrive in.
pub fn level(doc: &RefreshDoc, at: DateTime<Utc>, catalog: &Catalog) -> Result<Valued, String> {
    // Where the first change since the date started (late changes on either side of the
    // date correct it as they are recorded), else the earlier level kept, else the level
    // now.
    let earlier = doc.earlier.as_ref().filter(|e| at <= e.until);
    let then = match doc.changes.iter().find(|c| c.at >= at) {
        // Unless the document has forgotten the change that set the earlier level (more
        // than it remembers since): then that level.
        Some(c) if earlier.is_none_or(|e| c.at <= e.until) => c.before.clone(),
        _ => earlier.map_or_else(|| doc.parts(), |e| e.level.clone()),
    };
    valued(
        doc,
        &then.plan,
        then.addon_units,
        then.addon_credits,
        catalog,
    )
}

/// The ledger keys of allotment `a`'s grants: its plan credits', its add-on credits'.
pub fn grant_keys(doc: &RefreshDoc, a: &Allotment) -> [String; 2] {
    let base = format!(
        "refresh:{}:{}:{}",
        doc.subscription,
        doc.period_start.timestamp(),
        a.k
    );
    [format!("{base}:plan"), format!("{base}:addon")]
}

/// What allotment `a` of the period grants: the plan's monthly credits, rolling over
/// `rollover_days` past the month's end, and the add-on units' credits, expiring at the
/// month's end (as the invoice's own first month does).
pub fn grants(
    doc: &RefreshDoc,
    a: &Allotment,
    catalog: &Catalog,
) -> Result<Vec<AllotmentGrant>, String> {
    let Valued {
        name,
        terms,
        plan: _,
        units,
        addon: addon_credits,
    } = level(doc, a.at, catalog)?;
    // Money given back for a change before this allotment: the allotment loses that share
    // of what the change added (rounded up), never more than it gives above the level the
    // change started from (a later downgrade may have given the rise back already). Of an
    // invoice with add-on units and more, each part's share of what the change added to
    // it, from that part's credits first (money given back is the plan's before the add-on
    // units': see `billing::refunds::Pools`); otherwise the share of all it added, from
    // the plan's credits first.
    let parts = |v: &Valued| {
        (
            u128::from(v.terms.monthly_credits.get()),
            u128::from(v.addon.get()),
        )
    };
    let now = (
        u128::from(terms.monthly_credits.get()),
        u128::from(addon_credits.get()),
    );
    let share = |added: u128, back: u64, paid: u64| {
        (added * u128::from(back.min(paid))).div_ceil(u128::from(paid))
    };
    // (from the plan first, from the add-on units first)
    let mut less = (0u128, 0u128);
    for c in doc.changes.iter().filter(|c| c.at < a.at) {
        let Some((back, paid)) = c.given_back.filter(|&(b, p)| b > 0 && p > 0) else {
            continue;
        };
        let valued_parts = |l: &super::LevelParts| {
            valued(doc, &l.plan, l.addon_units, l.addon_credits, catalog).map(|v| parts(&v))
        };
        // A level the catalog no longer knows fully: a start whose add-ons cannot be valued
        // counts its plan alone, one whose plan is gone counts as nothing (the refund then
        // takes back too much rather than leaving credits nobody paid for, and says so);
        // an end that cannot be valued leaves nothing to take back from.
        let Ok(after) = valued_parts(&c.after) else {
            continue;
        };
        let before = valued_parts(&c.before).unwrap_or_else(|_| {
            let terms = terms_of(doc, &c.before.plan, catalog);
            tracing::error!(workspace = %doc.workspace, invoice = %c.invoice,
                plan = %c.before.plan, known = terms.is_some(),
                "the level a refunded change started from is not fully in the catalog");
            (terms.map_or(0, |t| u128::from(t.monthly_credits.get())), 0)
        });
        let cap = (now.0 + now.1).saturating_sub(before.0 + before.1);
        match c.given_back_parts {
            // Each part never more than it gives above its level before the change (a
            // later change may have given that part's rise back already).
            Some((plan_back, addon_back)) => {
                let plan = share(after.0.saturating_sub(before.0), plan_back, paid)
                    .min(now.0.saturating_sub(before.0))
                    .min(cap);
                let addon = share(after.1.saturating_sub(before.1), addon_back, paid)
                    .min(now.1.saturating_sub(before.1))
                    .min(cap - plan);
                less.0 += plan;
                less.1 += addon;
            }
            None => {
                let added = (after.0 + after.1).saturating_sub(before.0 + before.1);
                less.0 += share(added, back, paid).min(cap);
            }
        }
    }
    let mut left = now;
    let take = |from: &mut u128, n: u128| {
        let t = n.min(*from);
        *from -= t;
        n - t
    };
    let rest = take(&mut left.0, less.0);
    take(&mut left.1, rest);
    let rest = take(&mut left.1, less.1);
    take(&mut left.0, rest);
    let plan_credits = Credits::new(u64::try_from(left.0).unwrap_or(u64::MAX));
    let addon_credits = Credits::new(u64::try_from(left.1).unwrap_or(u64::MAX));
    let [plan_key, addon_key] = grant_keys(doc, a);
    let mut out = vec![AllotmentGrant {
        key: plan_key,
        source: LotSource::PlanPeriod,
        credits: plan_credits,
        expires_at: a.month_end + Duration::days(i64::from(terms.rollover_days)),
        note: format!("{name} plan credits, month {} of 12", a.k + 1),
        month: a.at,
    }];
    if units > 0 && addon_credits > Credits::ZERO {
        out.push(AllotmentGrant {
            key: addon_key,
            source: LotSource::Addon,
            credits: addon_credits,
            expires_at: a.month_end,
            note: format!("{units} add-on unit(s), month {} of 12", a.k + 1),
            month: a.at,
        });
    }
    // All the money of the period's invoice given back (refunded, or lost in a dispute):
    // nothing pays for the rest of the year. A partial refund takes its share back from
    // each allotment as it is granted (the allotment's lot is one the invoice bought).
    if doc.given_back.is_some_and(|(back, paid)| back >= paid) {
        out.clear();
    }
    out.retain(|g| g.credits > Credits::ZERO);
    Ok(out)
}

/// The allotments whose time has come at `now` and that the worker has not dealt with yet.
pub fn due_allotments(doc: &RefreshDoc, now: DateTime<Utc>) -> Vec<Allotment> {
    of(doc)
        .into_iter()
        .filter(|a| a.k >= doc.next_allotment && a.at <= now)
        .collect()
}

/// When the renewal of the period is checked, unless it has been already.
pub fn renewal_check_at(doc: &RefreshDoc, grace: Duration) -> Option<DateTime<Utc>> {
    if doc.renewal_checked {
        return None;
    }
    Some(doc.renewal_retry_at.unwrap_or(doc.period_end + grace))
}

/// When the workspace next needs the worker: the next allotment, the renewal check, or
/// the ledger's next settlement (as the worker last saw it), whichever comes first.
pub fn next_due(doc: &RefreshDoc, grace: Duration) -> Option<DateTime<Utc>> {
    // A period a change opened waits for its own invoice, whose arrival files it again.
    let allotment = of(doc)
        .into_iter()
        .find(|a| a.k >= doc.next_allotment && doc.opened_by.is_none())
        .map(|a| a.at);
    // Months a replaced period still owes fell due already.
    let previous = doc.previous.as_ref().map(|p| p.period_start);
    [
        allotment,
        renewal_check_at(doc, grace),
        doc.settle_at,
        previous,
    ]
    .into_iter()
    .flatten()
    .min()
}

#[cfg(test)]
mod tests {
    /// A change billing the plan alone.
    const PLAN_ONLY: crate::refresh::Billed = crate::refresh::Billed {
        plan: true,
        addon: false,
    };
    /// A change billing the add-on alone.
    const UNITS_ONLY: crate::refresh::Billed = crate::refresh::Billed {
        plan: false,
        addon: true,
    };

    /// The parts a test's change bills: the plan it names (its invoice has a line for it,
    /// whatever level the document shows when it arrives), and the add-on when its units
    /// differ from the document's or are valued.
    fn moved(d: &RefreshDoc, p: &crate::refresh::PaidPeriod) -> crate::refresh::Billed {
        crate::refresh::Billed {
            plan: true,
            addon: p.addon_units != d.addon_units || p.addon_credits.is_some(),
        }
    }

    /// [`apply`] for a change to `plan` paid by `invoice`.
    fn apply_paid(
        d: &mut RefreshDoc,
        invoice: &str,
        plan: &str,
        at: DateTime<Utc>,
        rank: u64,
    ) -> bool {
        let p = paid(d, invoice, plan);
        apply(d, &p, at, rank)
    }

    /// Sets the level a test's change leads to, as billing would (see [`moved`]).
    /// `back` of `paid` cents given back, of an invoice of one part.
    fn back_of(back: u64, paid: u64) -> crate::refresh::GivenBack {
        crate::refresh::GivenBack {
            back,
            paid,
            parts: None,
        }
    }

    fn apply(
        d: &mut RefreshDoc,
        p: &crate::refresh::PaidPeriod,
        at: DateTime<Utc>,
        rank: u64,
    ) -> bool {
        let billed = moved(d, p);
        d.set_level(p, at, rank, billed)
    }

    use super::*;
    use crate::ids::{InvoiceId, SubscriptionId, WorkspaceId};
    use crate::subscriptions::Interval;
    use chrono::TimeZone;

    fn t(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 10, 0, 0).unwrap()
    }

    fn doc(start: DateTime<Utc>, interval: Interval) -> RefreshDoc {
        RefreshDoc {
            workspace: WorkspaceId::parse("ws").unwrap(),
            subscription: SubscriptionId::parse("sub_1").unwrap(),
            invoice: InvoiceId::parse("in_1").unwrap(),
            interval,
            plan: "max".into(),
            addon_units: 2,
            period_start: start,
            period_end: add_months(start, interval.months()),
            addon_credits: None,
            level_as_of: Some(start),
            level_rank: None,
            next_allotment: 1,
            renewal_checked: false,
            renewal_retry_at: None,
            settle_at: None,
            given_back: None,
            given_back_parts: None,
            earlier: None,
            changes: Vec::new(),
            opened_by: None,
            previous: None,
            period_rank: None,
            parts: Some(crate::refresh::PartsSet::default()),
            plan_terms: Default::default(),
        }
    }

    /// A paid change of `d`'s period to `plan` (no add-ons), paid by `invoice`.
    fn paid(d: &RefreshDoc, invoice: &str, plan: &str) -> crate::refresh::PaidPeriod {
        crate::refresh::PaidPeriod {
            workspace: d.workspace.clone(),
            subscription: d.subscription.clone(),
            invoice: InvoiceId::parse(invoice).unwrap(),
            interval: Interval::Yearly,
            plan: plan.into(),
            addon_units: 0,
            addon_credits: None,
            plan_terms: None,
            period_start: d.period_start,
            period_end: d.period_end,
        }
    }

    #[test]
    fn the_twelfth_month_of_a_year_into_a_leap_year_ends_with_the_period() {
        // Anchored on Feb 29: Stripe bills Feb 28 2031 -> Feb 29 2032.
        let (start, end) = (t(2031, 2, 28), t(2032, 2, 29));
        let a = allotments(start, end);
        assert_eq!(a.len(), 11);
        assert_eq!((a[10].at, a[10].month_end), (t(2032, 1, 28), end));
        assert_eq!(a[9].month_end, a[10].at, "the months before are unchanged");
        // An ordinary year: the twelfth month ends on its anniversary, which is the end.
        let ordinary = allotments(t(2027, 1, 15), t(2028, 1, 15));
        assert_eq!(ordinary[10].month_end, t(2028, 1, 15));
    }

    #[test]
    fn a_late_change_of_another_part_carries_through_the_later_changes() {
        let catalog = Catalog::builtin();
        let a = allotments(t(2027, 1, 15), t(2028, 1, 15));
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 0;
        d.addon_credits = None;
        let (t1, t2) = (a[0].at - Duration::days(20), a[0].at - Duration::days(19));
        // The upgrade (no add-on lines) applied first, at the level known then.
        assert!(d.set_level(&paid(&d, "in_up", "max"), t2, 1, PLAN_ONLY));
        // The units added the day before: valued against the level known now (Max).
        let units = crate::refresh::PaidPeriod {
            addon_units: 5,
            addon_credits: Some(Credits::new(300)),
            ..paid(&d, "in_units", "max")
        };
        assert!(d.set_level(&units, t1, 1, UNITS_ONLY));
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 5));
        let g = grants(&d, &a[0], &catalog).unwrap();
        let total: u64 = g.iter().map(|g| g.credits.get()).sum();
        assert_eq!(total, 400 + 300, "{g:?}");
        // Each change as it was: the units from Plus, then the upgrade from Plus with them.
        assert_eq!(
            steps(&d),
            [
                ("in_units", ("plus", 0), ("plus", 5)),
                ("in_up", ("plus", 5), ("max", 5)),
            ]
        );
        // Delivered again: nothing changes.
        assert!(!d.set_level(&units, t1, 1, UNITS_ONLY));
    }

    /// A level as (plan, add-on units).
    type Level<'a> = (&'a str, u32);

    /// Each recorded change as (invoice, level before, level after).
    fn steps(d: &RefreshDoc) -> Vec<(&str, Level<'_>, Level<'_>)> {
        d.changes
            .iter()
            .map(|c| {
                (
                    c.invoice.as_str(),
                    (c.before.plan.as_str(), c.before.addon_units),
                    (c.after.plan.as_str(), c.after.addon_units),
                )
            })
            .collect()
    }

    #[test]
    fn a_late_change_never_overrides_a_later_change_of_the_same_part() {
        let units = |d: &RefreshDoc, invoice: &str, n: u32| crate::refresh::PaidPeriod {
            addon_units: n,
            addon_credits: Some(Credits::new(60 * u64::from(n))),
            ..paid(d, invoice, &d.plan)
        };
        let start = t(2027, 1, 15);
        let at = start + Duration::days(3);
        // Two plan changes in one second (team ranked first, max after it), then units an
        // hour later; team's event comes last.
        let mut d = doc(start, Interval::Yearly);
        d.plan = "plus".into();
        assert!(d.set_level(&paid(&d, "in_max", "max"), at, 2, PLAN_ONLY));
        let more = units(&d, "in_units", 3);
        assert!(d.set_level(&more, at + Duration::hours(1), 1, UNITS_ONLY));
        assert!(d.set_level(&paid(&d, "in_team", "team"), at, 1, PLAN_ONLY));
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 3));
        let order: Vec<_> = d.changes.iter().map(|c| c.invoice.as_str()).collect();
        assert_eq!(order, ["in_team", "in_max", "in_units"]);

        // A document a change opened (Max, at day 3), units since; a plan change from the
        // day before arrives: Max stays, the change opened the document after it.
        let mut d = doc(start, Interval::Yearly);
        d.plan = "max".into();
        d.addon_units = 0;
        if let Some(parts) = &mut d.parts {
            parts.set_by(PLAN_ONLY, at, 1);
        }
        let more = units(&d, "in_units", 5);
        assert!(d.set_level(&more, at + Duration::days(1), 1, UNITS_ONLY));
        let earlier = paid(&d, "in_team", "team");
        d.set_level(&earlier, at - Duration::days(1), 1, PLAN_ONLY);
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 5));

        // Over a hundred changes since two plan changes: the first delivered again (it is
        // forgotten) changes nothing.
        let mut d = doc(start, Interval::Yearly);
        d.plan = "plus".into();
        assert!(d.set_level(&paid(&d, "in_x", "max"), at, 1, PLAN_ONLY));
        assert!(d.set_level(
            &paid(&d, "in_y", "team"),
            at + Duration::hours(1),
            1,
            PLAN_ONLY
        ));
        for i in 0..crate::refresh::MAX_CHANGES {
            let n = u32::try_from(i % 3).unwrap() + 1;
            let c = units(&d, &format!("in_u{i}"), n);
            let when = at + Duration::hours(2 + i64::try_from(i).unwrap());
            assert!(d.set_level(&c, when, 1, UNITS_ONLY));
        }
        let level = (d.plan.clone(), d.addon_units);
        d.set_level(&paid(&d, "in_x", "max"), at, 1, PLAN_ONLY);
        assert_eq!((d.plan.clone(), d.addon_units), level);
        assert_eq!(d.plan, "team");
        assert!(d.changes.iter().all(|c| c.after.plan == "team"));
    }

    #[test]
    fn a_late_change_starts_every_change_after_it_until_one_bills_the_same_part() {
        let units = |d: &RefreshDoc, invoice: &str, n: u32| crate::refresh::PaidPeriod {
            addon_units: n,
            addon_credits: Some(Credits::new(60 * u64::from(n))),
            ..paid(d, invoice, &d.plan)
        };
        let start = t(2027, 1, 15);
        let day = |n: i64| start + Duration::days(n);
        let mut d = doc(start, Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 0;
        // Units to 3 (day 3), the upgrade (day 2) late, the first units (5, day 1) later.
        assert!(d.set_level(&units(&d, "in_b", 3), day(3), 1, UNITS_ONLY));
        assert!(d.set_level(&paid(&d, "in_u", "max"), day(2), 1, PLAN_ONLY));
        assert!(d.set_level(&units(&d, "in_a", 5), day(1), 1, UNITS_ONLY));
        assert_eq!(
            steps(&d),
            [
                ("in_a", ("plus", 0), ("plus", 5)),
                ("in_u", ("plus", 5), ("max", 5)),
                ("in_b", ("max", 5), ("max", 3)),
            ]
        );
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 3));
        // An allotment dated between the upgrade and the last units change: Max with 5.
        let catalog = Catalog::builtin();
        let v = level(&d, day(2) + Duration::hours(1), &catalog).unwrap();
        assert_eq!((v.plan.as_str(), v.units), ("max", 5));
    }

    #[test]
    fn units_set_before_the_change_that_opened_the_document_stay_when_its_period_comes() {
        let start = t(2027, 1, 15);
        let own = crate::refresh::PaidPeriod {
            plan: "plus".into(),
            ..paid(&doc(start, Interval::Yearly), "in_own", "plus")
        };
        // The upgrade (day 2, plan alone) opened the document before the period's own
        // invoice; the subscription then showed no units.
        let mut d = doc(start, Interval::Yearly);
        d.invoice = InvoiceId::parse("in_up").unwrap();
        d.plan = "max".into();
        d.addon_units = 0;
        let opened_at = start + Duration::days(2);
        d.opened_by = Some(crate::refresh::OpeningChange {
            at: opened_at,
            rank: 1,
            level: d.parts(),
            billed: Some(PLAN_ONLY),
        });
        if let Some(parts) = &mut d.parts {
            parts.set_by(PLAN_ONLY, opened_at, 1);
        }
        // Units added the day before, applied now: the level has them.
        let five = crate::refresh::PaidPeriod {
            addon_units: 5,
            addon_credits: Some(Credits::new(300)),
            ..paid(&d, "in_units", "max")
        };
        assert!(d.set_level(&five, start + Duration::days(1), 1, UNITS_ONLY));
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 5));
        // Delivered again: nothing to write.
        assert!(!d.set_level(&five, start + Duration::days(1), 1, UNITS_ONLY));
        // The period's own invoice: the upgrade becomes its first change, the units stay.
        let reopened = d.reopened_by_own_invoice(&own).unwrap();
        assert_eq!((reopened.plan.as_str(), reopened.addon_units), ("max", 5));
        let first = &reopened.changes[0];
        assert_eq!(first.invoice.as_str(), "in_up");
        assert_eq!(
            (first.after.plan.as_str(), first.after.addon_units),
            ("max", 5)
        );
    }

    #[test]
    fn a_change_that_opened_the_document_keeps_the_parts_it_did_not_bill_from_the_period() {
        let start = t(2027, 1, 15);
        let own = crate::refresh::PaidPeriod {
            addon_units: 0,
            ..paid(&doc(start, Interval::Yearly), "in_own", "max")
        };
        // Units (5) paid in the renewal's first hour, applied while the subscription already
        // showed the upgrade paid after them (Generative): the document opens at that level.
        let units_at = start + Duration::minutes(5);
        let mut d = doc(start, Interval::Yearly);
        d.invoice = InvoiceId::parse("in_units").unwrap();
        d.plan = "generative".into();
        d.addon_units = 5;
        d.addon_credits = Some(Credits::new(300));
        d.opened_by = Some(crate::refresh::OpeningChange {
            at: units_at,
            rank: 1,
            level: d.parts(),
            billed: Some(UNITS_ONLY),
        });
        if let Some(parts) = &mut d.parts {
            parts.set_by(UNITS_ONLY, units_at, 1);
        }
        // The upgrade's own invoice, then the period's.
        let upgrade = crate::refresh::PaidPeriod {
            addon_units: 5,
            ..paid(&d, "in_up", "generative")
        };
        d.set_level(&upgrade, start + Duration::minutes(10), 1, PLAN_ONLY);
        let mut d = d.reopened_by_own_invoice(&own).unwrap();
        // Each change from the level the one before it left: the units on Max, then the
        // upgrade.
        assert_eq!(
            steps(&d),
            [
                ("in_units", ("max", 0), ("max", 5)),
                ("in_up", ("max", 5), ("generative", 5)),
            ]
        );
        assert_eq!((d.plan.as_str(), d.addon_units), ("generative", 5));
        // Refunded in full, the upgrade takes back the plan's rise, the units' invoice the
        // units' worth: the later months are Max's with the units, or Generative's worth.
        let catalog = Catalog::builtin();
        let a = due_allotments(&d, start + Duration::days(400));
        let month = |d: &RefreshDoc| -> Vec<u64> {
            grants(d, &a[0], &catalog)
                .unwrap()
                .iter()
                .map(|g| g.credits.get())
                .collect()
        };
        assert_eq!(month(&d), [900, 300]);
        let mut units_back = d.clone();
        assert!(d.give_back(&InvoiceId::parse("in_up").unwrap(), back_of(1000, 1000)));
        assert_eq!(month(&d), [400, 300]);
        assert!(units_back.give_back(&InvoiceId::parse("in_units").unwrap(), back_of(1000, 1000)));
        // (An invoice of one part: what it added, from the plan's credits first.)
        assert_eq!(month(&units_back).iter().sum::<u64>(), 900);
    }

    #[test]
    fn a_part_the_opening_change_did_not_bill_goes_on_through_later_changes_that_did_not() {
        let start = t(2027, 1, 15);
        let own = crate::refresh::PaidPeriod {
            addon_units: 0,
            ..paid(&doc(start, Interval::Yearly), "in_own", "max")
        };
        let units = |d: &RefreshDoc, invoice: &str, n: u32| crate::refresh::PaidPeriod {
            addon_units: n,
            addon_credits: Some(Credits::new(60 * u64::from(n))),
            ..paid(d, invoice, "generative")
        };
        // Units to 5 open the document at the level the subscription showed (the upgrade
        // to Generative, paid later, already in it); units to 7 follow, valued the same way.
        let opened_at = start + Duration::minutes(5);
        let mut d = doc(start, Interval::Yearly);
        d.invoice = InvoiceId::parse("in_five").unwrap();
        (d.plan, d.addon_units, d.addon_credits) =
            ("generative".into(), 5, Some(Credits::new(300)));
        d.opened_by = Some(crate::refresh::OpeningChange {
            at: opened_at,
            rank: 1,
            level: d.parts(),
            billed: Some(UNITS_ONLY),
        });
        if let Some(parts) = &mut d.parts {
            parts.set_by(UNITS_ONLY, opened_at, 1);
        }
        let seven = units(&d, "in_seven", 7);
        assert!(d.set_level(&seven, start + Duration::minutes(8), 1, UNITS_ONLY));
        let upgrade = units(&d, "in_up", 7);
        let upgrade_at = start + Duration::minutes(10);

        // The upgrade's invoice before the period's own: Max until the upgrade.
        let mut both = d.clone();
        assert!(both.set_level(&upgrade, upgrade_at, 1, PLAN_ONLY));
        let both = both.reopened_by_own_invoice(&own).unwrap();
        assert_eq!(
            steps(&both),
            [
                ("in_five", ("max", 0), ("max", 5)),
                ("in_seven", ("max", 5), ("max", 7)),
                ("in_up", ("max", 7), ("generative", 7)),
            ]
        );
        assert_eq!((both.plan.as_str(), both.addon_units), ("generative", 7));

        // The period's own invoice before the upgrade's: Max, until the upgrade is paid.
        let mut d = d.reopened_by_own_invoice(&own).unwrap();
        assert_eq!((d.plan.as_str(), d.addon_units), ("max", 7));
        assert!(d.set_level(&upgrade, upgrade_at, 1, PLAN_ONLY));
        assert_eq!(steps(&d), steps(&both));
        assert_eq!((d.plan.as_str(), d.addon_units), ("generative", 7));
    }

    #[test]
    fn a_busy_period_remembers_its_last_hundred_changes() {
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        let n = crate::refresh::MAX_CHANGES + 5;
        for i in 0..n {
            let units = u32::try_from(i % 2).unwrap() + 1;
            let change = crate::refresh::PaidPeriod {
                workspace: d.workspace.clone(),
                subscription: d.subscription.clone(),
                invoice: InvoiceId::parse(&format!("in_c{i}")).unwrap(),
                interval: Interval::Yearly,
                plan: d.plan.clone(),
                addon_units: units,
                addon_credits: None,
                plan_terms: None,
                period_start: d.period_start,
                period_end: d.period_end,
            };
            let at = d.period_start + Duration::hours(i64::try_from(i).unwrap() + 1);
            assert!(apply(&mut d, &change, at, 1), "change {i}");
        }
        assert_eq!(d.changes.len(), crate::refresh::MAX_CHANGES);
        assert_eq!(d.changes[0].invoice.as_str(), "in_c5");
        // A refund of a change still remembered lowers the months after it; one of a
        // forgotten change is not known.
        let last = format!("in_c{}", n - 1);
        assert!(d.give_back(&InvoiceId::parse(&last).unwrap(), back_of(100, 100)));
        assert!(!d.give_back(&InvoiceId::parse("in_c0").unwrap(), back_of(100, 100)));
        assert!(serde_json::to_string(&d).unwrap().len() < 60_000);
    }

    #[test]
    fn an_allotment_due_before_a_change_the_worker_has_not_seen_keeps_its_dates_level() {
        let catalog = Catalog::builtin();
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "generative".into();
        d.addon_units = 0;
        let a = allotments(d.period_start, d.period_end);
        // Allotment 1 fell due on Feb 15 at 10:00; the upgrade to team is paid at 10:05,
        // before the worker's next tick.
        let change = a[0].at + Duration::minutes(5);
        let team = crate::refresh::PaidPeriod {
            workspace: d.workspace.clone(),
            subscription: d.subscription.clone(),
            invoice: InvoiceId::parse("in_change").unwrap(),
            interval: Interval::Yearly,
            plan: "team".into(),
            addon_units: 0,
            addon_credits: None,
            plan_terms: None,
            period_start: d.period_start,
            period_end: d.period_end,
        };
        assert!(apply(&mut d, &team, change, 1));
        assert_eq!(d.plan, "team");
        // Due before the change: at its date's level (the change grant covers the rest
        // of that month). Due after: at the level paid for.
        assert_eq!(
            grants(&d, &a[0], &catalog).unwrap()[0].credits,
            Credits::new(900)
        );
        assert_eq!(
            grants(&d, &a[1], &catalog).unwrap()[0].credits,
            Credits::new(6000)
        );
        // Once the worker has granted it, the earlier level is forgotten.
        d.advance(2);
        assert_eq!(d.earlier, None);
        assert_eq!(
            grants(&d, &a[1], &catalog).unwrap()[0].credits,
            Credits::new(6000)
        );
        // A change made before the next allotment's date keeps nothing earlier.
        let max = crate::refresh::PaidPeriod {
            plan: "max".into(),
            ..team
        };
        assert!(apply(&mut d, &max, a[1].at - Duration::days(3), 2));
        assert_eq!(d.earlier, None);
        assert_eq!(
            grants(&d, &a[1], &catalog).unwrap()[0].credits,
            Credits::new(400)
        );
    }

    #[test]
    fn around_an_anniversary_the_waiting_allotment_owes_what_both_levels_give() {
        let catalog = Catalog::builtin();
        let fresh = || {
            let mut d = doc(t(2027, 1, 15), Interval::Yearly);
            d.plan = "team".into();
            d.addon_units = 0;
            d
        };
        let a = allotments(t(2027, 1, 15), t(2028, 1, 15));
        let at_plan = |d: &RefreshDoc, plan: &str| paid(d, "in_change", plan);
        let plan_credits = |d: &RefreshDoc| grants(d, &a[0], &catalog).unwrap()[0].credits;
        // A downgrade just after the anniversary: the allotment is at the level of its
        // date; the difference came back as money, and its credits go from this month.
        let mut d = fresh();
        let p = at_plan(&d, "generative");
        assert!(apply(&mut d, &p, a[0].at + Duration::minutes(5), 1));
        assert_eq!(plan_credits(&d), Credits::new(6000));
        // A change at the anniversary's very second: its grant pays the whole month.
        let mut d = fresh();
        d.plan = "generative".into();
        let p = at_plan(&d, "team");
        assert!(apply(&mut d, &p, a[0].at, 1));
        assert_eq!(plan_credits(&d), Credits::new(900));
        // Two upgrades, one before the anniversary and one after, whose events arrive
        // the other way round: the allotment is at the level of its date.
        let mut d = fresh();
        d.plan = "plus".into();
        let later = at_plan(&d, "team");
        assert!(apply(&mut d, &later, a[0].at + Duration::minutes(5), 2));
        assert_eq!(plan_credits(&d), Credits::new(150));
        let before = crate::refresh::PaidPeriod {
            invoice: InvoiceId::parse("in_before").unwrap(),
            ..at_plan(&d, "generative")
        };
        assert!(apply(&mut d, &before, a[0].at - Duration::minutes(10), 1));
        assert_eq!(d.plan, "team", "the later change still sets the level");
        assert_eq!(plan_credits(&d), Credits::new(900));
        assert_eq!(
            grants(&d, &a[1], &catalog).unwrap()[0].credits,
            Credits::new(6000)
        );
        // Plan up, add-ons down in one change: its grant nets the two, so the allotment
        // is the earlier level whole (900 + 5 x 60), not the lower of each part.
        let mut d = fresh();
        d.plan = "generative".into();
        d.addon_units = 5;
        let team = at_plan(&d, "team");
        assert!(apply(&mut d, &team, a[0].at + Duration::minutes(5), 1));
        let g = grants(&d, &a[0], &catalog).unwrap();
        let total: u64 = g.iter().map(|g| g.credits.get()).sum();
        assert_eq!(total, 900 + 5 * 60, "{g:?}");
    }

    #[test]
    fn a_waiting_allotment_owes_its_dates_level_whatever_changes_follow_in_any_order() {
        let catalog = Catalog::builtin();
        let a = allotments(t(2027, 1, 15), t(2028, 1, 15));
        let fresh = |plan: &str| {
            let mut d = doc(t(2027, 1, 15), Interval::Yearly);
            d.plan = plan.into();
            d.addon_units = 0;
            d
        };
        let plan_credits =
            |d: &RefreshDoc, k: usize| grants(d, &a[k], &catalog).unwrap()[0].credits;
        let minutes = |m: i64| a[0].at + Duration::minutes(m);

        // Down to plus, then back up to generative, after the allotment fell due and before
        // the worker came: the month at generative, the level of its date (the fall's money
        // back takes its credits from the month, the rise's grant pays the rest of it).
        let mut d = fresh("generative");
        assert!(apply_paid(&mut d, "in_down", "plus", minutes(5), 1));
        assert!(apply_paid(&mut d, "in_up", "generative", minutes(9), 2));
        assert_eq!(plan_credits(&d, 0), Credits::new(900));
        // The same two changes seen the other way round: the same month.
        let mut d = fresh("generative");
        assert!(apply_paid(&mut d, "in_up", "generative", minutes(9), 2));
        assert!(apply_paid(&mut d, "in_down", "plus", minutes(5), 1));
        assert_eq!(d.plan, "generative");
        assert_eq!(plan_credits(&d, 0), Credits::new(900));

        // A rise before the date whose event arrives after a fall made after it: the month
        // at the risen level, the one in effect on its date.
        let mut d = fresh("plus");
        assert!(apply_paid(&mut d, "in_down", "generative", minutes(5), 2));
        assert_eq!(plan_credits(&d, 0), Credits::new(150));
        assert!(apply_paid(&mut d, "in_up", "team", minutes(-1), 1));
        assert_eq!(d.plan, "generative");
        assert_eq!(plan_credits(&d, 0), Credits::new(6000));

        // The worker more than a month behind, a change in each month: each month at the
        // level of its own date.
        let mut d = fresh("plus");
        assert!(apply_paid(&mut d, "in_a", "max", minutes(60), 1));
        assert!(apply_paid(
            &mut d,
            "in_b",
            "team",
            a[1].at + Duration::hours(1),
            2
        ));
        assert_eq!(plan_credits(&d, 0), Credits::new(150));
        assert_eq!(plan_credits(&d, 1), Credits::new(400));
        assert_eq!(plan_credits(&d, 2), Credits::new(6000));
        // The same, their events the other way round: the same months.
        let mut d = fresh("plus");
        assert!(apply_paid(
            &mut d,
            "in_b",
            "team",
            a[1].at + Duration::hours(1),
            2
        ));
        assert!(apply_paid(&mut d, "in_a", "max", minutes(60), 1));
        assert_eq!(d.plan, "team");
        assert_eq!(plan_credits(&d, 0), Credits::new(150));
        assert_eq!(plan_credits(&d, 1), Credits::new(400));
        assert_eq!(plan_credits(&d, 2), Credits::new(6000));
    }

    /// A yearly plus plan without add-ons, its allotments, and an upgrade to max with
    /// `units` add-on units (invoice `in_upgrade`).
    fn plus_yearly_and_upgrade(
        units: u32,
    ) -> (RefreshDoc, Vec<Allotment>, crate::refresh::PaidPeriod) {
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 0;
        let a = allotments(d.period_start, d.period_end);
        let upgrade = crate::refresh::PaidPeriod {
            workspace: d.workspace.clone(),
            subscription: d.subscription.clone(),
            invoice: InvoiceId::parse("in_upgrade").unwrap(),
            interval: Interval::Yearly,
            plan: "max".into(),
            addon_units: units,
            addon_credits: None,
            plan_terms: None,
            period_start: d.period_start,
            period_end: d.period_end,
        };
        (d, a, upgrade)
    }

    #[test]
    fn money_given_back_for_a_change_with_add_on_units_takes_the_plans_rise_first() {
        let catalog = Catalog::builtin();
        let (mut d, a, upgrade) = plus_yearly_and_upgrade(2);
        // Up from plus (150) to max (400) with two add-on units, in one invoice.
        assert!(apply(&mut d, &upgrade, a[0].at + Duration::days(10), 1));
        d.advance(2);
        let month = |d: &RefreshDoc| {
            let g = grants(d, &a[1], &catalog).unwrap();
            (g[0].credits.get(), g.get(1).map_or(0, |g| g.credits.get()))
        };
        let (plan, units) = month(&d);
        assert_eq!(plan, 400);
        assert!(units > 0);
        // The plan's money given back, all of it (of 1,000 cents, 600 the add-on units'):
        // the plan's rise goes, the add-on units' credits stay.
        let invoice = InvoiceId::parse("in_upgrade").unwrap();
        let given = |back, plan, addon| crate::refresh::GivenBack {
            back,
            paid: 1000,
            parts: Some((plan, addon)),
        };
        assert!(d.give_back(&invoice, given(400, 1000, 0)));
        assert!(!d.give_back(&invoice, given(400, 1000, 0)));
        assert_eq!(month(&d), (150, units));
        // Half the add-on units' money lost in a dispute besides: half their credits.
        assert!(d.give_back(&invoice, given(700, 1000, 500)));
        assert_eq!(month(&d), (150, units - units / 2));
        // Facts known only as a whole (recorded before the parts were kept) take the
        // share of all it added, from the plan first, as before.
        let mut whole = d.clone();
        for c in &mut whole.changes {
            c.given_back_parts = None;
        }
        let added = 250 + units;
        let less = (added * 700).div_ceil(1000);
        assert_eq!(
            month(&whole),
            (400 - less.min(400), units - less.saturating_sub(400))
        );

        // Back down to plus later, keeping the units; then the upgrade's plan money given
        // back: the plan's rise was given back already, and the units stay paid for.
        let (mut d, _, upgrade) = plus_yearly_and_upgrade(2);
        assert!(apply(&mut d, &upgrade, a[0].at + Duration::days(5), 1));
        let down = crate::refresh::PaidPeriod {
            invoice: InvoiceId::parse("in_down").unwrap(),
            plan: "plus".into(),
            ..upgrade.clone()
        };
        assert!(apply(&mut d, &down, a[0].at + Duration::days(9), 1));
        d.advance(2);
        assert!(d.give_back(&invoice, given(400, 1000, 0)));
        let (plan, kept) = month(&d);
        assert_eq!(plan, 150);
        assert!(kept > 0);
        assert!(d.give_back(&invoice, given(1000, 1000, 1000)));
        assert_eq!(month(&d), (150, 0));
    }

    #[test]
    fn money_given_back_for_a_change_lowers_the_allotments_after_it() {
        let catalog = Catalog::builtin();
        let (mut d, a, upgrade) = plus_yearly_and_upgrade(0);
        // Upgraded from plus (150) to max (400) between the first and second allotments.
        assert!(apply(&mut d, &upgrade, a[0].at + Duration::days(10), 1));
        d.advance(2);
        let plan = |d: &RefreshDoc, k: usize| grants(d, &a[k], &catalog).unwrap()[0].credits;
        assert_eq!(plan(&d, 1), Credits::new(400));
        // Half of the upgrade's invoice refunded: half of what it added.
        assert!(d.give_back(&InvoiceId::parse("in_upgrade").unwrap(), back_of(500, 1000)));
        assert!(!d.give_back(&InvoiceId::parse("in_upgrade").unwrap(), back_of(400, 1000)));
        assert_eq!(plan(&d, 1), Credits::new(275));
        // All of it: back to plus for the rest of the year.
        assert!(d.give_back(
            &InvoiceId::parse("in_upgrade").unwrap(),
            back_of(1000, 1000)
        ));
        assert_eq!(plan(&d, 1), Credits::new(150));
        assert_eq!(plan(&d, 10), Credits::new(150));
        // An invoice the document does not know changes nothing.
        assert!(!d.give_back(&InvoiceId::parse("in_other").unwrap(), back_of(1000, 1000)));
        // The period's own invoice is followed as before.
        assert!(d.give_back(&InvoiceId::parse("in_1").unwrap(), back_of(1000, 1000)));
        assert!(grants(&d, &a[1], &catalog).unwrap().is_empty());

        let change = |invoice: &str, plan: &str| crate::refresh::PaidPeriod {
            invoice: InvoiceId::parse(invoice).unwrap(),
            plan: plan.into(),
            ..upgrade.clone()
        };
        let back = |d: &mut RefreshDoc, invoice: &str| {
            assert!(d.give_back(&InvoiceId::parse(invoice).unwrap(), back_of(1000, 1000)));
        };
        // Up to max, back down to plus, then the upgrade refunded: plus is still paid for.
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 0;
        let up = change("in_up", "max");
        assert!(apply(&mut d, &up, a[0].at + Duration::days(5), 1));
        let down = change("in_down", "plus");
        assert!(apply(&mut d, &down, a[0].at + Duration::days(9), 1));
        back(&mut d, "in_up");
        d.advance(2);
        assert_eq!(plan(&d, 1), Credits::new(150));
        // Two upgrades whose events arrive the other way round: each is recorded from the
        // level the other left, so refunding the first takes back only what it added.
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 0;
        let second = change("in_second", "team");
        assert!(apply(&mut d, &second, a[0].at + Duration::days(9), 1));
        let first = change("in_first", "max");
        assert!(apply(&mut d, &first, a[0].at + Duration::days(5), 1));
        assert_eq!(d.plan, "team");
        let invoices: Vec<&str> = d.changes.iter().map(|c| c.invoice.as_str()).collect();
        assert_eq!(invoices, ["in_first", "in_second"]);
        back(&mut d, "in_first");
        d.advance(2);
        assert_eq!(plan(&d, 1), Credits::new(6000 - 250));
        back(&mut d, "in_second");
        assert_eq!(plan(&d, 1), Credits::new(150));
        // A change recorded late that billed no add-ons keeps the add-on value its
        // successor started from.
        let mut d = doc(t(2027, 1, 15), Interval::Yearly);
        d.plan = "plus".into();
        d.addon_units = 2;
        d.addon_credits = Some(Credits::new(500));
        let second = crate::refresh::PaidPeriod {
            addon_units: 2,
            ..change("in_second", "team")
        };
        assert!(apply(&mut d, &second, a[0].at + Duration::days(9), 1));
        let first = crate::refresh::PaidPeriod {
            addon_units: 2,
            ..change("in_first", "max")
        };
        assert!(apply(&mut d, &first, a[0].at + Duration::days(5), 1));
        assert_eq!(d.changes[0].after.addon_credits, Some(Credits::new(500)));
        assert_eq!(d.changes[1].before, d.changes[0].after);
    }

    #[test]
    fn a_yearly_period_from_jan_31_of_a_leap_year_owes_eleven_clamped_allotments() {
        let a = allotments(t(2028, 1, 31), t(2029, 1, 31));
        let days: Vec<(u32, u32)> = a
            .iter()
            .map(|a| (chrono::Datelike::month(&a.at), chrono::Datelike::day(&a.at)))
            .collect();
        assert_eq!(
            days,
            [
                (2, 29),
                (3, 31),
                (4, 30),
                (5, 31),
                (6, 30),
                (7, 31),
                (8, 31),
                (9, 30),
                (10, 31),
                (11, 30),
                (12, 31)
            ]
        );
        assert_eq!(a[10].month_end, t(2029, 1, 31));
        assert!(allotments(t(2028, 1, 31), t(2028, 2, 29)).is_empty());
    }

    #[test]
    fn grants_follow_the_catalog_and_the_raised_level_never_lowers() {
        let catalog = Catalog::builtin();
        let mut d = doc(t(2028, 1, 31), Interval::Yearly);
        let a = allotments(d.period_start, d.period_end)[0];
        let g = grants(&d, &a, &catalog).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].key,
            format!("refresh:sub_1:{}:1:plan", t(2028, 1, 31).timestamp())
        );
        assert_eq!(g[0].credits, Credits::new(400));
        assert_eq!(g[0].expires_at, t(2028, 3, 31) + Duration::days(30));
        assert_eq!(g[1].credits, Credits::new(120));
        assert_eq!(g[1].expires_at, t(2028, 3, 31));
        d.plan = "generative".into();
        d.addon_units = 1;
        let g = grants(&d, &a, &catalog).unwrap();
        assert_eq!(g[0].credits, Credits::new(900));
        assert_eq!(g[1].credits, Credits::new(60));
        // Units billed as another add-on are worth what they were billed as.
        d.addon_credits = Some(Credits::new(600));
        assert_eq!(
            grants(&d, &a, &catalog).unwrap()[1].credits,
            Credits::new(600)
        );
    }

    #[test]
    fn the_next_due_time_is_the_earliest_of_allotment_renewal_check_and_settlement() {
        let grace = Duration::hours(6);
        let mut d = doc(t(2027, 1, 31), Interval::Yearly);
        assert_eq!(next_due(&d, grace), Some(t(2027, 2, 28)));
        d.settle_at = Some(t(2027, 2, 10));
        assert_eq!(next_due(&d, grace), Some(t(2027, 2, 10)));
        d.settle_at = None;
        d.next_allotment = 12;
        assert_eq!(next_due(&d, grace), Some(t(2028, 1, 31) + grace));
        d.renewal_checked = true;
        assert_eq!(next_due(&d, grace), None);
        let m = doc(t(2027, 1, 31), Interval::Monthly);
        assert!(due_allotments(&m, t(2027, 6, 1)).is_empty());
        assert_eq!(next_due(&m, grace), Some(t(2027, 2, 28) + grace));
    }

    #[test]
    fn a_monthly_period_longer_than_a_month_of_its_start_owes_no_allotment() {
        // Stripe's periods for an anchor on the 31st: 28 Feb to 31 Mar, 30 Apr to 31 May.
        // `add_months` from the start falls inside them (28 Mar, 30 May); the renewal
        // invoice grants each month, so the worker must not.
        let grace = Duration::hours(6);
        for (start, end) in [
            (t(2027, 2, 28), t(2027, 3, 31)),
            (t(2027, 4, 30), t(2027, 5, 31)),
            (t(2028, 2, 29), t(2028, 3, 31)),
        ] {
            let mut m = doc(start, Interval::Monthly);
            m.period_end = end;
            assert!(
                !allotments(start, end).is_empty(),
                "the dates alone owe one"
            );
            assert!(of(&m).is_empty());
            assert!(due_allotments(&m, end).is_empty());
            assert_eq!(next_due(&m, grace), Some(end + grace));
            assert_eq!(m.waiting_at(end), None);
            // The same dates in a yearly document are months of its year.
            m.interval = Interval::Yearly;
            assert_eq!(of(&m).len(), 1);
        }
    }
}
