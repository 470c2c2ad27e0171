//! Kubernetes Events about pools, the way every part of the operator words and publishes them:
//! the reconciler (children created or updated, failures, invalid specs) and the actuator (what
//! the autoscaler decided). Events are best effort: a failure to record one is logged and never
//! fails the work it describes.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// An Event about a pool; `related` names the child it concerns, which also keeps Events about
/// different children from being folded into one series.
pub fn event(type_: EventType, reason: &str, action: &str, note: String, related: Option<ObjectReference>) -> Event {
    Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: related }
}

/// Publishes `event` about the pool `regarding`.
pub async fn publish(recorder: &Recorder, regarding: &ObjectReference, event: Event) {
    if let Err(error) = recorder.publish(&event, regarding).await {
        tracing::warn!(%error, reason = %event.reason, "could not publish an Event");
    }
}
