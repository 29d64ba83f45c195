//! In-process queue for the local runner and tests, with SQS's rules: a failed message is
//! delivered again up to `max_receives` times, then moved to the dead-letter list; FIFO
//! queues drop a repeated deduplication id seen in the last five minutes and deliver in
//! order (one message at a time, a failing message retried before the next).
//!
//! A durable queue ([`LocalQueue::durable`]) keeps every message in the embedded store from
//! before its send is acknowledged until it is consumed, so a crash loses nothing: the next
//! start delivers what was left (at least once, as SQS does; consumers are idempotent).

use super::{Consumer, Delivery, Message, Queue, QueueError};
use crate::clock::{Clock, SystemClock};
use crate::store::StoreError;
use crate::store::embedded::EmbeddedStore;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

const DEDUP_WINDOW_SECS: i64 = 300;

pub struct LocalQueue {
    name: String,
    fifo: bool,
    max_receives: u32,
    retry_delay: Duration,
    /// `None` once closed: the delivery task ends when what was sent before is delivered.
    tx: Mutex<Option<mpsc::UnboundedSender<(u64, Message)>>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<(u64, Message)>>>,
    journal: Option<Arc<EmbeddedStore>>,
    dedup: Mutex<HashMap<String, chrono::DateTime<chrono::Utc>>>,
    /// What the deduplication window is measured by: the local system's one clock, so a
    /// delivery repeated after the clock moved past the window reaches the consumer, as a
    /// Stripe redelivery minutes or hours later reaches it in AWS.
    clock: Mutex<Arc<dyn Clock>>,
    /// FIFO sends take turns: a twin of a send whose message is still being kept waits for
    /// its outcome, so it never answers "sent" for a message the first then failed to keep.
    sending: tokio::sync::Mutex<()>,
    dead: Mutex<Vec<Delivery>>,
    pending: AtomicUsize,
    idle: Notify,
    next_id: AtomicUsize,
}

