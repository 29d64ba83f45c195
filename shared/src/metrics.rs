//! Operational metrics in CloudWatch's embedded metric format (EMF): one JSON line per
//! measured event on stdout, which Lambda's log delivery turns into metrics in the `Tally`
//! namespace without an API call or a network round trip.
//!
//! Each record is published under two dimension sets: by function and kind (`Function`,
//! `Operation`), and in one series for the whole service (`Service` = `tally`), which the
//! template's alarms watch. Workspace and key travel as plain properties: searchable in the
//! logs, never a dimension (one series per workspace would be unbounded).
//!
//! Nothing is written until a function calls [`init`] (Lambda) or a test sets a sink with
//! [`set_sink`]; the local runner stays quiet.

use serde_json::{Map, Value, json};
use std::sync::OnceLock;

pub const NAMESPACE: &str = "Tally";
/// The value of the service-wide dimension.
pub const SERVICE: &str = "tally";

type Sink = Box<dyn Fn(&str) + Send + Sync>;

static SINK: OnceLock<Sink> = OnceLock::new();
static FUNCTION: OnceLock<String> = OnceLock::new();

/// For Lambda functions: records go to stdout, named after `function`.
pub fn init(function: &str) {
    let _ = FUNCTION.set(function.to_owned());
    let _ = SINK.set(Box::new(|line| println!("{line}")));
}

/// Sends records to `sink` instead (the first sink set stays).
pub fn set_sink(function: &str, sink: impl Fn(&str) + Send + Sync + 'static) {
    let _ = FUNCTION.set(function.to_owned());
    let _ = SINK.set(Box::new(sink));
}

#[derive(Debug, Clone, Copy)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// One measured event: its kind (`Operation` dimension), values and properties.
pub struct Record<'a> {
    kind: &'a str,
    metrics: Vec<(&'static str, Unit, f64)>,
    properties: Map<String, Value>,
}

impl<'a> Record<'a> {
    pub fn new(kind: &'a str) -> Self {
        Self {
            kind,
            metrics: Vec::new(),
            properties: Map::new(),
        }
    }

    pub fn count(mut self, name: &'static str, value: u64) -> Self {
        self.metrics.push((name, Unit::Count, value as f64));
        self
    }

    pub fn millis(mut self, name: &'static str, value: i64) -> Self {
        self.metrics
            .push((name, Unit::Milliseconds, value.max(0) as f64));
        self
    }

    pub fn property(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.properties.insert(name.to_owned(), value.into());
        self
    }

    /// Writes the record, if anything listens.
    pub fn emit(self) {
        let Some(sink) = SINK.get() else {
            return;
        };
        sink(&self.into_line(chrono::Utc::now().timestamp_millis()));
    }

    fn into_line(self, timestamp_ms: i64) -> String {
        let function = FUNCTION.get().map(String::as_str).unwrap_or("local");
        let definitions: Vec<Value> = self
            .metrics
            .iter()
            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        let mut root = self.properties;
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [["Function", "Operation"], ["Service"]],
                    "Metrics": definitions,
                }],
            }),
        );
        root.insert("Function".into(), function.into());
        root.insert("Operation".into(), self.kind.into());
        root.insert("Service".into(), SERVICE.into());
        for (name, _, value) in self.metrics {
            root.insert(name.into(), json!(value));
        }
        Value::Object(root).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line_of_embedded_metric_format() {
        let line = Record::new("hold")
            .count("LedgerOperations", 1)
            .count("Conflicts", 3)
            .millis("Lag", -5)
            .property("workspace", "org_a")
            .into_line(1_700_000_000_000);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        let aws = &v["_aws"];
        assert_eq!(aws["Timestamp"], 1_700_000_000_000i64);
        let d = &aws["CloudWatchMetrics"][0];
        assert_eq!(d["Namespace"], "Tally");
        assert_eq!(
            d["Dimensions"],
            json!([["Function", "Operation"], ["Service"]])
        );
        assert_eq!(
            d["Metrics"],
            json!([
                {"Name": "LedgerOperations", "Unit": "Count"},
                {"Name": "Conflicts", "Unit": "Count"},
                {"Name": "Lag", "Unit": "Milliseconds"}
            ])
        );
        // Every dimension and metric named in the directive has its value at the root.
        assert_eq!(v["Operation"], "hold");
        assert_eq!(v["Service"], "tally");
        assert!(v["Function"].is_string());
        assert_eq!(v["Conflicts"], 3.0);
        assert_eq!(v["Lag"], 0.0, "a negative duration is clamped");
        assert_eq!(v["workspace"], "org_a");
    }
}
