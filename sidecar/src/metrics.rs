//! Prometheus metrics and the trailing SLA windows, recorded together.
//!
//! Every recording method updates both the Prometheus series (for scraping and Grafana) and the
//! [`Windows`] behind the SLA report, so the two can never disagree about what happened. Label
//! values come from enums, so label sets stay bounded whatever clients send.

use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::labels::{ErrorKind, Tier};
use crate::sla::Windows;

/// Routes as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// POST /api/v1/embed
    Embed,
    /// POST /api/v1/match
    Match,
    /// POST /api/v1/scan
    Scan,
    /// `POST /api/v1/hash`.
    Hash,
    /// PUT|GET|DELETE /api/v1/profiles/{id}
    Profiles,
    /// GET /api/v1/metrics/*
    Reports,
    /// /healthz, /readyz, /live, /ready
    Probes,
    /// GET /metrics
    Metrics,
    /// PUT /api/v1/tuning
    Tuning,
    /// Anything else (404/405).
    Unknown,
}

impl Route {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Embed => "embed",
            Route::Match => "match",
            Route::Scan => "scan",
            Route::Hash => "hash",
            Route::Profiles => "profiles",
            Route::Reports => "reports",
            Route::Probes => "probes",
            Route::Metrics => "metrics",
            Route::Tuning => "tuning",
            Route::Unknown => "unknown",
        }
    }

    /// Whether the route serves model traffic and so counts towards the SLA.
    pub fn is_inference(self) -> bool {
        matches!(self, Route::Embed | Route::Match | Route::Scan | Route::Profiles)
    }

    /// Whether the route takes an image body (POST); the others are read with GET.
    pub fn takes_image(self) -> bool {
        matches!(self, Route::Embed | Route::Match | Route::Scan | Route::Hash)
    }
}

/// Pipeline stages as metric labels: where a request whose deadline passed was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before any work (the deadline was already past when the request was judged).
    Admission,
    /// While waiting for a decoder: never decoded.
    Decode,
    /// While waiting for a batch: decoded, never run through the model.
    Inference,
}

impl Stage {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Admission => "admission",
            Stage::Decode => "decode",
            Stage::Inference => "inference",
        }
    }
}

/// All of the sidecar's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_wait: Histogram,
    inference_duration: Histogram,
    batch_size: Histogram,
    /// Requests waiting in the batch queue.
    pub queue_depth: IntGauge,
    /// Images waiting for a decoder.
    pub decode_queue_depth: IntGauge,
    /// Images being decoded now (at most `decode_workers`).
    pub decode_inflight: IntGauge,
    /// Most images decoded at once since start.
    pub decode_inflight_peak: IntGauge,
    /// Decode threads.
    pub decode_workers: IntGauge,
    decode_seconds: Histogram,
    expired: IntCounterVec,
    refused: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_entries: IntGaugeVec,
    cache_bytes: IntGaugeVec,
    cache_errors: IntCounterVec,
    cache_lookup: HistogramVec,
    cache_circuit: IntGaugeVec,
    /// Requests answered by an inference that another request for the same image started.
    pub cache_coalesced: IntCounter,
    /// Capacity of the memory tier in force, in entries.
    pub cache_memory_capacity: IntGauge,
    cache_pressure: IntCounterVec,
    model_info: IntGaugeVec,
    /// Generation of the tuning in force.
    pub tuning_generation: IntGauge,
    /// Max batch size in force.
    pub tuning_max_batch: IntGauge,
    /// Max batch delay in force, in seconds.
    pub tuning_max_delay: prometheus::Gauge,
    images: IntCounter,
    /// Resident set size of the process, refreshed when `/metrics` is rendered.
    pub resident_memory: IntGauge,
    /// The memory limit in force (configured or the cgroup's), 0 when there is none.
    pub memory_limit: IntGauge,
    /// CPU cores this process may use (the cgroup's quota, else the machine's), for CPU alerts
    /// over `process_cpu_seconds_total`.
    pub cpu_limit: prometheus::Gauge,
    /// Trailing windows for the SLA report.
    pub windows: Windows,
}

/// Cache lookup buckets from 10 µs to 0.5 s.
const CACHE_BUCKETS: &[f64] =
    &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// Latency buckets from 0.5 ms to 10 s; 1.5 s and 2 s are the p95 alert thresholds
