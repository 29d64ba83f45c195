//! The `LedgerStore` port and its adapters: DynamoDB in production, redb embedded locally
//! (behind the `local` feature, so the Lambda binaries carry neither it nor redb).
//!
//! A commit is all-or-nothing: the new workspace state (guarded by its version), the journal
//! entries (each written only if absent), the idempotency record (written only if absent),
//! the generation records (each guarded by the status it was read with), and the hold
//! items placed and removed. A commit that loses a race reports which guard failed so the
//! caller can tell "someone already did exactly this" from "try again on fresh state".
//!
//! Open holds are not part of the state item: each is an item of its own, filed by
//! deadline, so the state item stays the size of the live lots however many generations
//! run, and an operation reads only the holds it needs (its own generation's, and the
//! ones that end first when some may be overdue).

pub mod docs;
pub mod dynamo;
#[cfg(feature = "local")]
pub mod embedded;

pub use docs::{Doc, DocStore, DueDoc, DueMark};

use crate::error::{BoxError, Context};
use crate::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use crate::ledger::{Entry, Generation, GenerationStatus, Hold, Outcome, WorkspaceState};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A failure of the storage itself (not a business refusal). Each keeps its cause.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A failure that trying again will not fix (a refused request, a broken file).
    #[error("storage backend error: {0}")]
    Backend(#[source] BoxError),
    /// Throttling, timeouts and server errors: the outcome of a write is unknown, and trying
    /// again (after re-reading the idempotency record) is safe.
    #[error("storage temporarily unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("stored data could not be decoded: {0}")]
    Decode(#[source] BoxError),
}

impl StoreError {
    /// A permanent failure; `cause` is an error or a message.
    pub fn backend(cause: impl Into<BoxError>) -> Self {
        Self::Backend(cause.into())
    }

    /// A transient failure; `cause` is an error or a message.
    pub fn unavailable(cause: impl Into<BoxError>) -> Self {
        Self::Unavailable(cause.into())
    }

    /// Stored data that does not read back; `cause` is an error or a message.
    pub fn decode(cause: impl Into<BoxError>) -> Self {
        Self::Decode(cause.into())
    }

    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Why a commit did not happen.
#[derive(Debug, Error)]
pub enum CommitError {
    /// The idempotency record already exists: the operation happened before.
    #[error("operation already applied")]
    Duplicate,
    /// The workspace changed since it was read: reload and retry.
    #[error("workspace changed concurrently")]
    Conflict,
    /// A generation with the new hold's id exists already (in any workspace).
    #[error("the generation exists already")]
    GenerationExists,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The remembered result of an operation, stored under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub key: IdempotencyKey,
    /// Hash of the request that first used the key; a different request with the same key
    /// is refused instead of silently answered with the wrong result.
    pub fingerprint: String,
    pub outcome: Outcome,
    pub created_at: DateTime<Utc>,
    /// When the record may be garbage-collected; `None` keeps it forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// DynamoDB's limit on the items of one transaction.
pub const MAX_COMMIT_ITEMS: usize = 100;

/// Everything one ledger operation writes.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The new state; its `version` is the stored version plus one.
    pub state: WorkspaceState,
    pub entries: Vec<Entry>,
    pub idempotency: IdempotencyRecord,
    /// Generation records, each with the status the stored record must still have (`None`:
    /// it must not exist yet).
    pub generations: Vec<(Option<GenerationStatus>, Generation)>,
    /// Holds placed: each becomes an item of its own.
    pub placed: Vec<Hold>,
    /// Holds closed: their items are removed.
    pub closed: Vec<Hold>,
    /// Generations created by this commit, indexed globally so the generation service can
    /// settle them by id alone.
    pub new_generations: Vec<GenerationId>,
}

impl Commit {
    pub fn expected_version(&self) -> u64 {
        self.state.version - 1
    }

    /// How many items the commit writes or removes (one store transaction).
    pub fn items(&self) -> usize {
        2 + self.entries.len()
            + self.generations.len()
            + self.placed.len()
            + self.closed.len()
            + self.new_generations.len()
    }

    /// Refuses, before anything is sent, a commit DynamoDB would refuse as one transaction
    /// (a workspace's first commit also writes its status-index marker). Every store checks
    /// it, so tests on the embedded store find a path that would fail in AWS.
    pub fn check_size(&self) -> Result<(), CommitError> {
        let first = self.expected_version() == 0;
        if self.items() + usize::from(first) > MAX_COMMIT_ITEMS {
            return Err(CommitError::Store(StoreError::backend(format!(
                "a commit of {} items exceeds one transaction",
                self.items()
            ))));
        }
        Ok(())
    }
}

/// A generation as stored, with its open hold while it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGeneration {
    pub record: Generation,
    pub hold: Option<Hold>,
}

/// What an operation reads before it runs, in one round trip.
#[derive(Debug, Clone, Default)]
pub struct OpRead {
    pub state: Option<WorkspaceState>,
    pub idempotency: Option<IdempotencyRecord>,
    pub generation: Option<StoredGeneration>,
}

/// Filters for creation history, newest first.
#[derive(Debug, Clone, Default)]
pub struct GenerationQuery {
    /// Only generations older than this one (the cursor).
    pub before: Option<GenerationId>,
    pub status: Option<GenerationStatus>,
    pub model: Option<String>,
    /// Only generations started by this member (the token's subject).
    pub started_by: Option<String>,
    pub workflow: Option<crate::catalog::Workflow>,
    /// Only generations created at or after this instant.
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Only generations created before this instant.
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    pub limit: usize,
}

/// How far out of creation order a generation's `created_at` may be (clocks of concurrent
/// writers): a newest-first scan for generations from `from` on may stop at a generation
/// older than `from` by this much.
pub const CREATION_ORDER_SLACK: chrono::Duration = chrono::Duration::minutes(5);

impl GenerationQuery {
    /// Where a newest-first read starts (exclusive): below the cursor, and below every
    /// generation made after `to` (a generation's id is never later than its creation,
    /// beyond the clocks' slack), so a range in the past reads none of what came since.
    pub fn upper(&self) -> Option<GenerationId> {
        let to = self
            .to
            .and_then(|to| to.checked_add_signed(CREATION_ORDER_SLACK))
            .map(GenerationId::after_all_made_by);
        match (self.before, to) {
            (Some(b), Some(t)) => Some(b.min(t)),
            (b, t) => b.or(t),
        }
    }

    /// Whether a newest-first scan can stop at `g`: everything after it is older than
    /// the range.
    pub fn past_range(&self, g: &Generation) -> bool {
        self.from.is_some_and(|from| {
            from.checked_sub_signed(CREATION_ORDER_SLACK)
                .is_some_and(|low| g.created_at < low)
        })
    }
}

/// What a scan does with an item it read.
pub(crate) enum Scan<T> {
    Keep(T),
    Skip,
    /// Nothing further can match.
    Stop,
}

/// A page of journal entries, newest first.
#[derive(Debug, Clone, Default)]
pub struct EntryQuery {
    /// Only entries with a sequence number below this (the cursor).
    pub before: Option<u64>,
    pub limit: usize,
}

/// Persistence for ledger workspaces, journals, idempotency records and generations.
#[async_trait]
pub trait LedgerStore: Send + Sync {
    async fn load(&self, workspace: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError>;
    /// The state, the idempotency record of `key` and (when named) a generation with its
    /// open hold, in one round trip (one consistent `BatchGetItem`).
    async fn read_op(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
        generation: Option<GenerationId>,
    ) -> Result<OpRead, StoreError>;
    /// Open holds in deadline order, those ending at or before `until` (every one when
    /// `None`), at most `limit`.
    async fn open_holds(
        &self,
        workspace: &WorkspaceId,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<Hold>, StoreError>;
    async fn commit(&self, commit: Commit) -> Result<(), CommitError>;
    async fn idempotency(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    async fn generation(
        &self,
        workspace: &WorkspaceId,
        id: GenerationId,
    ) -> Result<Option<Generation>, StoreError>;
    /// Which workspace a generation belongs to.
    async fn generation_owner(&self, id: GenerationId) -> Result<Option<WorkspaceId>, StoreError>;
    async fn generations(
        &self,
        workspace: &WorkspaceId,
        query: &GenerationQuery,
    ) -> Result<Vec<Generation>, StoreError>;
    async fn entries(
        &self,
        workspace: &WorkspaceId,
        query: &EntryQuery,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Specific entries by sequence number (missing ones are skipped).
    async fn entries_by_seq(
        &self,
        workspace: &WorkspaceId,
        seqs: &[u64],
    ) -> Result<Vec<Entry>, StoreError>;
}

/// Milliseconds since the epoch, zero-padded so hold items sort by deadline as text.
pub(crate) fn deadline_key(at: DateTime<Utc>) -> String {
    format!("{:015}", at.timestamp_millis().max(0))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::decode(Context::new(format!("encoding {}", type_name::<T>()), e)))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::decode(Context::new(format!("decoding {}", type_name::<T>()), e)))
}

/// The last path segment of a type's name (`WorkspaceState`, not `tally::ledger::...`), to
/// say what failed to encode or decode.
fn type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

/// Whether a generation passes the filters of `q` (not its cursor or limit).
pub fn matches_query(g: &Generation, q: &GenerationQuery) -> bool {
    q.status.is_none_or(|s| g.status == s)
        && q.model.as_ref().is_none_or(|m| &g.estimate.model == m)
        && q.started_by.as_ref().is_none_or(|m| &g.started_by == m)
        && q.workflow.is_none_or(|w| g.estimate.workflow == w)
        && q.from.is_none_or(|from| g.created_at >= from)
        && q.to.is_none_or(|to| g.created_at < to)
}
