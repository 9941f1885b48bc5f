//! What every request handler shares (`AppState`), how it is put together from the configuration
//! at start-up, and the server's drain (`DrainState`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use super::conn_limits::{AddressLimit, ConnectionLimits, DescriptorError};
use super::dir_lock;
use super::limits::SessionCounter;
use super::metrics::Metrics;
use super::refusals::RefusalLog;
use super::session::{BodyBudget, StoreError, UploadDir};
use super::{auth, handoff, notify, tls};
use crate::config::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DirLock(#[from] dir_lock::DirLockError),
    /// `key`: the setting that named the address (`listen`, `admin-listen`, `shared-listen`).
    #[error("cannot listen on {addr} ({key}): {error}{}", bind_hint(addr, error))]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
    /// Users or tokens file, TLS certificate, backend credentials: unusable at start-up.
    #[error("{0}")]
    Security(String),
}

/// What to do about a listener that could not be made, for the errors that have one answer.
fn bind_hint(addr: &SocketAddr, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    const IN_USE: &str = "another process is listening on it: stop it, or choose another port";
    const LOW_PORT: &str =
        "ports below 1024 need root or CAP_NET_BIND_SERVICE: choose one from 1024 up";
    match error.kind() {
        ErrorKind::AddrInUse => format!("; {IN_USE}"),
        ErrorKind::AddrNotAvailable => format!(
            "; no network interface of this machine has the address {}: listen on one it has \
             (127.0.0.1 for this machine only, 0.0.0.0 for every interface)",
            addr.ip()
        ),
        ErrorKind::PermissionDenied if addr.port() < 1024 => format!("; {LOW_PORT}"),
        _ => String::new(),
    }
}

/// What every request handler shares.
pub struct AppState {
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
    /// Upload directories, longest URL prefix first.
    pub dirs: Vec<Arc<UploadDir>>,
    pub ready: AtomicBool,
    pub drain: DrainState,
    /// Credentials, when authentication is on.
    pub auth: Option<Arc<auth::Authenticator>>,
    /// Open sessions per user and in all, for the session limits and the drain.
    pub sessions: Arc<SessionCounter>,
    /// TLS for the upload listener(s), when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub(super) tls_cert: Option<Arc<tls::ReloadingCert>>,
    /// Session handoff to and from the other members of the farm, when configured.
    pub handoff: Option<handoff::Forwarder>,
    /// The open-connections cap and each address's share, fitted to the descriptor limit.
    pub connection_limits: ConnectionLimits,
    /// Upload connections open per client address.
    pub addresses: Arc<AddressLimit>,
    /// Which refused sessions the log tells at info.
    pub refusals: RefusalLog,
}

/// A signalled stop's drain cannot be cancelled (`POST /drain?cancel=true` answers 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signalled;

impl AppState {
    /// Reads the credentials, certificates and farm key, and opens every data folder (recovering
    /// the sessions in it).
    pub async fn open(config: ServerConfig) -> Result<Self, ServerError> {
        // First, so that everything opened after it has the raised descriptor limit.
        let connection_limits = ConnectionLimits::for_this_process(&config.security)?;
        let metrics = Arc::new(Metrics::new());
        let sec = &config.security;
        let auth = authenticator(&config)?;
        let (tls, tls_cert) = tls_acceptor(&config)?;
        let notifier = notify::Notifier::with_credentials(
            sec.notify_header_file.clone(),
            sec.notify_ca_file.as_deref(),
        )
        .map_err(ServerError::Security)?;
        let handoff = forwarder(&config)?;
        let sessions = Arc::new(SessionCounter::new(
            sec.max_sessions_per_user,
            sec.max_sessions,
        ));
        let dirs = open_dirs(&config, &metrics, &sessions, &notifier).await?;
        Ok(AppState {
            config,
            metrics,
            dirs,
            ready: AtomicBool::new(true),
            drain: DrainState::default(),
            auth,
            sessions,
            tls,
            tls_cert,
            handoff,
            connection_limits,
            addresses: Arc::new(AddressLimit::new(connection_limits.per_address)),
            refusals: RefusalLog::default(),
        })
    }

    /// Starts draining (idempotent): Create-Session is refused, readiness fails, the shared
    /// address is given up, and the server exits once no session is open. `stay` (the
    /// operator's scale-down) keeps it up once empty, so that the pod is not restarted as a
    /// fresh, ready server before it is removed.
    pub fn start_drain(&self, stay: bool) {
        if self.drain.start(stay) {
            self.log_drain_started();
        }
    }

    /// SIGUSR1 (a stopping pod's preStop): drain and exit once empty, whatever `stay` said
    /// before or says later.
    pub fn signal_exit(&self) {
        if self.drain.signal() {
            self.log_drain_started();
        }
    }

    fn log_drain_started(&self) {
        info!(
            sessions = self.open_sessions(),
            "draining: no new sessions; finishing open ones"
        );
    }

