//! The dynamic batcher: many concurrent requests, few large inference calls.
//!
//! Decoded images wait in a bounded queue with three priority lanes. Each model session has two
//! OS threads (inference is CPU/GPU-bound and must not block the async reactor): an assembler
//! takes the oldest highest-priority images and normalises each into the next batch's input as it
//! arrives, and the session thread runs the batch before. The batch is handed over once it holds
//! `max_batch_size` images or its first image has waited `max_delay_ms`, and the session is free;
//! until then it keeps filling. So batch assembly overlaps with inference, which on a GPU is what
//! keeps the device busy, and under load batches fill at once. Both limits come from the live
//! [`Tuning`] and can change at any moment without a restart.
//!
//! A caller takes a [`Slot`] before it decodes anything and holds it until its answer arrives or
//! it gives up; when all `capacity` slots are taken the request is refused at once (429). A
//! request whose deadline has passed, or whose caller has gone away, is answered or dropped when
//! it is taken from the queue and never runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use inferpool_crds::Tuning;
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};

use super::admission::ServiceRates;
use super::queue::{Lanes, Next, Priority, Queued};
use super::workers::{Guarded, Workers};
use crate::engine::{Engine, InferError};
use crate::metrics::{Metrics, Stage};
use crate::preprocess::Preprocessor;

/// One embedding out of a batch, with where its time went.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The model's output for this image.
    pub embedding: Vec<f32>,
    /// Time spent waiting for the batch to start.
    pub queue_wait: Duration,
    /// Time the whole batch spent in the model.
    pub inference: Duration,
    /// Images in the batch this one ran in.
    pub batch_size: usize,
}

/// Why a request got no embedding from the batcher.
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

/// Why the batcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A session thread could not be started.
    #[error("cannot start a session thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A session failed its warm-up run.
    #[error("warm-up failed: {0}")]
    WarmUp(#[from] InferError),
    /// A session thread died before it finished warming up.
    #[error("a session thread died while warming up")]
    Died,
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

type Reply = oneshot::Sender<Result<Embedded, BatchError>>;

/// A decoded image waiting for a batch, as resized RGB8 pixels: normalised into the batch input
/// by the assembler (4x smaller while queued).
type Job = Queued<Vec<u8>, Result<Embedded, BatchError>>;

struct State {
    lanes: Lanes<Job>,
    /// Images taken into batches that are still filling (not yet running).
    filling: usize,
    tuning: Tuning,
    closed: bool,
}

struct Shared {
    state: Guarded<State>,
    capacity: usize,
    sessions: usize,
    /// Admission: one permit per request between admission and its answer.
    slots: Semaphore,
    preprocessor: Arc<Preprocessor>,
    metrics: Arc<Metrics>,
    rates: Arc<ServiceRates>,
}

impl Shared {
    fn publish_depth(&self, state: &State) {
        self.metrics.queue_depth.set((state.lanes.len() + state.filling) as i64);
    }
}

/// Proof of admission: held from before decoding until the answer (or giving up).
pub struct Slot<'a>(#[allow(dead_code)] SemaphorePermit<'a>);

/// The batch queue and its threads.
pub struct Batcher {
    shared: Arc<Shared>,
    threads: Workers,
}

/// A batch ready to run: the callers and their normalised images laid end to end.
struct Batch {
    jobs: Vec<(Reply, Instant)>,
    input: Vec<f32>,
}

