//! The BITS upload server (`bitsfarm serve`).

pub mod auth;
pub mod clock;
pub mod conn;
pub mod dir_lock;
pub mod disk;
pub mod handoff;
pub mod hooks;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod session;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::ServerConfig;
use http::Role;
use metrics::Metrics;
use session::{StoreError, UploadDir};

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DirLock(#[from] dir_lock::DirLockError),
    #[error("cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Users or tokens file, TLS certificate, backend credentials: unusable at start-up.
    #[error("{0}")]
    Security(String),
}

/// What every request handler shares.
pub struct AppState {
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
    /// Upload directories, longest URL prefix first.
    pub dirs: Vec<Arc<UploadDir>>,
    pub ready: AtomicBool,
    /// Set by a drain request: no new sessions, off the shared address, exit when sessions end.
    pub draining: AtomicBool,
    /// Set by `POST /drain?stay=true` (the operator's scale-down): stay up once drained and
    /// empty, so the pod is not restarted as a fresh, ready server before it is removed.
    pub stay_when_drained: AtomicBool,
    /// Set by SIGUSR1 (a stopping pod's preStop) and never cleared: exit once empty, whatever
    /// `stay` said before or says later.
    pub exit_signalled: AtomicBool,
    drain_started: tokio::sync::Notify,
    /// Credentials, when authentication is on.
    pub auth: Option<Arc<auth::Authenticator>>,
    /// Open sessions per user and in all, for the session limits.
    pub sessions: Arc<limits::SessionCounter>,
    /// TLS for the upload listener(s), when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    tls_cert: Option<Arc<tls::ReloadingCert>>,
    /// Session handoff to and from the other members of the farm, when configured.
    pub handoff: Option<handoff::Forwarder>,
}

impl AppState {
    /// Starts draining (idempotent): Create-Session is refused, readiness fails, the shared
    /// address is given up, and the server exits once no session is open.
    pub fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            info!(
                sessions = self.open_sessions(),
                "draining: no new sessions; finishing open ones"
            );
            self.drain_started.notify_one();
        }
    }

    /// Ends a drain that a scale-down started, when the farm grows back (idempotent): the server
    /// takes new sessions and is ready again. A signalled stop cannot be undone. A shared local
    /// address that was left is not rejoined (the member keeps its own address).
    pub fn cancel_drain(&self) -> bool {
        if self.exit_signalled.load(Ordering::SeqCst) {
            return false;
        }
        if self.draining.swap(false, Ordering::SeqCst) {
            self.stay_when_drained.store(false, Ordering::SeqCst);
            info!("drain cancelled: taking new sessions again");
        }
        true
    }

    /// True when a drained server should exit now.
    fn drained_and_done(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
            && self.open_sessions() <= 0
            && (self.exit_signalled.load(Ordering::SeqCst)
                || !self.stay_when_drained.load(Ordering::SeqCst))
    }

    /// Sessions still receiving (not closed, cancelled or expired).
    pub fn open_sessions(&self) -> i64 {
        self.metrics.sessions_active.get()
    }

    /// The upload directory a URL path belongs to (the longest matching prefix) and the path below it.
    pub fn directory_for<'a>(&self, path: &'a str) -> Option<(&UploadDir, &'a str)> {
        self.dirs.iter().find_map(|d| {
            d.config
                .upload_path
                .strip(path)
                .map(|rest| (d.as_ref(), rest))
        })
    }
}

pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shared: Option<TcpListener>,
}

