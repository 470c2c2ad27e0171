//! A container's environment as a kubelet builds it, before the process starts.
//!
//! `envFrom` sources come first (in order, each key optionally prefixed), then `env` entries,
//! which override them; literal `env` values may use `$(VAR)` to refer to variables defined
//! before them, and `args` may use every variable. `valueFrom` reads a ConfigMap or Secret key
//! (Secret `data` is base64; `stringData`, which the API double stores as sent, wins over it) or
//! a few pod fields. A missing object or key that is not `optional: true` is a [`ConfigError`]:
//! the container is not started, as with the kubelet's `CreateContainerConfigError`.
//! Everything here is pure: objects come through a lookup function so tests need no store.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

/// Where an env value can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A ConfigMap's `data`.
    ConfigMap,
    /// A Secret's `data` (base64) and `stringData`.
    Secret,
}

impl Source {
    /// The kind, as Kubernetes spells it in messages.
    fn kind(self) -> &'static str {
        match self {
            Source::ConfigMap => "ConfigMap",
            Source::Secret => "Secret",
        }
    }

    /// The resource, as Kubernetes' NotFound errors name it.
    fn resource(self) -> &'static str {
        match self {
            Source::ConfigMap => "configmap",
            Source::Secret => "secret",
        }
    }
}

/// Why a container cannot be configured yet; the message is the one a kubelet reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A referenced ConfigMap or Secret does not exist.
    #[error("{} \"{name}\" not found", kind.resource())]
    NotFound {
        /// Its kind.
        kind: Source,
        /// Its name.
        name: String,
    },
    /// A referenced key is not in the ConfigMap or Secret.
    #[error("couldn't find key {key} in {} {namespace}/{name}", kind.kind())]
    MissingKey {
        /// Its kind.
        kind: Source,
        /// The object's namespace.
        namespace: String,
        /// The object's name.
        name: String,
        /// The key asked for.
        key: String,
    },
    /// A `fieldRef` to a field this double does not know.
    #[error("unsupported fieldRef {0}")]
    Field(String),
}

/// The data of a ConfigMap or Secret as strings, Secret values decoded.
pub fn data(source: Source, object: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let strings = |field: &str| {
        object.get(field).and_then(Value::as_object).into_iter().flatten().filter_map(|(k, v)| Some((k, v.as_str()?)))
    };
    match source {
        Source::ConfigMap => out.extend(strings("data").map(|(k, v)| (k.clone(), v.to_owned()))),
        Source::Secret => {
            for (k, v) in strings("data") {
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(v) {
                    out.insert(k.clone(), String::from_utf8_lossy(&bytes).into_owned());
                }
            }
            out.extend(strings("stringData").map(|(k, v)| (k.clone(), v.to_owned())));
        }
    }
    out
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

fn optional(v: &Value) -> bool {
    v.get("optional").and_then(Value::as_bool).unwrap_or(false)
}

/// Whether `name` is a valid environment variable name (keys that are not are skipped, as
/// Kubernetes skips them in `envFrom`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Resolves `container`'s `envFrom` and `env` for `pod` (whose IP is `pod_ip`); `lookup` returns
/// a ConfigMap's or Secret's data by name, `None` when it does not exist.
pub fn resolve(
    pod: &Value,
    pod_ip: &str,
    container: &Value,
    lookup: impl Fn(Source, &str) -> Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let namespace = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let mut env = BTreeMap::new();
    for from in container.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
        let (source, reference) = match (from.get("configMapRef"), from.get("secretRef")) {
            (Some(r), _) => (Source::ConfigMap, r),
            (None, Some(r)) => (Source::Secret, r),
            (None, None) => continue,
        };
        let name = str_of(reference, "name");
        let Some(values) = lookup(source, name) else {
            if optional(reference) {
                continue;
            }
            return Err(ConfigError::NotFound { kind: source, name: name.to_owned() });
        };
        let prefix = str_of(from, "prefix");
        for (k, v) in values {
            let key = format!("{prefix}{k}");
            if valid_name(&key) {
                env.insert(key, v);
            }
        }
    }
    for var in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        let name = str_of(var, "name");
        let value = match var.get("valueFrom") {
            None => expand(str_of(var, "value"), |n| env.get(n).cloned()),
            Some(from) => match value_from(pod, pod_ip, namespace, from, &lookup)? {
                Some(v) => v,
                None => continue,
            },
        };
        env.insert(name.to_owned(), value);
    }
    Ok(env)
}

