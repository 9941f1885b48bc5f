//! The README's table of UploadFarm fields is generated from the CRD (crds/uploadfarm.yaml, which
//! another test keeps equal to `bitsfarm crd`), so it cannot go stale: this test regenerates it
//! and fails when the README's copy differs. To rewrite the README's table after changing the
//! CRD, run `BITSFARM_BLESS=1 cargo test --test chart_readme`.
//!
//! Every field of the spec gets a row, nested fields included (`hostIds.template`,
//! `directories[].backend.url`), except inside the fields whose type is a Kubernetes type, which
//! the Kubernetes documentation describes.

use std::path::Path;

use serde_json::Value;

const BEGIN: &str = "<!-- BEGIN uploadfarm-fields: generated from crds/uploadfarm.yaml; \
                     `BITSFARM_BLESS=1 cargo test --test chart_readme` rewrites it -->";
const END: &str = "<!-- END uploadfarm-fields -->";

/// Fields of a Kubernetes type: one row each, not one per nested field.
const KUBERNETES_TYPED: &[(&str, &str)] = &[
    ("affinity", "Affinity"),
    ("resources", "ResourceRequirements"),
    ("tolerations", "[]Toleration"),
    ("ingressFrom", "[]NetworkPolicyPeer"),
    ("adminFrom", "[]NetworkPolicyPeer"),
    ("backendPeers", "[]NetworkPolicyPeer"),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn type_of(name: &str, schema: &Value) -> String {
    if let Some((_, t)) = KUBERNETES_TYPED.iter().find(|(n, _)| *n == name) {
        return format!("Kubernetes `{t}`");
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        return "integer or string".into();
    }
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    match schema["type"].as_str().unwrap_or("") {
        "object" if schema.get("properties").is_none() => "map of strings".into(),
        "array" if schema["items"].get("properties").is_some() => "list of objects".into(),
        "array" => format!(
            "list of {}s",
            schema["items"]["type"].as_str().unwrap_or("value")
        ),
        t => t.to_string(),
    }
}

fn default_of(schema: &Value) -> String {
    match &schema["default"] {
        Value::Null | Value::Object(_) => String::new(),
        Value::String(s) => format!("`{s}`"),
        v => format!("`{v}`"),
    }
}

fn rows(schema: &Value, prefix: &str, required: &[Value], out: &mut Vec<String>) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    for (name, field) in props {
        let path = format!("{prefix}{name}");
        let mut description = one_line(field["description"].as_str().unwrap_or(""));
        if required.iter().any(|r| r == name) {
            description = format!("**Required.** {description}");
        }
        out.push(format!(
            "| `{path}` | {} | {} | {description} |",
            type_of(name, field),
            default_of(field)
        ));
        if KUBERNETES_TYPED.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let empty = Vec::new();
        if field.get("properties").is_some() {
            let req = field["required"].as_array().unwrap_or(&empty);
            rows(field, &format!("{path}."), req, out);
        } else if field["items"].get("properties").is_some() {
            let items = &field["items"];
            let req = items["required"].as_array().unwrap_or(&empty);
            rows(items, &format!("{path}[]."), req, out);
        }
    }
}

fn generated_table() -> String {
    let crd: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("crds/uploadfarm.yaml")).unwrap(),
    )
    .unwrap();
    let version = &crd["spec"]["versions"][0];
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(
        spec["properties"].is_object(),
        "no spec properties in the CRD"
    );
    let mut out = vec![
        format!(
            "`apiVersion: {}/{}`, `kind: {}`; every field is under `spec`.",
            crd["spec"]["group"].as_str().unwrap(),
            version["name"].as_str().unwrap(),
            crd["spec"]["names"]["kind"].as_str().unwrap()
        ),
        String::new(),
        "| field | type | default | description |".into(),
        "|---|---|---|---|".into(),
    ];
    let empty = Vec::new();
    rows(
        spec,
        "",
        spec["required"].as_array().unwrap_or(&empty),
        &mut out,
    );
    out.join("\n")
}

#[test]
fn the_readme_lists_every_uploadfarm_field_as_the_crd_has_it() {
    let table = generated_table();
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (Some(start), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("README.md has no generated UploadFarm field table (the markers {BEGIN} ... {END})");
    };
    let current = readme[start + BEGIN.len()..end].trim_matches('\n');
    if current == table {
        return;
    }
    if std::env::var_os("BITSFARM_BLESS").is_some() {
        let updated = format!("{}{BEGIN}\n{table}\n{}", &readme[..start], &readme[end..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    let missing: Vec<&str> = table
        .lines()
        .filter(|l| !current.lines().any(|c| c == *l))
        .collect();
    panic!(
        "README.md's UploadFarm field table is stale; run `BITSFARM_BLESS=1 cargo test --test \
         chart_readme`. Rows missing or different:\n{}",
        missing.join("\n")
    );
}

/// Sanity of the generator itself: every spec field of the CRD has a row.
#[test]
fn the_generated_table_has_a_row_for_every_top_level_field() {
    let table = generated_table();
    for field in [
        "replicas",
        "image",
        "hostIds.template",
        "hostIds.serviceType",
        "directories[].backend.url",
        "storage.size",
        "affinity",
        "networkPolicy.ingressFrom",
        "security.tokensSecretName",
    ] {
        assert!(
            table.contains(&format!("| `{field}` |")),
            "no row for {field}"
        );
    }
    assert!(!table.contains("affinity.nodeAffinity"));
    assert!(!table.contains("networkPolicy.ingressFrom[]."));
}
