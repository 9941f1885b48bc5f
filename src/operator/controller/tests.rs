use std::ops::Range;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::*;
use crate::operator::fixtures::{ApiServer, Seen, context, list, status_error};
use crate::operator::resources::CONFIG_HASH_ANNOTATION;

const NS: &str = "uploads";

/// What the sweep lists by, for every kind: everything the operator made for the farm.
const OWNED: &str = "app.kubernetes.io/instance=farm,app.kubernetes.io/name=bitsfarm,app.kubernetes.io/managed-by=bitsfarm-operator";

fn farm(spec: Value, status: Option<Value>) -> UploadFarm {
    let mut v = json!({
        "apiVersion": "bitsfarm.io/v1alpha1",
        "kind": "UploadFarm",
        "metadata": {"name": "farm", "namespace": NS, "uid": "uid-1", "generation": 2},
        "spec": spec,
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).unwrap()
}

fn guard(f: &UploadFarm) -> Arc<DeserializeGuard<UploadFarm>> {
    Arc::new(DeserializeGuard(Ok(f.clone())))
}

fn svc_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/services/{name}")
}

fn config_map_path() -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/farm-config")
}

fn stateful_set_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/farm")
}

fn network_policy_path(name: &str) -> String {
    format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies{name}")
}

fn host_service_json(i: i32) -> Value {
    serde_json::to_value(resources::host_service(&farm(json!({}), None), i)).unwrap()
}

/// Every Service a farm that ran `replicas` servers has, as the API server lists them.
fn farm_services(replicas: i32) -> Vec<Value> {
    let f = farm(json!({}), None);
    let mut out = vec![serde_json::to_value(resources::headless_service(&f)).unwrap()];
    out.extend((0..replicas).map(host_service_json));
    out.push(serde_json::to_value(resources::shared_service(&f)).unwrap());
    out
}

/// The status write, answered with the whole farm as the API server does.
async fn expect_status(api: &mut ApiServer, f: &UploadFarm) -> Seen {
    let mut whole = serde_json::to_value(f).unwrap();
    let seen = api
        .expect(
            "PATCH",
            &format!("/apis/bitsfarm.io/v1alpha1/namespaces/{NS}/uploadfarms/farm/status"),
            200,
            |b| {
                whole["status"] = b["status"].clone();
                whole
            },
        )
        .await;
    assert!(
        seen.query.contains("fieldManager=bitsfarm-operator"),
        "{}",
        seen.query
    );
    seen
}

async fn expect_event(api: &mut ApiServer) -> Seen {
    api.expect(
        "POST",
        &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        201,
        |b| b.clone(),
    )
    .await
}

