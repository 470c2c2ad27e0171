//! Replicas: demand over measured capacity, Knative's stable and panic windows, HPA's scale-down
//! stabilisation.
//!
//! - `desired = ceil(demand / (targetUtilization x capacity))`, where demand is the window's completed
//!   rps plus queue growth and capacity is one replica's rps at the SLA as measured (see
//!   [`super::batching::capacity_rps`]), lowered to what the pods actually sustained when the recent
//!   p95 broke the target while they were busy (a ceiling that expires after [`CEILING_SECONDS`]).
//! - Stable mode scales up when demand exceeds the running and starting replicas' planned capacity by
//!   more than [`TOLERANCE`]; panic mode (the panic window needs >= 2x the running and starting
//!   replicas) scales up at once and never down until a stable window passes without panic.
//! - Scale-down uses the highest recommendation of the last `scaleDownDelaySeconds` and only once
//!   that much history exists; it removes half the surplus (at least one) per step, one step per
//!   half stable window.

use std::collections::VecDeque;

use super::{Inputs, MIN_REQUESTS, Mode, Window};

/// Scale up in stable mode only when demand exceeds planned capacity by more than this share.
pub const TOLERANCE: f64 = 0.1;
/// Panic when the panic window needs this many times the running and starting replicas.
pub const PANIC_THRESHOLD: f64 = 2.0;
/// How long a capacity ceiling learned from a broken p95 holds, in seconds.
pub const CEILING_SECONDS: f64 = 600.0;
/// Least time between two scale-outs for the pool-wide error rate, in seconds.
pub const ERROR_STEP_SECONDS: f64 = 30.0;

/// What the replica rule remembers.
#[derive(Debug, Clone, Default)]
pub(super) struct Memory {
    /// (time, recommended replicas) over the scale-down delay.
    recommendations: VecDeque<(f64, u32)>,
    /// Panic mode lasts until then.
    pub(super) panic_until: Option<f64>,
    last_down: Option<f64>,
    last_error_step: Option<f64>,
    /// Per-replica rps at which the SLA was seen broken, and when.
    ceiling: Option<(f64, f64)>,
    /// The capacity used by the latest decision.
    pub(super) capacity: Option<f64>,
}

/// The replica count decided and why.
pub(super) struct Plan {
    pub(super) replicas: u32,
    pub(super) mode: Mode,
    pub(super) reason: String,
}

