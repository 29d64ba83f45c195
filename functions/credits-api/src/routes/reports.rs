//! `GET /v1/usage`: credits spent by member, model or day; `GET /v1/generations/export` and
//! `GET /v1/ledger/export`: the creation history and the journal as CSV (RFC 4180),
//! streamed page by page.

use super::ApiResult;
use crate::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, FixedOffset};
use futures_util::StreamExt;
use serde::Deserialize;
use tally::catalog::Workflow;
use tally::http::auth::WorkspaceMember;
use tally::http::{ApiQuery, Problem, ProblemDetails};
use tally::ids::WorkspaceId;
use tally::reports::usage::{GroupBy, MAX_REPORT_ENTRIES, Usage, usage};
use utoipa::IntoParams;

/// The longest range one usage report covers.
pub const MAX_USAGE_DAYS: i64 = 366;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Start (inclusive, RFC 3339); default 30 days before `to`; at most 366 days before
    /// `to` (an earlier start is moved up: the answer's `from` says where it starts).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: Option<DateTime<FixedOffset>>,
    /// End (exclusive, RFC 3339); default now.
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: Option<DateTime<FixedOffset>>,
    /// Default `member`.
    #[param(inline)]
    pub group_by: Option<GroupBy>,
}

pub(crate) async fn usage_of(
    app: &AppState,
    workspace: &WorkspaceId,
    q: UsageQuery,
) -> ApiResult<Usage> {
    let to = tally::http::text::instant("to", q.to)?.unwrap_or_else(|| app.ledger.clock.now());
    let from = tally::http::text::instant("from", q.from)?.unwrap_or(to - Duration::days(30));
    // At most a year, ending at `to`; the answer says which range it covers. A range that
    // ends before it starts holds nothing.
    let from = from.max(to - Duration::days(MAX_USAGE_DAYS)).min(to);
    let report = usage(
        app.ledger.store.as_ref(),
        workspace,
        from,
        to,
        q.group_by.unwrap_or(GroupBy::Member),
        MAX_REPORT_ENTRIES,
    );
    // In Lambda the report has the export's time, well inside the function's timeout: a
    // range too long to sum in it is refused as one with too many charges, not cut off.
    let summed = match app.export_limit {
        Some(limit) => tokio::time::timeout(limit.time, report)
            .await
            .unwrap_or(Ok(None))?,
        None => report.await?,
    };
    summed.ok_or_else(|| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "range_too_large",
            format!(
                "the range holds more than {MAX_REPORT_ENTRIES} charges, or more than can be \
                 summed in one answer; ask for a shorter one"
            ),
        )
    })
}

#[utoipa::path(get, path = "/v1/usage", tag = "credits", security(("bearer" = [])),
    params(UsageQuery),
    responses((status = 200, body = Usage), (status = 403, body = ProblemDetails), (status = 422, body = ProblemDetails)))]
/// Credits spent in a time range, grouped by member, model or day; the totals are the
/// journal's own sums over the range.
pub async fn usage_report(
    State(app): State<AppState>,
    // Who may ask is decided before the query is read.
    member: WorkspaceMember,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Usage>> {
    let workspace = &member.workspace;
    usage_of(&app, workspace, q).await.map(Json)
}

/// The only export format.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Csv,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GenerationExportQuery {
    #[param(inline)]
    pub format: ExportFormat,
    /// Created at or after (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: Option<DateTime<FixedOffset>>,
    /// Created before (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: Option<DateTime<FixedOffset>>,
    #[param(max_length = 200)]
    pub started_by: Option<String>,
    #[param(max_length = 200)]
    pub model: Option<String>,
    #[param(inline)]
    pub workflow: Option<Workflow>,
    /// As the creation history shows it: `expired` includes holds past their deadline
    /// not settled yet.
    #[param(inline)]
    pub status: Option<tally::ledger::GenerationStatus>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerExportQuery {
    #[param(inline)]
    pub format: ExportFormat,
    /// Entries at or after (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub from: Option<DateTime<FixedOffset>>,
    /// Entries before (RFC 3339).
    #[param(pattern = "^20[0-9]{2}-")]
    pub to: Option<DateTime<FixedOffset>>,
}

async fn csv_response(
    limit: Option<crate::ExportLimit>,
    name: &str,
    chunks: impl futures_util::Stream<Item = Result<String, tally::store::StoreError>> + Send + 'static,
) -> ApiResult<Response> {
    let headers = [
        (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}.csv\""),
        ),
    ];
    let Some(limit) = limit else {
        let body = Body::from_stream(chunks.map(|chunk| {
            chunk.map_err(|e| {
                // The status is already sent: cutting the stream short is the only way
                // left to say the file is incomplete.
                tracing::error!(error = %e, "export stopped");
                std::io::Error::other(e)
            })
        }));
        return Ok((StatusCode::OK, headers, body).into_response());
    };
    // Built whole before anything is sent: a failure is an error answer, never a file cut
    // short, and a range too large for one answer is refused as soon as that shows.
    let began = std::time::Instant::now();
    let too_large = || {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "export_too_large",
            "this range makes more CSV than one answer carries: ask for shorter ranges with \
             from and to",
        )
    };
    let (mut body, mut carried) = (String::new(), 0usize);
    let mut chunks = std::pin::pin!(chunks);
    loop {
        // One chunk can take long (a page of rows behind many that do not match): the
        // time limit holds while it is read, not only between chunks.
        let left = limit.time.saturating_sub(began.elapsed());
        let Ok(next) = tokio::time::timeout(left, chunks.next()).await else {
            return Err(too_large());
        };
        let Some(chunk) = next else {
            break;
        };
        let chunk = chunk.map_err(|e| {
            if e.is_transient() {
                tracing::warn!(error = %e, "export interrupted");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the export could not be read just now; retry",
                )
            } else {
                Problem::from(e)
            }
        })?;
        carried += json_string_len(&chunk);
        if carried > limit.bytes || began.elapsed() > limit.time {
            return Err(too_large());
        }
        body.push_str(&chunk);
    }
    Ok((StatusCode::OK, headers, body).into_response())
}

