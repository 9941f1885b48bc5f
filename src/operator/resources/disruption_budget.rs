//! The farm's PodDisruptionBudget (`spec.disruptionBudget`): how many servers a voluntary
//! disruption (a node drain, an eviction) may stop at once. Pure: the controller applies what
//! this builds; the sweep of leftover children deletes the one it made once the farm no longer
//! asks for one (turned off, or shrunk to one server).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{COMPONENT_DISRUPTION_BUDGET, Names, meta, selector_labels};
use crate::api::UploadFarm;

/// The budget of a farm that runs `servers` upload servers, or `None` when it asks for none or
/// runs fewer than two: a budget over one server would either allow nothing (and block every
/// node drain until someone deletes the pod by hand, the most reported trouble with other
/// operators' budgets) or allow everything (and mean nothing).
pub fn disruption_budget(farm: &UploadFarm, servers: i32) -> Option<PodDisruptionBudget> {
    let wanted = farm.spec.disruption_budget.clone().unwrap_or_default();
    if !wanted.enabled || servers < 2 {
        return None;
    }
    let names = Names::of(farm);
    Some(PodDisruptionBudget {
        metadata: meta(
            farm,
            names.disruption_budget(),
            COMPONENT_DISRUPTION_BUDGET,
            None,
        ),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(wanted.max_unavailable.unwrap_or(IntOrString::Int(1))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&names.farm)),
                ..LabelSelector::default()
            }),
            // A server that is not ready serves nobody: evicting it costs nothing, and counting it
            // against the budget would let one crash-looping pod block a node drain.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}
