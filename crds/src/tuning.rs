//! The live tuning of one model replica: batching and cache capacity.
//!
//! The operator decides it, writes it to the pool's ConfigMap (read by new pods) and pushes it to
//! each running pod's admin port (`PUT /api/v1/tuning`). `generation` orders pushes: a replica never
//! goes back to an older generation, so a late, reordered push cannot undo a newer decision.

use serde::{Deserialize, Serialize};

/// Largest batch a replica accepts; more only grows latency on any accelerator we target.
pub const MAX_BATCH_SIZE: u32 = 1024;
/// Longest batching delay; anything longer breaks every SLA the operator can be given.
pub const MAX_DELAY_MS: u32 = 10_000;
/// Largest in-memory cache, in entries (about 5 GiB of 1280-dim f32 embeddings).
pub const MAX_CACHE_ENTRIES: u64 = 1_000_000;

/// Batching and cache settings applied live to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "pool", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tuning {
    /// Monotonic version of this tuning; pushes with an older generation are refused.
    pub generation: u64,
    /// Most requests run together in one inference call.
    pub max_batch_size: u32,
    /// Longest a request waits for others to fill its batch, in milliseconds.
    pub max_delay_ms: u32,
    /// In-memory embedding cache capacity, in entries (absent: leave as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_entries: Option<u64>,
}

/// Why a [`Tuning`] was refused; each names the field and the allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TuningError {
    /// `maxBatchSize` outside `1..=MAX_BATCH_SIZE`.
    #[error("maxBatchSize must be between 1 and {MAX_BATCH_SIZE}, got {0}")]
    BatchSize(u32),
    /// `maxDelayMs` above `MAX_DELAY_MS`.
    #[error("maxDelayMs must be at most {MAX_DELAY_MS}, got {0}")]
    Delay(u32),
    /// `cacheEntries` above `MAX_CACHE_ENTRIES`.
    #[error("cacheEntries must be at most {MAX_CACHE_ENTRIES}, got {0}")]
    CacheEntries(u64),
}

impl Tuning {
    /// Checks every field and returns all problems found, not just the first.
    pub fn validate(&self) -> Result<(), Vec<TuningError>> {
        let mut errors = Vec::new();
        if !(1..=MAX_BATCH_SIZE).contains(&self.max_batch_size) {
            errors.push(TuningError::BatchSize(self.max_batch_size));
        }
        if self.max_delay_ms > MAX_DELAY_MS {
            errors.push(TuningError::Delay(self.max_delay_ms));
        }
        if let Some(entries) = self.cache_entries.filter(|&e| e > MAX_CACHE_ENTRIES) {
            errors.push(TuningError::CacheEntries(entries));
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning(max_batch_size: u32, max_delay_ms: u32, cache_entries: Option<u64>) -> Tuning {
        Tuning { generation: 1, max_batch_size, max_delay_ms, cache_entries }
    }

    #[test]
    fn validation_reports_every_bad_field() {
        let cases = [
            (tuning(8, 5, None), vec![]),
            (tuning(MAX_BATCH_SIZE, MAX_DELAY_MS, Some(MAX_CACHE_ENTRIES)), vec![]),
            (tuning(0, 5, None), vec![TuningError::BatchSize(0)]),
            (tuning(MAX_BATCH_SIZE + 1, 5, None), vec![TuningError::BatchSize(MAX_BATCH_SIZE + 1)]),
            (tuning(8, MAX_DELAY_MS + 1, None), vec![TuningError::Delay(MAX_DELAY_MS + 1)]),
            (
                tuning(0, MAX_DELAY_MS + 1, Some(MAX_CACHE_ENTRIES + 1)),
                vec![
                    TuningError::BatchSize(0),
                    TuningError::Delay(MAX_DELAY_MS + 1),
                    TuningError::CacheEntries(MAX_CACHE_ENTRIES + 1),
                ],
            ),
        ];
        for (t, want) in cases {
            let got = t.validate().err().unwrap_or_default();
            assert_eq!(got, want, "{t:?}");
        }
    }

    #[test]
    fn wire_format_is_camel_case_and_strict() {
        let t: Tuning = serde_json::from_str(r#"{"generation":3,"maxBatchSize":16,"maxDelayMs":4}"#).unwrap();
        assert_eq!(t, tuning(16, 4, None).with_generation(3));
        assert!(serde_json::from_str::<Tuning>(r#"{"generation":3,"maxBatch":16,"maxDelayMs":4}"#).is_err());
    }

    impl Tuning {
        fn with_generation(mut self, generation: u64) -> Self {
            self.generation = generation;
            self
        }
    }
}
