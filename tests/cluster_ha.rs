//! A cluster's ordinary day on a real node (issue 17), with uploads in flight: every server of a
//! 3-server farm evicted in turn through the eviction API (one node, so no `kubectl drain`), the
//! leading operator deleted, and a `helm upgrade` to a new image tag. Then the API server's audit
//! log shows that the two operator replicas never wrote at the same time.
//!
//! ```sh
//! tests/cluster/cluster.sh run cargo test --test cluster_ha -- --nocapture
//! ```
//!
//! Each wait is bounded; a failed step prints the pods, the farm and both operators' logs. The
//! figures the README quotes (takeover time, each step's duration) are printed at the end.

mod common;
#[path = "common/kube.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use harness::{Cluster, condition, eventually, manifest_dir, owned_by, pod_ready, say};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

const NS: &str = "uploads";
const FARM: &str = "crash-reports";
const OPERATOR_NS: &str = "bitsfarm-system";
const RELEASE: &str = "bitsfarm-operator";
const OPERATOR_SA: &str = "system:serviceaccount:bitsfarm-system:bitsfarm-operator";
const SETTLE: Duration = Duration::from_secs(180);
const UPLOAD_BYTES: usize = 48 << 20;
const FRAGMENT: usize = 4 << 20;
/// Three uploads of 48 MiB share this link for about 70 s: long enough to span what the cluster
/// does to the farm.
const SLOW_LINK: &str = "16mbit";
/// The farm: the backend example at three servers, draining within two minutes.
const SERVERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_failover_and_upgrades_with_uploads_in_flight() {
    let Some(c) = Cluster::from_env("cluster_ha").await else {
        return;
    };
    let started = Instant::now();
    let mut report = Vec::new();
    let result = std::panic::AssertUnwindSafe(scenario(&c, &mut report))
        .catch_unwind()
        .await;
    let _ = c
        .node(
            &["tc", "qdisc", "del", "dev", "cni0", "root"],
            Duration::from_secs(20),
        )
        .await;
    if let Err(panic) = result {
        say("cluster_ha: FAILED; what the cluster looked like:");
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "uf,pdb", "-A", "-o", "wide"],
            vec!["get", "lease", "-n", OPERATOR_NS, "-o", "yaml"],
            vec![
                "logs",
                "-n",
                OPERATOR_NS,
                "-l",
                "app.kubernetes.io/name=bitsfarm-operator",
                "--tail=40",
                "--prefix",
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
    say(&format!(
        "cluster_ha: all steps passed in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        report.join("\n")
    ));
}

async fn scenario(c: &Cluster, report: &mut Vec<String>) {
    let mut writers = Writers {
        since: jiff::Timestamp::now(),
        by_ip: BTreeMap::new(),
    };
    let t = Instant::now();
    install(c, &mut writers).await;
    report.push(format!(
        "  {:>6.1} s  install: CRDs, helm install (2 operator replicas), the 3-server farm Ready",
        t.elapsed().as_secs_f64()
    ));

    let work = tempfile::tempdir().expect("temp dir");
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

    let t = Instant::now();
    let uploads = start_uploads(c, work.path(), "evict", 20).await;
    let refused = evict_every_server(c).await;
    finish_uploads(c, uploads).await;
    report.push(format!(
        "  {:>6.1} s  every server evicted in turn while 3 uploads ran; {refused} second evictions refused (429)",
        t.elapsed().as_secs_f64()
    ));

    // A leader that stops cleanly gives the Lease up; one killed outright (a lost node) holds it
    // until its term ends.
    for (force, how) in [
        (false, "deleted"),
        (true, "force-deleted (killed, no release)"),
    ] {
        let t = Instant::now();
        let (takeover, reconciled, by) = failover(c, &mut writers, force).await;
        report.push(format!(
            "  {:>6.1} s  leader {how}: {by} took the Lease after {:.1} s; the farm change made meanwhile was applied {:.1} s after the delete",
            t.elapsed().as_secs_f64(),
            takeover.as_secs_f64(),
            reconciled.as_secs_f64()
        ));
    }

    let t = Instant::now();
    let uploads = start_uploads(c, work.path(), "upgrade", 30).await;
    let order = upgrade(c, &mut writers).await;
    finish_uploads(c, uploads).await;
    report.push(format!(
        "  {:>6.1} s  helm upgrade to a new tag while 3 uploads ran: operator rolled, farm pods replaced in order {order:?}",
        t.elapsed().as_secs_f64()
    ));

    let summary = one_writer_at_a_time(&writers);
    report.push(format!("  audit log: {summary}"));
}

// ---------------------------------------------------------------------------------------------
// Install

async fn install(c: &Cluster, writers: &mut Writers) {
    let _ = c
        .kubectl(&[
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
    let crds = manifest_dir().join("crds");
    c.kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()])
        .await;
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
    let pods = operator_pods(c, 2).await;
    writers.note(&pods);
    // The Lease outlives an uninstall: an earlier test's operator may still be named in it
    // until its term runs out, so wait for one of these pods.
    let leader = lease_holder_among(c, &names(&pods))
        .await
        .expect("a leader among the installed pods within the wait");
    assert!(
        pods.iter().any(|p| p.name_any() == leader),
        "{leader} is no operator pod"
    );
    // Both ready; the leader says 1 in /metrics, the standby 0, and says so in its log.
    // The gauge follows the Lease a moment later (the new holder sets it once its write
    // returns, and the Lease may have been read in between), so it is waited for, not sampled.
    for p in &pods {
        let pod = p.name_any();
        let want = if pod == leader { 1.0 } else { 0.0 };
        let m = eventually(
            &format!("{pod}'s bitsfarm_operator_leader to read {want}"),
            SETTLE,
            || async {
                let m = c.pod_get(OPERATOR_NS, &pod, 8081, "/metrics").await?;
                match harness::metric(&m, "bitsfarm_operator_leader") {
                    Some(v) if v == want => Ok(m),
                    other => Err(format!("it reads {other:?}")),
                }
            },
        )
        .await;
        assert_eq!(
            harness::metric(&m, "bitsfarm_operator_leader"),
            Some(want),
            "{pod}"
        );
        if want == 0.0 {
            let log = c
                .kubectl_ok(&["logs", "-n", OPERATOR_NS, &p.name_any()])
                .await;
            assert!(log.contains("not the leader"), "standby's log: {log}");
        }
    }
    say(&format!("  operators {:?}, leader {leader}", names(&pods)));

    c.kubectl_ok(&["create", "namespace", NS]).await;
    let ex = manifest_dir().join("examples");
    c.kubectl_ok(&["apply", "-f", ex.join("receiver.yaml").to_str().unwrap()])
        .await;
    let farm = std::fs::read_to_string(ex.join("uploadfarm-backend.yaml"))
        .expect("the backend example")
        .replace(
            "  replicas: 2\n",
            "  replicas: 3\n  drainTimeoutSeconds: 120\n",
        );
    assert!(farm.contains("replicas: 3"), "the example changed: {farm}");
    c.kubectl_ok_in(&["apply", "-f", "-"], &farm).await;
    for what in [format!("uploadfarm/{FARM}"), "deploy/receiver".to_string()] {
        let cond = if what.starts_with("deploy") {
            "Available"
        } else {
            "Ready"
        };
        c.kubectl_ok(&[
            "wait",
            "-n",
            NS,
            &format!("--for=condition={cond}"),
            &what,
            "--timeout=5m",
        ])
        .await;
    }
    let farm = c.farm(NS, FARM).await.expect("the farm");
    let pdb: PodDisruptionBudget = c.api(NS).get(FARM).await.expect("the farm's PDB");
    owned_by(&pdb.metadata, &farm).expect("the PDB is the farm's");
    let spec = pdb.spec.clone().unwrap_or_default();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
}

async fn operator_pods(c: &Cluster, want: usize) -> Vec<Pod> {
    eventually(&format!("{want} Ready operator pods"), SETTLE, || async {
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
        if live.len() == want && live.iter().all(pod_ready) {
            Ok(live)
        } else {
            Err(format!(
                "operator pods: {:?}",
                live.iter()
                    .map(|p| (p.name_any(), pod_ready(p)))
                    .collect::<Vec<_>>()
            ))
        }
    })
    .await
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(ResourceExt::name_any).collect()
}

/// The Lease's holder, once there is one.
async fn lease_holder(c: &Cluster) -> Option<String> {
    let leases: Api<Lease> = c.api(OPERATOR_NS);
    let start = Instant::now();
    while start.elapsed() < SETTLE {
        if let Ok(l) = leases.get(RELEASE).await
            && let Some(h) = l.spec.and_then(|s| s.holder_identity)
        {
            return Some(h);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The Lease's holder once it is one of `pods`, within the settle time.
async fn lease_holder_among(c: &Cluster, pods: &[String]) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < SETTLE {
        if let Some(h) = lease_holder(c).await
            && pods.contains(&h)
        {
            return Some(h);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Uploads from the node

struct NodeUpload {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<Value>,
    sha: String,
}

/// Three uploads from the node to the farm's shared address, each past its first fragment.
async fn start_uploads(c: &Cluster, work: &Path, tag: &str, seed: u64) -> Vec<NodeUpload> {
    let farm = c.farm(NS, FARM).await.expect("the farm");
    let base = farm.status.and_then(|s| s.url).expect("status.url");
    let mut out = Vec::new();
    for i in 0..3u64 {
        let data = common::random_bytes(UPLOAD_BYTES, seed + i);
        let file = work.join(format!("{tag}-{i}.bin"));
        std::fs::write(&file, &data).expect("write the upload's file");
        let url = format!("{}/dumps/{tag}-{i}.bin", base.trim_end_matches('/'));
        let fragment = FRAGMENT.to_string();
        let bin = env!("CARGO_BIN_EXE_bitsfarm");
        let mut child = c
            .node_command(&[
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
                file.to_str().unwrap(),
                &url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the upload in the node's namespace");
        let stdout = child.stdout.take().expect("stdout");
        let mut up = NodeUpload {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
            seen: Vec::new(),
            sha: common::sha256_hex(&data),
        };
        up.event("a session", Duration::from_secs(60), |v| {
            v["event"] == "session"
        })
        .await;
        out.push(up);
    }
    out
}

impl NodeUpload {
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
            if v["event"] != "progress" {
                self.seen.push(v.clone());
            }
            if pred(&v) {
                return v;
            }
        }
    }
}

/// Every upload completes, with at most one fragment resent and one session, and the receiver
/// holds exactly one copy of each.
async fn finish_uploads(c: &Cluster, uploads: Vec<NodeUpload>) {
    let mut tasks = Vec::new();
    for mut up in uploads {
        tasks.push(tokio::spawn(async move {
            let done = up
                .event("the final report", Duration::from_secs(480), |v| {
                    v["event"] == "done" || v["event"] == "failed"
                })
                .await;
            let status = tokio::time::timeout(Duration::from_secs(30), up.child.wait())
                .await
                .expect("the client exits after its report")
                .expect("wait for the client");
            (status.code().unwrap_or(-1), done, up.seen, up.sha)
        }));
    }
    for t in tasks {
        let (code, done, seen, sha) = t.await.expect("an upload task");
        assert_eq!(code, 0, "{done}; seen {seen:?}");
        let n = |k: &str| {
            done["report"][k]
                .as_u64()
                .unwrap_or_else(|| panic!("report.{k}: {done}"))
        };
        assert!(
            n("bytes_sent") <= (UPLOAD_BYTES + FRAGMENT) as u64,
            "more than one fragment resent: {done}"
        );
        assert_eq!(n("restarts"), 0, "{done}");
        assert_eq!(n("sessions"), 1, "{done}");
        let copies = eventually(
            "the delivery at the receiver",
            Duration::from_secs(60),
            || async {
                match common::stored_copies(&c.volume_dir(NS, "receiver-data").await, &sha) {
                    0 => Err("no copy yet".to_string()),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(copies, 1, "copies at the receiver of {sha}");
    }
}

// ---------------------------------------------------------------------------------------------
// Evictions

/// A client that takes the API server's 429 as the answer: kube retries it by default, and a
/// refused eviction would then hang until the budget allows it.
async fn no_retry_client(c: &Cluster) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig).expect("the kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a usable kubeconfig");
    config.default_retry = false;
    kube::Client::try_from(config).expect("a client")
}

async fn farm_pods(c: &Cluster) -> Vec<Pod> {
    c.api::<Pod>(NS)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={FARM}")))
        .await
        .expect("list the farm's pods")
        .items
}

/// Evicts each server through the eviction API, highest first, each once the farm is whole
/// again; right after each, a second eviction must be refused (429) while that server is out.
/// Returns how many second evictions were refused.
async fn evict_every_server(c: &Cluster) -> usize {
    let pods: Api<Pod> = Api::namespaced(no_retry_client(c).await, NS);
    let mut refused = 0;
    let mut saw_disrupted = false;
    for ordinal in (0..SERVERS).rev() {
        let name = format!("{FARM}-{ordinal}");
        // The budget allows one eviction once every server is ready.
        eventually(
            "the farm whole, the budget allowing one eviction",
            SETTLE,
            || async {
                let pdb: PodDisruptionBudget =
                    c.api(NS).get(FARM).await.map_err(|e| e.to_string())?;
                let st = pdb.status.unwrap_or_default();
                let ready = farm_pods(c)
                    .await
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
                    .count();
                (st.disruptions_allowed == 1 && ready == SERVERS)
                    .then_some(())
                    .ok_or(format!(
                        "disruptionsAllowed {}, {ready} ready",
                        st.disruptions_allowed
                    ))
            },
        )
        .await;
        let uid = pods.get(&name).await.expect("the pod").metadata.uid;
        pods.evict(&name, &EvictParams::default())
            .await
            .unwrap_or_else(|e| panic!("evicting {name}: {e}"));
        // While it drains, the budget refuses every other server.
        let other = format!("{FARM}-{}", (ordinal + 1) % SERVERS);
        let second = eventually(
            "the budget to count the evicted server out",
            Duration::from_secs(30),
            || async {
                match pods.evict(&other, &EvictParams::default()).await {
                    Err(kube::Error::Api(s)) if s.code == 429 => Ok(s.message),
                    Err(e) => Err(format!("evicting {other}: {e}")),
                    Ok(_) => {
                        panic!("{other} was evicted while {name} was out: the budget let two go")
                    }
                }
            },
        )
        .await;
        refused += 1;
        say(&format!("  evicted {name}; {other} refused: {second}"));
        // Replaced and ready again; meanwhile the farm says why it is short.
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "{name} was not replaced"
            );
            let farm = c.farm(NS, FARM).await.expect("the farm");
            saw_disrupted |= condition(&farm, "Ready").is_some_and(|r| r.reason == "Disrupted");
            let now = pods.get_opt(&name).await.expect("get pod");
            if let Some(p) = now
                && p.metadata.uid != uid
                && pod_ready(&p)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        saw_disrupted,
        "the farm's Ready condition never said Disrupted"
    );
    refused
}

// ---------------------------------------------------------------------------------------------
// Failover

/// Deletes the leading operator pod (`force`: at once, without its SIGTERM, as a lost node
/// would) and, right after, changes the farm. Returns how long until another replica held the
/// Lease, how long until the change was applied, and which replica took over (the standby, or
/// the Deployment's replacement for the deleted pod, whichever was first).
async fn failover(c: &Cluster, writers: &mut Writers, force: bool) -> (Duration, Duration, String) {
    let pods = names(&operator_pods(c, 2).await);
    let old = lease_holder_among(c, &pods).await.expect("a leader");
    let standby: Vec<String> = pods.into_iter().filter(|n| *n != old).collect();
    let start = Instant::now();
    let mut delete = vec![
        "delete",
        "pod",
        "-n",
        OPERATOR_NS,
        old.as_str(),
        "--wait=false",
    ];
    if force {
        delete.extend(["--force", "--grace-period=0"]);
    }
    c.kubectl_ok(&delete).await;
    c.kubectl_ok(&[
        "patch",
        "uploadfarm",
        "-n",
        NS,
        FARM,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"service":{{"annotations":{{"bitsfarm.io/failover-test":"{force}"}}}}}}}}"#),
    ])
    .await;
    let leases: Api<Lease> = c.api(OPERATOR_NS);
    let takeover = loop {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "nobody took the Lease from {old}"
        );
        let holder = leases
            .get(RELEASE)
            .await
            .ok()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        if holder.as_ref().is_some_and(|h| *h != old) {
            break start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let services: Api<Service> = c.api(NS);
    let reconciled = eventually(
        "the farm change applied by the new leader",
        Duration::from_secs(90),
        || async {
            let s = services.get(FARM).await.map_err(|e| e.to_string())?;
            (s.annotations().get("bitsfarm.io/failover-test") == Some(&force.to_string()))
                .then(|| start.elapsed())
                .ok_or("not yet".to_string())
        },
    )
    .await;
    let new = lease_holder(c).await.expect("a leader");
    let by = if standby.contains(&new) {
        format!("the standby {new}")
    } else {
        format!("the replacement pod {new}")
    };
    say(&format!(
        "  {old} deleted (force: {force}): {by} took the Lease after {:.1} s",
        takeover.as_secs_f64()
    ));
    // Killed outright, the leader cannot give the Lease up: its term (15 s) bounds the wait.
    assert!(
        takeover < Duration::from_secs(25),
        "takeover took {takeover:?}"
    );
    let pods = operator_pods(c, 2).await;
    writers.note(&pods);
    (takeover, reconciled, by)
}

// ---------------------------------------------------------------------------------------------
// Upgrade

/// `helm upgrade` to the same image under a new tag; returns the order in which the farm's pods
/// were replaced (it must be highest first, one at a time).
async fn upgrade(c: &Cluster, writers: &mut Writers) -> Vec<usize> {
    // The same image under a new name: a new tag is all an upgrade changes in the pods.
    let sock = c.work.join("containerd/containerd.sock");
    let ctr = |args: Vec<String>| {
        let sock = sock.clone();
        async move {
            let mut all = vec![
                "--address".to_string(),
                sock.to_string_lossy().to_string(),
                "-n".into(),
                "k8s.io".into(),
            ];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            c.run("ctr", &refs, None, Duration::from_secs(60)).await
        }
    };
    let list = ctr(vec!["images".into(), "ls".into(), "-q".into()]).await;
    assert!(list.ok, "ctr images ls: {}", list.stderr);
    let source = list
        .stdout
        .lines()
        .find(|l| l.ends_with(&format!("/{}", c.image)) || *l == c.image)
        .unwrap_or_else(|| panic!("{} is not in the node's images: {}", c.image, list.stdout))
        .to_string();
    let (repo, _) = source.rsplit_once(':').expect("a tagged image");
    let new_tag = format!("{}-ha2", c.image.rsplit_once(':').expect("tag").1);
    let tagged = ctr(vec![
        "images".into(),
        "tag".into(),
        "--force".into(),
        source.clone(),
        format!("{repo}:{new_tag}"),
    ])
    .await;
    assert!(tagged.ok, "ctr images tag: {}", tagged.stderr);

    let before: Vec<Option<String>> = {
        let pods = farm_pods(c).await;
        (0..SERVERS)
            .map(|i| {
                pods.iter()
                    .find(|p| p.name_any() == format!("{FARM}-{i}"))
                    .and_then(|p| p.metadata.uid.clone())
            })
            .collect()
    };
    let chart = manifest_dir().join("charts/bitsfarm-operator");
    let helm = {
        let chart = chart.to_string_lossy().to_string();
        let helm = c.helm.clone();
        let kubeconfig = c.kubeconfig.to_string_lossy().to_string();
        let tag = new_tag.clone();
        tokio::spawn(async move {
            tokio::process::Command::new(helm)
                .args([
                    "--kubeconfig",
                    &kubeconfig,
                    "upgrade",
                    RELEASE,
                    &chart,
                    "--namespace",
                    OPERATOR_NS,
                    "--reuse-values",
                    "--set",
                    &format!("image.tag={tag}"),
                    "--wait",
                    "--timeout",
                    "5m",
                ])
                .output()
                .await
        })
    };
    let sts_api = c.api::<StatefulSet>(NS);
    let mut replaced: Vec<usize> = Vec::new();
    let mut worst = 0;
    let mut helm_done = None;
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the upgrade did not end: replaced {replaced:?}"
        );
        let pods = farm_pods(c).await;
        let up_now = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .count();
        worst = worst.max(SERVERS.saturating_sub(up_now));
        for (i, uid) in before.iter().enumerate() {
            let now = pods
                .iter()
                .find(|p| p.name_any() == format!("{FARM}-{i}"))
                .and_then(|p| p.metadata.uid.clone());
            if now.is_some() && now != *uid && !replaced.contains(&i) {
                replaced.push(i);
            }
        }
        if helm_done.is_none() && helm.is_finished() {
            helm_done = Some(start.elapsed());
        }
        let st = sts_api
            .get(FARM)
            .await
            .expect("StatefulSet")
            .status
            .unwrap_or_default();
        if replaced.len() == SERVERS
            && st.current_revision == st.update_revision
            && st.ready_replicas == Some(SERVERS as i32)
            && helm_done.is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = helm.await.expect("helm task").expect("helm ran");
    assert!(
        out.status.success(),
        "helm upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        replaced,
        (0..SERVERS).rev().collect::<Vec<_>>(),
        "not highest ordinal first"
    );
    assert!(worst <= 1, "{worst} servers were out at once");
    let sts = sts_api.get(FARM).await.expect("StatefulSet");
    let image = sts
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.first().and_then(|c| c.image.clone()));
    assert!(
        image.as_deref().is_some_and(|i| i.ends_with(&new_tag)),
        "farm image {image:?}"
    );
    let pods = operator_pods(c, 2).await;
    writers.note(&pods);
    say(&format!(
        "  helm upgrade returned after {:.1} s; farm pods replaced {replaced:?}, at most {worst} out",
        helm_done.unwrap_or_default().as_secs_f64()
    ));
    replaced
}

// ---------------------------------------------------------------------------------------------
// One writer at a time

/// The operator pods seen during the test, by address: the audit log names a writer by the
/// address its request came from (both replicas use the same ServiceAccount).
struct Writers {
    /// When this test began: earlier writes (another test's, on the same cluster) are not ours.
    since: jiff::Timestamp,
    by_ip: BTreeMap<String, String>,
}

impl Writers {
    fn note(&mut self, pods: &[Pod]) {
        for p in pods {
            if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) {
                self.by_ip.insert(ip, p.name_any());
            }
        }
    }
}

