//! Errors as the Kubernetes API answers them: a `Status` object with a reason and a code.

use serde_json::{Value, json};

use super::resources::Resource;

/// One cause of a failed call: which field, why (`FieldValueInvalid`, `FieldValueRequired`,
/// `FieldManagerConflict`, ...) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// Machine-readable reason.
    pub reason: &'static str,
    /// The field path, e.g. `spec.replicas.min`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Cause {
    /// A cause of `reason` at `field`.
    pub fn new(reason: &'static str, field: &str, message: String) -> Self {
        Cause { reason, field: field.to_owned(), message }
    }

    fn to_json(&self) -> Value {
        json!({"reason": self.reason, "message": self.message, "field": self.field})
    }
}

/// `Kind.group`, as messages name a kind (just `Kind` in the core group).
fn qualified_kind(resource: &Resource) -> String {
    if resource.group.is_empty() { resource.kind.to_owned() } else { format!("{}.{}", resource.kind, resource.group) }
}

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
        Self::invalid_causes(resource, name, &[Cause::new("FieldValueInvalid", field, message.to_owned())])
    }

    /// 422 with every cause, worded like the API server: one cause inline, several in brackets.
    pub fn invalid_causes(resource: &Resource, name: &str, causes: &[Cause]) -> Self {
        let each: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let list = if each.len() == 1 { each.join("") } else { format!("[{}]", each.join(", ")) };
        Status {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {list}", qualified_kind(resource)),
            details: json!({
                "name": name,
                "group": resource.group,
                "kind": resource.kind,
                "causes": causes.iter().map(Cause::to_json).collect::<Vec<_>>(),
            }),
        }
    }

    /// 409: a server-side apply would change fields other managers own.
    pub fn apply_conflict(resource: &Resource, name: &str, message: String, causes: &[Cause]) -> Self {
        let mut d = details(resource, name);
        d["causes"] = causes.iter().map(Cause::to_json).collect();
        Status { code: 409, reason: "Conflict", message, details: d }
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
