//! Sidecar configuration: command-line flags, each with an `INFERPOOL_` environment twin.
//!
//! Flags are read as text by clap and converted here, so that every bad value is reported in one
//! go (a pod that fails to start should say everything that is wrong at once). The binary exits
//! with code 64 (EX_USAGE) on any configuration error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use inferpool_crds::Tuning;

use crate::cache::CacheConfig;
use crate::cache::codec::Encoding;
use crate::cache::redis::RedisConfig;
use crate::model::Optimization;
use crate::preprocess::JpegDecode;

/// Exit code for bad configuration (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Command-line flags of `inferpool-sidecar`. Values are checked by [`Args::into_config`].
#[derive(Debug, Clone, Parser)]
#[command(name = "inferpool-sidecar", version, about = "inferpool's inference sidecar: batched ONNX image embedding and matching over HTTP", long_about = None)]
pub struct Args {
    /// Address of the public API (in a pod: 0.0.0.0:8080).
    #[arg(long, env = "INFERPOOL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Address of the admin listener (/live, /ready, /metrics, PUT /api/v1/tuning).
    #[arg(long, env = "INFERPOOL_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Model card (JSON), a directory holding card.json, or one .onnx file listed by the card
    /// beside it. Default: the model that `make setup` prepares.
    #[arg(long, env = "INFERPOOL_MODEL")]
    pub model: Option<PathBuf>,
    /// Speed | Balanced | Accuracy | Memory: picks the model variant and graph optimisation.
    #[arg(long, env = "INFERPOOL_OPTIMIZATION", default_value = "Balanced")]
    pub optimization: String,
    /// auto | cuda | cpu: execution provider; auto tries CUDA, then falls back to the CPU.
    #[arg(long, env = "INFERPOOL_PROVIDER", default_value = "auto")]
    pub provider: String,
    /// Directory for durable state (profiles).
    #[arg(long, env = "INFERPOOL_DATA_DIR", default_value = "inferpool-data")]
    pub data_dir: PathBuf,
    /// Most images run together in one inference call (live-tunable).
    #[arg(long, env = "INFERPOOL_MAX_BATCH", default_value = "16")]
    pub max_batch: String,
    /// Longest a request waits for its batch to fill, in ms (live-tunable).
    #[arg(long, env = "INFERPOOL_MAX_DELAY_MS", default_value = "5")]
    pub max_delay_ms: String,
    /// Model sessions in this process, each with its own worker thread.
    #[arg(long, env = "INFERPOOL_SESSIONS", default_value = "1")]
    pub sessions: String,
    /// Intra-op threads per session; 0 = chosen for the provider: 1 on CUDA (the CPUs decode),
    /// the CPUs available divided by the sessions on the CPU.
    #[arg(long, env = "INFERPOOL_THREADS", default_value = "0")]
    pub threads: String,
    /// Threads that decode and resize images; 0 = the CPUs the process may use (cgroup quota and
    /// affinity aware). At most this many images are decoded at once.
    #[arg(long, env = "INFERPOOL_DECODE_THREADS", default_value = "0")]
    pub decode_threads: String,
    /// reduced | full: decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers
    /// the model input, or always at full size.
    #[arg(long, env = "INFERPOOL_JPEG_DECODE", default_value = "reduced")]
    pub jpeg_decode: String,
    /// Requests that may wait for inference; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "INFERPOOL_QUEUE_CAPACITY", default_value = "1024")]
    pub queue_capacity: String,
    /// Deadline of a request without an X-Deadline-Ms header, in ms; past it the answer is 504.
    #[arg(long, env = "INFERPOOL_DEFAULT_DEADLINE_MS", default_value = "2000")]
    pub default_deadline_ms: String,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "INFERPOOL_MAX_BODY_BYTES", default_value = "16777216")]
    pub max_body_bytes: String,
    /// Largest image accepted, in pixels, checked from the header before decoding (413 beyond).
    #[arg(long, env = "INFERPOOL_MAX_PIXELS", default_value = "40000000")]
    pub max_pixels: String,
    /// Bearer token required by PUT /api/v1/tuning on the admin listener.
    #[arg(long, env = "INFERPOOL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token (e.g. a mounted Secret); used when --admin-token is absent.
    #[arg(long, env = "INFERPOOL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds to finish queued work after SIGTERM before exiting.
    #[arg(long, env = "INFERPOOL_SHUTDOWN_GRACE_SECONDS", default_value = "20")]
    pub shutdown_grace_seconds: String,
    /// Seconds to keep serving after SIGTERM with readiness already false, so load balancers and
    /// Service proxies stop sending new requests before the listeners close (the operator sets 5).
    #[arg(long, env = "INFERPOOL_DRAIN_DELAY_SECONDS", default_value = "0")]
    pub drain_delay_seconds: String,
    /// The ONNX Runtime shared library. Default: found next to the binary, under the repository's
    /// .cache/onnxruntime (after `make setup`), or on the system library path.
    #[arg(long, env = "INFERPOOL_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Directory of the disk cache (L2). Default: `cache` under --data-dir.
    #[arg(long, env = "INFERPOOL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Capacity of the memory cache (L1) in embeddings; 0 turns it off (live-tunable).
    #[arg(long, env = "INFERPOOL_MEMORY_ENTRIES", default_value = "1000")]
    pub memory_entries: String,
    /// Budget of the disk cache (L2) in MiB, file blocks included; 0 turns it off.
    #[arg(long, env = "INFERPOOL_DISK_MB", default_value = "1024")]
    pub disk_mb: String,
    /// Redis for the shared cache (L3) and shared profiles: redis://[user:pass@]host:port[/db] or
    /// rediss://... for TLS. Absent: no L3, profiles stay local.
    #[arg(long, env = "INFERPOOL_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis password (overrides one in the URL). Prefer --redis-password-file.
    #[arg(long, env = "INFERPOOL_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// File holding the Redis password (e.g. a mounted Secret); used when --redis-password is absent.
    #[arg(long, env = "INFERPOOL_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// Time to live of an embedding in Redis, in seconds.
    #[arg(long, env = "INFERPOOL_REDIS_TTL_SECONDS", default_value = "3600")]
    pub redis_ttl_seconds: String,
    /// Budget of one Redis lookup, in ms; slower answers count as misses and trip the breaker.
    #[arg(long, env = "INFERPOOL_REDIS_TIMEOUT_MS", default_value = "20")]
    pub redis_timeout_ms: String,
    /// Redis ACL username (overrides one in the URL); the operator takes it from a Secret.
    #[arg(long, env = "INFERPOOL_REDIS_USERNAME", hide_env_values = true)]
    pub redis_username: Option<String>,
    /// Prefix of the pool's own Redis keys (profiles), so pools can share one Redis; the operator
    /// sets `inferpool:NAMESPACE:POOL:`.
    #[arg(long, env = "INFERPOOL_REDIS_PREFIX", default_value = "inferpool:")]
    pub redis_prefix: String,
    /// Prefix of embedding entries in Redis; default: --redis-prefix. Pools given the same one
    /// share embeddings of the same model (the key hashes the model fingerprint).
    #[arg(long, env = "INFERPOOL_REDIS_EMBEDDING_PREFIX")]
    pub redis_embedding_prefix: Option<String>,
    /// How embeddings are stored in L2 and L3: f32 (exact) | f16 (half the bytes).
    #[arg(long, env = "INFERPOOL_CACHE_ENCODING", default_value = "f32")]
    pub cache_encoding: String,
    /// Memory limit in MiB for the memory-pressure guard; 0 = the cgroup's limit, if any.
    #[arg(long, env = "INFERPOOL_MEMORY_LIMIT_MB", default_value = "0")]
    pub memory_limit_mb: String,
    /// Share of the memory limit above which the memory cache is shrunk, then cleared.
    #[arg(long, env = "INFERPOOL_MEMORY_PRESSURE_RATIO", default_value = "0.85")]
    pub memory_pressure_ratio: String,
    /// Log format: text | json.
    #[arg(long, env = "INFERPOOL_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Which execution provider to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// CUDA when the library and a GPU are there, otherwise the CPU.
    Auto,
    /// CUDA or fail.
    Cuda,
    /// The CPU only.
    Cpu,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated sidecar configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public API address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Model card path (resolved default included).
    pub model: PathBuf,
    /// Optimisation level.
    pub optimization: Optimization,
    /// Execution provider choice.
    pub provider: ProviderChoice,
    /// Durable state directory.
    pub data_dir: PathBuf,
    /// Initial tuning (generation 0) until the operator pushes one.
    pub tuning: Tuning,
    /// Model sessions.
    pub sessions: usize,
    /// Intra-op threads per session; None = chosen for the provider at load.
    pub threads: Option<usize>,
    /// Decode threads (resolved, >= 1).
    pub decode_threads: usize,
    /// How JPEGs are decoded.
    pub jpeg_decode: JpegDecode,
    /// Batch queue capacity.
    pub queue_capacity: usize,
    /// Default request deadline.
    pub default_deadline: Duration,
    /// Body size limit in bytes.
    pub max_body_bytes: usize,
    /// Image size limit in pixels.
    pub max_pixels: u64,
    /// Admin bearer token; tuning pushes are refused when absent.
    pub admin_token: Option<String>,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// How long to keep serving, not ready, after the shutdown signal before closing listeners.
    pub drain_delay: Duration,
    /// ONNX Runtime library path, if given.
    pub ort_library: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// The embedding cache.
    pub cache: CacheConfig,
    /// Resident memory above which the memory cache gives memory back, in bytes; None = unguarded.
    pub memory_threshold: Option<u64>,
    /// The memory limit in force (`--memory-limit-mb`, else the cgroup's), in bytes; None = none.
    pub memory_limit: Option<u64>,
}

