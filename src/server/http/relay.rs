//! The HTTP side of session handoff: a request for another member's session is relayed to that
//! member, and a request another member relayed here proves itself before it is answered.

use std::io;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use super::download::reply_session;
use super::packet::{body_stream, request_host};
use super::response::{Body, ack_response, text};
use crate::bits::protocol::{Ack, BitsError, SessionId};
use crate::bits::request;
use crate::server::handoff::{self, ForwardFailure, Forwarder};
use crate::server::metrics::HandoffLabels;
use crate::server::state::AppState;

/// Where a request is answered, with handoff on.
pub enum Route {
    /// Here: a session of this member's, or none of the farm's.
    Here,
    /// Here, relayed by another member: the Host the client used.
    Forwarded(String),
    /// Relayed by another member, or claiming to be, without a valid proof.
    Refused(Response<Body>),
    /// At the member that owns the session.
    Owner(Target),
}

/// The member a request goes to, and what it is for.
pub struct Target {
    owner: u16,
    url: url::Url,
    id: SessionId,
    /// The packet type, or `Reply` for a reply download.
    kind: &'static str,
}

/// Where a request is answered. A packet another member forwarded is answered here, never sent
/// on (one hop at most).
pub fn route<B>(state: &AppState, fwd: &Forwarder, req: &Request<B>) -> Route {
    if let Some(proof) = req.headers().get(handoff::FORWARDED_HEADER) {
        return match verify_forwarded(state, fwd, req, proof) {
            Ok(host) => Route::Forwarded(host),
            Err(why) => {
                warn!(path = %req.uri().path(), reason = why, "forwarded packet refused");
                Route::Refused(ack_response(
                    Ack::from(BitsError::access_denied(format!(
                        "forwarded packet refused: {why}"
                    ))),
                    false,
                ))
            }
        };
    }
    let Some((id, kind)) = named_session(state, req) else {
        return Route::Here;
    };
    match fwd.membership.route(&id) {
        Some((owner, url)) => Route::Owner(Target {
            owner,
            url,
            id,
            kind,
        }),
        None => Route::Here,
    }
}

/// The session a request names: a BITS packet's `BITS-Session-Id`, or a reply download's folder.
fn named_session<B>(state: &AppState, req: &Request<B>) -> Option<(SessionId, &'static str)> {
    if request::is_bits_post(req.method(), req.headers()) {
        return request::named_session(req.headers()).map(|(id, kind)| (id, kind.as_str()));
    }
    if request::is_get_or_head(req.method()) {
        let (_, below) = state.directory_for(req.uri().path())?;
        return Some((reply_session(below)?, "Reply"));
    }
    None
}

/// Checks another member's proof on a forwarded request; gives the Host the client used.
fn verify_forwarded<B>(
    state: &AppState,
    fwd: &Forwarder,
    req: &Request<B>,
    proof: &HeaderValue,
) -> Result<String, &'static str> {
    let proof = proof.to_str().map_err(|_| "unreadable forwarding header")?;
    let host = req
        .headers()
        .get(handoff::ORIGINAL_HOST_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The session as both members read it (header or reply folder, canonical form).
    let session = named_session(state, req).map(|(id, _)| id);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let bound = |name| handoff::bound_values(req.headers(), name);
    let (packet_type, content_range, content_length) = (
        bound("bits-packet-type"),
        bound("content-range"),
        bound("content-length"),
    );
    fwd.membership.key.verify_forward(
        proof,
        fwd.membership.ordinal,
        handoff::unix_now(),
        &handoff::ForwardedRequest {
            method: req.method().as_str(),
            path_and_query,
            session_id: session.as_ref().map_or("", SessionId::as_str),
            original_host: host,
            packet_type: &packet_type,
            content_range: &content_range,
            content_length: &content_length,
        },
    )?;
    if host.is_empty() {
        return Err("forwarded packet without the original host");
    }
    Ok(host.to_string())
}

/// Hands a request to the member that owns its session and relays that member's answer.
pub async fn forward(
    state: &Arc<AppState>,
    fwd: &Forwarder,
    req: Request<Incoming>,
    to: Target,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let original_host = request_host(state, &parts.headers);
    let bytes = state.metrics.handoff_bytes.clone();
    let result = fwd
        .forward(
            &parts,
            body_stream(body, state),
            &handoff::Handoff {
                owner: to.owner,
                owner_url: to.url.clone(),
                session_id: to.id.as_str(),
                original_host: &original_host,
            },
            move |n| {
                bytes.inc_by(n);
            },
        )
        .await;
    state
        .metrics
        .handoff_packets
        .get_or_create(&HandoffLabels {
            packet: to.kind.to_string(),
            outcome: outcome(&result).to_string(),
        })
        .inc();
    match result {
        Ok(r) => {
            debug!(session = %to.id, owner = to.owner, url = %to.url, packet = to.kind, status = r.status().as_u16(), "packet handed to its owner");
            r.map(|b| b.map_err(io::Error::other).boxed_unsync())
        }
        Err(failure) => failed(&to, failure),
    }
}

/// A transient 503: the client retries and keeps its session.
fn retry(message: String) -> Response<Body> {
    ack_response(Ack::from(BitsError::owner_unreachable(message)), false)
}

/// The `outcome` label of a handoff.
fn outcome<T>(result: &Result<T, ForwardFailure>) -> &'static str {
    match result {
        Ok(_) => "forwarded",
        Err(ForwardFailure::OwnerGone(_)) => "owner_gone",
        Err(ForwardFailure::OwnerDown(_)) => "owner_down",
        Err(ForwardFailure::Broken(_)) => "failed",
    }
}

/// The answer to a request its owner could not take. The body was handed to the forwarder and
/// may be partly unread, so the connection closes.
fn failed(to: &Target, failure: ForwardFailure) -> Response<Body> {
    let Target {
        owner,
        url,
        id,
        kind,
    } = to;
    match failure {
        ForwardFailure::OwnerGone(why) => {
            info!(session = %id, owner, %url, error = %why, "the member that owns this session is gone; the client must start again");
            if *kind == "Reply" {
                return text(
                    StatusCode::NOT_FOUND,
                    "no reply here: the member that held it is gone\n",
                );
            }
            ack_response(Ack::from(BitsError::session_not_found()), false)
        }
        ForwardFailure::OwnerDown(why) => {
            info!(session = %id, owner, %url, error = %why, "the member that owns this session does not answer; the client retries");
            retry(format!(
                "the member that holds this session is not answering ({why}); retry"
            ))
        }
        ForwardFailure::Broken(why) => {
            warn!(session = %id, owner, %url, error = %why, "handing a packet to its owner failed");
            retry(format!(
                "the member that holds this session did not answer ({why}); retry"
            ))
        }
    }
}
