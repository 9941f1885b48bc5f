//! The operator, run as a process, against a real cluster (issues 5 and 13): the reconcile's
//! children, status, events and metrics with pods that really start on the test node, repairs of
//! objects edited by hand, farms it cannot realize, and no needless writes across a restart.
//!
//! `scripts/test` runs it inside `tests/cluster/cluster.sh run` (control plane, a node with
//! containerd and the bitsfarm image loaded), which exports the variables `common/kube.rs` reads;
//! without them the test says loudly that it was skipped. By hand:
//!
//! ```sh
//! tests/cluster/cluster.sh run cargo test --test cluster_e2e -- --nocapture
//! ```
//!
//! Every wait is bounded. The farms' pods run the image `cluster.sh image` built from this
//! checkout; the operator is this build's binary.

#[path = "common/kube.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bitsfarm::api::UploadFarm;
use futures_util::FutureExt as _;
use harness::{
    Cluster, condition, events_of, eventually, manifest_dir, metric, objects_where, owned_by, say,
    tail,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::ListParams;

const MANAGED: &str = "app.kubernetes.io/managed-by=bitsfarm-operator";
const FARM_PODS: &str = "app.kubernetes.io/name=bitsfarm";
/// Bound of each wait for the operator, the controller-manager or the node to act.
const SETTLE: Duration = Duration::from_secs(180);

/// `bitsfarm operator` as a separate process with the test cluster's kubeconfig.
struct Operator {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Operator {
    async fn start(c: &Cluster, n: u32) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = c.work.join(format!("operator-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
            .args([
                "operator",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--image",
                &c.image,
                // The only operator, run as a process: no Lease to wait for.
                "--no-leader-election",
            ])
            .env("KUBECONFIG", &c.kubeconfig)
            .env("RUST_LOG", "info,bitsfarm=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("bitsfarm operator starts");
        let mut op = Operator { child, port, log };
        let what = format!("the operator's /readyz (log {})", op.log.display());
        let port = op.port;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = op.child.try_wait() {
                panic!(
                    "the operator exited with {status} during start-up:\n{}",
                    tail(&op.log, 40)
                );
            }
            if http_get(port, "/readyz").await.is_ok_and(|(s, _)| s == 200) {
                break;
            }
            assert!(start.elapsed() < SETTLE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        say(&format!(
            "operator {n} ready on 127.0.0.1:{port} (pid {:?})",
            op.child.id()
        ));
        op
    }

    async fn metrics(&self) -> Result<String, String> {
        match http_get(self.port, "/metrics").await {
            Ok((200, body)) => Ok(body),
            Ok((s, _)) => Err(format!("/metrics answered {s}")),
            Err(e) => Err(e),
        }
    }

    /// SIGTERM, then a bounded wait for a clean exit.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => {
                assert!(
                    status.success(),
                    "the operator exited with {status} on SIGTERM:\n{}",
                    tail(&self.log, 40)
                );
            }
            _ => panic!("the operator did not stop within 30 s of SIGTERM"),
        }
    }
}

async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    // reqwest is built without a default rustls provider; bitsfarm uses ring.
    bitsfarm::server::tls::install_ring_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// An example farm as the test expects it.
#[derive(Clone, Debug)]
struct Expect {
    name: String,
    ns: String,
    replicas: i32,
    template: String,
    /// `spec.networkPolicy.enabled`.
    network_policy: bool,
}

/// Every manifest in examples/, in name order (the receiver sorts before the farm that uses it).
fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    files
}

/// The UploadFarms among the examples.
fn examples() -> Vec<Expect> {
    example_files()
        .into_iter()
        .filter_map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            if !text.contains("kind: UploadFarm") {
                return None;
            }
            let farm: UploadFarm =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            Some(Expect {
                name: farm.name_any(),
                ns: farm.namespace().unwrap_or_else(|| "default".into()),
                replicas: farm.spec.replicas,
                template: farm.spec.host_ids.template.clone(),
                network_policy: farm.spec.network_policy.as_ref().is_some_and(|n| n.enabled),
            })
        })
        .collect()
}

fn expected_host_id(e: &Expect, ordinal: i32) -> String {
    e.template
        .replace("{pod}", &format!("{}-{ordinal}", e.name))
        .replace("{ordinal}", &ordinal.to_string())
        .replace("{namespace}", &e.ns)
}

