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
    /// Where `/scale` reads and writes, when it is served.
    pub scale: Option<ScalePaths>,
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
    Resource { group, version, kind, plural, namespaced, status, scale }
}

/// Every resource served.
pub const RESOURCES: &[Resource] = &[
    r("", "v1", "Namespace", "namespaces", false, true, None),
    r("", "v1", "Pod", "pods", true, true, None),
    r("", "v1", "Service", "services", true, true, None),
    r("", "v1", "ConfigMap", "configmaps", true, false, None),
    r("", "v1", "Secret", "secrets", true, false, None),
    r("", "v1", "Event", "events", true, false, None),
    r("apps", "v1", "Deployment", "deployments", true, true, Some(DEPLOYMENT_SCALE)),
    r("events.k8s.io", "v1", "Event", "events", true, false, None),
    r("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true, true, None),
    r("coordination.k8s.io", "v1", "Lease", "leases", true, false, None),
    r("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, false, None),
    r("inferpool.dev", "v1alpha1", "InferencePool", "inferencepools", true, true, None),
];

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}
