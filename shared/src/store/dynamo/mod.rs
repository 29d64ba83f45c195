//! DynamoDB single-table store.
//!
//! | PK | SK | holds |
//! |---|---|---|
//! | `WORKSPACE#<id>` | `STATE` | workspace state JSON, `version` (optimistic concurrency) |
//! | `WORKSPACE#<id>` | `ENTRY#<seq, 20 digits>` | journal entry JSON (append-only) |
//! | `WORKSPACE#<id>` | `IDEM#<key>` | idempotency record JSON, optional `ttl` |
//! | `WORKSPACE#<id>` | `GEN#<gen id>` | generation JSON, `status` and `model` for filtering, `hold` (JSON) while it holds credits |
//! | `WORKSPACE#<id>` | `HOLD#<deadline ms, 15 digits>#<gen id>` | an open hold JSON, in deadline order |
//! | `WORKSPACE#<id>` | `STATUS_INDEX` | how far the workspace's generations written before the status index are filed in it |
//! | `GENERATION#<gen id>` | `OWNER` | `workspace`: which workspace a generation belongs to |
//!
//! Documents (`store::docs`) share the table. One filed in the due index also carries
//! `due_shard` (`DUE#<n>`) and `due_at` (epoch milliseconds), the keys of the sparse
//! global secondary index [`DUE_INDEX`]: items without them are not in the index at all.
//!
//! Every commit is one `TransactWriteItems`. Idempotency rests on `attribute_not_exists`
//! conditions, never on `ClientRequestToken` (which expires after ten minutes anyway).

mod errors;

use super::*;
use crate::config::StoreConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, Delete,
    GlobalSecondaryIndex, KeySchemaElement, KeyType, KeysAndAttributes, Projection, ProjectionType,
    Put, ScalarAttributeType, TimeToLiveSpecification, TransactWriteItem,
};
use errors::{classify, classify_commit};
use std::collections::HashMap;

/// Partition key attribute name.
pub const PK: &str = "PK";
/// Sort key attribute name.
pub const SK: &str = "SK";
/// TTL attribute: epoch seconds after which DynamoDB may delete garbage.
pub const TTL: &str = "ttl";
/// The sparse due index (global secondary index): partition `DUE_SHARD`, sort `DUE_AT`.
pub const DUE_INDEX: &str = "due";
/// The due index's partition key: `DUE#<n>`.
pub const DUE_SHARD: &str = "due_shard";
/// The due index's sort key: when the document falls due, in epoch milliseconds.
pub const DUE_AT: &str = "due_at";
/// Generations by status (global secondary index): partition [`GEN_STATUS`], sort `SK`.
pub const STATUS_INDEX: &str = "status";
/// The status index's partition key on a generation item: `<workspace>#<status>`.
pub const GEN_STATUS: &str = "gen_status";

/// A workspace's progress in filing generations written before the status index existed
/// (`WORKSPACE#<id>` / `STATUS_INDEX`): when the first pass began (`first`, epoch ms), the
/// pass under way (`pass`, when it began, and `cursor`, the last sort key it looked at), or
/// `done`.
pub const STATUS_MARKER: &str = "STATUS_INDEX";
/// Generation items looked at per page while a workspace's are not all filed.
pub const STATUS_BACKFILL_PAGE: i32 = 200;
/// How long one filtered read files items before it answers.
pub const STATUS_FILING_TIME: std::time::Duration = std::time::Duration::from_secs(1);
/// How long after its first pass a complete pass over a workspace's items counts as final:
/// the instances of the release before the index finish within a function timeout (5 min).
pub const STATUS_SETTLING: chrono::Duration = chrono::Duration::minutes(10);
/// How many of those are filed at once.
const STATUS_BACKFILL_CONCURRENCY: usize = 16;

fn gen_status(workspace: &WorkspaceId, status: GenerationStatus) -> String {
    format!("{workspace}#{}", status.as_str())
}