/// Reads the API server's audit log: every write the operators made to anything but their
/// Lease, in time order, grouped by the pod that made it. Each pod's writes must form one
/// stretch of time that no other pod's writes enter.
fn one_writer_at_a_time(writers: &Writers) -> String {
    let path = std::env::var("BITSFARM_E2E_AUDIT_LOG").expect("cluster.sh names the audit log");
    let text = std::fs::read_to_string(&path).expect("the audit log");
    let mut writes: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let verb = e["verb"].as_str().unwrap_or_default();
        if e["stage"] != "ResponseComplete"
            || e["user"]["username"] != OPERATOR_SA
            || e["objectRef"]["resource"] == "leases"
            || !["create", "update", "patch", "delete"].contains(&verb)
        {
            continue;
        }
        let ip = e["sourceIPs"][0].as_str().unwrap_or_default().to_string();
        let at = e["requestReceivedTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Ok(when) = at.parse::<jiff::Timestamp>() else {
            continue;
        };
        if when < writers.since {
            continue;
        }
        writes.push((at, ip));
    }
    writes.sort();
    assert!(!writes.is_empty(), "no operator writes in the audit log");
    let mut stretches: Vec<(String, usize)> = Vec::new();
    for (_, ip) in &writes {
        match stretches.last_mut() {
            Some((last, n)) if last == ip => *n += 1,
            _ => stretches.push((ip.clone(), 1)),
        }
    }
    let name = |ip: &str| {
        writers
            .by_ip
            .get(ip)
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    };
    // Writers must be told apart, or the check below could not fail: every write came from a
    // known operator pod, and the failover made at least two of them write.
    for (ip, _) in &stretches {
        assert!(
            writers.by_ip.contains_key(ip),
            "a write from {ip}, no operator pod seen: {:?}",
            writers.by_ip
        );
    }
    assert!(
        stretches.len() >= 2,
        "one writer only, though the leader changed: {stretches:?}"
    );
    let mut seen = BTreeSet::new();
    for (ip, _) in &stretches {
        assert!(
            seen.insert(ip.clone()),
            "{} wrote again after another operator had written: two writers overlapped; stretches {:?}",
            name(ip),
            stretches
                .iter()
                .map(|(i, n)| (name(i), *n))
                .collect::<Vec<_>>()
        );
    }
    format!(
        "{} operator writes by {} pods, one after another: {:?}",
        writes.len(),
        stretches.len(),
        stretches
            .iter()
            .map(|(i, n)| (name(i), *n))
            .collect::<Vec<_>>()
    )
}
