//! The simulator's browser side: the checkout and invoice pages Stripe would host, the
//! buttons that pay them, and `/sim` endpoints to list, redeliver and renew by hand.

use super::{SimEvent, Simulator};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::sync::Arc;
use tally::http::Problem;
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
            .route("/sim/invoices/{id}", get(invoice_page))
            .route("/sim/invoices/{id}/pay", post(pay_invoice))
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
            let status = sim.post_signed(&e.payload).await;
            axum::Json(json!({"id": id, "delivered_status": status})).into_response()
        }
        None => Problem::not_found(format!("no simulated event {id}")).into_response(),
    }
}

async fn renew(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    if sim.renew(&id).await {
        axum::Json(json!({"renewed": id})).into_response()
    } else {
        Problem::not_found(format!("no simulated subscription {id}")).into_response()
    }
}

async fn invoice_page(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    let found = sim
        .invoices
        .lock()
        .expect("sim lock")
        .get(id.as_str())
        .cloned();
    let Some((req, inv)) = found else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>No such invoice</h1>".to_owned()),
        )
            .into_response();
    };
    let status = inv["status"].as_str().unwrap_or("open").to_owned();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Invoice (simulated)</title></head>\
         <body><h1>Invoice {}</h1><p id=\"description\">{}</p><p id=\"amount\">${}.{:02}</p>\
         <p id=\"status\">{}</p><form method=\"post\" action=\"/sim/invoices/{}/pay\">\
         <button id=\"pay\" type=\"submit\">Pay invoice</button></form></body></html>",
        escape(&id),
        escape(&req.description),
        req.amount.get() / 100,
        req.amount.get() % 100,
        escape(&status),
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
