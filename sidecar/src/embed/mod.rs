//! The request pipeline: image bytes in, embedding out, readable top to bottom.
//!
//! ```text
//! Pipeline::embed   cache tiers (memory, disk, Redis) -> single flight (one inference per image)
//!   Stages::compute   slot (bounded admitted work, 429 when full)
//!                     -> admission (refuse before any work when the deadline cannot be met, 429)
//!                     -> decode stage (a thread per usable CPU; JPEG at reduced DCT scale)
//!                     -> batcher (priority lanes, dynamic batches) -> engine (a trait)
//!                  -> write-back to every cache tier (off the hot path)
//! ```
//!
//! `http` parses requests into [`RequestOptions`] and maps [`EmbedError`] to statuses; nothing
//! here knows HTTP. The engine is behind [`crate::engine::Engine`], so batching, admission and deadlines
//! are tested with a fake (feature `fake-engine`).

pub mod admission;
pub mod batcher;
pub mod decode;
pub mod queue;
pub mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cache::Cache;
use crate::cache::coalesce::{Coalescer, Role, follow};
use crate::metrics::Metrics;
use crate::preprocess::PreprocessError;
use admission::{Load, Overload, ServiceRates};
use batcher::{BatchError, Batcher, Embedded};
use decode::{DecodeError, DecodePool};
pub use queue::Priority;

/// Why a request got no embedding.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The request carried no bytes.
    #[error("the request body is empty; send the image bytes")]
    Empty,
    /// The image is unusable.
    #[error(transparent)]
    Image(#[from] PreprocessError),
    /// Every admission slot is taken.
    #[error("the inference queue is full ({capacity} requests admitted)")]
    QueueFull {
        /// Requests that may be admitted at once.
        capacity: usize,
        /// When to try again.
        retry_after: Duration,
    },
    /// The work queued ahead cannot be done within the request's deadline.
    #[error(transparent)]
    Overloaded(#[from] Overload),
    /// The deadline passed before the embedding was ready.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The pipeline no longer accepts work.
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    /// The model failed on the batch.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The error of another request's inference that this one shared (single flight).
    #[error(transparent)]
    Shared(Arc<EmbedError>),
}

impl EmbedError {
    /// When a refused client should try again (429 and 503 answers carry it as `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EmbedError::QueueFull { retry_after, .. } => Some(*retry_after),
            EmbedError::Overloaded(o) => Some(o.retry_after),
            EmbedError::ShuttingDown => Some(Duration::from_secs(1)),
            EmbedError::Shared(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl From<BatchError> for EmbedError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::QueueFull(capacity) => EmbedError::QueueFull { capacity, retry_after: Duration::from_secs(1) },
            BatchError::ShuttingDown => EmbedError::ShuttingDown,
            BatchError::DeadlineExceeded => EmbedError::DeadlineExceeded,
            BatchError::Engine(m) => EmbedError::Inference(m),
        }
    }
}

impl From<DecodeError> for EmbedError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Image(e) => EmbedError::Image(e),
            DecodeError::Expired => EmbedError::DeadlineExceeded,
            DecodeError::Closed => EmbedError::ShuttingDown,
        }
    }
}

/// How a request may use the cache (`Cache-Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Look up, and store what is computed.
    #[default]
    Use,
    /// `no-cache`: compute afresh and refresh the stored entry.
    Refresh,
    /// `no-store`: compute afresh and store nothing.
    Bypass,
}

/// Priority, deadline and cache use of one request, as `http` parsed them.
#[derive(Debug, Clone, Copy)]
pub struct RequestOptions {
    /// Queue lane.
    pub priority: Priority,
    /// When the answer stops being useful.
    pub deadline: Instant,
    /// Cache use.
    pub cache: CacheMode,
}

/// An embedding and how it was obtained.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The model's output.
    pub embedding: Arc<[f32]>,
    /// `memory`, `disk`, `redis` (a hit), `miss`, `coalesced`, `refresh` or `bypass`.
    pub cache: &'static str,
    /// Time spent waiting for the batch.
    pub queue_wait: Duration,
    /// Time the batch spent in the model.
    pub inference: Duration,
}

