//! The refunds API's handlers with their request and response bodies.

use crate::RefundsState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tally::billing::history;
use tally::http::auth::Staff;
use tally::http::text::MAX_TEXT_CHARS;
use tally::http::{
    ApiJson, ApiPath, ApiQuery, Identity, Problem, ProblemDetails, idempotency, idempotency_key,
};
use tally::ids::WorkspaceId;
use tally::money::{Cents, Credits};
use tally::refund_requests::{self as rr, NewRequest, RefundReason, RefundRequest};
use utoipa::{IntoParams, ToSchema};

type ApiResult<T> = Result<T, Problem>;

/// Largest amount staff may approve at once: $1,000,000.
pub const MAX_REFUND_CENTS: u64 = 100_000_000;

// Owners and billing admins ask for refunds; members are refused.
use tally::http::auth::billing_workspace as requester;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequestBody {
    /// The payment from the billing history: a charge (`ch_`), payment intent (`pi_`) or
    /// invoice (`in_`) id.
    #[schema(pattern = "^(ch|pi|in)_[A-Za-z0-9]{1,100}$")]
    pub payment: String,
    pub reason: RefundReason,
    /// What happened, in the customer's words.
    #[schema(schema_with = tally::http::text::text_schema)]
    pub details: String,
}

/// A refund request with what its refund took back.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RefundRequestView {
    #[serde(flatten)]
    pub request: RefundRequest,
    /// Credits the refund took back (the unspent part of what the money bought), once
    /// Stripe reported it.
    pub credits_taken_back: Option<Credits>,
    /// Credits the refunded money bought, and the part of them already spent (not taken
    /// back), once Stripe reported the refund.
    pub credits_bought: Option<Credits>,
    pub credits_already_spent: Option<Credits>,
}

async fn view(st: &RefundsState, mut request: RefundRequest) -> ApiResult<RefundRequestView> {
    // Bookkeeping of the notices, not the customer's.
    request.failure_told = None;
    let credits_taken_back = match &request.refund {
        Some(r) => history::get(st.requests.docs.as_ref(), &request.workspace, r.as_str())
            .await?
            .map(|e| {
                e.taken_back
                    .values()
                    .fold(Credits::ZERO, |a, c| a.checked_add(*c).unwrap_or(a))
            }),
        None => None,
    };
    // What the refunded money bought: its share of the purchase's credits.
    let credits_bought = match credits_taken_back {
        Some(_) => history::get(
            st.requests.docs.as_ref(),
            &request.workspace,
            &request.movement,
        )
        .await?
        .filter(|e| e.amount > Cents::ZERO)
        .map(|e| {
            let granted = e
                .granted
                .values()
                .fold(Credits::ZERO, |a, c| a.checked_add(*c).unwrap_or(a));
            tally::ledger::Share {
                numerator: request.amount.get().min(e.amount.get()),
                denominator: e.amount.get(),
            }
            .of(granted)
        }),
        None => None,
    };
    let credits_already_spent = match (credits_bought, credits_taken_back) {
        (Some(b), Some(t)) => Some(Credits::new(b.get().saturating_sub(t.get()))),
        _ => None,
    };
    Ok(RefundRequestView {
        request,
        credits_taken_back,
        credits_bought,
        credits_already_spent,
    })
}

#[utoipa::path(post, path = "/v1/refund-requests", tag = "refunds", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$",
        description = "The same key makes the same request")),
    request_body = RefundRequestBody,
    responses((status = 201, body = RefundRequestView),
        (status = 403, body = ProblemDetails), (status = 404, description = "No such payment in this workspace's billing history", body = ProblemDetails),
        (status = 409, description = "Not refundable (add-ons, already refunded, disputed) or a request for it is open", body = ProblemDetails),
        (status = 422, body = ProblemDetails), (status = 503, body = ProblemDetails)))]
