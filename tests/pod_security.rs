//! The Pod Security Standards "restricted" profile (plus "baseline", which it includes), checked
//! over rendered objects: the farm StatefulSet of every example UploadFarm (`bitsfarm render`), and
//! the operator Deployment of the Helm chart when scripts/test rendered it
//! (`BITSFARM_CHART_RENDERED`). Farm pods must also not mount a service account token.
//!
//! The rules are those of <https://kubernetes.io/docs/concepts/security/pod-security-standards/>
//! (v1.33): host namespaces, privileged, capabilities, hostPath, host ports, AppArmor, SELinux,
//! /proc mount, seccomp, sysctls; volume types, privilege escalation, running as non-root,
//! runAsUser != 0, seccomp RuntimeDefault/Localhost, drop ALL capabilities.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Every violation of the restricted profile in one pod spec, as readable strings.
fn restricted_violations(spec: &Value) -> Vec<String> {
    let mut v = Vec::new();
    let psc = &spec["securityContext"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == Value::Bool(true) {
            v.push(format!("{host} is true"));
        }
    }
    // Volumes: only these types.
    const ALLOWED: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        for key in vol.as_object().unwrap().keys() {
            if key != "name" && !ALLOWED.contains(&key.as_str()) {
                v.push(format!("volume {} uses {key}", vol["name"]));
            }
        }
    }
    for s in psc["sysctls"].as_array().into_iter().flatten() {
        const SAFE: [&str; 8] = [
            "kernel.shm_rmid_forced",
            "net.ipv4.ip_local_port_range",
            "net.ipv4.ip_unprivileged_port_start",
            "net.ipv4.tcp_syncookies",
            "net.ipv4.ping_group_range",
            "net.ipv4.ip_local_reserved_ports",
            "net.ipv4.tcp_keepalive_time",
            "net.ipv4.tcp_fin_timeout",
        ];
        if !SAFE.contains(&s["name"].as_str().unwrap_or("")) {
            v.push(format!("unsafe sysctl {}", s["name"]));
        }
    }
    check_selinux(&psc["seLinuxOptions"], "pod", &mut v);
    check_apparmor(&psc["appArmorProfile"], "pod", &mut v);
    if psc["runAsUser"] == 0 {
        v.push("pod runAsUser is 0".into());
    }
    let pod_non_root = psc["runAsNonRoot"] == Value::Bool(true);
    let pod_seccomp = seccomp_ok(&psc["seccompProfile"]);
    if !psc["seccompProfile"].is_null() && !pod_seccomp {
        v.push(format!("pod seccompProfile {}", psc["seccompProfile"]));
    }
    let containers = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten());
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == Value::Bool(true) {
            v.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
            v.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let non_root = match &sc["runAsNonRoot"] {
            Value::Bool(b) => *b,
            _ => pod_non_root,
        };
        if !non_root {
            v.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc["runAsUser"] == 0 {
            v.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = if sc["seccompProfile"].is_null() {
            pod_seccomp
        } else {
            seccomp_ok(&sc["seccompProfile"])
        };
        if !seccomp {
            v.push(format!(
                "{name}: seccompProfile is not RuntimeDefault or Localhost"
            ));
        }
        let caps = &sc["capabilities"];
        let drops_all = caps["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL"));
        if !drops_all {
            v.push(format!("{name}: capabilities do not drop ALL"));
        }
        for add in caps["add"].as_array().into_iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                v.push(format!("{name}: adds capability {add}"));
            }
        }
        if !sc["procMount"].is_null() && sc["procMount"] != "Default" {
            v.push(format!("{name}: procMount {}", sc["procMount"]));
        }
        check_selinux(&sc["seLinuxOptions"], name, &mut v);
        check_apparmor(&sc["appArmorProfile"], name, &mut v);
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["hostPort"].as_u64().is_some_and(|n| n != 0) {
                v.push(format!("{name}: hostPort {}", p["hostPort"]));
            }
        }
    }
    v
}

fn seccomp_ok(p: &Value) -> bool {
    matches!(p["type"].as_str(), Some("RuntimeDefault" | "Localhost"))
}

fn check_selinux(o: &Value, who: &str, v: &mut Vec<String>) {
    if o.is_null() {
        return;
    }
    if let Some(t) = o["type"].as_str()
        && ![
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ]
        .contains(&t)
    {
        v.push(format!("{who}: seLinuxOptions.type {t}"));
    }
    for k in ["user", "role"] {
        if o[k].as_str().is_some_and(|s| !s.is_empty()) {
            v.push(format!("{who}: seLinuxOptions.{k} is set"));
        }
    }
}

fn check_apparmor(p: &Value, who: &str, v: &mut Vec<String>) {
    if !p.is_null() && !matches!(p["type"].as_str(), Some("RuntimeDefault" | "Localhost")) {
        v.push(format!("{who}: appArmorProfile {p}"));
    }
}

/// The documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in yaml.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            if !cur.trim().is_empty() {
                docs.push(serde_saphyr::from_str::<Value>(&cur).expect("a YAML document"));
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs
}