    /// Ends a drain that a scale-down started, when the farm grows back (idempotent): the server
    /// takes new sessions and is ready again. A shared local address that was left is not
    /// rejoined (the member keeps its own address).
    pub fn cancel_drain(&self) -> Result<(), Signalled> {
        if self.drain.cancel()? {
            info!("drain cancelled: taking new sessions again");
        }
        Ok(())
    }

    /// True when a drained server should exit now.
    pub fn drained_and_done(&self) -> bool {
        self.drain.get().exits(self.open_sessions())
    }

    /// Sessions still receiving (not closed, cancelled or expired), in every directory.
    pub fn open_sessions(&self) -> usize {
        self.sessions.total()
    }

    /// The URL paths uploads are taken below, for a client sent to the wrong one.
    pub fn upload_paths(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.config.upload_path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The upload directories with their data folders, for the log.
    pub fn upload_directories(&self) -> String {
        self.dirs
            .iter()
            .map(|d| {
                format!(
                    "{} (into {})",
                    d.config.upload_path.as_str(),
                    d.config.data_dir.display()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
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

fn authenticator(config: &ServerConfig) -> Result<Option<Arc<auth::Authenticator>>, ServerError> {
    let sec = &config.security;
    if !sec.auth_enabled() {
        return Ok(None);
    }
    auth::Authenticator::new(sec.users_file.clone(), sec.tokens_file.clone())
        .map(|a| Some(Arc::new(a)))
        .map_err(|e| ServerError::Security(e.to_string()))
}

type Tls = (
    Option<tokio_rustls::TlsAcceptor>,
    Option<Arc<tls::ReloadingCert>>,
);

fn tls_acceptor(config: &ServerConfig) -> Result<Tls, ServerError> {
    let sec = &config.security;
    let (Some(cert), Some(key)) = (&sec.tls_cert, &sec.tls_key) else {
        return Ok((None, None));
    };
    tls::install_ring_provider();
    let resolver =
        tls::ReloadingCert::load(cert.clone(), key.clone()).map_err(ServerError::Security)?;
    let acceptor = tls::acceptor(resolver.clone()).map_err(ServerError::Security)?;
    Ok((Some(acceptor), Some(resolver)))
}

fn forwarder(config: &ServerConfig) -> Result<Option<handoff::Forwarder>, ServerError> {
    let Some(h) = &config.handoff else {
        return Ok(None);
    };
    let security = |e: String| ServerError::Security(e);
    let key = handoff::FarmKey::load(&h.secret_file).map_err(|e| security(e.to_string()))?;
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
    handoff::Forwarder::new(
        membership,
        ca_file,
        slowest_backend + Duration::from_secs(60),
        // An owner that refuses connections for as long as a client would keep to its host id
        // is gone; before that it may come back with its sessions.
        Duration::from_secs(config.host_id_fallback_timeout),
    )
    .map(Some)
    .map_err(security)
}

/// Locks and opens every data folder; the directories come back longest URL prefix first.
async fn open_dirs(
    config: &ServerConfig,
    metrics: &Arc<Metrics>,
    sessions: &Arc<SessionCounter>,
    notifier: &notify::Notifier,
) -> Result<Vec<Arc<UploadDir>>, ServerError> {
    let mut dirs = Vec::new();
    let budget = BodyBudget::new(config.security.max_body_memory);
    for d in &config.directories {
        let lock = dir_lock::DataDirLock::acquire(&d.data_dir, dir_lock::DEFAULT_WAIT).await?;
        let mut dir = UploadDir::open(d.clone(), metrics.clone(), config.sync, lock)?;
        dir.set_session_counter(sessions.clone());
        dir.set_notifier(notifier.clone());
        dir.set_body_budget(budget.clone());
        dirs.push(Arc::new(dir));
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.config.upload_path.depth()));
    Ok(dirs)
}

/// Where a server is in draining, as a value: every transition is a pure function of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drain {
    /// No new sessions, not ready, off the shared address; exits when sessions end.
    pub draining: bool,
    /// Asked for by `POST /drain?stay=true`: stay up once drained and empty.
    pub stay: bool,
    /// SIGUSR1: exit once empty, whatever `stay` says. Never cleared.
    pub signalled: bool,
}

impl Drain {
    /// A drain request; a `stay` once asked for holds until the drain is cancelled.
    pub fn drain(self, stay: bool) -> Drain {
        Drain {
            draining: true,
            stay: self.stay || stay,
            ..self
        }
    }

    /// A stop signal: drain, and exit once empty for good.
    pub fn signal(self) -> Drain {
        Drain {
            draining: true,
            signalled: true,
            ..self
        }
    }

    /// The farm grew back: serve again. A signal's exit cannot be undone.
    pub fn cancel(self) -> Result<Drain, Signalled> {
        if self.signalled {
            return Err(Signalled);
        }
        Ok(Drain::default())
    }

    /// Whether a server in this state, with `open` sessions, should exit now.
    pub fn exits(self, open: usize) -> bool {
        self.draining && open == 0 && (self.signalled || !self.stay)
    }

    const DRAINING: u8 = 1;
    const STAY: u8 = 2;
    const SIGNALLED: u8 = 4;

    fn bits(self) -> u8 {
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        flag(self.draining, Self::DRAINING)
            | flag(self.stay, Self::STAY)
            | flag(self.signalled, Self::SIGNALLED)
    }

    fn from_bits(b: u8) -> Drain {
        Drain {
            draining: b & Self::DRAINING != 0,
            stay: b & Self::STAY != 0,
            signalled: b & Self::SIGNALLED != 0,
        }
    }
}

/// The server's `Drain`, in one atomic so that a request and the signal handler never see half a
/// transition, and the wake-up of whoever waits for a drain to begin.
#[derive(Debug, Default)]
pub struct DrainState {
    bits: AtomicU8,
    started: tokio::sync::Notify,
}

impl DrainState {
    pub fn get(&self) -> Drain {
        Drain::from_bits(self.bits.load(Ordering::SeqCst))
    }

    pub fn is_draining(&self) -> bool {
        self.get().draining
    }

    /// Moves to `step`'s state; true (and the waiter woken) when that began a drain.
    fn begin(&self, step: impl Fn(Drain) -> Drain) -> bool {
        let before = self
            .bits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(step(Drain::from_bits(b)).bits())
            })
            .unwrap_or_else(|b| b);
        if Drain::from_bits(before).draining {
            return false;
        }
        self.started.notify_one();
        true
    }

    /// A drain request (see `Drain::drain`); true when it began the drain.
    pub fn start(&self, stay: bool) -> bool {
        self.begin(|d| d.drain(stay))
    }

    /// A stop signal (see `Drain::signal`); true when it began the drain.
    pub fn signal(&self) -> bool {
        self.begin(Drain::signal)
    }

    /// Cancels a drain (see `Drain::cancel`); `Ok(true)` when there was one to cancel.
    pub fn cancel(&self) -> Result<bool, Signalled> {
        self.bits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Drain::from_bits(b).cancel().ok().map(Drain::bits)
            })
            .map(|before| Drain::from_bits(before).draining)
            .map_err(|_| Signalled)
    }

