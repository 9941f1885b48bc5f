//! The bound on password checks: argon2 costs tens of milliseconds of CPU, so checks run on the
//! blocking pool, a few at a time, and a request that cannot get one soon is answered at once
//! (503, retried by the client) instead of queueing without end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a request may wait for a check.
pub const WAIT: Duration = Duration::from_secs(2);

pub struct Slots {
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit now.
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Why no check was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// None was free at once (and the caller would not wait).
    NoneFree,
    /// The line was full, or no check came free within `WAIT`.
    Busy,
}

impl Slots {
    /// `at_once` checks run at the same time; at most 16 times as many requests wait.
    pub fn new(at_once: usize) -> Self {
        let at_once = at_once.max(1);
        Slots {
            permits: Arc::new(Semaphore::new(at_once)),
            waiting: AtomicUsize::new(0),
            max_waiting: 16 * at_once,
        }
    }

    /// Half the CPUs this process may use (at least one): the checks never take all of them, so
    /// health probes and uploads keep going whatever arrives.
    pub fn for_this_machine() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Slots::new(cpus / 2)
    }

    /// A permit if one is free now; waiters are served first (the semaphore is fair).
    pub fn now(&self) -> Result<OwnedSemaphorePermit, NoSlot> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| NoSlot::NoneFree)
    }

    /// A permit within `WAIT`, in line behind the requests already waiting.
    pub async fn within(&self, wait: Duration) -> Result<OwnedSemaphorePermit, NoSlot> {
        if let Ok(p) = self.now() {
            return Ok(p);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        if waiting >= self.max_waiting {
            return Err(NoSlot::Busy);
        }
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(NoSlot::Busy),
        }
    }
}

/// Leaves the line however the wait ends (a client that hangs up drops it mid-wait).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_are_bounded_and_the_line_is_short() {
        let s = Slots::new(1);
        let held = s.now().expect("one is free");
        assert_eq!(s.now().unwrap_err(), NoSlot::NoneFree);
        assert_eq!(
            s.within(Duration::from_millis(20)).await.unwrap_err(),
            NoSlot::Busy,
            "none came free in time"
        );
        // A full line answers at once.
        let s = Arc::new(Slots::new(1));
        let held2 = s.now().unwrap();
        let waiters: Vec<_> = (0..s.max_waiting)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.within(Duration::from_secs(5)).await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = std::time::Instant::now();
        assert_eq!(
            s.within(Duration::from_secs(5)).await.unwrap_err(),
            NoSlot::Busy
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(held2);
        let mut served = 0;
        for w in waiters {
            // Each waiter drops its permit as it ends, so the next one gets it.
            if w.await.unwrap() {
                served += 1;
            }
        }
        assert_eq!(served, s.max_waiting);
        assert_eq!(s.waiting.load(Ordering::Acquire), 0);
        drop(held);
    }
}
