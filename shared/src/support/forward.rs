//! Forwarding tickets to the help desk.
//!
//! The `support-tickets` FIFO queue carries one [`ForwardJob`] per change (a new ticket, a
//! message, a status change), grouped by ticket so the help desk sees a ticket's changes
//! in order. [`HelpDesk`] reads the ticket as it is now, builds the delivery and signs it:
//! `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the shared
//! secret>`, with `Idempotency-Key: <job id>` so a redelivery is recognised. A failed
//! delivery is tried again a few times with backoff, then left to the queue: SQS delivers
//! it again after the visibility timeout and moves it to the dead-letter queue after
//! [`super::SUPPORT_MAX_RECEIVES`] receives.
//!
//! The same function also runs on a schedule: [`HelpDesk::handle_event`] then sweeps for
//! tickets whose change never reached the queue ([`Tickets::sweep`]).

use super::{ForwardJob, Ticket, TicketMessage, Tickets};
use crate::error::BoxError;
use crate::queue::{ConsumeError, Consumer, Delivery};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::Arc;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Tally-Signature";

/// What the help desk receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardPayload {
    /// Unique per change: the same id is the same change, delivered again.
    pub id: String,
    /// `ticket.created`, `ticket.message` or `ticket.status`.
    pub event: String,
    pub ticket: Ticket,
    /// The messages the help desk has not had yet, oldest first (`ticket.created` carries
    /// the first; a change after one whose forward failed carries that one's too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<TicketMessage>,
}

/// A signed delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signed {
    pub id: String,
    pub body: String,
    pub signature: String,
}

/// `t=<timestamp>,v1=<signature>` for `body` at `timestamp` under `secret`.
pub fn sign(secret: &[u8], timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// Whether `header` is a valid signature of `body` under `secret`, made within
/// `tolerance_s` seconds of `now` (what a help desk checks).
pub fn verify(secret: &[u8], header: &str, body: &str, now: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (now - t).abs() > tolerance_s {
        return false;
    }
    let expected = sign(secret, t, body);
    let expected = expected.rsplit_once("v1=").map(|(_, h)| h).unwrap_or("");
    v1.iter().any(|given| {
        given.len() == expected.len()
            && given
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("help desk delivery failed: {0}")]
pub struct DeliveryError(#[source] pub BoxError);

/// Where signed deliveries go: the help desk's webhook, or the local outbox.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn deliver(&self, delivery: &Signed) -> Result<(), DeliveryError>;
}

/// The forwarding consumer.
pub struct HelpDesk {
    pub tickets: Tickets,
    pub sink: Arc<dyn Sink>,
    pub secret: Vec<u8>,
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Attempts within one receive before the message goes back to the queue.
    pub attempts: u32,
    /// First backoff between attempts, doubled each time.
    pub backoff: std::time::Duration,
}

impl HelpDesk {
    /// The delivery for a job: the ticket as it is now and the messages the job names that
    /// the help desk was not sent yet. `None` when it has nothing new: every message of it
    /// was sent, and this change or a later one was delivered already (a redelivery after
    /// the help desk took it, or two writers' jobs reaching the queue in the other order:
    /// the later change's delivery carried the ticket as it was then).
    pub async fn payload(&self, job: &ForwardJob) -> Result<Option<ForwardPayload>, ConsumeError> {
        let delivered = self
            .tickets
            .delivered(&job.ticket)
            .await
            .map_err(ConsumeError::retry)?;
        let Some(ticket) = self
            .tickets
            .get(&job.ticket)
            .await
            .map_err(ConsumeError::retry)?
        else {
            // A job is queued only after its ticket was stored.
            return Err(ConsumeError::retry(format!(
                "ticket {} not found yet",
                job.ticket
            )));
        };
        // Jobs queued before `from_seq` existed carry their own message only.
        let from = if job.from_seq == 0 {
            job.seq
        } else {
            job.from_seq
        };
        // What an earlier delivery carried is not sent twice.
        let messages: Vec<TicketMessage> = if from <= job.seq {
            self.tickets
                .messages(&job.ticket)
                .await
                .map_err(ConsumeError::retry)?
                .into_iter()
                .filter(|m| (from..=job.seq).contains(&m.seq) && !delivered.has(m.seq))
                .map(|m| TicketMessage { key: None, ..m })
                .collect()
        } else {
            Vec::new()
        };
        if messages.is_empty() && job.number().is_some_and(|c| c <= delivered.change) {
            tracing::info!(ticket = %job.ticket, change = ?job.change, delivered = delivered.change,
                "this change or a later one was delivered already; not sent again");
            return Ok(None);
        }
        Ok(Some(ForwardPayload {
            id: job.id.clone(),
            event: job.event.clone(),
            ticket: ticket.shown(),
            messages,
        }))
    }
}

/// Tickets one sweep hands to the queue from each shard, at most.
pub const SWEEP_LIMIT: usize = 100;

impl HelpDesk {
    /// The support-forwarder Lambda's one entry point for both of its triggers: an SQS
    /// batch (it has `Records`) is delivered, and the messages that failed are answered for
    /// redelivery; anything else is the schedule's tick, which hands to the queue the
    /// tickets whose forward failed ([`Tickets::sweep`]).
    pub async fn handle_event(
        &self,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value, BoxError> {
        if payload.get("Records").is_some() {
            let batch: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_value(payload)?;
            let response =
                crate::queue::lambda::process_batch(self, batch, super::SUPPORT_MAX_RECEIVES).await;
            return Ok(serde_json::to_value(response)?);
        }
        let report = self.tickets.sweep(self.clock.now(), SWEEP_LIMIT).await?;
        Ok(serde_json::to_value(report)?)
    }
}

#[async_trait]
impl Consumer for HelpDesk {
    async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
        let job: ForwardJob = serde_json::from_str(&d.body).map_err(ConsumeError::poison)?;
        let Some(payload) = self.payload(&job).await? else {
            return Ok(());
        };
        let body = serde_json::to_string(&payload).map_err(ConsumeError::poison)?;
        let mut wait = self.backoff;
        let mut last = None;
        for attempt in 0..self.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
            let signed = Signed {
                id: job.id.clone(),
                signature: sign(&self.secret, self.clock.now().timestamp(), &body),
                body: body.clone(),
            };
            match self.sink.deliver(&signed).await {
                Ok(()) => {
                    tracing::info!(ticket = %job.ticket, event = %job.event, "ticket forwarded");
                    let sent: Vec<u32> = payload.messages.iter().map(|m| m.seq).collect();
                    self.tickets
                        .record_delivered(&job.ticket, job.number(), &sent)
                        .await
                        .map_err(ConsumeError::retry)?;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(ticket = %job.ticket, attempt, error = %e, "help desk delivery failed");
                    last = Some(e);
                }
            }
        }
        Err(ConsumeError::retry(last.map_or_else(
            || BoxError::from("no attempt made"),
            |e| Box::new(e) as BoxError,
        )))
    }
}
