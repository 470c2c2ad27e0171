//! A real sidecar process on a loopback address, outside any control plane: for tests that need
//! sidecars but not pods (a Prometheus scraping them, the dashboard's queries). Its output goes to
//! `sidecar.log` in its own temporary directory; it is killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

/// One running sidecar.
pub struct SidecarProcess {
    /// The name it stands for (a pod name).
    pub name: String,
    /// Its API listener.
    pub api: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

fn free(ip: &str) -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind((ip, 0))?.local_addr()
}

impl SidecarProcess {
    /// Starts the default model on the CPU, one thread, a 16 MiB disk cache, on free ports of
    /// `ip`, with `env` added (or overriding).
    pub fn spawn(name: &str, ip: &str, env: &[(&str, &str)]) -> std::io::Result<SidecarProcess> {
        let dir = tempfile::tempdir()?;
        let (api, admin) = (free(ip)?, free(ip)?);
        let log = std::fs::File::create(dir.path().join("sidecar.log"))?;
        let card = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/effnet_lite0/card.json");
        let mut command = tokio::process::Command::new(crate::fixtures::sidecar_bin()?);
        command
            .env("INFERPOOL_LISTEN", api.to_string())
            .env("INFERPOOL_ADMIN_LISTEN", admin.to_string())
            .env("INFERPOOL_MODEL", card)
            .env("INFERPOOL_PROVIDER", "cpu")
            .env("INFERPOOL_THREADS", "1")
            .env("INFERPOOL_DISK_MB", "16")
            .env("INFERPOOL_DATA_DIR", dir.path().join("data"));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(SidecarProcess { name: name.to_owned(), api, admin, child, dir })
    }

    /// What it wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// Waits for the admin `/ready` latch (polled, as a kubelet's readiness probe does); an error
    /// with its log when it exits or is not ready within `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = call(Method::GET, &format!("http://{}/ready", self.admin), &[], Vec::new()).await {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("sidecar {} exited ({status}):\n{}", self.name, self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("sidecar {} not ready in {timeout:?}:\n{}", self.name, self.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills it now (a crash, as far as anyone watching can tell).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// One HTTP/1.1 call with a 30 s limit: the status and the body.
pub async fn call(method: Method, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<(u16, Bytes), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (key, value) in headers {
        request = request.header(*key, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| format!("{url}: no answer in 30 s"))?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}
