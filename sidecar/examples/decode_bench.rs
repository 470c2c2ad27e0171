//! The decode limit: how many JPEGs a second decode + resize to the model input can do, without
//! HTTP, on every usable core, for each candidate decoder. `scripts/bench-pipeline.sh` runs it.
//!
//! Candidates, each ending in the sidecar's own resize to the card's input size:
//! - `image-full`: the `image` crate (zune-jpeg) at full size, the sidecar's decoder before
//!   reduced decoding (`--jpeg-decode full`);
//! - `turbo-reduced`: libjpeg-turbo at the smallest DCT scale that covers the input, the
//!   sidecar's default (`--jpeg-decode reduced`);
//! - `turbo-full`: libjpeg-turbo at full size (what the library alone is worth);
//! - `jpeg-decoder-scaled`: the pure-Rust `jpeg-decoder` crate's scaled decode.
//!
//! Correctness: each candidate's resized pixels against `image-full`'s (mean and largest
//! absolute difference, 0-255). Prints one JSON object.
//!
//! ```text
//! cargo run --release -p inferpool-sidecar --example decode_bench -- --image a.jpg --image b.jpg
//! ```

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use inferpool_sidecar::model::LoadedCard;
use inferpool_sidecar::preprocess::{JpegDecode, Preprocessor};
use serde_json::json;

/// Flags of the decode benchmark.
#[derive(Debug, Parser)]
#[command(about = "JPEG decode + resize throughput per decoder on all usable cores, as JSON")]
struct Args {
    /// JPEG files to decode (repeatable).
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// Model card whose input size the images are resized to. Default: the model `make setup` prepares.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seconds per decoder and image.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Threads; 0 = the CPUs the process may use.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

const DECODERS: [&str; 4] = ["image-full", "turbo-reduced", "turbo-full", "jpeg-decoder-scaled"];

/// Decodes and resizes `bytes` with `decoder` to the card's input: packed RGB8.
fn run(decoder: &str, full: &Preprocessor, reduced: &Preprocessor, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    Ok(match decoder {
        "image-full" => full.prepare_pixels(bytes)?,
        "turbo-reduced" => reduced.prepare_pixels(bytes)?,
        "turbo-full" => {
            let img = turbojpeg::decompress(bytes, turbojpeg::PixelFormat::RGB)?;
            full.resize_rgb(img.width as u32, img.height as u32, img.pixels)?
        }
        "jpeg-decoder-scaled" => {
            let (w, h) = full.input_size();
            let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
            d.read_info()?;
            let (sw, sh) = d.scale(w as u16, h as u16)?;
            let pixels = d.decode()?;
            anyhow::ensure!(pixels.len() == 3 * sw as usize * sh as usize, "not an RGB JPEG");
            full.resize_rgb(u32::from(sw), u32::from(sh), pixels)?
        }
        other => anyhow::bail!("unknown decoder {other}"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let model = args
        .model
        .clone()
        .or_else(|| Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/effnet_lite0/card.json")))
        .context("no --model")?;
    let card = LoadedCard::load(&model).with_context(|| format!("loading {}", model.display()))?;
    let base = Preprocessor::new(card.card.input.clone(), 100_000_000);
    let full = base.clone().with_jpeg_decode(JpegDecode::Full);
    let reduced = base.with_jpeg_decode(JpegDecode::Reduced);
    let mut results = Vec::new();
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let header = turbojpeg::read_header(&bytes).with_context(|| format!("{}: not a JPEG", path.display()))?;
        let reference = run("image-full", &full, &reduced, &bytes)?;
        for decoder in DECODERS {
            let pixels = run(decoder, &full, &reduced, &bytes)?;
            let diffs: Vec<f64> =
                pixels.iter().zip(&reference).map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs()).collect();
            let mean_diff = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
            let max_diff = diffs.iter().copied().fold(0.0, f64::max);
            let count = AtomicU64::new(0);
            let window = Duration::from_secs_f64(args.seconds);
            let started = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        while started.elapsed() < window {
                            if run(decoder, &full, &reduced, &bytes).is_ok() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let elapsed = started.elapsed().as_secs_f64();
            let images = count.load(Ordering::Relaxed);
            eprintln!(
                "decode_bench: {} {}x{} {decoder}: {:.1} images/s",
                path.display(),
                header.width,
                header.height,
                images as f64 / elapsed
            );
            results.push(json!({
                "image": path.display().to_string(),
                "width": header.width,
                "height": header.height,
                "bytes": bytes.len(),
                "decoder": decoder,
                "threads": threads,
                "images_per_second": images as f64 / elapsed,
                "ms_per_image_per_thread": elapsed * 1e3 * threads as f64 / images.max(1) as f64,
                "mean_abs_diff_vs_image_full": mean_diff,
                "max_abs_diff_vs_image_full": max_diff,
            }));
        }
    }
    println!("{}", json!({"threads": threads, "seconds": args.seconds, "results": results}));
    Ok(())
}
