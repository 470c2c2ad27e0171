//! The InferencePool reconciler: dereference -> validate -> build -> apply -> update_status.
//!
//! Only the first and the last two steps touch the API server; `validate` and `build` are pure.
//! Children are owned by the pool (ownerReferences), so the API server's garbage collector removes
//! them when the pool goes and no finalizer is needed. Every write is a server-side apply with one
//! field manager, and the status is written only when it differs, so a reconcile of an unchanged
//! pool (an operator restart, a periodic resync) writes nothing.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use inferpool_crds::pool::condition::DEGRADED;
use inferpool_crds::{InferencePool, InferencePoolStatus, Tuning};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::autoscale::runner::{self, Applied, Shared};
use crate::build::{self, FIELD_MANAGER, Settings};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::observe;
use crate::pods::{self, HttpClient};
use crate::status::{self, Rollout};
use crate::validate::validate;

/// How often an unchanged pool is looked at again.
const RESYNC: Duration = Duration::from_secs(300);
/// First and longest retry delay after a transient error.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(300));

/// What every reconcile shares.
pub struct Context {
    /// Client for the API server.
    pub client: Client,
    /// Operator-wide settings for the children.
    pub settings: Settings,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// HTTP client for the replicas (reports, tuning pushes).
    pub http: HttpClient,
    /// The autoscaler's latest decision per pool.
    pub autoscale: Shared,
    /// Consecutive failures per pool (`namespace/name`), for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for a controller that reports Events as `reporter`.
    pub fn new(client: Client, settings: Settings, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            settings,
            recorder,
            metrics,
            http: pods::client(),
            autoscale: Shared::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self, key: &str, update: impl FnOnce(&mut u32)) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(key.to_owned()).or_default();
        update(count);
        let value = *count;
        if value == 0 {
            failures.remove(key);
        }
        value
    }
}

/// Runs the controller over the pools in `namespace` (all namespaces when `None`) until
/// `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>, stopped: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let pools: Api<InferencePool> = scoped(&client, namespace);
    let config = watcher::Config::default().any_semantic();
    let children = watcher::Config::default().labels("app.kubernetes.io/managed-by=inferpool-operator");
    let (trigger, triggered) = mpsc::unbounded_channel();
    let controller = Controller::new(pools, config)
        .owns(scoped::<Deployment>(&client, namespace), children.clone())
        .owns(scoped::<Service>(&client, namespace), children.clone())
        .owns(scoped::<ConfigMap>(&client, namespace), children.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, namespace), children)
        .reconcile_on(futures::stream::unfold(triggered, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) }))
        .graceful_shutdown_on(stop_signal(stopped.clone()));
    let store = controller.store();
    let autoscaler =
        runner::run(ctx.clone(), store.clone(), scoped::<Pod>(&client, namespace), trigger, stop_signal(stopped));
    let metrics = ctx.metrics.clone();
    let reconciling = controller.run(reconcile, error_policy, ctx).for_each(|result| {
        metrics.pools.set(i64::try_from(store.len()).unwrap_or(i64::MAX));
        match result {
            Ok((pool, _)) => tracing::debug!(pool = %pool, "reconciled"),
            Err(error) => tracing::debug!(%error, "reconcile did not complete"),
        }
        std::future::ready(())
    });
    // The controller ends on shutdown; the autoscaler with it.
    tokio::select! {
        () = reconciling => {}
        () = autoscaler => {}
    }
}

/// Resolves once `stopped` says true (or its sender is gone).
pub async fn stop_signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reconciles one pool; counted and timed in the operator's metrics.
pub async fn reconcile(pool: Arc<InferencePool>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.reconcile_duration.start_timer();
    let result = reconcile_pool(&pool, &ctx).await;
    timer.observe_duration();
    let label = result.as_ref().map_or_else(Error::metric_label, |_| "success");
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    match &result {
        Ok(_) => {
            ctx.failures(&key(&pool), |n| *n = 0);
        }
        // An invalid spec has its own Event; anything else is said once per distinct message
        // (the recorder folds repeats into a series).
        Err(error) if !error.is_permanent() => {
            let note = error.to_string();
            publish(&ctx, &pool, event(EventType::Warning, "ReconcileFailed", "Reconcile", note, None)).await;
        }
        Err(_) => {}
    }
    result
}

/// After a failed reconcile: an invalid spec waits for a change; anything else retries with
/// exponential backoff per pool.
pub fn error_policy(pool: Arc<InferencePool>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_permanent() {
        tracing::info!(pool = %key(&pool), %error, "waiting for the pool to change");
        return Action::await_change();
    }
    let attempt = ctx.failures(&key(&pool), |n| *n = n.saturating_add(1));
    let delay = backoff(attempt);
    tracing::warn!(pool = %key(&pool), %error, attempt, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `attempt` (1-based): doubling from the first delay, capped.
pub fn backoff(attempt: u32) -> Duration {
    let (first, cap) = BACKOFF;
    first.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1))).min(cap)
}

