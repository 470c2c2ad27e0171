//! A real `prometheus` (the Debian package, on PATH) for tests of the autoscaler's Prometheus
//! source: it listens on a free loopback port, scrapes the given targets every `scrape_interval`,
//! keeps its TSDB in a temporary directory and is killed when dropped.
//!
//! Each target carries `__meta_kubernetes_namespace` and `__meta_kubernetes_pod_name` labels that
//! the job's `relabel_configs` copy to `namespace` and `pod`, exactly as a cluster's
//! `kubernetes_sd_configs` job does (docs/autoscaling-prometheus.md), so the series look as they
//! would in a cluster. Readiness is `/-/ready`; [`Prometheus::wait_up`] waits for the first
//! successful scrape of every target (Prometheus has no event for either, so both poll with a
//! bounded timeout).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How often readiness and targets are polled.
const POLL: Duration = Duration::from_millis(100);
/// How long Prometheus may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why Prometheus could not be started or asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary is not on PATH.
    #[error("`prometheus` is not installed (not on PATH): run `make setup`, which installs the Debian package")]
    Missing,
    /// Writing its configuration or starting it failed.
    #[error("cannot start prometheus: {0}")]
    Io(#[from] std::io::Error),
    /// It exited on its own.
    #[error("prometheus exited ({status}); its log:\n{log}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// What it logged.
        log: String,
    },
    /// Something it should reach did not happen in time.
    #[error("prometheus: {what} within {timeout:?}; its log:\n{log}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        timeout: Duration,
        /// What it logged.
        log: String,
    },
    /// An API call failed.
    #[error("prometheus API {path}: {reason}")]
    Api {
        /// The path called.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// One scrape target: a sidecar's admin address and the pod it stands for.
#[derive(Debug, Clone)]
pub struct Target {
    /// host:port of the `/metrics` endpoint.
    pub address: SocketAddr,
    /// Namespace label value.
    pub namespace: String,
    /// Pod label value.
    pub pod: String,
}

/// A running `prometheus`, killed on drop.
pub struct Prometheus {
    child: Child,
    port: u16,
    targets: usize,
    dir: tempfile::TempDir,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every `scrape_interval` and waits until it is ready.
    pub async fn start(targets: &[Target], scrape_interval: Duration) -> Result<Prometheus, Error> {
        // Another process may take the probed port before Prometheus binds it: try a few.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::tempdir()?;
            std::fs::write(dir.path().join("prometheus.yml"), config_yaml(targets, scrape_interval))?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = spawn(dir.path(), port)?;
            let http = Client::builder(TokioExecutor::new()).build_http();
            let mut prometheus = Prometheus { child, port, targets: targets.len(), dir, http };
            match prometheus.wait_ready().await {
                Ok(()) => return Ok(prometheus),
                Err(e @ Error::Exited { .. }) if attempt < 3 && e.to_string().contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The base URL of its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until every target has been scraped successfully at least once.
    pub async fn wait_up(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let targets = self.get("/api/v1/targets?state=active").await?;
            let active = targets.pointer("/data/activeTargets").and_then(Value::as_array).cloned().unwrap_or_default();
            let up = active.iter().filter(|t| t.get("health").and_then(Value::as_str) == Some("up")).count();
            if up >= self.targets {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(self.timeout(format!("{up} of {} targets up", self.targets), timeout));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs an instant query and returns its `data.result`.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, Error> {
        let encoded: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") })
            .collect();
        let answer = self.get(&format!("/api/v1/query?query={encoded}")).await?;
        match answer.pointer("/data/result").and_then(Value::as_array) {
            Some(result) => Ok(result.clone()),
            None => Err(Error::Api { path: "/api/v1/query".to_owned(), reason: answer.to_string() }),
        }
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let uri: http::Uri = format!("{}/-/ready", self.url())
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::Api { path: "/-/ready".to_owned(), reason: e.to_string() })?;
        loop {
            if let Ok(Ok(r)) = tokio::time::timeout(POLL * 10, self.http.get(uri.clone())).await
                && r.status().is_success()
            {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(self.timeout("not ready".to_owned(), READY_TIMEOUT));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn get(&self, path: &str) -> Result<Value, Error> {
        let api = |reason: String| Error::Api { path: path.to_owned(), reason };
        let uri: http::Uri =
            format!("{}{path}", self.url()).parse().map_err(|e: http::uri::InvalidUri| api(e.to_string()))?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.http.get(uri))
            .await
            .map_err(|_| api("no answer within 5 s".to_owned()))?
            .map_err(|e| api(e.to_string()))?;
        let body = response.into_body().collect().await.map_err(|e| api(e.to_string()))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| api(format!("{e}: {}", String::from_utf8_lossy(&body))))
    }

    fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait()? {
            Some(status) => Err(Error::Exited { status, log: self.log() }),
            None => Ok(()),
        }
    }

    fn timeout(&self, what: String, timeout: Duration) -> Error {
        Error::Timeout { what, timeout, log: self.log() }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(dir: &Path, port: u16) -> Result<Child, Error> {
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn().map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { Error::Missing } else { Error::Io(e) })
}

/// The configuration: one job, static targets relabelled as a kubernetes_sd job would be.
pub fn config_yaml(targets: &[Target], scrape_interval: Duration) -> String {
    let interval = format!("{}ms", scrape_interval.as_millis().max(1));
    let mut yaml = format!(
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\n\
         scrape_configs:\n  - job_name: inferpool\n    static_configs:\n"
    );
    for t in targets {
        // JSON strings are valid YAML scalars, so quoting is exact whatever the names hold.
        let _ = write!(
            yaml,
            "      - targets: [{}]\n        labels: {{__meta_kubernetes_namespace: {}, __meta_kubernetes_pod_name: {}}}\n",
            Value::from(t.address.to_string()),
            Value::from(t.namespace.as_str()),
            Value::from(t.pod.as_str()),
        );
    }
    yaml.push_str(
        "    relabel_configs:\n\
         \x20     - source_labels: [__meta_kubernetes_namespace]\n        target_label: namespace\n\
         \x20     - source_labels: [__meta_kubernetes_pod_name]\n        target_label: pod\n",
    );
    yaml
}
