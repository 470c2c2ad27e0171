//! The bounded decode stage: a fixed set of threads, one per usable CPU, decode and resize images.
//!
//! Decoding is the request path's CPU-heavy step (a 12-megapixel JPEG is tens of milliseconds).
//! Run on tokio's blocking pool it would get up to 512 threads under a burst, each holding a
//! full-size decode buffer; here at most `workers` images are decoded at once, and a request that
//! waits holds only its compressed bytes. The queue has the same priority lanes as the batcher,
//! and a request whose deadline passes while it waits is dropped without being decoded.
//!
//! The worker count defaults to the CPUs the process may use:
//! `std::thread::available_parallelism`, which on Linux honours the cgroup CPU quota and the
//! affinity mask, so a pod limited to 2 CPUs on a 64-core node gets 2 decoders.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::admission::ServiceRates;
use super::queue::{Lanes, Next, Priority, Queued};
use super::workers::{Guarded, Workers};
use crate::metrics::{Metrics, Stage};
use crate::preprocess::{PreprocessError, Preprocessor};

/// Why an image was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The image is unusable.
    #[error(transparent)]
    Image(#[from] PreprocessError),
    /// Its deadline passed while it waited; it was not decoded.
    #[error("deadline exceeded while waiting to be decoded")]
    Expired,
    /// The stage has stopped.
    #[error("the decode stage is shutting down")]
    Closed,
}

/// An image waiting for a decoder, as its compressed bytes.
type Job = Queued<Bytes, Result<Vec<u8>, DecodeError>>;

struct State {
    lanes: Lanes<Job>,
    /// Images being decoded now.
    inflight: usize,
    /// Most images decoded at once since start.
    peak: usize,
    closed: bool,
}

struct Shared {
    state: Guarded<State>,
    preprocessor: Arc<Preprocessor>,
    metrics: Arc<Metrics>,
    rates: Arc<ServiceRates>,
}

impl Shared {
    fn publish(&self, state: &State) {
        self.metrics.decode_queue_depth.set(state.lanes.len() as i64);
        self.metrics.decode_inflight.set(state.inflight as i64);
        self.metrics.decode_inflight_peak.set(state.peak as i64);
    }
}

/// The decode threads and their queue.
pub struct DecodePool {
    shared: Arc<Shared>,
    workers: Workers,
    size: usize,
}

impl DecodePool {
    /// Starts `workers` decode threads.
    pub fn start(
        workers: usize,
        preprocessor: Arc<Preprocessor>,
        metrics: Arc<Metrics>,
        rates: Arc<ServiceRates>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Guarded::new(State { lanes: Lanes::default(), inflight: 0, peak: 0, closed: false }),
            preprocessor,
            metrics,
            rates,
        });
        let size = workers.max(1);
        let threads = (0..size)
            .map(|i| {
                let shared = Arc::clone(&shared);
                Workers::spawn(format!("inferpool-decode-{i}"), move || worker(&shared))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        shared.metrics.decode_workers.set(size as i64);
        Ok(DecodePool { shared, workers: Workers::new(threads), size })
    }

    /// Decode threads.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Images waiting for or in a decoder that a new request of `priority` would wait behind.
    pub fn ahead_of(&self, priority: Priority) -> usize {
        let state = self.shared.state.lock();
        state.lanes.ahead_of(priority) + state.inflight
    }

    /// Decodes and resizes one image to the model's input size (packed RGB8), waiting in line
    /// behind the images queued before it.
    pub async fn decode(&self, bytes: Bytes, priority: Priority, deadline: Instant) -> Result<Vec<u8>, DecodeError> {
        let (reply, rx) = oneshot::channel();
        {
            let mut state = self.shared.state.lock();
            if state.closed {
                return Err(DecodeError::Closed);
            }
            // Jobs of callers that gave up wait until a worker reaches them; sweep them out when
            // the queue is long so they cannot pile up under sustained overload.
            if state.lanes.len() >= 64 * self.size {
                state.lanes.prune();
            }
            state.lanes.push(priority, Job { payload: bytes, enqueued: Instant::now(), deadline, reply });
            self.shared.publish(&state);
        }
        self.shared.state.wake.notify_one();
        // A dropped sender means the worker stopped without answering.
        rx.await.unwrap_or(Err(DecodeError::Closed))
    }

    /// Most images decoded at once since start (never more than [`DecodePool::size`]).
    pub fn peak_inflight(&self) -> usize {
        self.shared.state.lock().peak
    }

    /// Stops the workers once the queue is empty.
    pub fn shutdown(&self) {
        self.shared.state.lock().closed = true;
        self.shared.state.wake.notify_all();
        self.workers.join();
    }
}

impl Drop for DecodePool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A decode thread: take the next live job, decode it, answer; until closed and drained.
fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state.lock();
            loop {
                match state.lanes.next(Instant::now()) {
                    // Counted in flight under the same lock that took it off the queue, so
                    // admission never sees it in neither place.
                    Next::Live(job) => {
                        state.inflight += 1;
                        state.peak = state.peak.max(state.inflight);
                        shared.publish(&state);
                        break job;
                    }
                    Next::Expired(job) => {
                        shared.metrics.expired(Stage::Decode);
                        let _ = job.reply.send(Err(DecodeError::Expired));
                    }
                    Next::Empty if state.closed => {
                        shared.publish(&state);
                        return;
                    }
                    Next::Empty => {
                        shared.publish(&state);
                        state = shared.state.wait(state, None);
                    }
                }
            }
        };
        let started = Instant::now();
        let pre = &shared.preprocessor;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| pre.prepare_pixels(&job.payload)))
            .unwrap_or_else(|_| Err(PreprocessError::Corrupt("the decoder panicked on this image".into())));
        let took = started.elapsed();
        shared.metrics.decoded(took);
        shared.rates.decode.observe(took.as_secs_f64());
        {
            let mut state = shared.state.lock();
            state.inflight -= 1;
            shared.publish(&state);
        }
        let _ = job.reply.send(result.map_err(DecodeError::from));
    }
}
