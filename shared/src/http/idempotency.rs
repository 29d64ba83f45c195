//! `Idempotency-Key` for mutating routes that are not single ledger operations (checkout,
//! subscription changes, add-ons, cancel/resume/pause, portal, custom payments): the same
//! key with the same body answers the first result without doing anything again; the same
//! key with a different body is a 409 `conflict`. Ledger routes get the same behaviour from
//! the ledger's own idempotency records.
//!
//! The key is claimed (a conditional write of the request's fingerprint) before any work,
//! so two requests under one key never both reach Stripe: while the first runs, a twin with
//! the same body is told to retry shortly and one with another body gets its 409 at once.
//! The answer is kept only once the work succeeded; a failure releases the claim, so a
//! retry does the work again, with the same Stripe idempotency key (derived from the
//! client's key). A claim left by a process that died is taken over after
//! [`CLAIM_SECONDS`] by the same request only: that process may have done its work (a
//! change made at Stripe whose answer was lost), so another body under the key is a 409
//! whether the key's first request succeeded, failed or died; unless it was refused (a
//! 4xx answer), which leaves the key free for the corrected request.

use super::Problem;
use crate::billing::records::workspace_pk;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::service::fingerprint;
use crate::store::docs::{self, DocStore};
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Sort-key prefix of remembered answers, under the workspace's partition.
pub const ANSWER_PREFIX: &str = "ANSWER#";

/// How long a claim without an answer blocks its key: longer than any request may run
/// (the API's own timeout is 30 s).
pub const CLAIM_SECONDS: i64 = 60;

/// A claimed key, and its answer once the work succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    fingerprint: String,
    #[serde(default)]
    answer: Option<serde_json::Value>,
    /// When the claim was made (or released: then it is already stale).
    at: DateTime<Utc>,
    /// Tells this request's claim from a twin's.
    claim: String,
    /// Released after the work refused the request (a 4xx but a 409: bad input, a missing
    /// resource, a limit), and never after a failure: the key is free for a corrected
    /// request, another body included.
    #[serde(default)]
    refused: bool,
    /// Released after a failure (a 5xx, a 409: the work may have been done, at Stripe or
    /// here): the key stays this body's for good.
    #[serde(default)]
    failed: bool,
}

enum Seen<T> {
    Replay(T),
    Free,
}

fn judge<T: DeserializeOwned>(
    seen: &Answer,
    print: &str,
    now: DateTime<Utc>,
) -> Result<Seen<T>, Problem> {
    // Never another body under a key once used: a claim whose request died may have done
    // its work (a change made at Stripe, its answer lost), so its key stays its own. A
    // request refused (4xx) is the exception: the client corrects it under the same key.
    if seen.fingerprint != print && !reusable(seen, now) {
        return Err(Problem::conflict(
            "this Idempotency-Key was already used for a different request; send this one under a new key",
        ));
    }
    match &seen.answer {
        Some(a) => serde_json::from_value(a.clone())
            .map(Seen::Replay)
            .map_err(|_| Problem::internal()),
        None if stale(seen, now) => Ok(Seen::Free),
        None => Err(in_progress()),
    }
}

/// A twin request holds the key. It is answered, or its claim released, as soon as it
/// ends (usually within a second), so a retry a second later is worth it.
fn in_progress() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "conflict",
        "a request with this Idempotency-Key is still in progress; retry shortly",
    )
    .with_retry_after(1)
}

fn stale(seen: &Answer, now: DateTime<Utc>) -> bool {
    seen.answer.is_none() && now - seen.at >= Duration::seconds(CLAIM_SECONDS)
}

/// Released after a refusal: free for any body. (What the refused work may have asked of
/// Stripe was under the Stripe key derived from this one: Stripe refuses that key for
/// other parameters, so a corrected request can never make a second change there.)
fn reusable(seen: &Answer, now: DateTime<Utc>) -> bool {
    seen.refused && stale(seen, now)
}

