//! The autoscaler's loop: for each pool that is due, observe (collector), decide (policy), act
//! (push tuning, replace failing pods, clear caches, publish Events) and hand the decision to the
//! reconciler, which writes the Deployment's replicas, the tuning ConfigMap and the status.
//!
//! History lives in memory: a new leader starts with empty windows, so it scales up at once when
//! needed but removes replicas only after a full scale-down delay of its own observations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use inferpool_crds::pool::Decision as DecisionRecord;
use inferpool_crds::{InferencePool, Tuning};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::policy::{self, Decision, Inputs};
use super::{History, Sample, collector, prometheus};
use crate::build;
use crate::controller::{self, Context};
use crate::pods;

/// How often the loop looks for pools that are due.
const TICK: Duration = Duration::from_millis(250);
/// Pools observed at the same time.
const POOLS_AT_ONCE: usize = 32;
/// How often the status's SLA figures are refreshed when no decision changed.
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// The latest decision per pool, shared with the reconciler.
#[derive(Default)]
pub struct Shared {
    decisions: Mutex<HashMap<String, Applied>>,
}

/// A decision as the reconciler applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The policy's latest decision.
    pub decision: Decision,
    /// The latest decision that changed replicas or tuning, for `status.lastDecision`.
    pub last_change: Option<DecisionRecord>,
}

impl Shared {
    /// The latest decision for the pool `namespace/name`.
    pub fn get(&self, key: &str) -> Option<Applied> {
        self.lock().get(key).cloned()
    }

    fn put(&self, key: &str, applied: Applied) {
        self.lock().insert(key.to_owned(), applied);
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Applied>> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Per-pool memory of the loop.
struct PoolState {
    origin: Instant,
    next: Instant,
    history: History,
    policy: policy::State,
    token: Option<String>,
    last_trigger: Option<Instant>,
    /// The SLA figures the status got at the last trigger.
    last_sla: Option<inferpool_crds::pool::SlaStatus>,
}

impl PoolState {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            next: now,
            history: History::default(),
            policy: policy::State::default(),
            token: None,
            last_trigger: None,
            last_sla: None,
        }
    }
}

