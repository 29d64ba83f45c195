//! Support tickets: what a customer asks, with what Tally already knows about it.
//!
//! A ticket is one document (`TICKET#<id>` / `TICKET`) that holds what the customer sent,
//! what the system captured (time, user, workspace, plan and support level, request id,
//! user agent), the findings of [`enrich`] and what [`enrich`] fixed by itself. Messages are
//! separate documents (`TICKET#<id>` / `MSG#<seq>`), so no item grows with a conversation.
//! Two summaries list tickets: one under the workspace (`WORKSPACE#<ws>` /
//! `TICKET#<created>#<id>`) and one in the staff queue (`TICKETS` / `<created>#<id>`); both
//! are rewritten from the ticket after every change, so a failed write is repaired by the
//! next one.
//!
//! New tickets and messages go to the `support-tickets` queue; [`forward`] delivers them
//! to the help desk. A ticket with a change not yet handed to the queue is filed in the
//! due index (shards from [`FORWARD_SHARD_BASE`]), written with the ticket itself, so
//! [`Tickets::sweep`] hands it over even if nobody opens the ticket again.

pub mod enrich;
pub mod forward;
pub mod limits;

use crate::billing::records::workspace_pk;
use crate::http::Problem;
use crate::ids::{GenerationId, WorkspaceId};
use crate::queue::{Message, Queue};
use crate::store::docs::{DueMark, shard_of};
use crate::store::{DocStore, StoreError, docs};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// Name (suffix, in AWS after the stack name) of the FIFO queue of tickets to forward.
pub const SUPPORT_QUEUE: &str = "support-tickets.fifo";
/// Deliveries of one forward before it moves to the dead-letter queue.
pub const SUPPORT_MAX_RECEIVES: u32 = 8;

pub const TICKET_SK: &str = "TICKET";
/// The due index's shards for tickets waiting to be handed to the forwarding queue
/// (`DUE#10000` to `DUE#10003`): apart from the credit refresh's (at most 1,000), so
/// neither reads the other's.
pub const FORWARD_SHARD_BASE: u32 = 10_000;
pub const FORWARD_SHARDS: u32 = 4;
/// How long after a change the sweep takes its forward for failed: the request that made
/// the change hands it to the queue at once, or answers 503.
pub const FORWARD_GRACE: chrono::Duration = chrono::Duration::minutes(5);
pub const MESSAGE_PREFIX: &str = "MSG#";
pub const QUEUE_PK: &str = "TICKETS";
pub const WORKSPACE_TICKET_PREFIX: &str = "TICKET#";

/// Longest subject, in characters.
pub const MAX_SUBJECT_CHARS: usize = 200;
/// Longest message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 5000;
/// Most messages on one ticket.
pub const MAX_MESSAGES: u32 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Billing,
    Credits,
    Generation,
    Account,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TicketStatus {
    Open,
    /// Waiting for the customer.
    Waiting,
    Solved,
}

/// Lowest to highest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// No plan: community support.
    Low,
    /// The catalog's `standard` support level.
    Normal,
    /// `priority` and `dedicated` support levels.
    High,
    /// A negative balance reported, or a charge for a failed generation Tally could not
    /// give back by itself.
    Urgent,
}

impl Priority {
    /// The priority a plan's support level earns (the catalog's `support` of the plan).
    pub fn of_support_level(level: Option<&str>) -> Self {
        match level {
            None => Priority::Low,
            Some("standard") => Priority::Normal,
            Some(_) => Priority::High,
        }
    }
}

/// What the customer's browser told the frontend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_blocker: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpn: Option<bool>,
}

