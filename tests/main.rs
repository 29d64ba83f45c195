//! The workspace test binary: declares the modules only.

mod api;
mod billing;
mod concurrency;
mod contract;
mod infra;
mod purchases;
mod queues;
mod rules;
mod service_properties;
mod store_conformance;
mod stripe_api;
