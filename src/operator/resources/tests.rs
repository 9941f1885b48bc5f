use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::*;

pub(crate) fn farm_with(name: &str, spec: serde_json::Value) -> UploadFarm {
    let mut f: UploadFarm = serde_json::from_value(json!({
        "apiVersion": "bitsfarm.io/v1alpha1",
        "kind": "UploadFarm",
        "metadata": {"name": name, "namespace": "uploads", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }))
    .expect("test farm deserializes");
    f.metadata.generation = Some(1);
    f
}

fn opts() -> BuildOptions {
    BuildOptions {
        default_image: "bitsfarm:test".into(),
        pvc_retention_policy: false,
    }
}

fn pod_spec(sts: &StatefulSet) -> PodSpec {
    sts.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn container(sts: &StatefulSet) -> Container {
    pod_spec(sts).containers[0].clone()
}

#[test]
fn children_are_named_labelled_and_owned() {
    let f = farm_with("farm", json!({"replicas": 3}));
    let c = children(&f, &opts()).unwrap();
    assert_eq!(c.config_map.metadata.name.as_deref(), Some("farm-config"));
    assert_eq!(
        c.headless_service.metadata.name.as_deref(),
        Some("farm-headless")
    );
    assert_eq!(c.stateful_set.metadata.name.as_deref(), Some("farm"));
    assert_eq!(c.shared_service.metadata.name.as_deref(), Some("farm"));
    let hosts: Vec<_> = c.host_services.iter().map(|s| s.name_any()).collect();
    assert_eq!(hosts, ["farm-0", "farm-1", "farm-2"]);
    for meta in [
        &c.config_map.metadata,
        &c.headless_service.metadata,
        &c.stateful_set.metadata,
        &c.shared_service.metadata,
        &c.host_services[2].metadata,
    ] {
        assert_eq!(meta.namespace.as_deref(), Some("uploads"));
        let l = meta.labels.as_ref().unwrap();
        assert_eq!(l["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(l["app.kubernetes.io/instance"], "farm");
        assert_eq!(l["app.kubernetes.io/name"], "bitsfarm");
        let o = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
            ("UploadFarm", "farm", "uid-1")
        );
        assert_eq!(o.controller, Some(true));
    }
}

#[test]
fn render_without_uid_has_no_owner_reference() {
    let mut f = farm_with("farm", json!({}));
    f.metadata.uid = None;
    let c = children(&f, &opts()).unwrap();
    assert!(c.stateful_set.metadata.owner_references.is_none());
}

#[test]
fn headless_service_governs_the_statefulset_and_publishes_not_ready_pods() {
    let f = farm_with("farm", json!({}));
    let c = children(&f, &opts()).unwrap();
    let spec = c.headless_service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(
        c.stateful_set.spec.unwrap().service_name.as_deref(),
        Some("farm-headless")
    );
}

#[test]
fn per_pod_services_select_their_pod_and_carry_type_and_annotations() {
    let f = farm_with(
        "farm",
        json!({"replicas": 2, "service": {"port": 8443},
               "hostIds": {"serviceType": "LoadBalancer", "template": "up{ordinal}.x",
                           "serviceAnnotations": {"dns": "up{ordinal}.x", "pod": "{pod}"}}}),
    );
    let svc = host_service(&f, 1);
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"],
        "farm-1"
    );
    assert_eq!(spec.ports.as_ref().unwrap()[0].port, 8443);
    let a = svc.metadata.annotations.as_ref().unwrap();
    assert_eq!((a["dns"].as_str(), a["pod"].as_str()), ("up1.x", "farm-1"));
    assert_eq!(svc.labels()[ORDINAL_LABEL], "1");
    // 8443 is not http's port: the host id says it, or clients would knock on port 80.
    assert_eq!(host_id(&f, 1), "up1.x:8443");
}

#[test]
fn shared_service_selects_every_pod() {
    let f = farm_with(
        "farm",
        json!({"service": {"type": "NodePort", "annotations": {"a": "b"}}}),
    );
    let svc = shared_service(&f);
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.selector.unwrap(), selector_labels("farm"));
    assert_eq!(spec.ports.unwrap()[0].port, 80);
    assert_eq!(svc.metadata.annotations.unwrap()["a"], "b");
    assert_eq!(shared_address(&f), "farm.uploads.svc.cluster.local:80");
}

#[test]
fn statefulset_runs_the_server_with_its_config_probes_and_restricted_security() {
    let f = farm_with("farm", json!({"replicas": 3, "podAnnotations": {"x": "y"}}));
    let c = children(&f, &opts()).unwrap();
    let sts = &c.stateful_set;
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.selector.match_labels.as_ref().unwrap(),
        &selector_labels("farm")
    );
    let tmpl = spec.template.metadata.as_ref().unwrap();
    assert_eq!(
        tmpl.annotations.as_ref().unwrap()[CONFIG_HASH_ANNOTATION],
        c.config_hash
    );
    assert_eq!(tmpl.annotations.as_ref().unwrap()["x"], "y");
    let ct = container(sts);
    assert_eq!(ct.image.as_deref(), Some("bitsfarm:test"));
    assert_eq!(
        ct.args.as_ref().unwrap()[2..],
        ["serve", "--config", "/etc/bitsfarm/config.yaml"]
    );
    let env: Vec<_> = ct
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.value_from
                    .as_ref()
                    .unwrap()
                    .field_ref
                    .as_ref()
                    .unwrap()
                    .field_path
                    .clone(),
            )
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME".to_string(), "metadata.name".to_string()),
            (
                "POD_NAMESPACE".to_string(),
                "metadata.namespace".to_string()
            )
        ]
    );
    assert_eq!(
        ct.readiness_probe
            .unwrap()
            .http_get
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        ct.liveness_probe.unwrap().http_get.unwrap().path.as_deref(),
        Some("/healthz")
    );
    let sc = ct.security_context.unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let psc = spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let vct = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        vct.spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "1Gi"
    );
    assert!(spec.persistent_volume_claim_retention_policy.is_none());
}

