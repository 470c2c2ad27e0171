//! Test helpers: start a real sidecar on free loopback ports, talk HTTP to it, and find the real
//! photos that `make setup` installs (scikit-image's bundled images in the venv).
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod proc;
pub mod redis;

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use inferpool_sidecar::config::Config;
use inferpool_sidecar::{App, Args};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The default model's card (prepared by `make setup`).
pub fn card() -> PathBuf {
    let card = root().join("models/effnet_lite0/card.json");
    let model = root().join("models/effnet_lite0/effnet_lite0_fp32.onnx");
    assert!(model.exists(), "{} is missing: run `make setup` first", model.display());
    card
}

/// The Python interpreter of the project venv.
pub fn python() -> PathBuf {
    root().join(".cache/venv/bin/python")
}

/// A real photo from scikit-image's data directory in the venv, as stored (PNG or JPEG).
pub fn photo(name: &str) -> Vec<u8> {
    let lib = root().join(".cache/venv/lib");
    let dir = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make setup`", lib.display()))
        .filter_map(|e| Some(e.ok()?.path().join("site-packages/skimage/data")))
        .find(|p| p.exists())
        .expect("scikit-image is not installed in the venv; run `make setup`");
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Re-encodes an image as JPEG with the given quality.
pub fn jpeg(img: &image::DynamicImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    img.to_rgb8().write_with_encoder(enc).unwrap();
    out
}

/// Encodes an image as PNG.
pub fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Decodes an image.
pub fn decode(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory(bytes).unwrap()
}

/// A sidecar running in this process on free ports.
/// The configuration [`Server::start`] runs with: the default model, `data_dir`, the test admin
/// token, loopback listeners, plus `flags`.
pub fn config(data_dir: &Path, flags: &[&str]) -> Config {
    let card = card();
    let base = [
        "inferpool-sidecar",
        "--model",
        card.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--admin-token",
        TOKEN,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    Args::try_parse_from(base.iter().chain(flags.iter())).unwrap().into_config().unwrap()
}

pub struct Server {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _data: Option<tempfile::TempDir>,
}

pub const TOKEN: &str = "test-admin-token";

impl Server {
    /// Starts a sidecar with the default model plus `flags`, and waits until it is ready.
    pub async fn start(flags: &[&str]) -> Server {
        let data = tempfile::tempdir().unwrap();
        let mut s = Self::start_in(data.path(), flags).await;
        s._data = Some(data);
        s
    }

    /// Like [`Server::start`] with a given data directory (to test restarts).
    pub async fn start_in(data_dir: &Path, flags: &[&str]) -> Server {
        let config = config(data_dir, flags);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let app = Arc::new(App::new(config).unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn({
            let app = Arc::clone(&app);
            async move {
                inferpool_sidecar::serve(app, listener, admin, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        tokio::time::timeout(Duration::from_secs(60), app.wait_ready()).await.unwrap().unwrap();
        Server { addr, admin: admin_addr, app, stop: Some(stop), done: Some(done), _data: None }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Stops the server and waits for it to finish its work.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.unwrap();
        }
    }
}

/// A reply: status, headers, body.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http())
}

/// Sends one request.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    try_send(method, url, headers, body).await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Sends one request; a connection that fails or breaks off is an error (for load tests that
/// count such failures instead of stopping at the first).
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client().request(req.body(Full::new(body.into())).unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}

pub async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// POSTs image bytes.
pub async fn post_image(url: &str, image: &[u8]) -> Reply {
    send(Method::POST, url, &[("content-type", "image/jpeg")], image.to_vec()).await
}

/// PUTs JSON.
pub async fn put_json(url: &str, value: &Value) -> Reply {
    send(Method::PUT, url, &[("content-type", "application/json")], serde_json::to_vec(value).unwrap()).await
}

/// A profile upload body with one image reference per (id, bytes).
pub fn profile_body(refs: &[(&str, &[u8])]) -> Value {
    use base64::Engine;
    let refs: Vec<_> = refs
        .iter()
        .map(|(id, b)| serde_json::json!({"id": id, "image_b64": base64::engine::general_purpose::STANDARD.encode(b)}))
        .collect();
    serde_json::json!({ "references": refs })
}

/// The value of the series of metric `name` that carries every `labels` pair, 0 if absent
/// (whatever order the exposition writes the labels in).
pub fn metric_with(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The value of a Prometheus series (first line that starts with `series`), 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}