/// Runs until `shutdown` resolves. `trigger` asks the controller to reconcile a pool now.
pub async fn run(
    ctx: Arc<Context>,
    pools: Store<InferencePool>,
    pod_api: Api<Pod>,
    trigger: mpsc::UnboundedSender<ObjectRef<InferencePool>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (pod_store, writer) = reflector::store();
    let config = watcher::Config::default().labels(&format!("{}=inferpool-operator", build::MANAGED_BY_LABEL));
    let pod_watch = reflector::reflector(writer, watcher(pod_api, config)).default_backoff().for_each(|_| async {});
    tokio::pin!(shutdown);
    tokio::pin!(pod_watch);
    let mut states: HashMap<String, PoolState> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = &mut pod_watch => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let all = pools.state();
        states.retain(|key, _| {
            let alive = all.iter().any(|p| &controller::key(p) == key);
            if !alive && let Some((namespace, name)) = key.split_once('/') {
                ctx.metrics.forget_pool(namespace, name);
            }
            alive
        });
        ctx.autoscale.retain(|key| states.contains_key(key) || all.iter().any(|p| controller::key(p) == key));
        let due: Vec<(Arc<InferencePool>, PoolState)> = all
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && wants_autoscaler(p))
            .filter_map(|p| {
                let key = controller::key(&p);
                let state = states.remove(&key).unwrap_or_else(|| {
                    // Every decision counter exists from the start, so increase() counts the first one.
                    let (namespace, name) = (p.namespace().unwrap_or_default(), p.name_any());
                    for action in crate::metrics::ACTIONS {
                        ctx.metrics.pool_decisions.with_label_values(&[namespace.as_str(), name.as_str(), action]);
                    }
                    PoolState::new(now)
                });
                if state.next <= now {
                    Some((p, state))
                } else {
                    states.insert(key, state);
                    None
                }
            })
            .collect();
        let done: Vec<(String, PoolState)> = futures::stream::iter(due)
            .map(|(pool, state)| {
                let (ctx, pod_store, trigger) = (ctx.clone(), pod_store.clone(), trigger.clone());
                async move {
                    let key = controller::key(&pool);
                    (key, tick(&ctx, &pool, &pod_store, &trigger, state).await)
                }
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

async fn tick(
    ctx: &Context,
    pool: &InferencePool,
    pod_store: &Store<Pod>,
    trigger: &mpsc::UnboundedSender<ObjectRef<InferencePool>>,
    mut state: PoolState,
) -> PoolState {
    let spec = &pool.spec;
    let interval = Duration::from_secs(u64::from(spec.autoscaling.interval_seconds.max(1)));
    state.next = Instant::now() + interval;
    let (key, namespace, name) = (controller::key(pool), pool.namespace().unwrap_or_default(), pool.name_any());

    // Observe.
    let members: Vec<Arc<Pod>> = pod_store
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|p| p.labels().get(build::INSTANCE_LABEL) == Some(&name))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let ready: Vec<(String, String)> =
        members.iter().filter(|p| pods::is_ready(p)).filter_map(|p| Some((p.name_any(), pods::ip(p)?))).collect();
    let starting = u32::try_from(members.len() - ready.len()).unwrap_or(u32::MAX);
    let at = state.origin.elapsed().as_secs_f64();
    let sample = match spec.metrics.as_ref().and_then(|m| m.prometheus.as_ref()) {
        Some(source) => {
            let selector = prometheus::selector(source, &namespace, &name);
            let scrape = Duration::from_secs(u64::from(source.scrape_interval_seconds.max(1)));
            match prometheus::sample(&ctx.http, source, &selector, prometheus::window_seconds(scrape), at).await {
                Ok(sample) => Sample { starting, ..sample },
                Err(error) => {
                    // Prometheus is a convenience, not a dependency: read the replicas instead.
                    tracing::warn!(pool = %key, %error, "Prometheus source failed; reading the replicas");
                    collector::sample(&ctx.http, &ready, starting, at).await
                }
            }
        }
        None => collector::sample(&ctx.http, &ready, starting, at).await,
    };
    let keep = f64::from(spec.autoscaling.stable_window_seconds.max(spec.autoscaling.scale_down_delay_seconds))
        .max(600.0)
        + interval.as_secs_f64();
    let generations: Vec<(String, u64)> = sample.pods.iter().map(|p| (p.pod.clone(), p.tuning_generation)).collect();
    state.history.push(sample, keep);

    // Decide.
    let previous = ctx.autoscale.get(&key);
    let replicas = current_replicas(pool, previous.as_ref());
    let tuning = previous.as_ref().map(|a| a.decision.tuning).unwrap_or_else(|| controller::desired_tuning(pool));
    let inputs = Inputs { spec, replicas, tuning, history: &state.history, now: at };
    let decision = policy::decide(&inputs, &mut state.policy);

    // Act on the replicas directly.
    let behind: Vec<&str> = ready
        .iter()
        .filter(|(pod, _)| generations.iter().any(|(p, g)| p == pod && *g < decision.tuning.generation))
        .map(|(_, ip)| ip.as_str())
        .collect();
    if (!behind.is_empty() || decision.clear_cache)
        && let Some(token) = token(ctx, pool, &mut state).await
    {
        {
            for ip in &behind {
                if let Err(error) = pods::push_tuning(&ctx.http, ip, &token, &decision.tuning).await {
                    tracing::warn!(pool = %key, pod_ip = %ip, %error, "tuning push failed; retried next tick");
                }
            }
            if decision.clear_cache {
                for (_, ip) in &ready {
                    if let Err(error) = pods::clear_memory_cache(&ctx.http, ip, &token).await {
                        tracing::warn!(pool = %key, pod_ip = %ip, %error, "cache clear failed");
                    }
                }
            }
        }
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for pod in decision.delete_pods.iter().filter(|p| members.iter().any(|m| &m.name_any() == *p)) {
        match pod_api.delete(pod, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pool = %key, %pod, "deleted an outlier replica"),
            Err(error) => tracing::warn!(pool = %key, %pod, %error, "could not delete an outlier replica"),
        }
    }
    for note in &decision.notes {
        let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
        controller::publish_note(ctx, pool, type_, note.reason, note.message.clone()).await;
    }

    // Hand over to the reconciler.
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
    record_decision(ctx, &namespace, &name, replicas, &tuning, &decision);
    tracing::debug!(pool = %key, replicas = decision.replicas, mode = ?decision.mode, reason = %decision.reason, "autoscaler tick");
    // The status's figures are refreshed at most every STATUS_REFRESH, and only when they moved:
    // an idle pool costs the API server nothing.
    let sla = crate::status::sla_status(&decision.observed);
    ctx.autoscale.put(&key, Applied { decision, last_change });
    let stale = state.last_trigger.is_none_or(|t| t.elapsed() >= STATUS_REFRESH) && sla != state.last_sla;
    if changed || stale {
        state.last_trigger = Some(Instant::now());
        state.last_sla = sla;
        let _ = trigger.send(ObjectRef::from_obj(pool));
    }
    state
}

/// The decision as metrics: the SLA figures and a count per kind of action.
fn record_decision(ctx: &Context, namespace: &str, name: &str, replicas: u32, tuning: &Tuning, decision: &Decision) {
    let metrics = &ctx.metrics;
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
    replicas.unwrap_or_else(|| u32::try_from(controller::desired_replicas(pool, None).max(0)).unwrap_or(0))
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

/// The pool's admin token, read once from its Secret.
async fn token(ctx: &Context, pool: &InferencePool, state: &mut PoolState) -> Option<String> {
    if state.token.is_none() {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
        let name = build::names::admin_secret(&pool.name_any());
        let secret = secrets.get_opt(&name).await.ok().flatten()?;
        let token = secret.data.as_ref()?.get(build::ADMIN_TOKEN_KEY)?;
        state.token = Some(String::from_utf8_lossy(&token.0).into_owned());
    }
    state.token.clone()
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
