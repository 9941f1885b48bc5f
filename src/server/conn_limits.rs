//! How many upload connections the server takes: the open-connections cap fitted to the
//! file-descriptor limit (raised to its hard limit at start), and each client address's share.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::config::{DEFAULT_MAX_CONNECTIONS, SecurityConfig};

/// File descriptors the server needs besides its upload connections: stdio, the listeners, the
/// runtime, the data folders' locks, admin connections (not capped), credential and
/// certificate files being re-read.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// What one upload connection may hold open at once: its socket, the session's data file, a
/// state file being replaced (or the folder synced after it), a connection to the server
/// application, and one to another member of the farm. Idle sessions hold none.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 5;
/// Fewer connections than this cannot serve a farm; the descriptor limit must be raised.
const MIN_CONNECTIONS: usize = 8;

/// A configuration the file-descriptor limit cannot hold.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error(
        "--max-connections {max} needs about {needed} file descriptors ({DESCRIPTORS_PER_CONNECTION} per connection and {RESERVED_DESCRIPTORS} for the rest of the server), but this process may open only {limit} (RLIMIT_NOFILE, already raised to its hard limit): lower --max-connections to {fits} or less, or raise the hard limit (LimitNOFILE= in a systemd unit, --ulimit nofile= for docker, ulimit -Hn as root)"
    )]
    TooManyConnections {
        max: usize,
        needed: u64,
        limit: u64,
        fits: usize,
    },
    #[error(
        "this process may open only {limit} file descriptors (RLIMIT_NOFILE, already raised to its hard limit), room for {fits} connections; at least {MIN_CONNECTIONS} are needed: raise the hard limit (LimitNOFILE= in a systemd unit, --ulimit nofile= for docker, ulimit -Hn as root)"
    )]
    TooFewDescriptors { limit: u64, fits: usize },
}

/// The connection limits in force: the open-connections cap and each address's share of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max: usize,
    /// `None`: an address may hold any number.
    pub per_address: Option<usize>,
    /// The default cap had to be lowered to fit the descriptor limit.
    pub lowered: bool,
}

impl ConnectionLimits {
    /// Fits the configured caps to `descriptors` (the soft RLIMIT_NOFILE). A cap that was given
    /// and does not fit is refused; the default is lowered to what fits. By default an address
    /// may hold a quarter of the connections.
    pub fn fit(
        max: Option<usize>,
        per_address: Option<usize>,
        descriptors: u64,
    ) -> Result<Self, DescriptorError> {
        let room = descriptors.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION;
        let fits = usize::try_from(room).unwrap_or(usize::MAX);
        let (max, lowered) = match max {
            Some(max) if max > fits => {
                return Err(DescriptorError::TooManyConnections {
                    max,
                    needed: (max as u64)
                        .saturating_mul(DESCRIPTORS_PER_CONNECTION)
                        .saturating_add(RESERVED_DESCRIPTORS),
                    limit: descriptors,
                    fits,
                });
            }
            Some(max) => (max, false),
            None if fits < MIN_CONNECTIONS => {
                return Err(DescriptorError::TooFewDescriptors {
                    limit: descriptors,
                    fits,
                });
            }
            None => (
                DEFAULT_MAX_CONNECTIONS.min(fits),
                fits < DEFAULT_MAX_CONNECTIONS,
            ),
        };
        let per_address = match per_address {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some((max / 4).max(1)),
        };
        Ok(ConnectionLimits {
            max,
            per_address,
            lowered,
        })
    }

    /// Raises this process's soft RLIMIT_NOFILE to its hard limit, then fits the caps to it.
    pub fn for_this_process(sec: &SecurityConfig) -> Result<Self, DescriptorError> {
        let descriptors = raise_descriptor_limit();
        let limits = Self::fit(
            sec.max_connections,
            sec.max_connections_per_address,
            descriptors,
        )?;
        if limits.lowered {
            warn!(
                descriptors,
                max_connections = limits.max,
                "the file-descriptor limit leaves room for fewer than {DEFAULT_MAX_CONNECTIONS} connections; raise it (LimitNOFILE=, --ulimit nofile=) to serve more"
            );
        }
        info!(
            descriptors,
            max_connections = limits.max,
            max_connections_per_address = ?limits.per_address,
            "connection limits"
        );
        Ok(limits)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (only root with CAP_SYS_RESOURCE could raise
/// the hard one; nothing here tries). Returns the soft limit in force afterwards.
fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        // Unknown: assume the common soft limit rather than none.
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            warn!(soft, hard, error = %e, "cannot raise the file-descriptor limit to its hard limit");
            soft
        }
    }
}

