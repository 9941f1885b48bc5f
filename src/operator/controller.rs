//! Reconcile: apply every child of an UploadFarm with server-side apply, remove the per-pod
//! Services of ordinals that no longer exist, and report through status, conditions and events.
//! Decisions are made by the pure functions in `resources` and `conditions`; this module only
//! talks to the API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::conditions::{self, FailingPod, Observed, Problem, Rollout};
use super::metrics::Metrics;
use super::resources::{
    self, BuildOptions, COMPONENT_HOST_SERVICE, COMPONENT_LABEL, COMPONENT_NETWORK_POLICY,
    Children, FIELD_MANAGER, INSTANCE_LABEL, Names,
};
use super::scale_down;
use crate::api::{HostStatus, InvalidSpec, UploadFarm, UploadFarmStatus};

/// Why a reconcile failed. Each message names the object and the API server's answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name} failed: {}", api_message(source))]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "deleting the Service {name} of a removed pod failed: {}",
        api_message(source)
    )]
    Delete {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "deleting the {kind} {name}, which the farm no longer asks for, failed: {}",
        api_message(source)
    )]
    Cleanup {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing the farm's {what} failed: {source}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of UploadFarm {name} failed: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("UploadFarm {name} has no namespace; UploadFarms are namespaced objects")]
    NoNamespace { name: String },
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
}

/// The API server's own words for a refusal (`Service "x" is invalid: metadata.name: ...`),
/// without the debug dump of the whole Status that `kube::Error`'s Display appends: this text
/// ends up in the farm's conditions and events.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

