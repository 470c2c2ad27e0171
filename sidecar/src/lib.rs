//! inferpool's inference sidecar.
//!
//! One process per model-replica pod. It serves image embedding and matching over HTTP, batches
//! concurrent requests into ONNX Runtime, keeps profiles of reference images, and reports its SLA
//! for the operator. A request flows `http::api` (parse) -> `embed` (the request pipeline: cache
//! tiers, admission, the decode stage running `preprocess`, the batcher, the engine) -> `matcher`;
//! `metrics` and `sla` observe every step, `report` serves what they saw.
//!
//! [`run`] is the whole server as a library function: it takes bound listeners and a shutdown
//! future, so tests bind port 0 and stop it cleanly.

pub mod app;
pub mod cache;
pub mod config;
pub mod embed;
pub mod engine;
pub mod http;
pub mod keypoints;
pub mod labels;
pub mod matcher;
pub mod metrics;
pub mod model;
pub mod pdq;
pub mod preprocess;
pub mod profiles;
pub mod report;
pub mod sla;

use std::future::Future;
use std::sync::Arc;

use inferpool_serve::Stopped;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use app::{App, Phase, StartError};
pub use config::{Args, Config};

/// Longest the shutdown waits for queued cache writes.
const CACHE_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the public API on `listener` and the admin API on `admin` until `shutdown` completes.
///
/// The listeners answer at once (`/readyz` is 503 until the model is loaded and warmed). On
/// shutdown the sidecar reports not-ready, stops accepting connections, lets in-flight requests
/// and queued work finish within the grace period, and returns. A model that fails to load ends
/// the server with the error.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    serve(Arc::new(App::new(config)?), listener, admin, shutdown).await
}

/// [`run`] for an [`App`] the caller already holds (tests use it to await readiness).
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let grace = app.config.shutdown_grace;
    if app.config.admin_token.is_none() {
        tracing::warn!("no admin token configured: tuning pushes (PUT /api/v1/tuning) are refused");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let public = http::serve(listener, Arc::clone(&app), http::Listener::Public, stop_rx.clone(), grace);
    let admin = http::serve(admin, Arc::clone(&app), http::Listener::Admin, stop_rx, grace);
    if let Some(threshold) = app.config.memory_threshold {
        cache::pressure::spawn(Arc::clone(&app.cache), threshold, report::rss_bytes);
    }
    if let Some(sync) = &app.profile_sync {
        Arc::clone(sync).spawn();
    }
    let loader = {
        let app = Arc::clone(&app);
        tokio::task::spawn_blocking(move || app.load_model())
    };
    // Each listener stops accepting when `stop_tx` turns true, then drains its connections.
    let mut serving = Box::pin(async {
        let (public, admin) = tokio::join!(public, admin);
        if public == Stopped::GraceExpired || admin == Stopped::GraceExpired {
            tracing::warn!(seconds = grace.as_secs(), "grace period over; closing the remaining connections");
        }
    });
    tokio::pin!(shutdown);
    let mut loader = std::pin::pin!(loader);
    let mut load_result = None;
    let mut signalled = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                signalled = true;
                break;
            }
            _ = &mut serving => break,
            loaded = &mut loader, if load_result.is_none() => {
                match loaded.map_err(|e| StartError::Task(e.to_string())).and_then(|r| r) {
                    Ok(l) => {
                        tracing::info!(provider = l.provider.as_str(), variant = l.variant.as_str(), "ready");
                        load_result = Some(Ok(()));
                    }
                    Err(e) => {
                        load_result = Some(Err(e));
                        break;
                    }
                }
            }
        }
    }
    app.set_draining();
    let delay = app.config.drain_delay;
    if signalled && !delay.is_zero() {
        // Readiness is false from now on; endpoints take a moment to drop this replica, and until
        // they do, new requests keep arriving and are served (each with `Connection: close`).
        tracing::info!(seconds = delay.as_secs(), "shutting down: not ready, still serving while endpoints update");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = &mut serving => {}
        }
    }
    tracing::info!("shutting down: closing the listeners, draining connections and queued work");
    let _ = stop_tx.send(true);
    serving.as_mut().await;
    drop(serving);
    let drained = Arc::clone(&app);
    let _ = tokio::task::spawn_blocking(move || drained.drain()).await;
    // Cache writes still queued are worth keeping (a restarted replica answers them from disk).
    if tokio::time::timeout(CACHE_FLUSH, app.cache.flush()).await.is_err() {
        tracing::warn!("cache writes still queued at exit were dropped");
    }
    match load_result {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}
