//! The local runner: every HTTP route of every function in one axum server, over the
//! embedded store, with HS256 dev tokens standing in for API Gateway's JWT authorizer, and
//! the offline Stripe [`simulator`] when no Stripe key is set.

mod sim_doc;
pub mod simulator;

use axum::Router;
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use simulator::Simulator;
use std::sync::Arc;
use tally::billing::BillingEvents;
use tally::clock::{AdvanceableClock, OffsetClock};
use tally::config::{self, ReturnUrlOverrides};
use tally::http::AuthMode;
use tally::http::auth::{SCOPE_ADMIN, SCOPE_SETTLE, authenticate, dev_token};
use tally::ids::{IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, Interval, LotSource, Operation, PlanState, PlanStatus, Refs};
use tally::payments::Payments;
use tally::payments::stripe_api::StripePayments;
use tally::queue::local::LocalQueue;
use tally::service::{Ledger, LedgerRequest, ServiceError};
use tally::store::DocStore;
use tally_stripe_webhook::WebhookState;
use utoipa::OpenApi;

/// The workspace `make run` prepares for trying things out.
pub const DEMO_WORKSPACE: &str = "demo";

/// The merged OpenAPI document of every function served locally, for this catalog; with
/// the simulator's `/sim` routes when it runs.
pub fn openapi(catalog: &tally::catalog::Catalog, simulated: bool) -> serde_json::Value {
    let mut merged = credits_api::ApiDoc::openapi();
    merged.merge(purchases::ApiDoc::openapi());
    merged.merge(refunds::ApiDoc::openapi());
    merged.merge(support_intake::ApiDoc::openapi());
    merged.merge(tally_stripe_webhook::ApiDoc::openapi());
    merged.info.title = "Tally (local)".into();
    merged.info.description =
        Some("Every HTTP route of every function, as the local runner serves them.".into());
    let mut doc = tally::http::contract::document(merged);
    credits_api::contract::complete(&mut doc, catalog);
    purchases::contract::complete(&mut doc, catalog);
    if let (Some(paths), serde_json::Value::Object(dev)) = (
        doc.get_mut("paths").and_then(|p| p.as_object_mut()),
        sim_doc::dev_paths(),
    ) {
        paths.extend(dev);
    }
    if simulated
        && let (Some(paths), serde_json::Value::Object(sim)) = (
            doc.get_mut("paths").and_then(|p| p.as_object_mut()),
            sim_doc::sim_paths(),
        )
    {
        paths.extend(sim);
    }
    doc
}

/// What the local system is made of.
pub struct LocalConfig {
    /// Its clock must be `clock`: the local system runs on one clock.
    pub ledger: Ledger,
    /// The one clock of the local system: the ledger's, the webhook's signature check's
    /// and the simulator's, which moves it forward (`POST /sim/clock/advance`).
    pub clock: Arc<dyn AdvanceableClock>,
    pub docs: Arc<dyn DocStore>,
    pub dev_secret: String,
    /// Webhook signing secrets; the first signs simulated events.
    pub webhook_secrets: Vec<String>,
    /// Where this server is reachable (checkout and return URLs point here).
    pub base_url: String,
    /// A real Stripe test key, or `None` for the offline simulator.
    pub stripe_secret_key: Option<String>,
    /// Return pages for Stripe other than the simulator's pages under `base_url`.
    pub return_urls: ReturnUrlOverrides,
    /// The help desk's webhook; `None` keeps forwarded tickets in the outbox
    /// (`GET /dev/outbox`).
    pub helpdesk_url: Option<String>,
    /// The secret forwarded tickets are signed with.
    pub helpdesk_secret: String,
    /// Where the queues keep their messages, so a crash loses none (`make run`); `None`
    /// keeps them in memory only.
    pub queue_journal: Option<Arc<tally::store::embedded::EmbeddedStore>>,
    /// The limits of a CSV export, as in Lambda (`Some(LAMBDA_EXPORT_LIMIT)`), or `None`
    /// to stream any size.
    pub export_limit: Option<credits_api::ExportLimit>,
}

