//! What both parts of the benchmark share: the operator binary as a child process, its CPU and
//! memory from /proc, a count of the API double's requests, and a small HTTP client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// The namespace every pool of the benchmark lives in.
pub const NS: &str = "default";

/// Proxy variables the operator must not see: the double is on loopback.
const PROXY_VARS: [&str; 8] =
    ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"];

/// Requests the API double served, counted from its own "api" log event (one per request, a
/// watch counted once when it starts), by method and resource.
#[derive(Clone, Default)]
pub struct ApiCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl ApiCounter {
    /// The counts so far, by "METHOD resource[/subresource][ watch]".
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// `after - before` per key, and the total.
pub fn api_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (u64, BTreeMap<String, u64>) {
    let by: BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    (by.values().sum(), by)
}

#[derive(Default)]
struct ApiEvent {
    message: String,
    method: String,
    path: String,
    query: String,
}

impl Visit for ApiEvent {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "path" => self.path = value.to_owned(),
            "query" => self.query = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "method" => self.method = format!("{value:?}"),
            "path" => self.path = format!("{value:?}").trim_matches('"').to_owned(),
            "query" => self.query = format!("{value:?}").trim_matches('"').to_owned(),
            _ => {}
        }
    }
}

/// `/apis/g/v/namespaces/ns/plural/name/sub` -> `plural/sub`.
fn resource_of(path: &str) -> String {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return path.to_owned(),
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    match rest {
        [plural, _, sub, ..] => format!("{plural}/{sub}"),
        [plural, ..] => (*plural).to_owned(),
        [] => "namespaces".to_owned(),
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ApiCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "inferpool_tests::apiserver" {
            return;
        }
        let mut seen = ApiEvent::default();
        event.record(&mut seen);
        if seen.message != "api" {
            return;
        }
        let watch = seen.query.split('&').any(|p| p == "watch=true" || p == "watch=1");
        let key = format!("{} {}{}", seen.method, resource_of(&seen.path), if watch { " watch" } else { "" });
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(key).or_default() += 1;
        }
    }
}

/// A plain HTTP/1 client.
pub type Http = HyperClient<HttpConnector, Full<Bytes>>;

/// A client with keep-alive connections.
pub fn http() -> Http {
    HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// GET `url`, its status and body, or None on any failure or after `timeout`.
pub async fn get(http: &Http, url: &str, timeout: Duration) -> Option<(u16, Bytes)> {
    let request = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let response = tokio::time::timeout(timeout, http.request(request)).await.ok()?.ok()?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(timeout, response.into_body().collect()).await.ok()?.ok()?.to_bytes();
    Some((status, body))
}

/// Writes a kubeconfig for the API double at `server`.
pub fn write_kubeconfig(path: &Path, server: &str) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: {server}\n\
         contexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\n    namespace: {NS}\n\
         current-context: bench\nusers:\n- name: bench\n  user: {{}}\n"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The release operator binary, running as a child process.
pub struct OperatorProcess {
    child: tokio::process::Child,
    /// Its process id.
    pub pid: u32,
    /// Its /metrics.
    pub metrics_url: String,
}

impl OperatorProcess {
    /// Starts `bin run` against the cluster in `kubeconfig`, its log to `log`, and waits until
    /// its /readyz answers (it has reached the API server).
    pub async fn start(bin: &Path, kubeconfig: &Path, log: &Path) -> anyhow::Result<OperatorProcess> {
        if !bin.exists() {
            bail!("{} is missing: build it with `cargo build --release -p inferpool-operator`", bin.display());
        }
        // Port 0 would hide where /metrics is; a port just freed is as good here.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = tokio::process::Command::new(bin);
        command
            .args(["run", "--leader-election", "false", "--log-format", "json", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("KUBECONFIG", kubeconfig)
            .env("INFERPOOL_OPERATOR_ADMIN_KEY", inferpool_tests::fixtures::OPERATOR_ADMIN_KEY)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        let child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the operator exited at once")?;
        let mut op = OperatorProcess { child, pid, metrics_url: format!("http://127.0.0.1:{port}/metrics") };
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let client = http();
        for _ in 0..300 {
            if let Some(status) = op.child.try_wait()? {
                bail!("the operator exited with {status}; see {}", log.display());
            }
            if get(&client, &ready, Duration::from_secs(1)).await.is_some_and(|(s, _)| s == 200) {
                return Ok(op);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the operator was not ready within 30 s; see {}", log.display())
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the operator exited with {status}");
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        let _ = tokio::process::Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status().await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// User + system CPU time of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are space separated.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?) };
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second, from `getconf CLK_TCK`.
pub fn clk_tck() -> anyhow::Result<u64> {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().context("running getconf")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("getconf CLK_TCK")
}

/// A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(&format!("{key}:"))).with_context(|| format!("no {key}"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb * 1024)
}

/// The sum of every series of `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `(status, reason)` of the pool's condition `type_` in a stored object.
pub fn condition(object: &Value, type_: &str) -> Option<String> {
    object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))?
        .get("status")?
        .as_str()
        .map(str::to_owned)
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// An absolute path (the operator runs with its own working directory semantics otherwise).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() { path.to_owned() } else { std::env::current_dir()?.join(path) })
}
