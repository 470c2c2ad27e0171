//! inferpool's local control plane: test infrastructure, not a product.
//!
//! No kube-apiserver can be installed where inferpool is developed and tested, and the operator
//! must still be tested end to end. [`apiserver`] is a test double of the Kubernetes API, small but
//! faithful where kube-rs depends on it (resource versions, watches, conflicts, subresources,
//! garbage collection), so the operator talks to it through an ordinary kubeconfig without knowing.

pub mod apiserver;
pub mod apply;
pub mod fixtures;
pub mod kubelet;
pub mod prometheus;
pub mod proxy;
pub mod redis;
pub mod sidecar_process;