impl Error {
    /// A short, bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } | Error::Cleanup { .. } => "delete",
            Error::List { .. } => "list",
            Error::Status { .. } => "status",
            Error::NoNamespace { .. } => "no_namespace",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub build: BuildOptions,
    /// Consecutive failures per farm, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, build: BuildOptions, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            build,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn note_failure(&self, key: &str) -> u32 {
        let Ok(mut map) = self.failures.lock() else {
            return 1;
        };
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn note_success(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

/// Delay before retrying after the `n`th consecutive failure: 5 s doubling up to 5 min.
pub fn backoff(n: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

fn key(farm: &UploadFarm) -> String {
    format!(
        "{}/{}",
        farm.namespace().unwrap_or_default(),
        farm.name_any()
    )
}

/// The controller's entry point. A farm that does not even deserialize is reported and skipped,
/// so that it cannot stop the others.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<UploadFarm>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let farm = match &guard.0 {
        Ok(farm) => farm,
        Err(invalid) => {
            let name = invalid.metadata.name.clone().unwrap_or_default();
            tracing::warn!(farm = %name, error = %invalid.error, "UploadFarm cannot be read; skipping it");
            ctx.metrics.failed("malformed");
            let reference = ObjectReference {
                api_version: Some(UploadFarm::api_version(&()).into_owned()),
                kind: Some(UploadFarm::kind(&()).into_owned()),
                name: invalid.metadata.name.clone(),
                namespace: invalid.metadata.namespace.clone(),
                uid: invalid.metadata.uid.clone(),
                ..ObjectReference::default()
            };
            publish(
                &ctx,
                &reference,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                format!("the UploadFarm cannot be read: {}", invalid.error),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let result = reconcile_farm(farm, &ctx).await;
    match &result {
        Ok(_) => ctx.note_success(&key(farm)),
        Err(e) => ctx.metrics.failed(e.metric_label()),
    }
    result
}

/// Requeues a failed farm with backoff; the failure was already reported in its status.
pub fn error_policy(
    guard: Arc<DeserializeGuard<UploadFarm>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let n = match &guard.0 {
        Ok(farm) => ctx.note_failure(&key(farm)),
        Err(_) => 1,
    };
    let delay = backoff(n);
    tracing::warn!(error = %error, attempt = n, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_farm(farm: &UploadFarm, ctx: &Context) -> Result<Action, Error> {
    let name = farm.name_any();
    let ns = farm
        .namespace()
        .ok_or_else(|| Error::NoNamespace { name: name.clone() })?;
    let farms: Api<UploadFarm> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = farm.object_ref(&());
    let old_status = farm.status.clone().unwrap_or_default();

    let children = match resources::children(farm, &ctx.build) {
        Ok(c) => c,
        Err(invalid) => {
            // Nothing is applied: the running pods keep the last good configuration.
            let problem = Problem::InvalidSpec(invalid.0.clone());
            let status = status_for(
                farm,
                &old_status,
                None,
                &[],
                Some(problem),
                Timestamp::now(),
            );
            patch_status(&farms, &name, &status).await?;
            publish(
                ctx,
                &reference,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                invalid.to_string(),
            )
            .await;
            ctx.metrics.set_farm_ready(&key(farm), Some(false));
            ctx.metrics.failed("invalid_spec");
            return Ok(Action::await_change());
        }
    };

    let mut children = children;
    let scale = match scale_down_step(farm, &ns, &old_status, ctx).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.set_farm_ready(&key(farm), Some(false));
            return Err(e);
        }
    };
    if scale.replicas > farm.spec.replicas {
        // The draining servers keep their pods and their own addresses until they are done.
        if let Some(spec) = children.stateful_set.spec.as_mut() {
            spec.replicas = Some(scale.replicas);
        }
        for i in farm.spec.replicas.max(0)..scale.replicas {
            children
                .host_services
                .push(resources::host_service(farm, i));
        }
    }
    let applied = match apply_children(farm, &ns, &children, scale.replicas, ctx).await {
        Ok(a) => a,
        Err(e) => {
            let problem = Problem::ApplyFailed(e.to_string());
            let status = status_for(
                farm,
                &old_status,
                None,
                &[],
                Some(problem),
                Timestamp::now(),
            );
            // The original error is what matters; a failing status write is only logged.
            if let Err(se) = patch_status(&farms, &name, &status).await {
                tracing::warn!(error = %se, "could not record the failure in the status");
            }
            publish(
                ctx,
                &reference,
                EventType::Warning,
                "ApplyFailed",
                "Apply",
                e.to_string(),
            )
            .await;
            ctx.metrics.set_farm_ready(&key(farm), Some(false));
            return Err(e);
        }
    };

    let mut status = status_for(
        farm,
        &old_status,
        Some(&applied.stateful_set),
        &applied.pods,
        None,
        Timestamp::now(),
    );
    status.config_hash = Some(children.config_hash.clone());
    status.scale_down = None;
    if let Some(record) = scale.record.clone() {
        let pods: Vec<String> =
            scale_down::to_drain(record.to_replicas, Some(record.from_replicas))
                .into_iter()
                .map(|i| Names::of(farm).pod(i))
                .collect();
        conditions::set_draining(&mut status.conditions, scale_down::message(&record, &pods));
        // The draining servers are still there (and reachable at their host ids) until removed;
        // the `Scaled` event follows when they go.
        let names = Names::of(farm);
        for i in record.to_replicas.max(farm.spec.replicas).max(0)..record.from_replicas {
            let pod = names.pod(i);
            status.hosts.push(HostStatus {
                ordinal: i,
                ready: applied
                    .pods
                    .iter()
                    .any(|p| p.name_any() == pod && pod_ready(p)),
                host_id: resources::host_id(farm, i),
                pod,
                draining: true,
            });
        }
        status.scale_down = Some(record);
    }
    patch_status(&farms, &name, &status).await?;
    for (type_, reason, note) in transitions(&old_status, &status, farm.spec.replicas) {
        publish(ctx, &reference, type_, reason, "Reconcile", note).await;
    }
    let ready =
        conditions::find(&status.conditions, conditions::READY).is_some_and(|c| c.status == "True");
    ctx.metrics.set_farm_ready(&key(farm), Some(ready));
    if status.scale_down.is_some() {
        // Look at the draining servers again soon: they go as soon as their sessions end.
        return Ok(Action::requeue(DRAIN_POLL));
    }
    // Owned objects wake us on change; the periodic requeue catches pods that start failing,
    // which the StatefulSet's status does not show.
    Ok(Action::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    }))
}

/// How often a scale-down in progress asks its draining servers how many sessions are left.
pub const DRAIN_POLL: Duration = Duration::from_secs(10);

/// Drains the servers a scale-down removes and decides whether they can go yet. The current size
/// is the one the last reconcile saw (or the scale-down it recorded); asking a server goes through
/// the API server's pod proxy, so it needs no route from the operator to the pods.
async fn scale_down_step(
    farm: &UploadFarm,
    ns: &str,
    old: &UploadFarmStatus,
    ctx: &Context,
) -> Result<scale_down::Step, Error> {
    let desired = farm.spec.replicas;
    // The status lags (it counts terminating pods too): when it hints at a scale-down, the live
    // StatefulSet says how many servers there are.
    let suspected = old.scale_down.is_some() || old.replicas > desired;
    let current = if suspected {
        let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        sets.get_opt(&Names::of(farm).stateful_set())
            .await
            .map_err(|source| Error::List {
                what: "StatefulSet",
                source,
            })?
            .and_then(|s| s.spec.and_then(|s| s.replicas))
    } else {
        None
    };
    let names = Names::of(farm);
    // The farm grew back during a scale-down: the servers it keeps take sessions again.
    for ordinal in scale_down::to_undrain(desired, current, old.scale_down.as_ref()) {
        let pod = names.pod(ordinal);
        let outcome = proxy_drain(&ctx.client, ns, &pod, "cancel=true").await;
        tracing::info!(%pod, ?outcome, "drain cancelled: the farm grew back");
    }
    let mut reports = Vec::new();
    for ordinal in scale_down::to_drain(desired, current) {
        let pod = names.pod(ordinal);
        let report = match proxy_drain(&ctx.client, ns, &pod, "stay=true").await {
            Ok(body) => scale_down::DrainReport::parse(&body),
            Err(why) => scale_down::DrainReport::Unreachable(why),
        };
        tracing::info!(%pod, ?report, "draining before scale-down");
        reports.push(report);
    }
    let timeout = jiff::SignedDuration::from_secs(resources::drain_timeout(&farm.spec));
    Ok(scale_down::step(
        desired,
        current,
        old.scale_down.as_ref(),
        &reports,
        timeout,
        Timestamp::now(),
    ))
}

/// `POST /drain?QUERY` on one server's admin port, through the API server's pod proxy, so the
/// operator needs no network path of its own to the pods. `stay=true` drains and keeps the server
/// up once empty (an exit would restart the container as a fresh, ready server) until the
/// StatefulSet removes it; `cancel=true` ends such a drain.
async fn proxy_drain(client: &Client, ns: &str, pod: &str, query: &str) -> Result<String, String> {
    let path = format!(
        "/api/v1/namespaces/{ns}/pods/{pod}:{}/proxy/drain?{query}",
        crate::api::ADMIN_PORT
    );
    let request = http::Request::post(&path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map_err(|e| api_message(&e))
}

/// Server-side apply of one child (named by its own metadata), as the operator's field manager.
async fn apply<K>(api: &Api<K>, kind: &'static str, object: &K) -> Result<K, Error>
where
    K: Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::Apply { kind, name, source })
}

struct Applied {
    stateful_set: StatefulSet,
    pods: Vec<Pod>,
}

async fn apply_children(
    farm: &UploadFarm,
    ns: &str,
    children: &Children,
    replicas: i32,
    ctx: &Context,
) -> Result<Applied, Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let names = Names::of(farm);

    let apply_err =
        |kind: &'static str, name: String| move |source| Error::Apply { kind, name, source };
    ensure_handoff_secret(farm, ns, ctx).await?;
    apply(&config_maps, "ConfigMap", &children.config_map).await?;
    // The governing Service must exist before the StatefulSet that names it.
    apply(&services, "Service", &children.headless_service).await?;
    // Before the StatefulSet, so that a farm that asks for a NetworkPolicy never has pods
    // without it.
    network_policy(farm, ns, children.network_policy.as_ref(), ctx).await?;
    let sts_body =
        resources::stateful_set_apply_body(&children.stateful_set).map_err(|e| Error::Apply {
            kind: "StatefulSet",
            name: names.stateful_set(),
            source: kube::Error::SerdeError(e),
        })?;
    let stateful_set = sets
        .patch(&names.stateful_set(), &pp, &Patch::Apply(&sts_body))
        .await
        .map_err(apply_err("StatefulSet", names.stateful_set()))?;
    for svc in &children.host_services {
        apply(&services, "Service", svc).await?;
    }
    apply(&services, "Service", &children.shared_service).await?;

    let host_services = list_component(
        &services,
        &names.farm,
        COMPONENT_HOST_SERVICE,
        "per-pod Services",
    )
    .await?;
    for svc_name in surplus_host_services(&host_services, replicas) {
        if delete_child(&services, &svc_name)
            .await
            .map_err(|source| Error::Delete {
                name: svc_name.clone(),
                source,
            })?
        {
            tracing::info!(service = %svc_name, "deleted the Service of a removed pod");
        }
    }
    let pods = pods
        .list(&ListParams::default().labels(&resources::selector_string(&names.farm)))
        .await
        .map_err(|source| Error::List {
            what: "pods",
            source,
        })?
        .items;
    Ok(Applied { stateful_set, pods })
}

/// Applies the farm's NetworkPolicy, or, when the spec asks for none, deletes the one the operator
/// made for this farm earlier. What is deleted is found by the farm's labels and must also be
/// owned by this very farm (its uid), so that a policy someone else made, even with copied
/// labels, is never touched.
async fn network_policy(
    farm: &UploadFarm,
    ns: &str,
    policy: Option<&NetworkPolicy>,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let names = Names::of(farm);
    if let Some(policy) = policy {
        apply(&api, "NetworkPolicy", policy).await?;
        return Ok(());
    }
    let listed = list_component(
        &api,
        &names.farm,
        COMPONENT_NETWORK_POLICY,
        "NetworkPolicies",
    )
    .await?;
    for name in resources::stale_network_policies(farm, &listed) {
        if delete_child(&api, &name)
            .await
            .map_err(|source| Error::Cleanup {
                kind: "NetworkPolicy",
                name: name.clone(),
                source,
            })?
        {
            tracing::info!(policy = %name, "deleted the farm's NetworkPolicy: the spec no longer asks for it");
        }
    }
    Ok(())
}

/// The farm's children of one component, found by their labels.
async fn list_component<K>(
    api: &Api<K>,
    farm: &str,
    component: &str,
    what: &'static str,
) -> Result<Vec<K>, Error>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    api.list(&ListParams::default().labels(&format!(
        "{INSTANCE_LABEL}={farm},{COMPONENT_LABEL}={component}"
    )))
    .await
    .map(|l| l.items)
    .map_err(|source| Error::List { what, source })
}

