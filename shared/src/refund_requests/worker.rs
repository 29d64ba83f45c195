//! The refunds worker: makes the refund of each approval through Stripe, once (the Stripe
//! idempotency key is the request and its approval), records what Stripe answered on the
//! request and tells the customer.

use super::{RefundJob, RefundReason, RequestStatus, request_sk, stripe_refund_status};
use crate::billing::records::workspace_pk;
use crate::clock::Clock;
use crate::payments::{Payments, RefundOrder};
use crate::queue::{ConsumeError, Consumer, Delivery, Message, Queue};
use crate::store::docs::{self, DocStore};
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;

pub struct RefundWorker {
    pub docs: Arc<dyn DocStore>,
    pub payments: Arc<dyn Payments>,
    pub notifications: Arc<dyn Queue>,
    pub clock: Arc<dyn Clock>,
}

impl RefundWorker {
    /// The approval fails without a refund (staff may approve again, under a new key), and
    /// the customer is told.
    async fn fail(
        &self,
        r: &super::RefundRequest,
        why: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ConsumeError> {
        super::refused(self.docs.as_ref(), r, why, now).await?;
        self.tell_failure(r).await.map(|_| ())
    }

    /// Tells the customer, once, if `r`'s current approval has failed
    /// ([`tell_failure`](super::tell_failure)); answers the request as it stands.
    async fn tell_failure(
        &self,
        r: &super::RefundRequest,
    ) -> Result<Option<super::RefundRequest>, ConsumeError> {
        super::tell_failure(
            self.docs.as_ref(),
            self.notifications.as_ref(),
            &r.workspace,
            &r.id,
        )
        .await
    }

    /// Stripe's status of the refund made for `r`, recorded; a refund Stripe reports
    /// failed or canceled fails the request, and the customer is told (once). Answers
    /// whether the refund stands: the request as it is now (Stripe's events may have
    /// failed it meanwhile), not only as Stripe answered this call.
    async fn record_status(
        &self,
        r: &super::RefundRequest,
        made: &crate::payments::RefundMade,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, ConsumeError> {
        stripe_refund_status(
            self.docs.as_ref(),
            &r.workspace,
            &r.id,
            r.attempt,
            &made.id,
            &made.status,
            now,
        )
        .await?;
        let now_r = self.tell_failure(r).await?;
        Ok(!matches!(made.status.as_str(), "failed" | "canceled")
            && now_r.is_some_and(|n| {
                n.attempt == r.attempt
                    && matches!(n.status, RequestStatus::Pending | RequestStatus::Succeeded)
            }))
    }

    /// The confirmation to the customer; `id` lets the notification service drop a repeat.
    async fn confirm(&self, r: &super::RefundRequest, refund: &crate::ids::RefundId) {
        self.notify(json!({
            "type": "refund.confirmed",
            "id": format!("refund.confirmed:{}:{}", r.id, r.attempt),
            "workspace": r.workspace,
            "user": r.requested_by,
            "request": r.id,
            "refund": refund,
            "amount_cents": r.amount,
            "currency": r.currency,
            "message": "Your refund is on its way to your original payment method; it usually arrives within 5-10 business days.",
        }))
        .await;
    }

    /// Money given back for the payment since the approval (a refund or a credit note made
    /// in the dashboard; Stripe refuses a refund past the charge, not one beside a note to
    /// the customer's balance) that leaves less to refund than approved: the request goes
    /// to staff (`Some`), never a second return of the same money.
    async fn less_left(
        &self,
        r: &super::RefundRequest,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<()>, ConsumeError> {
        let left = super::still_refundable(self.docs.as_ref(), r)
            .await
            .map_err(|p| ConsumeError::retry(p.detail))?;
        if left >= r.amount {
            return Ok(None);
        }
        let why = format!(
            "money was given back for this payment since the approval: only {} of its {} \
             cents are left to refund; support staff decide",
            left.get(),
            r.amount.get()
        );
        tracing::warn!(request = %r.id, charge = %r.charge, left = left.get(),
            amount = r.amount.get(), "refund not made: less is left to refund than approved");
        super::demote(self.docs.as_ref(), r, why, now)
            .await
            .map_err(|p| ConsumeError::retry(p.detail))?;
        Ok(Some(()))
    }

    async fn notify(&self, body: serde_json::Value) {
        // Best effort: a lost message does not undo the refund; it is logged.
        if let Err(e) = self
            .notifications
            .send(Message {
                body: body.to_string(),
                group_id: None,
                dedup_id: None,
            })
            .await
        {
            tracing::warn!(error = %e, "refund notification not sent");
        }
    }
}

#[async_trait]
impl Consumer for RefundWorker {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        let job: RefundJob = serde_json::from_str(&delivery.body)
            .map_err(|e| ConsumeError::poison(format!("not a refund job: {e}")))?;
        let Some(r) = docs::get::<super::RefundRequest>(
            self.docs.as_ref(),
            &workspace_pk(&job.workspace),
            &request_sk(&job.request),
        )
        .await?
        else {
            return Err(ConsumeError::poison(format!(
                "refund request {} not found",
                job.request
            )));
        };
        // Failed by an earlier delivery or by Stripe's event: the customer is told, if
        // that was lost.
        if r.attempt == job.attempt && r.status == RequestStatus::Failed {
            return self.tell_failure(&r).await.map(|_| ());
        }
        // Another approval, or one that failed or was decided otherwise: nothing to do.
        if r.attempt != job.attempt
            || !matches!(
                r.status,
                RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded
            )
        {
            return Ok(());
        }
        // The claim decides (the document follows it a step later): an approval sent to
        // staff since is not made.
        if let Some(moved) = super::claim_moved_on(self.docs.as_ref(), &r).await? {
            tracing::info!(request = %r.id, attempt = r.attempt,
                "approval no longer current by its claim; refund not made");
            // The document follows its claim (an earlier delivery may have stopped
            // between the two writes of sending it to staff).
            super::project(
                self.docs.as_ref(),
                &r.workspace,
                &moved,
                self.clock.now(),
                "tally",
                (moved.status == RequestStatus::InReview).then(|| {
                    "sent to support staff before its refund was made; support staff decide"
                        .to_owned()
                }),
            )
            .await?;
            // Failed by an earlier delivery that stopped before the document followed:
            // the customer is told now.
            if moved.attempt == job.attempt && moved.status == RequestStatus::Failed {
                self.tell_failure(&r).await?;
            }
            return Ok(());
        }
        if let Some(refund) = &r.refund {
            // Made already (Stripe's event was here first, or this is a redelivery): never
            // ask Stripe again, whose idempotency keys expire; just confirm.
            self.confirm(&r, refund).await;
            return Ok(());
        }
        let now = self.clock.now();
        // Stripe keeps an idempotency key for 24 hours: past that, asking again could make a
        // second refund. An approval whose outcome is still unknown then waits for a person
        // (Stripe's refund events, once they arrive, settle it).
        match r.sent_at {
            Some(t) if now - t > chrono::Duration::hours(23) => {
                // Look for the refund instead: made, it is recorded; not made, the approval
                // fails so staff may approve again (under a new key).
                return match self.payments.find_refund(&r.charge, &r.id, r.attempt).await {
                    Ok(Some(made)) => {
                        if self.record_status(&r, &made, now).await? {
                            self.confirm(&r, &made.id).await;
                        }
                        Ok(())
                    }
                    Ok(None) => {
                        tracing::warn!(request = %r.id, attempt = r.attempt, sent_at = %t,
                            "no refund made for this approval within a day; failing it");
                        self.fail(
                            &r,
                            "Stripe made no refund for this approval within a day",
                            now,
                        )
                        .await
                    }
                    Err(e) if e.is_retryable() => Err(ConsumeError::retry(e)),
                    Err(e) => {
                        tracing::error!(request = %r.id, error = %e, "refund outcome unknown; check the charge's refunds in Stripe");
                        Ok(())
                    }
                };
            }
            Some(t) => {
                // Sent before, with no outcome recorded: the call failed (Stripe
                // unreachable, a 5xx), or its answer was lost. Not made, money given back
                // since (a credit note to the customer's balance) is checked as before the
                // first send; made, the same key below answers the same refund.
                match self.payments.find_refund(&r.charge, &r.id, r.attempt).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        if let Some(done) = self.less_left(&r, now).await? {
                            return Ok(done);
                        }
                    }
                    Err(e) if e.is_retryable() => return Err(ConsumeError::retry(e)),
                    // The lookup refused: the same key still makes one refund at most.
                    Err(e) => {
                        tracing::warn!(request = %r.id, sent_at = %t, error = %e,
                            "could not look the refund up before asking again");
                    }
                }
            }
            None => {
                // A dispute opened since the approval (an inquiry: Stripe refuses refunds
                // only of a chargeback) decides where the money goes, as it does for an
                // approval: a refund now could pay the customer twice. Asked only before
                // the first send; once sent, the same key tells what Stripe made.
                if super::disputed(self.docs.as_ref(), &r.charge).await? {
                    tracing::warn!(request = %r.id, charge = %r.charge,
                        "payment disputed since the approval; refund not made");
                    return self.fail(&r, super::DISPUTED, now).await;
                }
                // Money given back for the payment since the approval (a refund or a credit
                // note made in the dashboard; Stripe refuses a refund past the charge, not
                // one beside a note to the customer's balance): staff decide, never a
                // second return of the same money.
                if let Some(done) = self.less_left(&r, now).await? {
                    return Ok(done);
                }
                docs::update(
                    self.docs.as_ref(),
                    &workspace_pk(&r.workspace),
                    &request_sk(&r.id),
                    |cur: Option<super::RefundRequest>| {
                        let mut cur = cur?;
                        (cur.attempt == r.attempt && cur.sent_at.is_none()).then(|| {
                            cur.sent_at = Some(now);
                            cur
                        })
                    },
                )
                .await?;
            }
        }
        let order = RefundOrder {
            workspace: r.workspace.clone(),
            charge: r.charge.clone(),
            amount: r.amount,
            request: r.id.clone(),
            attempt: r.attempt,
            duplicate: r.reason == RefundReason::DuplicateCharge,
            idempotency_key: format!("tally-refund-{}-{}", r.id, r.attempt),
        };
        match self.payments.refund(&order).await {
            Ok(made) => {
                tracing::info!(request = %r.id, refund = %made.id, status = %made.status, "refund made");
                if self.record_status(&r, &made, now).await? {
                    self.confirm(&r, &made.id).await;
                }
                Ok(())
            }
            Err(e) if e.is_retryable() => Err(ConsumeError::retry(e)),
            Err(e) => {
                let why = e.message().to_owned();
                tracing::warn!(request = %r.id, error = %why, "refund refused by Stripe");
                self.fail(&r, &why, now).await
            }
        }
    }
}
