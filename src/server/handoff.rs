//! Session handoff between the members of a farm.
//!
//! A farm member mints session ids that name it as their owner: the 128 bits of the GUID are 80
//! random bits, the owner's ordinal (16 bits) and a 32-bit tag, an HMAC of the first 96 bits under
//! the farm's shared secret. Any member can tell whose session a packet belongs to; nobody without
//! the secret can make an id that names a chosen member. A member that gets a packet for another
//! member's session forwards it to that member's own address and relays the answer, so a client
//! sent to the wrong member (after a fallback, or behind a proxy that ignores BITS-Host-Id) goes on
//! where it was instead of restarting from byte 0.
//!
//! Forwarded requests carry a header that proves, under the same secret, which member sent them
//! and which packet they are. The owner answers a forwarded packet itself and never forwards it
//! again (one hop at most, no loops), and only a forwarded packet that proves itself may say
//! which host the client used (for the `BITS-Original-Request-URL` of the delivery).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use url::Url;

/// Seconds since the epoch, the clock forwarding proofs carry.
pub use super::session::unix_now;
use crate::bits::protocol::SessionId;

/// Header of a forwarded request: `v1 from=ORDINAL ts=UNIX-SECONDS mac=BASE64URL`.
pub const FORWARDED_HEADER: &str = "bitsfarm-forwarded";
/// The Host the client used, on a forwarded request (covered by the mac).
pub const ORIGINAL_HOST_HEADER: &str = "bitsfarm-original-host";
/// How far a forwarded request's clock may be from ours before it is refused as a replay.
pub const MAX_FORWARD_SKEW_SECS: u64 = 300;
/// A secret shorter than this is refused: the tag and the forwarding proof are only as strong
/// as the key.
pub const MIN_SECRET_LEN: usize = 32;

const ID_DOMAIN: &[u8] = b"bitsfarm session owner v1\0";
const FORWARD_DOMAIN: &[u8] = b"bitsfarm forwarded packet v1\0";

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "cannot read the farm secret {path}: {source}; handoff needs the same secret file on every member"
    )]
    ReadSecret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the farm secret {path} holds {len} bytes; it needs at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    ShortSecret {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error("this member's ordinal {ordinal} has no entry in the handoff peer list of {len}")]
    SelfMissing { ordinal: u16, len: usize },
}

/// The farm's shared secret, as an HMAC-SHA256 key.
#[derive(Clone)]
pub struct FarmKey(hmac::Key);

impl std::fmt::Debug for FarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FarmKey(..)")
    }
}

impl FarmKey {
    pub fn new(secret: &[u8]) -> Self {
        FarmKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Reads the secret file (surrounding whitespace, such as a final newline, is not part of it).
    pub fn load(path: &Path) -> Result<Self, HandoffError> {
        let raw = std::fs::read(path).map_err(|source| HandoffError::ReadSecret {
            path: path.to_path_buf(),
            source,
        })?;
        let secret = raw.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(HandoffError::ShortSecret {
                path: path.to_path_buf(),
                len: secret.len(),
            });
        }
        Ok(FarmKey::new(secret))
    }

    fn tag(&self, domain: &[u8], parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(domain);
        for p in parts {
            // Length-prefixed, so that no two different part lists sign the same bytes.
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign()
    }

    /// A new session id owned by `ordinal`.
    pub fn mint(&self, ordinal: u16) -> SessionId {
        let mut bytes = [0u8; 16];
        // All 80 leading bits random (a v4 UUID would fix 6 of them).
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes[..10])
            .is_err()
        {
            // The OS random source failing is not recoverable; fall back to uuid's (also the OS's).
            bytes = *uuid::Uuid::new_v4().as_bytes();
        }
        bytes[10..12].copy_from_slice(&ordinal.to_be_bytes());
        let tag = self.tag(ID_DOMAIN, &[&bytes[..12]]);
        bytes[12..16].copy_from_slice(&tag.as_ref()[..4]);
        SessionId::from_uuid(uuid::Uuid::from_bytes(bytes))
    }

