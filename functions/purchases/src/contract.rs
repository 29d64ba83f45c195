//! The purchases API's OpenAPI document as served: the handlers' annotations, the shared
//! completions ([`tally::http::contract`]), and the ids the loaded catalog sells (plans,
//! packs), so a client and a contract test know which values are accepted.

use crate::ApiDoc;
use serde_json::{Value, json};
use tally::catalog::Catalog;
use utoipa::OpenApi;

/// The document `GET /openapi.json` serves for this catalog.
pub fn openapi(catalog: &Catalog) -> Value {
    let mut doc = tally::http::contract::document(ApiDoc::openapi());
    complete(&mut doc, catalog);
    doc
}

/// Names the catalog's plan and pack ids in the schemas that take them (the local runner's
/// merged document too).
pub fn complete(doc: &mut Value, catalog: &Catalog) {
    let plans: Vec<&str> = catalog.plans.iter().map(|p| p.id.as_str()).collect();
    let packs: Vec<&str> = catalog.packs.iter().map(|p| p.id.as_str()).collect();
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut set = |schema: &str, pointer: &str, ids: &[&str]| {
        if let Some(field) = schemas.get_mut(schema).and_then(|s| s.pointer_mut(pointer)) {
            *field = json!({"type": "string", "enum": ids});
        }
    };
    set("ChangeBody", "/properties/plan", &plans);
    set("AutoTopUpBody", "/properties/pack", &packs);
    if let Some(field) = schemas
        .get_mut("PreviewBody")
        .and_then(|s| s.pointer_mut("/properties/plan"))
    {
        let mut ids: Vec<Value> = plans.iter().map(|p| json!(p)).collect();
        ids.push(Value::Null);
        *field = json!({"type": ["string", "null"], "enum": ids});
    }
    if let Some(variants) = schemas
        .get_mut("CheckoutBody")
        .and_then(|s| s.get_mut("oneOf"))
        .and_then(Value::as_array_mut)
    {
        for v in variants {
            if let Some(p) = v.pointer_mut("/properties/plan") {
                *p = json!({"type": "string", "enum": plans});
            }
            if let Some(p) = v.pointer_mut("/properties/pack") {
                *p = json!({"type": "string", "enum": packs});
            }
            // The body refuses fields its kind does not take.
            if let Some(o) = v.as_object_mut() {
                o.insert("additionalProperties".into(), json!(false));
            }
        }
    }
}