/// The running local system: one router, and the in-process queue behind the webhook.
pub struct Local {
    pub router: Router,
    pub billing_queue: Arc<LocalQueue>,
    pub notifications: Arc<NotificationLog>,
    pub notifications_queue: Arc<LocalQueue>,
    /// Auto top-ups asked for, charged as the billing-events function does in AWS.
    pub topups_queue: Arc<LocalQueue>,
    /// Approved refunds, for the refunds worker.
    pub refunds_queue: Arc<LocalQueue>,
    /// Ticket changes, for the support forwarder.
    pub support_queue: Arc<LocalQueue>,
    /// What the support forwarder delivered (when no help desk URL is set).
    pub outbox: Arc<Outbox>,
    pub simulator: Option<Arc<Simulator>>,
    /// Passes of the credit refresh that failed (logged, and tried again as the clock
    /// moves, as the function's next run would).
    pub refresh_failures: Arc<std::sync::atomic::AtomicUsize>,
}

/// Ends the local system: its queues stop taking messages and their delivery tasks end
/// once what was sent is delivered, and the simulator lets go of the schedule. The parts
/// hold one another (the ledger's observer pays through the simulator, whose schedule runs
/// the ledger; the support worker sends to its own queue), so without this nothing of a
/// dropped system would be freed.
impl Drop for Local {
    fn drop(&mut self) {
        for q in [
            &self.billing_queue,
            &self.notifications_queue,
            &self.topups_queue,
            &self.refunds_queue,
            &self.support_queue,
        ] {
            q.close();
        }
        if let Some(sim) = &self.simulator {
            sim.set_schedule(Arc::new(simulator::NoSchedule));
        }
    }
}

/// Stands in for the studio's notification service: keeps what Tally sent, for
/// `GET /sim/notifications`.
#[derive(Default)]
pub struct NotificationLog(std::sync::Mutex<Vec<serde_json::Value>>);

impl NotificationLog {
    pub fn all(&self) -> Vec<serde_json::Value> {
        self.0.lock().expect("log lock").clone()
    }
}

#[async_trait::async_trait]
impl tally::queue::Consumer for NotificationLog {
    async fn consume(&self, d: &tally::queue::Delivery) -> Result<(), tally::queue::ConsumeError> {
        let v: serde_json::Value =
            serde_json::from_str(&d.body).map_err(tally::queue::ConsumeError::poison)?;
        tracing::info!(notification = %v, "notification");
        self.0.lock().expect("log lock").push(v);
        Ok(())
    }
}

/// Stands in for the help desk: keeps each signed delivery, for `GET /dev/outbox`.
#[derive(Default)]
pub struct Outbox(std::sync::Mutex<Vec<serde_json::Value>>);

impl Outbox {
    pub fn all(&self) -> Vec<serde_json::Value> {
        self.0.lock().expect("outbox lock").clone()
    }
}

#[async_trait::async_trait]
impl tally::support::forward::Sink for Outbox {
    async fn deliver(
        &self,
        d: &tally::support::forward::Signed,
    ) -> Result<(), tally::support::forward::DeliveryError> {
        let payload: serde_json::Value = serde_json::from_str(&d.body)
            .map_err(|e| tally::support::forward::DeliveryError(Box::new(e)))?;
        let mut all = self.0.lock().expect("outbox lock");
        // The same change delivered again (a redelivery) is kept once, as a help desk would.
        if !all.iter().any(|v| v["id"] == d.id) {
            all.push(json!({"id": d.id, "signature": d.signature, "payload": payload}));
        }
        Ok(())
    }
}

