//! The simulator's browser side: the checkout and invoice pages Stripe would host, the
//! buttons that pay them, and `/sim` endpoints to list and redeliver events, move the clock
//! and make a customer's card decline. Invoice pages and PDFs show every invoice the
//! simulator made (subscription, proration, renewal and custom ones).

use super::objects::dollars;
use super::{ClockView, SimEvent, Simulator};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tally::http::Problem;
use tally::http::problem::ApiJson;
use tally::ledger::Interval;
use tally::payments::Purchase;

impl Simulator {
    /// The `/sim` pages and endpoints, to merge into the local runner's router.
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/sim/checkout/{id}", get(page))
            .route("/sim/checkout/{id}/pay", post(pay))
            .route("/sim/events", get(list_events))
            .route("/sim/events/{id}/redeliver", post(redeliver))
            .route("/sim/subscriptions/{id}/renew", post(renew))
            .route("/sim/clock", get(clock))
            .route("/sim/clock/advance", post(advance))
            .route("/sim/customers/{id}/card", post(card))
            .route("/sim/charges/{id}/refund", post(refund))
            .route("/sim/charges/{id}/dispute", post(dispute))
            .route("/sim/charges/{id}/inquiry", post(inquiry))
            .route("/sim/disputes/{id}/close", post(close_dispute))
            .route("/sim/invoices/{id}", get(invoice_page))
            .route("/sim/receipts/{id}", get(receipt_page))
            .route("/sim/invoices/{id}/pay", post(pay_invoice))
            .route("/sim/invoices/{id}/credit-note", post(credit_note))
            .route("/sim/done", get(done))
            .with_state(self.clone())
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn page(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    let session = sim
        .sessions
        .lock()
        .expect("sim lock")
        .get(id.as_str())
        .cloned();
    let Some(s) = session else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>No such checkout session</h1>".to_owned()),
        )
            .into_response();
    };
    let (what, amount) = match &s.request.purchase {
        Purchase::Plan {
            name,
            interval,
            unit_amount,
            ..
        } => (
            format!(
                "{name} plan, billed {}",
                match interval {
                    Interval::Monthly => "monthly",
                    Interval::Yearly => "yearly",
                }
            ),
            unit_amount.get(),
        ),
        Purchase::Pack {
            name,
            quantity,
            unit_amount,
            credits,
            ..
        } => (
            format!("{quantity} x {name} ({credits} credits each)"),
            quantity * unit_amount.get(),
        ),
    };
    let status = if s.paid {
        "<p id=\"status\">Paid</p>"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tally checkout (simulated)</title></head>\
         <body><h1>Checkout</h1><p>Simulated payment: no money moves.</p>\
         <p id=\"item\">{}</p><p id=\"amount\">${}.{:02}</p>{status}\
         <form method=\"post\" action=\"/sim/checkout/{}/pay\"><button id=\"pay\" type=\"submit\">Pay</button></form>\
         <p><a href=\"{}\">Cancel</a></p></body></html>",
        escape(&what),
        amount / 100,
        amount % 100,
        escape(&id),
        escape(&s.request.cancel_url),
    ))
    .into_response()
}

async fn pay(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    if sim.expired(&id) {
        return (
            StatusCode::GONE,
            Html("<h1>This checkout session has expired</h1>".to_owned()),
        )
            .into_response();
    }
    match sim.complete(&id).await {
        Some(success) => Redirect::to(&success).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Html("<h1>No such checkout session</h1>".to_owned()),
        )
            .into_response(),
    }
}

async fn list_events(State(sim): State<Arc<Simulator>>) -> axum::Json<Vec<SimEvent>> {
    axum::Json(sim.events())
}

async fn redeliver(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    let event = sim.events().into_iter().find(|e| e.id == id);
    match event {
        Some(e) => {
            // Stripe resends minutes to days later: past the queue's five-minute
            // deduplication window, so the billing worker sees the duplicate.
            if let Some(q) = &sim.billing_queue {
                q.forget_dedup(&e.id);
            }
            let status = sim.post_signed(&e.payload).await;
            axum::Json(json!({"id": id, "delivered_status": status})).into_response()
        }
        None => Problem::not_found(format!("no simulated event {id}")).into_response(),
    }
}

