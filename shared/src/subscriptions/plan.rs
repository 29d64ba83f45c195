//! The plan a workspace is on, and the one rule for what it entitles the workspace to.
//!
//! Every caller that asks "which plan is in effect" (custom-model slots when a training
//! starts, the estimate that predicts it, pack and top-up discounts, `GET /v1/entitlements`)
//! asks [`Entitlements::of`], so they cannot disagree.

use crate::catalog::{Catalog, Plan};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Monthly,
    Yearly,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Monthly => "monthly",
            Interval::Yearly => "yearly",
        }
    }

    /// Billing months in one period of this interval.
    pub fn months(self) -> u32 {
        match self {
            Interval::Monthly => 1,
            Interval::Yearly => 12,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Active,
    PastDue,
    Paused,
    Canceled,
}

impl PlanStatus {
    /// Whether a plan in this status gives its benefits. Past due keeps them while Stripe
    /// retries the payment (as Stripe keeps the subscription running); a paused plan is not
    /// charged, so it gives nothing past its paid period ([`PlanState::in_effect`]); a
    /// canceled one has ended.
    pub fn in_effect(self) -> bool {
        matches!(self, PlanStatus::Active | PlanStatus::PastDue)
    }

    /// Whether the subscription still exists (a new one cannot be started beside it).
    pub fn is_live(self) -> bool {
        self != PlanStatus::Canceled
    }
}

/// The workspace's subscription as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanState {
    pub plan: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// A paused plan: the end of the last period an invoice paid. Pausing only stops
    /// collecting the next invoices, so the plan gives its benefits while its current
    /// period is one that was paid for, and not after Stripe moves on to an unpaid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_through: Option<DateTime<Utc>>,
}

impl PlanState {
    /// Whether the plan gives its benefits: active or past due, or paused within a paid
    /// period. An active or past-due plan in a period whose renewal invoice was voided
    /// (collection paused) carries how far the paid invoices reach, and gives its benefits
    /// only within.
    pub fn in_effect(&self) -> bool {
        match self.status {
            PlanStatus::Paused => self.paid_through.is_some_and(|t| t >= self.period_end),
            PlanStatus::Active | PlanStatus::PastDue => {
                self.paid_through.is_none_or(|t| t >= self.period_end)
            }
            s => s.in_effect(),
        }
    }
}

/// What the workspace's plan gives it right now. Without a plan in effect: nothing beyond
/// the free tier (no custom models, no discounts, community support).
#[derive(Debug, Clone)]
pub struct Entitlements<'c> {
    /// The catalog plan in effect, if any.
    pub plan: Option<&'c Plan>,
    pub custom_model_slots: u32,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
    pub support: &'c str,
}

/// Support level of a workspace without a plan in effect.
pub const FREE_SUPPORT: &str = "community";

impl<'c> Entitlements<'c> {
    /// The one answer to "which plan is in effect, and what does it give".
    pub fn of(plan: Option<&PlanState>, catalog: &'c Catalog) -> Self {
        match plan
            .filter(|p| p.in_effect())
            .and_then(|p| catalog.plan(&p.plan))
        {
            Some(def) => Self {
                plan: Some(def),
                custom_model_slots: def.custom_model_slots,
                pack_discount_pct: def.pack_discount_pct,
                rollover_days: def.rollover_days,
                support: &def.support,
            },
            None => Self {
                plan: None,
                custom_model_slots: 0,
                pack_discount_pct: 0,
                rollover_days: 0,
                support: FREE_SUPPORT,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn plan(status: PlanStatus) -> PlanState {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        PlanState {
            plan: "max".into(),
            interval: Interval::Monthly,
            status,
            period_start: t,
            period_end: t + chrono::Duration::days(31),
            cancel_at_period_end: false,
            paid_through: None,
        }
    }

    #[test]
    fn active_and_past_due_plans_give_their_benefits() {
        let catalog = Catalog::builtin();
        let max = catalog.plan("max").unwrap();
        for status in [PlanStatus::Active, PlanStatus::PastDue] {
            let e = Entitlements::of(Some(&plan(status)), &catalog);
            assert_eq!(e.plan.map(|p| p.id.as_str()), Some("max"));
            assert_eq!(e.custom_model_slots, max.custom_model_slots);
            assert_eq!(e.pack_discount_pct, max.pack_discount_pct);
            assert_eq!(e.support, max.support);
        }
    }

    #[test]
    fn paused_canceled_and_missing_plans_give_nothing() {
        let catalog = Catalog::builtin();
        for p in [
            Some(plan(PlanStatus::Paused)),
            Some(plan(PlanStatus::Canceled)),
            None,
        ] {
            let e = Entitlements::of(p.as_ref(), &catalog);
            assert!(e.plan.is_none());
            assert_eq!(e.custom_model_slots, 0);
            assert_eq!(e.pack_discount_pct, 0);
            assert_eq!(e.rollover_days, 0);
            assert_eq!(e.support, FREE_SUPPORT);
        }
    }

    #[test]
    fn a_paused_plan_gives_its_benefits_while_its_period_is_a_paid_one() {
        let catalog = Catalog::builtin();
        let mut p = plan(PlanStatus::Paused);
        p.paid_through = Some(p.period_end);
        let e = Entitlements::of(Some(&p), &catalog);
        assert_eq!(e.plan.map(|p| p.id.as_str()), Some("max"));
        assert!(e.custom_model_slots > 0 && e.pack_discount_pct > 0);
        // Stripe moved on to a period whose invoice was voided, not paid.
        p.period_start = p.period_end;
        p.period_end += chrono::Duration::days(31);
        assert!(Entitlements::of(Some(&p), &catalog).plan.is_none());
    }

    #[test]
    fn an_active_or_past_due_plan_in_a_voided_period_gives_only_what_was_paid() {
        let catalog = Catalog::builtin();
        for status in [PlanStatus::Active, PlanStatus::PastDue] {
            let mut p = plan(status);
            // Paid up to the period's start only (its renewal voided).
            p.paid_through = Some(p.period_start);
            assert!(
                Entitlements::of(Some(&p), &catalog).plan.is_none(),
                "{status:?}"
            );
            p.paid_through = Some(p.period_end);
            assert!(
                Entitlements::of(Some(&p), &catalog).plan.is_some(),
                "{status:?}"
            );
        }
    }

    #[test]
    fn an_unknown_plan_id_gives_nothing() {
        let catalog = Catalog::builtin();
        let mut p = plan(PlanStatus::Active);
        p.plan = "retired".into();
        assert!(Entitlements::of(Some(&p), &catalog).plan.is_none());
    }
}