/// The handoff Secret is created when missing; an existing one answers 409 and is kept.
async fn expect_handoff_secret(api: &mut ApiServer, exists: bool) {
    let path = format!("/api/v1/namespaces/{NS}/secrets");
    if exists {
        api.expect("POST", &path, 409, |_| {
            status_error(
                409,
                "AlreadyExists",
                "secrets \"farm-handoff\" already exists",
            )
        })
        .await;
        return;
    }
    let created = api.expect("POST", &path, 201, |b| b.clone()).await;
    let secret = created.body["stringData"]["secret"].as_str().unwrap();
    assert_eq!(secret.len(), 64, "{secret}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(created.body["metadata"]["name"], "farm-handoff");
    assert_eq!(
        created.body["metadata"]["ownerReferences"][0]["uid"],
        "uid-1"
    );
}

/// The applies that come before the pods' own: the handoff Secret (kept), the ConfigMap and the
/// headless Service. Gives the ConfigMap apply.
async fn expect_config(api: &mut ApiServer) -> Seen {
    expect_handoff_secret(api, true).await;
    let cm = api.expect_apply(&config_map_path()).await;
    api.expect_apply(&svc_path("farm-headless")).await;
    cm
}

/// The per-pod Services `0..replicas`, then the shared one.
async fn expect_services(api: &mut ApiServer, replicas: i32) {
    for i in 0..replicas {
        api.expect_apply(&svc_path(&format!("farm-{i}"))).await;
    }
    api.expect_apply(&svc_path("farm")).await;
}

/// One kind's part of the sweep: the farm's objects listed by its labels (answered with
/// `listed`), then the deletes of `deleted`, by name.
async fn expect_sweep_of(
    api: &mut ApiServer,
    collection: &str,
    kind: &str,
    listed: Vec<Value>,
    deleted: &[String],
) {
    let answer = list(kind, listed.clone());
    let l = api.expect("GET", collection, 200, |_| answer).await;
    let selector = url::form_urlencoded::parse(l.query.as_bytes())
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v.into_owned());
    assert_eq!(selector.as_deref(), Some(OWNED), "{}", l.query);
    for name in deleted {
        let gone = listed
            .iter()
            .find(|o| o["metadata"]["name"] == name.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        api.expect("DELETE", &format!("{collection}/{name}"), 200, |_| gone)
            .await;
    }
}

/// The sweep of NetworkPolicies, right after the policy is applied (or would be): the farm's
/// (answered with `policies`), of which `deleted` go.
async fn expect_policy_sweep(api: &mut ApiServer, policies: Vec<Value>, deleted: &[&str]) {
    let gone: Vec<String> = deleted.iter().map(|n| n.to_string()).collect();
    let policy_list = network_policy_path("");
    expect_sweep_of(api, &policy_list, "NetworkPolicyList", policies, &gone).await;
}

/// The sweep of Services, last: the farm's (answered with `farm_services(listed)`), of which
/// the per-pod Services `deleted` go.
async fn expect_service_sweep(api: &mut ApiServer, listed: i32, deleted: Range<i32>) {
    let gone: Vec<String> = deleted.map(|i| format!("farm-{i}")).collect();
    let services = format!("/api/v1/namespaces/{NS}/services");
    expect_sweep_of(api, &services, "ServiceList", farm_services(listed), &gone).await;
}

fn budget_path(name: &str) -> String {
    format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets{name}")
}

/// The farm's PodDisruptionBudget as the API server stores it, with `allowed` disruptions left.
fn budget_json(allowed: i32) -> Value {
    let mut b = serde_json::to_value(
        resources::disruption_budget(&farm(json!({}), None), 2).expect("a budget for 2 servers"),
    )
    .unwrap();
    b["status"] = json!({"disruptionsAllowed": allowed, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2});
    b
}

/// The PodDisruptionBudget, after the Service sweep: applied for a farm running `servers` of
/// two or more, then the sweep, which lists the one a farm of `listed` servers had and deletes it
/// when no longer asked for. Gives the apply.
async fn expect_budget(api: &mut ApiServer, servers: i32, listed: i32) -> Option<Seen> {
    let applied = if servers >= 2 {
        Some(api.expect_apply(&budget_path("/farm")).await)
    } else {
        None
    };
    let had = if listed >= 2 {
        vec![budget_json(1)]
    } else {
        vec![]
    };
    let deleted = if listed >= 2 && servers < 2 {
        vec!["farm".to_string()]
    } else {
        vec![]
    };
    let collection = budget_path("");
    expect_sweep_of(api, &collection, "PodDisruptionBudgetList", had, &deleted).await;
    applied
}

async fn expect_pods(api: &mut ApiServer) {
    api.expect("GET", &format!("/api/v1/namespaces/{NS}/pods"), 200, |_| {
        list("PodList", vec![])
    })
    .await;
}

/// The live StatefulSet, read when the status hints at a scale-down.
async fn expect_live_replicas(api: &mut ApiServer, replicas: i32) {
    api.expect("GET", &stateful_set_path(), 200, |_| {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "farm", "namespace": NS},
               "spec": {"replicas": replicas, "serviceName": "farm-headless", "selector": {}, "template": {}}})
    })
    .await;
}

