//! The credits API's OpenAPI document as served: the handlers' annotations, the shared
//! completions ([`tally::http::contract`]), and the request shapes the loaded catalog
//! decides: which models exist, which workflow each belongs to, which take a resolution or
//! a duration and up to how many seconds.

use crate::ApiDoc;
use serde_json::{Value, json};
use tally::catalog::{Catalog, MAX_COUNT, Pricing, Resolution};
use utoipa::OpenApi;

/// The document `GET /openapi.json` serves for this catalog.
pub fn openapi(catalog: &Catalog) -> Value {
    let mut doc = tally::http::contract::document(ApiDoc::openapi());
    complete(&mut doc, catalog);
    doc
}

/// Adds what the annotations cannot say to `doc` (the local runner's merged document too):
/// the catalog-dependent request schemas, that settling takes an empty body, and the link
/// from a started generation to reading it.
pub fn complete(doc: &mut Value, catalog: &Catalog) {
    for settle in ["complete", "fail"] {
        if let Some(body) = doc
            .pointer_mut(&format!(
                "/paths/~1v1~1generations~1{{id}}~1{settle}/post/requestBody"
            ))
            .and_then(Value::as_object_mut)
        {
            body.insert("required".into(), Value::Bool(false));
        }
    }
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert("GenerationSpec".into(), generation_spec(catalog));
    }
    if let Some(created) = doc
        .pointer_mut("/paths/~1v1~1generations/post/responses/201")
        .and_then(Value::as_object_mut)
    {
        created.insert(
            "links".into(),
            json!({"GetGeneration": {
                "operationId": "get_generation",
                "parameters": {"id": "$response.body#/id"},
                "description": "The generation just started",
            }}),
        );
    }
}

/// One alternative per model: exactly the requests [`Catalog::estimate`] prices.
pub fn generation_spec(catalog: &Catalog) -> Value {
    // Every resolution prices (one the catalog does not list multiplies by 1).
    let mut resolutions_or_null: Vec<Value> = [Resolution::P1080, Resolution::K2, Resolution::K4]
        .into_iter()
        .map(|r| serde_json::to_value(r).expect("a resolution serializes"))
        .collect();
    resolutions_or_null.push(Value::Null);
    let variants: Vec<Value> = catalog
        .models
        .iter()
        .map(|m| {
            let mut properties = json!({
                "workflow": {"type": "string", "enum": [m.workflow.as_str()]},
                "model": {"type": "string", "enum": [m.id]},
            });
            let mut required = vec!["workflow", "model"];
            let p = properties.as_object_mut().expect("an object");
            let count = json!({"type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT,
                "description": "How many items; default 1"});
            match m.pricing {
                Pricing::PerItem(_) => {
                    p.insert("resolution".into(), json!({"enum": resolutions_or_null}));
                    p.insert("count".into(), count);
                    p.insert("duration_s".into(), json!({"type": "null"}));
                }
                Pricing::PerSecondMilli(_) => {
                    p.insert("resolution".into(), json!({"enum": resolutions_or_null}));
                    p.insert("count".into(), count);
                    p.insert(
                        "duration_s".into(),
                        json!({"type": "integer", "minimum": 1,
                            "maximum": m.max_duration_s.unwrap_or(600)}),
                    );
                    required.push("duration_s");
                }
                Pricing::Flat(_) => {
                    p.insert("resolution".into(), json!({"type": "null"}));
                    p.insert(
                        "count".into(),
                        json!({"type": ["integer", "null"], "minimum": 1, "maximum": 1}),
                    );
                    p.insert("duration_s".into(), json!({"type": "null"}));
                }
            }
            json!({
                "title": m.id,
                "type": "object",
                "required": required,
                "properties": properties,
                "additionalProperties": false,
            })
        })
        .collect();
    json!({
        "description": "What to generate: a model of the catalog with the inputs its pricing takes.",
        "oneOf": variants,
    })
}
