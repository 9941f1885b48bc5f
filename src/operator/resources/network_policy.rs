//! The farm's optional NetworkPolicy (`spec.networkPolicy`): who may reach the servers and whom
//! they may reach. Pure: the controller applies what this builds; the sweep of leftover children
//! deletes the policy it made once the farm no longer asks for one.
//!
//! Ports are the pods' own (`SERVER_PORT`, `ADMIN_PORT`), not the Services': network policies
//! match traffic after a Service has forwarded it to a pod.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{COMPONENT_NETWORK_POLICY, Names, meta, selector_labels};
use crate::api::{ADMIN_PORT, InvalidSpec, SERVER_PORT, UploadFarm, UploadFarmSpec};

const DNS_PORT: i32 = 53;

fn port(protocol: &str, number: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        // Written out although TCP is the default: the API server stores it, and an apply that
        // leaves it out would differ from the stored object on every reconcile.
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(number)),
        ..NetworkPolicyPort::default()
    }
}

/// `None` (any address) for an empty list: an empty `from`/`to` in a NetworkPolicy rule means
/// everyone, and leaving it out says so plainly.
fn peers(list: &[NetworkPolicyPeer]) -> Option<Vec<NetworkPolicyPeer>> {
    (!list.is_empty()).then(|| list.to_vec())
}

/// The farm's own pods (in the farm's namespace).
fn members(farm: &UploadFarm) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&Names::of(farm).farm)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// The TCP ports the servers reach their backends on: `backendPorts` when given, else the port of
/// every absolute backend URL (its own, or its scheme's). Relative URLs add none: they go back to
/// the address the client used, which the spec cannot name.
pub fn backend_ports(spec: &UploadFarmSpec) -> Result<Vec<i32>, InvalidSpec> {
    let given = spec
        .network_policy
        .as_ref()
        .map(|n| n.backend_ports.as_slice())
        .unwrap_or_default();
    if !given.is_empty() {
        // The CRD's schema checks the range too; API servers that skipped it must not turn a
        // typo into a policy the API server refuses after the pods changed.
        if let Some(bad) = given.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(InvalidSpec(format!(
                "spec.networkPolicy.backendPorts has {bad}; ports are 1 to 65535"
            )));
        }
        let set: BTreeSet<i32> = given.iter().copied().collect();
        return Ok(set.into_iter().collect());
    }
    let urls = spec
        .backend
        .iter()
        .chain(spec.directories.iter().filter_map(|d| d.backend.as_ref()))
        .filter(|b| b.notification != crate::api::Notification::None)
        .filter_map(|b| b.url.as_deref());
    let mut ports = BTreeSet::new();
    for u in urls {
        // A URL that does not parse as absolute is relative (or refused by the server's own
        // checks of the configuration, which report it better).
        let Ok(url) = url::Url::parse(u) else {
            continue;
        };
        if !matches!(url.scheme(), "http" | "https") {
            continue;
        }
        if let Some(p) = url.port_or_known_default() {
            ports.insert(i32::from(p));
        }
    }
    Ok(ports.into_iter().collect())
}

