//! inferpool's operator.
//!
//! It reconciles each `InferencePool` into the objects that run it (a Deployment of sidecar pods, a
//! Service, the tuning ConfigMap, the admin-token Secret and a PodDisruptionBudget) and reports
//! what it sees in the pool's status. A reconcile is a pipeline: dereference -> validate -> build ->
//! apply -> update_status, where `validate` and `build` are pure functions of the pool.

pub mod actuator;
pub mod autoscale;
pub mod build;
pub mod controller;
pub mod error;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod pods;
pub mod render;
pub mod server;
pub mod status;
pub mod validate;

pub use error::{Error, Result};
