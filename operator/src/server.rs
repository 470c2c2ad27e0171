//! The operator's HTTP endpoint: `/healthz`, `/readyz` and `/metrics`.
//!
//! Written as `serve(listener, state, shutdown)` so tests bind port 0 and stop it cleanly; the accept
//! loop is `inferpool_serve::serve`'s, as every listener's in the project.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use inferpool_serve::Options;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoint reports.
pub struct State {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Set once the operator reached the API server and started (as leader or standby).
    pub ready: AtomicBool,
}

/// Serves until `shutdown` resolves, then lets open connections finish.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let service = |_peer| {
        let state = Arc::clone(&state);
        service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&request, &state)) }
        })
    };
    inferpool_serve::serve(listener, service, shutdown, &Options::default()).await;
}

fn route(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not connected to the API server yet\n"),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz or /metrics\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