/// Builds every function's routes over shared in-process parts and starts the billing
/// worker on the in-process FIFO queue. Must run inside a Tokio runtime.
pub fn build(mut cfg: LocalConfig) -> anyhow::Result<Local> {
    let same_clock = std::ptr::addr_eq(Arc::as_ptr(&cfg.ledger.clock), Arc::as_ptr(&cfg.clock));
    if !same_clock {
        anyhow::bail!("the ledger must run on the local system's clock");
    }
    let journal = cfg.queue_journal.clone();
    let queue = |name: &str, fifo: bool, max_receives: u32| -> anyhow::Result<Arc<LocalQueue>> {
        let q = match &journal {
            Some(j) => LocalQueue::durable(name, fifo, max_receives, j.clone())?,
            None => LocalQueue::new(name, fifo, max_receives),
        };
        q.keep_time_by(cfg.clock.clone());
        Ok(q)
    };
    let billing_queue = queue(
        tally::queue::BILLING_EVENTS_QUEUE,
        true,
        tally::queue::BILLING_EVENTS_MAX_RECEIVES,
    )?;
    let webhook = tally_stripe_webhook::routes(WebhookState {
        secrets: Arc::new(cfg.webhook_secrets.clone()),
        queue: billing_queue.clone(),
        clock: cfg.clock.clone(),
    });
    let (payments, simulator): (Arc<dyn Payments>, Option<Arc<Simulator>>) =
        match &cfg.stripe_secret_key {
            Some(key) => (Arc::new(StripePayments::new(key, None)?), None),
            None => {
                let secret = cfg
                    .webhook_secrets
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("the simulator needs a webhook secret"))?;
                let sim = Simulator::new(
                    &cfg.base_url,
                    secret,
                    webhook.clone(),
                    cfg.clock.clone(),
                    Some(billing_queue.clone()),
                );
                (sim.clone(), Some(sim))
            }
        };
    let notifications_queue = queue("notifications", false, 3)?;
    let notifications = Arc::new(NotificationLog::default());
    notifications_queue.start(notifications.clone());
    let topups_queue = queue(
        tally::alerts::TOPUPS_QUEUE,
        true,
        tally::alerts::TOPUPS_MAX_RECEIVES,
    )?;
    topups_queue.start(Arc::new(tally::alerts::TopUps {
        docs: cfg.docs.clone(),
        states: cfg.ledger.store.clone(),
        payments: Some(payments.clone()),
        catalog: cfg.ledger.catalog.clone(),
        notifications: notifications_queue.clone(),
        clock: cfg.clock.clone(),
    }));
    let alerts = |asks_for_top_ups: bool| {
        Arc::new(tally::alerts::CreditAlerts {
            docs: cfg.docs.clone(),
            notifications: notifications_queue.clone(),
            topups: asks_for_top_ups.then(|| topups_queue.clone() as Arc<dyn tally::queue::Queue>),
            asks_for_top_ups,
            catalog: cfg.ledger.catalog.clone(),
            // Locally every change to the settings counts at once.
            settings_ttl: std::time::Duration::ZERO,
            cache: Default::default(),
        })
    };
    // Only generations ask for auto top-ups, as credits-api does in AWS: billing events and
    // purchases only grant (their crossings are credits expiring), refund requests take
    // money's credits back, support's settlements and the schedule expire them.
    let mut alerting = cfg.ledger.clone();
    alerting.observer = Some(alerts(false));
    cfg.ledger.observer = Some(alerts(true));
    // Started once the ledger has its observer; deliveries wait in the queue until then.
    let mut billing = BillingEvents::new(
        alerting.clone(),
        cfg.docs.clone(),
        alerting.observer.clone(),
    );
    billing.stripe = Some(payments.clone());
    billing.notifications = Some(notifications_queue.clone());
    billing_queue.start(Arc::new(billing));
    let credits = credits_api::AppState {
        ledger: cfg.ledger.clone(),
        staff_ledger: alerting.clone(),
        docs: cfg.docs.clone(),
        export_limit: cfg.export_limit,
    };
    let refunds_queue = queue(
        tally::refund_requests::REFUNDS_QUEUE,
        true,
        tally::refund_requests::REFUNDS_MAX_RECEIVES,
    )?;
    refunds_queue.start(Arc::new(tally::refund_requests::worker::RefundWorker {
        docs: cfg.docs.clone(),
        payments: payments.clone(),
        notifications: notifications_queue.clone(),
        clock: cfg.clock.clone(),
    }));
    let refunding = refunds::RefundsState {
        requests: tally::refund_requests::RefundRequests {
            docs: cfg.docs.clone(),
            ledger: alerting.clone(),
            queue: refunds_queue.clone(),
            duplicate_window: tally::refund_requests::rules::DEFAULT_DUPLICATE_WINDOW,
        },
        clock: cfg.clock.clone(),
    };
    let support_queue = queue(
        tally::support::SUPPORT_QUEUE,
        true,
        tally::support::SUPPORT_MAX_RECEIVES,
    )?;
    let outbox = Arc::new(Outbox::default());
    let tickets = tally::support::Tickets {
        docs: cfg.docs.clone(),
        queue: support_queue.clone(),
    };
    let sink: Arc<dyn tally::support::forward::Sink> = match &cfg.helpdesk_url {
        Some(url) => Arc::new(
            support_forwarder::WebhookSink::new(url)
                .map_err(|e| anyhow::anyhow!("help desk URL {url:?}: {e}"))?,
        ),
        None => outbox.clone(),
    };
    support_queue.start(Arc::new(tally::support::forward::HelpDesk {
        tickets: tickets.clone(),
        sink,
        secret: cfg.helpdesk_secret.as_bytes().to_vec(),
        clock: cfg.clock.clone(),
        attempts: 3,
        backoff: std::time::Duration::from_millis(200),
    }));
    let sweeping = tickets.clone();
    let supporting = support_intake::SupportState {
        tickets,
        context: tally::support::enrich::Context {
            ledger: alerting.clone(),
            docs: cfg.docs.clone(),
            refunds: Some(refunding.requests.clone()),
        },
        clock: cfg.clock.clone(),
    };
    let buying = purchases::PurchasesState {
        ledger: alerting.clone(),
        docs: cfg.docs.clone(),
        payments,
        urls: purchases::ReturnUrls::new(&cfg.base_url, &cfg.return_urls),
    };
    let protected = credits_api::protected_routes(credits.clone())
        .merge(purchases::protected_routes(buying))
        .merge(refunds::protected_routes(refunding))
        .merge(support_intake::protected_routes(supporting))
        .route_layer(axum::middleware::from_fn_with_state(
            AuthMode::dev(&cfg.dev_secret),
            authenticate,
        ));
    let doc = openapi(&cfg.ledger.catalog, simulator.is_some());
    let shown = outbox.clone();
    let mut public = credits_api::public_routes(credits)
        .merge(webhook)
        .merge(tally::http::service_routes(move || doc.clone()))
        .route(
            "/dev/outbox",
            axum::routing::get(move || {
                let shown = shown.clone();
                async move { axum::Json(shown.all()) }
            }),
        );
    let refresh_failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if let Some(sim) = &simulator {
        // Tally's own schedule (yearly allotments, lapsed lots, overdue holds) runs as the
        // simulated clock moves, as the credit-refresh function runs every 15 minutes.
        sim.set_schedule(Arc::new(CreditRefresh {
            ledger: alerting.clone(),
            docs: cfg.docs.clone(),
            failures: refresh_failures.clone(),
            tickets: sweeping,
        }));
        let log = notifications.clone();
        public = public.merge(sim.routes()).route(
            "/sim/notifications",
            axum::routing::get(move || {
                let log = log.clone();
                async move { axum::Json(log.all()) }
            }),
        );
    }
    Ok(Local {
        router: tally::http::finish(public.merge(protected)),
        billing_queue,
        notifications,
        notifications_queue,
        topups_queue,
        refunds_queue,
        support_queue,
        outbox,
        simulator,
        refresh_failures,
    })
}

