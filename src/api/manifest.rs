//! Reading an UploadFarm manifest (one YAML document): what `bitsfarm render` and the local farm
//! (`bitsfarm farm -f`) start from, checked the same way for both.
//!
//! A file is stricter than the API server: a key the UploadFarm does not have (`replicass: 3`) is
//! refused with its path and line, as `serve --config` refuses one, instead of being dropped
//! without a word. The CRD types themselves stay lenient (no `deny_unknown_fields`): the operator
//! must go on reading objects that a newer or older CRD version wrote. So the check is here, in
//! the file-loading path only: `serde_ignored` names every key the types skipped, and a second
//! reading of the text (`keys`) says where each one is.

mod keys;

use std::path::Path;

use kube::Resource;

use super::UploadFarm;

/// An example of what a manifest should hold, for messages.
const EXAMPLE: &str = "examples/uploadfarm-minimal.yaml";

/// A manifest that cannot be read as an UploadFarm. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an UploadFarm: {holds}")]
    NotAFarm { path: String, holds: String },
    /// Not YAML, or a value of the wrong type, or a farm without a name.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(
        "{path}: {keys}; an UploadFarm has no such {what} (check the spelling; `bitsfarm crd` or `kubectl explain uploadfarm.spec` lists the keys)"
    )]
    UnknownKeys {
        path: String,
        /// Each key as `spec.replicass at line 6`.
        keys: String,
        what: &'static str,
    },
}

/// Reads an UploadFarm manifest from text, checking its kind, name and keys. Errors name the text
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
    let fail = |message: String| ManifestError::Invalid {
        path: shown.to_string(),
        message,
    };
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| fail(e.to_string()))?;
    match docs.as_slice() {
        [one] if is_farm(one) => {}
        docs => {
            return Err(ManifestError::NotAFarm {
                path: shown.to_string(),
                holds: not_a_farm(docs),
            });
        }
    }
    let mut ignored = Vec::new();
    let farm = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_ignored::deserialize::<_, _, UploadFarm>(de, |path| {
            ignored.push(keys::KeyPath::of(&path))
        })
    });
    // The type keys are checked above; the CRD types leave them to the API machinery.
    ignored.retain(|k| !k.is_type_key());
    // A misspelled key is likely why a required one is missing: it is said first.
    if !ignored.is_empty() {
        let tree = keys::locate_all(text, &ignored);
        return Err(ManifestError::UnknownKeys {
            path: shown.to_string(),
            what: if ignored.len() == 1 { "key" } else { "keys" },
            keys: tree.join(", "),
        });
    }
    let farm = farm.map_err(|e| fail(e.to_string()))?;
    if farm.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(fail("metadata.name is missing".into()));
    }
    Ok(farm)
}

fn field<'a>(doc: &'a serde_json::Value, key: &str) -> &'a str {
    doc.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

fn is_farm(doc: &serde_json::Value) -> bool {
    (field(doc, "apiVersion"), field(doc, "kind"))
        == (
            UploadFarm::api_version(&()).as_ref(),
            UploadFarm::kind(&()).as_ref(),
        )
}

/// What a file that is not one UploadFarm holds, and what it should hold instead.
fn not_a_farm(docs: &[serde_json::Value]) -> String {
    let expected = format!(
        "`render` and `farm -f` take a file with one UploadFarm (apiVersion: {}, kind: {}), such as {EXAMPLE}",
        UploadFarm::api_version(&()),
        UploadFarm::kind(&()),
    );
    let farms = docs.iter().filter(|d| is_farm(d)).count();
    let listed: Vec<String> = docs.iter().map(describe).collect();
    match (docs.len(), farms) {
        (0, _) => format!("it holds no object; {expected}"),
        (1, _) => format!("it holds {}; {expected}", listed[0]),
        (n, 0) => format!("it holds {n} objects ({}); {expected}", listed.join(", ")),
        (n, _) => format!(
            "it holds {n} objects ({}); {expected}: put the UploadFarm in a file of its own",
            listed.join(", ")
        ),
    }
}

