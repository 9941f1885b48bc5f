//! The Helm chart as the real Helm engine renders it. `tests/chart/render.py` (run by
//! `scripts/test` in a pinned virtualenv) renders `charts/bitsfarm-operator` for the default values
//! and each value switch into a folder, lints it, and checks that wrong values are refused; this
//! test reads that folder from `BITSFARM_CHART_RENDERED` and checks the objects:
//! - every object parses as the Kubernetes type it claims to be (k8s-openapi), and serializes back
//!   to the same JSON, so a misspelt or misplaced field fails;
//! - the Deployment runs `bitsfarm operator` (two replicas behind a Lease with RollingUpdate and a
//!   preferred anti-affinity by default; one replica with Recreate without the Lease) with the
//!   restricted security context, probes, RUST_LOG and the farm image the values ask for;
//! - the leader-election Role in the operator's namespace grants exactly
//!   `bitsfarm::operator::rbac::LEASE_RULE`, and a PodDisruptionBudget keeps one replica up;
//! - the (Cluster)Role grants exactly `bitsfarm::operator::rbac::RULES` (which a unit test holds
//!   to the calls the operator makes), each rule with a comment saying why, bound to the
//!   operator's ServiceAccount, cluster-wide by default and in one namespace when told to;
//! - the metrics Service, ServiceMonitor and NetworkPolicy select the operator's pod and port;
//! - no CRD is in the chart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use bitsfarm::operator::rbac::{LEASE_RULE, RULES};

const RELEASE: &str = "bitsfarm-operator";
const NAMESPACE: &str = "bitsfarm-system";
const ENV: &str = "BITSFARM_CHART_RENDERED";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The rendered folder, or None (with a loud note) when the test runs outside scripts/test.
fn rendered() -> Option<PathBuf> {
    match std::env::var_os(ENV) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            // Straight to stderr, past the test harness's capture, so the skip is never silent.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: {ENV} is not set, so the chart was not rendered. Run ./scripts/test \
                 (it renders the chart with the pinned Helm engine and sets {ENV}). ***\n"
            );
            None
        }
    }
}

/// One rendered case: its values and every object, with the template file it came from.
struct Case {
    name: String,
    values: Value,
    objects: Vec<(String, Value)>,
    texts: BTreeMap<String, String>,
}

