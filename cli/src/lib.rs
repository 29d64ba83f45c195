//! The command line of support staff and finance. It talks to the Tally API with a staff
//! token (scope `credits:admin`), so every read is checked and audited by the API like any
//! other: nothing here reads the table or Stripe directly.
//!
//! Long work (exports of long histories, reconciliation of a month) is split into ranges
//! the API answers quickly (a month of export, a day of reconciliation), with a progress
//! bar on a terminal. Files are written to a temporary name and renamed once complete.

use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "tally-admin",
    version,
    about = "Lookups, exports and reconciliation through the Tally API"
)]
pub struct Cli {
    /// The Tally API.
    #[arg(long, env = "TALLY_API_URL", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// A staff token (scope credits:admin).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reads one workspace (recorded in its audit log).
    Workspace {
        id: String,
        #[arg(value_enum)]
        what: Read,
        /// Only from this day or instant on (usage, generations, history).
        #[arg(long)]
        from: Option<String>,
        /// Only before this day or instant (usage, generations, history).
        #[arg(long)]
        to: Option<String>,
        /// Page size, 1-100.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// One support ticket with its thread.
    Ticket { id: String },
    /// A workspace's journal or creation history as one CSV file, newest first.
    Export {
        #[arg(value_enum)]
        what: ExportKind,
        workspace: String,
        /// First day (YYYY-MM-DD) or instant (RFC 3339).
        #[arg(long)]
        from: String,
        /// Day or instant after the last; default tomorrow.
        #[arg(long)]
        to: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// The ledger against Stripe's charges: what was paid that granted nothing, and what
    /// was granted without a payment.
    Reconcile {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: Option<String>,
        /// Where to write the full report (JSON); the summary goes to standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Read {
    Balance,
    Ledger,
    Generations,
    Usage,
    History,
    Tickets,
    Audit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportKind {
    Ledger,
    Generations,
}

/// A day (`YYYY-MM-DD`, midnight UTC) or an RFC 3339 instant.
pub fn parse_instant(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("{text:?} is neither a day (YYYY-MM-DD) nor an RFC 3339 instant"))
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        .replace('+', "%2B")
        .replace(':', "%3A")
}

/// Path segments are ids the API checks; anything outside its alphabet is refused here.
fn segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty()
        || !id.as_bytes()[0].is_ascii_alphanumeric()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        bail!("{id:?} is not an id");
    }
    Ok(id)
}

/// The API with a token.
pub struct Api {
    base: String,
    token: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Api {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    async fn send(&self, path: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let uri: http::Uri = format!("{}{path}", self.base)
            .parse()
            .with_context(|| format!("bad API URL {}", self.base))?;
        let req = http::Request::get(uri)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::USER_AGENT, "tally-admin/1")
            .body(Empty::new())?;
        let res = self
            .client
            .request(req)
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        if !res.status().is_success() {
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            let problem = serde_json::from_slice::<Value>(&body).ok();
            let text = |field: &str| {
                problem
                    .as_ref()
                    .and_then(|v| v[field].as_str().map(str::to_owned))
            };
            return Err(Refused {
                path: path.to_owned(),
                status,
                code: text("code"),
                detail: text("detail")
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
            }
            .into());
        }
        Ok(res)
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let body = self
            .send(path)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Streams a body into `sink` frame by frame; returns the bytes read.
    pub async fn get_stream(
        &self,
        path: &str,
        mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let mut body = self.send(path).await?.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("GET {path}: the answer broke off"))?;
            if let Some(data) = frame.data_ref() {
                n += data.len() as u64;
                sink(data)?;
            }
        }
        Ok(n)
    }
}

/// An answer of the API other than a success, with the problem's code when it sent one.
#[derive(Debug)]
pub struct Refused {
    pub path: String,
    pub status: http::StatusCode,
    pub code: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GET {}: {}: {}", self.path, self.status, self.detail)
    }
}

impl std::error::Error for Refused {}

/// Whether an error is the API refusing an export range as too large for one answer.
fn too_large(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>()
        .is_some_and(|r| r.code.as_deref() == Some("export_too_large"))
}

