//! The HTTP front: turns requests into BITS packets for the session store and Acks into responses,
//! and serves health, readiness and metrics.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header as h};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::metrics::{ErrorLabels, PacketLabels};
use super::session::{CreateRequest, Origin, REPLIES_DIR, REPLY_FILE, UploadDir};
use super::{AppState, handoff};
use crate::bits::packet::{Packet, header_str, parse_packet, required};
use crate::bits::paths::{SESSION_DIR, destination_path};
use crate::bits::protocol::{
    Ack, BITS_POST, BitsError, FragmentRange, PacketType, SessionId, header, negotiate_protocol,
};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Error bodies larger than this are not read to keep the connection; it is closed instead.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Uploads, and the admin endpoints too unless they have a listener of their own.
    Main {
        with_admin: bool,
    },
    Admin,
}

pub async fn handle(
    state: Arc<AppState>,
    role: Role,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let admin_here = matches!(role, Role::Admin | Role::Main { with_admin: true });
    let is_get = req.method() == Method::GET || req.method() == Method::HEAD;
    if admin_here && is_get {
        match req.uri().path() {
            "/healthz" => return Ok(text(StatusCode::OK, "ok\n")),
            "/readyz" => {
                return Ok(if state.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if state.ready.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                });
            }
            "/drain" => return Ok(drain_status(&state)),
            "/metrics" => {
                let mut r = text(StatusCode::OK, state.metrics.encode());
                r.headers_mut().insert(
                    h::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                return Ok(r);
            }
            _ => {}
        }
    }
    // With authentication on, draining is only offered on a separate admin listener: on the
    // upload address it would let any client (or any uploader) take the server out of service.
    if admin_here
        && (role == Role::Admin || state.auth.is_none())
        && req.method() == Method::POST
        && req.uri().path() == "/drain"
    {
        // `?stay=true` (the operator's scale-down): drain, but keep running once empty, so
        // that the pod is not restarted (and made ready again) before it is removed.
        let flag = |name: &str| {
            req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv == format!("{name}=true") || kv == format!("{name}=1"))
            })
        };
        // `?cancel=true`: the farm grew back before this server was removed.
        if flag("cancel") {
            if !state.cancel_drain() {
                return Ok(text(
                    StatusCode::CONFLICT,
                    "this server is stopping (signalled); its drain cannot be cancelled\n",
                ));
            }
            return Ok(drain_status(&state));
        }
        if flag("stay") {
            state.stay_when_drained.store(true, Ordering::SeqCst);
        }
        state.start_drain();
        return Ok(drain_status(&state));
    }
    if role == Role::Admin {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    // Every request to the upload side is authenticated on its own (see protocol-decisions.md).
    let user = match authenticate(&state, &req) {
        Ok(user) => user,
        Err(denied) => return Ok(*denied),
    };
    // A packet another member forwarded: it proves itself, and is answered here, never sent on.
    let mut original_host = None;
    if let Some(fwd) = &state.handoff
        && let Some(proof) = req.headers().get(handoff::FORWARDED_HEADER)
    {
        match verify_forwarded(&state, fwd, &req, proof) {
            Ok(host) => {
                state.metrics.handoff_received.inc();
                original_host = Some(host);
            }
            Err(why) => {
                warn!(path = %req.uri().path(), reason = why, "forwarded packet refused");
                return Ok(ack_response(
                    Ack::from(BitsError::access_denied(format!(
                        "forwarded packet refused: {why}"
                    ))),
                    false,
                ));
            }
        }
    } else if let Some(fwd) = &state.handoff
        && let Some(to) = handoff_target(&state, fwd, &req)
    {
        return Ok(forward(&state, fwd, req, to).await);
    }
    if is_bits_post(&req) {
        return Ok(bits_post(&state, req, user.as_deref(), original_host).await);
    }
    if is_get {
        return Ok(download(&state, req, user.as_deref()).await);
    }
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "this is a BITS upload server: send BITS_POST packets\n",
    );
    r.headers_mut()
        .insert(h::ALLOW, HeaderValue::from_static(BITS_POST));
    Ok(r)
}