/// `namespace/name` of a pool, the key of per-pool state.
pub fn key(pool: &InferencePool) -> String {
    format!("{}/{}", pool.namespace().unwrap_or_default(), pool.name_any())
}

async fn reconcile_pool(pool: &InferencePool, ctx: &Context) -> Result<Action> {
    let namespace = pool.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    tracing::debug!(pool = %key(pool), "reconciling");
    if pool.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children; nothing to do.
        return Ok(Action::await_change());
    }
    let pools: Api<InferencePool> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(errors) = validate(pool) {
        let error = Error::InvalidSpec(errors);
        report_invalid(pool, &pools, ctx, &error.to_string()).await?;
        return Err(error);
    }

    // Dereference: the only state beyond the spec is the admin-token Secret, made once.
    ensure_admin_secret(pool, ctx, &namespace).await?;
    let applied = ctx.autoscale.get(&key(pool));
    let replicas = desired_replicas(pool, applied.as_ref());
    let tuning = applied.as_ref().map_or_else(|| desired_tuning(pool), |a| a.decision.tuning);

    // Build (pure), then apply.
    let children = build::children(pool, &ctx.settings, replicas, &tuning)?;
    let deployment = apply(ctx, &namespace, pool, &children.deployment).await?;
    apply(ctx, &namespace, pool, &children.service).await?;
    apply(ctx, &namespace, pool, &children.tuning).await?;
    apply(ctx, &namespace, pool, &children.pdb).await?;

    tracing::debug!(pool = %key(pool), replicas, "children applied");
    // Status.
    let rollout = Rollout::of(Some(&deployment), replicas);
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    status.replicas = rollout.replicas;
    status.ready_replicas = rollout.ready;
    status.desired_replicas = replicas;
    status.selector = build::selector_string(&pool.name_any());
    status.endpoint = Some(build::endpoint(pool)?);
    status.tuning = Some(tuning);
    if status.model.is_none() || pool.status.as_ref().and_then(|s| s.observed_generation) != pool.metadata.generation {
        // Until a replica of this generation reports the model's name, the spec's URI stands in.
        status.model = Some(pool.spec.model.uri.clone());
    }
    // The variant is read back from a replica when none is known yet and whenever a rollout has
    // just completed (a new template may have picked another variant).
    if rollout.ready > 0
        && (status.variant.is_none() || (rollout.complete() && !was_settled(pool)))
        && let Some(report) = observe::replica_report(&ctx.client, &ctx.http, &namespace, &status.selector).await
    {
        status.model = Some(report.model);
        status.variant = Some(report.variant);
    }
    let mut wanted = status::rollout_conditions(&rollout);
    match &applied {
        Some(applied) => {
            let observed = &applied.decision.observed;
            status.sla = status::sla_status(observed);
            status.last_decision = applied.last_change.clone();
            wanted.push(status::sla_condition(observed, pool.spec.sla.p95_latency_ms));
            wanted.push(status::anomaly_condition(applied.decision.anomaly.as_deref()));
        }
        None if !status.conditions.iter().any(|c| c.type_ == inferpool_crds::pool::condition::SLA_COMPLIANT) => {
            wanted.push(status::sla_unknown());
        }
        None => {}
    }
    let now = Time(Timestamp::now());
    status::set_conditions(&mut status, wanted, pool.metadata.generation, &now);
    record_pool_metrics(&ctx.metrics, pool, &rollout, &tuning);
    write_status(pool, &pools, status).await?;

    Ok(if rollout.complete() { Action::requeue(RESYNC) } else { Action::requeue(Duration::from_secs(10)) })
}

