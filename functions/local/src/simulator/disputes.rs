//! Money going back: refunds of a succeeded charge (as made in the dashboard or through
//! the API) and card disputes, with the objects and events Stripe sends for them.
//!
//! A refund updates the charge (`amount_refunded`, `refunded` once all of it is back) and
//! delivers `charge.refunded` with the charge, then `refund.created` with the refund. A
//! dispute delivers `charge.dispute.created` (status `needs_response`, for what was not
//! refunded) and, when closed, `charge.dispute.closed` with `won` or `lost`. A credit note
//! made in the dashboard for part of a paid invoice delivers `credit_note.created`.

use super::Simulator;
use super::objects::{fixture, new_id};
use serde_json::{Value, json};

/// Why a refund or dispute was not made.
#[derive(Debug, PartialEq, Eq)]
pub enum MoneyBackError {
    NotFound(String),
    /// What Stripe answers 400 for: more than is left, nothing left, a dispute twice.
    Invalid(String),
}

impl Simulator {
    /// Refunds `amount` cents (default: all that is not yet refunded) of a succeeded charge.
    pub async fn refund_charge(
        &self,
        charge: &str,
        amount: Option<i64>,
    ) -> Result<Value, MoneyBackError> {
        self.refund_with(charge, amount, json!({}), "requested_by_customer")
            .await
    }

    /// A refund with its metadata and Stripe reason (as made through the API).
    pub(super) async fn refund_with(
        &self,
        charge: &str,
        amount: Option<i64>,
        metadata: Value,
        reason: &str,
    ) -> Result<Value, MoneyBackError> {
        let now = self.now();
        let (charge_obj, refund) = {
            let mut charges = self.charges.lock().expect("sim lock");
            let c = charges
                .get_mut(charge)
                .ok_or_else(|| MoneyBackError::NotFound(format!("no such charge: {charge}")))?;
            if c["disputed"].as_bool() == Some(true) {
                return Err(MoneyBackError::Invalid(format!(
                    "charge {charge} is disputed and cannot be refunded"
                )));
            }
            let paid = c["amount"].as_i64().unwrap_or_default();
            let refunded = c["amount_refunded"].as_i64().unwrap_or_default();
            let left = paid - refunded;
            let amount = amount.unwrap_or(left);
            if amount <= 0 || amount > left {
                return Err(MoneyBackError::Invalid(format!(
                    "refund amount ({amount}) must be between 1 and the {left} cents not yet refunded"
                )));
            }
            let mut refund = fixture("refund");
            refund["id"] = json!(new_id("re"));
            refund["amount"] = json!(amount);
            refund["charge"] = json!(charge);
            refund["created"] = json!(now);
            refund["currency"] = c["currency"].clone();
            refund["payment_intent"] = c["payment_intent"].clone();
            refund["status"] = json!("succeeded");
            refund["reason"] = json!(reason);
            refund["metadata"] = metadata;
            c["amount_refunded"] = json!(refunded + amount);
            c["refunded"] = json!(refunded + amount == paid);
            let mut data = c["refunds"]["data"].as_array().cloned().unwrap_or_default();
            data.insert(0, refund.clone());
            c["refunds"] = json!({"object": "list", "data": data, "has_more": false,
                "url": format!("/v1/charges/{charge}/refunds")});
            (c.clone(), refund)
        };
        self.deliver("charge.refunded", charge_obj).await;
        self.deliver("refund.created", refund.clone()).await;
        Ok(refund)
    }

    /// The cardholder disputes a succeeded charge (for what was not refunded).
    pub async fn dispute_charge(&self, charge: &str) -> Result<Value, MoneyBackError> {
        self.dispute_with(charge, false).await
    }

    /// The cardholder's bank asks about a succeeded charge (an inquiry, Stripe's
    /// `warning_needs_response`): no money is taken, and the charge can still be refunded.
    pub async fn inquire_charge(&self, charge: &str) -> Result<Value, MoneyBackError> {
        self.dispute_with(charge, true).await
    }

