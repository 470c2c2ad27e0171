//! The operator's error type: one enum, so `error_policy` can tell a spec the user must fix from a
//! failure that a retry may cure.

use inferpool_crds::pool::SpecError;

/// Everything that can stop a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool's spec breaks a rule; nothing is applied until the user changes it.
    #[error("invalid spec: {}", join(.0))]
    InvalidSpec(Vec<SpecError>),
    /// The pool lacks metadata the API server always sets (namespace, uid).
    #[error("InferencePool has no metadata.{0}")]
    MissingMetadata(&'static str),
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be turned into JSON.
    #[error("serialising {0}: {1}")]
    Serialize(&'static str, serde_json::Error),
}

impl Error {
    /// Whether retrying without a spec change cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidSpec(_) | Self::MissingMetadata(_))
    }

    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingMetadata(_) => "missing_metadata",
            Self::Kube(_) => "kube",
            Self::Serialize(..) => "serialize",
        }
    }
}

fn join(errors: &[SpecError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