/// The length of `text` as a JSON string, which is how a Lambda response carries it:
/// quotes, backslashes and line ends take two bytes, other control characters six.
fn json_string_len(text: &str) -> usize {
    text.len()
        + text
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
                0..0x20 => 5,
                _ => 0,
            })
            .sum::<usize>()
}

pub(crate) async fn generations_export(
    app: &AppState,
    workspace: WorkspaceId,
    q: GenerationExportQuery,
) -> ApiResult<Response> {
    let ExportFormat::Csv = q.format;
    let query = super::generations::filters(
        q.model.as_deref(),
        q.started_by.as_deref(),
        q.workflow,
        q.from,
        q.to,
    )?;
    let query = tally::store::GenerationQuery {
        status: q.status,
        ..query
    };
    let name = format!("generations-{workspace}");
    csv_response(
        app.export_limit,
        &name,
        tally::reports::export::generations_csv(
            app.ledger.store.clone(),
            workspace,
            query,
            app.ledger.clock.now(),
        ),
    )
    .await
}

pub(crate) async fn ledger_export(
    app: &AppState,
    workspace: WorkspaceId,
    q: LedgerExportQuery,
) -> ApiResult<Response> {
    let ExportFormat::Csv = q.format;
    // A range that ends before it starts holds nothing: the file has its header only.
    let from = tally::http::text::instant("from", q.from)?;
    let to = tally::http::text::instant("to", q.to)?;
    let name = format!("ledger-{workspace}");
    csv_response(
        app.export_limit,
        &name,
        tally::reports::export::ledger_csv(app.ledger.store.clone(), workspace, from, to),
    )
    .await
}

#[utoipa::path(get, path = "/v1/generations/export", tag = "credits", security(("bearer" = [])),
    params(GenerationExportQuery),
    responses((status = 200, description = "CSV (RFC 4180), newest first", content_type = "text/csv"),
        (status = 403, body = ProblemDetails),
        (status = 422, description = "invalid filters, or (`export_too_large`) a range too large for one answer", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// The creation history as CSV, streamed: id, times, member, workflow, model, status and
/// credits held, charged, reversed and short.
pub async fn export_generations(
    State(app): State<AppState>,
    // Who may ask is decided before the query is read.
    member: WorkspaceMember,
    ApiQuery(q): ApiQuery<GenerationExportQuery>,
) -> ApiResult<Response> {
    let workspace = member.workspace;
    generations_export(&app, workspace, q).await
}

#[utoipa::path(get, path = "/v1/ledger/export", tag = "credits", security(("bearer" = [])),
    params(LedgerExportQuery),
    responses((status = 200, description = "CSV (RFC 4180), newest first", content_type = "text/csv"),
        (status = 403, body = ProblemDetails),
        (status = 422, description = "invalid filters, or (`export_too_large`) a range too large for one answer", body = ProblemDetails),
        (status = 503, body = ProblemDetails)))]
/// The journal as CSV, streamed: every entry with its reason, credit change, balance after,
/// actor and references.
pub async fn export_ledger(
    State(app): State<AppState>,
    // Who may ask is decided before the query is read.
    member: WorkspaceMember,
    ApiQuery(q): ApiQuery<LedgerExportQuery>,
) -> ApiResult<Response> {
    let workspace = member.workspace;
    ledger_export(&app, workspace, q).await
}

#[cfg(test)]
mod tests {
    use super::json_string_len;

    #[test]
    fn an_export_is_measured_as_the_json_string_lambda_sends() {
        assert_eq!(json_string_len("abc"), 3);
        // "a\"b\r\n" + U+0001 + é: quote and line ends escaped, the control character as
        // \u0001, the two bytes of é as they are.
        assert_eq!(json_string_len("a\"b\r\n\u{1}é"), 1 + 2 + 1 + 2 + 2 + 6 + 2);
        let json = serde_json::to_string("x,\"y\"\r\n\t\u{7}\\").unwrap();
        assert_eq!(json_string_len("x,\"y\"\r\n\t\u{7}\\"), json.len() - 2);
    }
}
