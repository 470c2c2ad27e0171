//! Server-side Table rendering (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), which
//! `kubectl get` asks for: a Name column, then a CRD's `additionalPrinterColumns` (JSONPath
//! evaluated against each object, a `date` shown as an age), or an Age column for built-in kinds
//! (core Events: Last Seen, Type, Reason, Object, Message).
//! Each row carries the object's metadata (`includeObject=Metadata`, the default), the whole
//! object (`Object`) or nothing (`None`), as the real API server does.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use serde_json_path::JsonPath;

use super::resources::{self, Resource};

/// Whether the client asked for a Table (kubectl lists it first, before plain JSON).
pub fn wanted(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

/// The Table of `items` of `resource`.
pub fn render(resource: &Resource, items: &[Value], resource_version: &str, include: Option<&str>) -> Value {
    let columns = columns(resource);
    // An Event's name is noise: the real server shows it only with `-o wide` (priority 1).
    let name_priority = i64::from(super::events::is_core(resource));
    let definitions: Vec<Value> = std::iter::once(json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": name_priority}))
    .chain(columns.iter().map(
        |c| json!({"name": c.name, "type": c.kind, "format": "", "description": c.description, "priority": c.priority}),
    ))
    .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|object| {
            let name = object.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
            let cells: Vec<Value> = std::iter::once(name).chain(columns.iter().map(|c| c.cell(object))).collect();
            let mut row = json!({"cells": cells});
            match include {
                Some("None") => {}
                Some("Object") => row["object"] = object.clone(),
                _ => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": object.get("metadata").cloned().unwrap_or(Value::Null)});
                }
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": definitions, "rows": rows})
}

/// One printer column.
struct Column {
    name: String,
    kind: String,
    description: String,
    priority: i64,
    path: Option<JsonPath>,
}

impl Column {
    /// The cell for `object`: the first value the path finds (null when none), a date as an age.
    fn cell(&self, object: &Value) -> Value {
        let Some(found) = self.path.as_ref().and_then(|p| p.query(object).all().first().copied().cloned()) else {
            return Value::Null;
        };
        match (self.kind.as_str(), found.as_str()) {
            ("date", Some(text)) => age(text).map_or(Value::Null, Value::String),
            _ => found,
        }
    }
}

/// The columns of `resource` after Name: its CRD's, or Age for a built-in kind.
fn columns(resource: &Resource) -> Vec<Column> {
    let declared = resources::printer_columns(resource);
    let column = |name: &str, kind: &str, path: &str| Column {
        name: name.into(),
        kind: kind.into(),
        description: String::new(),
        priority: 0,
        path: JsonPath::parse(path).ok(),
    };
    if super::events::is_core(resource) {
        return vec![
            column("Last Seen", "date", "$.lastTimestamp"),
            column("Type", "string", "$.type"),
            column("Reason", "string", "$.reason"),
            column("Object", "string", "$.involvedObject.name"),
            column("Message", "string", "$.message"),
        ];
    }
    if declared.is_empty() {
        return vec![column("Age", "date", "$.metadata.creationTimestamp")];
    }
    declared
        .iter()
        .map(|c| {
            let text = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            // kubectl's JSONPath has no root; RFC 9535's starts with `$`.
            let path = JsonPath::parse(&format!("${}", text("jsonPath"))).ok();
            if path.is_none() {
                tracing::warn!(column = text("name"), path = text("jsonPath"), "printer column path not understood");
            }
            let priority = c.get("priority").and_then(Value::as_i64).unwrap_or(0);
            Column { name: text("name"), kind: text("type"), description: text("description"), priority, path }
        })
        .collect()
}

/// How long ago an RFC 3339 time was, as kubectl shows ages: `45s`, `3m`, `5h`, `2d`.
fn age(time: &str) -> Option<String> {
    let then: SystemTime = time.parse::<jiff::Timestamp>().ok()?.into();
    let secs = SystemTime::now().duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    Some(match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_given_only_to_clients_that_ask_for_one_first() {
        let cases = [
            (
                "kubectl get",
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                true,
            ),
            ("plain JSON", "application/json", false),
            (
                "JSON first, a Table as a fallback",
                "application/json,application/json;as=Table;v=v1;g=meta.k8s.io",
                false,
            ),
            ("no Accept", "", false),
        ];
        for (case, accept, want) in cases {
            assert_eq!(wanted(accept), want, "{case}");
        }
    }

    #[test]
    fn ages_read_as_kubectl_shows_them() {
        let ago = |secs: u64| {
            let then = jiff::Timestamp::try_from(SystemTime::now() - Duration::from_secs(secs)).unwrap();
            age(&then.to_string()).unwrap()
        };
        assert_eq!([ago(5), ago(600), ago(5 * 3600), ago(3 * 86400)], ["5s", "10m", "5h", "3d"]);
        assert_eq!(age("not a time"), None);
    }
}
