//! Operator-level validation of a pool: the spec's own cross-field rules plus the rules that only
//! make sense next to the objects the operator builds (names it derives, volumes and mount paths it
//! reserves, the "restricted" Pod Security profile its pods run under).
//!
//! A pool that fails here is not built at all: the reconciler reports every error in a `Degraded`
//! condition and waits for a change, instead of applying a Deployment whose pods would be refused.

use std::collections::BTreeSet;

use inferpool_crds::pool::{InferencePool, PoolTemplate, SpecError};
use k8s_openapi::api::core::v1::Container;

use crate::build::{RESERVED_MOUNT_PATHS, RESERVED_VOLUMES, SIDECAR_CONTAINER, Settings};

/// Longest DNS label (RFC 1035 / RFC 1123).
const MAX_LABEL_LEN: usize = 63;
/// The only capability the "restricted" Pod Security profile lets a container add.
const ALLOWED_CAPABILITY: &str = "NET_BIND_SERVICE";

/// Checks everything that stops `pool` from being built with `settings`; returns every broken
/// rule, not the first.
pub fn validate(pool: &InferencePool, settings: &Settings) -> Result<(), Vec<SpecError>> {
    let mut errors = pool.spec.validate().err().unwrap_or_default();
    let mut fail = |field, message| errors.push(SpecError { field, message });

    let gpus = pool.spec.gpu.count;
    if gpus > 0 && pool.spec.image.is_none() && settings.gpu_image.is_none() {
        fail(
            "image",
            format!(
                "the pool asks for {gpus} GPU(s) but names no image, and the operator has no CUDA sidecar image \
                 (operator flag --gpu-image, chart value sidecar.gpuImage); the default image {:?} has no CUDA \
                 provider and would exit at start. Set spec.image to a CUDA build of the sidecar \
                 (sidecar/Dockerfile.cuda) or configure the operator's",
                settings.default_image
            ),
        );
    }

    match pool.metadata.name.as_deref() {
        Some(name) if !is_dns_1035_label(name) => fail(
            "metadata.name",
            format!(
                "{name:?} must be a DNS-1035 label (lower-case letters, digits and '-', starting with a \
                 letter, at most {MAX_LABEL_LEN} characters) because it names the pool's Service"
            ),
        ),
        _ => {}
    }
    if pool.spec.image.as_deref().is_some_and(|image| image.trim().is_empty()) {
        fail("image", "must not be empty; leave it out to use the operator's default image".to_owned());
    }
    if let Some(redis) = &pool.spec.cache.redis {
        let refs = [
            ("cache.redis.usernameSecretRef", &redis.username_secret_ref),
            ("cache.redis.passwordSecretRef", &redis.password_secret_ref),
        ];
        for (field, secret) in refs {
            let Some(secret) = secret else { continue };
            if secret.name.trim().is_empty() {
                fail(field, "needs the name of the Secret".to_owned());
            }
            if secret.key.trim().is_empty() {
                fail(field, "needs the key inside the Secret".to_owned());
            }
        }
    }
    if let Some(template) = &pool.spec.template {
        errors.extend(template_errors(template));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Rules on `spec.template`: names that must not clash with the operator's, mounts that must
/// resolve, and containers that must be able to run under the restricted profile.
fn template_errors(template: &PoolTemplate) -> Vec<SpecError> {
    let mut errors = Vec::new();
    let mut fail = |field, message| errors.push(SpecError { field, message });

    let mut container_names = BTreeSet::new();
    for container in &template.containers {
        let name = container.name.as_str();
        if name == SIDECAR_CONTAINER {
            fail("template.containers", format!("the name {name:?} is the operator's own container"));
        } else if !is_dns_1123_label(name) {
            fail("template.containers", format!("name {name:?} must be a DNS-1123 label"));
        } else if !container_names.insert(name) {
            fail("template.containers", format!("name {name:?} is used twice"));
        }
        for message in restricted_conflicts(container) {
            fail("template.containers", format!("container {name:?}: {message}"));
        }
    }

    // An unparseable volume is already reported by the spec's own rules; names are still checked.
    let volume_names: Vec<&str> =
        template.volumes.iter().filter_map(|v| v.get("name").and_then(serde_json::Value::as_str)).collect();
    let mut seen = BTreeSet::new();
    for &name in &volume_names {
        if RESERVED_VOLUMES.contains(&name) {
            fail("template.volumes", format!("the name {name:?} is reserved for the operator's own volume"));
        } else if !is_dns_1123_label(name) {
            fail("template.volumes", format!("name {name:?} must be a DNS-1123 label"));
        } else if !seen.insert(name) {
            fail("template.volumes", format!("name {name:?} is used twice"));
        }
    }

    let mut paths = BTreeSet::new();
    for mount in &template.volume_mounts {
        let (name, path) = (mount.name.as_str(), mount.mount_path.as_str());
        if !volume_names.contains(&name) {
            fail("template.volumeMounts", format!("mount of {name:?} refers to no volume in template.volumes"));
        }
        if !path.starts_with('/') {
            fail("template.volumeMounts", format!("mount path {path:?} must be absolute"));
        } else if let Some(reserved) = RESERVED_MOUNT_PATHS.iter().find(|r| paths_overlap(path, r)) {
            fail("template.volumeMounts", format!("mount path {path:?} collides with the operator's {reserved}"));
        } else if !paths.insert(path.trim_end_matches('/')) {
            fail("template.volumeMounts", format!("mount path {path:?} is used twice"));
        }
    }

    // Extra containers may also mount the pool's own volumes (say, the scratch volume at /tmp).
    for container in &template.containers {
        for mount in container.volume_mounts.iter().flatten() {
            let name = mount.name.as_str();
            if !volume_names.contains(&name) && !RESERVED_VOLUMES.contains(&name) {
                fail(
                    "template.containers",
                    format!("container {:?} mounts {name:?}, which is no volume of the pod", container.name),
                );
            }
        }
    }
    errors
}

/// Settings of a user container that the "restricted" profile refuses and that the operator will
/// not silently override (it only fills unset fields and turns privilege escalation off).
fn restricted_conflicts(container: &Container) -> Vec<String> {
    let Some(context) = &container.security_context else { return Vec::new() };
    let mut conflicts = Vec::new();
    if context.run_as_non_root == Some(false) {
        conflicts.push("runAsNonRoot: false is refused by the restricted Pod Security profile".to_owned());
    }
    if context.run_as_user == Some(0) {
        conflicts.push("runAsUser: 0 (root) is refused by the restricted Pod Security profile".to_owned());
    }
    let added = context.capabilities.as_ref().and_then(|c| c.add.as_ref());
    for capability in added.into_iter().flatten().filter(|c| c.as_str() != ALLOWED_CAPABILITY) {
        conflicts.push(format!(
            "capability {capability} may not be added under the restricted Pod Security profile \
             (only {ALLOWED_CAPABILITY})"
        ));
    }
    conflicts
}

/// Whether one path is the other or lies below it (or either is `/`).
fn paths_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
    let below = |inner: &str, outer: &str| inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'));
    a == b || a.is_empty() || b.is_empty() || below(a, b) || below(b, a)
}

/// RFC 1035 label: starts with a letter, then letters, digits and '-', not ending in '-'.
fn is_dns_1035_label(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase()) && is_dns_1123_label(name)
}