/// The credit refresh run in-process by the simulator's clock.
struct CreditRefresh {
    ledger: Ledger,
    docs: Arc<dyn DocStore>,
    failures: Arc<std::sync::atomic::AtomicUsize>,
    /// The support forwarder's sweep runs on the same clock.
    tickets: tally::support::Tickets,
}

#[async_trait::async_trait]
impl simulator::ScheduleHook for CreditRefresh {
    async fn run(&self, now: DateTime<Utc>) {
        match tally::refresh::run_due(&self.ledger, &self.docs, now).await {
            Ok(report) => {
                if report.granted() > 0 {
                    tracing::info!(at = %now, granted = report.granted(), "credit refresh ran");
                }
            }
            Err(e) => {
                self.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, at = %now, "credit refresh failed");
            }
        }
        if let Err(e) = self
            .tickets
            .sweep(now, tally::support::forward::SWEEP_LIMIT)
            .await
        {
            tracing::error!(error = %e, at = %now, "the sweep for unforwarded tickets failed");
        }
    }
}

/// Gives the demo workspace a Max plan and its monthly credits, once (replays are no-ops).
pub async fn seed_demo(ledger: &Ledger) -> Result<(), ServiceError> {
    let workspace = WorkspaceId::parse(DEMO_WORKSPACE).expect("valid demo id");
    let now = ledger.clock.now();
    let plan = ledger
        .catalog
        .plan("max")
        .expect("the catalog has a max plan")
        .clone();
    let period_end = DateTime::from_timestamp(simulator::add_months(now.timestamp(), 1), 0)
        .expect("a month later is a valid instant");
    let seed = |key: &str, op: Operation| LedgerRequest {
        workspace: workspace.clone(),
        key: IdempotencyKey::derived(format!("demo-seed:{key}")),
        fingerprint: format!("demo-seed:{key}"),
        actor: Actor::system(),
        refs: Refs::default(),
        op,
    };
    ledger
        .execute(seed(
            "plan",
            Operation::SetPlan {
                plan: Some(PlanState {
                    plan: plan.id.clone(),
                    interval: Interval::Monthly,
                    status: PlanStatus::Active,
                    period_start: now,
                    period_end,
                    cancel_at_period_end: false,
                    paid_through: None,
                }),
            },
        ))
        .await?;
    ledger
        .execute(seed(
            "plan-credits",
            Operation::Grant {
                month: None,
                source: LotSource::PlanPeriod,
                credits: plan.monthly_credits,
                expires_at: Some(period_end + Duration::days(plan.rollover_days as i64)),
                note: Some("demo workspace: first month of the Max plan".into()),
            },
        ))
        .await?;
    Ok(())
}

