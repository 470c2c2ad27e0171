//! The pool's Service (its in-cluster address) and PodDisruptionBudget.

use inferpool_crds::wire::{ADMIN_PORT, API_PORT};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ADMIN_PORT_NAME, HTTP_PORT_NAME, Owner, names, selector_labels};

/// A ClusterIP Service in front of the ready replicas: the public API and the admin port.
pub(super) fn service(owner: &Owner) -> Service {
    Service {
        metadata: owner.meta(names::service(&owner.name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(&owner.name)),
            ports: Some(vec![port(HTTP_PORT_NAME, API_PORT), port(ADMIN_PORT_NAME, ADMIN_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        app_protocol: Some("http".to_owned()),
        ..ServicePort::default()
    }
}

/// At most one replica evicted at a time by node drains and upgrades.
///
/// `AlwaysAllow` lets pods that are not ready (still loading, or broken) be evicted anyway: they
/// serve nothing, and a pool stuck unready must not block a node drain forever.
pub(super) fn pdb(owner: &Owner) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owner.meta(names::pdb(&owner.name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&owner.name)),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
