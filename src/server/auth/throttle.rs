//! Slowing down guessing, per client address: failed credentials are counted, and past a few an
//! address is in a penalty window that doubles with every further failure. While it lasts, the
//! address's credentials are not checked at all, except those it was already using successfully:
//! many honest clients may share one address (a NAT, a Service or load balancer that rewrites
//! source addresses), and a flood from one of them must not lock out the others' working
//! credentials.
//!
//! Pure bookkeeping with the time passed in; memory is bounded by a cap on addresses and on
//! (address, credentials) pairs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures an address may have (within `FORGET_AFTER`) before its first penalty.
pub const FREE_FAILURES: u32 = 5;
/// The first penalty; each further failure doubles it, up to `MAX_PENALTY`.
pub const FIRST_PENALTY: Duration = Duration::from_secs(1);
/// The longest penalty: at most one guess a minute from an address that keeps failing.
pub const MAX_PENALTY: Duration = Duration::from_secs(60);
/// An address that has not failed for this long starts again with a clean record.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// How long credentials that worked from an address keep working from it during a penalty.
pub const USED_FOR: Duration = Duration::from_secs(300);
/// Addresses with failures on record, at most. Past it, records that are forgotten anyway are
/// dropped; if all are current, new addresses go unrecorded (the cap on checks running at once
/// still bounds what they cost).
const MAX_ADDRESSES: usize = 100_000;
/// (address, credentials) pairs remembered as working, at most.
const MAX_USED: usize = 100_000;

/// Which client a record is about: an IPv4 address, or an IPv6 /64 (one subscriber's prefix:
/// anyone holding a /64 could otherwise use a new address for every guess).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    pub fn new(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                AddrKey(IpAddr::V6(bits.into()))
            }
            v4 => AddrKey(v4),
        }
    }
}

/// What an address may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No recent failure: its credentials are checked, waiting for a free check if need be.
    Clean,
    /// Failed recently: its credentials are checked only when a check is free at once, so that
    /// a flood never queues ahead of clean addresses.
    Failed,
    /// In a penalty window for this much longer: only credentials it was already using work.
    Penalized(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last_failure: Instant,
    penalized_until: Option<Instant>,
}

impl Record {
    fn forgotten(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_failure) >= FORGET_AFTER
            && self.penalized_until.is_none_or(|t| t <= now)
    }
}

#[derive(Default)]
struct Records {
    addresses: HashMap<AddrKey, Record>,
    /// (address, salted hash of the credentials) -> when they last worked from there.
    used: HashMap<(AddrKey, [u8; 32]), Instant>,
}

#[derive(Default)]
pub struct Throttle {
    records: Mutex<Records>,
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn standing(&self, addr: AddrKey, now: Instant) -> Standing {
        let r = self.lock();
        let Some(rec) = r.addresses.get(&addr) else {
            return Standing::Clean;
        };
        if let Some(until) = rec.penalized_until.filter(|t| *t > now) {
            return Standing::Penalized(until - now);
        }
        if rec.forgotten(now) {
            Standing::Clean
        } else {
            Standing::Failed
        }
    }

    /// Whether `credentials` worked from `addr` within `USED_FOR`.
    pub fn used_here(&self, addr: AddrKey, credentials: &[u8; 32], now: Instant) -> bool {
        self.lock()
            .used
            .get(&(addr, *credentials))
            .is_some_and(|t| now.saturating_duration_since(*t) < USED_FOR)
    }

    /// `credentials` worked from `addr`.
    pub fn succeeded(&self, addr: AddrKey, credentials: &[u8; 32], now: Instant) {
        let mut r = self.lock();
        if r.used.len() >= MAX_USED && !r.used.contains_key(&(addr, *credentials)) {
            r.used
                .retain(|_, t| now.saturating_duration_since(*t) < USED_FOR);
            if r.used.len() >= MAX_USED {
                // Every entry is current: start over rather than grow. Clients of penalized
                // addresses then wait for the penalty to end, as new clients do.
                r.used.clear();
            }
        }
        r.used.insert((addr, *credentials), now);
    }

    /// Credentials from `addr` were checked and were wrong. Gives the penalty it now has.
    pub fn failed(&self, addr: AddrKey, now: Instant) -> Option<Duration> {
        let mut r = self.lock();
        if r.addresses.len() >= MAX_ADDRESSES && !r.addresses.contains_key(&addr) {
            r.addresses.retain(|_, rec| !rec.forgotten(now));
            if r.addresses.len() >= MAX_ADDRESSES {
                return None;
            }
        }
        let rec = r.addresses.entry(addr).or_insert(Record {
            failures: 0,
            last_failure: now,
            penalized_until: None,
        });
        if rec.forgotten(now) {
            rec.failures = 0;
        }
        rec.failures = rec.failures.saturating_add(1);
        rec.last_failure = now;
        let penalty = penalty(rec.failures)?;
        rec.penalized_until = Some(now + penalty);
        Some(penalty)
    }

