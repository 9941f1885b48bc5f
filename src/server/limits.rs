//! Resource limits: open sessions per user and per server, how fast a body must come, and what
//! a connection may cost. (How many connections, and from one address: `conn_limits`.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::bits::protocol::BitsError;
use crate::config::ServerConfig;

/// The limits that refuse requests or connections, as the `limit` label of
/// `bitsfarm_limit_refusals_total`. The open-connections cap is not one: connections over it
/// wait in the listen backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `max-sessions-per-user` (BITSNumberOfSessionsLimit).
    SessionsPerUser,
    /// `max-sessions`: open sessions of the whole server.
    Sessions,
    /// `max-fragment-size`.
    FragmentSize,
    /// `max-upload-size` (BITSMaximumUploadSize) of the directory.
    UploadSize,
    /// `max-connections-per-address`: a connection closed as soon as it was accepted.
    ConnectionsPerAddress,
    /// `min-body-rate`: a body cut because it came too slowly.
    BodyRate,
}

impl Limit {
    pub const ALL: [Limit; 6] = [
        Limit::SessionsPerUser,
        Limit::Sessions,
        Limit::FragmentSize,
        Limit::UploadSize,
        Limit::ConnectionsPerAddress,
        Limit::BodyRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::SessionsPerUser => "sessions_per_user",
            Limit::Sessions => "sessions",
            Limit::FragmentSize => "fragment_size",
            Limit::UploadSize => "upload_size",
            Limit::ConnectionsPerAddress => "connections_per_address",
            Limit::BodyRate => "body_rate",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// How fast a request body must come: no pause longer than `idle`, and once `grace` has passed
/// since it began, at least `min_rate` bytes a second on average. The pause rule alone let one
/// byte every minute hold a connection forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    pub idle: Duration,
    pub grace: Duration,
    pub min_rate: Option<u64>,
}

/// The rule a body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooSlow {
    #[error("no data for {} s; the client stalled", .0.as_secs())]
    Stalled(Duration),
    #[error("the body came slower than {0} bytes/s on average; the client is too slow")]
    BelowRate(u64),
}

impl BodyPace {
    /// The server's: pauses and grace of `--read-timeout`, and `--min-body-rate`.
    pub fn of(config: &ServerConfig) -> Self {
        BodyPace {
            idle: config.read_timeout,
            grace: config.read_timeout,
            min_rate: config.min_body_rate,
        }
    }

    /// By when (counted from the body's start) more bytes must have come, after `received`
    /// bytes of which the last came at `last`; and the rule that sets that time.
    pub fn deadline(&self, received: u64, last: Duration) -> (Duration, TooSlow) {
        let stalled = (last.saturating_add(self.idle), TooSlow::Stalled(self.idle));
        let Some(rate) = self.min_rate else {
            return stalled;
        };
        let part = u128::from(received % rate) * 1_000_000_000 / u128::from(rate);
        let owed =
            Duration::from_secs(received / rate).saturating_add(Duration::from_nanos(part as u64));
        let by_rate = self.grace.saturating_add(owed);
        if by_rate < stalled.0 {
            (by_rate, TooSlow::BelowRate(rate))
        } else {
            stalled
        }
    }
}

/// A new session refused by a limit: which one (for the metrics; the client cannot tell them
/// apart), and the answer.
#[derive(Debug)]
pub struct Refused {
    pub limit: Limit,
    pub error: BitsError,
}

/// Counts the sessions that are receiving (created, not closed, cancelled or expired), per owner
/// and in all, across every upload directory of the server.
#[derive(Debug, Default)]
pub struct SessionCounter {
    per_user: Option<usize>,
    per_server: Option<usize>,
    state: Mutex<CounterState>,
}

#[derive(Debug, Default)]
struct CounterState {
    total: usize,
    by_user: HashMap<String, usize>,
}

