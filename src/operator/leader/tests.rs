use std::sync::{Arc, Mutex};

use clap::Parser;
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    election: ElectionArgs,
}

fn parse(args: &[&str]) -> Result<Election, ElectionError> {
    // The environment must not leak in: POD_NAME and POD_NAMESPACE are read from it.
    let mut all = vec!["operator"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).unwrap().election.election()
}

#[test]
fn the_defaults_are_client_gos_and_the_lease_lives_in_the_operators_namespace() {
    let e = parse(&["--lease-namespace", "ops", "--lease-identity", "op-7d9-x"]).unwrap();
    assert_eq!(
        e,
        Election::On(LeaseSettings {
            name: "bitsfarm-operator".into(),
            namespace: "ops".into(),
            identity: "op-7d9-x".into(),
            duration_seconds: 15,
            grace_seconds: 5,
        })
    );
    assert_eq!(parse(&["--no-leader-election"]).unwrap(), Election::Off);
}

#[test]
fn an_election_without_namespace_identity_or_sane_timing_is_refused_with_the_fix() {
    if std::env::var_os("POD_NAMESPACE").is_none() {
        let e = parse(&["--lease-identity", "a"]).unwrap_err();
        assert_eq!(e, ElectionError::NoNamespace);
        assert!(e.to_string().contains("--no-leader-election"));
    }
    if std::env::var_os("POD_NAME").is_none() {
        let e = parse(&["--lease-namespace", "ops"]).unwrap_err();
        assert_eq!(e, ElectionError::NoIdentity);
    }
    let base = ["--lease-namespace", "ops", "--lease-identity", "a"];
    for (d, r) in [("15", "15"), ("15", "0"), ("5", "10")] {
        let mut args = base.to_vec();
        args.extend(["--lease-duration-seconds", d, "--lease-renew-seconds", r]);
        assert!(
            matches!(parse(&args), Err(ElectionError::Timing { .. })),
            "{d}/{r}"
        );
    }
}

/// One request to the mock Lease API.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// A tiny API server holding one Lease, as the real one does for what the crate sends: get (404
/// until created), create, server-side apply and strategic merge patches of `spec` (a null
/// removes a field). A 409 Conflict answers an apply that would take a Lease another replica
/// holds, as the API server does for a field another manager owns.
async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    lease: Arc<Mutex<Option<Value>>>,
    log: Arc<Mutex<Vec<Call>>>,
) {
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().to_string();
        let uri = request.uri().clone();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let call = Call {
            method: method.clone(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or("").to_string(),
            content_type: content_type.clone(),
            body: body.clone(),
        };
        log.lock().unwrap().push(call);
        let mut stored = lease.lock().unwrap();
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "metadata": {}});
        let (status, answer) = match (method.as_str(), stored.as_mut()) {
            ("GET", Some(l)) => (200, l.clone()),
            ("GET", None) => (404, not_found),
            ("POST", _) => {
                let mut l = body.clone();
                l["metadata"]["namespace"] = json!("ops");
                l["metadata"]["resourceVersion"] = json!("1");
                *stored = Some(l.clone());
                (201, l)
            }
            ("PATCH", Some(l)) => {
                let holder = l["spec"]["holderIdentity"].as_str().map(str::to_string);
                let taking = body["spec"]["holderIdentity"].as_str();
                let conflict = content_type.starts_with("application/apply-patch")
                    && matches!((&holder, taking), (Some(h), Some(t)) if h != t);
                if conflict {
                    (
                        409,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "metadata": {}}),
                    )
                } else {
                    if let Some(spec) = body["spec"].as_object() {
                        for (k, v) in spec {
                            if v.is_null() {
                                l["spec"].as_object_mut().map(|s| s.remove(k));
                            } else {
                                if !l["spec"].is_object() {
                                    l["spec"] = json!({});
                                }
                                l["spec"][k] = v.clone();
                            }
                        }
                    }
                    (200, l.clone())
                }
            }
            _ => (404, not_found),
        };
        drop(stored);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }
}

fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: "bitsfarm-operator".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        duration_seconds: 15,
        grace_seconds: 5,
    }
}

#[tokio::test]
async fn one_replica_takes_the_lease_the_other_stands_by_and_release_frees_it() {
    let lease = Arc::new(Mutex::new(None));
    let log = Arc::new(Mutex::new(Vec::new()));
    let client = |lease: &Arc<Mutex<Option<Value>>>, log: &Arc<Mutex<Vec<Call>>>| {
        let (service, handle) = pair::<Request<Body>, Response<Body>>();
        tokio::spawn(serve(handle, lease.clone(), log.clone()));
        Client::new(service, "default")
    };
    let a = Candidate::new(client(&lease, &log), settings("operator-a"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.acquire())
        .await
        .expect("a free Lease is taken at once");
    let held = lease.lock().unwrap().clone().unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "operator-a");
    assert_eq!(held["spec"]["leaseDurationSeconds"], 15);

    // The second replica finds it held and does not take it.
    let b = Candidate::new(client(&lease, &log), settings("operator-b"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.acquire())
            .await
            .is_err(),
        "a follower took a Lease whose term runs"
    );
    assert_eq!(
        lease.lock().unwrap().as_ref().unwrap()["spec"]["holderIdentity"],
        "operator-a"
    );

    a.release().await;
    assert!(
        lease.lock().unwrap().as_ref().unwrap()["spec"]
            .get("holderIdentity")
            .is_none()
    );

    // Every request: the Lease in the operator's namespace, and only the verbs the chart grants.
    let calls = log.lock().unwrap().clone();
    for c in &calls {
        assert_eq!(
            c.path.trim_end_matches("/bitsfarm-operator"),
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
            "{c:?}"
        );
        let a = crate::operator::rbac::access(&c.method, &c.path, &c.query).unwrap();
        assert!(
            crate::operator::rbac::LEASE_RULE
                .verbs
                .contains(&a.verb.as_str()),
            "{c:?} needs {} on leases",
            a.verb
        );
    }
    let verbs: std::collections::BTreeSet<String> = calls
        .iter()
        .filter_map(|c| crate::operator::rbac::access(&c.method, &c.path, &c.query))
        .map(|a| a.verb)
        .collect();
    assert_eq!(
        verbs.into_iter().collect::<Vec<_>>(),
        crate::operator::rbac::LEASE_RULE.verbs,
        "granted lease verbs that no call needs, or the reverse"
    );
    let take = calls
        .iter()
        .find(|c| c.content_type.starts_with("application/apply-patch"))
        .expect("the Lease is taken with server-side apply");
    assert!(
        take.query
            .contains("fieldManager=kube-lease-manager-operator-a"),
        "{}",
        take.query
    );
    assert_eq!(take.body["spec"]["holderIdentity"], "operator-a");
}
