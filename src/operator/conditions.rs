//! The farm's conditions, computed from what was observed by pure functions: `Ready` (summary),
//! `Progressing` (a rollout or scaling is under way) and `Degraded` (something needs attention).

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

const TRUE: &str = "True";
const FALSE: &str = "False";
const UNKNOWN: &str = "Unknown";

/// The StatefulSet's rollout, reduced to what the conditions depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
    pub current_revision: Option<String>,
    pub update_revision: Option<String>,
}

impl Rollout {
    pub fn of(sts: &StatefulSet) -> Self {
        let s = sts.status.clone().unwrap_or_default();
        Rollout {
            generation: sts.metadata.generation,
            observed_generation: s.observed_generation,
            replicas: s.replicas,
            ready_replicas: s.ready_replicas.unwrap_or(0),
            updated_replicas: s.updated_replicas.unwrap_or(0),
            current_revision: s.current_revision,
            update_revision: s.update_revision,
        }
    }
}

/// Something that keeps the operator from doing its part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The spec cannot be turned into a working farm; nothing was applied.
    InvalidSpec(String),
    /// The API server refused or failed a request; retried with backoff.
    ApplyFailed(String),
}

/// A pod that is not just slow but failing, with the kubelet's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingPod {
    pub pod: String,
    pub reason: String,
}

/// Everything the conditions are computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The farm's `metadata.generation`.
    pub generation: Option<i64>,
    pub desired_replicas: i32,
    /// None until the StatefulSet has been applied.
    pub rollout: Option<Rollout>,
    pub failing_pods: Vec<FailingPod>,
    pub problem: Option<Problem>,
}

/// Where the StatefulSet stands relative to the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The StatefulSet has not reported a status yet.
    Creating,
    ScalingUp,
    ScalingDown,
    RollingUpdate,
    /// Every pod exists and runs the current template, but not all are ready.
    PodsStarting,
    AllReplicasReady,
}

pub fn phase(desired: i32, r: &Rollout) -> Phase {
    let Some(observed) = r.observed_generation else {
        return Phase::Creating;
    };
    if r.generation.is_some_and(|g| observed < g) {
        // The StatefulSet controller has not seen our last change yet; the spec's replica
        // count tells which kind of change it is.
        return match r.replicas.cmp(&desired) {
            std::cmp::Ordering::Less => Phase::ScalingUp,
            std::cmp::Ordering::Greater => Phase::ScalingDown,
            std::cmp::Ordering::Equal => Phase::RollingUpdate,
        };
    }
    if r.replicas < desired {
        return Phase::ScalingUp;
    }
    if r.replicas > desired {
        return Phase::ScalingDown;
    }
    let revisions_differ = matches!(
        (&r.current_revision, &r.update_revision),
        (Some(c), Some(u)) if c != u
    );
    if r.updated_replicas < desired || revisions_differ {
        return Phase::RollingUpdate;
    }
    if r.ready_replicas < desired {
        return Phase::PodsStarting;
    }
    Phase::AllReplicasReady
}

fn condition(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// Marks `Progressing` as a scale-down waiting for draining servers (`Draining`), as of `now`.
pub fn set_draining(conditions: &mut [Condition], message: String, now: Timestamp) {
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == PROGRESSING) {
        if c.status != TRUE {
            c.last_transition_time = Time(now);
        }
        c.status = TRUE.into();
        c.reason = "Draining".into();
        c.message = message;
    }
}

/// `Ready`'s reason while servers are missing because of a voluntary disruption.
pub const DISRUPTED: &str = "Disrupted";

/// Says in `Ready` that servers are missing because of a voluntary disruption (a node drain, an
/// eviction): a False `Ready` takes reason `Disrupted` (keeping its lastTransitionTime) unless a
/// failure already explains it (a failing pod is the more urgent news). A farm whose servers are
/// all ready is not short of any, whatever is being evicted next.
pub fn set_disrupted(conditions: &mut [Condition], message: String) {
    let failing = conditions
        .iter()
        .any(|c| c.type_ == DEGRADED && c.status == TRUE);
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == READY) {
        if failing || c.status == TRUE {
            return;
        }
        c.reason = DISRUPTED.into();
        c.message = message;
    }
}