    async fn dispute_with(&self, charge: &str, inquiry: bool) -> Result<Value, MoneyBackError> {
        let now = self.now();
        let (charge_obj, dispute) = {
            let mut charges = self.charges.lock().expect("sim lock");
            let c = charges
                .get_mut(charge)
                .ok_or_else(|| MoneyBackError::NotFound(format!("no such charge: {charge}")))?;
            let left = c["amount"].as_i64().unwrap_or_default()
                - c["amount_refunded"].as_i64().unwrap_or_default();
            let asked = if inquiry { "inquired" } else { "disputed" };
            if c["disputed"].as_bool() == Some(true)
                || c[asked].as_bool() == Some(true)
                || left <= 0
            {
                return Err(MoneyBackError::Invalid(format!(
                    "charge {charge} is already disputed or fully refunded"
                )));
            }
            // An inquiry leaves the charge refundable; a chargeback does not.
            c[asked] = json!(true);
            let mut d = fixture("dispute");
            d["id"] = json!(new_id("dp"));
            d["amount"] = json!(left);
            d["charge"] = json!(charge);
            d["payment_intent"] = c["payment_intent"].clone();
            d["currency"] = c["currency"].clone();
            d["created"] = json!(now);
            d["reason"] = json!(if inquiry { "general" } else { "fraudulent" });
            d["status"] = json!(if inquiry {
                "warning_needs_response"
            } else {
                "needs_response"
            });
            d["is_charge_refundable"] = json!(inquiry);
            (c.clone(), d)
        };
        self.disputes.lock().expect("sim lock").insert(
            dispute["id"].as_str().unwrap_or_default().to_owned(),
            dispute.clone(),
        );
        self.deliver("charge.dispute.created", dispute.clone())
            .await;
        self.deliver("charge.updated", charge_obj).await;
        Ok(dispute)
    }

    /// The card network decides an open dispute: `won` keeps the money, `lost` gives it to
    /// the cardholder.
    pub async fn close_dispute(&self, dispute: &str, won: bool) -> Result<Value, MoneyBackError> {
        let closed = {
            let mut disputes = self.disputes.lock().expect("sim lock");
            let d = disputes
                .get_mut(dispute)
                .ok_or_else(|| MoneyBackError::NotFound(format!("no such dispute: {dispute}")))?;
            if matches!(
                d["status"].as_str(),
                Some("won" | "lost" | "warning_closed")
            ) {
                return Err(MoneyBackError::Invalid(format!(
                    "dispute {dispute} is already closed"
                )));
            }
            let inquiry = d["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("warning_"));
            d["status"] = json!(match (inquiry, won) {
                (true, true) => "warning_closed",
                (true, false) => {
                    return Err(MoneyBackError::Invalid(format!(
                        "dispute {dispute} is an inquiry: it closes (won), or the cardholder files a chargeback (dispute the charge)"
                    )));
                }
                (false, true) => "won",
                (false, false) => "lost",
            });
            d.clone()
        };
        self.deliver("charge.dispute.closed", closed.clone()).await;
        Ok(closed)
    }

    /// Staff credit part of a paid invoice outside Stripe in the dashboard: a post-payment
    /// credit note with `out_of_band_amount` (no money moves in Stripe), as Stripe makes
    /// it. The invoice's `post_payment_credit_notes_amount` grows; `credit_note.created`
    /// is delivered.
    pub async fn credit_note(&self, invoice: &str, amount: i64) -> Result<Value, MoneyBackError> {
        let now = self.now();
        let mut inv = self
            .invoice(invoice)
            .ok_or_else(|| MoneyBackError::NotFound(format!("no such invoice: {invoice}")))?;
        if inv["status"] != "paid" {
            return Err(MoneyBackError::Invalid(format!(
                "invoice {invoice} is not paid; this simulator credits paid invoices only"
            )));
        }
        let paid = inv["amount_paid"].as_i64().unwrap_or_default();
        let credited = inv["post_payment_credit_notes_amount"]
            .as_i64()
            .unwrap_or_default();
        if amount <= 0 || amount > paid - credited {
            return Err(MoneyBackError::Invalid(format!(
                "the credit note's amount ({amount}) must be between 1 and the {} cents of invoice {invoice} not yet credited",
                paid - credited
            )));
        }
        inv["post_payment_credit_notes_amount"] = json!(credited + amount);
        self.store_invoice(&inv, None);
        let mut note = fixture("credit_note");
        note["id"] = json!(new_id("cn"));
        note["invoice"] = json!(invoice);
        note["customer"] = inv["customer"].clone();
        note["currency"] = inv["currency"].clone();
        note["created"] = json!(now);
        note["effective_at"] = json!(now);
        note["voided_at"] = Value::Null;
        note["customer_balance_transaction"] = Value::Null;
        for field in [
            "amount",
            "total",
            "subtotal",
            "subtotal_excluding_tax",
            "post_payment_amount",
            "out_of_band_amount",
        ] {
            note[field] = json!(amount);
        }
        note["pre_payment_amount"] = json!(0);
        note["type"] = json!("post_payment");
        note["status"] = json!("issued");
        note["memo"] = json!("Service credit");
        note["reason"] = json!("order_change");
        note["refunds"] = json!([]);
        note["lines"]["data"] = json!([]);
        self.deliver("credit_note.created", note.clone()).await;
        Ok(note)
    }

    /// A succeeded charge as it stands now.
    pub fn charge(&self, id: &str) -> Option<Value> {
        self.charges.lock().expect("sim lock").get(id).cloned()
    }
}
