//! Refund requests: a customer asks for a payment of their billing history back; Tally
//! checks the request against its own records, approves what it can verify (a duplicate
//! charge, a renewal charged after cancellation) and leaves the rest to support staff; the
//! refunds worker then makes the refund through Stripe, once per approval.
//!
//! Documents (all small and bounded):
//! - the request, under its workspace (`REFUND_REQUEST#<id>`, ids sort by creation time),
//!   with its steps (at most [`MAX_STEPS`]);
//! - where a request lives (`REFUND_REQUEST#<id>` / `LINK`), for staff routes by id;
//! - the payment's claims (`CHARGE#<charge>` / `REFUND_CLAIMS`): the requests made for it
//!   (at most [`MAX_REQUESTS_PER_PAYMENT`]) and the cents each claims, written under a
//!   version guard, so concurrent requests can never claim more than is refundable.
//!
//! Credits do not move here: when Stripe reports the refund, the billing events take back
//! the unspent part of what the money bought (see [`crate::billing::refunds`]).

pub mod rules;
pub mod worker;

pub use rules::{Cancellation, RefundReason, Verdict};

use crate::billing::history::{HistoryEntry, MovementKind};
use crate::billing::records::{PAYMENT_SK, PaymentRecord, charge_pk, workspace_pk};
use crate::billing::refunds::{LINK_SK, PaymentLink, payment_pk};
use crate::http::Problem;
use crate::ids::{ChargeId, InvoiceId, PaymentIntentId, RefundId, WorkspaceId};
use crate::money::Cents;
use crate::queue::{Message, Queue};
use crate::store::docs::{self, DocStore};
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// Name (suffix, in AWS after the stack name) of the FIFO queue of approved refunds.
pub const REFUNDS_QUEUE: &str = "refunds.fifo";
/// Deliveries of one refund before it moves to the dead-letter queue.
pub const REFUNDS_MAX_RECEIVES: u32 = 5;
/// Requests one payment may have over its life.
pub const MAX_REQUESTS_PER_PAYMENT: usize = 10;
/// Steps one request may record (approvals after failures included).
pub const MAX_STEPS: usize = 24;
/// Longest `details` text.
pub const MAX_DETAILS_CHARS: usize = 2000;

const REQUEST_PREFIX: &str = "REFUND_REQUEST#";
const CLAIMS_SK: &str = "REFUND_CLAIMS";

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Waiting for support staff.
    InReview,
    /// Approved; the refund is being made.
    Approved,
    /// Stripe accepted the refund; the money is on its way to the original payment method
    /// (5-10 business days).
    Pending,
    /// The money is back.
    Succeeded,
    /// Stripe refused or the refund failed; support staff may approve it again.
    Failed,
    /// Support staff declined it.
    Denied,
}

impl RequestStatus {
    /// Still open: no second request for the same payment meanwhile.
    pub fn is_open(self) -> bool {
        matches!(self, Self::InReview | Self::Approved | Self::Pending)
    }
}

/// One step of a request's life, in UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub at: DateTime<Utc>,
    pub status: RequestStatus,
    /// `customer:<user>`, `staff:<user>`, `tally` (verified from records), `stripe`.
    pub by: String,
    pub note: Option<String>,
}

/// A refund request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RefundRequest {
    /// `rr_...`
    pub id: String,
    pub workspace: WorkspaceId,
    /// The payment as the customer named it (a charge, payment intent or invoice id).
    pub payment: String,
    /// Its line in the billing history.
    pub movement: String,
    pub kind: MovementKind,
    pub charge: ChargeId,
    pub payment_intent: Option<PaymentIntentId>,
    pub invoice: Option<InvoiceId>,
    pub reason: RefundReason,
    pub details: String,
    pub requested_by: String,
    pub status: RequestStatus,
    /// Integer cents to refund once approved (until then, what could be refunded).
    pub amount: Cents,
    pub currency: String,
    /// Approvals so far (a failed refund may be approved again).
    pub attempt: u32,
    /// The Stripe refund, once made.
    pub refund: Option<RefundId>,
    /// Stripe's status of that refund.
    pub refund_status: Option<String>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub steps: Vec<Step>,
}