#[test]
fn empty_dir_only_when_asked_and_retention_only_on_new_servers() {
    let f = farm_with("farm", json!({"storage": {"emptyDir": true}}));
    let sts = stateful_set(&f, "h", 1, &opts());
    let spec = sts.spec.unwrap();
    assert!(spec.volume_claim_templates.is_none());
    assert!(
        spec.template
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .iter()
            .any(|v| v.empty_dir.is_some())
    );
    let f = farm_with("farm", json!({"storage": {"storageClassName": "fast"}}));
    let new = BuildOptions {
        pvc_retention_policy: true,
        ..opts()
    };
    let spec = stateful_set(&f, "h", 1, &new).spec.unwrap();
    assert_eq!(
        spec.persistent_volume_claim_retention_policy
            .unwrap()
            .when_deleted
            .as_deref(),
        Some("Delete")
    );
    assert_eq!(
        spec.volume_claim_templates.unwrap()[0]
            .spec
            .as_ref()
            .unwrap()
            .storage_class_name
            .as_deref(),
        Some("fast")
    );
}

#[test]
fn scheduling_knobs_and_image_reach_the_pods() {
    let f = farm_with(
        "farm",
        json!({
            "image": "registry/bitsfarm:1", "imagePullPolicy": "Always",
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "resources": {"requests": {"cpu": "100m"}},
            "affinity": {"podAntiAffinity": {}},
        }),
    );
    let sts = stateful_set(&f, "h", 1, &opts());
    let pod = sts.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.node_selector.unwrap()["disk"], "ssd");
    assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("k"));
    assert!(pod.affinity.is_some());
    let ct = container(&sts);
    assert_eq!(ct.image.as_deref(), Some("registry/bitsfarm:1"));
    assert_eq!(ct.image_pull_policy.as_deref(), Some("Always"));
    assert!(ct.resources.is_some());
}

