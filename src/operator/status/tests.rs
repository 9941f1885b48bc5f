use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::*;
use crate::operator::resources::tests::farm_with;

#[test]
fn failing_pods_are_told_from_starting_ones() {
    let pods: Vec<Pod> = serde_json::from_value(json!([
        {"metadata": {"name": "farm-0"}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}},
        {"metadata": {"name": "farm-1"}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}},
        {"metadata": {"name": "farm-2"}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull"}}}]}},
        {"metadata": {"name": "farm-3"}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}},
    ]))
    .unwrap();
    let failing = failing_pods(&pods);
    let got: Vec<(&str, &str)> = failing
        .iter()
        .map(|f| (f.pod.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("farm-0", "CrashLoopBackOff"),
            ("farm-2", "ErrImageNeverPull"),
            ("farm-3", "ImagePullBackOff"),
        ]
    );
}

#[test]
fn events_for_created_scaled_and_rolled_out() {
    let none = UploadFarmStatus::default();
    let new = UploadFarmStatus {
        config_hash: Some("a".into()),
        ..Default::default()
    };
    assert_eq!(transitions(&none, &new, 1)[0].1, "Created");
    let old = new.clone();
    assert!(transitions(&old, &new, 0).is_empty());
    let rolled = UploadFarmStatus {
        config_hash: Some("b".into()),
        ..Default::default()
    };
    assert_eq!(transitions(&old, &rolled, 0)[0].1, "ConfigRolledOut");
    // Pods that start failing: one Warning, not repeated while they keep failing.
    let degraded = |reason: &str| UploadFarmStatus {
        config_hash: Some("b".into()),
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Degraded".into(),
            status: "True".into(),
            reason: reason.into(),
            message: "farm-0: ImagePullBackOff".into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }],
        ..Default::default()
    };
    let failing = degraded("PodsFailing");
    let events = transitions(&rolled, &failing, 1);
    assert!(
        matches!(events.as_slice(), [(EventType::Warning, "PodsFailing", m)] if m.contains("ImagePullBackOff")),
        "{events:?}"
    );
    assert!(transitions(&failing, &failing, 1).is_empty());
    assert!(transitions(&degraded("ApplyFailed"), &degraded("ApplyFailed"), 1).is_empty());
}

#[test]
fn with_tls_the_status_shows_https_addresses_with_the_port() {
    let now = Timestamp::now();
    let tls = |spec: Value| {
        let mut spec = spec;
        spec["security"] = json!({"tlsSecretName": "farm-tls"});
        status_for(
            &farm_with("farm", spec),
            &UploadFarmStatus::default(),
            None,
            &[],
            None,
            now,
        )
    };
    // Default port: 443, and no port in the host ids or the URL.
    let s = tls(json!({"replicas": 2}));
    assert_eq!(
        s.url.as_deref(),
        Some("https://farm.uploads.svc.cluster.local")
    );
    assert_eq!(
        s.address.as_deref(),
        Some("farm.uploads.svc.cluster.local:443")
    );
    assert_eq!(s.hosts[1].host_id, "farm-1.uploads.svc.cluster.local");
    // Another port is in every address clients are given.
    let s = tls(json!({"replicas": 2, "service": {"port": 8443}}));
    assert_eq!(
        s.url.as_deref(),
        Some("https://farm.uploads.svc.cluster.local:8443")
    );
    assert_eq!(s.hosts[0].host_id, "farm-0.uploads.svc.cluster.local:8443");
    // Plain http on its default port, as before.
    let s = status_for(
        &farm_with("farm", json!({"replicas": 1})),
        &UploadFarmStatus::default(),
        None,
        &[],
        None,
        now,
    );
    assert_eq!(
        s.url.as_deref(),
        Some("http://farm.uploads.svc.cluster.local")
    );
    assert_eq!(s.hosts[0].host_id, "farm-0.uploads.svc.cluster.local");
}

fn ready_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap()
}

fn stateful_set(replicas: i32) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": "farm", "generation": 3},
        "spec": {"replicas": replicas, "serviceName": "farm-headless", "selector": {}, "template": {}},
        "status": {"observedGeneration": 3, "replicas": replicas, "readyReplicas": replicas,
                   "updatedReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1"},
    }))
    .unwrap()
}

#[test]
fn a_scale_down_under_way_lists_its_draining_servers_and_says_so() {
    let f = farm_with("farm", json!({"replicas": 1}));
    let record = ScaleDownStatus {
        from_replicas: 3,
        to_replicas: 1,
        started_at: "2026-01-01T00:00:00Z".into(),
        deadline: "2026-01-01T01:00:00Z".into(),
        sessions_left: 4,
    };
    let pods = [ready_pod("farm-0"), ready_pod("farm-2")];
    let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
    let old = UploadFarmStatus::default();
    let s = reconciled(
        &f,
        &old,
        &stateful_set(3),
        None,
        &pods,
        "abc",
        Some(record.clone()),
        now,
    );
    assert_eq!(s.config_hash.as_deref(), Some("abc"));
    assert_eq!(s.scale_down.as_ref(), Some(&record));
    let hosts: Vec<(i32, bool, bool)> = s
        .hosts
        .iter()
        .map(|h| (h.ordinal, h.ready, h.draining))
        .collect();
    assert_eq!(hosts, [(0, true, false), (1, false, true), (2, true, true)]);
    assert_eq!(s.hosts[2].host_id, "farm-2.uploads.svc.cluster.local");
    let progressing = conditions::find(&s.conditions, conditions::PROGRESSING).unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "Draining")
    );
    assert!(
        progressing
            .message
            .contains("draining farm-2, farm-1 (4 sessions left)"),
        "{}",
        progressing.message
    );
    assert_eq!(progressing.last_transition_time.0, now);

    // Done draining: the record goes, and with it the draining hosts.
    let done = reconciled(&f, &s, &stateful_set(1), None, &pods[..1], "abc", None, now);
    assert_eq!(done.scale_down, None);
    assert_eq!(done.hosts.len(), 1);
    assert_ne!(
        conditions::find(&done.conditions, conditions::PROGRESSING)
            .unwrap()
            .reason,
        "Draining"
    );
}