    /// The member that minted `id`, when its tag checks out under this key. Ids minted by a
    /// server without handoff (or with another secret) have no owner: they are answered locally.
    pub fn owner(&self, id: &SessionId) -> Option<u16> {
        let bytes = *id.uuid().as_bytes();
        let tag = self.tag(ID_DOMAIN, &[&bytes[..12]]);
        constant_time_eq(&tag.as_ref()[..4], &bytes[12..16])
            .then(|| u16::from_be_bytes([bytes[10], bytes[11]]))
    }

    /// The value of the forwarded-request header for one packet.
    pub fn forward_proof(&self, from: u16, now: u64, request: &ForwardedRequest<'_>) -> String {
        let mac = self.forward_mac(from, now, request);
        format!(
            "v1 from={from} ts={now} mac={}",
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    fn forward_mac(&self, from: u16, ts: u64, r: &ForwardedRequest<'_>) -> hmac::Tag {
        self.tag(
            FORWARD_DOMAIN,
            &[
                &from.to_be_bytes(),
                &ts.to_be_bytes(),
                r.method.as_bytes(),
                r.path_and_query.as_bytes(),
                r.session_id.as_bytes(),
                r.original_host.as_bytes(),
            ],
        )
    }

    /// Checks a forwarded-request header; `Ok(from)` names the member that forwarded it.
    pub fn verify_forward(
        &self,
        header: &str,
        now: u64,
        request: &ForwardedRequest<'_>,
    ) -> Result<u16, &'static str> {
        let mut from = None;
        let mut ts = None;
        let mut mac = None;
        let mut words = header.split_ascii_whitespace();
        if words.next() != Some("v1") {
            return Err("unknown forwarding version");
        }
        for w in words {
            match w.split_once('=') {
                Some(("from", v)) => from = v.parse::<u16>().ok(),
                Some(("ts", v)) => ts = v.parse::<u64>().ok(),
                Some(("mac", v)) => mac = URL_SAFE_NO_PAD.decode(v).ok(),
                _ => return Err("malformed forwarding header"),
            }
        }
        let (Some(from), Some(ts), Some(mac)) = (from, ts, mac) else {
            return Err("malformed forwarding header");
        };
        if now.abs_diff(ts) > MAX_FORWARD_SKEW_SECS {
            return Err("forwarding header too old or from the future");
        }
        let expected = self.forward_mac(from, ts, request);
        if !constant_time_eq(expected.as_ref(), &mac) {
            return Err("forwarding header does not verify under the farm secret");
        }
        Ok(from)
    }
}

/// What a forwarding proof covers.
#[derive(Debug, Clone, Copy)]
pub struct ForwardedRequest<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub session_id: &'a str,
    pub original_host: &'a str,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub use crate::config::Peers;

/// This member's place in the farm: who it is, where the others are, and the shared key.
#[derive(Debug, Clone)]
pub struct Membership {
    pub ordinal: u16,
    pub peers: Peers,
    pub key: FarmKey,
}

impl Membership {
    pub fn new(ordinal: u16, peers: Peers, key: FarmKey) -> Result<Self, HandoffError> {
        if let Peers::List(l) = &peers
            && usize::from(ordinal) >= l.len()
        {
            return Err(HandoffError::SelfMissing {
                ordinal,
                len: l.len(),
            });
        }
        Ok(Membership {
            ordinal,
            peers,
            key,
        })
    }

