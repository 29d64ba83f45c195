//! Tally: the credits and billing backend of a generative-media studio.
//!
//! This crate holds everything the Lambda functions share: the domain (ids, money, the
//! catalog), the pure ledger engine, the ports (`LedgerStore`, `Clock`) with their adapters,
//! the service that runs ledger operations exactly once, and the HTTP plumbing (identity,
//! problem details) every HTTP function uses.

pub mod alerts;
pub mod audit;
pub mod billing;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod error;
pub mod http;
pub mod ids;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod payments;
pub mod queue;
pub mod refresh;
pub mod refund_requests;
pub mod reports;
pub mod service;
pub mod store;
pub mod subscriptions;
pub mod support;
pub mod telemetry;
