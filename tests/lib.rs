//! Helpers shared by the integration tests: stores (embedded and DynamoDB on loopback), a
//! controllable clock, dev tokens and an in-process HTTP client for the local app.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tally::catalog::Catalog;
use tally::catalog::Estimate;
use tally::clock::ManualClock;
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, ActorKind, LotSource, Operation, Refs};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest};
use tally::store::LedgerStore;
use tally::store::dynamo::DynamoStore;
use tally::store::embedded::EmbeddedStore;
use tower::ServiceExt;

pub const SECRET: &str = "test-secret";

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
}

pub fn embedded_store() -> Arc<dyn LedgerStore> {
    Arc::new(EmbeddedStore::in_memory())
}

/// A fresh table on the DynamoDB-compatible server named by `DYNAMODB_ENDPOINT`
/// (`make test` starts one). Fails loudly when there is none.
pub async fn dynamo_store() -> Arc<dyn LedgerStore> {
    Arc::new(dynamo_table().await)
}

/// A fresh table on the DynamoDB-compatible server, as the concrete store (for tests that
/// also read its raw items).
pub async fn dynamo_table() -> DynamoStore {
    table_at("DYNAMODB_ENDPOINT").await
}

/// A fresh table on AWS's own DynamoDB Local (`DYNAMODB_LOCAL_ENDPOINT`), the second server
/// the store is held to. Its build allows at most 10 items in one transaction.
pub async fn dynamo_local_table() -> DynamoStore {
    table_at("DYNAMODB_LOCAL_ENDPOINT").await
}

pub async fn dynamo_local_store() -> Arc<dyn LedgerStore> {
    Arc::new(dynamo_local_table().await)
}

pub async fn dynamo_local_docs() -> Arc<dyn tally::store::DocStore> {
    Arc::new(dynamo_local_table().await)
}

async fn table_at(variable: &str) -> DynamoStore {
    let endpoint = std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{variable} is not set: run the suite with `make test`, which starts the local DynamoDB servers"
        )
    });
    let client = DynamoStore::local_client(&endpoint);
    let table = format!(
        "tally-test-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    DynamoStore::create_table(&client, &table)
        .await
        .expect("create test table");
    DynamoStore::new(client, table)
}

pub fn embedded_docs() -> Arc<dyn tally::store::DocStore> {
    Arc::new(EmbeddedStore::in_memory())
}

/// A fresh DynamoDB table as a document store.
pub async fn dynamo_docs() -> Arc<dyn tally::store::DocStore> {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").expect(
        "DYNAMODB_ENDPOINT is not set: run the suite with `make test`, which starts a local DynamoDB-compatible server",
    );
    let client = DynamoStore::local_client(&endpoint);
    let table = format!(
        "tally-docs-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    DynamoStore::create_table(&client, &table)
        .await
        .expect("create test table");
    Arc::new(DynamoStore::new(client, table))
}

pub fn ledger_over(store: Arc<dyn LedgerStore>) -> (Ledger, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    let ledger = Ledger::new(store, clock.clone(), Arc::new(Catalog::builtin()));
    (ledger, clock)
}

pub fn workspace(id: &str) -> WorkspaceId {
    WorkspaceId::parse(id).unwrap()
}

/// Grants credits to a workspace the way a purchase would (never expiring pack).
pub async fn grant(ledger: &Ledger, ws: &str, credits: u64) {
    ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("test-grant:{}", ulid::Ulid::new())),
            fingerprint: "grant".into(),
            actor: Actor::system(),
            refs: Refs::default(),
            op: Operation::Grant {
                month: None,
                source: LotSource::Pack,
                credits: Credits::new(credits),
                expires_at: None,
                note: None,
            },
        })
        .await
        .expect("grant");
}

/// The catalog's estimate of one imagen-3 image.
pub fn image_estimate(ledger: &Ledger) -> Estimate {
    ledger
        .catalog
        .estimate(&tally::catalog::GenerationSpec {
            workflow: tally::catalog::Workflow::Image,
            model: "imagen-3".into(),
            resolution: None,
            duration_s: None,
            count: None,
        })
        .unwrap()
}