/// The requests of one reconcile of a farm without a NetworkPolicy, after any drains: the
/// handoff Secret (kept), the ConfigMap, the headless Service, the NetworkPolicy sweep (none
/// listed), the StatefulSet at `replicas`, the per-pod Services `0..replicas` and the shared one,
/// the Service sweep (per-pod ones `0..listed` listed, those at or above `replicas` deleted), the
/// PodDisruptionBudget (`expect_budget`) and the pod list. Gives the ConfigMap and StatefulSet applies for a closer look.
async fn expect_children(api: &mut ApiServer, replicas: i32, listed: i32) -> (Seen, Seen) {
    let cm = expect_config(api).await;
    expect_policy_sweep(api, vec![], &[]).await;
    let sts = api.expect_apply(&stateful_set_path()).await;
    assert_eq!(sts.body["spec"]["replicas"], replicas);
    expect_services(api, replicas).await;
    expect_service_sweep(api, listed, replicas..listed).await;
    expect_budget(api, replicas, listed).await;
    expect_pods(api).await;
    (cm, sts)
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

/// Starts reconciling `f` against a mocked API server, which the test then answers.
fn start(f: &UploadFarm) -> (ApiServer, JoinHandle<Result<Action, Error>>) {
    let (ctx, api) = context();
    (api, tokio::spawn(reconcile(guard(f), ctx)))
}

/// Reconciles `f` against a mocked API server that `expect` answers (within 10 s), then checks
/// that the server was asked nothing more; gives what the reconcile returned.
async fn scenario(
    f: &UploadFarm,
    expect: impl AsyncFnOnce(&mut ApiServer),
) -> Result<Action, Error> {
    let (mut api, reconciler) = start(f);
    with_timeout(expect(&mut api)).await;
    let result = reconciler.await.expect("the reconcile task");
    api.done().await;
    result
}

async fn with_timeout<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the scenario timed out")
}

