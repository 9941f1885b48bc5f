//! The HTTP front: routes each request to the admin endpoints, to the member that owns its
//! session, to the session store as a BITS packet, or to a download, and answers everything else.
//! `packet` is the packet -> session call, `download` the GETs, `relay` the handoff to other
//! members, `response` the answers themselves (Acks, plain text, the admin endpoints).

mod download;
mod packet;
mod relay;
mod response;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header as h};
use hyper::body::Incoming;
use tracing::debug;

pub use download::serve_file;
pub use packet::body_stream;
pub use response::Body;
use response::{ack_response, text};

use super::state::AppState;
use crate::bits::protocol::{Ack, BitsError};
use crate::bits::request;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Uploads, and the read-only admin endpoints (health, readiness, metrics, drain status) too
    /// unless they have a listener of their own. Never `POST /drain`.
    Main {
        with_admin: bool,
    },
    Admin,
}

/// Answers one request that came in on a listener of `role` from `peer`.
pub async fn handle(
    state: Arc<AppState>,
    role: Role,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Err(e) = request::check_headers(req.version(), req.headers()) {
        debug!(path = %req.uri().path(), error = %e, "request refused");
        return Ok(bad_request(&req, e));
    }
    let admin_here = matches!(role, Role::Admin | Role::Main { with_admin: true });
    if admin_here && let Some(r) = response::admin(&state, role == Role::Admin, &req) {
        return Ok(r);
    }
    if role == Role::Admin {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    let route = state
        .handoff
        .as_ref()
        .map(|fwd| (fwd, relay::route(&state, fwd, &req)));
    // A packet another member forwarded comes from that member's address, not its client's,
    // and was checked there: it is not slowed down for its address's failures.
    let forwarded = matches!(route, Some((_, relay::Route::Forwarded(_))));
    // Every request to the upload side is authenticated on its own (see protocol-decisions.md).
    let user = match authenticate(&state, &req, (!forwarded).then_some(peer)).await {
        Ok(user) => user,
        Err(denied) => return Ok(*denied),
    };
    let mut original_host = None;
    if let Some((fwd, route)) = route {
        match route {
            relay::Route::Here => {}
            relay::Route::Forwarded(host) => {
                state.metrics.handoff_received.inc();
                original_host = Some(host);
            }
            relay::Route::Refused(r) => return Ok(r),
            relay::Route::Owner(to) => return Ok(relay::forward(&state, fwd, req, to).await),
        }
    }
    if request::is_bits_post(req.method(), req.headers()) {
        return Ok(packet::bits_post(&state, req, user.as_deref(), original_host).await);
    }
    if request::is_get_or_head(req.method()) {
        return Ok(download::download(&state, req, user.as_deref()).await);
    }
    Ok(response::not_allowed(
        "this is a BITS upload server: send BITS_POST packets\n",
    ))
}

/// 400: an Ack for a BITS packet, text for anything else. A body it leaves unread closes the
/// connection.
fn bad_request<B>(req: &Request<B>, e: BitsError) -> Response<Body> {
    let keep_alive = !request::has_body(req.headers());
    if request::is_bits_post(req.method(), req.headers()) {
        return ack_response(Ack::from(e), keep_alive);
    }
    let mut r = text(StatusCode::BAD_REQUEST, format!("{}\n", e.message));
    if !keep_alive {
        r.headers_mut()
            .insert(h::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The authenticated user (`None` when authentication is off), or the 401 (503 when the client
/// should retry later) to answer with. `peer`: the client's address, `None` for a packet another
/// member forwarded.
async fn authenticate<B>(
    state: &AppState,
    req: &Request<B>,
    peer: Option<SocketAddr>,
) -> Result<Option<String>, Box<Response<Body>>> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    let presented = req
        .headers()
        .get(h::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?"));
    let why = match auth.authenticate(presented, peer.map(|p| p.ip())).await {
        Ok(user) => return Ok(Some(user)),
        Err(why) => why,
    };
    debug!(path = %req.uri().path(), reason = ?why, "request not authenticated");
    state.metrics.auth_failed(why.metric_reason());
    // An unread body cannot stay on the connection.
    let keep_alive = !request::has_body(req.headers());
    if let Some(after) = why.retry_after() {
        return Err(Box::new(retry_later(req, after, keep_alive)));
    }
    let mut r = if request::is_bits_post(req.method(), req.headers()) {
        ack_response(Ack::from(BitsError::authentication_required()), keep_alive)
    } else {
        let mut r = text(StatusCode::UNAUTHORIZED, "authentication required\n");
        if !keep_alive {
            r.headers_mut()
                .insert(h::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    for c in auth.challenges() {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(h::WWW_AUTHENTICATE, v);
        }
    }
    Err(Box::new(r))
}

/// 503 with `Retry-After`: credentials not checked for now (the address is slowed down, or every
/// check is taken). A 5xx is transient for BITS clients, which keep their job and retry, where a
/// 401 after credentials were sent would end it.
fn retry_later<B>(
    req: &Request<B>,
    after: std::time::Duration,
    keep_alive: bool,
) -> Response<Body> {
    let seconds = after.as_secs().max(1).to_string();
    let mut r = if request::is_bits_post(req.method(), req.headers()) {
        ack_response(
            Ack::from(BitsError::authentication_deferred(format!(
                "credentials not checked now; retry in {seconds} s"
            ))),
            keep_alive,
        )
    } else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("credentials not checked now; retry in {seconds} s\n"),
        );
        if !keep_alive {
            r.headers_mut()
                .insert(h::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    if let Ok(v) = HeaderValue::from_str(&seconds) {
        r.headers_mut().insert(h::RETRY_AFTER, v);
    }
    r
}
