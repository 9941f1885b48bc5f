//! Reading an UploadFarm manifest (one YAML document): what `bitsfarm render` and the local farm
//! (`bitsfarm farm -f`) start from, checked the same way for both.

use std::path::Path;

use kube::Resource;

use super::UploadFarm;

/// A manifest that cannot be read as an UploadFarm. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an UploadFarm: {message}")]
    Parse { path: String, message: String },
}

/// Reads an UploadFarm manifest from text, checking its kind and name. Errors name the text
/// `<input>`.
pub fn parse_farm(text: &str) -> Result<UploadFarm, ManifestError> {
    parse(text, "<input>")
}

/// Reads an UploadFarm manifest from a file.
pub fn load_farm(path: &Path) -> Result<UploadFarm, ManifestError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &shown),
        Err(source) => Err(ManifestError::Read {
            path: shown,
            source,
        }),
    }
}

fn parse(text: &str, shown: &str) -> Result<UploadFarm, ManifestError> {
    let fail = |message: String| ManifestError::Parse {
        path: shown.to_string(),
        message,
    };
    let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| fail(e.to_string()))?;
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let expected = (UploadFarm::api_version(&()), UploadFarm::kind(&()));
    if (field("apiVersion"), field("kind")) != (expected.0.to_string(), expected.1.to_string()) {
        return Err(fail(format!(
            "expected apiVersion {} and kind {}, found {:?} {:?}",
            expected.0,
            expected.1,
            field("apiVersion"),
            field("kind")
        )));
    }
    let farm: UploadFarm = serde_json::from_value(value).map_err(|e| fail(e.to_string()))?;
    if farm.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(fail("metadata.name is missing".into()));
    }
    Ok(farm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FARM: &str = "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: web\nspec:\n  replicas: 2\n";

    #[test]
    fn a_farm_manifest_reads_with_its_name_and_spec() {
        let farm = parse_farm(FARM).unwrap();
        assert_eq!(farm.metadata.name.as_deref(), Some("web"));
        assert_eq!(farm.spec.replicas, 2);
    }

    #[test]
    fn other_kinds_and_nameless_farms_are_refused_naming_the_input() {
        let e = parse_farm("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("<input> is not an UploadFarm"), "{text}");
        assert!(text.contains("\"ConfigMap\""), "{text}");
        let e = parse_farm(
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata: {}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("metadata.name is missing"), "{e}");
        let e = parse_farm("spec: [unclosed").unwrap_err();
        assert!(matches!(e, ManifestError::Parse { .. }), "{e}");
    }

    #[test]
    fn a_file_is_named_in_every_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("farm.yaml");
        let e = load_farm(&path).unwrap_err();
        assert!(matches!(e, ManifestError::Read { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read {}", path.display()))
        );
        std::fs::write(&path, "apiVersion: v1\nkind: Pod\n").unwrap();
        let e = load_farm(&path).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{} is not an UploadFarm", path.display())),
            "{e}"
        );
        std::fs::write(&path, FARM).unwrap();
        assert_eq!(load_farm(&path).unwrap().spec.replicas, 2);
    }
}
