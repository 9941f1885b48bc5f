//! Reconcile, read top to bottom: check the spec, take a scale-down one step further, apply the
//! farm's children and sweep away what it no longer asks for (`apply`), then report through the
//! status, events and metrics (`status`). Decisions are made by the pure functions in
//! `resources`, `scale_down`, `status` and `conditions`; this module only orchestrates and talks
//! to the API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::apply::{Applied, apply_and_prune};
use super::conditions::{self, Problem};
use super::error::Error;
use super::error::api_message;
use super::metrics::Metrics;
use super::resources::{self, BuildOptions, Children, FIELD_MANAGER, Names};
use super::scale_down;
use super::status;
use crate::api::{UploadFarm, UploadFarmStatus};

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
    let ns = farm.namespace().ok_or_else(|| Error::NoNamespace {
        name: farm.name_any(),
    })?;
    let old = farm.status.clone().unwrap_or_default();

    // An invalid spec changes nothing: the running pods keep the last good configuration.
    let checked = match resources::check(farm) {
        Ok(checked) => checked,
        Err(invalid) => {
            report_failure(farm, &ns, &old, Problem::InvalidSpec(invalid.0), ctx).await?;
            ctx.metrics.failed("invalid_spec");
            return Ok(Action::await_change());
        }
    };
    let scale = scale_down_step(farm, &ns, &old, ctx)
        .await
        .inspect_err(|_| ctx.metrics.set_farm_ready(&key(farm), Some(false)))?;
    let children = checked.children(&ctx.build, scale.replicas);
    let (applied, pods) = match apply_and_observe(farm, &ns, &children, ctx).await {
        Ok(seen) => seen,
        Err(e) => {
            let problem = Problem::ApplyFailed(e.to_string());
            // The original error is what matters; a failing status write is only logged.
            if let Err(se) = report_failure(farm, &ns, &old, problem, ctx).await {
                tracing::warn!(error = %se, "could not record the failure in the status");
            }
            return Err(e);
        }
    };

    let status = status::reconciled(
        farm,
        &old,
        &applied.stateful_set,
        applied.disruption_budget.as_ref(),
        &pods,
        &children.config_hash,
        scale.record,
        Timestamp::now(),
    );
    patch_status(farm, &ns, &status, ctx).await?;
    let reference = farm.object_ref(&());
    for (type_, reason, note) in status::transitions(&old, &status, farm.spec.replicas) {
        publish(ctx, &reference, type_, reason, "Reconcile", note).await;
    }
    let ready =
        conditions::find(&status.conditions, conditions::READY).is_some_and(|c| c.status == "True");
    ctx.metrics.set_farm_ready(&key(farm), Some(ready));
    Ok(next_look(&status, ready))
}

/// When to reconcile again without being woken: owned objects wake us on change, but pods that
/// start failing do not show in the StatefulSet's status, and draining servers are asked again
/// soon, as they go as soon as their sessions end.
fn next_look(status: &UploadFarmStatus, ready: bool) -> Action {
    if status.scale_down.is_some() {
        return Action::requeue(DRAIN_POLL);
    }
    Action::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    })
}

/// Records a farm that could not be reconciled: its status says why, a Warning event says it in
/// `kubectl describe`, and the farm counts as not ready. The event goes out even when the status
/// write fails, whose error is returned.
async fn report_failure(
    farm: &UploadFarm,
    ns: &str,
    old: &UploadFarmStatus,
    problem: Problem,
    ctx: &Context,
) -> Result<(), Error> {
    let (reason, action, note) = status::failure_event(&problem);
    let written = patch_status(
        farm,
        ns,
        &status::failed(farm, old, problem, Timestamp::now()),
        ctx,
    )
    .await;
    let reference = farm.object_ref(&());
    publish(ctx, &reference, EventType::Warning, reason, action, note).await;
    ctx.metrics.set_farm_ready(&key(farm), Some(false));
    written
}

/// Applies the children and sweeps the rest, then reads the farm's pods for the status.
async fn apply_and_observe(
    farm: &UploadFarm,
    ns: &str,
    children: &Children,
    ctx: &Context,
) -> Result<(Applied, Vec<Pod>), Error> {
    let applied = apply_and_prune(&ctx.client, farm, ns, children).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pods = pods
        .list(&ListParams::default().labels(&resources::selector_string(&farm.name_any())))
        .await
        .map_err(|source| Error::List {
            what: "pods",
            source,
        })?
        .items;
    Ok((applied, pods))
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
    let names = Names::of(farm);
    // The status lags (it counts terminating pods too): when it hints at a scale-down, the live
    // StatefulSet says how many servers there are.
    let suspected = old.scale_down.is_some() || old.replicas > desired;
    let current = if suspected {
        let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        sets.get_opt(&names.stateful_set())
            .await
            .map_err(|source| Error::List {
                what: "StatefulSet",
                source,
            })?
            .and_then(|s| s.spec.and_then(|s| s.replicas))
    } else {
        None
    };
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

async fn patch_status(
    farm: &UploadFarm,
    ns: &str,
    status: &UploadFarmStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let farms: Api<UploadFarm> = Api::namespaced(ctx.client.clone(), ns);
    let name = farm.name_any();
    let patch = json!({
        "apiVersion": UploadFarm::api_version(&()),
        "kind": UploadFarm::kind(&()),
        "status": status,
    });
    farms
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Status { name, source })?;
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
