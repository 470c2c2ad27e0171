//! A small HTTP load generator for the pipeline benchmark: POSTs one body to one loopback URL,
//! closed loop (`--concurrency` requests in flight, each sent as the last one returns) or open loop
//! (`--rate` requests a second whatever the answers, up to `--max-inflight`), for a fixed time, and
//! prints one JSON object: answers by status, latency percentiles per status, throughput.
//!
//! Written rather than taken from oha or hey because the overload benchmark needs the latency of
//! the 429 answers apart from the 200s, and an open loop that keeps sending at 10x the saturated
//! rate while answers pile up; both tools report one latency distribution for all statuses.
//!
//! ```text
//! cargo run --release -p inferpool-sidecar --example loadgen -- \
//!     --url http://127.0.0.1:8080/api/v1/embed --body photo.jpg --concurrency 64 --seconds 10
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

/// Flags of the load generator.
#[derive(Debug, Parser)]
#[command(about = "POST one body to one loopback URL for a fixed time; answers and latencies by status, as JSON")]
struct Args {
    /// The URL (only loopback addresses are accepted).
    #[arg(long)]
    url: String,
    /// File sent as the body of every request.
    #[arg(long)]
    body: PathBuf,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests in flight (closed loop); ignored with --rate.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per second, sent whatever the answers (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Most requests in flight in an open loop; beyond it a send is skipped and counted.
    #[arg(long, default_value_t = 4096)]
    max_inflight: usize,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Closed loop: after a 429 or 503, wait its Retry-After (plus 0-50% jitter) before the
    /// next request, as docs/sidecar.md asks clients to; without it a refused client retries at once.
    #[arg(long)]
    honor_retry_after: bool,
}

#[derive(Default)]
struct Tally {
    latencies: BTreeMap<String, Vec<f64>>,
    skipped: u64,
}

impl Tally {
    fn add(&mut self, status: String, took: Duration) {
        self.latencies.entry(status).or_default().push(took.as_secs_f64() * 1e3);
    }
}

/// User + system CPU time of this process so far (Linux /proc; None elsewhere), assuming the
/// usual 100 ticks a second.
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: http::Uri = args.url.parse().context("--url")?;
    let host = uri.host().unwrap_or_default();
    anyhow::ensure!(
        host == "localhost" || host == "[::1]" || host.starts_with("127."),
        "--url must point at a loopback address, not {host:?}"
    );
    let body = Bytes::from(std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?);
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').with_context(|| format!("--header {h:?}: expected `Name: value`"))?;
        headers.insert(http::HeaderName::try_from(name.trim())?, http::HeaderValue::try_from(value.trim())?);
    }
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector);
    let send = {
        let (client, uri, headers, body) = (client.clone(), uri.clone(), headers.clone(), body.clone());
        move || {
            let mut req = http::Request::post(uri.clone()).body(Full::new(body.clone()));
            if let Ok(req) = req.as_mut() {
                *req.headers_mut() = headers.clone();
            }
            let client = client.clone();
            async move {
                let started = Instant::now();
                let Ok(req) = req else { return ("request_error".to_owned(), started.elapsed(), None) };
                let mut retry_after = None;
                let status = match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16().to_string();
                        retry_after = resp
                            .headers()
                            .get(http::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok());
                        match resp.into_body().collect().await {
                            Ok(_) => status,
                            Err(_) => "body_error".to_owned(),
                        }
                    }
                    Err(_) => "connect_error".to_owned(),
                };
                (status, started.elapsed(), retry_after)
            }
        }
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let run = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let end = started + run;
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        None => {
            for i in 0..args.concurrency.max(1) {
                let (send, tally, honor) = (send.clone(), Arc::clone(&tally), args.honor_retry_after);
                // A small xorshift for the jitter: this tool needs spread, not statistics.
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let (status, took, retry_after) = send().await;
                        tally.lock().await.add(status, took);
                        if let (true, Some(wait)) = (honor, retry_after) {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            let jitter = 1.0 + 0.5 * (seed % 1000) as f64 / 1000.0;
                            let pause = Duration::from_secs_f64(wait * jitter)
                                .min(end.saturating_duration_since(Instant::now()));
                            tokio::time::sleep(pause).await;
                        }
                    }
                });
            }
        }
        Some(rate) => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let inflight = Arc::new(Semaphore::new(args.max_inflight.max(1)));
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < end {
                ticker.tick().await;
                let Ok(permit) = Arc::clone(&inflight).try_acquire_owned() else {
                    tally.lock().await.skipped += 1;
                    continue;
                };
                let (send, tally) = (send.clone(), Arc::clone(&tally));
                tasks.spawn(async move {
                    let (status, took, _) = send().await;
                    tally.lock().await.add(status, took);
                    drop(permit);
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let mut tally = tally.lock().await;
    let mut by_status = serde_json::Map::new();
    let mut total = 0usize;
    for (status, lat) in tally.latencies.iter_mut() {
        lat.sort_by(f64::total_cmp);
        total += lat.len();
        by_status.insert(
            status.clone(),
            json!({
                "count": lat.len(),
                "per_second": lat.len() as f64 / elapsed,
                "p50_ms": percentile(lat, 0.50),
                "p90_ms": percentile(lat, 0.90),
                "p99_ms": percentile(lat, 0.99),
                "max_ms": lat.last().copied().unwrap_or(0.0),
            }),
        );
    }
    let out = json!({
        "url": args.url,
        "body_bytes": body.len(),
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": args.concurrency,
        "rate": args.rate,
        "seconds": elapsed,
        "requests": total,
        "skipped": tally.skipped,
        "honor_retry_after": args.honor_retry_after,
        "client_cpu_seconds": own_cpu_seconds(),
        "by_status": by_status,
    });
    println!("{out}");
    Ok(())
}