impl Outcome {
    fn computed(e: Embedded, cache: &'static str) -> Self {
        Outcome { embedding: Arc::from(e.embedding), cache, queue_wait: e.queue_wait, inference: e.inference }
    }

    fn cached(embedding: Arc<[f32]>, cache: &'static str) -> Self {
        Outcome { embedding, cache, queue_wait: Duration::ZERO, inference: Duration::ZERO }
    }
}

/// The work behind a cache miss: admission, decoding, batching and the model.
pub struct Stages {
    /// Decode threads and their queue.
    pub decode: DecodePool,
    /// Batch queue and sessions.
    pub batcher: Batcher,
    /// Measured service rates of both stages, for admission.
    pub rates: Arc<ServiceRates>,
    metrics: Arc<Metrics>,
}

impl Stages {
    /// The stages over a started decode pool and batcher that share `rates`.
    pub fn new(decode: DecodePool, batcher: Batcher, rates: Arc<ServiceRates>, metrics: Arc<Metrics>) -> Self {
        Stages { decode, batcher, rates, metrics }
    }

    /// Work queued ahead of a new request of `priority`.
    pub fn load(&self, priority: Priority) -> Load {
        Load {
            decode_ahead: self.decode.ahead_of(priority),
            infer_ahead: self.batcher.ahead_of(priority),
            decoders: self.decode.size(),
            sessions: self.batcher.sessions(),
        }
    }

    /// Embeds one image: admits it (or refuses it before any work), decodes it, batches it.
    pub async fn compute(&self, bytes: Bytes, priority: Priority, deadline: Instant) -> Result<Embedded, EmbedError> {
        let slot = self.batcher.admit().map_err(|e| {
            self.metrics.refused("queue_full");
            match e {
                BatchError::QueueFull(capacity) => {
                    EmbedError::QueueFull { capacity, retry_after: self.drain_time(priority) }
                }
                other => other.into(),
            }
        })?;
        self.judge(priority, deadline)?;
        let pixels = self.decode.decode(bytes, priority, deadline).await?;
        Ok(self.batcher.embed(&slot, pixels, priority, deadline).await?)
    }

    /// Admission: refuses a request whose answer cannot come before `deadline` (see [`admission`]).
    pub fn judge(&self, priority: Priority, deadline: Instant) -> Result<(), EmbedError> {
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            self.metrics.expired(crate::metrics::Stage::Admission);
            return Err(EmbedError::DeadlineExceeded);
        }
        self.rates.admit(self.load(priority), budget).inspect_err(|_| self.metrics.refused("overloaded"))?;
        Ok(())
    }

    /// How long the queue ahead of a request of `priority` takes to drain, as a `Retry-After`.
    fn drain_time(&self, priority: Priority) -> Duration {
        admission::retry_after(self.rates.expected(self.load(priority)).unwrap_or_default())
    }

    /// Stops both stages after their queued work.
    pub fn shutdown(&self) {
        self.decode.shutdown();
        self.batcher.shutdown();
    }
}

/// The request pipeline of a loaded model.
pub struct Pipeline {
    /// The work behind a miss.
    pub stages: Stages,
    cache: Arc<Cache>,
    /// Images being embedded now, so identical concurrent requests share one inference.
    inflight: Coalescer<Arc<[f32]>, EmbedError>,
    /// What cache keys are derived under: the exact model file and preprocessing.
    namespace: String,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    /// A pipeline over `stages`, caching under `namespace`.
    pub fn new(stages: Stages, cache: Arc<Cache>, namespace: String, metrics: Arc<Metrics>) -> Self {
        Pipeline { stages, cache, inflight: Coalescer::default(), namespace, metrics }
    }

