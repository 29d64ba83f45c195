//! The Payments port: what Tally asks of Stripe. [`stripe::StripePayments`] talks to the
//! Stripe API; [`simulator::Simulator`] stands in for it locally, completing checkouts by
//! delivering signed Stripe-shaped events to the webhook.

pub mod simulator;
pub mod stripe;

use crate::ids::AccountId;
use crate::ledger::Interval;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PaymentsError {
    /// Stripe refused the request (card declined, invalid parameter...). Not retryable.
    #[error("payment provider refused the request: {0}")]
    Refused(String),
    /// Network, timeout or 5xx: retry with the same idempotency key.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
}

/// What a checkout sells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Purchase {
    Plan {
        plan: String,
        name: String,
        interval: Interval,
        /// Price per interval, integer cents.
        unit_amount: u64,
    },
    Pack {
        pack: String,
        name: String,
        quantity: u64,
        /// Price per pack after the plan's pack discount, integer cents.
        unit_amount: u64,
        credits: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutRequest {
    pub account: AccountId,
    pub customer: String,
    pub purchase: Purchase,
    pub success_url: String,
    pub cancel_url: String,
    /// Stripe idempotency key derived from our own request.
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutLink {
    pub id: String,
    pub url: String,
}

#[async_trait]
pub trait Payments: Send + Sync {
    /// Creates the Stripe customer of a workspace.
    async fn create_customer(
        &self,
        account: &AccountId,
        email: Option<&str>,
        idempotency_key: &str,
    ) -> Result<String, PaymentsError>;

    async fn create_checkout(&self, req: &CheckoutRequest) -> Result<CheckoutLink, PaymentsError>;

    /// A customer-portal URL (plans, invoices, payment methods).
    async fn billing_portal(
        &self,
        customer: &str,
        return_url: &str,
        idempotency_key: &str,
    ) -> Result<String, PaymentsError>;
}
