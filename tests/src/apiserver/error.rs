//! Errors as the Kubernetes API answers them: a `Status` object with a reason and a code.

use serde_json::{Value, json};

use super::resources::Resource;

/// A failed call, as a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...).
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
    /// `details` of the Status.
    pub details: Value,
}

fn details(resource: &Resource, name: &str) -> Value {
    json!({"name": name, "group": resource.group, "kind": resource.plural})
}

impl Status {
    /// 404: no such object.
    pub fn not_found(resource: &Resource, name: &str) -> Self {
        Status {
            code: 404,
            reason: "NotFound",
            message: format!("{}.{} \"{name}\" not found", resource.plural, resource.group),
            details: details(resource, name),
        }
    }

    /// 409: the name is taken.
    pub fn already_exists(resource: &Resource, name: &str) -> Self {
        Status {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{}.{} \"{name}\" already exists", resource.plural, resource.group),
            details: details(resource, name),
        }
    }

    /// 409: the write was based on an old resourceVersion.
    pub fn conflict(resource: &Resource, name: &str) -> Self {
        Status {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                resource.plural, resource.group
            ),
            details: details(resource, name),
        }
    }

    /// 422: a field is invalid.
    pub fn invalid(resource: &Resource, name: &str, field: &str, message: &str) -> Self {
        let mut d = details(resource, name);
        d["causes"] = json!([{"reason": "FieldValueInvalid", "message": message, "field": field}]);
        Status {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {field}: {message}", resource.kind),
            details: d,
        }
    }

    /// 410: the resourceVersion is older than the history kept.
    pub fn gone(rv: u64) -> Self {
        Status {
            code: 410,
            reason: "Expired",
            message: format!("too old resource version: {rv}"),
            details: Value::Null,
        }
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Status { code: 400, reason: "BadRequest", message: message.into(), details: Value::Null }
    }

    /// 405 / 415 and other refusals of the request's form.
    pub fn refused(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Status { code, reason, message: message.into(), details: Value::Null }
    }

    /// The Status object.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        })
    }
}
