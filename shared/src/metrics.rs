//! Metrics in CloudWatch Embedded Metric Format (EMF): each document is one JSON line on stdout,
//! which CloudWatch Logs turns into metrics, so the invocation makes no metrics API call.
//!
//! Written here rather than through the `metrics` facade and `metrics_cloudwatch_embedded`: the
//! functions report one document per invocation built from values they already have, a global
//! recorder would mix concurrent tests, that crate's Lambda integration targets an older
//! `lambda_runtime`, and its histograms do not keep to EMF's limit of 100 values per metric.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// EMF takes at most 100 values for one metric in one document.
pub const MAX_VALUES_PER_METRIC: usize = 100;

/// Namespace used when `METRICS_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "Outbox";

/// Units the functions report in (CloudWatch unit names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count of things.
    Count,
    /// Seconds.
    Seconds,
    /// Milliseconds.
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Seconds => "Seconds",
            Self::Milliseconds => "Milliseconds",
        }
    }
}

#[derive(Debug, Clone)]
struct Metric {
    name: &'static str,
    unit: Unit,
    values: Vec<f64>,
}

/// The metrics of one invocation: a namespace, one dimension set, values and properties.
#[derive(Debug, Clone)]
pub struct MetricsDocument {
    namespace: String,
    dimensions: Vec<(String, String)>,
    metrics: Vec<Metric>,
    properties: Map<String, Value>,
}

