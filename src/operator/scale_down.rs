//! Scale-down that loses no session: the servers a smaller farm no longer needs (the highest
//! ordinals, which a StatefulSet removes) are told to drain first, and the StatefulSet shrinks
//! only when their sessions are done or the farm's drain timeout has passed. These are the pure
//! decisions; the controller asks the pods and applies the result.

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;

use crate::api::ScaleDownStatus;

/// What a draining server said about itself (`POST /drain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainReport {
    /// Draining, with this many sessions still open.
    Draining { sessions: i64 },
    /// Not answering: not running, or not started yet. Nobody can reach its sessions, so there is
    /// nothing to wait for.
    Unreachable(String),
}

impl DrainReport {
    /// Reads the server's `{"draining":true,"sessions":N}`.
    pub fn parse(body: &str) -> DrainReport {
        #[derive(Deserialize)]
        struct Answer {
            draining: bool,
            sessions: i64,
        }
        match serde_json::from_str::<Answer>(body) {
            Ok(a) if a.draining => DrainReport::Draining {
                sessions: a.sessions.max(0),
            },
            Ok(_) => DrainReport::Unreachable("the server did not start draining".into()),
            Err(e) => DrainReport::Unreachable(format!("unexpected answer to /drain: {e}")),
        }
    }

    fn sessions(&self) -> i64 {
        match self {
            DrainReport::Draining { sessions } => *sessions,
            DrainReport::Unreachable(_) => 0,
        }
    }
}

/// The ordinals to drain before the StatefulSet goes from `current` to `desired` replicas,
/// highest first. Empty unless the farm is shrinking.
pub fn to_drain(desired: i32, current: Option<i32>) -> Vec<i32> {
    match current {
        Some(c) if c > desired => (desired.max(0)..c).rev().collect(),
        _ => Vec::new(),
    }
}

/// The ordinals whose drain to cancel because the farm grew back before they were removed: those
/// of the recorded scale-down that the farm now keeps.
pub fn to_undrain(
    desired: i32,
    current: Option<i32>,
    previous: Option<&ScaleDownStatus>,
) -> Vec<i32> {
    let Some(p) = previous else {
        return Vec::new();
    };
    // Still there (the StatefulSet was not shrunk yet) and wanted again.
    let end = desired
        .min(p.from_replicas)
        .min(current.unwrap_or(p.from_replicas));
    (p.to_replicas.max(0)..end).collect()
}

/// The outcome of one look at a scale-down.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The replica count to apply to the StatefulSet now.
    pub replicas: i32,
    /// What to record in the status: `Some` while draining servers are kept.
    pub record: Option<ScaleDownStatus>,
}

/// Decides whether the draining servers can go. `reports` are the answers of the pods named by
/// `to_drain`; `previous` is what the last look recorded (its start time carries the deadline
/// across reconciles and operator restarts).
pub fn step(
    desired: i32,
    current: Option<i32>,
    previous: Option<&ScaleDownStatus>,
    reports: &[DrainReport],
    drain_timeout: SignedDuration,
    now: Timestamp,
) -> Step {
    let Some(current) = current.filter(|c| *c > desired) else {
        return Step {
            replicas: desired,
            record: None,
        };
    };
    let started = previous
        .and_then(|p| p.started_at.parse::<Timestamp>().ok())
        .filter(|t| *t <= now)
        .unwrap_or(now);
    let deadline = started.saturating_add(drain_timeout).unwrap_or(now);
    let sessions_left: i64 = reports.iter().map(DrainReport::sessions).sum();
    if sessions_left == 0 || now >= deadline {
        return Step {
            replicas: desired,
            record: None,
        };
    }
    Step {
        replicas: current,
        record: Some(ScaleDownStatus {
            from_replicas: current,
            to_replicas: desired,
            started_at: started.to_string(),
            deadline: deadline.to_string(),
            sessions_left,
        }),
    }
}

