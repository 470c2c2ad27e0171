//! The resources the double serves: what each is called and which subresources it has.

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
    /// Whether `/scale` is served.
    pub scale: bool,
}

impl Resource {
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
    scale: bool,
) -> Resource {
    Resource { group, version, kind, plural, namespaced, status, scale }
}

/// Every resource served.
pub const RESOURCES: &[Resource] = &[
    r("", "v1", "Namespace", "namespaces", false, true, false),
    r("", "v1", "Pod", "pods", true, true, false),
    r("", "v1", "Service", "services", true, true, false),
    r("", "v1", "ConfigMap", "configmaps", true, false, false),
    r("", "v1", "Secret", "secrets", true, false, false),
    r("", "v1", "Event", "events", true, false, false),
    r("apps", "v1", "Deployment", "deployments", true, true, true),
    r("events.k8s.io", "v1", "Event", "events", true, false, false),
    r("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true, true, false),
    r("coordination.k8s.io", "v1", "Lease", "leases", true, false, false),
    r("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, false, false),
    r("inferpool.dev", "v1alpha1", "InferencePool", "inferencepools", true, true, true),
];

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}
