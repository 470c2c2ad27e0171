//! `inferpool-local`: the local control plane as a process, for running the operator (or kubectl)
//! against it by hand, and `apply -f` / `delete -f` to feed it manifests. Test infrastructure,
//! not a product.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::apiserver::persist::Saver;
use inferpool_tests::apply::{self, Client};
use inferpool_tests::kubelet::{Kubelet, Mode};

/// A local Kubernetes API double and kubelet double.
#[derive(Parser)]
#[command(name = "inferpool-local", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the API and runs the kubelet until SIGINT or SIGTERM.
    Up {
        /// Where to write a kubeconfig pointing at the API double.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// fake: pods are Ready at once; process: each pod runs the real sidecar.
        #[arg(long, default_value = "fake")]
        mode: String,
        /// The sidecar binary for process mode (default: inferpool-sidecar next to this binary).
        #[arg(long)]
        sidecar_bin: Option<PathBuf>,
        /// Address of the API double.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// A Service proxy, `ADDRESS=NAMESPACE/SERVICE` (e.g. 127.0.0.1:8080=default/model):
        /// connections to ADDRESS go round robin to the Service's ready endpoints. Repeatable.
        #[arg(long)]
        proxy: Vec<String>,
        /// Keep the objects in this file: loaded at start, saved on changes and at shutdown.
        #[arg(long)]
        state_file: Option<PathBuf>,
    },
    /// Server-side applies every object of a multi-document YAML file, as `kubectl apply
    /// --server-side --force-conflicts` does.
    Apply {
        /// The manifest file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The kubeconfig (default: $KUBECONFIG, else ~/.kube/config).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// The field manager the objects are applied as.
        #[arg(long, default_value = "inferpool-local")]
        field_manager: String,
    },
    /// Deletes every object of a multi-document YAML file.
    Delete {
        /// The manifest file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The kubeconfig (default: $KUBECONFIG, else ~/.kube/config).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
}

fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: inferpool-local\n  cluster:\n    server: {server}\n\
         contexts:\n- name: inferpool-local\n  context:\n    cluster: inferpool-local\n    user: inferpool-local\n    namespace: default\n\
         current-context: inferpool-local\nusers:\n- name: inferpool-local\n  user: {{}}\n"
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inferpool_serve::init_logging(inferpool_serve::LogFormat::Text, "INFERPOOL_LOG", "info");
    let (path, mode, sidecar_bin, listen, proxy, state_file) = match Cli::parse().command {
        Command::Up { kubeconfig, mode, sidecar_bin, listen, proxy, state_file } => {
            (kubeconfig, mode, sidecar_bin, listen, proxy, state_file)
        }
        Command::Apply { file, kubeconfig, field_manager } => {
            return manifests(&file, kubeconfig, Some(&field_manager)).await;
        }
        Command::Delete { file, kubeconfig } => return manifests(&file, kubeconfig, None).await,
    };
    let mode = match mode.as_str() {
        "fake" => Mode::Fake,
        "process" => {
            let sidecar = match sidecar_bin {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("inferpool-sidecar"),
            };
            anyhow::ensure!(sidecar.exists(), "--sidecar-bin {}: no such file", sidecar.display());
            Mode::Process { sidecar }
        }
        other => anyhow::bail!("--mode {other:?}: expected fake or process"),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("--listen {listen}"))?;
    let server = ApiServer::start(listener)?;
    let saver = state_file.map(|f| Saver::start(Arc::clone(&server.store), f)).transpose()?;
    let kubelet = Kubelet::start(Arc::clone(&server.store), mode)?;
    for spec in proxy {
        let (addr, target) = spec.split_once('=').context("--proxy: expected ADDRESS=NAMESPACE/SERVICE")?;
        let (ns, svc) = target.split_once('/').context("--proxy: expected ADDRESS=NAMESPACE/SERVICE")?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--proxy {addr}"))?;
        tracing::info!(listen = %listener.local_addr()?, service = target, "proxy");
        tokio::spawn(inferpool_tests::proxy::serve(listener, Arc::clone(&server.store), ns.to_owned(), svc.to_owned()));
    }
    std::fs::write(&path, kubeconfig(&server.url())).with_context(|| format!("--kubeconfig {}", path.display()))?;
    tracing::info!(server = server.url(), kubeconfig = %path.display(), "up");
    inferpool_serve::shutdown_signal().await;
    tracing::info!("stopping: killing every pod's process");
    kubelet.shutdown().await;
    saver.map(Saver::finish).transpose()?;
    drop(server);
    Ok(())
}

/// Applies (with a field manager) or deletes the objects in `file`, printing one line per object
/// as kubectl does; every object is tried, and any failure makes the exit status non-zero.
async fn manifests(file: &Path, kubeconfig: Option<PathBuf>, apply_as: Option<&str>) -> anyhow::Result<()> {
    let kubeconfig = match kubeconfig {
        Some(k) => k,
        None => PathBuf::from(std::env::var_os("HOME").context("no --kubeconfig, $KUBECONFIG or $HOME")?)
            .join(".kube/config"),
    };
    let mut client = Client::new(apply::read_kubeconfig(&kubeconfig)?);
    let objects = apply::read_manifests(file)?;
    let mut failed = 0;
    for (i, object) in objects.iter().enumerate() {
        let done = match apply_as {
            Some(manager) => client.apply(object, manager).await.map(|(name, how)| format!("{name} {}", how.as_str())),
            None => client.delete(object).await.map(|name| format!("{name} deleted")),
        };
        match done {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed += 1;
                let what =
                    object.pointer("/metadata/name").and_then(serde_json::Value::as_str).map_or(String::new(), |n| {
                        format!(" ({}/{n})", object.get("kind").and_then(serde_json::Value::as_str).unwrap_or("?"))
                    });
                eprintln!("error: {}: document {}{what}: {e}", file.display(), i + 1);
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} objects in {} failed", objects.len(), file.display());
    Ok(())
}
