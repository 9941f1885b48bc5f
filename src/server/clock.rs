//! The wall clock as the server records it: whole seconds since the Unix epoch, for session and
//! delivery records and for the farm's forwarding proofs.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 on a clock set before 1970, so a wrong clock makes records look
/// old instead of failing the packet.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