    /// Completes once a drain has begun (at once if one began since the last wait).
    pub async fn started(&self) {
        self.started.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVING: Drain = Drain {
        draining: false,
        stay: false,
        signalled: false,
    };

    #[test]
    fn a_plain_drain_exits_once_empty() {
        let d = SERVING.drain(false);
        assert!(d.draining && !d.stay && !d.signalled);
        assert!(!d.exits(1));
        assert!(d.exits(0));
        assert!(!SERVING.exits(0), "a serving server never exits on its own");
    }

    #[test]
    fn a_drain_that_stays_keeps_the_empty_server_up_until_cancelled() {
        let d = SERVING.drain(true);
        assert!(!d.exits(0));
        // A later plain drain does not take the stay back.
        assert!(!d.drain(false).exits(0));
        assert_eq!(d.cancel(), Ok(SERVING));
        assert_eq!(SERVING.cancel(), Ok(SERVING), "cancel is idempotent");
    }

    #[test]
    fn a_signal_exits_once_empty_and_no_stay_or_cancel_undoes_it() {
        for before in [SERVING, SERVING.drain(false), SERVING.drain(true)] {
            let d = before.signal();
            assert!(d.draining && d.signalled);
            assert!(!d.exits(2));
            assert!(d.exits(0), "from {before:?}");
            assert!(d.drain(true).exits(0), "a stay after the signal");
            assert_eq!(d.cancel(), Err(Signalled));
            assert_eq!(d.drain(true).cancel(), Err(Signalled));
        }
    }

    #[test]
    fn every_state_survives_its_encoding() {
        for b in 0..8 {
            assert_eq!(Drain::from_bits(b).bits(), b);
        }
    }

    #[tokio::test]
    async fn the_shared_state_reports_who_began_a_drain_and_wakes_its_waiter() {
        let s = DrainState::default();
        assert!(!s.is_draining());
        assert!(s.start(true), "the first request begins the drain");
        assert!(!s.start(false), "a second one does not");
        // The wake-up waits for the waiter, however late it comes.
        tokio::time::timeout(Duration::from_secs(1), s.started())
            .await
            .expect("woken");
        assert_eq!(s.cancel(), Ok(true));
        assert_eq!(s.cancel(), Ok(false));
        assert_eq!(s.get(), Drain::default());
        assert!(s.signal(), "a signal after a cancel begins a new drain");
        assert!(!s.start(true));
        assert_eq!(s.cancel(), Err(Signalled));
        assert!(s.get().exits(0));
    }
}