/// The farm's NetworkPolicy, or `None` when the spec does not ask for one.
///
/// Ingress: the upload port from `ingressFrom` (anyone when empty) and from the farm's own pods,
/// and the admin port from `adminFrom` (nobody when empty). Egress: DNS, the farm's own pods on
/// the upload port (session handoff), and the backend ports (to `backendPeers`, any address when
/// empty). Everything else is denied in both directions.
pub fn network_policy(farm: &UploadFarm) -> Result<Option<NetworkPolicy>, InvalidSpec> {
    let Some(np) = farm.spec.network_policy.as_ref().filter(|n| n.enabled) else {
        return Ok(None);
    };
    let names = Names::of(farm);
    let upload = || vec![port("TCP", i32::from(SERVER_PORT))];

    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: peers(&np.ingress_from),
            ports: Some(upload()),
        },
        // Members hand packets to the member that holds their session: always allowed, even
        // when `ingressFrom` names only the clients.
        NetworkPolicyIngressRule {
            from: Some(vec![members(farm)]),
            ports: Some(upload()),
        },
    ];
    if !np.admin_from.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: peers(&np.admin_from),
            ports: Some(vec![port("TCP", i32::from(ADMIN_PORT))]),
        });
    }

    let mut egress = vec![
        // Any address: cluster DNS may be a node-local cache on a link-local address, which no
        // pod or namespace selector names.
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![port("UDP", DNS_PORT), port("TCP", DNS_PORT)]),
        },
        NetworkPolicyEgressRule {
            to: Some(vec![members(farm)]),
            ports: Some(upload()),
        },
    ];
    let backend = backend_ports(&farm.spec)?;
    if !backend.is_empty() {
        egress.push(NetworkPolicyEgressRule {
            to: peers(&np.backend_peers),
            ports: Some(backend.into_iter().map(|p| port("TCP", p)).collect()),
        });
    }

    Ok(Some(NetworkPolicy {
        metadata: meta(farm, names.network_policy(), COMPONENT_NETWORK_POLICY, None),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&names.farm)),
                ..LabelSelector::default()
            }),
            // Both, explicitly: with only ingress rules listed, Kubernetes would leave egress
            // open.
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::operator::resources::tests::farm_with;

    fn policy(spec: Value) -> Value {
        let f = farm_with("farm", spec);
        serde_json::to_value(network_policy(&f).unwrap().expect("a policy")).unwrap()
    }

    fn ports(rule: &Value) -> Vec<(String, i64)> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["protocol"].as_str().unwrap().to_string(),
                    p["port"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    fn tcp(p: i64) -> (String, i64) {
        ("TCP".to_string(), p)
    }

    fn members() -> Value {
        json!([{"podSelector": {"matchLabels": {
            "app.kubernetes.io/instance": "farm", "app.kubernetes.io/name": "bitsfarm"}}}])
    }

    #[test]
    fn no_policy_unless_enabled() {
        for spec in [
            json!({}),
            json!({"networkPolicy": {}}),
            json!({"networkPolicy": {"enabled": false, "ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}),
        ] {
            let f = farm_with("farm", spec.clone());
            assert_eq!(network_policy(&f).unwrap(), None, "{spec}");
        }
    }

    #[test]
    fn defaults_open_the_upload_port_to_anyone_and_close_everything_else() {
        let p = policy(json!({"networkPolicy": {"enabled": true}}));
        assert_eq!(
            (&p["apiVersion"], &p["kind"]),
            (&json!("networking.k8s.io/v1"), &json!("NetworkPolicy"))
        );
        assert_eq!(p["metadata"]["name"], "farm-network-policy");
        assert_eq!(p["metadata"]["namespace"], "uploads");
        assert_eq!(
            p["metadata"]["labels"]["app.kubernetes.io/component"],
            "network-policy"
        );
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&json!("UploadFarm"), &json!("uid-1"), &json!(true))
        );
        let spec = &p["spec"];
        assert_eq!(
            spec["podSelector"]["matchLabels"],
            members()[0]["podSelector"]["matchLabels"]
        );
        assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));

        let ingress = spec["ingress"].as_array().unwrap();
        assert_eq!(ingress.len(), 2, "{ingress:#?}");
        // Anyone may upload: no `from`.
        assert_eq!(ingress[0]["from"], Value::Null);
        assert_eq!(ports(&ingress[0]), [tcp(8080)]);
        // The members, on the upload port.
        assert_eq!(ingress[1]["from"], members());
        assert_eq!(ports(&ingress[1]), [tcp(8080)]);
        // No rule for the admin port: nobody reaches it.
        assert!(ingress.iter().all(|r| !ports(r).contains(&tcp(8081))));

        let egress = spec["egress"].as_array().unwrap();
        assert_eq!(egress.len(), 2, "no backend, no backend rule: {egress:#?}");
        assert_eq!(egress[0]["to"], Value::Null, "DNS anywhere");
        assert_eq!(
            ports(&egress[0]),
            [("UDP".to_string(), 53), ("TCP".to_string(), 53)]
        );
        assert_eq!(egress[1]["to"], members());
        assert_eq!(ports(&egress[1]), [tcp(8080)]);
    }

    #[test]
    fn members_keep_each_other_when_ingress_is_narrowed() {
        let clients = json!([{"namespaceSelector": {"matchLabels": {"team": "clients"}}},
                             {"ipBlock": {"cidr": "192.0.2.0/24"}}]);
        let prometheus = json!([{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]);
        let p = policy(json!({"networkPolicy": {
            "enabled": true, "ingressFrom": clients, "adminFrom": prometheus}}));
        let ingress = p["spec"]["ingress"].as_array().unwrap().clone();
        assert_eq!(ingress.len(), 3);
        assert_eq!(ingress[0]["from"], clients);
        assert_eq!(ports(&ingress[0]), [tcp(8080)]);
        assert_eq!(ingress[1]["from"], members());
        assert_eq!(ports(&ingress[1]), [tcp(8080)]);
        assert_eq!(ingress[2]["from"], prometheus);
        assert_eq!(ports(&ingress[2]), [tcp(8081)]);
    }

    #[test]
    fn backend_egress_follows_the_backend_urls() {
        let p = policy(json!({
            "backend": {"url": "http://receiver.uploads.svc.cluster.local:8090/in", "notification": "ByValue"},
            "directories": [
                {"path": "/a", "backend": {"url": "https://ingest.example.com/a", "notification": "ByReference"}},
                {"path": "/b", "backend": {"url": "http://plain.example.com/b", "notification": "ByValue"}},
                // Relative: back to the client's address, no port to derive.
                {"path": "/c", "backend": {"url": "/ingest", "notification": "ByValue"}},
                // Not notified: no egress for it.
                {"path": "/d", "backend": {"url": "http://unused.example.com:9999/", "notification": "None"}},
                {"path": "/e"},
            ],
            "networkPolicy": {"enabled": true},
        }));
        let egress = p["spec"]["egress"].as_array().unwrap();
        assert_eq!(egress.len(), 3);
        assert_eq!(egress[2]["to"], Value::Null, "no backendPeers: any address");
        assert_eq!(ports(&egress[2]), [tcp(80), tcp(443), tcp(8090)]);

        let receiver = json!([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bitsfarm-receiver"}}}]);
        let p = policy(json!({
            "backend": {"url": "http://receiver:8090/in", "notification": "ByValue"},
            "networkPolicy": {"enabled": true, "backendPeers": receiver, "backendPorts": [9000, 8090, 9000]},
        }));
        let egress = p["spec"]["egress"].as_array().unwrap();
        assert_eq!(egress[2]["to"], receiver);
        assert_eq!(
            ports(&egress[2]),
            [tcp(8090), tcp(9000)],
            "backendPorts replace the URLs' ports, sorted and once each"
        );
    }

    #[test]
    fn ports_out_of_range_are_an_invalid_spec() {
        let f = farm_with(
            "farm",
            json!({"networkPolicy": {"enabled": true, "backendPorts": [443, 70000]}}),
        );
        let e = network_policy(&f).unwrap_err();
        assert!(e.0.contains("backendPorts") && e.0.contains("70000"), "{e}");
    }
}