impl Server {
    /// Opens every data folder (recovering the sessions in it) and binds the listeners.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::new());
        let sec = &config.security;
        let security = |e: String| ServerError::Security(e);
        let auth = if sec.auth_enabled() {
            let a = auth::Authenticator::new(sec.users_file.clone(), sec.tokens_file.clone())
                .map_err(|e| security(e.to_string()))?;
            Some(Arc::new(a))
        } else {
            None
        };
        let (tls_acceptor, tls_cert) = match (&sec.tls_cert, &sec.tls_key) {
            (Some(cert), Some(key)) => {
                tls::install_ring_provider();
                let resolver =
                    tls::ReloadingCert::load(cert.clone(), key.clone()).map_err(security)?;
                (
                    Some(tls::acceptor(resolver.clone()).map_err(security)?),
                    Some(resolver),
                )
            }
            _ => (None, None),
        };
        let notifier = notify::Notifier::with_credentials(
            sec.notify_header_file.clone(),
            sec.notify_ca_file.as_deref(),
        )
        .map_err(security)?;
        let handoff = match &config.handoff {
            Some(h) => {
                let key =
                    handoff::FarmKey::load(&h.secret_file).map_err(|e| security(e.to_string()))?;
                let membership = handoff::Membership::new(h.ordinal, h.peers.clone(), key)
                    .map_err(|e| security(e.to_string()))?;
                let slowest_backend = config
                    .directories
                    .iter()
                    .map(|d| d.notify_timeout)
                    .max()
                    .unwrap_or_default();
                let ca_file = h.ca_file.as_deref().filter(|f| {
                    let there = f.exists();
                    if !there {
                        warn!(file = %f.display(), "the handoff CA bundle is missing; https peers cannot be verified, so packets for their sessions get \"session not found\"");
                    }
                    there
                });
                Some(
                    handoff::Forwarder::new(
                        membership,
                        ca_file,
                        slowest_backend + Duration::from_secs(60),
                        // An owner that refuses connections for as long as a client would keep to
                        // its host id is gone; before that it may come back with its sessions.
                        Duration::from_secs(config.host_id_fallback_timeout),
                    )
                    .map_err(security)?,
                )
            }
            None => None,
        };
        let sessions = Arc::new(limits::SessionCounter::new(
            sec.max_sessions_per_user,
            sec.max_sessions,
        ));
        let mut dirs = Vec::new();
        for d in &config.directories {
            let lock = dir_lock::DataDirLock::acquire(&d.data_dir, dir_lock::DEFAULT_WAIT).await?;
            let mut dir = UploadDir::open(d.clone(), metrics.clone(), config.sync, lock)?;
            dir.set_session_counter(sessions.clone());
            dir.set_notifier(notifier.clone());
            dirs.push(Arc::new(dir));
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.config.upload_path.depth()));
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let admin = match config.admin_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let shared = match config.shared_listen {
            Some(addr) => {
                Some(bind_shared(addr).map_err(|source| ServerError::Bind { addr, source })?)
            }
            None => None,
        };
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
        let state = Arc::new(AppState {
            config,
            metrics,
            dirs,
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            stay_when_drained: AtomicBool::new(false),
            exit_signalled: AtomicBool::new(false),
            drain_started: tokio::sync::Notify::new(),
            auth,
            sessions,
            tls: tls_acceptor,
            tls_cert,
            handoff,
        });
        Ok(Server {
            state,
            listener,
            admin,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let state = self.state;
        let graceful = GracefulShutdown::new();
        let sweeper = tokio::spawn(sweep_expired(state.clone()));
        let main_role = Role::Main {
            with_admin: self.admin.is_none(),
        };
        let mut accepts = vec![(self.listener, main_role, false)];
        if let Some(s) = self.shared {
            accepts.push((s, main_role, true));
        }
        if let Some(a) = self.admin {
            accepts.push((a, Role::Admin, false));
        }
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(64);
        // The cap on open upload connections: past it, connections wait in the listen backlog.
        let conn_cap = Arc::new(tokio::sync::Semaphore::new(
            state.config.security.max_connections,
        ));
        let cert_watch = state.tls_cert.clone().map(|c| tokio::spawn(c.watch()));
        let acceptors: Vec<_> = accepts
            .into_iter()
            .map(|(listener, role, shared)| {
                let tx = conn_tx.clone();
                let cap = conn_cap.clone();
                let task = tokio::spawn(async move {
                    loop {
                        let permit = match role {
                            Role::Admin => None,
                            Role::Main { .. } => match cap.clone().acquire_owned().await {
                                Ok(p) => Some(p),
                                Err(_) => return,
                            },
                        };
                        match listener.accept().await {
                            Ok((stream, peer)) => {
                                if tx.send((stream, peer, role, permit)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                // Out of file descriptors and the like: back off instead of spinning.
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                });
                (task, shared)
            })
            .collect();
        drop(conn_tx);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        let shared_acceptors: Vec<_> = acceptors
            .iter()
            .filter(|(_, shared)| *shared)
            .map(|(task, _)| task.abort_handle())
            .collect();
        let drained = async {
            state.drain_started.notified().await;
            // Leaving the shared address: the kernel sends new connections to the other members.
            for task in &shared_acceptors {
                task.abort();
            }
            // A cancelled drain keeps the server running; the next drain is seen here too.
            while !state.drained_and_done() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            info!("drained: every session has ended");
        };
        tokio::pin!(drained);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                conn = conn_rx.recv() => {
                    let Some((stream, peer, role, permit)) = conn else { break };
                    conn::spawn(state.clone(), &graceful, stream, peer, role, permit);
                }
                _ = &mut shutdown => break,
                _ = &mut drained => break,
                Some(()) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    // The pod is stopping (preStop): exit once empty, whoever started the drain.
                    state.exit_signalled.store(true, Ordering::SeqCst);
                    state.start_drain();
                }
            }
        }
        info!("shutting down: no new connections; waiting for requests in flight");
        state.ready.store(false, Ordering::Relaxed);
        for (a, _) in acceptors {
            a.abort();
        }
        sweeper.abort();
        if let Some(w) = cert_watch {
            w.abort();
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still in flight after the grace period; stopping anyway");
        }
        info!("stopped");
    }
}

/// A listener that several processes bind at once; Linux hands each connection to one of them.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
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

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
