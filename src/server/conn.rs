//! Connections: the listeners, their accept loops under the open-connections cap, and each
//! accepted connection (its address's share, optional TLS handshake, HTTP/1.1 with header and
//! idle keep-alive timeouts, a lingering close, and the open-connections permit and address slot
//! it holds until it closes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, warn};

use super::http::{self, Role};
use super::limits::{BodyPace, ConnActivity, Limit};
use super::linger::Lingering;
use super::state::{AppState, ServerError};
use crate::config::ServerConfig;

/// The sockets a server listens on.
pub struct Listeners {
    /// Uploads (and the admin endpoints when they have no listener of their own).
    pub main: TcpListener,
    pub admin: Option<TcpListener>,
    /// The address every member of a local farm shares; left when draining.
    pub shared: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &ServerConfig) -> Result<Self, ServerError> {
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|error| ServerError::Bind { key, addr, error })
        };
        let main = bind("listen", config.listen).await?;
        let admin = match config.admin_listen {
            Some(a) => Some(bind("admin-listen", a).await?),
            None => None,
        };
        let shared = match config.shared_listen {
            Some(addr) => Some(bind_shared(addr).map_err(|error| ServerError::Bind {
                key: "shared-listen",
                addr,
                error,
            })?),
            None => None,
        };
        Ok(Listeners {
            main,
            admin,
            shared,
        })
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

/// A connection a listener accepted, for the server loop to serve.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub role: Role,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// One accept loop per listener, each sending what it accepts to the server loop.
pub struct Acceptors {
    /// Each loop, and whether its listener is the shared address.
    tasks: Vec<(JoinHandle<()>, bool)>,
}

impl Acceptors {
    /// Starts accepting on every listener; at most `max_connections` upload connections are
    /// open at once (the admin listener is not capped).
    pub fn start(listeners: Listeners, max_connections: usize) -> (Self, mpsc::Receiver<Accepted>) {
        let main_role = Role::Main {
            with_admin: listeners.admin.is_none(),
        };
        let mut accepts = vec![(listeners.main, main_role, false)];
        if let Some(s) = listeners.shared {
            accepts.push((s, main_role, true));
        }
        if let Some(a) = listeners.admin {
            accepts.push((a, Role::Admin, false));
        }
        let (tx, rx) = mpsc::channel(64);
        // Past the cap, connections wait in the listen backlog.
        let cap = Arc::new(Semaphore::new(max_connections));
        let tasks = accepts
            .into_iter()
            .map(|(listener, role, shared)| {
                let task = tokio::spawn(accept_loop(listener, role, cap.clone(), tx.clone()));
                (task, shared)
            })
            .collect();
        (Acceptors { tasks }, rx)
    }

    /// The loops on the shared address, to leave it when draining.
    pub fn shared(&self) -> Vec<AbortHandle> {
        self.tasks
            .iter()
            .filter(|(_, shared)| *shared)
            .map(|(task, _)| task.abort_handle())
            .collect()
    }

    pub fn stop(self) {
        for (task, _) in self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    role: Role,
    cap: Arc<Semaphore>,
    tx: mpsc::Sender<Accepted>,
) {
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
                let accepted = Accepted {
                    stream,
                    peer,
                    role,
                    permit,
                };
                if tx.send(accepted).await.is_err() {
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
}

/// Serves an accepted connection on its own task, unless its address already holds its share
/// of the upload connections. Its permit (the open-connections cap) and its address slot are
/// released when the connection ends.
pub fn spawn(state: Arc<AppState>, graceful: &GracefulShutdown, accepted: Accepted) {
    let Accepted {
        stream,
        peer,
        role,
        permit,
    } = accepted;
    // The admin listener (probes, metrics) is not capped.
    let slot = match role {
        Role::Main { .. } => match state.addresses.try_open(peer.ip()) {
            Some(slot) => Some(slot),
            None => return refuse(&state, stream, peer),
        },
        Role::Admin => None,
    };
    let _ = stream.set_nodelay(true);
    let stream = Lingering::new(stream, BodyPace::of(&state.config));
    let tls = match role {
        Role::Main { .. } => state.tls.clone(),
        Role::Admin => None,
    };
    // The graceful watcher needs the connection future, which for TLS only exists after the
    // handshake; a watch on a plain `serve` future of either kind covers both.
    let handshake_timeout = state.config.read_timeout;
    let st = state.clone();
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        let _permit = permit;
        let _slot = slot;
        match tls {
            None => serve(st, watcher, stream, peer, role).await,
            Some(acceptor) => {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => serve(st, watcher, tls_stream, peer, role).await,
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    });
}

/// Closes a connection over its address's share at once, before reading anything: holding it
/// for a TLS handshake or a request head is what the share is there to prevent. On plain http
/// it gets a best-effort 503 first (an Ack, so that a BITS client retries later).
fn refuse(state: &AppState, stream: TcpStream, peer: SocketAddr) {
    state.metrics.limit_refused(Limit::ConnectionsPerAddress);
    debug!(
        %peer,
        open = state.addresses.open_from(peer.ip()),
        "connection refused: its address holds its share of the connections"
    );
    if state.tls.is_none() {
        let _ = stream.try_write(&refusal());
    }
}

/// `503` with `BG_E_HTTP_ERROR_503`, what Windows treats as "busy, retry later".
fn refusal() -> Vec<u8> {
    use crate::bits::protocol::{format_hresult, hresult};
    let body = "too many connections from your address; retry later\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nBITS-Packet-Type: Ack\r\nBITS-Error-Code: {}\r\n\
         BITS-Error-Context: 0x5\r\nRetry-After: 10\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        format_hresult(hresult::BG_E_HTTP_ERROR_503),
        body.len()
    )
    .into_bytes()
}

async fn serve<I>(
    state: Arc<AppState>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    peer: SocketAddr,
    role: Role,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(ConnActivity::default());
    let act = activity.clone();
    let st = state.clone();
    let svc = service_fn(move |req| {
        let guard = act.begin();
        let st = st.clone();
        async move {
            let resp = http::handle(st, role, peer, req).await;
            // The request stays in flight until its response body is dropped (sent or not).
            resp.map(|r| {
                r.map(|b| {
                    use http_body_util::BodyExt;
                    b.map_frame(move |f| {
                        let _ = &guard;
                        f
                    })
                    .boxed_unsync()
                })
            })
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.read_timeout)
        .keep_alive(true)
        .max_buf_size(READ_BUFFER)
        .serve_connection(TokioIo::new(io), svc);
    let conn = watcher.watch(conn);
    let idle = state.config.security.idle_timeout;
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = idle_expired(&activity, idle) => {
            debug!(%peer, idle_s = idle.as_secs(), "idle keep-alive connection closed");
        }
    }
}

/// The most a connection's read buffer grows to. It is what each connection holds of a body
/// beyond the bytes waiting for the disk (see the session writer's in-flight budget), so it is
/// what memory grows by per concurrent upload: hyper's default (about 400 KiB) made 200
/// concurrent uploads cost 107 MiB; 64 KiB, 44 MiB, with the same CPU per byte (and fresh
/// buffers small enough for malloc to reuse instead of mapping and faulting in each).
const READ_BUFFER: usize = 64 << 10;

/// Completes once the connection has had no request in flight for `idle`.
async fn idle_expired(activity: &ConnActivity, idle: Duration) {
    loop {
        match activity.idle_for() {
            Some(d) if d >= idle => return,
            Some(d) => tokio::time::sleep(idle - d).await,
            None => tokio::time::sleep(idle.min(Duration::from_secs(1))).await,
        }
    }
}
