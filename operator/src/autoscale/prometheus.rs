//! The optional Prometheus source of the autoscaler (`spec.metrics.prometheus`): one tick's
//! [`Sample`] from instant queries against a Prometheus that scrapes the pool's replicas, instead
//! of reading each replica's SLA report.
//!
//! Every [`PodSample`] figure is one PromQL query over the sidecars' own series (see
//! sidecar/src/metrics.rs), grouped by the pod label. The queries are built by [`Query::promql`], a
//! pure function, and run concurrently; [`assemble`] turns their answers into a [`Sample`] without
//! I/O. Rates and quantiles look back over a window of `N` seconds, `[Ns]`, which must span at least
//! two scrapes (`N >= 2 x` the scrape interval; [`window_seconds`] picks four, so one missed scrape
//! does not blank a tick). docs/autoscaling-prometheus.md says when to use it and what the series
//! must carry.
//!
//! Values: `NaN` (no traffic in the window: a quantile or a ratio over nothing) and absent series
//! count as 0; any other value that is not a finite number is an error. `up == 0` marks a pod as
//! silent (unhealthy, not idle). The resident memory comes from the sidecar's
//! `inferpool_resident_memory_bytes`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use inferpool_crds::pool::PrometheusSource;
use serde::Deserialize;

use super::{PodSample, Sample};
use crate::pods::HttpClient;

/// How long one query may take, connection and body included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The routes whose requests count towards the SLA (as the sidecar's SLA windows count them).
const INFERENCE_ROUTES: &str = "embed|match|scan|profiles";
/// Status codes that count as errors: server failures and load shedding.
const ERROR_CODES: &str = "5..|429";
/// The longest answer body quoted in an error.
const QUOTE_LIMIT: usize = 300;

/// Why a Prometheus tick failed.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// The source's URL cannot be queried.
    #[error("Prometheus URL {url:?} cannot be used: {reason}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection (refused, no route, DNS).
    #[error("Prometheus at {url} is unreachable: {reason}")]
    Unreachable {
        /// Base URL.
        url: String,
        /// The connection error.
        reason: String,
    },
    /// No complete answer within [`TIMEOUT`].
    #[error("Prometheus at {url} did not answer within {:?}", TIMEOUT)]
    Timeout {
        /// Base URL.
        url: String,
    },
    /// Prometheus refused or failed the query (`"status": "error"`): PromQL syntax, a bad selector,
    /// an execution error.
    #[error("Prometheus rejected the query `{query}` ({error_type}): {error}")]
    Query {
        /// The PromQL sent.
        query: String,
        /// Prometheus's `errorType`, e.g. `bad_data`.
        error_type: String,
        /// Prometheus's message.
        error: String,
    },
    /// A status other than 200 without Prometheus's error body (a proxy, the wrong server).
    #[error("{url} answered HTTP {status} to the query `{query}`: {body}")]
    Status {
        /// Base URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The PromQL sent.
        query: String,
        /// The start of the body.
        body: String,
    },
    /// A 200 answer that is not the Prometheus API's JSON.
    #[error("{url} answered the query `{query}` with something that is not Prometheus API JSON ({reason}): {body}")]
    BadJson {
        /// Base URL.
        url: String,
        /// The PromQL sent.
        query: String,
        /// Why it could not be read.
        reason: String,
        /// The start of the body.
        body: String,
    },
    /// A series without the pod label: the scrape configuration does not label series by pod.
    #[error(
        "series of `{query}` lack the pod label {label:?}; relabel the scrape targets so every series names its pod"
    )]
    MissingPodLabel {
        /// The PromQL sent.
        query: String,
        /// The configured `podLabel`.
        label: String,
    },
    /// A value that is neither a number nor `NaN` (e.g. `+Inf`).
    #[error("`{query}` gave {value:?} for pod {pod:?}, which is not a finite number")]
    NotFinite {
        /// The PromQL sent.
        query: String,
        /// The pod.
        pod: String,
        /// The value as Prometheus wrote it.
        value: String,
    },
}

