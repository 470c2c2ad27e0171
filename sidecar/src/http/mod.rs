//! HTTP plumbing shared by the public API and the admin listener: both listeners run
//! `inferpool_serve::serve` (graceful shutdown, backoff on accept errors); this module adds body
//! limits, JSON responses and per-request metrics.

pub mod admin;
pub mod api;
pub mod error;
pub mod parse;
mod profiles;
pub mod request_id;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use inferpool_serve::{Options, Stopped};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

pub use error::ApiError;

use crate::app::{App, Phase};
use crate::metrics::Route;

/// Response type of every handler.
pub type Resp = Response<Full<Bytes>>;

/// A JSON response with the given status.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A plain-text response.
pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The JSON error body for an [`ApiError`], with Retry-After on 429 and 503 (whole seconds: the
/// time the queue needs to drain for a load refusal, 1 otherwise).
pub fn error_response(err: &ApiError) -> Resp {
    let (status, code) = err.status_code();
    let mut resp = json(status, &serde_json::json!({"error": {"code": code, "message": err.to_string()}}));
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        let seconds = err.retry_after().map_or(1, |d| d.as_secs().max(1));
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    resp
}

/// Reads the whole body, refusing more than `limit` bytes (by Content-Length before reading).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::BodyTooLarge(limit)),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

/// Reads and drops up to `limit` bytes of a body whose request was refused, frame by frame
/// (nothing is kept), so the connection can carry the answer and the next request. A longer body,
/// or one that fails, is left to hyper, which then closes the connection.
pub async fn discard_body(req: Request<Incoming>, limit: usize) {
    let mut body = req.into_body();
    let mut seen = 0usize;
    while seen <= limit {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public API.
    Public,
    /// The admin listener.
    Admin,
}

/// Routes one request inside its span, answers it with its request id, and records its metrics.
async fn handle(app: Arc<App>, which: Listener, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let started = Instant::now();
    let id = request_id::of(req.headers());
    // Info level, so that the warnings logged under the default filter carry the request's fields.
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %req.method(),
        route = match which {
            Listener::Public => api::route_of(req.uri().path()),
            Listener::Admin => admin::route_of(req.uri().path()),
        }
        .as_str(),
    );
    let mut resp = answer(&app, which, req, started).instrument(span).await;
    resp.headers_mut().insert(request_id::HEADER, id);
    if app.phase() == Phase::Draining {
        // Shutting down: the client must not reuse this connection for its next request.
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

async fn answer(app: &Arc<App>, which: Listener, req: Request<Incoming>, started: Instant) -> Resp {
    let (route, result) = match which {
        Listener::Public => api::route(app, req).await,
        Listener::Admin => admin::route(app, req).await,
    };
    let resp = result.unwrap_or_else(|e| {
        // 503 and 504 are load, counted in metrics; logging each would flood the log under overload.
        if e.status_code().0 == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %e, "request failed");
        }
        error_response(&e)
    });
    let took = started.elapsed();
    // Debug: one line per request would flood the log under load at info.
    tracing::debug!(status = resp.status().as_u16(), duration_ms = took.as_secs_f64() * 1e3, "served");
    app.metrics.request(route, resp.status().as_u16(), took);
    resp
}

/// Result of routing: the route label and the handler's outcome.
pub type Routed = (Route, Result<Resp, ApiError>);

/// Serves `listener` until `stop` turns true, then lets open connections finish within `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    which: Listener,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Stopped {
    let options = Options {
        // A client that opens a connection and sends its headers slowly must not hold it forever.
        header_read_timeout: Some(Duration::from_secs(30)),
        nodelay: true,
        grace: Some(grace),
        ..Options::default()
    };
    let service = |_peer| {
        let app = Arc::clone(&app);
        hyper::service::service_fn(move |req| handle(Arc::clone(&app), which, req))
    };
    inferpool_serve::serve(listener, service, stopped(&mut stop), &options).await
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // Map the guard away at once: it must not live across an await.
    let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
}

/// Runs `f` on the blocking pool (CPU-bound work must not stall the reactor).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))
}
