//! The pool's status as a pure function of what the operator observed.
//!
//! Conditions follow the Kubernetes conventions: one entry per type, `lastTransitionTime` moves only
//! when the status flips, `reason` is a CamelCase word and `message` a sentence for humans.
//! Because the status is recomputed from observations on every reconcile, a restarted operator
//! writes nothing when nothing changed.

use inferpool_crds::InferencePoolStatus;
use inferpool_crds::pool::condition::{DEGRADED, PROGRESSING, READY, SLA_ANOMALY, SLA_COMPLIANT};

use crate::autoscale::policy::Observed;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the operator saw of a pool's Deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Replicas the operator asked for.
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods ready for traffic.
    pub ready: i32,
    /// Pods running the current template.
    pub updated: i32,
    /// Whether the Deployment controller has seen the latest Deployment spec.
    pub observed: bool,
    /// Whether the Deployment reports its progress deadline exceeded.
    pub stalled: bool,
}

impl Rollout {
    /// Reads a Deployment's status; `desired` is what the operator applied.
    pub fn of(deployment: Option<&Deployment>, desired: i32) -> Self {
        let Some(deployment) = deployment else { return Self { desired, ..Self::default() } };
        let status = deployment.status.clone().unwrap_or_default();
        let generation = deployment.metadata.generation.unwrap_or_default();
        let stalled = status.conditions.iter().flatten().any(|c| {
            c.type_.as_deref() == Some("Progressing")
                && c.status.as_deref() == Some("False")
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        Self {
            desired,
            replicas: status.replicas.unwrap_or_default(),
            ready: status.ready_replicas.unwrap_or_default(),
            updated: status.updated_replicas.unwrap_or_default(),
            observed: status.observed_generation.unwrap_or_default() >= generation,
            stalled,
        }
    }

    /// Whether every desired replica runs the current template, is ready and no old pod is left.
    pub fn complete(&self) -> bool {
        self.observed && self.updated >= self.desired && self.ready >= self.desired && self.replicas == self.desired
    }
}

/// One condition as the operator wants it now; the time is filled in by [`set_condition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// The conditions for a pool whose spec is valid, from its rollout.
pub fn rollout_conditions(rollout: &Rollout) -> Vec<Wanted> {
    let Rollout { desired, ready, updated, .. } = *rollout;
    // Old-template pods left means a rollout; otherwise the count is moving.
    let counts = format!("{ready}/{desired} replicas ready, {updated} on the current template");
    let ready_condition = if rollout.complete() {
        Wanted { type_: READY, status: "True", reason: "ReplicasReady", message: counts.clone() }
    } else {
        Wanted { type_: READY, status: "False", reason: "ReplicasNotReady", message: counts.clone() }
    };
    let progressing = if rollout.complete() {
        Wanted { type_: PROGRESSING, status: "False", reason: "RolloutComplete", message: counts.clone() }
    } else if rollout.updated < rollout.replicas || !rollout.observed {
        Wanted { type_: PROGRESSING, status: "True", reason: "RollingOut", message: counts.clone() }
    } else {
        Wanted { type_: PROGRESSING, status: "True", reason: "Scaling", message: counts.clone() }
    };
    let degraded = if rollout.stalled {
        Wanted {
            type_: DEGRADED,
            status: "True",
            reason: "RolloutStalled",
            message: format!("the Deployment exceeded its progress deadline: {counts}"),
        }
    } else {
        Wanted { type_: DEGRADED, status: "False", reason: "AsExpected", message: "spec is valid".to_owned() }
    };
    vec![ready_condition, progressing, degraded]
}

/// The conditions for a pool whose spec breaks a rule: nothing is changed until the user fixes it.
pub fn invalid_spec_conditions(message: &str) -> Vec<Wanted> {
    vec![
        Wanted { type_: DEGRADED, status: "True", reason: "InvalidSpec", message: message.to_owned() },
        Wanted {
            type_: PROGRESSING,
            status: "False",
            reason: "InvalidSpec",
            message: "waiting for a valid spec".to_owned(),
        },
    ]
}

/// The SLA condition until the autoscaler has observations.
pub fn sla_unknown() -> Wanted {
    Wanted {
        type_: SLA_COMPLIANT,
        status: "Unknown",
        reason: "NoObservations",
        message: "no SLA observations yet".to_owned(),
    }
}

/// `SLACompliant` from the autoscaler's observation over the stable window.
pub fn sla_condition(observed: &Observed, target_ms: u32) -> Wanted {
    let figures = format!(
        "p95 {:.0} ms (target {target_ms} ms), error rate {:.2}%, cache hit rate {:.0}%, {:.1} rps",
        observed.p95_ms,
        observed.error_rate * 100.0,
        observed.cache_hit_rate * 100.0,
        observed.rps
    );
    match observed.compliant {
        Some(true) => Wanted { type_: SLA_COMPLIANT, status: "True", reason: "WithinSLA", message: figures },
        Some(false) => Wanted { type_: SLA_COMPLIANT, status: "False", reason: "SLABreached", message: figures },
        None => Wanted {
            type_: SLA_COMPLIANT,
            status: "Unknown",
            reason: "NoTraffic",
            message: "no requests in the stable window to judge".to_owned(),
        },
    }
}

/// `SLAAnomaly`: True while the p95 is outside two standard deviations of its baseline.
pub fn anomaly_condition(anomaly: Option<&str>) -> Wanted {
    match anomaly {
        Some(message) => {
            Wanted { type_: SLA_ANOMALY, status: "True", reason: "LatencyAnomaly", message: message.to_owned() }
        }
        None => Wanted {
            type_: SLA_ANOMALY,
            status: "False",
            reason: "WithinBaseline",
            message: "p95 within two standard deviations of its baseline".to_owned(),
        },
    }
}

/// Sets one condition, keeping `lastTransitionTime` unless the status flips.
pub fn set_condition(conditions: &mut Vec<Condition>, wanted: Wanted, generation: Option<i64>, now: &Time) {
    let new = Condition {
        type_: wanted.type_.to_owned(),
        status: wanted.status.to_owned(),
        reason: wanted.reason.to_owned(),
        message: wanted.message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) if old.status == new.status => {
            *old = Condition { last_transition_time: old.last_transition_time.clone(), ..new };
        }
        Some(old) => *old = new,
        None => conditions.push(new),
    }
}

/// Applies every wanted condition to a status.
pub fn set_conditions(status: &mut InferencePoolStatus, wanted: Vec<Wanted>, generation: Option<i64>, now: &Time) {
    for w in wanted {
        set_condition(&mut status.conditions, w, generation, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap_or_default())
    }

    fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut conditions = Vec::new();
        let not_ready = || Wanted { type_: READY, status: "False", reason: "ReplicasNotReady", message: "0/1".into() };
        set_condition(&mut conditions, not_ready(), Some(1), &at(100));
        set_condition(&mut conditions, Wanted { message: "0/2".into(), ..not_ready() }, Some(2), &at(200));
        let ready = find(&conditions, READY);
        assert_eq!((ready.last_transition_time.clone(), ready.message.as_str()), (at(100), "0/2"));
        assert_eq!(ready.observed_generation, Some(2));

        let wanted = Wanted { type_: READY, status: "True", reason: "ReplicasReady", message: "2/2".into() };
        set_condition(&mut conditions, wanted, Some(2), &at(300));
        assert_eq!(find(&conditions, READY).last_transition_time, at(300));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn rollout_states_map_to_conditions() {
        let complete = Rollout { desired: 2, replicas: 2, ready: 2, updated: 2, observed: true, stalled: false };
        let rolling = Rollout { updated: 1, replicas: 3, ..complete };
        let scaling = Rollout { desired: 3, ..complete };
        let stalled = Rollout { stalled: true, ..rolling };
        let table = [
            (complete, ("True", "ReplicasReady"), ("False", "RolloutComplete"), "False"),
            (rolling, ("False", "ReplicasNotReady"), ("True", "RollingOut"), "False"),
            (scaling, ("False", "ReplicasNotReady"), ("True", "Scaling"), "False"),
            (stalled, ("False", "ReplicasNotReady"), ("True", "RollingOut"), "True"),
        ];
        for (rollout, ready, progressing, degraded) in table {
            let wanted = rollout_conditions(&rollout);
            let get = |t: &str| wanted.iter().find(|w| w.type_ == t).map(|w| (w.status, w.reason));
            assert_eq!(get(READY), Some(ready), "{rollout:?}");
            assert_eq!(get(PROGRESSING), Some(progressing), "{rollout:?}");
            assert_eq!(get(DEGRADED).map(|d| d.0), Some(degraded), "{rollout:?}");
        }
    }

    #[test]
    fn sla_figures_and_conditions_follow_the_observation() {
        let observed =
            Observed { p95_ms: 812.345, error_rate: 0.01234, cache_hit_rate: 0.7, rps: 240.04, compliant: Some(false) };
        let sla = observed.sla_status().unwrap_or_default();
        assert_eq!((sla.p95_ms, sla.error_rate, sla.rps, sla.compliant), (812.3, 0.0123, 240.0, false));
        let condition = sla_condition(&observed, 500);
        assert_eq!((condition.status, condition.reason), ("False", "SLABreached"));
        assert!(condition.message.starts_with("p95 812 ms (target 500 ms)"), "{}", condition.message);
        let quiet = Observed { compliant: None, ..observed };
        assert_eq!(quiet.sla_status(), None);
        assert_eq!(sla_condition(&quiet, 500).status, "Unknown");
        assert_eq!(anomaly_condition(Some("p95 900 ms vs 300 +- 50 ms")).status, "True");
        assert_eq!(anomaly_condition(None).status, "False");
    }

    #[test]
    fn a_missing_deployment_is_not_ready() {
        let rollout = Rollout::of(None, 2);
        assert!(!rollout.complete());
        assert_eq!(rollout_conditions(&rollout)[0].status, "False");
    }
}
