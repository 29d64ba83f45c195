//! The API contract: what `/openapi.json` says is what the routes do, for any client and
//! any input. The document is read as served by the local system; requests go through the
//! same router `make run` serves. `scripts/contract.sh` checks the same with generated
//! requests (schemathesis) against the running binary.

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tally_tests::{TestApp, WEBHOOK_SECRET, grant, member, owner, service, support, token};
use tower::ServiceExt;

/// A request exactly as given: no content type added.
async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = app
        .router
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, content_type, body)
}

async fn document(app: &TestApp) -> Value {
    app.send(Method::GET, "/openapi.json", None, None, &[])
        .await
        .body
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.push((path.clone(), method.clone(), op.clone()));
        }
    }
    ops
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

const JSON_TYPE: &[(&str, &str)] = &[("content-type", "application/json")];

// ---------------------------------------------------------------- the document

#[tokio::test]
async fn list_parameters_are_optional_query_parameters() {
    let doc = document(&TestApp::new()).await;
    for (path, names) in [
        (
            "/v1/generations",
            vec!["status", "model", "cursor", "limit"],
        ),
        ("/v1/ledger", vec!["cursor", "limit"]),
        ("/v1/invoices", vec!["cursor", "limit"]),
        (
            "/v1/billing/history",
            vec!["kind", "from", "to", "cursor", "limit"],
        ),
    ] {
        let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
        for name in names {
            let p = params
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{path} documents {name}"));
            assert_eq!(p["in"], "query", "{path} {name}");
            assert_ne!(p["required"], true, "{path} {name}");
        }
    }
}

#[tokio::test]
async fn every_error_is_documented_as_problem_json_with_the_statuses_the_plumbing_answers() {
    let doc = document(&TestApp::new()).await;
    for (path, method, op) in operations(&doc) {
        if path.starts_with("/sim/") {
            continue; // browser pages: their "not found" is HTML, documented as such
        }
        let responses = op["responses"].as_object().unwrap();
        let has = |s: &str| responses.contains_key(s);
        for (code, r) in responses {
            if code.parse::<u16>().unwrap() >= 400 {
                let content = r["content"].as_object().unwrap();
                assert_eq!(
                    content.keys().collect::<Vec<_>>(),
                    vec!["application/problem+json"],
                    "{method} {path} {code}"
                );
                assert_eq!(
                    content["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/ProblemDetails"
                );
            }
        }
        if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
            assert!(has("401") && has("403"), "{method} {path}");
        }
        if op.get("requestBody").is_some() {
            for s in ["400", "413", "415", "422"] {
                assert!(has(s), "{method} {path} documents {s}");
            }
        }
    }
}

#[tokio::test]
async fn each_schema_name_means_one_shape_and_answers_match_their_schema() {
    let app = TestApp::new();
    let doc = document(&app).await;
    // The entitlements' plan and the purchases' subscription are two schemas.
    assert_eq!(
        schema(&doc, "EntitlementsView")["properties"]["plan"]["oneOf"][1]["$ref"],
        "#/components/schemas/PlanInEffect"
    );
    let sub = schema(&doc, "SubscriptionView");
    for field in ["subscription", "customer"] {
        assert!(sub["properties"][field].is_object(), "{field}");
    }
    let answer = app.get("/v1/subscription", &owner("org_new")).await;
    assert_eq!(answer.body, json!({"subscription": null, "customer": null}));
    let props = sub["properties"].as_object().unwrap();
    for (k, v) in answer.body.as_object().unwrap() {
        assert!(props.contains_key(k), "{k}");
        let nullable = props[k]["oneOf"]
            .as_array()
            .is_some_and(|alts| alts.iter().any(|a| a["type"] == "null"))
            || props[k]["type"]
                .as_array()
                .is_some_and(|t| t.contains(&json!("null")));
        assert!(v.is_null() && nullable, "{k} is null and may be");
    }
    // The catalog's plans carry yearly_price_cents, and their schema says so.
    let plan = schema(&doc, "PlanView");
    assert!(plan.get("allOf").is_none(), "{plan:#}");
    let catalog = app.send(Method::GET, "/v1/catalog", None, None, &[]).await;
    let props = plan["properties"].as_object().unwrap();
    for p in catalog.body["plans"].as_array().unwrap() {
        for k in p.as_object().unwrap().keys() {
            assert!(props.contains_key(k), "PlanView documents {k}");
        }
    }
}