/// Open upload connections per client address. An IPv6 client usually has a whole /64 to
/// itself, so that is its "address"; an IPv4-mapped address is the IPv4 one.
#[derive(Debug)]
pub struct AddressLimit {
    max: Option<usize>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    limit: Arc<AddressLimit>,
    key: IpAddr,
}

impl AddressLimit {
    pub fn new(max: Option<usize>) -> Self {
        AddressLimit {
            max,
            open: Mutex::default(),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip`, unless its address already holds its share.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = Self::key(ip);
        let mut open = self.lock();
        let n = open.entry(key).or_default();
        if self.max.is_some_and(|max| *n >= max) {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            limit: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s address.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.lock().get(&Self::key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_the_descriptor_limit() {
        // 20000 descriptors: the defaults fit; an address gets a quarter.
        let l = ConnectionLimits::fit(None, None, 20_000).unwrap();
        assert_eq!(
            l,
            ConnectionLimits {
                max: 1024,
                per_address: Some(256),
                lowered: false
            }
        );
        // The common soft limit of 1024 (if it could not be raised) lowers the default.
        let l = ConnectionLimits::fit(None, None, 1024).unwrap();
        assert_eq!((l.max, l.per_address, l.lowered), (179, Some(44), true));
        // A cap that was asked for is kept, or refused with the numbers.
        assert_eq!(
            ConnectionLimits::fit(Some(179), None, 1024).unwrap().max,
            179
        );
        let e = ConnectionLimits::fit(Some(1024), None, 512).unwrap_err();
        assert_eq!(
            e,
            DescriptorError::TooManyConnections {
                max: 1024,
                needed: 5248,
                limit: 512,
                fits: 76
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("--max-connections 1024") && text.contains("76"),
            "{text}"
        );
        assert!(matches!(
            ConnectionLimits::fit(None, None, 100),
            Err(DescriptorError::TooFewDescriptors {
                limit: 100,
                fits: 0
            })
        ));
        // The share: given, off (0), or a quarter but at least one.
        assert_eq!(
            ConnectionLimits::fit(None, Some(3), 20_000)
                .unwrap()
                .per_address,
            Some(3)
        );
        assert_eq!(
            ConnectionLimits::fit(None, Some(0), 20_000)
                .unwrap()
                .per_address,
            None
        );
        assert_eq!(
            ConnectionLimits::fit(Some(2), None, 20_000)
                .unwrap()
                .per_address,
            Some(1)
        );
        assert_eq!(
            ConnectionLimits::fit(Some(40), None, 20_000)
                .unwrap()
                .per_address,
            Some(10)
        );
    }

    #[test]
    fn an_address_holds_its_share_and_gets_it_back() {
        let limit = Arc::new(AddressLimit::new(Some(2)));
        let a = ip("192.0.2.1");
        let first = limit.try_open(a).unwrap();
        let _second = limit.try_open(a).unwrap();
        assert!(limit.try_open(a).is_none());
        // The IPv4-mapped form is the same client.
        assert!(limit.try_open(ip("::ffff:192.0.2.1")).is_none());
        let _other = limit.try_open(ip("192.0.2.2")).unwrap();
        drop(first);
        assert_eq!(limit.open_from(a), 1);
        let _again = limit.try_open(a).unwrap();
        // One IPv6 /64 is one client; the next /64 is another.
        let _v6 = limit.try_open(ip("2001:db8:0:1::1")).unwrap();
        let _v6b = limit.try_open(ip("2001:db8:0:1:ffff::2")).unwrap();
        assert!(limit.try_open(ip("2001:db8:0:1::3")).is_none());
        assert!(limit.try_open(ip("2001:db8:0:2::1")).is_some());
        // Without a share nothing is refused, and nothing lingers in the table.
        let open = Arc::new(AddressLimit::new(None));
        let slots: Vec<_> = (0..100).map(|_| open.try_open(a).unwrap()).collect();
        assert_eq!(open.open_from(a), 100);
        drop(slots);
        assert!(open.lock().is_empty());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
}
