//! The resources the double serves: what each is called and which subresources it has.
//!
//! Built-in kinds are listed here by hand; custom resources are read from their
//! CustomResourceDefinition (today the InferencePool CRD that `inferpool-crds` generates), which
//! also gives their OpenAPI schema for [`super::schema`]. The table is built once, on first use.

use std::sync::OnceLock;

use serde_json::Value;

/// One served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group; "" for the core group.
    pub group: &'static str,
    /// Version, e.g. `v1`.
    pub version: &'static str,
    /// Kind, e.g. `Deployment`.
    pub kind: &'static str,
    /// Plural used in paths, e.g. `deployments`.
    pub plural: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `/status` is a separate subresource (then writes to the main resource keep the
    /// stored status and writes to `/status` change nothing else).
    pub status: bool,
    /// Where `/scale` reads and writes, when it is served.
    pub scale: Option<ScalePaths>,
    /// Short names discovery lists (`kubectl get deploy`), as the real API server's.
    pub short_names: &'static [&'static str],
    /// Categories discovery lists (`kubectl get all`, `kubectl get inferpool`).
    pub categories: &'static [&'static str],
}

/// JSON pointers behind a scale subresource, as a CRD's `subresources.scale` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScalePaths {
    /// The desired replicas (`spec.replicas` of the Scale).
    pub spec_replicas: &'static str,
    /// The current replicas (`status.replicas`).
    pub status_replicas: &'static str,
    /// Where the label selector is: a `matchLabels` map, or a selector string.
    pub selector: &'static str,
}

/// A Deployment's scale.
const DEPLOYMENT_SCALE: ScalePaths = ScalePaths {
    spec_replicas: "/spec/replicas",
    status_replicas: "/status/replicas",
    selector: "/spec/selector/matchLabels",
};

impl Resource {
    /// The same resource with its short names and categories.
    const fn named(self, short_names: &'static [&'static str], categories: &'static [&'static str]) -> Resource {
        Resource { short_names, categories, ..self }
    }

    /// `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn r(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    status: bool,
    scale: Option<ScalePaths>,
) -> Resource {
    Resource { group, version, kind, plural, namespaced, status, scale, short_names: &[], categories: &[] }
}

/// The built-in resources served (custom resources come from CRDs, see [`all`]).
pub const BUILTIN: &[Resource] = &[
    r("", "v1", "Namespace", "namespaces", false, true, None).named(&["ns"], &[]),
    r("", "v1", "Pod", "pods", true, true, None).named(&["po"], &["all"]),
    r("", "v1", "Service", "services", true, true, None).named(&["svc"], &["all"]),
    r("", "v1", "ConfigMap", "configmaps", true, false, None).named(&["cm"], &[]),
    r("", "v1", "Secret", "secrets", true, false, None),
    r("", "v1", "Event", "events", true, false, None).named(&["ev"], &[]),
    r("apps", "v1", "Deployment", "deployments", true, true, Some(DEPLOYMENT_SCALE)).named(&["deploy"], &["all"]),
    r("events.k8s.io", "v1", "Event", "events", true, false, None).named(&["ev"], &[]),
    r("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true, true, None).named(&["pdb"], &[]),
    r("coordination.k8s.io", "v1", "Lease", "leases", true, false, None),
    r("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, false, None),
];

/// Every resource served, with the structural schema of those that have one.
struct Table {
    resources: Vec<Resource>,
    /// `openAPIV3Schema` of a served CRD version, by index into `resources`.
    schemas: Vec<(usize, Value)>,
    /// `additionalPrinterColumns` of a served CRD version, by index into `resources`.
    columns: Vec<(usize, Vec<Value>)>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Table { resources: BUILTIN.to_vec(), schemas: Vec::new(), columns: Vec::new() };
        for crd in crds() {
            match from_crd(&crd) {
                Ok(served) => {
                    for (resource, version) in served {
                        let index = table.resources.len();
                        let columns = version.get("additionalPrinterColumns").and_then(Value::as_array);
                        table.columns.push((index, columns.cloned().unwrap_or_default()));
                        let schema = version.pointer("/schema/openAPIV3Schema").cloned().unwrap_or(Value::Null);
                        table.schemas.push((index, schema));
                        table.resources.push(resource);
                    }
                }
                // The CRDs are generated at build time; a broken one is a bug, reported and skipped.
                Err(e) => tracing::error!(error = %e, "CustomResourceDefinition not served"),
            }
        }
        table
    })
}

