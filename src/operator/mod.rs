//! The UploadFarm operator: turns each UploadFarm into a ConfigMap, a headless Service, a
//! StatefulSet, one Service per pod, a shared Service and, if asked, a NetworkPolicy, and
//! reports how the farm is doing.
//!
//! - `controller`: the reconcile, orchestration only; `apply`: apply and prune what a farm owns,
//!   every kind in one sweep; `error`: why a reconcile failed.
//! - Pure: `resources` (the children), `status` (status and events), `conditions`, `scale_down`.
//! - `rbac` (the API access the calls above need), `health`, `metrics`, `render`, `commands`.

pub mod apply;
pub mod commands;
pub mod conditions;
pub mod controller;
pub mod error;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod rbac;
pub mod render;
pub mod resources;
pub mod scale_down;
pub mod status;

#[cfg(test)]
mod fixtures;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::{Controller, watcher};

use crate::api::UploadFarm;
use controller::{Context, error_policy, reconcile};
use health::Health;
use leader::{Candidate, Election};
use metrics::Metrics;
use resources::{BuildOptions, MANAGED_BY};

/// How `bitsfarm operator` runs.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// Watch one namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// The image farms run when their spec names none (the operator's own, from the chart).
    pub image: String,
    /// Farms reconciled at the same time.
    pub concurrency: u16,
    /// Whether this replica must hold the Lease to reconcile.
    pub election: Election,
}

/// Whether the API server knows `persistentVolumeClaimRetentionPolicy` (1.27+).
pub fn supports_pvc_retention(major: &str, minor: &str) -> bool {
    let num = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    };
    (num(major), num(minor)) >= (1, 27)
}

/// `bitsfarm operator`: serves health and metrics, waits for the CRD and, with leader election,
/// for the Lease, then runs the controller until SIGINT or SIGTERM (then gives the Lease up), or
/// until it loses the Lease (then returns an error at once, for the process to exit).
pub async fn run(opts: OperatorOptions) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!("cannot find the Kubernetes API (in-cluster config or KUBECONFIG): {e}")
    })?;
    let client = Client::try_from(config.clone()).map_err(|e| {
        anyhow::anyhow!("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}")
    })?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health {
        ready: Default::default(),
        metrics: metrics.clone(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let health_task = tokio::spawn(health::serve(
        opts.listen,
        health.clone(),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        crate::shutdown::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let version = client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the API server's version: {e}"))?;
    let build = BuildOptions {
        default_image: opts.image.clone(),
        pvc_retention_policy: supports_pvc_retention(&version.major, &version.minor),
    };
    tracing::info!(
        version = %version.git_version,
        pvc_retention_policy = build.pvc_retention_policy,
        namespace = opts.namespace.as_deref().unwrap_or("(all)"),
        "connected to the API server"
    );

    let farms: Api<DeserializeGuard<UploadFarm>> = scoped(&client, &opts.namespace);
    if !wait_for_crd(&client, &opts.namespace, &metrics, stop_rx.clone()).await {
        return Ok(());
    }
    // Ready from here on, leading or not: a standby is healthy, and a rollout waits for it.
    health.ready.store(true, Ordering::Relaxed);
    let candidate = match &opts.election {
        Election::Off => None,
        Election::On(settings) => {
            let grace = Duration::from_secs(settings.grace_seconds);
            let candidate =
                Candidate::new(leader::lease_client(&config, grace)?, settings.clone()).await?;
            tracing::info!(identity = %settings.identity, lease = %settings.name, namespace = %settings.namespace,
                "not the leader: standing by, ready, until the Lease is free");
            tokio::select! {
                _ = candidate.acquire() => {}
                _ = stopped(stop_rx.clone()) => {
                    tracing::info!("stopped while standing by");
                    health.ready.store(false, Ordering::Relaxed);
                    let _ = health_task.await;
                    return Ok(());
                }
            }
            tracing::info!(identity = %settings.identity, lease = %settings.name, "leading: holds the Lease; starting the controller");
            Some(candidate)
        }
    };
    metrics.leader.set(1);

    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let ctx = Arc::new(Context::new(client.clone(), build, metrics.clone()));
    let controller = Controller::new(farms, watcher::Config::default().any_semantic())
        .owns(
            scoped::<StatefulSet>(&client, &opts.namespace),
            children.clone(),
        )
        .owns(
            scoped::<Service>(&client, &opts.namespace),
            children.clone(),
        )
        .owns(
            scoped::<ConfigMap>(&client, &opts.namespace),
            children.clone(),
        )
        // A NetworkPolicy edited or deleted by hand is put back at once, not at the next
        // periodic reconcile: until then the pods would be open.
        .owns(
            scoped::<NetworkPolicy>(&client, &opts.namespace),
            children.clone(),
        )
        // A budget deleted by hand is put back at once: until then a drain could stop every
        // server of the farm together.
        .owns(
            scoped::<PodDisruptionBudget>(&client, &opts.namespace),
            children,
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .graceful_shutdown_on(stopped(stop_rx.clone()));
    tracing::info!("controller started");
    let running = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(farm = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not complete"),
            }
        });
    match &candidate {
        None => running.await,
        Some(lease) => {
            tokio::select! {
                _ = running => {}
                why = lease.hold() => {
                    // Dropping the controller here cancels every reconcile in flight: another
                    // replica may lead already, and two writers must never overlap.
                    metrics.leader.set(0);
                    tracing::error!(%why, "lost the leadership: stopped reconciling; exiting so that Kubernetes restarts this replica as a follower");
                    return Err(anyhow::anyhow!("lost the leadership ({why}); exiting so that Kubernetes restarts this replica as a follower"));
                }
            }
        }
    }
    health.ready.store(false, Ordering::Relaxed);
    tracing::info!("controller stopped");
    metrics.leader.set(0);
    if let Some(lease) = &candidate {
        lease.release().await;
    }
    let _ = health_task.await;
    Ok(())
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Polls until UploadFarms can be listed: installing the CRD after the operator is a normal
/// order of events, not a reason to crash-loop. Returns false when asked to stop first.
async fn wait_for_crd(
    client: &Client,
    namespace: &Option<String>,
    metrics: &Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let api: Api<DeserializeGuard<UploadFarm>> = scoped(client, namespace);
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {
                metrics.crd_missing.set(0);
                return true;
            }
            Err(e) => {
                metrics.crd_missing.set(1);
                tracing::warn!(error = %e, "UploadFarm CRD not usable yet; install it with `bitsfarm crd | kubectl apply --server-side -f -`; retrying in 10 s");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvc_retention_only_from_1_27() {
        assert!(!supports_pvc_retention("1", "20"));
        assert!(!supports_pvc_retention("1", "26+"));
        assert!(supports_pvc_retention("1", "27"));
        assert!(supports_pvc_retention("1", "33+"));
    }
}