/// The pool's replicas and tuning as metrics (the dashboard's "desired / ready" and "in force").
fn record_pool_metrics(metrics: &Metrics, pool: &InferencePool, rollout: &Rollout, tuning: &Tuning) {
    let (namespace, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let set = |vec: &prometheus::IntGaugeVec, label: &str, value: i64| {
        vec.with_label_values(&[namespace.as_str(), name.as_str(), label]).set(value);
    };
    set(&metrics.pool_replicas, "desired", i64::from(rollout.desired));
    set(&metrics.pool_replicas, "ready", i64::from(rollout.ready));
    set(&metrics.pool_tuning, "max_batch_size", i64::from(tuning.max_batch_size));
    set(&metrics.pool_tuning, "max_delay_ms", i64::from(tuning.max_delay_ms));
    if let Some(entries) = tuning.cache_entries {
        set(&metrics.pool_tuning, "cache_entries", i64::try_from(entries).unwrap_or(i64::MAX));
    }
}

/// Whether the stored status already describes this generation as fully rolled out.
fn was_settled(pool: &InferencePool) -> bool {
    let Some(status) = pool.status.as_ref() else { return false };
    let ready =
        status.conditions.iter().any(|c| c.type_ == inferpool_crds::pool::condition::READY && c.status == "True");
    ready && status.observed_generation == pool.metadata.generation
}

/// Replicas for the Deployment. Autoscaling on: the autoscaler's decision, else what the status
/// last recorded (so a restarted operator keeps the pool's size), else the floor; always within
/// `[min, max]`. Off: the manual count, which the scale subresource sets.
pub fn desired_replicas(pool: &InferencePool, applied: Option<&Applied>) -> i32 {
    let replicas = pool.spec.replicas;
    if !pool.spec.autoscaling.enabled {
        return replicas.count;
    }
    let decided = applied.and_then(|a| i32::try_from(a.decision.replicas).ok());
    let recorded = pool.status.as_ref().map(|s| s.desired_replicas).filter(|r| *r > 0);
    decided.or(recorded).unwrap_or(replicas.min).clamp(replicas.min, replicas.max.max(replicas.min))
}

/// The tuning to run: what is in force, with the fields the user pinned (auto off) taken from the
/// spec; the generation moves on only when a value changes, so pods never see a pointless push.
pub fn desired_tuning(pool: &InferencePool) -> Tuning {
    let from_spec = build::initial_tuning(&pool.spec);
    let Some(current) = pool.status.as_ref().and_then(|s| s.tuning) else { return from_spec };
    let spec = &pool.spec;
    let wanted = Tuning {
        generation: current.generation,
        max_batch_size: if spec.batching.auto { current.max_batch_size } else { from_spec.max_batch_size },
        max_delay_ms: if spec.batching.auto { current.max_delay_ms } else { from_spec.max_delay_ms },
        cache_entries: if spec.cache.auto { current.cache_entries } else { from_spec.cache_entries },
    };
    if wanted == current { current } else { Tuning { generation: current.generation + 1, ..wanted } }
}

/// Outcome of applying one child, for Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    Updated,
    Unchanged,
}

async fn apply<K>(ctx: &Context, namespace: &str, pool: &InferencePool, child: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = child.meta().name.clone().unwrap_or_default();
    let before = api.get_opt(&name).await?.and_then(|o| o.meta().resource_version.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api.patch(&name, &params, &Patch::Apply(child)).await?;
    let outcome = match before {
        None => Outcome::Created,
        Some(rv) if after.meta().resource_version.as_ref() == Some(&rv) => Outcome::Unchanged,
        Some(_) => Outcome::Updated,
    };
    if outcome != Outcome::Unchanged {
        let kind = K::kind(&());
        let verb = if outcome == Outcome::Created { "Created" } else { "Updated" };
        tracing::info!(pool = %key(pool), %kind, %name, "{}", verb.to_lowercase());
        let note = format!("{verb} {kind} {name}");
        publish(ctx, pool, event(EventType::Normal, verb, "Apply", note, Some(after.object_ref(&())))).await;
    }
    Ok(after)
}

/// Creates the pool's admin-token Secret when it is missing. It is never rewritten, so the token
/// never rotates by accident (pods read it at start; the operator reads it to push tuning).
async fn ensure_admin_secret(pool: &InferencePool, ctx: &Context, namespace: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = build::names::admin_secret(&pool.name_any());
    if secrets.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let secret = build::admin_secret(pool, &new_token()?)?;
    let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
    match secrets.create(&params, &secret).await {
        Ok(created) => {
            let note = format!("Created Secret {name}");
            let related = Some(created.object_ref(&()));
            publish(ctx, pool, event(EventType::Normal, "Created", "Apply", note, related)).await;
            Ok(())
        }
        // Another reconcile created it first: keep that token.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn report_invalid(pool: &InferencePool, pools: &Api<InferencePool>, ctx: &Context, message: &str) -> Result<()> {
    let old = pool.status.clone().unwrap_or_default();
    let already =
        old.conditions.iter().any(|c| c.type_ == DEGRADED && c.reason == "InvalidSpec" && c.message == message);
    if !already {
        publish(ctx, pool, event(EventType::Warning, "InvalidSpec", "Validate", message.to_owned(), None)).await;
    }
    let mut status = old;
    status.observed_generation = pool.metadata.generation;
    let now = Time(Timestamp::now());
    status::set_conditions(&mut status, status::invalid_spec_conditions(message), pool.metadata.generation, &now);
    write_status(pool, pools, status).await
}

async fn write_status(pool: &InferencePool, pools: &Api<InferencePool>, status: InferencePoolStatus) -> Result<()> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": InferencePool::api_version(&()),
        "kind": InferencePool::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    pools.patch_status(&pool.name_any(), &params, &Patch::Apply(&body)).await?;
    Ok(())
}

/// An Event about the pool; `related` names the child it concerns, which also keeps Events about
/// different children from being folded into one series.
fn event(type_: EventType, reason: &str, action: &str, note: String, related: Option<ObjectReference>) -> Event {
    Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: related }
}

/// Publishes an autoscaler note about the pool.
pub async fn publish_note(ctx: &Context, pool: &InferencePool, type_: EventType, reason: &str, note: String) {
    publish(ctx, pool, event(type_, reason, "Autoscale", note, None)).await;
}

async fn publish(ctx: &Context, pool: &InferencePool, event: Event) {
    if let Err(error) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
        // Events are best effort: a failure to record one must not fail the reconcile.
        tracing::warn!(pool = %key(pool), %error, "could not publish an Event");
    }
}