impl LocalQueue {
    pub fn new(name: &str, fifo: bool, max_receives: u32) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            name: name.to_owned(),
            fifo,
            max_receives: max_receives.max(1),
            retry_delay: Duration::from_millis(20),
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            journal: None,
            dedup: Mutex::new(HashMap::new()),
            clock: Mutex::new(Arc::new(SystemClock)),
            sending: tokio::sync::Mutex::new(()),
            dead: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            next_id: AtomicUsize::new(1),
        })
    }

    /// A queue kept in `journal`: what it held when the process stopped is delivered again
    /// once it starts (dead letters stay dead letters).
    pub fn durable(
        name: &str,
        fifo: bool,
        max_receives: u32,
        journal: Arc<EmbeddedStore>,
    ) -> Result<Arc<Self>, StoreError> {
        let left = journal.queue_contents(name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut dead = Vec::new();
        let mut next = 1u64;
        let mut pending = 0usize;
        for (seq, is_dead, json) in left {
            next = next.max(seq + 1);
            let message = decode_message(&json)?;
            if is_dead {
                dead.push(Delivery {
                    message_id: format!("{name}-{seq}"),
                    body: message.body,
                    group_id: message.group_id,
                    receive_count: max_receives.max(1),
                });
            } else {
                pending += 1;
                tx.send((seq, message)).expect("the receiver is held");
            }
        }
        if pending > 0 {
            tracing::info!(queue = %name, messages = pending, "delivering what was queued before the last stop");
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            fifo,
            max_receives: max_receives.max(1),
            retry_delay: Duration::from_millis(20),
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            journal: Some(journal),
            dedup: Mutex::new(HashMap::new()),
            clock: Mutex::new(Arc::new(SystemClock)),
            sending: tokio::sync::Mutex::new(()),
            dead: Mutex::new(dead),
            pending: AtomicUsize::new(pending),
            idle: Notify::new(),
            next_id: AtomicUsize::new(next as usize),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts delivering to `consumer` on a background task (once per queue).
    pub fn start(self: &Arc<Self>, consumer: Arc<dyn Consumer>) {
        let mut rx = self
            .rx
            .lock()
            .expect("queue lock")
            .take()
            .expect("a local queue has one consumer");
        // Held weakly: the queue owns the sender, so a task holding it strongly would keep
        // both alive (with the consumer and all it holds) after the system is dropped. Once
        // it is, the channel closes and the task ends.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some((seq, message)) = rx.recv().await {
                let Some(queue) = weak.upgrade() else {
                    break;
                };
                let message_id = format!("{}-{seq}", queue.name);
                let dead = queue.deliver(consumer.as_ref(), message_id, message).await;
                if let Some(journal) = &queue.journal
                    && let Err(e) = journal.queue_settle(&queue.name, seq, dead).await
                {
                    // Kept: delivered again after a restart (consumers are idempotent).
                    tracing::error!(queue = %queue.name, seq, error = %e, "could not mark a message consumed");
                }
                if queue.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    queue.idle.notify_waiters();
                }
            }
        });
    }

    /// Delivers until consumed (`false`) or dead-lettered (`true`).
    async fn deliver(&self, consumer: &dyn Consumer, message_id: String, message: Message) -> bool {
        for receive_count in 1..=self.max_receives {
            let delivery = Delivery {
                message_id: message_id.clone(),
                body: message.body.clone(),
                group_id: message.group_id.clone(),
                receive_count,
            };
            match consumer.consume(&delivery).await {
                Ok(()) => return false,
                Err(e) if receive_count == self.max_receives => {
                    tracing::error!(queue = %self.name, message_id = %message_id, error = %e,
                        "message moved to the dead-letter queue");
                    self.dead.lock().expect("queue lock").push(delivery);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(queue = %self.name, message_id = %message_id, receive_count,
                        error = %e, "message failed; redelivering");
                    tokio::time::sleep(self.retry_delay * receive_count).await;
                }
            }
        }
        true
    }

    /// Waits until every message sent so far has been consumed or dead-lettered.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Refuses further sends and lets the delivery task end once it has delivered what was
    /// sent before. A consumer that holds its own queue (directly or through what it
    /// calls) would otherwise keep the task, and itself, alive for good.
    pub fn close(&self) {
        self.tx.lock().expect("queue lock").take();
    }

    fn closed(&self) -> QueueError {
        QueueError::unavailable(format!("queue {} is closed", self.name))
    }

    /// Measures the deduplication window by `clock` (the wall clock until then).
    pub fn keep_time_by(&self, clock: Arc<dyn Clock>) {
        *self.clock.lock().expect("queue lock") = clock;
    }

    /// Forgets that a deduplication id was seen, as SQS does once its five minutes pass:
    /// for a resend that stands for one made later (the simulator's redelivery).
    pub fn forget_dedup(&self, dedup_id: &str) {
        self.dedup.lock().expect("queue lock").remove(dedup_id);
    }

    pub fn dead_letters(&self) -> Vec<Delivery> {
        self.dead.lock().expect("queue lock").clone()
    }

    /// Moves the dead letters back to the queue, in the order they died, as SQS's DLQ
    /// redrive does. Returns how many.
    pub async fn redrive(&self) -> Result<usize, QueueError> {
        let dead = std::mem::take(&mut *self.dead.lock().expect("queue lock"));
        let n = dead.len();
        for d in dead {
            self.send(Message {
                body: d.body,
                group_id: d.group_id,
                dedup_id: Some(format!("redrive-{}", d.message_id)),
            })
            .await?;
        }
        Ok(n)
    }
}

#[async_trait]
impl Queue for LocalQueue {
    async fn send(&self, message: Message) -> Result<(), QueueError> {
        if self.tx.lock().expect("queue lock").is_none() {
            return Err(self.closed());
        }
        let _turn = if self.fifo {
            Some(self.sending.lock().await)
        } else {
            None
        };
        if self.fifo {
            let dedup_id = message
                .dedup_id
                .clone()
                .ok_or_else(|| QueueError::unavailable("FIFO messages need a deduplication id"))?;
            let now = self.clock.lock().expect("queue lock").now();
            let mut seen = self.dedup.lock().expect("queue lock");
            seen.retain(|_, at| (now - *at).num_seconds() < DEDUP_WINDOW_SECS);
            if seen.contains_key(&dedup_id) {
                return Ok(());
            }
            seen.insert(dedup_id, now);
        }
        let seq = self.next_id.fetch_add(1, Ordering::SeqCst) as u64;
        // Kept before the send is acknowledged: an acknowledged message survives a crash.
        if let Some(journal) = &self.journal
            && let Err(e) = journal
                .queue_put(&self.name, seq, &encode_message(&message))
                .await
        {
            // Not sent: a retry with the same deduplication id must not be dropped.
            if let Some(d) = &message.dedup_id {
                self.dedup.lock().expect("queue lock").remove(d);
            }
            return Err(QueueError::unavailable(e));
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let tx = self.tx.lock().expect("queue lock").clone();
        match tx.map(|tx| tx.send((seq, message))) {
            Some(Ok(())) => Ok(()),
            _ => {
                if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.idle.notify_waiters();
                }
                Err(self.closed())
            }
        }
    }
}

