//! The actuator: performs what autoscaler decisions name besides replicas and tuning, which the
//! reconciler writes. It pushes the tuning to replicas that run an older generation, clears
//! replicas' memory caches, deletes outlier pods (their Deployment replaces them) and publishes
//! the decision's Events. It is the only part of the operator that deletes pods or calls a
//! replica's admin port.
//!
//! Pushes carry the pool's admin token, derived from the operator's admin key like the one in the
//! Secret the reconciler created (the operator never reads Secrets); a push that fails is retried
//! by the next decision that finds the replica still behind. A replica that refuses the token
//! (401) holds one this key did not make; the Warning Event says how to recover.

use std::sync::Arc;

use futures::StreamExt;
use http::StatusCode;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::{EventType, Recorder};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::autoscale::decisions::Actions;
use crate::build::AdminKey;
use crate::events::{event, publish};
use crate::pods::{self, HttpClient, PodError};

/// Pools acted on at the same time.
const POOLS_AT_ONCE: usize = 32;

/// What the actuator acts with.
pub struct Actuator {
    /// Client for the API server (pod deletions, Events).
    pub client: Client,
    /// HTTP client for the replicas' admin ports.
    pub http: HttpClient,
    /// Publishes the decisions' Events.
    pub recorder: Recorder,
    /// What the pools' admin tokens are derived from.
    admin_key: AdminKey,
}

impl Actuator {
    /// An actuator that authenticates to replicas with tokens derived from `admin_key`.
    pub fn new(client: Client, http: HttpClient, recorder: Recorder, admin_key: AdminKey) -> Self {
        Self { client, http, recorder, admin_key }
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
        let regarding = ObjectReference::from(actions.pool.clone());
        if (!actions.push_to.is_empty() || !actions.clear_cache_on.is_empty())
            && let Some(uid) = actions.pool.extra.uid.as_deref()
        {
            let token = self.admin_key.token(&namespace, &actions.pool.name, uid);
            let mut refused = Vec::new();
            for ip in &actions.push_to {
                if let Err(error) = pods::push_tuning(&self.http, ip, &token, &actions.tuning).await {
                    tracing::warn!(pod_ip = %ip, %error, "tuning push failed; retried next tick");
                    if matches!(error, PodError::Status(StatusCode::UNAUTHORIZED, _)) {
                        refused.push(ip.as_str());
                    }
                }
            }
            for ip in &actions.clear_cache_on {
                if let Err(error) = pods::clear_memory_cache(&self.http, ip, &token).await {
                    tracing::warn!(pod_ip = %ip, %error, "cache clear failed");
                }
            }
            if !refused.is_empty() {
                let secret = crate::build::names::admin_secret(&actions.pool.name);
                let note = format!(
                    "replicas at {} refused the admin token: Secret {secret} holds a token this operator's admin \
                     key did not make (created by an older version, or the key changed). Delete the Secret and \
                     restart the pool's pods (kubectl rollout restart deployment/{}); the operator recreates it",
                    refused.join(", "),
                    actions.pool.name
                );
                let warning = event(EventType::Warning, "AdminTokenRefused", "PushTuning", note, None);
                publish(&self.recorder, &regarding, warning).await;
            }
        }
        let pod_api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        for pod in &actions.delete_pods {
            match pod_api.delete(pod, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(%pod, "deleted an outlier replica"),
                Err(error) => tracing::warn!(%pod, %error, "could not delete an outlier replica"),
            }
        }
        for note in actions.notes {
            let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
            publish(&self.recorder, &regarding, event(type_, note.reason, "Autoscale", note.message, None)).await;
        }
    }
}