#[tokio::test]
async fn request_schemas_state_the_bounds_the_server_enforces() {
    let doc = document(&TestApp::new()).await;
    // One alternative per catalog model, with its workflow and (for video) its duration.
    let spec = schema(&doc, "GenerationSpec");
    let alts = spec["oneOf"].as_array().unwrap();
    let pro = alts
        .iter()
        .find(|a| a["properties"]["model"]["enum"] == json!(["video-pro"]))
        .expect("video-pro");
    assert_eq!(pro["properties"]["workflow"]["enum"], json!(["video"]));
    assert_eq!(pro["properties"]["duration_s"]["minimum"], 1);
    assert!(
        pro["required"]
            .as_array()
            .unwrap()
            .contains(&json!("duration_s"))
    );
    assert_eq!(pro["additionalProperties"], false);
    // Path parameters carry the rules their ids are parsed with.
    let param = |path: &str, method: &str, name: &str| {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} {name}"))["schema"]["pattern"]
            .clone()
    };
    for (path, method) in [
        ("/v1/generations/{id}", "get"),
        ("/v1/generations/{id}/complete", "post"),
        ("/v1/generations/{id}/fail", "post"),
    ] {
        assert_eq!(
            param(path, method, "id"),
            tally::ids::GenerationId::PATTERN,
            "{path}"
        );
    }
    assert_eq!(
        param("/v1/generations", "get", "cursor"),
        tally::ids::GenerationId::PATTERN
    );
    for path in [
        "/v1/admin/workspaces/{workspace_id}/adjustments",
        "/v1/admin/workspaces/{workspace_id}/custom-payments",
    ] {
        assert_eq!(
            param(path, "post", "workspace_id"),
            tally::ids::WorkspaceId::PATTERN,
            "{path}"
        );
    }
    // Settling takes an empty body (the defaults).
    for settle in ["complete", "fail"] {
        assert_eq!(
            doc["paths"][format!("/v1/generations/{{id}}/{settle}")]["post"]["requestBody"]["required"],
            false
        );
    }
    // Text fields: one line, bounded.
    for (name, field) in [
        ("AdjustmentRequest", "reason"),
        ("CustomPaymentBody", "description"),
        ("FailRequest", "reason"),
    ] {
        let f = &schema(&doc, name)["properties"][field];
        assert_eq!(f["maxLength"], 500, "{name}.{field}");
        assert_eq!(
            f["pattern"],
            tally::http::text::ONE_LINE_PATTERN,
            "{name}.{field}"
        );
    }
    // Ranges and the catalog's ids.
    assert_eq!(
        schema(&doc, "CustomPaymentBody")["properties"]["days_until_due"]["maximum"],
        90
    );
    assert_eq!(
        schema(&doc, "AddonsBody")["properties"]["units"]["maximum"],
        100
    );
    let plans = &schema(&doc, "ChangeBody")["properties"]["plan"]["enum"];
    assert!(plans.as_array().unwrap().contains(&json!("max")), "{plans}");
    let topup = schema(&doc, "AutoTopUpBody");
    assert_eq!(topup["additionalProperties"], false);
    assert!(
        topup["properties"]["pack"]["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("pack_100"))
    );
    // Every object a request body may hold refuses unknown fields.
    for name in [
        "AdjustmentRequest",
        "CompleteRequest",
        "FailRequest",
        "AlertsBody",
        "AutoTopUpBody",
        "ChangeBody",
        "AddonsBody",
        "CustomPaymentBody",
    ] {
        assert_eq!(schema(&doc, name)["additionalProperties"], false, "{name}");
    }
    for alt in schema(&doc, "CheckoutBody")["oneOf"].as_array().unwrap() {
        assert_eq!(alt["additionalProperties"], false, "{alt}");
    }
}

