//! Applies what a farm owns and sweeps away what it no longer asks for, in one pass over every
//! kind (the pattern of Stackable's `ClusterResources`): each child is applied with server-side
//! apply under the operator's field manager, then, kind by kind, what the farm owns is listed by
//! its labels and whatever is not in the applied set is deleted. The decisions are the pure
//! builders' (`resources`) and `orphans`; this module only talks to the API server.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::Error;
use super::resources::{self, Children, FIELD_MANAGER, Names};
use crate::api::UploadFarm;

/// A namespaced Kubernetes object the operator applies or sweeps, of a kind known at compile time.
pub trait Child:
    k8s_openapi::Resource
    + Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
{
}

impl<K> Child for K where
    K: k8s_openapi::Resource
        + Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
{
}

/// Makes the farm's objects in `ns` what `children` says: creates the handoff Secret when
/// missing, applies every child in order (the headless Service before the StatefulSet that names
/// it; the NetworkPolicy before the pods it restricts, so that a farm that asks for one never has
/// pods without it), then deletes the children the farm owns and no longer asks for. Returns the
/// StatefulSet and the PodDisruptionBudget as the API server stored them, for the status.
pub async fn apply_and_prune(
    client: &Client,
    farm: &UploadFarm,
    ns: &str,
    children: &Children,
) -> Result<Applied, Error> {
    ensure_handoff_secret(client, farm, ns).await?;
    apply(client, ns, &children.config_map).await?;
    apply(client, ns, &children.headless_service).await?;
    if let Some(policy) = &children.network_policy {
        apply(client, ns, policy).await?;
    }
    // A policy the farm stopped asking for goes now, before anything else can fail.
    let policies: Vec<String> = children
        .network_policy
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    prune_kind::<NetworkPolicy>(client, farm, ns, &policies, "NetworkPolicies").await?;
    let name = Names::of(farm).stateful_set();
    let body =
        resources::stateful_set_apply_body(&children.stateful_set).map_err(|e| Error::Apply {
            kind: "StatefulSet",
            name: name.clone(),
            source: kube::Error::SerdeError(e),
        })?;
    let stateful_set = apply_as::<StatefulSet>(client, ns, &name, &body).await?;
    for service in &children.host_services {
        apply(client, ns, service).await?;
    }
    apply(client, ns, &children.shared_service).await?;
    prune_kind::<Service>(
        client,
        farm,
        ns,
        &children.service_names(),
        "per-pod Services",
    )
    .await?;
    let disruption_budget = match &children.disruption_budget {
        Some(budget) => Some(apply(client, ns, budget).await?),
        None => None,
    };
    // A farm shrunk to one server, or that turned its budget off, loses the one it had: left in
    // place, a budget over one pod would block every drain of that pod's node.
    let budgets: Vec<String> = disruption_budget
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    prune_kind::<PodDisruptionBudget>(client, farm, ns, &budgets, "PodDisruptionBudgets").await?;
    Ok(Applied {
        stateful_set,
        disruption_budget,
    })
}

/// What the API server stored of the children the status is computed from.
#[derive(Debug, Clone)]
pub struct Applied {
    pub stateful_set: StatefulSet,
    /// Its `status` says how many disruptions the budget allows now.
    pub disruption_budget: Option<PodDisruptionBudget>,
}

/// The sweep covers the kinds of which a farm can stop asking for objects: per-pod Services come
/// and go with its size (a scale-down's draining servers keep theirs until they are removed, as
/// they are in `children`), the NetworkPolicy with `spec.networkPolicy`, the
/// PodDisruptionBudget with `spec.disruptionBudget` and the farm's size. The ConfigMap and the
/// StatefulSet are one object each, always asked for under a name fixed by the farm's: sweeping
/// them could never delete anything, and would only cost two lists per reconcile and the right to
/// delete StatefulSets. The handoff Secret is never listed: the operator may not read Secrets.
/// Garbage collection removes every child with the farm.
///
/// Lists the farm's objects of kind `K` by its labels and deletes the orphans among them.
async fn prune_kind<K: Child>(
    client: &Client,
    farm: &UploadFarm,
    ns: &str,
    wanted: &[String],
    what: &'static str,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let selector = resources::owned_selector(&farm.name_any());
    let listed = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::List { what, source })?
        .items;
    for name in orphans(farm, &listed, wanted) {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(kind = K::KIND, %name, "deleted a child the farm no longer asks for")
            }
            // Already gone: someone else deleted it first.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Prune {
                    kind: K::KIND,
                    name,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Of the objects listed by the farm's labels, the names of those to delete, sorted: the ones