/// Leaves a workspace as the release before the status index did: the generation items
/// named lose their `gen_status`, and the workspace has no `STATUS_INDEX` marker.
pub async fn as_before_the_status_index(
    store: &DynamoStore,
    ws: &str,
    generations: &[GenerationId],
) {
    use aws_sdk_dynamodb::types::AttributeValue::S;
    let (client, table, pk) = (store.client(), store.table(), format!("WORKSPACE#{ws}"));
    for g in generations {
        client
            .update_item()
            .table_name(table)
            .key("PK", S(pk.clone()))
            .key("SK", S(format!("GEN#{g}")))
            .update_expression("REMOVE gen_status")
            .send()
            .await
            .unwrap();
    }
    client
        .delete_item()
        .table_name(table)
        .key("PK", S(pk))
        .key("SK", S(tally::store::dynamo::STATUS_MARKER.into()))
        .send()
        .await
        .unwrap();
}

/// The workspace's `STATUS_INDEX` marker item, if any.
pub async fn status_marker(
    store: &DynamoStore,
    ws: &str,
) -> Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    use aws_sdk_dynamodb::types::AttributeValue::S;
    store
        .client()
        .get_item()
        .table_name(store.table())
        .key("PK", S(format!("WORKSPACE#{ws}")))
        .key("SK", S(tally::store::dynamo::STATUS_MARKER.into()))
        .send()
        .await
        .unwrap()
        .item
}

/// A member's hold of `estimate` for `generation`, keyed as the API keys it.
pub fn hold_request(
    ws: &str,
    generation: GenerationId,
    estimate: &Estimate,
    deadline: DateTime<Utc>,
) -> LedgerRequest {
    LedgerRequest {
        workspace: workspace(ws),
        key: IdempotencyKey::derived(format!("gen:{generation}:hold")),
        fingerprint: "hold".into(),
        actor: Actor::new(ActorKind::Member, "m1"),
        refs: Refs::default(),
        op: Operation::Hold {
            generation,
            estimate: estimate.clone(),
            deadline,
        },
    }
}

pub fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(Utc::now().timestamp() + 3600);
    tally::http::auth::dev_token(SECRET.as_bytes(), &claims)
}

pub fn member(ws: &str, sub: &str) -> String {
    token(json!({"sub": sub, "org_id": ws, "role": "member"}))
}

pub fn owner(ws: &str) -> String {
    token(json!({"sub": format!("{ws}-owner"), "org_id": ws, "role": "owner"}))
}

pub fn service() -> String {
    token(json!({"sub": "generation-service", "scope": "credits:settle"}))
}

pub fn support() -> String {
    token(json!({"sub": "support-1", "scope": "credits:admin"}))
}

/// Webhook secret of the test app's simulator.
pub const WEBHOOK_SECRET: &str = "whsec_test_local";

/// The whole local system (every route, the billing queue and worker, the payments
/// simulator) over an in-memory store and one manual clock, which the simulator advances.
pub struct TestApp {
    pub router: Router,
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
    pub docs: Arc<dyn tally::store::DocStore>,
    pub local: tally_local::Local,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
}

impl Answer {
    /// Asserts a problem+json answer with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{:#}", self.body);
        assert_eq!(self.content_type, "application/problem+json");
        assert_eq!(self.body["code"], code, "{:#}", self.body);
        assert_eq!(self.body["status"], status);
    }
}

impl TestApp {
    pub fn new() -> Self {
        Self::over(Arc::new(EmbeddedStore::in_memory()), false)
    }

    /// The local system over `store`; with `durable`, its queues keep their messages there
    /// too, as `make run` does.
    pub fn over(store: Arc<EmbeddedStore>, durable: bool) -> Self {
        Self::built(store, durable, None, None)
    }

    /// The local system with its ledger over `ledger_store` (a wrapper of `store` that
    /// does something at a chosen moment), its documents and queues over `store`.
    pub fn with_ledger_store(
        store: Arc<EmbeddedStore>,
        ledger_store: Arc<dyn LedgerStore>,
    ) -> Self {
        Self::built(store, false, None, Some(ledger_store))
    }