/// Runs `work` once per `key` (when the client sent one) and remembers its answer.
/// `request` is everything that identifies the request: the route's body and, where it
/// matters, the caller. The answer must not be JSON `null` (a unit answer would read as a
/// claim still in progress): remember something, such as the id of what was decided.
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
    let claim = ulid::Ulid::new().to_string();
    let mine = Answer {
        fingerprint: print.clone(),
        answer: None,
        at: now,
        claim: claim.clone(),
        refused: false,
        failed: false,
    };
    // Claim the key, unless it is answered, taken by another live request, or used for
    // another body; the versioned write makes one of two racing claims win.
    let after = docs::update(store, &pk, &sk, |cur: Option<Answer>| match &cur {
        None => Some(mine.clone()),
        // Taken over, it keeps whether the key's work ever failed.
        Some(seen) if stale(seen, now) && (seen.fingerprint == print || reusable(seen, now)) => {
            Some(Answer {
                // A claim never released (its process died) may have done its work.
                failed: seen.failed || !seen.refused,
                ..mine.clone()
            })
        }
        Some(_) => None,
    })
    .await?
    .ok_or_else(Problem::internal)?;
    if after.claim != claim {
        return match judge(&after, &print, now)? {
            Seen::Replay(t) => Ok(t),
            // Free again already (a twin released it between our read and write).
            Seen::Free => Err(in_progress()),
        };
    }
    let outcome = work().await;
    let value = match &outcome {
        Ok(out) => Some(serde_json::to_value(out).map_err(|_| Problem::internal())?),
        Err(_) => None,
    };
    // A 409 may say the work was done before (Stripe knows the key from an earlier
    // attempt; a claim written before a failure): not a refusal that frees the key.
    let refused = matches!(&outcome, Err(p)
        if p.status.is_client_error() && p.status != StatusCode::CONFLICT);
    // Keep the answer, or release the claim (dated in the past, so it is stale at once).
    docs::update(store, &pk, &sk, |cur: Option<Answer>| {
        let cur = cur?;
        (cur.claim == claim).then(|| Answer {
            answer: value.clone(),
            at: if value.is_some() {
                cur.at
            } else {
                cur.at - Duration::seconds(CLAIM_SECONDS)
            },
            refused: value.is_none() && refused && !cur.failed,
            failed: cur.failed || (value.is_none() && !refused),
            ..cur
        })
    })
    .await?;
    outcome
}

/// Partition of the keys staff send to admin routes that act on a workspace they name.
pub const STAFF_KEYS_PK: &str = "STAFF_KEYS";

/// What a staff key was first used for, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StaffKey {
    fingerprint: String,
    /// When the claim was made (dated in the past once its request failed: then it is
    /// stale at once, and the same request takes it over).
    at: DateTime<Utc>,
    /// Tells this claim from a twin's.
    #[serde(default)]
    claim: String,
    /// Its request was done: the same request again replays it, any other is a 409.
    #[serde(default)]
    answered: bool,
    /// Its request was refused (a 4xx, a 409 included: nothing was done under this
    /// claim): free for any request again.
    #[serde(default)]
    released: bool,
}

/// Staff keys name one request whatever workspace it names: the same key sent for another
/// workspace (or another request) is a 409, as for a customer's key, though each
/// workspace keeps its own records of what was done. Claimed (`STAFF_KEYS` /
/// `<scope>#<key>`) with the request's fingerprint, the workspace included, before
/// anything is done: the same request again, once done, passes (its route replays it);
/// while a twin runs it waits; another request is a 409. Answers the claim this request
/// holds, if it made one, and whether it is the key's first (not one taken over from a
/// failed attempt, whose work may have been done).
async fn staff_key(
    store: &dyn DocStore,
    sk: &str,
    print: &str,
    now: DateTime<Utc>,
) -> Result<Option<(String, bool)>, Problem> {
    let mut first = false;
    let claim = ulid::Ulid::new().to_string();
    let mine = StaffKey {
        fingerprint: print.to_owned(),
        at: now,
        claim: claim.clone(),
        answered: false,
        released: false,
    };
    let live = |c: &StaffKey| !c.answered && now - c.at < Duration::seconds(CLAIM_SECONDS);
    let stored = docs::update(store, STAFF_KEYS_PK, sk, |cur: Option<StaffKey>| {
        first = cur.as_ref().is_none_or(|c| c.released);
        match &cur {
            None => Some(mine.clone()),
            Some(c) if c.released => Some(mine.clone()),
            // A claim whose request failed or died: the same request takes it over.
            Some(c) if c.fingerprint == print && !c.answered && !live(c) => Some(mine.clone()),
            Some(_) => None,
        }
    })
    .await?
    .ok_or_else(Problem::internal)?;
    if stored.claim == claim {
        return Ok(Some((claim, first)));
    }
    if stored.fingerprint != print {
        return Err(Problem::conflict(
            "this Idempotency-Key was already used for a different request (perhaps for another workspace); send this one under a new key",
        ));
    }
    if live(&stored) {
        return Err(in_progress());
    }
    Ok(None)
}