/// Months from `from` to `to`, newest first (the first and last may be partial).
pub fn months(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut bounds = vec![from];
    let mut d = from.date_naive().with_day(1).expect("day 1");
    loop {
        d = d
            .checked_add_months(chrono::Months::new(1))
            .expect("a month later");
        let t = d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        if t >= to {
            break;
        }
        bounds.push(t);
    }
    bounds.push(to);
    let mut out: Vec<_> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    out.reverse();
    out
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_message(what.to_owned());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}") {
        pb.set_style(style);
    }
    pb
}

/// A file written under a temporary name and renamed once complete.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Staged {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?;
        let mut tmp_name = name.to_owned();
        tmp_name.push(".partial");
        let tmp = path.with_file_name(tmp_name);
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
            file: std::io::BufWriter::new(file),
        })
    }
    fn finish(mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Staged {
    /// An unfinished file is removed: only a complete one is ever left at its name.
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let api = Api::new(&cli.api, &cli.token)?;
    let tomorrow = || {
        (Utc::now() + Duration::days(1))
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
    };
    match cli.command {
        Command::Workspace {
            id,
            what,
            from,
            to,
            limit,
        } => {
            let id = segment(&id)?;
            let mut query = Vec::new();
            if let Some(f) = from {
                query.push(format!("from={}", iso(parse_instant(&f)?)));
            }
            if let Some(t) = to {
                query.push(format!("to={}", iso(parse_instant(&t)?)));
            }
            if let Some(l) = limit {
                query.push(format!("limit={l}"));
            }
            let route = match what {
                Read::Balance => "balance",
                Read::Ledger => "ledger",
                Read::Generations => "generations",
                Read::Usage => "usage",
                Read::History => "billing/history",
                Read::Tickets => "support/tickets",
                Read::Audit => "audit",
            };
            let path = format!(
                "/v1/admin/workspaces/{id}/{route}{}{}",
                if query.is_empty() { "" } else { "?" },
                query.join("&")
            );
            let v = api.get_json(&path).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Ticket { id } => {
            let v = api
                .get_json(&format!("/v1/support/tickets/{}", segment(&id)?))
                .await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Export {
            what,
            workspace,
            from,
            to,
            output,
        } => {
            let ws = segment(&workspace)?;
            let from = parse_instant(&from)?;
            let to = match to {
                Some(t) => parse_instant(&t)?,
                None => tomorrow(),
            };
            if from >= to {
                bail!("--from must be before --to");
            }
            let kind = match what {
                ExportKind::Ledger => "ledger",
                ExportKind::Generations => "generations",
            };
            let ranges = months(from, to);
            let pb = bar(ranges.len() as u64, &format!("exporting {kind}"));
            let mut file = Staged::create(&output)?;
            let (mut rows, mut header_written) = (0u64, false);
            // Newest first; a range the API finds too large for one answer is asked for
            // again in two halves (before any of it is written).
            let mut todo: Vec<_> = ranges.into_iter().rev().collect();
            while let Some((lo, hi)) = todo.pop() {
                let path = format!(
                    "/v1/admin/workspaces/{ws}/{kind}/export?format=csv&from={}&to={}",
                    iso(lo),
                    iso(hi)
                );
                // Each range's file starts with the header: kept once, for the first.
                let mut skipping_header = true;
                let mut pending: Vec<u8> = Vec::new();
                let mut counter = RecordCounter::default();
                let answer = api
                    .get_stream(&path, |chunk| {
                        let mut chunk = chunk;
                        if skipping_header {
                            pending.extend_from_slice(chunk);
                            let Some(end) = pending.windows(2).position(|w| w == b"\r\n") else {
                                return Ok(());
                            };
                            if !header_written {
                                file.file.write_all(&pending[..end + 2])?;
                                header_written = true;
                            }
                            skipping_header = false;
                            let rest = pending.split_off(end + 2);
                            rows += counter.count(&rest);
                            file.file.write_all(&rest)?;
                            chunk = &[];
                        }
                        rows += counter.count(chunk);
                        file.file.write_all(chunk)?;
                        Ok(())
                    })
                    .await;
                match answer {
                    Err(e) if too_large(&e) && hi - lo > Duration::seconds(1) => {
                        let mid = lo + (hi - lo) / 2;
                        todo.push((lo, mid));
                        todo.push((mid, hi));
                        pb.inc_length(1);
                        continue;
                    }
                    other => {
                        other?;
                    }
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
            file.finish()?;
            writeln!(out, "{rows} rows written to {}", output.display())?;
        }
        Command::Reconcile { from, to, output } => {
            let from = parse_instant(&from)?;
            let to = match to {
                Some(t) => parse_instant(&t)?,
                None => tomorrow(),
            };
            if from >= to {
                bail!("--from must be before --to");
            }
            let mut days = Vec::new();
            let mut d = from;
            while d < to {
                let next = (d + Duration::days(1)).min(to);
                days.push((d, next));
                d = next;
            }
            let pb = bar(days.len() as u64, "reconciling");
            let mut paid = Vec::new();
            let mut granted = Vec::new();
            let mut mismatched = Vec::new();
            let (mut charges, mut matched) = (0u64, 0u64);
            for (lo, hi) in days {
                let r = api
                    .get_json(&format!(
                        "/v1/admin/reconciliation?from={}&to={}",
                        iso(lo),
                        iso(hi)
                    ))
                    .await?;
                charges += r["charges"].as_u64().unwrap_or(0);
                matched += r["matched"].as_u64().unwrap_or(0);
                paid.extend(
                    r["paid_without_credits"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                granted.extend(
                    r["credits_without_payment"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                mismatched.extend(r["mismatched"].as_array().cloned().unwrap_or_default());
                pb.inc(1);
            }
            pb.finish_and_clear();
            let report = json!({
                "from": from, "to": to, "charges": charges, "matched": matched,
                "paid_without_credits": paid, "credits_without_payment": granted,
                "mismatched": mismatched,
            });
            if let Some(path) = output {
                let mut file = Staged::create(&path)?;
                serde_json::to_writer_pretty(&mut file.file, &report)?;
                file.finish()?;
            }
            writeln!(
                out,
                "{charges} charges, {matched} matched; {} paid without credits; {} credits without payment; {} mismatched",
                paid.len(),
                granted.len(),
                mismatched.len()
            )?;
            for p in &paid {
                writeln!(out, "paid without credits: {p}")?;
            }
            for g in &granted {
                writeln!(out, "credits without payment: {g}")?;
            }
            for m in &mismatched {
                writeln!(out, "mismatched: {m}")?;
            }
        }
    }
    Ok(())
}

/// Counts CSV records (CRLFs outside quotes) across chunks that may end anywhere.
#[derive(Default)]
struct RecordCounter {
    quoted: bool,
    prev: u8,
}

impl RecordCounter {
    fn count(&mut self, bytes: &[u8]) -> u64 {
        let mut n = 0;
        for &b in bytes {
            if b == b'"' {
                self.quoted = !self.quoted;
            } else if b == b'\n' && self.prev == b'\r' && !self.quoted {
                n += 1;
            }
            self.prev = b;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_cover_the_range_newest_first() {
        let from = parse_instant("2026-01-15").unwrap();
        let to = parse_instant("2026-03-02T10:00:00Z").unwrap();
        let m = months(from, to);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].1, to);
        assert_eq!(m[2].0, from);
        assert!(m.windows(2).all(|w| w[0].0 == w[1].1));
    }

    #[test]
    fn ids_and_dates_are_checked_before_anything_is_asked() {
        assert!(segment("../x").is_err());
        assert!(segment("..").is_err());
        assert!(segment(".").is_err());
        assert!(segment("org_a").is_ok());
        assert!(parse_instant("2026-02-30").is_err());
        assert!(parse_instant("yesterday").is_err());
    }

    #[test]
    fn records_are_counted_outside_quotes_across_chunks() {
        let text = b"a,b\r\n\"x\r\ny\",z\r\n";
        for cut in 0..text.len() {
            let mut c = RecordCounter::default();
            assert_eq!(
                c.count(&text[..cut]) + c.count(&text[cut..]),
                2,
                "cut at {cut}"
            );
        }
    }
}
