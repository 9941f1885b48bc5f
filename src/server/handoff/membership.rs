//! Membership: this member's ordinal, where its peers answer, and which member a minted session
//! id routes to.

use url::Url;

use super::error::HandoffError;
use super::key::FarmKey;
use crate::bits::protocol::SessionId;

/// Where each member of the farm answers, by ordinal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// One base URL per ordinal (the local farm: one port each).
    List(Vec<Url>),
    /// A URL with `{ordinal}` (Kubernetes: each pod's own Service), for a farm whose size changes.
    Template(String),
}

impl Peers {
    pub fn list(urls: &[String]) -> Result<Self, HandoffError> {
        urls.iter()
            .map(|u| base_url(u).ok_or_else(|| HandoffError::BadPeer(u.clone())))
            .collect::<Result<Vec<_>, _>>()
            .map(Peers::List)
    }

    pub fn template(t: &str) -> Result<Self, HandoffError> {
        if !t.contains("{ordinal}") || base_url(&t.replace("{ordinal}", "0")).is_none() {
            return Err(HandoffError::BadTemplate(t.to_string()));
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

/// This member's place in the farm: who it is, where the others are, and the shared key.
#[derive(Debug, Clone)]
pub struct Membership {
    pub ordinal: u16,
    pub peers: Peers,
    pub key: FarmKey,
}

impl Membership {
    pub fn new(ordinal: u16, peers: Peers, key: FarmKey) -> Result<Self, HandoffError> {
        if let Peers::List(l) = &peers
            && usize::from(ordinal) >= l.len()
        {
            return Err(HandoffError::SelfMissing {
                ordinal,
                len: l.len(),
            });
        }
        Ok(Membership {
            ordinal,
            peers,
            key,
        })
    }

    /// Where to send a packet for `id`: `None` when this member answers it itself (its own
    /// session, or an id that names no member of this farm).
    pub fn route(&self, id: &SessionId) -> Option<(u16, Url)> {
        let owner = self.key.owner(id)?;
        if owner == self.ordinal {
            return None;
        }
        // An owner beyond the list is a member that no longer exists: the forwarder answers
        // "session not found" for it.
        Some((owner, self.peers.address(owner)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> FarmKey {
        FarmKey::new(&[b; 32])
    }

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
    fn a_member_routes_other_members_sessions_and_keeps_its_own() {
        let peers =
            Peers::list(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()]).unwrap();
        let m = Membership::new(0, peers.clone(), key(1)).unwrap();
        assert_eq!(m.route(&m.key.mint(0)), None);
        assert_eq!(m.route(&m.key.mint(1)).map(|(o, _)| o), Some(1));
        // A member that is not in the farm any more: nowhere to send it.
        assert_eq!(m.route(&m.key.mint(5)), None);
        assert_eq!(m.route(&SessionId::generate()), None);
        assert!(Membership::new(2, peers, key(1)).is_err());
    }
}
