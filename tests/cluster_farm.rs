//! A farm on a real node, as a user runs it (issue 13): the CRDs applied with the API server's
//! validation on, the operator installed with helm from the image `cluster.sh image` built, the
//! examples applied unchanged, BITS uploads from the node through the Services and cluster DNS,
//! and the farm living through a killed pod, a config roll and a scale-down with uploads running.
//!
//! `scripts/test` runs this inside `tests/cluster/cluster.sh run`, which brings up the control
//! plane and the node, loads the image, and exports the variables `common/kube.rs` reads. By hand:
//!
//! ```sh
//! tests/cluster/cluster.sh run cargo test --test cluster_farm -- --nocapture
//! ```
//!
//! One scenario, step by step, each bounded in time; a failed step prints the operator's log and
//! the pods it saw. The uploads run in the node's network namespace (`cluster.sh node`), where
//! the Service and pod addresses exist; the link to the pods is slowed down (`tc` on the node's
//! bridge) while an upload must still be running when the cluster acts.

mod common;
#[path = "common/kube.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use harness::{
    Cluster, condition, eventually, manifest_dir, objects_where, owned_by, pod_ready, say,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

const NS: &str = "uploads";
const FARM: &str = "crash-reports";
const OPERATOR_NS: &str = "bitsfarm-system";
const RELEASE: &str = "bitsfarm-operator";
const CRD: &str = "uploadfarms.bitsfarm.io";
/// Bound of each wait for the cluster to act.
const SETTLE: Duration = Duration::from_secs(180);
/// Every upload of this test: big enough to be cut in the middle.
const UPLOAD_BYTES: usize = 64 << 20;
const FRAGMENT: usize = 4 << 20;
/// The node-to-pod rate while an upload must outlast what the cluster does (about 11 s for 64 MiB).
const SLOW_LINK: &str = "48mbit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_on_a_real_node_from_helm_install_to_uninstall() {
    let Some(c) = Cluster::from_env("cluster_farm").await else {
        return;
    };
    let started = Instant::now();
    let mut steps = Steps::default();
    let result = std::panic::AssertUnwindSafe(scenario(&c, &mut steps))
        .catch_unwind()
        .await;
    // Whatever happened, the node's link is left as it was found.
    let _ = c
        .node(
            &["tc", "qdisc", "del", "dev", "cni0", "root"],
            Duration::from_secs(20),
        )
        .await;
    if let Err(panic) = result {
        say(&format!(
            "cluster_farm: FAILED in step {:?}",
            steps.current.as_deref().unwrap_or("-")
        ));
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "uf", "-A", "-o", "wide"],
            vec![
                "logs",
                "-n",
                OPERATOR_NS,
                "deploy/bitsfarm-operator",
                "--tail=60",
            ],
            vec!["get", "events", "-n", NS, "--sort-by=.lastTimestamp"],
        ] {
            let out = c.kubectl(&args).await;
            say(&format!(
                "--- kubectl {}:\n{}{}",
                args.join(" "),
                out.stdout,
                out.stderr
            ));
        }
        std::panic::resume_unwind(panic);
    }
    steps.done();
    say(&format!(
        "cluster_farm: all steps passed in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        steps.report()
    ));
}

/// The steps of the scenario and what each took, for the report the README quotes.
#[derive(Default)]
struct Steps {
    current: Option<String>,
    since: Option<Instant>,
    took: Vec<(String, Duration)>,
}