impl SessionCounter {
    /// `per_user` applies to authenticated users only (anonymous clients are indistinguishable).
    pub fn new(per_user: Option<usize>, per_server: Option<usize>) -> Self {
        SessionCounter {
            per_user,
            per_server,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CounterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new session, unless that would go over a limit.
    pub fn try_acquire(&self, owner: Option<&str>) -> Result<(), Refused> {
        let mut s = self.lock();
        if let Some(max) = self.per_server
            && s.total >= max
        {
            return Err(Refused {
                limit: Limit::Sessions,
                error: BitsError::session_limit(format!(
                    "the server already has {max} open sessions; retry later"
                )),
            });
        }
        if let (Some(max), Some(user)) = (self.per_user, owner)
            && s.by_user.get(user).copied().unwrap_or(0) >= max
        {
            return Err(Refused {
                limit: Limit::SessionsPerUser,
                error: BitsError::session_limit(format!(
                    "user {user:?} already has {max} open sessions; close or cancel some, or retry later"
                )),
            });
        }
        s.total += 1;
        if let Some(user) = owner {
            *s.by_user.entry(user.to_string()).or_default() += 1;
        }
        Ok(())
    }

    /// Counts a session found on disk at start-up (limits are not applied to it).
    pub fn add(&self, owner: Option<&str>) {
        let mut s = self.lock();
        s.total += 1;
        if let Some(user) = owner {
            *s.by_user.entry(user.to_string()).or_default() += 1;
        }
    }

    /// A session stopped receiving.
    pub fn release(&self, owner: Option<&str>) {
        let mut s = self.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(user) = owner
            && let Some(n) = s.by_user.get_mut(user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.by_user.remove(user);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.lock().total
    }

    pub fn of_user(&self, user: &str) -> usize {
        self.lock().by_user.get(user).copied().unwrap_or(0)
    }
}

/// What one connection is doing, for the idle keep-alive timeout: requests in flight (a response
/// body still streaming counts) and when the last one ended.
#[derive(Debug)]
pub struct ConnActivity {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl ConnActivity {
    pub fn begin(self: &std::sync::Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// How long the connection has been idle, or None while a request is in flight.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = std::time::Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Some(self.start.elapsed().saturating_sub(last))
    }
}

/// Ends a request's activity when dropped.
pub struct ActivityGuard(std::sync::Arc<ConnActivity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last_ms.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits::protocol::hresult;

    #[test]
    fn a_body_must_keep_pausing_briefly_and_after_the_grace_keep_up_the_rate() {
        let s = Duration::from_secs;
        let pace = BodyPace {
            idle: s(60),
            grace: s(60),
            min_rate: Some(1024),
        };
        // Within the grace only the pause counts.
        assert_eq!(pace.deadline(0, s(0)), (s(60), TooSlow::Stalled(s(60))));
        // After it, each KiB buys a second: one byte a minute is cut at 60 s and a bit.
        let (at, why) = pace.deadline(1, s(50));
        assert_eq!(why, TooSlow::BelowRate(1024));
        assert!(at > s(60) && at < Duration::from_millis(60_001), "{at:?}");
        assert_eq!(
            pace.deadline(10 << 10, s(65)),
            (s(70), TooSlow::BelowRate(1024))
        );
        // A fast body is only held to the pause rule.
        assert_eq!(pace.deadline(1 << 30, s(100)).0, s(160));
        let no_rate = BodyPace {
            min_rate: None,
            ..pace
        };
        assert_eq!(
            no_rate.deadline(0, s(1000)),
            (s(1060), TooSlow::Stalled(s(60)))
        );
        // Huge counts do not overflow.
        let tiny = BodyPace {
            min_rate: Some(1),
            ..pace
        };
        assert_eq!(tiny.deadline(u64::MAX, s(0)).1, TooSlow::Stalled(s(60)));
        let huge = BodyPace {
            min_rate: Some(u64::MAX),
            ..pace
        };
        assert_eq!(huge.deadline(u64::MAX - 1, s(0)).0, s(60));
        assert!(
            TooSlow::BelowRate(1024)
                .to_string()
                .contains("1024 bytes/s")
        );
    }

    #[test]
    fn per_user_and_per_server_limits() {
        let c = SessionCounter::new(Some(2), Some(3));
        c.try_acquire(Some("a")).unwrap();
        c.try_acquire(Some("a")).unwrap();
        let r = c.try_acquire(Some("a")).unwrap_err();
        assert_eq!(r.limit, Limit::SessionsPerUser);
        assert_eq!(
            (r.error.status, r.error.code),
            (503, hresult::BG_E_HTTP_ERROR_503)
        );
        c.try_acquire(Some("b")).unwrap();
        let r = c.try_acquire(None).unwrap_err();
        assert_eq!(r.limit, Limit::Sessions, "server limit");
        // The server limit is named even for a user who is also at their own limit.
        assert_eq!(c.try_acquire(Some("a")).unwrap_err().limit, Limit::Sessions);
        c.release(Some("a"));
        c.try_acquire(None).unwrap();
        assert_eq!(c.of_user("a"), 1);
        assert_eq!(c.total(), 3);
        // Anonymous sessions only count against the server limit.
        let open = SessionCounter::new(Some(1), None);
        for _ in 0..5 {
            open.try_acquire(None).unwrap();
        }
    }
}
