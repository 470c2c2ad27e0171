//! The circuit breaker in front of a remote cache tier.
//!
//! A cache tier that is down must cost requests nothing: after a few consecutive failures the
//! breaker opens and every operation is skipped at once, without waiting for a timeout. After a
//! cooldown one operation is let through as a probe; its outcome closes the breaker or opens it
//! again for twice as long, so a tier that stays down is probed less and less often.
//!
//! The breaker is a pure state machine: every method takes the current [`Instant`], so tests drive
//! it through any timeline without sleeping. Its caller reports the transitions it returns.

use std::time::{Duration, Instant};

/// Consecutive failures that open a closed breaker.
pub const FAILURE_THRESHOLD: u32 = 3;
/// Cooldown after the first opening.
pub const BASE_COOLDOWN: Duration = Duration::from_millis(500);
/// Longest cooldown, reached after repeated openings.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(10);

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Operations go through.
    Closed,
    /// Operations are skipped until the cooldown ends.
    Open,
    /// One probe is in flight; other operations are still skipped.
    HalfOpen,
}

impl BreakerState {
    /// The value of the `inferpool_cache_circuit_state` gauge (0 closed, 1 open, 2 half-open).
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// What the breaker lets an operation do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead (the breaker is closed).
    Pass,
    /// Go ahead as the probe: its outcome decides whether the breaker closes.
    Probe,
    /// Skip the operation.
    Reject,
}

/// A circuit breaker; see the module docs.
#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    /// Consecutive failures while closed.
    failures: u32,
    /// Consecutive openings since the breaker last closed; sets the cooldown.
    opens: u32,
    /// While open: when the cooldown ends. While half-open: when the probe counts as abandoned.
    until: Instant,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(now: Instant) -> Self {
        Breaker { state: BreakerState::Closed, failures: 0, opens: 0, until: now }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// The cooldown of the current (or next) opening: the base, doubled per consecutive opening.
    pub fn cooldown(&self) -> Duration {
        let doublings = self.opens.saturating_sub(1).min(16);
        (BASE_COOLDOWN * (1u32 << doublings)).min(MAX_COOLDOWN)
    }

    /// Decides whether an operation starting at `now` may run; returns the new state when this
    /// changed it.
    pub fn admit(&mut self, now: Instant) -> (Admit, Option<BreakerState>) {
        match self.state {
            BreakerState::Closed => (Admit::Pass, None),
            BreakerState::Open if now >= self.until => {
                self.state = BreakerState::HalfOpen;
                self.until = now + MAX_COOLDOWN;
                (Admit::Probe, Some(BreakerState::HalfOpen))
            }
            // A probe whose outcome never came (its caller gave up on it) must not keep the
            // breaker half-open for ever: after a lease as long as the longest cooldown, another
            // operation becomes the probe.
            BreakerState::HalfOpen if now >= self.until => {
                self.until = now + MAX_COOLDOWN;
                (Admit::Probe, None)
            }
            BreakerState::Open | BreakerState::HalfOpen => (Admit::Reject, None),
        }
    }

    /// Records the outcome of an operation that `admit` let through as `how`; returns the new state
    /// when this changed it.
    pub fn record(&mut self, now: Instant, how: Admit, ok: bool) -> Option<BreakerState> {
        match (how, self.state) {
            (Admit::Pass, BreakerState::Closed) if ok => {
                self.failures = 0;
                None
            }
            (Admit::Pass, BreakerState::Closed) => {
                self.failures += 1;
                (self.failures >= FAILURE_THRESHOLD).then(|| self.open(now))
            }
            (Admit::Probe, BreakerState::HalfOpen) if ok => {
                self.state = BreakerState::Closed;
                self.failures = 0;
                self.opens = 0;
                Some(BreakerState::Closed)
            }
            (Admit::Probe, BreakerState::HalfOpen) => Some(self.open(now)),
            // Outcomes of operations admitted before the last transition say nothing about the
            // tier now: the probe alone decides.
            _ => None,
        }
    }

    fn open(&mut self, now: Instant) -> BreakerState {
        self.opens = self.opens.saturating_add(1);
        self.failures = 0;
        self.state = BreakerState::Open;
        self.until = now + self.cooldown();
        BreakerState::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Opens a closed breaker with threshold failures at `now`.
    fn trip(b: &mut Breaker, now: Instant) -> Option<BreakerState> {
        let mut last = None;
        for _ in 0..FAILURE_THRESHOLD {
            let (how, _) = b.admit(now);
            assert_eq!(how, Admit::Pass);
            last = b.record(now, how, false);
        }
        last
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        // Two failures, a success (a miss counts as one), two failures: still closed.
        for ok in [false, false, true, false, false] {
            assert_eq!(b.record(t0, Admit::Pass, ok), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.record(t0, Admit::Pass, false), Some(BreakerState::Open));
        assert_eq!(b.admit(t0 + ms(10)), (Admit::Reject, None));
    }

    #[test]
    fn probes_once_after_the_cooldown_and_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        assert_eq!(trip(&mut b, t0), Some(BreakerState::Open));
        assert_eq!(b.admit(t0 + ms(499)), (Admit::Reject, None));
        assert_eq!(b.admit(t0 + ms(500)), (Admit::Probe, Some(BreakerState::HalfOpen)));
        // Others are still skipped while the probe is out.
        assert_eq!(b.admit(t0 + ms(501)), (Admit::Reject, None));
        assert_eq!(b.record(t0 + ms(502), Admit::Probe, true), Some(BreakerState::Closed));
        assert_eq!(b.admit(t0 + ms(503)), (Admit::Pass, None));
        // The cooldown starts again from the base after a close.
        assert_eq!(trip(&mut b, t0 + ms(600)), Some(BreakerState::Open));
        assert_eq!(b.cooldown(), BASE_COOLDOWN);
    }

    #[test]
    fn failed_probes_double_the_cooldown_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        trip(&mut b, t0);
        let mut now = t0;
        let mut seen = vec![];
        for _ in 0..8 {
            let cooldown = b.cooldown();
            seen.push(cooldown.as_millis());
            assert_eq!(b.admit(now + cooldown - ms(1)).0, Admit::Reject);
            now += cooldown;
            assert_eq!(b.admit(now).0, Admit::Probe);
            assert_eq!(b.record(now, Admit::Probe, false), Some(BreakerState::Open));
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
    }

    #[test]
    fn stale_outcomes_do_not_decide() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        trip(&mut b, t0);
        // A success from an operation admitted before the breaker opened does not close it.
        assert_eq!(b.record(t0 + ms(1), Admit::Pass, true), None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t0 + ms(500)).0, Admit::Probe);
        assert_eq!(b.record(t0 + ms(501), Admit::Pass, true), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn an_abandoned_probe_is_replaced_after_its_lease() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        trip(&mut b, t0);
        assert_eq!(b.admit(t0 + ms(500)).0, Admit::Probe);
        assert_eq!(b.admit(t0 + ms(500) + MAX_COOLDOWN - ms(1)).0, Admit::Reject);
        assert_eq!(b.admit(t0 + ms(500) + MAX_COOLDOWN), (Admit::Probe, None));
        assert_eq!(b.record(t0 + ms(500) + MAX_COOLDOWN, Admit::Probe, true), Some(BreakerState::Closed));
    }

    #[test]
    fn gauge_values() {
        let values = [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen].map(BreakerState::gauge);
        assert_eq!(values, [0, 1, 2]);
    }
}