impl Steps {
    fn start(&mut self, name: &str) {
        self.done();
        say(&format!("cluster_farm: step: {name}"));
        self.current = Some(name.to_string());
        self.since = Some(Instant::now());
    }
    fn done(&mut self) {
        if let (Some(name), Some(since)) = (self.current.take(), self.since.take()) {
            self.took.push((name, since.elapsed()));
        }
    }
    fn report(&self) -> String {
        self.took
            .iter()
            .map(|(n, d)| format!("  {:>6.1} s  {n}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn scenario(c: &Cluster, steps: &mut Steps) {
    let version = c
        .client
        .apiserver_version()
        .await
        .expect("API server version");
    say(&format!(
        "cluster_farm: Kubernetes {} (kubectl {}, helm {}), image {}",
        version.git_version, c.kubectl, c.helm, c.image
    ));
    // What an earlier run against the same cluster may have left.
    c.kubectl_ok(&[
        "delete",
        "namespace",
        NS,
        "--ignore-not-found",
        "--timeout=120s",
    ])
    .await;
    let _ = c
        .run(
            &c.helm,
            &[
                "--kubeconfig",
                c.kubeconfig.to_str().unwrap(),
                "uninstall",
                RELEASE,
                "-n",
                OPERATOR_NS,
                "--wait",
                "--ignore-not-found",
            ],
            None,
            Duration::from_secs(120),
        )
        .await;

    steps.start("b. the CRDs applied server-side; the API server enforces every CEL rule");
    crds_and_cel_rules(c).await;

    steps.start("a. helm install of the operator with the built image");
    helm_install(c).await;

    steps.start("c. examples/receiver.yaml and uploadfarm-backend.yaml applied; the farm Ready");
    examples_applied(c).await;

    let work = tempfile::tempdir().expect("temp dir");
    // A file of its own for each upload, so that "one copy at the receiver" names that upload.
    let upload_file = |name: &str, seed: u64| {
        let data = common::random_bytes(UPLOAD_BYTES, seed);
        let file = work.path().join(name);
        std::fs::write(&file, &data).expect("write the upload's file");
        (file, common::sha256_hex(&data))
    };
    let (file, sha) = upload_file("d.bin", 13);

    steps.start("d. upload with reply from the node to status.url; every fragment to the host id");
    upload_with_reply(c, &file, &sha, work.path()).await;

    // From here on an upload must still be running when the cluster acts.
    let slow = c
        .node(
            &[
                "tc", "qdisc", "replace", "dev", "cni0", "root", "tbf", "rate", SLOW_LINK, "burst",
                "256kb", "latency", "400ms",
            ],
            Duration::from_secs(20),
        )
        .await;
    assert!(slow.ok, "tc on the node's bridge: {}", slow.stderr);

    steps.start("e. the pod holding a session is deleted; the upload resumes on its host id");
    let (file, sha) = upload_file("e.bin", 14);
    pod_deleted_mid_upload(c, &file, &sha).await;

    steps.start("g. a new backend timeout rolls the pods one at a time; an upload runs across");
    let (file, sha) = upload_file("g.bin", 15);
    config_roll(c, &file, &sha).await;

    steps.start("f. kubectl scale --replicas=1 while an upload runs on the pod removed");
    let (file, sha) = upload_file("f.bin", 16);
    scale_down(c, &file, &sha).await;

    let fast = c
        .node(
            &["tc", "qdisc", "del", "dev", "cni0", "root"],
            Duration::from_secs(20),
        )
        .await;
    assert!(fast.ok, "tc on the node's bridge: {}", fast.stderr);
    operator_logs_clean(c).await;

    steps.start("h. helm upgrade, get uf, explain; the farm deleted, then helm uninstall");
    upgrade_and_uninstall(c).await;
}

// ---------------------------------------------------------------------------------------------
// b. CRDs and CEL

/// Every `x-kubernetes-validations` rule of the CRD's schema: (where, message).
fn cel_rules(schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            let msg = r["message"].as_str().unwrap_or_default();
            out.push((
                at.to_string(),
                msg.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            cel_rules(v, &path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        cel_rules(items, &format!("{at}[]"), out);
    }
}

fn farm_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    )
}

async fn crds_and_cel_rules(c: &Cluster) {
    let crds = manifest_dir().join("crds");
    c.kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()])
        .await;
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])
    .await;

    let text = std::fs::read_to_string(crds.join("uploadfarm.yaml")).expect("crds/uploadfarm.yaml");
    let crd: Value = serde_saphyr::from_str(&text).expect("the CRD parses");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut rules = Vec::new();
    cel_rules(schema, "", &mut rules);
    assert!(rules.len() >= 5, "CEL rules found: {rules:?}");

    // For each place a rule sits, a spec that breaks it. A rule added to the CRD without a case
    // here fails the test.
    let cases: BTreeMap<&str, String> = BTreeMap::from([
        ("", farm_yaml("Bad_Name", "  replicas: 1\n")),
        (
            "spec.backend",
            farm_yaml("cel-backend", "  backend:\n    notification: ByValue\n"),
        ),
        (
            "spec.directories",
            farm_yaml("cel-dirs", "  directories:\n  - path: /a\n  - path: /a\n"),
        ),
        (
            "spec.directories[].backend",
            farm_yaml(
                "cel-dir-backend",
                "  directories:\n  - path: /a\n    backend:\n      notification: ByReference\n",
            ),
        ),
        (
            "spec.hostIds.template",
            farm_yaml(
                "cel-template",
                "  hostIds:\n    template: uploads.example.com\n",
            ),
        ),
        (
            "spec.storage",
            farm_yaml("cel-storage", "  storage:\n    size: 2Gi\n"),
        ),
        (
            "spec.disruptionBudget.maxUnavailable",
            farm_yaml("cel-budget", "  disruptionBudget:\n    maxUnavailable: 0\n"),
        ),
    ]);
    for (at, message) in &rules {
        assert!(
            cases.contains_key(at.as_str()),
            "the CRD has a CEL rule at {at:?} ({message}) that this test has no case for"
        );
    }
    // The storage rule compares with the stored object: it needs one to compare with.
    c.kubectl_ok_in(
        &["apply", "--server-side", "-f", "-"],
        &farm_yaml("cel-storage", "  replicas: 0\n  storage:\n    size: 1Gi\n"),
    )
    .await;
    let valid = farm_yaml(
        "cel-valid",
        "  backend:\n    url: http://b:8090/\n    notification: ByValue\n  disruptionBudget:\n    maxUnavailable: 25%\n",
    );
    let out = c
        .kubectl_in(
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&valid),
        )
        .await;
    assert!(out.ok, "a valid farm was refused: {}", out.stderr);
    for (at, message) in &rules {
        let manifest = &cases[at.as_str()];
        let out = c
            .kubectl_in(
                &["apply", "--server-side", "--dry-run=server", "-f", "-"],
                Some(manifest),
            )
            .await;
        let said = out.stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            !out.ok && said.contains(message.as_str()),
            "the rule at {at:?} did not refuse\n{manifest}\nwith its message {message:?}; kubectl said: {}{}",
            out.stdout,
            out.stderr
        );
        say(&format!("  refused by the API server at {at:?}: {message}"));
    }
    c.kubectl_ok(&[
        "delete",
        "uploadfarm",
        "cel-storage",
        "-n",
        "default",
        "--wait",
    ])
    .await;
}

