//! A farm member's place for session handoff: its ordinal, and where every member answers.
//! `server::handoff` routes packets with these; the secret is read when the server starts.

use std::path::PathBuf;

use url::Url;

use super::file::{ConfigError, HandoffSettings};

/// A peer address or template that cannot name a member's base URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("handoff peer address {0:?} is not an http(s) URL with a host and no path")]
    BadPeer(String),
    #[error(
        "handoff peer template {0:?} must contain {{ordinal}} and expand to an http(s) URL with a host and no path"
    )]
    BadTemplate(String),
}

/// Where each member of the farm answers, by ordinal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// One base URL per ordinal (the local farm: one port each).
    List(Vec<Url>),
    /// A URL with `{ordinal}` (Kubernetes: each pod's own Service), for a farm whose size changes.
    Template(String),
}

impl Peers {
    pub fn list(urls: &[String]) -> Result<Self, PeerError> {
        urls.iter()
            .map(|u| base_url(u).ok_or_else(|| PeerError::BadPeer(u.clone())))
            .collect::<Result<Vec<_>, _>>()
            .map(Peers::List)
    }

    pub fn template(t: &str) -> Result<Self, PeerError> {
        if !t.contains("{ordinal}") || base_url(&t.replace("{ordinal}", "0")).is_none() {
            return Err(PeerError::BadTemplate(t.to_string()));
        }
        Ok(Peers::Template(t.to_string()))
    }

    /// The base URL of member `ordinal`, if the farm has such a member.
    pub fn address(&self, ordinal: u16) -> Option<Url> {
        match self {
            Peers::List(l) => l.get(usize::from(ordinal)).cloned(),
            Peers::Template(t) => base_url(&t.replace("{ordinal}", &ordinal.to_string())),
        }
    }
}

/// An `http(s)://host[:port]` URL with no path beyond `/`, no query and no credentials.
fn base_url(s: &str) -> Option<Url> {
    let u = Url::parse(s).ok()?;
    let ok = matches!(u.scheme(), "http" | "https")
        && u.host_str().is_some_and(|h| !h.is_empty())
        && (u.path() == "/" || u.path().is_empty())
        && u.query().is_none()
        && u.fragment().is_none()
        && u.username().is_empty()
        && u.password().is_none();
    ok.then_some(u)
}

/// The resolved `handoff:` settings; the secret itself is read when the server starts.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffConfig {
    pub secret_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub ordinal: u16,
    pub peers: Peers,
}

impl HandoffSettings {
    /// Checks the settings, taking what they leave out from the pod's environment `env`
    /// (`POD_NAME`, `POD_NAMESPACE`).
    pub(super) fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<HandoffConfig, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("handoff: {m}"));
        let ordinal = match self.ordinal {
            Some(o) => o,
            None => {
                let pod = env("POD_NAME").filter(|p| !p.is_empty()).ok_or_else(|| {
                    invalid("set ordinal, or POD_NAME to a name ending in -<number>".into())
                })?;
                pod_ordinal(&pod)
                    .and_then(|n| n.parse::<u16>().ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "POD_NAME {pod:?} does not end in -<number> (0 to 65535); set ordinal"
                        ))
                    })?
            }
        };
        let peers = match (&self.peers[..], &self.peer_url_template) {
            ([], Some(t)) => {
                let mut t = t.clone();
                if t.contains("{namespace}") {
                    let ns = env("POD_NAMESPACE")
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| {
                            invalid(
                                "peer-url-template uses {namespace} but POD_NAMESPACE is not set"
                                    .into(),
                            )
                        })?;
                    t = t.replace("{namespace}", &ns);
                }
                Peers::template(&t).map_err(|e| invalid(e.to_string()))?
            }
            ([_, ..], None) => Peers::list(&self.peers).map_err(|e| invalid(e.to_string()))?,
            ([], None) => return Err(invalid("give peers or peer-url-template".into())),
            ([_, ..], Some(_)) => {
                return Err(invalid("give peers or peer-url-template, not both".into()));
            }
        };
        if let Peers::List(l) = &peers
            && usize::from(ordinal) >= l.len()
        {
            return Err(invalid(format!(
                "ordinal {ordinal} has no entry in peers (it lists {})",
                l.len()
            )));
        }
        Ok(HandoffConfig {
            secret_file: self.secret_file.clone(),
            ca_file: self.ca_file.clone(),
            ordinal,
            peers,
        })
    }
}

/// The number after a StatefulSet pod name's last `-`.
pub(super) fn pod_ordinal(pod: &str) -> Option<&str> {
    pod.rsplit_once('-')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_come_from_a_list_or_a_template() {
        let l = Peers::list(&[
            "http://127.0.0.1:8081".into(),
            "http://127.0.0.1:8082/".into(),
        ])
        .unwrap();
        assert_eq!(
            l.address(1).map(|u| u.to_string()),
            Some("http://127.0.0.1:8082/".into())
        );
        assert_eq!(l.address(2), None);
        let t = Peers::template("https://web-{ordinal}.ns.svc:443").unwrap();
        assert_eq!(
            t.address(12).map(|u| u.to_string()),
            Some("https://web-12.ns.svc/".into())
        );
        for bad in ["http://x/path", "ftp://x", "not a url", "http://u:p@x"] {
            assert!(Peers::list(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(Peers::template("http://web.ns.svc").is_err());
    }

    #[test]
    fn a_pods_ordinal_is_the_number_after_its_last_dash() {
        assert_eq!(pod_ordinal("web-3"), Some("3"));
        assert_eq!(pod_ordinal("my-web-12"), Some("12"));
        for none in ["web", "web-", "web-x1", "-"] {
            assert_eq!(pod_ordinal(none), None, "{none}");
        }
    }

    #[test]
    fn handoff_settings_name_the_member_and_its_peers() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("web-3".to_string()),
            "POD_NAMESPACE" => Some("uploads".to_string()),
            _ => None,
        };
        let t = HandoffSettings {
            secret_file: "/s".into(),
            peer_url_template: Some("http://web-{ordinal}.{namespace}.svc:8080".into()),
            ..Default::default()
        };
        let c = t.resolve(env).unwrap();
        assert_eq!(c.ordinal, 3);
        assert_eq!(
            c.peers.address(5).map(|u| u.to_string()),
            Some("http://web-5.uploads.svc:8080/".into())
        );
        let l = HandoffSettings {
            secret_file: "/s".into(),
            ordinal: Some(1),
            peers: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            ..Default::default()
        };
        assert!(matches!(l.resolve(|_| None).unwrap().peers, Peers::List(v) if v.len() == 2));
        let bad = [
            HandoffSettings {
                ordinal: Some(2),
                ..l.clone()
            },
            HandoffSettings {
                peer_url_template: t.peer_url_template.clone(),
                ..l.clone()
            },
            HandoffSettings {
                peers: vec![],
                ..l.clone()
            },
            HandoffSettings {
                peer_url_template: Some("http://web.svc".into()),
                ..t.clone()
            },
            HandoffSettings {
                peers: vec!["http://x/path".into()],
                ..l.clone()
            },
        ];
        for b in bad {
            assert!(b.resolve(env).is_err(), "{b:?}");
        }
        // Without an ordinal, the pod's name must give one.
        assert!(t.resolve(|_| None).is_err());
        assert!(
            t.resolve(|k| (k == "POD_NAME").then(|| "web".into()))
                .is_err()
        );
    }
}
