//! The sidecar's shared state and its life cycle: start serving at once, load and warm the model
//! in the background (`/readyz` answers 503 until then), and drain on shutdown.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::cache::Cache;
use crate::config::Config;
use crate::embed::admission::ServiceRates;
use crate::embed::batcher::Batcher;
use crate::embed::decode::DecodePool;
use crate::embed::{Pipeline, Stages};
use crate::engine::{Engine, EngineError, EngineOptions, OnnxEngine, Provider};
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
    /// Intra-op threads per session.
    pub threads: usize,
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
    /// Shutting down: not ready (so endpoints drop the replica), still serving the requests that
    /// reach it through the drain delay and on open connections until the listeners close.
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
    /// Metrics and SLA windows.
    pub metrics: Arc<Metrics>,
    /// Identifies the model family that made an embedding; profiles made by another are stale.
    pub fingerprint: String,
    /// The embedding cache (tiers that are configured off hold nothing).
    pub cache: Arc<Cache>,
    /// The request pipeline, set once the model is loaded and warmed.
    pipeline: OnceLock<Pipeline>,
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
    /// The batcher could not start its sessions.
    #[error(transparent)]
    Batcher(#[from] crate::embed::batcher::StartError),
    /// The decode threads could not start.
    #[error("cannot start the decode threads: {0}")]
    Decode(std::io::Error),
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
        metrics.cpu_limit.set(crate::cache::pressure::cpu_limit_cores());
        let fingerprint = fingerprint(&card);
        let profiles = Arc::new(ProfileStore::open(&config.data_dir, &fingerprint, card.card.output.dim)?);
        let preprocessor = Arc::new(
            Preprocessor::new(card.card.input.clone(), config.max_pixels).with_jpeg_decode(config.jpeg_decode),
        );
        let cache = Cache::open(&config.cache, card.card.output.dim, Arc::clone(&metrics))?;
        let profile_sync = cache.redis().map(|r| Arc::new(ProfileSync::new(Arc::clone(r), Arc::clone(&profiles))));
        Ok(App {
            profile_sync,
            cache,
            pipeline: OnceLock::new(),
            config,
            card,
            preprocessor,
            profiles,
            metrics,
            fingerprint,
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
            sessions: cfg.sessions,
        };
        let engines = (0..cfg.sessions).map(|_| OnnxEngine::load(&self.card, &opts)).collect::<Result<Vec<_>, _>>()?;
        let first = &engines[0];
        let loaded = Loaded { provider: first.provider(), variant: first.variant(), threads: first.threads() };
        self.metrics.set_model(&self.card.card.name, loaded.variant.as_str(), loaded.provider.as_str());
        let engines = engines.into_iter().map(|e| Box::new(e) as Box<dyn Engine>).collect();
        let rates = Arc::new(ServiceRates::default());
        let batcher = Batcher::start(
            engines,
            cfg.tuning,
            cfg.queue_capacity,
            Arc::clone(&self.preprocessor),
            Arc::clone(&self.metrics),
            Arc::clone(&rates),
        )?;
        let decode = DecodePool::start(
            cfg.decode_threads,
            Arc::clone(&self.preprocessor),
            Arc::clone(&self.metrics),
            Arc::clone(&rates),
        )
        .map_err(StartError::Decode)?;
        let stages = Stages::new(decode, batcher, rates, Arc::clone(&self.metrics));
        let namespace = cache_namespace(&self.card, loaded.variant, self.preprocessor.jpeg_decode());
        let _ = self.pipeline.set(Pipeline::new(stages, Arc::clone(&self.cache), namespace, Arc::clone(&self.metrics)));
        let _ = self.loaded.set(loaded);
        Ok(loaded)
    }

    /// The request pipeline, once the model is ready and while draining (None while loading).
    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.pipeline.get().filter(|_| self.serves())
    }

    /// Whether requests that arrive are served: ready, or draining (not ready, still serving).
    pub fn serves(&self) -> bool {
        matches!(self.phase(), Phase::Ready | Phase::Draining)
    }

    /// The batcher, once the model is ready.
    pub fn batcher(&self) -> Option<&Batcher> {
        self.pipeline().map(|p| &p.stages.batcher)
    }

    /// The batcher even while draining (for tuning and reports).
    pub fn batcher_any(&self) -> Option<&Batcher> {
        self.pipeline.get().map(|p| &p.stages.batcher)
    }

    /// Provider and variant, once loaded.
    pub fn loaded(&self) -> Option<Loaded> {
        self.loaded.get().copied()
    }

    /// Where the sidecar is in its life.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
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

    /// Stops the decode stage and the batcher after queued work has run.
    pub fn drain(&self) {
        if let Some(p) = self.pipeline.get() {
            p.stages.shutdown();
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
/// specification from the card, and the preprocessing code and JPEG decoding mode (reduced and
/// full decoding give embeddings that are close, not equal). Change any and every key changes.
fn cache_namespace(card: &LoadedCard, variant: Variant, jpeg: crate::preprocess::JpegDecode) -> String {
    let sha = card.variants().find(|(v, _)| *v == variant).map(|(_, f)| f.sha256.as_str()).unwrap_or("");
    let input = serde_json::to_string(&card.card.input).unwrap_or_default();
    let jpeg = match jpeg {
        // Full decoding is what every key meant before reduced decoding existed: keep those keys.
        crate::preprocess::JpegDecode::Full => String::new(),
        other => format!("|jpeg-{}", other.as_str()),
    };
    format!("{}|{sha}|{input}|pre{PREPROCESS_VERSION}{jpeg}", card.card.name)
}
