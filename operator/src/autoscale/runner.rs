//! The autoscaler's loop: for each pool that is due, observe (the pool's pods from the shared
//! store, their reports or a Prometheus query), decide (the pure [`policy`]) and hand the decision
//! on, one way: the level part to [`Decisions`] plus a trigger for the reconciler, which writes the
//! Deployment's replicas, the tuning ConfigMap and the status; the imperative part ([`Actions`]:
//! tuning pushes, cache clears, outlier pods, Events) to the actuator. The loop itself writes
//! nothing to the API server.
//!
//! History lives in memory: a new leader starts with empty windows, so it scales up at once when
//! needed but removes replicas only after a full scale-down delay of its own observations.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use inferpool_crds::pool::{Decision as DecisionRecord, SlaStatus};
use inferpool_crds::{InferencePool, Tuning};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::decisions::{Actions, Applied, Decisions, PoolRef};
use super::policy::{self, Decision, Inputs};
use super::{History, Sample, collector, prometheus};
use crate::metrics::Metrics;
use crate::pods::{self, HttpClient};
use crate::{build, observe};

/// How often the loop looks for pools that are due.
const TICK: Duration = Duration::from_millis(250);
/// Pools observed at the same time.
const POOLS_AT_ONCE: usize = 32;
/// How often the status's SLA figures are refreshed when no decision changed.
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// What the autoscaler reads with and where its output goes.
pub struct Autoscaler {
    /// HTTP client for the replicas' reports and Prometheus.
    pub http: HttpClient,
    /// The operator's metrics (the decisions and SLA figures per pool).
    pub metrics: Arc<Metrics>,
    /// The latest decision per pool, for the reconciler.
    pub decisions: Arc<Decisions>,
    /// Asks the reconciler to reconcile a pool now.
    pub trigger: mpsc::UnboundedSender<PoolRef>,
    /// The actions decisions name, for the actuator.
    pub actions: mpsc::Sender<Actions>,
}

/// Per-pool memory of the loop.
struct PoolState {
    origin: Instant,
    next: Instant,
    history: History,
    policy: policy::State,
    /// The previous tick's decision.
    previous: Option<Applied>,
    last_trigger: Option<Instant>,
    /// The SLA figures the status got at the last trigger.
    last_sla: Option<SlaStatus>,
}

impl PoolState {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            next: now,
            history: History::default(),
            policy: policy::State::default(),
            previous: None,
            last_trigger: None,
            last_sla: None,
        }
    }
}

/// Runs until `shutdown` resolves, over the pools and pods the shared stores hold.
pub async fn run(
    scaler: Arc<Autoscaler>,
    pools: Store<InferencePool>,
    pods: Store<Pod>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut states: HashMap<PoolRef, PoolState> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let all = pools.state();
        let live = |pool: &PoolRef| all.iter().any(|p| PoolRef::from_obj(p) == *pool);
        states.retain(|pool, _| {
            let alive = live(pool);
            if !alive {
                scaler.metrics.forget_pool(pool.namespace.as_deref().unwrap_or_default(), &pool.name);
            }
            alive
        });
        scaler.decisions.retain(|pool| states.contains_key(pool) || live(pool));
        let due: Vec<(Arc<InferencePool>, PoolState)> = all
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && wants_autoscaler(p))
            .filter_map(|p| {
                let pool = PoolRef::from_obj(&p);
                let state = states.remove(&pool).unwrap_or_else(|| {
                    // Every decision counter exists from the start, so increase() counts the first one.
                    let (namespace, name) = (p.namespace().unwrap_or_default(), p.name_any());
                    for action in crate::metrics::ACTIONS {
                        scaler.metrics.pool_decisions.with_label_values(&[namespace.as_str(), name.as_str(), action]);
                    }
                    PoolState::new(now)
                });
                if state.next <= now {
                    Some((p, state))
                } else {
                    states.insert(pool, state);
                    None
                }
            })
            .collect();
        let done: Vec<(PoolRef, PoolState)> = futures::stream::iter(due)
            .map(|(pool, state)| {
                let (scaler, pods) = (scaler.clone(), pods.clone());
                let span = tracing::info_span!(
                    "tick",
                    namespace = pool.namespace().unwrap_or_default(),
                    pool = pool.name_any()
                );
                async move { (PoolRef::from_obj(&*pool), tick(&scaler, &pool, &pods, state).await) }.instrument(span)
            })
            .buffer_unordered(POOLS_AT_ONCE)
            .collect()
            .await;
        states.extend(done);
    }
}

