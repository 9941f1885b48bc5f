//! `bitsfarm render`: every object the operator would apply for a farm, offline.

use std::path::Path;

use crate::api::UploadFarm;
use crate::api::manifest::{self, ManifestError};

use super::resources::{BuildOptions, children};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Renders the farm in `path` as a multi-document YAML stream, ready for `kubectl apply -f -`.
pub fn render_file(path: &Path, opts: &BuildOptions) -> Result<String, RenderError> {
    let farm = manifest::load_farm(path)?;
    render_farm(&farm, opts, &path.display().to_string())
}

pub fn render_str(text: &str, opts: &BuildOptions) -> Result<String, RenderError> {
    render_farm(&manifest::parse_farm(text)?, opts, "<input>")
}

/// The farm's children as the operator would apply them for the spec as written (no scale-down
/// under way); `shown` names the manifest in errors.
fn render_farm(farm: &UploadFarm, opts: &BuildOptions, shown: &str) -> Result<String, RenderError> {
    let invalid = |message: String| RenderError::Invalid {
        path: shown.to_string(),
        message,
    };
    let objects = children(farm, opts)
        .map_err(|e| invalid(e.to_string()))?
        .to_values()
        .map_err(|e| invalid(e.to_string()))?;
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&o).map_err(|e| invalid(e.to_string()))?);
    }
    Ok(out)
}
