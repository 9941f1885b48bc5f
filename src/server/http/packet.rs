//! A BITS packet, from request to Ack: the headers every packet shares, the rules a packet must
//! pass before it reaches its session (`bits::request`), the call into the session store, and
//! the body drained afterwards so the connection can carry the next packet.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::response::{Body, ack_response};
use crate::bits::packet::{Packet, parse_packet};
use crate::bits::paths::destination_path;
use crate::bits::protocol::{
    Ack, BitsError, PacketType, SessionId, format_hresult, header, hresult,
};
use crate::bits::request;
use crate::server::limits::Limit;
use crate::server::metrics::{ErrorLabels, PacketLabels};
use crate::server::session::{CreateRequest, Origin, UploadDir};
use crate::server::state::AppState;

/// Error bodies larger than this are not read to keep the connection; it is closed instead.
const DRAIN_LIMIT: u64 = 64 << 20;

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
    let mut body = body_stream(body, state.config.read_timeout);
    let packet = parse_packet(&parts.headers);
    let kind = packet.as_ref().ok().map(|p| p.kind);
    let content_length = packet.as_ref().map(|p| p.content_length).unwrap_or(0);
    let result = match packet {
        Ok(packet) => dispatch(state, &origin, &path, &packet, &mut body, user).await,
        Err(e) => Err(e),
    };
    let ack = count(state, &path, kind, result);
    // Read what is left of the body so the connection can carry the client's next packet.
    let keep_alive = content_length <= DRAIN_LIMIT && drain(&mut body, DRAIN_LIMIT).await;
    debug!(
        %path,
        packet = kind.map(|k| k.as_str()).unwrap_or("?"),
        session = parts.headers.get(header::SESSION_ID).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        status = ack.status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "packet"
    );
    ack_response(ack, keep_alive)
}

/// Counts (and logs, when it failed) a packet's outcome, and makes it the Ack to send.
fn count(
    state: &AppState,
    path: &str,
    kind: Option<PacketType>,
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
    if e.status >= 500 && e.code != hresult::BG_E_SESSION_NOT_FOUND {
        warn!(%path, packet = ?kind, error = %e, "packet failed");
    } else {
        debug!(%path, packet = ?kind, error = %e, "packet refused");
    }
    Ack::from(e)
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
