//! A BITS packet, from request to Ack: the headers every packet shares, the rules a packet must
//! pass before it reaches its session (`bits::request`), the call into the session store, and
//! what becomes of the body: read at its pace, drained after a retransmit so the connection can
//! carry the next packet, or left unread behind a refusal that closes the connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Request, Response};
use hyper::body::{Body as _, Incoming};
use tokio::time::Sleep;
use tracing::{debug, info, warn};

use super::response::{Body, ack_response};
use crate::bits::packet::{Packet, parse_packet};
use crate::bits::paths::destination_path;
use crate::bits::protocol::{
    Ack, BitsError, PacketType, SessionId, format_hresult, header, hresult,
};
use crate::bits::request;
use crate::server::limits::{BodyPace, Limit, TooSlow};
use crate::server::linger::DRAIN_LIMIT;
use crate::server::metrics::{ErrorLabels, Metrics, PacketLabels};
use crate::server::refusals::{PER_WINDOW, Verdict, WINDOW};
use crate::server::session::{CreateRequest, Origin, UploadDir};
use crate::server::state::AppState;

pub async fn bits_post(
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
    let mut body = body_stream(body, state);
    let packet = parse_packet(&parts.headers);
    let kind = packet.as_ref().ok().map(|p| p.kind);
    let result = match packet {
        Ok(packet) => dispatch(state, &origin, &path, &packet, &mut body, user).await,
        Err(e) => Err(e),
    };
    let session = parts
        .headers
        .get(header::SESSION_ID)
        .and_then(|v| v.to_str().ok());
    let ack = count(state, &path, kind, session, user, result);
    let keep_alive = keep_connection(&mut body, ack.status).await;
    debug!(
        %path,
        packet = kind.map(|k| k.as_str()).unwrap_or("?"),
        session = session.unwrap_or("-"),
        status = ack.status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "packet"
    );
    ack_response(ack, keep_alive)
}

/// A refused packet's body, when no larger than this and already sent, is read away before the
/// answer so that the connection stays usable (a 416 is part of a normal resume).
const SMALL_BODY: u64 = 64 << 10;
/// How long a small refused body may take to arrive; any longer and the answer goes first.
const SMALL_BODY_WAIT: Duration = Duration::from_millis(100);

/// Whether the connection can carry the client's next packet after this one's answer: only
/// once the body has been read. A retransmit of bytes the session holds is read away (at the
/// body's pace); a refused packet's body only when it is small and already here. Any other
/// refusal is answered at once and closes the connection, which reads the rest away after the
/// answer (`linger`), not before it: a Ping announcing a megabyte is not read first.
async fn keep_connection(body: &mut PacedBody, status: u16) -> bool {
    if body.is_complete() {
        return true;
    }
    let remaining = body.remaining();
    if status < 300 {
        return remaining.is_some_and(|n| n <= DRAIN_LIMIT) && drain(body, DRAIN_LIMIT).await;
    }
    remaining.is_some_and(|n| n <= SMALL_BODY)
        && tokio::time::timeout(SMALL_BODY_WAIT, drain(body, SMALL_BODY))
            .await
            .unwrap_or(false)
}

/// Counts (and logs, when it failed) a packet's outcome, and makes it the Ack to send.
fn count(
    state: &AppState,
    path: &str,
    kind: Option<PacketType>,
    session: Option<&str>,
    user: Option<&str>,
    result: Result<Ack, BitsError>,
) -> Ack {
    if let Some(kind) = kind {
        state
            .metrics
            .packets
            .get_or_create(&PacketLabels {
                packet: kind.as_str().to_string(),
            })
            .inc();
    }
    let e = match result {
        Ok(ack) => return ack,
        Err(e) => e,
    };
    state
        .metrics
        .errors
        .get_or_create(&ErrorLabels {
            status: e.status,
            code: format_hresult(e.code),
        })
        .inc();
    log_refusal(state, path, kind, session, user, &e);
    Ack::from(e)
}

/// A refused session at info (a failure of the server's own at warn), once per session and within
/// the log's budget (`server::refusals`); the rest at debug. A 416 is part of a normal resume.
fn log_refusal(
    state: &AppState,
    path: &str,
    kind: Option<PacketType>,
    session: Option<&str>,
    user: Option<&str>,
    e: &BitsError,
) {
    let packet = kind.map(|k| k.as_str()).unwrap_or("?");
    let code = format_hresult(e.code);
    let status = e.status;
    let shown = session.unwrap_or("-");
    if status == 416 {
        debug!(%path, packet, session = shown, status, "fragment out of sync: {}", e.message);
        return;
    }
    // Only a well-formed id is remembered: a hostile client's junk header would be a new
    // session each time anyway, and must not take the log's memory.
    let id = session
        .filter(|_| kind != Some(PacketType::CreateSession))
        .and_then(SessionId::parse);
    let (left_out, last) = match state
        .refusals
        .verdict(id.as_ref().map(SessionId::as_str), Instant::now())
    {
        Verdict::Tell { left_out, last } => (left_out, last),
        Verdict::Quiet => {
            debug!(%path, packet, session = shown, status, %code, "session refused: {}", e.message);
            return;
        }
    };
    if left_out > 0 {
        info!(
            left_out,
            "{left_out} refused sessions were logged at debug only since the last one told here"
        );
    }
    let user = user.unwrap_or("-");
    if status >= 500 && e.code != hresult::BG_E_SESSION_NOT_FOUND {
        warn!(%path, packet, session = shown, user, status, %code, "session refused: {}", e.message);
    } else {
        info!(%path, packet, session = shown, user, status, %code, "session refused: {}", e.message);
    }
    if last {
        info!(
            "{PER_WINDOW} refused sessions told in {} s; further refused sessions are logged at \
             debug only until that time has passed (bitsfarm_errors_total counts them all)",
            WINDOW.as_secs()
        );
    }
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
        BitsError::not_found(format!(
            "no upload directory at {path}; this server takes uploads below {}",
            state.upload_directories()
        ))
    })?;
    let destination = destination_path(below)?;
    if packet.kind == PacketType::CreateSession {
        return create_session(state, dir, path, destination, packet, user).await;
    }
    let id = request::session_id(packet.headers, packet.kind)?;
    // Another user's session is answered exactly like an unknown one.
    dir.check_owner(&id, user).await?;
    match packet.kind {
        PacketType::Fragment => fragment(state, dir, &id, origin, path, packet, body).await,
        PacketType::CloseSession => dir.close_session(&id, origin, path).await,
        PacketType::CancelSession => dir.cancel_session(&id, path).await,
        PacketType::Ping | PacketType::CreateSession => Ok(Ack::ok()),
    }
}

