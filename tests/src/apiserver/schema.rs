//! Structural OpenAPI v3 schemas of custom resources, as the API server applies them to every
//! write: unknown fields are pruned, missing fields with a `default` are filled in, and the result
//! is validated. The store calls [`admit`] with the schema that [`super::resources::schema`] read
//! from the CRD; built-in kinds have none and are stored as sent.
//!
//! Supported: `type`, `properties`, `required`, `additionalProperties` (a map's value schema),
//! `items`, `enum`, `minimum`/`maximum` (and `exclusiveMinimum`/`exclusiveMaximum`),
//! `minLength`/`maxLength`, `pattern`, `minItems`/`maxItems`, `nullable`, `default`,
//! `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-embedded-resource`, and `format` only as an integer width (`int32`, `uint32`,
//! `uint64`). CEL rules (`x-kubernetes-validations`) are not evaluated. Messages follow the real
//! API server's wording so clients and people see what a cluster would tell them.

use std::collections::HashMap;

use parking_lot::Mutex;
use regex::Regex;
use serde_json::{Map, Value};

use super::error::Cause;

/// Prunes, defaults and validates a whole object against its `openAPIV3Schema`; the causes of
/// every violation, empty when it is valid. `apiVersion`, `kind` and `metadata` at the root are
/// never pruned.
pub fn admit(schema: &Value, object: &mut Value) -> Vec<Cause> {
    normalize(schema, object, true);
    let mut causes = Vec::new();
    check(schema, object, "", &mut causes);
    causes
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn is_null_not_allowed(value: &Value, schema: &Value) -> bool {
    value.is_null() && !flag(schema, "nullable")
}

/// Pruning and defaulting, top down: defaults are themselves pruned and defaulted below.
fn normalize(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            let keeps_meta = root || flag(schema, "x-kubernetes-embedded-resource");
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            if !preserve && extra.is_none() {
                map.retain(|k, _| {
                    props.is_some_and(|p| p.contains_key(k))
                        || (keeps_meta && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                });
            }
            if let Some(props) = props {
                for (k, prop) in props {
                    let Some(default) = prop.get("default") else { continue };
                    if map.get(k).is_none_or(|v| is_null_not_allowed(v, prop)) {
                        map.insert(k.clone(), default.clone());
                    }
                }
            }
            for (k, v) in map.iter_mut() {
                if let Some(prop) = props.and_then(|p| p.get(k)).or(extra) {
                    normalize(prop, v, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                items.iter_mut().for_each(|v| normalize(item, v, false));
            }
        }
        _ => {}
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// A bound as Go's `%v` prints a float64: no `.0` on whole numbers.
fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 { format!("{}", n as i64) } else { format!("{n}") }
}

/// A value as the API server quotes it in "Invalid value: ...".
fn shown(v: &Value) -> String {
    v.to_string()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => true,
    }
}

fn invalid(field: &str, value: &Value, detail: String) -> Cause {
    Cause::new("FieldValueInvalid", field, format!("Invalid value: {}: {detail}", shown(value)))
}

fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<Cause>) {
    let ty = schema.get("type").and_then(Value::as_str);
    let int_or_string = flag(schema, "x-kubernetes-int-or-string");
    if value.is_null() {
        if !flag(schema, "nullable") && (ty.is_some() || int_or_string) {
            let want = ty.unwrap_or("integer-or-string");
            out.push(type_invalid(path, want, value));
        }
        return;
    }
    if int_or_string {
        if !(has_type(value, "integer") || value.is_string()) {
            out.push(type_invalid(path, "integer-or-string", value));
            return;
        }
    } else if let Some(ty) = ty
        && !has_type(value, ty)
    {
        out.push(type_invalid(path, ty, value));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list = allowed
            .iter()
            .map(|a| a.as_str().map_or_else(|| format!("\"{a}\""), |s| format!("\"{s}\"")))
            .collect::<Vec<_>>()
            .join(", ");
        let msg = format!("Unsupported value: {}: supported values: {list}", shown(value));
        out.push(Cause::new("FieldValueNotSupported", path, msg));
    }
    match value {
        Value::Object(map) => check_object(schema, map, path, out),
        Value::Array(items) => {
            let len = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && len < min
            {
                out.push(invalid(path, value, format!("{path} in body should have at least {min} items")));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && len > max
            {
                let msg = format!("Too many: {len}: must have at most {max} items");
                out.push(Cause::new("FieldValueTooMany", path, msg));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(item, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::String(s) => check_string(schema, value, s, path, out),
        Value::Number(_) => check_number(schema, value, path, out),
        _ => {}
    }
}

fn type_invalid(path: &str, want: &str, value: &Value) -> Cause {
    let actual = type_name(value);
    let msg = format!("Invalid value: \"{actual}\": {path} in body must be of type {want}: \"{actual}\"");
    Cause::new("FieldValueTypeInvalid", path, msg)
}

fn check_object(schema: &Value, map: &Map<String, Value>, path: &str, out: &mut Vec<Cause>) {
    let mut required: Vec<&str> =
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    if flag(schema, "x-kubernetes-embedded-resource") {
        required.extend(["apiVersion", "kind"]);
    }
    for r in required {
        if !map.contains_key(r) {
            out.push(Cause::new("FieldValueRequired", &child(path, r), "Required value".into()));
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let extra = schema.get("additionalProperties").filter(|a| a.is_object());
    for (k, v) in map {
        if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(prop) = props.and_then(|p| p.get(k)).or(extra) {
            check(prop, v, &child(path, k), out);
        }
    }
}

fn check_string(schema: &Value, value: &Value, s: &str, path: &str, out: &mut Vec<Cause>) {
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        out.push(invalid(path, value, format!("{path} in body should be at least {min} chars long")));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        let msg = format!("Too long: may not be more than {max} bytes");
        out.push(Cause::new("FieldValueTooLong", path, msg));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && matches(pattern, s) == Some(false)
    {
        out.push(invalid(path, value, format!("{path} in body should match '{pattern}'")));
    }
}

/// Whether `s` matches `pattern`; None when the pattern does not compile (then it is not checked).
fn matches(pattern: &str, s: &str) -> Option<bool> {
    static CACHE: Mutex<Option<HashMap<String, Option<Regex>>>> = Mutex::new(None);
    let mut cache = CACHE.lock();
    let re =
        cache.get_or_insert_with(HashMap::new).entry(pattern.to_owned()).or_insert_with(|| Regex::new(pattern).ok());
    re.as_ref().map(|re| re.is_match(s))
}

fn check_number(schema: &Value, value: &Value, path: &str, out: &mut Vec<Cause>) {
    let Some(n) = value.as_f64() else { return };
    let (mut min, mut max) =
        (schema.get("minimum").and_then(Value::as_f64), schema.get("maximum").and_then(Value::as_f64));
    // The integer width a format names is a bound too (the tighter one wins).
    let width = match schema.get("format").and_then(Value::as_str) {
        Some("int32") => Some((f64::from(i32::MIN), f64::from(i32::MAX))),
        Some("uint32") => Some((0.0, f64::from(u32::MAX))),
        Some("uint64") => Some((0.0, u64::MAX as f64)),
        _ => None,
    };
    if let Some((lo, hi)) = width {
        min = Some(min.map_or(lo, |m| m.max(lo)));
        max = Some(max.map_or(hi, |m| m.min(hi)));
    }
    if let Some(min) = min {
        let exclusive = flag(schema, "exclusiveMinimum");
        if (exclusive && n <= min) || n < min {
            let rel = if exclusive { "greater than" } else { "greater than or equal to" };
            out.push(invalid(path, value, format!("{path} in body should be {rel} {}", number(min))));
        }
    }
    if let Some(max) = max {
        let exclusive = flag(schema, "exclusiveMaximum");
        if (exclusive && n >= max) || n > max {
            let rel = if exclusive { "less than" } else { "less than or equal to" };
            out.push(invalid(path, value, format!("{path} in body should be {rel} {}", number(max))));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "replicas": {
                            "type": "object",
                            "default": {"min": 1},
                            "properties": {
                                "min": {"type": "integer", "format": "int32", "minimum": 0.0, "default": 1},
                                "max": {"type": "integer", "exclusiveMaximum": true, "maximum": 10.0},
                            },
                        },
                        "mode": {"type": "string", "enum": ["A", "B"]},
                        "name": {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[a-z]*$"},
                        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "port": {"x-kubernetes-int-or-string": true},
                        "image": {"type": "string", "nullable": true},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                                 "properties": {"n": {"type": "integer"}}},
                        "req": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
                    },
                },
            },
        })
    }

    #[test]
    fn prunes_and_defaults() {
        let mut obj = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"unknown": 1, "labels": {"a": "b"}, "free": {"any": {"thing": 1}}, "image": null},
            "junk": true,
        });
        assert!(admit(&schema(), &mut obj).is_empty());
        assert_eq!(
            obj,
            json!({
                "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
                "spec": {"replicas": {"min": 1}, "labels": {"a": "b"}, "free": {"any": {"thing": 1}}, "image": null},
            })
        );
    }

    #[test]
    fn violations_are_reported_with_the_api_servers_wording() {
        let cases = [
            (
                json!({"replicas": {"min": -1}}),
                "FieldValueInvalid",
                "spec.replicas.min",
                "Invalid value: -1: spec.replicas.min in body should be greater than or equal to 0",
            ),
            (
                json!({"replicas": {"max": 10}}),
                "FieldValueInvalid",
                "spec.replicas.max",
                "Invalid value: 10: spec.replicas.max in body should be less than 10",
            ),
            (
                json!({"replicas": {"min": 3_000_000_000u64}}),
                "FieldValueInvalid",
                "spec.replicas.min",
                "Invalid value: 3000000000: spec.replicas.min in body should be less than or equal to 2147483647",
            ),
            (
                json!({"replicas": {"min": "two"}}),
                "FieldValueTypeInvalid",
                "spec.replicas.min",
                "Invalid value: \"string\": spec.replicas.min in body must be of type integer: \"string\"",
            ),
            (
                json!({"mode": "C"}),
                "FieldValueNotSupported",
                "spec.mode",
                "Unsupported value: \"C\": supported values: \"A\", \"B\"",
            ),
            (
                json!({"name": ""}),
                "FieldValueInvalid",
                "spec.name",
                "Invalid value: \"\": spec.name in body should be at least 1 chars long",
            ),
            (json!({"name": "abcd"}), "FieldValueTooLong", "spec.name", "Too long: may not be more than 3 bytes"),
            (
                json!({"name": "A"}),
                "FieldValueInvalid",
                "spec.name",
                "Invalid value: \"A\": spec.name in body should match '^[a-z]*$'",
            ),
            (
                json!({"tags": ["a", "b", "c"]}),
                "FieldValueTooMany",
                "spec.tags",
                "Too many: 3: must have at most 2 items",
            ),
            (
                json!({"tags": ["a", 1]}),
                "FieldValueTypeInvalid",
                "spec.tags[1]",
                "Invalid value: \"integer\": spec.tags[1] in body must be of type string: \"integer\"",
            ),
            (
                json!({"labels": {"a": true}}),
                "FieldValueTypeInvalid",
                "spec.labels.a",
                "Invalid value: \"boolean\": spec.labels.a in body must be of type string: \"boolean\"",
            ),
            (
                json!({"port": 1.5}),
                "FieldValueTypeInvalid",
                "spec.port",
                "Invalid value: \"number\": spec.port in body must be of type integer-or-string: \"number\"",
            ),
            (
                json!({"free": {"n": "x"}}),
                "FieldValueTypeInvalid",
                "spec.free.n",
                "Invalid value: \"string\": spec.free.n in body must be of type integer: \"string\"",
            ),
            (json!({"req": {}}), "FieldValueRequired", "spec.req.url", "Required value"),
            (
                json!({"mode": null}),
                "FieldValueTypeInvalid",
                "spec.mode",
                "Invalid value: \"null\": spec.mode in body must be of type string: \"null\"",
            ),
        ];
        for (spec, reason, field, message) in cases {
            let mut obj = json!({"spec": spec});
            let causes = admit(&schema(), &mut obj);
            assert_eq!(causes, [Cause::new(reason, field, message.into())], "{spec}");
        }
        for ok in
            [json!({"port": 80}), json!({"port": "http"}), json!({"image": null}), json!({"replicas": {"max": 9}})]
        {
            assert_eq!(admit(&schema(), &mut json!({"spec": ok})), [], "{ok}");
        }
        let mut missing = json!({"metadata": {"name": "a"}});
        assert_eq!(admit(&schema(), &mut missing), [Cause::new("FieldValueRequired", "spec", "Required value".into())]);
    }
}