/// The CRDs installed at start.
fn crds() -> Vec<Value> {
    use kube::CustomResourceExt;
    match serde_json::to_value(inferpool_crds::InferencePool::crd()) {
        Ok(crd) => vec![crd],
        Err(e) => {
            tracing::error!(error = %e, "InferencePool CRD does not serialize");
            Vec::new()
        }
    }
}

/// Why a CRD cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("CustomResourceDefinition {name}: {problem}")]
pub struct CrdError {
    name: String,
    problem: String,
}

/// `.spec.replicas.count` (a CRD's JSON path) as a JSON pointer, leaked: the table lives for the
/// whole process and is built once.
fn pointer(path: &str) -> &'static str {
    let p = path.trim_start_matches('.').replace('.', "/");
    Box::leak(format!("/{p}").into_boxed_str())
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// The resources an `apiextensions.k8s.io/v1` CustomResourceDefinition serves (one per served
/// version), each with its version entry (schema, printer columns). Its names are leaked to live as long as the process: call it
/// once per CRD (the table does, at first use).
pub fn from_crd(crd: &Value) -> Result<Vec<(Resource, Value)>, CrdError> {
    let name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned();
    let err = |problem: &str| CrdError { name: name.clone(), problem: problem.to_owned() };
    let text = |p: &str| crd.pointer(p).and_then(Value::as_str).ok_or_else(|| err(&format!("no {p}")));
    let group = leak(text("/spec/group")?);
    let kind = leak(text("/spec/names/kind")?);
    let plural = leak(text("/spec/names/plural")?);
    let namespaced = text("/spec/scope")? == "Namespaced";
    let names = |p: &str| -> &'static [&'static str] {
        let list = crd.pointer(p).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        list.iter().filter_map(Value::as_str).map(leak).collect::<Vec<_>>().leak()
    };
    let (short_names, categories) = (names("/spec/names/shortNames"), names("/spec/names/categories"));
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).ok_or_else(|| err("no versions"))?;
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true)) {
        let version = leak(v.get("name").and_then(Value::as_str).ok_or_else(|| err("a version without a name"))?);
        let status = v.pointer("/subresources/status").is_some();
        let scale = match v.pointer("/subresources/scale") {
            Some(s) => {
                let path = |k: &str| s.get(k).and_then(Value::as_str);
                Some(ScalePaths {
                    spec_replicas: pointer(
                        path("specReplicasPath").ok_or_else(|| err("scale without specReplicasPath"))?,
                    ),
                    status_replicas: pointer(
                        path("statusReplicasPath").ok_or_else(|| err("scale without statusReplicasPath"))?,
                    ),
                    selector: pointer(path("labelSelectorPath").unwrap_or(".status.selector")),
                })
            }
            None => None,
        };
        let resource = Resource { group, version, kind, plural, namespaced, status, scale, short_names, categories };
        out.push((resource, v.clone()));
    }
    Ok(out)
}

/// Every resource served: the built-in ones and those of the installed CRDs.
pub fn all() -> &'static [Resource] {
    &table().resources
}

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    all().iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The CRD's printer columns of `resource` (none for built-in kinds).
pub fn printer_columns(resource: &Resource) -> &'static [Value] {
    let t = table();
    t.columns.iter().find(|(i, _)| t.resources.get(*i) == Some(resource)).map_or(&[], |(_, c)| c.as_slice())
}

/// The structural schema objects of `resource` are validated against, when it has one.
pub fn schema(resource: &Resource) -> Option<&'static Value> {
    let t = table();
    t.schemas.iter().find(|(i, _)| t.resources.get(*i) == Some(resource)).map(|(_, s)| s).filter(|s| !s.is_null())
}
