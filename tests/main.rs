//! The workspace test binary: declares the modules only.

mod api;
mod concurrency;
mod service_properties;
mod store_conformance;