/// The three conditions for `obs`, with `lastTransitionTime` kept from `old` unless the status
/// flipped.
pub fn conditions(obs: &Observed, old: &[Condition], now: Timestamp) -> Vec<Condition> {
    let desired = obs.desired_replicas;
    let (ready, progressing) = match (&obs.problem, &obs.rollout) {
        (Some(Problem::InvalidSpec(m)), _) => (
            condition(READY, FALSE, "InvalidSpec", m.clone()),
            condition(
                PROGRESSING,
                FALSE,
                "InvalidSpec",
                "nothing is rolled out until the spec is fixed".into(),
            ),
        ),
        (Some(Problem::ApplyFailed(m)), _) => (
            condition(READY, FALSE, "ApplyFailed", m.clone()),
            condition(
                PROGRESSING,
                UNKNOWN,
                "ApplyFailed",
                "the operator could not apply the farm's objects; retrying".into(),
            ),
        ),
        (None, None) => (
            condition(
                READY,
                FALSE,
                "Creating",
                "creating the farm's objects".into(),
            ),
            condition(
                PROGRESSING,
                TRUE,
                "Creating",
                "creating the farm's objects".into(),
            ),
        ),
        (None, Some(r)) => {
            let ready_msg = format!("{} of {desired} upload servers ready", r.ready_replicas);
            match phase(desired, r) {
                Phase::AllReplicasReady => (
                    condition(READY, TRUE, "AllReplicasReady", ready_msg),
                    condition(
                        PROGRESSING,
                        FALSE,
                        "RolloutComplete",
                        format!("{desired} upload servers run the current spec"),
                    ),
                ),
                p => {
                    let (reason, what) = match p {
                        Phase::Creating => {
                            ("Creating", "the StatefulSet is being created".to_string())
                        }
                        Phase::ScalingUp => (
                            "ScalingUp",
                            format!("scaling up from {} to {desired} upload servers", r.replicas),
                        ),
                        Phase::ScalingDown => (
                            "ScalingDown",
                            format!(
                                "scaling down from {} to {desired} upload servers",
                                r.replicas
                            ),
                        ),
                        Phase::RollingUpdate => (
                            "RollingUpdate",
                            format!(
                                "{} of {desired} upload servers run the current spec",
                                r.updated_replicas
                            ),
                        ),
                        Phase::PodsStarting | Phase::AllReplicasReady => (
                            "PodsStarting",
                            format!(
                                "waiting for {} upload servers to become ready",
                                desired - r.ready_replicas
                            ),
                        ),
                    };
                    (
                        condition(READY, FALSE, reason, ready_msg),
                        condition(PROGRESSING, TRUE, reason, what),
                    )
                }
            }
        }
    };
    let degraded = match (&obs.problem, obs.failing_pods.as_slice()) {
        (Some(Problem::InvalidSpec(m)), _) => condition(DEGRADED, TRUE, "InvalidSpec", m.clone()),
        (Some(Problem::ApplyFailed(m)), _) => condition(DEGRADED, TRUE, "ApplyFailed", m.clone()),
        (None, []) => condition(DEGRADED, FALSE, "AsExpected", "no problems seen".into()),
        (None, failing) => condition(
            DEGRADED,
            TRUE,
            "PodsFailing",
            failing
                .iter()
                .map(|f| format!("{}: {}", f.pod, f.reason))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    };
    // A pod that keeps failing also keeps the farm from being ready; say why in Ready too.
    let ready = if ready.status == FALSE && degraded.reason == "PodsFailing" {
        condition(READY, FALSE, "PodsFailing", degraded.message.clone())
    } else {
        ready
    };
    [ready, progressing, degraded]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = obs.generation;
            c.last_transition_time = match old.iter().find(|o| o.type_ == c.type_) {
                Some(o) if o.status == c.status => o.last_transition_time.clone(),
                _ => Time(now),
            };
            c
        })
        .collect()
}

/// The condition of `type_`, if present.
pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests;
