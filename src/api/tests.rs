use kube::core::ObjectMeta;
use serde_json::json;

use super::*;
use crate::config::{NotifyType, ServeArgs, ServerConfig};

fn farm(spec: serde_json::Value) -> UploadFarm {
    serde_json::from_value(json!({
        "apiVersion": "bitsfarm.io/v1alpha1",
        "kind": "UploadFarm",
        "metadata": {"name": "farm", "namespace": "default"},
        "spec": spec,
    }))
    .expect("test farm deserializes")
}

#[test]
fn crd_file_matches_the_generated_crd() {
    let generated = crd_yaml().unwrap();
    let committed = include_str!("../../crds/uploadfarm.yaml");
    assert!(
        generated == committed,
        "crds/uploadfarm.yaml is out of date: run `cargo run -- crd > crds/uploadfarm.yaml`"
    );
}

#[test]
fn crd_has_the_names_subresources_and_columns_kubectl_needs() {
    let crd = UploadFarm::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("uploadfarms.bitsfarm.io")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["uf".to_string()]));
    assert_eq!(
        crd.spec.names.categories,
        Some(vec!["bitsfarm".to_string()])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.priority.unwrap_or(0)))
        .collect();
    assert_eq!(
        cols,
        [
            ("Replicas", 0),
            ("Ready", 0),
            ("Host-IDs", 0),
            ("Age", 0),
            ("URL", 1),
            ("Reason", 1),
            ("Message", 1)
        ]
    );
    let yaml = crd_yaml().unwrap();
    assert!(yaml.contains("x-kubernetes-list-type: map"));
    assert!(yaml.contains("x-kubernetes-list-map-keys:\n"));
}

#[test]
fn every_spec_field_is_documented() {
    let crd = serde_json::to_value(UploadFarm::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    fn walk(path: &str, s: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").is_none() {
                    missing.push(p.clone());
                }
                // k8s-openapi types (affinity, tolerations, resources) document themselves.
                if !["affinity", "tolerations", "resources"].contains(&k.as_str()) {
                    walk(&p, v, missing);
                    if let Some(items) = v.get("items") {
                        walk(&p, items, missing);
                    }
                }
            }
        }
    }
    let mut missing = vec![];
    walk("spec", spec, &mut missing);
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}

