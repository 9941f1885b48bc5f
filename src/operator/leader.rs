//! Leader election: of the operator's replicas, only the one holding the `coordination.k8s.io`
//! Lease runs the controller; the others stand by, live and ready (a rollout waits for readiness,
//! so a standby that reported not-ready would stall it), saying in `/metrics` and in their log
//! that they do not lead.
//!
//! Built on kube-lease-manager (kube 5, like us). What it does on the wire: a get of the Lease,
//! a create when missing, then server-side apply patches (take, renew) and strategic merge
//! patches (count transitions, release); no update, list or watch. A follower re-reads the Lease
//! when the holder's term would end, so a takeover comes at most one lease duration after the
//! last renewal (or the release of a leader that stopped cleanly).
//!
//! Losing the Lease ends the process (`run` returns an error, `main` exits non-zero):
//! the controller future is dropped at once, so no reconcile goes on writing, and Kubernetes
//! restarts the container as a fresh follower. Simpler and safer than stopping and restarting a
//! controller in-process, whose watches and queues would have to be rebuilt anyway.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerBuilder};

/// `bitsfarm operator` flags for leader election.
#[derive(Debug, Clone, clap::Args)]
pub struct ElectionArgs {
    /// Run the controller without a Lease, as the only operator: for `bitsfarm operator` run by
    /// hand or by tests. Never with more than one replica.
    #[arg(long)]
    pub no_leader_election: bool,
    /// Name of the Lease the replicas compete for, in `--lease-namespace`.
    #[arg(long, default_value = "bitsfarm-operator")]
    pub lease_name: String,
    /// Namespace of the Lease: the operator's own (the chart passes POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease: its pod name (the chart passes POD_NAME).
    #[arg(long, env = "POD_NAME")]
    pub lease_identity: Option<String>,
    /// Seconds a leader's term lasts without renewal: how long a dead leader's replicas wait
    /// before one takes over (client-go's default, 15).
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds into its term at which the leader renews (client-go renews within its 10 s
    /// renew deadline); the rest of the term is its margin for a slow API server.
    #[arg(long, default_value_t = 10)]
    pub lease_renew_seconds: u64,
}

/// How this replica takes part in leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// The only operator: reconcile at once.
    Off,
    On(LeaseSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration_seconds: u64,
    /// Seconds before the end of the term at which the leader renews.
    pub grace_seconds: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElectionError {
    #[error(
        "leader election needs the operator's namespace for its Lease: set POD_NAMESPACE (the \
         chart does, from the downward API) or --lease-namespace, or run the only operator with \
         --no-leader-election"
    )]
    NoNamespace,
    #[error(
        "leader election needs this replica's identity: set POD_NAME (the chart does, from the \
         downward API) or --lease-identity, or run the only operator with --no-leader-election"
    )]
    NoIdentity,
    #[error(
        "--lease-renew-seconds ({renew}) must be at least 1 and less than \
         --lease-duration-seconds ({duration}), or the Lease would expire before it is renewed"
    )]
    Timing { duration: u64, renew: u64 },
}

impl ElectionArgs {
    /// The election these flags ask for, checked.
    pub fn election(&self) -> Result<Election, ElectionError> {
        if self.no_leader_election {
            return Ok(Election::Off);
        }
        let (duration, renew) = (self.lease_duration_seconds, self.lease_renew_seconds);
        if renew == 0 || renew >= duration {
            return Err(ElectionError::Timing { duration, renew });
        }
        let present = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(Election::On(LeaseSettings {
            name: self.lease_name.clone(),
            namespace: present(&self.lease_namespace).ok_or(ElectionError::NoNamespace)?,
            identity: present(&self.lease_identity).ok_or(ElectionError::NoIdentity)?,
            duration_seconds: duration,
            grace_seconds: duration - renew,
        }))
    }
}

/// A Lease this replica competes for.
pub struct Candidate {
    manager: LeaseManager,
    settings: LeaseSettings,
}

impl Candidate {
    /// Gets the Lease, creating it when missing. `client` should be one whose requests time out
    /// well within the grace period (`lease_client`): a renewal that hangs must fail, and so end
    /// the leadership, before the term runs out and another replica takes over.
    pub async fn new(client: Client, settings: LeaseSettings) -> anyhow::Result<Self> {
        let manager = LeaseManagerBuilder::new(client, &settings.name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            // The builder keeps the random identity's field manager otherwise: one per replica,
            // named after it, reads better in the Lease's managedFields and the audit log.
            .with_field_manager(format!("kube-lease-manager-{}", settings.identity))
            .with_duration(settings.duration_seconds)
            .with_grace(settings.grace_seconds)
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .build()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot use the Lease {}/{}: {e}; the operator needs get and create on \
                     coordination.k8s.io leases in its namespace (the chart's Role grants them)",
                    settings.namespace,
                    settings.name
                )
            })?;
        Ok(Candidate { manager, settings })
    }

    /// Waits until this replica holds the Lease. Errors (the API server unreachable) are
    /// retried: a follower has nothing to lose by waiting.
    pub async fn acquire(&self) {
        loop {
            match self.manager.changed().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.settings.name, "cannot read or take the Lease; retrying in 2 s");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Renews the Lease while this replica leads; returns why it stopped leading: another
    /// replica took it, or a renewal failed (then the term may run out any moment, and
    /// reconciling on could mean two writers).
    pub async fn hold(&self) -> String {
        loop {
            match self.manager.changed().await {
                Ok(true) => {}
                Ok(false) => return "another replica holds the Lease".into(),
                Err(e) => return format!("renewing the Lease failed: {e}"),
            }
        }
    }

    /// Gives the Lease up, so that a follower takes over at once rather than when the term ends.
    pub async fn release(&self) {
        match self.manager.release().await {
            Ok(()) => tracing::info!(lease = %self.settings.name, "released the Lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the Lease; a follower takes over when it expires")
            }
        }
    }
}

/// A client for the Lease alone, whose requests give up within `grace`: a renewal must fail
/// (and end the leadership) while the term still runs, not hang past its end.
pub fn lease_client(config: &kube::Config, grace: Duration) -> anyhow::Result<Client> {
    let mut config = config.clone();
    let limit = grace
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_secs(1));
    config.connect_timeout = Some(limit);
    config.read_timeout = Some(limit);
    config.write_timeout = Some(limit);
    // kube retries 429s and 5xx with backoff by default, which could stretch one renewal past
    // the term; the lease manager retries by itself, and a failed renewal must show at once.
    config.default_retry = false;
    Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot make the Lease's API client: {e}"))
}

#[cfg(test)]
mod tests;
