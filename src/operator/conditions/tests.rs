use super::*;

const NOW: i64 = 1_700_000_000;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn rollout(replicas: i32, ready: i32, updated: i32) -> Rollout {
    Rollout {
        generation: Some(2),
        observed_generation: Some(2),
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        current_revision: Some("r1".into()),
        update_revision: Some("r1".into()),
    }
}

fn observed(desired: i32, r: Option<Rollout>) -> Observed {
    Observed {
        generation: Some(7),
        desired_replicas: desired,
        rollout: r,
        failing_pods: vec![],
        problem: None,
    }
}

/// (status, reason) of Ready, Progressing, Degraded.
fn summary(obs: &Observed) -> [(String, String); 3] {
    let c = conditions(obs, &[], ts(NOW));
    assert_eq!(c.len(), 3);
    for x in &c {
        assert_eq!(x.observed_generation, Some(7), "{x:?}");
        assert!(!x.message.is_empty(), "{x:?}");
    }
    let get = |t: &str| {
        let x = find(&c, t).unwrap();
        (x.status.clone(), x.reason.clone())
    };
    [get(READY), get(PROGRESSING), get(DEGRADED)]
}

fn s(status: &str, reason: &str) -> (String, String) {
    (status.to_string(), reason.to_string())
}

#[test]
fn fresh_farm_without_statefulset_status() {
    assert_eq!(
        summary(&observed(3, None)),
        [
            s("False", "Creating"),
            s("True", "Creating"),
            s("False", "AsExpected")
        ]
    );
    let mut r = rollout(0, 0, 0);
    r.observed_generation = None;
    assert_eq!(
        summary(&observed(3, Some(r))),
        [
            s("False", "Creating"),
            s("True", "Creating"),
            s("False", "AsExpected")
        ]
    );
}

#[test]
fn rolling_update() {
    let mut r = rollout(3, 3, 1);
    r.update_revision = Some("r2".into());
    assert_eq!(
        summary(&observed(3, Some(r))),
        [
            s("False", "RollingUpdate"),
            s("True", "RollingUpdate"),
            s("False", "AsExpected")
        ]
    );
    // The StatefulSet controller has not seen the new template yet.
    let mut r = rollout(3, 3, 3);
    r.generation = Some(3);
    assert_eq!(
        summary(&observed(3, Some(r)))[1],
        s("True", "RollingUpdate")
    );
}

#[test]
fn scaled_up_and_down() {
    assert_eq!(
        summary(&observed(5, Some(rollout(3, 3, 3)))),
        [
            s("False", "ScalingUp"),
            s("True", "ScalingUp"),
            s("False", "AsExpected")
        ]
    );
    assert_eq!(
        summary(&observed(1, Some(rollout(3, 3, 3)))),
        [
            s("False", "ScalingDown"),
            s("True", "ScalingDown"),
            s("False", "AsExpected")
        ]
    );
    let mut r = rollout(3, 3, 3);
    r.generation = Some(3);
    assert_eq!(summary(&observed(1, Some(r)))[1], s("True", "ScalingDown"));
}

#[test]
fn all_ready() {
    assert_eq!(
        summary(&observed(3, Some(rollout(3, 3, 3)))),
        [
            s("True", "AllReplicasReady"),
            s("False", "RolloutComplete"),
            s("False", "AsExpected")
        ]
    );
    assert_eq!(
        summary(&observed(0, Some(rollout(0, 0, 0))))[0],
        s("True", "AllReplicasReady")
    );
}

#[test]
fn pods_starting_are_progress_not_degradation() {
    assert_eq!(
        summary(&observed(3, Some(rollout(3, 1, 3)))),
        [
            s("False", "PodsStarting"),
            s("True", "PodsStarting"),
            s("False", "AsExpected")
        ]
    );
}

#[test]
fn pods_failing() {
    let mut obs = observed(3, Some(rollout(3, 2, 3)));
    obs.failing_pods = vec![FailingPod {
        pod: "farm-2".into(),
        reason: "CrashLoopBackOff".into(),
    }];
    assert_eq!(
        summary(&obs),
        [
            s("False", "PodsFailing"),
            s("True", "PodsStarting"),
            s("True", "PodsFailing")
        ]
    );
    let c = conditions(&obs, &[], ts(NOW));
    assert!(
        find(&c, DEGRADED)
            .unwrap()
            .message
            .contains("farm-2: CrashLoopBackOff")
    );
}

#[test]
fn problems_are_degraded() {
    let mut obs = observed(3, Some(rollout(3, 3, 3)));
    obs.problem = Some(Problem::ApplyFailed(
        "applying StatefulSet farm failed: boom".into(),
    ));
    assert_eq!(
        summary(&obs),
        [
            s("False", "ApplyFailed"),
            s("Unknown", "ApplyFailed"),
            s("True", "ApplyFailed")
        ]
    );
    obs.problem = Some(Problem::InvalidSpec("spec.backend.url is required".into()));
    assert_eq!(
        summary(&obs),
        [
            s("False", "InvalidSpec"),
            s("False", "InvalidSpec"),
            s("True", "InvalidSpec")
        ]
    );
}

#[test]
fn transition_time_moves_only_when_the_status_flips() {
    let starting = observed(3, Some(rollout(3, 1, 3)));
    let first = conditions(&starting, &[], ts(NOW));
    // Same statuses later, different reason text: times are kept.
    let mut later_obs = observed(3, Some(rollout(3, 2, 3)));
    later_obs.generation = Some(8);
    let later = conditions(&later_obs, &first, ts(NOW + 60));
    for t in [READY, PROGRESSING, DEGRADED] {
        assert_eq!(
            find(&later, t).unwrap().last_transition_time,
            find(&first, t).unwrap().last_transition_time
        );
        assert_eq!(find(&later, t).unwrap().observed_generation, Some(8));
    }
    // All ready: Ready and Progressing flip, Degraded does not.
    let ready = conditions(&observed(3, Some(rollout(3, 3, 3))), &later, ts(NOW + 120));
    assert_eq!(
        find(&ready, READY).unwrap().last_transition_time,
        Time(ts(NOW + 120))
    );
    assert_eq!(
        find(&ready, PROGRESSING).unwrap().last_transition_time,
        Time(ts(NOW + 120))
    );
    assert_eq!(
        find(&ready, DEGRADED).unwrap().last_transition_time,
        Time(ts(NOW))
    );
}

#[test]
fn phase_of_each_statefulset_state() {
    assert_eq!(phase(3, &Rollout::default()), Phase::Creating);
    assert_eq!(phase(3, &rollout(2, 2, 2)), Phase::ScalingUp);
    assert_eq!(phase(1, &rollout(2, 2, 2)), Phase::ScalingDown);
    assert_eq!(phase(2, &rollout(2, 2, 1)), Phase::RollingUpdate);
    assert_eq!(phase(2, &rollout(2, 0, 2)), Phase::PodsStarting);
    assert_eq!(phase(2, &rollout(2, 2, 2)), Phase::AllReplicasReady);
}