    /// Admission before the body is read, for a request no cache tier can answer (it bypasses the
    /// cache, or no tier is configured): such a request needs the model, so a refusal now costs
    /// neither reading nor hashing its body. Others are judged after their cache lookup misses.
    pub fn admit_early(&self, opts: &RequestOptions) -> Result<(), EmbedError> {
        if opts.cache == CacheMode::Use && self.cache.can_answer() {
            return Ok(());
        }
        self.stages.judge(opts.priority, opts.deadline)
    }

    /// The cache key of an image under the model being served.
    pub fn cache_key(&self, image: &[u8]) -> crate::cache::Key {
        crate::cache::Key::of(&self.namespace, image)
    }

    /// The embedding of an image: from the cache when allowed and present, else from the model,
    /// with identical concurrent requests sharing one inference and the result stored in every
    /// tier.
    pub async fn embed(&self, bytes: Bytes, opts: &RequestOptions) -> Result<Outcome, EmbedError> {
        if bytes.is_empty() {
            return Err(EmbedError::Empty);
        }
        let compute = |bytes| self.stages.compute(bytes, opts.priority, opts.deadline);
        if opts.cache == CacheMode::Bypass {
            return Ok(Outcome::computed(compute(bytes).await?, "bypass"));
        }
        // Hashed only when the cache is used: a bypassing request skips the hash of its body.
        let key = self.cache_key(&bytes);
        if opts.cache == CacheMode::Refresh {
            let out = Outcome::computed(compute(bytes).await?, "refresh");
            self.cache.store(key, Arc::clone(&out.embedding));
            return Ok(out);
        }
        if let Some(hit) = self.cache.lookup(&key).await {
            self.metrics.cache_outcome(Some(hit.tier));
            return Ok(Outcome::cached(hit.value, hit.tier.as_str()));
        }
        self.metrics.cache_outcome(None);
        loop {
            match self.inflight.join(key) {
                Role::Leader(leader) => {
                    // Another leader may have finished between the lookup and now.
                    if let Some(value) = self.cache.memory().get(&key) {
                        leader.finish(Ok(Arc::clone(&value)));
                        return Ok(Outcome::cached(value, "coalesced"));
                    }
                    return match compute(bytes).await {
                        Ok(e) => {
                            let out = Outcome::computed(e, "miss");
                            self.cache.store(key, Arc::clone(&out.embedding));
                            leader.finish(Ok(Arc::clone(&out.embedding)));
                            Ok(out)
                        }
                        // This request's own deadline passed or its own refusal: followers may
                        // have longer deadlines, so they take over rather than share the outcome.
                        Err(e @ (EmbedError::DeadlineExceeded | EmbedError::Overloaded(_))) => Err(e),
                        Err(e) => {
                            let e = Arc::new(e);
                            leader.finish(Err(Arc::clone(&e)));
                            Err(EmbedError::Shared(e))
                        }
                    };
                }
                Role::Follower(rx) => {
                    let waited = tokio::time::timeout_at(opts.deadline.into(), follow(rx)).await;
                    match waited.map_err(|_| EmbedError::DeadlineExceeded)? {
                        Some(Ok(value)) => {
                            self.metrics.cache_coalesced.inc();
                            return Ok(Outcome::cached(value, "coalesced"));
                        }
                        Some(Err(e)) => return Err(EmbedError::Shared(e)),
                        None => continue,
                    }
                }
            }
        }
    }
}

/// An identity preprocessor (mean 0, std 1, stretch) for `side` x `side` inputs: what the
/// stage tests feed the fake engine.
#[cfg(test)]
fn test_preprocessor(side: u32) -> Arc<crate::preprocess::Preprocessor> {
    use crate::model::{ColorOrder, InputSpec, Layout, ResizeMode};
    let input = InputSpec {
        name: "input".into(),
        layout: Layout::Nchw,
        width: side,
        height: side,
        color: ColorOrder::Rgb,
        resize: ResizeMode::Stretch,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    Arc::new(crate::preprocess::Preprocessor::new(input, 1 << 26))
}

#[cfg(test)]
mod tests;