async fn renew(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    match sim.renew(&id).await {
        Some(Ok(clock)) => axum::Json(json!({"renewed": id, "clock": clock})).into_response(),
        Some(Err(e)) => Problem::conflict(e.to_string()).into_response(),
        None => Problem::not_found(format!("no simulated subscription {id}")).into_response(),
    }
}

async fn clock(State(sim): State<Arc<Simulator>>) -> axum::Json<ClockView> {
    axum::Json(sim.clock_view())
}

/// How far to move the clock: exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    days: Option<i64>,
    hours: Option<i64>,
    until: Option<DateTime<Utc>>,
}

/// Longest single move: ten years.
const MAX_DAYS: i64 = 3660;

async fn advance(State(sim): State<Arc<Simulator>>, ApiJson(body): ApiJson<Advance>) -> Response {
    let now = sim.clock_view().now;
    let to = match (body.days, body.hours, body.until) {
        (Some(d), None, None) if (0..=MAX_DAYS).contains(&d) => now + Duration::days(d),
        (None, Some(h), None) if (0..=MAX_DAYS * 24).contains(&h) => now + Duration::hours(h),
        (None, None, Some(t)) if t >= now && t - now <= Duration::days(MAX_DAYS) => t,
        (Some(_), None, None) => {
            return Problem::validation("days", &format!("must be between 0 and {MAX_DAYS}"))
                .into_response();
        }
        (None, Some(_), None) => {
            return Problem::validation(
                "hours",
                &format!("must be between 0 and {}", MAX_DAYS * 24),
            )
            .into_response();
        }
        (None, None, Some(t)) => {
            return Problem::validation(
                "until",
                &format!("must be between now ({now}) and {MAX_DAYS} days later, not {t}"),
            )
            .into_response();
        }
        _ => {
            return Problem::validation("days", "give exactly one of days, hours or until")
                .into_response();
        }
    };
    match sim.advance_to(to).await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => Problem::validation("until", &e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Card {
    declines: bool,
}

async fn card(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Card>,
) -> Response {
    if sim.set_card_declines(&id, body.declines) {
        axum::Json(json!({"customer": id, "declines": body.declines})).into_response()
    } else {
        Problem::not_found(format!("no simulated customer {id}")).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    /// Cents; all that is not yet refunded when absent.
    #[serde(default)]
    amount: Option<i64>,
}

fn money_back(r: Result<Value, super::disputes::MoneyBackError>) -> Response {
    use super::disputes::MoneyBackError;
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(MoneyBackError::NotFound(m)) => Problem::not_found(m).into_response(),
        Err(MoneyBackError::Invalid(m)) => Problem::conflict(m).into_response(),
    }
}

async fn refund(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RefundBody>,
) -> Response {
    money_back(sim.refund_charge(&id, body.amount).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditNoteBody {
    /// Cents credited outside Stripe.
    amount: i64,
}

async fn credit_note(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreditNoteBody>,
) -> Response {
    money_back(sim.credit_note(&id, body.amount).await)
}

async fn dispute(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    money_back(sim.dispute_charge(&id).await)
}

async fn inquiry(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    money_back(sim.inquire_charge(&id).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum DisputeOutcome {
    Won,
    Lost,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    outcome: DisputeOutcome,
}

async fn close_dispute(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CloseBody>,
) -> Response {
    money_back(
        sim.close_dispute(&id, matches!(body.outcome, DisputeOutcome::Won))
            .await,
    )
}

/// Labelled values: (description, amount) of each line, or (name, value) of each total.
type Rows = Vec<(String, String)>;

/// The facts an invoice page and PDF show: title, lines and totals (with tax and status).
fn invoice_facts(inv: &Value) -> (String, Rows, Rows) {
    let cents = |k: &str| dollars(inv[k].as_i64().unwrap_or_default());
    let title = format!(
        "Invoice {} ({})",
        inv["number"].as_str().unwrap_or_default(),
        inv["id"].as_str().unwrap_or_default()
    );
    let day = |ts: &Value| {
        ts.as_i64()
            .and_then(|t| DateTime::from_timestamp(t, 0))
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };
    let lines = inv["lines"]["data"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    (
                        format!(
                            "{} ({} to {})",
                            l["description"].as_str().unwrap_or_default(),
                            day(&l["period"]["start"]),
                            day(&l["period"]["end"])
                        ),
                        dollars(l["amount"].as_i64().unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let tax: i64 = inv["total_taxes"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x["amount"].as_i64()).sum())
        .unwrap_or_default();
    let totals = vec![
        (
            "Status".to_owned(),
            inv["status"].as_str().unwrap_or_default().to_owned(),
        ),
        (
            "Billing reason".to_owned(),
            inv["billing_reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        ("Date".to_owned(), day(&inv["created"])),
        ("Subtotal".to_owned(), cents("subtotal")),
        ("Tax".to_owned(), dollars(tax)),
        ("Total".to_owned(), cents("total")),
        ("Amount due".to_owned(), cents("amount_due")),
        ("Amount paid".to_owned(), cents("amount_paid")),
        ("Amount remaining".to_owned(), cents("amount_remaining")),
    ];
    (title, lines, totals)
}

/// A charge's receipt: what was paid, and what was refunded since.
async fn receipt_page(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    let Some(c) = sim.charge(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>No such receipt</h1>".to_owned()),
        )
            .into_response();
    };
    let cents = |v: &serde_json::Value| {
        let n = v.as_i64().unwrap_or_default();
        format!("{}.{:02}", n / 100, n % 100)
    };
    let currency = c["currency"].as_str().unwrap_or("usd").to_uppercase();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Receipt {id}</title></head>\
         <body><h1>Receipt</h1><p>Simulated receipt: no money moves.</p><table>\
         <tr><th>Payment</th><td id=\"payment\">{}</td></tr>\
         <tr><th>Amount paid</th><td id=\"amount_paid\">{} {currency}</td></tr>\
         <tr><th>Refunded</th><td id=\"refunded\">{} {currency}</td></tr>\
         </table></body></html>",
        escape(&id),
        cents(&c["amount"]),
        cents(&c["amount_refunded"]),
    ))
    .into_response()
}

async fn invoice_page(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    let (id, pdf) = match id.strip_suffix(".pdf") {
        Some(i) => (i.to_owned(), true),
        None => (id, false),
    };
    let Some(inv) = sim.invoice(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>No such invoice</h1>".to_owned()),
        )
            .into_response();
    };
    let (title, lines, totals) = invoice_facts(&inv);
    if pdf {
        let mut text = vec![title, "Simulated invoice: no money moves.".to_owned()];
        text.extend(lines.iter().map(|(d, a)| format!("{d}   {a}")));
        text.push(String::new());
        text.extend(totals.iter().map(|(k, v)| format!("{k}: {v}")));
        return (
            [(header::CONTENT_TYPE, "application/pdf")],
            super::pdf::document(&text),
        )
            .into_response();
    }
    let rows: String = lines
        .iter()
        .map(|(d, a)| {
            format!(
                "<tr><td>{}</td><td class=\"amount\">{}</td></tr>",
                escape(d),
                escape(a)
            )
        })
        .collect();
    let facts: String = totals
        .iter()
        .map(|(k, v)| {
            let key = k.to_lowercase().replace(' ', "_");
            format!(
                "<tr><th>{}</th><td id=\"{key}\">{}</td></tr>",
                escape(k),
                escape(v)
            )
        })
        .collect();
    let payable = inv["status"] == "open" && inv["billing_reason"] == "manual";
    let pay = if payable {
        format!(
            "<form method=\"post\" action=\"/sim/invoices/{}/pay\"><button id=\"pay\" type=\"submit\">Pay invoice</button></form>",
            escape(&id)
        )
    } else {
        String::new()
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} (simulated)</title></head>\
         <body><h1>{}</h1><p id=\"description\">{}</p><p>Simulated invoice: no money moves.</p>\
         <table id=\"lines\">{rows}</table><table id=\"totals\">{facts}</table>{pay}\
         <p><a id=\"pdf\" href=\"/sim/invoices/{}.pdf\">Download PDF</a></p></body></html>",
        escape(&title),
        escape(&title),
        escape(inv["description"].as_str().unwrap_or_default()),
        escape(&id),
    ))
    .into_response()
}

async fn pay_invoice(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    if sim.pay_invoice(&id).await {
        Redirect::to(&format!("/sim/invoices/{id}")).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Html("<h1>No such invoice</h1>".to_owned()),
        )
            .into_response()
    }
}

async fn done() -> Html<&'static str> {
    Html(
        "<!doctype html><html><body><h1 id=\"done\">Payment complete</h1><p>Your credits are on their way to your balance.</p></body></html>",
    )
}
