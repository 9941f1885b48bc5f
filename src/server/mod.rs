//! The BITS upload server (`bitsfarm serve`).

pub mod auth;
pub mod beneath;
pub mod clock;
pub mod conn;
pub mod conn_limits;
pub mod dir_lock;
pub mod disk;
pub mod handoff;
pub mod heap;
pub mod hooks;
pub mod http;
pub mod limits;
pub mod linger;
pub mod metrics;
pub mod notify;
pub mod refusals;
pub mod session;
pub mod state;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{info, warn};

use crate::config::ServerConfig;
use conn::{Accepted, Acceptors, Listeners};
pub use state::{AppState, ServerError};

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub struct Server {
    state: Arc<AppState>,
    listeners: Listeners,
}

impl Server {
    /// Opens every data folder (recovering the sessions in it) and binds the listeners.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        heap::keep_freed_memory();
        let state = AppState::open(config).await?;
        let listeners = Listeners::bind(&state.config).await?;
        warn_unsafe(&state.config);
        Ok(Server {
            state: Arc::new(state),
            listeners,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.main.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes (or a drain ends), then lets in-flight requests finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let state = self.state;
        let graceful = GracefulShutdown::new();
        let chores = Chores::start(&state);
        let (acceptors, conns) = Acceptors::start(self.listeners, state.connection_limits.max);
        let drained = drained(&state, acceptors.shared());
        serve(&state, &graceful, conns, shutdown, drained).await;
        info!("shutting down: no new connections; waiting for requests in flight");
        state.ready.store(false, Ordering::Relaxed);
        acceptors.stop();
        chores.stop();
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still in flight after the grace period; stopping anyway");
        }
        info!("stopped");
    }
}

fn warn_unsafe(config: &ServerConfig) {
    if config.security.auth_enabled() && config.security.tls_cert.is_none() {
        warn!(
            "authentication is on without --tls-cert: Basic passwords and tokens travel in clear text unless TLS ends in front of this server"
        );
    }
    if !config.sync {
        warn!(
            "--unsafe-no-sync: fragments are acknowledged before they are flushed to disk; a crash can lose acknowledged uploads"
        );
    }
}

/// Serves accepted connections until `shutdown` or `drained` completes. SIGUSR1 (a stopping
/// pod's preStop) drains the server and makes it exit once empty, whoever started the drain.
async fn serve(
    state: &Arc<AppState>,
    graceful: &GracefulShutdown,
    mut conns: mpsc::Receiver<Accepted>,
    shutdown: impl Future<Output = ()>,
    drained: impl Future<Output = ()>,
) {
    let mut usr1 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
    tokio::pin!(drained);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = conns.recv() => {
                let Some(accepted) = accepted else { break };
                conn::spawn(state.clone(), graceful, accepted);
            }
            _ = &mut shutdown => break,
            _ = &mut drained => break,
            Some(()) = recv_or_never(&mut usr1) => state.signal_exit(),
        }
    }
}

/// The next signal, or never when the signal could not be set up.
async fn recv_or_never(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Completes once a drain has begun and every session has ended (unless the drain says stay).
async fn drained(state: &AppState, shared_acceptors: Vec<AbortHandle>) {
    state.drain.started().await;
    // Leaving the shared address: the kernel sends new connections to the other members.
    for task in &shared_acceptors {
        task.abort();
    }
    // A cancelled drain keeps the server running; the next drain is seen here too.
    while !state.drained_and_done() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    info!("drained: every session has ended");
}

/// The server's background tasks: the expiry sweep and the certificate reload.
struct Chores {
    sweeper: JoinHandle<()>,
    cert_watch: Option<JoinHandle<()>>,
}

impl Chores {
    fn start(state: &Arc<AppState>) -> Self {
        Chores {
            sweeper: tokio::spawn(sweep_expired(state.clone())),
            cert_watch: state.tls_cert.clone().map(|c| tokio::spawn(c.watch())),
        }
    }

    fn stop(self) {
        self.sweeper.abort();
        if let Some(w) = self.cert_watch {
            w.abort();
        }
    }
}

async fn sweep_expired(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.effective_cleanup_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for dir in &state.dirs {
            let n = dir.sweep_expired().await;
            if n > 0 {
                info!(dir = %dir.root().display(), removed = n, "expired sessions removed");
            }
        }
    }
}
