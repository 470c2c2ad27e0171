//! The sidecar's shared state and its life cycle: start serving at once, load and warm the model
//! in the background (`/readyz` answers 503 until then), and drain on shutdown.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::batcher::Batcher;
use crate::cache::Cache;
use crate::cache::coalesce::Coalescer;
use crate::config::Config;
use crate::engine::{Engine, EngineError, EngineOptions, Provider};
use crate::metrics::Metrics;
use crate::model::{LoadedCard, Variant};
use crate::preprocess::Preprocessor;
use crate::profiles::ProfileStore;
use crate::profiles::sync::ProfileSync;

/// What was loaded, for reports.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Execution provider in use.
    pub provider: Provider,
    /// Variant in use.
    pub variant: Variant,
}

/// Where the sidecar is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving probes; the model is loading.
    Loading,
    /// Serving traffic.
    Ready,
    /// The model failed to load; the server is stopping.
    Failed,
    /// Shutting down: finishing in-flight work, refusing new work.
    Draining,
}

/// State shared by every request.
pub struct App {
    /// Validated configuration.
    pub config: Config,
    /// The model card.
    pub card: LoadedCard,
    /// Image decoding and normalisation for the card's input.
    pub preprocessor: Arc<Preprocessor>,
    /// Durable reference profiles.
    pub profiles: Arc<ProfileStore>,
    /// Shares profiles with the pool's other replicas through Redis, when configured.
    pub profile_sync: Option<Arc<ProfileSync>>,
    /// Images being decoded at once: one per CPU, so a burst cannot spawn hundreds of threads.
    pub decoders: tokio::sync::Semaphore,
    /// Metrics and SLA windows.
    pub metrics: Arc<Metrics>,
    /// Identifies the model family that made an embedding; profiles made by another are stale.
    pub fingerprint: String,
    /// The embedding cache (tiers that are configured off hold nothing).
    pub cache: Arc<Cache>,
    /// Images being embedded now, so identical concurrent requests share one inference.
    pub inflight: Coalescer<Arc<[f32]>, crate::http::ApiError>,
    /// What cache keys are derived under: the exact model file and preprocessing, set on load.
    cache_namespace: OnceLock<String>,
    /// Set once the model is loaded and warmed.
    batcher: OnceLock<Batcher>,
    loaded: OnceLock<Loaded>,
    phase: watch::Sender<Phase>,
    /// When the process started serving.
    pub started: Instant,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model card is unusable.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The engine could not load the model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The profile store could not be opened.
    #[error("profile store: {0}")]
    Profiles(#[from] crate::profiles::ProfileError),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] crate::cache::tiers::CacheError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A worker task failed.
    #[error("start-up task failed: {0}")]
    Task(String),
}

impl App {
    /// Reads the card, opens the profile store and the cache and registers metrics; the model loads
    /// later. Call inside a tokio runtime (the cache starts background tasks).
    pub fn new(config: Config) -> Result<Self, StartError> {
        let card = LoadedCard::load(&config.model)?;
        let metrics = Arc::new(Metrics::new()?);
        metrics.memory_limit.set(config.memory_limit.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX)));
        let fingerprint = fingerprint(&card);
        let profiles = Arc::new(ProfileStore::open(&config.data_dir, &fingerprint, card.card.output.dim)?);
        let preprocessor = Arc::new(Preprocessor::new(card.card.input.clone(), config.max_pixels));
        let cache = Cache::open(&config.cache, card.card.output.dim, Arc::clone(&metrics))?;
        let profile_sync = cache.redis().map(|r| Arc::new(ProfileSync::new(Arc::clone(r), Arc::clone(&profiles))));
        Ok(App {
            profile_sync,
            cache,
            cache_namespace: OnceLock::new(),
            inflight: Coalescer::default(),
            config,
            card,
            preprocessor,
            profiles,
            decoders: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
            metrics,
            fingerprint,
            batcher: OnceLock::new(),
            loaded: OnceLock::new(),
            phase: watch::Sender::new(Phase::Loading),
            started: Instant::now(),
        })
    }

    /// Loads one engine per session and starts the batcher, which warms each engine up.
    /// Blocking: run it on the blocking pool.
    pub fn load_model(&self) -> Result<Loaded, StartError> {
        let result = self.load_engines();
        self.phase.send_replace(if result.is_ok() { Phase::Ready } else { Phase::Failed });
        result
    }

    fn load_engines(&self) -> Result<Loaded, StartError> {
        let cfg = &self.config;
        let opts = EngineOptions {
            library: cfg.ort_library.clone(),
            provider: cfg.provider,
            optimization: cfg.optimization,
            threads: cfg.threads,
        };
        let engines = (0..cfg.sessions).map(|_| Engine::load(&self.card, &opts)).collect::<Result<Vec<_>, _>>()?;
        let loaded = Loaded { provider: engines[0].provider(), variant: engines[0].variant() };
        self.metrics.set_model(&self.card.card.name, loaded.variant.as_str(), loaded.provider.as_str());
        let batcher = Batcher::start(
            engines,
            cfg.tuning,
            cfg.queue_capacity,
            Arc::clone(&self.preprocessor),
            Arc::clone(&self.metrics),
        )?;
        let _ = self.cache_namespace.set(cache_namespace(&self.card, loaded.variant));
        let _ = self.loaded.set(loaded);
        let _ = self.batcher.set(batcher);
        Ok(loaded)
    }

    /// The batcher, once the model is ready.
    pub fn batcher(&self) -> Option<&Batcher> {
        self.batcher.get().filter(|_| self.is_ready())
    }

    /// The batcher even while draining (for tuning and reports).
    pub fn batcher_any(&self) -> Option<&Batcher> {
        self.batcher.get()
    }

    /// The cache key of an image under the model being served (None before the model is loaded).
    pub fn cache_key(&self, image: &[u8]) -> Option<crate::cache::Key> {
        self.cache_namespace.get().map(|ns| crate::cache::Key::of(ns, image))
    }

    /// Provider and variant, once loaded.
    pub fn loaded(&self) -> Option<Loaded> {
        self.loaded.get().copied()
    }

    /// Whether requests should be sent here.
    pub fn is_ready(&self) -> bool {
        *self.phase.borrow() == Phase::Ready
    }

    /// Waits until the model is ready (`Ok`) or has failed or the server is stopping (`Err`).
    pub async fn wait_ready(&self) -> Result<(), Phase> {
        let mut rx = self.phase.subscribe();
        match rx.wait_for(|p| *p != Phase::Loading).await.map(|p| *p) {
            Ok(Phase::Ready) => Ok(()),
            Ok(other) => Err(other),
            Err(_) => Err(Phase::Failed),
        }
    }

    /// Stops reporting ready (first step of shutdown).
    pub fn set_draining(&self) {
        self.phase.send_replace(Phase::Draining);
    }

    /// Stops the batcher after queued work has run.
    pub fn drain(&self) {
        if let Some(b) = self.batcher.get() {
            b.shutdown();
        }
    }
}

/// Names the model family: its name and the checksum of its first variant. The variants of one
/// model (fp32/fp16/int8) give embeddings close enough to compare, so they share a fingerprint.
fn fingerprint(card: &LoadedCard) -> String {
    let sha = card.variants().next().map(|(_, f)| f.sha256.as_str()).unwrap_or("");
    format!("{}@{}", card.card.name, &sha[..sha.len().min(16)])
}

/// Version of the preprocessing code; bump it when decoding or resizing changes what the model sees.
const PREPROCESS_VERSION: u32 = 1;

/// What a cached embedding depends on: the exact model file in use (its sha256), the input
/// specification from the card, and the preprocessing code. Change any and every key changes.
fn cache_namespace(card: &LoadedCard, variant: Variant) -> String {
    let sha = card.variants().find(|(v, _)| *v == variant).map(|(_, f)| f.sha256.as_str()).unwrap_or("");
    let input = serde_json::to_string(&card.card.input).unwrap_or_default();
    format!("{}|{sha}|{input}|pre{PREPROCESS_VERSION}", card.card.name)
}
