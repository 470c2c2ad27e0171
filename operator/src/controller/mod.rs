//! The InferencePool controller: the reconciler and the loops beside it, wired one way.
//!
//! ```text
//! pods (store) --> autoscaler: observe -> policy -> decision --+--> Decisions --> reconciler --> Deployment,
//!                                                              |   + trigger                   Service, ConfigMap,
//!                                                              |                               PDB, status
//!                                                              +--> Actions --> actuator --> tuning pushes, cache
//!                                                                                            clears, pod deletions, Events
//! ```
//!
//! The reconciler ([`reconcile`]) is the only writer of a pool's children and status; the actuator
//! ([`crate::actuator`]) the only one that deletes pods or calls a replica's admin port. Children
//! and pods are read from reflector stores that the same watches fill which trigger reconciles.
//! Children are owned by the pool (ownerReferences), so the API server's garbage collector removes
//! them when the pool goes and no finalizer is needed.

mod apply;
mod reconcile;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use inferpool_crds::InferencePool;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::actuator::Actuator;
use crate::autoscale::decisions::{Decisions, PoolRef};
use crate::autoscale::runner::{self, Autoscaler};
use crate::build::{AdminKey, MANAGED_BY_LABEL, Settings};
use crate::error::{Error, Result};
use crate::events::{self, event};
use crate::metrics::Metrics;
use crate::pods::{self, HttpClient};

pub use apply::Written;

/// First and longest retry delay after a transient error (jitter adds up to the delay again,
/// within the cap), so pools that failed together do not retry together.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(300));
/// Actions waiting for the actuator before the autoscaler waits for it.
const ACTIONS_QUEUE: usize = 256;

/// What every reconcile shares.
pub struct Context {
    /// Client for the API server.
    pub client: Client,
    /// Operator-wide settings for the children.
    pub settings: Settings,
    /// What every pool's admin token is derived from.
    pub admin_key: AdminKey,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// HTTP client for the replicas (reports, tuning pushes).
    pub http: HttpClient,
    /// The autoscaler's latest decision per pool.
    pub decisions: Arc<Decisions>,
    /// The reconciler's last writes per pool.
    written: Written,
    /// The caches of children and pods (empty until [`run`] fills them).
    stores: RwLock<Stores>,
    /// Consecutive failures per pool, for exponential backoff.
    failures: Mutex<HashMap<PoolRef, u32>>,
}

/// Reflector stores of what the operator owns, filled by the controller's watches.
#[derive(Clone)]
pub struct Stores {
    /// The pools' Deployments.
    pub deployments: Store<Deployment>,
    /// The pools' Services.
    pub services: Store<Service>,
    /// The pools' tuning ConfigMaps.
    pub config_maps: Store<ConfigMap>,
    /// The pools' PodDisruptionBudgets.
    pub pdbs: Store<PodDisruptionBudget>,
    /// The pools' pods.
    pub pods: Store<Pod>,
}

impl Default for Stores {
    /// Stores that stay empty: their writers are dropped at once.
    fn default() -> Self {
        Self {
            deployments: reflector::store().0,
            services: reflector::store().0,
            config_maps: reflector::store().0,
            pdbs: reflector::store().0,
            pods: reflector::store().0,
        }
    }
}

