//! The BITS upload server (`bitsfarm serve`).

pub mod hooks;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod paths;
pub mod protocol;
pub mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

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
    #[error("cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
    drain_started: tokio::sync::Notify,
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
        let mut dirs = Vec::new();
        for d in &config.directories {
            let dir = UploadDir::open(d.clone(), metrics.clone(), true)?;
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
        let state = Arc::new(AppState {
            config,
            metrics,
            dirs,
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            drain_started: tokio::sync::Notify::new(),
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
        let acceptors: Vec<_> = accepts
            .into_iter()
            .map(|(listener, role, shared)| {
                let tx = conn_tx.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, peer)) => {
                                if tx.send((stream, peer, role)).await.is_err() {
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
            while state.open_sessions() > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            info!("drained: every session has ended");
        };
        tokio::pin!(drained);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                conn = conn_rx.recv() => {
                    let Some((stream, peer, role)) = conn else { break };
                    let _ = stream.set_nodelay(true);
                    let st = state.clone();
                    let svc = service_fn(move |req| http::handle(st.clone(), role, req));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(state.config.read_timeout)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                _ = &mut shutdown => break,
                _ = &mut drained => break,
                Some(()) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
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