// ---------------------------------------------------------------------------------------------
// a. helm install

async fn helm_install(c: &Cluster) {
    let chart = manifest_dir().join("charts/bitsfarm-operator");
    c.helm_ok(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "3m",
    ])
    .await;
    let deploy: Deployment = c
        .api(OPERATOR_NS)
        .get(RELEASE)
        .await
        .expect("the operator Deployment");
    let image = deploy
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|ct| ct.image.clone());
    assert_eq!(
        image.as_deref(),
        Some(c.image.as_str()),
        "the chart's default image is not the one cluster.sh built"
    );
    c.kubectl_ok(&[
        "wait",
        "-n",
        OPERATOR_NS,
        "--for=condition=Available",
        &format!("deploy/{RELEASE}"),
        "--timeout=120s",
    ])
    .await;
    let pod = operator_pod(c).await;
    // Ready means the readiness probe passed; a few more seconds show the liveness probe does too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod: Pod = c
        .api(OPERATOR_NS)
        .get(&pod.name_any())
        .await
        .expect("operator pod");
    let restarts: i32 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|s| s.restart_count).sum())
        .unwrap_or(-1);
    assert_eq!(restarts, 0, "the operator restarted: {:?}", pod.status);
    let unhealthy = c
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            OPERATOR_NS,
            "--field-selector",
            &format!("involvedObject.name={},reason=Unhealthy", pod.name_any()),
            "-o",
            "jsonpath={range .items[*]}{.count} {.message}{'\\n'}{end}",
        ])
        .await;
    // Readiness may fail once while the operator starts: the kubelet probes as the container
    // starts, before the port is bound or before the first Lease check has made it ready (seen
    // once in CI, on a loaded machine). Any liveness failure, or readiness failing more than once,
    // is a probe that does not work.
    let failures: Vec<(&str, &str)> = unhealthy
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_once(' ').unwrap_or(("", l)))
        .collect();
    let startup_race = match failures.as_slice() {
        [(count, message)] => {
            matches!(count.trim(), "" | "1") && message.starts_with("Readiness probe failed")
        }
        _ => false,
    };
    assert!(
        failures.is_empty() || startup_race,
        "probe failures: {unhealthy}"
    );
    say(&format!(
        "  operator pod {} Ready, probes passing",
        pod.name_any()
    ));
}

async fn operator_pod(c: &Cluster) -> Pod {
    eventually("two Ready operator pods", SETTLE, || async {
        let pods = c
            .api::<Pod>(OPERATOR_NS)
            .list(&ListParams::default().labels("app.kubernetes.io/name=bitsfarm-operator"))
            .await
            .map_err(|e| e.to_string())?;
        let live: Vec<Pod> = pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        // Two replicas by default (one leads, one stands by), both ready.
        match live.as_slice() {
            [p, q] if pod_ready(p) && pod_ready(q) => Ok(p.clone()),
            other => Err(format!(
                "operator pods: {:?}",
                other
                    .iter()
                    .map(|p| (p.name_any(), pod_ready(p)))
                    .collect::<Vec<_>>()
            )),
        }
    })
    .await
}

