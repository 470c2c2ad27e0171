//! The operator's own Prometheus metrics, served at `/metrics`.
//!
//! Labels are bounded: `result` is `success` or an [`crate::Error::metric_label`] value; the
//! per-pool series carry `namespace` and `pool` (one set per InferencePool, removed with it) and
//! small fixed sets (`state`, `setting`, `action`).

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// Replicas per pool: `state` = desired | ready.
    pub pool_replicas: IntGaugeVec,
    /// Tuning in force per pool: `setting` = max_batch_size | max_delay_ms | cache_entries.
    pub pool_tuning: IntGaugeVec,
    /// The autoscaler's view per pool over the stable window: `figure` = p95_seconds | error_rate |
    /// cache_hit_rate | rps | compliant (1 or 0).
    pub pool_sla: GaugeVec,
    /// Autoscaler decisions per pool: `action` = scale_up | scale_down | tune | replace_pod | clear_cache.
    pub pool_decisions: IntCounterVec,
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
        let per_pool = |name: &str, help: &str| Opts::new(name, help);
        let pool_replicas = IntGaugeVec::new(
            per_pool("inferpool_pool_replicas", "Replicas of a pool: desired by the operator, ready"),
            &["namespace", "pool", "state"],
        )?;
        let pool_tuning = IntGaugeVec::new(
            per_pool("inferpool_pool_tuning", "Batching and cache tuning in force for a pool"),
            &["namespace", "pool", "setting"],
        )?;
        let pool_sla = GaugeVec::new(
            per_pool("inferpool_pool_sla", "A pool's service level over the autoscaler's stable window"),
            &["namespace", "pool", "figure"],
        )?;
        let pool_decisions = IntCounterVec::new(
            per_pool("inferpool_pool_decisions_total", "Autoscaler decisions for a pool by action"),
            &["namespace", "pool", "action"],
        )?;
        registry.register(Box::new(pool_replicas.clone()))?;
        registry.register(Box::new(pool_tuning.clone()))?;
        registry.register(Box::new(pool_sla.clone()))?;
        registry.register(Box::new(pool_decisions.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            pools,
            leader,
            pool_replicas,
            pool_tuning,
            pool_sla,
            pool_decisions,
        })
    }

    /// Drops every series of a pool that is gone.
    pub fn forget_pool(&self, namespace: &str, pool: &str) {
        for state in STATES {
            let _ = self.pool_replicas.remove_label_values(&[namespace, pool, state]);
        }
        for setting in SETTINGS {
            let _ = self.pool_tuning.remove_label_values(&[namespace, pool, setting]);
        }
        for figure in FIGURES {
            let _ = self.pool_sla.remove_label_values(&[namespace, pool, figure]);
        }
        for action in ACTIONS {
            let _ = self.pool_decisions.remove_label_values(&[namespace, pool, action]);
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Values of `inferpool_pool_replicas{state}`.
pub const STATES: [&str; 2] = ["desired", "ready"];
/// Values of `inferpool_pool_tuning{setting}`.
pub const SETTINGS: [&str; 3] = ["max_batch_size", "max_delay_ms", "cache_entries"];
/// Values of `inferpool_pool_sla{figure}`.
pub const FIGURES: [&str; 5] = ["p95_seconds", "error_rate", "cache_hit_rate", "rps", "compliant"];
/// Values of `inferpool_pool_decisions_total{action}`.
pub const ACTIONS: [&str; 5] = ["scale_up", "scale_down", "tune", "replace_pod", "clear_cache"];

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
        metrics.pool_replicas.with_label_values(&["ns", "shop", "ready"]).set(2);
        metrics.pool_decisions.with_label_values(&["ns", "shop", "scale_up"]).inc();
        let text = String::from_utf8_lossy(&metrics.render()).into_owned();
        assert!(text.contains("inferpool_pool_replicas{namespace=\"ns\",pool=\"shop\",state=\"ready\"} 2"), "{text}");
        metrics.forget_pool("ns", "shop");
        let text = String::from_utf8_lossy(&metrics.render()).into_owned();
        assert!(!text.contains("pool=\"shop\""), "a deleted pool's series stay:\n{text}");
        Ok(())
    }
}
