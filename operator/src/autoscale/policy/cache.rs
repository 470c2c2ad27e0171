//! Cache: grow the memory tier while the hit rate is under the SLA's target and memory allows;
//! shrink it under memory pressure and clear it when shrinking was not enough.
//!
//! - Memory is the largest pod's resident set over the panic window against `sla.memoryLimitMb`.
//! - Above [`CLEAR`] of the limit within [`SHRINK_MEMORY_SECONDS`] of a shrink: clear the caches.
//! - Above [`SHRINK`]: halve the entries.
//! - Hit rate (over the panic window, so a change shows at once) under `sla.minCacheHitRate` (with cache lookups to judge by) with memory under
//!   [`GROW`], once the stable window agrees with it within [`SETTLED`]: grow by half (at least one entry), up to `MAX_CACHE_ENTRIES`. A growth that raised
//!   the hit rate by less than [`MIN_GAIN`] means the misses are not for lack of room (unique
//!   images): no more growth for [`PLATEAU_SECONDS`].
//! - One move per stable window, so the hit rate of the new size is what the next move reads.

use inferpool_crds::InferencePoolSpec;
use inferpool_crds::tuning::MAX_CACHE_ENTRIES;

use super::{Inputs, MIN_REQUESTS, Window};

/// Grow only while the largest pod uses less than this share of its memory limit.
pub const GROW: f64 = 0.70;
/// Halve the cache above this share of the memory limit.
pub const SHRINK: f64 = 0.85;
/// Clear the cache above this share when a shrink did not help.
pub const CLEAR: f64 = 0.95;
/// A growth must raise the hit rate by at least this much to be repeated.
pub const MIN_GAIN: f64 = 0.01;
/// Grow only when the stable and panic windows' hit rates are this close (the rate has settled).
pub const SETTLED: f64 = 0.05;
/// How long growth stops after one that did not help, in seconds.
pub const PLATEAU_SECONDS: f64 = 600.0;
/// How long after a shrink memory still above [`CLEAR`] clears the cache, in seconds.
pub const SHRINK_MEMORY_SECONDS: f64 = 300.0;

/// What the cache rule remembers.
#[derive(Debug, Clone, Default)]
pub(super) struct Memory {
    last_move: Option<f64>,
    shrunk_at: Option<f64>,
    /// When the cache last grew and the hit rate before.
    grown: Option<(f64, f64)>,
    plateau_until: Option<f64>,
}

/// The cache rule's outcome: entries, whether to clear, and why (None: nothing changes).
pub(super) struct Step {
    pub(super) entries: u64,
    pub(super) clear: bool,
    pub(super) reason: Option<String>,
}

/// The largest pod's memory as a share of the SLA's limit (recent window first).
pub(super) fn memory_ratio(spec: &InferencePoolSpec, stable: &Window, panic: &Window) -> f64 {
    let rss = if panic.samples > 0 { panic.max_rss_bytes } else { stable.max_rss_bytes };
    let limit = spec.sla.memory_limit_mb.max(1) as f64 * 1024.0 * 1024.0;
    rss as f64 / limit
}

/// Decides the cache size for this tick.
pub(super) fn tune(
    inputs: &Inputs,
    mem: &mut Memory,
    entries: u64,
    stable: &Window,
    recent: &Window,
    ratio: f64,
) -> Step {
    let now = inputs.now;
    let sla = &inputs.spec.sla;
    let keep = Step { entries, clear: false, reason: None };
    let cooldown = f64::from(inputs.spec.autoscaling.stable_window_seconds);
    if mem.last_move.is_some_and(|at| now - at < cooldown) {
        return keep;
    }
    let percent = ratio * 100.0;
    let limit = sla.memory_limit_mb;
    if ratio > CLEAR && mem.shrunk_at.is_some_and(|at| now - at <= SHRINK_MEMORY_SECONDS) {
        mem.last_move = Some(now);
        let reason = format!("memory {percent:.0}% of {limit} MiB still after shrinking the cache: clearing it");
        return Step { entries, clear: true, reason: Some(reason) };
    }
    if ratio > SHRINK && entries > 0 {
        let smaller = entries / 2;
        mem.last_move = Some(now);
        mem.shrunk_at = Some(now);
        mem.grown = None;
        let reason = format!("memory {percent:.0}% of {limit} MiB: cache {entries} -> {smaller} entries");
        return Step { entries: smaller, clear: false, reason: Some(reason) };
    }
    // Gains are judged on the panic window: the stable one still holds the time before the change.
    let hit = recent.cache_hit_rate;
    if let Some((at, before)) = mem.grown.take()
        && now - at >= cooldown
        && hit - before < MIN_GAIN
    {
        mem.plateau_until = Some(now + PLATEAU_SECONDS);
    }
    let plateau = mem.plateau_until.is_some_and(|until| now < until);
    if stable.requests >= MIN_REQUESTS
        && recent.requests >= MIN_REQUESTS
        && (stable.cache_hit_rate - hit).abs() < SETTLED
        && recent.cache_lookups > 0
        && hit < sla.min_cache_hit_rate
        && ratio < GROW
        && entries < MAX_CACHE_ENTRIES
        && !plateau
    {
        let larger = (entries + (entries / 2).max(1)).min(MAX_CACHE_ENTRIES);
        mem.last_move = Some(now);
        mem.grown = Some((now, hit));
        let reason = format!(
            "cache hit rate {:.0}% < {:.0}% target with memory at {percent:.0}% of {limit} MiB: cache {entries} -> {larger} entries",
            hit * 100.0,
            sla.min_cache_hit_rate * 100.0
        );
        return Step { entries: larger, clear: false, reason: Some(reason) };
    }
    keep
}
