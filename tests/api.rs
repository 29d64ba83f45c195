//! HTTP API tests (placeholder)