#[tokio::test]
async fn creating_a_farm_applies_every_child_then_reports() {
    let f = farm(json!({"replicas": 3}), None);
    let result = scenario(&f, async |api| {
        expect_handoff_secret(api, false).await;
        let cm = api.expect_apply(&config_map_path()).await;
        assert!(
            cm.body["data"]["config.yaml"]
                .as_str()
                .unwrap()
                .contains("host-id")
        );
        api.expect_apply(&svc_path("farm-headless")).await;
        expect_policy_sweep(api, vec![], &[]).await;
        let sts = api.expect_apply(&stateful_set_path()).await;
        assert_eq!(sts.body["spec"]["replicas"], 3);
        assert_eq!(sts.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        for i in 0..3 {
            let s = api.expect_apply(&svc_path(&format!("farm-{i}"))).await;
            assert_eq!(
                s.body["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
                format!("farm-{i}")
            );
        }
        api.expect_apply(&svc_path("farm")).await;
        // Everything listed is asked for: the sweep deletes nothing.
        expect_service_sweep(api, 3, 0..0).await;
        let pdb = expect_budget(api, 3, 0)
            .await
            .expect("a budget for 3 servers");
        let body = &pdb.body;
        assert_eq!(body["apiVersion"], "policy/v1");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(body["spec"]["maxUnavailable"], 1);
        assert_eq!(
            body["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/instance": "farm", "app.kubernetes.io/name": "bitsfarm"})
        );
        expect_pods(api).await;
        let st = expect_status(api, &f).await;
        let status = &st.body["status"];
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["hosts"].as_array().unwrap().len(), 3);
        assert_eq!(
            status["hosts"][1]["hostId"],
            "farm-1.uploads.svc.cluster.local"
        );
        assert_eq!(status["address"], "farm.uploads.svc.cluster.local:80");
        assert_eq!(condition(status, "Ready")["status"], "False");
        assert_eq!(condition(status, "Progressing")["status"], "True");
        assert_eq!(condition(status, "Degraded")["status"], "False");
        let ev = expect_event(api).await;
        assert_eq!(ev.body["reason"], "Created");
        assert_eq!(ev.body["type"], "Normal");
    })
    .await;
    let action = result.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

fn running_status(hash: &str, replicas: i32) -> Value {
    json!({
        "observedGeneration": 1,
        "replicas": replicas,
        "readyReplicas": replicas,
        "configHash": hash,
        "hosts": (0..replicas).map(|i| json!({"ordinal": i, "pod": format!("farm-{i}"), "hostId": "h", "ready": true})).collect::<Vec<_>>(),
    })
}

fn drain_path(pod: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{pod}:8081/proxy/drain")
}

/// The servers a scale-down removes are asked to drain, highest ordinal first, through the API
/// server's pod proxy; each answers with the sessions it still holds.
async fn expect_drains(api: &mut ApiServer, sessions: &[(i32, i64)]) {
    for (i, n) in sessions {
        let seen = api
            .expect(
                "POST",
                &drain_path(&format!("farm-{i}")),
                200,
                |_| json!({"draining": true, "sessions": n}),
            )
            .await;
        assert_eq!(seen.query, "stay=true");
    }
}

/// A farm that ran 3 servers and now asks for 1, with the scale-down `record` of the last look
/// (none at the first).
fn shrinking(record: Option<Value>) -> UploadFarm {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let mut status = running_status(&hash, 3);
    if let Some(r) = record {
        status["scaleDown"] = r;
    }
    farm(json!({"replicas": 1}), Some(status))
}

#[tokio::test]
async fn a_scale_down_keeps_draining_servers_and_their_services_while_they_hold_sessions() {
    let f = shrinking(None);
    let result = scenario(&f, async |api| {
        expect_live_replicas(api, 3).await;
        expect_drains(api, &[(2, 0), (1, 3)]).await;
        // No DELETE: the draining servers' clients still reach them by host id.
        expect_children(api, 3, 3).await;
        let st = expect_status(api, &f).await;
        let status = &st.body["status"];
        let progressing = condition(status, "Progressing");
        assert_eq!(progressing["status"], "True");
        assert_eq!(progressing["reason"], "Draining");
        let msg = progressing["message"].as_str().unwrap();
        assert!(msg.contains("farm-2, farm-1"), "{msg}");
        assert!(msg.contains("3 sessions left"), "{msg}");
        assert_eq!(status["scaleDown"]["fromReplicas"], 3);
        assert_eq!(status["scaleDown"]["toReplicas"], 1);
        assert_eq!(status["scaleDown"]["sessionsLeft"], 3);
        // The draining servers are listed until they are removed, and no Scaled event yet.
        let hosts = status["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0]["draining"], Value::Null);
        assert_eq!(hosts[1]["draining"], true);
        assert_eq!(hosts[2]["pod"], "farm-2");
        assert_eq!(hosts[2]["draining"], true);
    })
    .await;
    let action = result.unwrap();
    assert_eq!(action, Action::requeue(DRAIN_POLL));
}

#[tokio::test]
async fn growing_back_during_a_scale_down_cancels_the_drain_of_the_servers_kept() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let mut status = running_status(&hash, 3);
    status["scaleDown"] = json!({
        "fromReplicas": 3, "toReplicas": 1, "sessionsLeft": 2,
        "startedAt": "2026-01-01T00:00:00Z", "deadline": "2026-01-02T00:00:00Z",
    });
    let f = farm(json!({"replicas": 3}), Some(status));
    let result = scenario(&f, async |api| {
        expect_live_replicas(api, 3).await;
        for i in [1, 2] {
            let seen = api
                .expect(
                    "POST",
                    &drain_path(&format!("farm-{i}")),
                    200,
                    |_| json!({"draining": false, "sessions": 1}),
                )
                .await;
            assert_eq!(seen.query, "cancel=true");
        }
        expect_children(api, 3, 3).await;
        let st = expect_status(api, &f).await;
        assert_eq!(st.body["status"]["scaleDown"], Value::Null);
        assert_ne!(
            condition(&st.body["status"], "Progressing")["reason"],
            "Draining"
        );
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn a_scale_down_past_its_drain_deadline_removes_the_servers_anyway() {
    let f = shrinking(Some(json!({
        "fromReplicas": 3, "toReplicas": 1, "sessionsLeft": 3,
        "startedAt": "2020-01-01T00:00:00Z", "deadline": "2020-01-02T00:00:00Z",
    })));
    let result = scenario(&f, async |api| {
        expect_live_replicas(api, 3).await;
        expect_drains(api, &[(2, 1), (1, 1)]).await;
        expect_children(api, 1, 3).await;
        let st = expect_status(api, &f).await;
        assert_eq!(st.body["status"]["scaleDown"], Value::Null);
        assert_ne!(
            condition(&st.body["status"], "Progressing")["reason"],
            "Draining"
        );
        expect_event(api).await;
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn scaling_3_to_1_deletes_the_services_of_pods_1_and_2() {
    let f = shrinking(None);
    let result = scenario(&f, async |api| {
        // Both servers drained: nothing to wait for.
        expect_live_replicas(api, 3).await;
        expect_drains(api, &[(2, 0), (1, 0)]).await;
        expect_children(api, 1, 3).await;
        let st = expect_status(api, &f).await;
        assert_eq!(st.body["status"]["hosts"].as_array().unwrap().len(), 1);
        let ev = expect_event(api).await;
        assert_eq!(ev.body["reason"], "Scaled");
        assert!(ev.body["note"].as_str().unwrap().contains("from 3 to 1"));
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn a_changed_backend_rolls_the_config_hash() {
    let old_hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(
        json!({"replicas": 1, "backend": {"url": "http://app/in", "notification": "ByValue"}}),
        Some(running_status(&old_hash, 1)),
    );
    let result = scenario(&f, async |api| {
        let (cm, sts) = expect_children(api, 1, 1).await;
        assert!(
            cm.body["data"]["config.yaml"]
                .as_str()
                .unwrap()
                .contains("notify-url: http://app/in")
        );
        let new_hash = sts.body["spec"]["template"]["metadata"]["annotations"]
            [CONFIG_HASH_ANNOTATION]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(new_hash, old_hash);
        let st = expect_status(api, &f).await;
        assert_eq!(st.body["status"]["configHash"], new_hash);
        let ev = expect_event(api).await;
        assert_eq!(ev.body["reason"], "ConfigRolledOut");
    })
    .await;
    result.unwrap();
}

/// The failure's status write: Degraded with `reason` and a message that names `names`, not
/// Ready; then its Warning event with the same reason.
async fn expect_failure_reported(api: &mut ApiServer, f: &UploadFarm, reason: &str, names: &str) {
    let st = expect_status(api, f).await;
    let degraded = condition(&st.body["status"], "Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some(reason))
    );
    assert!(
        degraded["message"].as_str().unwrap().contains(names),
        "{degraded}"
    );
    assert_eq!(condition(&st.body["status"], "Ready")["status"], "False");
    let ev = expect_event(api).await;
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["reason"], reason);
}

#[tokio::test]
async fn an_api_error_is_degraded_with_an_event_and_requeued() {
    let (ctx, mut api) = context();
    let f = farm(json!({"replicas": 2}), None);
    let g = guard(&f);
    let reconciler = tokio::spawn(reconcile(g.clone(), ctx.clone()));
    with_timeout(async {
        expect_config(&mut api).await;
        expect_policy_sweep(&mut api, vec![], &[]).await;
        api.expect("PATCH", &stateful_set_path(), 403, |_| {
            status_error(403, "Forbidden", "statefulsets.apps is forbidden")
        })
        .await;
        // Nothing after the refusal: no Services, no sweep.
        expect_failure_reported(&mut api, &f, "ApplyFailed", "StatefulSet farm").await;
    })
    .await;
    let err = reconciler.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Apply {
                kind: "StatefulSet",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        error_policy(g.clone(), &err, ctx.clone()),
        Action::requeue(backoff(1))
    );
    assert_eq!(
        error_policy(g, &err, ctx.clone()),
        Action::requeue(backoff(2))
    );
    assert!(
        ctx.metrics
            .encode()
            .contains("reconcile_failures_total{error=\"apply\"} 1")
    );
    api.done().await;
}

#[tokio::test]
async fn a_refused_delete_in_the_sweep_is_reported_like_a_refused_apply() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(json!({"replicas": 1}), Some(running_status(&hash, 2)));
    let result = scenario(&f, async |api| {
        // The status says 2 servers: the live StatefulSet says 1, so there is nothing to drain.
        expect_live_replicas(api, 1).await;
        expect_config(api).await;
        expect_policy_sweep(api, vec![], &[]).await;
        api.expect_apply(&stateful_set_path()).await;
        expect_services(api, 1).await;
        let services = format!("/api/v1/namespaces/{NS}/services");
        api.expect("GET", &services, 200, |_| {
            list("ServiceList", farm_services(2))
        })
        .await;
        api.expect("DELETE", &svc_path("farm-1"), 403, |_| {
            status_error(403, "Forbidden", "services \"farm-1\" is forbidden")
        })
        .await;
        expect_failure_reported(api, &f, "ApplyFailed", "deleting the Service farm-1").await;
    })
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::Prune { kind: "Service", name, .. } if name == "farm-1"),
        "{err}"
    );
    assert_eq!(err.metric_label(), "delete");
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_says_why() {
    let f = farm(json!({"backend": {"notification": "ByValue"}}), None);
    let result = scenario(&f, async |api| {
        expect_failure_reported(api, &f, "InvalidSpec", "spec.backend.url").await;
    })
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn an_invalid_spec_stops_before_any_server_is_asked_to_drain() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(
        json!({"replicas": 1, "backend": {"notification": "ByValue"}}),
        Some(running_status(&hash, 3)),
    );
    let (ctx, mut api) = context();
    let reconciler = tokio::spawn(reconcile(guard(&f), ctx.clone()));
    with_timeout(async {
        // No StatefulSet read and no drain: straight to the status.
        expect_failure_reported(&mut api, &f, "InvalidSpec", "spec.backend.url").await;
    })
    .await;
    assert_eq!(reconciler.await.unwrap().unwrap(), Action::await_change());
    assert!(
        ctx.metrics
            .encode()
            .contains("reconcile_failures_total{error=\"invalid_spec\"} 1")
    );
    api.done().await;
}

#[tokio::test]
async fn a_malformed_farm_is_reported_and_skipped() {
    let (ctx, mut api) = context();
    let bad: DeserializeGuard<UploadFarm> = serde_json::from_value(json!({
        "apiVersion": "bitsfarm.io/v1alpha1", "kind": "UploadFarm",
        "metadata": {"name": "broken", "namespace": NS, "uid": "u2"},
        "spec": {"replicas": "many"},
    }))
    .unwrap();
    assert!(bad.0.is_err());
    let reconciler = tokio::spawn(reconcile(Arc::new(bad), ctx.clone()));
    with_timeout(async {
        let ev = expect_event(&mut api).await;
        assert_eq!(ev.body["reason"], "InvalidSpec");
        assert_eq!(ev.body["regarding"]["name"], "broken");
    })
    .await;
    assert_eq!(reconciler.await.unwrap().unwrap(), Action::await_change());
    api.done().await;
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(2), Duration::from_secs(10));
    assert_eq!(backoff(4), Duration::from_secs(40));
    assert_eq!(backoff(30), Duration::from_secs(300));
}

#[tokio::test]
async fn a_network_policy_is_applied_before_the_pods_and_owned_by_the_farm() {
    let f = farm(
        json!({"replicas": 1,
               "backend": {"url": "https://ingest.example.com/in", "notification": "ByValue"},
               "networkPolicy": {"enabled": true,
                                 "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "clients"}}}]}}),
        None,
    );
    let result = scenario(&f, async |api| {
        expect_config(api).await;
        let np = api
            .expect_apply(&network_policy_path("/farm-network-policy"))
            .await;
        let body = &np.body;
        assert_eq!(body["kind"], "NetworkPolicy");
        assert_eq!(body["apiVersion"], "networking.k8s.io/v1");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(body["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            body["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["team"],
            "clients"
        );
        let egress = body["spec"]["egress"].as_array().unwrap();
        assert_eq!(
            egress.last().unwrap()["ports"][0]["port"],
            443,
            "{egress:?}"
        );
        // The policy the farm asks for is listed by the sweep, and kept; only then the pods.
        expect_policy_sweep(api, vec![np.body.clone()], &[]).await;
        api.expect_apply(&stateful_set_path()).await;
        expect_services(api, 1).await;
        expect_service_sweep(api, 1, 0..0).await;
        expect_budget(api, 1, 1).await;
        expect_pods(api).await;
        expect_status(api, &f).await;
        let ev = expect_event(api).await;
        assert_eq!(ev.body["reason"], "Created");
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn turning_the_network_policy_off_deletes_only_the_one_the_farm_made() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(json!({"replicas": 1}), Some(running_status(&hash, 1)));
    let with_policy = farm(json!({"networkPolicy": {"enabled": true}}), None);
    let ours = serde_json::to_value(resources::network_policy(&with_policy).unwrap()).unwrap();
    // Someone's own policy that copied the farm's labels: not the operator's to delete.
    let mut theirs = ours.clone();
    theirs["metadata"]["name"] = json!("handmade");
    theirs["metadata"]["ownerReferences"] = Value::Null;
    let result = scenario(&f, async |api| {
        expect_config(api).await;
        // Deleted before anything else can fail.
        expect_policy_sweep(
            api,
            vec![theirs.clone(), ours.clone()],
            &["farm-network-policy"],
        )
        .await;
        api.expect_apply(&stateful_set_path()).await;
        expect_services(api, 1).await;
        expect_service_sweep(api, 1, 0..0).await;
        expect_budget(api, 1, 1).await;
        expect_pods(api).await;
        expect_status(api, &f).await;
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn a_refused_network_policy_stops_before_the_pods() {
    let f = farm(
        json!({"replicas": 1, "networkPolicy": {"enabled": true}}),
        None,
    );
    let result = scenario(&f, async |api| {
        expect_config(api).await;
        api.expect(
            "PATCH",
            &network_policy_path("/farm-network-policy"),
            403,
            |_| {
                status_error(
                    403,
                    "Forbidden",
                    "networkpolicies.networking.k8s.io is forbidden",
                )
            },
        )
        .await;
        // No StatefulSet: pods that should be restricted are not started unrestricted.
        expect_failure_reported(api, &f, "ApplyFailed", "NetworkPolicy farm-network-policy").await;
    })
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Apply {
                kind: "NetworkPolicy",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn turning_the_disruption_budget_off_deletes_the_one_the_farm_made() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(
        json!({"replicas": 3, "disruptionBudget": {"enabled": false}}),
        Some(running_status(&hash, 3)),
    );
    let result = scenario(&f, async |api| {
        expect_config(api).await;
        expect_policy_sweep(api, vec![], &[]).await;
        api.expect_apply(&stateful_set_path()).await;
        expect_services(api, 3).await;
        expect_service_sweep(api, 3, 0..0).await;
        // No apply: the sweep finds the budget the farm made and deletes it.
        let collection = budget_path("");
        expect_sweep_of(
            api,
            &collection,
            "PodDisruptionBudgetList",
            vec![budget_json(1)],
            &["farm".to_string()],
        )
        .await;
        expect_pods(api).await;
        expect_status(api, &f).await;
    })
    .await;
    result.unwrap();
}

#[tokio::test]
async fn a_farm_short_of_a_server_by_an_eviction_says_so_in_ready_and_an_event() {
    let hash = resources::config_yaml(&farm(json!({}), None)).unwrap().1;
    let f = farm(json!({"replicas": 3}), Some(running_status(&hash, 3)));
    let pod = |i: i32, ready: &str, evicted: bool| {
        let mut conditions = vec![json!({"type": "Ready", "status": ready})];
        if evicted {
            conditions.push(json!({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}));
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("farm-{i}"), "namespace": NS},
               "status": {"conditions": conditions}})
    };
    let pods = vec![
        pod(0, "True", false),
        pod(1, "True", false),
        pod(2, "False", true),
    ];
    let result = scenario(&f, async |api| {
        expect_config(api).await;
        expect_policy_sweep(api, vec![], &[]).await;
        // The StatefulSet's controller counts 2 ready of 3.
        api.expect("PATCH", &stateful_set_path(), 200, |b| {
            let mut sts = b.clone();
            sts["metadata"]["generation"] = json!(1);
            sts["status"] = json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 2,
                                   "updatedReplicas": 3, "currentRevision": "r1", "updateRevision": "r1"});
            sts
        })
        .await;
        expect_services(api, 3).await;
        expect_service_sweep(api, 3, 0..0).await;
        // The budget allows no further eviction while one server is out.
        api.expect("PATCH", &budget_path("/farm"), 200, |_| budget_json(0))
            .await;
        let collection = budget_path("");
        expect_sweep_of(api, &collection, "PodDisruptionBudgetList", vec![budget_json(0)], &[]).await;
        api.expect("GET", &format!("/api/v1/namespaces/{NS}/pods"), 200, |_| {
            list("PodList", pods.clone())
        })
        .await;
        let st = expect_status(api, &f).await;
        let ready = condition(&st.body["status"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Disrupted");
        let message = ready["message"].as_str().unwrap();
        assert!(message.contains("2 of 3 upload servers ready"), "{message}");
        assert!(message.contains("farm-2 (EvictionByEvictionAPI)"), "{message}");
        assert!(message.contains("allows no further eviction"), "{message}");
        // Planned work, not a fault: Degraded stays False.
        assert_eq!(condition(&st.body["status"], "Degraded")["status"], "False");
        let ev = expect_event(api).await;
        assert_eq!(ev.body["reason"], "Disrupted");
        assert_eq!(ev.body["type"], "Normal");
    })
    .await;
    result.unwrap();
}