/// Every configuration problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// Collects conversion errors while fields are read.
struct Check(Vec<String>);

impl Check {
    /// A secret given directly, or else read from a file (a mounted Secret); the trailing newline
    /// that editors and `kubectl create secret --from-file` leave is dropped.
    fn secret(&mut self, file_flag: &str, direct: Option<String>, file: Option<&std::path::Path>) -> Option<String> {
        match (direct, file) {
            (Some(v), _) => Some(v),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(v) => Some(v.trim_end_matches(['\r', '\n']).to_owned()),
                Err(e) => {
                    self.0.push(format!("--{file_flag} {}: {e}", path.display()));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn parse<T: FromStr>(&mut self, flag: &str, value: &str, default: T) -> T
    where
        T::Err: std::fmt::Display,
    {
        value.trim().parse().unwrap_or_else(|e| {
            self.0.push(format!("--{flag} {value:?}: {e}"));
            default
        })
    }

    fn range<T: FromStr + PartialOrd + Copy + std::fmt::Display>(&mut self, flag: &str, value: &str, lo: T, hi: T) -> T
    where
        T::Err: std::fmt::Display,
    {
        let v = self.parse(flag, value, lo);
        if v < lo || v > hi {
            self.0.push(format!("--{flag} {v} is outside {lo}..={hi}"));
            return lo;
        }
        v
    }
}

impl Args {
    /// Converts and checks every value, reporting all problems at once.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = Check(Vec::new());
        let listen = c.parse("listen", &self.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        let admin_listen = c.parse("admin-listen", &self.admin_listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        if listen == admin_listen && listen.port() != 0 {
            c.0.push(format!("--listen and --admin-listen are both {listen}"));
        }
        let optimization = c.parse("optimization", &self.optimization, Optimization::Balanced);
        let provider = match self.provider.to_ascii_lowercase().as_str() {
            "auto" => ProviderChoice::Auto,
            "cuda" => ProviderChoice::Cuda,
            "cpu" => ProviderChoice::Cpu,
            other => {
                c.0.push(format!("--provider {other:?}: expected auto, cuda or cpu"));
                ProviderChoice::Auto
            }
        };
        let log_format = match self.log_format.to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                c.0.push(format!("--log-format {other:?}: expected text or json"));
                LogFormat::Text
            }
        };
        let tuning = Tuning {
            generation: 0,
            max_batch_size: c.range("max-batch", &self.max_batch, 1, inferpool_crds::tuning::MAX_BATCH_SIZE),
            max_delay_ms: c.range("max-delay-ms", &self.max_delay_ms, 0, inferpool_crds::tuning::MAX_DELAY_MS),
            cache_entries: None,
        };
        let sessions = c.range("sessions", &self.sessions, 1usize, 64);
        let threads = c.range("threads", &self.threads, 0usize, 1024);
        let decode_threads = c.range("decode-threads", &self.decode_threads, 0usize, 1024);
        let jpeg_decode = c.parse("jpeg-decode", &self.jpeg_decode, JpegDecode::Reduced);
        let queue_capacity = c.range("queue-capacity", &self.queue_capacity, 1usize, 1 << 20);
        let default_deadline =
            Duration::from_millis(c.range("default-deadline-ms", &self.default_deadline_ms, 1u64, 600_000));
        let max_body_bytes = c.range("max-body-bytes", &self.max_body_bytes, 1024usize, 1 << 30);
        let max_pixels = c.range("max-pixels", &self.max_pixels, 1u64, 1 << 34);
        let shutdown_grace =
            Duration::from_secs(c.range("shutdown-grace-seconds", &self.shutdown_grace_seconds, 0u64, 3600));
        let drain_delay = Duration::from_secs(c.range("drain-delay-seconds", &self.drain_delay_seconds, 0u64, 3600));
        let admin_token = c.secret("admin-token-file", self.admin_token, self.admin_token_file.as_deref());
        if admin_token.as_deref().is_some_and(str::is_empty) {
            c.0.push("the admin token is empty".to_owned());
        }
        let memory_entries =
            c.range("memory-entries", &self.memory_entries, 0u64, inferpool_crds::tuning::MAX_CACHE_ENTRIES);
        let disk_mb = c.range("disk-mb", &self.disk_mb, 0u64, 1 << 30);
        let encoding = c.parse("cache-encoding", &self.cache_encoding, Encoding::F32);
        let ttl = Duration::from_secs(c.range("redis-ttl-seconds", &self.redis_ttl_seconds, 1u64, 30 * 86_400));
        let timeout = Duration::from_millis(c.range("redis-timeout-ms", &self.redis_timeout_ms, 1u64, 10_000));
        let redis_password = c.secret("redis-password-file", self.redis_password, self.redis_password_file.as_deref());
        let redis = self.redis_url.map(|url| {
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok || url.len() <= "rediss://".len() {
                c.0.push("--redis-url: expected redis://host:port[/db] or rediss://host:port[/db]".to_owned());
            }
            RedisConfig {
                url,
                username: self.redis_username.clone(),
                password: redis_password,
                ttl,
                timeout,
                embedding_prefix: self.redis_embedding_prefix.clone().unwrap_or_else(|| self.redis_prefix.clone()),
                prefix: self.redis_prefix.clone(),
            }
        });
        let memory_limit_mb = c.range("memory-limit-mb", &self.memory_limit_mb, 0u64, 1 << 30);
        let pressure_ratio = c.range("memory-pressure-ratio", &self.memory_pressure_ratio, 0.1f64, 1.0);
        let memory_limit = match memory_limit_mb {
            0 => crate::cache::pressure::cgroup_limit(),
            mb => Some(mb << 20),
        };
        let cache = CacheConfig {
            memory_entries,
            dir: self.cache_dir.unwrap_or_else(|| self.data_dir.join("cache")),
            disk_bytes: disk_mb << 20,
            redis,
            encoding,
        };
        let model = self.model.or_else(default_model).unwrap_or_else(|| PathBuf::from("models/effnet_lite0/card.json"));
        if !model.exists() {
            c.0.push(format!(
                "--model {}: no such file (run `make setup` to prepare the default model)",
                model.display()
            ));
        }
        if let Some(lib) = self.ort_library.as_ref().filter(|p| !p.exists()) {
            c.0.push(format!("--ort-library {}: no such file", lib.display()));
        }
        if !c.0.is_empty() {
            return Err(ConfigError(c.0));
        }
        let decode_threads = match decode_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Config {
            listen,
            admin_listen,
            model,
            optimization,
            provider,
            data_dir: self.data_dir,
            tuning,
            sessions,
            threads: (threads > 0).then_some(threads),
            decode_threads,
            jpeg_decode,
            queue_capacity,
            default_deadline,
            max_body_bytes,
            max_pixels,
            admin_token,
            shutdown_grace,
            drain_delay,
            ort_library: self.ort_library,
            log_format,
            cache,
            memory_threshold: memory_limit.map(|l| (l as f64 * pressure_ratio) as u64),
            memory_limit,
        })
    }
}

/// The repository checkout this binary was built from, when it still exists (cargo run/test).
pub fn source_root() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    root.join("Cargo.toml").exists().then_some(root)
}

/// The default model: `models/effnet_lite0/card.json` under the working directory or the checkout.
fn default_model() -> Option<PathBuf> {
    let rel = PathBuf::from("models/effnet_lite0/card.json");
    [Some(rel.clone()), source_root().map(|r| r.join(&rel))].into_iter().flatten().find(|p| p.exists())
}

#[cfg(test)]
mod tests;