/// The `status` attribute of a generation item.
fn status_of(item: &HashMap<String, AttributeValue>) -> Result<GenerationStatus, StoreError> {
    let seen = item
        .get("status")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::decode("generation item without a status"))?;
    [
        GenerationStatus::Held,
        GenerationStatus::Completed,
        GenerationStatus::Failed,
        GenerationStatus::Expired,
    ]
    .into_iter()
    .find(|st| st.as_str() == seen)
    .ok_or_else(|| StoreError::decode(format!("unknown generation status {seen:?}")))
}

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    /// Workspaces known to have every generation in the status index (a cache of their
    /// `done` markers, so a filtered read costs no extra read once they are).
    indexed: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<WorkspaceId>>>,
    /// [`STATUS_SETTLING`], or another period (tests).
    status_settling: chrono::Duration,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn workspace_pk(a: &WorkspaceId) -> String {
    format!("WORKSPACE#{a}")
}
fn entry_sk(seq: u64) -> String {
    format!("ENTRY#{seq:020}")
}
fn hold_sk(h: &Hold) -> String {
    format!("HOLD#{}#{}", deadline_key(h.deadline), h.generation)
}
fn backend(e: impl Into<BoxError>) -> StoreError {
    StoreError::backend(e)
}

fn put(p: Put) -> TransactWriteItem {
    TransactWriteItem::builder().put(p).build()
}