#[test]
fn the_checker_catches_what_the_profile_forbids() {
    let bad: Value = serde_json::json!({
        "hostNetwork": true,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]}}}]
    });
    let v = restricted_violations(&bad);
    for needle in [
        "hostNetwork",
        "hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "drop ALL",
        "SYS_ADMIN",
        "hostPort",
    ] {
        assert!(
            v.iter().any(|m| m.contains(needle)),
            "{needle} not caught: {v:?}"
        );
    }
}

#[test]
fn farm_pods_of_every_example_pass_the_restricted_profile_without_a_token() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml")
            || !std::fs::read_to_string(&path)
                .unwrap()
                .contains("kind: UploadFarm")
        {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
            .args(["render", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for doc in documents(&String::from_utf8(out.stdout).unwrap()) {
            if !matches!(
                doc["kind"].as_str(),
                Some("StatefulSet" | "Deployment" | "Pod")
            ) {
                continue;
            }
            let spec = &doc["spec"]["template"]["spec"];
            let v = restricted_violations(spec);
            assert!(
                v.is_empty(),
                "{}: {}: {v:#?}",
                path.display(),
                doc["metadata"]["name"]
            );
            assert_eq!(
                spec["automountServiceAccountToken"],
                Value::Bool(false),
                "{}: farm pods must not mount a service account token",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} farm pod templates checked");
}

#[test]
fn the_operator_deployment_passes_the_restricted_profile() {
    let Some(rendered) = std::env::var_os("BITSFARM_CHART_RENDERED") else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_operator_deployment_passes_the_restricted_profile: \
             BITSFARM_CHART_RENDERED is not set (scripts/test renders the chart and sets it)"
        );
        return;
    };
    let mut checked = 0;
    let mut stack = vec![std::path::PathBuf::from(rendered)];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if p.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in documents(&std::fs::read_to_string(&p).unwrap()) {
            if doc["kind"] != "Deployment" {
                continue;
            }
            let v = restricted_violations(&doc["spec"]["template"]["spec"]);
            assert!(v.is_empty(), "{}: {v:#?}", p.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 1,
        "no operator Deployment among the rendered chart files"
    );
}

#[test]
fn secrets_named_in_the_spec_are_mounted_and_used_and_pods_stay_restricted() {
    let dir = tempfile::tempdir().unwrap();
    let farm = dir.path().join("farm.yaml");
    std::fs::write(
        &farm,
        "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: secure\n  namespace: uploads\nspec:\n  replicas: 2\n  backend:\n    url: https://backend.example/in\n    notification: ByValue\n  security:\n    authSecretName: farm-users\n    tokensSecretName: farm-tokens\n    tlsSecretName: farm-tls\n    backendCredentialsSecretName: backend-token\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(["render", "-f"])
        .arg(&farm)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["config.yaml"].as_str())
        .expect("the ConfigMap");
    for line in [
        "users-file: /var/run/secrets/bitsfarm/auth/users",
        "tokens-file: /var/run/secrets/bitsfarm/tokens/tokens",
        "tls-cert: /var/run/secrets/bitsfarm/tls/tls.crt",
        "tls-key: /var/run/secrets/bitsfarm/tls/tls.key",
        "notify-header-file: /var/run/secrets/bitsfarm/backend/header",
    ] {
        assert!(config.contains(line), "{line} missing from\n{config}");
    }
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let spec = &sts["spec"]["template"]["spec"];
    let v = restricted_violations(spec);
    assert!(v.is_empty(), "{v:#?}");
    for (secret, mount) in [
        ("farm-users", "/var/run/secrets/bitsfarm/auth"),
        ("farm-tokens", "/var/run/secrets/bitsfarm/tokens"),
        ("farm-tls", "/var/run/secrets/bitsfarm/tls"),
        ("backend-token", "/var/run/secrets/bitsfarm/backend"),
        ("secure-handoff", "/var/run/secrets/bitsfarm/handoff"),
    ] {
        let vol = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("no volume for {secret}"));
        let c = &spec["containers"][0];
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == vol["name"])
            .unwrap_or_else(|| panic!("{secret} not mounted"));
        assert_eq!(m["mountPath"], mount);
        assert_eq!(m["readOnly"], Value::Bool(true));
    }
    // Probes use the plain-http admin port, whatever TLS and credentials the uploads need.
    let c = &spec["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "admin");
        assert_eq!(c[probe]["httpGet"]["scheme"], Value::Null);
    }
    assert!(config.contains("admin-listen: 0.0.0.0:8081"), "{config}");
    // With TLS, every Service speaks https, on 443 unless told otherwise, to the container's
    // `https` port; 443 being https's own port, the host ids need none.
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 2 + 2, "headless, two per-pod, shared");
    for svc in services {
        let port = &svc["spec"]["ports"][0];
        assert_eq!(port["name"], "https", "{svc:#?}");
        assert_eq!(port["targetPort"], "https", "{svc:#?}");
        if svc["spec"]["clusterIP"] != "None" {
            assert_eq!(port["port"], 443, "{svc:#?}");
        }
    }
    assert_eq!(c["ports"][0]["name"], "https");
    assert!(
        config.contains("host-id: '{pod}.{namespace}.svc.cluster.local'")
            || config.contains("host-id: \"{pod}.{namespace}.svc.cluster.local\""),
        "{config}"
    );
    assert!(
        config.contains("https://secure-{ordinal}.secure-headless.{namespace}.svc:8080"),
        "{config}"
    );
}
