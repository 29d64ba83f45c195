//! `GET /v1/invoices`: billing history.

use super::{ApiResult, Buyer};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use tally::billing::records::*;
use tally::http::{ApiQuery, Problem, ProblemDetails};
use tally::store::docs;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InvoiceQuery {
    /// 1-100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoicePage {
    pub items: Vec<InvoiceRecord>,
}

#[utoipa::path(get, path = "/v1/invoices", tag = "billing", security(("bearer" = [])),
    params(InvoiceQuery),
    responses((status = 200, body = InvoicePage), (status = 403, body = ProblemDetails)))]
/// Billing history: open and paid invoices (and voided ones), newest first, with links to
/// the hosted invoice and its PDF.
pub async fn invoices(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    ApiQuery(q): ApiQuery<InvoiceQuery>,
) -> ApiResult<Json<InvoicePage>> {
    let limit = match q.limit {
        None => 20,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(_) => return Err(Problem::validation("limit", "must be between 1 and 100")),
    };
    let mut items: Vec<InvoiceRecord> = docs::list(
        st.docs.as_ref(),
        &workspace_pk(&workspace),
        INVOICE_PREFIX,
        200,
    )
    .await?;
    items.retain(|i| i.status != "draft");
    items.truncate(limit);
    Ok(Json(InvoicePage { items }))
}