impl Case {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(_, o)| o["kind"] == kind)
            .map(|(_, o)| o)
            .collect()
    }

    /// The objects of `kind` that are not from the template `file`.
    fn of_kind_outside(&self, kind: &str, file: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(f, o)| o["kind"] == kind && f != file)
            .map(|(_, o)| o)
            .collect()
    }

    fn replicas(&self) -> i32 {
        self.value("replicaCount")
            .and_then(Value::as_i64)
            .map_or(2, |n| n as i32)
    }

    fn election(&self) -> bool {
        self.flag("leaderElection.enabled") != Some(false)
    }

    fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "{}: expected one {kind}", self.name);
        serde_json::from_value(all[0].clone()).unwrap()
    }

    fn value(&self, path: &str) -> Option<&Value> {
        path.split('.')
            .try_fold(&self.values, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    fn str_value(&self, path: &str) -> Option<&str> {
        self.value(path)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    fn flag(&self, path: &str) -> Option<bool> {
        self.value(path).and_then(Value::as_bool)
    }
}

fn load(dir: &Path) -> Vec<Case> {
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(names.len() >= 5, "too few cases rendered: {names:?}");
    names
        .into_iter()
        .map(|name| {
            let case_dir = dir.join(&name);
            let values: Value = serde_json::from_str(
                &std::fs::read_to_string(case_dir.join("values.json")).unwrap(),
            )
            .unwrap();
            let mut objects = Vec::new();
            let mut texts = BTreeMap::new();
            let mut files: Vec<_> = std::fs::read_dir(&case_dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for path in files {
                let file = path.file_name().unwrap().to_string_lossy().to_string();
                let text = std::fs::read_to_string(&path).unwrap();
                if file.ends_with(".yaml") {
                    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                        .unwrap_or_else(|e| panic!("{name}/{file} is not YAML: {e}"));
                    for doc in docs.into_iter().filter(|d| !d.is_null()) {
                        objects.push((file.clone(), doc));
                    }
                }
                texts.insert(file, text);
            }
            Case {
                name,
                values,
                objects,
                texts,
            }
        })
        .collect()
}

/// Parses `object` as `T` and checks that it serializes back to the same JSON: k8s-openapi
/// ignores unknown fields, so the round trip is what catches a misspelt one.
fn typed<T: DeserializeOwned + Serialize>(case: &str, file: &str, object: &Value) -> T {
    let parsed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| {
        panic!(
            "{case}/{file}: not a valid {}: {e}",
            object["kind"].as_str().unwrap_or("?")
        )
    });
    let back = serde_json::to_value(&parsed).unwrap();
    if let Some(at) = first_difference(object, &back, String::new()) {
        panic!(
            "{case}/{file}: {at} is not a field of {} as the Kubernetes type has it",
            object["kind"].as_str().unwrap_or("?")
        );
    }
    parsed
}

/// The path of the first place where `a` differs from `b`.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .find_map(|(k, v)| match y.get(k) {
                None => Some(format!("{at}.{k}")),
                Some(w) => first_difference(v, w, format!("{at}.{k}")),
            })
            .or_else(|| {
                y.keys()
                    .find(|k| !x.contains_key(*k))
                    .map(|k| format!("{at}.{k} (added)"))
            }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{at} ({a} read back as {b})")),
    }
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "bitsfarm-operator".into()),
        ("app.kubernetes.io/instance".into(), RELEASE.into()),
    ])
}

type Grant = (String, String, String);

fn granted_by_table() -> BTreeSet<Grant> {
    RULES
        .iter()
        .flat_map(|r| {
            r.verbs.iter().map(|v| {
                (
                    r.api_group.to_string(),
                    r.resource.to_string(),
                    v.to_string(),
                )
            })
        })
        .collect()
}

fn granted_by_chart(case: &str, rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "{case}: unexpected rule shape {r:?}"
        );
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    assert!(
                        g != "*" && res != "*" && v != "*",
                        "{case}: wildcard in {r:?}"
                    );
                    assert!(
                        out.insert((g.clone(), res.clone(), v.clone())),
                        "{case}: {g}/{res} {v} granted twice"
                    );
                }
            }
        }
    }
    out
}

/// Every `- apiGroups:` line of a rendered role has a comment line right above it.
fn every_rule_commented(case: &str, file: &str, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "{case}/{file}: the rule at line {} has no comment saying why",
                i + 1
            );
        }
    }
    assert_eq!(rules, RULES.len(), "{case}/{file}: rule count");
}

fn check_types(case: &Case) {
    for (file, o) in &case.objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        match kind {
            "Deployment" => drop(typed::<Deployment>(&case.name, file, o)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&case.name, file, o)),
            "Service" => drop(typed::<Service>(&case.name, file, o)),
            "ClusterRole" => drop(typed::<ClusterRole>(&case.name, file, o)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&case.name, file, o)),
            "Role" => drop(typed::<Role>(&case.name, file, o)),
            "RoleBinding" => drop(typed::<RoleBinding>(&case.name, file, o)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(&case.name, file, o)),
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(&case.name, file, o)),
            // prometheus-operator's type, not in k8s-openapi: checked field by field below.
            "ServiceMonitor" => assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1"),
            other => panic!(
                "{}/{file}: unexpected kind {other:?} (a CRD must never be in the chart)",
                case.name
            ),
        }
        let labels = &o["metadata"]["labels"];
        for (k, v) in selector_labels() {
            assert_eq!(labels[&k], v.as_str(), "{}/{file}: label {k}", case.name);
        }
    }
}

