//! Events under both APIs: an `events.k8s.io/v1` Event (what kube-rs's recorder writes) is also
//! listed under core `v1`, converted as the real API server converts it, so `kubectl get events`
//! and `kubectl describe` (which read core Events) show what the operator recorded.

use serde_json::{Value, json};

use super::resources::{self, Resource};

/// Whether `resource` is the core `v1` Event.
pub fn is_core(resource: &Resource) -> bool {
    resource.group.is_empty() && resource.kind == "Event"
}

/// The `events.k8s.io/v1` Event resource.
pub fn new_api() -> Option<&'static Resource> {
    resources::find("events.k8s.io", "v1", "events")
}

/// The core `v1` form of an `events.k8s.io/v1` Event.
pub fn to_core(event: &Value) -> Value {
    let get = |k: &str| event.get(k).cloned().unwrap_or(Value::Null);
    let controller = get("reportingController");
    let time = event.get("eventTime").filter(|t| !t.is_null()).cloned();
    let first = event.get("deprecatedFirstTimestamp").filter(|t| !t.is_null()).cloned().or(time.clone());
    let last = event
        .pointer("/series/lastObservedTime")
        .or_else(|| event.get("deprecatedLastTimestamp"))
        .filter(|t| !t.is_null())
        .cloned()
        .or(time);
    let count =
        event.pointer("/series/count").or_else(|| event.get("deprecatedCount")).and_then(Value::as_i64).unwrap_or(1);
    json!({
        "apiVersion": "v1", "kind": "Event", "metadata": get("metadata"),
        "involvedObject": get("regarding"), "related": get("related"),
        "reason": get("reason"), "message": get("note"), "type": get("type"), "action": get("action"),
        "source": {"component": controller}, "reportingComponent": controller,
        "reportingInstance": get("reportingInstance"), "eventTime": get("eventTime"),
        "firstTimestamp": first, "lastTimestamp": last, "count": count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_api_event_reads_as_a_core_event() {
        let event = json!({
            "metadata": {"name": "shop.1", "namespace": "default"},
            "regarding": {"kind": "InferencePool", "name": "shop", "namespace": "default", "uid": "u1"},
            "reason": "Updated", "note": "Updated Deployment shop", "type": "Normal", "action": "Apply",
            "reportingController": "inferpool-operator", "reportingInstance": "op-0",
            "eventTime": "2026-01-01T00:00:00.000000Z", "series": {"count": 3, "lastObservedTime": "2026-01-01T00:05:00.000000Z"},
        });
        let core = to_core(&event);
        assert_eq!(core["involvedObject"]["name"], "shop");
        assert_eq!(
            (core["message"].as_str(), core["source"]["component"].as_str()),
            (Some("Updated Deployment shop"), Some("inferpool-operator"))
        );
        assert_eq!(
            (core["count"].as_i64(), core["lastTimestamp"].as_str()),
            (Some(3), Some("2026-01-01T00:05:00.000000Z"))
        );
        assert_eq!(core["firstTimestamp"], "2026-01-01T00:00:00.000000Z");
        let single = to_core(&json!({"eventTime": "2026-01-01T00:00:00Z", "deprecatedCount": 0}));
        assert_eq!(
            (single["count"].as_i64(), single["lastTimestamp"].as_str()),
            (Some(0), Some("2026-01-01T00:00:00Z"))
        );
    }
}