/// (charts/inferpool/files/alerts.rules.yaml), so a quantile near them is not interpolated across
/// a wide bucket.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let queue_wait =
            hist("inferpool_queue_wait_seconds", "Time requests waited in the batch queue.", LATENCY_BUCKETS)?;
        let inference_duration =
            hist("inferpool_inference_duration_seconds", "Time one batch spent in the model.", LATENCY_BUCKETS)?;
        let batch_size = hist(
            "inferpool_batch_size",
            "Images per inference batch.",
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
        )?;
        let requests = IntCounterVec::new(
            Opts::new("inferpool_requests_total", "HTTP requests answered, by route and status code."),
            &["route", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new("inferpool_request_duration_seconds", "HTTP request latency, by route.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let queue_depth = IntGauge::new("inferpool_queue_depth", "Requests waiting in the batch queue.")?;
        let decode_queue_depth = IntGauge::new("inferpool_decode_queue_depth", "Images waiting for a decoder.")?;
        let decode_inflight = IntGauge::new("inferpool_decode_inflight", "Images being decoded now.")?;
        let decode_inflight_peak =
            IntGauge::new("inferpool_decode_inflight_peak", "Most images decoded at once since start.")?;
        let decode_workers = IntGauge::new("inferpool_decode_workers", "Decode threads.")?;
        let decode_seconds = hist(
            "inferpool_decode_seconds",
            "Time one image took to decode and resize on one decode thread.",
            LATENCY_BUCKETS,
        )?;
        let expired = IntCounterVec::new(
            Opts::new(
                "inferpool_expired_total",
                "Requests dropped because their deadline passed, by the stage they were waiting for.",
            ),
            &["stage"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "inferpool_admission_refused_total",
                "Requests refused before any decoding (429), by reason: queue_full or overloaded.",
            ),
            &["reason"],
        )?;
        let cache_requests = IntCounterVec::new(
            Opts::new("inferpool_cache_requests_total", "Embedding cache lookups, by tier and result."),
            &["tier", "result"],
        )?;
        let cache_entries =
            IntGaugeVec::new(Opts::new("inferpool_cache_entries", "Entries held, by cache tier."), &["tier"])?;
        let cache_bytes = IntGaugeVec::new(
            Opts::new("inferpool_cache_bytes", "Bytes held, by cache tier (disk: blocks on disk, metadata included)."),
            &["tier"],
        )?;
        let cache_errors = IntCounterVec::new(
            Opts::new(
                "inferpool_cache_errors_total",
                "Cache failures, by tier and kind; requests never fail for them.",
            ),
            &["tier", "kind"],
        )?;
        let cache_lookup = HistogramVec::new(
            HistogramOpts::new("inferpool_cache_lookup_duration_seconds", "Time one cache lookup took, by tier.")
                .buckets(CACHE_BUCKETS.to_vec()),
            &["tier"],
        )?;
        let cache_circuit = IntGaugeVec::new(
            Opts::new(
                "inferpool_cache_circuit_state",
                "Circuit breaker of a remote cache tier: 0 closed (in use), 1 open (skipped), 2 half-open (probing).",
            ),
            &["tier"],
        )?;
        let cache_coalesced = IntCounter::new(
            "inferpool_cache_coalesced_total",
            "Requests answered by an inference another request for the same image had started.",
        )?;
        let cache_memory_capacity =
            IntGauge::new("inferpool_cache_memory_capacity_entries", "Capacity of the memory cache tier in force.")?;
        let cache_pressure = IntCounterVec::new(
            Opts::new("inferpool_cache_pressure_actions_total", "Memory-pressure actions on the memory tier."),
            &["action"],
        )?;
        let model_info = IntGaugeVec::new(
            Opts::new("inferpool_model_info", "The model served: always 1, with its name, variant and provider."),
            &["model", "variant", "provider"],
        )?;
        let tuning_generation = IntGauge::new("inferpool_tuning_generation", "Generation of the tuning in force.")?;
        let tuning_max_batch = IntGauge::new("inferpool_tuning_max_batch_size", "Max batch size in force.")?;
        let tuning_max_delay =
            prometheus::Gauge::new("inferpool_tuning_max_delay_seconds", "Max batching delay in force.")?;
        let images = IntCounter::new("inferpool_images_embedded_total", "Images run through the model.")?;
        let resident_memory =
            IntGauge::new("inferpool_resident_memory_bytes", "Resident set size of the sidecar process.")?;
        let memory_limit = IntGauge::new(
            "inferpool_memory_limit_bytes",
            "Memory limit in force (configured, else the cgroup's); 0 when there is none.",
        )?;
        let cpu_limit = prometheus::Gauge::new(
            "inferpool_cpu_limit_cores",
            "CPU cores the sidecar may use: the cgroup's quota, else the machine's cores.",
        )?;
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(queue_depth.clone()),
            Box::new(decode_queue_depth.clone()),
            Box::new(decode_inflight.clone()),
            Box::new(decode_inflight_peak.clone()),
            Box::new(decode_workers.clone()),
            Box::new(expired.clone()),
            Box::new(refused.clone()),
            Box::new(cache_requests.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_errors.clone()),
            Box::new(cache_lookup.clone()),
            Box::new(cache_circuit.clone()),
            Box::new(cache_coalesced.clone()),
            Box::new(cache_memory_capacity.clone()),
            Box::new(cache_pressure.clone()),
            Box::new(model_info.clone()),
            Box::new(tuning_generation.clone()),
            Box::new(tuning_max_batch.clone()),
            Box::new(tuning_max_delay.clone()),
            Box::new(images.clone()),
            Box::new(resident_memory.clone()),
            Box::new(memory_limit.clone()),
            Box::new(cpu_limit.clone()),
        ] {
            registry.register(c)?;
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, open descriptors and the like.
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            queue_wait,
            inference_duration,
            batch_size,
            queue_depth,
            decode_queue_depth,
            decode_inflight,
            decode_inflight_peak,
            decode_workers,
            decode_seconds,
            expired,
            refused,
            cache_requests,
            cache_entries,
            cache_bytes,
            cache_errors,
            cache_lookup,
            cache_circuit,
            cache_coalesced,
            cache_memory_capacity,
            cache_pressure,
            model_info,
            tuning_generation,
            tuning_max_batch,
            tuning_max_delay,
            images,
            resident_memory,
            memory_limit,
            cpu_limit,
            windows: Windows::default(),
        })
    }

    /// An answered HTTP request. Inference routes also feed the SLA windows, where a 5xx or a 429
    /// (load shed) counts as an error and client mistakes (other 4xx) do not.
    pub fn request(&self, route: Route, code: u16, latency: Duration) {
        self.requests.with_label_values(&[route.as_str(), status_label(code)]).inc();
        self.request_duration.with_label_values(&[route.as_str()]).observe(latency.as_secs_f64());
        if route.is_inference() {
            self.windows.request(Instant::now(), latency, code >= 500 || code == 429);
        }
    }

    /// Time one request waited for its batch.
    pub fn queue_wait(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
        self.windows.queue_wait(Instant::now(), wait);
    }

    /// One image decoded and resized.
    pub fn decoded(&self, took: Duration) {
        self.decode_seconds.observe(took.as_secs_f64());
    }

    /// Images decoded so far.
    pub fn images_decoded(&self) -> u64 {
        self.decode_seconds.get_sample_count()
    }

    /// A request dropped at `stage` because its deadline passed.
    pub fn expired(&self, stage: Stage) {
        self.expired.with_label_values(&[stage.as_str()]).inc();
    }

    /// Requests dropped at `stage` so far.
    pub fn expired_at(&self, stage: Stage) -> u64 {
        self.expired.with_label_values(&[stage.as_str()]).get()
    }

    /// A request refused before any work, for `reason` (`queue_full` or `overloaded`).
    pub fn refused(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Requests refused for `reason` so far.
    pub fn refused_for(&self, reason: &'static str) -> u64 {
        self.refused.with_label_values(&[reason]).get()
    }

    /// A batch run through the model.
    pub fn batch(&self, size: usize, inference: Duration) {
        self.batch_size.observe(size as f64);
        self.inference_duration.observe(inference.as_secs_f64());
        self.images.inc_by(size as u64);
        self.windows.batch(Instant::now(), size, inference);
    }

    /// A lookup in one cache tier: `Some(hit)` when the tier answered, `None` when it was skipped
    /// (circuit open) or failed.
    pub fn cache_lookup(&self, tier: Tier, hit: Option<bool>, took: Duration) {
        let result = match hit {
            Some(true) => "hit",
            Some(false) => "miss",
            None => "skipped",
        };
        self.cache_requests.with_label_values(&[tier.as_str(), result]).inc();
        if hit.is_some() {
            self.cache_lookup.with_label_values(&[tier.as_str()]).observe(took.as_secs_f64());
        }
    }

    /// The outcome of a whole cache lookup for one request, for the SLA windows: the tier that
    /// answered, or `None` for a miss.
    pub fn cache_outcome(&self, answered_by: Option<Tier>) {
        self.windows.cache_lookup(Instant::now(), answered_by);
    }

    /// A failure in one cache tier.
    pub fn cache_error(&self, tier: Tier, kind: ErrorKind) {
        self.cache_error_n(tier, kind, 1);
    }

    /// `n` failures of one kind at once (e.g. corrupt entries found by the disk recovery).
    pub fn cache_error_n(&self, tier: Tier, kind: ErrorKind, n: u64) {
        self.cache_errors.with_label_values(&[tier.as_str(), kind.as_str()]).inc_by(n);
    }

    /// Failures counted so far in one tier and kind.
    pub fn cache_errors(&self, tier: Tier, kind: ErrorKind) -> u64 {
        self.cache_errors.with_label_values(&[tier.as_str(), kind.as_str()]).get()
    }

    /// What one tier holds now.
    pub fn cache_size(&self, tier: Tier, entries: u64, bytes: u64) {
        self.cache_entries.with_label_values(&[tier.as_str()]).set(entries as i64);
        self.cache_bytes.with_label_values(&[tier.as_str()]).set(bytes as i64);
    }

    /// The circuit-breaker state of a remote tier (0 closed, 1 open, 2 half-open).
    pub fn cache_circuit(&self, tier: Tier, state: i64) {
        self.cache_circuit.with_label_values(&[tier.as_str()]).set(state);
    }

    /// A memory-pressure action (`shrink` or `clear`).
    pub fn cache_pressure(&self, action: &'static str) {
        self.cache_pressure.with_label_values(&[action]).inc();
    }

    /// Records which model, variant and provider are served.
    pub fn set_model(&self, model: &str, variant: &str, provider: &str) {
        self.model_info.with_label_values(&[model, variant, provider]).set(1);
    }

    /// Images run through the model since start.
    pub fn images_embedded(&self) -> u64 {
        self.images.get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Status codes as static label values (bounded: anything unexpected is "other").
fn status_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}
