//! Refresh jobs: one message per due workspace, sent by the scheduler to the
//! `refresh-jobs` queue in batches of ten (SQS's `SendMessageBatch` limit).

use crate::error::Context;
use crate::ids::WorkspaceId;
use crate::queue::QueueError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Name (suffix, in AWS after the stack name) of the refresh jobs queue.
pub const REFRESH_JOBS_QUEUE: &str = "refresh-jobs";
/// Its dead-letter queue.
pub const REFRESH_JOBS_DLQ: &str = "refresh-jobs-dlq";
/// Deliveries of one job before it moves to the dead-letter queue.
pub const REFRESH_JOBS_MAX_RECEIVES: u32 = 5;
/// Messages per `SendMessageBatch` call (SQS's limit).
pub const SEND_BATCH: usize = 10;

/// Look at one workspace: the due time it was found under keys its settlement, so a
/// duplicate of the job is a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub workspace: WorkspaceId,
    pub due: DateTime<Utc>,
}

/// Where the scheduler sends jobs.
#[async_trait]
pub trait JobSink: Send + Sync {
    /// Sends every job, or fails (a later tick sends what is still due again).
    async fn send(&self, jobs: &[Job]) -> Result<(), QueueError>;
}

/// The `refresh-jobs` SQS queue.
pub struct SqsJobs {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsJobs {
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }
}

#[async_trait]
impl JobSink for SqsJobs {
    async fn send(&self, jobs: &[Job]) -> Result<(), QueueError> {
        for chunk in jobs.chunks(SEND_BATCH) {
            let mut pending: Vec<(String, String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, job)| {
                    let body = serde_json::to_string(job).map_err(QueueError::unavailable)?;
                    Ok((i.to_string(), body))
                })
                .collect::<Result<_, QueueError>>()?;
            // Entries SQS refuses alone (throttled, internal error) are sent again, a few
            // times; a job lost here is sent again by the next tick anyway.
            for _ in 0..3 {
                if pending.is_empty() {
                    break;
                }
                let entries = pending
                    .iter()
                    .map(|(id, body)| {
                        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                            .id(id)
                            .message_body(body)
                            .build()
                            .map_err(QueueError::unavailable)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let out = self
                    .client
                    .send_message_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| QueueError::unavailable(Context::new("SendMessageBatch", e)))?;
                let failed: Vec<&str> = out.failed().iter().map(|f| f.id()).collect();
                pending.retain(|(id, _)| failed.contains(&id.as_str()));
            }
            if !pending.is_empty() {
                return Err(QueueError::unavailable(format!(
                    "{} refresh jobs were not accepted",
                    pending.len()
                )));
            }
        }
        Ok(())
    }
}