fn operator_container(case: &Case, d: &Deployment) -> Container {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "{}: one container", case.name);
    assert!(pod.init_containers.is_none() && pod.host_network.is_none());
    pod.containers[0].clone()
}

fn check_deployment(case: &Case) {
    let d: Deployment = case.one("Deployment");
    let spec = d.spec.as_ref().unwrap();
    let replicas = case.replicas();
    assert_eq!(spec.replicas, Some(replicas), "{}", case.name);
    let strategy = spec.strategy.clone().unwrap_or_default();
    if case.election() {
        // Only the Lease holder reconciles: old and new pods may overlap, and a new one is up
        // (a ready standby) before an old one goes.
        assert_eq!(
            strategy.type_.as_deref(),
            Some("RollingUpdate"),
            "{}",
            case.name
        );
        let rolling = strategy.rolling_update.unwrap();
        assert_eq!(
            serde_json::to_value(&rolling.max_unavailable).unwrap(),
            Value::from(0),
            "{}",
            case.name
        );
    } else {
        assert_eq!(
            replicas, 1,
            "{}: two controllers without a Lease",
            case.name
        );
        assert_eq!(
            strategy.type_.as_deref(),
            Some("Recreate"),
            "{}: two controllers must never run side by side",
            case.name
        );
    }
    assert_eq!(
        spec.selector.match_labels.as_ref().unwrap(),
        &selector_labels()
    );
    let template_labels = spec.template.metadata.as_ref().unwrap().labels.clone();
    for (k, v) in selector_labels() {
        assert_eq!(template_labels.as_ref().unwrap().get(&k), Some(&v));
    }

    let c = operator_container(case, &d);
    let image = format!(
        "{}:{}",
        case.str_value("image.repository").unwrap_or("bitsfarm"),
        case.str_value("image.tag")
            .unwrap_or(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(c.image.as_deref(), Some(image.as_str()), "{}", case.name);

    // `bitsfarm [global flags] operator [flags]`
    assert_eq!(
        c.command.as_deref(),
        Some(&["bitsfarm".to_string()][..]),
        "{}",
        case.name
    );
    let args = c.args.clone().unwrap_or_default();
    let subcommand = args.iter().find(|a| !a.starts_with('-'));
    assert_eq!(
        subcommand.map(String::as_str),
        Some("operator"),
        "{}: {args:?}",
        case.name
    );
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .map(str::to_string)
    };
    let farm_image = case
        .str_value("farmImage")
        .map_or(image.clone(), str::to_string);
    assert_eq!(
        flag("image"),
        Some(farm_image),
        "{}: the image farms run",
        case.name
    );
    assert_eq!(
        flag("namespace").as_deref(),
        case.str_value("watchNamespace"),
        "{}",
        case.name
    );
    if case.election() {
        let number = |path: &str, default: i64| {
            case.value(path)
                .and_then(Value::as_i64)
                .unwrap_or(default)
                .to_string()
        };
        assert_eq!(
            flag("lease-name").as_deref(),
            Some(RELEASE),
            "{}",
            case.name
        );
        assert_eq!(
            flag("lease-duration-seconds"),
            Some(number("leaderElection.leaseDurationSeconds", 15))
        );
        assert_eq!(
            flag("lease-renew-seconds"),
            Some(number("leaderElection.renewSeconds", 10))
        );
        assert!(!args.contains(&"--no-leader-election".to_string()));
    } else {
        assert!(
            args.contains(&"--no-leader-election".to_string()),
            "{}",
            case.name
        );
        assert_eq!(flag("lease-name"), None);
    }
    assert_eq!(
        flag("log-format").as_deref(),
        Some(case.str_value("logFormat").unwrap_or("json"))
    );
    let port = case
        .value("metrics.port")
        .and_then(Value::as_i64)
        .unwrap_or(8081) as i32;
    assert_eq!(flag("listen"), Some(format!("0.0.0.0:{port}")));
    let ports = c.ports.clone().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == port && p.name.as_deref() == Some("http-metrics")),
        "{}: {ports:?}",
        case.name
    );

    let env: BTreeMap<String, _> = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    assert_eq!(
        env["RUST_LOG"].value.as_deref(),
        Some(case.str_value("logLevel").unwrap_or("info"))
    );
    let field_path = |n: &str| {
        env[n]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field_path("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field_path("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );

    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{}: no probe on {path}", case.name));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).unwrap(),
            Value::from("http-metrics")
        );
    }

    // The restricted Pod Security Standard.
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u > 0));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true), "{}", case.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", case.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", case.name);
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert!(caps.add.is_none());
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let resources = c.resources.as_ref().expect("resources");
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );

    // The replicas spread over nodes, preferably: never required, or a one-node cluster (and a
    // drain of all but one node) could not run them all.
    let affinity = pod.affinity.clone().unwrap_or_default();
    match case
        .value("affinity")
        .filter(|a| a.as_object().is_some_and(|o| !o.is_empty()))
    {
        Some(given) => assert_eq!(&serde_json::to_value(&affinity).unwrap(), given),
        None => {
            let anti = affinity.pod_anti_affinity.expect("a default anti-affinity");
            assert!(
                anti.required_during_scheduling_ignored_during_execution
                    .is_none()
            );
            let preferred = anti
                .preferred_during_scheduling_ignored_during_execution
                .unwrap();
            let term = &preferred[0].pod_affinity_term;
            assert_eq!(term.topology_key, "kubernetes.io/hostname");
            assert_eq!(
                term.label_selector.as_ref().unwrap().match_labels.as_ref(),
                Some(&selector_labels())
            );
        }
    }

    let sa = pod.service_account_name.clone().unwrap();
    if case.flag("serviceAccount.create") == Some(false) {
        assert_eq!(Some(sa.as_str()), case.str_value("serviceAccount.name"));
        assert!(case.of_kind("ServiceAccount").is_empty());
    } else {
        let account: ServiceAccount = case.one("ServiceAccount");
        assert_eq!(account.metadata.name.as_deref(), Some(sa.as_str()));
        assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    }
}

