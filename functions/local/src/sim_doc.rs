//! The local runner's own routes in its OpenAPI document: the offline Stripe simulator's
//! pages and endpoints under `/sim` (served only when no Stripe key is set). Pages are HTML
//! for a browser, including their "not found" answers; the JSON endpoints answer problem
//! details.

use serde_json::{Value, json};

fn html(description: &str) -> Value {
    json!({"description": description, "content": {"text/html": {"schema": {"type": "string"}}}})
}

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/ProblemDetails"}}}})
}

fn id_param(description: &str) -> Value {
    json!([{"name": "id", "in": "path", "required": true, "description": description,
        "schema": {"type": "string"}}])
}

fn redirect(to: &str) -> Value {
    json!({"description": format!("See Other: on to {to}"), "headers": {"Location": {
        "schema": {"type": "string"}}}})
}

/// The `/sim` paths, to add to the document's `paths`.
pub fn sim_paths() -> Value {
    let event = json!({"type": "object", "required": ["id", "type", "created", "delivered_status", "payload"],
        "properties": {
            "id": {"type": "string"}, "type": {"type": "string"}, "created": {"type": "integer"},
            "delivered_status": {"type": "integer", "description": "What the webhook answered"},
            "payload": {"type": "object", "description": "The Stripe event as delivered"}}});
    json!({
        "/sim/checkout/{id}": {"get": {
            "tags": ["simulator"], "operationId": "sim_checkout_page",
            "summary": "The simulated Stripe Checkout page of a session, with its Pay button.",
            "parameters": id_param("Checkout session id"),
            "responses": {"200": html("The page"), "404": html("No such session")}}},
        "/sim/checkout/{id}/pay": {"post": {
            "tags": ["simulator"], "operationId": "sim_checkout_pay",
            "summary": "Pays a simulated checkout: Stripe's events are signed and delivered to the webhook.",
            "parameters": id_param("Checkout session id"),
            "responses": {"303": redirect("the success URL"), "200": html("The success page, when the redirect is followed"),
                "404": html("No such session")}}},
        "/sim/events": {"get": {
            "tags": ["simulator"], "operationId": "sim_events",
            "summary": "Every event the simulator delivered, oldest first.",
            "responses": {"200": {"description": "Delivered events", "content": {"application/json": {
                "schema": {"type": "array", "items": event}}}}}}},
        "/sim/events/{id}/redeliver": {"post": {
            "tags": ["simulator"], "operationId": "sim_redeliver",
            "summary": "Delivers one event again, as Stripe's retries would.",
            "parameters": id_param("Event id"),
            "responses": {
                "200": {"description": "Delivered again", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id", "delivered_status"],
                    "properties": {"id": {"type": "string"}, "delivered_status": {"type": "integer"}}}}}},
                "404": problem("No such event")}}},
        "/sim/subscriptions/{id}/renew": {"post": {
            "tags": ["simulator"], "operationId": "sim_renew",
            "summary": "Plays the next renewal of a simulated subscription.",
            "parameters": id_param("Subscription id"),
            "responses": {
                "200": {"description": "Renewed", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["renewed"], "properties": {"renewed": {"type": "string"}}}}}},
                "404": problem("No such subscription")}}},
        "/sim/invoices/{id}": {"get": {
            "tags": ["simulator"], "operationId": "sim_invoice_page",
            "summary": "The simulated hosted page of an invoice, with its Pay button.",
            "parameters": id_param("Invoice id"),
            "responses": {"200": html("The page"), "404": html("No such invoice")}}},
        "/sim/invoices/{id}/pay": {"post": {
            "tags": ["simulator"], "operationId": "sim_invoice_pay",
            "summary": "Pays a simulated invoice: Stripe's events are signed and delivered to the webhook.",
            "parameters": id_param("Invoice id"),
            "responses": {"303": redirect("the invoice page"), "200": html("The invoice page, when the redirect is followed"),
                "404": html("No such invoice")}}},
        "/sim/done": {"get": {
            "tags": ["simulator"], "operationId": "sim_done",
            "summary": "Where checkout and the portal return to locally.",
            "responses": {"200": html("Done")}}},
        "/sim/notifications": {"get": {
            "tags": ["simulator"], "operationId": "sim_notifications",
            "summary": "What the notifications queue received (credit alerts, top-up results), oldest first.",
            "responses": {"200": {"description": "Notifications", "content": {"application/json": {
                "schema": {"type": "array", "items": {"type": "object"}}}}}}}},
    })
}