/// Ready-made dev tokens for the demo workspace and the two staff roles.
pub struct DemoTokens {
    pub owner: String,
    /// Owner of `studio`, a workspace with no plan yet (to try subscribing).
    pub studio_owner: String,
    pub member: String,
    pub generation_service: String,
    pub support: String,
}

pub fn demo_tokens(secret: &str, now: DateTime<Utc>) -> DemoTokens {
    let exp = (now + Duration::days(30)).timestamp();
    let sign = |claims: serde_json::Value| dev_token(secret.as_bytes(), &claims);
    DemoTokens {
        owner: sign(json!({"sub": "demo-owner", "email": "owner@demo.example",
            "org_id": DEMO_WORKSPACE, "role": "owner", "exp": exp})),
        studio_owner: sign(
            json!({"sub": "studio-owner", "email": "owner@studio.example",
            "org_id": "studio", "role": "owner", "exp": exp}),
        ),
        member: sign(json!({"sub": "demo-member", "email": "member@demo.example",
            "org_id": DEMO_WORKSPACE, "role": "member", "exp": exp})),
        generation_service: sign(
            json!({"sub": "generation-service", "scope": SCOPE_SETTLE, "exp": exp}),
        ),
        support: sign(
            json!({"sub": "support-agent", "email": "support@tally.example",
            "scope": SCOPE_ADMIN, "exp": exp}),
        ),
    }
}