fn encode_message(m: &Message) -> String {
    serde_json::json!({"body": m.body, "group_id": m.group_id, "dedup_id": m.dedup_id}).to_string()
}

fn decode_message(json: &str) -> Result<Message, StoreError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(StoreError::decode)?;
    let text = |k: &str| v[k].as_str().map(str::to_owned);
    Ok(Message {
        body: text("body").ok_or_else(|| StoreError::decode("queued message without a body"))?,
        group_id: text("group_id"),
        dedup_id: text("dedup_id"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ConsumeError;

    struct Flaky {
        seen: Mutex<Vec<(String, u32)>>,
    }

    #[async_trait]
    impl Consumer for Flaky {
        async fn consume(&self, d: &Delivery) -> Result<(), ConsumeError> {
            self.seen
                .lock()
                .unwrap()
                .push((d.body.clone(), d.receive_count));
            match d.body.as_str() {
                "poison" => Err(ConsumeError::Poison("unreadable".into())),
                "twice" if d.receive_count < 2 => Err(ConsumeError::Retry("not yet".into())),
                _ => Ok(()),
            }
        }
    }

    /// A queue delivering to a new [`Flaky`] consumer.
    fn started(name: &str, fifo: bool) -> (Arc<LocalQueue>, Arc<Flaky>) {
        let q = LocalQueue::new(name, fifo, 3);
        let c = Arc::new(Flaky {
            seen: Mutex::new(Vec::new()),
        });
        q.start(c.clone());
        (q, c)
    }

    fn msg(body: &str, dedup: &str) -> Message {
        Message {
            body: body.into(),
            group_id: Some("g".into()),
            dedup_id: Some(dedup.into()),
        }
    }

    /// A dropped queue ends its delivery task and lets go of its consumer (and all it
    /// holds), instead of both living on for the life of the process.
    #[tokio::test]
    async fn a_dropped_queue_lets_go_of_its_consumer() {
        let (q, c) = started("t", false);
        q.send(msg("a", "1")).await.unwrap();
        q.until_idle().await;
        assert_eq!(Arc::strong_count(&c), 2);
        drop(q);
        for _ in 0..1_000 {
            if Arc::strong_count(&c) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            Arc::strong_count(&c),
            1,
            "the delivery task still holds the consumer"
        );
    }

    #[tokio::test]
    async fn failures_are_redelivered_then_dead_lettered_and_duplicates_dropped_in_order() {
        let (q, c) = started("t.fifo", true);
        for (b, d) in [
            ("a", "1"),
            ("twice", "2"),
            ("a-again", "1"),
            ("poison", "3"),
            ("z", "4"),
        ] {
            q.send(msg(b, d)).await.unwrap();
        }
        q.until_idle().await;
        let seen = c.seen.lock().unwrap().clone();
        let expected: Vec<(String, u32)> = [
            ("a", 1),
            ("twice", 1),
            ("twice", 2),
            ("poison", 1),
            ("poison", 2),
            ("poison", 3),
            ("z", 1),
        ]
        .iter()
        .map(|(b, n)| (b.to_string(), *n))
        .collect();
        assert_eq!(seen, expected);
        let dead = q.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].body.as_str(), dead[0].receive_count),
            ("poison", 3)
        );
    }

    /// The deduplication window is five minutes of the local system's clock: a repeat
    /// within it is dropped, one after it (a redelivery hours later) is delivered.
    #[tokio::test]
    async fn the_deduplication_window_follows_the_local_clock() {
        let (q, c) = started("t.fifo", true);
        let clock = Arc::new(crate::clock::ManualClock::new(
            chrono::DateTime::parse_from_rfc3339("2028-02-29T23:58:00Z")
                .unwrap()
                .into(),
        ));
        q.keep_time_by(clock.clone());
        q.send(msg("a", "1")).await.unwrap();
        clock.advance(chrono::Duration::seconds(299));
        q.send(msg("a-within", "1")).await.unwrap();
        clock.advance(chrono::Duration::seconds(1));
        q.send(msg("a-after", "1")).await.unwrap();
        q.send(msg("a-after-twice", "1")).await.unwrap();
        q.until_idle().await;
        let seen: Vec<String> = c
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(b, _)| b.clone())
            .collect();
        assert_eq!(seen, ["a", "a-after"]);
    }
}
