//! Queues: the SQS adapter against the emulator (FIFO deduplication, group ordering,
//! dead-letter redrive) and the partial-batch runner used by every SQS Lambda.

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use std::collections::HashMap;
use std::sync::Mutex;
use tally::queue::lambda::process_batch;
use tally::queue::sqs::SqsQueue;
use tally::queue::{ConsumeError, Consumer, Delivery, Message, Queue};

fn client() -> aws_sdk_sqs::Client {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").expect("run the suite with `make test`");
    SqsQueue::local_client(&endpoint)
}

async fn fifo_with_dlq(c: &aws_sdk_sqs::Client, name: &str, max_receives: u32) -> (String, String) {
    let dlq = c
        .create_queue()
        .queue_name(format!("{name}-dlq.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let dlq_arn = c
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let url = c
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::VisibilityTimeout, "0")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receives}"}}"#),
        )
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    (url, dlq)
}

fn msg(body: &str, group: &str, dedup: &str) -> Message {
    Message {
        body: body.into(),
        group_id: Some(group.into()),
        dedup_id: Some(dedup.into()),
    }
}

#[tokio::test]
async fn the_sqs_adapter_drops_duplicate_events_and_keeps_the_customer_group() {
    let c = client();
    let (url, _) = fifo_with_dlq(&c, &format!("dedup-{}", ulid::Ulid::new()), 3).await;
    let q = SqsQueue::new(c.clone(), url.clone());
    q.send(msg("first", "cus_1", "evt_1")).await.unwrap();
    q.send(msg("first again", "cus_1", "evt_1")).await.unwrap();
    q.send(msg("second", "cus_1", "evt_2")).await.unwrap();
    let got = c
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    let bodies: Vec<&str> = got.iter().map(|m| m.body().unwrap()).collect();
    assert_eq!(bodies, vec!["first", "second"]);
    let group = got[0].attributes().unwrap()[&MessageSystemAttributeName::MessageGroupId].clone();
    assert_eq!(group, "cus_1");
}

#[tokio::test]
async fn a_message_received_too_often_lands_in_the_dead_letter_queue() {
    let c = client();
    let (url, dlq) = fifo_with_dlq(&c, &format!("redrive-{}", ulid::Ulid::new()), 2).await;
    SqsQueue::new(c.clone(), url.clone())
        .send(msg("poison", "cus_1", "evt_poison"))
        .await
        .unwrap();
    // Received and never deleted (the consumer failed): after two receives it moves.
    for _ in 0..3 {
        c.receive_message().queue_url(&url).send().await.unwrap();
    }
    let dead = c
        .receive_message()
        .queue_url(&dlq)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body(), Some("poison"));
}

struct FailOn(&'static str, Mutex<Vec<String>>);

#[async_trait]
impl Consumer for FailOn {
    async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
        self.1.lock().unwrap().push(d.body.clone());
        if d.body == self.0 {
            Err(ConsumeError::Poison("bad".into()))
        } else {
            Ok(())
        }
    }
}

fn record(id: &str, body: &str, group: &str) -> SqsMessage {
    let mut m = SqsMessage::default();
    m.message_id = Some(id.into());
    m.body = Some(body.into());
    m.attributes = HashMap::from([
        ("MessageGroupId".to_string(), group.to_string()),
        ("ApproximateReceiveCount".to_string(), "1".to_string()),
    ]);
    m
}

#[tokio::test]
async fn a_failed_message_is_reported_alone_and_holds_back_only_its_own_group() {
    let consumer = FailOn("bad", Mutex::new(Vec::new()));
    let mut event = SqsEvent::default();
    event.records = vec![
        record("1", "ok-a", "cus_a"),
        record("2", "bad", "cus_a"),
        record("3", "after-bad", "cus_a"),
        record("4", "ok-b", "cus_b"),
    ];
    let response = process_batch(&consumer, event, tally::queue::BILLING_EVENTS_MAX_RECEIVES).await;
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, vec!["2", "3"]);
    assert_eq!(*consumer.1.lock().unwrap(), vec!["ok-a", "bad", "ok-b"]);
}

/// Records every body it consumes; blocks for good on `stall_at` (a process that stops
/// mid-delivery).
struct Stalling {
    seen: std::sync::Arc<Mutex<Vec<String>>>,
    stall_at: Option<String>,
}