fn body(item: &HashMap<String, AttributeValue>) -> Result<&str, StoreError> {
    item.get("body")
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        .ok_or_else(|| StoreError::decode("item has no body"))
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            indexed: Default::default(),
            status_settling: STATUS_SETTLING,
        }
    }

    /// The same store, counting a pass over a workspace's generation items as final that
    /// long after its first (instead of [`STATUS_SETTLING`]).
    pub fn with_status_settling(mut self, settling: chrono::Duration) -> Self {
        self.status_settling = settling;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// A client for a DynamoDB-compatible server on a local endpoint, with dummy credentials.
    pub fn local_client(endpoint: &str) -> Client {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "local",
                "local",
                None,
                None,
                "tally-local",
            ))
            .endpoint_url(endpoint)
            .build();
        Client::from_conf(config)
    }

    /// Creates the table (keys, the due index and TTL) if it does not exist. For local use
    /// and tests; in AWS the SAM template owns the table.
    pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
        let exists = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .is_ok();
        if !exists {
            client
                .create_table()
                .table_name(table)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(PK)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(backend)?,
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(SK)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(backend)?,
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(PK)
                        .key_type(KeyType::Hash)
                        .build()
                        .map_err(backend)?,
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(SK)
                        .key_type(KeyType::Range)
                        .build()
                        .map_err(backend)?,
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(DUE_SHARD)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(backend)?,
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(DUE_AT)
                        .attribute_type(ScalarAttributeType::N)
                        .build()
                        .map_err(backend)?,
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(GEN_STATUS)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(backend)?,
                )
                .global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(STATUS_INDEX)
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name(GEN_STATUS)
                                .key_type(KeyType::Hash)
                                .build()
                                .map_err(backend)?,
                        )
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name(SK)
                                .key_type(KeyType::Range)
                                .build()
                                .map_err(backend)?,
                        )
                        .projection(
                            Projection::builder()
                                .projection_type(ProjectionType::All)
                                .build(),
                        )
                        .build()
                        .map_err(backend)?,
                )
                .global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(DUE_INDEX)
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name(DUE_SHARD)
                                .key_type(KeyType::Hash)
                                .build()
                                .map_err(backend)?,
                        )
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name(DUE_AT)
                                .key_type(KeyType::Range)
                                .build()
                                .map_err(backend)?,
                        )
                        .projection(
                            Projection::builder()
                                .projection_type(ProjectionType::KeysOnly)
                                .build(),
                        )
                        .build()
                        .map_err(backend)?,
                )
                .send()
                .await
                .map_err(|e| classify("CreateTable", e))?;
            client
                .update_time_to_live()
                .table_name(table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .attribute_name(TTL)
                        .enabled(true)
                        .build()
                        .map_err(backend)?,
                )
                .send()
                .await
                .map_err(|e| classify("UpdateTimeToLive", e))?;
        }
        Ok(())
    }

    fn put(&self, item: HashMap<String, AttributeValue>, condition: Option<&str>) -> Put {
        let mut p = Put::builder().table_name(&self.table).set_item(Some(item));
        if let Some(c) = condition {
            p = p.condition_expression(c);
        }
        p.build().expect("table and item are set")
    }

    async fn get(
        &self,
        pk: String,
        sk: String,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, s(pk))
            .key(SK, s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("GetItem", e))?;
        Ok(out.item)
    }

    /// Whether every generation item of the workspace is in the status index, so a
    /// filtered read may use it; when not, files the next items into it first.
    ///
    /// Items written before the index existed lack its key (`gen_status`). A filtered read
    /// gives them their key for up to [`STATUS_FILING_TIME`], a page of
    /// [`STATUS_BACKFILL_PAGE`] items at a time, and records how far it got in the
    /// workspace's [`STATUS_MARKER`] item; until then the read answers from the workspace's
    /// own items, complete either way. Instances of the release before the index, still
    /// running during a deploy, may write items without the key for a while, so a pass
    /// over all of them counts as final only if it began [`STATUS_SETTLING`] after the
    /// first; earlier passes are followed by another. The read that makes the marker
    /// `done` still answers from the items (the index may not show yet what it filed).
    async fn status_index_ready(&self, workspace: &WorkspaceId) -> Result<bool, StoreError> {
        if self.known_indexed(workspace) {
            return Ok(true);
        }
        let pk = workspace_pk(workspace);
        let marker = self.get(pk.clone(), STATUS_MARKER.into()).await?;
        if marker.as_ref().is_some_and(|m| m.contains_key("done")) {
            self.remember_indexed(workspace);
            return Ok(true);
        }
        let now = Utc::now().timestamp_millis();
        let first = marker
            .as_ref()
            .and_then(|m| m.get("first"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(now);
        let mut cursor = marker
            .as_ref()
            .and_then(|m| m.get("cursor"))
            .and_then(|c| c.as_s().ok())
            .cloned();
        // When the pass under way began: a pass is final only if it began after the
        // settling time, so that no item it passed can be rewritten without the key.
        let pass = marker
            .as_ref()
            .filter(|_| cursor.is_some())
            .and_then(|m| m.get("pass"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(now);
        let began = std::time::Instant::now();
        loop {
            let start = cursor
                .as_ref()
                .map(|c| HashMap::from([(PK.to_string(), s(&pk)), (SK.to_string(), s(c))]));
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :gen)")
                .filter_expression("attribute_not_exists(#gs)")
                .projection_expression("#sk, #status")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_names("#gs", GEN_STATUS)
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":gen", s("GEN#"))
                .consistent_read(true)
                .limit(STATUS_BACKFILL_PAGE)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify("Query", e));
            let page = match page {
                Ok(page) => page,
                // The answer does not need the filing: it comes from the items this time.
                Err(e) if e.is_transient() => return Ok(false),
                Err(e) => return Err(e),
            };
            let mut missing = Vec::with_capacity(page.items().len());
            for item in page.items() {
                let sk = item
                    .get(SK)
                    .and_then(|v| v.as_s().ok())
                    .ok_or_else(|| StoreError::decode("generation item without a sort key"))?;
                missing.push((sk.clone(), status_of(item)?));
            }
            use futures_util::stream::{self, StreamExt, TryStreamExt};
            let filed = stream::iter(missing)
                .map(|(sk, status)| self.file_status(workspace, &pk, sk, status))
                .buffer_unordered(STATUS_BACKFILL_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await;
            match filed {
                Ok(_) => {}
                // Busy (a ledger write in the same moment): this read answers from the
                // items, the next one goes on from the marker.
                Err(e) if e.is_transient() => return Ok(false),
                Err(e) => return Err(e),
            }
            cursor = page
                .last_evaluated_key()
                .and_then(|k| k.get(SK))
                .and_then(|v| v.as_s().ok())
                .cloned();
            let final_pass =
                cursor.is_none() && pass - first >= self.status_settling.num_milliseconds();
            if cursor.is_none() || began.elapsed() >= STATUS_FILING_TIME {
                let mut progress = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item(PK, s(&pk))
                    .item(SK, s(STATUS_MARKER))
                    .item("first", AttributeValue::N(first.to_string()))
                    // A `done` written meanwhile (by another read or the workspace's first
                    // commit) stays.
                    .condition_expression("attribute_not_exists(done)");
                if final_pass {
                    progress = progress.item("done", AttributeValue::Bool(true));
                } else if let Some(c) = &cursor {
                    progress = progress
                        .item("cursor", s(c))
                        .item("pass", AttributeValue::N(pass.to_string()));
                }
                match progress.send().await {
                    Ok(_) => {}
                    Err(SdkError::ServiceError(e))
                        if e.err().is_conditional_check_failed_exception() => {}
                    Err(e) => {
                        let e = classify("PutItem", e);
                        if !e.is_transient() {
                            return Err(e);
                        }
                    }
                }
                return Ok(false);
            }
        }
    }

    /// Gives one generation item the status index's key, under the status it has when
    /// written: only where the key is still missing, and the item is read again when its
    /// status changed since it was seen (an earlier release may still be writing it).
    async fn file_status(
        &self,
        workspace: &WorkspaceId,
        pk: &str,
        sk: String,
        mut status: GenerationStatus,
    ) -> Result<(), StoreError> {
        for _ in 0..3 {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(PK, s(pk))
                .key(SK, s(&sk))
                .update_expression("SET #gs = :gs")
                .condition_expression("attribute_not_exists(#gs) AND #status = :seen")
                .expression_attribute_names("#gs", GEN_STATUS)
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":gs", s(gen_status(workspace, status)))
                .expression_attribute_values(":seen", s(status.as_str()))
                .send()
                .await;
            match update {
                Ok(_) => return Ok(()),
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    let Some(item) = self.get(pk.to_owned(), sk.clone()).await? else {
                        return Ok(());
                    };
                    if item.contains_key(GEN_STATUS) {
                        return Ok(());
                    }
                    status = status_of(&item)?;
                }
                Err(e) => return Err(classify("UpdateItem", e)),
            }
        }
        Err(StoreError::unavailable(format!(
            "generation item {sk} kept changing while it was filed"
        )))
    }

    fn known_indexed(&self, workspace: &WorkspaceId) -> bool {
        self.indexed
            .lock()
            .is_ok_and(|known| known.contains(workspace))
    }

    fn remember_indexed(&self, workspace: &WorkspaceId) {
        if let Ok(mut known) = self.indexed.lock() {
            if known.len() >= 100_000 {
                known.clear();
            }
            known.insert(workspace.clone());
        }
    }

    /// Queries one workspace's items with a sort-key range, newest first, page by page, until
    /// `limit` items pass `keep`.
    async fn query_desc<T>(
        &self,
        workspace: &WorkspaceId,
        low: String,
        high: String,
        limit: usize,
        keep: impl FnMut(T) -> Scan<T>,
    ) -> Result<Vec<T>, StoreError>
    where
        T: serde::de::DeserializeOwned,
    {
        self.query_desc_in(None, (PK, workspace_pk(workspace)), low, high, limit, keep)
            .await
    }

    /// [`query_desc`](Self::query_desc) on the table (`index` `None`, consistent) or on a
    /// secondary index, under the partition `(attribute, value)`.
    async fn query_desc_in<T>(
        &self,
        index: Option<&str>,
        partition: (&str, String),
        low: String,
        high: String,
        limit: usize,
        mut keep: impl FnMut(T) -> Scan<T>,
    ) -> Result<Vec<T>, StoreError>
    where
        T: serde::de::DeserializeOwned,
    {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let mut pages = 0usize;
        while out.len() < limit {
            // DynamoDB's `Limit` counts items read, before `keep` filters them: the first
            // page asks for what is wanted, and a page after one that did not fill it (a
            // filter at work) for a full hundred, never one item per round trip.
            let want = if pages == 0 { limit - out.len() } else { 100 };
            pages += 1;
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(index.map(str::to_owned))
                .key_condition_expression("#pk = :pk AND #sk BETWEEN :lo AND :hi")
                .expression_attribute_names("#pk", partition.0)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(partition.1.clone()))
                .expression_attribute_values(":lo", s(low.clone()))
                .expression_attribute_values(":hi", s(high.clone()))
                .scan_index_forward(false)
                // Secondary indexes are only eventually consistent.
                .set_consistent_read(index.is_none().then_some(true))
                .limit(want.clamp(1, 100) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            let mut stop = false;
            for item in page.items() {
                match keep(decode(body(item)?)?) {
                    Scan::Keep(v) => {
                        out.push(v);
                        if out.len() >= limit {
                            break;
                        }
                    }
                    Scan::Skip => {}
                    Scan::Stop => {
                        stop = true;
                        break;
                    }
                }
            }
            if stop {
                break;
            }
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl LedgerStore for DynamoStore {
    async fn load(&self, workspace: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError> {
        match self.get(workspace_pk(workspace), "STATE".into()).await? {
            Some(item) => Ok(Some(decode::<WorkspaceState>(body(&item)?)?.normalized())),
            None => Ok(None),
        }
    }

    async fn read_op(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
        generation: Option<GenerationId>,
    ) -> Result<OpRead, StoreError> {
        let pk = workspace_pk(workspace);
        let key_of =
            |sk: String| HashMap::from([(PK.to_string(), s(&pk)), (SK.to_string(), s(sk))]);
        let idem_sk = format!("IDEM#{key}");
        let gen_sk = generation.map(|g| format!("GEN#{g}"));
        let mut keys = vec![key_of("STATE".into()), key_of(idem_sk.clone())];
        if let Some(sk) = &gen_sk {
            keys.push(key_of(sk.clone()));
        }
        let mut found: Vec<HashMap<String, AttributeValue>> = Vec::new();
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .build()
                .map_err(backend)?,
        );
        // DynamoDB may leave keys unprocessed under load; ask again for those.
        let mut rounds = 0;
        while let Some(request) = pending.take() {
            rounds += 1;
            if rounds > 10 {
                return Err(StoreError::unavailable(
                    "BatchGetItem left keys unprocessed",
                ));
            }
            if rounds > 1 {
                // Keys left unprocessed mean the table is throttled: wait a little.
                let wait = fastrand::u64(0..=(5u64 << rounds.min(6)));
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| classify("BatchGetItem", e))?;
            if let Some(mut items) = out.responses {
                found.extend(items.remove(&self.table).unwrap_or_default());
            }
            pending = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .filter(|k| !k.keys().is_empty());
        }
        let mut read = OpRead::default();
        for item in &found {
            let sk = item.get(SK).and_then(|v| v.as_s().ok()).map(String::as_str);
            match sk {
                Some("STATE") => {
                    read.state = Some(decode::<WorkspaceState>(body(item)?)?.normalized());
                }
                Some(k) if k == idem_sk => read.idempotency = Some(decode(body(item)?)?),
                Some(k) if Some(k) == gen_sk.as_deref() => {
                    let hold = match item.get("hold").map(|v| v.as_s()) {
                        Some(Ok(text)) => Some(decode(text)?),
                        Some(Err(_)) => return Err(StoreError::decode("hold is not a string")),
                        None => None,
                    };
                    read.generation = Some(StoredGeneration {
                        record: decode(body(item)?)?,
                        hold,
                    });
                }
                _ => {}
            }
        }
        Ok(read)
    }

    async fn open_holds(
        &self,
        workspace: &WorkspaceId,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<Hold>, StoreError> {
        let high = match until {
            Some(t) => format!("HOLD#{}#~", deadline_key(t)),
            None => "HOLD#~".into(),
        };
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND #sk BETWEEN :lo AND :hi")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(workspace_pk(workspace)))
                .expression_attribute_values(":lo", s("HOLD#"))
                .expression_attribute_values(":hi", s(high.clone()))
                .consistent_read(true)
                .limit(((limit - out.len()) as i32).clamp(1, 1000))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            for item in page.items() {
                out.push(decode(body(item)?)?);
            }
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn commit(&self, c: Commit) -> Result<(), CommitError> {
        // A workspace's first commit also says its generations are all in the status
        // index: every one will be written with its key.
        let first = c.expected_version() == 0;
        c.check_size()?;
        let pk = workspace_pk(&c.state.workspace);
        let mut items: Vec<TransactWriteItem> = Vec::new();
        // Items whose failed condition means "that generation exists already".
        let mut exists_at: Vec<usize> = Vec::new();

        let idem = &c.idempotency;
        let mut idem_item = HashMap::from([
            (PK.to_string(), s(&pk)),
            (SK.to_string(), s(format!("IDEM#{}", idem.key))),
            ("body".to_string(), s(encode(idem)?)),
        ]);
        if let Some(t) = idem.expires_at {
            idem_item.insert(TTL.into(), n(t.timestamp().max(0) as u64));
        }
        let idem_index = items.len();
        items.push(put(self.put(idem_item, Some("attribute_not_exists(PK)"))));

        let state_item = HashMap::from([
            (PK.to_string(), s(&pk)),
            (SK.to_string(), s("STATE")),
            ("version".to_string(), n(c.state.version)),
            ("body".to_string(), s(encode(&c.state)?)),
        ]);
        let expected = c.expected_version();
        let state_put = if expected == 0 {
            self.put(state_item, Some("attribute_not_exists(PK)"))
        } else {
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(state_item))
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", n(expected))
                .build()
                .expect("table and item are set")
        };
        items.push(put(state_put));

        for e in &c.entries {
            let item = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(entry_sk(e.seq))),
                ("body".to_string(), s(encode(e)?)),
            ]);
            items.push(put(self.put(item, Some("attribute_not_exists(PK)"))));
        }
        for (prior, g) in &c.generations {
            let mut item = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(format!("GEN#{}", g.id))),
                ("status".to_string(), s(g.status.as_str())),
                (
                    GEN_STATUS.to_string(),
                    s(gen_status(&c.state.workspace, g.status)),
                ),
                ("model".to_string(), s(&g.estimate.model)),
                ("body".to_string(), s(encode(g)?)),
            ]);
            if let Some(h) = c.placed.iter().find(|h| h.generation == g.id) {
                item.insert("hold".into(), s(encode(h)?));
            }
            // The record is written only over the one this operation read.
            let p = match prior {
                None => {
                    exists_at.push(items.len());
                    self.put(item, Some("attribute_not_exists(PK)"))
                }
                Some(status) => Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .condition_expression("#status = :prior")
                    .expression_attribute_names("#status", "status")
                    .expression_attribute_values(":prior", s(status.as_str()))
                    .build()
                    .expect("table and item are set"),
            };
            items.push(put(p));
        }
        for h in &c.placed {
            let item = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(hold_sk(h))),
                ("body".to_string(), s(encode(h)?)),
            ]);
            items.push(put(self.put(item, Some("attribute_not_exists(PK)"))));
        }
        // A hold kept inside an older state item has no item of its own: deleting a
        // missing item is a no-op, and the generation's status guards the close.
        for h in &c.closed {
            let delete = Delete::builder()
                .table_name(&self.table)
                .key(PK, s(&pk))
                .key(SK, s(hold_sk(h)))
                .build()
                .expect("table and key are set");
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        for id in &c.new_generations {
            let item = HashMap::from([
                (PK.to_string(), s(format!("GENERATION#{id}"))),
                (SK.to_string(), s("OWNER")),
                ("workspace".to_string(), s(c.state.workspace.as_str())),
            ]);
            exists_at.push(items.len());
            items.push(put(self.put(item, Some("attribute_not_exists(PK)"))));
        }
        if first {
            let marker = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(STATUS_MARKER)),
                ("done".to_string(), AttributeValue::Bool(true)),
            ]);
            items.push(put(self.put(marker, None)));
        }

        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        result
            .map(|_| ())
            .map_err(|e| classify_commit(e, idem_index, &exists_at))
    }

    async fn idempotency(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self
            .get(workspace_pk(workspace), format!("IDEM#{key}"))
            .await?
        {
            Some(item) => Ok(Some(decode(body(&item)?)?)),
            None => Ok(None),
        }
    }

    async fn generation(
        &self,
        workspace: &WorkspaceId,
        id: GenerationId,
    ) -> Result<Option<Generation>, StoreError> {
        match self
            .get(workspace_pk(workspace), format!("GEN#{id}"))
            .await?
        {
            Some(item) => Ok(Some(decode(body(&item)?)?)),
            None => Ok(None),
        }
    }

    async fn generation_owner(&self, id: GenerationId) -> Result<Option<WorkspaceId>, StoreError> {
        let Some(item) = self.get(format!("GENERATION#{id}"), "OWNER".into()).await? else {
            return Ok(None);
        };
        let workspace = item
            .get("workspace")
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| StoreError::decode("owner item has no workspace"))?;
        WorkspaceId::parse(workspace)
            .map(Some)
            .map_err(StoreError::decode)
    }

    async fn generations(
        &self,
        workspace: &WorkspaceId,
        query: &GenerationQuery,
    ) -> Result<Vec<Generation>, StoreError> {
        // `BETWEEN` includes its ends: start just below the (exclusive) bound, so a page
        // after a cursor does not read the cursor's own generation again.
        let high = match query.upper() {
            Some(b) => format!("GEN#{}", b.just_below()),
            None => "GEN#~".into(),
        };
        let before = query.before;
        // A status is read from its index (only generations with that status) once the
        // workspace's generations are all in it; until then from the workspace's items.
        let indexed = match query.status {
            Some(_) => self.status_index_ready(workspace).await?,
            None => false,
        };
        let (index, partition) = match query.status {
            Some(status) if indexed => (
                Some(STATUS_INDEX),
                (GEN_STATUS, gen_status(workspace, status)),
            ),
            _ => (None, (PK, workspace_pk(workspace))),
        };
        self.query_desc_in(
            index,
            partition,
            "GEN#".into(),
            high,
            query.limit,
            |g: Generation| {
                if query.past_range(&g) {
                    Scan::Stop
                } else if Some(g.id) != before && matches_query(&g, query) {
                    Scan::Keep(g)
                } else {
                    Scan::Skip
                }
            },
        )
        .await
    }

    async fn entries(
        &self,
        workspace: &WorkspaceId,
        query: &EntryQuery,
    ) -> Result<Vec<Entry>, StoreError> {
        let high = match query.before {
            Some(0) | Some(1) => return Ok(Vec::new()),
            Some(b) => entry_sk(b - 1),
            None => "ENTRY#~".into(),
        };
        self.query_desc(workspace, "ENTRY#".into(), high, query.limit, Scan::Keep)
            .await
    }

    async fn entries_by_seq(
        &self,
        workspace: &WorkspaceId,
        seqs: &[u64],
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(item) = self.get(workspace_pk(workspace), entry_sk(seq)).await? {
                out.push(decode(body(&item)?)?);
            }
        }
        Ok(out)
    }
}

