//! Raw engine throughput, without HTTP: the ceiling that `scripts/bench-sidecar.sh` compares the
//! sidecar against.
//!
//! One real image is preprocessed once (so the tensor holds realistic values), copied into a batch
//! of the size the sidecar runs at saturation, and fed to one [`OnnxEngine`] over and over for a fixed
//! time after a warm-up. Separately, the same image is decoded, resized and normalised in a loop on
//! one thread, which is the CPU each HTTP request costs before it reaches the batcher. Both numbers
//! go to stdout as one JSON object.
//!
//! ```text
//! cargo run --release -p inferpool-sidecar --example engine_bench -- --image photo.jpg --batch 16
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use inferpool_sidecar::config::ProviderChoice;
use inferpool_sidecar::engine::{EngineOptions, OnnxEngine};
use inferpool_sidecar::model::{LoadedCard, Optimization};
use inferpool_sidecar::preprocess::Preprocessor;
use serde_json::json;

/// Flags of the engine benchmark.
#[derive(Debug, Parser)]
#[command(about = "Raw ONNX engine throughput and per-image preprocessing cost, as JSON")]
struct Args {
    /// The image fed to the model (decoded once; its tensor fills every batch slot).
    #[arg(long)]
    image: PathBuf,
    /// Model card, or a directory holding card.json. Default: the model `make setup` prepares.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images per inference call (the sidecar's default --max-batch is 16).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Intra-op threads; 0 = the CPUs available, as the sidecar resolves it with one session.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Speed | Balanced | Accuracy | Memory, as the sidecar's --optimization.
    #[arg(long, default_value = "Balanced")]
    optimization: Optimization,
    /// Seconds of untimed batches before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup_seconds: f64,
    /// Seconds of timed batches.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Seconds of timed preprocessing (decode + resize + normalise, one thread).
    #[arg(long, default_value_t = 5.0)]
    preprocess_seconds: f64,
    /// Largest image accepted, in pixels (the sidecar's default --max-pixels).
    #[arg(long, default_value_t = 40_000_000)]
    max_pixels: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let threads = (args.threads > 0).then_some(args.threads);
    let model =
        args.model.clone().or_else(default_model).context("no --model and no default model; run `make setup`")?;
    let card = LoadedCard::load(&model).with_context(|| format!("loading {}", model.display()))?;
    let bytes = std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let preprocessor = Preprocessor::new(card.card.input.clone(), args.max_pixels);
    let tensor = preprocessor.prepare(&bytes).context("preprocessing the image")?;

    // Preprocessing first, while nothing else runs: the ONNX Runtime thread pool spins for a
    // while after each call and would share the CPU with this loop.
    let pre = time_loop(Duration::from_secs_f64(args.preprocess_seconds), || {
        preprocessor.prepare(&bytes).map(drop).context("preprocessing the image")
    })?;

    let opts = EngineOptions {
        library: None,
        provider: ProviderChoice::Auto,
        optimization: args.optimization,
        threads,
        sessions: 1,
    };
    let mut engine = OnnxEngine::load(&card, &opts).context("loading the model")?;
    let batch: Vec<f32> = tensor.iter().copied().cycle().take(tensor.len() * args.batch).collect();
    let mut run = || engine.run(batch.clone(), args.batch).map(drop).context("inference");
    time_loop(Duration::from_secs_f64(args.warmup_seconds), &mut run)?;
    let cpu_before = process_cpu_seconds();
    let inference = time_loop(Duration::from_secs_f64(args.seconds), &mut run)?;
    let cpu_used = process_cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    let images = (inference.calls * args.batch) as f64;

    let report = json!({
        "images_per_s": images / inference.elapsed,
        "batch": args.batch,
        "threads": threads,
        "ms_per_batch_p50": inference.percentile_ms(0.50),
        "ms_per_batch_p95": inference.percentile_ms(0.95),
        "ms_per_batch_mean": inference.elapsed * 1e3 / inference.calls as f64,
        "batches": inference.calls,
        "seconds": inference.elapsed,
        "cpu_seconds_per_image": cpu_used.map(|c| c / images),
        "preprocess_ms_per_image_p50": pre.percentile_ms(0.50),
        "preprocess_ms_per_image_mean": pre.elapsed * 1e3 / pre.calls as f64,
        "preprocess_images": pre.calls,
        "image": {
            "path": args.image.display().to_string(),
            "bytes": bytes.len(),
            "width_height": image_size(&bytes),
        },
        "model": card.card.name,
        "variant": engine.variant().as_str(),
        "provider": engine.provider().as_str(),
        "optimization": format!("{:?}", args.optimization),
    });
    println!("{report}");
    Ok(())
}

/// Durations of the calls made by [`time_loop`].
struct Timings {
    calls: usize,
    elapsed: f64,
    each: Vec<Duration>,
}

impl Timings {
    /// The `q` quantile of the call durations, in milliseconds (nearest rank).
    fn percentile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.each.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }
}

/// Calls `f` until `budget` has passed (at least once) and times every call.
fn time_loop(budget: Duration, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Timings> {
    let started = Instant::now();
    let mut each = Vec::new();
    loop {
        let call = Instant::now();
        f()?;
        each.push(call.elapsed());
        if started.elapsed() >= budget {
            break;
        }
    }
    Ok(Timings { calls: each.len(), elapsed: started.elapsed().as_secs_f64(), each })
}

/// User plus system CPU time of this process so far, from `/proc/self/stat` (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of stat(5), in USER_HZ ticks, which Linux fixes at 100.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// Width and height of the encoded image, for the report.
fn image_size(bytes: &[u8]) -> Option<[u32; 2]> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.into_dimensions().ok().map(|(w, h)| [w, h])
}

/// `models/effnet_lite0/card.json` under the working directory or the checkout.
fn default_model() -> Option<PathBuf> {
    let rel = Path::new("models/effnet_lite0/card.json");
    let root = inferpool_sidecar::config::source_root().map(|r| r.join(rel));
    [Some(rel.to_path_buf()), root].into_iter().flatten().find(|p| p.exists())
}