/// Whether any part of the pool is tuned automatically.
fn wants_autoscaler(pool: &InferencePool) -> bool {
    let spec = &pool.spec;
    spec.autoscaling.enabled || spec.batching.auto || spec.cache.auto
}

async fn tick(scaler: &Autoscaler, pool: &InferencePool, pods: &Store<Pod>, mut state: PoolState) -> PoolState {
    let spec = &pool.spec;
    let interval = Duration::from_secs(u64::from(spec.autoscaling.interval_seconds.max(1)));
    state.next = Instant::now() + interval;
    let (namespace, name) = (pool.namespace().unwrap_or_default(), pool.name_any());

    // Observe.
    let members = observe::members(pods, pool);
    let ready: Vec<(String, String)> =
        members.iter().filter(|p| pods::is_ready(p)).filter_map(|p| Some((p.name_any(), pods::ip(p)?))).collect();
    let starting = u32::try_from(members.len() - ready.len()).unwrap_or(u32::MAX);
    let at = state.origin.elapsed().as_secs_f64();
    let sample = match spec.metrics.as_ref().and_then(|m| m.prometheus.as_ref()) {
        Some(source) => {
            let selector = prometheus::selector(source, &namespace, &name);
            let scrape = Duration::from_secs(u64::from(source.scrape_interval_seconds.max(1)));
            match prometheus::sample(&scaler.http, source, &selector, prometheus::window_seconds(scrape), at).await {
                Ok(sample) => Sample { starting, ..sample },
                Err(error) => {
                    // Prometheus is a convenience, not a dependency: read the replicas instead.
                    tracing::warn!(%error, "Prometheus source failed; reading the replicas");
                    collector::sample(&scaler.http, &ready, starting, at).await
                }
            }
        }
        None => collector::sample(&scaler.http, &ready, starting, at).await,
    };
    let keep = f64::from(spec.autoscaling.stable_window_seconds.max(spec.autoscaling.scale_down_delay_seconds))
        .max(600.0)
        + interval.as_secs_f64();
    let generations: Vec<(String, u64)> = sample.pods.iter().map(|p| (p.pod.clone(), p.tuning_generation)).collect();
    state.history.push(sample, keep);

    // Decide.
    let previous = state.previous.take();
    let replicas = current_replicas(pool, previous.as_ref());
    let tuning = previous.as_ref().map_or_else(|| build::desired_tuning(pool), |a| a.decision.tuning);
    let inputs = Inputs { spec, replicas, tuning, history: &state.history, now: at };
    let decision = policy::decide(&inputs, &mut state.policy);

    // Hand the actions to the actuator: replicas behind on tuning, caches, outliers, Events.
    let actions = Actions {
        pool: PoolRef::from_obj(pool),
        tuning: decision.tuning,
        push_to: ready
            .iter()
            .filter(|(pod, _)| generations.iter().any(|(p, g)| p == pod && *g < decision.tuning.generation))
            .map(|(_, ip)| ip.clone())
            .collect(),
        clear_cache_on: if decision.clear_cache {
            ready.iter().map(|(_, ip)| ip.clone()).collect()
        } else {
            Vec::new()
        },
        delete_pods: decision
            .delete_pods
            .iter()
            .filter(|p| members.iter().any(|m| &m.name_any() == *p))
            .cloned()
            .collect(),
        notes: decision.notes.clone(),
    };
    if !actions.is_empty() && scaler.actions.send(actions).await.is_err() {
        tracing::debug!("the actuator has stopped; actions dropped");
    }

    // Hand the level part to the reconciler.
    let changed = previous.as_ref().is_none_or(|p| {
        p.decision.replicas != decision.replicas
            || p.decision.tuning != decision.tuning
            || p.decision.observed.compliant != decision.observed.compliant
            || p.decision.anomaly != decision.anomaly
    });
    // The replicas and tuning in force are the previous decision's, so a decision that keeps them
    // keeps the previous record of the last change.
    let last_change = if replicas == decision.replicas && tuning == decision.tuning {
        previous.as_ref().and_then(|p| p.last_change.clone())
    } else {
        Some(DecisionRecord {
            action: describe(replicas, &tuning, decision.replicas, &decision.tuning),
            reason: decision.reason.clone(),
            time: Time(Timestamp::now()),
        })
    };
    record_decision(&scaler.metrics, &namespace, &name, replicas, &tuning, &decision);
    tracing::debug!(replicas = decision.replicas, mode = ?decision.mode, reason = %decision.reason, "autoscaler tick");
    // The status's figures are refreshed at most every STATUS_REFRESH, and only when they moved:
    // an idle pool costs the API server nothing.
    let sla = decision.observed.sla_status();
    let applied = Applied { decision, last_change };
    scaler.decisions.put(PoolRef::from_obj(pool), applied.clone());
    state.previous = Some(applied);
    let stale = state.last_trigger.is_none_or(|t| t.elapsed() >= STATUS_REFRESH) && sla != state.last_sla;
    if changed || stale {
        state.last_trigger = Some(Instant::now());
        state.last_sla = sla;
        let _ = scaler.trigger.send(PoolRef::from_obj(pool));
    }
    state
}

