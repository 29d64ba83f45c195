//! `Idempotency-Key` for mutating routes that are not single ledger operations (checkout,
//! subscription changes, add-ons, cancel/resume/pause, portal, custom payments): the same
//! key with the same body answers the first result without doing anything again; the same
//! key with a different body is a 409 `conflict`. Ledger routes get the same behaviour from
//! the ledger's own idempotency records.
//!
//! The answer is remembered only after the work succeeded, so a retry after an error does
//! the work again; that is safe because every call to Stripe carries a Stripe idempotency
//! key derived from the client's key, and every grant a ledger key derived from its cause.

use super::Problem;
use crate::billing::records::workspace_pk;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::service::fingerprint;
use crate::store::docs::{self, DocStore};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Sort-key prefix of remembered answers, under the workspace's partition.
pub const ANSWER_PREFIX: &str = "ANSWER#";

/// A remembered answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    fingerprint: String,
    answer: serde_json::Value,
    at: DateTime<Utc>,
}

/// Runs `work` once per `key` (when the client sent one) and remembers its answer.
/// `request` is everything that identifies the request: the route's body and, where it
/// matters, the caller.
pub async fn once<T, F, Fut>(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    key: Option<&IdempotencyKey>,
    request: &impl Serialize,
    now: DateTime<Utc>,
    work: F,
) -> Result<T, Problem>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, Problem>>,
{
    let Some(key) = key else {
        return work().await;
    };
    let pk = workspace_pk(workspace);
    let sk = format!("{ANSWER_PREFIX}{key}");
    let print = fingerprint(request);
    if let Some(seen) = docs::get::<Answer>(store, &pk, &sk).await? {
        return replay(seen, &print);
    }
    let out = work().await?;
    let mine = Answer {
        fingerprint: print.clone(),
        answer: serde_json::to_value(&out).map_err(|_| Problem::internal())?,
        at: now,
    };
    // First writer wins: a concurrent twin that finished first decides the answer.
    let stored = docs::update(store, &pk, &sk, |cur: Option<Answer>| {
        cur.is_none().then(|| mine.clone())
    })
    .await?
    .ok_or_else(Problem::internal)?;
    if stored.fingerprint == mine.fingerprint && stored.at == mine.at {
        return Ok(out);
    }
    replay(stored, &print)
}

fn replay<T: DeserializeOwned>(seen: Answer, print: &str) -> Result<T, Problem> {
    if seen.fingerprint != print {
        return Err(Problem::conflict(
            "this Idempotency-Key was already used for a different request",
        ));
    }
    serde_json::from_value(seen.answer).map_err(|_| Problem::internal())
}
