//! Runs ledger operations exactly once over any [`LedgerStore`].
//!
//! Each attempt reads the idempotency record, the workspace and the generation it settles in
//! one round trip, runs the pure engine and commits everything in one transaction. A commit that finds the idempotency record
//! already written returns the first result; one that finds the workspace changed retries
//! on fresh state with jittered backoff, a bounded number of times.

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::ledger::engine::MAX_HOLDS_SETTLED_PER_OPERATION;
use crate::ledger::{
    Actor, Balance, Command, LedgerError, Operation, Outcome, Refs, WorkspaceState, execute,
};
use crate::store::{
    Commit, CommitError, IdempotencyRecord, LedgerStore, StoreError, StoredGeneration,
};
use chrono::Duration;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use thiserror::Error;

/// How long a client-supplied `Idempotency-Key` is remembered (at least; TTL deletes later).
pub const CLIENT_KEY_RETENTION_HOURS: i64 = 72;

/// Reads settle at most this many overdue holds in view; past that (a workspace whose
/// holds have not been settled for a long time) the balance shows the rest as still held
/// until the credit-refresh sweeper releases them.
pub const MAX_OVERDUE_READ: usize = 10_000;

/// An operation refused for want of credits while more holds are overdue than one
/// transaction releases settles at most this many batches of them first (1,000 holds),
/// bounding its latency; the credit-refresh sweeper releases any rest.
pub const MAX_CATCH_UP_BATCHES: usize = 40;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Refused(#[from] LedgerError),
    #[error("the idempotency key was already used for a different request")]
    KeyReused,
    #[error("the workspace is too busy right now; retry shortly")]
    Contention,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError {
    /// Whether trying the same thing again later can succeed (queue consumers retry these).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ServiceError::Contention | ServiceError::Store(_))
    }
}

/// Bounded retries with full jitter for optimistic-concurrency conflicts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_ms: u64,
    pub cap_ms: u64,
    /// Stop retrying (503 `busy`) once this long has passed since the operation began,
    /// whatever the attempts left: under heavy contention on one workspace 80 attempts can
    /// take longer than a function may run.
    pub budget: Option<std::time::Duration>,
}

impl Default for RetryPolicy {
    /// Full jitter from 100 ms after the first conflict up to 3 s: with many writers on one
    /// workspace, short waits only make more attempts collide (`make bench`, 64 clients on
    /// DynamoDB Local: 6 generations/s with waits of at most 120 ms, 20 with these, and
    /// p50 per request 4.7 s against 0.3 s). One conflict with one other writer costs 50 ms
    /// on average.
    fn default() -> Self {
        Self {
            max_attempts: 80,
            base_ms: 50,
            cap_ms: 3_000,
            budget: None,
        }
    }
}

impl RetryPolicy {
    /// How long to wait before attempt `attempt + 1`: full jitter under a ceiling that
    /// doubles from `2 × base_ms` up to `cap_ms`, and never past what is `left` of the
    /// budget (the last attempt then starts as the budget ends, not up to `cap_ms` later).
    pub fn wait(&self, attempt: u32, left: Option<std::time::Duration>) -> std::time::Duration {
        let ceiling = self
            .base_ms
            .saturating_mul(1u64 << attempt.min(16))
            .min(self.cap_ms);
        let wait = std::time::Duration::from_millis(fastrand::u64(0..=ceiling));
        left.map_or(wait, |left| wait.min(left))
    }
}

/// The retry budget of the Lambda functions: well inside the shortest function timeout
/// (10 s), so a busy workspace is answered 503 `busy` instead of a timed-out invocation.
pub const LAMBDA_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(6);

/// A ledger operation as a caller asks for it.
#[derive(Debug, Clone)]
pub struct LedgerRequest {
    pub workspace: WorkspaceId,
    pub key: IdempotencyKey,
    /// Identifies the request content; see [`fingerprint`].
    pub fingerprint: String,
    pub actor: Actor,
    pub refs: Refs,
    pub op: Operation,
}