fn check_rbac(case: &Case) {
    let sa: Deployment = case.one("Deployment");
    let sa = sa
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    let watch = case.str_value("watchNamespace");
    let kinds = ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
    let count = |k: &str| case.of_kind_outside(k, LEADER_FILE).len();
    if case.flag("rbac.create") == Some(false) {
        for k in kinds {
            assert_eq!(count(k), 0, "{}: {k} with rbac.create false", case.name);
        }
        return;
    }
    let (role_kind, binding_kind, file) = match watch {
        None => ("ClusterRole", "ClusterRoleBinding", "clusterrole.yaml"),
        Some(_) => ("Role", "RoleBinding", "role.yaml"),
    };
    for k in kinds {
        let want = usize::from(k == role_kind || k == binding_kind);
        assert_eq!(count(k), want, "{}: {k}", case.name);
    }
    let (role_name, role_ns, rules) = match watch {
        None => {
            let r: ClusterRole = case.one("ClusterRole");
            (r.metadata.name, None, r.rules.unwrap_or_default())
        }
        Some(_) => {
            let r: Role =
                serde_json::from_value(case.of_kind_outside("Role", LEADER_FILE)[0].clone())
                    .unwrap();
            (
                r.metadata.name,
                r.metadata.namespace,
                r.rules.unwrap_or_default(),
            )
        }
    };
    assert_eq!(
        role_ns.as_deref(),
        watch,
        "{}: the Role's namespace",
        case.name
    );

    let chart = granted_by_chart(&case.name, &rules);
    let table = granted_by_table();
    let missing: Vec<_> = table.difference(&chart).collect();
    let extra: Vec<_> = chart.difference(&table).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{}: the chart's {role_kind} differs from src/operator/rbac.rs RULES:\n  not granted: {missing:?}\n  granted beyond: {extra:?}",
        case.name
    );
    every_rule_commented(&case.name, file, &case.texts[file]);

    let binding = case.of_kind_outside(binding_kind, LEADER_FILE)[0].clone();
    let (role_ref, subjects, binding_ns) = match watch {
        None => {
            let b: ClusterRoleBinding = serde_json::from_value(binding).unwrap();
            (b.role_ref, b.subjects.unwrap_or_default(), None)
        }
        Some(_) => {
            let b: RoleBinding = serde_json::from_value(binding).unwrap();
            (
                b.role_ref,
                b.subjects.unwrap_or_default(),
                b.metadata.namespace,
            )
        }
    };
    assert_eq!(binding_ns.as_deref(), watch);
    assert_eq!(role_ref.kind, role_kind);
    assert_eq!(Some(role_ref.name), role_name);
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

