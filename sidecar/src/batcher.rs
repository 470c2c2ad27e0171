//! The dynamic batcher: many concurrent requests, few large inference calls.
//!
//! Requests wait in a bounded queue with three priority lanes. Each model session has its own OS
//! thread (inference is CPU/GPU-bound and must not block the async reactor); the thread takes the
//! oldest highest-priority request, then keeps filling the batch until it holds `max_batch_size`
//! images or the first request has waited `max_delay_ms`, whichever comes first. Under load the
//! queue is never empty, so batches fill at once and no time is spent waiting. Both limits come
//! from the live [`Tuning`] and can change at any moment without a restart.
//!
//! Admission comes first: a caller takes a [`Slot`] before it decodes anything, and holds it until
//! its answer arrives or it gives up. When all `capacity` slots are taken the request is refused at
//! once (429), so overload costs neither decoding nor unbounded latency. A request whose deadline
//! has passed, or whose caller has gone away, is answered or dropped when it is taken from the
//! queue and never runs. (Skipping requests that an estimate says *would* miss their deadline was
//! tried and removed: one slow batch, such as a GPU's first run of a new batch size, inflated the
//! estimate until every request was refused and no batch ran to correct it.)

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use inferpool_crds::Tuning;
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};

use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::preprocess::Preprocessor;

/// Request priority, from the `X-Priority` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Served before everything else.
    High = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Served when nothing else waits.
    Low = 2,
}

/// One embedding out of a batch, with where its time went.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The model's output for this image.
    pub embedding: Vec<f32>,
    /// Time spent waiting in the queue.
    pub queue_wait: Duration,
    /// Time the whole batch spent in the model.
    pub inference: Duration,
    /// Images in the batch this one ran in.
    pub batch_size: usize,
}

/// Why a request got no embedding.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// Every admission slot is taken.
    #[error("the inference queue is full ({0} requests admitted)")]
    QueueFull(usize),
    /// The batcher no longer accepts work.
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    /// The deadline passed before the embedding was ready.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The model failed on the batch.
    #[error("inference failed: {0}")]
    Engine(String),
}

/// A tuning push with an older generation than the one in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tuning generation {offered} is older than generation {current} in force")]
pub struct StaleTuning {
    /// Generation in force.
    pub current: u64,
    /// Generation offered.
    pub offered: u64,
}

struct Job {
    /// Resized RGB8 pixels; normalised when the batch is assembled (4x smaller while queued).
    pixels: Vec<u8>,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Embedded, BatchError>>,
}

struct State {
    lanes: [VecDeque<Job>; 3],
    /// Jobs not yet running: queued (abandoned ones included until they are dropped), or in a
    /// batch that is still filling.
    len: usize,
    tuning: Tuning,
    closed: bool,
}

impl State {
    fn pop(&mut self) -> Option<Job> {
        self.lanes.iter_mut().find_map(VecDeque::pop_front)
    }

