//! The samples of the last minutes and the windows the policy reads from them.
//! (Interface; the implementation follows.)

use super::Sample;

/// Samples kept for the policy's windows, oldest first.
#[derive(Debug, Clone, Default)]
pub struct History {
    samples: std::collections::VecDeque<Sample>,
}

/// Aggregates over the samples of one trailing window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// Samples in the window.
    pub samples: usize,
}

impl History {
    /// Adds a sample and forgets those older than `keep_seconds` before it.
    pub fn push(&mut self, sample: Sample, keep_seconds: f64) {
        let at = sample.at;
        self.samples.push_back(sample);
        while self.samples.front().is_some_and(|s| s.at < at - keep_seconds) {
            self.samples.pop_front();
        }
    }

    /// The aggregate over the samples of the last `seconds` before `now`.
    pub fn window(&self, seconds: f64, now: f64) -> Window {
        Window { samples: self.samples.iter().filter(|s| s.at > now - seconds).count() }
    }
}