#[test]
fn immutable_statefulset_fields_depend_on_the_name_only() {
    let a = stateful_set(&farm_with("farm", json!({"replicas": 1})), "h1", 1, &opts());
    let b = stateful_set(
        &farm_with(
            "farm",
            json!({"replicas": 5, "backend": {"url": "http://x", "notification": "ByValue"}}),
        ),
        "h2",
        5,
        &opts(),
    );
    let (a, b) = (a.spec.unwrap(), b.spec.unwrap());
    assert_eq!(a.selector, b.selector);
    assert_eq!(a.service_name, b.service_name);
    assert_eq!(a.pod_management_policy, b.pod_management_policy);
    assert_eq!(a.volume_claim_templates, b.volume_claim_templates);
}

#[test]
fn a_changed_backend_changes_the_config_hash() {
    let a = children(&farm_with("farm", json!({})), &opts()).unwrap();
    let b = children(
        &farm_with(
            "farm",
            json!({"backend": {"url": "http://x", "notification": "ByValue"}}),
        ),
        &opts(),
    )
    .unwrap();
    assert_ne!(a.config_hash, b.config_hash);
    let again = children(&farm_with("farm", json!({})), &opts()).unwrap();
    assert_eq!(a.config_hash, again.config_hash);
    // Scaling does not touch the configuration, so it does not roll the pods.
    let scaled = children(&farm_with("farm", json!({"replicas": 7})), &opts()).unwrap();
    assert_eq!(a.config_hash, scaled.config_hash);
}

#[test]
fn an_invalid_spec_builds_nothing() {
    let f = farm_with("farm", json!({"backend": {"notification": "ByValue"}}));
    let e = children(&f, &opts()).unwrap_err();
    assert!(e.to_string().contains("spec.backend.url"), "{e}");
}

#[test]
fn volume_claim_templates_are_applied_as_the_api_server_stores_them() {
    // volumeClaimTemplates is an atomic list for server-side apply: anything that differs from
    // the stored template (defaults, a null creationTimestamp) turns each re-apply into a write.
    let f = farm_with("farm", json!({}));
    let sts = stateful_set(&f, "h", 1, &opts());
    let body = stateful_set_apply_body(&sts).unwrap();
    let t = &body["spec"]["volumeClaimTemplates"][0];
    assert!(t["metadata"]["creationTimestamp"].is_null());
    assert!(
        t["metadata"]
            .as_object()
            .unwrap()
            .contains_key("creationTimestamp")
    );
    assert_eq!(t["spec"]["volumeMode"], "Filesystem");
    assert_eq!(t["status"]["phase"], "Pending");
    assert_eq!(t["apiVersion"], "v1");
    assert_eq!(t["kind"], "PersistentVolumeClaim");
    // Nothing else changes, and the emptyDir form has no templates to touch.
    let mut plain = serde_json::to_value(&sts).unwrap();
    plain["spec"]["volumeClaimTemplates"][0]["metadata"]["creationTimestamp"] =
        serde_json::Value::Null;
    assert_eq!(body, plain);
    let e = stateful_set(
        &farm_with("farm", json!({"storage": {"emptyDir": true}})),
        "h",
        1,
        &opts(),
    );
    assert_eq!(
        stateful_set_apply_body(&e).unwrap(),
        serde_json::to_value(&e).unwrap()
    );
}

#[test]
fn names_that_cannot_name_services_build_nothing() {
    // The CRD's CEL rule says the same; API servers before 1.25 drop it.
    for bad in [
        "l".repeat(MAX_NAME_LEN + 1).as_str(),
        "9lives",
        "ends-",
        "has.dot",
        "Upper",
    ] {
        let e = children(&farm_with(bad, json!({})), &opts()).expect_err(bad);
        assert!(e.0.contains("metadata.name"), "{bad}: {e}");
    }
    for good in ["a", "uploads", "crash-reports-2", &"l".repeat(MAX_NAME_LEN)] {
        children(&farm_with(good, json!({})), &opts()).expect(good);
    }
}