impl RefundRequest {
    fn step(&mut self, at: DateTime<Utc>, status: RequestStatus, by: &str, note: Option<String>) {
        self.status = status;
        self.updated = self.updated.max(at);
        if self.steps.len() < MAX_STEPS {
            self.steps.push(Step {
                at,
                status,
                by: by.to_owned(),
                note,
            });
        }
    }
}

/// Where a request lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestLink {
    workspace: WorkspaceId,
}

/// The requests made for one payment and the cents each claims.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub requests: Vec<Claim>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub request: String,
    /// Cents claimed: the approved amount while the refund is open or made; 0 otherwise.
    pub cents: Cents,
    pub open: bool,
    /// The Stripe refund made for it.
    pub refund: Option<RefundId>,
}

impl Claims {
    fn claimed(&self) -> Cents {
        Cents::new(self.requests.iter().map(|c| c.cents.get()).sum())
    }
    fn ours(&self, refund: &RefundId) -> bool {
        self.requests
            .iter()
            .any(|c| c.refund.as_ref() == Some(refund))
    }
}

/// What the refunds worker is asked to do: make the refund of one approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundJob {
    pub workspace: WorkspaceId,
    pub request: String,
    pub attempt: u32,
}

/// A new request, as the customer asks it.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub payment: String,
    pub reason: RefundReason,
    pub details: String,
    pub requested_by: String,
    /// Derived from the client's idempotency key, if it sent one: the same key makes the
    /// same request.
    pub id: Option<String>,
}

/// Refund requests over the document store, sending approved ones to the refunds queue.
#[derive(Clone)]
pub struct RefundRequests {
    pub docs: Arc<dyn DocStore>,
    pub queue: Arc<dyn Queue>,
    pub duplicate_window: Duration,
}

fn request_sk(id: &str) -> String {
    format!("{REQUEST_PREFIX}{id}")
}