/// A stable hash of a request body, so a reused key with a different body is caught.
pub fn fingerprint(value: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The balance an operation starts from, for the observer: the stored one, or the one
/// after the operation's own settlement if that is higher (holds past their deadline count
/// as held in the stored state until an operation releases them, while reads show them
/// released). A threshold either was at or above is crossed when the operation leaves the
/// balance below it: one the stored balance was already below but reads were not (an
/// overdue hold's release re-armed it), and one a lapsed lot crossed that no operation has
/// recorded yet. Only the holds the operation itself releases count, so a backlog of
/// overdue holds beyond one operation's share never shows a drop that is not there.
fn balance_before(stored: Balance, settled: Balance) -> Before {
    Before {
        balance: if settled.available > stored.available {
            settled
        } else {
            stored
        },
        settled,
    }
}

/// The balances a committed operation started from, for its observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    /// What credit alerts compare with (see `balance_before`): a drop through a threshold
    /// from here alerts, lapsed lots the operation expired included.
    pub balance: Balance,
    /// The balance once the operation's own settlement ran (overdue holds released, lapsed
    /// lots expired), before the operation itself: a drop from here is the operation's own
    /// doing (a generation's hold or charge), not credits expiring, whichever operation
    /// happens to record their lapse first.
    pub settled: Balance,
}

/// Told about every committed ledger operation, once (not about replays; a commit the store
/// could not confirm is told when the retry finds that it landed).
#[async_trait::async_trait]
pub trait CommitObserver: Send + Sync {
    async fn committed(
        &self,
        workspace: &WorkspaceId,
        before: Before,
        after: &WorkspaceState,
        outcome: &Outcome,
    );
}

/// The ledger service shared by every function.
#[derive(Clone)]
pub struct Ledger {
    pub store: Arc<dyn LedgerStore>,
    pub clock: Arc<dyn Clock>,
    pub catalog: Arc<Catalog>,
    pub retry: RetryPolicy,
    /// Told about each committed operation (credit alerts, auto top-up).
    pub observer: Option<Arc<dyn CommitObserver>>,
}

impl Ledger {
    pub fn new(store: Arc<dyn LedgerStore>, clock: Arc<dyn Clock>, catalog: Arc<Catalog>) -> Self {
        Self {
            store,
            clock,
            catalog,
            retry: RetryPolicy::default(),
            observer: None,
        }
    }

    /// Applies an operation at most once and returns its (first) outcome.
    ///
    /// The common path is one read round trip (state, idempotency record and the
    /// generation it settles, together) and one transaction. Settling overdue holds reads
    /// the holds that end first as well; a refusal re-reads the idempotency record.
    #[tracing::instrument(skip_all, fields(workspace = %req.workspace, key = %req.key))]
    pub async fn execute(&self, req: LedgerRequest) -> Result<Outcome, ServiceError> {
        let deadline = self.retry.budget.map(|b| std::time::Instant::now() + b);
        self.execute_until(req, deadline).await
    }