/// RFC 1123 label: lower-case letters, digits and '-', alphanumeric at both ends, at most 63 chars.
fn is_dns_1123_label(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name.chars().all(|c| alnum(c) || c == '-')
        && name.starts_with(alnum)
        && name.ends_with(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = include_str!("../tests/fixtures/template.yaml");

    /// The template fixture (valid) with `spec` replaced by `yaml`, named `name`.
    fn pool_named(name: &str, yaml: &str) -> InferencePool {
        let mut pool: InferencePool = serde_saphyr::from_str(POOL).expect("fixture");
        pool.spec = serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        pool.metadata.name = Some(name.to_owned());
        pool
    }

    fn pool(yaml: &str) -> InferencePool {
        pool_named("pool", yaml)
    }

    /// An operator with a CUDA image, as the chart configures it.
    fn settings() -> Settings {
        Settings {
            default_image: "ghcr.io/inferpool/sidecar:1".to_owned(),
            gpu_image: Some("ghcr.io/inferpool/sidecar-cuda:1".to_owned()),
            image_pull_policy: None,
        }
    }

    #[test]
    fn a_gpu_pool_without_an_image_needs_the_operators_cuda_image() {
        let gpu = pool("{gpu: {count: 2}}");
        let cpu_only = Settings { gpu_image: None, ..settings() };
        let errors = validate(&gpu, &cpu_only).expect_err("no CUDA image anywhere");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "image");
        for words in ["2 GPU(s)", "--gpu-image", "sidecar.gpuImage", "\"ghcr.io/inferpool/sidecar:1\""] {
            assert!(errors[0].message.contains(words), "{words}: {}", errors[0].message);
        }
        // Its own image, or the operator's CUDA image, or no GPU: nothing to refuse.
        assert_eq!(validate(&pool("{gpu: {count: 2}, image: 'my/cuda:1'}"), &cpu_only), Ok(()));
        assert_eq!(validate(&gpu, &settings()), Ok(()));
        assert_eq!(validate(&pool("{}"), &cpu_only), Ok(()));
    }

    #[test]
    fn every_fixture_is_valid() {
        for yaml in [
            include_str!("../tests/fixtures/cpu.yaml"),
            include_str!("../tests/fixtures/gpu.yaml"),
            include_str!("../tests/fixtures/redis.yaml"),
            POOL,
        ] {
            let pool: InferencePool = serde_saphyr::from_str(yaml).expect("fixture");
            assert_eq!(validate(&pool, &settings()), Ok(()), "{:?}", pool.metadata.name);
        }
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let table = [
            // The spec's own rules come through unchanged.
            ("replicas: {min: 5, max: 2}", "replicas.min", "must not exceed max"),
            ("image: '  '", "image", "must not be empty"),
            ("image: ''", "image", "must not be empty"),
            (
                "cache: {redis: {url: 'redis://r:6379', passwordSecretRef: {key: password}}}",
                "cache.redis.passwordSecretRef",
                "name of the Secret",
            ),
            (
                "cache: {redis: {url: 'redis://r:6379', passwordSecretRef: {name: auth}}}",
                "cache.redis.passwordSecretRef",
                "key inside the Secret",
            ),
            (
                "cache: {redis: {url: 'redis://r:6379', usernameSecretRef: {key: user}}}",
                "cache.redis.usernameSecretRef",
                "name of the Secret",
            ),
            ("template: {containers: [{name: sidecar, image: x}]}", "template.containers", "operator's own container"),
            ("template: {containers: [{name: a, image: x}, {name: a, image: y}]}", "template.containers", "used twice"),
            ("template: {containers: [{name: Log_Shipper, image: x}]}", "template.containers", "DNS-1123 label"),
            (
                "template: {containers: [{name: a, securityContext: {runAsNonRoot: false}}]}",
                "template.containers",
                "runAsNonRoot: false is refused",
            ),
            ("template: {containers: [{name: a, securityContext: {runAsUser: 0}}]}", "template.containers", "root"),
            (
                "template: {containers: [{name: a, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]}",
                "template.containers",
                "capability SYS_ADMIN may not be added",
            ),
            (
                "template: {containers: [{name: a, volumeMounts: [{name: nope, mountPath: /x}]}]}",
                "template.containers",
                "mounts \"nope\", which is no volume",
            ),
            ("template: {volumes: [{name: cache, emptyDir: {}}]}", "template.volumes", "reserved"),
            ("template: {volumes: [{name: tmp, emptyDir: {}}]}", "template.volumes", "reserved"),
            (
                "template: {volumes: [{name: m, emptyDir: {}}, {name: m, emptyDir: {}}]}",
                "template.volumes",
                "used twice",
            ),
            (
                "template: {volumeMounts: [{name: models, mountPath: /models}]}",
                "template.volumeMounts",
                "refers to no volume",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: /tmp}]}",
                "template.volumeMounts",
                "collides with the operator's /tmp",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: /var/lib/inferpool/models}]}",
                "template.volumeMounts",
                "collides with the operator's /var/lib/inferpool",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: /var/cache/}]}",
                "template.volumeMounts",
                "collides with the operator's /var/cache/inferpool",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: /}]}",
                "template.volumeMounts",
                "collides",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: models}]}",
                "template.volumeMounts",
                "must be absolute",
            ),
            (
                "template: {volumes: [{name: m, emptyDir: {}}], volumeMounts: [{name: m, mountPath: /a}, {name: m, mountPath: /a/}]}",
                "template.volumeMounts",
                "used twice",
            ),
        ];
        for (yaml, field, message) in table {
            let errors = validate(&pool(yaml), &settings()).expect_err(yaml);
            assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
            assert_eq!(errors[0].field, field, "{yaml}");
            assert!(errors[0].message.contains(message), "{yaml}: {}", errors[0].message);
        }
    }

    #[test]
    fn pool_names_must_name_a_service() {
        let long = "a".repeat(64);
        for name in ["9lives", "Faces", "faces-", "fa.ces", long.as_str()] {
            let errors = validate(&pool_named(name, "{}"), &settings()).expect_err(name);
            assert_eq!(errors.len(), 1, "{name}: {errors:?}");
            assert_eq!(errors[0].field, "metadata.name", "{name}");
            assert!(errors[0].message.contains("DNS-1035 label"), "{name}");
        }
        for name in ["a", "faces-2", &"a".repeat(63)] {
            assert_eq!(validate(&pool_named(name, "{}"), &settings()), Ok(()), "{name}");
        }
    }

    #[test]
    fn all_broken_rules_are_reported_together() {
        let yaml = "{replicas: {min: 3, max: 1}, image: '', template: {volumes: [{name: data, emptyDir: {}}]}}";
        let errors = validate(&pool_named("Bad", yaml), &settings()).expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["replicas.min", "metadata.name", "image", "template.volumes"]);
    }

    #[test]
    fn mounts_next_to_reserved_paths_are_fine() {
        for path in ["/var/cache/inferpool-models", "/var/lib/models", "/tmpfs", "/models"] {
            let yaml = format!(
                "template: {{volumes: [{{name: m, emptyDir: {{}}}}], volumeMounts: [{{name: m, mountPath: {path}}}]}}"
            );
            assert_eq!(validate(&pool(&yaml), &settings()), Ok(()), "{path}");
        }
    }
}