#[test]
fn stopping_pods_drain_for_the_drain_timeout_then_the_fallback_timeout() {
    let pre_stop = |f: &UploadFarm| {
        let sts = children(f, &opts()).unwrap().stateful_set;
        let grace = pod_spec(&sts).termination_grace_period_seconds;
        let cmd = container(&sts)
            .lifecycle
            .and_then(|l| l.pre_stop)
            .and_then(|h| h.exec)
            .and_then(|e| e.command)
            .unwrap();
        (cmd, grace)
    };
    let f = farm_with("farm", json!({"hostIds": {"fallbackTimeoutSeconds": 110}}));
    let (cmd, grace) = pre_stop(&f);
    assert_eq!(
        cmd,
        [
            "bitsfarm",
            "drain",
            "--admin",
            "127.0.0.1:8081",
            "--wait",
            "110"
        ]
    );
    assert_eq!(
        grace,
        Some(140),
        "the drain plus the server's 30 s shutdown grace"
    );
    let f = farm_with("farm", json!({"drainTimeoutSeconds": 600}));
    let (cmd, grace) = pre_stop(&f);
    assert_eq!(cmd.last().map(String::as_str), Some("600"));
    assert_eq!(grace, Some(630));
}

#[test]
fn members_reach_each_other_for_handoff_and_draining_members_stay_addressable() {
    let f = farm_with("web", json!({"replicas": 3}));
    let (yaml, _) = config_yaml(&f).unwrap();
    let file = crate::config::ConfigFile::parse(&yaml).unwrap();
    let h = file.handoff.expect("handoff is configured");
    assert_eq!(
        h.peer_url_template.as_deref(),
        Some("http://web-{ordinal}.web-headless.{namespace}.svc:8080")
    );
    assert_eq!(
        h.secret_file,
        std::path::Path::new("/var/run/secrets/bitsfarm/handoff/secret")
    );
    assert_eq!(h.ca_file, None);
    assert_eq!(file.admin_listen, Some("0.0.0.0:8081".parse().unwrap()));
    // Each pod's Service keeps a draining (not ready) pod's address.
    let svc = host_service(&f, 2);
    assert_eq!(svc.spec.unwrap().publish_not_ready_addresses, Some(true));
    // The secret builder carries the key and the owner.
    let s = handoff_secret(&f, "ab");
    assert_eq!(s.metadata.name.as_deref(), Some("web-handoff"));
    assert_eq!(s.string_data.unwrap()["secret"], "ab");
    assert!(s.metadata.owner_references.is_some());
}

fn secret_mounts(sts: &StatefulSet) -> Vec<(String, String)> {
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let ct = &pod.containers[0];
    pod.volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let secret = v.secret.as_ref()?.secret_name.clone()?;
            let mount = ct
                .volume_mounts
                .as_ref()?
                .iter()
                .find(|m| m.name == v.name && m.read_only == Some(true))?;
            Some((secret, mount.mount_path.clone()))
        })
        .collect()
}

#[test]
fn bearer_tokens_come_from_their_own_secret() {
    let f = farm_with(
        "farm",
        json!({"security": {"authSecretName": "users", "tokensSecretName": "tokens"}}),
    );
    let file = crate::config::ConfigFile::parse(&config_yaml(&f).unwrap().0).unwrap();
    assert_eq!(
        file.tokens_file.as_deref(),
        Some(std::path::Path::new(
            "/var/run/secrets/bitsfarm/tokens/tokens"
        ))
    );
    assert_eq!(
        file.users_file.as_deref(),
        Some(std::path::Path::new("/var/run/secrets/bitsfarm/auth/users"))
    );
    let mounts = secret_mounts(&stateful_set(&f, "h", 1, &opts()));
    assert!(
        mounts.contains(&("tokens".into(), "/var/run/secrets/bitsfarm/tokens".into())),
        "{mounts:?}"
    );
    assert!(mounts.contains(&("users".into(), "/var/run/secrets/bitsfarm/auth".into())));

    // Tokens alone: no users file, and one Secret may hold both keys.
    let f = farm_with("farm", json!({"security": {"tokensSecretName": "creds"}}));
    let file = crate::config::ConfigFile::parse(&config_yaml(&f).unwrap().0).unwrap();
    assert!(file.users_file.is_none() && file.tokens_file.is_some());
    let f = farm_with(
        "farm",
        json!({"security": {"authSecretName": "creds", "tokensSecretName": "creds"}}),
    );
    let mounts = secret_mounts(&stateful_set(&f, "h", 1, &opts()));
    assert_eq!(
        mounts.iter().filter(|(s, _)| s == "creds").count(),
        2,
        "{mounts:?}"
    );
    // Without the field, no tokens file: the server would refuse to start without the file.
    let f = farm_with("farm", json!({"security": {"authSecretName": "users"}}));
    let file = crate::config::ConfigFile::parse(&config_yaml(&f).unwrap().0).unwrap();
    assert!(file.tokens_file.is_none());
    assert!(
        !secret_mounts(&stateful_set(&f, "h", 1, &opts()))
            .iter()
            .any(|(_, m)| m.ends_with("/tokens"))
    );
}

