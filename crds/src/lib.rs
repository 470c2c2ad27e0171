//! inferpool's API types.
//!
//! This crate is the contract between the operator and the sidecar: the [`Tuning`] that the operator
//! pushes to each model replica, and the [`SlaReport`] each replica serves at
//! `/api/v1/metrics/sla` for the operator to read. The `InferencePool` custom resource joins them
//! here when the operator lands. Both programs depend on this crate; it depends on neither.

pub mod sla;
pub mod tuning;

pub use sla::{LatencyQuantiles, SlaReport, TierHitRates, WindowReport};
pub use tuning::{Tuning, TuningError};