    /// Where to send a packet for `id`: `None` when this member answers it itself (its own
    /// session, or an id that names no member of this farm).
    pub fn route(&self, id: &SessionId) -> Option<(u16, Url)> {
        let owner = self.key.owner(id)?;
        if owner == self.ordinal {
            return None;
        }
        // An owner beyond the list is a member that no longer exists: the forwarder answers
        // "session not found" for it.
        Some((owner, self.peers.address(owner)?))
    }
}

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
        super::tls::install_ring_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bitsfarm-handoff/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(ca) = ca_file {
            builder = builder.tls_certs_only(super::tls::ca_bundle(ca, "handoff CA bundle")?);
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
        use futures_util::StreamExt;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let base = to.owner_url.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}{path_and_query}"))
            .map_err(|e| ForwardFailure::Broken(format!("cannot address the owner: {e}")))?;
        // What the owner will see is the URL as sent (the url crate may re-encode it): sign that.
        let sent_path = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let method = parts.method.as_str();
        let proof = self.membership.key.forward_proof(
            self.membership.ordinal,
            unix_now(),
            &ForwardedRequest {
                method,
                path_and_query: sent_path,
                session_id: to.session_id,
                original_host: to.original_host,
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
        // The wait for the answer starts when the client's body has been passed on: a slow
        // client is timed by the body's own idle timeout, not by this.
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
        let send = self
            .client
            .request(parts.method.clone(), url.clone())
            .headers(headers)
            .body(reqwest::Body::wrap_stream(counted))
            .send();
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
        let response = response.map_err(|e| {
            let why = error_chain(&e);
            if !e.is_connect() {
                return ForwardFailure::Broken(why);
            }
            // A name that no longer resolves is a member that no longer exists (its pod and
            // per-pod DNS record are gone); a refused connection may be a restart.
            let unresolvable = why.contains("dns error")
                || why.contains("failed to lookup address")
                || why.contains("Name or service not known");
            if unresolvable || self.down_for_good(to.owner) {
                ForwardFailure::OwnerGone(why)
            } else {
                ForwardFailure::OwnerDown(why)
            }
        })?;
        self.reached(to.owner);
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

    fn key(b: u8) -> FarmKey {
        FarmKey::new(&[b; 32])
    }

    #[test]
    fn minted_ids_are_guids_that_name_their_owner_under_the_same_key_only() {
        let k = key(1);
        for ordinal in [0u16, 1, 7, 300, u16::MAX] {
            let id = k.mint(ordinal);
            assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
            assert_eq!(k.owner(&id), Some(ordinal));
            assert_eq!(key(2).owner(&id), None, "another farm's key");
        }
        assert_ne!(k.mint(0), k.mint(0));
        // A plain v4 id, as a server without handoff makes, names no owner (but for 1 in 2^32).
        let plain = (0..8)
            .map(|_| SessionId::generate())
            .filter(|id| k.owner(id).is_some())
            .count();
        assert_eq!(plain, 0);
    }

    #[test]
    fn an_id_with_a_changed_owner_does_not_verify() {
        let k = key(1);
        let id = k.mint(2);
        let mut bytes = *id.uuid().as_bytes();
        bytes[11] = 3;
        let forged = SessionId::from_uuid(uuid::Uuid::from_bytes(bytes));
        assert_eq!(k.owner(&forged), None);
    }

    fn req() -> ForwardedRequest<'static> {
        ForwardedRequest {
            method: "BITS_POST",
            path_and_query: "/up/a.bin?x=1",
            session_id: "{0}",
            original_host: "farm.example:8080",
        }
    }

    #[test]
    fn a_forwarding_proof_verifies_once_and_only_for_its_packet() {
        let k = key(1);
        let now = 1_000_000;
        let h = k.forward_proof(3, now, &req());
        assert_eq!(k.verify_forward(&h, now + 10, &req()), Ok(3));
        assert!(key(2).verify_forward(&h, now, &req()).is_err());
        let other_path = ForwardedRequest {
            path_and_query: "/up/b.bin",
            ..req()
        };
        assert!(k.verify_forward(&h, now, &other_path).is_err());
        let other_host = ForwardedRequest {
            original_host: "evil.example",
            ..req()
        };
        assert!(k.verify_forward(&h, now, &other_host).is_err());
        assert!(
            k.verify_forward(&h, now + MAX_FORWARD_SKEW_SECS + 1, &req())
                .is_err()
        );
        assert!(
            k.verify_forward(&h.replace("from=3", "from=4"), now, &req())
                .is_err()
        );
        for bad in ["", "v2 from=1 ts=1 mac=AA", "v1 from=1", "v1 junk"] {
            assert!(k.verify_forward(bad, now, &req()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_member_routes_other_members_sessions_and_keeps_its_own() {
        let peers =
            Peers::list(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()]).unwrap();
        let m = Membership::new(0, peers.clone(), key(1)).unwrap();
        assert_eq!(m.route(&m.key.mint(0)), None);
        assert_eq!(m.route(&m.key.mint(1)).map(|(o, _)| o), Some(1));
        // A member that is not in the farm any more: nowhere to send it.
        assert_eq!(m.route(&m.key.mint(5)), None);
        assert_eq!(m.route(&SessionId::generate()), None);
        assert!(Membership::new(2, peers, key(1)).is_err());
    }
}
