//! What the pipeline needs from a model, [`Engine`] (run a batch of input tensors, get one
//! embedding each), and the implementation that serves traffic: the ONNX Runtime engine, one `ort`
//! session that turns a batch of image tensors into embeddings. With the `fake-engine` feature a
//! deterministic `FakeEngine` stands in, so batching, admission and deadline behaviour are tested
//! without ONNX Runtime or a model file.
//!
//! The runtime library is loaded at run time (`load-dynamic`) from the first of: `--ort-library`,
//! `ORT_DYLIB_PATH`, next to the binary, the checkout's `.cache/onnxruntime/` (put there by
//! `make setup`), or the system library path. Execution providers are tried CUDA first, then CPU;
//! the one in use is reported in logs, metrics and the SLA report.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::Tensor;

use crate::config::ProviderChoice;
use crate::model::{Layout, LoadedCard, Optimization, Variant};

/// Why a batch produced no embeddings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InferError(pub String);

/// A loaded model that turns batches of image tensors into embeddings.
pub trait Engine: Send + 'static {
    /// Runs `n` images laid end to end in `batch` (each `tensor_len` values in the card's layout)
    /// and returns their `n` embeddings, in order.
    fn run(&mut self, batch: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, InferError>;

    /// Runs every batch shape that batches of up to `max_batch` images will use, so no request
    /// pays for a shape's first run. Called on the thread that will run every batch.
    fn warm_up(&mut self, max_batch: usize) -> Result<(), InferError>;
}

#[cfg(any(test, feature = "fake-engine"))]
mod fake;
#[cfg(any(test, feature = "fake-engine"))]
pub use fake::FakeEngine;

/// Name of the ONNX Runtime library on this platform.
const ORT_LIB: &str = "libonnxruntime.so";

/// Why the engine could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime library was not found or is too old.
    #[error("cannot load ONNX Runtime ({0}); run `make setup`, or point --ort-library at libonnxruntime.so")]
    Library(String),
    /// CUDA was required but cannot be used.
    #[error("CUDA execution provider unavailable: {0}")]
    CudaUnavailable(String),
    /// The model card or file is unusable.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The model does not have the input or output the card names, or has the wrong shape.
    #[error("model does not match its card: {0}")]
    Mismatch(String),
    /// ONNX Runtime failed.
    #[error("onnxruntime: {0}")]
    Ort(#[from] ort::Error),
}

/// Execution provider in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU.
    Cpu,
}

impl Provider {
    /// Lower-case name for metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

/// How to build sessions.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Explicit library path.
    pub library: Option<PathBuf>,
    /// Provider choice.
    pub provider: ProviderChoice,
    /// Optimisation level (variant and graph optimisation).
    pub optimization: Optimization,
    /// Intra-op threads per session; None = chosen for the provider ([`EngineOptions::intra_threads`]).
    pub threads: Option<usize>,
    /// Sessions in the process (they share the CPUs).
    pub sessions: usize,
}

impl EngineOptions {
    /// Intra-op threads for a session on `provider`: as configured, else one on CUDA (the GPU runs
    /// the model; the CPUs belong to decoding and batch assembly) and the usable CPUs divided
    /// among the sessions on the CPU.
    pub fn intra_threads(&self, provider: Provider) -> usize {
        match (self.threads, provider) {
            (Some(n), _) => n.max(1),
            (None, Provider::Cuda) => 1,
            (None, Provider::Cpu) => {
                (std::thread::available_parallelism().map_or(1, |n| n.get()) / self.sessions.max(1)).max(1)
            }
        }
    }
}

/// The process-wide ONNX Runtime environment, loaded once.
fn environment(library: Option<&Path>) -> Result<&'static Environment, EngineError> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = find_library(library);
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        builder.with_name("inferpool").with_telemetry(false).build().map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| EngineError::Library(e.clone()))
}