/// Nothing in the operator's log says that the API server refused it something.
async fn operator_logs_clean(c: &Cluster) {
    let logs = c
        .kubectl_ok(&[
            "logs",
            "-n",
            OPERATOR_NS,
            &format!("deploy/{RELEASE}"),
            "--tail=-1",
        ])
        .await;
    let refused: Vec<&str> = logs
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains("cannot list") || l.contains("cannot patch")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "RBAC refusals in the operator's log:\n{}",
        refused.join("\n")
    );
    assert!(logs.lines().count() > 0, "the operator logged nothing");
}

// ---------------------------------------------------------------------------------------------
// c. the examples

async fn examples_applied(c: &Cluster) {
    c.kubectl_ok(&["create", "namespace", NS]).await;
    let ex = manifest_dir().join("examples");
    c.kubectl_ok(&[
        "apply",
        "-f",
        ex.join("receiver.yaml").to_str().unwrap(),
        "-f",
        ex.join("uploadfarm-backend.yaml").to_str().unwrap(),
    ])
    .await;
    c.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        &format!("uploadfarm/{FARM}"),
        "--timeout=5m",
    ])
    .await;
    c.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Available",
        "deploy/receiver",
        "--timeout=3m",
    ])
    .await;
    let farm = c.farm(NS, FARM).await.expect("the farm");
    let status = farm.status.clone().expect("status");
    assert_eq!(
        (status.replicas, status.ready_replicas),
        (2, 2),
        "{status:?}"
    );
    // The bridge plugin does not enforce NetworkPolicies: the object is what can be checked.
    let policy: NetworkPolicy = c
        .api(NS)
        .get(&format!("{FARM}-network-policy"))
        .await
        .expect("the farm's NetworkPolicy");
    owned_by(&policy.metadata, &farm).expect("the NetworkPolicy is the farm's");
    let pod0: Pod = c.api(NS).get(&format!("{FARM}-0")).await.expect("pod 0");
    let sc = pod0.spec.as_ref().and_then(|s| s.security_context.as_ref());
    assert_eq!(sc.and_then(|s| s.run_as_user), Some(65532), "{sc:?}");
    for p in 0..2 {
        let pvc: PersistentVolumeClaim = c
            .api(NS)
            .get(&format!("data-{FARM}-{p}"))
            .await
            .expect("the pod's claim");
        let phase = pvc.status.and_then(|s| s.phase);
        assert_eq!(phase.as_deref(), Some("Bound"), "claim of pod {p}");
    }
    say(&format!("  {FARM}: Ready, status.url {:?}", status.url));
}

// ---------------------------------------------------------------------------------------------
// Uploads from the node

/// `bitsfarm upload --json` running in the node's network namespace.
struct NodeUpload {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<Value>,
}

impl NodeUpload {
    fn start(c: &Cluster, file: &Path, url: &str, extra: &[&str]) -> NodeUpload {
        let bin = env!("CARGO_BIN_EXE_bitsfarm");
        let fragment = FRAGMENT.to_string();
        let mut args = vec![
            bin,
            "upload",
            "--json",
            "--no-resume",
            "--fragment-size",
            &fragment,
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "240",
        ];
        args.extend_from_slice(extra);
        let file_s = file.to_str().unwrap();
        args.extend_from_slice(&[file_s, url]);
        let mut child = c
            .node_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the upload in the node's namespace");
        let out = child.stdout.take().expect("stdout");
        NodeUpload {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
            seen: Vec::new(),
        }
    }

