//! Request and response bodies of the credits API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally::catalog::{Addon, Estimate, Pack, Plan, ResolutionOption, Workflow};
use tally::ledger::{Balance, Entry, Generation, Interval, LotSource, PlanStatus};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    #[serde(flatten)]
    pub plan: Plan,
    pub yearly_price_cents: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    pub id: String,
    pub name: String,
    pub workflow: Workflow,
    /// Credits per item (image), thousandths of a credit per second (video, avatar), or the
    /// flat price (training), before the resolution multiplier.
    pub pricing: tally::catalog::Pricing,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogView {
    pub currency: String,
    pub yearly_discount_pct: u8,
    pub plans: Vec<PlanView>,
    pub packs: Vec<Pack>,
    pub addons: Vec<Addon>,
    pub models: Vec<ModelView>,
    pub resolutions: Vec<ResolutionOption>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LotView {
    pub id: String,
    pub source: LotSource,
    pub original: u64,
    pub remaining: u64,
    pub held: u64,
    pub granted_at: DateTime<Utc>,
    /// Absent for credits that never expire while the workspace is active.
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceView {
    pub available: u64,
    pub held: u64,
    /// Lots in burn order (spent first at the top).
    pub lots: Vec<LotView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EstimateView {
    #[serde(flatten)]
    pub estimate: Estimate,
    pub available: u64,
    /// Whether the workspace can start this generation now.
    pub sufficient: bool,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The exact cost; defaults to the held estimate.
    pub credits: Option<i64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationView {
    #[serde(flatten)]
    pub generation: Generation,
    /// The journal entries that moved this generation's credits (detail view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_entries: Option<Vec<Entry>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationPage {
    pub items: Vec<GenerationView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GenerationListQuery {
    /// held | completed | failed | expired
    pub status: Option<String>,
    pub model: Option<String>,
    pub cursor: Option<String>,
    /// 1-100, default 20.
    pub limit: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub cursor: Option<String>,
    /// 1-100, default 50.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntryPage {
    pub items: Vec<Entry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub plan: String,
    pub name: String,
    pub interval: Interval,
    pub status: PlanStatus,
    pub period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsView {
    pub plan: Option<SubscriptionView>,
    pub custom_model_slots: u32,
    pub custom_models_used: u32,
    pub support: String,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Signed: positive grants credits (never expiring), negative takes them back.
    pub credits: i64,
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentView {
    pub entries: Vec<u64>,
    pub balance: Balance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
}
