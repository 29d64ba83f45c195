//! The support API's handlers with their request and response bodies.

use crate::SupportState;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use tally::http::auth::Staff;
use tally::http::text::{MAX_TEXT_CHARS, one_line, paragraphs};
use tally::http::{
    ApiJson, ApiPath, ApiQuery, Identity, Problem, ProblemDetails, idempotency, idempotency_key,
};
use tally::ids::GenerationId;
use tally::support::enrich::{Subject, assess};
use tally::support::{
    self as support, Author, Captured, Category, ClientInfo, Priority, Ticket, TicketMessage,
    TicketStatus, TicketSummary, limits,
};
use utoipa::{IntoParams, ToSchema};

type ApiResult<T> = Result<T, Problem>;

fn message_schema() -> utoipa::openapi::Object {
    tally::http::text::paragraphs_schema(support::MAX_MESSAGE_CHARS)
}
fn subject_schema() -> utoipa::openapi::Object {
    let mut s = tally::http::text::text_schema();
    s.max_length = Some(support::MAX_SUBJECT_CHARS);
    s
}

/// What the browser knows about itself.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientBody {
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub user_agent: Option<String>,
    pub ad_blocker: Option<bool>,
    pub vpn: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTicketBody {
    pub category: Category,
    #[schema(schema_with = subject_schema)]
    pub subject: String,
    /// What happened, in the customer's words (line breaks kept; never rendered as HTML).
    #[schema(schema_with = message_schema)]
    pub message: String,
    /// The generation the question is about.
    #[schema(pattern = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub generation_id: Option<String>,
    /// The payment the question is about: a charge (`ch_`), payment intent (`pi_`) or
    /// invoice (`in_`) from the billing history.
    #[schema(pattern = "^(ch|pi|in)_[A-Za-z0-9]{1,100}$")]
    pub payment: Option<String>,
    /// The page or route the customer was on.
    #[schema(schema_with = tally::http::text::optional_text_schema)]
    pub route: Option<String>,
    pub client: Option<ClientBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TicketView {
    #[serde(flatten)]
    pub ticket: Ticket,
    /// Oldest first.
    pub thread: Vec<TicketMessage>,
}

/// The request id API Gateway gave this request, or the caller's `X-Request-Id`, or a new
/// one.
fn request_id(headers: &HeaderMap, extensions: &axum::http::Extensions) -> String {
    use lambda_http::request::RequestContext;
    if let Some(RequestContext::ApiGatewayV2(ctx)) = extensions.get::<RequestContext>()
        && let Some(id) = &ctx.request_id
    {
        return id.clone();
    }
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 100
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", ulid_like()))
}

fn ulid_like() -> String {
    support::new_id().trim_start_matches("tkt_").to_owned()
}

fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.chars()
                .filter(|c| !tally::http::text::is_forbidden(*c))
                .take(MAX_TEXT_CHARS)
                .collect::<String>()
        })
        .filter(|v| !v.trim().is_empty())
}

fn optional_line(field: &str, v: Option<&str>) -> ApiResult<Option<String>> {
    v.map(|v| one_line(field, v, MAX_TEXT_CHARS).map(str::to_owned))
        .transpose()
}

/// A ticket's messages as the API shows them (without the fingerprints of their keys).
async fn shown_thread(st: &SupportState, id: &str) -> ApiResult<Vec<TicketMessage>> {
    let mut all = st.tickets.messages(id).await?;
    for m in &mut all {
        m.key = None;
    }
    Ok(all)
}

fn ticket_id(id: &str) -> ApiResult<&str> {
    if support::valid_id(id) {
        Ok(id)
    } else {
        Err(Problem::validation("id", "not a ticket id"))
    }
}