/// Asks for a payment back. Duplicate charges and renewals charged after a cancellation
/// took effect are verified from the records and approved at once; other reasons wait for
/// support staff. Add-on charges are non-refundable.
pub async fn create(
    State(st): State<RefundsState>,
    tally::http::auth::BillingManager { who, workspace }: tally::http::auth::BillingManager,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RefundRequestBody>,
) -> ApiResult<(StatusCode, Json<RefundRequestView>)> {
    let key = idempotency_key(&headers, "refund-request")?;
    let details = tally::http::text::one_line("details", &body.details, MAX_TEXT_CHARS)?;
    let payment = body.payment.trim();
    if payment.len() > 103
        || !payment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Problem::validation(
            "payment",
            "must be a charge (ch_), payment intent (pi_) or invoice (in_) id",
        ));
    }
    let now = st.clock.now();
    let id = key.as_ref().map(|k| rr::id_for_key(&workspace, k.as_str()));
    let fingerprint = (&body, &who.sub);
    let answer = idempotency::once(
        st.requests.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &fingerprint,
        now,
        || async {
            let r = st
                .requests
                .create(
                    &workspace,
                    NewRequest {
                        payment: payment.to_owned(),
                        reason: body.reason,
                        details: details.to_owned(),
                        requested_by: who.sub.clone(),
                        id,
                    },
                    now,
                )
                .await?;
            view(&st, r).await
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `next_cursor` of the previous page.
    #[param(pattern = "^rr_[A-Za-z0-9]{1,37}$")]
    pub cursor: Option<String>,
    /// 1-100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RefundRequestPage {
    pub items: Vec<RefundRequestView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

async fn page(
    st: &RefundsState,
    workspace: &WorkspaceId,
    q: ListQuery,
) -> ApiResult<Json<RefundRequestPage>> {
    let limit = match q.limit {
        None => 20,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(_) => return Err(Problem::validation("limit", "must be between 1 and 100")),
    };
    if let Some(c) = &q.cursor
        && !rr::valid_id(c)
    {
        return Err(Problem::validation("cursor", "unknown cursor"));
    }
    let (items, next_cursor) = st
        .requests
        .list(workspace, q.cursor.as_deref(), limit)
        .await?;
    let mut views = Vec::with_capacity(items.len());
    for r in items {
        views.push(view(st, r).await?);
    }
    Ok(Json(RefundRequestPage {
        items: views,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/refund-requests", tag = "refunds", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, body = RefundRequestPage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// The workspace's refund requests, newest first.
pub async fn list(
    State(st): State<RefundsState>,
    // Who may ask is decided before the query is read: a member gets 403 whatever it says.
    manager: tally::http::auth::BillingManager,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<RefundRequestPage>> {
    page(&st, &manager.workspace, q).await
}

/// The `{id}` of a refund request.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RequestPath {
    /// A refund request id (`rr_...`).
    #[param(pattern = "^rr_[A-Za-z0-9]{1,37}$")]
    pub id: String,
}

fn request_id(id: &str) -> ApiResult<&str> {
    if rr::valid_id(id) {
        Ok(id)
    } else {
        Err(Problem::validation("id", "not a refund request id"))
    }
}

#[utoipa::path(get, path = "/v1/refund-requests/{id}", tag = "refunds", security(("bearer" = [])),
    params(RequestPath),
    responses((status = 200, body = RefundRequestView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// One refund request of the workspace, with every step it went through (UTC).
pub async fn get_one(
    State(st): State<RefundsState>,
    who: Identity,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<RefundRequestView>> {
    let workspace = requester(&who)?;
    let id = request_id(&id)?;
    let r = st
        .requests
        .get(&workspace, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no refund request {id}")))?;
    Ok(Json(view(&st, r).await?))
}

#[utoipa::path(get, path = "/v1/admin/refund-requests/{id}", tag = "admin", security(("bearer" = [])),
    params(RequestPath),
    responses((status = 200, body = RefundRequestView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: any refund request.
pub async fn admin_get(
    State(st): State<RefundsState>,
    Staff(staff): Staff,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<RefundRequestView>> {
    let id = request_id(&id)?;
    let r = st
        .requests
        .find(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no refund request {id}")))?;
    tally::audit::record(
        st.requests.docs.as_ref(),
        st.clock.now(),
        &tally::audit::Reader::from(&staff),
        &r.workspace,
        "GET /v1/admin/refund-requests/{id}",
        id,
    )
    .await?;
    Ok(Json(view(&st, r).await?))
}

/// The `{workspace_id}` of an admin route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspacePath {
    /// A workspace id: letters, digits, `-`, `_`, `.` and `:`, starting with a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    pub workspace_id: String,
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/refund-requests", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, ListQuery),
    responses((status = 200, body = RefundRequestPage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's refund requests, newest first.
pub async fn admin_list(
    State(st): State<RefundsState>,
    Staff(who): Staff,
    ApiPath(workspace_id): ApiPath<String>,
    uri: axum::http::Uri,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<RefundRequestPage>> {
    let staff = tally::audit::staff_read(
        st.requests.docs.as_ref(),
        st.requests.ledger.store.as_ref(),
        st.clock.now(),
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/refund-requests",
        uri.query().unwrap_or(""),
    )
    .await?;
    // Recorded once the answer is ready: an invalid query records nothing.
    let answer = page(&st, &staff.workspace, q).await;
    staff.answered(st.requests.docs.as_ref(), answer).await
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// Why; kept on the request.
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub note: Option<String>,
    /// Integer cents to refund: 1 to what is refundable (default: all of it).
    #[schema(minimum = 1, maximum = 100_000_000)]
    pub amount_cents: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    /// Why; kept on the request.
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub note: Option<String>,
}

fn note(n: Option<&str>) -> ApiResult<Option<String>> {
    n.map(|t| tally::http::text::one_line("note", t, MAX_TEXT_CHARS).map(str::to_owned))
        .transpose()
}

#[utoipa::path(post, path = "/v1/admin/refund-requests/{id}/approve", tag = "admin",
    security(("bearer" = [])), params(RequestPath,
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first answer; another body is a 409")),
    request_body = ApproveBody,
    responses((status = 200, body = RefundRequestView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, description = "Already decided, or the payment is disputed", body = ProblemDetails),
        (status = 422, description = "More than is refundable", body = ProblemDetails), (status = 503, body = ProblemDetails)))]
/// Support staff approve a request in review, or approve again one whose refund failed.
/// The refund never exceeds what is left of the payment. Approving twice is harmless;
/// approving an approved request for another amount is a 409.
pub async fn approve(
    State(st): State<RefundsState>,
    Staff(who): Staff,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ApproveBody>,
) -> ApiResult<Json<RefundRequestView>> {
    let key = idempotency_key(&headers, "refund-approve")?;
    let id = request_id(&id)?;
    let note = note(body.note.as_deref())?;
    let amount = match body.amount_cents {
        None => None,
        Some(c) if (1..=MAX_REFUND_CENTS).contains(&c) => Some(Cents::new(c)),
        Some(_) => {
            return Err(Problem::validation(
                "amount_cents",
                &format!("must be between 1 and {MAX_REFUND_CENTS}"),
            ));
        }
    };
    let now = st.clock.now();
    decide_once(&st, id, key, &body, || async {
        st.requests.approve(id, &who.sub, note, amount, now).await
    })
    .await
}

/// A staff decision on refund request `id`, made once per `Idempotency-Key` (remembered
/// in the request's workspace: the request decided, never an empty answer); the answer is
/// the request as it is now (a replay after its refund failed shows that, rather than the
/// decision as it was).
async fn decide_once<F, Fut>(
    st: &RefundsState,
    id: &str,
    key: Option<tally::ids::IdempotencyKey>,
    body: &impl Serialize,
    decide: F,
) -> ApiResult<Json<RefundRequestView>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<RefundRequest, Problem>>,
{
    let workspace = found(st, id).await?.workspace;
    idempotency::once(
        st.requests.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &(id, body),
        st.clock.now(),
        || async { Ok(decide().await?.id) },
    )
    .await?;
    Ok(Json(view(st, found(st, id).await?).await?))
}

/// The refund request a staff decision names (404 when there is none).
async fn found(st: &RefundsState, id: &str) -> ApiResult<RefundRequest> {
    st.requests
        .find(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no refund request {id}")))
}

#[utoipa::path(post, path = "/v1/admin/refund-requests/{id}/deny", tag = "admin",
    security(("bearer" = [])), params(RequestPath,
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$", description = "Retries with the same key (and body) return the first answer; another body is a 409")),
    request_body = DenyBody,
    responses((status = 200, body = RefundRequestView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, description = "Already approved", body = ProblemDetails),
        (status = 422, body = ProblemDetails)))]
/// Support staff decline a request in review.
pub async fn deny(
    State(st): State<RefundsState>,
    Staff(who): Staff,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<DenyBody>,
) -> ApiResult<Json<RefundRequestView>> {
    let key = idempotency_key(&headers, "refund-deny")?;
    let id = request_id(&id)?;
    let note = note(body.note.as_deref())?;
    let now = st.clock.now();
    decide_once(&st, id, key, &body, || async {
        st.requests.deny(id, &who.sub, note, now).await
    })
    .await
}