/// The first ONNX Runtime library that exists among the known places.
fn find_library(explicit: Option<&Path>) -> PathBuf {
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let candidates = [
        explicit.map(Path::to_path_buf),
        std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
        exe_dir.as_ref().map(|d| d.join(ORT_LIB)),
        exe_dir.as_ref().map(|d| d.join("../lib").join(ORT_LIB)),
        crate::config::source_root().map(|r| r.join(".cache/onnxruntime").join(ORT_LIB)),
    ];
    candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| PathBuf::from(ORT_LIB))
}

/// Picks the provider: CUDA when asked or available and it registers, else the CPU.
fn choose_provider(opts: &EngineOptions) -> Result<Provider, EngineError> {
    let cuda_built = ep::CUDA::is_available().unwrap_or(false);
    match opts.provider {
        ProviderChoice::Cpu => Ok(Provider::Cpu),
        ProviderChoice::Cuda if !cuda_built => Err(EngineError::CudaUnavailable(
            "this ONNX Runtime library has no CUDA provider (install the onnxruntime-gpu build)".into(),
        )),
        ProviderChoice::Auto if !cuda_built => Ok(Provider::Cpu),
        _ => Ok(Provider::Cuda),
    }
}

/// One loaded model session.
pub struct OnnxEngine {
    session: Session,
    input_name: String,
    output_name: String,
    /// Shape of one image: [C, H, W] or [H, W, C].
    image_shape: [usize; 3],
    dim: usize,
    provider: Provider,
    variant: Variant,
    threads: usize,
}

impl OnnxEngine {
    /// Loads the model variant that the optimisation level and provider call for, verified against
    /// the card's sha256.
    pub fn load(card: &LoadedCard, opts: &EngineOptions) -> Result<OnnxEngine, EngineError> {
        let env = environment(opts.library.as_deref())?;
        let mut provider = choose_provider(opts)?;
        let (mut variant, mut path) = card.choose(opts.optimization, provider == Provider::Cuda);
        card.verify(variant, &path)?;
        let mut builder = session_builder(env, opts, opts.intra_threads(provider))?;
        if provider == Provider::Cuda {
            // cuDNN's default exhaustive algorithm search stays: on an H100 it was at least as fast
            // as the heuristic choice (docs/benchmarks/gpu.md). Its cost, seconds on the first run
            // of each input shape, is paid in `warm_up`.
            let cuda = ep::CUDA::default().build().error_on_failure();
            match builder.clone().with_execution_providers([cuda]) {
                Ok(b) => builder = b,
                Err(e) if opts.provider == ProviderChoice::Auto => {
                    tracing::warn!(error = %e, "CUDA provider failed to register; using the CPU");
                    provider = Provider::Cpu;
                    (variant, path) = card.choose(opts.optimization, false);
                    card.verify(variant, &path)?;
                    builder = session_builder(env, opts, opts.intra_threads(provider))?;
                }
                Err(e) => return Err(EngineError::CudaUnavailable(e.to_string())),
            }
        }
        let session = builder.commit_from_file(&path)?;
        let threads = opts.intra_threads(provider);
        let engine = Self::check(session, card, provider, variant, threads)?;
        tracing::info!(model = %card.card.name, variant = variant.as_str(), provider = provider.as_str(), threads, file = %path.display(), "model loaded");
        Ok(engine)
    }

    /// Checks the session's input and output against the card.
    fn check(
        session: Session,
        card: &LoadedCard,
        provider: Provider,
        variant: Variant,
        threads: usize,
    ) -> Result<OnnxEngine, EngineError> {
        let spec = &card.card;
        if !session.inputs().iter().any(|i| i.name() == spec.input.name) {
            let names: Vec<_> = session.inputs().iter().map(|i| i.name().to_owned()).collect();
            return Err(EngineError::Mismatch(format!("no input {:?} (inputs: {names:?})", spec.input.name)));
        }
        if !session.outputs().iter().any(|o| o.name() == spec.output.name) {
            let names: Vec<_> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
            return Err(EngineError::Mismatch(format!("no output {:?} (outputs: {names:?})", spec.output.name)));
        }
        let (w, h) = (spec.input.width as usize, spec.input.height as usize);
        let image_shape = match spec.input.layout {
            Layout::Nchw => [3, h, w],
            Layout::Nhwc => [h, w, 3],
        };
        Ok(OnnxEngine {
            session,
            input_name: spec.input.name.clone(),
            output_name: spec.output.name.clone(),
            image_shape,
            dim: spec.output.dim,
            provider,
            variant,
            threads,
        })
    }

