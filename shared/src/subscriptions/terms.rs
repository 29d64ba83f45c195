//! A subscription's terms as Tally writes them into Stripe's subscription metadata, and
//! reads them back from every event: the plan, the interval, the add-on units, and terms
//! scheduled to start at the next renewal (downgrades and add-on reductions).

use super::{Interval, ScheduledChange};
use crate::ids::WorkspaceId;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// Metadata keys Tally keeps on a Stripe subscription.
pub mod meta {
    /// The workspace; its wire name is the JWT claim's.
    pub const WORKSPACE: &str = "org_id";
    pub const PLAN: &str = "plan";
    pub const INTERVAL: &str = "interval";
    pub const ADDON_UNITS: &str = "addon_units";
    pub const SCHEDULED_PLAN: &str = "scheduled_plan";
    pub const SCHEDULED_INTERVAL: &str = "scheduled_interval";
    pub const SCHEDULED_ADDON_UNITS: &str = "scheduled_addon_units";
    /// Unix time (the renewal) from which the scheduled terms apply.
    pub const SCHEDULED_FROM: &str = "scheduled_from";
    /// Every key of a scheduled change (cleared together).
    pub const SCHEDULED_KEYS: [&str; 4] = [
        SCHEDULED_PLAN,
        SCHEDULED_INTERVAL,
        SCHEDULED_ADDON_UNITS,
        SCHEDULED_FROM,
    ];
}

/// Metadata that does not describe terms: the event cannot be applied, ever.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TermsError {
    #[error("subscription metadata names no plan")]
    NoPlan,
    #[error("subscription metadata {key} is not a number: {value:?}")]
    NotANumber { key: &'static str, value: String },
}

/// The terms that apply to one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub plan: String,
    pub interval: Interval,
    pub addon_units: u32,
    /// Terms waiting for a later renewal, for display.
    pub scheduled: Option<ScheduledChange>,
}

fn ts(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// Reads an interval as Stripe (`month`, `year`) or Tally (`monthly`, `yearly`) spells it.
pub fn interval_of(s: Option<&str>) -> Interval {
    match s {
        Some("year" | "yearly") => Interval::Yearly,
        _ => Interval::Monthly,
    }
}

/// What a subscription's metadata says applies to the period starting at `period_start`
/// (unix seconds): scheduled terms once their time has come, the current ones before (and
/// what is scheduled, for display).
pub fn terms(m: &HashMap<String, String>, period_start: i64) -> Result<Terms, TermsError> {
    let plan = m.get(meta::PLAN).cloned().ok_or(TermsError::NoPlan)?;
    let interval = interval_of(m.get(meta::INTERVAL).map(String::as_str));
    let addon_units: u32 = match m.get(meta::ADDON_UNITS) {
        None => 0,
        Some(u) => u.parse().map_err(|_| TermsError::NotANumber {
            key: meta::ADDON_UNITS,
            value: u.clone(),
        })?,
    };
    let Some(from) = m
        .get(meta::SCHEDULED_FROM)
        .and_then(|f| f.parse::<i64>().ok())
    else {
        return Ok(Terms {
            plan,
            interval,
            addon_units,
            scheduled: None,
        });
    };
    let next = ScheduledChange {
        plan: m
            .get(meta::SCHEDULED_PLAN)
            .filter(|p| !p.is_empty())
            .cloned()
            .unwrap_or_else(|| plan.clone()),
        interval: m
            .get(meta::SCHEDULED_INTERVAL)
            .filter(|i| !i.is_empty())
            .map_or(interval, |i| interval_of(Some(i))),
        addon_units: m
            .get(meta::SCHEDULED_ADDON_UNITS)
            .and_then(|u| u.parse().ok())
            .unwrap_or(addon_units),
        from: ts(from),
    };
    if period_start >= from {
        Ok(Terms {
            plan: next.plan,
            interval: next.interval,
            addon_units: next.addon_units,
            scheduled: None,
        })
    } else {
        Ok(Terms {
            plan,
            interval,
            addon_units,
            scheduled: Some(next),
        })
    }
}

/// The metadata describing the terms, with any schedule set or cleared (Stripe keeps keys
/// it is not sent, so a cleared schedule is written as empty values).
pub fn metadata(
    workspace: &WorkspaceId,
    plan: &str,
    interval: Interval,
    units: u32,
    scheduled: Option<&ScheduledChange>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([
        (meta::WORKSPACE.to_string(), workspace.to_string()),
        (meta::PLAN.to_string(), plan.to_string()),
        (meta::INTERVAL.to_string(), interval.as_str().to_string()),
        (meta::ADDON_UNITS.to_string(), units.to_string()),
    ]);
    let (sp, si, su, sf) = match scheduled {
        Some(s) => (
            s.plan.clone(),
            s.interval.as_str().to_string(),
            s.addon_units.to_string(),
            s.from.timestamp().to_string(),
        ),
        None => (String::new(), String::new(), String::new(), String::new()),
    };
    m.insert(meta::SCHEDULED_PLAN.into(), sp);
    m.insert(meta::SCHEDULED_INTERVAL.into(), si);
    m.insert(meta::SCHEDULED_ADDON_UNITS.into(), su);
    m.insert(meta::SCHEDULED_FROM.into(), sf);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_hash(m: BTreeMap<String, String>) -> HashMap<String, String> {
        m.into_iter().collect()
    }

    #[test]
    fn written_terms_read_back_the_same() {
        let ws = WorkspaceId::parse("acme").unwrap();
        let m = as_hash(metadata(&ws, "max", Interval::Yearly, 3, None));
        let t = terms(&m, 0).unwrap();
        assert_eq!(
            (t.plan.as_str(), t.interval, t.addon_units),
            ("max", Interval::Yearly, 3)
        );
        assert_eq!(t.scheduled, None);
    }

    #[test]
    fn scheduled_terms_apply_from_their_renewal_on() {
        let ws = WorkspaceId::parse("acme").unwrap();
        let next = ScheduledChange {
            plan: "plus".into(),
            interval: Interval::Monthly,
            addon_units: 1,
            from: ts(1_000),
        };
        let m = as_hash(metadata(&ws, "max", Interval::Monthly, 3, Some(&next)));
        let before = terms(&m, 999).unwrap();
        assert_eq!(before.plan, "max");
        assert_eq!(before.scheduled, Some(next));
        let after = terms(&m, 1_000).unwrap();
        assert_eq!((after.plan.as_str(), after.addon_units), ("plus", 1));
        assert_eq!(after.scheduled, None);
    }

    #[test]
    fn metadata_without_a_plan_or_with_bad_units_is_refused() {
        assert_eq!(terms(&HashMap::new(), 0), Err(TermsError::NoPlan));
        let m = HashMap::from([
            (meta::PLAN.to_string(), "max".to_string()),
            (meta::ADDON_UNITS.to_string(), "many".to_string()),
        ]);
        assert!(matches!(terms(&m, 0), Err(TermsError::NotANumber { .. })));
    }
}
