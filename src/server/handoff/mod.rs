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
//! Forwarded requests carry a header that proves, under the same secret, which member sent them,
//! to which member, and which packet they are (request line, session, packet type, range and
//! length; not the streamed body). The owner answers a forwarded packet itself and never forwards it
//! again (one hop at most, no loops), and only a forwarded packet that proves itself may say
//! which host the client used (for the `BITS-Original-Request-URL` of the delivery).

mod error;
mod forward;
mod key;
mod membership;

pub use error::{HandoffError, MIN_SECRET_LEN};
pub use forward::{
    FORWARDED_HEADER, ForwardFailure, Forwarder, Handoff, ORIGINAL_HOST_HEADER, bound_values,
};
pub use key::{FarmKey, ForwardedRequest, Hop, MAX_FORWARD_SKEW_SECS};
pub use membership::{Membership, Peers};

/// Seconds since the epoch, the clock forwarding proofs carry.
pub use super::clock::unix_now;
