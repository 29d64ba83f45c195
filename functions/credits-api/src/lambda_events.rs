//! The function as Lambda runs it: API Gateway v2 events from `events/credits-api/`, decoded
//! by `lambda_http` exactly as in AWS, served by [`crate::router`] with identities taken from
//! the JWT authorizer's claims in the request context.

use crate::{AppState, router};
use axum::body::Body;
use chrono::{Duration, TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tally::catalog::{Catalog, GenerationSpec, Workflow};
use tally::clock::ManualClock;
use tally::http::AuthMode;
use tally::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use tally::ledger::{Actor, ActorKind, LotSource, Operation, Refs};
use tally::money::Credits;
use tally::service::{Ledger, LedgerRequest};
use tally::store::embedded::EmbeddedStore;
use tower::ServiceExt;

fn ledger() -> Ledger {
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
    ));
    Ledger::new(
        Arc::new(EmbeddedStore::in_memory()),
        clock,
        Arc::new(Catalog::builtin()),
    )
}

async fn invoke(ledger: &Ledger, event: &str) -> (u16, Value) {
    let path = format!(
        "{}/../../events/credits-api/{event}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("event file");
    let req = lambda_http::request::from_str(&text).expect("a valid API Gateway v2 event");
    let req = req.map(|b| Body::from(b.as_ref().to_vec()));
    let app = router(
        AppState {
            ledger: ledger.clone(),
            staff_ledger: ledger.clone(),
            docs: std::sync::Arc::new(EmbeddedStore::in_memory()),
            export_limit: Some(crate::LAMBDA_EXPORT_LIMIT),
        },
        AuthMode::ApiGateway,
    );
    let res = app.oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn grant(ledger: &Ledger, credits: u64) {
    ledger
        .execute(LedgerRequest {
            workspace: WorkspaceId::parse("acme").unwrap(),
            key: IdempotencyKey::derived(format!("grant:{credits}")),
            fingerprint: String::new(),
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
        .unwrap();
}

/// Places the hold the settle events refer to, as if `user-member-7` had started it.
async fn hold_the_event_generation(ledger: &Ledger) -> GenerationId {
    let generation = GenerationId::parse("gen_01KAK3ZP3M8Q4W9X2B7N5R6T0V").unwrap();
    let estimate = ledger
        .catalog
        .estimate(&GenerationSpec {
            workflow: Workflow::Video,
            model: "video-pro".into(),
            resolution: Some(tally::catalog::Resolution::K2),
            duration_s: Some(10),
            count: None,
        })
        .unwrap();
    ledger
        .execute(LedgerRequest {
            workspace: WorkspaceId::parse("acme").unwrap(),
            key: IdempotencyKey::derived(format!("gen:{generation}:hold")),
            fingerprint: String::new(),
            actor: Actor::new(ActorKind::Member, "user-member-7"),
            refs: Refs::default(),
            op: Operation::Hold {
                generation,
                estimate,
                deadline: ledger.clock.now() + Duration::hours(1),
            },
        })
        .await
        .unwrap();
    generation
}

#[tokio::test]
async fn the_balance_event_reads_the_workspace_from_the_authorizer_claims() {
    let l = ledger();
    grant(&l, 120).await;
    let (status, body) = invoke(&l, "get-balance.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["available"], 120);
}

#[tokio::test]
async fn a_request_without_authorizer_claims_is_refused() {
    let l = ledger();
    let (status, body) = invoke(&l, "get-balance-no-authorizer.json").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = invoke(&l, "get-catalog.json").await;
    assert_eq!(status, 200);
    assert!(body["plans"].is_array());
}

#[tokio::test]
async fn the_generation_event_holds_once_even_when_delivered_twice() {
    let l = ledger();
    grant(&l, 100).await;
    let (status, first) = invoke(&l, "post-generation.json").await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["held"], 18);
    assert_eq!(first["started_by"], "user-member-7");
    let (_, again) = invoke(&l, "post-generation.json").await;
    assert_eq!(again["id"], first["id"]);
    let (_, bal) = invoke(&l, "get-balance.json").await;
    assert_eq!(
        (bal["available"].as_u64(), bal["held"].as_u64()),
        (Some(82), Some(18))
    );
    let (status, est) = invoke(&l, "post-estimate.json").await;
    assert_eq!((status, est["credits"].as_u64()), (200, Some(24)));
}

#[tokio::test]
async fn the_generation_service_settles_with_its_scope_from_the_authorizer() {
    let l = ledger();
    grant(&l, 100).await;
    hold_the_event_generation(&l).await;
    let (status, done) = invoke(&l, "post-generation-complete-service.json").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (done["status"].as_str(), done["charged"].as_u64()),
        (Some("completed"), Some(15))
    );
    // A member may not settle at all; the service's own fail event now conflicts: the
    // generation is already completed.
    let (status, body) = invoke(&l, "post-generation-fail-member.json").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, body) = invoke(&l, "post-generation-fail-service.json").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")));
    let (_, history) = invoke(&l, "get-generations.json").await;
    assert_eq!(history["items"].as_array().unwrap().len(), 1);
    let (_, ledger_page) = invoke(&l, "get-ledger.json").await;
    assert_eq!(ledger_page["items"][0]["reason"], "generation_charged");
}

#[tokio::test]
async fn the_generation_service_fails_a_generation_without_charge_and_the_starter_cannot() {
    let l = ledger();
    grant(&l, 100).await;
    hold_the_event_generation(&l).await;
    let (status, refused) = invoke(&l, "post-generation-fail-member.json").await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("forbidden")));
    let (status, failed) = invoke(&l, "post-generation-fail-service.json").await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(
        (failed["status"].as_str(), failed["charged"].as_u64()),
        (Some("failed"), Some(0))
    );
    let (_, bal) = invoke(&l, "get-balance.json").await;
    assert_eq!(bal["available"], 100);
}

#[tokio::test]
async fn the_admin_adjustment_event_grants_once() {
    let l = ledger();
    // Only a workspace that exists is adjusted.
    grant(&l, 1).await;
    let (status, first) = invoke(&l, "post-adjustment-admin.json").await;
    assert_eq!(status, 201, "{first}");
    let (_, again) = invoke(&l, "post-adjustment-admin.json").await;
    assert_eq!(again, first);
    let (_, bal) = invoke(&l, "get-balance.json").await;
    assert_eq!(bal["available"], 26);
    let (_, ent) = invoke(&l, "get-entitlements.json").await;
    assert_eq!(ent["custom_model_slots"], 0);
}
