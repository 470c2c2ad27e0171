//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas never both
//! reconcile. The standby takes over once the leader's lease expires (at most the lease duration
//! after the leader died); a leader that loses its lease stops its controller at once.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Where and how long the lease is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (its pod name in a cluster).
    pub identity: String,
    /// Seconds a lease stays valid after its last renewal.
    pub duration_seconds: u64,
}

/// Runs `work()` only while this replica leads, until `shutdown` fires; the lease is released on
/// the way out so a standby takes over at once after a clean stop.
pub async fn lead<F, Fut>(
    client: Client,
    settings: &LeaseSettings,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    work: F,
) -> Result<(), LeaseManagerError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let grace = (settings.duration_seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds.max(grace + 1))
        .with_grace(grace)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    'outer: loop {
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => if changed.is_err() { break 'outer },
                _ = shutdown.wait_for(|stop| *stop) => break 'outer,
            }
        }
        metrics.leader.set(1);
        tracing::info!(identity = %settings.identity, lease = %settings.name, "leading");
        tokio::select! {
            () = work() => break 'outer,
            _ = leading.wait_for(|leads| !*leads) => {
                metrics.leader.set(0);
                tracing::warn!(identity = %settings.identity, "lost the lease; controller stopped");
            }
            _ = shutdown.wait_for(|stop| *stop) => break 'outer,
        }
    }
    metrics.leader.set(0);
    drop(leading);
    match task.await {
        Ok(result) => result.map(|_| ()),
        Err(join) => {
            tracing::warn!(error = %join, "lease task ended abnormally");
            Ok(())
        }
    }
}