    /// The next event that `pred` accepts (at most `limit`).
    async fn event(&mut self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {what} within {} s; seen {:?}",
                        limit.as_secs(),
                        self.seen
                    )
                })
                .expect("read the client's output");
            let Some(line) = line else {
                panic!("the upload ended before {what}; seen {:?}", self.seen)
            };
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    async fn session(&mut self) -> (String, String) {
        let v = self
            .event("a session", Duration::from_secs(60), |v| {
                v["event"] == "session"
            })
            .await;
        (
            v["id"].as_str().unwrap_or_default().to_string(),
            v["host_id"]
                .as_str()
                .expect("a host id in the first Ack")
                .to_string(),
        )
    }

    async fn progress_past(&mut self, offset: u64) {
        self.event(
            &format!("progress past {offset}"),
            Duration::from_secs(120),
            |v| v["event"] == "progress" && v["offset"].as_u64().is_some_and(|o| o >= offset),
        )
        .await;
    }

    /// Exit code and final report (which carries every event the client printed, under "seen").
    async fn finish(mut self, limit: Duration) -> (i32, Value) {
        let mut done = self
            .event("the final report", limit, |v| {
                v["event"] == "done" || v["event"] == "failed"
            })
            .await;
        let events: Vec<Value> = self
            .seen
            .iter()
            .filter(|v| v["event"] != "progress")
            .cloned()
            .collect();
        done["seen"] = Value::Array(events);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the client exits after its report")
            .expect("wait for the client");
        (status.code().unwrap_or(-1), done)
    }
}

fn report_u64(done: &Value, key: &str) -> u64 {
    done["report"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("report.{key} in {done}"))
}

/// `crash-reports-N.uploads.svc.cluster.local` -> N.
fn ordinal_of(host_id: &str) -> usize {
    host_id
        .strip_prefix(&format!("{FARM}-"))
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("host id {host_id:?} names no pod of {FARM}"))
}

async fn fragments_per_pod(c: &Cluster, pods: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..pods {
        let pod = format!("{FARM}-{i}");
        let m = eventually(&format!("metrics of {pod}"), SETTLE, || {
            c.pod_get(NS, &pod, 8081, "/metrics")
        })
        .await;
        out.push(harness::metric(&m, "bitsfarm_packets_total{packet=\"Fragment\"}").unwrap_or(0.0));
    }
    out
}

async fn shared_url(c: &Cluster, path: &str) -> String {
    let farm = c.farm(NS, FARM).await.expect("the farm");
    let base = farm.status.and_then(|s| s.url).expect("status.url");
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Copies the receiver holds of content with this SHA-256, read off its volume on the node.
async fn upload_with_reply(c: &Cluster, file: &Path, sha: &str, work: &Path) {
    let before = fragments_per_pod(c, 2).await;
    let url = shared_url(c, "/dumps/d.bin").await;
    let reply = work.join("reply.txt");
    let mut up = NodeUpload::start(c, file, &url, &["--reply", reply.to_str().unwrap()]);
    let (_, host_id) = up.session().await;
    let (code, done) = up.finish(Duration::from_secs(240)).await;
    assert_eq!(code, 0, "{done}");
    assert_eq!(report_u64(&done, "restarts"), 0, "{done}");
    assert_eq!(
        report_u64(&done, "bytes_sent"),
        UPLOAD_BYTES as u64,
        "{done}"
    );
    let text = std::fs::read_to_string(&reply).expect("the reply was downloaded");
    assert!(
        text.contains(sha),
        "the receiver's reply {text:?} does not carry {sha}"
    );

    // The host id is a name only the cluster's DNS knows: the per-pod Service's address.
    let owner = ordinal_of(&host_id);
    let svc: Service = c
        .api(NS)
        .get(&format!("{FARM}-{owner}"))
        .await
        .expect("per-pod Service");
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
    let out = c
        .node(&["getent", "hosts", &host_id], Duration::from_secs(20))
        .await;
    assert!(
        out.ok && out.stdout.split_whitespace().next() == Some(ip.as_str()),
        "{host_id} resolved on the node to {:?}, the Service has {ip}",
        out.stdout
    );
    let after = fragments_per_pod(c, 2).await;
    let fragments = (UPLOAD_BYTES / FRAGMENT) as f64;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let want = if i == owner { fragments } else { 0.0 };
        assert_eq!(
            a - b,
            want,
            "fragments per pod before {before:?}, after {after:?}; owner {owner}"
        );
    }
    assert_eq!(
        common::stored_copies(&c.volume_dir(NS, "receiver-data").await, sha),
        1,
        "copies at the receiver"
    );
    say(&format!(
        "  {} MiB to {url}: all {fragments} fragments to {host_id} ({ip}); reply {:?}",
        UPLOAD_BYTES >> 20,
        text.trim()
    ));
}

// ---------------------------------------------------------------------------------------------
// e, g, f: the cluster acts while uploads run

async fn pod_uid(c: &Cluster, name: &str) -> Option<String> {
    c.api::<Pod>(NS)
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.metadata.uid)
}