#[async_trait]
impl Consumer for Stalling {
    async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
        if self.stall_at.as_deref() == Some(d.body.as_str()) {
            std::future::pending::<()>().await;
        }
        self.seen.lock().unwrap().push(d.body.clone());
        Ok(())
    }
}

#[test]
fn a_durable_local_queue_delivers_after_a_crash_what_it_had_acknowledged() {
    use tally::queue::local::LocalQueue;
    use tally::store::embedded::EmbeddedStore;
    let dir = std::env::temp_dir().join(format!("tally-queue-{}", ulid::Ulid::new()));
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = std::sync::Arc::new(EmbeddedStore::open(&dir).unwrap());
            let q = LocalQueue::durable("billing-events.fifo", true, 5, store.clone()).unwrap();
            q.start(std::sync::Arc::new(Stalling {
                seen: seen.clone(),
                stall_at: Some("m5".into()),
            }));
            for i in 1..=10 {
                q.send(msg(&format!("m{i}"), "g", &format!("d{i}")))
                    .await
                    .unwrap();
            }
            // Every send was acknowledged; the consumer is stuck on m5 once m1 to m4 are
            // consumed and marked so (a message consumed but not yet marked when the
            // process dies is delivered again: at least once).
            while seen.lock().unwrap().len() < 4
                || store.queue_contents("billing-events.fifo").unwrap().len() > 6
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        // The process dies: its tasks stop wherever they were (dropped at their next await,
        // their writes so far committed or not at all, as after a kill).
        drop(rt);
    }
    assert_eq!(seen.lock().unwrap().clone(), ["m1", "m2", "m3", "m4"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = std::sync::Arc::new(EmbeddedStore::open(&dir).unwrap());
        assert_eq!(
            store.queue_contents("billing-events.fifo").unwrap().len(),
            6,
            "m5 to m10 wait in the store"
        );
        let q = LocalQueue::durable("billing-events.fifo", true, 5, store.clone()).unwrap();
        q.start(std::sync::Arc::new(Stalling {
            seen: seen.clone(),
            stall_at: None,
        }));
        q.until_idle().await;
        // Nothing lost, in order, none of the consumed ones again; the store is empty.
        let all = seen.lock().unwrap().clone();
        let expected: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
        assert_eq!(all, expected);
        assert!(
            store
                .queue_contents("billing-events.fifo")
                .unwrap()
                .is_empty()
        );
        // A new message after the restart takes a new place.
        q.send(msg("m11", "g", "d11")).await.unwrap();
        q.until_idle().await;
        assert_eq!(seen.lock().unwrap().last().unwrap(), "m11");
    });
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn purchases_acknowledged_before_the_local_runner_crashed_are_all_credited_after_it_restarts() {
    use tally::store::embedded::EmbeddedStore;
    use tally_tests::{TestApp, owner};
    let dir = std::env::temp_dir().join(format!("tally-crash-{}", ulid::Ulid::new()));
    // One store for both lives of the runner (the queue test above reopens the file; here
    // the simulator's pages and the ledger's hooks hold the store, as a process does until
    // it exits).
    let store = std::sync::Arc::new(EmbeddedStore::open(&dir).unwrap());
    let ws = "org_crash";
    let packs = 12u64;
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let app = TestApp::over(store.clone(), true);
            for _ in 0..packs {
                let s = app
                    .post(
                        "/v1/checkout/sessions",
                        &owner(ws),
                        serde_json::json!({"kind": "pack", "pack": "pack_500"}),
                    )
                    .await;
                assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
                // Stripe's events were delivered and acknowledged (2xx): Stripe will not
                // send them again.
                app.pay_acknowledged(s.body["url"].as_str().unwrap()).await;
            }
        });
        // Killed at once, whatever the billing worker was doing.
        drop(rt);
    }
    let left = store
        .queue_contents(tally::queue::BILLING_EVENTS_QUEUE)
        .unwrap()
        .len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = TestApp::over(store.clone(), true);
        app.settle_billing().await;
        eprintln!("{left} Stripe events waited in the store at the crash");
        assert_eq!(app.available(ws).await, packs * 500);
        assert!(app.local.billing_queue.dead_letters().is_empty());
    });
    std::fs::remove_dir_all(&dir).ok();
}