/// Default local webhook signing secret.
pub const DEFAULT_WEBHOOK_SECRET: &str = "whsec_tally_dev";

/// Settings read from the environment. The variables the Lambda functions read too are
/// parsed as they parse them ([`tally::config`]).
pub struct Settings {
    pub port: u16,
    pub data_dir: std::path::PathBuf,
    pub dev_secret: String,
    pub webhook_secrets: Vec<String>,
    pub stripe_secret_key: Option<String>,
    /// A catalog file replacing the shipped one.
    pub catalog_path: Option<std::path::PathBuf>,
    pub return_urls: ReturnUrlOverrides,
    pub helpdesk_url: Option<String>,
    pub helpdesk_secret: String,
}

/// Default local secret forwarded tickets are signed with.
pub const DEFAULT_HELPDESK_SECRET: &str = "tally-dev-helpdesk-secret";

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(config::process_env)
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let vars = config::Vars::new(lookup);
        let port = match vars.optional("PORT") {
            Some(p) => p
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT must be a port number, not {p:?}"))?,
            None => 8080,
        };
        Ok(Self {
            port,
            data_dir: vars
                .optional("TALLY_DATA_DIR")
                .unwrap_or_else(|| ".tally".into())
                .into(),
            dev_secret: vars
                .optional("TALLY_DEV_JWT_SECRET")
                .unwrap_or_else(|| tally::http::auth::DEFAULT_DEV_SECRET.into()),
            webhook_secrets: config::parse_secret_list(
                &vars
                    .optional(config::STRIPE_WEBHOOK_SECRET)
                    .unwrap_or_else(|| DEFAULT_WEBHOOK_SECRET.into()),
            )
            .iter()
            .map(|s| s.expose().to_owned())
            .collect(),
            stripe_secret_key: vars
                .optional(config::STRIPE_SECRET_KEY)
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty()),
            catalog_path: vars.optional(config::CATALOG).map(Into::into),
            return_urls: ReturnUrlOverrides::from_vars(&vars)?,
            helpdesk_url: vars
                .optional(config::HELPDESK_WEBHOOK_URL)
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty()),
            helpdesk_secret: vars
                .optional(config::HELPDESK_WEBHOOK_SECRET)
                .unwrap_or_else(|| DEFAULT_HELPDESK_SECRET.into()),
        })
    }
}

/// The ledger and documents over the embedded store in `data_dir`, with the catalog from
/// `catalog_path` or the shipped one, on a clock that follows wall time plus whatever the
/// simulator has advanced it by (the offset starts at zero on every start).
pub fn stores(
    data_dir: &std::path::Path,
    catalog_path: Option<&std::path::Path>,
) -> anyhow::Result<Stores> {
    let catalog = Arc::new(tally::catalog::Catalog::load(catalog_path)?);
    let store = Arc::new(tally::store::embedded::EmbeddedStore::open(data_dir)?);
    let clock = Arc::new(OffsetClock::new());
    let mut ledger = Ledger::new(store.clone(), clock.clone(), catalog);
    // As in Lambda: a workspace too busy for 6 s answers 503 `busy`.
    ledger.retry.budget = Some(tally::service::LAMBDA_RETRY_BUDGET);
    Ok(Stores {
        ledger,
        docs: store.clone(),
        clock,
        embedded: store,
    })
}

/// What [`stores`] opens: the ledger, the documents and the clock they run on.
pub struct Stores {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    pub clock: Arc<dyn AdvanceableClock>,
    /// The same store, where the queues keep their messages.
    pub embedded: Arc<tally::store::embedded::EmbeddedStore>,
}