    /// The change of the users or tokens file: credentials that worked may not any more.
    pub fn forget_used(&self) {
        self.lock().used.clear();
    }
}

/// The penalty after an address's `failures`-th failure in a row.
fn penalty(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_FAILURES + 1)?;
    let factor = 1u32.checked_shl(over.min(31)).unwrap_or(u32::MAX);
    Some(FIRST_PENALTY.saturating_mul(factor).min(MAX_PENALTY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> AddrKey {
        AddrKey::new(s.parse().unwrap())
    }

    #[test]
    fn penalties_start_after_the_free_failures_and_double_up_to_the_cap() {
        for f in 0..=FREE_FAILURES {
            assert_eq!(penalty(f), None, "{f}");
        }
        assert_eq!(penalty(FREE_FAILURES + 1), Some(Duration::from_secs(1)));
        assert_eq!(penalty(FREE_FAILURES + 2), Some(Duration::from_secs(2)));
        assert_eq!(penalty(FREE_FAILURES + 4), Some(Duration::from_secs(8)));
        assert_eq!(penalty(FREE_FAILURES + 7), Some(Duration::from_secs(60)));
        assert_eq!(penalty(u32::MAX), Some(MAX_PENALTY));
    }

    #[test]
    fn an_address_that_keeps_failing_is_penalized_and_forgiven_later() {
        let t = Throttle::default();
        let a = addr("192.0.2.1");
        let t0 = Instant::now();
        assert_eq!(t.standing(a, t0), Standing::Clean);
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed(a, t0), None);
        }
        assert_eq!(t.standing(a, t0), Standing::Failed);
        assert_eq!(t.failed(a, t0), Some(FIRST_PENALTY));
        assert_eq!(t.standing(a, t0), Standing::Penalized(FIRST_PENALTY));
        let later = t0 + Duration::from_millis(400);
        assert_eq!(
            t.standing(a, later),
            Standing::Penalized(Duration::from_millis(600))
        );
        // After the window: still on record, so no waiting in line for a check.
        let after = t0 + Duration::from_secs(2);
        assert_eq!(t.standing(a, after), Standing::Failed);
        assert_eq!(t.failed(a, after), Some(2 * FIRST_PENALTY));
        // Another address is not concerned.
        assert_eq!(t.standing(addr("192.0.2.2"), after), Standing::Clean);
        // Quiet for long enough: a clean record, and the free failures again.
        let much_later = after + FORGET_AFTER;
        assert_eq!(t.standing(a, much_later), Standing::Clean);
        assert_eq!(t.failed(a, much_later), None);
    }

    #[test]
    fn credentials_work_during_a_penalty_only_where_they_worked_before() {
        let t = Throttle::default();
        let (a, b) = (addr("192.0.2.1"), addr("192.0.2.2"));
        let (good, other) = ([1u8; 32], [2u8; 32]);
        let t0 = Instant::now();
        t.succeeded(a, &good, t0);
        assert!(t.used_here(a, &good, t0));
        assert!(
            !t.used_here(a, &other, t0),
            "a guess is not a credential in use"
        );
        assert!(!t.used_here(b, &good, t0), "used from another address");
        assert!(!t.used_here(a, &good, t0 + USED_FOR));
        t.forget_used();
        assert!(!t.used_here(a, &good, t0));
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_is_the_ipv4() {
        assert_eq!(addr("2001:db8:1:2::1"), addr("2001:db8:1:2:ffff::9"));
        assert_ne!(addr("2001:db8:1:2::1"), addr("2001:db8:1:3::1"));
        assert_eq!(addr("::ffff:192.0.2.1"), addr("192.0.2.1"));
    }

    #[test]
    fn records_are_bounded() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            t.failed(AddrKey::new(IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(t.lock().addresses.len() <= MAX_ADDRESSES);
        // Forgotten records make room.
        let later = t0 + FORGET_AFTER;
        let fresh = addr("198.51.100.7");
        for _ in 0..=FREE_FAILURES {
            t.failed(fresh, later);
        }
        assert!(matches!(t.standing(fresh, later), Standing::Penalized(_)));
        assert!(t.lock().addresses.len() <= MAX_ADDRESSES);
        for i in 0..MAX_USED as u32 + 10 {
            t.succeeded(AddrKey::new(IpAddr::from(i.to_be_bytes())), &[0; 32], t0);
        }
        assert!(t.lock().used.len() <= MAX_USED);
    }
}
