//! Versioned JSON documents beside the ledger: billing profiles, subscriptions, invoices,
//! payments, customer links, alert settings. Writes are guarded by the document version, so
//! concurrent consumers merge instead of overwriting each other ([`update`]).

use super::StoreError;
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

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
    async fn list_docs(&self, pk: &str, prefix: &str, limit: usize)
    -> Result<Vec<Doc>, StoreError>;
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