/// One `valueFrom`; `None` when an optional reference is missing (the variable is left out).
fn value_from(
    pod: &Value,
    pod_ip: &str,
    namespace: &str,
    from: &Value,
    lookup: &impl Fn(Source, &str) -> Option<BTreeMap<String, String>>,
) -> Result<Option<String>, ConfigError> {
    if let Some(field) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
        let value = match field {
            "metadata.name" | "metadata.namespace" | "metadata.uid" => {
                pod.pointer(&format!("/metadata/{}", &field["metadata.".len()..])).and_then(Value::as_str)
            }
            "status.podIP" => Some(pod_ip),
            "status.hostIP" | "status.hostIPs" => Some("127.0.0.1"),
            "spec.nodeName" => Some("inferpool-local"),
            _ => None,
        };
        return value.map(|v| Some(v.to_owned())).ok_or_else(|| ConfigError::Field(field.to_owned()));
    }
    let (source, selector) = match (from.get("configMapKeyRef"), from.get("secretKeyRef")) {
        (Some(s), _) => (Source::ConfigMap, s),
        (None, Some(s)) => (Source::Secret, s),
        (None, None) => return Ok(None),
    };
    let (name, key) = (str_of(selector, "name"), str_of(selector, "key"));
    let Some(values) = lookup(source, name) else {
        return if optional(selector) {
            Ok(None)
        } else {
            Err(ConfigError::NotFound { kind: source, name: name.to_owned() })
        };
    };
    match values.get(key) {
        Some(v) => Ok(Some(v.clone())),
        None if optional(selector) => Ok(None),
        None => Err(ConfigError::MissingKey {
            kind: source,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
        }),
    }
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined reference is
/// kept as written, `$$` is an escaped `$`, and any other `$` is literal.
pub fn expand(input: &str, vars: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|s| s.split_once(')')) {
            match vars(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn lookup(source: Source, name: &str) -> Option<BTreeMap<String, String>> {
        let object = match (source, name) {
            (Source::ConfigMap, "tuning") => json!({"data": {"MAX_BATCH": "8", "SHARED": "from-map", "bad key": "x"}}),
            (Source::Secret, "admin") => json!({"data": {"token": "czNjcjN0"}, "stringData": {"user": "ops"}}),
            _ => return None,
        };
        Some(data(source, &object))
    }

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "pool", "uid": "u"}})
    }

    #[test]
    fn env_from_env_override_and_expansion() {
        let c = json!({
            "envFrom": [{"configMapRef": {"name": "tuning"}}, {"secretRef": {"name": "admin"}, "prefix": "S_"}],
            "env": [
                {"name": "SHARED", "value": "explicit"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}}},
                {"name": "URL", "value": "http://$(POD_IP):$(PORT)/$(MISSING)/$$(x)/$x"},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "LATE", "value": "$(POD_IP)"},
                {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
            ],
        });
        let env = resolve(&pod(), "127.0.0.9", &c, lookup).unwrap();
        assert_eq!(env["MAX_BATCH"], "8");
        assert_eq!(env["SHARED"], "explicit", "env overrides envFrom");
        assert_eq!(env["S_token"], "s3cr3t");
        assert_eq!(env["S_user"], "ops", "stringData is read too");
        assert_eq!(env["TOKEN"], "s3cr3t");
        assert_eq!(env["URL"], "http://$(POD_IP):$(PORT)/$(MISSING)/$(x)/$x", "only variables defined before expand");
        assert_eq!(env["LATE"], "127.0.0.9");
        assert!(!env.contains_key("GONE") && !env.contains_key("bad key"));
    }

    #[test]
    fn missing_references_name_what_is_missing() {
        let missing =
            json!({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "pool-admin", "key": "token"}}}]});
        assert_eq!(resolve(&pod(), "", &missing, lookup).unwrap_err().to_string(), "secret \"pool-admin\" not found");
        let key = json!({"env": [{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "NOPE"}}}]});
        assert_eq!(
            resolve(&pod(), "", &key, lookup).unwrap_err().to_string(),
            "couldn't find key NOPE in ConfigMap pool/tuning"
        );
        let from = json!({"envFrom": [{"configMapRef": {"name": "x-tuning"}}]});
        assert_eq!(resolve(&pod(), "", &from, lookup).unwrap_err().to_string(), "configmap \"x-tuning\" not found");
        let optional = json!({"envFrom": [{"configMapRef": {"name": "x-tuning", "optional": true}}]});
        assert!(resolve(&pod(), "", &optional, lookup).unwrap().is_empty());
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = |n: &str| (n == "A").then(|| "1".to_owned());
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$(A", vars), "1-$(B)-$(A)-$-$(A");
    }
}