#[tokio::test]
async fn health_the_document_and_the_simulator_are_documented() {
    let doc = document(&TestApp::new()).await;
    for (path, method) in [
        ("/health", "get"),
        ("/openapi.json", "get"),
        ("/sim/events", "get"),
        ("/sim/events/{id}/redeliver", "post"),
        ("/sim/subscriptions/{id}/renew", "post"),
        ("/sim/checkout/{id}", "get"),
        ("/sim/checkout/{id}/pay", "post"),
        ("/sim/invoices/{id}", "get"),
        ("/sim/invoices/{id}/pay", "post"),
        ("/sim/invoices/{id}/credit-note", "post"),
        ("/sim/done", "get"),
        ("/sim/notifications", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} documented"
        );
    }
}

// ---------------------------------------------------------------- input and identity

#[tokio::test]
async fn who_may_call_a_route_is_decided_before_its_body_is_read() {
    let app = TestApp::new();
    let m = member("org_a", "u1");
    let garbage = b"{not json".to_vec();
    for (method, path, tok) in [
        (Method::POST, "/v1/checkout/sessions", m.clone()),
        (Method::POST, "/v1/subscription/change", m.clone()),
        (Method::PUT, "/v1/subscription/addons", m.clone()),
        (Method::PUT, "/v1/alerts", m.clone()),
        (
            Method::POST,
            "/v1/admin/workspaces/org_a/adjustments",
            m.clone(),
        ),
        (
            Method::POST,
            "/v1/admin/workspaces/org_a/custom-payments",
            m.clone(),
        ),
        (
            Method::POST,
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/complete",
            m.clone(),
        ),
        (
            Method::POST,
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/fail",
            m.clone(),
        ),
        (Method::POST, "/v1/estimates", support()),
        (Method::POST, "/v1/generations", service()),
        (
            Method::POST,
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/reverse",
            m.clone(),
        ),
        (Method::POST, "/v1/subscription/preview", m.clone()),
        (Method::POST, "/v1/refund-requests", m.clone()),
        (Method::POST, "/v1/support/tickets", service()),
        (
            Method::POST,
            "/v1/support/tickets/tkt_01jd8x1y2z3a4b5c6d7e8f9g0h/messages",
            service(),
        ),
    ] {
        for headers in [JSON_TYPE, &[][..], &[("content-type", "text/plain")][..]] {
            let (status, ct, body) = raw(
                &app,
                method.clone(),
                path,
                Some(&tok),
                headers,
                garbage.clone(),
            )
            .await;
            assert_eq!(
                (status, ct.as_str()),
                (403, "application/problem+json"),
                "{path} {body}"
            );
            assert_eq!(body["code"], "forbidden");
        }
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_problems() {
    let app = TestApp::new();
    let big = vec![b' '; 300 * 1024];
    for (path, tok) in [
        (
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/complete",
            Some(service()),
        ),
        (
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/fail",
            Some(service()),
        ),
        ("/v1/estimates", Some(member("org_a", "u1"))),
        ("/webhooks/stripe", None),
    ] {
        let (status, ct, body) = raw(
            &app,
            Method::POST,
            path,
            tok.as_deref(),
            &[
                ("content-type", "application/json"),
                ("stripe-signature", "t=1,v1=00"),
            ],
            big.clone(),
        )
        .await;
        assert_eq!(
            (status, ct.as_str()),
            (413, "application/problem+json"),
            "{path} {body}"
        );
        assert_eq!(body["code"], "payload_too_large");
    }
}

#[tokio::test]
async fn a_missing_or_wrong_content_type_is_a_415_naming_json() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let m = member("org_a", "u1");
    let body = json!({"workflow": "image", "model": "flux-schnell"}).to_string();
    let started = app
        .post(
            "/v1/generations",
            &m,
            json!({"workflow": "image", "model": "flux-schnell"}),
        )
        .await;
    assert_eq!(started.status.as_u16(), 201, "{:#}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    let complete = format!("/v1/generations/{id}/complete");
    for (path, tok) in [
        ("/v1/estimates", m.as_str()),
        ("/v1/generations", m.as_str()),
        (complete.as_str(), &service()),
    ] {
        for headers in [
            &[][..],
            &[("content-type", "text/plain")][..],
            &[("content-type", "application/problem+json")][..],
        ] {
            let (status, ct, p) = raw(
                &app,
                Method::POST,
                path,
                Some(tok),
                headers,
                body.clone().into_bytes(),
            )
            .await;
            assert_eq!(
                (status, ct.as_str()),
                (415, "application/problem+json"),
                "{path} {p}"
            );
            assert!(
                p["detail"].as_str().unwrap().contains("application/json"),
                "{p}"
            );
        }
    }
    // An empty body needs no type: the defaults apply.
    let (status, _, p) = raw(&app, Method::POST, &complete, Some(&service()), &[], vec![]).await;
    assert_eq!(status, 200, "{p}");
    // The webhook too.
    let (status, _, p) = raw(
        &app,
        Method::POST,
        "/webhooks/stripe",
        None,
        &[
            ("content-type", "text/plain"),
            ("stripe-signature", "t=1,v1=00"),
        ],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 415, "{p}");
}

#[tokio::test]
async fn text_that_lands_in_journals_and_invoices_is_one_line_of_visible_text() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let before = app.entry_count("org_a").await;
    for bad in [
        "ok\u{0}",
        "\u{1b}[31mred",
        "two\nlines",
        "refund \u{202e}gnp.exe",
        "iso\u{2066}late",
        "   ",
        "\u{200b}",
        "\u{feff}\u{ad}",
        "\u{200d}\u{200c} ",
    ] {
        let a = app
            .send(
                Method::POST,
                "/v1/admin/workspaces/org_a/adjustments",
                Some(&support()),
                Some(&json!({"credits": 5, "reason": bad}).to_string()),
                &[("idempotency-key", "adj-1")],
            )
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "reason", "{bad:?}");
        let c = app
            .send(
                Method::POST,
                "/v1/admin/workspaces/org_a/custom-payments",
                Some(&support()),
                Some(
                    &json!({"amount_cents": 1000, "credits": 100, "description": bad}).to_string(),
                ),
                &[("idempotency-key", "cp-1")],
            )
            .await;
        c.assert_problem(422, "validation_failed");
        assert_eq!(c.body["field"], "description", "{bad:?}");
    }
    assert_eq!(app.entry_count("org_a").await, before);
    // A failure reason from the generation service too.
    let g = app
        .post(
            "/v1/generations",
            &member("org_a", "u1"),
            json!({"workflow": "image", "model": "flux-schnell"}),
        )
        .await;
    let id = g.body["id"].as_str().unwrap();
    app.post(
        &format!("/v1/generations/{id}/fail"),
        &service(),
        json!({"reason": "timeout\r\nX-Injected: 1"}),
    )
    .await
    .assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn unknown_fields_are_refused_at_every_level() {
    let app = TestApp::new();
    let o = owner("org_a");
    app.send(
        Method::PUT,
        "/v1/alerts",
        Some(&o),
        Some(
            &json!({"below_credits": [50],
                "auto_topup": {"pack": "pack_100", "below_credits": 30, "max_per_day": 99}})
            .to_string(),
        ),
        &[],
    )
    .await
    .assert_problem(422, "validation_failed");
    app.post(
        "/v1/checkout/sessions",
        &o,
        json!({"kind": "pack", "pack": "pack_100", "coupon": "FREE"}),
    )
    .await
    .assert_problem(422, "validation_failed");
    app.post(
        "/v1/estimates",
        &member("org_a", "u1"),
        json!({"workflow": "image", "model": "flux-schnell", "discount": 100}),
    )
    .await
    .assert_problem(422, "validation_failed");
    // Nothing was stored.
    let stored = app.get("/v1/alerts", &o).await;
    assert_eq!(stored.body["auto_topup"], Value::Null, "{:#}", stored.body);
}

#[tokio::test]
async fn workspace_ids_in_paths_are_validated() {
    let app = TestApp::new();
    for bad in ["..", ".", "-x", "_x", ".hidden"] {
        assert!(tally::ids::WorkspaceId::parse(bad).is_err(), "{bad}");
        let a = app
            .send(
                Method::POST,
                &format!("/v1/admin/workspaces/{bad}/adjustments"),
                Some(&support()),
                Some(&json!({"credits": 5, "reason": "goodwill"}).to_string()),
                &[("idempotency-key", "adj-dots")],
            )
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "workspace_id");
    }
}