/// One figure of a [`PodSample`] (plus `up`), each answered by one instant query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    /// Whether the last scrape of the pod succeeded (`up`).
    Up,
    /// Inference requests per second over the window.
    Rps,
    /// Inference requests completed in the window.
    Requests,
    /// Share of inference requests that failed (5xx, 429).
    ErrorRate,
    /// 95th percentile request latency, ms.
    P95,
    /// 95th percentile batch-queue wait, ms.
    QueueWaitP95,
    /// 95th percentile inference time of one batch, ms.
    InferenceP95,
    /// Mean images per batch.
    MeanBatchSize,
    /// Share of cache lookups answered by some tier.
    CacheHitRate,
    /// Requests queued now.
    QueueDepth,
    /// Resident memory, bytes.
    Rss,
    /// Tuning generation in force.
    TuningGeneration,
}

impl Figure {
    /// Every figure, in query order.
    pub const ALL: [Figure; 12] = [
        Figure::Up,
        Figure::Rps,
        Figure::Requests,
        Figure::ErrorRate,
        Figure::P95,
        Figure::QueueWaitP95,
        Figure::InferenceP95,
        Figure::MeanBatchSize,
        Figure::CacheHitRate,
        Figure::QueueDepth,
        Figure::Rss,
        Figure::TuningGeneration,
    ];
}

/// What the queries of one pool share: its selector, the pod label and the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    /// Label matchers without braces (may be empty).
    pub selector: &'a str,
    /// The label that names the pod.
    pub pod_label: &'a str,
    /// The rate and quantile window, seconds.
    pub window_seconds: u32,
}

impl Query<'_> {
    /// The PromQL text of one figure.
    pub fn promql(&self, figure: Figure) -> String {
        let by = self.pod_label;
        let w = self.window_seconds;
        let inference = format!("route=~\"{INFERENCE_ROUTES}\"");
        let requests = self.series("inferpool_requests_total", &[&inference]);
        let quantile =
            |bucket: String| format!("histogram_quantile(0.95, sum by ({by}, le) (rate({bucket}[{w}s]))) * 1000");
        match figure {
            Figure::Up => format!("max by ({by}) ({})", self.series("up", &[])),
            Figure::Rps => format!("sum by ({by}) (rate({requests}[{w}s]))"),
            Figure::Requests => format!("sum by ({by}) (increase({requests}[{w}s]))"),
            Figure::ErrorRate => format!(
                "sum by ({by}) (rate({}[{w}s])) / sum by ({by}) (rate({requests}[{w}s]))",
                self.series("inferpool_requests_total", &[&inference, &format!("code=~\"{ERROR_CODES}\"")]),
            ),
            Figure::P95 => quantile(self.series("inferpool_request_duration_seconds_bucket", &[&inference])),
            Figure::QueueWaitP95 => quantile(self.series("inferpool_queue_wait_seconds_bucket", &[])),
            Figure::InferenceP95 => quantile(self.series("inferpool_inference_duration_seconds_bucket", &[])),
            Figure::MeanBatchSize => format!(
                "sum by ({by}) (rate({}[{w}s])) / sum by ({by}) (rate({}[{w}s]))",
                self.series("inferpool_batch_size_sum", &[]),
                self.series("inferpool_batch_size_count", &[]),
            ),
            // Every lookup starts in the memory tier (hit or miss), and a request is answered by at
            // most one tier: hits in any tier over memory-tier lookups, as the SLA report counts.
            Figure::CacheHitRate => format!(
                "sum by ({by}) (rate({}[{w}s])) / sum by ({by}) (rate({}[{w}s]))",
                self.series("inferpool_cache_requests_total", &["result=\"hit\""]),
                self.series("inferpool_cache_requests_total", &["tier=\"memory\""]),
            ),
            Figure::QueueDepth => format!("max by ({by}) ({})", self.series("inferpool_queue_depth", &[])),
            Figure::Rss => format!("max by ({by}) ({})", self.series("inferpool_resident_memory_bytes", &[])),
            Figure::TuningGeneration => {
                format!("max by ({by}) ({})", self.series("inferpool_tuning_generation", &[]))
            }
        }
    }

    /// `metric{selector,extra...}`, leaving out empty parts.
    fn series(&self, metric: &str, extra: &[&str]) -> String {
        let matchers: Vec<&str> =
            std::iter::once(self.selector.trim()).chain(extra.iter().copied()).filter(|m| !m.is_empty()).collect();
        format!("{metric}{{{}}}", matchers.join(","))
    }
}

