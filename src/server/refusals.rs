//! Which refused packets the log tells at info: a person whose upload was refused finds one line
//! saying why, and a client that is refused again and again (or a hostile one inventing session
//! ids) cannot fill the log.
//!
//! Two rules, both cheap and bounded:
//! - once per session: a refusal of a session already reported (by id) is not told again; the
//!   last `REMEMBERED` ids are kept. A refused Create-Session has no id yet and is a session of its
//!   own each time.
//! - at most `PER_WINDOW` lines a minute: past that, refusals go to debug only (the metrics still
//!   count every one), one line says so, and the next window's first line says how many were
//!   left out. A fixed window, rather than a rate-limiter crate, because the count of what was
//!   left out is what the log must tell, and no limiter keeps it.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines at info (or warn) per window.
pub const PER_WINDOW: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Session ids remembered as already reported.
const REMEMBERED: usize = 1024;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Tell it. `left_out`: refusals not told since the last window that told one.
    /// `last`: the window's budget is spent with this one; later ones go to debug.
    Tell { left_out: u64, last: bool },
    /// Debug only: already told for this session, or the window's budget is spent.
    Quiet,
}

#[derive(Debug)]
pub struct RefusalLog {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    told: HashSet<String>,
    /// `told`'s ids, oldest first, so the oldest is forgotten first.
    order: VecDeque<String>,
    window_start: Instant,
    in_window: u32,
    left_out: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            inner: Mutex::new(Inner {
                told: HashSet::new(),
                order: VecDeque::new(),
                window_start: Instant::now(),
                in_window: 0,
                left_out: 0,
            }),
        }
    }
}

impl RefusalLog {
    /// Whether the refusal of `session` (None for a Create-Session) at `now` is told.
    pub fn verdict(&self, session: Option<&str>, now: Instant) -> Verdict {
        // Nothing below can panic halfway through an update, so a poisoned lock is still usable.
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if session.is_some_and(|id| s.told.contains(id)) {
            return Verdict::Quiet;
        }
        if now.saturating_duration_since(s.window_start) >= WINDOW {
            s.window_start = now;
            s.in_window = 0;
        }
        if s.in_window >= PER_WINDOW {
            s.left_out += 1;
            return Verdict::Quiet;
        }
        s.in_window += 1;
        if let Some(id) = session {
            if s.order.len() >= REMEMBERED
                && let Some(oldest) = s.order.pop_front()
            {
                s.told.remove(&oldest);
            }
            s.told.insert(id.to_string());
            s.order.push_back(id.to_string());
        }
        Verdict::Tell {
            left_out: std::mem::take(&mut s.left_out),
            last: s.in_window == PER_WINDOW,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_told_once() {
        let log = RefusalLog::default();
        let now = Instant::now();
        assert!(matches!(log.verdict(Some("a"), now), Verdict::Tell { .. }));
        assert_eq!(log.verdict(Some("a"), now), Verdict::Quiet);
        assert!(matches!(log.verdict(Some("b"), now), Verdict::Tell { .. }));
        // A Create-Session has no id: each is told (within the budget).
        assert!(matches!(log.verdict(None, now), Verdict::Tell { .. }));
        assert!(matches!(log.verdict(None, now), Verdict::Tell { .. }));
    }

    #[test]
    fn a_window_tells_its_budget_then_the_next_says_how_many_were_left_out() {
        let log = RefusalLog::default();
        let start = Instant::now();
        for i in 0..PER_WINDOW {
            let last = i + 1 == PER_WINDOW;
            assert_eq!(
                log.verdict(Some(&i.to_string()), start),
                Verdict::Tell { left_out: 0, last }
            );
        }
        for i in 0..7 {
            assert_eq!(log.verdict(Some(&format!("x{i}")), start), Verdict::Quiet);
        }
        assert_eq!(
            log.verdict(Some("x0"), start + WINDOW),
            Verdict::Tell {
                left_out: 7,
                last: false
            },
            "a session left out is told once the window has room"
        );
        assert_eq!(
            log.verdict(None, start + WINDOW),
            Verdict::Tell {
                left_out: 0,
                last: false
            }
        );
    }

    #[test]
    fn the_memory_of_told_sessions_is_bounded() {
        let log = RefusalLog::default();
        let mut now = Instant::now();
        for i in 0..REMEMBERED + 10 {
            if i % PER_WINDOW as usize == 0 {
                now += WINDOW;
            }
            assert!(matches!(
                log.verdict(Some(&i.to_string()), now),
                Verdict::Tell { .. }
            ));
        }
        let inner = log.inner.lock().unwrap();
        assert_eq!(inner.told.len(), REMEMBERED);
        assert_eq!(inner.order.len(), REMEMBERED);
        assert!(!inner.told.contains("0"), "the oldest is forgotten first");
    }
}
