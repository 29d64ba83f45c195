//! DynamoDB single-table store.
//!
//! | PK | SK | holds |
//! |---|---|---|
//! | `WORKSPACE#<id>` | `STATE` | workspace state JSON, `version` (optimistic concurrency) |
//! | `WORKSPACE#<id>` | `ENTRY#<seq, 20 digits>` | journal entry JSON (append-only) |
//! | `WORKSPACE#<id>` | `IDEM#<key>` | idempotency record JSON, optional `ttl` |
//! | `WORKSPACE#<id>` | `GEN#<gen id>` | generation JSON, `status` and `model` for filtering |
//! | `GENERATION#<gen id>` | `OWNER` | `workspace`: which workspace a generation belongs to |
//!
//! Every commit is one `TransactWriteItems`. Idempotency rests on `attribute_not_exists`
//! conditions, never on `ClientRequestToken` (which expires after ten minutes anyway).

use super::*;
use crate::config::StoreConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, KeySchemaElement,
    KeyType, Put, ScalarAttributeType, TimeToLiveSpecification, TransactWriteItem,
};
use std::collections::HashMap;

/// Partition key attribute name.
pub const PK: &str = "PK";
/// Sort key attribute name.
pub const SK: &str = "SK";
/// TTL attribute: epoch seconds after which DynamoDB may delete garbage.
pub const TTL: &str = "ttl";

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
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
fn backend(e: impl Into<BoxError>) -> StoreError {
    StoreError::backend(e)
}

/// Error codes (the `__type` of DynamoDB's answer) after which the same request may succeed
/// later, as AWS's "Error handling with DynamoDB" lists them ("OK to retry? Yes"):
/// throttling of the table, the account or the control plane, server-side errors, and
/// items held by a transaction in flight. Everything else (`ValidationException`,
/// `ConditionalCheckFailedException`, `ResourceNotFoundException`, access errors...) needs
/// a different request and is permanent.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    // Too many concurrent control-plane operations; clears as they finish.
    "LimitExceededException",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
];

/// Whether a failed call may succeed if made again: no answer (timeouts, connections
/// lost, unreadable answers), a 5xx or 429 status, or one of [`TRANSIENT_CODES`].
fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        // A request the connector refused as malformed fails the same way every time.
        SdkError::DispatchFailure(e) => !e.is_user(),
        SdkError::ServiceError(e) => {
            let status = e.raw().status();
            status.is_server_error()
                || status.as_u16() == 429
                || e.err().code().is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
        _ => false,
    }
}

/// Sorts an SDK failure of operation `op` into transient (retry) and permanent, keeping the
/// whole SDK error as the cause.
fn classify<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if is_transient(&err) {
        StoreError::unavailable(Context::new(op, err))
    } else {
        StoreError::backend(Context::new(op, err))
    }
}

/// `CancellationReason` codes of a cancelled transaction after which running the whole
/// operation again may succeed: capacity ran out for one of its items.
const TRANSIENT_CANCELLATIONS: &[&str] = &[
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "RequestLimitExceeded",
];

/// What a `TransactionCanceledException` means for a commit, from the per-item reasons
/// (in the order of the items; `None` for an item that was fine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancellation {
    /// The idempotency record exists already: the operation happened before.
    Duplicate,
    /// Another writer got there first (a failed version or absence condition) or holds an
    /// item in its own transaction: reload and retry.
    Conflict,
    /// DynamoDB throttled one of the items: retry later.
    Transient,
    /// A request that can never succeed (`ValidationError`,
    /// `ItemCollectionSizeLimitExceeded`, or a code this store does not know).
    Permanent,
}

/// A reason's code; DynamoDB sends the literal `None` for items that were fine.
fn code(reason: &CancellationReason) -> &str {
    reason.code().unwrap_or("None")
}

fn cancellation(reasons: &[CancellationReason], idempotency: usize) -> Cancellation {
    if reasons
        .get(idempotency)
        .is_some_and(|r| code(r) == "ConditionalCheckFailed")
    {
        return Cancellation::Duplicate;
    }
    let codes: Vec<&str> = reasons.iter().map(code).filter(|c| *c != "None").collect();
    let known = |c: &&str| {
        matches!(*c, "ConditionalCheckFailed" | "TransactionConflict")
            || TRANSIENT_CANCELLATIONS.contains(c)
    };
    // A bad request stays bad however often it is retried, so it wins over a conflict or
    // throttling reported for another item of the same transaction.
    if codes.is_empty() || !codes.iter().all(known) {
        Cancellation::Permanent
    } else if codes
        .iter()
        .any(|c| matches!(*c, "ConditionalCheckFailed" | "TransactionConflict"))
    {
        Cancellation::Conflict
    } else {
        Cancellation::Transient
    }
}