/// Every child the operator applies for `e` exists and is owned by the farm; the
/// controller-manager made pods NAME-0..N-1 from the StatefulSet.
async fn children_exist(c: &Cluster, e: &Expect) -> Result<(), String> {
    let farm = c.farm(&e.ns, &e.name).await?;
    let cms = c.api::<ConfigMap>(&e.ns);
    let svcs = c.api::<Service>(&e.ns);
    let sets = c.api::<StatefulSet>(&e.ns);
    let pods = c.api::<Pod>(&e.ns);
    let cm = cms
        .get(&format!("{}-config", e.name))
        .await
        .map_err(|x| format!("ConfigMap: {x}"))?;
    owned_by(&cm.metadata, &farm)?;
    // The handoff secret: made by the operator, owned by the farm, 32 random bytes in hex.
    let secret = c
        .api::<Secret>(&e.ns)
        .get(&format!("{}-handoff", e.name))
        .await
        .map_err(|x| format!("handoff Secret: {x}"))?;
    owned_by(&secret.metadata, &farm)?;
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get("secret"))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    if key.len() != 64 || !key.iter().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "handoff Secret holds {} bytes, not 64 hex digits",
            key.len()
        ));
    }
    // The NetworkPolicy, as the API server accepted it.
    let policies = c.api::<NetworkPolicy>(&e.ns);
    let policy = policies
        .get_opt(&format!("{}-network-policy", e.name))
        .await
        .map_err(|x| format!("NetworkPolicy: {x}"))?;
    match (e.network_policy, policy) {
        (true, Some(p)) => owned_by(&p.metadata, &farm)?,
        (false, None) => {}
        (want, got) => {
            return Err(format!(
                "NetworkPolicy wanted: {want}, found: {}",
                got.is_some()
            ));
        }
    }
    let headless = svcs
        .get(&format!("{}-headless", e.name))
        .await
        .map_err(|x| format!("headless Service: {x}"))?;
    owned_by(&headless.metadata, &farm)?;
    let cip = headless.spec.as_ref().and_then(|s| s.cluster_ip.clone());
    if cip.as_deref() != Some("None") {
        return Err(format!("headless Service has clusterIP {cip:?}"));
    }
    let shared = svcs
        .get(&e.name)
        .await
        .map_err(|x| format!("shared Service: {x}"))?;
    owned_by(&shared.metadata, &farm)?;
    let sts = sets
        .get(&e.name)
        .await
        .map_err(|x| format!("StatefulSet: {x}"))?;
    owned_by(&sts.metadata, &farm)?;
    let spec = sts.spec.as_ref().ok_or("StatefulSet without spec")?;
    if spec.service_name.as_deref() != Some(format!("{}-headless", e.name).as_str()) {
        return Err(format!("StatefulSet serviceName {:?}", spec.service_name));
    }
    for i in 0..e.replicas {
        let svc = svcs
            .get(&format!("{}-{i}", e.name))
            .await
            .map_err(|x| format!("per-pod Service {}-{i}: {x}", e.name))?;
        owned_by(&svc.metadata, &farm)?;
        let pod = pods
            .get(&format!("{}-{i}", e.name))
            .await
            .map_err(|x| format!("Pod {}-{i}: {x}", e.name))?;
        let by_sts = pod
            .owner_references()
            .iter()
            .any(|r| r.kind == "StatefulSet" && r.name == e.name);
        if !by_sts {
            return Err(format!(
                "Pod {}-{i} is not owned by the StatefulSet",
                e.name
            ));
        }
    }
    Ok(())
}