async fn fragment<S>(
    state: &AppState,
    dir: &UploadDir,
    id: &SessionId,
    origin: &Origin,
    path: &str,
    packet: &Packet<'_>,
    body: &mut S,
) -> Result<Ack, BitsError>
where
    S: Stream<Item = Result<Bytes, String>> + Unpin,
{
    let range = request::fragment_range(packet.headers)?;
    request::check_fragment_size(&range, state.config.security.max_fragment_size)
        .inspect_err(|_| state.metrics.limit_refused(Limit::FragmentSize))?;
    request::check_fragment_body(packet.headers, packet.content_length, &range)?;
    dir.fragment(id, origin, path, range, body).await
}

async fn create_session(
    state: &AppState,
    dir: &UploadDir,
    path: &str,
    destination: std::path::PathBuf,
    packet: &Packet<'_>,
    user: Option<&str>,
) -> Result<Ack, BitsError> {
    if state.drain.is_draining() {
        return Err(BitsError::draining());
    }
    let asked = request::create_session(packet.headers)?;
    let id = dir
        .create_session(CreateRequest {
            id: match &state.handoff {
                Some(fwd) => fwd.membership.key.mint(fwd.membership.ordinal),
                None => SessionId::generate(),
            },
            owner: user.map(str::to_string),
            url_path: path.to_string(),
            destination: destination.clone(),
            content_name: asked.content_name.map(str::to_string),
        })
        .await?;
    tracing::info!(session = %id, %path, destination = %destination.display(), "session created");
    Ok(request::session_created(
        asked.protocol,
        &id,
        state.config.host_id.as_deref(),
        state.config.host_id_fallback_timeout,
    ))
}

/// The Host the client asked for (our listen address when it sent none).
pub fn request_host(state: &AppState, headers: &HeaderMap) -> String {
    request::host(headers)
        .map(str::to_string)
        .unwrap_or_else(|| state.config.listen.to_string())
}

/// The request body as a stream of chunks, at the server's pace (`BodyPace`), so that a stalled
/// or trickling client cannot hold a session (and its lock) or a connection for long. A body too
/// slow for the minimum rate is counted in the metrics.
pub fn body_stream(body: Incoming, state: &AppState) -> PacedBody {
    PacedBody {
        body: Some(body),
        complete: false,
        pace: BodyPace::of(&state.config),
        started: tokio::time::Instant::now(),
        received: 0,
        last: Duration::ZERO,
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        metrics: state.metrics.clone(),
    }
}

/// See `body_stream`. Ends (`None`) after the body's end or its first error.
pub struct PacedBody {
    body: Option<Incoming>,
    complete: bool,
    pace: BodyPace,
    started: tokio::time::Instant,
    received: u64,
    /// When the latest bytes came, from `started`.
    last: Duration,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<Metrics>,
}

impl PacedBody {
    /// True once the whole body has been read.
    pub fn is_complete(&self) -> bool {
        self.complete || self.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    /// The bytes still to come, when the body announced its length and has not failed.
    pub fn remaining(&self) -> Option<u64> {
        self.body.as_ref().and_then(|b| b.size_hint().exact())
    }
}

impl Stream for PacedBody {
    type Item = Result<Bytes, String>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.body = None;
                    this.complete = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.body = None;
                    return Poll::Ready(Some(Err(e.to_string())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry no bytes; keep reading.
                    if let Ok(data) = frame.into_data() {
                        this.received += data.len() as u64;
                        this.last = this.started.elapsed();
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Poll::Pending => break,
            }
        }
        let (deadline, why) = this.pace.deadline(this.received, this.last);
        let Some(at) = this.started.checked_add(deadline) else {
            // A read timeout beyond any clock: no deadline (the body wakes us when data comes).
            return Poll::Pending;
        };
        if this.timer.deadline() != at {
            this.timer.as_mut().reset(at);
        }
        std::task::ready!(this.timer.as_mut().poll(cx));
        this.body = None;
        if let TooSlow::BelowRate(_) = why {
            this.metrics.limit_refused(Limit::BodyRate);
        }
        Poll::Ready(Some(Err(why.to_string())))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(sizes: &[usize]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures_util::stream::iter(sizes.iter().map(|n| Ok(Bytes::from(vec![0u8; *n]))))
    }

    #[tokio::test]
    async fn the_drain_keeps_the_connection_only_for_a_clean_body_within_its_limit() {
        assert!(drain(&mut chunks(&[]), 10).await);
        assert!(drain(&mut chunks(&[4, 6]), 10).await);
        assert!(!drain(&mut chunks(&[4, 7]), 10).await);
        let mut broken = futures_util::stream::iter([Ok(Bytes::new()), Err("reset".to_string())]);
        assert!(!drain(&mut broken, 10).await);
    }
}
