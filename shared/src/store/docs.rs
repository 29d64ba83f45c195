//! Versioned JSON documents beside the ledger: billing profiles, subscriptions, invoices,
//! payments, customer links, alert settings. Writes are guarded by the document version, so
//! concurrent consumers merge instead of overwriting each other ([`update`]).
//!
//! A document can also be filed in the sparse, sharded *due index* ([`DueMark`]): only
//! documents with something due are in it, spread over `DUE#<n>` shards so that the
//! scheduler reads a few small partitions instead of scanning the table, and no shard is a
//! hot partition. The mark is written with the document, under the same version guard, so
//! it can never disagree with the document it belongs to.

use super::StoreError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where a document is filed in the due index: its shard and the time it falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueMark {
    pub shard: u32,
    pub at: DateTime<Utc>,
}

impl DueMark {
    /// The shard's partition value in the index (`DUE#<n>`).
    pub fn shard_key(shard: u32) -> String {
        format!("DUE#{shard}")
    }
}

/// A document found in the due index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDoc {
    pub pk: String,
    pub sk: String,
    pub due: DateTime<Utc>,
}

/// The shard a key belongs to among `shards`: a stable hash (FNV-1a), the same on every
/// host and release, so a document stays in its shard.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// Due times are kept to the millisecond.
pub(crate) fn due_millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::decode(format!("due time {ms} out of range")))
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub pk: String,
    pub sk: String,
    pub body: String,
    pub version: u64,
}

#[async_trait]
pub trait DocStore: Send + Sync {
    async fn get_doc(&self, pk: &str, sk: &str) -> Result<Option<Doc>, StoreError>;
    /// Writes `body` as version `expected + 1`. `expected == 0` means the document must not
    /// exist yet. Returns `false` (writing nothing) when the stored version differs.
    async fn put_doc(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
    ) -> Result<bool, StoreError>;
    /// Documents under `pk` whose sort key starts with `prefix`, highest sort key first.
    async fn list_docs(
        &self,
        pk: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Doc>, StoreError> {
        self.list_docs_before(pk, prefix, None, limit).await
    }
    /// Like [`list_docs`](Self::list_docs), starting below the sort key `before` (not
    /// included) when it is given: the next page after a page that ended at `before`.
    async fn list_docs_before(
        &self,
        pk: &str,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Doc>, StoreError>;
    /// Like [`put_doc`](Self::put_doc), and files the document in the due index under
    /// `due`, or takes it out of the index with `None`.
    async fn put_doc_due(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
        due: Option<DueMark>,
    ) -> Result<bool, StoreError>;
    /// Documents filed in `shard` that are due at or before `until`, earliest first, at
    /// most `limit`. The index may lag a write by a moment (DynamoDB's indexes are
    /// eventually consistent): readers re-read the document itself before acting.
    async fn due_docs(
        &self,
        shard: u32,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDoc>, StoreError>;
}

/// Reads a typed document.
pub async fn get<T: DeserializeOwned>(
    store: &dyn DocStore,
    pk: &str,
    sk: &str,
) -> Result<Option<T>, StoreError> {
    store
        .get_doc(pk, sk)
        .await?
        .map(|d| super::decode(&d.body))
        .transpose()
}

/// Read-modify-write with optimistic concurrency. `merge` gets the current value (if any)
/// and returns the new one, or `None` to leave the document as it is. Returns the value
/// stored afterwards.
pub async fn update<T, F>(
    store: &dyn DocStore,
    pk: &str,
    sk: &str,
    mut merge: F,
) -> Result<Option<T>, StoreError>
where
    T: Serialize + DeserializeOwned + Clone,
    F: FnMut(Option<T>) -> Option<T>,
{
    for attempt in 0..50u32 {
        let current = store.get_doc(pk, sk).await?;
        let (value, version) = match &current {
            Some(d) => (Some(super::decode::<T>(&d.body)?), d.version),
            None => (None, 0),
        };
        let Some(next) = merge(value.clone()) else {
            return Ok(value);
        };
        if store
            .put_doc(pk, sk, &super::encode(&next)?, version)
            .await?
        {
            return Ok(Some(next));
        }
        let wait = fastrand::u64(0..=(2u64 << attempt.min(6)));
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    }
    Err(StoreError::unavailable(format!(
        "document {pk}/{sk} kept changing; gave up"
    )))
}

/// Like [`update`], for a document filed in the due index: `merge` returns the new value
/// and its due mark together (`None` leaves the document as it is).
pub async fn update_due<T, F>(
    store: &dyn DocStore,
    pk: &str,
    sk: &str,
    mut merge: F,
) -> Result<Option<T>, StoreError>
where
    T: Serialize + DeserializeOwned + Clone,
    F: FnMut(Option<T>) -> Option<(T, Option<DueMark>)>,
{
    for attempt in 0..50u32 {
        let current = store.get_doc(pk, sk).await?;
        let (value, version) = match &current {
            Some(d) => (Some(super::decode::<T>(&d.body)?), d.version),
            None => (None, 0),
        };
        let Some((next, due)) = merge(value.clone()) else {
            return Ok(value);
        };
        if store
            .put_doc_due(pk, sk, &super::encode(&next)?, version, due)
            .await?
        {
            return Ok(Some(next));
        }
        let wait = fastrand::u64(0..=(2u64 << attempt.min(6)));
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    }
    Err(StoreError::unavailable(format!(
        "document {pk}/{sk} kept changing; gave up"
    )))
}

/// Like [`update`], but answers the stored value only when this call wrote it: `None` when
/// `merge` left the document as it is (so callers act only on their own change).
pub async fn update_changed<T, F>(
    store: &dyn DocStore,
    pk: &str,
    sk: &str,
    mut merge: F,
) -> Result<Option<T>, StoreError>
where
    T: Serialize + DeserializeOwned + Clone,
    F: FnMut(Option<T>) -> Option<T>,
{
    let mut wrote = false;
    let stored = update(store, pk, sk, |cur| {
        let next = merge(cur);
        wrote = next.is_some();
        next
    })
    .await?;
    Ok(stored.filter(|_| wrote))
}

/// Typed documents under `pk` with sort keys starting with `prefix` and below `before`
/// (when given), highest first, with their sort keys.
pub async fn page<T: DeserializeOwned>(
    store: &dyn DocStore,
    pk: &str,
    prefix: &str,
    before: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, T)>, StoreError> {
    store
        .list_docs_before(pk, prefix, before, limit)
        .await?
        .into_iter()
        .map(|d| Ok((d.sk.clone(), super::decode(&d.body)?)))
        .collect()
}

/// Typed documents under `pk` with sort keys starting with `prefix`, highest first.
pub async fn list<T: DeserializeOwned>(
    store: &dyn DocStore,
    pk: &str,
    prefix: &str,
    limit: usize,
) -> Result<Vec<T>, StoreError> {
    store
        .list_docs(pk, prefix, limit)
        .await?
        .iter()
        .map(|d| super::decode(&d.body))
        .collect()
}
