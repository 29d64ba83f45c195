//! The workspace test binary: declares the modules only.

mod api;
mod billing;
mod concurrency;
mod contract;
mod infra;
mod lifecycle;
mod purchases;
mod queues;
mod refresh;
mod refund_requests;
mod refunds;
mod rules;
mod scale;
mod service_properties;
mod simulation;
mod simulator;
mod store_conformance;
mod stripe_api;
mod support;