/// The `Progressing` message while servers drain.
pub fn message(s: &ScaleDownStatus, pods: &[String]) -> String {
    format!(
        "scaling down from {} to {} upload servers: draining {} ({} session{} left); they are removed when their sessions end, or at {} at the latest",
        s.from_replicas,
        s.to_replicas,
        pods.join(", "),
        s.sessions_left,
        if s.sessions_left == 1 { "" } else { "s" },
        s.deadline
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_shrinking_farm_drains_and_highest_ordinals_first() {
        assert_eq!(to_drain(2, Some(5)), vec![4, 3, 2]);
        assert_eq!(to_drain(5, Some(5)), Vec::<i32>::new());
        assert_eq!(to_drain(5, Some(2)), Vec::<i32>::new());
        assert_eq!(to_drain(3, None), Vec::<i32>::new());
        assert_eq!(to_drain(0, Some(2)), vec![1, 0]);
    }

    #[test]
    fn draining_servers_are_kept_while_they_hold_sessions_then_removed() {
        let timeout = SignedDuration::from_secs(600);
        let now = t("2026-01-01T00:00:00Z");
        let busy = [
            DrainReport::Draining { sessions: 2 },
            DrainReport::Draining { sessions: 1 },
        ];
        let first = step(1, Some(3), None, &busy, timeout, now);
        assert_eq!(first.replicas, 3, "kept while sessions are open");
        let rec = first.record.clone().unwrap();
        assert_eq!(rec.sessions_left, 3);
        assert_eq!(rec.deadline, "2026-01-01T00:10:00Z");
        // Later, still busy: the start time (and so the deadline) is kept.
        let later = step(
            1,
            Some(3),
            Some(&rec),
            &busy,
            timeout,
            t("2026-01-01T00:05:00Z"),
        );
        assert_eq!(later.record.unwrap().started_at, rec.started_at);
        // Done: removed.
        let done = [
            DrainReport::Draining { sessions: 0 },
            DrainReport::Unreachable("not running".into()),
        ];
        let end = step(1, Some(3), Some(&rec), &done, timeout, now);
        assert_eq!(
            end,
            Step {
                replicas: 1,
                record: None
            }
        );
        // Deadline passed with sessions left: removed anyway.
        let late = step(
            1,
            Some(3),
            Some(&rec),
            &busy,
            timeout,
            t("2026-01-01T00:10:00Z"),
        );
        assert_eq!(late.replicas, 1);
        assert_eq!(late.record, None);
    }

    #[test]
    fn growing_or_steady_farms_apply_the_spec_and_forget_a_scale_down() {
        let rec = ScaleDownStatus {
            from_replicas: 3,
            to_replicas: 1,
            started_at: "2026-01-01T00:00:00Z".into(),
            deadline: "2026-01-01T00:10:00Z".into(),
            sessions_left: 4,
        };
        let s = step(
            3,
            Some(3),
            Some(&rec),
            &[],
            SignedDuration::from_secs(60),
            t("2026-01-01T00:01:00Z"),
        );
        assert_eq!(
            s,
            Step {
                replicas: 3,
                record: None
            }
        );
        assert_eq!(
            step(
                4,
                None,
                None,
                &[],
                SignedDuration::from_secs(60),
                Timestamp::UNIX_EPOCH
            )
            .replicas,
            4
        );
    }

    #[test]
    fn servers_wanted_again_are_undrained() {
        let rec = ScaleDownStatus {
            from_replicas: 5,
            to_replicas: 2,
            started_at: "2026-01-01T00:00:00Z".into(),
            deadline: "2026-01-01T00:10:00Z".into(),
            sessions_left: 4,
        };
        assert_eq!(to_undrain(5, Some(5), Some(&rec)), vec![2, 3, 4]);
        assert_eq!(to_undrain(3, Some(5), Some(&rec)), vec![2]);
        assert_eq!(to_undrain(9, Some(5), Some(&rec)), vec![2, 3, 4]);
        assert_eq!(to_undrain(2, Some(5), Some(&rec)), Vec::<i32>::new());
        assert_eq!(to_undrain(1, Some(5), Some(&rec)), Vec::<i32>::new());
        // Already shrunk: nothing left to undrain.
        assert_eq!(to_undrain(5, Some(2), Some(&rec)), Vec::<i32>::new());
        assert_eq!(to_undrain(5, Some(5), None), Vec::<i32>::new());
    }

    #[test]
    fn drain_answers_are_read_strictly() {
        assert_eq!(
            DrainReport::parse("{\"draining\":true,\"sessions\":7}\n"),
            DrainReport::Draining { sessions: 7 }
        );
        assert!(matches!(
            DrainReport::parse("{\"draining\":false,\"sessions\":7}"),
            DrainReport::Unreachable(_)
        ));
        assert!(matches!(
            DrainReport::parse("<html>"),
            DrainReport::Unreachable(_)
        ));
    }
}
