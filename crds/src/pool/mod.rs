//! The `InferencePool` custom resource (`inferpool.dev/v1alpha1`).
//!
//! A user describes a pool of model replicas and the SLA it must keep; the operator turns it into a
//! Deployment of sidecar pods, a Service and their companions, and tunes it online. Every field has a
//! default, so `spec: {}` is a working CPU pool of the shipped model. Ranges and enums live in the
//! schema (the API server rejects them); cross-field rules are CEL `x-kubernetes-validations` and
//! [`InferencePoolSpec::validate`] checks them again, so a cluster without CEL support still gets a
//! clear `Degraded` condition instead of a broken pool.

mod spec;
mod status;
mod validate;

pub use spec::*;
pub use status::*;
pub use validate::SpecError;

/// API group of every inferpool resource.
pub const GROUP: &str = "inferpool.dev";
/// Served and stored version.
pub const VERSION: &str = "v1alpha1";