#[tokio::test]
async fn dev_tokens_that_are_not_valid_yet_are_refused() {
    let app = TestApp::new();
    let now = chrono::Utc::now().timestamp();
    let early = token(json!({"sub": "u1", "org_id": "org_a", "role": "owner", "nbf": now + 600}));
    app.get("/v1/balance", &early)
        .await
        .assert_problem(401, "unauthorized");
    let ok = token(json!({"sub": "u1", "org_id": "org_a", "role": "owner", "nbf": now - 5}));
    assert_eq!(app.get("/v1/balance", &ok).await.status.as_u16(), 200);
    let bad = token(json!({"sub": "u1", "org_id": "org_a", "role": "owner", "nbf": "soon"}));
    app.get("/v1/balance", &bad)
        .await
        .assert_problem(401, "unauthorized");
}

#[tokio::test]
async fn generation_ids_are_read_only_in_canonical_form() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let m = member("org_a", "u1");
    let g = app
        .post(
            "/v1/generations",
            &m,
            json!({"workflow": "image", "model": "flux-schnell"}),
        )
        .await;
    let id = g.body["id"].as_str().unwrap().to_owned();
    let raw_ulid = id.strip_prefix("gen_").unwrap();
    assert_eq!(
        app.get(&format!("/v1/generations/{id}"), &m).await.status,
        200
    );
    // Lower case, Crockford's aliases and a first digit beyond 7 (more than 128 bits, which
    // would wrap) name no generation.
    let wrapped = format!("gen_{}{}", "Z", &raw_ulid[1..]);
    let aliased = format!("gen_{}", raw_ulid.replace('1', "I").replace('0', "O"));
    let lower = format!("gen_{}", raw_ulid.to_lowercase());
    for bad in [lower, wrapped, aliased] {
        if bad == id {
            continue;
        }
        assert!(tally::ids::GenerationId::parse(&bad).is_err(), "{bad}");
        let a = app.get(&format!("/v1/generations/{bad}"), &m).await;
        a.assert_problem(422, "validation_failed");
        app.post(
            &format!("/v1/generations/{bad}/complete"),
            &service(),
            json!({}),
        )
        .await
        .assert_problem(422, "validation_failed");
    }
}