/// Deletes one child; false when it was already gone (someone else deleted it first).
async fn delete_child<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the farm's handoff secret unless it exists. It is never applied over: a new value
/// would make every open session id name no owner.
async fn ensure_handoff_secret(farm: &UploadFarm, ns: &str, ctx: &Context) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = Names::of(farm).handoff_secret();
    let failed = |source| Error::Apply {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    // Created, never read: a 409 means it is there, and the operator needs no right to read
    // Secrets.
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        failed(kube::Error::Service(
            "the operating system's random source failed".into(),
        ))
    })?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match secrets
        .create(
            &Default::default(),
            &resources::handoff_secret(farm, &secret),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %name, "created the farm's handoff secret");
            Ok(())
        }
        // It exists already (the usual case): that one is the farm's secret.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(failed(e)),
    }
}

/// Per-pod Services of ordinals at or above `replicas`, which scale-down left behind.
pub fn surplus_host_services(services: &[Service], replicas: i32) -> Vec<String> {
    let mut surplus: Vec<(i32, String)> = services
        .iter()
        .filter_map(|s| resources::service_ordinal(s).map(|o| (o, s.name_any())))
        .filter(|(o, _)| *o >= replicas)
        .collect();
    surplus.sort();
    surplus.into_iter().map(|(_, n)| n).collect()
}

