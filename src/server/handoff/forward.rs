//! Forwarding: relaying one packet to the member that owns its session, and its answer back.

use std::path::Path;

use url::Url;

use super::key::{ForwardedRequest, Hop};
use super::membership::Membership;
use crate::server::clock::unix_now;
use crate::server::tls;

/// Header of a forwarded request: `v2 from=ORDINAL to=ORDINAL ts=UNIX-SECONDS mac=BASE64URL`.
pub const FORWARDED_HEADER: &str = "bitsfarm-forwarded";
/// The Host the client used, on a forwarded request (covered by the mac).
pub const ORIGINAL_HOST_HEADER: &str = "bitsfarm-original-host";

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the forwarder sets itself.
const NOT_RELAYED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    FORWARDED_HEADER,
    ORIGINAL_HOST_HEADER,
];

fn relayed(name: &http::HeaderName) -> bool {
    !NOT_RELAYED.contains(&name.as_str())
}

/// Every value of header `name`, as sent, joined by a newline (which no header value holds): what
/// a forwarding proof covers of it. Relayed headers keep their values and order, so the forwarder
/// and the owner compute the same bytes; a duplicated header is covered whole.
pub fn bound_values(headers: &http::HeaderMap, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// A packet for a session another member owns.
pub struct Handoff<'a> {
    pub owner: u16,
    pub owner_url: Url,
    pub session_id: &'a str,
    pub original_host: &'a str,
}

/// Why a packet could not be handed to its owner.
#[derive(Debug)]
pub enum ForwardFailure {
    /// The member is gone: its name no longer resolves (scaled away), or nothing has accepted a
    /// connection at its address for longer than the grace (the host-id fallback timeout). The
    /// client gets "session not found" and starts again, as BITS does after a fallback.
    OwnerGone(String),
    /// The owner did not take the connection, for less than the grace: it may be restarting
    /// with its volume, so the client retries and keeps its session.
    OwnerDown(String),
    /// The owner was reached but the exchange broke: a transient error the client retries.
    Broken(String),
}

/// Sends packets to the members that own their sessions.
pub struct Forwarder {
    pub membership: Membership,
    client: reqwest::Client,
    /// How long after its body a forwarded packet may wait for the owner's answer (a
    /// Close-Session may wait for the backend).
    answer_within: std::time::Duration,
    /// How long an owner may refuse connections before its sessions count as gone.
    grace: std::time::Duration,
    /// Since when each owner has been refusing connections.
    down_since: std::sync::Mutex<std::collections::HashMap<u16, std::time::Instant>>,
}