impl MetricsDocument {
    /// A document in `namespace` whose metrics carry the `Service` dimension.
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            dimensions: vec![("Service".into(), service.into())],
            metrics: Vec::new(),
            properties: Map::new(),
        }
    }

    /// A document in the namespace named by `METRICS_NAMESPACE` (default `Outbox`), whose
    /// `Service` dimension is `METRICS_SERVICE` when set (a team running its own sink or
    /// dispatcher names it), else `service`.
    pub fn from_env(service: impl Into<String>) -> Self {
        let namespace = crate::config::optional_env("METRICS_NAMESPACE")
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let service =
            crate::config::optional_env("METRICS_SERVICE").unwrap_or_else(|| service.into());
        Self::new(namespace, service)
    }

    /// Adds one value.
    pub fn value(&mut self, name: &'static str, unit: Unit, value: f64) -> &mut Self {
        self.metrics.push(Metric {
            name,
            unit,
            values: vec![value],
        });
        self
    }

    /// Adds a count.
    pub fn count(&mut self, name: &'static str, count: usize) -> &mut Self {
        self.value(name, Unit::Count, count as f64)
    }

    /// Adds one value per sample, in milliseconds: CloudWatch computes percentiles over them.
    /// Without samples the metric is left out (an absent latency is not a latency of zero).
    pub fn latencies(&mut self, name: &'static str, samples: &[Duration]) -> &mut Self {
        if !samples.is_empty() {
            self.metrics.push(Metric {
                name,
                unit: Unit::Milliseconds,
                values: samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
            });
        }
        self
    }

    /// Adds a property: logged with the metrics, searchable in Logs Insights, not a metric.
    pub fn property(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        self.properties.insert(name.to_owned(), value.into());
        self
    }

    /// The document as JSON lines at `timestamp`. A metric with more than 100 values is spread
    /// over further documents, so every line is valid EMF; single values go in the first one.
    pub fn render(&self, timestamp: SystemTime) -> Vec<String> {
        let millis = timestamp
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let chunks = self
            .metrics
            .iter()
            .map(|m| m.values.len().div_ceil(MAX_VALUES_PER_METRIC))
            .max()
            .unwrap_or(0);
        (0..chunks)
            .map(|chunk| self.render_chunk(chunk, millis).to_string())
            .collect()
    }

    fn render_chunk(&self, chunk: usize, millis: u64) -> Value {
        let mut root = if chunk == 0 {
            self.properties.clone()
        } else {
            Map::new()
        };
        let mut definitions = Vec::new();
        for metric in &self.metrics {
            let start = chunk * MAX_VALUES_PER_METRIC;
            if start >= metric.values.len() {
                continue;
            }
            let end = (start + MAX_VALUES_PER_METRIC).min(metric.values.len());
            let values = &metric.values[start..end];
            let value = match values {
                [one] => json!(one),
                many => json!(many),
            };
            root.insert(metric.name.to_owned(), value);
            definitions.push(json!({"Name": metric.name, "Unit": metric.unit.as_str()}));
        }
        for (name, value) in &self.dimensions {
            root.insert(name.clone(), json!(value));
        }
        let dimension_names: Vec<&str> = self.dimensions.iter().map(|d| d.0.as_str()).collect();
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": millis,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [dimension_names],
                    "Metrics": definitions,
                }],
            }),
        );
        Value::Object(root)
    }

    /// Writes the document to stdout, where the Lambda runtime sends it to CloudWatch Logs.
    pub fn emit(&self) {
        let lines = self.render(SystemTime::now());
        let mut out = std::io::stdout().lock();
        for line in lines {
            // Metrics are best effort: a closed stdout must not fail the invocation.
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Value {
        serde_json::from_str(line).expect("every line is JSON")
    }

    #[test]
    fn a_document_declares_each_metric_with_its_unit_and_dimension() {
        let mut doc = MetricsDocument::new("Outbox", "outbox-dispatcher");
        doc.count("Published", 12)
            .value("OldestPendingAge", Unit::Seconds, 3.5)
            .latencies("ClaimLatency", &[Duration::from_micros(2500)])
            .property("stopped", "empty");
        let lines = doc.render(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(lines.len(), 1);
        let v = parse(&lines[0]);
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_123u64);
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Outbox");
        assert_eq!(directive["Dimensions"], json!([["Service"]]));
        assert_eq!(
            directive["Metrics"],
            json!([
                {"Name": "Published", "Unit": "Count"},
                {"Name": "OldestPendingAge", "Unit": "Seconds"},
                {"Name": "ClaimLatency", "Unit": "Milliseconds"},
            ])
        );
        assert_eq!(v["Service"], "outbox-dispatcher");
        assert_eq!(v["Published"], 12.0);
        assert_eq!(v["OldestPendingAge"], 3.5);
        assert_eq!(v["ClaimLatency"], 2.5);
        assert_eq!(v["stopped"], "empty");
    }

    #[test]
    fn more_than_100_samples_are_spread_over_valid_documents() {
        let samples: Vec<Duration> = (1..=250).map(Duration::from_millis).collect();
        let mut doc = MetricsDocument::new("Outbox", "outbox-dispatcher");
        doc.count("Published", 7)
            .latencies("PublishLatency", &samples);
        let lines = doc.render(SystemTime::now());
        assert_eq!(lines.len(), 3);
        let docs: Vec<Value> = lines.iter().map(|l| parse(l)).collect();
        let mut all = Vec::new();
        for (i, d) in docs.iter().enumerate() {
            let values = d["PublishLatency"].as_array().expect("an array");
            assert!(values.len() <= MAX_VALUES_PER_METRIC);
            all.extend(values.iter().map(|v| v.as_f64().unwrap()));
            // The count goes once, in the first document, or it would be summed three times.
            assert_eq!(d.get("Published").is_some(), i == 0, "document {i}");
            let names: Vec<&str> = d["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["Name"].as_str().unwrap())
                .collect();
            for name in &names {
                assert!(d.get(*name).is_some(), "declared {name} has a value");
            }
        }
        let expected: Vec<f64> = (1..=250).map(f64::from).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn no_samples_no_latency_metric() {
        let mut doc = MetricsDocument::new("Outbox", "projection-sink");
        doc.count("Applied", 0).latencies("ApplyLatency", &[]);
        let lines = doc.render(SystemTime::now());
        let v = parse(&lines[0]);
        assert!(v.get("ApplyLatency").is_none());
        assert_eq!(v["Applied"], 0.0);
    }
}
