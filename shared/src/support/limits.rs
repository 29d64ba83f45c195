//! Per-user rate limits: a fixed window counter per user and action, one small document
//! each (`RATE#<action>#<user>` / `WINDOW`), rewritten when a new window starts, so it
//! never grows.

use crate::http::Problem;
use crate::store::{DocStore, docs};
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub per_window: u32,
    pub window: Duration,
}

/// New tickets per user.
pub const TICKETS: Limit = Limit {
    per_window: 10,
    window: Duration::hours(1),
};
/// Messages (on any ticket) per user.
pub const MESSAGES: Limit = Limit {
    per_window: 30,
    window: Duration::hours(1),
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    start: DateTime<Utc>,
    count: u32,
}

/// Counts one `action` by `user` at `now`; a 429 `rate_limited` problem (with
/// `retry_after_seconds`) when the window is full, counting nothing.
pub async fn take(
    store: &dyn DocStore,
    action: &str,
    user: &str,
    limit: Limit,
    now: DateTime<Utc>,
) -> Result<(), Problem> {
    let pk = format!("RATE#{action}#{}", crate::service::fingerprint(&user));
    let mut full_until = None;
    docs::update::<Window, _>(store, &pk, "WINDOW", |cur| {
        full_until = None;
        match cur {
            Some(w) if now < w.start + limit.window && now >= w.start => {
                if w.count >= limit.per_window {
                    full_until = Some(w.start + limit.window);
                    None
                } else {
                    Some(Window {
                        start: w.start,
                        count: w.count + 1,
                    })
                }
            }
            _ => Some(Window {
                start: now,
                count: 1,
            }),
        }
    })
    .await?;
    match full_until {
        None => Ok(()),
        Some(until) => {
            let secs = (until - now).num_seconds().max(1);
            Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "at most {} {action} per {} minutes; try again in {secs} seconds",
                    limit.per_window,
                    limit.window.num_minutes()
                ),
            )
            .with_facts(serde_json::json!({ "retry_after_seconds": secs }))
            .with_retry_after(secs.unsigned_abs()))
        }
    }
}

/// Gives back one `action` that [`take`] counted at `taken_at` and that was then refused
/// (a refusal changes nothing, so it does not count either); nothing when the window
/// `taken_at` fell in has ended meanwhile.
pub async fn give_back(
    store: &dyn DocStore,
    action: &str,
    user: &str,
    limit: Limit,
    taken_at: DateTime<Utc>,
) -> Result<(), Problem> {
    let pk = format!("RATE#{action}#{}", crate::service::fingerprint(&user));
    docs::update::<Window, _>(store, &pk, "WINDOW", |cur| {
        cur.filter(|w| taken_at >= w.start && taken_at < w.start + limit.window && w.count > 0)
            .map(|w| Window {
                start: w.start,
                count: w.count - 1,
            })
    })
    .await?;
    Ok(())
}
