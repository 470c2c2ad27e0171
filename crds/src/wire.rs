//! The HTTP contract between the operator and the sidecar: ports, paths and the admin token.
//!
//! Both sides use these constants, so a path or port cannot drift on one side only. The sidecar
//! listens on [`API_PORT`] (its public API and the probes the kubelet calls) and [`ADMIN_PORT`]
//! (metrics and the operator's tuning pushes and cache commands, which carry the pool's token as
//! `Authorization: Bearer <token>`).

/// Port of the sidecar's public API, `/healthz` and `/readyz`, in every replica pod.
pub const API_PORT: u16 = 8080;
/// Port of the sidecar's admin listener (`/metrics`, tuning, cache) in every replica pod.
pub const ADMIN_PORT: u16 = 9090;

/// Liveness on the API port.
pub const HEALTHZ: &str = "/healthz";
/// Readiness on the API port (503 until the model is loaded and warmed, and while draining).
pub const READYZ: &str = "/readyz";
/// Prometheus metrics, on both ports.
pub const METRICS: &str = "/metrics";
/// Liveness on the admin port.
pub const LIVE: &str = "/live";
/// Readiness on the admin port.
pub const READY: &str = "/ready";

/// `POST` an image: its embedding.
pub const EMBED: &str = "/api/v1/embed";
/// `POST` an image and `?profile=`: how well it matches the profile's references.
pub const MATCH: &str = "/api/v1/match";
/// `POST` an image: the closest references over every profile.
pub const SCAN: &str = "/api/v1/scan";
/// `POST` an image: its PDQ hash (`{"pdq": "<64 hex digits>", "quality", "usable"}`).
pub const HASH: &str = "/api/v1/hash";
/// Prefix of `/api/v1/profiles/{id}` (`PUT`, `GET`, `DELETE`).
pub const PROFILES_PREFIX: &str = "/api/v1/profiles/";
/// The SLA report ([`crate::SlaReport`]) the operator reads, on the API port.
pub const SLA_REPORT: &str = "/api/v1/metrics/sla";
/// Each component's health (model, caches, Redis, memory) with an overall status, on the API
/// port: 200 while healthy or degraded, 503 while unhealthy.
pub const HEALTH: &str = "/api/v1/health";
/// The performance report, on the API port.
pub const PERFORMANCE_REPORT: &str = "/api/v1/metrics/performance";
/// The AI-inference report, on the API port.
pub const AI_INFERENCE_REPORT: &str = "/api/v1/metrics/ai-inference";
/// `GET` or `PUT` the [`crate::Tuning`] in force, on the admin port.
pub const TUNING: &str = "/api/v1/tuning";
/// `GET` cache statistics or `DELETE` (`?tier=memory|disk|all`) cache entries, on the admin port.
pub const CACHE: &str = "/api/v1/cache";

/// The path of profile `id`.
pub fn profile(id: &str) -> String {
    format!("{PROFILES_PREFIX}{id}")
}

/// The scheme of the admin token in the `Authorization` header.
const BEARER: &str = "Bearer ";

/// The `Authorization` header value that carries the admin `token`.
pub fn bearer(token: &str) -> String {
    format!("{BEARER}{token}")
}

/// The admin token an `Authorization` header value carries, if it is a bearer token.
pub fn parse_bearer(value: &str) -> Option<&str> {
    let token = value.strip_prefix(BEARER)?.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_round_trips_and_refuses_other_schemes() {
        let cases = [
            (bearer("s3cret"), Some("s3cret")),
            ("Bearer  padded ".to_owned(), Some("padded")),
            ("Bearer ".to_owned(), None),
            ("Basic s3cret".to_owned(), None),
            ("s3cret".to_owned(), None),
            ("bearer s3cret".to_owned(), None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_bearer(&value), expected, "{value:?}");
        }
    }

    #[test]
    fn profile_paths_sit_under_the_prefix() {
        assert_eq!(profile("cats"), "/api/v1/profiles/cats");
    }
}