impl Forwarder {
    pub fn new(
        membership: Membership,
        ca_file: Option<&Path>,
        answer_within: std::time::Duration,
        grace: std::time::Duration,
    ) -> Result<Self, String> {
        tls::install_ring_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bitsfarm-handoff/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(ca) = ca_file {
            builder = builder.tls_certs_only(tls::ca_bundle(ca, "handoff CA bundle")?);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the handoff client: {e}"))?;
        Ok(Forwarder {
            membership,
            client,
            answer_within,
            grace,
            down_since: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Records that `owner` refused a connection; true once it has done so for the grace.
    fn down_for_good(&self, owner: u16) -> bool {
        let Ok(mut map) = self.down_since.lock() else {
            return false;
        };
        let since = *map.entry(owner).or_insert_with(std::time::Instant::now);
        since.elapsed() >= self.grace
    }

    fn reached(&self, owner: u16) {
        if let Ok(mut map) = self.down_since.lock() {
            map.remove(&owner);
        }
    }

    /// Relays one request to the owner and returns the owner's answer as it comes. `on_bytes`
    /// counts the body bytes sent on.
    pub async fn forward<S>(
        &self,
        parts: &http::request::Parts,
        body: S,
        to: &Handoff<'_>,
        on_bytes: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<http::Response<reqwest::Body>, ForwardFailure>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send + Sync + 'static,
    {
        let url = owner_url(&to.owner_url, parts)
            .map_err(|e| ForwardFailure::Broken(format!("cannot address the owner: {e}")))?;
        let headers = self.headers(parts, &url, to);
        let (body, body_done) = counted(body, on_bytes);
        let send = self
            .client
            .request(parts.method.clone(), url)
            .headers(headers)
            .body(body)
            .send();
        // The wait for the answer starts when the client's body has been passed on: a slow
        // client is timed by the body's own idle timeout, not by this.
        let answer_within = self.answer_within;
        let deadline = async move {
            body_done.notified().await;
            tokio::time::sleep(answer_within).await;
        };
        let response = tokio::select! {
            r = send => r,
            _ = deadline => {
                return Err(ForwardFailure::Broken(format!(
                    "no answer within {} s of the packet",
                    answer_within.as_secs()
                )));
            }
        };
        let response = response.map_err(|e| self.failure(&e, to.owner))?;
        self.reached(to.owner);
        relayed_response(response)
    }

    /// The client's headers that are passed on, and the proof of this forward.
    fn headers(
        &self,
        parts: &http::request::Parts,
        url: &Url,
        to: &Handoff<'_>,
    ) -> http::HeaderMap {
        // What the owner will see is the URL as sent (the url crate may re-encode it): sign that.
        let sent_path = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let bound = |name| bound_values(&parts.headers, name);
        let (packet_type, content_range, content_length) = (
            bound("bits-packet-type"),
            bound("content-range"),
            bound("content-length"),
        );
        let proof = self.membership.key.forward_proof(
            Hop {
                from: self.membership.ordinal,
                to: to.owner,
            },
            unix_now(),
            &ForwardedRequest {
                method: parts.method.as_str(),
                path_and_query: sent_path,
                session_id: to.session_id,
                original_host: to.original_host,
                packet_type: &packet_type,
                content_range: &content_range,
                content_length: &content_length,
            },
        );
        let mut headers = http::HeaderMap::new();
        for (name, value) in &parts.headers {
            if relayed(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut extra = |name: &'static str, value: &str| {
            if let Ok(v) = http::HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        extra(FORWARDED_HEADER, &proof);
        extra(ORIGINAL_HOST_HEADER, to.original_host);
        headers
    }

    /// What a failed exchange with `owner` means for the client.
    fn failure(&self, e: &reqwest::Error, owner: u16) -> ForwardFailure {
        let why = error_chain(e);
        if !e.is_connect() {
            return ForwardFailure::Broken(why);
        }
        if unresolvable(&why) || self.down_for_good(owner) {
            ForwardFailure::OwnerGone(why)
        } else {
            ForwardFailure::OwnerDown(why)
        }
    }
}

/// The owner's URL for the request: its base address with the client's path and query.
fn owner_url(base: &Url, parts: &http::request::Parts) -> Result<Url, url::ParseError> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let base = base.as_str().trim_end_matches('/');
    Url::parse(&format!("{base}{path_and_query}"))
}

/// The body to send on, counting its bytes, and what is notified once it has all been sent.
fn counted<S>(
    body: S,
    on_bytes: impl Fn(u64) + Send + Sync + 'static,
) -> (reqwest::Body, std::sync::Arc<tokio::sync::Notify>)
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send + Sync + 'static,
{
    use futures_util::StreamExt;
    let body_done = std::sync::Arc::new(tokio::sync::Notify::new());
    let done = body_done.clone();
    let counted = body
        .map(move |chunk| {
            if let Ok(c) = &chunk {
                on_bytes(c.len() as u64);
            }
            chunk.map_err(std::io::Error::other)
        })
        .chain(futures_util::stream::poll_fn(move |_| {
            done.notify_one();
            std::task::Poll::Ready(None)
        }));
    (reqwest::Body::wrap_stream(counted), body_done)
}

/// A connection error that says the owner's name no longer resolves: a member that no longer
/// exists (its pod and per-pod DNS record are gone), where a refused connection may be a restart.
fn unresolvable(why: &str) -> bool {
    why.contains("dns error")
        || why.contains("failed to lookup address")
        || why.contains("Name or service not known")
}

/// The owner's answer as this member's, without its hop-by-hop headers.
fn relayed_response(
    response: reqwest::Response,
) -> Result<http::Response<reqwest::Body>, ForwardFailure> {
    let mut out = http::Response::builder().status(response.status());
    if let Some(h) = out.headers_mut() {
        for (name, value) in response.headers() {
            if relayed(name) {
                h.append(name.clone(), value.clone());
            }
        }
    }
    out.body(reqwest::Body::from(response))
        .map_err(|e| ForwardFailure::Broken(e.to_string()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_forwarding_headers_are_not_relayed() {
        for name in ["connection", "transfer-encoding", "host", FORWARDED_HEADER] {
            assert!(!relayed(&http::HeaderName::from_static(name)), "{name}");
        }
        for name in ["content-range", "bits-session-id", "authorization"] {
            assert!(relayed(&http::HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn bound_values_cover_every_value_of_a_header_in_order() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bound_values(&h, "content-range"), b"");
        h.append(
            "content-range",
            http::HeaderValue::from_static("bytes 0-3/4"),
        );
        assert_eq!(bound_values(&h, "content-range"), b"bytes 0-3/4");
        h.append(
            "content-range",
            http::HeaderValue::from_static("bytes 4-7/8"),
        );
        assert_eq!(
            bound_values(&h, "content-range"),
            b"bytes 0-3/4\nbytes 4-7/8"
        );
    }

    #[test]
    fn the_owner_gets_the_clients_path_and_query_at_its_own_address() {
        let (parts, ()) = http::Request::builder()
            .uri("/up/a%20b.bin?x=1")
            .body(())
            .unwrap()
            .into_parts();
        let base = Url::parse("http://web-1.ns.svc:8080/").unwrap();
        assert_eq!(
            owner_url(&base, &parts).unwrap().as_str(),
            "http://web-1.ns.svc:8080/up/a%20b.bin?x=1"
        );
    }

    #[test]
    fn a_name_that_no_longer_resolves_is_a_member_that_is_gone() {
        assert!(unresolvable(
            "error sending request: client error (Connect): dns error: failed to lookup address information: Name or service not known"
        ));
        assert!(!unresolvable(
            "error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)"
        ));
    }
}
