//! Runs a [`Consumer`] over an SQS batch and reports partial batch failures, so one bad
//! message is retried alone. On FIFO queues, once a message of a group fails, the later
//! messages of that group in the batch are reported failed too (unprocessed) to keep order.

use super::{Consumer, Delivery};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use std::collections::HashSet;
use tracing::Instrument;

pub async fn process_batch(
    consumer: &dyn Consumer,
    event: SqsEvent,
    max_receives: u32,
) -> SqsBatchResponse {
    let mut failures = Vec::new();
    // Failed on their last receive: the queue moves them to its dead-letter queue.
    let mut dead_lettered = 0u64;
    let mut blocked_groups: HashSet<String> = HashSet::new();
    let messages = event.records.len() as u64;
    for record in event.records {
        let message_id = record.message_id.clone().unwrap_or_default();
        let group_id = record.attributes.get("MessageGroupId").cloned();
        let delivery = Delivery {
            message_id: message_id.clone(),
            body: record.body.clone().unwrap_or_default(),
            group_id: group_id.clone(),
            receive_count: record
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
        };
        let last = delivery.receive_count >= max_receives;
        if let Some(g) = &group_id
            && blocked_groups.contains(g)
        {
            dead_lettered += u64::from(last);
            failures.push(message_id);
            continue;
        }
        let span = tracing::info_span!("message", message_id = %message_id, receive_count = delivery.receive_count);
        let result = consumer.consume(&delivery).instrument(span).await;
        if let Err(e) = result {
            tracing::warn!(message_id = %message_id, error = %e, "message failed; it will be redelivered");
            if let Some(g) = group_id {
                blocked_groups.insert(g);
            }
            if last {
                tracing::error!(message_id = %message_id, receive_count = delivery.receive_count,
                    "message failed on its last receive; it goes to the dead-letter queue");
                dead_lettered += 1;
            }
            failures.push(message_id);
        }
    }
    crate::metrics::Record::new("queue_batch")
        .count("QueueMessages", messages)
        .count("BatchItemFailures", failures.len() as u64)
        .count("DeadLettered", dead_lettered)
        .emit();
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = failures
        .into_iter()
        .map(|id| {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            f
        })
        .collect();
    response
}
