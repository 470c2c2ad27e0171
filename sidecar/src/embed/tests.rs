//! The miss path with the fake engine: admission refuses before decoding, expired requests are
//! never decoded, the decode stage stays within its bound.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::FakeEngine;
use crate::metrics::Stage;
use crate::preprocess::Preprocessor;
use inferpool_crds::Tuning;

fn preprocessor() -> Arc<Preprocessor> {
    crate::embed::test_preprocessor(4)
}

/// A PNG of `side` x `side` pixels of noise (slow enough to decode that workers stay busy).
fn png(side: u32, seed: u32) -> Bytes {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed).to_le_bytes();
        image::Rgb([v[0], v[1], v[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    Bytes::from(out.into_inner())
}

struct Rig {
    stages: Arc<Stages>,
    engine: FakeEngine,
    metrics: Arc<Metrics>,
}

fn rig(decoders: usize, batch_time: Duration, max_batch: u32, max_delay_ms: u32) -> Rig {
    let pre = preprocessor();
    let metrics = Arc::new(Metrics::new().unwrap());
    let rates = Arc::new(ServiceRates::default());
    let engine = FakeEngine::new(pre.tensor_len(), 2, batch_time);
    let tuning = Tuning { generation: 0, max_batch_size: max_batch, max_delay_ms, cache_entries: None };
    let batcher = Batcher::start(
        vec![Box::new(engine.clone())],
        tuning,
        1024,
        Arc::clone(&pre),
        Arc::clone(&metrics),
        Arc::clone(&rates),
    )
    .unwrap();
    let decode = DecodePool::start(decoders, pre, Arc::clone(&metrics), Arc::clone(&rates)).unwrap();
    let stages = Arc::new(Stages::new(decode, batcher, rates, Arc::clone(&metrics)));
    Rig { stages, engine, metrics }
}

fn later(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// One request per image, all with a long deadline; the images are encoded before any is sent,
/// so they reach the stages together.
fn spawn_all(stages: &Arc<Stages>, images: Vec<Bytes>) -> Vec<tokio::task::JoinHandle<Result<Embedded, EmbedError>>> {
    images
        .into_iter()
        .map(|image| {
            let stages = Arc::clone(stages);
            tokio::spawn(async move { stages.compute(image, Priority::Normal, later(120_000)).await })
        })
        .collect()
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let wait = async {
        while !done() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait).await.unwrap_or_else(|_| panic!("timed out: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_queue_cannot_serve_in_time_is_refused_before_decoding() {
    // One image per batch, 200 ms each: the 5 requests below queue up for a second of work.
    let r = rig(1, Duration::from_millis(200), 1, 0);
    let first = r.stages.compute(png(8, 0), Priority::Normal, later(60_000)).await.unwrap();
    assert_eq!(first.batch_size, 1);
    let waiting = spawn_all(&r.stages, (1..=5).map(|i| png(8, i)).collect());
    // All five decoded: one runs for 200 ms, four wait for the model.
    eventually("5 requests decoded and queued for the model", || {
        r.metrics.images_decoded() == 6 && r.stages.load(Priority::Normal).infer_ahead >= 3
    })
    .await;
    let decoded = r.metrics.images_decoded();

    let refused = r.stages.compute(png(8, 99), Priority::Normal, later(300)).await.unwrap_err();
    let EmbedError::Overloaded(o) = &refused else { panic!("{refused:?}") };
    assert!(o.expected > o.budget && o.retry_after >= Duration::from_secs(1), "{o:?}");
    assert_eq!(refused.retry_after(), Some(o.retry_after));
    assert_eq!(r.metrics.images_decoded(), decoded, "a refused request is never decoded");
    assert_eq!(r.metrics.refused_for("overloaded"), 1);

    // A request with a budget the queue can meet is admitted and answered.
    let ok = r.stages.compute(png(8, 100), Priority::Normal, later(60_000)).await;
    assert!(ok.is_ok(), "{ok:?}");
    for w in waiting {
        w.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_queued_a_request_is_admitted_whatever_the_estimate() {
    let r = rig(1, Duration::ZERO, 8, 0);
    // A wildly pessimistic measurement (one 100 s batch) must not lock the server out.
    r.stages.rates.decode.observe(100.0);
    r.stages.rates.batch.observe(100.0);
    r.stages.rates.batch_images.observe(1.0);
    let e = r.stages.compute(png(8, 1), Priority::Normal, later(5_000)).await;
    assert!(e.is_ok(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_deadline_passes_while_waiting_for_a_decoder_is_never_decoded() {
    // One decoder busy with large images; a request behind them with a short budget expires in
    // the queue and is answered 504 without being decoded or inferred.
    let r = rig(1, Duration::ZERO, 8, 0);
    let big = spawn_all(&r.stages, (0..3).map(|i| png(1500, i)).collect());
    eventually("the decoder is busy", || r.stages.decode.ahead_of(Priority::Normal) >= 2).await;
    let late = r.stages.decode.decode(png(8, 7), Priority::Normal, Instant::now() + Duration::from_millis(1)).await;
    assert!(matches!(late, Err(DecodeError::Expired)), "{late:?}");
    for b in big {
        b.await.unwrap().unwrap();
    }
    assert_eq!(r.metrics.expired_at(Stage::Decode), 1);
    assert_eq!(r.metrics.images_decoded(), 3, "only the three large images were decoded");
    assert_eq!(r.engine.images.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_never_exceed_the_decode_bound() {
    let r = rig(2, Duration::ZERO, 16, 1);
    let tasks = spawn_all(&r.stages, (0..24).map(|i| png(600, i)).collect());
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let peak = r.stages.decode.peak_inflight();
    assert!((1..=2).contains(&peak), "{peak} images decoded at once with 2 decoders");
    assert_eq!(r.metrics.decode_inflight_peak.get(), peak as i64);
    assert_eq!(r.metrics.images_decoded(), 24);
}

#[test]
fn pipeline_errors_keep_their_retry_advice() {
    let cases = [
        (EmbedError::QueueFull { capacity: 4, retry_after: Duration::from_secs(3) }, Some(3)),
        (EmbedError::DeadlineExceeded, None),
        (EmbedError::Shared(Arc::new(EmbedError::ShuttingDown)), Some(1)),
    ];
    for (e, want) in cases {
        assert_eq!(e.retry_after().map(|d| d.as_secs()), want, "{e:?}");
    }
}