/// The production store: the configured table, AWS configuration from the environment
/// (region, credentials), or a local server when an endpoint is configured.
pub async fn from_config(cfg: &StoreConfig) -> DynamoStore {
    let client = match &cfg.endpoint {
        Some(endpoint) => DynamoStore::local_client(endpoint.as_str()),
        None => Client::new(crate::config::aws_sdk_config().await),
    };
    DynamoStore::new(client, cfg.table.clone())
}

#[async_trait]
impl DocStore for DynamoStore {
    async fn get_doc(&self, pk: &str, sk: &str) -> Result<Option<Doc>, StoreError> {
        let Some(item) = self.get(pk.to_owned(), sk.to_owned()).await? else {
            return Ok(None);
        };
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StoreError::decode("document has no version"))?;
        Ok(Some(Doc {
            pk: pk.to_owned(),
            sk: sk.to_owned(),
            body: body(&item)?.to_owned(),
            version,
        }))
    }

    async fn put_doc(
        &self,
        pk: &str,
        sk: &str,
        doc: &str,
        expected: u64,
    ) -> Result<bool, StoreError> {
        self.put_doc_due(pk, sk, doc, expected, None).await
    }

    async fn put_doc_due(
        &self,
        pk: &str,
        sk: &str,
        doc: &str,
        expected: u64,
        due: Option<DueMark>,
    ) -> Result<bool, StoreError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(PK, s(pk))
            .item(SK, s(sk))
            .item("version", n(expected + 1))
            .item("body", s(doc));
        if let Some(mark) = due {
            put = put.item(DUE_SHARD, s(DueMark::shard_key(mark.shard))).item(
                DUE_AT,
                AttributeValue::N(docs::due_millis(mark.at).to_string()),
            );
        }
        put = if expected == 0 {
            put.condition_expression("attribute_not_exists(PK)")
        } else {
            put.condition_expression("version = :expected")
                .expression_attribute_values(":expected", n(expected))
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(false)
            }
            Err(e) => Err(classify("PutItem", e)),
        }
    }

    async fn due_docs(
        &self,
        shard: u32,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDoc>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(DUE_INDEX)
                .key_condition_expression("#shard = :shard AND #at <= :until")
                .expression_attribute_names("#shard", DUE_SHARD)
                .expression_attribute_names("#at", DUE_AT)
                .expression_attribute_values(":shard", s(DueMark::shard_key(shard)))
                .expression_attribute_values(
                    ":until",
                    AttributeValue::N(docs::due_millis(until).to_string()),
                )
                .limit(((limit - out.len()) as i32).clamp(1, 1000))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            for item in page.items() {
                let key = |name: &str| {
                    item.get(name)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .ok_or_else(|| StoreError::decode(format!("due item without {name}")))
                };
                let at = item
                    .get(DUE_AT)
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| StoreError::decode("due item without a due time"))?;
                out.push(DueDoc {
                    pk: key(PK)?,
                    sk: key(SK)?,
                    due: docs::from_millis(at)?,
                });
                if out.len() >= limit {
                    break;
                }
            }
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn list_docs_before(
        &self,
        pk: &str,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Doc>, StoreError> {
        // The next page starts below `before`: DynamoDB's own pagination from that key.
        // DynamoDB ends a page at 1 MB whatever the limit: pages are followed until
        // `limit` documents are read or none are left, as the embedded store answers.
        let mut start =
            before.map(|b| HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(b))]));
        let mut out = Vec::new();
        while out.len() < limit {
            let page = self
                .client
                .query()
                .set_exclusive_start_key(start.take())
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":prefix", s(prefix))
                .scan_index_forward(false)
                .consistent_read(true)
                .limit(((limit - out.len()) as i32).clamp(1, 1000))
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            for item in page.items() {
                out.push(Doc {
                    pk: pk.to_owned(),
                    sk: item
                        .get(SK)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default(),
                    body: body(item)?.to_owned(),
                    version: item
                        .get("version")
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                });
            }
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}