    /// The local system answering exports within `limit`, as Lambda does.
    pub fn with_export_limit(limit: credits_api::ExportLimit) -> Self {
        Self::built(
            Arc::new(EmbeddedStore::in_memory()),
            false,
            Some(limit),
            None,
        )
    }

    fn built(
        store: Arc<EmbeddedStore>,
        durable: bool,
        export_limit: Option<credits_api::ExportLimit>,
        ledger_store: Option<Arc<dyn LedgerStore>>,
    ) -> Self {
        let (ledger, clock) = ledger_over(ledger_store.unwrap_or_else(|| store.clone()));
        let local = tally_local::build(tally_local::LocalConfig {
            ledger: ledger.clone(),
            clock: clock.clone(),
            docs: store.clone(),
            dev_secret: SECRET.into(),
            webhook_secrets: vec![WEBHOOK_SECRET.into()],
            base_url: "http://tally.test".into(),
            stripe_secret_key: None,
            return_urls: Default::default(),
            helpdesk_url: None,
            helpdesk_secret: tally_local::DEFAULT_HELPDESK_SECRET.into(),
            queue_journal: durable.then(|| store.clone()),
            export_limit,
        })
        .expect("local system");
        Self {
            router: local.router.clone(),
            ledger,
            clock,
            docs: store,
            local,
        }
    }

    /// Waits until every queued Stripe event has been applied (or dead-lettered).
    pub async fn settle_billing(&self) {
        self.local.billing_queue.until_idle().await;
    }

    /// Moves the simulated clock (`{"days": n}`, `{"hours": n}` or `{"until": time}`) and
    /// lets billing catch up.
    pub async fn advance_clock(&self, body: Value) {
        let r = self.dashboard("/sim/clock/advance", body.clone()).await;
        assert_eq!(r.status.as_u16(), 200, "{body}: {:#}", r.body);
    }

    /// Does in the simulated Stripe what a person would in its dashboard (`path` under
    /// `/sim`, with a JSON `body`), then lets billing catch up; the simulator's answer.
    pub async fn dashboard(&self, path: &str, body: Value) -> Answer {
        let a = self
            .send(Method::POST, path, None, Some(&body.to_string()), &[])
            .await;
        self.settle_billing().await;
        a
    }

    /// Whether any of `sent` (notifications) is about a top-up.
    pub fn mentions_top_up(sent: &[Value]) -> bool {
        sent.iter()
            .any(|n| n["type"].as_str().is_some_and(|t| t.starts_with("topup.")))
    }

    /// Advances the simulated clock to a subscription's renewal charge and lets billing
    /// catch up.
    pub async fn renew(&self, subscription: &str) {
        let r = self
            .send(
                Method::POST,
                &format!("/sim/subscriptions/{subscription}/renew"),
                None,
                None,
                &[],
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "{:#}", r.body);
        self.settle_billing().await;
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        let form = headers.iter().any(|(k, _)| *k == "content-type");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() && !form {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let retry_after = res
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer {
            status,
            content_type,
            body,
            retry_after,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.send(Method::GET, path, Some(token), None, &[]).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.send(
            Method::POST,
            path,
            Some(token),
            Some(&body.to_string()),
            &[],
        )
        .await
    }

    /// How many journal entries a workspace has (to prove refusals wrote nothing).
    pub async fn entry_count(&self, ws: &str) -> u64 {
        self.ledger
            .store
            .load(&workspace(ws))
            .await
            .unwrap()
            .map_or(0, |s| s.next_seq - 1)
    }
}

impl Default for TestApp {
    fn default() -> Self {
        Self::new()
    }
}

/// One of Stripe's example objects from `fixtures/stripe/`.
pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../fixtures/stripe/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture JSON")
}

/// A Stripe event around `object`, shaped like Stripe's example event.
pub fn stripe_event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    let mut e = fixture("event");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["data"] = json!({"object": object});
    e
}