/// The template of leader election's Role and RoleBinding.
const LEADER_FILE: &str = "leader-election.yaml";

/// Leader election's Role, in the operator's namespace, grants exactly `LEASE_RULE` to the
/// operator's ServiceAccount.
fn check_leader_election(case: &Case) {
    let objects: Vec<&Value> = case
        .objects
        .iter()
        .filter(|(f, _)| f == LEADER_FILE)
        .map(|(_, o)| o)
        .collect();
    if !case.election() || case.flag("rbac.create") == Some(false) {
        assert!(
            objects.is_empty(),
            "{}: a Lease Role without use",
            case.name
        );
        return;
    }
    assert_eq!(objects.len(), 2, "{}", case.name);
    let role: Role = serde_json::from_value(objects[0].clone()).unwrap();
    let binding: RoleBinding = serde_json::from_value(objects[1].clone()).unwrap();
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    let granted = granted_by_chart(&case.name, &role.rules.unwrap_or_default());
    let wanted: BTreeSet<Grant> = LEASE_RULE
        .verbs
        .iter()
        .map(|v| {
            (
                LEASE_RULE.api_group.to_string(),
                LEASE_RULE.resource.to_string(),
                v.to_string(),
            )
        })
        .collect();
    assert_eq!(
        granted, wanted,
        "{}: the Lease Role differs from LEASE_RULE",
        case.name
    );
    let text = &case.texts[LEADER_FILE];
    let rule = text.find("- apiGroups:").unwrap();
    assert!(
        text[..rule]
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .trim_start()
            .starts_with('#'),
        "{}: the Lease rule needs a comment saying why",
        case.name
    );
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let d: Deployment = case.one("Deployment");
    let sa = d.spec.unwrap().template.spec.unwrap().service_account_name;
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(Some(subjects[0].name.clone()), sa);
}