/// `a ConfigMap x (apiVersion v1)`, or what a document that is no object is.
fn describe(doc: &serde_json::Value) -> String {
    use serde_json::Value;
    match doc {
        Value::Object(_) => {
            let (api, kind) = (field(doc, "apiVersion"), field(doc, "kind"));
            let name = doc
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str());
            let mut out = if kind.is_empty() {
                "a mapping without a kind".to_string()
            } else {
                kind.to_string()
            };
            if let Some(n) = name {
                out.push_str(&format!(" {n}"));
            }
            if is_farm(doc) {
                return out;
            }
            if api.is_empty() {
                out.push_str(" (no apiVersion)");
            } else {
                out.push_str(&format!(" (apiVersion {api})"));
            }
            out
        }
        Value::Array(_) => "a list".into(),
        Value::String(_) => "a string".into(),
        Value::Number(_) => "a number".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Null => "an empty document".into(),
    }
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
        // Every key a farm may carry is known, however deep.
        let full = format!(
            "{FARM}  backend:\n    url: http://b/in\n    notification: ByValue\n  directories:\n    - path: /a\n      limits:\n        maxUploadSizeBytes: 10\n  tolerations:\n    - key: k\n      operator: Exists\n  resources:\n    limits:\n      memory: 1Gi\nstatus:\n  replicas: 1\n"
        );
        parse_farm(&full).unwrap();
    }

    #[test]
    fn other_kinds_and_nameless_farms_are_refused_naming_the_input() {
        let e = parse_farm("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("<input> is not an UploadFarm"), "{text}");
        assert!(
            text.contains("it holds ConfigMap x (apiVersion v1)"),
            "{text}"
        );
        assert!(text.contains("kind: UploadFarm"), "{text}");
        let e = parse_farm(
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata: {}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("metadata.name is missing"), "{e}");
        let e = parse_farm("spec: [unclosed").unwrap_err();
        assert!(matches!(e, ManifestError::Invalid { .. }), "{e}");
    }

    #[test]
    fn a_file_of_several_objects_is_described_not_parsed() {
        let two = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n";
        let e = parse_farm(two).unwrap_err().to_string();
        assert!(
            e.contains(
                "it holds 2 objects (Service s (apiVersion v1), Deployment d (apiVersion apps/v1))"
            ),
            "{e}"
        );
        let with_farm = format!("{two}---\n{FARM}");
        let e = parse_farm(&with_farm).unwrap_err().to_string();
        assert!(
            e.contains("UploadFarm web)") && e.contains("a file of its own"),
            "{e}"
        );
        let e = parse_farm("# nothing\n").unwrap_err().to_string();
        assert!(e.contains("it holds no object"), "{e}");
        let e = parse_farm("- a\n- b\n").unwrap_err().to_string();
        assert!(e.contains("it holds a list"), "{e}");
        let e = parse_farm(&FARM.replace("v1alpha1", "v9"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("UploadFarm web (apiVersion bitsfarm.io/v9)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path_and_line() {
        let e = parse_farm(&FARM.replace("replicas: 2", "replicass: 3"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("<input>: spec.replicass at line 6; an UploadFarm has no such key"),
            "{e}"
        );
        let e = parse_farm(&format!(
            "{FARM}  directories:\n    - path: /a\n    - path: /b\n      limts: {{}}\n  hostIds: {{serviceTipe: None}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("spec.directories[1].limts at line 10"), "{e}");
        assert!(e.contains("spec.hostIds.serviceTipe at line 11"), "{e}");
        assert!(e.contains("no such keys"), "{e}");
        let e = parse_farm(&FARM.replace("kind: UploadFarm\n", "kind: UploadFarm\nextra: 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra at line 3"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_pointed_at() {
        let e = parse_farm(&FARM.replace("replicas: 2", "replicas: lots"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 6"), "{e}");
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
        std::fs::write(&path, FARM.replace("spec:", "spek:")).unwrap();
        let e = load_farm(&path).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: spek at line 5", path.display())),
            "{e}"
        );
        std::fs::write(&path, FARM).unwrap();
        assert_eq!(load_farm(&path).unwrap().spec.replicas, 2);
    }
}