/// Buying and changing through the simulated Stripe, for tests of what follows.
impl TestApp {
    /// Checks out a plan and pays on the simulated page; returns the subscription id.
    pub async fn subscribe(&self, ws: &str, plan: &str, interval: &str) -> String {
        let o = owner(ws);
        let s = self
            .post(
                "/v1/checkout/sessions",
                &o,
                json!({"kind": "plan", "plan": plan, "interval": interval}),
            )
            .await;
        assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
        self.pay(s.body["url"].as_str().unwrap()).await;
        self.get("/v1/subscription", &o).await.body["subscription"]["id"]
            .as_str()
            .expect("subscribed")
            .to_owned()
    }

    /// Opens a checkout for `quantity` packs of 500 as the workspace's owner; returns the
    /// page's url (not paid yet).
    pub async fn pack_checkout(&self, ws: &str, quantity: u32) -> String {
        let s = self
            .post(
                "/v1/checkout/sessions",
                &owner(ws),
                json!({"kind": "pack", "pack": "pack_500", "quantity": quantity}),
            )
            .await;
        assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
        s.body["url"].as_str().expect("a checkout url").to_owned()
    }

    /// Presses Pay on a simulated checkout page and waits for Stripe's events.
    pub async fn pay(&self, url: &str) -> u16 {
        let status = self.pay_acknowledged(url).await;
        self.settle_billing().await;
        status
    }

    /// Pays a checkout: Stripe's events are delivered and acknowledged, not yet applied.
    pub async fn pay_acknowledged(&self, url: &str) -> u16 {
        let path = url
            .strip_prefix("http://tally.test")
            .expect("local checkout url");
        let page = self.send(Method::GET, path, None, None, &[]).await;
        assert_eq!(page.status.as_u16(), 200);
        assert!(page.body.as_str().unwrap().contains("id=\"pay\""));
        let res = self
            .send(
                Method::POST,
                &format!("{path}/pay"),
                None,
                Some(""),
                &[("content-type", "application/x-www-form-urlencoded")],
            )
            .await;
        res.status.as_u16()
    }

    /// The workspace's available credits.
    pub async fn available(&self, ws: &str) -> u64 {
        let b = self.get("/v1/balance", &owner(ws)).await.body;
        b["available"].as_u64().expect("a balance")
    }

    /// Asks for a plan change as the owner.
    pub async fn change_plan(&self, ws: &str, plan: &str, interval: &str) -> Answer {
        self.post(
            "/v1/subscription/change",
            &owner(ws),
            json!({"plan": plan, "interval": interval}),
        )
        .await
    }

    /// Sets the add-on units as the owner.
    /// Opens a checkout for one `pack` as `ws`'s owner; answers the session's local path
    /// (its page on the simulated Stripe).
    pub async fn open_pack_checkout(&self, ws: &str, pack: &str) -> String {
        let s = self
            .post(
                "/v1/checkout/sessions",
                &owner(ws),
                json!({"kind": "pack", "pack": pack}),
            )
            .await;
        assert_eq!(s.status.as_u16(), 201, "{:#}", s.body);
        s.body["url"]
            .as_str()
            .unwrap()
            .strip_prefix("http://tally.test")
            .unwrap()
            .to_owned()
    }

    pub async fn set_units(&self, ws: &str, units: u32) -> Answer {
        self.send(
            Method::PUT,
            "/v1/subscription/addons",
            Some(&owner(ws)),
            Some(&json!({"units": units}).to_string()),
            &[],
        )
        .await
    }

    /// Has the simulator deliver its first event of `kind` again, as Stripe's dashboard
    /// resends an event, and lets billing catch up.
    pub async fn redeliver_first(&self, kind: &str) {
        let id = self.sim_event(kind, |_| true).id;
        let again = self
            .dashboard(
                &format!("/sim/events/{id}/redeliver"),
                serde_json::json!({}),
            )
            .await;
        assert!(again.status.is_success(), "{:#}", again.body);
    }

    /// The first simulated event of `kind` whose object matches `wanted`.
    pub fn sim_event(
        &self,
        kind: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> tally_local::simulator::SimEvent {
        self.sim_all()
            .into_iter()
            .find(|e| e.kind == kind && wanted(&e.payload["data"]["object"]))
            .unwrap_or_else(|| panic!("no such {kind} event"))
    }

    /// The objects of every event the simulator delivered of one type, oldest first.
    pub fn sim_events(&self, kind: &str) -> Vec<Value> {
        self.sim_all()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.payload["data"]["object"].clone())
            .collect()
    }

