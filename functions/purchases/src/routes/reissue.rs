//! `POST /v1/admin/invoices/{id}/reissue`: support staff reissue a paid invoice with
//! corrected billing details (past invoices cannot be modified).

use super::{ApiResult, provider};
use crate::PurchasesState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::records::*;
use tally::http::auth::Staff;
use tally::http::text::MAX_TEXT_CHARS;
use tally::http::{ApiJson, ApiPath, Problem, ProblemDetails, idempotency, idempotency_key};
use tally::ids::InvoiceId;
use tally::payments::{Address, BillingDetails, Reissue};
use tally::store::docs;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReissueBody {
    /// The name to print on the invoice.
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub name: Option<String>,
    /// The billing email.
    #[schema(pattern = "^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\\.[A-Za-z0-9-]{1,63}){1,8}$")]
    pub email: Option<String>,
    pub address: Option<Address>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReissueView {
    /// The invoice replaced.
    pub original: InvoiceId,
    /// The corrected invoice, paid by the original payment.
    pub replacement: InvoiceId,
    pub hosted_invoice_url: String,
    /// The credit note settling the original (no money moves).
    pub credit_note: String,
}

/// The `{id}` of an invoice.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct InvoicePath {
    /// An invoice id (`in_...`).
    #[param(pattern = "^in_[A-Za-z0-9]{1,100}$")]
    pub id: String,
}

fn text(field: &str, value: &Option<String>, max: usize) -> ApiResult<Option<String>> {
    value
        .as_deref()
        .map(|t| tally::http::text::one_line(field, t, max).map(str::to_owned))
        .transpose()
}

