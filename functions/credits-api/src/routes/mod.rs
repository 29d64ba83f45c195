//! The credits API's routes, one file per resource: each holds its handlers and the
//! request and response bodies they read and write. Helpers more than one resource uses
//! live here.

pub mod adjustments;
pub mod admin;
pub mod balance;
pub mod catalog;
pub mod entitlements;
pub mod estimates;
pub mod generations;
pub mod ledger;
pub mod reports;

use tally::http::Problem;

pub(crate) type ApiResult<T> = Result<T, Problem>;

/// Longest free-text reason (a failure, an adjustment) accepted.
pub(crate) const MAX_REASON_CHARS: usize = tally::http::text::MAX_TEXT_CHARS;

/// A page size from the `limit` query parameter: 1 to 100, `default` when absent.
pub(crate) use tally::http::page_limit;
