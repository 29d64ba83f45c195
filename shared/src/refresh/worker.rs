//! The scheduler's tick (due shards to jobs) and the worker's job (one workspace): grants
//! the allotments that have come, checks renewals, settles the ledger and files the
//! workspace under its next due time.

use super::jobs::{Job, JobSink};
use super::schedule::{self, AllotmentGrant};
use super::{REFRESH_SK, Reconciliation, RefreshDoc, Settings, reconcile_sk, refresh_doc};
use crate::billing::records::{SUBSCRIPTION_SK, SubscriptionRecord, workspace_pk};
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::ledger::{Actor, ActorKind, Operation, PlanStatus, Refs, WorkspaceState};
use crate::queue::{ConsumeError, Consumer, Delivery, QueueError};
use crate::service::{Ledger, LedgerRequest, ServiceError};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;

/// Settle operations one job runs at most (each releases up to 25 overdue holds); what is
/// left is settled by the next job, which the next due time brings at once.
pub const MAX_SETTLE_ROUNDS: u32 = 400;

#[derive(Debug, Error)]
pub enum RefreshError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] ServiceError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The Lambda was invoked with something that is neither an SQS batch nor a tick.
    #[error("not an event this function handles: {0}")]
    Event(String),
    /// Applying the period invoice's refunds or disputes to a new allotment failed.
    #[error("following the payment of the period's invoice: {0}")]
    Payment(String),
    /// The recorded period names something the catalog does not have.
    #[error("refresh of {workspace} cannot proceed: {reason}")]
    Invalid {
        workspace: WorkspaceId,
        reason: String,
    },
}

impl From<RefreshError> for ConsumeError {
    fn from(e: RefreshError) -> Self {
        match e {
            RefreshError::Ledger(e) if !e.is_retryable() => ConsumeError::poison(e),
            RefreshError::Invalid { .. } | RefreshError::Event(_) => ConsumeError::poison(e),
            other => ConsumeError::retry(other),
        }
    }
}

/// What one job did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobReport {
    pub workspace: Option<WorkspaceId>,
    /// Ledger keys of the allotment grants made (or found already made).
    pub granted: Vec<String>,
    /// Grants not made because their credits would already have expired.
    pub skipped_expired: Vec<String>,
    /// Allotments that came after the subscription ended (or was replaced): never granted.
    pub forfeited: Vec<u32>,
    /// Settle operations run (each at most one transaction).
    pub settle_operations: u32,
    /// The reconciliation item recorded, if a renewal had no paid period.
    pub reconciliation: Option<String>,
    /// When the workspace is next due, if it still is.
    pub next_due: Option<DateTime<Utc>>,
}

/// What one pass over the due index did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub jobs: Vec<JobReport>,
}

impl RunReport {
    /// Every allotment grant made (or found made) by the pass.
    pub fn granted(&self) -> usize {
        self.jobs.iter().map(|j| j.granted.len()).sum()
    }
}

/// Where the highest shard count the worker ever filed under is kept (see
/// [`Refresher::shards_in_use`]).
pub const SHARDS_PK: &str = "SCHEDULE";
pub const SHARDS_SK: &str = "DUE_SHARDS";
/// Most shards of the due index (the template's `DueShards` maximum).
pub const MAX_DUE_SHARDS: u32 = 1000;

/// The highest shard count documents were ever filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ShardsFiled {
    highest: u32,
}

/// The credit-refresh scheduler and worker.
#[derive(Clone)]
pub struct Refresher {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    pub settings: Settings,
    /// The highest shard count this process knows to be recorded (0: none yet).
    recorded_shards: Arc<AtomicU32>,
}