#[test]
fn a_failed_reconcile_keeps_what_was_seen_and_says_why() {
    let f = farm_with("farm", json!({"replicas": 2}));
    let old = UploadFarmStatus {
        replicas: 2,
        ready_replicas: 2,
        config_hash: Some("abc".into()),
        scale_down: Some(ScaleDownStatus::default()),
        ..Default::default()
    };
    let s = failed(
        &f,
        &old,
        Problem::ApplyFailed("applying StatefulSet farm failed".into()),
        Timestamp::now(),
    );
    assert_eq!((s.replicas, s.ready_replicas), (2, 2));
    assert_eq!(s.config_hash.as_deref(), Some("abc"));
    assert!(
        s.scale_down.is_some(),
        "a failure does not restart the drain's clock"
    );
    let degraded = conditions::find(&s.conditions, conditions::DEGRADED).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ApplyFailed")
    );
}

#[test]
fn failures_are_reported_with_their_own_reason_and_action() {
    assert_eq!(
        failure_event(&Problem::InvalidSpec("spec.backend.url is required".into())),
        (
            "InvalidSpec",
            "Validate",
            "invalid UploadFarm spec: spec.backend.url is required".to_string()
        )
    );
    assert_eq!(
        failure_event(&Problem::ApplyFailed("applying Service farm failed".into())),
        (
            "ApplyFailed",
            "Apply",
            "applying Service farm failed".to_string()
        )
    );
}

fn pod(name: &str, ready: bool, disruption: Option<&str>) -> Pod {
    let mut conditions =
        vec![json!({"type": "Ready", "status": if ready { "True" } else { "False" }})];
    if let Some(reason) = disruption {
        conditions.push(json!({"type": "DisruptionTarget", "status": "True", "reason": reason}));
    }
    serde_json::from_value(
        json!({"metadata": {"name": name}, "status": {"conditions": conditions}}),
    )
    .unwrap()
}

fn budget(allowed: i32) -> PodDisruptionBudget {
    serde_json::from_value(json!({"metadata": {"name": "farm"},
        "status": {"disruptionsAllowed": allowed, "currentHealthy": 2, "desiredHealthy": 2, "expectedPods": 3}}))
    .unwrap()
}

#[test]
fn a_disruption_is_told_by_evicted_pods_or_an_exhausted_budget() {
    let all_ready = [pod("farm-0", true, None), pod("farm-1", true, None)];
    // Nothing evicted, budget with room: no disruption.
    assert_eq!(disruption(2, &all_ready, Some(&budget(1))), None);
    // An exhausted budget with every server ready is no shortage (e.g. maxUnavailable reached by
    // a rollout that just ended).
    assert_eq!(disruption(2, &all_ready, Some(&budget(0))), None);
    // A pod being evicted: named, with the kubelet's or the API server's reason.
    let evicted = [
        pod("farm-0", true, None),
        pod("farm-1", false, Some("EvictionByEvictionAPI")),
    ];
    let m = disruption(2, &evicted, Some(&budget(1))).unwrap();
    assert_eq!(
        m,
        "1 of 2 upload servers ready; being evicted: farm-1 (EvictionByEvictionAPI)"
    );
    // The evicted pod gone, its replacement not ready yet, the budget used up.
    let replaced = [pod("farm-0", true, None), pod("farm-1", false, None)];
    let m = disruption(2, &replaced, Some(&budget(0))).unwrap();
    assert!(
        m.starts_with(
            "1 of 2 upload servers ready; the PodDisruptionBudget allows no further eviction"
        ),
        "{m}"
    );
    // Not ready without eviction and without a budget: starting pods, not a disruption.
    assert_eq!(disruption(2, &replaced, None), None);
}

#[test]
fn a_disruption_shows_in_ready_and_as_one_normal_event() {
    let f = farm_with("farm", json!({"replicas": 2}));
    let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
    let pods = [
        pod("farm-0", true, None),
        pod("farm-1", false, Some("TerminationByKubelet")),
    ];
    let before = reconciled(
        &f,
        &UploadFarmStatus::default(),
        &stateful_set(2),
        None,
        &pods[..1],
        "abc",
        None,
        now,
    );
    assert_eq!(
        conditions::find(&before.conditions, conditions::READY)
            .unwrap()
            .status,
        "True"
    );
    // The StatefulSet's controller counts one server less.
    let mut short = stateful_set(2);
    if let Some(s) = short.status.as_mut() {
        s.ready_replicas = Some(1);
    }
    let during = reconciled(
        &f,
        &before,
        &short,
        Some(&budget(0)),
        &pods,
        "abc",
        None,
        now,
    );
    let ready = conditions::find(&during.conditions, conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Disrupted")
    );
    assert!(
        ready.message.contains("farm-1 (TerminationByKubelet)"),
        "{}",
        ready.message
    );
    let events = transitions(&before, &during, 2);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].0, events[0].1), (EventType::Normal, "Disrupted"));
    // Still disrupted at the next reconcile: no second event.
    let again = reconciled(
        &f,
        &during,
        &short,
        Some(&budget(0)),
        &pods,
        "abc",
        None,
        now,
    );
    assert!(transitions(&during, &again, 2).is_empty());
}