/// `kubectl wait --for=condition=Ready`, then the status in detail.
async fn farm_is_ready(c: &Cluster, e: &Expect) {
    c.kubectl_ok(&[
        "wait",
        "-n",
        &e.ns,
        "--for=condition=Ready",
        &format!("uploadfarm/{}", e.name),
        "--timeout=90s",
    ])
    .await;
    // kubectl wait passed on the condition; the rest of the status may be written in the same
    // patch, but give the operator one more reconcile if it is not.
    eventually(
        &format!("the full status of {}/{}", e.ns, e.name),
        SETTLE,
        || async {
            let farm = c.farm(&e.ns, &e.name).await?;
            let status = farm.status.clone().ok_or("no status")?;
            let generation = farm.metadata.generation;
            if status.observed_generation != generation {
                return Err(format!(
                    "observedGeneration {:?} != generation {generation:?}",
                    status.observed_generation
                ));
            }
            for cond in &status.conditions {
                if cond.observed_generation != generation {
                    return Err(format!(
                        "condition {} has observedGeneration {:?}",
                        cond.type_, cond.observed_generation
                    ));
                }
            }
            let ready = condition(&farm, "Ready").ok_or("no Ready condition")?;
            if ready.status != "True" {
                return Err(format!("Ready is {} ({})", ready.status, ready.reason));
            }
            if status.replicas != e.replicas || status.ready_replicas != e.replicas {
                return Err(format!(
                    "replicas {} ready {} (want {})",
                    status.replicas, status.ready_replicas, e.replicas
                ));
            }
            let hosts: Vec<(i32, String, String, bool)> = status
                .hosts
                .iter()
                .map(|h| (h.ordinal, h.pod.clone(), h.host_id.clone(), h.ready))
                .collect();
            let want: Vec<(i32, String, String, bool)> = (0..e.replicas)
                .map(|i| (i, format!("{}-{i}", e.name), expected_host_id(e, i), true))
                .collect();
            if hosts != want {
                return Err(format!("status.hosts {hosts:?}, want {want:?}"));
            }
            Ok(())
        },
    )
    .await;
    // The printer columns.
    let table = c
        .kubectl_ok(&["get", "uf", "-n", &e.ns, &e.name, "-o", "wide"])
        .await;
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    for col in [
        "NAME", "REPLICAS", "READY", "HOST-IDS", "AGE", "REASON", "MESSAGE",
    ] {
        assert!(header.contains(col), "no {col} column in:\n{table}");
    }
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.first(), Some(&e.name.as_str()), "{table}");
    assert_eq!(
        row.get(1),
        Some(&e.replicas.to_string().as_str()),
        "{table}"
    );
    assert_eq!(row.get(2), Some(&"True"), "{table}");
    assert!(table.contains("AllReplicasReady"), "{table}");
}

/// resourceVersion of every UploadFarm and every object the operator manages, by kind/ns/name.
async fn resource_versions(c: &Cluster, namespaces: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let managed = ListParams::default().labels(MANAGED);
    for ns in namespaces {
        macro_rules! collect {
            ($kind:ty, $label:expr, $lp:expr) => {
                for o in c.api::<$kind>(ns).list(&$lp).await.expect("list").items {
                    out.insert(
                        format!("{}/{ns}/{}", $label, o.name_any()),
                        o.resource_version().unwrap_or_default(),
                    );
                }
            };
        }
        collect!(UploadFarm, "UploadFarm", ListParams::default());
        collect!(StatefulSet, "StatefulSet", managed);
        collect!(Service, "Service", managed);
        collect!(ConfigMap, "ConfigMap", managed);
        collect!(NetworkPolicy, "NetworkPolicy", managed);
    }
    out
}

fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", a.get(k), b.get(k)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploadfarm_operator_against_a_real_api_server() {
    let Some(c) = Cluster::from_env("cluster_e2e").await else {
        return;
    };
    let started = Instant::now();
    let mut operator: Option<Operator> = None;
    let result = std::panic::AssertUnwindSafe(scenario(&c, &mut operator))
        .catch_unwind()
        .await;
    if let Err(panic) = result {
        if let Some(op) = &operator {
            say(&format!(
                "FAILED; last lines of the operator's log {}:\n{}",
                op.log.display(),
                tail(&op.log, 60)
            ));
        }
        std::panic::resume_unwind(panic);
    }
    say(&format!(
        "all steps passed in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// Nothing the operator made, and no farm pod, is left in `namespaces`.
async fn nothing_left(c: &Cluster, namespaces: &[&str]) -> Result<(), String> {
    let mut left = Vec::new();
    let managed = ListParams::default().labels(MANAGED);
    let pods = ListParams::default().labels(FARM_PODS);
    for ns in namespaces {
        left.extend(objects_where::<StatefulSet>(c, ns, &managed, |_| true).await?);
        left.extend(objects_where::<Service>(c, ns, &managed, |_| true).await?);
        left.extend(objects_where::<ConfigMap>(c, ns, &managed, |_| true).await?);
        left.extend(objects_where::<NetworkPolicy>(c, ns, &managed, |_| true).await?);
        left.extend(objects_where::<Pod>(c, ns, &pods, |_| true).await?);
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join(", "))
    }
}

async fn scenario(c: &Cluster, operator: &mut Option<Operator>) {
    let step = |s: &str| say(&format!("step: {s}"));
    let version = c
        .client
        .apiserver_version()
        .await
        .expect("API server version");
    say(&format!(
        "API server {} (kubectl {})",
        version.git_version, c.kubectl
    ));

    // Leftovers of an earlier run against the same cluster.
    let namespaces = ["default", "uploads"];
    if c.kubectl(&["get", "crd", "uploadfarms.bitsfarm.io"])
        .await
        .ok
    {
        c.kubectl_ok(&[
            "delete",
            "uploadfarms",
            "--all",
            "--all-namespaces",
            "--timeout=60s",
        ])
        .await;
        eventually("leftovers of an earlier run gone", SETTLE, || {
            nothing_left(c, &namespaces)
        })
        .await;
    }

    step("kubectl apply --server-side of crds/");
    let crds = manifest_dir().join("crds");
    c.kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()])
        .await;
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/uploadfarms.bitsfarm.io",
        "--timeout=60s",
    ])
    .await;

    step("the schema refuses a negative replica count");
    let negative = "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: negative\n  namespace: default\nspec:\n  replicas: -1\n";
    // Server-side: the API server itself must refuse it, not kubectl.
    let out = c
        .kubectl_in(&["apply", "--server-side", "-f", "-"], Some(negative))
        .await;
    assert!(
        !out.ok,
        "a negative replica count was accepted:\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("spec.replicas") && out.stderr.contains("Invalid value"),
        "unexpected refusal: {}",
        out.stderr
    );
    assert!(
        c.farm("default", "negative").await.is_err(),
        "the refused farm exists"
    );

    c.kubectl_in(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: uploads\n"),
    )
    .await;

    step("bitsfarm operator started as a process");
    *operator = Some(Operator::start(c, 1).await);

    step("kubectl apply of every file of examples/");
    let examples = examples();
    assert!(examples.len() >= 4, "examples/: {examples:?}");
    for file in example_files() {
        c.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]).await;
    }

    step("children exist with owner references; the controller-manager made the pods");
    for e in &examples {
        eventually(
            &format!("the children of {}/{}", e.ns, e.name),
            SETTLE,
            || children_exist(c, e),
        )
        .await;
    }
    step("the node runs every farm's pods; kubectl wait --for=condition=Ready");
    for e in &examples {
        farm_is_ready(c, e).await;
    }

    let main = examples
        .iter()
        .find(|e| e.replicas >= 3)
        .expect("an example with 3 replicas")
        .clone();
    let (ns, name) = (main.ns.as_str(), main.name.as_str());
    let svcs = c.api::<Service>(ns);

    step("kubectl scale --replicas=1 removes the per-pod Services of removed ordinals");
    c.kubectl_ok(&[
        "scale",
        "-n",
        ns,
        &format!("uploadfarm/{name}"),
        "--replicas=1",
    ])
    .await;
    let one = Expect {
        replicas: 1,
        ..main.clone()
    };
    eventually("per-pod Services of ordinals 1.. gone", SETTLE, || async {
        for i in 1..main.replicas {
            if svcs
                .get_opt(&format!("{name}-{i}"))
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Err(format!("Service {name}-{i} still exists"));
            }
        }
        let sts = c
            .api::<StatefulSet>(ns)
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let r = sts.spec.and_then(|s| s.replicas);
        if r != Some(1) {
            return Err(format!("StatefulSet replicas {r:?}"));
        }
        Ok(())
    })
    .await;
    eventually("pods of removed ordinals gone", SETTLE, || async {
        let pods = c
            .api::<Pod>(ns)
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
            .await
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = pods.items.iter().map(|p| p.name_any()).collect();
        if names == vec![format!("{name}-0")] {
            Ok(())
        } else {
            Err(format!("pods {names:?}"))
        }
    })
    .await;
    farm_is_ready(c, &one).await;

    step("a per-pod Service deleted by hand is put back");
    let before = svcs.get(&format!("{name}-0")).await.unwrap();
    c.kubectl_ok(&["delete", "service", "-n", ns, &format!("{name}-0")])
        .await;
    eventually("the per-pod Service put back", SETTLE, || async {
        let farm = c.farm(ns, name).await?;
        match svcs
            .get_opt(&format!("{name}-0"))
            .await
            .map_err(|e| e.to_string())?
        {
            Some(s) if s.metadata.uid != before.metadata.uid => owned_by(&s.metadata, &farm),
            Some(_) => Err("the old Service is still there".into()),
            None => Err("not there".into()),
        }
    })
    .await;

    step("a StatefulSet edited by hand is put back");
    let hash_before = c
        .farm(ns, name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.config_hash)
        .expect("status.configHash");
    c.kubectl_ok(&[
        "patch",
        "statefulset",
        "-n",
        ns,
        name,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":4,"template":{"metadata":{"annotations":{"bitsfarm.io/config-hash":"edited-by-hand"}}}}}"#,
    ])
    .await;
    let sts_restored = || async {
        let sts = c
            .api::<StatefulSet>(ns)
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let spec = sts.spec.ok_or("no spec")?;
        let ann = spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("bitsfarm.io/config-hash").cloned());
        if spec.replicas == Some(1) && ann.as_deref() == Some(hash_before.as_str()) {
            Ok(())
        } else {
            Err(format!("replicas {:?}, config-hash {ann:?}", spec.replicas))
        }
    };
    eventually("the StatefulSet restored", SETTLE, sts_restored).await;
    farm_is_ready(c, &one).await;

    step("changing the backend rolls the config hash");
    let pod0_uid = c
        .api::<Pod>(ns)
        .get(&format!("{name}-0"))
        .await
        .unwrap()
        .metadata
        .uid;
    c.kubectl_ok(&[
        "patch",
        "uploadfarm",
        "-n",
        ns,
        name,
        "--type=merge",
        "-p",
        r#"{"spec":{"backend":{"url":"http://receiver.default.svc.cluster.local:8090/deliver","notification":"ByValue"}}}"#,
    ])
    .await;
    let new_hash = eventually(
        "a new config hash in status and pod template",
        SETTLE,
        || async {
            let farm = c.farm(ns, name).await?;
            let hash = farm
                .status
                .and_then(|s| s.config_hash)
                .ok_or("no configHash")?;
            if hash == hash_before {
                return Err("status.configHash unchanged".into());
            }
            let sts = c
                .api::<StatefulSet>(ns)
                .get(name)
                .await
                .map_err(|e| e.to_string())?;
            let ann = sts
                .spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .and_then(|a| a.get("bitsfarm.io/config-hash").cloned());
            if ann.as_deref() != Some(hash.as_str()) {
                return Err(format!("pod template config-hash {ann:?}, status {hash}"));
            }
            let cm = c
                .api::<ConfigMap>(ns)
                .get(&format!("{name}-config"))
                .await
                .map_err(|e| e.to_string())?;
            let data = cm.data.unwrap_or_default();
            if !data
                .values()
                .any(|v| v.contains("receiver.default.svc.cluster.local:8090/deliver"))
            {
                return Err(format!("ConfigMap without the backend: {data:?}"));
            }
            Ok(hash)
        },
    )
    .await;
    farm_is_ready(c, &one).await;
    eventually(
        "the pod recreated with the new configuration",
        SETTLE,
        || async {
            let pod = c
                .api::<Pod>(ns)
                .get(&format!("{name}-0"))
                .await
                .map_err(|e| e.to_string())?;
            let ann = pod.annotations().get("bitsfarm.io/config-hash").cloned();
            if pod.metadata.uid != pod0_uid && ann.as_deref() == Some(new_hash.as_str()) {
                Ok(())
            } else {
                Err(format!("pod {:?} config-hash {ann:?}", pod.metadata.uid))
            }
        },
    )
    .await;
    eventually("a ConfigRolledOut event", SETTLE, || async {
        let evs = events_of(c, ns, name).await;
        if evs
            .iter()
            .any(|e| e.reason.as_deref() == Some("ConfigRolledOut"))
        {
            Ok(())
        } else {
            Err(format!(
                "events: {:?}",
                evs.iter().map(|e| &e.reason).collect::<Vec<_>>()
            ))
        }
    })
    .await;

    step("farms the operator cannot realize end Degraded=True with a reason and an event");
    // Each passes the API server's schema and CEL rules, and fails later: one in the operator's
    // own check of the server configuration, one when the API server refuses the StatefulSet the
    // operator applies, one on the node.
    let farm_yaml = |name: &str, spec: &str| {
        format!(
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: {name}\n  namespace: uploads\nspec:\n  replicas: 1\n{spec}"
        )
    };
    c.kubectl_ok_in(
        &["apply", "-f", "-"],
        &farm_yaml(
            "ftp-backend",
            "  backend:\n    url: ftp://receiver.uploads.svc.cluster.local/in\n    notification: ByValue\n",
        ),
    )
    .await;
    c.kubectl_ok_in(
        &["apply", "-f", "-"],
        &farm_yaml(
            "bad-annotation",
            "  podAnnotations:\n    \"not a valid key!\": \"x\"\n",
        ),
    )
    .await;
    c.kubectl_ok_in(
        &["apply", "-f", "-"],
        &farm_yaml("image-not-built", "  image: bitsfarm:not-built\n"),
    )
    .await;
    let broken = [
        (
            "ftp-backend",
            "InvalidSpec",
            "not an http:// or https:// URL",
        ),
        (
            "bad-annotation",
            "ApplyFailed",
            "StatefulSet bad-annotation",
        ),
        ("image-not-built", "PodsFailing", "image-not-built-0"),
    ];
    for (farm_name, reason, says) in broken {
        c.kubectl_ok(&[
            "wait",
            "-n",
            "uploads",
            "--for=condition=Degraded",
            &format!("uploadfarm/{farm_name}"),
            "--timeout=90s",
        ])
        .await;
        eventually(
            &format!("{farm_name} Degraded with reason {reason} and an event"),
            SETTLE,
            || async {
                let farm = c.farm("uploads", farm_name).await?;
                let d = condition(&farm, "Degraded").ok_or("no Degraded")?;
                if d.status != "True" || d.reason != reason || !d.message.contains(says) {
                    return Err(format!(
                        "Degraded {} {} {:?}",
                        d.status, d.reason, d.message
                    ));
                }
                if d.observed_generation != farm.metadata.generation {
                    return Err(format!(
                        "Degraded for generation {:?}",
                        d.observed_generation
                    ));
                }
                let r = condition(&farm, "Ready").ok_or("no Ready")?;
                if r.status != "False" {
                    return Err(format!("Ready {}", r.status));
                }
                let evs = events_of(c, "uploads", farm_name).await;
                if !evs.iter().any(|e| {
                    e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning")
                }) {
                    return Err(format!(
                        "no {reason} Warning event: {:?}",
                        evs.iter()
                            .map(|e| (&e.reason, &e.message))
                            .collect::<Vec<_>>()
                    ));
                }
                say(&format!("  {farm_name}: Degraded {reason}: {}", d.message));
                Ok(())
            },
        )
        .await;
    }
    // Refused before anything was applied.
    let cm = c
        .api::<ConfigMap>("uploads")
        .get_opt("ftp-backend-config")
        .await
        .unwrap();
    assert!(cm.is_none(), "a ConfigMap was made for a refused farm");

    step("restarting the operator changes nothing that was already right");
    // Settled: the same resourceVersions twice, 3 s apart.
    let settled = eventually("a settled cluster", SETTLE, || async {
        let a = resource_versions(c, &namespaces).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = resource_versions(c, &namespaces).await;
        let d = diff(&a, &b);
        if d.is_empty() {
            Ok(b)
        } else {
            Err(d.join("; "))
        }
    })
    .await;
    operator.take().unwrap().stop().await;
    let op2 = Operator::start(c, 2).await;
    let farms_total = examples.len() + broken.len();
    eventually(
        "the new operator to reconcile every farm",
        SETTLE,
        || async {
            let m = op2.metrics().await?;
            let ready = metric(&m, "bitsfarm_operator_farms{ready=\"true\"}").unwrap_or(0.0);
            let not_ready = metric(&m, "bitsfarm_operator_farms{ready=\"false\"}").unwrap_or(0.0);
            if ready as usize == examples.len()
                && not_ready as usize == farms_total - examples.len()
            {
                Ok(())
            } else {
                Err(format!("farms ready {ready}, not ready {not_ready}"))
            }
        },
    )
    .await;
    *operator = Some(op2);
    // Give every reconcile the restart triggered time to finish its writes, if it made any.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = resource_versions(c, &namespaces).await;
    let changed = diff(&settled, &after);
    assert!(
        changed.is_empty(),
        "the restarted operator rewrote objects that were already right:\n{}",
        changed.join("\n")
    );
    say(&format!(
        "  {} objects unchanged across the restart",
        after.len()
    ));

    step("deleting the UploadFarms garbage-collects everything they owned");
    for ns in namespaces {
        c.kubectl_ok(&["delete", "uploadfarms", "--all", "-n", ns, "--timeout=60s"])
            .await;
    }
    eventually("no owned objects left", SETTLE, || {
        nothing_left(c, &namespaces)
    })
    .await;

    operator.take().unwrap().stop().await;
}