impl Refresher {
    pub fn new(ledger: Ledger, docs: Arc<dyn DocStore>) -> Self {
        Self {
            ledger,
            docs,
            settings: Settings::default(),
            recorded_shards: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The shards the scheduler has to read: the configured ones, the default ones (see
    /// [`Settings::shards_to_read`]), and every shard count the worker ever filed documents
    /// under. The highest is recorded (once per process, before the first filing or tick
    /// under it), so lowering `DueShards` strands nothing filed in a higher shard: the
    /// scheduler keeps reading those shards, and the worker files each document it runs
    /// under the new count.
    pub async fn shards_in_use(&self) -> Result<u32, RefreshError> {
        let n = self.settings.shards;
        let stored = docs::update(
            self.docs.as_ref(),
            SHARDS_PK,
            SHARDS_SK,
            |current: Option<ShardsFiled>| match current {
                Some(c) if c.highest >= n => None,
                _ => Some(ShardsFiled { highest: n }),
            },
        )
        .await?;
        // No more than the deployment allows (the template's `DueShards` maximum): a
        // mistyped record must not make every tick read thousands of shards.
        let highest = stored.map_or(n, |s| s.highest);
        if highest > MAX_DUE_SHARDS {
            tracing::warn!(
                highest,
                "recorded due shard count above the maximum; reading {MAX_DUE_SHARDS}"
            );
        }
        let highest = highest.min(MAX_DUE_SHARDS);
        self.recorded_shards.fetch_max(n, Ordering::Relaxed);
        Ok(highest.max(self.settings.shards_to_read()))
    }

    /// Records the configured shard count before the worker first files under it.
    async fn record_shards(&self) -> Result<(), RefreshError> {
        if self.recorded_shards.load(Ordering::Relaxed) < self.settings.shards {
            self.shards_in_use().await?;
        }
        Ok(())
    }

    /// The workspaces due at `now`, shard by shard (at most
    /// [`Settings::max_jobs_per_shard`] from each; the rest wait for the next tick).
    pub async fn due_jobs(&self, now: DateTime<Utc>) -> Result<Vec<Job>, RefreshError> {
        let mut jobs = Vec::new();
        for shard in 0..self.shards_in_use().await? {
            for d in self
                .docs
                .due_docs(shard, now, self.settings.max_jobs_per_shard)
                .await?
            {
                if d.sk != REFRESH_SK {
                    continue;
                }
                let Some(workspace) =
                    d.pk.strip_prefix("WORKSPACE#")
                        .and_then(|w| WorkspaceId::parse(w).ok())
                else {
                    tracing::warn!(pk = %d.pk, "due item that is not a workspace's; skipped");
                    continue;
                };
                jobs.push(Job {
                    workspace,
                    due: d.due,
                });
            }
        }
        Ok(jobs)
    }

    /// The earliest due time in the index, if any: how far a caller moving a clock can
    /// jump before the schedule has something to do.
    pub async fn earliest_due(&self) -> Result<Option<DateTime<Utc>>, RefreshError> {
        let mut earliest = None;
        for shard in 0..self.shards_in_use().await? {
            if let Some(d) = self
                .docs
                .due_docs(shard, DateTime::<Utc>::MAX_UTC, 1)
                .await?
                .into_iter()
                .next()
            {
                earliest = Some(earliest.map_or(d.due, |e: DateTime<Utc>| e.min(d.due)));
            }
        }
        Ok(earliest)
    }

    /// One scheduler tick: sends a job for every due workspace. Returns how many.
    pub async fn schedule(&self, sink: &dyn JobSink) -> Result<usize, RefreshError> {
        let now = self.ledger.clock.now();
        let jobs = self.due_jobs(now).await?;
        sink.send(&jobs).await?;
        tracing::info!(jobs = jobs.len(), "refresh jobs sent");
        Ok(jobs.len())
    }

    /// The credit-refresh Lambda's one entry point for both of its triggers: an SQS batch
    /// (it has `Records`) runs each job and answers the failed ones for redelivery; anything
    /// else is the schedule's tick, which sends the due jobs to `sink`.
    pub async fn handle_event(
        &self,
        sink: &dyn JobSink,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value, RefreshError> {
        let unreadable = |e: serde_json::Error| RefreshError::Event(e.to_string());
        if payload.get("Records").is_some() {
            let batch: aws_lambda_events::event::sqs::SqsEvent =
                serde_json::from_value(payload).map_err(unreadable)?;
            let response = crate::queue::lambda::process_batch(
                self,
                batch,
                super::jobs::REFRESH_JOBS_MAX_RECEIVES,
            )
            .await;
            return serde_json::to_value(response).map_err(unreadable);
        }
        let sent = self.schedule(sink).await?;
        Ok(serde_json::json!({ "jobs": sent }))
    }

    /// Does one workspace's due work. Safe to repeat: every grant and settlement is keyed.
    #[tracing::instrument(skip_all, fields(workspace = %job.workspace))]
    pub async fn run(&self, job: &Job) -> Result<JobReport, RefreshError> {
        let ws = &job.workspace;
        let mut report = JobReport {
            workspace: Some(ws.clone()),
            ..JobReport::default()
        };
        let Some(doc) = refresh_doc(self.docs.as_ref(), ws).await? else {
            return Ok(report);
        };
        let now = self.ledger.clock.now();
        let record: Option<SubscriptionRecord> =
            docs::get(self.docs.as_ref(), &workspace_pk(ws), SUBSCRIPTION_SK).await?;
        // The period's invoice paid every month of it: a pause (which only stops collecting
        // the next invoices) or a payment Stripe is retrying (a later change's invoice) does
        // not take back months already paid for. Only a subscription that has ended, or was
        // replaced, forfeits them.
        // A month that began before the subscription ended was paid and owed then, however
        // late the worker comes to it.
        // The record may still name the subscription this one replaced, ended before this
        // period began: the new one's events came before the old one's deletion, which
        // they could not replace while it looked alive. The paid period is this
        // subscription's, and nothing says it has ended.
        // Its own cancellation may have been dropped for the same reason (delivered while
        // the record still named the old one): the cancellation document, which follows
        // the latest subscription fact whatever the record says, bounds it then.
        let predecessor = record.as_ref().is_some_and(|r| {
            r.id != doc.subscription
                && r.status == PlanStatus::Canceled
                && r.ended_at.is_some_and(|e| e <= doc.period_start)
        });
        let own_end = if predecessor {
            docs::get::<crate::refund_requests::Cancellation>(
                self.docs.as_ref(),
                &workspace_pk(ws),
                crate::refund_requests::rules::CANCELLATION_SK,
            )
            .await?
            .filter(|c| c.subscription == doc.subscription && c.resumed_at.is_none())
            .map(|c| c.effective_at)
        } else {
            None
        };
        let in_effect_at = |at: DateTime<Utc>| {
            record.as_ref().is_some_and(|r| {
                (r.id == doc.subscription
                    && (r.status != PlanStatus::Canceled || r.ended_at.is_some_and(|e| at < e)))
                    || (predecessor && own_end.is_none_or(|e| at < e))
            })
        };

        // Months the period this one replaced still owed: due by the time this period
        // began (in its first second included), not granted when it was recorded. Same
        // subscription, so in effect on their dates unless it had ended by then. Owed
        // whatever this clock says (one a little behind Stripe's would see the last of
        // them as not due yet, and `previous` is cleared below).
        if let Some(prev) = &doc.previous {
            for a in schedule::due_allotments(prev, doc.period_start) {
                // The same subscription as the document's: the same test.
                if in_effect_at(a.at) {
                    self.allot(prev, &a, now, &mut report).await?;
                } else {
                    self.relink(prev, &a, &[]).await?;
                    report.forfeited.push(a.k);
                }
            }
        }

        let mut next_allotment = doc.next_allotment;
        for a in schedule::due_allotments(&doc, now) {
            let in_effect = in_effect_at(a.at);
            if in_effect && doc.opened_by.is_some() {
                // Opened by a change paid before the period's own invoice: the change paid
                // only its difference, so the months wait for the period's invoice.
                tracing::info!(
                    allotment = a.k,
                    "the period's own invoice is not paid yet; allotment waits"
                );
                break;
            }
            if in_effect {
                self.allot(&doc, &a, now, &mut report).await?;
            } else {
                self.relink(&doc, &a, &[]).await?;
                tracing::info!(
                    allotment = a.k,
                    "subscription not in effect; allotment not granted"
                );
                report.forfeited.push(a.k);
            }
            next_allotment = a.k + 1;
        }

        let (renewal_checked, renewal_retry_at) = self
            .check_renewal(&doc, record.as_ref(), now, &mut report)
            .await?;

        let state = self.settle(job, &mut report).await?;
        let settled_at = self.ledger.clock.now();
        // More overdue holds than one job settles: due again at once (the next tick).
        let settle_at = if state.needs_settling(settled_at) {
            Some(settled_at)
        } else {
            state.next_settlement_after(settled_at)
        };

        self.record_shards().await?;
        let (shards, grace) = (self.settings.shards, self.settings.grace);
        let stored = docs::update_due(
            self.docs.as_ref(),
            &workspace_pk(ws),
            REFRESH_SK,
            |current: Option<RefreshDoc>| {
                let current = current?;
                let mut next = current.clone();
                if next.same_period(
                    &doc.subscription,
                    doc.period_start,
                    doc.period_end,
                    doc.period_rank,
                ) {
                    next.advance(next_allotment);
                    next.renewal_checked |= renewal_checked;
                    if !next.renewal_checked && renewal_retry_at.is_some() {
                        next.renewal_retry_at = renewal_retry_at;
                    }
                }
                next.settle_at = settle_at;
                // The replaced period's months were dealt with above.
                if next.previous.is_some() && next.previous == doc.previous {
                    next.previous = None;
                }
                if next == current {
                    return None;
                }
                let due = next.due_mark(shards, grace);
                Some((next, due))
            },
        )
        .await?;
        report.next_due = stored.and_then(|d| schedule::next_due(&d, grace));
        Ok(report)
    }

    /// Grants the allotment `a` of `doc`'s period, as its level and money given back say.
    async fn allot(
        &self,
        doc: &RefreshDoc,
        a: &schedule::Allotment,
        now: DateTime<Utc>,
        report: &mut JobReport,
    ) -> Result<(), RefreshError> {
        let grants = schedule::grants(doc, a, &self.ledger.catalog).map_err(|reason| {
            RefreshError::Invalid {
                workspace: doc.workspace.clone(),
                reason,
            }
        })?;
        // A tick this late would grant credits that lapse at once.
        let (grants, expired): (Vec<_>, Vec<_>) =
            grants.into_iter().partition(|g| g.expires_at > now);
        for g in expired {
            tracing::warn!(key = %g.key, "allotment already expired; not granted");
            report.skipped_expired.push(g.key);
        }
        let granting: Vec<String> = grants.iter().map(|g| g.key.clone()).collect();
        self.relink(doc, a, &granting).await?;
        let count = grants.len();
        for (i, g) in grants.into_iter().enumerate() {
            self.grant(doc, g, i + 1 == count, report).await?;
        }
        Ok(())
    }

    /// Links to the period's invoice the grants of allotment `a` that an earlier attempt
    /// made and this one does not make again (`granting` are the keys it grants), in case
    /// that attempt stopped before linking them: the year's invoice refunded in full, or
    /// the month forfeited, before the job was retried. Without the link, its refunds and
    /// disputes would not find those credits. Each of the allotment's two keys (plan,
    /// add-on) is looked up when this attempt does not grant it, whatever the level says
    /// now (a late change may have moved it since).
    async fn relink(
        &self,
        doc: &RefreshDoc,
        a: &schedule::Allotment,
        granting: &[String],
    ) -> Result<(), RefreshError> {
        for key in schedule::grant_keys(doc, a)
            .into_iter()
            .filter(|k| !granting.contains(k))
        {
            let Some(record) = self
                .ledger
                .store
                .idempotency(&doc.workspace, &IdempotencyKey::derived(key.clone()))
                .await?
            else {
                continue;
            };
            self.link(doc, &key, &record.outcome, None).await?;
        }
        Ok(())
    }

    /// Links the lot a grant under `key` made (`outcome`) to the period's invoice.
    async fn link(
        &self,
        doc: &RefreshDoc,
        key: &str,
        outcome: &crate::ledger::Outcome,
        credits: Option<crate::money::Credits>,
    ) -> Result<(), RefreshError> {
        let Some(seq) = outcome
            .lot
            .as_deref()
            .and_then(|l| l.strip_prefix("lot_"))
            .and_then(|s| s.parse().ok())
        else {
            return Ok(());
        };
        // What the lot got: the month may have owed some back.
        let Some(got) = outcome.granted.or(credits) else {
            return Ok(());
        };
        crate::billing::BillingEvents::new(
            self.ledger.clone(),
            self.docs.clone(),
            // This function's observer only alerts.
            self.ledger.observer.clone(),
        )
        .link_invoice_lot(&doc.invoice, &doc.workspace, key, seq, got)
        .await
        .map_err(|e| RefreshError::Payment(e.to_string()))?;
        // The billing history's line of the invoice that paid for the month counts its
        // credits too, beside the first month's (and the take-backs a refund of it makes
        // from every month). A line not recorded is left to the invoice's own events.
        let history =
            crate::billing::history::get(self.docs.as_ref(), &doc.workspace, doc.invoice.as_str())
                .await?;
        if let Some(line) = history.filter(|l| l.granted.get(key) != Some(&got)) {
            crate::billing::history::record(
                self.docs.as_ref(),
                &doc.workspace,
                doc.invoice.as_str(),
                line.created,
                self.ledger.clock.now(),
                |e| e.granted.insert(key.to_owned(), got) != Some(got),
            )
            .await?;
        }
        Ok(())
    }

    async fn grant(
        &self,
        doc: &RefreshDoc,
        g: AllotmentGrant,
        last: bool,
        report: &mut JobReport,
    ) -> Result<(), RefreshError> {
        let outcome = self
            .ledger
            .execute(LedgerRequest {
                workspace: doc.workspace.clone(),
                key: IdempotencyKey::derived(g.key.clone()),
                // The key alone identifies the allotment: a replay after a raised level
                // returns the first grant instead of refusing.
                fingerprint: g.key.clone(),
                actor: Actor::new(ActorKind::System, "credit-refresh"),
                refs: Refs {
                    invoice: Some(doc.invoice.clone()),
                    ..Refs::default()
                },
                op: Operation::Allotment {
                    source: g.source,
                    credits: g.credits,
                    expires_at: g.expires_at,
                    note: g.note,
                    month: g.month,
                    last,
                },
            })
            .await?;
        // The allotment was bought by the period's invoice: its refunds and disputes
        // follow this lot too.
        self.link(doc, &g.key, &outcome, Some(g.credits)).await?;
        report.granted.push(g.key);
        Ok(())
    }

    /// After the period (and the grace time), Stripe should have reported the renewal with
    /// a paid period, which replaces this document. Returns (checked, look again at).
    async fn check_renewal(
        &self,
        doc: &RefreshDoc,
        record: Option<&SubscriptionRecord>,
        now: DateTime<Utc>,
        report: &mut JobReport,
    ) -> Result<(bool, Option<DateTime<Utc>>), RefreshError> {
        match schedule::renewal_check_at(doc, self.settings.grace) {
            Some(at) if at <= now => {}
            _ => return Ok((false, None)),
        }
        let Some(r) = record.filter(|r| r.id == doc.subscription) else {
            // Replaced by another subscription, or unknown: no renewal of this one.
            return Ok((true, None));
        };
        if r.period_start > doc.period_start {
            // A period whose renewal Stripe voided (collection paused) is unpaid by design,
            // not a payment to reconcile: the renewal after it is looked at once it is due.
            if r.voided_period == Some(r.period_start) && r.status != PlanStatus::Canceled {
                let again = (r.period_end + self.settings.grace).max(now + self.settings.recheck);
                return Ok((false, Some(again)));
            }
            // Paused (a late event may not have marked the period yet): looked at again
            // until collection resumes and the renewal after it is due.
            if r.status == PlanStatus::Paused {
                let again = (r.period_end + self.settings.grace).max(now + self.settings.recheck);
                return Ok((false, Some(again)));
            }
            if r.status == PlanStatus::Active {
                let sk = reconcile_sk(&r.id, r.period_start);
                let item = Reconciliation {
                    workspace: doc.workspace.clone(),
                    subscription: r.id.clone(),
                    period_start: r.period_start,
                    period_end: r.period_end,
                    recorded_period_start: doc.period_start,
                    noticed_at: now,
                };
                let body = serde_json::to_string(&item)
                    .map_err(|e| RefreshError::Store(StoreError::decode(e)))?;
                self.docs
                    .put_doc(&workspace_pk(&doc.workspace), &sk, &body, 0)
                    .await?;
                tracing::warn!(
                    subscription = %r.id,
                    period_start = %r.period_start,
                    "Stripe renewed the subscription but no paid period was recorded; \
                     recorded for reconciliation, nothing granted"
                );
                report.reconciliation = Some(sk);
            }
            return Ok((true, None));
        }
        if r.status.in_effect() || r.status == PlanStatus::Paused {
            // Stripe has not reported the renewal yet (it may still be retrying, or the
            // subscription is paused and its events late).
            return Ok((false, Some(now + self.settings.recheck)));
        }
        Ok((true, None))
    }

    /// Settles the workspace in bounded operations until nothing is overdue. Each is keyed
    /// by the job's due time and its round, so a duplicate job replays instead of writing.
    async fn settle(
        &self,
        job: &Job,
        report: &mut JobReport,
    ) -> Result<WorkspaceState, RefreshError> {
        let ws = &job.workspace;
        let mut round = 0u32;
        loop {
            let state = self
                .ledger
                .store
                .load(ws)
                .await?
                .unwrap_or_else(|| WorkspaceState::new(ws.clone()));
            // Nothing due: nothing is written at all.
            if !state.needs_settling(self.ledger.clock.now()) || round >= MAX_SETTLE_ROUNDS {
                return Ok(state);
            }
            let key = format!("refresh:settle:{}:{round}", job.due.timestamp_millis());
            self.ledger
                .execute(LedgerRequest {
                    workspace: ws.clone(),
                    key: IdempotencyKey::derived(key.clone()),
                    fingerprint: "settle".into(),
                    actor: Actor::new(ActorKind::System, "credit-refresh"),
                    refs: Refs::default(),
                    op: Operation::Settle,
                })
                .await?;
            report.settle_operations += 1;
            round += 1;
        }
    }
}

#[async_trait]
impl Consumer for Refresher {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        let job: Job = serde_json::from_str(&delivery.body)
            .map_err(|e| ConsumeError::poison(format!("not a refresh job: {e}")))?;
        self.run(&job).await?;
        Ok(())
    }
}

/// One scheduler tick with its jobs run in-process, for the local system: every workspace
/// due by `now` (the ledger's clock, which every decision inside reads too). To play a
/// span of time in order, call it at each [`Refresher::earliest_due`] up to the target.
pub async fn run_due(
    ledger: &Ledger,
    docs: &Arc<dyn DocStore>,
    now: DateTime<Utc>,
) -> Result<RunReport, RefreshError> {
    let refresher = Refresher::new(ledger.clone(), docs.clone());
    let mut report = RunReport::default();
    let mut failed = None;
    // One workspace whose job fails does not hold up the others (in AWS each job is its
    // own message); the first failure is answered once every other job has run.
    for job in refresher.due_jobs(now).await? {
        match refresher.run(&job).await {
            Ok(done) => report.jobs.push(done),
            Err(e) => {
                tracing::error!(workspace = %job.workspace, error = %e, "refresh job failed");
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
