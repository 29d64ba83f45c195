//! How DynamoDB's failures are read: by the error codes and cancellation reasons the SDK
//! reports, never by their text, into "already applied", "retry on fresh state", "retry
//! later" and "permanent".

use super::*;

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
pub(super) fn classify<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> StoreError
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
    /// A new generation's record or owner exists already.
    Exists,
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

fn cancellation(
    reasons: &[CancellationReason],
    idempotency: usize,
    exists: &[usize],
) -> Cancellation {
    let failed = |i: usize| {
        reasons
            .get(i)
            .is_some_and(|r| code(r) == "ConditionalCheckFailed")
    };
    if failed(idempotency) {
        return Cancellation::Duplicate;
    }
    if exists.iter().any(|&i| failed(i)) {
        return Cancellation::Exists;
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
/// `attribute_not_exists` condition means the operation was already applied; a failed
/// condition at one of `exists` (a new generation's record or owner) that the generation
/// exists already; any other failed condition (the state's version, an entry, a
/// generation's status) that the workspace moved on.
pub(super) fn classify_commit(
    err: SdkError<TransactWriteItemsError, HttpResponse>,
    idempotency: usize,
    exists: &[usize],
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
            match cancellation(reasons, idempotency, exists) {
                Cancellation::Duplicate => CommitError::Duplicate,
                Cancellation::Exists => CommitError::GenerationExists,
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
        // attempt, which may yet land. As for a timeout: reload and try again, knowing that
        // the write found then may be this call's own (its observer is still to be told).
        TransactWriteItemsError::TransactionInProgressException(_) => {
            CommitError::Store(StoreError::unavailable(Context::new(
                format!("{OP}: an earlier attempt with the same token is in progress"),
                err,
            )))
        }
        _ => CommitError::Store(classify(OP, err)),
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
            let e = classify_commit(cancelled(&["None", code, "None"]), IDEM, &[]);
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
        let e = classify_commit(
            cancelled(&["None", "TransactionConflict", "None"]),
            IDEM,
            &[],
        );
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
            &[],
        );
        assert!(
            matches!(e, CommitError::Store(StoreError::Unavailable(_))),
            "{e:?}"
        );
    }

    #[test]
    fn failed_conditions_tell_a_duplicate_from_a_version_conflict() {
        // The idempotency record exists: the operation happened, whatever else failed.
        for codes in [
            &["ConditionalCheckFailed", "None", "None"][..],
            &["ConditionalCheckFailed", "ConditionalCheckFailed", "None"][..],
            &["ConditionalCheckFailed", "None", "ThrottlingError"][..],
        ] {
            let e = classify_commit(cancelled(codes), IDEM, &[]);
            assert!(matches!(e, CommitError::Duplicate), "{codes:?}: {e:?}");
        }
        // The state's version (or an entry, or a generation owner) moved on.
        for codes in [
            &["None", "ConditionalCheckFailed", "None"][..],
            &["None", "None", "ConditionalCheckFailed"][..],
            &["None", "ConditionalCheckFailed", "ThrottlingError"][..],
        ] {
            let e = classify_commit(cancelled(codes), IDEM, &[]);
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
            let e = classify_commit(cancelled(codes), IDEM, &[]);
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
            &[],
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
        let e = classify_commit(throttled, IDEM, &[]);
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
                &[],
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
            &[],
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
        /// Commits that land but answer as a timeout would (the outcome unknown).
        landed: std::sync::atomic::AtomicU32,
    }

    #[cfg(feature = "local")]
    #[async_trait]
    impl LedgerStore for Throttled {
        async fn load(&self, w: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError> {
            self.inner.load(w).await
        }
        async fn read_op(
            &self,
            w: &WorkspaceId,
            k: &IdempotencyKey,
            g: Option<GenerationId>,
        ) -> Result<OpRead, StoreError> {
            self.inner.read_op(w, k, g).await
        }
        async fn open_holds(
            &self,
            w: &WorkspaceId,
            until: Option<DateTime<Utc>>,
            limit: usize,
        ) -> Result<Vec<Hold>, StoreError> {
            self.inner.open_holds(w, until, limit).await
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
                    &[],
                ));
            }
            if self
                .landed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                self.inner.commit(c).await?;
                return Err(CommitError::Store(StoreError::unavailable(
                    "TransactWriteItems: timed out",
                )));
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
            landed: std::sync::atomic::AtomicU32::new(0),
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
                    month: None,
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

    /// Counts what the service tells its observer.
    #[cfg(feature = "local")]
    #[derive(Default)]
    struct Told(std::sync::Mutex<Vec<crate::ledger::Outcome>>);

    #[cfg(feature = "local")]
    #[async_trait]
    impl crate::service::CommitObserver for Told {
        async fn committed(
            &self,
            _: &WorkspaceId,
            _: crate::service::Before,
            _: &WorkspaceState,
            outcome: &crate::ledger::Outcome,
        ) {
            self.0.lock().unwrap().push(outcome.clone());
        }
    }

    #[cfg(feature = "local")]
    #[tokio::test]
    async fn a_commit_that_landed_while_the_store_was_unsure_is_observed_once() {
        use crate::ledger::{Actor, LotSource, Operation, Refs};
        use crate::service::{Ledger, LedgerRequest};
        let store = std::sync::Arc::new(Throttled {
            inner: super::super::embedded::EmbeddedStore::in_memory(),
            failures: std::sync::atomic::AtomicU32::new(0),
            landed: std::sync::atomic::AtomicU32::new(1),
        });
        let told = std::sync::Arc::new(Told::default());
        let mut ledger = Ledger::new(
            store.clone(),
            std::sync::Arc::new(crate::clock::SystemClock),
            std::sync::Arc::new(crate::catalog::Catalog::builtin()),
        );
        ledger.observer = Some(told.clone());
        let workspace = WorkspaceId::parse("org_unsure").unwrap();
        let grant = |key: &str| LedgerRequest {
            workspace: workspace.clone(),
            key: IdempotencyKey::derived(key.into()),
            fingerprint: key.into(),
            actor: Actor::system(),
            refs: Refs::default(),
            op: Operation::Grant {
                month: None,
                source: LotSource::Pack,
                credits: crate::money::Credits::new(100),
                expires_at: None,
                note: None,
            },
        };
        let first = ledger.execute(grant("grant-1")).await.expect("landed");
        assert_eq!(store.landed.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(*told.0.lock().unwrap(), vec![first.clone()], "told once");
        // A later replay of the same request is not a commit: nobody is told again.
        assert_eq!(ledger.execute(grant("grant-1")).await.unwrap(), first);
        assert_eq!(told.0.lock().unwrap().len(), 1);
        let state = store.load(&workspace).await.unwrap().expect("state");
        assert_eq!(state.version, 1, "applied once");
    }
}
