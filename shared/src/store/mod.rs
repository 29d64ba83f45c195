//! The `LedgerStore` port and its adapters: DynamoDB in production, redb embedded locally
//! (behind the `local` feature, so the Lambda binaries carry neither it nor redb).
//!
//! A commit is all-or-nothing: the new workspace state (guarded by its version), the journal
//! entries (each written only if absent), the idempotency record (written only if absent)
//! and the generation records. A commit that loses a race reports which guard failed so the
//! caller can tell "someone already did exactly this" from "try again on fresh state".

pub mod docs;
pub mod dynamo;
#[cfg(feature = "local")]
pub mod embedded;

pub use docs::{Doc, DocStore, DueDoc, DueMark};

use crate::error::{BoxError, Context};
use crate::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use crate::ledger::{Entry, Generation, GenerationStatus, Outcome, WorkspaceState};
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

/// Everything one ledger operation writes.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The new state; its `version` is the stored version plus one.
    pub state: WorkspaceState,
    pub entries: Vec<Entry>,
    pub idempotency: IdempotencyRecord,
    pub generations: Vec<Generation>,
    /// Generations created by this commit, indexed globally so the generation service can
    /// settle them by id alone.
    pub new_generations: Vec<GenerationId>,
}

impl Commit {
    pub fn expected_version(&self) -> u64 {
        self.state.version - 1
    }
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