/// Pods that are failing rather than starting, with the kubelet's reason.
pub fn failing_pods(pods: &[Pod]) -> Vec<FailingPod> {
    const FAILING: &[&str] = &[
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        // imagePullPolicy Never and the image is not on the node: it never will be by itself.
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    ];
    let mut out: Vec<FailingPod> = pods
        .iter()
        .filter_map(|p| {
            let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
            statuses.iter().find_map(|cs| {
                let reason = cs.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
                // The kubelet alternates the two at every pull attempt; one name for both keeps
                // the farm's status (and its writes) still while nothing else changes.
                let reason = if reason == "ErrImagePull" {
                    "ImagePullBackOff"
                } else {
                    reason
                };
                FAILING.contains(&reason).then(|| FailingPod {
                    pod: p.name_any(),
                    reason: reason.to_string(),
                })
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status for what was observed. `stateful_set` is None when it was not applied.
pub fn status_for(
    farm: &UploadFarm,
    old: &UploadFarmStatus,
    stateful_set: Option<&StatefulSet>,
    pods: &[Pod],
    problem: Option<Problem>,
    now: Timestamp,
) -> UploadFarmStatus {
    let names = Names::of(farm);
    let rollout = stateful_set.map(Rollout::of);
    let observed = Observed {
        generation: farm.metadata.generation,
        desired_replicas: farm.spec.replicas,
        rollout: rollout.clone(),
        failing_pods: failing_pods(pods),
        problem,
    };
    let hosts = (0..farm.spec.replicas.max(0))
        .map(|i| {
            let pod = names.pod(i);
            HostStatus {
                ordinal: i,
                ready: pods.iter().any(|p| p.name_any() == pod && pod_ready(p)),
                host_id: resources::host_id(farm, i),
                pod,
                draining: false,
            }
        })
        .collect();
    UploadFarmStatus {
        observed_generation: farm.metadata.generation,
        replicas: rollout.as_ref().map_or(old.replicas, |r| r.replicas),
        ready_replicas: rollout
            .as_ref()
            .map_or(old.ready_replicas, |r| r.ready_replicas),
        selector: Some(resources::selector_string(&names.farm)),
        address: Some(resources::shared_address(farm)),
        url: Some(resources::shared_url(farm)),
        config_hash: old.config_hash.clone(),
        // Kept until a reconcile that applied the StatefulSet says otherwise, so that a failed
        // reconcile does not restart the drain's clock.
        scale_down: old.scale_down.clone(),
        hosts,
        conditions: conditions::conditions(&observed, &old.conditions, now),
    }
}

/// The events a user should see for the step from `old` to `new`: the farm created, scaled, or
/// rolled out with a new configuration (Normal), and pods that started failing (Warning).
pub fn transitions(
    old: &UploadFarmStatus,
    new: &UploadFarmStatus,
    replicas: i32,
) -> Vec<(EventType, &'static str, String)> {
    let mut out = Vec::new();
    match (&old.config_hash, &new.config_hash) {
        (None, Some(_)) => out.push((
            EventType::Normal,
            "Created",
            format!("created the farm's objects for {replicas} upload servers"),
        )),
        (Some(a), Some(b)) if a != b => out.push((
            EventType::Normal,
            "ConfigRolledOut",
            format!("the server configuration changed ({a} -> {b}); rolling it out to the pods"),
        )),
        _ => {}
    }
    let before = old.hosts.len();
    if old.config_hash.is_some() && before != new.hosts.len() {
        out.push((
            EventType::Normal,
            "Scaled",
            format!("scaled from {before} to {replicas} upload servers"),
        ));
    }
    // Failing pods only show in the farm's conditions; an event puts them in `kubectl describe`
    // and in whatever collects the cluster's warnings.
    let failing = |s: &UploadFarmStatus| {
        conditions::find(&s.conditions, conditions::DEGRADED)
            .filter(|c| c.status == "True" && c.reason == "PodsFailing")
            .map(|c| c.message.clone())
    };
    if let (None, Some(message)) = (failing(old), failing(new)) {
        out.push((EventType::Warning, "PodsFailing", message));
    }
    out
}

async fn patch_status(
    farms: &Api<UploadFarm>,
    name: &str,
    status: &UploadFarmStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": UploadFarm::api_version(&()),
        "kind": UploadFarm::kind(&()),
        "status": status,
    });
    farms
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Status {
            name: name.to_string(),
            source,
        })?;
    Ok(())
}

/// Publishes an event; a failure to do so is logged, never fatal.
async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "could not publish an event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests;
