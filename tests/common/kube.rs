//! The test cluster as the cluster tests see it (`tests/cluster/cluster.sh`): its kubeconfig, the
//! release's kubectl and helm, the node's network namespace for clients, and bounded waits.
//!
//! `cluster.sh run` (what `scripts/test` does) exports the variables read here. Without them the
//! tests say loudly that they were skipped; CI always runs them.

#![allow(dead_code)]

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bitsfarm::api::UploadFarm;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource, ResourceExt};

pub const ENV_KUBECONFIG: &str = "BITSFARM_E2E_KUBECONFIG";

/// Writes past the test harness's capture, so that a skip or a step shows in every run.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `f` every 250 ms until it returns Ok, for at most `limit`; then fails the test with the
/// last reason it gave.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < limit {
        match tokio::time::timeout(Duration::from_secs(20), f()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => last = e,
            Err(_) => last = "a check took more than 20 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "timed out after {} s waiting for {what}; last seen: {last}",
        limit.as_secs()
    );
}

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: String,
    pub helm: String,
    pub client: Client,
    /// The cluster's state folder (logs of what the tests start go there too).
    pub work: PathBuf,
    /// `cluster.sh`, for `node`.
    cluster_sh: PathBuf,
    /// The bitsfarm image loaded into the node (`cluster.sh image`).
    pub image: String,
    _tmp: Option<tempfile::TempDir>,
}

pub struct Out {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Cluster {
    /// The folder on the node that holds the volume bound to the claim `claim` of `ns`.
    pub async fn volume_dir(&self, ns: &str, claim: &str) -> PathBuf {
        use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
        let pvc: PersistentVolumeClaim = self.api(ns).get(claim).await.expect("the claim");
        let pv_name = pvc
            .spec
            .and_then(|s| s.volume_name)
            .unwrap_or_else(|| panic!("{claim} is not bound"));
        let pv: PersistentVolume = Api::all(self.client.clone())
            .get(&pv_name)
            .await
            .expect("its volume");
        let spec = pv.spec.expect("volume spec");
        let dir = spec
            .host_path
            .map(|h| h.path)
            .or(spec.local.map(|l| l.path))
            .expect("a folder on the node");
        PathBuf::from(dir)
    }

    /// The cluster `cluster.sh` describes in the environment, or None (and a loud note) when the
    /// tests run without one.
    pub async fn from_env(test: &str) -> Option<Cluster> {
        let Some(path) = std::env::var_os(ENV_KUBECONFIG) else {
            say(&format!(
                "\n\n    *** {test}: SKIPPED: {ENV_KUBECONFIG} is not set, so NOTHING was tested against a \
                 cluster. ***\n    *** Run ./scripts/test (it starts the test cluster), or \
                 `tests/cluster/cluster.sh run cargo test --test {test}`. ***\n"
            ));
            return None;
        };
        let kubeconfig = PathBuf::from(path);
        let kc = Kubeconfig::read_from(&kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig usable");
        let client = Client::try_from(config).expect("client");
        let var = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.into());
        let (work, tmp) = match std::env::var_os("BITSFARM_E2E_STATE") {
            Some(d) if Path::new(&d).is_dir() => (PathBuf::from(d), None),
            _ => {
                let t = tempfile::tempdir().expect("temp dir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        Some(Cluster {
            kubeconfig,
            kubectl: var("BITSFARM_E2E_KUBECTL", "kubectl"),
            helm: var("BITSFARM_E2E_HELM", "helm"),
            client,
            work,
            cluster_sh: PathBuf::from(var(
                "BITSFARM_CLUSTER_SH",
                &manifest_dir()
                    .join("tests/cluster/cluster.sh")
                    .to_string_lossy(),
            )),
            image: var(
                "BITSFARM_E2E_IMAGE",
                &format!("bitsfarm:{}", env!("CARGO_PKG_VERSION")),
            ),
            _tmp: tmp,
        })
    }

    /// Runs `program args` with the cluster's kubeconfig, feeding `stdin`, for at most `limit`.
    pub async fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        limit: Duration,
    ) -> Out {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if let Some(text) = stdin {
            use tokio::io::AsyncWriteExt as _;
            let mut pipe = child.stdin.take().expect("stdin piped");
            pipe.write_all(text.as_bytes()).await.expect("write stdin");
            drop(pipe);
        }
        let out = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("{program} {args:?} ran for more than {} s", limit.as_secs())
            })
            .expect("wait for the command");
        Out {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub async fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut all = vec![
            "--kubeconfig",
            self.kubeconfig.to_str().expect("utf-8 path"),
        ];
        all.extend_from_slice(args);
        self.run(&self.kubectl, &all, stdin, Duration::from_secs(330))
            .await
    }

