//! The batcher with the fake engine: batch sizes, priorities, deadlines, live tuning.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::FakeEngine;

const SIDE: u32 = 2;

fn preprocessor() -> Arc<Preprocessor> {
    crate::embed::test_preprocessor(SIDE)
}

fn tuning(max_batch_size: u32, max_delay_ms: u32) -> Tuning {
    Tuning { generation: 0, max_batch_size, max_delay_ms, cache_entries: None }
}

fn start(engine: &FakeEngine, t: Tuning, capacity: usize) -> (Batcher, Arc<Metrics>, Arc<ServiceRates>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let rates = Arc::new(ServiceRates::default());
    let b = Batcher::start(
        vec![Box::new(engine.clone())],
        t,
        capacity,
        preprocessor(),
        Arc::clone(&metrics),
        Arc::clone(&rates),
    )
    .unwrap();
    (b, metrics, rates)
}

/// Pixels of a 2x2 image whose every value is `v`.
fn pixels(v: u8) -> Vec<u8> {
    vec![v; 3 * (SIDE * SIDE) as usize]
}

fn later(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Waits (bounded) until the batcher holds `n` requests.
async fn until_depth(b: &Batcher, n: usize) {
    let wait = async {
        while b.depth() != n {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_up_to_the_tuned_size_and_each_caller_gets_its_own_answer() {
    let engine = FakeEngine::new(preprocessor().tensor_len(), 4, Duration::ZERO);
    let (b, _, rates) = start(&engine, tuning(4, 2_000), 64);
    let b = Arc::new(b);
    // 10 requests inside one 2 s window: batches of 4, 4 and (when the window closes) 2.
    let tasks: Vec<_> = (0..10u8)
        .map(|i| {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let slot = b.admit().unwrap();
                b.embed(&slot, pixels(i), Priority::Normal, later(30_000)).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let e = t.await.unwrap().unwrap();
        assert_eq!(e.embedding, vec![f32::from(i as u8); 4], "request {i} got another's answer");
    }
    let mut sizes = engine.sizes.lock().clone();
    sizes.sort_unstable();
    assert_eq!(sizes, [2, 4, 4]);
    assert_eq!(rates.batch_images.get().map(|n| n > 0.0), Some(true), "batches feed the service rates");
}

/// Waits (bounded) until the engine has started `n` batches.
async fn until_entered(engine: &FakeEngine, n: usize) {
    let wait = async {
        while engine.entered.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_requests_run_first() {
    // One image per batch, 300 ms each. While the first runs, the assembler commits the next
    // arrival (low) to the next batch; of the requests still queued, high goes before normal.
    let engine = FakeEngine::new(preprocessor().tensor_len(), 1, Duration::from_millis(300));
    let (b, _, _) = start(&engine, tuning(1, 0), 64);
    let b = Arc::new(b);
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let send = |v: u8, p: Priority| {
        let (b, order) = (Arc::clone(&b), Arc::clone(&order));
        tokio::spawn(async move {
            let slot = b.admit().unwrap();
            let e = b.embed(&slot, pixels(v), p, later(30_000)).await.unwrap();
            order.lock().push(e.embedding[0] as u8);
        })
    };
    let mut tasks = vec![send(0, Priority::Normal)];
    until_entered(&engine, 1).await;
    tasks.push(send(1, Priority::Low));
    // Committed to the next batch: counted ahead even of a high-priority request.
    let committed = async {
        while b.ahead_of(Priority::High) != 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), committed).await.unwrap();
    for (n, (v, p)) in [(2, Priority::Normal), (3, Priority::High)].into_iter().enumerate() {
        tasks.push(send(v, p));
        until_depth(&b, n + 2).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock(), [0, 1, 3, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_request_is_dropped_before_inference() {
    let engine = FakeEngine::new(preprocessor().tensor_len(), 1, Duration::from_millis(300));
    let (b, _, _) = start(&engine, tuning(1, 0), 64);
    let b = Arc::new(b);
    let busy = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let slot = b.admit().unwrap();
            b.embed(&slot, pixels(1), Priority::Normal, later(30_000)).await
        })
    };
    until_entered(&engine, 1).await;
    // Queued behind a 300 ms batch with a 50 ms budget: answered 504, never run.
    let slot = b.admit().unwrap();
    let late = b.embed(&slot, pixels(2), Priority::Normal, later(50)).await;
    assert_eq!(late.unwrap_err(), BatchError::DeadlineExceeded);
    drop(slot);
    busy.await.unwrap().unwrap();
    let slot = b.admit().unwrap();
    b.embed(&slot, pixels(3), Priority::Normal, later(30_000)).await.unwrap();
    assert_eq!(engine.images.load(Ordering::SeqCst), 2, "the expired image never reached the engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_already_past_its_deadline_is_refused_and_counted() {
    let engine = FakeEngine::new(preprocessor().tensor_len(), 1, Duration::ZERO);
    let (b, metrics, _) = start(&engine, tuning(1, 0), 64);
    let slot = b.admit().unwrap();
    let err = b.embed(&slot, pixels(1), Priority::Normal, Instant::now()).await.unwrap_err();
    assert_eq!(err, BatchError::DeadlineExceeded);
    assert_eq!((metrics.expired_at(Stage::Inference), engine.images.load(Ordering::SeqCst)), (1, 0));
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let engine = FakeEngine::new(preprocessor().tensor_len(), 1, Duration::ZERO);
    let (b, _, _) = start(&engine, tuning(8, 0), 2);
    let _a = b.admit().unwrap();
    let _b = b.admit().unwrap();
    assert_eq!(b.admit().err(), Some(BatchError::QueueFull(2)));
}

#[tokio::test]
async fn an_older_tuning_generation_is_refused() {
    let engine = FakeEngine::new(preprocessor().tensor_len(), 1, Duration::ZERO);
    let (b, metrics, _) = start(&engine, tuning(8, 0), 2);
    b.set_tuning(Tuning { generation: 3, ..tuning(2, 1) }).unwrap();
    assert_eq!(b.set_tuning(Tuning { generation: 2, ..tuning(9, 9) }), Err(StaleTuning { current: 3, offered: 2 }));
    assert_eq!((b.tuning().max_batch_size, metrics.tuning_max_batch.get()), (2, 2));
}
