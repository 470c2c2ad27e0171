//! `inferpool-operator render`: what the operator would create for a pool, without a cluster.
//!
//! The same validate and build steps a reconcile runs, on a pool read from YAML, printed as
//! multi-document YAML. For reviewing a pool before applying it, and for the checks that the
//! Deployments the operator builds pass Pod Security "restricted" and the Kubernetes schemas.

use inferpool_crds::InferencePool;

use crate::build::{self, Settings, desired_replicas, desired_tuning};

/// Why a pool could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The text is not an InferencePool.
    #[error("not an InferencePool: {0}")]
    Parse(String),
    /// The pool breaks a rule; every broken rule is listed.
    #[error("invalid pool: {0}")]
    Invalid(String),
    /// Building or printing a child failed.
    #[error("{0}")]
    Build(String),
}

/// Renders every child of the pool in `yaml` as multi-document YAML. A pool without a namespace
/// or uid (as written by a user, not yet stored) gets `default` and a placeholder uid; the admin
/// token is shown as a placeholder too, since the operator derives it from its admin key.
pub fn render(yaml: &str, settings: &Settings) -> Result<String, RenderError> {
    let mut pool: InferencePool = serde_saphyr::from_str(yaml).map_err(|e| RenderError::Parse(e.to_string()))?;
    pool.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    pool.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_owned());
    if let Err(errors) = crate::validate::validate(&pool, settings) {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(RenderError::Invalid(list.join("; ")));
    }
    let replicas = desired_replicas(&pool, None);
    let children = build::children(&pool, settings, replicas, &desired_tuning(&pool))
        .map_err(|e| RenderError::Build(e.to_string()))?;
    let secret = build::admin_secret(&pool, "<derived by the operator from its admin key>")
        .map_err(|e| RenderError::Build(e.to_string()))?;
    let documents = [
        to_yaml(&children.deployment)?,
        to_yaml(&children.service)?,
        to_yaml(&children.tuning)?,
        to_yaml(&secret)?,
        to_yaml(&children.pdb)?,
    ];
    Ok(documents.join("---\n"))
}

fn to_yaml(object: &impl serde::Serialize) -> Result<String, RenderError> {
    serde_saphyr::to_string(object).map_err(|e| RenderError::Build(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { default_image: "registry.local/sidecar:1".into(), gpu_image: None, image_pull_policy: None }
    }

    #[test]
    fn renders_every_child_of_a_pool_as_written_by_a_user() {
        let yaml = "apiVersion: inferpool.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: shop}\nspec: {}\n";
        let out = render(yaml, &settings()).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
        assert_eq!(kinds, ["Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"]);
        assert!(out.contains("namespace: default") && out.contains("registry.local/sidecar:1"));
    }

    #[test]
    fn bad_pools_are_clear_errors() {
        let table = [
            ("kind: [", "not an InferencePool"),
            (
                "apiVersion: inferpool.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: shop}\nspec: {replicas: {min: 3, max: 1}}\n",
                "spec.replicas.min",
            ),
            (
                "apiVersion: inferpool.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: Shop_1}\nspec: {}\n",
                "metadata.name",
            ),
        ];
        for (yaml, expected) in table {
            let error = render(yaml, &settings()).expect_err(yaml).to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }
}
