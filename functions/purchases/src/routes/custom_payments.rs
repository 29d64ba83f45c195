//! `POST /v1/admin/workspaces/{workspace_id}/custom-payments`: support staff bill an
//! agreed amount for agreed credits.

use super::{ApiResult, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::http::auth::Staff;
use tally::http::text::MAX_TEXT_CHARS;
use tally::http::{ApiJson, ApiPath, Problem, ProblemDetails, idempotency, idempotency_key};
use tally::ids::{InvoiceId, WorkspaceId};
use tally::money::{Cents, Credits};
use utoipa::ToSchema;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomPaymentBody {
    /// The agreed amount, integer cents: 50 (Stripe's smallest charge in USD) to
    /// 99,999,999 (the most Stripe charges at once).
    #[schema(minimum = 50, maximum = 99_999_999)]
    pub amount_cents: u64,
    /// Credits granted when the invoice is paid: 1 to 10,000,000.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub credits: u64,
    /// Printed on the invoice.
    #[schema(schema_with = tally::http::text::text_schema)]
    pub description: String,
    /// 1-90, default 30.
    #[schema(minimum = 1, maximum = 90)]
    pub days_until_due: Option<u32>,
}

/// The `{workspace_id}` of an admin route.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspacePath {
    /// A workspace id: letters, digits, `-`, `_`, `.` and `:`, starting with a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    pub workspace_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CustomPaymentView {
    pub invoice: InvoiceId,
    pub hosted_invoice_url: String,
    pub credits: u64,
}

/// Largest custom payment: $999,999.99, the most Stripe takes in one charge (eight digits).
pub const MAX_CUSTOM_PAYMENT_CENTS: u64 = 99_999_999;
/// Stripe's minimum charge in USD.
pub const MIN_CUSTOM_PAYMENT_CENTS: u64 = 50;

#[utoipa::path(post, path = "/v1/admin/workspaces/{workspace_id}/custom-payments", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath,
        ("Idempotency-Key" = String, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Required: one invoice per key")),
    request_body = CustomPaymentBody,
    responses((status = 201, body = CustomPaymentView), (status = 403, body = ProblemDetails),
        (status = 404, description = "The workspace has no Stripe customer (a mistyped id, or no checkout yet)", body = ProblemDetails),
        (status = 422, body = ProblemDetails),
        (status = 502, description = "The payment provider refused the request", body = ProblemDetails)))]
/// Support staff bill an agreed amount for agreed credits: Stripe sends the invoice, and the
/// credits are granted when it is paid.
pub async fn custom_payment(
    State(st): State<PurchasesState>,
    // Who may bill is decided before the request is read.
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CustomPaymentBody>,
) -> ApiResult<(StatusCode, Json<CustomPaymentView>)> {
    let workspace = WorkspaceId::parse(&workspace_id)
        .map_err(|e| Problem::validation("workspace_id", &e.to_string()))?;
    let key = idempotency_key(&headers, "custom-payment")?
        .ok_or_else(|| Problem::validation("Idempotency-Key", "required for custom payments"))?;
    // Below Stripe's smallest charge an invoice is not collected: Stripe carries the amount
    // to the customer's next invoice, and the credits would come before the money.
    if !(MIN_CUSTOM_PAYMENT_CENTS..=MAX_CUSTOM_PAYMENT_CENTS).contains(&body.amount_cents) {
        return Err(Problem::validation(
            "amount_cents",
            &format!("must be between {MIN_CUSTOM_PAYMENT_CENTS} and {MAX_CUSTOM_PAYMENT_CENTS}"),
        ));
    }
    if body.credits == 0 || body.credits > tally::money::MAX_CREDITS_PER_REQUEST {
        return Err(Problem::validation(
            "credits",
            &format!(
                "must be between 1 and {}",
                tally::money::MAX_CREDITS_PER_REQUEST
            ),
        ));
    }
    let description =
        tally::http::text::one_line("description", &body.description, MAX_TEXT_CHARS)?;
    let days = body.days_until_due.unwrap_or(30);
    if !(1..=90).contains(&days) {
        return Err(Problem::validation(
            "days_until_due",
            "must be between 1 and 90",
        ));
    }
    // The Stripe customer its owner's checkout made: Stripe sends an invoice only to a
    // customer with an email, and a mistyped id must not make a customer (or a billing
    // profile) of its own.
    let customer = tally::store::docs::get::<tally::billing::records::BillingProfile>(
        st.docs.as_ref(),
        &tally::billing::records::workspace_pk(&workspace),
        tally::billing::records::PROFILE_SK,
    )
    .await?
    .and_then(|p| p.customer)
    .ok_or_else(|| {
        Problem::not_found(format!(
            "workspace {workspace} has no Stripe customer: check the id (a workspace is billed \
             once its owner has opened a checkout, which gives Stripe the email to send the \
             invoice to)"
        ))
    })?;
    let now = st.ledger.clock.now();
    let once = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        Some(&key),
        &body,
        now,
        || async {
            let customer = customer.clone();
            let link = st
                .payments
                .create_custom_invoice(&tally::payments::CustomInvoice {
                    staff: who.sub.clone(),
                    workspace: workspace.clone(),
                    customer,
                    amount: Cents::new(body.amount_cents),
                    credits: Credits::new(body.credits),
                    description: description.to_owned(),
                    days_until_due: days,
                    idempotency_key: format!("tally-custom-{workspace}-{}", key.as_str()),
                })
                .await
                .map_err(provider)?;
            tracing::info!(workspace = %workspace, invoice = %link.id, admin = %who.sub, "custom payment invoice sent");
            Ok(CustomPaymentView {
                invoice: link.id,
                hosted_invoice_url: link.hosted_invoice_url,
                credits: body.credits,
            })
        },
    );
    // The key names this request whatever workspace it names.
    let view = idempotency::under_staff_key(
        st.docs.as_ref(),
        "custom-payment",
        &key,
        &(&workspace, &body),
        now,
        once,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}