fn assert_one_fragment_resent_at_most(done: &Value) {
    let sent = report_u64(done, "bytes_sent");
    assert!(
        sent <= (UPLOAD_BYTES + FRAGMENT) as u64,
        "{sent} bytes sent for {UPLOAD_BYTES}: more than one fragment resent; {done}"
    );
    assert_eq!(report_u64(done, "restarts"), 0, "{done}");
    assert_eq!(report_u64(done, "sessions"), 1, "{done}");
}

async fn pod_deleted_mid_upload(c: &Cluster, file: &Path, sha: &str) {
    let url = shared_url(c, "/dumps/e.bin").await;
    let mut up = NodeUpload::start(c, file, &url, &[]);
    let (_, host_id) = up.session().await;
    let owner = format!("{FARM}-{}", ordinal_of(&host_id));
    let claim = format!("data-{owner}");
    let volume_before = c
        .api::<PersistentVolumeClaim>(NS)
        .get(&claim)
        .await
        .expect("the claim")
        .spec
        .and_then(|s| s.volume_name);
    up.progress_past((UPLOAD_BYTES / 4) as u64).await;
    let uid_before = pod_uid(c, &owner).await;
    c.kubectl_ok(&[
        "delete",
        "pod",
        "-n",
        NS,
        &owner,
        "--grace-period=0",
        "--force",
    ])
    .await;
    say(&format!("  deleted {owner} mid-upload"));
    let (code, done) = up.finish(Duration::from_secs(300)).await;
    assert_eq!(code, 0, "{done}");
    assert_one_fragment_resent_at_most(&done);
    assert!(
        report_u64(&done, "retries") >= 1,
        "the upload never noticed the pod go: {done}"
    );
    let pod: Pod = c.api(NS).get(&owner).await.expect("the pod is back");
    assert_ne!(pod.metadata.uid, uid_before, "{owner} was not replaced");
    let volume_after = c
        .api::<PersistentVolumeClaim>(NS)
        .get(&claim)
        .await
        .expect("the claim")
        .spec
        .and_then(|s| s.volume_name);
    assert_eq!(
        volume_after, volume_before,
        "{owner} came back with another volume"
    );
    assert_eq!(
        common::stored_copies(&c.volume_dir(NS, "receiver-data").await, sha),
        1,
        "copies at the receiver"
    );
    // Whether the replacement found the old container still on the volume depends on how fast
    // the kubelet killed it; say which it was.
    let logs = c.kubectl(&["logs", "-n", NS, &owner]).await.stdout;
    let waited = logs.contains("another bitsfarm server holds this data folder");
    say(&format!(
        "  resumed on {host_id}: {} bytes sent for {UPLOAD_BYTES}, {} retries; the new server {} \
         for the old one to leave the volume",
        report_u64(&done, "bytes_sent"),
        report_u64(&done, "retries"),
        if waited {
            "waited"
        } else {
            "did not have to wait"
        }
    ));
}

