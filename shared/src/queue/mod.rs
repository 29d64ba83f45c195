//! Queues between functions. Producers depend on [`Queue`]; consumers implement
//! [`Consumer`] once and run under SQS in Lambda ([`lambda::process_batch`]) or on an
//! in-process queue locally (`local::LocalQueue`) with the same rules: bounded
//! redelivery, then the dead-letter queue; FIFO queues keep each group in order and drop
//! duplicate deduplication ids. The in-process queue is behind the `local` feature, so the
//! Lambda binaries do not carry it.

pub mod lambda;
#[cfg(feature = "local")]
pub mod local;
pub mod sqs;

use crate::error::BoxError;
use async_trait::async_trait;
use thiserror::Error;

/// Name (suffix, in AWS after the stack name) of the FIFO queue of Stripe events.
pub const BILLING_EVENTS_QUEUE: &str = "billing-events.fifo";
/// Its dead-letter queue.
pub const BILLING_EVENTS_DLQ: &str = "billing-events-dlq.fifo";
/// Deliveries of one message before it moves to the dead-letter queue.
pub const BILLING_EVENTS_MAX_RECEIVES: u32 = 5;

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: String,
    /// FIFO: messages of one group are delivered in order.
    pub group_id: Option<String>,
    /// FIFO: a second message with the same id within five minutes is dropped.
    pub dedup_id: Option<String>,
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub message_id: String,
    pub body: String,
    pub group_id: Option<String>,
    /// 1 on first delivery.
    pub receive_count: u32,
}

/// A message could not be sent. Keeps its cause.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

impl QueueError {
    /// `cause` is an error or a message.
    pub fn unavailable(cause: impl Into<BoxError>) -> Self {
        Self::Unavailable(cause.into())
    }
}

#[async_trait]
pub trait Queue: Send + Sync {
    async fn send(&self, message: Message) -> Result<(), QueueError>;
}

/// Why a message was not processed. Every failure is redelivered until the queue's receive
/// limit moves it to the dead-letter queue; the distinction is for logs and alarms. Each
/// keeps its cause (an error, or a message saying what is wrong).
#[derive(Debug, Error)]
pub enum ConsumeError {
    /// Might succeed later (a store hiccup, a fact that has not arrived yet).
    #[error("retry later: {0}")]
    Retry(#[source] BoxError),
    /// Will never succeed (unreadable message); it ends in the dead-letter queue.
    #[error("cannot process: {0}")]
    Poison(#[source] BoxError),
}

impl ConsumeError {
    pub fn retry(cause: impl Into<BoxError>) -> Self {
        Self::Retry(cause.into())
    }

    pub fn poison(cause: impl Into<BoxError>) -> Self {
        Self::Poison(cause.into())
    }
}

#[async_trait]
pub trait Consumer: Send + Sync {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError>;
}