#[utoipa::path(post, path = "/v1/support/tickets", tag = "support", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$",
        description = "The same key files the same ticket once")),
    request_body = NewTicketBody,
    responses((status = 201, body = TicketView),
        (status = 403, body = ProblemDetails), (status = 404, description = "No such generation or payment in this workspace", body = ProblemDetails),
        (status = 409, body = ProblemDetails), (status = 422, body = ProblemDetails),
        (status = 429, description = "Too many tickets from this user", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Files a ticket. Tally records the time (UTC), the user and email, the workspace, its
/// plan and support level, the request id and the user agent; looks up what its records
/// say about the question; gives back what it can be certain about (credits of a failed
/// generation, a verified duplicate charge); and forwards the ticket to the help desk.
pub async fn create(
    State(st): State<SupportState>,
    tally::http::auth::WorkspaceMember { who, workspace }: tally::http::auth::WorkspaceMember,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    ApiJson(body): ApiJson<NewTicketBody>,
) -> ApiResult<(StatusCode, Json<TicketView>)> {
    let req_id = request_id(&headers, &extensions);
    let key = idempotency_key(&headers, "support-ticket")?;
    let subject = one_line("subject", &body.subject, support::MAX_SUBJECT_CHARS)?.to_owned();
    let message = paragraphs("message", &body.message, support::MAX_MESSAGE_CHARS)?;
    let route = optional_line("route", body.route.as_deref())?;
    let client = body
        .client
        .as_ref()
        .map_or(Ok(ClientInfo::default()), |c| {
            Ok::<_, Problem>(ClientInfo {
                user_agent: optional_line("client.user_agent", c.user_agent.as_deref())?,
                ad_blocker: c.ad_blocker,
                vpn: c.vpn,
            })
        })?;
    let generation = body
        .generation_id
        .as_deref()
        .map(|g| {
            GenerationId::parse(g).map_err(|e| Problem::validation("generation_id", &e.to_string()))
        })
        .transpose()?;
    let payment = body.payment.as_deref().map(str::trim).map(str::to_owned);
    if payment.is_some() && !who.can_manage_billing() {
        return Err(Problem::forbidden(
            "only the workspace owner or a billing admin can ask about a payment",
        ));
    }
    if let Some(p) = &payment {
        let ok = p.len() <= 103
            && ["ch_", "pi_", "in_"].iter().any(|x| p.starts_with(x))
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(Problem::validation(
                "payment",
                "must be a charge (ch_), payment intent (pi_) or invoice (in_) id",
            ));
        }
    }
    let now = st.clock.now();
    let id = match &key {
        Some(k) => support::id_for_key(&workspace, &who.sub, k.as_str()),
        None => support::new_id(),
    };
    let print = (&body, &who.sub);
    let request = tally::service::fingerprint(&print);
    let view = idempotency::once(
        st.tickets.docs.as_ref(),
        &workspace,
        key.as_ref(),
        &print,
        now,
        || async {
            if let Some(existing) = st.tickets.get(&id).await? {
                // A retry of a filing that stopped after the ticket was stored.
                if existing.request != request {
                    return Err(Problem::conflict(
                        "this Idempotency-Key was already used for a different ticket",
                    ));
                }
                let t = st.tickets.catch_up(existing, st.clock.now()).await?;
                let thread = shown_thread(&st, &t.id).await?;
                return Ok(TicketView {
                    ticket: t.shown(),
                    thread,
                });
            }
            // What the ticket names must be this workspace's before it counts against the
            // limit: a refused ticket files nothing.
            if let Some(p) = &payment
                && let Some(r) = &st.context.refunds
                && r.movement(&workspace, p).await?.is_none()
            {
                return Err(Problem::not_found(format!(
                    "no payment {p} in this workspace's billing history"
                )));
            }
            if let Some(g) = generation
                && st
                    .context
                    .ledger
                    .store
                    .generation(&workspace, g)
                    .await?
                    .is_none()
            {
                return Err(Problem::not_found(format!(
                    "no generation {g} in this workspace"
                )));
            }
            limits::take(
                st.tickets.docs.as_ref(),
                "tickets",
                &who.sub,
                limits::TICKETS,
                now,
            )
            .await?;
            let text = format!("{subject}\n{message}");
            let found = assess(
                &st.context,
                &Subject {
                    ticket: &id,
                    workspace: &workspace,
                    user: &who.sub,
                    can_manage_billing: who.can_manage_billing(),
                    category: body.category,
                    generation,
                    payment: payment.as_deref(),
                    text: &text,
                    now,
                },
            )
            .await?;
            let plan = found.enrichment.plan.clone();
            let support_level = found.support_level.clone();
            let priority = Priority::of_support_level(support_level.as_deref())
                .max(found.escalate_to.unwrap_or(Priority::Low));
            let ticket = Ticket {
                id: id.clone(),
                workspace: workspace.clone(),
                category: body.category,
                subject: subject.clone(),
                status: if found.remediations.is_empty() {
                    TicketStatus::Open
                } else {
                    // Fixed by itself: staff confirm, the customer is told at once.
                    TicketStatus::Waiting
                },
                priority,
                generation,
                payment: payment.clone(),
                route: route.clone(),
                client: client.clone(),
                captured: Captured {
                    at: now,
                    user: who.sub.clone(),
                    email: who.email.clone(),
                    plan,
                    support_level,
                    request_id: req_id.clone(),
                    user_agent: user_agent(&headers),
                },
                enrichment: found.enrichment,
                remediations: found.remediations,
                messages: 1,
                created_at: now,
                updated_at: now,
                respond_by: Some(tally::support::respond_by(now)),
                changes: 1,
                forwarded: false,
                last_event: "ticket.created".into(),
                last_seq: 1,
                last_message: 1,
                forwarded_messages: 0,
                request: request.clone(),
                adding: None,
            };
            let first = TicketMessage {
                seq: 1,
                at: now,
                author: Author::Customer,
                by: who.sub.clone(),
                body: message.clone(),
                key: None,
            };
            let t = st.tickets.file(ticket, first).await?;
            let thread = shown_thread(&st, &t.id).await?;
            Ok(TicketView {
                ticket: t.shown(),
                thread,
            })
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Staff only: only tickets in this status.
    #[param(inline)]
    pub status: Option<TicketStatus>,
    /// Staff only: only tickets of this priority.
    #[param(inline)]
    pub priority: Option<Priority>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{13}#tkt_[A-Za-z0-9]{26}$")]
    pub cursor: Option<String>,
    /// 1-100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TicketPage {
    pub items: Vec<TicketSummary>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/support/tickets", tag = "support", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, body = TicketPage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Tickets, newest first: a member sees the tickets they filed, owners and billing admins
/// the workspace's; support staff see every workspace's (the read is audited) and filter
/// by status and priority.
pub async fn list(
    State(st): State<SupportState>,
    // Who may ask is decided before the query is read.
    tally::http::auth::StaffOrMember(who): tally::http::auth::StaffOrMember,
    uri: axum::http::Uri,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<TicketPage>> {
    let limit = tally::http::page_limit(q.limit, 20)?;
    let staff = who.has_scope(tally::http::auth::SCOPE_ADMIN);
    let workspace = if staff {
        None
    } else {
        Some(who.member_workspace()?.clone())
    };
    // Members see the tickets they filed; owners and billing admins, the workspace's.
    let author = (!staff && !who.can_manage_billing()).then_some(who.sub.as_str());
    let (items, next_cursor) = st
        .tickets
        .list(
            workspace.as_ref(),
            author,
            q.status,
            q.priority,
            q.cursor.as_deref(),
            limit,
        )
        .await?;
    if staff {
        // Recorded once the answer is ready: an invalid query records nothing.
        tally::audit::record_global(
            st.tickets.docs.as_ref(),
            st.clock.now(),
            &tally::audit::Reader::from(&who),
            "GET /v1/support/tickets",
            uri.query().unwrap_or(""),
        )
        .await?;
    }
    Ok(Json(TicketPage { items, next_cursor }))
}

/// The `{id}` of a ticket.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TicketPath {
    /// A ticket id (`tkt_...`).
    #[param(pattern = "^tkt_[A-Za-z0-9]{26}$")]
    pub id: String,
}

/// The ticket `id` as `who` may see it: their workspace's, or any for staff (recorded in
/// the audit log).
async fn visible(st: &SupportState, who: &Identity, id: &str, action: &str) -> ApiResult<Ticket> {
    let id = ticket_id(id)?;
    if who.has_scope(tally::http::auth::SCOPE_ADMIN) {
        let t = st
            .tickets
            .get(id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no ticket {id}")))?;
        tally::audit::record(
            st.tickets.docs.as_ref(),
            st.clock.now(),
            &tally::audit::Reader::from(who),
            &t.workspace,
            action,
            id,
        )
        .await?;
        return Ok(t);
    }
    let workspace = who.member_workspace()?;
    let t = st.tickets.get_in(workspace, id).await?;
    // Members see the tickets they filed; owners and billing admins, the workspace's.
    if !who.can_manage_billing() && t.captured.user != who.sub {
        return Err(Problem::not_found(format!(
            "no ticket {id} in this workspace"
        )));
    }
    Ok(t)
}

#[utoipa::path(get, path = "/v1/support/tickets/{id}", tag = "support", security(("bearer" = [])),
    params(TicketPath),
    responses((status = 200, body = TicketView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// A ticket with its messages and what Tally found and fixed.
pub async fn get_one(
    State(st): State<SupportState>,
    who: Identity,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TicketView>> {
    let t = visible(&st, &who, &id, "GET /v1/support/tickets/{id}").await?;
    let t = st.tickets.catch_up(t, st.clock.now()).await?;
    let thread = shown_thread(&st, &t.id).await?;
    Ok(Json(TicketView {
        ticket: t.shown(),
        thread,
    }))
}

/// The ticket after a message was added, and the message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageAdded {
    pub ticket: Ticket,
    pub message: TicketMessage,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    #[schema(schema_with = message_schema)]
    pub message: String,
}

#[utoipa::path(post, path = "/v1/support/tickets/{id}/messages", tag = "support", security(("bearer" = [])),
    params(TicketPath, ("Idempotency-Key" = Option<String>, Header, pattern = "^[A-Za-z0-9_.:-]{1,200}$",
        description = "The same key adds the message once")),
    request_body = MessageBody,
    responses((status = 201, body = MessageAdded), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 409, body = ProblemDetails),
        (status = 422, body = ProblemDetails), (status = 429, body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Adds a message: the customer's reopens the ticket, staff's sets it waiting for the
/// customer.
pub async fn add_message(
    State(st): State<SupportState>,
    tally::http::auth::StaffOrMember(who): tally::http::auth::StaffOrMember,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<MessageBody>,
) -> ApiResult<(StatusCode, Json<MessageAdded>)> {
    let staff = who.has_scope(tally::http::auth::SCOPE_ADMIN);
    let key = idempotency_key(&headers, "support-message")?;
    let text = paragraphs("message", &body.message, support::MAX_MESSAGE_CHARS)?;
    let t = visible(&st, &who, &id, "POST /v1/support/tickets/{id}/messages").await?;
    let now = st.clock.now();
    let fingerprint = key
        .as_ref()
        .map(|k| tally::service::fingerprint(&(&who.sub, k.as_str())));
    // Only a new message of a customer counts against the limit (support staff answer as
    // often as they need to); a retry of one already added does not.
    let free = staff
        || match &fingerprint {
            Some(f) => st
                .tickets
                .messages(&t.id)
                .await?
                .iter()
                .any(|m| m.key.as_ref() == Some(f)),
            None => false,
        };
    if !free {
        limits::take(
            st.tickets.docs.as_ref(),
            "messages",
            &who.sub,
            limits::MESSAGES,
            now,
        )
        .await?;
    }
    let author = if staff {
        Author::Staff
    } else {
        Author::Customer
    };
    let added = st
        .tickets
        .add_message(
            &t,
            author,
            &who.sub,
            &text,
            key.as_ref().map(|k| k.as_str()),
            now,
        )
        .await;
    let (ticket, message) = match added {
        Ok(added) => added,
        // Refused (a full ticket, a key used for another message or still being used):
        // nothing was added, so nothing counts.
        Err(p) if !free && p.status == StatusCode::CONFLICT => {
            limits::give_back(
                st.tickets.docs.as_ref(),
                "messages",
                &who.sub,
                limits::MESSAGES,
                now,
            )
            .await?;
            return Err(p);
        }
        Err(p) => return Err(p),
    };
    let message = TicketMessage {
        key: None,
        ..message
    };
    Ok((
        StatusCode::CREATED,
        Json(MessageAdded {
            ticket: ticket.shown(),
            message,
        }),
    ))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    pub status: TicketStatus,
}

#[utoipa::path(post, path = "/v1/admin/support/tickets/{id}/status", tag = "admin", security(("bearer" = [])),
    params(TicketPath), request_body = StatusBody,
    responses((status = 200, body = TicketView), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// Support staff: sets a ticket open, waiting (for the customer) or solved.
pub async fn set_status(
    State(st): State<SupportState>,
    Staff(who): Staff,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<StatusBody>,
) -> ApiResult<Json<TicketView>> {
    let t = visible(&st, &who, &id, "POST /v1/admin/support/tickets/{id}/status").await?;
    let ticket = st
        .tickets
        .set_status(&t, body.status, st.clock.now())
        .await?;
    let thread = shown_thread(&st, &ticket.id).await?;
    Ok(Json(TicketView {
        ticket: ticket.shown(),
        thread,
    }))
}

/// The `{workspace_id}` of an admin route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspacePath {
    /// A workspace id: letters, digits, `-`, `_`, `.` and `:`, starting with a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    pub workspace_id: String,
}

#[utoipa::path(get, path = "/v1/admin/workspaces/{workspace_id}/support/tickets", tag = "admin",
    security(("bearer" = [])), params(WorkspacePath, ListQuery),
    responses((status = 200, body = TicketPage), (status = 403, body = ProblemDetails),
        (status = 404, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Support staff: a workspace's tickets, newest first (recorded in the audit log).
pub async fn admin_list(
    State(st): State<SupportState>,
    Staff(who): Staff,
    uri: axum::http::Uri,
    ApiPath(workspace_id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<TicketPage>> {
    let limit = tally::http::page_limit(q.limit, 20)?;
    let staff = tally::audit::staff_read(
        st.tickets.docs.as_ref(),
        st.context.ledger.store.as_ref(),
        st.clock.now(),
        &who,
        &workspace_id,
        "GET /v1/admin/workspaces/{workspace_id}/support/tickets",
        uri.query().unwrap_or(""),
    )
    .await?;
    let page = st
        .tickets
        .list(
            Some(&staff.workspace),
            None,
            q.status,
            q.priority,
            q.cursor.as_deref(),
            limit,
        )
        .await;
    // Recorded once the answer is ready: an invalid query records nothing.
    let (items, next_cursor) = staff.answered(st.tickets.docs.as_ref(), page).await?;
    Ok(Json(TicketPage { items, next_cursor }))
}
