//! The local runner: every HTTP route of every function in one axum server, over the
//! embedded store, with HS256 dev tokens standing in for API Gateway's JWT authorizer.

use axum::Router;
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use std::sync::Arc;
use tally::http::AuthMode;
use tally::http::auth::{SCOPE_ADMIN, SCOPE_SETTLE, authenticate, dev_token};
use tally::ids::{AccountId, IdempotencyKey};
use tally::ledger::{Actor, Interval, LotSource, Operation, PlanState, PlanStatus, Refs};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest, ServiceError};
use utoipa::OpenApi;

/// The workspace `make run` prepares for trying things out.
pub const DEMO_WORKSPACE: &str = "demo";

/// The merged OpenAPI document of every function served locally.
pub fn openapi() -> utoipa::openapi::OpenApi {
    credits_api::ApiDoc::openapi()
}

/// The whole local HTTP surface.
pub fn app(ledger: Ledger, dev_secret: &str) -> Router {
    let credits = credits_api::AppState { ledger };
    let protected = credits_api::protected_routes(credits.clone()).route_layer(
        axum::middleware::from_fn_with_state(AuthMode::dev(dev_secret), authenticate),
    );
    tally::http::finish(
        credits_api::public_routes(credits)
            .merge(protected)
            .merge(credits_api::service_routes(openapi())),
    )
}

/// Gives the demo workspace a Max plan and its monthly credits, once (replays are no-ops).
pub async fn seed_demo(ledger: &Ledger) -> Result<(), ServiceError> {
    let account = AccountId::parse(DEMO_WORKSPACE).expect("valid demo id");
    let now = ledger.clock.now();
    let plan = ledger
        .catalog
        .plan("max")
        .expect("the catalog has a max plan")
        .clone();
    let period_end = now + Duration::days(30);
    let seed = |key: &str, op: Operation| LedgerRequest {
        account: account.clone(),
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
                }),
            },
        ))
        .await?;
    ledger
        .execute(seed(
            "plan-credits",
            Operation::Grant {
                source: LotSource::PlanPeriod,
                credits: Credits::new(plan.monthly_credits),
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

/// Settings read from the environment.
pub struct Settings {
    pub port: u16,
    pub data_dir: std::path::PathBuf,
    pub dev_secret: String,
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        let port = match std::env::var("PORT") {
            Ok(p) => p
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT must be a port number, not {p:?}"))?,
            Err(_) => 8080,
        };
        Ok(Self {
            port,
            data_dir: std::env::var("TALLY_DATA_DIR")
                .unwrap_or_else(|_| ".tally".into())
                .into(),
            dev_secret: std::env::var("TALLY_DEV_JWT_SECRET")
                .unwrap_or_else(|_| tally::http::auth::DEFAULT_DEV_SECRET.into()),
        })
    }
}

/// Builds the ledger over the embedded store in `data_dir`.
pub fn ledger(data_dir: &std::path::Path) -> anyhow::Result<Ledger> {
    let catalog = Arc::new(tally::catalog::Catalog::from_env()?);
    let store = tally::store::embedded::EmbeddedStore::open(data_dir)?;
    Ok(Ledger::new(
        Arc::new(store),
        Arc::new(tally::clock::SystemClock),
        catalog,
    ))
}