/// The selector of a pool's series: the source's own, or `namespace="<ns>",pod=~"<pool>-.*"`.
pub fn selector(source: &PrometheusSource, namespace: &str, pool: &str) -> String {
    match &source.selector {
        Some(s) => s.clone(),
        None => format!("namespace=\"{namespace}\",{}=~\"{pool}-.*\"", source.pod_label),
    }
}

/// The window for a scrape interval: four scrapes (two is the least a rate needs), at least 2 s.
pub fn window_seconds(scrape_interval: Duration) -> u32 {
    let scrape = u32::try_from(scrape_interval.as_secs()).unwrap_or(u32::MAX);
    let scrape = if scrape_interval.subsec_nanos() > 0 { scrape.saturating_add(1) } else { scrape };
    scrape.saturating_mul(4).max(2)
}

/// One tick of the pool selected by `selector` (see [`selector`]), from the Prometheus at
/// `source.url`, looking back `window_seconds`; `at` becomes [`Sample::at`].
pub async fn sample(
    client: &HttpClient,
    source: &PrometheusSource,
    selector: &str,
    window_seconds: u32,
    at: f64,
) -> Result<Sample, PrometheusError> {
    let base = base_url(&source.url)?;
    let query = Query { selector, pod_label: &source.pod_label, window_seconds };
    let answers = futures::future::try_join_all(Figure::ALL.iter().map(|&figure| {
        let promql = query.promql(figure);
        let base = base.as_str();
        async move { instant(client, base, &promql).await.map(|vector| (figure, promql, vector)) }
    }))
    .await?;
    assemble(&source.pod_label, answers, at)
}

/// The answer to one query: its series' labels and value text.
pub type Vector = Vec<(BTreeMap<String, String>, String)>;

/// Builds the sample from each figure's query and answer (pure; see the module docs for values).
pub fn assemble(pod_label: &str, answers: Vec<(Figure, String, Vector)>, at: f64) -> Result<Sample, PrometheusError> {
    let mut figures: BTreeMap<String, BTreeMap<Figure, f64>> = BTreeMap::new();
    for (figure, query, vector) in answers {
        for (labels, text) in vector {
            let Some(pod) = labels.get(pod_label).filter(|p| !p.is_empty()) else {
                return Err(PrometheusError::MissingPodLabel { query, label: pod_label.to_owned() });
            };
            let value = match text.parse::<f64>() {
                Ok(v) if v.is_nan() => 0.0,
                Ok(v) if v.is_finite() => v,
                _ => return Err(PrometheusError::NotFinite { query, pod: pod.clone(), value: text }),
            };
            figures.entry(pod.clone()).or_default().insert(figure, value);
        }
    }
    let mut sample = Sample { at, ..Sample::default() };
    for (pod, f) in figures {
        let get = |figure| f.get(&figure).copied().unwrap_or(0.0);
        let count = |figure| get(figure).max(0.0).round() as u64;
        // A pod Prometheus could not scrape last time is silent, whatever older series say.
        if f.get(&Figure::Up) == Some(&0.0) {
            sample.silent += 1;
            continue;
        }
        sample.pods.push(PodSample {
            rps: get(Figure::Rps),
            requests: count(Figure::Requests),
            error_rate: get(Figure::ErrorRate),
            p95_ms: get(Figure::P95),
            queue_wait_p95_ms: get(Figure::QueueWaitP95),
            inference_p95_ms: get(Figure::InferenceP95),
            mean_batch_size: get(Figure::MeanBatchSize),
            cache_hit_rate: get(Figure::CacheHitRate),
            queue_depth: count(Figure::QueueDepth),
            rss_bytes: count(Figure::Rss),
            tuning_generation: count(Figure::TuningGeneration),
            // Every inference request looks the cache up first (unless it asked not to): the
            // request count stands in for the lookup count the SLA report has.
            cache_lookups: count(Figure::Requests),
            pod,
        });
    }
    Ok(sample)
}

