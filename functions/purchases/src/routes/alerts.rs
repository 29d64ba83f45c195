//! `/v1/alerts`: credit alert thresholds and the optional auto top-up.

use super::{ApiResult, Buyer};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use tally::billing::records::*;
use tally::http::{ApiJson, Problem, ProblemDetails};
use tally::money::Credits;
use tally::store::docs;
use utoipa::ToSchema;

/// Alert settings as sent by the client.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsBody {
    /// Up to 10 thresholds, each 1 to 10,000,000 credits.
    #[schema(schema_with = thresholds_schema)]
    pub below_credits: Vec<u64>,
    /// Buy this pack with the saved card when the balance falls below the threshold.
    pub auto_topup: Option<AutoTopUpBody>,
}

fn thresholds_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1.0))
                .maximum(Some(tally::money::MAX_CREDITS_PER_REQUEST as f64)),
        )
        .max_items(Some(tally::alerts::MAX_THRESHOLDS))
        .description(Some("Up to 10 thresholds, each 1 to 10,000,000 credits"))
        .build()
}

/// The auto top-up as sent by the client (its own type, so unknown fields are refused at
/// this level too).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoTopUpBody {
    /// Which pack to buy.
    pub pack: String,
    /// Buy it when the available balance falls below this: 1 to 10,000,000 credits.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub below_credits: u64,
}

#[utoipa::path(put, path = "/v1/alerts", tag = "billing", security(("bearer" = [])),
    request_body = AlertsBody,
    responses((status = 200, body = tally::alerts::AlertSettings), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Sets credit alert thresholds and the optional auto top-up.
pub async fn put_alerts(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    ApiJson(body): ApiJson<AlertsBody>,
) -> ApiResult<Json<tally::alerts::AlertSettings>> {
    let limit = tally::money::MAX_CREDITS_PER_REQUEST;
    if body.below_credits.len() > tally::alerts::MAX_THRESHOLDS {
        return Err(Problem::validation(
            "below_credits",
            "at most 10 thresholds",
        ));
    }
    if body.below_credits.iter().any(|t| *t == 0 || *t > limit) {
        return Err(Problem::validation(
            "below_credits",
            &format!("each must be between 1 and {limit}"),
        ));
    }
    if let Some(t) = &body.auto_topup {
        if st.ledger.catalog.pack(&t.pack).is_none() {
            return Err(Problem::validation(
                "auto_topup.pack",
                &format!("unknown pack {:?}", t.pack),
            ));
        }
        if t.below_credits == 0 || t.below_credits > limit {
            return Err(Problem::validation(
                "auto_topup.below_credits",
                &format!("must be between 1 and {limit}"),
            ));
        }
    }
    let auto_topup = body.auto_topup.map(|t| tally::alerts::AutoTopUp {
        pack: t.pack,
        below_credits: Credits::new(t.below_credits),
    });
    let mut below: Vec<Credits> = body.below_credits.into_iter().map(Credits::new).collect();
    below.sort_unstable();
    below.dedup();
    let stored = docs::update(
        st.docs.as_ref(),
        &workspace_pk(&workspace),
        tally::alerts::ALERTS_SK,
        |cur: Option<tally::alerts::AlertSettings>| {
            let next = tally::alerts::AlertSettings {
                below_credits: below.clone(),
                auto_topup: auto_topup.clone(),
                last_topup_at: cur.as_ref().and_then(|c| c.last_topup_at),
                topup_claim: cur.as_ref().and_then(|c| c.topup_claim.clone()),
                topup_claims: cur.as_ref().and_then(|c| c.topup_claims.clone()),
                // Saved again by the owner: a refused card is tried again, and a top-up
                // stopped by a dispute resumes.
                refused_card: None,
                stopped_by_dispute: None,
            };
            (cur.as_ref() != Some(&next)).then_some(next)
        },
    )
    .await?
    .unwrap_or_default();
    Ok(Json(stored))
}

#[utoipa::path(get, path = "/v1/alerts", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = tally::alerts::AlertSettings), (status = 403, body = ProblemDetails)))]
/// The workspace's credit alert settings.
pub async fn get_alerts(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
) -> ApiResult<Json<tally::alerts::AlertSettings>> {
    Ok(Json(
        docs::get(
            st.docs.as_ref(),
            &workspace_pk(&workspace),
            tally::alerts::ALERTS_SK,
        )
        .await?
        .unwrap_or_default(),
    ))
}
