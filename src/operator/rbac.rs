//! The Kubernetes API access the operator needs, kept next to the code that makes the calls.
//!
//! `RULES` is the least-privilege rule set: one entry per resource, with the verbs of every call
//! the operator makes (in `super::run`, `super::controller`, `super::apply` and kube's event
//! `Recorder`) and why.
//! Two tests hold it to the truth:
//! - the unit test below drives reconcile (create, scale-down, invalid and malformed farms,
//!   repeated events, a NetworkPolicy applied and one swept away), the startup wait for the CRD and the watches against a recording mock API
//!   server, maps every request to its RBAC attributes as the API server does, and checks that
//!   the calls need exactly `RULES`: every call granted, no verb granted that no call needs;
//! - `tests/chart.rs` checks that the Helm chart's (Cluster)Role grants exactly `RULES`.
//!
//! When a change makes a new call, the unit test names the missing rule; add it here and in
//! `charts/bitsfarm-operator/templates/_helpers.tpl` (`bitsfarm-operator.rules`).
//!
//! Not in the table because every authenticated client may already make them: `GET /version`
//! (`Client::apiserver_version`, granted by `system:public-info-viewer`) and API discovery
//! (`system:discovery`). All resources are namespaced, so the same rules work as a ClusterRole
//! (all namespaces) and as a Role (`--namespace`).
//!
//! Owner references: kube's `controller_owner_ref` sets `controller: true` but not
//! `blockOwnerDeletion`, so `uploadfarms/finalizers: update` is not needed (the test adds it to
//! the needs as soon as an applied child blocks its owner's deletion). On clusters that enable
//! the OwnerReferencesPermissionEnforcement admission plugin (OpenShift does), *changing* the
//! owner references of an existing object also needs `delete` on it; the operator only sets them
//! when it creates a child, so this arises only when an UploadFarm is recreated under the same name
//! before garbage collection removed the old children: the apply then fails with a clear
//! Forbidden error in the farm's status until they are gone.

/// One RBAC rule: `verbs` on `resource` (`resource/subresource`) of `api_group` ("" = core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    /// Sorted, as `kubectl` and the chart write them.
    pub verbs: &'static [&'static str],
    pub why: &'static str,
}

/// Every rule the operator needs, and nothing more.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "bitsfarm.io",
        resource: "uploadfarms",
        verbs: &["list", "watch"],
        why: "the controller's primary watch (list, then watch); the startup wait for the CRD \
              lists UploadFarms too. UploadFarms are never read one by one, created or changed",
    },
    Rule {
        api_group: "bitsfarm.io",
        resource: "uploadfarms/status",
        verbs: &["patch"],
        why: "the status (observedGeneration, replicas, hosts, conditions) is written with \
              server-side apply on the status subresource",
    },
    Rule {
        api_group: "apps",
        resource: "statefulsets",
        verbs: &["create", "get", "list", "patch", "watch"],
        why: "server-side apply of the farm's StatefulSet (a PATCH, which also needs create while \
              the object does not exist), the owns-watch, and a get of its live replica count when \
              the status hints at a scale-down; removal is left to garbage collection",
    },
    Rule {
        api_group: "",
        resource: "services",
        verbs: &["create", "delete", "list", "patch", "watch"],
        why: "server-side apply of the headless, per-pod and shared Services, the owns-watch, and \
              the sweep: the list of a farm's Services by its labels and delete of those it owns \
              and no longer asks for (the per-pod Services of ordinals a scale-down removed)",
    },
    Rule {
        api_group: "",
        resource: "configmaps",
        verbs: &["create", "list", "patch", "watch"],
        why: "server-side apply of the farm's ConfigMap (the servers' config.yaml) and the owns-watch",
    },
    Rule {
        api_group: "",
        resource: "secrets",
        verbs: &["create"],
        why: "the farm's handoff secret (the key its servers share to hand sessions to each other) \
              is created when missing (an existing one answers 409 and is kept); the operator never \
              reads, lists, watches or rewrites a Secret (those spec.security names are only mounted)",
    },
    Rule {
        api_group: "",
        resource: "pods/proxy",
        verbs: &["create"],
        why: "a scale-down asks each server it removes to drain (POST /drain on its admin port) \
              through the API server's pod proxy, and reads the sessions it has left from the answer",
    },
    Rule {
        api_group: "",
        resource: "pods",
        verbs: &["list"],
        why: "a farm's pods are listed, read only, to report each host's readiness and failing pods \
              (CrashLoopBackOff, ImagePullBackOff) in the status",
    },
    Rule {
        api_group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["create", "delete", "list", "patch", "watch"],
        why: "server-side apply of a farm's NetworkPolicy when spec.networkPolicy.enabled, the \
              owns-watch that puts back one edited or deleted by hand, and the sweep: the list by \
              the farm's labels and, once a farm no longer asks for it, delete of the one it owns",
    },
    Rule {
        api_group: "policy",
        resource: "poddisruptionbudgets",
        verbs: &["create", "delete", "list", "patch", "watch"],
        why: "server-side apply of a farm's PodDisruptionBudget (farms of two servers or more), \
              the owns-watch that puts back one edited or deleted by hand, and the sweep: the list \
              by the farm's labels and delete of the one it owns once the farm shrinks to one \
              server or turns spec.disruptionBudget off",
    },
    Rule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "events on UploadFarms (Created, Scaled, ConfigRolledOut, InvalidSpec, ApplyFailed): \
              created, then patched when the same event repeats (an event series, kube's Recorder)",
    },
];

