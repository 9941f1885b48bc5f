//! `bitsfarm render`: every object the operator would apply for a farm, offline.

use std::path::Path;

use kube::Resource;

use crate::api::UploadFarm;

use super::resources::{BuildOptions, children};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an UploadFarm: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Renders the farm in `path` as a multi-document YAML stream, ready for `kubectl apply -f -`.
pub fn render_file(path: &Path, opts: &BuildOptions) -> Result<String, RenderError> {
    let farm = load_farm(path)?;
    render_farm(&farm, opts).map_err(|e| match e {
        RenderError::Invalid { message, .. } => RenderError::Invalid {
            path: path.display().to_string(),
            message,
        },
        other => other,
    })
}

pub fn render_str(text: &str, opts: &BuildOptions) -> Result<String, RenderError> {
    render_farm(&parse_farm(text)?, opts)
}

fn render_farm(farm: &UploadFarm, opts: &BuildOptions) -> Result<String, RenderError> {
    let invalid = |message: String| RenderError::Invalid {
        path: "<input>".into(),
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

/// Reads an UploadFarm manifest (one YAML document), checking its kind and name.
pub fn parse_farm(text: &str) -> Result<UploadFarm, RenderError> {
    let parse = |message: String| RenderError::Parse {
        path: "<input>".into(),
        message,
    };
    let value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| parse(e.to_string()))?;
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let expected = (UploadFarm::api_version(&()), UploadFarm::kind(&()));
    if (field("apiVersion"), field("kind")) != (expected.0.to_string(), expected.1.to_string()) {
        return Err(parse(format!(
            "expected apiVersion {} and kind {}, found {:?} {:?}",
            expected.0,
            expected.1,
            field("apiVersion"),
            field("kind")
        )));
    }
    let farm: UploadFarm = serde_json::from_value(value).map_err(|e| parse(e.to_string()))?;
    if farm.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(parse("metadata.name is missing".into()));
    }
    Ok(farm)
}

/// Reads an UploadFarm manifest from a file.
pub fn load_farm(path: &Path) -> Result<UploadFarm, RenderError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_farm(&text).map_err(|e| match e {
        RenderError::Parse { message, .. } => RenderError::Parse {
            path: shown.clone(),
            message,
        },
        other => other,
    })
}
