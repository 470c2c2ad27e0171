//! The Deployment controller's arithmetic, without ReplicaSets: which pods to create and delete
//! for a Deployment's strategy, and the status that describes the result.
//!
//! Pods of the current template ("new") and of earlier ones ("old") are told apart by their
//! `pod-template-hash` label, where Kubernetes keeps one ReplicaSet per template. A rolling
//! update follows the controller's rules: never more than `replicas + maxSurge` pods, old pods
//! deleted only while at least `replicas - maxUnavailable` pods stay ready, one step (scale up or
//! scale down) per pass. `minReadySeconds` is not modelled: a pod is available once ready.

use serde_json::{Value, json};

/// What the planner needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Its name.
    pub name: String,
    /// Whether it has the current template.
    pub updated: bool,
    /// Whether it is Ready.
    pub ready: bool,
}

/// How a Deployment replaces its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Delete every old pod, then create new ones.
    Recreate,
    /// Replace pods gradually within these bounds.
    RollingUpdate {
        /// Pods allowed above `replicas`.
        max_surge: usize,
        /// Pods allowed below `replicas` that are not ready.
        max_unavailable: usize,
    },
}

/// An int-or-percent field of `replicas`, rounded as Kubernetes rounds it.
pub fn scaled(value: Option<&Value>, default_percent: usize, replicas: usize, round_up: bool) -> usize {
    let percent = |p: usize| {
        let n = p * replicas;
        if round_up { n.div_ceil(100) } else { n / 100 }
    };
    match value {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
        Some(Value::String(s)) => s.strip_suffix('%').and_then(|p| p.trim().parse().ok()).map_or(0, percent),
        _ => percent(default_percent),
    }
}

impl Strategy {
    /// The strategy of deployment `d` with `replicas` desired (defaults 25% / 25%; both zero
    /// means one unavailable, as the API server's validation and the controller arrange).
    pub fn of(d: &Value, replicas: usize) -> Strategy {
        if d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate") {
            return Strategy::Recreate;
        }
        let ru = d.pointer("/spec/strategy/rollingUpdate");
        let max_surge = scaled(ru.and_then(|r| r.get("maxSurge")), 25, replicas, true);
        let mut max_unavailable = scaled(ru.and_then(|r| r.get("maxUnavailable")), 25, replicas, false).min(replicas);
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        Strategy::RollingUpdate { max_surge, max_unavailable }
    }

    fn max_unavailable(self, replicas: usize) -> usize {
        match self {
            Strategy::Recreate => replicas,
            Strategy::RollingUpdate { max_unavailable, .. } => max_unavailable,
        }
    }
}

/// One pass's actions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// New pods to create.
    pub create: usize,
    /// Pods to delete, by name.
    pub delete: Vec<String>,
}

/// Names of up to `n` of `pods`, the ones a controller gives up first: not ready before ready,
/// newer (later name) before older.
fn victims<'a>(pods: impl Iterator<Item = &'a PodInfo>, n: usize) -> Vec<String> {
    let mut pods: Vec<&PodInfo> = pods.collect();
    pods.sort_by(|a, b| a.ready.cmp(&b.ready).then_with(|| b.name.cmp(&a.name)));
    pods.into_iter().take(n).map(|p| p.name.clone()).collect()
}

/// What to do next to bring `pods` to `replicas` pods of the current template.
pub fn plan(replicas: usize, strategy: Strategy, pods: &[PodInfo]) -> Plan {
    let new = pods.iter().filter(|p| p.updated).count();
    let old = pods.len() - new;
    if new > replicas {
        return Plan { create: 0, delete: victims(pods.iter().filter(|p| p.updated), new - replicas) };
    }
    let Strategy::RollingUpdate { max_surge, max_unavailable } = strategy else {
        if old > 0 {
            return Plan { create: 0, delete: victims(pods.iter().filter(|p| !p.updated), old) };
        }
        return Plan { create: replicas - new, delete: Vec::new() };
    };
    // Scale up the new pods as far as the surge allows; that is this pass's step if any.
    let room = (replicas + max_surge).saturating_sub(pods.len());
    let create = (new + room).min(replicas) - new;
    if create > 0 {
        return Plan { create, delete: Vec::new() };
    }
    if old == 0 {
        return Plan::default();
    }
    // Scale down old pods: unready ones first, then ready ones while enough stay available.
    let min_available = replicas - max_unavailable;
    let new_unavailable = pods.iter().filter(|p| p.updated && !p.ready).count();
    let mut budget = pods.len().saturating_sub(min_available + new_unavailable);
    let mut delete = victims(pods.iter().filter(|p| !p.updated && !p.ready), budget);
    budget -= delete.len();
    let available = pods.iter().filter(|p| p.ready).count();
    let ready_old = available.saturating_sub(min_available).min(budget);
    delete.extend(victims(pods.iter().filter(|p| !p.updated && p.ready), ready_old));
    Plan { create: 0, delete }
}

