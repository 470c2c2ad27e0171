//! The autoscaler's benchmark (`make bench-autoscaling`, docs/benchmarks/autoscaling.md).
//!
//! The API server double and the kubelet double run in this process; the release
//! `inferpool-operator` runs as a child process against them, as it would against a cluster.
//! - [`scale`]: the operator's cost with many autoscaled pools on fake pods;
//! - [`reaction`]: the time from an SLA breach to a decision and to a ready new replica, with real
//!   sidecars under real load.
//!
//! Raw results go to `--out` as JSON; scripts/bench_autoscaling_report.py writes the report.
//! scripts/bench-autoscaling.sh builds everything and runs both.

mod reaction;
mod scale;
mod support;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde_json::json;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Which parts to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Scale,
    Reaction,
    All,
}

/// Command line of the benchmark.
#[derive(Parser)]
#[command(about = "Benchmarks the operator's autoscaler: cost with many pools, reaction time to an SLA breach")]
pub struct Args {
    /// Directory for the raw results (created).
    #[arg(long)]
    out: PathBuf,
    /// Which parts to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// The release operator binary.
    #[arg(long, default_value = "target/release/inferpool-operator")]
    operator: PathBuf,
    /// The release sidecar binary (the reaction part's pods).
    #[arg(long, default_value = "target/release/inferpool-sidecar")]
    sidecar: PathBuf,
    /// Scale part: pools to create.
    #[arg(long, default_value_t = 100)]
    pools: usize,
    /// Scale part: each pool's autoscaling.intervalSeconds.
    #[arg(long, default_value_t = 2)]
    interval_seconds: u32,
    /// Scale part: how long all pools may take to be Ready.
    #[arg(long, default_value_t = 300)]
    ready_timeout_seconds: u64,
    /// Scale part: wait after all pools are Ready before measuring.
    #[arg(long, default_value_t = 10)]
    settle_seconds: u64,
    /// Scale part: the steady-state window.
    #[arg(long, default_value_t = 60)]
    steady_seconds: u64,
    /// Reaction part: runs, each on a fresh pool.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Reaction part: concurrent closed-loop requests.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Reaction part: the pool's sla.p95LatencyMs.
    #[arg(long, default_value_t = 100)]
    p95_ms: u32,
    /// Reaction part: the pool's replicas.max.
    #[arg(long, default_value_t = 3)]
    max_replicas: u32,
    /// Reaction part: the image sent (JPEG, or PNG by its extension).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Reaction part: how long each step of a run may take.
    #[arg(long, default_value_t = 180)]
    reaction_timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.operator = support::absolute(&args.operator)?;
    args.sidecar = support::absolute(&args.sidecar)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = support::absolute(&args.out)?;

    // The API double logs every request at info as "api"; the counter reads those events, and
    // only warnings and errors reach the terminal.
    let counter = support::ApiCounter::default();
    let api_target =
        tracing_subscriber::filter::Targets::new().with_target("inferpool_tests::apiserver", tracing::Level::INFO);
    let printed = tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::registry()
        .with(counter.clone().with_filter(api_target))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(printed))
        .init();

    let mut results = json!({});
    if matches!(args.part, Part::Scale | Part::All) {
        results["scale"] = scale::run(&args, &out, &counter).await.context("scale part")?;
    }
    if matches!(args.part, Part::Reaction | Part::All) {
        results["reaction"] = reaction::run(&args, &out).await.context("reaction part")?;
    }
    support::write_json(&out.join("results.json"), &results)?;
    eprintln!("raw results in {}", out.display());
    Ok(())
}
