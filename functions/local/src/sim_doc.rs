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
    let clock_view = json!({"type": "object", "required": ["now", "offset"], "properties": {
        "now": {"type": "string", "format": "date-time"},
        "offset": {"type": "integer", "description": "Seconds moved forward in total"}}});
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
            "summary": "Moves the clock to when the subscription's renewal is charged, an hour after its period end (as Stripe finalizes a renewal's draft invoice), playing the renewal and everything due before.",
            "parameters": id_param("Subscription id"),
            "responses": {
                "200": {"description": "Renewed", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["renewed", "clock"], "properties": {
                        "renewed": {"type": "string"}, "clock": clock_view.clone()}}}}},
                "404": problem("No such subscription"),
                "409": problem("The clock cannot move there")}}},
        "/sim/clock": {"get": {
            "tags": ["simulator"], "operationId": "sim_clock",
            "summary": "The local system's one clock (shared by the simulator, the ledger and the credit refresh).",
            "responses": {"200": {"description": "The clock", "content": {"application/json": {
                "schema": clock_view.clone()}}}}}},
        "/sim/clock/advance": {"post": {
            "tags": ["simulator"], "operationId": "sim_clock_advance",
            "summary": "Moves the clock forward, playing in time order everything Stripe and Tally's schedule do in that span (renewals, failed payments and retries, cancellations, paused invoices, allotments, expiry).",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false, "minProperties": 1, "maxProperties": 1,
                "description": "Exactly one of days, hours or until; never backwards, at most ten years.",
                "properties": {
                    "days": {"type": "integer", "minimum": 0, "maximum": 3660},
                    "hours": {"type": "integer", "minimum": 0, "maximum": 87840},
                    "until": {"type": "string", "format": "date-time"}}}}}},
            "responses": {"200": {"description": "The clock after the move", "content": {"application/json": {
                    "schema": clock_view.clone()}}},
                "400": problem("Malformed JSON"),
                "413": problem("Body too large"),
                "415": problem("Not JSON"),
                "422": problem("Not exactly one of days, hours or until, or backwards")}}},
        "/sim/customers/{id}/card": {"post": {
            "tags": ["simulator"], "operationId": "sim_customer_card",
            "summary": "Makes a simulated customer's card decline (or pay again) from now on.",
            "parameters": id_param("Customer id"),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false, "required": ["declines"],
                "properties": {"declines": {"type": "boolean"}}}}}},
            "responses": {"200": {"description": "Set", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["customer", "declines"], "properties": {
                        "customer": {"type": "string"}, "declines": {"type": "boolean"}}}}}},
                "400": problem("Malformed JSON"),
                "404": problem("No such customer"),
                "413": problem("Body too large"),
                "415": problem("Not JSON"),
                "422": problem("Not a boolean")}}},
        "/sim/charges/{id}/refund": {"post": {
            "tags": ["simulator"], "operationId": "sim_charge_refund",
            "summary": "Refunds a succeeded charge as the dashboard would: `charge.refunded` and `refund.created` are delivered; the credits it bought follow.",
            "parameters": id_param("Charge id"),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "properties": {"amount": {"type": ["integer", "null"], "minimum": 1,
                    "maximum": 100_000_000_000_i64,
                    "description": "Cents; all that is not yet refunded when absent"}}}}}},
            "responses": {"200": {"description": "The refund", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "400": problem("Malformed JSON"),
                "404": problem("No such charge"),
                "409": problem("More than is left to refund, or the charge is disputed"),
                "413": problem("Body too large"),
                "415": problem("Not JSON"),
                "422": problem("Not an integer")}}},
        "/sim/charges/{id}/dispute": {"post": {
            "tags": ["simulator"], "operationId": "sim_charge_dispute",
            "summary": "The cardholder disputes a succeeded charge: `charge.dispute.created` is delivered and the credits it bought are frozen.",
            "parameters": id_param("Charge id"),
            "responses": {"200": {"description": "The dispute", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "404": problem("No such charge"),
                "409": problem("Already disputed or fully refunded")}}},
        "/sim/charges/{id}/inquiry": {"post": {
            "tags": ["simulator"], "operationId": "sim_charge_inquiry",
            "summary": "The cardholder's bank asks about a succeeded charge (an inquiry: `warning_needs_response`): `charge.dispute.created` is delivered and the credits it bought are frozen; the charge can still be refunded, as in Stripe.",
            "parameters": id_param("Charge id"),
            "responses": {"200": {"description": "The inquiry", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "404": problem("No such charge"),
                "409": problem("Already inquired about, disputed or fully refunded")}}},
        "/sim/disputes/{id}/close": {"post": {
            "tags": ["simulator"], "operationId": "sim_dispute_close",
            "summary": "The card network decides a dispute: `charge.dispute.closed` with `won` (credits unfrozen) or `lost` (credits taken back); an inquiry closes with `won` only (`warning_closed`).",
            "parameters": id_param("Dispute id"),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false, "required": ["outcome"],
                "properties": {"outcome": {"enum": ["won", "lost"]}}}}}},
            "responses": {"200": {"description": "The closed dispute", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "400": problem("Malformed JSON"),
                "404": problem("No such dispute"),
                "409": problem("Already closed, or an inquiry said to be lost"),
                "413": problem("Body too large"),
                "415": problem("Not JSON"),
                "422": problem("Not won or lost")}}},
        "/sim/invoices/{id}": {"get": {
            "tags": ["simulator"], "operationId": "sim_invoice_page",
            "summary": "The simulated hosted page of an invoice, with its Pay button; `<id>.pdf` is the invoice as a PDF.",
            "parameters": id_param("Invoice id, or the id followed by `.pdf`"),
            "responses": {"200": {"description": "The page, or the PDF", "content": {
                    "text/html": {"schema": {"type": "string"}},
                    "application/pdf": {"schema": {"type": "string", "format": "binary"}}}},
                "404": html("No such invoice")}}},
        "/sim/receipts/{id}": {"get": {
            "tags": ["simulator"], "operationId": "sim_receipt_page",
            "summary": "The simulated receipt of a charge (its `receipt_url`): paid and refunded amounts.",
            "parameters": id_param("Charge id"),
            "responses": {"200": html("The receipt"), "404": html("No such receipt")}}},
        "/sim/invoices/{id}/pay": {"post": {
            "tags": ["simulator"], "operationId": "sim_invoice_pay",
            "summary": "Pays a simulated invoice: Stripe's events are signed and delivered to the webhook.",
            "parameters": id_param("Invoice id"),
            "responses": {"303": redirect("the invoice page"), "200": html("The invoice page, when the redirect is followed"),
                "404": html("No such invoice")}}},
        "/sim/invoices/{id}/credit-note": {"post": {
            "tags": ["simulator"], "operationId": "sim_invoice_credit_note",
            "summary": "Credits part of a paid invoice outside Stripe, as staff would in the dashboard: a post-payment credit note with `out_of_band_amount`; `credit_note.created` is delivered and the credits that money bought are taken back.",
            "parameters": id_param("Invoice id"),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false, "required": ["amount"],
                "properties": {"amount": {"type": "integer", "minimum": 1,
                    "maximum": 100_000_000_000_i64, "description": "Cents"}}}}}},
            "responses": {"200": {"description": "The credit note", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "400": problem("Malformed JSON"),
                "404": problem("No such invoice"),
                "409": problem("Not paid, or more than is left to credit"),
                "413": problem("Body too large"),
                "415": problem("Not JSON"),
                "422": problem("Not an integer")}}},
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

/// The local runner's own routes (with or without the simulator).
pub fn dev_paths() -> serde_json::Value {
    json!({
        "/dev/outbox": {"get": {
            "tags": ["local"], "operationId": "dev_outbox",
            "summary": "What the support forwarder delivered to the help desk (signed as the help desk receives it), oldest first.",
            "responses": {"200": {"description": "Deliveries", "content": {"application/json": {
                "schema": {"type": "array", "items": {"type": "object"}}}}}}}},
    })
}