fn port_names(svc: &Service) -> Vec<(String, i32, String)> {
    svc.spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            let target = match p.target_port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
                other => panic!("target port by number: {other:?}"),
            };
            (p.name.clone().unwrap(), p.port, target)
        })
        .collect()
}

#[test]
fn with_tls_every_address_is_https_on_443_unless_told_otherwise() {
    let tls = json!({"tlsSecretName": "farm-tls"});
    let f = farm_with("farm", json!({"replicas": 2, "security": tls}));
    let c = children(&f, &opts()).unwrap();
    let https = || ("https".to_string(), 443, "https".to_string());
    assert_eq!(port_names(&c.shared_service), [https()]);
    for svc in &c.host_services {
        assert_eq!(port_names(svc), [https()], "{}", svc.name_any());
    }
    assert_eq!(
        port_names(&c.headless_service),
        [("https".to_string(), 8080, "https".to_string())]
    );
    // The Services' target port names the container's upload port.
    let ports = container(&c.stateful_set).ports.unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("https") && p.container_port == 8080),
        "{ports:?}"
    );
    assert!(!ports.iter().any(|p| p.name.as_deref() == Some("http")));
    // 443 is https's own port: the host id needs none.
    let file = crate::config::ConfigFile::parse(&config_yaml(&f).unwrap().0).unwrap();
    assert_eq!(
        file.host_id.as_deref(),
        Some("{pod}.{namespace}.svc.cluster.local")
    );
    assert_eq!(host_id(&f, 1), "farm-1.uploads.svc.cluster.local");
    assert_eq!(shared_address(&f), "farm.uploads.svc.cluster.local:443");
    assert_eq!(shared_url(&f), "https://farm.uploads.svc.cluster.local");

    // A chosen port: every Service listens there and every host id carries it.
    let f = farm_with(
        "farm",
        json!({"replicas": 2, "security": tls, "service": {"port": 8443},
               "hostIds": {"template": "up{ordinal}.example.com"}}),
    );
    let c = children(&f, &opts()).unwrap();
    assert_eq!(port_names(&c.shared_service)[0].1, 8443);
    assert_eq!(port_names(&c.host_services[1])[0].1, 8443);
    let file =
        crate::config::ConfigFile::parse(&c.config_map.data.as_ref().unwrap()["config.yaml"])
            .unwrap();
    assert_eq!(
        file.host_id.as_deref(),
        Some("up{ordinal}.example.com:8443")
    );
    assert_eq!(host_id(&f, 1), "up1.example.com:8443");
    assert_eq!(
        shared_url(&f),
        "https://farm.uploads.svc.cluster.local:8443"
    );

    // Port 80 with TLS is not https's default either.
    let f = farm_with("farm", json!({"security": tls, "service": {"port": 80}}));
    assert_eq!(host_id(&f, 0), "farm-0.uploads.svc.cluster.local:80");

    // A template that names its own port is used as written (a proxy in front, a NodePort).
    for template in ["up{ordinal}.example.com:443", "[fd00::{ordinal}]:9443"] {
        let f = farm_with(
            "farm",
            json!({"security": tls, "service": {"port": 8443}, "hostIds": {"template": template}}),
        );
        assert_eq!(f.spec.host_id_template(), template);
    }
    let f = farm_with(
        "farm",
        json!({"security": tls, "service": {"port": 8443}, "hostIds": {"template": "[fd00::{ordinal}]"}}),
    );
    assert_eq!(f.spec.host_id_template(), "[fd00::{ordinal}]:8443");
}