impl Batcher {
    /// Starts an assembler and a session thread per engine and returns once each session has
    /// warmed its engine up.
    ///
    /// The warm-up runs on the session thread itself, the thread that will run every batch, so
    /// that whatever the execution provider keeps per thread (CUDA handles and caches) is warm
    /// before the sidecar reports ready.
    pub fn start(
        engines: Vec<Box<dyn Engine>>,
        tuning: Tuning,
        capacity: usize,
        preprocessor: Arc<Preprocessor>,
        metrics: Arc<Metrics>,
        rates: Arc<ServiceRates>,
    ) -> Result<Self, StartError> {
        let shared = Arc::new(Shared {
            state: Guarded::new(State { lanes: Lanes::default(), filling: 0, tuning, closed: false }),
            capacity,
            sessions: engines.len(),
            slots: Semaphore::new(capacity),
            preprocessor,
            metrics,
            rates,
        });
        publish_tuning(&shared.metrics, &tuning);
        let (warmed_tx, warmed) = mpsc::channel();
        let mut threads = Vec::with_capacity(2 * engines.len());
        let max_batch = tuning.max_batch_size as usize;
        for (i, mut engine) in engines.into_iter().enumerate() {
            let idle = Arc::new(AtomicBool::new(true));
            let (batches, inbox) = mpsc::sync_channel::<Batch>(0);
            let (s, warmed_tx, session_idle) = (Arc::clone(&shared), warmed_tx.clone(), Arc::clone(&idle));
            threads.push(Workers::spawn(format!("inferpool-session-{i}"), move || {
                let started = Instant::now();
                let result = engine.warm_up(max_batch);
                tracing::info!(session = i, ms = started.elapsed().as_millis() as u64, max_batch, "session warmed up");
                let ok = result.is_ok();
                let _ = warmed_tx.send(result);
                if ok {
                    session(&s, engine.as_mut(), &inbox, &session_idle);
                }
            })?);
            let s = Arc::clone(&shared);
            threads.push(Workers::spawn(format!("inferpool-assemble-{i}"), move || assembler(&s, &batches, &idle))?);
        }
        drop(warmed_tx);
        let sessions = shared.sessions;
        let batcher = Batcher { shared, threads: Workers::new(threads) };
        // Every session answers exactly once; a closed channel means one died before answering.
        for _ in 0..sessions {
            warmed.recv().map_err(|_| StartError::Died)??;
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
                // Let an assembler filling a batch release the abandoned job now.
                self.shared.state.wake.notify_all();
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
            self.shared.metrics.expired(Stage::Inference);
            return Err(BatchError::DeadlineExceeded);
        }
        let (reply, rx) = oneshot::channel();
        let mut state = self.shared.state.lock();
        if state.closed {
            return Err(BatchError::ShuttingDown);
        }
        // Abandoned jobs wait in the queue until an assembler reaches them; under sustained
        // overload sweep them out so that they cannot pile up beyond the live ones.
        if state.lanes.len() >= 2 * self.shared.capacity {
            state.lanes.prune();
        }
        state.lanes.push(priority, Job { payload: pixels, enqueued: now, deadline, reply });
        self.shared.publish_depth(&state);
        drop(state);
        self.shared.state.wake.notify_all();
        Ok(rx)
    }

    /// The tuning in force.
    pub fn tuning(&self) -> Tuning {
        self.shared.state.lock().tuning
    }

    /// Applies a tuning at once (the next batch uses it); refuses an older generation.
    pub fn set_tuning(&self, tuning: Tuning) -> Result<(), StaleTuning> {
        let mut state = self.shared.state.lock();
        if tuning.generation < state.tuning.generation {
            return Err(StaleTuning { current: state.tuning.generation, offered: tuning.generation });
        }
        state.tuning = tuning;
        drop(state);
        publish_tuning(&self.shared.metrics, &tuning);
        // An assembler filling a batch re-reads the limits when woken.
        self.shared.state.wake.notify_all();
        Ok(())
    }

    /// Requests waiting now (queued, or in a batch that is still filling).
    pub fn depth(&self) -> usize {
        let state = self.shared.state.lock();
        state.lanes.len() + state.filling
    }

    /// Decoded images a new request of `priority` would wait behind.
    pub fn ahead_of(&self, priority: Priority) -> usize {
        let state = self.shared.state.lock();
        state.lanes.ahead_of(priority) + state.filling
    }

    /// Model sessions running batches side by side.
    pub fn sessions(&self) -> usize {
        self.shared.sessions
    }