/// Leader election's one rule, granted by a Role in the operator's own namespace (the Lease is
/// there, whatever namespaces the operator watches): what kube-lease-manager sends, as
/// `leader::tests` records it against a mock API server.
pub const LEASE_RULE: Rule = Rule {
    api_group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["create", "get", "patch"],
    why: "leader election: the Lease is read, created when missing, taken and renewed with \
          server-side apply and released with a merge patch; never updated, listed or watched",
};

/// Whether `RULES` let the operator make `verb` on `resource` of `api_group`.
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|r| r.api_group == api_group && r.resource == resource && r.verbs.contains(&verb))
}

/// The RBAC attributes of one API request, as the API server's request-info resolver computes
/// them: the group, the resource (with `/subresource`), the verb and the namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    pub api_group: String,
    pub resource: String,
    pub verb: String,
    pub namespace: Option<String>,
}

/// Maps a request to its RBAC attributes; None for non-resource URLs (`/version`, discovery).
pub fn access(method: &str, path: &str, query: &str) -> Option<Access> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_string(), rest),
        _ => return None,
    };
    let (api_group, rest) = rest;
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        // The proxy subresource carries the path it proxies after it.
        [resource, name, "proxy", ..] => (*resource, Some(*name), Some("proxy")),
        _ => return None,
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(Access {
        api_group,
        resource: match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        },
        verb: verb.to_string(),
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::StreamExt;
    use http::{Request, Response};
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::Api;
    use kube::client::Body;
    use kube::core::error_boundary::DeserializeGuard;
    use kube::runtime::watcher;
    use kube::{Client, Resource};
    use serde_json::{Value, json};
    use tower_test::mock::{Handle, pair};

    use super::*;
    use crate::api::UploadFarm;
    use crate::operator::controller::{Context, reconcile};
    use crate::operator::metrics::Metrics;
    use crate::operator::resources::{self, BuildOptions};

    const NS: &str = "uploads";

    /// One request the mock API server answered.
    #[derive(Debug, Clone)]
    struct Call {
        method: String,
        path: String,
        query: String,
        content_type: String,
        body: Value,
    }

    type Log = Arc<Mutex<Vec<Call>>>;

    fn farm_json(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "bitsfarm.io/v1alpha1",
            "kind": "UploadFarm",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": spec,
        })
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
    }

    /// Answers every request plausibly and records it: applies are echoed, status writes answer
    /// the whole farm, the sweep's lists answer with the first farm's per-pod Services of
    /// ordinals 0..4 (so that farm at 2 replicas deletes two) and its NetworkPolicy, other lists
    /// are empty and watches end at once.
    async fn serve(mut handle: Handle<Request<Body>, Response<Body>>, log: Log, farms: Vec<Value>) {
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
            let path = uri.path().to_string();
            let query = uri.query().unwrap_or("").to_string();
            log.lock().unwrap().push(Call {
                method: method.clone(),
                path: path.clone(),
                query: query.clone(),
                content_type,
                body: body.clone(),
            });
            let (status, answer): (u16, Option<Value>) = match method.as_str() {
                "PATCH" if path.ends_with("/status") => {
                    let name = path.rsplit('/').nth(1).unwrap_or_default();
                    let mut whole = farms
                        .iter()
                        .find(|f| f["metadata"]["name"] == name)
                        .cloned()
                        .unwrap_or_else(|| farm_json(name, json!({})));
                    whole["status"] = body["status"].clone();
                    (200, Some(whole))
                }
                "PATCH" => (200, Some(body)),
                "POST" => (201, Some(body)),
                "DELETE" => (
                    200,
                    Some(
                        json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}),
                    ),
                ),
                "GET" if query.contains("watch=") => (200, None),
                "GET" if path.contains("/statefulsets/") => (
                    200,
                    Some(
                        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "farm", "namespace": NS}, "spec": {"replicas": 4, "serviceName": "farm-headless", "selector": {}, "template": {}}}),
                    ),
                ),
                // The farm once had a NetworkPolicy: the sweep finds it and deletes it.
                "GET" if path.ends_with("/networkpolicies") && !query.contains("watch=") => {
                    let mut f: UploadFarm = serde_json::from_value(farms[0].clone()).unwrap();
                    f.spec.network_policy = Some(crate::api::FarmNetworkPolicy {
                        enabled: true,
                        ..Default::default()
                    });
                    let policy = resources::network_policy(&f).unwrap();
                    (200, Some(list(vec![serde_json::to_value(policy).unwrap()])))
                }
                // Every farm once had two servers: a farm of one deletes its budget.
                "GET" if path.ends_with("/poddisruptionbudgets") && !query.contains("watch=") => {
                    let name = farms
                        .iter()
                        .filter_map(|f| f["metadata"]["name"].as_str())
                        .find(|n| query.contains(&format!("instance%3D{n}")))
                        .unwrap_or("farm");
                    let f: UploadFarm = serde_json::from_value(farm_json(name, json!({}))).unwrap();
                    let budget = resources::disruption_budget(&f, 2).unwrap();
                    (200, Some(list(vec![serde_json::to_value(budget).unwrap()])))
                }
                "GET" if path.ends_with("/services") && query.contains("managed-by") => {
                    let f: UploadFarm = serde_json::from_value(farms[0].clone()).unwrap();
                    let items = (0..4)
                        .map(|i| serde_json::to_value(resources::host_service(&f, i)).unwrap())
                        .collect();
                    (200, Some(list(items)))
                }
                _ => (200, Some(list(vec![]))),
            };
            let body = match answer {
                Some(v) => Body::from(serde_json::to_vec(&v).unwrap()),
                None => Body::empty(),
            };
            send.send_response(Response::builder().status(status).body(body).unwrap());
        }
    }

    /// Runs everything the operator does against the recording mock and returns the calls.
    async fn record_every_call() -> Vec<Call> {
        let valid = farm_json("farm", json!({"replicas": 2}));
        let guarded = farm_json(
            "guarded",
            json!({"replicas": 1, "networkPolicy": {"enabled": true}}),
        );
        // No URL for a by-value backend: the spec is refused without applying anything.
        let invalid = farm_json("broken", json!({"backend": {"notification": "ByValue"}}));
        let (service, handle) = pair::<Request<Body>, Response<Body>>();
        let log: Log = Arc::default();
        let server = tokio::spawn(serve(
            handle,
            log.clone(),
            vec![valid.clone(), invalid.clone(), guarded.clone()],
        ));
        let client = Client::new(service, "default");
        let ctx = Arc::new(Context::new(
            client.clone(),
            BuildOptions::default(),
            Arc::new(Metrics::default()),
        ));
        let guard = |v: &Value| {
            Arc::new(serde_json::from_value::<DeserializeGuard<UploadFarm>>(v.clone()).unwrap())
        };

        // Reconcile: create (applies, the sweep of the per-pod Services a scale-down left and of a
        // NetworkPolicy the farm no longer asks for, pods, status, an event).
        reconcile(guard(&valid), ctx.clone()).await.unwrap();
        // A farm with a NetworkPolicy: applied.
        reconcile(guard(&guarded), ctx.clone()).await.unwrap();
        // A scale-down from 4 to 2: the servers leaving are drained through the pod proxy.
        let mut shrinking = valid.clone();
        shrinking["status"] = json!({"replicas": 4});
        reconcile(guard(&shrinking), ctx.clone()).await.unwrap();
        // An invalid spec, twice: the second, identical event is patched as a series.
        for _ in 0..2 {
            reconcile(guard(&invalid), ctx.clone()).await.unwrap();
        }
        // A farm that does not even deserialize.
        let malformed = farm_json("malformed", json!({"replicas": "many"}));
        let g = guard(&malformed);
        assert!(g.0.is_err());
        reconcile(g, ctx.clone()).await.unwrap();

        // The startup wait for the CRD, watching all namespaces and one.
        let metrics = Metrics::default();
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for ns in [None, Some(NS.to_string())] {
            assert!(super::super::wait_for_crd(&client, &ns, &metrics, stop_rx.clone()).await);
        }

        // The controller's watches (`super::run`): UploadFarms and the four owned kinds, in all
        // namespaces and in one.
        watch_until_watching::<DeserializeGuard<UploadFarm>>(&client, &log).await;
        watch_until_watching::<StatefulSet>(&client, &log).await;
        watch_until_watching::<Service>(&client, &log).await;
        watch_until_watching::<ConfigMap>(&client, &log).await;
        watch_until_watching::<NetworkPolicy>(&client, &log).await;
        watch_until_watching::<PodDisruptionBudget>(&client, &log).await;

        drop(ctx);
        drop(client);
        server.abort();
        log.lock().unwrap().clone()
    }

    /// Polls a watcher of `K` (all namespaces, then one) until it has sent its watch request.
    async fn watch_until_watching<K>(client: &Client, log: &Log)
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
        K::DynamicType: Default,
    {
        let apis: [Api<K>; 2] = [
            Api::all(client.clone()),
            Api::namespaced(client.clone(), NS),
        ];
        for api in apis {
            let path = api.resource_url().to_string();
            let watching = || {
                log.lock()
                    .unwrap()
                    .iter()
                    .any(|c| c.path == path && c.query.contains("watch=true"))
            };
            let mut stream = watcher(api, watcher::Config::default().any_semantic()).boxed();
            for _ in 0..20 {
                if watching() {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
            }
            assert!(
                watching(),
                "the watcher of {path} never sent a watch request"
            );
        }
    }

    /// What the recorded calls need, as (group, resource, verb).
    fn needed(calls: &[Call]) -> BTreeSet<(String, String, String)> {
        let mut need = BTreeSet::new();
        for c in calls {
            let a = access(&c.method, &c.path, &c.query).unwrap_or_else(|| {
                panic!(
                    "not a resource request: {} {}?{}",
                    c.method, c.path, c.query
                )
            });
            let key = |verb: &str| (a.api_group.clone(), a.resource.clone(), verb.to_string());
            need.insert(key(&a.verb));
            // A server-side apply creates the object when it does not exist yet, and the API
            // server then checks create as well.
            if c.content_type.starts_with("application/apply-patch") && !a.resource.contains('/') {
                need.insert(key("create"));
            }
            let blocks_owner_deletion = c.body["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| {
                    refs.iter().any(|r| {
                        r["kind"] == "UploadFarm" && r["blockOwnerDeletion"] == Value::Bool(true)
                    })
                });
            if blocks_owner_deletion {
                need.insert((
                    "bitsfarm.io".into(),
                    "uploadfarms/finalizers".into(),
                    "update".into(),
                ));
            }
        }
        need
    }

    fn granted() -> BTreeSet<(String, String, String)> {
        RULES
            .iter()
            .flat_map(|r| {
                r.verbs.iter().map(|v| {
                    (
                        r.api_group.to_string(),
                        r.resource.to_string(),
                        v.to_string(),
                    )
                })
            })
            .collect()
    }

    #[tokio::test]
    async fn the_rules_grant_every_call_the_operator_makes_and_nothing_more() {
        let calls = tokio::time::timeout(Duration::from_secs(60), record_every_call())
            .await
            .expect("the recorded run timed out");
        let need = needed(&calls);
        let granted = granted();
        let missing: Vec<_> = need.difference(&granted).collect();
        let unused: Vec<_> = granted.difference(&need).collect();
        assert!(
            missing.is_empty(),
            "calls the rules do not grant (add them to RULES and the chart): {missing:?}"
        );
        assert!(
            unused.is_empty(),
            "verbs granted that no call needs (remove them from RULES and the chart): {unused:?}"
        );
        // The run did what it claims to: scale-down deletes, an event series, a status write.
        let seen = |m: &str, p: &str| calls.iter().any(|c| c.method == m && c.path.contains(p));
        assert!(seen("DELETE", "/services/farm-2") && seen("DELETE", "/services/farm-3"));
        assert!(seen("PATCH", "/networkpolicies/guarded-network-policy"));
        assert!(seen("DELETE", "/networkpolicies/farm-network-policy"));
        assert!(seen("PATCH", "/poddisruptionbudgets/farm"));
        assert!(seen("DELETE", "/poddisruptionbudgets/guarded"));
        assert!(seen("PATCH", "/events/") && seen("POST", "/events"));
        assert!(seen("PATCH", "/uploadfarms/farm/status"));
    }

    #[test]
    fn rules_are_sorted_unique_and_explained() {
        let mut keys = BTreeSet::new();
        for r in RULES {
            assert!(keys.insert((r.api_group, r.resource)), "{r:?} listed twice");
            let mut sorted = r.verbs.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted, r.verbs,
                "verbs of {} not sorted and unique",
                r.resource
            );
            assert!(r.why.len() > 20, "{} needs a reason", r.resource);
            assert!(!r.verbs.contains(&"*") && r.resource != "*");
        }
        assert!(allows("", "services", "delete"));
        assert!(!allows("", "pods", "delete"));
    }

    #[test]
    fn requests_map_to_rbac_attributes() {
        let a = |m, p, q| access(m, p, q).map(|a| (a.api_group, a.resource, a.verb, a.namespace));
        let s = |x: &str| x.to_string();
        assert_eq!(
            a(
                "GET",
                "/apis/bitsfarm.io/v1alpha1/uploadfarms",
                "watch=true&resourceVersion=1"
            ),
            Some((s("bitsfarm.io"), s("uploadfarms"), s("watch"), None))
        );
        assert_eq!(
            a(
                "PATCH",
                "/apis/bitsfarm.io/v1alpha1/namespaces/u/uploadfarms/f/status",
                "fieldManager=x"
            ),
            Some((
                s("bitsfarm.io"),
                s("uploadfarms/status"),
                s("patch"),
                Some(s("u"))
            ))
        );
        assert_eq!(
            a(
                "GET",
                "/api/v1/namespaces/u/services",
                "labelSelector=a%3Db"
            ),
            Some((s(""), s("services"), s("list"), Some(s("u"))))
        );
        assert_eq!(
            a("GET", "/api/v1/namespaces/u", ""),
            Some((s(""), s("namespaces"), s("get"), None))
        );
        assert_eq!(
            a("DELETE", "/api/v1/namespaces/u/services/f-3", ""),
            Some((s(""), s("services"), s("delete"), Some(s("u"))))
        );
        assert_eq!(a("GET", "/version", ""), None);
        assert_eq!(a("GET", "/apis", ""), None);
    }
}
