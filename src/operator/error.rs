//! Why a reconcile failed. Each message names the object and the API server's answer: it ends up
//! in the farm's conditions and events.

use crate::api::InvalidSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name} failed: {}", api_message(source))]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "deleting the {kind} {name}, which the farm no longer asks for, failed: {}",
        api_message(source)
    )]
    Prune {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing the farm's {what} failed: {source}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of UploadFarm {name} failed: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("UploadFarm {name} has no namespace; UploadFarms are namespaced objects")]
    NoNamespace { name: String },
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
}

/// The API server's own words for a refusal (`Service "x" is invalid: metadata.name: ...`),
/// without the debug dump of the whole Status that `kube::Error`'s Display appends.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

impl Error {
    /// A short, bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Prune { .. } => "delete",
            Error::List { .. } => "list",
            Error::Status { .. } => "status",
            Error::NoNamespace { .. } => "no_namespace",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}