/// How a failed commit transaction is reported. `idempotency` is the index of the
/// idempotency record's `Put` among the transaction's items: its failed
/// `attribute_not_exists` condition means the operation was already applied, any other
/// failed condition (the state's version, an entry or a generation that exists already)
/// that the workspace moved on.
fn classify_commit(
    err: SdkError<TransactWriteItemsError, HttpResponse>,
    idempotency: usize,
) -> CommitError {
    const OP: &str = "TransactWriteItems";
    let SdkError::ServiceError(service) = &err else {
        return CommitError::Store(classify(OP, err));
    };
    match service.err() {
        TransactWriteItemsError::TransactionCanceledException(cancel) => {
            let reasons = cancel.cancellation_reasons();
            let what = || {
                let codes: Vec<&str> = reasons.iter().map(code).collect();
                format!("{OP} cancelled [{}]", codes.join(", "))
            };
            match cancellation(reasons, idempotency) {
                Cancellation::Duplicate => CommitError::Duplicate,
                Cancellation::Conflict => CommitError::Conflict,
                Cancellation::Transient => {
                    CommitError::Store(StoreError::unavailable(Context::new(what(), err)))
                }
                Cancellation::Permanent => {
                    CommitError::Store(StoreError::backend(Context::new(what(), err)))
                }
            }
        }
        // The same client token is still being worked on: Tally sets none, but the SDK fills
        // one in per call and its own retries reuse it, so a retry can meet its earlier
        // attempt. Reloading and trying again is right, as for a conflict.
        TransactWriteItemsError::TransactionInProgressException(_) => CommitError::Conflict,
        _ => CommitError::Store(classify(OP, err)),
    }
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
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
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

    /// Creates the table (keys and TTL) if it does not exist. For local use and tests; in
    /// AWS the SAM template owns the table.
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

    /// Queries one workspace's items with a sort-key range, newest first, page by page, until
    /// `limit` items pass `keep`.
    async fn query_desc<T>(
        &self,
        workspace: &WorkspaceId,
        low: String,
        high: String,
        limit: usize,
        mut keep: impl FnMut(T) -> Option<T>,
    ) -> Result<Vec<T>, StoreError>
    where
        T: serde::de::DeserializeOwned,
    {
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
                .expression_attribute_values(":lo", s(low.clone()))
                .expression_attribute_values(":hi", s(high.clone()))
                .scan_index_forward(false)
                .consistent_read(true)
                .limit(((limit - out.len()) as i32).clamp(1, 100))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            for item in page.items() {
                if let Some(v) = keep(decode(body(item)?)?) {
                    out.push(v);
                    if out.len() >= limit {
                        break;
                    }
                }
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
            Some(item) => Ok(Some(decode(body(&item)?)?)),
            None => Ok(None),
        }
    }

    async fn commit(&self, c: Commit) -> Result<(), CommitError> {
        let pk = workspace_pk(&c.state.workspace);
        let mut items = Vec::new();

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
        items.push(self.put(idem_item, Some("attribute_not_exists(PK)")));

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
        items.push(state_put);

        for e in &c.entries {
            let item = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(entry_sk(e.seq))),
                ("body".to_string(), s(encode(e)?)),
            ]);
            items.push(self.put(item, Some("attribute_not_exists(PK)")));
        }
        for g in &c.generations {
            let item = HashMap::from([
                (PK.to_string(), s(&pk)),
                (SK.to_string(), s(format!("GEN#{}", g.id))),
                ("status".to_string(), s(g.status.as_str())),
                ("model".to_string(), s(&g.estimate.model)),
                ("body".to_string(), s(encode(g)?)),
            ]);
            items.push(self.put(item, None));
        }
        for id in &c.new_generations {
            let item = HashMap::from([
                (PK.to_string(), s(format!("GENERATION#{id}"))),
                (SK.to_string(), s("OWNER")),
                ("workspace".to_string(), s(c.state.workspace.as_str())),
            ]);
            items.push(self.put(item, Some("attribute_not_exists(PK)")));
        }

        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(
                items
                    .into_iter()
                    .map(|p| TransactWriteItem::builder().put(p).build())
                    .collect(),
            ))
            .send()
            .await;
        result
            .map(|_| ())
            .map_err(|e| classify_commit(e, idem_index))
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
        let high = match query.before {
            Some(b) => format!("GEN#{b}"),
            None => "GEN#~".into(),
        };
        let before = query.before;
        self.query_desc(
            workspace,
            "GEN#".into(),
            high,
            query.limit,
            |g: Generation| (Some(g.id) != before && matches_query(&g, query)).then_some(g),
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
        self.query_desc(workspace, "ENTRY#".into(), high, query.limit, Some)
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
        None => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            Client::new(&config)
        }
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
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(PK, s(pk))
            .item(SK, s(sk))
            .item("version", n(expected + 1))
            .item("body", s(doc));
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

    async fn list_docs(
        &self,
        pk: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Doc>, StoreError> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":prefix", s(prefix))
            .scan_index_forward(false)
            .consistent_read(true)
            .limit(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| classify("Query", e))?;
        out.items()
            .iter()
            .map(|item| {
                Ok(Doc {
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
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_dynamodb::operation::get_item::GetItemError;
    use aws_sdk_dynamodb::types::error::{
        ProvisionedThroughputExceededException, ThrottlingException, TransactionCanceledException,
        TransactionInProgressException,
    };
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// The transaction's items as `commit` orders them: idempotency record, state, entries.
    const IDEM: usize = 0;

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty())
    }

    /// Metadata as the SDK fills it from DynamoDB's answer.
    fn meta(code: &str) -> ErrorMetadata {
        ErrorMetadata::builder()
            .code(code)
            .message("from the service")
            .build()
    }

    fn cancelled(codes: &[&str]) -> SdkError<TransactWriteItemsError, HttpResponse> {
        let reasons = codes
            .iter()
            .map(|c| CancellationReason::builder().code(*c).build())
            .collect();
        let cancel = TransactionCanceledException::builder()
            .message(format!(
                "Transaction cancelled, please refer cancellation reasons for specific reasons [{}]",
                codes.join(", ")
            ))
            .set_cancellation_reasons(Some(reasons))
            .meta(meta("TransactionCanceledException"))
            .build();
        SdkError::service_error(
            TransactWriteItemsError::TransactionCanceledException(cancel),
            response(400),
        )
    }

    fn transact(
        err: TransactWriteItemsError,
        status: u16,
    ) -> SdkError<TransactWriteItemsError, HttpResponse> {
        SdkError::service_error(err, response(status))
    }

    /// What `Ledger::execute` does with a failed commit.
    fn retried_by_service(e: &CommitError) -> bool {
        matches!(
            e,
            CommitError::Conflict | CommitError::Store(StoreError::Unavailable(_))
        )
    }

    #[test]
    fn throttling_inside_a_cancelled_transaction_is_transient() {
        for code in [
            "ThrottlingError",
            "ProvisionedThroughputExceeded",
            "RequestLimitExceeded",
        ] {
            let e = classify_commit(cancelled(&["None", code, "None"]), IDEM);
            assert!(
                matches!(&e, CommitError::Store(StoreError::Unavailable(_))),
                "{code}: {e:?}"
            );
            assert!(retried_by_service(&e));
            // The reasons are in the message and the SDK error is kept as the cause.
            let text = e.to_string();
            assert!(text.contains(code), "{text}");
            let CommitError::Store(store) = &e else {
                unreachable!()
            };
            let context = std::error::Error::source(store)
                .and_then(|c| c.downcast_ref::<Context>())
                .expect("context");
            let sdk = std::error::Error::source(context)
                .and_then(|c| c.downcast_ref::<SdkError<TransactWriteItemsError, HttpResponse>>())
                .expect("the SDK error is the cause");
            assert!(matches!(
                sdk.as_service_error(),
                Some(TransactWriteItemsError::TransactionCanceledException(_))
            ));
        }
    }

    #[test]
    fn a_transaction_conflict_is_a_conflict_even_when_no_condition_failed() {
        let e = classify_commit(cancelled(&["None", "TransactionConflict", "None"]), IDEM);
        assert!(matches!(e, CommitError::Conflict), "{e:?}");
        let e = classify_commit(
            transact(
                TransactWriteItemsError::TransactionInProgressException(
                    TransactionInProgressException::builder()
                        .meta(meta("TransactionInProgressException"))
                        .build(),
                ),
                400,
            ),
            IDEM,
        );
        assert!(matches!(e, CommitError::Conflict), "{e:?}");
    }

    #[test]
    fn failed_conditions_tell_a_duplicate_from_a_version_conflict() {
        // The idempotency record exists: the operation happened, whatever else failed.
        for codes in [
            &["ConditionalCheckFailed", "None", "None"][..],
            &["ConditionalCheckFailed", "ConditionalCheckFailed", "None"][..],
            &["ConditionalCheckFailed", "None", "ThrottlingError"][..],
        ] {
            let e = classify_commit(cancelled(codes), IDEM);
            assert!(matches!(e, CommitError::Duplicate), "{codes:?}: {e:?}");
        }
        // The state's version (or an entry, or a generation owner) moved on.
        for codes in [
            &["None", "ConditionalCheckFailed", "None"][..],
            &["None", "None", "ConditionalCheckFailed"][..],
            &["None", "ConditionalCheckFailed", "ThrottlingError"][..],
        ] {
            let e = classify_commit(cancelled(codes), IDEM);
            assert!(matches!(e, CommitError::Conflict), "{codes:?}: {e:?}");
        }
    }

    #[test]
    fn invalid_requests_are_permanent() {
        for codes in [
            &["None", "ValidationError", "None"][..],
            &["None", "ItemCollectionSizeLimitExceeded"][..],
            &["None", "ConditionalCheckFailed", "ValidationError"][..],
            &["None", "SomethingNew"][..],
            &["None", "None"][..],
            &[][..],
        ] {
            let e = classify_commit(cancelled(codes), IDEM);
            assert!(
                matches!(&e, CommitError::Store(StoreError::Backend(_))),
                "{codes:?}: {e:?}"
            );
            assert!(!retried_by_service(&e));
        }
        // ValidationException is not modelled for TransactWriteItems: only its code says it.
        let e = classify_commit(
            transact(
                TransactWriteItemsError::generic(meta("ValidationException")),
                400,
            ),
            IDEM,
        );
        assert!(
            matches!(&e, CommitError::Store(StoreError::Backend(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains("ValidationException"), "{e}");
    }

    #[test]
    fn throttling_and_server_errors_outside_a_cancellation_are_transient() {
        let throttled = transact(
            TransactWriteItemsError::ThrottlingException(
                ThrottlingException::builder()
                    .message("Rate of requests exceeds the allowed throughput.")
                    .meta(meta("ThrottlingException"))
                    .build(),
            ),
            400,
        );
        let e = classify_commit(throttled, IDEM);
        assert!(
            matches!(&e, CommitError::Store(StoreError::Unavailable(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains("Rate of requests"), "{e}");
        for (code, status) in [
            ("RequestLimitExceeded", 400),
            ("InternalServerError", 500),
            ("ServiceUnavailable", 503),
            ("SomethingNew", 502),
            ("SomethingNew", 429),
        ] {
            let e = classify_commit(
                transact(TransactWriteItemsError::generic(meta(code)), status),
                IDEM,
            );
            assert!(
                matches!(&e, CommitError::Store(StoreError::Unavailable(_))),
                "{code} {status}: {e:?}"
            );
        }
        let e = classify_commit(
            transact(
                TransactWriteItemsError::generic(meta("ResourceNotFoundException")),
                400,
            ),
            IDEM,
        );
        assert!(
            matches!(&e, CommitError::Store(StoreError::Backend(_))),
            "{e:?}"
        );
    }

    #[test]
    fn reads_are_classified_by_error_code_and_failure_kind() {
        let get = |err: GetItemError, status: u16| {
            classify("GetItem", SdkError::service_error(err, response(status)))
        };
        let e = get(
            GetItemError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .meta(meta("ProvisionedThroughputExceededException"))
                    .build(),
            ),
            400,
        );
        assert!(e.is_transient(), "{e}");
        assert!(
            e.to_string()
                .starts_with("storage temporarily unavailable: GetItem: ")
        );
        for code in [
            "ThrottlingException",
            "LimitExceededException",
            "TransactionConflictException",
        ] {
            assert!(
                get(GetItemError::generic(meta(code)), 400).is_transient(),
                "{code}"
            );
        }
        for code in [
            "ValidationException",
            "ResourceNotFoundException",
            "AccessDeniedException",
            "ConditionalCheckFailedException",
        ] {
            let e = get(GetItemError::generic(meta(code)), 400);
            assert!(matches!(e, StoreError::Backend(_)), "{code}: {e:?}");
        }

        let timeout: SdkError<GetItemError, HttpResponse> =
            SdkError::timeout_error("no answer within the attempt timeout");
        assert!(classify("GetItem", timeout).is_transient());
        let io: SdkError<GetItemError, HttpResponse> = SdkError::dispatch_failure(
            ConnectorError::io(std::io::Error::other("connection reset").into()),
        );
        let e = classify("GetItem", io);
        assert!(e.is_transient());
        assert!(e.to_string().contains("connection reset"), "{e}");
        let unreadable: SdkError<GetItemError, HttpResponse> =
            SdkError::response_error("truncated body", response(200));
        assert!(classify("GetItem", unreadable).is_transient());
        let user: SdkError<GetItemError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::user("invalid endpoint".into()));
        assert!(matches!(classify("GetItem", user), StoreError::Backend(_)));
        let unbuilt: SdkError<GetItemError, HttpResponse> =
            SdkError::construction_failure("missing table name");
        assert!(matches!(
            classify("GetItem", unbuilt),
            StoreError::Backend(_)
        ));
    }

    /// An embedded store whose first commits fail the way DynamoDB fails a throttled
    /// transaction, to see the service retry them.
    #[cfg(feature = "local")]
    struct Throttled {
        inner: super::super::embedded::EmbeddedStore,
        failures: std::sync::atomic::AtomicU32,
    }

    #[cfg(feature = "local")]
    #[async_trait]
    impl LedgerStore for Throttled {
        async fn load(&self, w: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError> {
            self.inner.load(w).await
        }
        async fn commit(&self, c: Commit) -> Result<(), CommitError> {
            use std::sync::atomic::Ordering;
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(classify_commit(
                    cancelled(&["None", "ThrottlingError"]),
                    IDEM,
                ));
            }
            self.inner.commit(c).await
        }
        async fn idempotency(
            &self,
            w: &WorkspaceId,
            k: &IdempotencyKey,
        ) -> Result<Option<IdempotencyRecord>, StoreError> {
            self.inner.idempotency(w, k).await
        }
        async fn generation(
            &self,
            w: &WorkspaceId,
            id: GenerationId,
        ) -> Result<Option<Generation>, StoreError> {
            self.inner.generation(w, id).await
        }
        async fn generation_owner(
            &self,
            id: GenerationId,
        ) -> Result<Option<WorkspaceId>, StoreError> {
            self.inner.generation_owner(id).await
        }
        async fn generations(
            &self,
            w: &WorkspaceId,
            q: &GenerationQuery,
        ) -> Result<Vec<Generation>, StoreError> {
            self.inner.generations(w, q).await
        }
        async fn entries(&self, w: &WorkspaceId, q: &EntryQuery) -> Result<Vec<Entry>, StoreError> {
            self.inner.entries(w, q).await
        }
        async fn entries_by_seq(
            &self,
            w: &WorkspaceId,
            seqs: &[u64],
        ) -> Result<Vec<Entry>, StoreError> {
            self.inner.entries_by_seq(w, seqs).await
        }
    }

    #[cfg(feature = "local")]
    #[tokio::test]
    async fn the_service_retries_a_throttled_transaction_until_it_commits() {
        use crate::ledger::{Actor, LotSource, Operation, Refs};
        use crate::service::{Ledger, LedgerRequest};
        let store = std::sync::Arc::new(Throttled {
            inner: super::super::embedded::EmbeddedStore::in_memory(),
            failures: std::sync::atomic::AtomicU32::new(3),
        });
        let ledger = Ledger::new(
            store.clone(),
            std::sync::Arc::new(crate::clock::SystemClock),
            std::sync::Arc::new(crate::catalog::Catalog::builtin()),
        );
        let workspace = WorkspaceId::parse("org_throttled").unwrap();
        ledger
            .execute(LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived("grant-1".into()),
                fingerprint: "grant-1".into(),
                actor: Actor::system(),
                refs: Refs::default(),
                op: Operation::Grant {
                    source: LotSource::Pack,
                    credits: crate::money::Credits::new(100),
                    expires_at: None,
                    note: None,
                },
            })
            .await
            .expect("committed after the throttling passed");
        assert_eq!(store.failures.load(std::sync::atomic::Ordering::SeqCst), 0);
        let state = store.load(&workspace).await.unwrap().expect("state");
        assert_eq!(state.version, 1);
    }
}
