//! SQS producer.

use super::{Message, Queue, QueueError};
use crate::config::HttpUrl;
use crate::error::Context;
use async_trait::async_trait;

pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }

    /// A client for an SQS-compatible server on a local endpoint, with dummy credentials.
    pub fn local_client(endpoint: &str) -> aws_sdk_sqs::Client {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "local",
                "local",
                None,
                None,
                "tally-local",
            ))
            .endpoint_url(endpoint)
            .build();
        aws_sdk_sqs::Client::from_conf(config)
    }

    /// A client for AWS (region and credentials from the Lambda environment), or for a
    /// local server when `endpoint` is set.
    pub async fn client(endpoint: Option<&HttpUrl>) -> aws_sdk_sqs::Client {
        match endpoint {
            Some(endpoint) => Self::local_client(endpoint.as_str()),
            None => aws_sdk_sqs::Client::new(crate::config::aws_sdk_config().await),
        }
    }
}

/// An SQS queue whose client is built on the first send, for a function that sends only
/// now and then (its other work should not wait for the client at start-up).
pub struct LazySqsQueue {
    endpoint: Option<HttpUrl>,
    url: String,
    queue: tokio::sync::OnceCell<SqsQueue>,
}

impl LazySqsQueue {
    pub fn new(endpoint: Option<HttpUrl>, url: impl Into<String>) -> Self {
        Self {
            endpoint,
            url: url.into(),
            queue: tokio::sync::OnceCell::new(),
        }
    }
}

#[async_trait]
impl Queue for LazySqsQueue {
    async fn send(&self, message: Message) -> Result<(), QueueError> {
        let queue = self
            .queue
            .get_or_init(|| async {
                SqsQueue::new(SqsQueue::client(self.endpoint.as_ref()).await, &self.url)
            })
            .await;
        queue.send(message).await
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send(&self, message: Message) -> Result<(), QueueError> {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(message.body)
            .set_message_group_id(message.group_id)
            .set_message_deduplication_id(message.dedup_id)
            .send()
            .await
            .map_err(|e| QueueError::unavailable(Context::new("SendMessage", e)))?;
        Ok(())
    }
}