/// `BITS_POST`, or `POST` with `X-Http-Method-Override: BITS_POST` for clients that cannot send
/// extension methods.
fn is_bits_post<B>(req: &Request<B>) -> bool {
    req.method().as_str() == BITS_POST
        || (req.method() == Method::POST
            && req
                .headers()
                .get(header::METHOD_OVERRIDE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(BITS_POST)))
}

/// `{"draining": true, "sessions": N}`: how many sessions a draining server still waits for.
fn drain_status(state: &AppState) -> Response<Body> {
    let mut r = text(
        StatusCode::OK,
        format!(
            "{{\"draining\":{},\"sessions\":{}}}\n",
            state.draining.load(Ordering::Relaxed),
            state.open_sessions()
        ),
    );
    r.headers_mut().insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The authenticated user (`None` when authentication is off), or the 401 to answer with.
fn authenticate<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<Option<String>, Box<Response<Body>>> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    let presented = req
        .headers()
        .get(h::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?"));
    match auth.authenticate(presented) {
        Ok(user) => Ok(Some(user)),
        Err(why) => {
            debug!(path = %req.uri().path(), reason = ?why, "request not authenticated");
            state.metrics.auth_failed(why.metric_reason());
            let with_body = req
                .headers()
                .get(h::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0")
                || req.headers().contains_key(h::TRANSFER_ENCODING);
            let mut r = if is_bits_post(req) {
                ack_response(
                    Ack::from(BitsError::authentication_required()),
                    // An unread body cannot stay on the connection.
                    !with_body,
                )
            } else {
                let mut r = text(StatusCode::UNAUTHORIZED, "authentication required\n");
                if with_body {
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
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn bits_post(
    state: &AppState,
    req: Request<Incoming>,
    user: Option<&str>,
    original_host: Option<String>,
) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let origin = Origin {
        host: original_host.unwrap_or_else(|| request_host(state, &parts.headers)),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| path.clone()),
    };
    let mut body = body_stream(body, state.config.read_timeout);
    let packet = parse_packet(&parts.headers);
    let kind = packet.as_ref().ok().map(|p| p.kind);
    let content_length = packet.as_ref().map(|p| p.content_length).unwrap_or(0);
    let session_header = parts
        .headers
        .get(header::SESSION_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let result = match packet {
        Ok(packet) => dispatch(state, &origin, &path, &packet, &mut body, user).await,
        Err(e) => Err(e),
    };
    let ack = match result {
        Ok(ack) => ack,
        Err(e) => {
            state
                .metrics
                .errors
                .get_or_create(&ErrorLabels {
                    status: e.status,
                    code: crate::bits::protocol::format_hresult(e.code),
                })
                .inc();
            if e.status >= 500 && e.code != crate::bits::protocol::hresult::BG_E_SESSION_NOT_FOUND {
                warn!(%path, packet = ?kind, error = %e, "packet failed");
            } else {
                debug!(%path, packet = ?kind, error = %e, "packet refused");
            }
            Ack::from(e)
        }
    };
    if let Some(kind) = kind {
        state
            .metrics
            .packets
            .get_or_create(&PacketLabels {
                packet: kind.as_str().to_string(),
            })
            .inc();
    }
    // Read what is left of the body so the connection can carry the client's next packet.
    let keep_alive = content_length <= DRAIN_LIMIT && drain(&mut body, DRAIN_LIMIT).await;
    debug!(
        %path,
        packet = kind.map(|k| k.as_str()).unwrap_or("?"),
        session = session_header.as_deref().unwrap_or("-"),
        status = ack.status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "packet"
    );
    ack_response(ack, keep_alive)
}

async fn dispatch<S>(
    state: &AppState,
    origin: &Origin,
    path: &str,
    packet: &Packet<'_>,
    body: &mut S,
    user: Option<&str>,
) -> Result<Ack, BitsError>
where
    S: Stream<Item = Result<Bytes, String>> + Unpin,
{
    if packet.kind == PacketType::Ping {
        return Ok(Ack::ok());
    }
    let (dir, below) = state.directory_for(path).ok_or_else(|| {
        BitsError::not_found(format!("no upload directory is configured at {path}"))
    })?;
    let destination = destination_path(below)?;
    let headers = packet.headers;
    if packet.kind == PacketType::CreateSession {
        return create_session(state, dir, path, destination, headers, user).await;
    }
    let raw_id = required(headers, header::SESSION_ID, packet.kind)?;
    let id = SessionId::parse(raw_id).ok_or_else(BitsError::session_not_found)?;
    // Another user's session is answered exactly like an unknown one.
    dir.check_owner(&id, user).await?;
    match packet.kind {
        PacketType::Fragment => {
            let range = FragmentRange::parse(required(headers, "content-range", packet.kind)?)?;
            if let Some(max) = state.config.security.max_fragment_size
                && range.len() > max
            {
                state
                    .metrics
                    .limit_refused(super::limits::Limit::FragmentSize);
                return Err(BitsError::fragment_too_large(range.len(), max));
            }
            if let Some(enc) = header_str(headers, "content-encoding")?
                && !enc.trim().eq_ignore_ascii_case("identity")
            {
                return Err(BitsError::invalid(format!(
                    "Content-Encoding {enc:?} is not supported; send fragments as identity"
                )));
            }
            if packet.content_length != range.len() {
                return Err(BitsError::invalid(format!(
                    "Content-Length {} does not match Content-Range {range} ({} bytes)",
                    packet.content_length,
                    range.len()
                )));
            }
            dir.fragment(&id, origin, path, range, body).await
        }
        PacketType::CloseSession => dir.close_session(&id, origin, path).await,
        PacketType::CancelSession => dir.cancel_session(&id, path).await,
        PacketType::Ping | PacketType::CreateSession => Ok(Ack::ok()),
    }
}

async fn create_session(
    state: &AppState,
    dir: &UploadDir,
    path: &str,
    destination: std::path::PathBuf,
    headers: &HeaderMap,
    user: Option<&str>,
) -> Result<Ack, BitsError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(BitsError::draining());
    }
    let supported = required(
        headers,
        header::SUPPORTED_PROTOCOLS,
        PacketType::CreateSession,
    )?;
    let protocol = negotiate_protocol(supported)?;
    let content_name = header_str(headers, header::CONTENT_NAME)?.map(str::to_string);
    let id = dir
        .create_session(CreateRequest {
            id: match &state.handoff {
                Some(fwd) => fwd.membership.key.mint(fwd.membership.ordinal),
                None => SessionId::generate(),
            },
            owner: user.map(str::to_string),
            url_path: path.to_string(),
            destination: destination.clone(),
            content_name,
        })
        .await?;
    tracing::info!(session = %id, %path, destination = %destination.display(), "session created");
    let mut ack = Ack::ok()
        .with(header::PROTOCOL, protocol)
        .with(header::SESSION_ID, id.as_str())
        .with("accept-encoding", "identity");
    if let Some(host_id) = &state.config.host_id {
        ack = ack.with(header::HOST_ID, host_id.as_str());
        if state.config.host_id_fallback_timeout > 0 {
            ack = ack.with(
                header::HOST_ID_FALLBACK_TIMEOUT,
                state.config.host_id_fallback_timeout.to_string(),
            );
        }
    }
    Ok(ack)
}

/// The Host the client asked for (our listen address when it sent none).
fn request_host(state: &AppState, headers: &HeaderMap) -> String {
    headers
        .get(h::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| state.config.listen.to_string())
}

/// The session a request names: a BITS packet's `BITS-Session-Id`, or a reply download's folder.
fn named_session<B>(state: &AppState, req: &Request<B>) -> Option<(SessionId, &'static str)> {
    if is_bits_post(req) {
        let kind = req
            .headers()
            .get(header::PACKET_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(PacketType::parse)?;
        if !kind.needs_session() {
            return None;
        }
        let id = req.headers().get(header::SESSION_ID)?.to_str().ok()?;
        return Some((SessionId::parse(id)?, kind.as_str()));
    }
    if req.method() == Method::GET || req.method() == Method::HEAD {
        let (_, below) = state.directory_for(req.uri().path())?;
        return Some((reply_session(below)?, "Reply"));
    }
    None
}

/// Where to send a request for a session that another live member of the farm owns.
fn handoff_target(
    state: &AppState,
    fwd: &handoff::Forwarder,
    req: &Request<Incoming>,
) -> Option<(u16, url::Url, SessionId, &'static str)> {
    let (id, kind) = named_session(state, req)?;
    let (owner, url) = fwd.membership.route(&id)?;
    Some((owner, url, id, kind))
}

/// Checks another member's proof on a forwarded request; gives the Host the client used.
fn verify_forwarded<B>(
    state: &AppState,
    fwd: &handoff::Forwarder,
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
    let session = named_session(state, req)
        .map(|(id, _)| id.as_str().to_string())
        .unwrap_or_default();
    let session = session.as_str();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    fwd.membership.key.verify_forward(
        proof,
        handoff::unix_now(),
        &handoff::ForwardedRequest {
            method: req.method().as_str(),
            path_and_query,
            session_id: session,
            original_host: host,
        },
    )?;
    if host.is_empty() {
        return Err("forwarded packet without the original host");
    }
    Ok(host.to_string())
}

/// Hands a request to the member that owns its session and relays that member's answer.
async fn forward(
    state: &Arc<AppState>,
    fwd: &handoff::Forwarder,
    req: Request<Incoming>,
    (owner, url, id, kind): (u16, url::Url, SessionId, &'static str),
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let original_host = request_host(state, &parts.headers);
    let session_header = id.as_str().to_string();
    let bytes = state.metrics.handoff_bytes.clone();
    let result = fwd
        .forward(
            &parts,
            body_stream(body, state.config.read_timeout),
            &handoff::Handoff {
                owner,
                owner_url: url.clone(),
                session_id: &session_header,
                original_host: &original_host,
            },
            move |n| {
                bytes.inc_by(n);
            },
        )
        .await;
    let outcome = match &result {
        Ok(_) => "forwarded",
        Err(handoff::ForwardFailure::OwnerGone(_)) => "owner_gone",
        Err(handoff::ForwardFailure::OwnerDown(_)) => "owner_down",
        Err(handoff::ForwardFailure::Broken(_)) => "failed",
    };
    state
        .metrics
        .handoff_packets
        .get_or_create(&super::metrics::HandoffLabels {
            packet: kind.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
    match result {
        Ok(r) => {
            debug!(session = %id, owner, %url, packet = kind, status = r.status().as_u16(), "packet handed to its owner");
            r.map(|b| b.map_err(io::Error::other).boxed_unsync())
        }
        Err(handoff::ForwardFailure::OwnerGone(why)) => {
            info!(session = %id, owner, %url, error = %why, "the member that owns this session is gone; the client must start again");
            if kind == "Reply" {
                return text(
                    StatusCode::NOT_FOUND,
                    "no reply here: the member that held it is gone\n",
                );
            }
            // The body was handed to the forwarder and may be partly unread.
            ack_response(Ack::from(BitsError::session_not_found()), false)
        }
        Err(handoff::ForwardFailure::OwnerDown(why)) => {
            info!(session = %id, owner, %url, error = %why, "the member that owns this session does not answer; the client retries");
            ack_response(
                Ack::from(BitsError::owner_unreachable(format!(
                    "the member that holds this session is not answering ({why}); retry"
                ))),
                false,
            )
        }
        Err(handoff::ForwardFailure::Broken(why)) => {
            warn!(session = %id, owner, %url, error = %why, "handing a packet to its owner failed");
            ack_response(
                Ack::from(BitsError::owner_unreachable(format!(
                    "the member that holds this session did not answer ({why}); retry"
                ))),
                false,
            )
        }
    }
}

fn ack_response(ack: Ack, keep_alive: bool) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(ack.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let hm = r.headers_mut();
    hm.insert("bits-packet-type", HeaderValue::from_static("Ack"));
    hm.insert(h::CONTENT_LENGTH, HeaderValue::from_static("0"));
    hm.insert(h::PRAGMA, HeaderValue::from_static("no-cache"));
    for (name, value) in ack.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            hm.append(name, v);
        }
    }
    if !keep_alive {
        hm.insert(h::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The request body as a stream of chunks, each of which must arrive within `idle`, so a stalled
/// client cannot hold a session (and its lock) forever.
pub fn body_stream(
    body: Incoming,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, String>> + Unpin + Send {
    Box::pin(
        futures_util::stream::unfold(Some(body), move |state| async move {
            let mut body = state?;
            loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        return Some((
                            Err(format!(
                                "no data for {} s; the client stalled",
                                idle.as_secs()
                            )),
                            None,
                        ));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => return Some((Err(e.to_string()), None)),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            return Some((Ok(data), Some(body)));
                        }
                    }
                }
            }
        })
        // Polled again after its end by the drain that follows every packet.
        .fuse(),
    )
}

/// Reads and discards up to `limit` bytes; true when the body ended cleanly within it.
async fn drain<S>(body: &mut S, limit: u64) -> bool
where
    S: Stream<Item = Result<Bytes, String>> + Unpin,
{
    let mut seen = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                seen += c.len() as u64;
                if seen > limit {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// GET and HEAD of completed files, with Range, when a directory allows downloads.
async fn download(state: &AppState, req: Request<Incoming>, user: Option<&str>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((dir, below)) = state.directory_for(&path) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if let Some(id) = reply_session(below) {
        if dir.check_owner(&id, user).await.is_err() {
            return text(
                StatusCode::NOT_FOUND,
                "no reply here: the session is closed, cancelled, expired or has no reply yet\n",
            );
        }
        return match dir.reply_file(&id).await {
            Some(file) => serve_file(file, req).await,
            None => text(
                StatusCode::NOT_FOUND,
                "no reply here: the session is closed, cancelled, expired or has no reply yet\n",
            ),
        };
    }
    if !dir.config.allow_downloads {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "downloads are off for this upload directory\n",
        );
        r.headers_mut()
            .insert(h::ALLOW, HeaderValue::from_static(BITS_POST));
        return r;
    }
    let Ok(rel) = destination_path(below) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    serve_file(dir.root().join(rel), req).await
}

/// The session named by a reply URL below an upload prefix:
/// `BITS-Sessions/Replies/{SESSION-ID}/responsefile.bin` (braces may be percent-encoded).
fn reply_session(below: &str) -> Option<SessionId> {
    let mut parts = below.split('/');
    let (a, b, id, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !a.eq_ignore_ascii_case(SESSION_DIR)
        || !b.eq_ignore_ascii_case(REPLIES_DIR)
        || file != REPLY_FILE
    {
        return None;
    }
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .ok()?;
    SessionId::parse(&id)
}

pub async fn serve_file(file: std::path::PathBuf, req: Request<Incoming>) -> Response<Body> {
    if !file.is_file() {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match tower_http::services::ServeFile::new(file)
        .oneshot(req)
        .await
    {
        Ok(r) => r.map(|b| b.map_err(io::Error::other).boxed_unsync()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