/// With more than one replica, a PodDisruptionBudget keeps one up through a node drain; with
/// one, none (it would block every drain).
fn check_disruption_budget(case: &Case) {
    let budgets = case.of_kind("PodDisruptionBudget");
    let wanted = case.replicas() > 1 && case.flag("podDisruptionBudget.enabled") != Some(false);
    assert_eq!(budgets.len(), usize::from(wanted), "{}", case.name);
    if !wanted {
        return;
    }
    let pdb: PodDisruptionBudget = case.one("PodDisruptionBudget");
    assert_eq!(pdb.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = pdb.spec.unwrap();
    assert_eq!(
        serde_json::to_value(&spec.min_available).unwrap(),
        Value::from(1)
    );
    assert!(spec.max_unavailable.is_none());
    assert_eq!(spec.selector.unwrap().match_labels, Some(selector_labels()));
}

fn check_metrics(case: &Case) {
    let svc: Service = case.one("Service");
    let spec = svc.spec.unwrap();
    assert_eq!(spec.selector.unwrap(), selector_labels());
    let ports = spec.ports.unwrap();
    assert_eq!(ports[0].name.as_deref(), Some("http-metrics"));
    assert_eq!(
        serde_json::to_value(&ports[0].target_port).unwrap(),
        Value::from("http-metrics")
    );

    let monitors = case.of_kind("ServiceMonitor");
    if case.flag("serviceMonitor.enabled") == Some(true) {
        assert_eq!(monitors.len(), 1, "{}", case.name);
        let m = monitors[0];
        let want: Value = serde_json::to_value(selector_labels()).unwrap();
        assert_eq!(m["spec"]["selector"]["matchLabels"], want);
        assert_eq!(m["spec"]["endpoints"][0]["port"], "http-metrics");
        assert_eq!(m["spec"]["endpoints"][0]["path"], "/metrics");
        if let Some(labels) = case
            .value("serviceMonitor.labels")
            .and_then(Value::as_object)
        {
            for (k, v) in labels {
                assert_eq!(&m["metadata"]["labels"][k], v);
            }
        }
    } else {
        assert!(monitors.is_empty(), "{}", case.name);
    }

    let policies = case.of_kind("NetworkPolicy");
    if case.flag("networkPolicy.enabled") == Some(true) {
        let p: NetworkPolicy = case.one("NetworkPolicy");
        let spec = p.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap(),
            selector_labels()
        );
        let types = spec.policy_types.unwrap();
        assert!(types.contains(&"Ingress".into()) && types.contains(&"Egress".into()));
        let ingress = spec.ingress.unwrap();
        assert_eq!(
            ingress.len(),
            1,
            "{}: ingress only to the metrics port",
            case.name
        );
        let port = &ingress[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            serde_json::to_value(&port.port).unwrap(),
            Value::from("http-metrics")
        );
        let from_values = case
            .value("networkPolicy.metricsFrom")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        assert_eq!(ingress[0].from.is_some(), from_values, "{}", case.name);
        let egress_ports: BTreeSet<String> = spec
            .egress
            .unwrap()
            .iter()
            .flat_map(|e| e.ports.clone().unwrap_or_default())
            .map(|p| serde_json::to_value(&p.port).unwrap().to_string())
            .collect();
        for want in ["443", "53"] {
            assert!(egress_ports.contains(want), "{}: egress {want}", case.name);
        }
    } else {
        assert!(policies.is_empty(), "{}", case.name);
    }
}

#[test]
fn every_rendered_case_is_valid_and_least_privilege() {
    let Some(dir) = rendered() else { return };
    let cases = load(&dir);
    for case in &cases {
        assert!(
            case.texts.contains_key("NOTES.txt"),
            "{}: NOTES.txt",
            case.name
        );
        assert!(
            case.texts["NOTES.txt"].contains("kubectl apply --server-side -f crds/"),
            "{}: NOTES.txt must tell the user to apply the CRDs",
            case.name
        );
        check_types(case);
        check_deployment(case);
        check_rbac(case);
        check_leader_election(case);
        check_disruption_budget(case);
        check_metrics(case);
    }
    // The switches the issue names were all rendered.
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "default",
        "watch-namespace",
        "service-monitor",
        "network-policy",
        "no-rbac",
        "existing-service-account",
        "farm-image",
        "single-replica",
        "ha-tuned",
    ] {
        assert!(names.contains(want), "case {want} not rendered");
    }
}

#[test]
fn the_chart_version_is_the_binary_version_and_carries_no_crds() {
    let chart = root().join("charts/bitsfarm-operator");
    let meta: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        meta["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion is the image tag and must be the binary's version"
    );
    assert!(
        !chart.join("crds").exists(),
        "CRDs are applied from crds/ with kubectl, never from the chart (Helm never upgrades them)"
    );
    assert!(chart.join("values.schema.json").exists());
}

// That the image the Dockerfile builds runs the binary this chart runs (`bitsfarm` on PATH, as
// uid 65532) is checked on a built image by tests/dockerfile.rs.

fn example(name: &str) -> String {
    std::fs::read_to_string(root().join("examples").join(name)).unwrap()
}