    /// Runs `n` images laid end to end in `batch` and returns their `n` embeddings.
    ///
    /// On CUDA the batch is padded with blank images to the next power of two: the first run of
    /// each new input shape costs seconds there (kernel selection and memory planning), and
    /// dynamic batching would otherwise meet every size from 1 to the maximum. With padding the
    /// GPU sees a handful of shapes, all run once by [`OnnxEngine::warm_up`].
    pub fn run(&mut self, mut batch: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let rows = self.rows_for(n);
        batch.resize(rows * self.image_len(), 0.0);
        let [a, b, c] = self.image_shape;
        let input = Tensor::from_array(([rows, a, b, c], batch))?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => input])?;
        let (shape, data) = outputs[self.output_name.as_str()].try_extract_tensor::<f32>()?;
        if data.len() != rows * self.dim {
            return Err(EngineError::Mismatch(format!(
                "output {:?} has shape {shape:?}, expected [{rows}, {}]",
                self.output_name, self.dim
            )));
        }
        Ok(data[..n * self.dim].chunks_exact(self.dim).map(<[f32]>::to_vec).collect())
    }

    /// Rows actually run for `n` images (see [`OnnxEngine::run`]).
    fn rows_for(&self, n: usize) -> usize {
        if self.provider == Provider::Cuda { n.next_power_of_two() } else { n }
    }

    /// f32 values in one image.
    fn image_len(&self) -> usize {
        self.image_shape.iter().product()
    }

    /// Runs every batch shape that batches of up to `max_batch` images will use, so that no
    /// request pays for a shape's first run: on CUDA each power of two, on the CPU (where a new
    /// shape is cheap) a single image and a full batch.
    pub fn warm_up(&mut self, max_batch: usize) -> Result<(), EngineError> {
        let sizes: Vec<usize> = match self.provider {
            Provider::Cuda => (0..).map(|p| 1usize << p).take_while(|&s| s < max_batch * 2).collect(),
            Provider::Cpu => vec![1, max_batch],
        };
        for n in sizes {
            self.run(vec![0.0; n * self.image_len()], n)?;
        }
        Ok(())
    }

    /// Provider in use.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Variant loaded.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Intra-op threads of the session.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Engine for OnnxEngine {
    fn run(&mut self, batch: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, InferError> {
        OnnxEngine::run(self, batch, n).map_err(|e| InferError(e.to_string()))
    }

    fn warm_up(&mut self, max_batch: usize) -> Result<(), InferError> {
        OnnxEngine::warm_up(self, max_batch).map_err(|e| InferError(e.to_string()))
    }
}

/// A session builder with the threads and graph optimisation of the optimisation level.
fn session_builder(env: &Environment, opts: &EngineOptions, threads: usize) -> Result<SessionBuilder, EngineError> {
    // Accuracy keeps to the basic, numerically exact rewrites; the others allow layout changes
    // and fusions that may move results in the last bits.
    let level = match opts.optimization {
        Optimization::Accuracy => GraphOptimizationLevel::Level1,
        _ => GraphOptimizationLevel::All,
    };
    let builder = Session::builder(env)?
        .with_optimization_level(level)
        .map_err(ort::Error::<()>::from)?
        .with_intra_threads(threads)
        .map_err(ort::Error::<()>::from)?
        .with_inter_threads(1)
        .map_err(ort::Error::<()>::from)?
        // Spinning intra-op threads wait for work by burning a core; the sidecar's cores are
        // shared with the decode stage, which then gets less of them.
        .with_intra_op_spinning(false)
        .map_err(ort::Error::<()>::from)?
        // Memory: no pre-planned arena patterns, which trade memory for speed.
        .with_memory_pattern(opts.optimization != Optimization::Memory)
        .map_err(ort::Error::<()>::from)?;
    Ok(builder)
}
