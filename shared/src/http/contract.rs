//! The OpenAPI document as served: what the handlers' annotations generate, completed with
//! what every route answers the same way, so clients and contract tests read the truth.
//!
//! - Every error is documented as `application/problem+json` ([`ProblemDetails`]), with the
//!   statuses the shared plumbing answers: 401 and 403 on authenticated routes; 400, 413,
//!   415 and 422 on routes that read a body; 422 on routes with parameters; 400 and 404 on
//!   routes with path parameters; 409 where an `Idempotency-Key` may be reused; 503 where a
//!   write may meet contention.
//! - `/health` and `/openapi.json` are documented.

use super::ProblemDetails;
use serde_json::{Map, Value, json};
use utoipa::PartialSchema;

const PROBLEM_JSON: &str = "application/problem+json";
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The served document of `doc`: error answers as problem details, service routes added.
pub fn document(doc: utoipa::openapi::OpenApi) -> Value {
    let mut v = serde_json::to_value(doc).expect("an OpenAPI document serializes");
    add_service_paths(&mut v);
    errors_as_problems(&mut v);
    v
}

/// Documents `/health` and `/openapi.json`.
fn add_service_paths(doc: &mut Value) {
    let paths = object(doc, "paths");
    paths.insert(
        "/health".into(),
        json!({"get": {
            "tags": ["service"],
            "summary": "Liveness: the process answers.",
            "operationId": "health",
            "responses": {"200": {"description": "Alive", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "additionalProperties": false,
                "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}}
        }}),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({"get": {
            "tags": ["service"],
            "summary": "This OpenAPI 3.1 document.",
            "operationId": "openapi",
            "responses": {"200": {"description": "The document", "content": {"application/json": {"schema": {
                "type": "object", "required": ["openapi", "info", "paths"]}}}}}
        }}),
    );
}

fn object<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let slot = v
        .as_object_mut()
        .expect("an object")
        .entry(key.to_owned())
        .or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

fn describe(status: u16) -> &'static str {
    match status {
        400 => "Malformed request: unreadable JSON or path",
        401 => "Missing or invalid credentials",
        402 => "Not enough credits",
        403 => "The caller may not do this",
        404 => "No such resource (or not the caller's)",
        405 => "Method not allowed",
        409 => {
            "Conflicts with the current state or an earlier request under the same Idempotency-Key"
        }
        413 => "The request body is too large",
        415 => "The body must be sent as application/json",
        422 => "Well-formed but invalid: the field named in the problem",
        502 => "The payment provider refused the request",
        503 => {
            "Busy, or the store briefly unavailable (`busy`, `unavailable`); retry, with the same \
             Idempotency-Key for a write"
        }
        _ => "Error",
    }
}

/// Every error answer documented as problem details, plus the statuses shared plumbing
/// answers on each kind of route.
pub fn errors_as_problems(doc: &mut Value) {
    let problem = serde_json::to_value(ProblemDetails::schema()).expect("schema serializes");
    let components = object(doc, "components");
    let schemas = components
        .entry("schemas")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("schemas is an object");
    schemas.insert("ProblemDetails".into(), problem);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            let mut statuses: Vec<u16> = Vec::new();
            let params = op
                .get("parameters")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let located = |place: &str| params.iter().any(|p| p["in"] == place);
            let secured = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            if secured {
                statuses.extend([401, 403]);
            }
            if op.contains_key("requestBody") {
                statuses.extend([400, 413, 415, 422]);
            }
            if !params.is_empty() {
                statuses.push(422);
            }
            if located("path") {
                statuses.extend([400, 404]);
            }
            if params
                .iter()
                .any(|p| p["in"] == "header" && p["name"] == "Idempotency-Key")
            {
                statuses.push(409);
            }
            // Writes may find the workspace busy; any route reading the store may find it
            // briefly unavailable (throttled, timed out).
            if secured {
                statuses.push(503);
            }
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("responses is an object");
            for s in statuses {
                responses
                    .entry(s.to_string())
                    .or_insert_with(|| json!({"description": describe(s)}));
            }
            for (code, response) in responses.iter_mut() {
                let Ok(status) = code.parse::<u16>() else {
                    continue;
                };
                if status < 400 {
                    continue;
                }
                let Some(r) = response.as_object_mut() else {
                    continue;
                };
                if r.get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    r.insert("description".into(), describe(status).into());
                }
                r.insert(
                    "content".into(),
                    json!({PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}),
                );
            }
        }
    }
}
