//! `inferpool-operator`: `run` the controller, or print the `crd`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use inferpool_operator::build::{AdminKey, Settings};
use inferpool_operator::controller::{self, Context};
use inferpool_operator::leader::{self, LeaseSettings};
use inferpool_operator::metrics::Metrics;
use inferpool_operator::server::{self, State};
use kube::runtime::events::Reporter;
use tokio::sync::watch;

/// The sidecar image of this release.
const DEFAULT_IMAGE: &str = concat!("ghcr.io/inferpool/sidecar:", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(
    name = "inferpool-operator",
    version,
    about = "Runs InferencePools on Kubernetes and keeps them inside their SLA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile InferencePools (uses KUBECONFIG or the in-cluster service account).
    Run(Box<RunArgs>),
    /// Print the InferencePool CustomResourceDefinition as YAML.
    Crd,
    /// Print what the operator would create for a pool (no cluster needed).
    Render {
        /// The InferencePool manifest (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        /// Sidecar image for a pool that names none.
        #[arg(long, env = "INFERPOOL_OPERATOR_DEFAULT_IMAGE", default_value = DEFAULT_IMAGE)]
        default_image: String,
        /// Sidecar image with CUDA for a GPU pool that names none.
        #[arg(long, env = "INFERPOOL_OPERATOR_GPU_IMAGE")]
        gpu_image: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Only manage pools in this namespace (default: all namespaces).
    #[arg(long, env = "INFERPOOL_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Sidecar image for CPU pools that do not name one.
    #[arg(long, env = "INFERPOOL_OPERATOR_DEFAULT_IMAGE", default_value = DEFAULT_IMAGE)]
    default_image: String,
    /// Sidecar image with the CUDA provider (sidecar/Dockerfile.cuda) for GPU pools that do not
    /// name one. Without it such pools are refused with a Degraded condition.
    #[arg(long, env = "INFERPOOL_OPERATOR_GPU_IMAGE")]
    gpu_image: Option<String>,
    /// imagePullPolicy of the sidecar container (default: the cluster's default).
    #[arg(long, env = "INFERPOOL_OPERATOR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "INFERPOOL_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Elect a leader on a Lease so that only one replica reconciles (true|false).
    #[arg(long, env = "INFERPOOL_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "INFERPOOL_OPERATOR_LEASE_NAME", default_value = "inferpool-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (default: --namespace, else the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a leader's lease lasts without renewal; a standby takes over within this time.
    #[arg(long, env = "INFERPOOL_OPERATOR_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease (default: the pod name, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "INFERPOOL_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// File holding the key every pool's admin token is derived from (at least 16 bytes; the Helm
    /// chart mounts a generated Secret). Keep it stable: a new key makes replicas refuse pushes.
    #[arg(long, env = "INFERPOOL_OPERATOR_ADMIN_KEY_FILE", required_unless_present = "admin_key")]
    admin_key_file: Option<std::path::PathBuf>,
    /// The admin key itself; prefer --admin-key-file.
    #[arg(long, env = "INFERPOOL_OPERATOR_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
}

/// Exit status for a configuration error (EX_USAGE), as the sidecar uses.
const EXIT_CONFIG: u8 = 64;

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Render { file, default_image, gpu_image } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            };
            let settings = Settings { default_image, gpu_image, image_pull_policy: None };
            print_or_fail(text.map_err(|e| format!("{}: {e}", file.display())).and_then(|t| {
                inferpool_operator::render::render(&t, &settings).map_err(|e| format!("{}: {e}", file.display()))
            }))
        }
        Command::Crd => print_or_fail(inferpool_crds::crd_yaml().map_err(|e| e.to_string())),
        Command::Run(args) => {
            let admin_key = match admin_key(&args) {
                Ok(key) => key,
                Err(error) => {
                    eprintln!("inferpool-operator: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("inferpool-operator: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args, admin_key)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The admin key from --admin-key or --admin-key-file, or why there is none.
fn admin_key(args: &RunArgs) -> Result<AdminKey, String> {
    let (material, from) = match (&args.admin_key, &args.admin_key_file) {
        (Some(key), _) => (key.clone().into_bytes(), "--admin-key".to_owned()),
        (None, Some(path)) => {
            let material = std::fs::read(path).map_err(|e| format!("--admin-key-file {}: {e}", path.display()))?;
            (material, format!("--admin-key-file {}", path.display()))
        }
        (None, None) => return Err("--admin-key-file (or INFERPOOL_OPERATOR_ADMIN_KEY) is required".to_owned()),
    };
    AdminKey::from_material(&material).map_err(|e| format!("{from}: {e}"))
}

/// Prints a document and succeeds, or says what went wrong and fails.
fn print_or_fail(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("inferpool-operator: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let format = match format {
        LogFormat::Json => inferpool_serve::LogFormat::Json { flatten_event: true },
        LogFormat::Text => inferpool_serve::LogFormat::Text,
    };
    inferpool_serve::init_logging(format, "RUST_LOG", "info,kube_lease_manager=warn");
}

async fn run(args: RunArgs, admin_key: AdminKey) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let state = Arc::new(State { metrics: metrics.clone(), ready: Default::default() });
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(server::serve(listener, state.clone(), controller::stop_signal(stopped.clone())));
    tokio::spawn(async move {
        inferpool_serve::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });

    let config =
        kube::Config::infer().await.context("finding the Kubernetes API (KUBECONFIG or in-cluster service account)")?;
    let client = kube::Client::try_from(controller::identified(config)).context("connecting to the Kubernetes API")?;
    client.apiserver_version().await.context("reaching the Kubernetes API server")?;
    state.ready.store(true, Ordering::Release);

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let reporter = Reporter { controller: "inferpool-operator".into(), instance: Some(identity.clone()) };
    let settings = Settings {
        default_image: args.default_image.clone(),
        gpu_image: args.gpu_image.clone(),
        image_pull_policy: args.image_pull_policy.clone(),
    };
    let ctx = Arc::new(Context::new(client.clone(), settings, admin_key, reporter, metrics.clone()));
    let namespace = args.namespace.clone();
    let reconcile = || controller::run(ctx.clone(), namespace.as_deref(), stopped.clone());
    if args.leader_election {
        let lease = LeaseSettings {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone().or(args.namespace.clone()).unwrap_or_else(|| "default".into()),
            identity,
            duration_seconds: args.lease_duration_seconds,
        };
        leader::lead(client, &lease, metrics, stopped.clone(), reconcile).await.context("leader election")?;
    } else {
        metrics.leader.set(1);
        reconcile().await;
    }
    let _ = server.await;
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