/// A fresh request id; ids sort by creation time.
pub fn new_id() -> String {
    format!("rr_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// The request id a client's idempotency key stands for in a workspace.
pub fn id_for_key(workspace: &WorkspaceId, key: &str) -> String {
    let print = crate::service::fingerprint(&(workspace.as_str(), key));
    format!("rr_k{}", &print[..25])
}

/// Whether `id` is shaped like a request id.
pub fn valid_id(id: &str) -> bool {
    id.len() <= 40
        && id.starts_with("rr_")
        && id[3..].bytes().all(|b| b.is_ascii_alphanumeric())
        && id.len() > 3
}

fn not_refundable(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::CONFLICT, "not_refundable", detail)
}

impl RefundRequests {
    /// The billing-history line of a payment of `workspace`, by the id the customer gave:
    /// an invoice, a payment intent or a charge. Another workspace's payment is not found.
    pub async fn movement(
        &self,
        workspace: &WorkspaceId,
        payment: &str,
    ) -> Result<Option<HistoryEntry>, Problem> {
        let store = self.docs.as_ref();
        // Stripe's ids say what they name by their prefix alone.
        let bad = || {
            Problem::validation(
                "payment",
                "must be a charge (ch_), payment intent (pi_) or invoice (in_) id",
            )
        };
        let row = if payment.starts_with("ch_") || payment.starts_with("py_") {
            let charge = ChargeId::parse(payment).map_err(|_| bad())?;
            let Some(p) =
                docs::get::<PaymentRecord>(store, &charge_pk(&charge), PAYMENT_SK).await?
            else {
                return Ok(None);
            };
            if p.workspace.as_ref() != Some(workspace) {
                return Ok(None);
            }
            let Some(pi) = p.payment_intent else {
                return Ok(None);
            };
            let link = docs::get::<PaymentLink>(store, &payment_pk(&pi), LINK_SK).await?;
            match link.and_then(|l| l.invoice) {
                Some(i) => i.to_string(),
                None => pi.to_string(),
            }
        } else if payment.starts_with("pi_") {
            let pi = PaymentIntentId::parse(payment).map_err(|_| bad())?;
            let link = docs::get::<PaymentLink>(store, &payment_pk(&pi), LINK_SK).await?;
            match link.and_then(|l| l.invoice) {
                Some(i) => i.to_string(),
                None => pi.to_string(),
            }
        } else if payment.starts_with("in_") {
            InvoiceId::parse(payment).map_err(|_| bad())?.to_string()
        } else {
            return Err(bad());
        };
        Ok(crate::billing::history::get(store, workspace, &row).await?)
    }

    /// Cents of the charge refunded outside refund requests (the dashboard, disputes).
    async fn refunded_elsewhere(
        &self,
        charge: &ChargeId,
        claims: &Claims,
    ) -> Result<Cents, Problem> {
        let p =
            docs::get::<PaymentRecord>(self.docs.as_ref(), &charge_pk(charge), PAYMENT_SK).await?;
        Ok(Cents::new(p.map_or(0, |p| {
            p.refunds
                .iter()
                .filter(|r| r.rank() <= crate::billing::records::refund_rank(Some("succeeded")))
                .filter(|r| !claims.ours(&r.id))
                .map(|r| r.amount.get())
                .sum()
        })))
    }

    async fn open_dispute(&self, charge: &ChargeId) -> Result<bool, Problem> {
        let p =
            docs::get::<PaymentRecord>(self.docs.as_ref(), &charge_pk(charge), PAYMENT_SK).await?;
        Ok(p.is_some_and(|p| !p.disputes.is_empty()))
    }

    /// Files a request: checks the payment, decides from the records, claims the amount
    /// (if verified) and sends the approval to the worker. The same id answers the same
    /// request.
    pub async fn create(
        &self,
        workspace: &WorkspaceId,
        req: NewRequest,
        now: DateTime<Utc>,
    ) -> Result<RefundRequest, Problem> {
        let id = req.id.clone().unwrap_or_else(new_id);
        if let Some(existing) = self.get(workspace, &id).await? {
            // A retry: finish what the first attempt may not have (the worker's message).
            if existing.status == RequestStatus::Approved {
                self.send(&existing).await?;
            }
            return Ok(existing);
        }
        let entry = self
            .movement(workspace, &req.payment)
            .await?
            .filter(|e| e.kind.is_some())
            .ok_or_else(|| {
                Problem::not_found(format!(
                    "no payment {} in this workspace's billing history",
                    req.payment
                ))
            })?;
        let kind = entry.kind.expect("filtered");
        if matches!(kind, MovementKind::Refund | MovementKind::Dispute) {
            return Err(Problem::validation(
                "payment",
                "name the payment itself, not a refund or dispute of it",
            ));
        }
        let charge = entry.charge.clone().ok_or_else(|| {
            not_refundable("this payment has not been collected: nothing to refund")
        })?;
        if self.open_dispute(&charge).await? {
            return Err(not_refundable(
                "this payment is disputed with the bank; the dispute decides where the money goes",
            ));
        }
        // The other payments around it, for duplicate charges.
        let around = crate::billing::history::around(
            self.docs.as_ref(),
            workspace,
            entry.created - self.duplicate_window,
            entry.created + Duration::seconds(1),
        )
        .await?;
        let cancellation = docs::get::<Cancellation>(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            rules::CANCELLATION_SK,
        )
        .await?;
        let verdict = rules::decide(
            req.reason,
            &entry,
            &around,
            cancellation.as_ref(),
            self.duplicate_window,
        );
        // Claim under the payment's version guard: concurrent requests cannot both pass.
        let claims_pk = charge_pk(&charge);
        let mut refused: Option<Problem> = None;
        let mut amount = Cents::ZERO;
        for _ in 0..8 {
            let doc = self.docs.get_doc(&claims_pk, CLAIMS_SK).await?;
            let (claims, version): (Claims, u64) = match &doc {
                Some(d) => (crate::store::decode(&d.body)?, d.version),
                None => (Claims::default(), 0),
            };
            if claims.requests.iter().any(|c| c.request == id) {
                break; // claimed by an earlier attempt of this request
            }
            if let Some(open) = claims.requests.iter().find(|c| c.open) {
                refused = Some(
                    Problem::new(
                        StatusCode::CONFLICT,
                        "already_requested",
                        format!(
                            "refund request {} for this payment is still open",
                            open.request
                        ),
                    )
                    .with_facts(serde_json::json!({"request": open.request})),
                );
                break;
            }
            if claims.requests.len() >= MAX_REQUESTS_PER_PAYMENT {
                refused = Some(not_refundable(
                    "this payment has had as many refund requests as one payment may; contact support",
                ));
                break;
            }
            let elsewhere = self.refunded_elsewhere(&charge, &claims).await?;
            amount = rules::refundable(&entry, elsewhere, claims.claimed());
            if amount == Cents::ZERO {
                refused = Some(
                    if entry.non_refundable > Cents::ZERO
                        && entry.non_refundable >= entry.amount.saturating_sub(elsewhere)
                    {
                        not_refundable(
                            "add-on charges are non-refundable, and nothing else of this payment is left to refund",
                        )
                    } else {
                        not_refundable(
                            "everything refundable of this payment was refunded or is claimed",
                        )
                    },
                );
                break;
            }
            let mut next = claims.clone();
            next.requests.push(Claim {
                request: id.clone(),
                cents: if matches!(verdict, Verdict::Approve(_)) {
                    amount
                } else {
                    Cents::ZERO
                },
                open: true,
                refund: None,
            });
            let body = serde_json::to_string(&next).map_err(|_| Problem::internal())?;
            if self
                .docs
                .put_doc(&claims_pk, CLAIMS_SK, &body, version)
                .await?
            {
                break;
            }
        }
        if let Some(p) = refused {
            return Err(p);
        }
        let by = format!("customer:{}", req.requested_by);
        let mut request = RefundRequest {
            id: id.clone(),
            workspace: workspace.clone(),
            payment: req.payment.clone(),
            movement: entry.id.clone(),
            kind,
            charge,
            payment_intent: entry.payment_intent.clone(),
            invoice: entry.invoice.clone(),
            reason: req.reason,
            details: req.details.clone(),
            requested_by: req.requested_by.clone(),
            status: RequestStatus::InReview,
            amount,
            currency: entry.currency.clone().unwrap_or_else(|| "usd".into()),
            attempt: 0,
            refund: None,
            refund_status: None,
            created: now,
            updated: now,
            steps: Vec::new(),
        };
        request.step(now, RequestStatus::InReview, &by, None);
        match &verdict {
            Verdict::Approve(why) => {
                request.attempt = 1;
                request.step(now, RequestStatus::Approved, "tally", Some(why.clone()));
            }
            Verdict::Review(why) => {
                if let Some(s) = request.steps.last_mut() {
                    s.note = Some(why.clone());
                }
            }
        }
        docs::update(
            self.docs.as_ref(),
            &request_sk(&id),
            LINK_SK,
            |cur: Option<RequestLink>| {
                cur.is_none().then(|| RequestLink {
                    workspace: workspace.clone(),
                })
            },
        )
        .await?;
        let stored = docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &request_sk(&id),
            |cur: Option<RefundRequest>| cur.is_none().then(|| request.clone()),
        )
        .await?
        .unwrap_or(request);
        tracing::info!(workspace = %workspace, request = %id, status = ?stored.status, "refund request filed");
        if stored.status == RequestStatus::Approved {
            self.send(&stored).await?;
        }
        Ok(stored)
    }

    async fn send(&self, r: &RefundRequest) -> Result<(), Problem> {
        let job = RefundJob {
            workspace: r.workspace.clone(),
            request: r.id.clone(),
            attempt: r.attempt,
        };
        self.queue
            .send(Message {
                body: serde_json::to_string(&job).map_err(|_| Problem::internal())?,
                group_id: Some(r.id.clone()),
                dedup_id: Some(format!("{}-{}", r.id, r.attempt)),
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, request = %r.id, "refund not queued");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "the refund could not be queued yet; retry with the same Idempotency-Key",
                )
            })
    }

    pub async fn get(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> Result<Option<RefundRequest>, Problem> {
        Ok(docs::get(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &request_sk(id),
        )
        .await?)
    }

    /// A request by id alone (staff), with its workspace.
    pub async fn find(&self, id: &str) -> Result<Option<RefundRequest>, Problem> {
        let Some(link) =
            docs::get::<RequestLink>(self.docs.as_ref(), &request_sk(id), LINK_SK).await?
        else {
            return Ok(None);
        };
        self.get(&link.workspace, id).await
    }

    /// The workspace's requests, newest first, a page at a time.
    pub async fn list(
        &self,
        workspace: &WorkspaceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<RefundRequest>, Option<String>), Problem> {
        let before = before.map(request_sk);
        let mut page: Vec<(String, RefundRequest)> = docs::page(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            REQUEST_PREFIX,
            before.as_deref(),
            limit + 1,
        )
        .await?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|(_, r)| r.id.clone())
        } else {
            None
        };
        Ok((page.into_iter().map(|(_, r)| r).collect(), next))
    }

    /// Staff approve a request in review (or approve again one whose refund failed), for
    /// `amount` cents or everything refundable.
    pub async fn approve(
        &self,
        id: &str,
        staff: &str,
        note: Option<String>,
        amount: Option<Cents>,
        now: DateTime<Utc>,
    ) -> Result<RefundRequest, Problem> {
        let r = self
            .find(id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no refund request {id}")))?;
        match r.status {
            RequestStatus::InReview | RequestStatus::Failed => {}
            RequestStatus::Approved => {
                // Approved already (perhaps its message was lost): send it again.
                self.send(&r).await?;
                return Ok(r);
            }
            s => {
                return Err(Problem::conflict(format!(
                    "refund request {id} is {} and cannot be approved",
                    serde_json::to_value(s)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("closed")
                )));
            }
        }
        if r.steps.len() + 2 > MAX_STEPS {
            return Err(Problem::conflict(format!(
                "refund request {id} has been retried as often as one request may; file a new one"
            )));
        }
        let entry = crate::billing::history::get(self.docs.as_ref(), &r.workspace, &r.movement)
            .await?
            .ok_or_else(Problem::internal)?;
        // Claim the approved amount under the payment's version guard.
        let claims_pk = charge_pk(&r.charge);
        let mut granted = None;
        for _ in 0..8 {
            let doc = self.docs.get_doc(&claims_pk, CLAIMS_SK).await?;
            let (claims, version): (Claims, u64) = match &doc {
                Some(d) => (crate::store::decode(&d.body)?, d.version),
                None => (Claims::default(), 0),
            };
            let mut others = claims.clone();
            others.requests.retain(|c| c.request != id);
            let elsewhere = self.refunded_elsewhere(&r.charge, &claims).await?;
            let left = rules::refundable(&entry, elsewhere, others.claimed());
            let want = amount.unwrap_or(left);
            if want == Cents::ZERO || want > left {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation_failed",
                    format!(
                        "amount: at most {} cents of this payment can be refunded",
                        left.get()
                    ),
                )
                .with_facts(serde_json::json!({"refundable": left.get()})));
            }
            let mut next = others;
            next.requests.push(Claim {
                request: id.to_owned(),
                cents: want,
                open: true,
                refund: None,
            });
            let body = serde_json::to_string(&next).map_err(|_| Problem::internal())?;
            if self
                .docs
                .put_doc(&claims_pk, CLAIMS_SK, &body, version)
                .await?
            {
                granted = Some(want);
                break;
            }
        }
        let want = granted.ok_or_else(|| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the payment kept changing; retry",
            )
        })?;
        let by = format!("staff:{staff}");
        let updated = docs::update(
            self.docs.as_ref(),
            &workspace_pk(&r.workspace),
            &request_sk(id),
            |cur: Option<RefundRequest>| {
                let mut cur = cur?;
                if !matches!(cur.status, RequestStatus::InReview | RequestStatus::Failed) {
                    return None;
                }
                cur.amount = want;
                cur.attempt += 1;
                cur.refund = None;
                cur.refund_status = None;
                cur.step(now, RequestStatus::Approved, &by, note.clone());
                Some(cur)
            },
        )
        .await?
        .ok_or_else(Problem::internal)?;
        tracing::info!(request = %id, staff = %staff, cents = want.get(), "refund request approved");
        if updated.status == RequestStatus::Approved {
            self.send(&updated).await?;
        }
        Ok(updated)
    }

    /// Staff decline a request in review (or one whose refund failed).
    pub async fn deny(
        &self,
        id: &str,
        staff: &str,
        note: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<RefundRequest, Problem> {
        let r = self
            .find(id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no refund request {id}")))?;
        if r.status == RequestStatus::Denied {
            return Ok(r);
        }
        if !matches!(r.status, RequestStatus::InReview | RequestStatus::Failed) {
            return Err(Problem::conflict(format!(
                "refund request {id} is already approved; it cannot be denied"
            )));
        }
        let by = format!("staff:{staff}");
        let updated = docs::update(
            self.docs.as_ref(),
            &workspace_pk(&r.workspace),
            &request_sk(id),
            |cur: Option<RefundRequest>| {
                let mut cur = cur?;
                if !matches!(cur.status, RequestStatus::InReview | RequestStatus::Failed) {
                    return None;
                }
                cur.step(now, RequestStatus::Denied, &by, note.clone());
                Some(cur)
            },
        )
        .await?
        .ok_or_else(|| {
            Problem::conflict(format!("refund request {id} changed meanwhile; retry"))
        })?;
        release(self.docs.as_ref(), &r.charge, id, None).await?;
        Ok(updated)
    }
}

/// Frees a request's claim (denied, or its refund failed): its cents are refundable again.
async fn release(
    store: &dyn DocStore,
    charge: &ChargeId,
    request: &str,
    refund: Option<&RefundId>,
) -> Result<(), crate::store::StoreError> {
    docs::update(
        store,
        &charge_pk(charge),
        CLAIMS_SK,
        |cur: Option<Claims>| {
            let mut c = cur?;
            let claim = c.requests.iter_mut().find(|x| x.request == request)?;
            if !claim.open && claim.cents == Cents::ZERO {
                return None;
            }
            claim.open = false;
            claim.cents = Cents::ZERO;
            if let Some(r) = refund {
                claim.refund = Some(r.clone());
            }
            Some(c)
        },
    )
    .await?;
    Ok(())
}

/// Records the Stripe refund made for a request's claim (the claim stays: the money went).
async fn made(
    store: &dyn DocStore,
    charge: &ChargeId,
    request: &str,
    refund: &RefundId,
    closed: bool,
) -> Result<(), crate::store::StoreError> {
    docs::update(
        store,
        &charge_pk(charge),
        CLAIMS_SK,
        |cur: Option<Claims>| {
            let mut c = cur?;
            let claim = c.requests.iter_mut().find(|x| x.request == request)?;
            if claim.refund.as_ref() == Some(refund) && claim.open != closed {
                return None;
            }
            claim.refund = Some(refund.clone());
            claim.open = !closed;
            Some(c)
        },
    )
    .await?;
    Ok(())
}

/// A Stripe refund's status on the request that asked for it (the billing events call
/// this for refunds whose metadata names a request). Statuses only move forward: pending,
/// succeeded, then possibly failed.
pub async fn stripe_refund_status(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    request: &str,
    attempt: u32,
    refund: &RefundId,
    status: &str,
    at: DateTime<Utc>,
) -> Result<Option<RefundRequest>, crate::store::StoreError> {
    use crate::billing::records::refund_rank;
    let next = match status {
        "succeeded" => RequestStatus::Succeeded,
        "failed" | "canceled" => RequestStatus::Failed,
        _ => RequestStatus::Pending,
    };
    let updated = docs::update(
        store,
        &workspace_pk(workspace),
        &request_sk(request),
        |cur: Option<RefundRequest>| {
            let mut cur = cur?;
            // Only this request's current refund; an older attempt's news is history.
            if cur.attempt != attempt || cur.refund.as_ref().is_some_and(|r| r != refund) {
                return None;
            }
            if !matches!(
                cur.status,
                RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded
            ) {
                return None;
            }
            if refund_rank(cur.refund_status.as_deref()) >= refund_rank(Some(status)) {
                return None;
            }
            cur.refund = Some(refund.clone());
            cur.refund_status = Some(status.to_owned());
            let note = match next {
                RequestStatus::Failed => Some(format!("Stripe reported refund {refund} {status}")),
                _ => None,
            };
            cur.step(at, next, "stripe", note);
            Some(cur)
        },
    )
    .await?;
    if let Some(r) = &updated {
        match r.status {
            RequestStatus::Failed => release(store, &r.charge, request, Some(refund)).await?,
            RequestStatus::Succeeded => made(store, &r.charge, request, refund, true).await?,
            _ => made(store, &r.charge, request, refund, false).await?,
        }
    }
    Ok(updated)
}
