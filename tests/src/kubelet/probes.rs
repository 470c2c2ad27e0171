//! HTTP probes as the kubelet runs them: a probe passes on a status from 200 to 399 within its
//! timeout, and its thresholds count consecutive results. Only `httpGet` probes are run (the
//! sidecar serves nothing else); a probe of another kind is treated as absent.

use std::time::Duration;

use inferpool_crds::wire;
use serde_json::Value;

/// One probe of a container, with Kubernetes' defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The path of the `GET`.
    pub path: String,
    /// The port, resolved from a container port name when it was given by name.
    pub port: u16,
    /// Wait before the first probe (`initialDelaySeconds`).
    pub initial_delay: Duration,
    /// Time between probes (`periodSeconds`, default 10 s).
    pub period: Duration,
    /// Time a probe may take (`timeoutSeconds`, default 1 s).
    pub timeout: Duration,
    /// Consecutive failures that count as failed (`failureThreshold`, default 3).
    pub failure_threshold: u32,
    /// Consecutive successes that count as passed (`successThreshold`, default 1).
    pub success_threshold: u32,
}

/// A container port by name, if declared.
pub fn named_port(container: &Value, name: &str) -> Option<u16> {
    container
        .get("ports")
        .and_then(Value::as_array)?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

fn seconds(probe: &Value, field: &str, default: u64) -> Duration {
    Duration::from_secs(probe.get(field).and_then(Value::as_u64).unwrap_or(default))
}

fn count(probe: &Value, field: &str, default: u32) -> u32 {
    probe.get(field).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0).unwrap_or(default)
}

impl Probe {
    /// The container's `field` probe (`readinessProbe`, `livenessProbe`, `startupProbe`) if it
    /// is an `httpGet` probe whose port resolves.
    pub fn parse(container: &Value, field: &str) -> Option<Probe> {
        let probe = container.get(field)?;
        let get = probe.get("httpGet")?;
        let port = match get.get("port")? {
            Value::String(name) => named_port(container, name).or_else(|| name.parse().ok())?,
            n => u16::try_from(n.as_u64()?).ok()?,
        };
        Some(Probe {
            path: get.get("path").and_then(Value::as_str).unwrap_or("/").to_owned(),
            port,
            initial_delay: seconds(probe, "initialDelaySeconds", 0),
            period: seconds(probe, "periodSeconds", 10).max(Duration::from_secs(1)),
            timeout: seconds(probe, "timeoutSeconds", 1).max(Duration::from_secs(1)),
            failure_threshold: count(probe, "failureThreshold", 3),
            success_threshold: count(probe, "successThreshold", 1),
        })
    }

    /// The readiness probe used when a container declares none: `/readyz` on its `http` port
    /// (default 8080) every 100 ms, so a pod turns Ready as soon as the sidecar is.
    pub fn default_readiness(container: &Value) -> Probe {
        Probe {
            path: wire::READYZ.to_owned(),
            port: named_port(container, "http").unwrap_or(wire::API_PORT),
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 1,
        }
    }

    /// Runs the probe once against `ip`: whether it passed.
    pub async fn check(&self, ip: &str) -> bool {
        tokio::time::timeout(self.timeout, http_get(ip, self.port, &self.path)).await.unwrap_or(false)
    }
}

/// Whether `GET path` at ip:port answers with a status from 200 to 399.
async fn http_get(ip: &str, port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, port)).await else { return false };
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: {ip}:{port}\r\nuser-agent: kube-probe\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).await.is_err() {
        return false;
    }
    std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| (200..400).contains(&c))
}

/// Consecutive results of one probe, turned into a pass/fail state with its thresholds.
#[derive(Debug, Clone)]
pub struct Tracker {
    passing: bool,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// A tracker that starts failing (readiness and startup) or passing (liveness).
    pub fn new(passing: bool) -> Tracker {
        Tracker { passing, successes: 0, failures: 0 }
    }

    /// Records one result; returns the state after it.
    pub fn record(&mut self, probe: &Probe, ok: bool) -> bool {
        if ok {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= probe.success_threshold {
                self.passing = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= probe.failure_threshold {
                self.passing = false;
            }
        }
        self.passing
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_resolve_named_ports_and_defaults() {
        let c = json!({
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}, "periodSeconds": 2, "successThreshold": 2},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
            "startupProbe": {"exec": {"command": ["true"]}},
        });
        let r = Probe::parse(&c, "readinessProbe").unwrap();
        assert_eq!(
            (r.path.as_str(), r.port, r.period, r.success_threshold),
            ("/ready", 9090, Duration::from_secs(2), 2)
        );
        let l = Probe::parse(&c, "livenessProbe").unwrap();
        assert_eq!((l.port, l.period, l.failure_threshold), (8080, Duration::from_secs(10), 3));
        assert!(Probe::parse(&c, "startupProbe").is_none(), "only httpGet probes run");
        assert_eq!(Probe::default_readiness(&c).path, "/readyz");
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let c = json!({"livenessProbe": {"httpGet": {"port": 1}, "failureThreshold": 2, "successThreshold": 2}});
        let p = Probe::parse(&c, "livenessProbe").unwrap();
        let mut t = Tracker::new(true);
        assert!(t.record(&p, false), "one failure is below the threshold");
        assert!(t.record(&p, true));
        assert!(t.record(&p, false), "a success in between resets the count");
        assert!(!t.record(&p, false));
        assert!(!t.record(&p, true), "one success is below the threshold");
        assert!(t.record(&p, true));
    }
}