    /// [`execute`](Self::execute) giving up with `busy` at `deadline`: the catch-up batches
    /// an operation runs first share its deadline.
    async fn execute_until(
        &self,
        req: LedgerRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<Outcome, ServiceError> {
        let mut measure = Measure::default();
        let result = self.run(&req, &mut measure, deadline).await;
        measure.emit(&req, &result);
        result
    }

    async fn run(
        &self,
        req: &LedgerRequest,
        measure: &mut Measure,
        deadline: Option<std::time::Instant>,
    ) -> Result<Outcome, ServiceError> {
        let target = match &req.op {
            Operation::Complete { generation, .. }
            | Operation::Fail { generation, .. }
            | Operation::Reverse { generation, .. }
            | Operation::RetireModel { generation } => Some(*generation),
            _ => None,
        };
        let spent = || deadline.is_some_and(|d| std::time::Instant::now() >= d);
        let retry = |conflicts: &mut u32| {
            *conflicts += 1;
            if *conflicts >= self.retry.max_attempts || spent() {
                tracing::warn!(conflicts = *conflicts, "giving up after repeated conflicts");
                return Err(ServiceError::Contention);
            }
            Ok(())
        };
        let mut catch_up = 0usize;
        let mut rereads = 0u32;
        // Commits whose outcome the store could not tell (a timeout, a 5xx): what each
        // wrote, so that finding exactly one of those records later shows it landed (an
        // earlier attempt may land after a later one was sent).
        let mut unsure: Vec<(
            IdempotencyRecord,
            Before,
            WorkspaceState,
            Vec<crate::ledger::Entry>,
        )> = Vec::new();
        loop {
            if measure.conflicts > 0 {
                let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
                tokio::time::sleep(self.retry.wait(measure.conflicts, left)).await;
            }
            let read = self.store.read_op(&req.workspace, &req.key, target).await?;
            if let Some(record) = read.idempotency {
                if let Some((_, before, after, entries)) =
                    unsure.iter().find(|(attempted, ..)| *attempted == record)
                {
                    // This request's own commit landed although the store said it was
                    // unsure: the observer has not been told yet (a crossing would
                    // otherwise go unalerted for good).
                    measure.committed(entries);
                    if let Some(observer) = &self.observer {
                        observer
                            .committed(&req.workspace, *before, after, &record.outcome)
                            .await;
                    }
                }
                return replayed(req, record);
            }
            let mut state = read
                .state
                .unwrap_or_else(|| WorkspaceState::new(req.workspace.clone()));
            let mut op = req.op.clone();
            let stored = read.generation;
            let own_hold = stored
                .as_ref()
                .is_some_and(|g| g.record.status == crate::ledger::GenerationStatus::Held);
            let now = self.clock.now();
            let needs_free = needs_free_credits(&req.op, stored.as_ref(), now);
            if let Some(hold) = stored.as_ref().and_then(|g| g.hold.as_ref()) {
                if hold.placed_seq >= state.next_seq {
                    // The generation was read after a hold the state does not show yet
                    // (the reads are not one snapshot): read again.
                    retry(&mut measure.conflicts)?;
                    continue;
                }
                state.load_holds([hold.clone()]);
            }
            if let Operation::Complete { record, .. }
            | Operation::Fail { record, .. }
            | Operation::Reverse { record, .. } = &mut op
            {
                *record = stored.map(|g| g.record);
            }
            let due = self.load_due(&mut state, now).await?;
            // More holds are overdue than this transaction releases (the generation service
            // was down for a while).
            let backlog = due.flatten().is_some_and(|next| next <= now);
            if backlog && needs_free {
                // These take what is free without being refused (a late completion, a
                // completion above its estimate, a refund's or dispute's share): with a
                // backlog they would take too little, so it is released first. A completion
                // its own hold pays for is not split from its release: it runs at once.
                if catch_up >= MAX_CATCH_UP_BATCHES || spent() {
                    return Err(ServiceError::Contention);
                }
                catch_up += 1;
                self.settle_batch(&req.workspace, state.version, deadline)
                    .await?;
                continue;
            }
            let cmd = Command {
                key: req.key.clone(),
                at: now,
                actor: req.actor.clone(),
                refs: req.refs.clone(),
                op,
            };
            let applied = match execute(&state, &cmd, &self.catalog) {
                Ok(applied) => applied,
                Err(LedgerError::Corrupt(m)) if own_hold && rereads < 3 => {
                    // The generation (with its hold) was read before a concurrent operation
                    // closed that hold, the state after it: the reads are not one snapshot,
                    // so read again rather than close the hold twice. Real corruption stays
                    // corrupt and is reported after a few reads.
                    tracing::info!(error = %m, "generation read before its hold closed; reading again");
                    rereads += 1;
                    retry(&mut measure.conflicts)?;
                    continue;
                }
                Err(LedgerError::ModelInTraining(g)) if own_hold && rereads == 0 => {
                    // The same torn read: the state after the training's completion, its
                    // generation before it (still held). Read again once: a read that starts
                    // after the completion was seen sees the generation completed; a model
                    // still training is refused by the next read as well.
                    tracing::info!(generation = %g, "training read before it completed; reading again");
                    rereads += 1;
                    retry(&mut measure.conflicts)?;
                    continue;
                }
                Err(
                    LedgerError::InsufficientCredits { .. } | LedgerError::NoCustomModelSlot { .. },
                ) if backlog => {
                    // Credits (or a custom-model slot) may be waiting in overdue holds this
                    // transaction cannot all release: release them a batch per transaction,
                    // then try again, so the answer agrees with the balance a read shows.
                    // Out of time or of batches, the answer is `busy` (a retry goes on
                    // releasing them), not a refusal the backlog may not deserve.
                    if catch_up >= MAX_CATCH_UP_BATCHES || spent() {
                        return Err(ServiceError::Contention);
                    }
                    catch_up += 1;
                    self.settle_batch(&req.workspace, state.version, deadline)
                        .await?;
                    continue;
                }
                Err(refusal) => {
                    // A concurrent twin of this request may have succeeded in between;
                    // its result, not this refusal, is the answer.
                    if let Some(done) = self.replay(req).await? {
                        return Ok(done);
                    }
                    tracing::info!(error = %refusal, "operation refused");
                    return Err(refusal.into());
                }
            };
            let mut new_state = applied.state;
            new_state.version = state.version + 1;
            if let Some(horizon) = due {
                new_state.next_due = earliest_deadline(&new_state, horizon);
            }
            let new_generations = match &cmd.op {
                Operation::Hold { generation, .. } => vec![*generation],
                _ => Vec::new(),
            };
            let before = balance_before(state.balance(), applied.settled);
            let after = new_state.clone();
            let commit_entries = applied.entries.clone();
            let record = IdempotencyRecord {
                key: req.key.clone(),
                fingerprint: req.fingerprint.clone(),
                outcome: applied.outcome.clone(),
                created_at: now,
                expires_at: req
                    .key
                    .is_client()
                    .then(|| now + Duration::hours(CLIENT_KEY_RETENTION_HOURS)),
            };
            let commit = Commit {
                state: new_state,
                entries: applied.entries,
                idempotency: record.clone(),
                generations: applied.generations,
                placed: applied.placed,
                closed: applied.closed,
                new_generations,
            };
            match self.store.commit(commit).await {
                Ok(()) => {
                    tracing::info!(entries = ?applied.outcome.entries, "operation applied");
                    measure.committed(&commit_entries);
                    if let Some(observer) = &self.observer {
                        observer
                            .committed(&req.workspace, before, &after, &applied.outcome)
                            .await;
                    }
                    return Ok(applied.outcome);
                }
                Err(CommitError::Duplicate) => continue,
                Err(CommitError::GenerationExists) => {
                    if let Some(done) = self.replay(req).await? {
                        return Ok(done);
                    }
                    if let Operation::Hold { generation, .. } = &req.op {
                        return Err(LedgerError::GenerationExists(*generation).into());
                    }
                    retry(&mut measure.conflicts)?;
                }
                // A transient failure may or may not have committed: the next attempt
                // re-reads the idempotency record first, so retrying cannot apply twice.
                Err(CommitError::Store(StoreError::Unavailable(_))) => {
                    unsure.push((record, before, after, commit_entries));
                    retry(&mut measure.conflicts)?;
                }
                Err(CommitError::Conflict) => {
                    retry(&mut measure.conflicts)?;
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
            }
        }
    }

    /// Releases one transaction's worth of overdue holds, under a key naming the state
    /// version it starts from (a concurrent twin doing the same is a replay).
    async fn settle_batch(
        &self,
        workspace: &WorkspaceId,
        version: u64,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), ServiceError> {
        let settle = LedgerRequest {
            workspace: workspace.clone(),
            key: IdempotencyKey::derived(format!("settle:overdue:{version}")),
            fingerprint: "settle".into(),
            actor: Actor::system(),
            refs: Refs::default(),
            op: Operation::Settle,
        };
        // An operation of its own (its own retries and metrics, the caller's deadline): it
        // commits on its own.
        Box::pin(self.execute_until(settle, deadline))
            .await
            .map(|_| ())
    }

    async fn replay(&self, req: &LedgerRequest) -> Result<Option<Outcome>, ServiceError> {
        match self.store.idempotency(&req.workspace, &req.key).await? {
            Some(record) => replayed(req, record).map(Some),
            None => Ok(None),
        }
    }

    /// When a hold may be overdue, reads the holds that end first (one transaction's worth
    /// and one more) into `state`. Returns `None` when nothing was read, or the deadline
    /// no unread hold ends before (`Some(None)`: every open hold was read).
    async fn load_due(
        &self,
        state: &mut WorkspaceState,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Option<chrono::DateTime<chrono::Utc>>>, ServiceError> {
        if !state.holds_due(now) {
            return Ok(None);
        }
        let want = MAX_HOLDS_SETTLED_PER_OPERATION + 1;
        let holds = self.store.open_holds(&state.workspace, None, want).await?;
        // Hold items sort by deadline to the millisecond: an unread hold may end earlier
        // within the last one's millisecond, so the bound is that millisecond's start.
        let horizon = (holds.len() >= want)
            .then(|| holds.last().map(|h| h.deadline))
            .flatten()
            .map(|d| chrono::DateTime::from_timestamp_millis(d.timestamp_millis()).unwrap_or(d));
        state.load_holds(holds);
        Ok(Some(horizon))
    }

    /// What an operation would do if it were asked now, without doing it: the refusal the
    /// real request would get, or its outcome. Nothing is written; estimates use it so they
    /// say exactly what starting the generation would say.
    pub async fn preview(
        &self,
        workspace: &WorkspaceId,
        actor: Actor,
        op: Operation,
    ) -> Result<Result<Outcome, LedgerError>, ServiceError> {
        let mut state = self
            .store
            .load(workspace)
            .await?
            .unwrap_or_else(|| WorkspaceState::new(workspace.clone()));
        let now = self.clock.now();
        // As the real request would see it after releasing the backlog of overdue holds it
        // would release first.
        if state.holds_due(now) {
            let overdue = self
                .store
                .open_holds(
                    workspace,
                    Some(now),
                    (MAX_CATCH_UP_BATCHES + 1) * MAX_HOLDS_SETTLED_PER_OPERATION,
                )
                .await?;
            state.load_holds(overdue);
            state = state.settled_at(now)?;
        }
        let cmd = Command {
            key: IdempotencyKey::derived("preview".into()),
            at: now,
            actor,
            refs: Refs::default(),
            op,
        };
        Ok(execute(&state, &cmd, &self.catalog).map(|applied| applied.outcome))
    }

    /// The workspace as it stands now, with overdue holds and lapsed lots settled in the view.
    pub async fn workspace_now(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<WorkspaceState, ServiceError> {
        let mut state = self
            .store
            .load(workspace)
            .await?
            .unwrap_or_else(|| WorkspaceState::new(workspace.clone()));
        let now = self.clock.now();
        if state.holds_due(now) {
            let overdue = self
                .store
                .open_holds(workspace, Some(now), MAX_OVERDUE_READ)
                .await?;
            state.load_holds(overdue);
        }
        Ok(state.settled_at(now)?)
    }
}

/// Whether the operation takes free credits without being refused when there are too
/// few, so that a backlog of overdue holds would make it take too little: a refund's or
/// dispute's share, a completion whose hold has lapsed or is overdue (it is released
/// before the completion charges), and a completion above what its hold keeps. A completion
/// within its own hold, before its deadline, needs nothing free.
fn needs_free_credits(
    op: &Operation,
    stored: Option<&StoredGeneration>,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    match op {
        Operation::TakeBack { .. }
        | Operation::ChangeCredited { .. }
        | Operation::Freeze { .. } => true,
        Operation::Complete { credits, .. } => match stored {
            Some(g) => match (&g.record.status, &g.hold) {
                (crate::ledger::GenerationStatus::Held, Some(hold)) => {
                    hold.deadline <= now || credits.is_some_and(|c| c > hold.amount)
                }
                // A hold kept inside the state item by an earlier release.
                (crate::ledger::GenerationStatus::Held, None) => true,
                (crate::ledger::GenerationStatus::Expired, _) => true,
                _ => false,
            },
            None => false,
        },
        _ => false,
    }
}

/// What one ledger request did, for the operational metrics.
#[derive(Default)]
struct Measure {
    /// Attempts lost to a concurrent writer (or a transient store failure) and retried.
    conflicts: u32,
    committed: bool,
    granted: u64,
    spent: u64,
    entries: u64,
}

impl Measure {
    fn committed(&mut self, entries: &[crate::ledger::Entry]) {
        self.committed = true;
        self.entries = entries.len() as u64;
        for e in entries {
            self.granted += e.totals.issued.get();
            self.spent += e.totals.spent.get();
        }
    }

    fn emit(&self, req: &LedgerRequest, result: &Result<Outcome, ServiceError>) {
        if let Err(ServiceError::Refused(e @ LedgerError::Corrupt(_))) = result {
            // Whoever asked (an API route, a queue worker, the refresh), someone is paged.
            tracing::error!(workspace = %req.workspace, key = %req.key, error = %e, "ledger invariant broken");
        }
        let outcome = match result {
            Ok(_) if self.committed => "applied",
            Ok(_) => "replayed",
            Err(ServiceError::Refused(LedgerError::Corrupt(_))) => "corrupt",
            Err(ServiceError::Refused(_)) => "refused",
            Err(ServiceError::KeyReused) => "key_reused",
            Err(ServiceError::Contention) => "busy",
            Err(ServiceError::Store(_)) => "store_error",
        };
        crate::metrics::Record::new(req.op.kind())
            .count("LedgerOperations", 1)
            .count("Conflicts", u64::from(self.conflicts))
            .count("Refusals", u64::from(outcome == "refused"))
            .count("Corrupt", u64::from(outcome == "corrupt"))
            .count("Busy", u64::from(outcome == "busy"))
            .count("Replays", u64::from(outcome == "replayed"))
            .count("CreditsGranted", self.granted)
            .count("CreditsSpent", self.spent)
            .count("JournalEntries", self.entries)
            .property("outcome", outcome)
            .property("workspace", req.workspace.as_str())
            .property("key", req.key.to_string())
            .emit();
    }
}

/// The answer remembered under the request's key, if it was this request.
/// A completion is the same request as the first when it asks for the same cost, whether it
/// names the amount or leaves the estimate as the default: the cost it asks for is compared
/// with the one the first recorded (charged plus shortfall).
fn replayed(req: &LedgerRequest, record: IdempotencyRecord) -> Result<Outcome, ServiceError> {
    if record.fingerprint == req.fingerprint {
        return Ok(record.outcome);
    }
    if let (
        Operation::Complete {
            generation,
            credits,
            ..
        },
        Some(g),
    ) = (&req.op, &record.outcome.generation)
        && g.id == *generation
        && g.status == crate::ledger::GenerationStatus::Completed
        && g.charged.checked_add(g.shortfall) == Some(credits.unwrap_or(g.estimate.credits))
    {
        return Ok(record.outcome);
    }
    Err(ServiceError::KeyReused)
}

/// The earliest deadline of the open holds after a settlement read the holds that end
/// first: the earliest of those still open, bounded by `horizon` (no hold it did not read
/// ends before that).
fn earliest_deadline(
    state: &WorkspaceState,
    horizon: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    if state.open_holds == 0 {
        return None;
    }
    state
        .known_holds()
        .map(|h| h.deadline)
        .chain(horizon)
        .min()
        .or(state.next_due)
}

/// The fingerprint of every request under a generation's reversal key.
pub const REVERSE_FINGERPRINT: &str = "reverse";

/// Gives back the charge of a completed generation whose output was faulty, once: every
/// caller (support staff, the generation service, support intake's remediation) uses the
/// key derived from the generation alone, so a second request, whatever its reason,
/// answers with the first result and never credits twice.
pub async fn reverse_generation(
    ledger: &Ledger,
    workspace: WorkspaceId,
    generation: crate::ids::GenerationId,
    actor: Actor,
    reason: String,
    ticket: Option<String>,
) -> Result<Outcome, ServiceError> {
    ledger
        .execute(LedgerRequest {
            workspace,
            key: IdempotencyKey::derived(format!("gen:{generation}:reverse")),
            fingerprint: REVERSE_FINGERPRINT.into(),
            actor,
            refs: Refs {
                ticket,
                ..Refs::default()
            },
            op: Operation::Reverse {
                generation,
                record: None,
                reason,
            },
        })
        .await
}
