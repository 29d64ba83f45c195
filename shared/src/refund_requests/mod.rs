//! Refund requests: a customer asks for a payment of their billing history back; Tally
//! checks the request against its own records, approves what it can verify (a duplicate
//! charge, a renewal charged after cancellation) and leaves the rest to support staff; the
//! refunds worker then makes the refund through Stripe, once per approval.
//!
//! Documents (all small and bounded):
//! - the request, under its workspace (`REFUND_REQUEST#<id>`, ids sort by creation time),
//!   with its steps (at most [`MAX_STEPS`], and a denial after them);
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
use crate::money::{Cents, Credits};
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
    /// When the worker first asked Stripe for this approval's refund.
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
    /// Credits taken back when the refund was approved (they stay taken back if the refund
    /// fails: a new lot given back could never be taken again by a later refund of the same
    /// payment, so giving them back is a person's decision, an adjustment).
    #[serde(default)]
    pub credits_held: Credits,
    /// The last approval whose failure the customer was told of (`refund.failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub failure_told: Option<u32>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub steps: Vec<Step>,
}

impl RefundRequest {
    /// Whether the current approval is the rules' (made because the credits the payment
    /// bought were unused), not staff's, who decide knowing what was used.
    fn approved_as_unused(&self) -> bool {
        self.status == RequestStatus::Approved
            && self
                .steps
                .iter()
                .rev()
                .find(|s| s.status == RequestStatus::Approved)
                .is_some_and(|s| s.by == "tally")
    }

