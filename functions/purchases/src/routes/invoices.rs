//! `GET /v1/invoices`: the workspace's invoices, newest first, a page at a time.

use super::{ApiResult, Buyer, page_limit};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use tally::billing::history::{cursor_of, sk_of};
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
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,12}-[A-Za-z0-9_]{1,100}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoicePage {
    pub items: Vec<InvoiceRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/invoices", tag = "billing", security(("bearer" = [])),
    params(InvoiceQuery),
    responses((status = 200, body = InvoicePage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Invoices: open, paid and voided ones, newest first, with links to the hosted invoice
/// and its PDF. Every money movement, invoices included, is in `/v1/billing/history`.
pub async fn invoices(
    State(st): State<PurchasesState>,
    Buyer { workspace, .. }: Buyer,
    ApiQuery(q): ApiQuery<InvoiceQuery>,
) -> ApiResult<Json<InvoicePage>> {
    let limit = page_limit(q.limit)?;
    let mut before = q
        .cursor
        .as_deref()
        .map(|c| {
            sk_of(c, INVOICE_PREFIX).ok_or_else(|| Problem::validation("cursor", "unknown cursor"))
        })
        .transpose()?;
    let pk = workspace_pk(&workspace);
    let mut items: Vec<(String, InvoiceRecord)> = Vec::new();
    // Drafts are skipped; read on until the page is full or the invoices run out.
    loop {
        let batch: Vec<(String, InvoiceRecord)> = docs::page(
            st.docs.as_ref(),
            &pk,
            INVOICE_PREFIX,
            before.as_deref(),
            limit + 1,
        )
        .await?;
        let exhausted = batch.len() <= limit;
        for (sk, i) in batch {
            before = Some(sk.clone());
            if i.status != "draft" {
                items.push((sk, i));
            }
        }
        if items.len() > limit || exhausted {
            break;
        }
    }
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items
            .last()
            .and_then(|(sk, _)| cursor_of(sk, INVOICE_PREFIX))
    } else {
        None
    };
    Ok(Json(InvoicePage {
        items: items.into_iter().map(|(_, i)| i).collect(),
        next_cursor,
    }))
}