    /// Stops accepting work; queued requests still run. Returns once every thread has finished.
    pub fn shutdown(&self) {
        self.shared.state.lock().closed = true;
        self.shared.state.wake.notify_all();
        self.threads.join();
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

/// An assembler thread: fills batches and hands each to its session; ends once closed and empty.
fn assembler(shared: &Shared, session: &mpsc::SyncSender<Batch>, idle: &AtomicBool) {
    while let Some(batch) = next_batch(shared, idle) {
        idle.store(false, Ordering::SeqCst);
        if session.send(batch).is_err() {
            return;
        }
    }
}

/// Collects and normalises the next batch; `None` once closed and empty.
fn next_batch(shared: &Shared, idle: &AtomicBool) -> Option<Batch> {
    let per_image = shared.preprocessor.tensor_len();
    let mut batch = Batch { jobs: Vec::new(), input: Vec::new() };
    let mut window_end: Option<Instant> = None;
    let mut state = shared.state.lock();
    loop {
        // Callers that gave up while the batch filled need no inference.
        for i in (0..batch.jobs.len()).rev() {
            if batch.jobs[i].0.is_closed() {
                batch.jobs.remove(i);
                batch.input.drain(i * per_image..(i + 1) * per_image);
                state.filling -= 1;
            }
        }
        if batch.jobs.is_empty() {
            window_end = None;
        }
        let max = state.tuning.max_batch_size as usize;
        let mut taken = Vec::new();
        while batch.jobs.len() + taken.len() < max {
            match state.lanes.next(Instant::now()) {
                Next::Live(job) => {
                    let delay = Duration::from_millis(u64::from(state.tuning.max_delay_ms));
                    window_end.get_or_insert(job.enqueued + delay);
                    taken.push(job);
                }
                Next::Expired(job) => {
                    shared.metrics.expired(Stage::Inference);
                    let _ = job.reply.send(Err(BatchError::DeadlineExceeded));
                }
                Next::Empty => break,
            }
        }
        state.filling += taken.len();
        shared.publish_depth(&state);
        if !taken.is_empty() {
            // Normalise outside the lock: submitters and the other assemblers go on meanwhile.
            drop(state);
            for job in taken {
                let start = batch.input.len();
                batch.input.resize(start + per_image, 0.0);
                shared.preprocessor.normalize_into(&job.payload, &mut batch.input[start..]);
                batch.jobs.push((job.reply, job.enqueued));
            }
            state = shared.state.lock();
            continue;
        }
        let now = Instant::now();
        let session_free = idle.load(Ordering::SeqCst);
        match window_end {
            Some(end) if session_free && (batch.jobs.len() >= max || now >= end || state.closed) => {
                state.filling -= batch.jobs.len();
                shared.publish_depth(&state);
                return Some(batch);
            }
            // Full or due, but the session is still busy: wait for it (it wakes everyone).
            Some(end) if batch.jobs.len() >= max || now >= end || state.closed => {
                state = shared.state.wait(state, None)
            }
            Some(end) => state = shared.state.wait(state, Some(end - now)),
            None if state.closed => return None,
            None => state = shared.state.wait(state, None),
        }
    }
}

/// A session thread: run each batch it is handed, answer, and say it is free again.
fn session(shared: &Shared, engine: &mut dyn Engine, inbox: &mpsc::Receiver<Batch>, idle: &AtomicBool) {
    while let Ok(batch) = inbox.recv() {
        run_batch(shared, engine, batch);
        idle.store(true, Ordering::SeqCst);
        // The lock orders this wake-up after an assembler's check of `idle`, so none is missed.
        drop(shared.state.lock());
        shared.state.wake.notify_all();
    }
}

fn run_batch(shared: &Shared, engine: &mut dyn Engine, batch: Batch) {
    let n = batch.jobs.len();
    let started = Instant::now();
    let mut replies = Vec::with_capacity(n);
    for (reply, enqueued) in batch.jobs {
        let wait = started.duration_since(enqueued);
        shared.metrics.queue_wait(wait);
        replies.push((reply, wait));
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(batch.input, n)))
        .unwrap_or_else(|_| Err(InferError("the engine panicked".into())));
    let inference = started.elapsed();
    match result {
        Ok(output) => {
            shared.metrics.batch(n, inference);
            shared.rates.batch.observe(inference.as_secs_f64());
            shared.rates.batch_images.observe(n as f64);
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
mod tests;
