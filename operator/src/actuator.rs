//! The actuator: performs what autoscaler decisions name besides replicas and tuning, which the
//! reconciler writes. It pushes the tuning to replicas that run an older generation, clears
//! replicas' memory caches, deletes outlier pods (their Deployment replaces them) and publishes
//! the decision's Events. It is the only part of the operator that deletes pods or calls a
//! replica's admin port.
//!
//! Pushes need the pool's admin token, read once per pool from the Secret the reconciler created
//! and kept in memory; a push that fails is retried by the next decision that finds the replica
//! still behind.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::{EventType, Recorder};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::autoscale::decisions::{Actions, PoolRef};
use crate::build;
use crate::events::{event, publish};
use crate::pods::{self, HttpClient};

/// Pools acted on at the same time.
const POOLS_AT_ONCE: usize = 32;

/// What the actuator acts with.
pub struct Actuator {
    /// Client for the API server (pod deletions, the admin Secret, Events).
    pub client: Client,
    /// HTTP client for the replicas' admin ports.
    pub http: HttpClient,
    /// Publishes the decisions' Events.
    pub recorder: Recorder,
    /// Admin token per pool, read once, with the uid of the pool it was read for.
    tokens: Mutex<HashMap<PoolRef, (Option<String>, String)>>,
}

impl Actuator {
    /// An actuator with no tokens read yet.
    pub fn new(client: Client, http: HttpClient, recorder: Recorder) -> Self {
        Self { client, http, recorder, tokens: Mutex::new(HashMap::new()) }
    }

    /// Performs every batch of actions that arrives, until the senders are gone.
    pub async fn run(self: Arc<Self>, actions: mpsc::Receiver<Actions>) {
        let incoming = futures::stream::unfold(actions, |mut rx| async move { rx.recv().await.map(|a| (a, rx)) });
        incoming
            .for_each_concurrent(POOLS_AT_ONCE, |actions| {
                let pool = &actions.pool;
                let span = tracing::info_span!(
                    "act",
                    namespace = pool.namespace.as_deref().unwrap_or_default(),
                    pool = %pool.name
                );
                let this = self.clone();
                async move { this.act(actions).await }.instrument(span)
            })
            .await;
    }

    /// Performs one decision's actions.
    pub async fn act(&self, actions: Actions) {
        let namespace = actions.pool.namespace.clone().unwrap_or_default();
        if (!actions.push_to.is_empty() || !actions.clear_cache_on.is_empty())
            && let Some(token) = self.token(&actions.pool, &namespace).await
        {
            for ip in &actions.push_to {
                if let Err(error) = pods::push_tuning(&self.http, ip, &token, &actions.tuning).await {
                    tracing::warn!(pod_ip = %ip, %error, "tuning push failed; retried next tick");
                }
            }
            for ip in &actions.clear_cache_on {
                if let Err(error) = pods::clear_memory_cache(&self.http, ip, &token).await {
                    tracing::warn!(pod_ip = %ip, %error, "cache clear failed");
                }
            }
        }
        let pod_api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        for pod in &actions.delete_pods {
            match pod_api.delete(pod, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(%pod, "deleted an outlier replica"),
                Err(error) => tracing::warn!(%pod, %error, "could not delete an outlier replica"),
            }
        }
        let regarding = ObjectReference::from(actions.pool.clone());
        for note in actions.notes {
            let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
            publish(&self.recorder, &regarding, event(type_, note.reason, "Autoscale", note.message, None)).await;
        }
    }

    /// The pool's admin token, read once from its Secret (again for a new pool of the same name).
    async fn token(&self, pool: &PoolRef, namespace: &str) -> Option<String> {
        let uid = pool.extra.uid.clone();
        if let Some((_, token)) = self.tokens.lock().get(pool).filter(|(read_for, _)| *read_for == uid) {
            return Some(token.clone());
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = secrets.get_opt(&build::names::admin_secret(&pool.name)).await.ok().flatten()?;
        let token = secret.data.as_ref()?.get(build::ADMIN_TOKEN_KEY)?;
        let token = String::from_utf8_lossy(&token.0).into_owned();
        self.tokens.lock().insert(pool.clone(), (uid, token.clone()));
        Some(token)
    }

    /// Forgets the tokens of pools `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&PoolRef) -> bool) {
        self.tokens.lock().retain(|pool, _| keep(pool));
    }
}