async fn config_roll(c: &Cluster, file: &Path, sha: &str) {
    let sts_api = c.api::<StatefulSet>(NS);
    let url = shared_url(c, "/dumps/g.bin").await;
    let mut up = NodeUpload::start(c, file, &url, &[]);
    let (_, host_id) = up.session().await;
    up.progress_past(FRAGMENT as u64).await;
    let before = [
        pod_uid(c, &format!("{FARM}-0")).await,
        pod_uid(c, &format!("{FARM}-1")).await,
    ];
    c.kubectl_ok(&[
        "patch",
        "uploadfarm",
        "-n",
        NS,
        FARM,
        "--type=merge",
        "-p",
        r#"{"spec":{"backend":{"timeoutSeconds":90}}}"#,
    ])
    .await;
    // Step e's forced delete killed its pod's hook on purpose; only hooks of this roll count.
    let hooks_before = failed_prestop_hooks(c).await;
    // Watch the roll: how many servers are out at once, and in which order they are replaced.
    let mut worst = 0;
    let mut replaced: Vec<usize> = Vec::new();
    let mut upload = Some(tokio::spawn(async move {
        up.finish(Duration::from_secs(400)).await
    }));
    let mut outcome = None;
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(420),
            "the roll did not end: replaced {replaced:?}"
        );
        let pods = c
            .api::<Pod>(NS)
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={FARM}")))
            .await
            .expect("list pods");
        let up_now = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .count();
        worst = worst.max(2usize.saturating_sub(up_now));
        for (i, uid) in before.iter().enumerate() {
            let now = pods
                .items
                .iter()
                .find(|p| p.name_any() == format!("{FARM}-{i}"))
                .and_then(|p| p.metadata.uid.clone());
            if now.is_some() && now != *uid && !replaced.contains(&i) {
                replaced.push(i);
            }
        }
        if let Some(h) = upload.as_ref()
            && h.is_finished()
        {
            outcome = Some(upload.take().unwrap().await.expect("the upload task"));
        }
        let sts = sts_api.get(FARM).await.expect("StatefulSet");
        let st = sts.status.unwrap_or_default();
        let rolled = replaced.len() == 2
            && st.update_revision.is_some()
            && st.current_revision == st.update_revision
            && st.ready_replicas == Some(2);
        if rolled && outcome.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, done) = outcome.expect("the upload's outcome");
    assert_eq!(code, 0, "{done}");
    assert_one_fragment_resent_at_most(&done);
    assert!(
        worst <= 1,
        "{worst} servers were out at once during the roll"
    );
    assert_eq!(
        replaced,
        vec![1, 0],
        "the pods were not replaced highest ordinal first"
    );
    assert_eq!(
        common::stored_copies(&c.volume_dir(NS, "receiver-data").await, sha),
        1,
        "copies at the receiver"
    );
    c.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        &format!("uploadfarm/{FARM}"),
        "--timeout=3m",
    ])
    .await;
    // Each replaced pod ran `bitsfarm drain` as its preStop hook; the kubelet only records an
    // event when that fails, and then goes on to SIGTERM, so the roll alone would not show it.
    let failed: Vec<String> = failed_prestop_hooks(c)
        .await
        .into_iter()
        .filter(|e| !hooks_before.contains(e))
        .collect();
    assert!(
        failed.is_empty(),
        "a pod's preStop drain failed: {failed:?}"
    );
    say(&format!(
        "  rolled {replaced:?}, at most {worst} server out, each drained by its preStop hook; the upload on {host_id} completed"
    ));
}

/// The FailedPreStopHook events of the farm's namespace, as `event-name pod message`.
async fn failed_prestop_hooks(c: &Cluster) -> std::collections::BTreeSet<String> {
    c.kubectl_ok(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        "reason=FailedPreStopHook",
        "-o",
        "custom-columns=NAME:.metadata.name,POD:.involvedObject.name,MESSAGE:.message",
        "--no-headers",
    ])
    .await
    .lines()
    .filter(|l| !l.trim().is_empty())
    .map(str::to_string)
    .collect()
}

async fn scale_down(c: &Cluster, file: &Path, sha: &str) {
    // Straight to the server that goes: its host id is its address.
    let farm = c.farm(NS, FARM).await.expect("the farm");
    let host = farm
        .status
        .as_ref()
        .and_then(|s| s.hosts.iter().find(|h| h.ordinal == 1))
        .map(|h| h.host_id.clone())
        .expect("status.hosts names server 1");
    let mut up = NodeUpload::start(c, file, &format!("http://{host}/dumps/f.bin"), &[]);
    let (_, host_id) = up.session().await;
    assert_eq!(ordinal_of(&host_id), 1, "the session is not on server 1");
    up.progress_past(FRAGMENT as u64).await;
    c.kubectl_ok(&[
        "scale",
        "-n",
        NS,
        &format!("uploadfarm/{FARM}"),
        "--replicas=1",
    ])
    .await;
    let mut upload = Some(tokio::spawn(async move {
        up.finish(Duration::from_secs(300)).await
    }));
    let mut saw_draining = false;
    let mut outcome = None;
    let start = Instant::now();
    while outcome.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(320),
            "the upload did not end"
        );
        let farm = c.farm(NS, FARM).await.expect("the farm");
        let st = farm.status.unwrap_or_default();
        if st.hosts.iter().any(|h| h.ordinal == 1 && h.draining) {
            saw_draining = true;
        }
        if let Some(h) = upload.as_ref()
            && h.is_finished()
        {
            outcome = Some(upload.take().unwrap().await.expect("the upload task"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, done) = outcome.unwrap();
    assert_eq!(code, 0, "{done}");
    assert_one_fragment_resent_at_most(&done);
    assert!(saw_draining, "status.hosts never showed server 1 draining");
    eventually(
        "server 1 and its Service gone, the farm Ready at 1",
        SETTLE,
        || async {
            if pod_uid(c, &format!("{FARM}-1")).await.is_some() {
                return Err("pod 1 is still there".into());
            }
            if c.api::<Service>(NS)
                .get_opt(&format!("{FARM}-1"))
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Err("Service 1 is still there".into());
            }
            let farm = c.farm(NS, FARM).await?;
            let st = farm.status.clone().ok_or("no status")?;
            match condition(&farm, "Ready") {
                Some(r) if r.status == "True" && st.replicas == 1 => Ok(()),
                other => Err(format!("Ready {other:?}, replicas {}", st.replicas)),
            }
        },
    )
    .await;
    assert_eq!(
        common::stored_copies(&c.volume_dir(NS, "receiver-data").await, sha),
        1,
        "copies at the receiver"
    );
    say("  server 1 drained: the upload finished, then the pod and its Service went");
}

