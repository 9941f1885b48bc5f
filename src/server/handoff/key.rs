//! The farm key: the shared secret that mints session ids naming their owner, and the proof a
//! forwarded request carries of which member sent it, to which member, and which packet it is.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use super::error::{HandoffError, MIN_SECRET_LEN};
use crate::bits::protocol::SessionId;

/// How far a forwarded request's clock may be from ours before it is refused as a replay.
pub const MAX_FORWARD_SKEW_SECS: u64 = 300;

const ID_DOMAIN: &[u8] = b"bitsfarm session owner v1\0";
const FORWARD_DOMAIN: &[u8] = b"bitsfarm forwarded packet v2\0";

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

    /// The value of the forwarded-request header for one packet that member `from` sends to
    /// member `to`.
    pub fn forward_proof(&self, hop: Hop, now: u64, request: &ForwardedRequest<'_>) -> String {
        let mac = self.forward_mac(hop, now, request);
        format!(
            "v2 from={} to={} ts={now} mac={}",
            hop.from,
            hop.to,
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    fn forward_mac(&self, hop: Hop, ts: u64, r: &ForwardedRequest<'_>) -> hmac::Tag {
        self.tag(
            FORWARD_DOMAIN,
            &[
                &hop.from.to_be_bytes(),
                &hop.to.to_be_bytes(),
                &ts.to_be_bytes(),
                r.method.as_bytes(),
                r.path_and_query.as_bytes(),
                r.session_id.as_bytes(),
                r.original_host.as_bytes(),
                r.packet_type,
                r.content_range,
                r.content_length,
            ],
        )
    }

    /// Checks a forwarded-request header that member `me` received; `Ok(from)` names the member
    /// that forwarded it.
    pub fn verify_forward(
        &self,
        header: &str,
        me: u16,
        now: u64,
        request: &ForwardedRequest<'_>,
    ) -> Result<u16, &'static str> {
        let mut from = None;
        let mut to = None;
        let mut ts = None;
        let mut mac = None;
        let mut words = header.split_ascii_whitespace();
        match words.next() {
            Some("v2") => {}
            Some("v1") => {
                return Err(
                    "forwarding header of an older version (v1): run the same version on every member",
                );
            }
            _ => return Err("unknown forwarding version"),
        }
        for w in words {
            match w.split_once('=') {
                Some(("from", v)) => from = v.parse::<u16>().ok(),
                Some(("to", v)) => to = v.parse::<u16>().ok(),
                Some(("ts", v)) => ts = v.parse::<u64>().ok(),
                Some(("mac", v)) => mac = URL_SAFE_NO_PAD.decode(v).ok(),
                _ => return Err("malformed forwarding header"),
            }
        }
        let (Some(from), Some(to), Some(ts), Some(mac)) = (from, to, ts, mac) else {
            return Err("malformed forwarding header");
        };
        if to != me {
            return Err("forwarding header made for another member");
        }
        if now.abs_diff(ts) > MAX_FORWARD_SKEW_SECS {
            return Err("forwarding header too old or from the future");
        }
        let expected = self.forward_mac(Hop { from, to }, ts, request);
        if !constant_time_eq(expected.as_ref(), &mac) {
            return Err("forwarding header does not verify under the farm secret");
        }
        Ok(from)
    }
}

/// Who forwards a packet to whom, by ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub from: u16,
    pub to: u16,
}

/// What a forwarding proof covers: the request line, the session, the host the client used, and
/// the headers that say what the packet is and what its body holds (every value of each, as
/// sent, joined by a newline, which no header value contains; empty when absent). The body itself
/// is not covered: it is streamed on as it arrives, so its digest is not known when the proof
/// is sent (docs/protocol-decisions.md says why that is enough).
#[derive(Debug, Clone, Copy)]
pub struct ForwardedRequest<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub session_id: &'a str,
    pub original_host: &'a str,
    /// `BITS-Packet-Type`.
    pub packet_type: &'a [u8],
    /// `Content-Range`.
    pub content_range: &'a [u8],
    /// `Content-Length`.
    pub content_length: &'a [u8],
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
            packet_type: b"Fragment",
            content_range: b"bytes 0-3/4",
            content_length: b"4",
        }
    }

    const HOP: Hop = Hop { from: 3, to: 1 };

    #[test]
    fn a_forwarding_proof_verifies_once_and_only_for_its_packet() {
        let k = key(1);
        let now = 1_000_000;
        let h = k.forward_proof(HOP, now, &req());
        assert!(h.starts_with("v2 from=3 to=1 ts=1000000 mac="), "{h}");
        assert_eq!(k.verify_forward(&h, 1, now + 10, &req()), Ok(3));
        assert!(key(2).verify_forward(&h, 1, now, &req()).is_err());
        let changed = [
            ForwardedRequest {
                path_and_query: "/up/b.bin",
                ..req()
            },
            ForwardedRequest {
                original_host: "evil.example",
                ..req()
            },
            ForwardedRequest {
                method: "GET",
                ..req()
            },
            ForwardedRequest {
                session_id: "{1}",
                ..req()
            },
            ForwardedRequest {
                packet_type: b"Close-Session",
                ..req()
            },
            ForwardedRequest {
                content_range: b"bytes 4-7/8",
                ..req()
            },
            ForwardedRequest {
                content_length: b"5",
                ..req()
            },
            // A value moved from one header to the next does not sign the same bytes.
            ForwardedRequest {
                packet_type: b"Fragmentbytes 0-3/4",
                content_range: b"",
                ..req()
            },
        ];
        for other in &changed {
            assert_eq!(
                k.verify_forward(&h, 1, now, other),
                Err("forwarding header does not verify under the farm secret"),
                "{other:?}"
            );
        }
        assert!(
            k.verify_forward(&h, 1, now + MAX_FORWARD_SKEW_SECS + 1, &req())
                .is_err()
        );
        assert!(
            k.verify_forward(&h.replace("from=3", "from=4"), 1, now, &req())
                .is_err()
        );
        for bad in [
            "",
            "v2 from=1 ts=1 mac=AA",
            "v2 from=1 to=1 ts=1",
            "v2 junk",
            "v3 from=1 to=1 ts=1 mac=AA",
        ] {
            assert!(k.verify_forward(bad, 1, now, &req()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_forwarding_proof_is_taken_only_by_the_member_it_was_made_for() {
        let k = key(1);
        let now = 1_000_000;
        let h = k.forward_proof(HOP, now, &req());
        assert_eq!(
            k.verify_forward(&h, 2, now, &req()),
            Err("forwarding header made for another member")
        );
        // Saying it was for member 2 breaks the mac.
        assert_eq!(
            k.verify_forward(&h.replace("to=1", "to=2"), 2, now, &req()),
            Err("forwarding header does not verify under the farm secret")
        );
    }

    #[test]
    fn a_proof_of_the_first_version_is_refused_with_a_reason() {
        let why = key(1)
            .verify_forward("v1 from=1 ts=1 mac=AAAA", 0, 1, &req())
            .unwrap_err();
        assert!(why.contains("older version"), "{why}");
    }
}
