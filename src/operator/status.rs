//! The farm's status and the events that tell its story, computed from what a reconcile saw by
//! pure functions: the controller reads the cluster and writes what these return.

use std::ops::Range;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::conditions::{self, FailingPod, Observed, Problem, Rollout};
use super::resources::{self, Names};
use super::scale_down;
use crate::api::{HostStatus, InvalidSpec, ScaleDownStatus, UploadFarm, UploadFarmStatus};

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
        hosts: hosts(farm, pods, 0..farm.spec.replicas.max(0), false),
        conditions: conditions::conditions(&observed, &old.conditions, now),
    }
}

/// The status of a farm that could not be reconciled: `problem` says why, and the rest is what
/// the last reconcile saw (nothing was applied, or not all of it).
pub fn failed(
    farm: &UploadFarm,
    old: &UploadFarmStatus,
    problem: Problem,
    now: Timestamp,
) -> UploadFarmStatus {
    status_for(farm, old, None, &[], Some(problem), now)
}

/// The status after a reconcile that applied every child: the StatefulSet's rollout and the
/// pods, the configuration they run, and the scale-down under way (`None` when there is none or
/// it just ended), whose draining servers are listed among the hosts until they are removed.
#[allow(clippy::too_many_arguments)] // what one reconcile saw, each part from its own request
pub fn reconciled(
    farm: &UploadFarm,
    old: &UploadFarmStatus,
    stateful_set: &StatefulSet,
    budget: Option<&PodDisruptionBudget>,
    pods: &[Pod],
    config_hash: &str,
    scale_down: Option<ScaleDownStatus>,
    now: Timestamp,
) -> UploadFarmStatus {
    let mut status = status_for(farm, old, Some(stateful_set), pods, None, now);
    status.config_hash = Some(config_hash.to_string());
    if let Some(message) = disruption(farm.spec.replicas, pods, budget) {
        conditions::set_disrupted(&mut status.conditions, message);
    }
    status.scale_down = None;
    if let Some(record) = scale_down {
        let names = Names::of(farm);
        let draining: Vec<String> =
            scale_down::to_drain(record.to_replicas, Some(record.from_replicas))
                .into_iter()
                .map(|i| names.pod(i))
                .collect();
        conditions::set_draining(
            &mut status.conditions,
            scale_down::message(&record, &draining),
            now,
        );
        // Still there, and reachable at their host ids, until removed; the `Scaled` event
        // follows when they go.
        let first = record.to_replicas.max(farm.spec.replicas).max(0);
        status
            .hosts
            .extend(hosts(farm, pods, first..record.from_replicas, true));
        status.scale_down = Some(record);
    }
    status
}

/// Why the farm is short of servers because of a voluntary disruption, or `None` when it is not:
/// pods that Kubernetes marked for eviction (`DisruptionTarget`: a node drain, the eviction API,
/// preemption), or a budget that allows no further disruption while fewer than `desired`
/// servers are ready. A scale-down or a rollout is no disruption: those say so themselves.
pub fn disruption(
    desired: i32,
    pods: &[Pod],
    budget: Option<&PodDisruptionBudget>,
) -> Option<String> {
    let mut evicted: Vec<String> = pods
        .iter()
        .filter_map(|p| {
            let c = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
            let why = c.reason.as_deref().unwrap_or("disruption");
            Some(format!("{} ({why})", p.name_any()))
        })
        .collect();
    evicted.sort();
    let ready = pods.iter().filter(|p| pod_ready(p)).count();
    let ready = i32::try_from(ready).unwrap_or(i32::MAX);
    let exhausted = budget
        .and_then(|b| b.status.as_ref())
        .is_some_and(|s| s.disruptions_allowed == 0 && ready < desired);
    if evicted.is_empty() && !exhausted {
        return None;
    }
    let mut message = format!("{ready} of {desired} upload servers ready");
    if !evicted.is_empty() {
        message.push_str(&format!("; being evicted: {}", evicted.join(", ")));
    }
    if exhausted {
        message.push_str(
            "; the PodDisruptionBudget allows no further eviction until a server is ready again",
        );
    }
    Some(message)
}

/// One entry per ordinal in `ordinals`, ready when its pod is.
fn hosts(farm: &UploadFarm, pods: &[Pod], ordinals: Range<i32>, draining: bool) -> Vec<HostStatus> {
    let names = Names::of(farm);
    ordinals
        .map(|i| {
            let pod = names.pod(i);
            HostStatus {
                ordinal: i,
                ready: pods.iter().any(|p| p.name_any() == pod && pod_ready(p)),
                host_id: resources::host_id(farm, i),
                pod,
                draining,
            }
        })
        .collect()
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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

/// The events a user should see for the step from `old` to `new`: the farm created, scaled,
/// rolled out with a new configuration or short of servers by a disruption (Normal), and pods
/// that started failing (Warning).
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
    // A disruption is planned work, not a fault: a Normal event, once when it begins.
    let disrupted = |s: &UploadFarmStatus| {
        conditions::find(&s.conditions, conditions::READY)
            .filter(|c| c.reason == conditions::DISRUPTED)
            .map(|c| c.message.clone())
    };
    if let (None, Some(message)) = (disrupted(old), disrupted(new)) {
        out.push((EventType::Normal, conditions::DISRUPTED, message));
    }
    out
}

/// The Warning event that reports a farm that could not be reconciled: its reason, action and
/// note.
pub fn failure_event(problem: &Problem) -> (&'static str, &'static str, String) {
    match problem {
        Problem::InvalidSpec(why) => (
            "InvalidSpec",
            "Validate",
            InvalidSpec(why.clone()).to_string(),
        ),
        Problem::ApplyFailed(why) => ("ApplyFailed", "Apply", why.clone()),
    }
}

#[cfg(test)]
mod tests;