// ---------------------------------------------------------------------------------------------
// h. upgrade, the table, explain, delete, uninstall

async fn upgrade_and_uninstall(c: &Cluster) {
    let chart = manifest_dir().join("charts/bitsfarm-operator");
    c.helm_ok(&[
        "upgrade",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        OPERATOR_NS,
        "--reuse-values",
        "--set",
        "logLevel=debug",
        "--wait",
        "--timeout",
        "3m",
    ])
    .await;
    let deploy: Deployment = c
        .api(OPERATOR_NS)
        .get(RELEASE)
        .await
        .expect("the operator Deployment");
    let env = deploy
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|ct| ct.env)
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")),
        "the upgraded Deployment does not carry logLevel=debug: {env:?}"
    );
    operator_pod(c).await;
    c.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        &format!("uploadfarm/{FARM}"),
        "--timeout=2m",
    ])
    .await;

    let table = c.kubectl_ok(&["get", "uf", "-n", NS, "-o", "wide"]).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    for col in [
        "NAME", "REPLICAS", "READY", "HOST-IDS", "AGE", "URL", "REASON", "MESSAGE",
    ] {
        assert!(header.contains(&col), "no {col} column in:\n{table}");
    }
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], &[FARM, "1", "True"], "{table}");
    let explain = c.kubectl_ok(&["explain", "uploadfarm.spec.hostIds"]).await;
    assert!(
        explain.contains("template") && explain.contains("fallbackTimeoutSeconds"),
        "{explain}"
    );
    operator_logs_clean(c).await;

    let farm = c.farm(NS, FARM).await.expect("the farm");
    c.kubectl_ok(&[
        "delete",
        "uploadfarm",
        "-n",
        NS,
        FARM,
        "--wait",
        "--timeout=120s",
    ])
    .await;
    eventually("the farm's children garbage-collected", SETTLE, || async {
        let owned = |m: &ObjectMeta| owned_by(m, &farm).is_ok();
        let all = ListParams::default();
        let mut left = Vec::new();
        left.extend(objects_where::<StatefulSet>(c, NS, &all, |o| owned(&o.metadata)).await?);
        left.extend(objects_where::<Service>(c, NS, &all, |o| owned(&o.metadata)).await?);
        left.extend(objects_where::<ConfigMap>(c, NS, &all, |o| owned(&o.metadata)).await?);
        left.extend(objects_where::<Secret>(c, NS, &all, |o| owned(&o.metadata)).await?);
        left.extend(objects_where::<NetworkPolicy>(c, NS, &all, |o| owned(&o.metadata)).await?);
        let pods = ListParams::default().labels(&format!("app.kubernetes.io/instance={FARM}"));
        left.extend(objects_where::<Pod>(c, NS, &pods, |_| true).await?);
        let claims = format!("data-{FARM}-");
        left.extend(
            objects_where::<PersistentVolumeClaim>(c, NS, &all, |o| {
                o.name_any().starts_with(&claims)
            })
            .await?,
        );
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(", "))
        }
    })
    .await;

    c.helm_ok(&[
        "uninstall",
        RELEASE,
        "--namespace",
        OPERATOR_NS,
        "--wait",
        "--timeout",
        "2m",
    ])
    .await;
    eventually("the operator's objects gone", SETTLE, || async {
        let d = c
            .api::<Deployment>(OPERATOR_NS)
            .get_opt(RELEASE)
            .await
            .map_err(|e| e.to_string())?;
        let roles = c
            .kubectl(&["get", "clusterrole,clusterrolebinding", "-o", "name"])
            .await;
        let left: Vec<&str> = roles
            .stdout
            .lines()
            .filter(|l| l.contains("bitsfarm"))
            .collect();
        if d.is_none() && left.is_empty() {
            Ok(())
        } else {
            Err(format!("Deployment {}, RBAC {left:?}", d.is_some()))
        }
    })
    .await;
    c.kubectl_ok(&["delete", "namespace", NS, OPERATOR_NS, "--timeout=180s"])
        .await;
}
