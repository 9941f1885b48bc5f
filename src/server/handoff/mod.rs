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

mod forward;
mod key;
mod membership;

pub use forward::{FORWARDED_HEADER, ForwardFailure, Forwarder, Handoff, ORIGINAL_HOST_HEADER};
pub use key::{FarmKey, ForwardedRequest, MAX_FORWARD_SKEW_SECS, MIN_SECRET_LEN};
pub use membership::{Membership, Peers};

/// Seconds since the epoch, the clock forwarding proofs carry.
pub use super::session::unix_now;

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
    #[error("handoff peer address {0:?} is not an http(s) URL with a host and no path")]
    BadPeer(String),
    #[error(
        "handoff peer template {0:?} must contain {{ordinal}} and expand to an http(s) URL with a host and no path"
    )]
    BadTemplate(String),
    #[error("this member's ordinal {ordinal} has no entry in the handoff peer list of {len}")]
    SelfMissing { ordinal: u16, len: usize },
}