/// The decision as metrics: the SLA figures and a count per kind of action.
fn record_decision(
    metrics: &Metrics,
    namespace: &str,
    name: &str,
    replicas: u32,
    tuning: &Tuning,
    decision: &Decision,
) {
    let observed = &decision.observed;
    if let Some(compliant) = observed.compliant {
        for (figure, value) in [
            ("p95_seconds", observed.p95_ms / 1000.0),
            ("error_rate", observed.error_rate),
            ("cache_hit_rate", observed.cache_hit_rate),
            ("rps", observed.rps),
            ("compliant", if compliant { 1.0 } else { 0.0 }),
        ] {
            metrics.pool_sla.with_label_values(&[namespace, name, figure]).set(value);
        }
    }
    let count = |action: &str, n: u64| {
        if n > 0 {
            metrics.pool_decisions.with_label_values(&[namespace, name, action]).inc_by(n);
        }
    };
    count("scale_up", u64::from(decision.replicas > replicas));
    count("scale_down", u64::from(decision.replicas < replicas));
    count("tune", u64::from(decision.tuning != *tuning));
    count("replace_pod", decision.delete_pods.len() as u64);
    count("clear_cache", u64::from(decision.clear_cache));
}

/// The replicas in force: the last decision, else what the status says the operator applied.
fn current_replicas(pool: &InferencePool, previous: Option<&Applied>) -> u32 {
    let from_status = pool.status.as_ref().map(|s| s.desired_replicas).filter(|r| *r > 0);
    let replicas = previous.map(|a| a.decision.replicas).or(from_status.and_then(|r| u32::try_from(r).ok()));
    replicas.unwrap_or_else(|| u32::try_from(build::desired_replicas(pool, None).max(0)).unwrap_or(0))
}

/// What changed, e.g. `replicas 2 -> 4, maxBatchSize 16 -> 32`.
fn describe(replicas: u32, tuning: &Tuning, new_replicas: u32, new: &Tuning) -> String {
    let mut parts = Vec::new();
    if replicas != new_replicas {
        parts.push(format!("replicas {replicas} -> {new_replicas}"));
    }
    if tuning.max_batch_size != new.max_batch_size {
        parts.push(format!("maxBatchSize {} -> {}", tuning.max_batch_size, new.max_batch_size));
    }
    if tuning.max_delay_ms != new.max_delay_ms {
        parts.push(format!("maxDelayMs {} -> {}", tuning.max_delay_ms, new.max_delay_ms));
    }
    if tuning.cache_entries != new.cache_entries {
        let show = |e: Option<u64>| e.map_or_else(|| "unset".to_owned(), |e| e.to_string());
        parts.push(format!("cacheEntries {} -> {}", show(tuning.cache_entries), show(new.cache_entries)));
    }
    if parts.is_empty() { "no change".to_owned() } else { parts.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_described_field_by_field() {
        let t = Tuning { generation: 1, max_batch_size: 16, max_delay_ms: 5, cache_entries: Some(1000) };
        let u = Tuning { generation: 2, max_batch_size: 32, cache_entries: Some(1500), ..t };
        assert_eq!(describe(2, &t, 4, &u), "replicas 2 -> 4, maxBatchSize 16 -> 32, cacheEntries 1000 -> 1500");
        assert_eq!(describe(2, &t, 2, &t), "no change");
    }
}
