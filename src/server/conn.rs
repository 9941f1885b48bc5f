//! One accepted connection: optional TLS handshake, HTTP/1.1 with header and idle keep-alive
//! timeouts, and the open-connections permit it holds until it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::AppState;
use super::http::{self, Role};
use super::limits::ConnActivity;

/// Serves `stream` on its own task. `permit` (the open-connections cap) is released when the
/// connection ends.
pub fn spawn(
    state: Arc<AppState>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: SocketAddr,
    role: Role,
    permit: Option<OwnedSemaphorePermit>,
) {
    let _ = stream.set_nodelay(true);
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
            let resp = http::handle(st, role, req).await;
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