/// whose controller is this very farm (its uid, so that an object someone else made, even with
/// copied labels, is never touched) and that are not `wanted`. A farm without a uid (never
/// stored) owns nothing.
pub fn orphans<K: Resource>(farm: &UploadFarm, listed: &[K], wanted: &[String]) -> Vec<String> {
    let Some(uid) = farm.metadata.uid.as_deref() else {
        return Vec::new();
    };
    let mut names: Vec<String> = listed
        .iter()
        .filter(|o| {
            o.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && r.kind == "UploadFarm" && r.uid == uid)
        })
        .map(ResourceExt::name_any)
        .filter(|name| !wanted.contains(name))
        .collect();
    names.sort();
    names
}

/// Server-side apply of one child, named by its own metadata, as the operator's field manager.
async fn apply<K: Child>(client: &Client, ns: &str, object: &K) -> Result<K, Error> {
    apply_as(client, ns, &object.name_any(), object).await
}

/// Server-side apply of `body` as the `K` named `name`.
async fn apply_as<K: Child>(
    client: &Client,
    ns: &str,
    name: &str,
    body: &(impl Serialize + Debug),
) -> Result<K, Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: K::KIND,
        name: name.to_string(),
        source,
    })
}

/// A new key for a farm's handoff Secret: 32 bytes from the operating system's random source,
/// as 64 hex characters (the servers take at least `MIN_SECRET_LEN` bytes of the file).
pub fn new_handoff_secret() -> Result<String, &'static str> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the operating system's random source failed")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates the farm's handoff secret unless it exists. It is never applied over: a new value
/// would make every open session id name no owner.
async fn ensure_handoff_secret(client: &Client, farm: &UploadFarm, ns: &str) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = Names::of(farm).handoff_secret();
    let failed = |source| Error::Apply {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    // Created, never read: a 409 means it is there, and the operator needs no right to read
    // Secrets.
    let secret = new_handoff_secret().map_err(|e| failed(kube::Error::Service(e.into())))?;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::operator::resources::tests::farm_with;

    #[test]
    fn only_children_this_farm_controls_and_no_longer_wants_are_orphans() {
        let on = farm_with("farm", json!({"networkPolicy": {"enabled": true}}));
        let ours = resources::network_policy(&on).unwrap().unwrap();
        let mut foreign = ours.clone();
        foreign.metadata.name = Some("handmade".into());
        foreign.metadata.owner_references = None;
        let mut other_farm = ours.clone();
        other_farm.metadata.name = Some("farm-before-recreation".into());
        if let Some(refs) = other_farm.metadata.owner_references.as_mut() {
            refs[0].uid = "uid-old".into();
        }
        let listed = [foreign, ours, other_farm];
        let off = farm_with("farm", json!({}));
        assert_eq!(orphans(&off, &listed, &[]), ["farm-network-policy"]);
        assert!(orphans(&on, &listed, &["farm-network-policy".into()]).is_empty());
        let mut unsaved = off.clone();
        unsaved.metadata.uid = None;
        assert!(orphans(&unsaved, &listed, &[]).is_empty());
    }

    #[test]
    fn a_smaller_farm_orphans_the_services_of_the_pods_it_no_longer_runs() {
        let f = farm_with("farm", json!({"replicas": 4}));
        let listed = resources::children(&f, &resources::BuildOptions::default())
            .unwrap()
            .host_services;
        let smaller = farm_with("farm", json!({"replicas": 2}));
        let wanted = resources::children(&smaller, &resources::BuildOptions::default())
            .unwrap()
            .service_names();
        assert_eq!(orphans(&smaller, &listed, &wanted), ["farm-2", "farm-3"]);
        assert!(
            orphans(
                &f,
                &listed,
                &listed.iter().map(|s| s.name_any()).collect::<Vec<_>>()
            )
            .is_empty()
        );
    }
}