#[tokio::test]
async fn a_token_with_a_workspace_role_and_a_staff_scope_is_refused() {
    let app = TestApp::new();
    grant(&app.ledger, "org_a", 100).await;
    let before = app.entry_count("org_a").await;
    for scope in ["credits:admin", "credits:settle", "openid credits:admin"] {
        let both = token(json!({"sub": "u1", "org_id": "org_a", "role": "member", "scope": scope}));
        let a = app
            .send(
                Method::POST,
                "/v1/admin/workspaces/org_a/adjustments",
                Some(&both),
                Some(&json!({"credits": 50, "reason": "self-service"}).to_string()),
                &[("idempotency-key", "adj-both")],
            )
            .await;
        a.assert_problem(403, "forbidden");
        app.get("/v1/balance", &both)
            .await
            .assert_problem(403, "forbidden");
    }
    assert_eq!(app.entry_count("org_a").await, before);
}

#[tokio::test]
async fn absurd_webhook_timestamps_are_refused_before_verifying() {
    let app = TestApp::new();
    let body = tally_tests::stripe_event(
        "evt_absurd",
        "customer.created",
        1,
        json!({"object": "customer", "id": "cus_x"}),
    )
    .to_string();
    for t in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX] {
        let sig = tally_local::simulator::stripe_signature(&body, WEBHOOK_SECRET, t);
        let (status, ct, p) = raw(
            &app,
            Method::POST,
            "/webhooks/stripe",
            None,
            &[
                ("content-type", "application/json"),
                ("stripe-signature", &sig),
            ],
            body.clone().into_bytes(),
        )
        .await;
        assert_eq!(
            (status, ct.as_str()),
            (400, "application/problem+json"),
            "{t}: {p}"
        );
        assert_eq!(p["code"], "invalid_signature");
        assert_eq!(
            p["detail"],
            "the signature timestamp is outside the 300 s tolerance"
        );
    }
    app.settle_billing().await;
    assert!(app.local.simulator.as_ref().unwrap().events().is_empty());
}