/// Checks what is printed on an invoice: one line of visible text each, a plausible email
/// and a two-letter country.
fn details(body: &ReissueBody) -> ApiResult<BillingDetails> {
    let name = text("name", &body.name, MAX_TEXT_CHARS)?;
    let email = body.email.clone();
    if let Some(e) = &email {
        let label = |l: &str| {
            (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let ok = e.split_once('@').is_some_and(|(local, domain)| {
            (1..=64).contains(&local.len())
                && local
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._%+-".contains(&b))
                && (2..=9).contains(&domain.split('.').count())
                && domain.split('.').all(label)
        });
        if !ok {
            return Err(Problem::validation("email", "must be an email address"));
        }
    }
    let address = match &body.address {
        None => None,
        Some(a) => {
            let country = a.country.as_str();
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(Problem::validation(
                    "address.country",
                    "must be a two-letter country code, such as DE",
                ));
            }
            let line1 = tally::http::text::one_line("address.line1", &a.line1, MAX_TEXT_CHARS)?;
            Some(Address {
                line1: line1.to_owned(),
                line2: text("address.line2", &a.line2, MAX_TEXT_CHARS)?,
                city: text("address.city", &a.city, MAX_TEXT_CHARS)?,
                postal_code: text("address.postal_code", &a.postal_code, MAX_TEXT_CHARS)?,
                state: text("address.state", &a.state, MAX_TEXT_CHARS)?,
                country: country.to_owned(),
            })
        }
    };
    // Nothing to correct is a reissue of the same details (a lost or spoiled copy).
    Ok(BillingDetails {
        name,
        email,
        address,
    })
}

#[utoipa::path(post, path = "/v1/admin/invoices/{id}/reissue", tag = "admin",
    security(("bearer" = [])), params(InvoicePath,
        ("Idempotency-Key" = String, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Required: one reissue per key")),
    request_body = ReissueBody,
    responses((status = 201, body = ReissueView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, description = "Not a paid invoice, already reissued, or refunded, credited or disputed", body = ProblemDetails),
        (status = 422, body = ProblemDetails), (status = 502, body = ProblemDetails), (status = 503, body = ProblemDetails)))]
/// Support staff reissue a paid invoice with corrected billing details: the customer's
/// details are corrected, the original gets a credit note settled outside Stripe (no money
/// moves) and a corrected replacement is issued, marked paid by the original payment. Never
/// a second charge; credits are untouched; both invoices stay in the billing history.
pub async fn reissue(
    State(st): State<PurchasesState>,
    Staff(who): Staff,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReissueBody>,
) -> ApiResult<(StatusCode, Json<ReissueView>)> {
    let invoice = InvoiceId::parse(&id)
        .ok()
        .filter(|_| id.starts_with("in_"))
        .ok_or_else(|| Problem::validation("id", "not an invoice id"))?;
    let key = idempotency_key(&headers, "invoice-reissue")?
        .ok_or_else(|| Problem::validation("Idempotency-Key", "required for reissues"))?;
    let details = details(&body)?;
    let link = docs::get::<InvoiceLink>(st.docs.as_ref(), &invoice_link_pk(&invoice), LINK_SK)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no invoice {invoice}")))?;
    let workspace = link.workspace;
    let record = docs::get::<InvoiceRecord>(
        st.docs.as_ref(),
        &workspace_pk(&workspace),
        &invoice_sk(link.created, &invoice),
    )
    .await?
    .ok_or_else(|| Problem::not_found(format!("no invoice {invoice}")))?;
    if record.status != "paid" {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_reissuable",
            format!(
                "invoice {invoice} is {}; only paid invoices are reissued",
                record.status
            ),
        ));
    }
    let customer =
        docs::get::<BillingProfile>(st.docs.as_ref(), &workspace_pk(&workspace), PROFILE_SK)
            .await?
            .and_then(|p| p.customer)
            .ok_or_else(|| Problem::not_found(format!("no Stripe customer for {workspace}")))?;
    let now = st.ledger.clock.now();
    let fingerprint = (&invoice, &body);
    let view = idempotency::once(
        st.docs.as_ref(),
        &workspace,
        Some(&key),
        &fingerprint,
        now,
        || async {
            // A repeat of this very reissue answered above; another one is refused.
            let entry =
                tally::billing::history::get(st.docs.as_ref(), &workspace, invoice.as_str())
                    .await?;
            if let Some(by) = entry.as_ref().and_then(|e| e.replaced_by.clone()) {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "not_reissuable",
                    format!("invoice {invoice} was already reissued as {by}; reissue {by} instead"),
                ));
            }
            // The replacement is marked paid with all the original was paid: money that
            // went back (refunded, credited, or contested in a dispute) would show as paid.
            if let Some(why) =
                tally::billing::refunds::money_gone_back(st.docs.as_ref(), &invoice).await?
            {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "not_reissuable",
                    format!(
                        "the payment of invoice {invoice} was partly {why}: its replacement would show that money as paid; correct it by hand"
                    ),
                ));
            }
            let made = st
                .payments
                .reissue_invoice(&Reissue {
                    staff: who.sub.clone(),
                    workspace: workspace.clone(),
                    customer,
                    invoice: invoice.clone(),
                    details,
                    idempotency_key: format!("tally-reissue-{invoice}-{}", key.as_str()),
                })
                .await
                .map_err(provider)?;
            tracing::info!(invoice = %invoice, replacement = %made.replacement.id, staff = %who.sub, "invoice reissued");
            Ok(ReissueView {
                original: invoice.clone(),
                replacement: made.replacement.id,
                hosted_invoice_url: made.replacement.hosted_invoice_url,
                credit_note: made.credit_note,
            })
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> ReissueBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn what_is_printed_on_an_invoice_is_checked() {
        let ok = details(&body(serde_json::json!({"name": "Acme GmbH",
            "address": {"line1": "Hauptstr. 1", "city": "Berlin", "country": "DE"}})))
        .unwrap();
        assert_eq!(ok.address.unwrap().country, "DE");
        assert!(
            details(&body(serde_json::json!({}))).is_ok(),
            "a plain reissue"
        );
        for bad in [
            serde_json::json!({"name": "Acme\u{0000}"}),
            serde_json::json!({"email": "not-an-email"}),
            serde_json::json!({"email": "a b@c.de"}),
            serde_json::json!({"address": {"line1": "x", "country": "Germany"}}),
            serde_json::json!({"address": {"line1": "", "country": "DE"}}),
        ] {
            assert!(details(&body(bad.clone())).is_err(), "{bad}");
        }
    }
}