#[test]
fn without_tls_addresses_stay_plain_http_on_80() {
    let f = farm_with("farm", json!({"replicas": 1}));
    let c = children(&f, &opts()).unwrap();
    let http = || ("http".to_string(), 80, "http".to_string());
    assert_eq!(port_names(&c.shared_service), [http()]);
    assert_eq!(port_names(&c.host_services[0]), [http()]);
    assert!(
        container(&c.stateful_set)
            .ports
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("http") && p.container_port == 8080)
    );
    assert_eq!(host_id(&f, 0), "farm-0.uploads.svc.cluster.local");
    assert_eq!(shared_url(&f), "http://farm.uploads.svc.cluster.local");
    // The default network policy is none.
    assert!(c.network_policy.is_none());
    let on = farm_with("farm", json!({"networkPolicy": {"enabled": true}}));
    let values = children(&on, &opts()).unwrap().to_values().unwrap();
    let kinds: Vec<_> = values.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[..4],
        ["ConfigMap", "Service", "NetworkPolicy", "StatefulSet"],
        "the policy is rendered, before the pods"
    );
}

#[test]
fn a_scale_down_under_way_keeps_the_draining_servers_and_their_services() {
    let f = farm_with("farm", json!({"replicas": 1}));
    let checked = check(&f).unwrap();
    let draining = checked.children(&opts(), 3);
    assert_eq!(
        draining.stateful_set.spec.as_ref().unwrap().replicas,
        Some(3)
    );
    let hosts: Vec<_> = draining
        .host_services
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(hosts, ["farm-0", "farm-1", "farm-2"]);
    assert_eq!(
        draining.service_names(),
        ["farm-headless", "farm-0", "farm-1", "farm-2", "farm"]
    );
    // Done draining, or no scale-down at all: the spec's size, never less.
    assert_eq!(checked.children(&opts(), 1), children(&f, &opts()).unwrap());
    assert_eq!(checked.children(&opts(), 0), children(&f, &opts()).unwrap());
    // Only the number of servers differs.
    let done = checked.children(&opts(), 1);
    assert_eq!(draining.config_map, done.config_map);
    assert_eq!(draining.config_hash, done.config_hash);
}

#[test]
fn a_disruption_budget_lets_one_server_go_at_a_time_from_two_servers_on() {
    let f = farm_with("farm", json!({"replicas": 3}));
    let c = children(&f, &opts()).unwrap();
    let pdb = c.disruption_budget.expect("a budget for 3 servers");
    assert_eq!(pdb.metadata.name.as_deref(), Some("farm"));
    let owner = &pdb.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("UploadFarm", "uid-1", Some(true))
    );
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(spec.min_available, None);
    // Exactly the StatefulSet's pods.
    let sts_selector = c
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone();
    assert_eq!(spec.selector.unwrap().match_labels, sts_selector);
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    // Rendered too, last.
    let values = children(&f, &opts()).unwrap().to_values().unwrap();
    assert_eq!(values.last().unwrap()["kind"], "PodDisruptionBudget");
}

#[test]
fn one_server_or_a_budget_turned_off_gets_none_and_a_percentage_is_kept() {
    assert!(disruption_budget(&farm_with("farm", json!({"replicas": 1})), 1).is_none());
    assert!(disruption_budget(&farm_with("farm", json!({"replicas": 0})), 0).is_none());
    let off = farm_with(
        "farm",
        json!({"replicas": 4, "disruptionBudget": {"enabled": false}}),
    );
    assert!(children(&off, &opts()).unwrap().disruption_budget.is_none());
    let pct = farm_with(
        "farm",
        json!({"replicas": 4, "disruptionBudget": {"maxUnavailable": "25%"}}),
    );
    let spec = disruption_budget(&pct, 4).unwrap().spec.unwrap();
    assert_eq!(
        spec.max_unavailable,
        Some(IntOrString::String("25%".into()))
    );
    // A farm scaling down from 3 to 1 keeps its budget until the draining servers are gone.
    let shrinking = farm_with("farm", json!({"replicas": 1}));
    let checked = check(&shrinking).unwrap();
    assert!(checked.children(&opts(), 3).disruption_budget.is_some());
    assert!(checked.children(&opts(), 1).disruption_budget.is_none());
}