    fn step(&mut self, at: DateTime<Utc>, status: RequestStatus, by: &str, note: Option<String>) {
        self.status = status;
        self.updated = self.updated.max(at);
        // A denial ends the request: who denied it and why are kept even when retries
        // have used up the steps (one step more, once).
        let room = if status == RequestStatus::Denied {
            MAX_STEPS + 1
        } else {
            MAX_STEPS
        };
        if self.steps.len() < room {
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

/// The requests made for one payment, each with its state: the money side of every
/// request's life. Every transition of every request of a payment is one versioned write
/// of this document, so they are serialized: two staff decisions, a decision and a Stripe
/// event, or two requests can never both pass on a stale view. The request documents are
/// projections of it (with the steps for people) and follow it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub requests: Vec<Claim>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub request: String,
    /// Approvals so far.
    #[serde(default)]
    pub attempt: u32,
    pub status: RequestStatus,
    /// Cents claimed: the approved amount while its refund is open or made; 0 otherwise.
    pub cents: Cents,
    /// The Stripe refund made for it.
    pub refund: Option<RefundId>,
}

impl RequestStatus {
    /// Order within one approval: a status only moves up.
    fn rank(self) -> u8 {
        match self {
            Self::InReview => 0,
            Self::Approved => 1,
            Self::Pending => 2,
            Self::Succeeded => 3,
            Self::Failed => 4,
            Self::Denied => 5,
        }
    }
}

/// See [`RefundRequests::claim_moved_on`].
pub(crate) async fn claim_moved_on(
    store: &dyn DocStore,
    r: &RefundRequest,
) -> Result<Option<Claim>, crate::store::StoreError> {
    let claims: Claims = docs::get(store, &charge_pk(&r.charge), CLAIMS_SK)
        .await?
        .unwrap_or_default();
    Ok(claims.get(&r.id).cloned().filter(|c| {
        c.attempt != r.attempt
            || !matches!(
                c.status,
                RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded
            )
    }))
}

/// What an approval takes credits back from (see `take_back_basis`).
struct Basis {
    /// (lot, credits it started with, whether it is of add-on units)
    lots: Vec<(u64, Credits, bool)>,
    pi: crate::ids::PaymentIntentId,
    refunded: u64,
    paid: u64,
    credited: u64,
    /// Which money of the payment each lot follows.
    pools: crate::billing::refunds::Pools,
}

impl Claim {
    fn order(&self) -> (u32, u8) {
        (self.attempt, self.status.rank())
    }
    /// Cents this claim holds: approved, being made or made.
    fn holds(&self) -> Cents {
        match self.status {
            RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded => {
                self.cents
            }
            _ => Cents::ZERO,
        }
    }
}

impl Claims {
    fn claimed_except(&self, request: &str) -> Cents {
        Cents::new(
            self.requests
                .iter()
                .filter(|c| c.request != request)
                .map(|c| c.holds().get())
                .sum(),
        )
    }
    /// Whether a refund was made for one of these requests' current approvals: linked to
    /// its claim, or named by its metadata (before Stripe's event about it has reached the
    /// claim). A refund of an earlier approval is not the claim's, so it counts as refunded
    /// elsewhere while it is live.
    fn ours(&self, refund: &crate::billing::records::RefundFact) -> bool {
        self.requests.iter().any(|c| {
            c.refund.as_ref() == Some(&refund.id)
                || (refund.request.as_ref() == Some(&c.request)
                    && refund.attempt == Some(c.attempt))
        })
    }
    fn get(&self, request: &str) -> Option<&Claim> {
        self.requests.iter().find(|c| c.request == request)
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
    /// The ledger: whether a payment's credits are still unused, and taking them back
    /// when a refund is approved.
    pub ledger: crate::service::Ledger,
    pub queue: Arc<dyn Queue>,
    pub duplicate_window: Duration,
}

/// How long an approval may wait for the worker before asking again queues it again.
pub const STUCK_AFTER_MINUTES: i64 = 5;

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

/// Cents of a payment refunded outside refund requests (the dashboard, disputes): its
/// refunds made or on their way that no claim made.
fn elsewhere(payment: &PaymentRecord, claims: &Claims) -> Cents {
    Cents::new(
        payment
            .refunds
            .iter()
            .filter(|r| r.rank() <= crate::billing::records::refund_rank(Some("succeeded")))
            .filter(|r| !claims.ours(r))
            .map(|r| r.amount.get())
            .sum(),
    )
}

/// Refunds that failed or were canceled: Stripe gave their money back to the balance.
fn failed_refunds(payment: &PaymentRecord) -> Cents {
    Cents::new(
        payment
            .refunds
            .iter()
            .filter(|r| r.rank() > crate::billing::records::refund_rank(Some("succeeded")))
            .map(|r| r.amount.get())
            .sum(),
    )
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
    /// Refunds made outside requests, and refunds that failed or were canceled (whose
    /// money came back).
    async fn refunded_elsewhere(
        &self,
        charge: &ChargeId,
        claims: &Claims,
    ) -> Result<(Cents, Cents), Problem> {
        refunded_elsewhere(self.docs.as_ref(), charge, claims).await
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
        let mut id = req.id.clone().unwrap_or_else(new_id);
        if let Some(existing) = self.get(workspace, &id).await? {
            // The same key for another payment or reason is refused, whatever became of the
            // first. (Its details may differ: support intake files one request per payment
            // for every ticket that finds the duplicate, each ticket in its own words.)
            if (&existing.payment, existing.reason) != (&req.payment, req.reason) {
                return Err(Problem::conflict(
                    "this Idempotency-Key was already used for a different request",
                ));
            }
            // A retry: finish what the first attempt may not have (the worker's message).
            if existing.status == RequestStatus::Approved
                && let Some(demoted) = self.send(&existing, now).await?
            {
                return Ok(demoted);
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
        if disputed(self.docs.as_ref(), &charge).await? {
            return Err(not_refundable(DISPUTED));
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
        // The records confirm the charge as a mistake (a duplicate, a charge after the
        // cancellation took effect), whether or not it is approved at once (its credits used,
        // its twin disputed: staff decide): its add-ons are refundable with it.
        let mistaken = matches!(verdict, Verdict::Approve(_));
        let verdict = match verdict {
            Verdict::Approve(why) => {
                self.confirm_approval(workspace, &entry, &around, req.reason, why)
                    .await?
            }
            review => review,
        };
        // Claim under the payment's version guard: concurrent requests cannot both pass.
        let claims_pk = charge_pk(&charge);
        let approve = matches!(verdict, Verdict::Approve(_));
        let mut claimed = None;
        for _ in 0..8 {
            let doc = self.docs.get_doc(&claims_pk, CLAIMS_SK).await?;
            let (claims, version): (Claims, u64) = match &doc {
                Some(d) => (crate::store::decode(&d.body)?, d.version),
                None => (Claims::default(), 0),
            };
            if let Some(c) = claims.get(&id) {
                // Claimed by an earlier attempt of this very request.
                claimed = Some(c.clone());
                break;
            }
            if let Some(open) = claims.requests.iter().find(|c| c.status.is_open()) {
                // A request whose claim was written but whose own document was not (the
                // attempt failed in between, and this one came without its key): nobody
                // could see or decide it. This request takes it over, under its id.
                if self.orphaned(workspace, &open.request).await? {
                    tracing::warn!(workspace = %workspace, request = %open.request,
                        "refund request claimed but never written; taken over by a new attempt");
                    id = open.request.clone();
                    claimed = Some(open.clone());
                    break;
                }
                self.resend_if_stuck(workspace, &open.request, now).await;
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "already_requested",
                    format!(
                        "refund request {} for this payment is still open",
                        open.request
                    ),
                )
                .with_facts(serde_json::json!({"request": open.request})));
            }
            if claims.requests.len() >= MAX_REQUESTS_PER_PAYMENT {
                return Err(not_refundable(
                    "this payment has had as many refund requests as one payment may; contact support",
                ));
            }
            let (elsewhere, failed) = self.refunded_elsewhere(&charge, &claims).await?;
            // Add-ons come back only with a charge the records show should not have been
            // made (a verified duplicate, a charge after the cancellation took effect);
            // otherwise staff decide, and may approve them by naming the amount.
            let amount = rules::refundable(
                &entry,
                mistaken,
                elsewhere,
                claims.claimed_except(&id),
                failed,
            );
            if amount == Cents::ZERO {
                return Err(
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
            }
            let claim = Claim {
                request: id.clone(),
                attempt: u32::from(approve),
                status: if approve {
                    RequestStatus::Approved
                } else {
                    RequestStatus::InReview
                },
                cents: amount,
                refund: None,
            };
            let mut next = claims.clone();
            next.requests.push(claim.clone());
            let body = serde_json::to_string(&next).map_err(|_| Problem::internal())?;
            // Where the request lives, before its claim (a claim is never left that staff
            // cannot find), and only once the request passed every check: a refused one
            // writes nothing.
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
            if self
                .docs
                .put_doc(&claims_pk, CLAIMS_SK, &body, version)
                .await?
            {
                claimed = Some(claim);
                break;
            }
        }
        let claim = claimed.ok_or_else(busy)?;
        let amount = claim.cents;
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
            sent_at: None,
            credits_held: Credits::ZERO,
            failure_told: None,
            created: now,
            updated: now,
            steps: Vec::new(),
        };
        request.step(now, RequestStatus::InReview, &by, None);
        // The claim is the decision (a retry keeps what the first attempt decided).
        let why = match &verdict {
            Verdict::Approve(why) | Verdict::Review(why) => why.clone(),
        };
        if claim.status == RequestStatus::Approved {
            request.attempt = claim.attempt;
            let why = match &verdict {
                Verdict::Approve(_) => why,
                Verdict::Review(_) => "verified from the records when first filed".into(),
            };
            request.step(now, RequestStatus::Approved, "tally", Some(why));
        } else if let Some(s) = request.steps.last_mut() {
            s.note = Some(why);
        }
        let stored = docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &request_sk(&id),
            |cur: Option<RefundRequest>| cur.is_none().then(|| request.clone()),
        )
        .await?
        .unwrap_or(request);
        tracing::info!(workspace = %workspace, request = %id, status = ?stored.status, "refund request filed");
        if stored.status == RequestStatus::Approved
            && let Some(demoted) = self.send(&stored, now).await?
        {
            return Ok(demoted);
        }
        Ok(stored)
    }

    /// Whether `request` of `workspace` has a claim but no document: filed by an attempt that
    /// failed before writing it. (An attempt still running writes it within moments; taking
    /// it over then is harmless, as the document is only written if absent.)
    /// An approval whose refund was never queued (the queue failed, or the function
    /// stopped, after the approval was written) and that the worker has not seen for
    /// [`STUCK_AFTER_MINUTES`]: queued again, as asking again for the payment finds it.
    /// The worker takes a job twice as once (the refund's key is the attempt's).
    async fn resend_if_stuck(&self, workspace: &WorkspaceId, request: &str, now: DateTime<Utc>) {
        let Ok(Some(r)) = self.get(workspace, request).await else {
            return;
        };
        if r.status != RequestStatus::Approved
            || r.sent_at.is_some()
            || r.refund.is_some()
            || now - r.updated < Duration::minutes(STUCK_AFTER_MINUTES)
        {
            return;
        }
        // Staff may have given the money back meanwhile (a refund or a credit note made in
        // the dashboard): then it is theirs to decide, never sent a second time.
        match self.still_refundable(&r).await {
            Ok(left) if left >= r.amount => {}
            Ok(left) => {
                let why = format!(
                    "its refund never reached Stripe, and only {} of its {} cents are left to \
                     refund now; support staff decide",
                    left.get(),
                    r.amount.get()
                );
                if let Err(p) = self.demote(&r, why, now).await {
                    tracing::error!(request = %r.id, detail = %p.detail, "stuck approval not sent to staff");
                }
                return;
            }
            Err(p) => {
                tracing::error!(request = %r.id, detail = %p.detail, "stuck approval not checked");
                return;
            }
        }
        tracing::warn!(workspace = %workspace, request = %r.id, attempt = r.attempt,
            "approved refund never reached the worker; queued again");
        if let Err(p) = self.send(&r, now).await {
            tracing::error!(request = %r.id, detail = %p.detail, "approved refund still not queued");
        }
    }

    /// What of an approved request's payment may still be refunded for it, from the
    /// records as they stand now (refunds and credit notes made since included).
    async fn still_refundable(&self, r: &RefundRequest) -> Result<Cents, Problem> {
        still_refundable(self.docs.as_ref(), r).await
    }

    async fn orphaned(&self, workspace: &WorkspaceId, request: &str) -> Result<bool, Problem> {
        let link =
            docs::get::<RequestLink>(self.docs.as_ref(), &request_sk(request), LINK_SK).await?;
        Ok(link.is_some_and(|l| &l.workspace == workspace)
            && self.get(workspace, request).await?.is_none())
    }

    /// What the records say beyond the rule itself before money goes back without a person:
    /// top-ups are bought on purpose, again and again, so never automatic; the credits the
    /// payment bought must all be unused (a refund takes back only unused credits); and the
    /// first of a duplicate pair must be neither disputed nor being refunded.
    async fn confirm_approval(
        &self,
        workspace: &WorkspaceId,
        entry: &HistoryEntry,
        around: &[HistoryEntry],
        reason: RefundReason,
        why: String,
    ) -> Result<Verdict, Problem> {
        if entry.kind == Some(MovementKind::TopUp) {
            return Ok(Verdict::Review(
                "auto top-ups are bought on purpose; support staff decide".into(),
            ));
        }
        if reason == RefundReason::DuplicateCharge
            && let Some(first) = rules::duplicate_of(entry, around, self.duplicate_window)
            && let Some(first_charge) = &first.charge
        {
            let twin_disputed = disputed(self.docs.as_ref(), first_charge).await?;
            let claims: Claims = docs::get(self.docs.as_ref(), &charge_pk(first_charge), CLAIMS_SK)
                .await?
                .unwrap_or_default();
            if twin_disputed
                || claims
                    .requests
                    .iter()
                    .any(|c| c.status.is_open() || c.holds() > Cents::ZERO)
            {
                return Ok(Verdict::Review(format!(
                    "the first payment {} is disputed or being refunded; support staff decide",
                    first.id
                )));
            }
        }
        // Every lot the payment bought, whole.
        let lots: Vec<u64> = self
            .lots_of(entry)
            .await?
            .iter()
            .map(|(l, _, _)| *l)
            .collect();
        let state = self.ledger.store.load(workspace).await?;
        let unused = !lots.is_empty()
            && lots.iter().all(|seq| {
                state
                    .as_ref()
                    .and_then(|s| s.lots.iter().find(|l| l.seq == *seq))
                    .is_some_and(|l| {
                        l.remaining == l.original
                            && l.held == Credits::ZERO
                            && l.frozen == Credits::ZERO
                    })
            });
        if !unused {
            return Ok(Verdict::Review(format!(
                "{why}; some of the credits it bought were used, so support staff decide"
            )));
        }
        Ok(Verdict::Approve(why))
    }

    /// The lots a payment bought, with the credits each started with and whether it is of
    /// add-on units.
    async fn lots_of(&self, entry: &HistoryEntry) -> Result<Vec<(u64, Credits, bool)>, Problem> {
        let mut lots = Vec::new();
        if let Some(pi) = &entry.payment_intent
            && let Some(l) =
                docs::get::<PaymentLink>(self.docs.as_ref(), &payment_pk(pi), LINK_SK).await?
            && let Some(lot) = l.lot
        {
            lots.push((lot, l.credits, false));
        }
        if let Some(invoice) = &entry.invoice
            && let Some(l) = docs::get::<crate::billing::refunds::InvoiceLots>(
                self.docs.as_ref(),
                &crate::billing::refunds::invoice_lots_pk(invoice),
                LINK_SK,
            )
            .await?
        {
            for (key, seq, credits) in &l.lots {
                if !lots.iter().any(|(s, _, _)| s == seq) {
                    lots.push((*seq, *credits, crate::billing::refunds::is_addon_grant(key)));
                }
            }
        }
        Ok(lots)
    }

    /// The request's claim when it is no longer this approval, live (approved, being made
    /// or made at the request's attempt): sent to staff or decided since.
    pub(crate) async fn claim_moved_on(&self, r: &RefundRequest) -> Result<Option<Claim>, Problem> {
        claim_moved_on(self.docs.as_ref(), r)
            .await
            .map_err(Problem::from)
    }

    /// What an approval takes back from: the payment's lots, its payment intent, and the
    /// money back with the customer once this request's refund is made, of what was paid.
    /// `None` when nothing was paid or the payment is not known yet.
    async fn take_back_basis(&self, r: &RefundRequest) -> Result<Option<Basis>, Problem> {
        let Some(entry) =
            crate::billing::history::get(self.docs.as_ref(), &r.workspace, &r.movement).await?
        else {
            return Ok(None);
        };
        let Some(pi) = entry.payment_intent.clone() else {
            return Ok(None);
        };
        let Some(payment) =
            docs::get::<PaymentRecord>(self.docs.as_ref(), &charge_pk(&r.charge), PAYMENT_SK)
                .await?
        else {
            return Ok(None);
        };
        let paid = payment.amount.get();
        if paid == 0 {
            return Ok(None);
        }
        // Refunds made outside requests, and every request's approved or made refund, this
        // one's included. Stripe's `amount_refunded` may already count this very refund
        // (sent again after Stripe made it) or one that failed afterwards, so adding the
        // request to it would take the same money's credits twice.
        let claims: Claims = docs::get(self.docs.as_ref(), &charge_pk(&r.charge), CLAIMS_SK)
            .await?
            .unwrap_or_default();
        let requested: u64 = claims.requests.iter().map(|c| c.holds().get()).sum();
        // Credit notes that gave money back without a refund count as given back, as
        // when Stripe's refund event is followed (read where that reads them).
        let credited = match &entry.invoice {
            Some(invoice) => crate::billing::refunds::credited(self.docs.as_ref(), invoice).await?,
            None => 0,
        };
        let refunded = elsewhere(&payment, &claims)
            .get()
            .saturating_add(requested)
            .max(payment.amount_refunded.get())
            .saturating_add(credited)
            .min(paid);
        // As Stripe's events are followed: the invoice's add-on units go back last.
        let non_refundable = if entry.invoice.is_some() {
            entry.non_refundable.get()
        } else {
            0
        };
        Ok(Some(Basis {
            lots: self.lots_of(&entry).await?,
            pi,
            refunded,
            paid,
            credited,
            pools: crate::billing::refunds::Pools::new(paid, non_refundable),
        }))
    }

    /// What the credits earlier approvals of `r` took back (`credits_held`) are worth in
    /// its payment's money, rounded up: approving it again refunds at least that much.
    async fn taken_back_worth(&self, r: &RefundRequest) -> Result<Cents, Problem> {
        if r.credits_held == Credits::ZERO {
            return Ok(Cents::ZERO);
        }
        let Some(b) = self.take_back_basis(r).await? else {
            return Ok(Cents::ZERO);
        };
        // The least money given back whose take-back is at least those credits: the
        // take-back grows with the money, its add-on units' part last (see `Pools`).
        let bought_by = |money: u64| -> u128 {
            b.lots
                .iter()
                .map(|&(_, credits, addon)| {
                    let share = crate::ledger::Share {
                        numerator: b.pools.given_back(addon, money),
                        denominator: b.paid,
                    };
                    u128::from(share.of(credits).get())
                })
                .sum()
        };
        // This request's money comes after what was given back besides it (an approval
        // sent to staff or failed claims nothing, so the basis is the others'): its credits
        // are those that money bought (the add-on units' when the rest went back before).
        let base = b.refunded;
        let before = bought_by(base);
        let wanted = u128::from(r.credits_held.get());
        let room = b.paid - base.min(b.paid);
        if bought_by(b.paid) - before < wanted {
            return Ok(Cents::new(room));
        }
        let (mut low, mut high) = (0u64, room);
        while low < high {
            let mid = low + (high - low) / 2;
            if bought_by(base + mid) - before >= wanted {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        Ok(Cents::new(low))
    }

    /// Takes back, as the approval is sent, what the approved money bought and is unspent:
    /// the same ledger operation Stripe's refund event runs later (which then takes nothing
    /// twice), so the credits cannot be spent while the refund is on its way.
    /// Answers (taken, bought): the credits taken back, and what the money back bought of
    /// the payment's lots (the two are equal when none of them was used).
    async fn take_back_now(&self, r: &RefundRequest) -> Result<(Credits, Credits), Problem> {
        let Some(b) = self.take_back_basis(r).await? else {
            return Ok((Credits::ZERO, Credits::ZERO));
        };
        let mut held = Credits::ZERO;
        let mut bought = Credits::ZERO;
        for (lot, credits, addon) in b.lots {
            let share = crate::ledger::Share {
                numerator: b.pools.given_back(addon, b.refunded),
                denominator: b.paid,
            }
            .of(credits);
            bought = bought.checked_add(share).unwrap_or(bought);
            let req = crate::billing::refunds::take_back_request(
                &r.workspace,
                &r.charge,
                &b.pi,
                lot,
                credits,
                addon,
                b.pools,
                b.refunded,
                b.credited,
            );
            match self.ledger.execute(req).await {
                Ok(o) => held = held.checked_add(o.clawed_back).unwrap_or(held),
                Err(crate::service::ServiceError::KeyReused) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((held, bought))
    }

    /// An approval that rested on the credits being unused, whose credits were used before
    /// they could be taken back (a generation started in between): support staff decide
    /// instead, the request in review at the next attempt number. No refund was sent; the
    /// credits still unused were taken back and stay so until staff decide (approved, they
    /// are the refund's; denied, staff give them back as an adjustment).
    async fn demote(
        &self,
        r: &RefundRequest,
        why: String,
        now: DateTime<Utc>,
    ) -> Result<RefundRequest, Problem> {
        demote(self.docs.as_ref(), r, why, now).await
    }

    /// Takes the credits back and queues the refund. An approval the rules made because the
    /// credits were unused is sent to support staff instead when they no longer are: the
    /// request as it is then.
    async fn send(
        &self,
        r: &RefundRequest,
        now: DateTime<Utc>,
    ) -> Result<Option<RefundRequest>, Problem> {
        // The claim decides, not the request document, which follows it a step later: an
        // approval sent to staff since (its document not updated yet) is not sent.
        if let Some(moved) = self.claim_moved_on(r).await? {
            return Ok(Some(
                project(self.docs.as_ref(), &r.workspace, &moved, now, "tally", None)
                    .await?
                    .unwrap_or_else(|| r.clone()),
            ));
        }
        let (held, bought) = self.take_back_now(r).await?;
        if held > Credits::ZERO {
            docs::update(
                self.docs.as_ref(),
                &workspace_pk(&r.workspace),
                &request_sk(&r.id),
                |cur: Option<RefundRequest>| {
                    let mut cur = cur?;
                    let total = cur.credits_held.max(held);
                    (cur.attempt == r.attempt && total != cur.credits_held).then(|| {
                        cur.credits_held = total;
                        cur
                    })
                },
            )
            .await?;
        }
        // A credit of rounding per lot: a lot an earlier refund took nothing from (rounded
        // down) takes its share of what is left.
        let lots = self.take_back_basis(r).await?.map_or(0, |b| b.lots.len());
        let rounding = u64::try_from(lots).unwrap_or(u64::MAX);
        if r.approved_as_unused() && held.get().saturating_add(rounding) < bought.get() {
            let why = format!(
                "some of the credits it bought were used while it was being approved, so support \
                 staff decide; the {held} credits still unused were taken back"
            );
            return self.demote(r, why, now).await.map(Some);
        }
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
            .map(|()| None)
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
    /// `amount` cents or everything refundable. Approving an approved request sends it to
    /// the worker again and changes nothing else.
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
        if r.steps.len() + 2 > MAX_STEPS {
            return Err(Problem::conflict(format!(
                "refund request {id} has been retried as often as one request may; file a new one"
            )));
        }
        let entry = crate::billing::history::get(self.docs.as_ref(), &r.workspace, &r.movement)
            .await?
            .ok_or_else(Problem::internal)?;
        let mut refusal: Option<Problem> = None;
        let taken_worth = self.taken_back_worth(&r).await?;
        // The transition, under the payment's version guard.
        let claims_pk = charge_pk(&r.charge);
        let mut outcome = None;
        for _ in 0..8 {
            let doc = self.docs.get_doc(&claims_pk, CLAIMS_SK).await?;
            let (claims, version): (Claims, u64) = match &doc {
                Some(d) => (crate::store::decode(&d.body)?, d.version),
                None => (Claims::default(), 0),
            };
            let current = claims.get(id).cloned().unwrap_or(Claim {
                request: id.to_owned(),
                attempt: r.attempt,
                status: RequestStatus::InReview,
                cents: Cents::ZERO,
                refund: None,
            });
            match current.status {
                RequestStatus::InReview | RequestStatus::Failed => {}
                // Approving again is harmless; for another amount it is a mistake to
                // say so about.
                RequestStatus::Approved if amount.is_some_and(|a| a != current.cents) => {
                    refusal = Some(Problem::conflict(format!(
                        "refund request {id} is already approved for {} cents",
                        current.cents.get()
                    )));
                    break;
                }
                RequestStatus::Approved => {
                    outcome = Some((current, false));
                    break;
                }
                s => {
                    refusal = Some(Problem::conflict(format!(
                        "refund request {id} is {} and cannot be approved",
                        serde_json::to_value(s)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or("closed")
                    )));
                    break;
                }
            }
            // A dispute opened since the request was filed decides where the money goes,
            // as it does for a new request: a refund now could pay the customer twice (an
            // inquiry closed in our favour gives the frozen credits back) or take credits
            // for money the bank then refuses to send.
            if disputed(self.docs.as_ref(), &r.charge).await? {
                refusal = Some(not_refundable(DISPUTED));
                break;
            }
            let (elsewhere, failed) = self.refunded_elsewhere(&r.charge, &claims).await?;
            // Staff confirming a duplicate or a charge after cancellation may refund its
            // add-ons too, by naming the amount; without one, everything refundable
            // without them.
            let mistaken = matches!(
                r.reason,
                RefundReason::DuplicateCharge | RefundReason::ChargedAfterCancellation
            );
            let claimed = claims.claimed_except(id);
            let left = rules::refundable(&entry, mistaken, elsewhere, claimed, failed);
            // An earlier approval of this request (sent to staff since, or whose refund
            // failed) took credits back, and the ledger has followed its money back: a
            // refund worth less than those credits would leave the customer without the
            // difference, which nothing gives back. (Less than that earlier amount is
            // fine: refunding what the unused credits are worth is the usual decision.)
            // Never above the earlier approval's own amount (rounding), nor above what is
            // refundable now.
            let floor = taken_worth.min(r.amount).min(left);
            let want = amount
                .unwrap_or_else(|| rules::refundable(&entry, false, elsewhere, claimed, failed));
            if want < floor {
                refusal = Some(
                    Problem::conflict(format!(
                        "amount: the {} credits taken back when refund request {id} was \
                         approved before are worth {} cents; approve at least that much, or \
                         deny it and give the credits back with an adjustment",
                        r.credits_held.get(),
                        floor.get()
                    ))
                    .with_facts(serde_json::json!({"taken_back_worth": floor.get()})),
                );
                break;
            }
            if want == Cents::ZERO || want > left {
                refusal = Some(
                    Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "validation_failed",
                        format!(
                            "amount: at most {} cents of this payment can be refunded",
                            left.get()
                        ),
                    )
                    .with_facts(serde_json::json!({"refundable": left.get()})),
                );
                break;
            }
            let next_claim = Claim {
                request: id.to_owned(),
                attempt: current.attempt + 1,
                status: RequestStatus::Approved,
                cents: want,
                refund: None,
            };
            let mut next = claims.clone();
            next.requests.retain(|c| c.request != id);
            next.requests.push(next_claim.clone());
            let body = serde_json::to_string(&next).map_err(|_| Problem::internal())?;
            if self
                .docs
                .put_doc(&claims_pk, CLAIMS_SK, &body, version)
                .await?
            {
                outcome = Some((next_claim, true));
                break;
            }
        }
        if let Some(p) = refusal {
            return Err(p);
        }
        let (claim, mine) = outcome.ok_or_else(busy)?;
        let by = format!("staff:{staff}");
        let note = if mine { note } else { None };
        let updated = project(self.docs.as_ref(), &r.workspace, &claim, now, &by, note)
            .await?
            .ok_or_else(Problem::internal)?;
        if mine {
            tracing::info!(request = %id, staff = %staff, cents = claim.cents.get(), "refund request approved");
        }
        if updated.status == RequestStatus::Approved
            && updated.attempt == claim.attempt
            && let Some(demoted) = self.send(&updated, now).await?
        {
            return Ok(demoted);
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
        let claim = transition(self.docs.as_ref(), &r.charge, id, |c| match c.status {
            RequestStatus::InReview | RequestStatus::Failed => Ok(Some(Claim {
                status: RequestStatus::Denied,
                cents: Cents::ZERO,
                ..c.clone()
            })),
            RequestStatus::Denied => Ok(None),
            _ => Err(Problem::conflict(format!(
                "refund request {id} is already approved; it cannot be denied"
            ))),
        })
        .await?;
        // Denied now, or before (then the request catches up with its claim if a crash
        // left it behind).
        let (claim, note) = match claim {
            Some(c) => (Some(c), note),
            None => (current(self.docs.as_ref(), &r.charge, id).await?, None),
        };
        match claim {
            Some(c) => Ok(project(
                self.docs.as_ref(),
                &r.workspace,
                &c,
                now,
                &format!("staff:{staff}"),
                note,
            )
            .await?
            .unwrap_or(r)),
            None => Ok(r),
        }
    }
}

fn busy() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "the payment's refunds kept changing; retry",
    )
}

/// One transition of request `id` on the claims of `charge`, under the document's version:
/// `step` gets the request's current claim and answers the next one, `None` to change
/// nothing, or a refusal. Answers the claim written by this call, if any.
async fn transition<E: From<crate::store::StoreError>>(
    store: &dyn DocStore,
    charge: &ChargeId,
    id: &str,
    step: impl Fn(&Claim) -> Result<Option<Claim>, E>,
) -> Result<Option<Claim>, E> {
    let pk = charge_pk(charge);
    for _ in 0..16 {
        let doc = store.get_doc(&pk, CLAIMS_SK).await?;
        let (claims, version): (Claims, u64) = match &doc {
            Some(d) => (crate::store::decode(&d.body)?, d.version),
            None => (Claims::default(), 0),
        };
        let Some(current) = claims.get(id) else {
            return Ok(None);
        };
        let Some(next) = step(current)? else {
            return Ok(None);
        };
        let mut all = claims.clone();
        if let Some(c) = all.requests.iter_mut().find(|c| c.request == id) {
            *c = next.clone();
        }
        let body = crate::store::encode(&all)?;
        if store.put_doc(&pk, CLAIMS_SK, &body, version).await? {
            return Ok(Some(next));
        }
    }
    Err(crate::store::StoreError::unavailable(format!(
        "the refund claims of {charge} kept changing"
    ))
    .into())
}

/// The claim of request `id` on `charge`, as stored.
async fn current(
    store: &dyn DocStore,
    charge: &ChargeId,
    id: &str,
) -> Result<Option<Claim>, crate::store::StoreError> {
    Ok(docs::get::<Claims>(store, &charge_pk(charge), CLAIMS_SK)
        .await?
        .and_then(|c| c.get(id).cloned()))
}

/// Brings the request document to the state of its claim (never backwards), with a step
/// for people. Answers the request as stored.
pub(crate) async fn project(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    claim: &Claim,
    at: DateTime<Utc>,
    by: &str,
    note: Option<String>,
) -> Result<Option<RefundRequest>, crate::store::StoreError> {
    docs::update(
        store,
        &workspace_pk(workspace),
        &request_sk(&claim.request),
        |cur: Option<RefundRequest>| {
            let mut cur = cur?;
            if (cur.attempt, cur.status.rank()) >= claim.order() {
                return None;
            }
            if claim.attempt > cur.attempt {
                cur.refund = None;
                cur.refund_status = None;
                cur.sent_at = None;
            }
            cur.attempt = claim.attempt;
            if claim.status == RequestStatus::Approved {
                cur.amount = claim.cents;
            }
            if claim.refund.is_some() {
                cur.refund = claim.refund.clone();
            }
            cur.step(at, claim.status, by, note.clone());
            Some(cur)
        },
    )
    .await
}

/// A Stripe refund's status on the request that asked for it (the billing events call
/// this for refunds whose metadata names a request, the worker with Stripe's answer).
/// Only the current approval's refund counts; statuses only move forward: pending,
/// succeeded, then possibly failed. Answers the request if this call moved it.
#[allow(clippy::too_many_arguments)]
pub async fn stripe_refund_status(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    request: &str,
    attempt: u32,
    refund: &RefundId,
    status: &str,
    at: DateTime<Utc>,
) -> Result<Option<RefundRequest>, crate::store::StoreError> {
    let next = match status {
        "succeeded" => RequestStatus::Succeeded,
        "failed" | "canceled" => RequestStatus::Failed,
        _ => RequestStatus::Pending,
    };
    let Some(r) =
        docs::get::<RefundRequest>(store, &workspace_pk(workspace), &request_sk(request)).await?
    else {
        return Ok(None);
    };
    let moved = transition(store, &r.charge, request, |c| {
        let live = matches!(
            c.status,
            RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded
        );
        let same = c.attempt == attempt && c.refund.as_ref().is_none_or(|x| x == refund);
        Ok::<_, crate::store::StoreError>((live && same && next.rank() > c.status.rank()).then(
            || Claim {
                status: next,
                cents: if next == RequestStatus::Failed {
                    Cents::ZERO
                } else {
                    c.cents
                },
                refund: Some(refund.clone()),
                ..c.clone()
            },
        ))
    })
    .await?;
    let Some(claim) = moved else {
        // Nothing new; a request left behind by a crash catches up with its claim.
        if let Some(c) = current(store, &r.charge, request).await? {
            project(store, workspace, &c, at, "stripe", None).await?;
        }
        return Ok(None);
    };
    let note = (next == RequestStatus::Failed)
        .then(|| format!("Stripe reported refund {refund} {status}"));
    let updated = project(store, workspace, &claim, at, "stripe", note).await?;
    // The refund's own status, for the request's readers.
    docs::update(
        store,
        &workspace_pk(workspace),
        &request_sk(request),
        |cur: Option<RefundRequest>| {
            let mut cur = cur?;
            (cur.attempt == attempt && cur.refund_status.as_deref() != Some(status)).then(|| {
                cur.refund_status = Some(status.to_owned());
                cur
            })
        },
    )
    .await?;
    Ok(updated)
}

/// Tells the customer that the current approval of request `id` failed, once: when the
/// request is failed and no notice for its approval is on record. Every step that may
/// fail a request runs it (its redeliveries too), so a notice lost to a crash between the
/// failure and the send, or to a send that failed, goes with the next one; the notice's
/// stable id lets the notification service drop a repeat. Answers the request as it
/// stands.
pub async fn tell_failure(
    store: &dyn DocStore,
    queue: &dyn crate::queue::Queue,
    workspace: &WorkspaceId,
    id: &str,
) -> Result<Option<RefundRequest>, crate::queue::ConsumeError> {
    let Some(r) =
        docs::get::<RefundRequest>(store, &workspace_pk(workspace), &request_sk(id)).await?
    else {
        return Ok(None);
    };
    if r.status != RequestStatus::Failed || r.failure_told.is_some_and(|a| a >= r.attempt) {
        return Ok(Some(r));
    }
    // The failure's note, without the prefix staff read it with.
    let why = r
        .steps
        .iter()
        .rev()
        .find(|s| s.status == RequestStatus::Failed)
        .and_then(|s| s.note.as_deref())
        .map(|n| n.strip_prefix(REFUSED_NOTE).unwrap_or(n).to_owned())
        .unwrap_or_else(|| "the refund failed".to_owned());
    queue
        .send(crate::queue::Message {
            body: failed_notice(&r, &why).to_string(),
            group_id: None,
            dedup_id: None,
        })
        .await
        .map_err(crate::queue::ConsumeError::retry)?;
    let attempt = r.attempt;
    docs::update(
        store,
        &workspace_pk(workspace),
        &request_sk(id),
        |cur: Option<RefundRequest>| {
            let mut cur = cur?;
            (cur.attempt == attempt && cur.failure_told.is_none_or(|a| a < attempt)).then(|| {
                cur.failure_told = Some(attempt);
                cur
            })
        },
    )
    .await?;
    Ok(Some(r))
}

/// How the step of a refund refused begins.
const REFUSED_NOTE: &str = "refund refused: ";

/// The notice telling the customer that the refund of `r`'s current approval failed
/// (`id` lets the notification service drop a repeat).
pub fn failed_notice(r: &RefundRequest, why: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "refund.failed",
        "id": format!("refund.failed:{}:{}", r.id, r.attempt),
        "workspace": r.workspace,
        "user": r.requested_by,
        "request": r.id,
        "reason": why,
    })
}

/// Why an approval is refused, or fails before its refund is made, while its payment is
/// disputed.
pub const DISPUTED: &str =
    "this payment is disputed with the bank; the dispute decides where the money goes";

/// Whether the records show a dispute of `charge` open (an inquiry or a chargeback) or lost:
/// the dispute decides where that money goes. One won, or an inquiry closed (or followed
/// by a chargeback, which then decides), leaves the payment refundable.
pub async fn disputed(
    store: &dyn DocStore,
    charge: &ChargeId,
) -> Result<bool, crate::store::StoreError> {
    let p = docs::get::<PaymentRecord>(store, &charge_pk(charge), PAYMENT_SK).await?;
    Ok(p.is_some_and(|p| {
        p.disputes.iter().any(|d| {
            let s = p.dispute_status(d);
            crate::billing::refunds::dispute_open(s) || s == "lost"
        })
    }))
}

/// The worker's record that an approval's refund was refused (by Stripe, or for a dispute
/// opened since): the request fails and its cents are free again. Answers the request if
/// this call failed it.
pub async fn refused(
    store: &dyn DocStore,
    r: &RefundRequest,
    why: &str,
    at: DateTime<Utc>,
) -> Result<Option<RefundRequest>, crate::store::StoreError> {
    let moved = transition(store, &r.charge, &r.id, |c| {
        Ok::<_, crate::store::StoreError>(
            (c.attempt == r.attempt && c.status == RequestStatus::Approved).then(|| Claim {
                status: RequestStatus::Failed,
                cents: Cents::ZERO,
                ..c.clone()
            }),
        )
    })
    .await?;
    match moved {
        Some(claim) => {
            project(
                store,
                &r.workspace,
                &claim,
                at,
                "stripe",
                Some(format!("{REFUSED_NOTE}{why}")),
            )
            .await
        }
        None => {
            if let Some(c) = current(store, &r.charge, &r.id).await? {
                project(store, &r.workspace, &c, at, "stripe", None).await?;
            }
            Ok(None)
        }
    }
}

/// Cents of the charge refunded outside refund requests (the dashboard, disputes), and
/// refunds that failed or were canceled (whose money came back).
async fn refunded_elsewhere(
    docs_store: &dyn DocStore,
    charge: &ChargeId,
    claims: &Claims,
) -> Result<(Cents, Cents), Problem> {
    let p = docs::get::<PaymentRecord>(docs_store, &charge_pk(charge), PAYMENT_SK).await?;
    Ok(p.map_or((Cents::ZERO, Cents::ZERO), |p| {
        (elsewhere(&p, claims), failed_refunds(&p))
    }))
}

/// What of an approved request's payment may still be refunded for it, from the records as
/// they stand now (refunds and credit notes made since included).
pub(crate) async fn still_refundable(
    docs_store: &dyn DocStore,
    r: &RefundRequest,
) -> Result<Cents, Problem> {
    let Some(entry) = crate::billing::history::get(docs_store, &r.workspace, &r.movement).await?
    else {
        return Ok(Cents::ZERO);
    };
    let claims: Claims = docs::get(docs_store, &charge_pk(&r.charge), CLAIMS_SK)
        .await?
        .unwrap_or_default();
    let (elsewhere, failed) = refunded_elsewhere(docs_store, &r.charge, &claims).await?;
    // Under the rule it was approved by: add-ons only for a charge made by mistake.
    let mistaken = matches!(
        r.reason,
        RefundReason::DuplicateCharge | RefundReason::ChargedAfterCancellation
    );
    Ok(rules::refundable(
        &entry,
        mistaken,
        elsewhere,
        claims.claimed_except(&r.id),
        failed,
    ))
}

pub(crate) async fn demote(
    docs_store: &dyn DocStore,
    r: &RefundRequest,
    why: String,
    now: DateTime<Utc>,
) -> Result<RefundRequest, Problem> {
    let claims_pk = charge_pk(&r.charge);
    let mut claim = None;
    for _ in 0..8 {
        let doc = docs_store.get_doc(&claims_pk, CLAIMS_SK).await?;
        let (claims, version): (Claims, u64) = match &doc {
            Some(d) => (crate::store::decode(&d.body)?, d.version),
            None => (Claims::default(), 0),
        };
        let Some(current) = claims.get(&r.id).cloned() else {
            return Err(Problem::internal());
        };
        if current.status != RequestStatus::Approved
            || current.attempt != r.attempt
            || current.refund.is_some()
        {
            // Moved on already (demoted by a concurrent attempt).
            claim = Some(current);
            break;
        }
        let review = Claim {
            attempt: current.attempt + 1,
            status: RequestStatus::InReview,
            ..current
        };
        let mut next = claims.clone();
        next.requests.retain(|c| c.request != r.id);
        next.requests.push(review.clone());
        let body = serde_json::to_string(&next).map_err(|_| Problem::internal())?;
        if docs_store
            .put_doc(&claims_pk, CLAIMS_SK, &body, version)
            .await?
        {
            claim = Some(review);
            break;
        }
    }
    let claim = claim.ok_or_else(busy)?;
    tracing::info!(workspace = %r.workspace, request = %r.id, why = %why,
        "approved refund sent to support staff instead");
    project(docs_store, &r.workspace, &claim, now, "tally", Some(why))
        .await?
        .ok_or_else(Problem::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose retries used up its steps still records who denied it and why.
    #[test]
    fn a_denial_is_recorded_after_the_steps_are_used_up() {
        let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 1, 0, 0, 0).unwrap();
        let mut r: RefundRequest = serde_json::from_value(serde_json::json!({
            "id": "rr_1", "workspace": "org_1", "payment": "ch_1", "movement": "pi_1",
            "kind": "pack", "charge": "ch_1", "payment_intent": null, "invoice": null,
            "reason": "other", "details": "x", "requested_by": "u1", "status": "in_review",
            "amount": 100, "currency": "usd", "attempt": 0, "refund": null,
            "refund_status": null, "sent_at": null, "created": at, "updated": at,
            "steps": [],
        }))
        .unwrap();
        for n in 0..MAX_STEPS + 3 {
            let status = if n % 2 == 0 {
                RequestStatus::Approved
            } else {
                RequestStatus::Failed
            };
            r.step(at, status, "staff:s1", None);
        }
        assert_eq!(r.steps.len(), MAX_STEPS, "other steps stay bounded");
        r.step(
            at,
            RequestStatus::Denied,
            "staff:s2",
            Some("duplicate".into()),
        );
        let last = r.steps.last().unwrap();
        assert_eq!(
            (last.status, last.by.as_str(), last.note.as_deref()),
            (RequestStatus::Denied, "staff:s2", Some("duplicate"))
        );
        r.step(at, RequestStatus::Denied, "staff:s3", None);
        assert_eq!(r.steps.len(), MAX_STEPS + 1, "one step more, once");
    }
}