    /// The payment intents of the auto top-ups Stripe charged (succeeded), oldest first.
    pub fn top_ups_charged(&self) -> Vec<Value> {
        self.sim_events("payment_intent.succeeded")
            .into_iter()
            .filter(|pi| pi["metadata"]["topup"] == "true")
            .collect()
    }

    /// Every event the simulator delivered, oldest first.
    fn sim_all(&self) -> Vec<tally_local::simulator::SimEvent> {
        self.local
            .simulator
            .as_ref()
            .expect("the simulator")
            .events()
    }
}

impl TestApp {
    /// Delivers a Stripe event to the webhook, signed now with the test secret.
    pub async fn deliver_signed(&self, event: &Value) -> u16 {
        let payload = event.to_string();
        let sig = tally_local::simulator::stripe_signature(
            &payload,
            WEBHOOK_SECRET,
            tally::clock::Clock::now(self.clock.as_ref()).timestamp(),
        );
        self.send(
            Method::POST,
            "/webhooks/stripe",
            None,
            Some(&payload),
            &[
                ("content-type", "application/json"),
                ("stripe-signature", &sig),
            ],
        )
        .await
        .status
        .as_u16()
    }
}

/// What runs just before the `n`th (from 0) write of a document an [`OnWrite`] watches.
pub type WriteHook = Box<
    dyn Fn(
            usize,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tally::store::StoreError>> + Send>,
        > + Send
        + Sync,
>;

/// Which documents (by partition and sort key) an [`OnWrite`] watches.
type Watched = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Documents over `inner`, except that each write of a document `watched` picks (by its
/// keys) runs `hook` first: a store outage (the hook fails), or something done at that
/// moment.
pub struct OnWrite {
    inner: Arc<dyn tally::store::DocStore>,
    watched: Watched,
    writes: std::sync::atomic::AtomicUsize,
    hook: WriteHook,
}

impl OnWrite {
    pub fn new(
        inner: Arc<dyn tally::store::DocStore>,
        watched: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
        hook: WriteHook,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            watched: Box::new(watched),
            writes: std::sync::atomic::AtomicUsize::new(0),
            hook,
        })
    }
}

impl OnWrite {
    /// Runs the hook before a write of a watched document, counting it.
    async fn before_write(&self, pk: &str, sk: &str) -> Result<(), tally::store::StoreError> {
        if (self.watched)(pk, sk) {
            let n = self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (self.hook)(n).await?;
        }
        Ok(())
    }
}

/// A store outage's error.
pub fn timed_out() -> Result<(), tally::store::StoreError> {
    Err(tally::store::StoreError::unavailable("PutItem: timed out"))
}

/// An [`OnWrite`] hook: the first watched write meets a store outage, the rest succeed.
pub fn fails_first_write() -> WriteHook {
    Box::new(|n| Box::pin(async move { if n == 0 { timed_out() } else { Ok(()) } }))
}

#[async_trait::async_trait]
impl tally::store::DocStore for OnWrite {
    async fn get_doc(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<tally::store::Doc>, tally::store::StoreError> {
        self.inner.get_doc(pk, sk).await
    }
    async fn put_doc(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
    ) -> Result<bool, tally::store::StoreError> {
        self.before_write(pk, sk).await?;
        self.inner.put_doc(pk, sk, body, expected).await
    }
    async fn list_docs_before(
        &self,
        pk: &str,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<tally::store::Doc>, tally::store::StoreError> {
        self.inner.list_docs_before(pk, prefix, before, limit).await
    }
    async fn put_doc_due(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
        due: Option<tally::store::DueMark>,
    ) -> Result<bool, tally::store::StoreError> {
        self.before_write(pk, sk).await?;
        self.inner.put_doc_due(pk, sk, body, expected, due).await
    }
    async fn due_docs(
        &self,
        shard: u32,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<tally::store::DueDoc>, tally::store::StoreError> {
        self.inner.due_docs(shard, until, limit).await
    }
}