/// Replicas for this tick.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    inputs: &Inputs,
    mem: &mut Memory,
    started_at: f64,
    model_capacity: Option<f64>,
    stable: &Window,
    panic: &Window,
    pool_error: Option<f64>,
) -> Plan {
    let spec = inputs.spec;
    let now = inputs.now;
    let current = inputs.replicas;
    let min = u32::try_from(spec.replicas.min.max(0)).unwrap_or(0);
    let max = u32::try_from(spec.replicas.max.max(0)).unwrap_or(0).max(min);
    if !spec.autoscaling.enabled {
        let count = u32::try_from(spec.replicas.count.max(0)).unwrap_or(0);
        return Plan {
            replicas: count,
            mode: Mode::Stable,
            reason: format!("autoscaling off: replicas.count {count}"),
        };
    }
    let target = f64::from(spec.sla.p95_latency_ms);
    let utilization = spec.autoscaling.target_utilization.clamp(0.1, 1.0);
    let stable_s = f64::from(spec.autoscaling.stable_window_seconds);
    let delay_s = f64::from(spec.autoscaling.scale_down_delay_seconds);
    let ready = if panic.samples > 0 { panic.ready } else { stable.ready };
    let supply = f64::from(panic.starting) + panic.ready.round();

    // A p95 above target while the pods are busy and none is starting: they sustain less than modelled.
    mem.ceiling = mem.ceiling.filter(|&(_, at)| now - at < CEILING_SECONDS);
    if panic.requests >= MIN_REQUESTS && panic.p95_ms > target && panic.starting == 0 && ready > 0.0 {
        let per_pod = panic.demand_rps() / ready;
        let busy = model_capacity.is_none_or(|c| per_pod >= 0.5 * c);
        if busy {
            let sustained = per_pod * (target / panic.p95_ms).max(0.5);
            let lowest = mem.ceiling.map_or(sustained, |(c, _)| c.min(sustained));
            mem.ceiling = Some((lowest, now));
        }
    }
    let capacity = match (model_capacity, mem.ceiling) {
        (Some(c), Some((k, _))) => Some(c.min(k)),
        (c, k) => c.or(k.map(|(k, _)| k)),
    }
    .filter(|c| *c > 0.0);
    mem.capacity = capacity;

    let need = |demand: f64| capacity.map(|c| (demand / (utilization * c)).ceil().min(f64::from(u32::MAX)) as u32);
    let demand = stable.demand_rps();
    let idle = stable.requests == 0 && demand <= 0.0;
    let recommended = if idle { min } else { need(demand).unwrap_or(current) }.clamp(min, max);

    // Panic: the short window needs twice what runs or starts.
    let panic_need = need(panic.demand_rps()).unwrap_or(0);
    if panic.requests >= MIN_REQUESTS && f64::from(panic_need) >= PANIC_THRESHOLD * supply.max(1.0) {
        mem.panic_until = Some(now + stable_s);
    }
    let panicking = mem.panic_until.is_some_and(|until| now < until);
    let mode = if panicking { Mode::Panic } else { Mode::Stable };
    let recommended = if panicking { recommended.max(panic_need.clamp(min, max)) } else { recommended };

    mem.recommendations.push_back((now, recommended));
    while mem.recommendations.front().is_some_and(|&(at, _)| at < now - delay_s) {
        mem.recommendations.pop_front();
    }
    let c = capacity.unwrap_or(0.0);
    let at_capacity = format!("capacity {c:.0} rps/replica at {:.0}% utilisation", utilization * 100.0);
    let sla = if stable.requests >= MIN_REQUESTS && stable.p95_ms > target {
        format!("p95 {:.0} ms > {target:.0} ms target at {demand:.0} rps", stable.p95_ms)
    } else {
        format!("p95 {:.0} ms at {demand:.0} rps", stable.p95_ms)
    };

    let mut replicas = current;
    let mut reason;
    if current < min || current > max {
        replicas = current.clamp(min, max);
        reason = format!("{current} replicas outside [{min}, {max}] -> {replicas} replicas");
    } else if panicking && recommended > current {
        replicas = recommended;
        reason = format!(
            "panic: {sla}; {:.0} rps over the last {} s needs {panic_need} replicas, >= 2x the {supply:.0} running or starting; {at_capacity} -> {replicas} replicas",
            panic.demand_rps(),
            spec.autoscaling.panic_window_seconds
        );
    } else if recommended > current && f64::from(current) * (1.0 + TOLERANCE) * utilization * c < demand {
        replicas = recommended;
        reason = format!("{sla}; {at_capacity} -> {replicas} replicas");
    } else if panicking {
        reason = format!("panic: holding {current} replicas (never down while panicking); {sla}");
    } else if recommended < current {
        let highest = mem.recommendations.iter().map(|&(_, r)| r).max().unwrap_or(current);
        let observed_long_enough = now - started_at >= delay_s;
        let step_due = mem.last_down.is_none_or(|at| now - at >= stable_s / 2.0);
        if highest < current && observed_long_enough && step_due {
            let step = (current - highest).div_ceil(2).max(1);
            replicas = (current - step).max(min);
            mem.last_down = Some(now);
            reason = if idle {
                format!("no traffic for {delay_s:.0} s -> {replicas} replicas")
            } else {
                format!(
                    "demand {demand:.0} rps needed at most {highest} replicas for {delay_s:.0} s; {at_capacity} -> {replicas} replicas"
                )
            };
        } else {
            reason = format!(
                "holding {current} replicas: {sla} needs {recommended}; scale-down waits for {delay_s:.0} s of lower demand"
            );
        }
    } else {
        reason = format!("holding {current} replicas: {sla}; {at_capacity}");
    }

    if let Some(rate) = pool_error {
        let due = mem.last_error_step.is_none_or(|at| now - at >= ERROR_STEP_SECONDS);
        if due && replicas <= current && current < max {
            replicas = current + 1;
            mem.last_error_step = Some(now);
            reason = format!("error rate {:.1}% above the SLA -> {replicas} replicas", rate * 100.0);
        }
    }
    Plan { replicas, mode, reason }
}
