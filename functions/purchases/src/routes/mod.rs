//! The purchases API's routes, one file per resource: each holds its handlers and the
//! request and response bodies they read and write. Helpers more than one resource uses
//! live here: who may buy, how payment-provider failures answer, and the workspace's Stripe
//! customer.

pub mod alerts;
pub mod billing_portal;
pub mod checkout;
pub mod custom_payments;
pub mod history;
pub mod invoices;
pub mod reconciliation;
pub mod reissue;
pub mod subscription;

use crate::PurchasesState;
use axum::http::StatusCode;
use tally::billing::records::*;
use tally::http::Problem;
use tally::ids::{CustomerId, WorkspaceId};
use tally::payments::PaymentsError;
use tally::store::docs;

pub(crate) type ApiResult<T> = Result<T, Problem>;

/// A page size: 1-100, `None` for the default of 20.
pub(crate) fn page_limit(limit: Option<i64>) -> ApiResult<usize> {
    match limit {
        None => Ok(20),
        Some(n) if (1..=100).contains(&n) => Ok(n as usize),
        Some(_) => Err(Problem::validation("limit", "must be between 1 and 100")),
    }
}

/// Owners and billing admins buy; members are refused.
pub(crate) use tally::http::auth::billing_workspace as buyer;

/// An owner or billing admin of a workspace, read before the body: a member learns only
/// that they may not buy, whatever they sent.
pub(crate) use tally::http::auth::BillingManager as Buyer;

/// A payment-provider failure as the client sees it: a refusal is the provider's answer
/// (502, logged as an error); unavailability is worth retrying with the same key (503). An
/// `Idempotency-Key` Stripe saw with other parameters (the same key sent again with another
/// body after a failure, or across a release that sends Stripe more) is the client's 409.
pub(crate) fn provider(e: PaymentsError) -> Problem {
    if e.is_key_reused() {
        tracing::warn!(error = %e.message(), "an idempotency key reused with other parameters");
        return Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "this Idempotency-Key was first used at the payment provider for another request, \
             which may have been carried out (look for it before sending this one again); this \
             one was not: send it under a new key",
        );
    }
    match e {
        PaymentsError::Refused { message: m, .. } => {
            tracing::error!(error = %m, "payment provider refused a request");
            Problem::new(StatusCode::BAD_GATEWAY, "payment_provider_error", m)
        }
        PaymentsError::Unavailable { message: m, .. } => {
            tracing::warn!(error = %m, "payment provider unavailable");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the payment provider is unavailable; retry with the same Idempotency-Key",
            )
            .with_retry_after(2)
        }
        PaymentsError::Changed { message: m } => Problem::new(
            StatusCode::CONFLICT,
            "subscription_changed",
            format!("the subscription changed meanwhile ({m}); nothing was changed, retry"),
        ),
    }
}

/// The workspace's Stripe customer, created on first purchase (once per workspace and
/// email: the Stripe idempotency key names both, as Stripe refuses a key sent again with
/// another email; of two made at once, the first stored id wins and the other stays
/// unused).
async fn customer(
    st: &PurchasesState,
    workspace: &WorkspaceId,
    email: Option<&str>,
) -> ApiResult<CustomerId> {
    let pk = workspace_pk(workspace);
    if let Some(c) = docs::get::<BillingProfile>(st.docs.as_ref(), &pk, PROFILE_SK)
        .await?
        .and_then(|p| p.customer)
    {
        return Ok(c);
    }
    let created = st
        .payments
        .create_customer(
            workspace,
            email,
            &format!(
                "tally-customer-{workspace}-{}",
                tally::payments::stripe_api::short_digest(email.unwrap_or_default())
            ),
        )
        .await
        .map_err(provider)?;
    match tally::billing::link_customer(st.docs.as_ref(), &created, workspace).await? {
        tally::billing::Linked::Ours(c) => Ok(c),
        // Stripe answered with a customer of another workspace: never hand it out.
        tally::billing::Linked::Elsewhere(owner) => {
            tracing::error!(customer = %created, owner = %owner, workspace = %workspace,
                "Stripe answered with another workspace's customer");
            Err(Problem::internal())
        }
    }
}