impl Stores {
    /// Waits until every store has its first full list (at once for stores nobody fills).
    async fn ready(&self) {
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.config_maps.wait_until_ready().await;
        let _ = self.pdbs.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

impl Context {
    /// A context for a controller that reports Events as `reporter`.
    pub fn new(
        client: Client,
        settings: Settings,
        admin_key: AdminKey,
        reporter: Reporter,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            settings,
            admin_key,
            recorder,
            metrics,
            http: pods::client(),
            decisions: Arc::default(),
            written: Written::default(),
            stores: RwLock::default(),
            failures: Mutex::default(),
        }
    }

    /// The stores, once each has its first full list.
    async fn stores(&self) -> Stores {
        let stores = self.stores.read().clone();
        stores.ready().await;
        stores
    }

    /// Publishes an Event about the pool.
    async fn publish(&self, pool: &InferencePool, event: Event) {
        events::publish(&self.recorder, &pool.object_ref(&()), event).await;
    }

    fn failures(&self, pool: &InferencePool, update: impl FnOnce(&mut u32)) -> u32 {
        let mut failures = self.failures.lock();
        let key = PoolRef::from_obj(pool);
        let count = failures.entry(key.clone()).or_default();
        update(count);
        let value = *count;
        if value == 0 {
            failures.remove(&key);
        }
        value
    }
}

/// Runs the controller, the autoscaler and the actuator over the pools in `namespace` (all
/// namespaces when `None`) until `stopped` says true.
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>, stopped: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let pools: Api<InferencePool> = scoped(&client, namespace);
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}=inferpool-operator"));
    let (deployments, deployment_writer) = reflector::store();
    let (services, service_writer) = reflector::store();
    let (config_maps, config_map_writer) = reflector::store();
    let (pdbs, pdb_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    *ctx.stores.write() = Stores { deployments, services, config_maps, pdbs, pods: pods.clone() };

    let (trigger, triggered) = mpsc::unbounded_channel();
    let controller = Controller::new(pools, watcher::Config::default().any_semantic())
        .owns_stream(cached(scoped::<Deployment>(&client, namespace), &managed, deployment_writer))
        .owns_stream(cached(scoped::<Service>(&client, namespace), &managed, service_writer))
        .owns_stream(cached(scoped::<ConfigMap>(&client, namespace), &managed, config_map_writer))
        .owns_stream(cached(scoped::<PodDisruptionBudget>(&client, namespace), &managed, pdb_writer))
        .reconcile_on(futures::stream::unfold(triggered, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) }))
        .graceful_shutdown_on(stop_signal(stopped.clone()));
    let pool_store = controller.store();
    let pod_watch = watcher(scoped::<Pod>(&client, namespace), managed)
        .default_backoff()
        .reflect(pod_writer)
        .for_each(|_| std::future::ready(()));

    let (actions, actions_rx) = mpsc::channel(ACTIONS_QUEUE);
    let scaler = Autoscaler {
        http: ctx.http.clone(),
        metrics: ctx.metrics.clone(),
        decisions: ctx.decisions.clone(),
        trigger,
        actions,
    };
    let autoscaling = runner::run(Arc::new(scaler), pool_store.clone(), pods, stop_signal(stopped));
    let actuator = Actuator::new(client.clone(), ctx.http.clone(), ctx.recorder.clone(), ctx.admin_key.clone());
    let acting = Arc::new(actuator).run(actions_rx);

    let metrics = ctx.metrics.clone();
    let written = ctx.clone();
    let reconciling = controller.run(reconcile, error_policy, ctx).for_each(|result| {
        metrics.pools.set(i64::try_from(pool_store.len()).unwrap_or(i64::MAX));
        let live = |pool: &PoolRef| pool_store.get(pool).is_some();
        written.written.retain(live);
        match result {
            Ok((pool, _)) => tracing::debug!(pool = %pool.name, namespace = ?pool.namespace, "reconciled"),
            Err(error) => tracing::debug!(%error, "reconcile did not complete"),
        }
        std::future::ready(())
    });
    // The controller ends on shutdown; the loops beside it with it.
    tokio::select! {
        () = reconciling => {}
        () = autoscaling => {}
        () = acting => {}
        () = pod_watch => {}
    }
}

/// A watch of the operator's children of one kind that fills `writer`'s store and triggers
/// reconciles of their owners (deletions included, so a deleted child is recreated).
fn cached<K>(
    api: Api<K>,
    config: &watcher::Config,
    writer: reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    watcher(api, config.clone()).default_backoff().reflect(writer).touched_objects()
}

/// The User-Agent of the operator's requests, so that an API server's audit log tells them apart.
pub const USER_AGENT: &str = concat!("inferpool-operator/", env!("CARGO_PKG_VERSION"));

/// `config` with the operator's [`USER_AGENT`] on every request.
pub fn identified(mut config: kube::Config) -> kube::Config {
    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
    config
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

/// Reconciles one pool, in a span that names it; counted and timed in the operator's metrics.
pub async fn reconcile(pool: Arc<InferencePool>, ctx: Arc<Context>) -> Result<Action> {
    let span =
        tracing::info_span!("reconcile", namespace = pool.namespace().unwrap_or_default(), pool = pool.name_any());
    async {
        let timer = ctx.metrics.reconcile_duration.start_timer();
        let result = reconcile::reconcile_pool(&pool, &ctx).await;
        timer.observe_duration();
        let label = result.as_ref().map_or_else(Error::metric_label, |_| "success");
        ctx.metrics.reconciles.with_label_values(&[label]).inc();
        match &result {
            Ok(_) => {
                ctx.failures(&pool, |n| *n = 0);
            }
            // An invalid spec has its own Event; anything else is said once per distinct message
            // (the recorder folds repeats into a series).
            Err(error) if !error.is_permanent() => {
                let note = error.to_string();
                ctx.publish(&pool, event(EventType::Warning, "ReconcileFailed", "Reconcile", note, None)).await;
            }
            Err(_) => {}
        }
        result
    }
    .instrument(span)
    .await
}

/// After a failed reconcile: an invalid spec waits for a change; anything else retries with
/// exponential backoff per pool.
pub fn error_policy(pool: Arc<InferencePool>, error: &Error, ctx: Arc<Context>) -> Action {
    let span =
        tracing::info_span!("reconcile", namespace = pool.namespace().unwrap_or_default(), pool = pool.name_any());
    let _entered = span.enter();
    if error.is_permanent() {
        tracing::info!(%error, "waiting for the pool to change");
        return Action::await_change();
    }
    let attempt = ctx.failures(&pool, |n| *n = n.saturating_add(1));
    let delay = backoff(attempt);
    tracing::warn!(%error, attempt, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `attempt` (1-based): doubling from the first delay, plus a random
/// jitter of up to the same again, capped.
pub fn backoff(attempt: u32) -> Duration {
    let (first, cap) = BACKOFF;
    let steps = usize::try_from(attempt.clamp(1, 32)).unwrap_or(32);
    let delays =
        ExponentialBuilder::default().with_min_delay(first).with_max_delay(cap).with_jitter().without_max_times();
    delays.build().nth(steps - 1).unwrap_or(cap).min(cap)
}
