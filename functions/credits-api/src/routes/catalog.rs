//! `GET /v1/catalog`: plans, packs, add-on units, models and resolutions for the pricing
//! page. Public: it needs no identity.

use crate::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use tally::catalog::{Addon, Pack, Plan, ResolutionOption, Workflow};
use tally::money::{Cents, Credits};
use utoipa::ToSchema;

/// A plan as the pricing page shows it: the catalog's plan and its yearly price. The
/// fields are spelled out (not the catalog's `Plan` flattened) so the schema describes
/// the whole object.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub audience: String,
    pub monthly_credits: Credits,
    pub monthly_price_cents: Cents,
    pub custom_model_slots: u32,
    pub support: String,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
    /// Which add-on unit this plan can buy.
    pub addon: String,
    pub yearly_price_cents: Cents,
}

impl PlanView {
    fn of(plan: &Plan, yearly_price_cents: Cents) -> Self {
        let Plan {
            id,
            name,
            audience,
            monthly_credits,
            monthly_price_cents,
            custom_model_slots,
            support,
            pack_discount_pct,
            rollover_days,
            addon,
        } = plan.clone();
        Self {
            id,
            name,
            audience,
            monthly_credits,
            monthly_price_cents,
            custom_model_slots,
            support,
            pack_discount_pct,
            rollover_days,
            addon,
            yearly_price_cents,
        }
    }
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

#[utoipa::path(get, path = "/v1/catalog", tag = "credits",
    responses((status = 200, body = CatalogView)))]
/// Plans, packs, add-on units, models and resolutions, for the pricing page.
pub async fn catalog(State(app): State<AppState>) -> Json<CatalogView> {
    let c = &app.ledger.catalog;
    Json(CatalogView {
        currency: c.currency.clone(),
        yearly_discount_pct: c.yearly_discount_pct,
        plans: c
            .plans
            .iter()
            .map(|p| PlanView::of(p, c.yearly_price(p)))
            .collect(),
        packs: c.packs.clone(),
        addons: c.addons.clone(),
        models: c
            .models
            .iter()
            .map(|m| ModelView {
                id: m.id.clone(),
                name: m.name.clone(),
                workflow: m.workflow,
                pricing: m.pricing,
                max_duration_s: m.max_duration_s,
            })
            .collect(),
        resolutions: c.resolutions.clone(),
    })
}