    pub async fn kubectl(&self, args: &[&str]) -> Out {
        self.kubectl_in(args, None).await
    }

    /// kubectl that must succeed; returns its stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).await;
        assert!(
            out.ok,
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    pub async fn kubectl_ok_in(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_in(args, Some(stdin)).await;
        assert!(
            out.ok,
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// helm that must succeed; returns its stdout.
    pub async fn helm_ok(&self, args: &[&str]) -> String {
        let mut all = vec![
            "--kubeconfig",
            self.kubeconfig.to_str().expect("utf-8 path"),
        ];
        all.extend_from_slice(args);
        let out = self
            .run(&self.helm, &all, None, Duration::from_secs(400))
            .await;
        assert!(
            out.ok,
            "helm {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// The command that runs `cmd` in the node's network namespace, where pod and Service
    /// addresses exist and names resolve through the cluster's DNS.
    pub fn node_command(&self, cmd: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("bash");
        c.arg(&self.cluster_sh)
            .arg("node")
            .arg(&self.work)
            .args(cmd)
            .kill_on_drop(true);
        c
    }

    /// `cmd` in the node's network namespace, to completion (at most `limit`).
    pub async fn node(&self, cmd: &[&str], limit: Duration) -> Out {
        let mut all = vec![
            self.cluster_sh.to_str().expect("utf-8 path"),
            "node",
            self.work.to_str().expect("utf-8 path"),
        ];
        all.extend_from_slice(cmd);
        self.run("bash", &all, None, limit).await
    }

    pub fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    pub async fn farm(&self, ns: &str, name: &str) -> Result<UploadFarm, String> {
        self.api::<UploadFarm>(ns)
            .get(name)
            .await
            .map_err(|e| format!("get uploadfarm {ns}/{name}: {e}"))
    }

    /// GET of `path` on a pod's port through the API server's pod proxy.
    pub async fn pod_get(
        &self,
        ns: &str,
        pod: &str,
        port: u16,
        path: &str,
    ) -> Result<String, String> {
        let uri = format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy{path}");
        let req = http::Request::get(&uri)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        self.client
            .request_text(req)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))
    }
}

/// "Kind ns/name" of every object of kind `K` in `ns` that `lp` lists and `keep` picks.
pub async fn objects_where<K>(
    c: &Cluster,
    ns: &str,
    lp: &ListParams,
    keep: impl Fn(&K) -> bool,
) -> Result<Vec<String>, String>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    let list = c
        .api::<K>(ns)
        .list(lp)
        .await
        .map_err(|e| format!("list {kind} in {ns}: {e}"))?;
    Ok(list
        .items
        .iter()
        .filter(|o| keep(o))
        .map(|o| format!("{kind} {ns}/{}", o.name_any()))
        .collect())
}

pub fn condition<'a>(farm: &'a UploadFarm, type_: &str) -> Option<&'a Condition> {
    farm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

pub fn owned_by(meta: &ObjectMeta, farm: &UploadFarm) -> Result<(), String> {
    let uid = farm.metadata.uid.as_deref().unwrap_or("?");
    let refs = meta.owner_references.clone().unwrap_or_default();
    refs.iter()
        .find(|r| {
            r.kind == "UploadFarm"
                && r.api_version == "bitsfarm.io/v1alpha1"
                && r.name == farm.name_any()
                && r.uid == uid
                && r.controller == Some(true)
        })
        .map(|_| ())
        .ok_or_else(|| {
            format!(
                "{} has no controller owner reference to UploadFarm {} ({uid}): {refs:?}",
                meta.name.as_deref().unwrap_or("?"),
                farm.name_any()
            )
        })
}

pub async fn events_of(c: &Cluster, ns: &str, name: &str) -> Vec<Event> {
    c.api::<Event>(ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|ev| ev.involved_object.name.as_deref() == Some(name))
        .collect()
}

/// The value of a metric line such as `bitsfarm_operator_farms{ready="true"} 3`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The last `n` lines of a log file, without terminal colours.
pub fn tail(path: &Path, n: usize) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(ch);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