/// The Deployment status for `pods` (after this pass's actions); zero counts are left out, as
/// the API leaves them out.
pub fn status(d: &Value, replicas: usize, strategy: Strategy, pods: &[PodInfo]) -> Value {
    let name = d.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let total = pods.len();
    let updated = pods.iter().filter(|p| p.updated).count();
    let available = pods.iter().filter(|p| p.ready).count();
    let mut status = json!({
        "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    for (field, n) in [
        ("replicas", total),
        ("updatedReplicas", updated),
        ("readyReplicas", available),
        ("availableReplicas", available),
        ("unavailableReplicas", total.saturating_sub(available)),
    ] {
        if n > 0 {
            status[field] = json!(n);
        }
    }
    let minimum = available >= replicas.saturating_sub(strategy.max_unavailable(replicas));
    let available_condition = if minimum {
        json!({"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."})
    } else {
        json!({"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."})
    };
    let complete = updated == replicas && total == replicas && available == replicas;
    let progressing = if complete {
        json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": format!("Deployment \"{name}\" has successfully progressed.")})
    } else {
        json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": format!("Deployment \"{name}\" is progressing.")})
    };
    status["conditions"] = json!([available_condition, progressing]);
    status
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(name: &str, updated: bool, ready: bool) -> PodInfo {
        PodInfo { name: name.to_owned(), updated, ready }
    }

    fn rolling(surge: Value, unavailable: Value, replicas: usize) -> Strategy {
        let d = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}}});
        Strategy::of(&d, replicas)
    }

    #[test]
    fn int_or_percent_rounds_surge_up_and_unavailable_down() {
        assert_eq!(Strategy::of(&json!({}), 10), Strategy::RollingUpdate { max_surge: 3, max_unavailable: 2 });
        assert_eq!(
            rolling(json!("50%"), json!("50%"), 3),
            Strategy::RollingUpdate { max_surge: 2, max_unavailable: 1 }
        );
        assert_eq!(rolling(json!(1), json!(0), 2), Strategy::RollingUpdate { max_surge: 1, max_unavailable: 0 });
        assert_eq!(
            rolling(json!(0), json!("10%"), 2),
            Strategy::RollingUpdate { max_surge: 0, max_unavailable: 1 },
            "both zero: one may be unavailable"
        );
        assert_eq!(Strategy::of(&json!({"spec": {"strategy": {"type": "Recreate"}}}), 2), Strategy::Recreate);
    }

    #[test]
    fn surge_one_unavailable_zero_replaces_one_at_a_time() {
        let s = rolling(json!(1), json!(0), 2);
        let mut pods = vec![pod("a", false, true), pod("b", false, true)];
        assert_eq!(plan(2, s, &pods), Plan { create: 1, delete: vec![] });
        pods.push(pod("c", true, false));
        assert_eq!(plan(2, s, &pods), Plan::default(), "nothing goes until the new pod is ready");
        pods[2].ready = true;
        assert_eq!(plan(2, s, &pods).delete.len(), 1);
        pods.remove(1);
        assert_eq!(plan(2, s, &pods), Plan { create: 1, delete: vec![] });
        pods.push(pod("d", true, true));
        assert_eq!(plan(2, s, &pods), Plan { create: 0, delete: vec!["a".to_owned()] });
        pods.remove(0);
        assert_eq!(plan(2, s, &pods), Plan::default());
    }

    #[test]
    fn unready_old_pods_go_first_and_unavailable_budget_is_used() {
        let s = rolling(json!(0), json!(1), 3);
        let pods = vec![pod("a", false, true), pod("b", false, false), pod("c", false, true)];
        assert_eq!(plan(3, s, &pods), Plan { create: 0, delete: vec!["b".to_owned()] });
        let pods = vec![pod("a", false, true), pod("c", false, true)];
        assert_eq!(plan(3, s, &pods), Plan { create: 1, delete: vec![] });
    }

    #[test]
    fn scaling_and_recreate() {
        let s = Strategy::of(&json!({}), 3);
        assert_eq!(plan(3, s, &[]).create, 3);
        let pods = vec![pod("a", true, true), pod("b", true, false), pod("c", true, true)];
        assert_eq!(plan(1, s, &pods).delete, vec!["b".to_owned(), "c".to_owned()]);
        let old = vec![pod("a", false, true)];
        assert_eq!(plan(1, Strategy::Recreate, &old).delete, vec!["a".to_owned()]);
        assert_eq!(plan(1, Strategy::Recreate, &[]).create, 1);
    }

    #[test]
    fn status_counts_and_conditions() {
        let d = json!({"metadata": {"name": "m", "generation": 4}});
        let s = rolling(json!(1), json!(0), 2);
        let st = status(&d, 2, s, &[pod("a", false, true), pod("b", false, true), pod("c", true, false)]);
        assert_eq!(st["observedGeneration"], 4);
        assert_eq!((st["replicas"].clone(), st["updatedReplicas"].clone()), (json!(3), json!(1)));
        assert_eq!((st["availableReplicas"].clone(), st["unavailableReplicas"].clone()), (json!(2), json!(1)));
        assert_eq!(st["conditions"][0]["status"], "True");
        assert_eq!(st["conditions"][1]["reason"], "ReplicaSetUpdated");
        let done = status(&d, 1, s, &[pod("c", true, true)]);
        assert!(done.get("unavailableReplicas").is_none());
        assert_eq!(done["conditions"][1]["reason"], "NewReplicaSetAvailable");
        let down = status(&d, 2, s, &[pod("c", true, false)]);
        assert_eq!(down["conditions"][0]["status"], "False");
        assert!(down.get("readyReplicas").is_none());
    }
}