#[test]
fn schema_defaults_and_positive_bounds() {
    let crd = serde_json::to_value(UploadFarm::crd()).unwrap();
    let p = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(p["replicas"]["default"], 1);
    assert_eq!(p["uploadPath"]["default"], "/");
    assert_eq!(p["sessionTimeoutSeconds"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(
        p["hostIds"]["properties"]["fallbackTimeoutSeconds"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        p["backend"]["properties"]["timeoutSeconds"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        p["limits"]["properties"]["maxUploadSizeBytes"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        p["hostIds"]["properties"]["template"]["default"],
        DEFAULT_HOST_ID_TEMPLATE
    );
    assert_eq!(p["storage"]["default"]["size"], "1Gi");
    assert!(p["storage"]["properties"]["size"]["pattern"].is_string());
}

#[test]
fn cel_accepts_the_defaults_and_the_examples() {
    assert!(farm(json!({})).validate_cel().is_ok());
    let ok = farm(json!({
        "backend": {"url": "http://app/in", "notification": "ByValue"},
        "directories": [{"path": "/a"}, {"path": "/b", "backend": {"notification": "None"}}],
        "hostIds": {"template": "up{ordinal}.example.com"},
    }));
    ok.validate_cel().unwrap();
}

#[test]
fn cel_requires_a_backend_url_unless_notification_is_none() {
    let e = farm(json!({"backend": {"notification": "ByReference"}}))
        .validate_cel()
        .unwrap_err();
    assert!(e.to_string().contains("backend.url is required"), "{e}");
    let e = farm(
        json!({"directories": [{"path": "/a", "backend": {"notification": "ByValue", "url": ""}}]}),
    )
    .validate_cel()
    .unwrap_err();
    assert!(e.to_string().contains("backend.url is required"), "{e}");
    assert!(
        farm(json!({"backend": {"notification": "None"}}))
            .validate_cel()
            .is_ok()
    );
}

#[test]
fn cel_requires_the_host_id_template_to_name_the_pod() {
    let e = farm(json!({"hostIds": {"template": "uploads.example.com"}}))
        .validate_cel()
        .unwrap_err();
    assert!(e.to_string().contains("{pod} or {ordinal}"), "{e}");
    assert!(
        farm(json!({"hostIds": {"template": "{pod}.x"}}))
            .validate_cel()
            .is_ok()
    );
}

#[test]
fn cel_rejects_duplicate_directory_paths() {
    let e = farm(json!({"directories": [{"path": "/a"}, {"path": "/a"}]}))
        .validate_cel()
        .unwrap_err();
    assert!(e.to_string().contains("same path"), "{e}");
}

#[test]
fn cel_rejects_names_that_cannot_name_services() {
    let mut f = farm(json!({}));
    f.metadata = ObjectMeta {
        name: Some("0farm".into()),
        ..ObjectMeta::default()
    };
    assert!(f.validate_cel().is_err());
    f.metadata.name = Some("a".repeat(53));
    assert!(f.validate_cel().is_err());
    f.metadata.name = Some("a".repeat(52));
    assert!(f.validate_cel().is_ok());
}

#[test]
fn cel_keeps_storage_immutable_but_not_the_rest() {
    let old = farm(json!({"replicas": 3, "storage": {"size": "1Gi"}}));
    let scaled = farm(json!({"replicas": 5, "storage": {"size": "1Gi"}}));
    assert!(scaled.validate_cel_update(&old).is_ok());
    let grown = farm(json!({"replicas": 3, "storage": {"size": "2Gi"}}));
    let e = grown.validate_cel_update(&old).unwrap_err();
    assert!(e.to_string().contains("storage cannot be changed"), "{e}");
    let class =
        farm(json!({"replicas": 3, "storage": {"size": "1Gi", "storageClassName": "fast"}}));
    assert!(class.validate_cel_update(&old).is_err());
}

#[test]
fn server_config_passes_the_servers_own_validation() {
    for spec in [
        json!({}),
        json!({"uploadPath": "/bits", "limits": {"maxUploadSizeBytes": 10, "allowOverwrites": true}}),
        json!({
            "backend": {"url": "http://app/in", "notification": "ByValue", "timeoutSeconds": 9},
            "directories": [
                {"path": "/a"},
                {"path": "/a/b", "backend": {"notification": "None"}},
                {"path": "/a-b", "limits": {"maxUploadSizeBytes": 5}},
            ],
        }),
        json!({
            "security": {"authSecretName": "u", "tokensSecretName": "t", "tlsSecretName": "x"},
            "service": {"port": 8443},
        }),
    ] {
        let f = farm(spec.clone());
        let file = server_config(&f.spec).unwrap();
        // The ConfigMap holds YAML; what the pods parse must be what was built.
        let parsed = crate::config::ConfigFile::parse(&file.to_yaml().unwrap()).unwrap();
        assert_eq!(parsed, file);
        let mut probe = parsed.clone();
        probe.host_id = Some("farm-0.default.svc.cluster.local".into());
        let c = ServerConfig::from_parts(probe, &ServeArgs::default())
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(c.listen.port(), SERVER_PORT);
    }
}

#[test]
fn scheme_and_port_follow_tls_and_reach_the_host_ids() {
    let plain = farm(json!({}));
    assert_eq!(
        (plain.spec.scheme(), plain.spec.service_port()),
        ("http", 80)
    );
    let tls = farm(json!({"security": {"tlsSecretName": "t"}}));
    assert_eq!((tls.spec.scheme(), tls.spec.service_port()), ("https", 443));
    assert_eq!(
        server_config(&tls.spec).unwrap().host_id.as_deref(),
        Some(DEFAULT_HOST_ID_TEMPLATE),
        "443 is https's own port"
    );
    // A port chosen by the user stays, and goes into the host id when it is not the scheme's.
    for (spec, host_id) in [
        (
            json!({"service": {"port": 80}}),
            DEFAULT_HOST_ID_TEMPLATE.to_string(),
        ),
        (
            json!({"service": {"port": 8080}}),
            format!("{DEFAULT_HOST_ID_TEMPLATE}:8080"),
        ),
        (
            json!({"service": {"port": 443}}),
            format!("{DEFAULT_HOST_ID_TEMPLATE}:443"),
        ),
        (
            json!({"service": {"port": 443}, "security": {"tlsSecretName": "t"}}),
            DEFAULT_HOST_ID_TEMPLATE.to_string(),
        ),
        (
            json!({"service": {"port": 8443}, "hostIds": {"template": "up{ordinal}.x:9000"}}),
            "up{ordinal}.x:9000".to_string(),
        ),
    ] {
        let f = farm(spec.clone());
        assert_eq!(
            server_config(&f.spec).unwrap().host_id,
            Some(host_id),
            "{spec}"
        );
    }
    // The stored form leaves an unset port out, so the scheme decides it later.
    let v = serde_json::to_value(&plain.spec).unwrap();
    assert_eq!(v["service"]["port"], serde_json::Value::Null, "{v}");
}

#[test]
fn server_config_maps_backends_limits_and_directories() {
    let f = farm(json!({
        "sessionTimeoutSeconds": 60,
        "backend": {"url": "http://app/in", "notification": "ByValue"},
        "limits": {"maxUploadSizeBytes": 100},
        "hostIds": {"fallbackTimeoutSeconds": 30},
        "directories": [
            {"path": "/a"},
            {"path": "/b", "backend": {"notification": "None"}, "limits": {"allowOverwrites": true}},
        ],
    }));
    let file = server_config(&f.spec).unwrap();
    assert_eq!(file.host_id.as_deref(), Some(DEFAULT_HOST_ID_TEMPLATE));
    assert_eq!(file.host_id_fallback_timeout, Some(30));
    assert_eq!(file.session_timeout, Some(60));
    assert_eq!(file.notify_type, Some(NotifyType::ByValue));
    assert_eq!(file.max_upload_size, Some(100));
    assert_eq!(file.directories.len(), 2);
    // /a inherits the farm's backend; /b replaces it whole.
    assert_eq!(file.directories[0].notify_type, None);
    assert_eq!(file.directories[1].notify_type, Some(NotifyType::None));
    assert_eq!(file.directories[1].allow_overwrites, Some(true));
    assert_ne!(file.directories[0].data_dir, file.directories[1].data_dir);
    // An empty URL is what keeps /b from inheriting the farm's; the top level writes none.
    assert_eq!(file.notify_url.as_deref(), Some("http://app/in"));
    assert_eq!(file.directories[0].notify_url, None);
    assert_eq!(file.directories[1].notify_url.as_deref(), Some(""));
    let quiet = farm(json!({"backend": {"notification": "None"}}));
    let quiet = server_config(&quiet.spec).unwrap();
    assert_eq!(quiet.notify_type, Some(NotifyType::None));
    assert_eq!(quiet.notify_url, None);
    let c = ServerConfig::from_parts(
        {
            let mut p = file.clone();
            p.host_id = None;
            p
        },
        &ServeArgs::default(),
    )
    .unwrap();
    assert_eq!(c.directories[0].notify_type, NotifyType::ByValue);
    assert_eq!(c.directories[1].notify_type, NotifyType::None);
    assert_eq!(c.directories[1].max_upload_size, Some(100));
    assert_eq!(c.directories[1].notify_url, None);
}

#[test]
fn server_config_rejects_what_cel_would_with_actionable_messages() {
    // On API servers without CEL (before 1.25) the operator is the only check.
    let cases = [
        (
            json!({"backend": {"notification": "ByValue"}}),
            "spec.backend.url is required",
        ),
        (
            json!({"hostIds": {"template": "fixed.example"}}),
            "{pod} or {ordinal}",
        ),
        (
            json!({"hostIds": {"template": "{pod}.{zone}"}}),
            "unknown placeholder",
        ),
        (
            json!({"sessionTimeoutSeconds": 0}),
            "spec.sessionTimeoutSeconds",
        ),
        (
            json!({"limits": {"maxUploadSizeBytes": -1}}),
            "maxUploadSizeBytes",
        ),
        (json!({"replicas": -1}), "spec.replicas"),
        (
            json!({"directories": [{"path": "/a"}, {"path": "/a/"}]}),
            "two directories",
        ),
        (json!({"uploadPath": "up"}), ""),
    ];
    for (spec, needle) in cases {
        let e = server_config(&farm(spec.clone()).spec).expect_err(&spec.to_string());
        assert!(e.to_string().contains(needle), "{spec}: {e}");
    }
}

#[test]
fn cel_refuses_a_disruption_budget_that_would_block_every_drain() {
    for bad in [
        json!(0),
        json!("0%"),
        json!("101%"),
        json!("one"),
        json!(-1),
    ] {
        let e = farm(json!({"replicas": 3, "disruptionBudget": {"maxUnavailable": bad}}))
            .validate_cel()
            .unwrap_err();
        assert!(
            e.to_string().contains("maxUnavailable must be at least 1"),
            "{bad}: {e}"
        );
    }
    for good in [json!(1), json!(2), json!("25%"), json!("100%")] {
        farm(json!({"replicas": 3, "disruptionBudget": {"maxUnavailable": good}}))
            .validate_cel()
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    // Off, or left out: valid, and the budget is on by default.
    assert!(
        farm(json!({"disruptionBudget": {"enabled": false}}))
            .validate_cel()
            .is_ok()
    );
    let f = farm(json!({"disruptionBudget": {}}));
    assert!(f.spec.disruption_budget.is_some_and(|b| b.enabled));
}