#[tokio::test]
async fn integers_are_read_by_value_as_the_schema_reads_them() {
    let app = TestApp::new();
    let a = app
        .send(
            Method::POST,
            "/v1/estimates",
            Some(&member("org_a", "u1")),
            Some(r#"{"workflow":"video","model":"video-pro","duration_s":10.0,"count":1.0}"#),
            &[],
        )
        .await;
    assert_eq!(a.status.as_u16(), 200, "{:#}", a.body);
    assert_eq!(a.body["duration_s"], 10);
    let frac = app
        .send(
            Method::POST,
            "/v1/estimates",
            Some(&member("org_a", "u1")),
            Some(r#"{"workflow":"video","model":"video-pro","duration_s":10.5}"#),
            &[],
        )
        .await;
    frac.assert_problem(422, "validation_failed");
}

// ---------------------------------------------------------------- any bytes

/// Routes that read a body, with a caller allowed to reach the parsing.
fn body_routes() -> Vec<(Method, &'static str, Option<String>)> {
    vec![
        (Method::POST, "/v1/estimates", Some(member("org_a", "u1"))),
        (Method::POST, "/v1/generations", Some(member("org_a", "u1"))),
        (
            Method::POST,
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/complete",
            Some(service()),
        ),
        (
            Method::POST,
            "/v1/generations/gen_01JD8X1Y2Z3A4B5C6D7E8F9G0H/fail",
            Some(service()),
        ),
        (
            Method::POST,
            "/v1/admin/workspaces/org_a/adjustments",
            Some(support()),
        ),
        (
            Method::POST,
            "/v1/admin/workspaces/org_a/custom-payments",
            Some(support()),
        ),
        (Method::POST, "/v1/checkout/sessions", Some(owner("org_a"))),
        (
            Method::POST,
            "/v1/subscription/change",
            Some(owner("org_a")),
        ),
        (Method::PUT, "/v1/subscription/addons", Some(owner("org_a"))),
        (Method::PUT, "/v1/alerts", Some(owner("org_a"))),
        (Method::POST, "/webhooks/stripe", None),
    ]
}

/// Bytes that are often almost JSON: fragments of valid bodies, mangled.
fn bodyish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (
            prop::sample::select(vec![
                r#"{"workflow":"video","model":"video-pro","duration_s":10}"#,
                r#"{"credits":5,"reason":"goodwill"}"#,
                r#"{"below_credits":[50],"auto_topup":{"pack":"pack_100","below_credits":30}}"#,
                r#"{"kind":"pack","pack":"pack_100","quantity":1}"#,
                r#"{"amount_cents":1000,"credits":100,"description":"deal"}"#,
                r#"{"id":"evt_1","type":"invoice.paid","data":{"object":{"customer":"cus_1"}}}"#,
            ]),
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(s, at, junk)| {
                let mut b = s.as_bytes().to_vec();
                let at = at % (b.len() + 1);
                b.splice(at..at, junk);
                b
            }),
    ]
}

