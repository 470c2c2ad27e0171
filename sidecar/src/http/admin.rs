//! The admin listener: probes, metrics and live tuning pushes from the operator.
//!
//! It listens on its own port so that a NetworkPolicy can let only the operator reach it, and
//! tuning pushes also need the pool's bearer token.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use inferpool_crds::{Tuning, wire};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::api::{metrics_text, readiness};
use super::parse::{Query, json_error};
use super::{ApiError, Resp, Routed, json, read_body};
use crate::app::App;
use crate::metrics::Route;

/// Largest tuning document accepted.
const MAX_TUNING_BYTES: usize = 64 * 1024;

/// The route a path on the admin listener belongs to.
pub fn route_of(path: &str) -> Route {
    match path {
        wire::LIVE | wire::READY => Route::Probes,
        wire::METRICS => Route::Metrics,
        wire::TUNING | wire::CACHE => Route::Tuning,
        _ => Route::Unknown,
    }
}

/// Dispatches a request on the admin listener.
pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Routed {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), method) {
        (wire::LIVE, Method::GET) => (Route::Probes, Ok(json(StatusCode::OK, &json!({"status": "alive"})))),
        (wire::READY, Method::GET) => (Route::Probes, readiness(app)),
        (wire::METRICS, Method::GET) => (Route::Metrics, Ok(metrics_text(app))),
        (wire::TUNING, Method::GET) => (Route::Tuning, Ok(json(StatusCode::OK, &current(app)))),
        (wire::TUNING, Method::PUT) => (Route::Tuning, put_tuning(app, req).await),
        (wire::CACHE, Method::GET) => (Route::Tuning, Ok(json(StatusCode::OK, &app.cache.stats()))),
        (wire::CACHE, Method::DELETE) => (Route::Tuning, clear_cache(app, req).await),
        (wire::LIVE | wire::READY | wire::METRICS | wire::TUNING | wire::CACHE, m) => {
            (Route::Unknown, Err(ApiError::MethodNotAllowed(m.to_string())))
        }
        _ => (Route::Unknown, Err(ApiError::NotFound(path))),
    }
}

fn current(app: &App) -> Tuning {
    app.batcher_any().map_or(app.config.tuning, |b| b.tuning())
}

/// Compares in time independent of where the first difference is (the length is not secret).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let expected = app.config.admin_token.as_deref().ok_or(ApiError::Unauthorized)?;
    let offered = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(wire::parse_bearer)
        .ok_or(ApiError::Unauthorized)?;
    if same_token(offered.as_bytes(), expected.as_bytes()) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

async fn put_tuning(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    authorize(app, &req)?;
    let body = read_body(req, MAX_TUNING_BYTES).await?;
    let tuning: Tuning = serde_json::from_slice(&body).map_err(json_error)?;
    tuning.validate().map_err(|errors| {
        ApiError::Unprocessable(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    })?;
    let batcher = app.batcher_any().ok_or(ApiError::NotReady)?;
    batcher.set_tuning(tuning)?;
    if let Some(entries) = tuning.cache_entries {
        app.cache.set_memory_target(entries);
    }
    tracing::info!(
        generation = tuning.generation,
        max_batch = tuning.max_batch_size,
        max_delay_ms = tuning.max_delay_ms,
        cache_entries = tuning.cache_entries,
        "tuning applied"
    );
    Ok(json(StatusCode::OK, &batcher.tuning()))
}

/// `DELETE /api/v1/cache?tier=memory|disk|all`: empties the memory tier, or memory and disk.
/// Redis is shared by the pool and is left to its TTL.
async fn clear_cache(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    authorize(app, &req)?;
    let query = Query::parse(req.uri().query(), &["tier"])?;
    let tier = query.get("tier").unwrap_or("memory");
    let disk_too = match tier {
        "memory" => false,
        "disk" | "all" => true,
        other => {
            return Err(ApiError::BadQuery {
                name: "tier",
                message: format!("{other:?}: expected memory, disk or all"),
            });
        }
    };
    let (memory, disk) = app.cache.clear(disk_too).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(memory, disk, "cache cleared");
    Ok(json(StatusCode::OK, &json!({"cleared": {"memory": memory, "disk": disk}})))
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn token_comparison() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secret", b"secreT"));
        assert!(!same_token(b"secret", b"secret2"));
        assert!(!same_token(b"", b"x"));
    }
}