/// examples/receiver.yaml runs `bitsfarm receiver` behind the Service that every backend URL of
/// examples/uploadfarm-backend.yaml names, and the farm hands uploads over by value (a receiver
/// in another pod cannot read a path handed over by reference).
#[test]
fn the_backend_example_delivers_to_the_receiver_example() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&example("receiver.yaml")).unwrap();
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("receiver.yaml has no {kind}"))
    };
    let pvc: PersistentVolumeClaim =
        typed("examples", "receiver.yaml", find("PersistentVolumeClaim"));
    let d: Deployment = typed("examples", "receiver.yaml", find("Deployment"));
    let svc: Service = typed("examples", "receiver.yaml", find("Service"));
    assert_eq!(docs.len(), 3);

    let pod = d.spec.clone().unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref(), Some(&["bitsfarm".to_string()][..]));
    let args = c.args.clone().unwrap().join(" ");
    assert_eq!(args, "receiver --listen 0.0.0.0:8090 --dir /data");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, "/data");
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume
            .persistent_volume_claim
            .as_ref()
            .map(|p| p.claim_name.as_str()),
        pvc.metadata.name.as_deref()
    );

    let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
    let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let port = svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(port, 8090);
    let host = format!(
        "http://{}.{}.svc.cluster.local:{port}/",
        svc.metadata.name.as_deref().unwrap(),
        svc.metadata.namespace.as_deref().unwrap()
    );

    let farm: Value = serde_saphyr::from_str(&example("uploadfarm-backend.yaml")).unwrap();
    let _: bitsfarm::api::UploadFarm = serde_json::from_value(farm.clone()).unwrap();
    assert_eq!(
        farm["metadata"]["namespace"],
        svc.metadata.namespace.as_deref().unwrap()
    );
    let spec = &farm["spec"];
    let mut backends = vec![&spec["backend"]];
    for d in spec["directories"].as_array().into_iter().flatten() {
        if !d["backend"].is_null() {
            backends.push(&d["backend"]);
        }
    }
    for b in backends {
        let url = b["url"].as_str().unwrap();
        assert!(url.starts_with(&host), "{url} is not the receiver {host}");
        assert_eq!(b["notification"], "ByValue", "{url}");
    }

    // Its NetworkPolicy lets the servers reach the receiver: the peers select the receiver's
    // pods, and the port derived from the backend URLs is the pods' own (policies see the port
    // after the Service), which only holds while the Service does not map one to another.
    let typed_farm: bitsfarm::api::UploadFarm = serde_json::from_value(farm.clone()).unwrap();
    let np = typed_farm
        .spec
        .network_policy
        .as_ref()
        .filter(|n| n.enabled)
        .expect("the backend example enables its NetworkPolicy");
    assert!(!np.backend_peers.is_empty());
    for peer in &np.backend_peers {
        let wanted = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .expect("a pod selector by labels");
        assert!(
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{wanted:?} does not select the receiver's pods {labels:?}"
        );
    }
    let container_port = c.ports.as_ref().unwrap()[0].container_port;
    assert_eq!(
        bitsfarm::operator::resources::backend_ports(&typed_farm.spec).unwrap(),
        [container_port]
    );
}

/// The three farms the README points users at: a minimal one, one with a backend, and one with
/// per-pod LoadBalancer Services and an external host-id template.
#[test]
fn the_examples_cover_the_three_kinds_of_farm() {
    let parse = |name: &str| -> bitsfarm::api::UploadFarm {
        serde_saphyr::from_str(&example(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let minimal = parse("uploadfarm-minimal.yaml");
    assert!(minimal.spec.backend.is_none());
    let public: Value = serde_saphyr::from_str(&example("uploadfarm-public.yaml")).unwrap();
    let _ = parse("uploadfarm-public.yaml");
    assert_eq!(public["spec"]["hostIds"]["serviceType"], "LoadBalancer");
    let template = public["spec"]["hostIds"]["template"].as_str().unwrap();
    assert!(
        !template.ends_with(".svc.cluster.local") && template.contains("{ordinal}"),
        "{template}"
    );
    assert!(parse("uploadfarm-backend.yaml").spec.backend.is_some());
}