/// Cases per property: 256, or `PROPTEST_CASES` (`make soak` runs more).
fn fuzz_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

/// Any bytes, any content type, any signature header (signed now, at any time, or not at
/// all) on every route that reads a body: an answer below 500, and every refusal a problem.
/// One system serves every case, as one server serves every client.
#[test]
fn any_body_on_any_route_gets_an_answer_and_never_a_server_error() {
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(async {
        let app = TestApp::new();
        grant(&app.ledger, "org_a", 1000).await;
        app
    });
    let input = (
        0..body_routes().len(),
        bodyish(),
        prop::sample::select(vec![
            "application/json",
            "text/plain",
            "application/json; charset=utf-8",
            "",
        ]),
        prop_oneof![
            Just(None),
            any::<i64>().prop_map(|t| Some(t.to_string())),
            "[-a-z0-9=, ]{0,40}".prop_map(|h| Some(format!("!{h}"))),
        ],
    );
    let keys = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: fuzz_cases(),
        ..Config::default()
    });
    runner
        .run(&input, |(route, body, content_type, signing)| {
            let (status, ct) = rt.block_on(async {
                let (method, path, tok) = body_routes().swap_remove(route);
                let text = String::from_utf8_lossy(&body).into_owned();
                let sig = match signing {
                    None => tally_local::simulator::stripe_signature(
                        &text,
                        WEBHOOK_SECRET,
                        chrono::Utc::now().timestamp(),
                    ),
                    Some(h) if h.starts_with('!') => h[1..].to_owned(),
                    Some(t) => tally_local::simulator::stripe_signature(
                        &text,
                        WEBHOOK_SECRET,
                        t.parse().unwrap(),
                    ),
                };
                let key = format!(
                    "fuzz-{}",
                    keys.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let mut headers = vec![
                    ("stripe-signature", sig.as_str()),
                    ("idempotency-key", key.as_str()),
                ];
                if !content_type.is_empty() {
                    headers.push(("content-type", content_type));
                }
                let (status, ct, _) =
                    raw(&app, method, path, tok.as_deref(), &headers, body.clone()).await;
                (status, ct)
            });
            prop_assert!(status < 500, "{status}");
            if status >= 400 {
                prop_assert_eq!(ct, "application/problem+json");
            }
            Ok(())
        })
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

    /// The signature header parser reads anything without panicking, and what it accepts
    /// is fresh only near now.
    #[test]
    fn the_signature_header_parser_takes_any_text(raw in any::<String>(), now in any::<i64>()) {
        use tally_stripe_webhook::signature::SignatureHeader;
        if let Ok(h) = SignatureHeader::parse(&raw) {
            let fresh = h.is_fresh(now);
            prop_assert_eq!(fresh, (now as i128 - h.t as i128).abs() <= 300);
        }
    }

    #[test]
    fn verification_takes_any_header_and_body(payload in any::<String>(), header in any::<String>(), now in any::<i64>()) {
        let _ = tally_stripe_webhook::verify(&payload, &header, &[WEBHOOK_SECRET.to_owned()], now);
    }
}

/// The routes that take no body say so: a body is optional (none, `null` or `{}`), and an
/// object with anything in it is outside the schema, as the routes refuse it.
#[tokio::test]
async fn routes_without_a_body_document_an_optional_empty_object() {
    let app = tally_tests::TestApp::new();
    let doc = app
        .send(Method::GET, "/openapi.json", None, None, &[])
        .await
        .body;
    for path in [
        "/v1/subscription/cancel",
        "/v1/subscription/resume",
        "/v1/subscription/pause",
        "/v1/billing-portal",
        "/v1/generations/{id}/retire-model",
    ] {
        let body = &doc["paths"][path]["post"]["requestBody"];
        assert_ne!(body["required"], true, "{path}: {body:#}");
        assert!(
            body.to_string().contains("#/components/schemas/NoBody"),
            "{path}: {body:#}"
        );
    }
    assert_eq!(
        doc["components"]["schemas"]["NoBody"]["additionalProperties"],
        false
    );
}