/// Runs `work` under a staff key ([`staff_key`]): done, the key is the request's for good;
/// refused (a 4xx: nothing was done) at its first claim, it is free for a corrected
/// request, as a ledger refusal leaves its key; failed otherwise (or refused after an
/// attempt that failed, whose work may have been done), the same request may take it over.
pub async fn under_staff_key<T, Fut>(
    store: &dyn DocStore,
    scope: &str,
    key: &IdempotencyKey,
    request: &impl Serialize,
    now: DateTime<Utc>,
    work: Fut,
) -> Result<T, Problem>
where
    Fut: std::future::Future<Output = Result<T, Problem>>,
{
    let sk = format!("{scope}#{key}");
    let print = fingerprint(request);
    let held = staff_key(store, &sk, &print, now).await?;
    let outcome = work.await;
    if let Some((claim, first)) = held {
        let refused = first && matches!(&outcome, Err(p) if p.status.is_client_error());
        let done = outcome.is_ok();
        docs::update(store, STAFF_KEYS_PK, &sk, |cur: Option<StaffKey>| {
            cur.filter(|c| c.claim == claim).map(|c| StaffKey {
                answered: done,
                released: refused,
                at: if done || refused {
                    c.at
                } else {
                    c.at - Duration::seconds(CLAIM_SECONDS)
                },
                ..c
            })
        })
        .await?;
    }
    outcome
}

