//! Who a farm's members are to each other for session handoff: the `handoff:` settings that let a
//! server hand a packet to the member holding its session. Worked out here once, for the
//! operator's pods and for the local farm's processes, so that both address peers the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::HandoffSettings;

use super::{SECRETS_ROOT, SERVER_PORT, UploadFarmSpec};

/// Where the farm's handoff Secret is mounted below `SECRETS_ROOT`, and its one key.
pub const HANDOFF_SECRET_DIR: &str = "handoff";
pub const HANDOFF_SECRET_KEY: &str = "secret";

/// A member's base URL as its peers use it.
fn peer_url(scheme: &str, authority: &str) -> String {
    format!("{scheme}://{authority}")
}

/// The handoff settings of every pod of the StatefulSet `set` governed by `headless_service`. One
/// file serves every pod, whatever the farm's size: each pod takes its ordinal from its own name
/// and expands `{ordinal}` and `{namespace}` in the peers' template. Peers are addressed through
/// the headless Service (straight to the pod, ready or not, so a draining member stays
/// reachable), in the scheme the servers speak.
pub fn pods(spec: &UploadFarmSpec, set: &str, headless_service: &str) -> HandoffSettings {
    let secrets = Path::new(SECRETS_ROOT);
    let member = format!("{set}-{{ordinal}}.{headless_service}.{{namespace}}.svc:{SERVER_PORT}");
    HandoffSettings {
        secret_file: secrets.join(HANDOFF_SECRET_DIR).join(HANDOFF_SECRET_KEY),
        ordinal: None,
        peers: Vec::new(),
        peer_url_template: Some(peer_url(spec.scheme(), &member)),
        // cert-manager puts the issuing CA next to the certificate.
        ca_file: spec.tls().then(|| secrets.join("tls").join("ca.crt")),
    }
}

/// The handoff settings of member `me` of a farm whose members run on this machine, member `i`
/// listening at `members[i]`. A fixed list, not a template: the local farm does not change size,
/// and its members speak plain http.
pub fn local(members: &[SocketAddr], me: u16, secret_file: PathBuf) -> HandoffSettings {
    HandoffSettings {
        secret_file,
        ordinal: Some(me),
        peers: members
            .iter()
            .map(|a| peer_url("http", &a.to_string()))
            .collect(),
        peer_url_template: None,
        ca_file: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(v: serde_json::Value) -> UploadFarmSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_reach_each_other_through_the_headless_service() {
        let h = pods(&spec(json!({"replicas": 3})), "web", "web-headless");
        assert_eq!(
            h.peer_url_template.as_deref(),
            Some("http://web-{ordinal}.web-headless.{namespace}.svc:8080")
        );
        assert_eq!(h.ordinal, None);
        assert!(h.peers.is_empty());
        assert_eq!(
            h.secret_file,
            Path::new("/var/run/secrets/bitsfarm/handoff/secret")
        );
        assert_eq!(h.ca_file, None);
    }

    #[test]
    fn with_tls_pods_hand_off_over_https_and_trust_the_issuing_ca() {
        let h = pods(
            &spec(json!({"security": {"tlsSecretName": "web-tls"}})),
            "web",
            "web-headless",
        );
        assert_eq!(
            h.peer_url_template.as_deref(),
            Some("https://web-{ordinal}.web-headless.{namespace}.svc:8080")
        );
        assert_eq!(
            h.ca_file.as_deref(),
            Some(Path::new("/var/run/secrets/bitsfarm/tls/ca.crt"))
        );
    }

    #[test]
    fn local_members_know_their_ordinal_and_every_peer() {
        let members: Vec<SocketAddr> = ["127.0.0.1:8081", "127.0.0.1:8082", "[::1]:8083"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let h = local(&members, 1, PathBuf::from("/tmp/farm/handoff-secret"));
        assert_eq!(h.ordinal, Some(1));
        assert_eq!(
            h.peers,
            [
                "http://127.0.0.1:8081",
                "http://127.0.0.1:8082",
                "http://[::1]:8083"
            ]
        );
        assert_eq!(h.peer_url_template, None);
        assert_eq!(h.ca_file, None);
        assert_eq!(h.secret_file, Path::new("/tmp/farm/handoff-secret"));
    }
}
