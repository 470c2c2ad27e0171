//! The operator's own Prometheus metrics, served at `/metrics`.
//!
//! Labels are bounded: `result` is `success` or an [`crate::Error::metric_label`] value.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the operator exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: IntCounterVec,
    /// How long a reconcile took.
    pub reconcile_duration: Histogram,
    /// InferencePools this replica currently manages.
    pub pools: IntGauge,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("inferpool_operator_reconcile_total", "InferencePool reconciles by result"),
            &["result"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("inferpool_operator_reconcile_duration_seconds", "Time one reconcile took")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )?;
        let pools = IntGauge::new("inferpool_operator_pools", "InferencePools managed by this operator replica")?;
        let leader = IntGauge::new("inferpool_operator_leader", "1 while this replica holds the leader lease")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(pools.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self { registry, reconciles, reconcile_duration, pools, leader })
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_by_name() -> Result<(), prometheus::Error> {
        let metrics = Metrics::new()?;
        metrics.reconciles.with_label_values(&["success"]).inc();
        metrics.reconcile_duration.observe(0.01);
        metrics.pools.set(3);
        metrics.leader.set(1);
        let text = String::from_utf8_lossy(&metrics.render()).into_owned();
        for line in [
            "inferpool_operator_reconcile_total{result=\"success\"} 1",
            "inferpool_operator_reconcile_duration_seconds_count 1",
            "inferpool_operator_pools 3",
            "inferpool_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        Ok(())
    }
}