#[cfg(all(test, feature = "local"))]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap() + Duration::seconds(s)
    }

    #[tokio::test]
    async fn a_refused_request_leaves_its_key_free_for_the_corrected_one() {
        let store = EmbeddedStore::in_memory();
        let ws = WorkspaceId::parse("acme").unwrap();
        let key = IdempotencyKey::client("test", "k1").unwrap();
        let refused: Result<u32, Problem> =
            once(&store, &ws, Some(&key), &"pack_999", t(0), || async {
                Err(Problem::validation("pack", "unknown pack"))
            })
            .await;
        assert_eq!(refused.unwrap_err().status.as_u16(), 422);
        let corrected = once(&store, &ws, Some(&key), &"pack_100", t(1), || async {
            Ok(5u32)
        })
        .await;
        assert_eq!(corrected.unwrap(), 5);
        // Answered: the key is the corrected request's now.
        let other: Result<u32, Problem> =
            once(&store, &ws, Some(&key), &"pack_999", t(2), || async {
                panic!("another body does no work")
            })
            .await;
        assert_eq!(other.unwrap_err().code, "conflict");
        let again: Result<u32, Problem> =
            once(&store, &ws, Some(&key), &"pack_100", t(3), || async {
                panic!("a replay does no work")
            })
            .await;
        assert_eq!(again.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_key_whose_work_failed_or_conflicted_stays_its_bodys_though_refused_later() {
        let store = EmbeddedStore::in_memory();
        let ws = WorkspaceId::parse("acme").unwrap();
        for (n, first) in [
            Problem::internal(),
            Problem::conflict("Stripe knows the key"),
        ]
        .into_iter()
        .enumerate()
        {
            let key = IdempotencyKey::client("test", &format!("k{n}")).unwrap();
            let failed: Result<u32, Problem> =
                once(&store, &ws, Some(&key), &"body", t(0), || async {
                    Err(first)
                })
                .await;
            assert!(failed.is_err());
            // The same body, refused this time: the key is still not free for another.
            let refused: Result<u32, Problem> =
                once(&store, &ws, Some(&key), &"body", t(1), || async {
                    Err(Problem::not_found("gone"))
                })
                .await;
            assert_eq!(refused.unwrap_err().status.as_u16(), 404);
            let other: Result<u32, Problem> =
                once(&store, &ws, Some(&key), &"other", t(2), || async {
                    panic!("another body does no work")
                })
                .await;
            assert_eq!(other.unwrap_err().code, "conflict");
        }
    }

    #[tokio::test]
    async fn a_staff_key_names_one_request_and_a_twin_waits_for_it() {
        let store = EmbeddedStore::in_memory();
        let key = IdempotencyKey::client("test", "t1").unwrap();
        let run = |body: &'static str, at: i64, result: Result<u32, Problem>| {
            let store = &store;
            let key = key.clone();
            async move { under_staff_key(store, "s", &key, &body, t(at), async { result }).await }
        };
        // Refused at its first claim: free for the corrected request.
        let refused = run("x", 0, Err(Problem::validation("credits", "too many"))).await;
        assert_eq!(refused.unwrap_err().status.as_u16(), 422);
        assert_eq!(run("y", 1, Ok(1)).await.unwrap(), 1);
        // Done: the same request passes (its route replays it); another is a 409.
        assert_eq!(run("y", 2, Ok(1)).await.unwrap(), 1);
        assert_eq!(run("x", 3, Ok(2)).await.unwrap_err().code, "conflict");
        // A twin while the first runs waits (a 409 to retry shortly).
        let other = IdempotencyKey::client("test", "t2").unwrap();
        let sk = format!("s#{other}");
        let held = staff_key(&store, &sk, &fingerprint(&"z"), t(10))
            .await
            .unwrap();
        assert!(held.is_some_and(|(_, first)| first));
        let twin = staff_key(&store, &sk, &fingerprint(&"z"), t(11)).await;
        assert_eq!(twin.unwrap_err().retry_after, Some(1));
        // Failed (a 5xx), then refused: the work may have been done, the key stays.
        let key3 = IdempotencyKey::client("test", "t3").unwrap();
        let failed: Result<u32, Problem> =
            under_staff_key(&store, "s", &key3, &"w", t(20), async {
                Err(Problem::internal())
            })
            .await;
        assert!(failed.is_err());
        let refused: Result<u32, Problem> =
            under_staff_key(&store, "s", &key3, &"w", t(21), async {
                Err(Problem::conflict("Stripe knows the key"))
            })
            .await;
        assert!(refused.is_err());
        let other_body: Result<u32, Problem> =
            under_staff_key(&store, "s", &key3, &"v", t(22), async { Ok(3) }).await;
        assert_eq!(other_body.unwrap_err().code, "conflict");
    }

    #[tokio::test]
    async fn a_failure_releases_the_key_and_a_success_is_replayed() {
        let store = EmbeddedStore::in_memory();
        let ws = WorkspaceId::parse("acme").unwrap();
        let key = IdempotencyKey::client("test", "k1").unwrap();
        let failed: Result<u32, Problem> = once(&store, &ws, Some(&key), &"body", t(0), || async {
            Err(Problem::internal())
        })
        .await;
        assert!(failed.is_err());
        // A failed request's key is not free for another body either.
        let other: Result<u32, Problem> = once(&store, &ws, Some(&key), &"other", t(1), || async {
            panic!("another body does no work")
        })
        .await;
        assert_eq!(other.unwrap_err().code, "conflict");
        let first = once(&store, &ws, Some(&key), &"body", t(1), || async {
            Ok(7u32)
        })
        .await;
        assert_eq!(first.unwrap(), 7);
        let again: Result<u32, Problem> = once(&store, &ws, Some(&key), &"body", t(2), || async {
            panic!("a replay does no work")
        })
        .await;
        assert_eq!(again.unwrap(), 7);
        let other: Result<u32, Problem> = once(&store, &ws, Some(&key), &"other", t(3), || async {
            panic!("another body does no work")
        })
        .await;
        assert_eq!(other.unwrap_err().code, "conflict");
    }

    #[tokio::test]
    async fn a_key_in_use_refuses_twins_until_its_claim_goes_stale() {
        let store = EmbeddedStore::in_memory();
        let ws = WorkspaceId::parse("acme").unwrap();
        let key = IdempotencyKey::client("test", "k2").unwrap();
        // A claim left by a request that never finished (its process died).
        let pk = workspace_pk(&ws);
        let sk = format!("{ANSWER_PREFIX}{key}");
        docs::update(&store, &pk, &sk, |_: Option<Answer>| {
            Some(Answer {
                fingerprint: fingerprint(&"body"),
                answer: None,
                at: t(0),
                claim: "dead".into(),
                refused: false,
                failed: false,
            })
        })
        .await
        .unwrap();
        for body in ["body", "other"] {
            let twin: Result<u32, Problem> =
                once(&store, &ws, Some(&key), &body, t(10), || async {
                    panic!("no work while the key is claimed")
                })
                .await;
            let twin = twin.unwrap_err();
            assert_eq!(twin.code, "conflict");
            // The same request may retry shortly; one with another body never may.
            let expected = (body == "body").then_some(1);
            assert_eq!(twin.retry_after, expected, "{body}");
        }
        // Stale, the claim is still its request's: the dead process may have done its
        // work, so another body under the key never runs.
        let other: Result<u32, Problem> = once(
            &store,
            &ws,
            Some(&key),
            &"other",
            t(CLAIM_SECONDS + 1),
            || async { panic!("another body does no work") },
        )
        .await;
        let other = other.unwrap_err();
        assert_eq!((other.code, other.retry_after), ("conflict", None));
        let later = once(
            &store,
            &ws,
            Some(&key),
            &"body",
            t(CLAIM_SECONDS + 1),
            || async { Ok(9u32) },
        )
        .await;
        assert_eq!(later.unwrap(), 9);
    }
}