/// The configured URL without a trailing slash, checked to be plain HTTP.
fn base_url(url: &str) -> Result<String, PrometheusError> {
    let bad = |reason: &str| PrometheusError::Url { url: url.to_owned(), reason: reason.to_owned() };
    let base = url.trim_end_matches('/');
    if base.starts_with("https://") {
        return Err(bad("https is not supported yet; use Prometheus's plain-HTTP service address"));
    }
    if !base.starts_with("http://") {
        return Err(bad("it must start with http://"));
    }
    let uri: http::Uri = base.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.query().is_some() {
        return Err(bad("it must not carry a query string"));
    }
    Ok(base.to_owned())
}

/// Runs one instant query (`GET <base>/api/v1/query?query=...`) at Prometheus's current time.
async fn instant(client: &HttpClient, base: &str, promql: &str) -> Result<Vector, PrometheusError> {
    let target = format!("{base}/api/v1/query?query={}", encode(promql));
    let request = Request::get(&target)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| PrometheusError::Url { url: base.to_owned(), reason: e.to_string() })?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| PrometheusError::Unreachable { url: base.to_owned(), reason: error_chain(&e) })?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| PrometheusError::Unreachable {
            url: base.to_owned(),
            reason: format!("the answer broke off: {e}"),
        })?;
        Ok((status, body.to_bytes()))
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| PrometheusError::Timeout { url: base.to_owned() })??;
    parse(base, promql, status, &body)
}

/// The API's envelope: `{"status": "success", "data": {...}}` or `{"status": "error", ...}`.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType", default)]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    value: (serde_json::Value, String),
}

/// Reads one answer; Prometheus's own error body wins over the HTTP status (it uses 400, 422, 503).
fn parse(base: &str, promql: &str, status: StatusCode, body: &[u8]) -> Result<Vector, PrometheusError> {
    let envelope = serde_json::from_slice::<Envelope>(body);
    if let Ok(e) = &envelope
        && e.status == "error"
    {
        return Err(PrometheusError::Query {
            query: promql.to_owned(),
            error_type: e.error_type.clone(),
            error: e.error.clone(),
        });
    }
    if status != StatusCode::OK {
        return Err(PrometheusError::Status {
            url: base.to_owned(),
            status: status.as_u16(),
            query: promql.to_owned(),
            body: quote(body),
        });
    }
    let bad = |reason: String| PrometheusError::BadJson {
        url: base.to_owned(),
        query: promql.to_owned(),
        reason,
        body: quote(body),
    };
    let envelope = envelope.map_err(|e| bad(e.to_string()))?;
    let data = match envelope.data {
        Some(data) if envelope.status == "success" => data,
        _ => return Err(bad(format!("status {:?} without data", envelope.status))),
    };
    if data.result_type != "vector" {
        return Err(bad(format!("a {} instead of an instant vector", data.result_type)));
    }
    let series: Vec<Series> = serde_json::from_value(data.result).map_err(|e| bad(e.to_string()))?;
    Ok(series.into_iter().map(|s| (s.metric, s.value.1)).collect())
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The start of a body, as text, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An error with its causes (hyper's legacy client hides the useful part in the source chain).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests;
