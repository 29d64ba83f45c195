//! Subscriptions over time: the plan in effect and what it entitles a workspace to, the
//! billing calendar, the terms kept in Stripe's metadata, the subscription document, and
//! what a plan or add-on change means. Pure rules: no I/O.

pub mod calendar;
pub mod change;
pub mod paid;
pub mod plan;
pub mod record;
pub mod terms;

pub use plan::{Entitlements, Interval, PlanState, PlanStatus};
pub use record::{ScheduledChange, SubscriptionRecord};
pub use terms::{Terms, TermsError, meta};
