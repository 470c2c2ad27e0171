//! Memory pressure: when the process's resident memory passes a fraction of its limit, L1 gives
//! memory back — first by halving its capacity (cold entries go first), then, if the pressure
//! stays, by clearing it. When the pressure has passed, L1 grows back towards its target step by
//! step. This is the replica's own self-healing; the operator's tuning sets the target.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::tiers::Cache;

/// How often resident memory is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The smallest capacity L1 grows back from.
const MIN_GROW: u64 = 64;
/// Pressure ends below this share of the threshold (hysteresis, so L1 does not flap).
const RELIEF: f64 = 0.9;

/// What the guard does on one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Hold,
    /// Lower the capacity to this many entries.
    Shrink(u64),
    /// Drop every entry and lower the capacity to this many.
    Clear(u64),
    /// Raise the capacity to this many entries.
    Grow(u64),
}

/// The state one decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    /// Resident set size, bytes.
    pub rss: u64,
    /// Threshold in bytes (limit x ratio).
    pub threshold: u64,
    /// L1 capacity in force.
    pub capacity: u64,
    /// L1 capacity asked for.
    pub target: u64,
    /// Entries held.
    pub entries: u64,
    /// Whether L1 was already shrunk since the pressure began.
    pub shrunk: bool,
}

/// The rule, as a pure function.
pub fn decide(o: Observed) -> Action {
    if o.rss > o.threshold {
        if o.entries == 0 {
            return Action::Hold;
        }
        // A first warning shrinks; pressure that outlasts the shrink clears.
        return if o.shrunk { Action::Clear(o.capacity / 2) } else { Action::Shrink(o.capacity / 2) };
    }
    if (o.rss as f64) < o.threshold as f64 * RELIEF && o.capacity < o.target {
        return Action::Grow(o.target.min((o.capacity * 2).max(MIN_GROW)));
    }
    Action::Hold
}

/// The memory limit of this process: the cgroup's (v2, then v1), if it has one.
pub fn cgroup_limit() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let parse = |s: String| s.trim().parse::<u64>().ok();
    read("/sys/fs/cgroup/memory.max")
        .and_then(parse)
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes").and_then(parse))
        // cgroup v1 reports "no limit" as a huge number.
        .filter(|&b| b < 1 << 60)
}

/// The CPU cores this process may use: the cgroup's quota (v2 `cpu.max`, then v1's
/// `cfs_quota_us`/`cfs_period_us`), else the cores the scheduler gives it.
pub fn cpu_limit_cores() -> f64 {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let quota = |q: &str, period: &str| -> Option<f64> {
        let (q, period) = (q.trim().parse::<f64>().ok()?, period.trim().parse::<f64>().ok()?);
        (q > 0.0 && period > 0.0).then_some(q / period)
    };
    let v2 = read("/sys/fs/cgroup/cpu.max").and_then(|s| {
        let (q, period) = s.split_once(' ')?;
        quota(q, period)
    });
    let v1 = || quota(&read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")?, &read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")?);
    v2.or_else(v1).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64)
}

/// Checks resident memory every [`INTERVAL`] and acts on L1; runs until the runtime stops.
pub fn spawn(cache: Arc<Cache>, threshold: u64, rss: fn() -> u64) -> tokio::task::JoinHandle<()> {
    let metrics = Arc::clone(cache.metrics());
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shrunk = false;
        loop {
            ticker.tick().await;
            let memory = cache.memory();
            let o = Observed {
                rss: rss(),
                threshold,
                capacity: memory.capacity(),
                target: cache.memory_target(),
                entries: memory.len(),
                shrunk,
            };
            if o.rss <= threshold {
                shrunk = false;
            }
            match decide(o) {
                Action::Hold => {}
                Action::Shrink(to) => {
                    shrunk = true;
                    cache.resize_memory(to);
                    metrics.cache_pressure("shrink");
                    tracing::warn!(rss = o.rss, threshold, capacity = to, "memory pressure: memory cache shrunk");
                }
                Action::Clear(to) => {
                    let dropped = memory.clear();
                    cache.resize_memory(to);
                    metrics.cache_pressure("clear");
                    tracing::warn!(rss = o.rss, threshold, dropped, "memory pressure: memory cache cleared");
                }
                Action::Grow(to) => {
                    cache.resize_memory(to);
                    tracing::info!(rss = o.rss, threshold, capacity = to, "memory pressure over: memory cache grows");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rss: u64, capacity: u64, entries: u64, shrunk: bool) -> Action {
        decide(Observed { rss, threshold: 1000, capacity, target: 1000, entries, shrunk })
    }

    #[test]
    fn rules() {
        let cases = [
            ("calm, full size", at(500, 1000, 900, false), Action::Hold),
            ("first pressure shrinks", at(1001, 1000, 900, false), Action::Shrink(500)),
            ("pressure outlasting a shrink clears", at(1200, 500, 400, true), Action::Clear(250)),
            ("nothing left to free", at(1200, 250, 0, true), Action::Hold),
            ("just below threshold holds", at(950, 250, 0, false), Action::Hold),
            ("relief grows back", at(800, 250, 10, false), Action::Grow(500)),
            ("growth stops at the target", at(800, 600, 10, false), Action::Grow(1000)),
            ("growth starts from a floor", at(800, 0, 0, false), Action::Grow(64)),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }
}