    /// Drops the queued jobs whose callers have given up.
    fn prune(&mut self) {
        for lane in &mut self.lanes {
            let before = lane.len();
            lane.retain(|job| !job.reply.is_closed());
            self.len -= before - lane.len();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    /// Admission: one permit per request between admission and its answer.
    slots: Semaphore,
    /// Normalises queued pixels into the model's input as a batch is assembled.
    preprocessor: Arc<Preprocessor>,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock left the queue consistent (every
        // mutation is a single push/pop), so the state is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_depth(&self, state: &State) {
        self.metrics.queue_depth.set(state.len as i64);
    }
}

/// Proof of admission: held from before decoding until the answer (or giving up).
pub struct Slot<'a>(#[allow(dead_code)] SemaphorePermit<'a>);

/// The batch queue and its worker threads.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts one worker thread per engine and returns once each has warmed its engine up.
    ///
    /// The warm-up runs on the worker thread itself, the thread that will run every batch, so
    /// that whatever the execution provider keeps per thread (CUDA handles and caches) is warm
    /// before the sidecar reports ready.
    pub fn start(
        engines: Vec<Engine>,
        tuning: Tuning,
        capacity: usize,
        preprocessor: Arc<Preprocessor>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { lanes: Default::default(), len: 0, tuning, closed: false }),
            wake: Condvar::new(),
            capacity,
            slots: Semaphore::new(capacity),
            preprocessor,
            metrics,
        });
        publish_tuning(&shared.metrics, &tuning);
        let (warmed_tx, warmed) = std::sync::mpsc::channel();
        let mut workers = Vec::with_capacity(engines.len());
        for (i, mut engine) in engines.into_iter().enumerate() {
            let (shared, warmed_tx) = (Arc::clone(&shared), warmed_tx.clone());
            let max_batch = tuning.max_batch_size as usize;
            let spawned = std::thread::Builder::new().name(format!("inferpool-session-{i}")).spawn(move || {
                let started = Instant::now();
                let result = engine.warm_up(max_batch);
                tracing::info!(session = i, ms = started.elapsed().as_millis() as u64, max_batch, "session warmed up");
                let ok = result.is_ok();
                let _ = warmed_tx.send(result);
                if ok {
                    worker(&shared, engine);
                }
            });
            workers.push(spawned.map_err(|e| EngineError::Mismatch(format!("cannot start a session thread: {e}")))?);
        }
        drop(warmed_tx);
        let batcher = Batcher { shared, workers: Mutex::new(workers) };
        // Every worker answers exactly once; a closed channel means one died before answering.
        for _ in 0..batcher.workers.lock().unwrap_or_else(|p| p.into_inner()).len() {
            warmed.recv().map_err(|_| EngineError::Mismatch("a session thread died while warming up".into()))??;
        }
        Ok(batcher)
    }

    /// Admits one request, or refuses it at once when every slot is taken.
    pub fn admit(&self) -> Result<Slot<'_>, BatchError> {
        self.shared.slots.try_acquire().map(Slot).map_err(|_| BatchError::QueueFull(self.shared.capacity))
    }

    /// Queues one image of an admitted request, as resized pixels from
    /// [`Preprocessor::prepare_pixels`], and waits for its embedding until `deadline`.
    pub async fn embed(
        &self,
        _slot: &Slot<'_>,
        pixels: Vec<u8>,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Embedded, BatchError> {
        let rx = self.submit(pixels, priority, deadline)?;
        // The receiver is dropped when this statement ends, which marks the job abandoned.
        let outcome = tokio::time::timeout_at(deadline.into(), rx).await;
        match outcome {
            Ok(Ok(result)) => result,
            // The worker dropped the job without answering: only happens when it stopped.
            Ok(Err(_)) => Err(BatchError::ShuttingDown),
            Err(_) => {
                // Let a worker filling a batch release the abandoned job's queue slot now.
                self.shared.wake.notify_all();
                Err(BatchError::DeadlineExceeded)
            }
        }
    }

    fn submit(
        &self,
        pixels: Vec<u8>,
        priority: Priority,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<Embedded, BatchError>>, BatchError> {
        let now = Instant::now();
        if deadline <= now {
            return Err(BatchError::DeadlineExceeded);
        }
        let (reply, rx) = oneshot::channel();
        let mut state = self.shared.lock();
        if state.closed {
            return Err(BatchError::ShuttingDown);
        }
        // Abandoned jobs wait in the queue until a worker reaches them; under sustained overload
        // sweep them out so that they cannot pile up beyond the live ones.
        if state.len >= 2 * self.shared.capacity {
            state.prune();
        }
        state.lanes[priority as usize].push_back(Job { pixels, enqueued: now, deadline, reply });
        state.len += 1;
        self.shared.publish_depth(&state);
        drop(state);
        self.shared.wake.notify_one();
        Ok(rx)
    }

    /// The tuning in force.
    pub fn tuning(&self) -> Tuning {
        self.shared.lock().tuning
    }

    /// Applies a tuning at once (the next batch uses it); refuses an older generation.
    pub fn set_tuning(&self, tuning: Tuning) -> Result<(), StaleTuning> {
        let mut state = self.shared.lock();
        if tuning.generation < state.tuning.generation {
            return Err(StaleTuning { current: state.tuning.generation, offered: tuning.generation });
        }
        state.tuning = tuning;
        drop(state);
        publish_tuning(&self.shared.metrics, &tuning);
        // A worker filling a batch re-reads the limits when woken.
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.shared.lock().len
    }

    /// Stops accepting work; queued requests still run. Returns once every worker has finished.
    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn publish_tuning(metrics: &Metrics, tuning: &Tuning) {
    metrics.tuning_generation.set(tuning.generation as i64);
    metrics.tuning_max_batch.set(i64::from(tuning.max_batch_size));
    metrics.tuning_max_delay.set(f64::from(tuning.max_delay_ms) / 1e3);
}

/// A session thread: take a batch, run it, answer, repeat until closed and drained.
fn worker(shared: &Shared, mut engine: Engine) {
    while let Some(batch) = next_batch(shared) {
        run_batch(shared, &mut engine, batch);
    }
}

/// Waits for work and collects the next batch; `None` once closed and empty.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let mut state = shared.lock();
    let mut batch: Vec<Job> = Vec::new();
    let mut window_end = None;
    loop {
        // Callers that gave up while the batch filled need no inference.
        let before = batch.len();
        batch.retain(|job| !job.reply.is_closed());
        state.len -= before - batch.len();
        if batch.is_empty() {
            window_end = None;
        }
        let max = state.tuning.max_batch_size as usize;
        while batch.len() < max {
            let Some(job) = state.pop() else { break };
            match still_wanted(job) {
                Some(job) => {
                    window_end
                        .get_or_insert(job.enqueued + Duration::from_millis(u64::from(state.tuning.max_delay_ms)));
                    batch.push(job);
                }
                None => state.len -= 1,
            }
        }
        shared.publish_depth(&state);
        let now = Instant::now();
        match window_end {
            Some(end) if batch.len() >= max || now >= end || state.closed => {
                state.len -= batch.len();
                shared.publish_depth(&state);
                return Some(batch);
            }
            Some(end) => state = shared.wake.wait_timeout(state, end - now).unwrap_or_else(|p| p.into_inner()).0,
            None if state.closed => return None,
            None => state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// Keeps a job only if its caller still waits and its deadline has not passed; an expired job is
/// answered 504 at once.
fn still_wanted(job: Job) -> Option<Job> {
    if job.reply.is_closed() {
        return None;
    }
    if Instant::now() >= job.deadline {
        let _ = job.reply.send(Err(BatchError::DeadlineExceeded));
        return None;
    }
    Some(job)
}

fn run_batch(shared: &Shared, engine: &mut Engine, batch: Vec<Job>) {
    let n = batch.len();
    let started = Instant::now();
    let per_image = shared.preprocessor.tensor_len();
    let mut input = vec![0.0f32; n * per_image];
    let mut replies = Vec::with_capacity(n);
    for (job, slot) in batch.into_iter().zip(input.chunks_exact_mut(per_image)) {
        shared.preprocessor.normalize_into(&job.pixels, slot);
        let wait = started.duration_since(job.enqueued);
        shared.metrics.queue_wait(wait);
        replies.push((job.reply, wait));
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(input, n)))
        .unwrap_or_else(|_| Err(crate::engine::EngineError::Mismatch("the engine panicked".into())));
    let inference = started.elapsed();
    match result {
        Ok(output) => {
            shared.metrics.batch(n, inference);
            for ((reply, queue_wait), embedding) in replies.into_iter().zip(output) {
                let _ = reply.send(Ok(Embedded { embedding, queue_wait, inference, batch_size: n }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batch = n, "inference failed");
            for (reply, _) in replies {
                let _ = reply.send(Err(BatchError::Engine(e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tag: u8) -> (Job, oneshot::Receiver<Result<Embedded, BatchError>>) {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        (Job { pixels: vec![tag], enqueued: now, deadline: now + Duration::from_secs(60), reply }, rx)
    }

    fn state() -> State {
        let tuning = Tuning { generation: 0, max_batch_size: 8, max_delay_ms: 0, cache_entries: None };
        State { lanes: Default::default(), len: 0, tuning, closed: false }
    }

    #[test]
    fn high_priority_leaves_first_and_each_lane_is_fifo() {
        let mut s = state();
        let mut keep = Vec::new();
        for (lane, tag) in
            [(Priority::Low, 1), (Priority::Normal, 2), (Priority::High, 3), (Priority::Normal, 4), (Priority::High, 5)]
        {
            let (j, rx) = job(tag);
            keep.push(rx);
            s.lanes[lane as usize].push_back(j);
            s.len += 1;
        }
        let order: Vec<u8> = std::iter::from_fn(|| s.pop()).map(|j| j.pixels[0]).collect();
        assert_eq!(order, [3, 5, 2, 4, 1]);
    }

    #[test]
    fn prune_drops_only_abandoned_jobs() {
        let mut s = state();
        let (a, rx_a) = job(1);
        let (b, rx_b) = job(2);
        s.lanes[1].extend([a, b]);
        s.len = 2;
        drop(rx_a);
        s.prune();
        assert_eq!(s.len, 1);
        assert_eq!(s.pop().map(|j| j.pixels[0]), Some(2));
        drop(rx_b);
    }

    #[test]
    fn expired_jobs_are_answered_504_and_abandoned_ones_never_run() {
        let (mut j, mut rx) = job(1);
        j.deadline = Instant::now();
        assert!(still_wanted(j).is_none());
        assert_eq!(rx.try_recv().unwrap().unwrap_err(), BatchError::DeadlineExceeded);
        let (j, _rx) = job(2);
        assert!(still_wanted(j).is_some());
        let (j, rx) = job(3);
        drop(rx);
        assert!(still_wanted(j).is_none(), "an abandoned job never runs");
    }
}
