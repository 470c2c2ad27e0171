//! What the autoscaler hands on, in one direction only.
//!
//! - [`Decisions`]: the latest decision per pool, which the reconciler reads when it writes the
//!   Deployment's replicas, the tuning ConfigMap and the status (it is their only writer).
//! - [`Actions`]: the imperative part of a decision (tuning pushes to replicas that run an older
//!   tuning, cache clears, outlier pods to replace, Events to publish), which one actuator
//!   performs.
//!
//! Nothing flows back: the autoscaler remembers its own previous decision and never reads what
//! the reconciler or the actuator did, except through the objects they change in the cluster.

use std::collections::HashMap;

use inferpool_crds::pool::Decision as DecisionRecord;
use inferpool_crds::{InferencePool, Tuning};
use kube::runtime::reflector::ObjectRef;
use parking_lot::RwLock;

use super::policy::{Decision, Note};

/// How pools are named in per-pool state: namespace and name (the uid rides along for Events).
pub type PoolRef = ObjectRef<InferencePool>;

/// A decision as the reconciler applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The policy's latest decision.
    pub decision: Decision,
    /// The latest decision that changed replicas or tuning, for `status.lastDecision`.
    pub last_change: Option<DecisionRecord>,
}

/// The latest decision per pool: written by the autoscaler, read by the reconciler.
#[derive(Debug, Default)]
pub struct Decisions {
    latest: RwLock<HashMap<PoolRef, Applied>>,
}

impl Decisions {
    /// The latest decision for `pool`, if the autoscaler has made one.
    pub fn get(&self, pool: &PoolRef) -> Option<Applied> {
        self.latest.read().get(pool).cloned()
    }

    /// Records the latest decision for `pool`.
    pub fn put(&self, pool: PoolRef, applied: Applied) {
        self.latest.write().insert(pool, applied);
    }

    /// Forgets the pools `keep` says no to (deleted, or no longer autoscaled).
    pub fn retain(&self, keep: impl Fn(&PoolRef) -> bool) {
        self.latest.write().retain(|pool, _| keep(pool));
    }
}

/// What one decision asks to be done to a pool's replicas and in its Events.
#[derive(Debug, Clone, PartialEq)]
pub struct Actions {
    /// The pool (with its uid, which Events need).
    pub pool: PoolRef,
    /// The tuning to push.
    pub tuning: Tuning,
    /// IPs of ready replicas that run an older tuning generation.
    pub push_to: Vec<String>,
    /// IPs of ready replicas whose memory cache is to be cleared.
    pub clear_cache_on: Vec<String>,
    /// Names of outlier pods to delete (their Deployment replaces them).
    pub delete_pods: Vec<String>,
    /// Events to publish about the pool.
    pub notes: Vec<Note>,
}

impl Actions {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.push_to.is_empty()
            && self.clear_cache_on.is_empty()
            && self.delete_pods.is_empty()
            && self.notes.is_empty()
    }
}