/// What the system captured when the ticket was filed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Captured {
    pub at: DateTime<Utc>,
    /// The token's subject.
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The support level of the plan in effect, from the catalog; absent without one (a
    /// canceled plan, or a paused one past its paid time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_level: Option<String>,
    pub request_id: String,
    /// The `User-Agent` header of the request that filed the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// Something Tally fixed by itself, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Remediation {
    /// `credits_returned`, `hold_released` or `refund_requested`.
    pub action: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<crate::money::Credits>,
    /// The journal entries it wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<u64>,
    /// The refund request it opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_request: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ticket {
    pub id: String,
    #[schema(value_type = String)]
    pub workspace: WorkspaceId,
    pub category: Category,
    pub subject: String,
    pub status: TicketStatus,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub generation: Option<GenerationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<String>,
    /// The page or API route the customer was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub client: ClientInfo,
    pub captured: Captured,
    pub enrichment: enrich::Enrichment,
    #[serde(default)]
    pub remediations: Vec<Remediation>,
    /// Messages so far (the first is the customer's message).
    pub messages: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When a first answer is due (see [`respond_by`]); absent on tickets filed before
    /// it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond_by: Option<DateTime<Utc>>,
    /// Changes so far (filing, messages, status changes): each is forwarded as its own.
    #[serde(default)]
    pub changes: u32,
    /// Whether every change so far was handed to the forwarding queue.
    #[serde(default)]
    pub forwarded: bool,
    /// The latest change (`ticket.created`, `ticket.message`, `ticket.status`) and its
    /// message, forwarded again if it never reached the queue.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(ignore)]
    pub last_event: String,
    #[serde(default)]
    #[schema(ignore)]
    pub last_seq: u32,
    /// The highest message whose arrival was recorded as a change (status, forwarding).
    #[serde(default)]
    #[schema(ignore)]
    pub last_message: u32,
    /// The highest message handed to the forwarding queue.
    #[serde(default)]
    #[schema(ignore)]
    pub forwarded_messages: u32,
    /// Fingerprint of the request that filed it: the same Idempotency-Key with another
    /// request is refused. Kept in the store, not shown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(ignore)]
    pub request: String,
    /// The latest message slot a writer is about to fill, and when it said so: until that
    /// message is counted the ticket stays filed in the due index, so a message stored by
    /// a writer that stopped before counting it is found by the sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub adding: Option<Adding>,
}

/// A message slot a writer announced before filling it ([`Ticket::adding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adding {
    pub seq: u32,
    pub at: DateTime<Utc>,
}

impl Ticket {
    /// The ticket as the API shows it (without the bookkeeping of forwarding and keys).
    pub fn shown(mut self) -> Self {
        self.request.clear();
        self.last_event.clear();
        self.adding = None;
        self
    }

    /// A message slot announced and not counted yet: a writer is filling it, or stopped
    /// with the message stored and not counted, or before storing it.
    pub fn adding_uncounted(&self) -> Option<Adding> {
        self.adding.filter(|a| a.seq > self.messages)
    }

