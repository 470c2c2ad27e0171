//! The double's stand-in for volume mounts: a process cannot be given its own mount namespace
//! here, so each mounted volume is a host directory, and env values and args that name a path
//! under a mount's `mountPath` are rewritten to the same path under that directory.
//!
//! An `emptyDir` lives in the pod's directory and goes with the pod; a `persistentVolumeClaim`
//! is a directory keyed by namespace and claim name that outlives pods, so a replacement pod sees
//! what its predecessor wrote. Other volume types are not mounted (their paths stay as written).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One container mount: where the container expects it and the host directory standing in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The container path (`mountPath`), without a trailing slash.
    pub path: String,
    /// The host directory (with `subPath` applied).
    pub host: PathBuf,
}

/// The mounts of `container` in `pod`: emptyDirs under `pod_dir`, claims under `claims_dir`.
/// Longer mount paths come first, so the most specific mount wins.
pub fn mounts(pod: &Value, container: &Value, pod_dir: &Path, claims_dir: &Path) -> Vec<Mount> {
    let namespace = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let volumes = pod.pointer("/spec/volumes").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut out: Vec<Mount> = container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let name = m.get("name")?.as_str()?;
            let path = m.get("mountPath")?.as_str()?.trim_end_matches('/');
            let volume = volumes.iter().find(|v| v.get("name").and_then(Value::as_str) == Some(name))?;
            let base = if volume.get("emptyDir").is_some() {
                pod_dir.join("volumes").join(name)
            } else {
                let claim = volume.pointer("/persistentVolumeClaim/claimName")?.as_str()?;
                claims_dir.join(namespace).join(claim)
            };
            let sub = m.get("subPath").and_then(Value::as_str).unwrap_or("");
            let host = if sub.is_empty() { base } else { base.join(sub) };
            Some(Mount { path: if path.is_empty() { "/".to_owned() } else { path.to_owned() }, host })
        })
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.path.len()));
    out
}

/// `value` with a leading container path under a mount (also after `--flag=`) moved to the
/// mount's host directory.
pub fn rewrite(value: &str, mounts: &[Mount]) -> String {
    let (head, path) = match value.split_once('=') {
        Some((flag, rest)) if flag.starts_with('-') => (&value[..=flag.len()], rest),
        _ => ("", value),
    };
    for m in mounts {
        if let Some(rest) = path.strip_prefix(m.path.as_str())
            && (rest.is_empty() || rest.starts_with('/') || m.path == "/")
        {
            let rest = rest.trim_start_matches('/');
            let host = if rest.is_empty() { m.host.clone() } else { m.host.join(rest) };
            return format!("{head}{}", host.display());
        }
    }
    value.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mounts_map_paths_to_pod_and_claim_directories() {
        let pod = json!({
            "metadata": {"namespace": "pool"},
            "spec": {"volumes": [
                {"name": "cache", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "model-disk"}},
                {"name": "cfg", "configMap": {"name": "x"}},
            ]},
        });
        let c = json!({"volumeMounts": [
            {"name": "cache", "mountPath": "/var/cache/inferpool/"},
            {"name": "data", "mountPath": "/var/lib/inferpool", "subPath": "d"},
            {"name": "cfg", "mountPath": "/etc/cfg"},
        ]});
        let ms = mounts(&pod, &c, Path::new("/k/pool/p"), Path::new("/k/claims"));
        assert_eq!(ms.len(), 2, "only emptyDir and PVC volumes are mounted: {ms:?}");
        assert_eq!(rewrite("/var/cache/inferpool", &ms), "/k/pool/p/volumes/cache");
        assert_eq!(rewrite("/var/lib/inferpool/data", &ms), "/k/claims/pool/model-disk/d/data");
        assert_eq!(rewrite("--data-dir=/var/lib/inferpool/x", &ms), "--data-dir=/k/claims/pool/model-disk/d/x");
        assert_eq!(rewrite("/var/lib/inferpoolx", &ms), "/var/lib/inferpoolx", "a prefix of a name is not a mount");
        assert_eq!(rewrite("/etc/cfg/a", &ms), "/etc/cfg/a");
        assert_eq!(rewrite("a=/var/cache/inferpool", &ms), "a=/var/cache/inferpool", "only flags are split");
    }
}