    fn changed(&mut self, event: &str, seq: u32, now: DateTime<Utc>) {
        self.changes += 1;
        self.last_event = event.to_owned();
        self.last_seq = seq;
        self.updated_at = self.updated_at.max(now);
        self.forwarded = false;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Author {
    Customer,
    Staff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TicketMessage {
    pub seq: u32,
    pub at: DateTime<Utc>,
    pub author: Author,
    /// The author's token subject.
    pub by: String,
    /// Text as it was sent; never rendered as HTML.
    pub body: String,
    /// Fingerprint of the Idempotency-Key it was sent with: a retry finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub key: Option<String>,
}

/// A line of a ticket list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TicketSummary {
    pub id: String,
    #[schema(value_type = String)]
    pub workspace: WorkspaceId,
    pub category: Category,
    pub subject: String,
    pub status: TicketStatus,
    pub priority: Priority,
    pub messages: u32,
    /// Who filed it (token subject).
    #[serde(default)]
    pub user: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond_by: Option<DateTime<Utc>>,
}

/// Business hours within which a ticket gets its first answer (the help centre: "under 24
/// business hours").
pub const RESPONSE_BUSINESS_HOURS: i64 = 24;

/// When a ticket filed at `filed` is due a first answer: [`RESPONSE_BUSINESS_HOURS`]
/// counted on weekdays only (UTC; Saturdays and Sundays do not count). Filed on a Friday
/// at 15:00, it is due on Monday at 15:00; filed on a Saturday, on Tuesday at 00:00.
pub fn respond_by(filed: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{Datelike, Duration, Weekday};
    let weekend = |t: DateTime<Utc>| matches!(t.weekday(), Weekday::Sat | Weekday::Sun);
    let next_midnight = |t: DateTime<Utc>| {
        (t.date_naive() + Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .map_or(t + Duration::days(1), |m| m.and_utc())
    };
    let mut left = Duration::hours(RESPONSE_BUSINESS_HOURS);
    let mut t = filed;
    loop {
        if weekend(t) {
            t = next_midnight(t);
            continue;
        }
        let day_end = next_midnight(t);
        if t + left <= day_end {
            return t + left;
        }
        left -= day_end - t;
        t = day_end;
    }
}

impl Ticket {
    /// Whether a change or message of the ticket has not been handed to the forwarding
    /// queue yet.
    pub fn unforwarded(&self) -> bool {
        !(self.forwarded && self.forwarded_messages >= self.messages)
    }

    /// Where the ticket is filed in the due index: while a change is unforwarded, due for
    /// the sweep [`FORWARD_GRACE`] after its last change.
    pub fn forward_mark(&self) -> Option<DueMark> {
        let change = self.unforwarded().then_some(self.updated_at);
        let adding = self.adding_uncounted().map(|a| a.at);
        let since = match (change, adding) {
            (Some(c), Some(a)) => Some(c.min(a)),
            (c, a) => c.or(a),
        }?;
        Some(DueMark {
            shard: FORWARD_SHARD_BASE + shard_of(&self.id, FORWARD_SHARDS),
            at: since + FORWARD_GRACE,
        })
    }

    pub fn summary(&self) -> TicketSummary {
        TicketSummary {
            id: self.id.clone(),
            workspace: self.workspace.clone(),
            category: self.category,
            subject: self.subject.clone(),
            status: self.status,
            priority: self.priority,
            messages: self.messages,
            user: self.captured.user.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            respond_by: self.respond_by,
        }
    }
}

pub fn ticket_pk(id: &str) -> String {
    format!("TICKET#{id}")
}
/// The answer to a message for a ticket that has [`MAX_MESSAGES`] already.
fn full_ticket() -> Problem {
    Problem::conflict(format!(
        "this ticket has {MAX_MESSAGES} messages; open a new ticket"
    ))
}

fn message_sk(seq: u32) -> String {
    format!("{MESSAGE_PREFIX}{seq:06}")
}
fn list_key(t: &Ticket) -> String {
    format!("{:013}#{}", t.created_at.timestamp_millis().max(0), t.id)
}

pub fn new_id() -> String {
    format!("tkt_{}", ulid::Ulid::new())
}

/// The ticket id an idempotency key stands for, in one workspace for one user.
pub fn id_for_key(workspace: &WorkspaceId, user: &str, key: &str) -> String {
    let print = crate::service::fingerprint(&(workspace.as_str(), user, key));
    format!("tkt_k{}", &print[..25].to_ascii_uppercase())
}

/// Whether `id` is shaped like a ticket id.
pub fn valid_id(id: &str) -> bool {
    id.len() == 30 && id.starts_with("tkt_") && id[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A ticket id a staff action names (`field`) for its audit trail: shaped like one (else
/// 422), and a ticket of `workspace` (else 404, as for a ticket that does not exist).
pub async fn ticket_of(
    docs_store: &dyn DocStore,
    field: &str,
    ticket: &str,
    workspace: &WorkspaceId,
) -> Result<String, Problem> {
    if !valid_id(ticket) {
        return Err(Problem::validation(
            field,
            "must be a support ticket id (tkt_...)",
        ));
    }
    let found: Option<Ticket> = docs::get(docs_store, &ticket_pk(ticket), TICKET_SK).await?;
    if found.is_none_or(|f| &f.workspace != workspace) {
        return Err(Problem::not_found(format!(
            "ticket {ticket} does not belong to workspace {workspace}"
        )));
    }
    Ok(ticket.to_owned())
}

/// The claim of a message's Idempotency-Key (`TICKET#<id>` / `MSGKEY#<fingerprint>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageKey {
    /// When it was claimed: a claim a minute old whose message never appeared is taken over.
    at: DateTime<Utc>,
    /// Fingerprint of the message's text.
    body: String,
}

/// What goes to the help desk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardJob {
    /// `ticket.created`, `ticket.message` or `ticket.status`.
    pub event: String,
    pub ticket: String,
    /// The latest message of the ticket at this change.
    pub seq: u32,
    /// The first message the help desk has not been sent yet: the delivery carries every
    /// message from here to `seq`, so a change whose own forward failed is not lost.
    #[serde(default)]
    pub from_seq: u32,
    /// Unique per change: the help desk's idempotency key.
    pub id: String,
    /// The ticket's change count at this change (its place in the ticket's history): a job
    /// reaching the forwarder after a later change was delivered, with no message the help
    /// desk has not had, is not delivered. `None` for a job queued before it existed, and
    /// 0 for a ticket that counted no change yet (filed before changes were counted): such
    /// a job is never skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<u32>,
}

impl ForwardJob {
    /// The change's number, if it has one.
    pub fn number(&self) -> Option<u32> {
        self.change.filter(|&c| c > 0)
    }
}

/// What the help desk was sent of a ticket (`TICKET#<id>` / [`DELIVERED_SK`]), written by
/// the forwarder after each delivery: the latest change delivered and which messages. Two
/// writers each forward their own change, and either may reach the queue first, both
/// carrying the same message; this record makes the second deliver only what is new. A
/// job redriven from the dead-letter queue after later ones were delivered still brings
/// the messages only it carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    #[serde(default)]
    pub change: u32,
    /// Every message up to this one was sent. (`messages`, the highest message sent, in a
    /// record of the release before: the same for a ticket without gaps.)
    #[serde(default, alias = "messages")]
    pub through: u32,
    /// Messages sent above `through`, in order (at most [`MAX_MESSAGES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub above: Vec<u32>,
}

impl Delivered {
    pub fn has(&self, seq: u32) -> bool {
        seq <= self.through || self.above.binary_search(&seq).is_ok()
    }

    /// With change `change` (if numbered) and messages `seqs` sent as well.
    pub fn with(&self, change: Option<u32>, seqs: &[u32]) -> Self {
        let mut next = self.clone();
        next.change = next.change.max(change.unwrap_or(0));
        for &seq in seqs {
            if !next.has(seq) && seq <= MAX_MESSAGES {
                let at = next.above.partition_point(|&s| s < seq);
                next.above.insert(at, seq);
            }
        }
        while next.above.first() == Some(&(next.through + 1)) {
            next.through += 1;
            next.above.remove(0);
        }
        next
    }
}

pub const DELIVERED_SK: &str = "DELIVERED";

/// What one sweep for unforwarded tickets did: the tickets handed to the queue, and those
/// that could not be (tried again by the next sweep).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub forwarded: Vec<String>,
    pub failed: Vec<String>,
}

/// Tickets over the document store, forwarding changes through `queue`.
#[derive(Clone)]
pub struct Tickets {
    pub docs: Arc<dyn DocStore>,
    pub queue: Arc<dyn Queue>,
}

impl Tickets {
    /// What the help desk was sent of ticket `id` so far ([`Delivered`]).
    pub async fn delivered(&self, id: &str) -> Result<Delivered, StoreError> {
        Ok(docs::get(self.docs.as_ref(), &ticket_pk(id), DELIVERED_SK)
            .await?
            .unwrap_or_default())
    }

    /// Records that change `change` (if numbered), with messages `seqs`, reached the help
    /// desk. Never moves back: a record of a later change stays.
    pub async fn record_delivered(
        &self,
        id: &str,
        change: Option<u32>,
        seqs: &[u32],
    ) -> Result<(), StoreError> {
        docs::update::<Delivered, _>(self.docs.as_ref(), &ticket_pk(id), DELIVERED_SK, |cur| {
            let cur = cur.unwrap_or_default();
            let next = cur.with(change, seqs);
            (next != cur).then_some(next)
        })
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Ticket>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        docs::get(self.docs.as_ref(), &ticket_pk(id), TICKET_SK).await
    }

    /// A ticket of `workspace`; another workspace's ticket is not found.
    pub async fn get_in(&self, workspace: &WorkspaceId, id: &str) -> Result<Ticket, Problem> {
        match self.get(id).await? {
            Some(t) if &t.workspace == workspace => Ok(t),
            _ => Err(Problem::not_found(format!(
                "no ticket {id} in this workspace"
            ))),
        }
    }

    pub async fn messages(&self, id: &str) -> Result<Vec<TicketMessage>, StoreError> {
        let mut all: Vec<TicketMessage> = docs::list(
            self.docs.as_ref(),
            &ticket_pk(id),
            MESSAGE_PREFIX,
            MAX_MESSAGES as usize + 1,
        )
        .await?;
        all.reverse();
        Ok(all)
    }

    /// Read-modify-write of the ticket document (as [`docs::update`]), filed in the due
    /// index while a change of it is unforwarded ([`Ticket::forward_mark`]). Every write
    /// of a ticket goes through here: a plain write would drop the mark. Answers the
    /// ticket as stored afterwards and whether this call wrote it.
    async fn write_ticket(
        &self,
        pk: &str,
        mut merge: impl FnMut(Option<Ticket>) -> Option<Ticket>,
    ) -> Result<(Option<Ticket>, bool), StoreError> {
        let mut wrote = false;
        let stored = docs::update_due(self.docs.as_ref(), pk, TICKET_SK, |cur| {
            let next = merge(cur);
            wrote = next.is_some();
            next.map(|t| {
                let mark = t.forward_mark();
                (t, mark)
            })
        })
        .await?;
        Ok((stored, wrote))
    }

    /// Hands to the forwarding queue every ticket whose change has waited longer than
    /// [`FORWARD_GRACE`] (its forward failed and nobody has opened the ticket since), at
    /// most `limit` from each shard; the rest wait for the next sweep. A ticket that still
    /// cannot be handed over stays filed and is tried again by the next sweep.
    pub async fn sweep(&self, now: DateTime<Utc>, limit: usize) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        for shard in FORWARD_SHARD_BASE..FORWARD_SHARD_BASE + FORWARD_SHARDS {
            for d in self.docs.due_docs(shard, now, limit).await? {
                let Some(id) = d.pk.strip_prefix("TICKET#").filter(|_| d.sk == TICKET_SK) else {
                    tracing::warn!(pk = %d.pk, sk = %d.sk, "due item that is not a ticket; skipped");
                    continue;
                };
                // The index may lag the ticket: the ticket as stored decides.
                let ticket = match self.get(id).await {
                    Ok(Some(t)) if t.unforwarded() || t.adding_uncounted().is_some() => t,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, ticket = %id, "could not read a ticket to forward");
                        report.failed.push(id.to_owned());
                        continue;
                    }
                };
                let settled = match self.count_stored(ticket, now).await {
                    // Only an announcement, of a message never stored: dropped.
                    Ok(t) if !t.unforwarded() => continue,
                    Ok(t) => self.settle_forwarding(t).await,
                    Err(p) => Err(p),
                };
                match settled {
                    Ok(_) => report.forwarded.push(id.to_owned()),
                    Err(p) => {
                        tracing::error!(ticket = %id, problem = %p.detail, "a swept ticket could not be handed to the queue");
                        report.failed.push(id.to_owned());
                    }
                }
            }
        }
        if !report.forwarded.is_empty() || !report.failed.is_empty() {
            tracing::warn!(
                forwarded = report.forwarded.len(),
                failed = report.failed.len(),
                "tickets whose forward had failed were handed to the queue again"
            );
        }
        Ok(report)
    }

    /// Writes the two list summaries of `t` (idempotent), unless they show a later
    /// version of the ticket already.
    async fn summaries(&self, t: &Ticket) -> Result<(), StoreError> {
        let s = t.summary();
        let key = list_key(t);
        for (pk, sk) in [
            (QUEUE_PK.to_owned(), key.clone()),
            (
                workspace_pk(&t.workspace),
                format!("{WORKSPACE_TICKET_PREFIX}{key}"),
            ),
        ] {
            let s = s.clone();
            // Never from an older read of the ticket than the summary's (a read's catch-up
            // or the sweep racing the change that wrote it).
            docs::update::<TicketSummary, _>(self.docs.as_ref(), &pk, &sk, move |cur| {
                cur.as_ref()
                    .is_none_or(|c| {
                        c != &s && (c.updated_at, c.messages) <= (s.updated_at, s.messages)
                    })
                    .then(|| s.clone())
            })
            .await?;
        }
        Ok(())
    }

    /// Stores a new ticket with its first message (or finds it, when the id was used:
    /// the same ticket). Then hands it to the forwarding queue.
    pub async fn file(&self, ticket: Ticket, first: TicketMessage) -> Result<Ticket, Problem> {
        let pk = ticket_pk(&ticket.id);
        // The message first: a ticket never exists without it.
        let body = crate::store::encode(&first)?;
        self.docs
            .put_doc(&pk, &message_sk(first.seq), &body, 0)
            .await?;
        let stored = self
            .write_ticket(&pk, |cur| cur.is_none().then(|| ticket.clone()))
            .await?
            .0
            .ok_or_else(Problem::internal)?;
        self.summaries(&stored).await?;
        self.forward(stored).await
    }

    /// Forwards the latest change again if it never reached the queue (a crash or a queue
    /// outage after it was stored); called on reads, so nothing stays unforwarded.
    pub async fn catch_up(&self, t: Ticket, now: DateTime<Utc>) -> Result<Ticket, Problem> {
        let t = self.count_stored(t, now).await?;
        self.settle_forwarding(t).await
    }

    /// Counts the messages stored past the ticket's count when a writer announced a slot
    /// ([`Ticket::adding`]) and did not count it (it stopped, or its write of the ticket
    /// failed, after storing the message). An announcement older than [`FORWARD_GRACE`]
    /// with nothing stored is one whose writer stopped before storing: it is dropped.
    async fn count_stored(&self, t: Ticket, now: DateTime<Utc>) -> Result<Ticket, Problem> {
        let Some(adding) = t.adding_uncounted() else {
            return Ok(t);
        };
        let pk = ticket_pk(&t.id);
        let mut t = t;
        while t.messages < MAX_MESSAGES {
            let next = t.messages + 1;
            match docs::get::<TicketMessage>(self.docs.as_ref(), &pk, &message_sk(next)).await? {
                Some(m) => t = self.count_message(&pk, &m).await?,
                None => break,
            }
        }
        if t.adding_uncounted().is_some() && now - adding.at >= FORWARD_GRACE {
            let (stored, _) = self
                .write_ticket(&pk, |cur| {
                    cur.filter(|c| c.adding == Some(adding) && c.adding_uncounted().is_some())
                        .map(|mut c| {
                            c.adding = None;
                            c
                        })
                })
                .await?;
            t = stored.ok_or_else(|| Problem::not_found("no such ticket"))?;
        }
        Ok(t)
    }

    /// Hands the latest change to the queue and marks the ticket forwarded. A failure
    /// leaves `forwarded: false` (and the ticket in the due index) and answers 503: the
    /// client's retry, the next read of the ticket or the forwarder's sweep forwards it.
    async fn forward(&self, t: Ticket) -> Result<Ticket, Problem> {
        let event = if t.last_event.is_empty() {
            "ticket.created".to_owned()
        } else {
            t.last_event.clone()
        };
        let seq = t.messages.max(1);
        let from_seq = t.forwarded_messages + 1;
        let id = format!("{}:{}:{event}", t.id, t.changes.max(1));
        let job = ForwardJob {
            event: event.clone(),
            ticket: t.id.clone(),
            seq,
            from_seq,
            id: id.clone(),
            change: Some(t.changes),
        };
        self.queue
            .send(Message {
                body: serde_json::to_string(&job).map_err(|_| Problem::internal())?,
                group_id: Some(t.id.clone()),
                dedup_id: Some(crate::service::fingerprint(&id)[..64].to_owned()),
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, ticket = %t.id, "could not queue the ticket for the help desk");
                Problem::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the ticket is saved but could not be handed to support yet; retry with the same Idempotency-Key",
                )
            })?;
        // Marked only if no later change came meanwhile: that one is forwarded on its own
        // (with every message since the last forwarded one).
        let changes = t.changes;
        let (marked, _) = self
            .write_ticket(&ticket_pk(&t.id), |cur| {
                cur.filter(|c| c.changes == changes && (!c.forwarded || c.forwarded_messages < seq))
                    .map(|mut c| {
                        c.forwarded = true;
                        c.forwarded_messages = c.forwarded_messages.max(seq);
                        c
                    })
            })
            .await?;
        Ok(marked.unwrap_or(t))
    }

    /// Records the arrival of message `m` on the ticket (once): counted, the status it sets,
    /// a change to forward. Answers the ticket as stored afterwards.
    async fn count_message(&self, pk: &str, m: &TicketMessage) -> Result<Ticket, Problem> {
        let seq = m.seq;
        let author = m.author;
        let at = m.at;
        let (updated, _) = self
            .write_ticket(pk, |cur| {
                cur.filter(|c| c.last_message < seq).map(|mut c| {
                    c.messages = c.messages.max(seq);
                    c.last_message = seq;
                    c.status = match author {
                        Author::Staff => TicketStatus::Waiting,
                        Author::Customer => TicketStatus::Open,
                    };
                    c.changed("ticket.message", seq, at);
                    c
                })
            })
            .await?;
        updated.ok_or_else(|| Problem::not_found("no such ticket"))
    }

    /// Adds a message. With a key, the message is added once: a retry finds the message
    /// its key added (and finishes recording and forwarding it); the key is claimed,
    /// conditionally, before a new message is written, so two retries at once add one.
    /// Staff messages set the ticket waiting for the customer; a customer's reopens it.
    pub async fn add_message(
        &self,
        ticket: &Ticket,
        author: Author,
        by: &str,
        body: &str,
        key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(Ticket, TicketMessage), Problem> {
        let pk = ticket_pk(&ticket.id);
        let key = key.map(|k| crate::service::fingerprint(&(by, k)));
        if let Some(k) = &key {
            // Added before (perhaps by an attempt that stopped half-way): finish it.
            if let Some(done) = self
                .messages(&ticket.id)
                .await?
                .into_iter()
                .find(|m| m.key.as_ref() == Some(k))
            {
                if done.body != body {
                    return Err(Problem::conflict(
                        "this Idempotency-Key was already used for a different message",
                    ));
                }
                self.count_message(&pk, &done).await?;
                let current = self
                    .get(&ticket.id)
                    .await?
                    .ok_or_else(|| Problem::not_found("no such ticket"))?;
                let current = self.settle_forwarding(current).await?;
                return Ok((current, done));
            }
            // A full ticket takes no new message: refused before the key is claimed, so
            // refused requests leave no claim items behind.
            if ticket.messages >= MAX_MESSAGES {
                return Err(full_ticket());
            }
            // Claim the key: a claim made in the last minute by a twin is respected; an
            // older one (an attempt that died before writing its message) is taken over,
            // conditionally on the version seen, so only one taker writes.
            let key_sk = format!("MSGKEY#{k}");
            let claim = crate::store::encode(&MessageKey {
                at: now,
                body: crate::service::fingerprint(&body),
            })?;
            if !self.docs.put_doc(&pk, &key_sk, &claim, 0).await? {
                let seen = self
                    .docs
                    .get_doc(&pk, &key_sk)
                    .await?
                    .ok_or_else(Problem::internal)?;
                let held: MessageKey = crate::store::decode(&seen.body)?;
                if held.body != crate::service::fingerprint(&body) {
                    return Err(Problem::conflict(
                        "this Idempotency-Key was already used for a different message",
                    ));
                }
                let stale = now - held.at > chrono::Duration::seconds(60);
                if !stale
                    || !self
                        .docs
                        .put_doc(&pk, &key_sk, &claim, seen.version)
                        .await?
                {
                    return Err(Problem::new(
                        axum::http::StatusCode::CONFLICT,
                        "in_progress",
                        "this message is being added; retry shortly with the same Idempotency-Key",
                    ));
                }
            }
        }
        let msg = self.append(&pk, author, by, body, key.clone(), now).await?;
        let updated = self.count_message(&pk, &msg).await?;
        self.summaries(&updated).await?;
        let updated = self.forward(updated).await?;
        Ok((updated, msg))
    }

    /// Forwards the ticket if any change or message was not handed to the queue yet.
    async fn settle_forwarding(&self, t: Ticket) -> Result<Ticket, Problem> {
        if t.forwarded && t.forwarded_messages >= t.messages {
            return Ok(t);
        }
        self.summaries(&t).await?;
        self.forward(t).await
    }

    /// Writes the message into the next free slot. A slot taken by a writer that stopped
    /// before recording it is recorded now (from the message in it), so the ticket moves
    /// on and that message is not lost.
    async fn append(
        &self,
        pk: &str,
        author: Author,
        by: &str,
        body: &str,
        key: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<TicketMessage, Problem> {
        for _ in 0..20 {
            let current: Ticket = docs::get(self.docs.as_ref(), pk, TICKET_SK)
                .await?
                .ok_or_else(|| Problem::not_found("no such ticket"))?;
            if current.messages >= MAX_MESSAGES {
                return Err(full_ticket());
            }
            let seq = current.messages + 1;
            // Announced first: were this writer to stop after storing the message and
            // before counting it, the announcement files the ticket for the sweep.
            self.write_ticket(pk, |cur| {
                cur.filter(|c| {
                    c.adding
                        .is_none_or(|a| a.seq < seq || (a.seq == seq && a.at < now))
                })
                .map(|mut c| {
                    c.adding = Some(Adding { seq, at: now });
                    c
                })
            })
            .await?;
            let msg = TicketMessage {
                seq,
                at: now,
                author,
                by: by.to_owned(),
                body: body.to_owned(),
                key: key.clone(),
            };
            if self
                .docs
                .put_doc(pk, &message_sk(seq), &crate::store::encode(&msg)?, 0)
                .await?
            {
                return Ok(msg);
            }
            if let Some(theirs) =
                docs::get::<TicketMessage>(self.docs.as_ref(), pk, &message_sk(seq)).await?
            {
                self.count_message(pk, &theirs).await?;
            }
        }
        Err(Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the ticket is changing right now; retry shortly",
        ))
    }

    /// Sets the status (staff). Setting the status it has changes nothing.
    pub async fn set_status(
        &self,
        ticket: &Ticket,
        status: TicketStatus,
        now: DateTime<Utc>,
    ) -> Result<Ticket, Problem> {
        let pk = ticket_pk(&ticket.id);
        let (stored, wrote) = self
            .write_ticket(&pk, |cur| {
                cur.filter(|c| c.status != status).map(|mut c| {
                    c.status = status;
                    let seq = c.messages;
                    c.changed("ticket.status", seq, now);
                    c
                })
            })
            .await?;
        let changed = stored.filter(|_| wrote);
        let Some(t) = changed else {
            let current: Ticket = docs::get(self.docs.as_ref(), &pk, TICKET_SK)
                .await?
                .ok_or_else(|| Problem::not_found("no such ticket"))?;
            return self.catch_up(current, now).await;
        };
        self.summaries(&t).await?;
        self.forward(t).await
    }

    /// A page of summaries, newest first: the workspace's (`Some`) or the staff queue's,
    /// filtered by status and priority. Reads at most `limit * 10` summaries per call;
    /// the cursor resumes where it stopped.
    pub async fn list(
        &self,
        workspace: Option<&WorkspaceId>,
        author: Option<&str>,
        status: Option<TicketStatus>,
        priority: Option<Priority>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<TicketSummary>, Option<String>), Problem> {
        let (pk, prefix) = match workspace {
            Some(w) => (workspace_pk(w), WORKSPACE_TICKET_PREFIX.to_owned()),
            None => (QUEUE_PK.to_owned(), String::new()),
        };
        let mut before = match cursor {
            Some(c) => {
                let ok = c.len() == 44
                    && c.as_bytes()[13] == b'#'
                    && c[..13].bytes().all(|b| b.is_ascii_digit())
                    && valid_id(&c[14..]);
                if !ok {
                    return Err(Problem::validation("cursor", "unknown cursor"));
                }
                Some(format!("{prefix}{c}"))
            }
            None => None,
        };
        // (sort key, ticket): one more than asked for tells whether a next page exists.
        let mut out: Vec<(String, TicketSummary)> = Vec::new();
        let tickets = |out: Vec<(String, TicketSummary)>| out.into_iter().map(|(_, s)| s).collect();
        let mut read = 0usize;
        loop {
            let page = docs::page::<TicketSummary>(
                self.docs.as_ref(),
                &pk,
                &prefix,
                before.as_deref(),
                100,
            )
            .await?;
            let full = page.len() == 100;
            for (sk, s) in page {
                read += 1;
                before = Some(sk.clone());
                if status.is_none_or(|x| s.status == x)
                    && priority.is_none_or(|p| s.priority == p)
                    && author.is_none_or(|a| s.user == a)
                {
                    out.push((sk.clone(), s));
                    if out.len() > limit {
                        // More follow: the cursor is the last ticket handed out.
                        out.pop();
                        let cursor = out.last().map(|(k, _)| k[prefix.len()..].to_owned());
                        return Ok((tickets(out), cursor));
                    }
                }
                if read >= limit * 10 {
                    return Ok((tickets(out), Some(sk[prefix.len()..].to_owned())));
                }
            }
            if !full {
                return Ok((tickets(out), None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::respond_by;
    use chrono::{DateTime, Utc};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn a_first_answer_is_due_24_weekday_hours_after_filing() {
        for (filed, due) in [
            // Wednesday: Thursday, same time.
            ("2026-12-02T09:30:00Z", "2026-12-03T09:30:00Z"),
            // Friday afternoon: the weekend does not count.
            ("2026-12-04T15:00:00Z", "2026-12-07T15:00:00Z"),
            // Saturday and Sunday: from Monday's start.
            ("2026-12-05T10:00:00Z", "2026-12-08T00:00:00Z"),
            ("2026-12-06T23:59:00Z", "2026-12-08T00:00:00Z"),
            // The whole of Friday.
            ("2026-12-04T00:00:00Z", "2026-12-05T00:00:00Z"),
            // Across a month and a leap day.
            ("2028-02-28T12:00:00Z", "2028-02-29T12:00:00Z"),
        ] {
            assert_eq!(respond_by(at(filed)), at(due), "{filed}");
        }
    }

    #[test]
    fn delivered_messages_close_their_gaps_and_the_change_never_moves_back() {
        use super::{Delivered, MAX_MESSAGES};
        let d = Delivered::default().with(Some(3), &[1, 3, 4]);
        assert_eq!((d.change, d.through, d.above.clone()), (3, 1, vec![3, 4]));
        assert!(d.has(1) && !d.has(2) && d.has(3) && d.has(4) && !d.has(5));
        // The gap's message redriven: all four sent.
        let d = d.with(Some(2), &[2]);
        assert_eq!((d.change, d.through, d.above.clone()), (3, 4, vec![]));
        // Again, and out of range: nothing changes.
        assert_eq!(d.with(None, &[2, 4, MAX_MESSAGES + 1]), d);
        // A record written by the release before reads as sent through its highest.
        let old: Delivered = serde_json::from_str(r#"{"change":3,"messages":2}"#).unwrap();
        assert_eq!((old.change, old.through, old.above), (3, 2, vec![]));
    }
}
