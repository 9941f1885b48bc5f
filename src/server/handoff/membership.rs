//! Membership: this member's ordinal, where its peers answer, and which member a minted session
//! id routes to.

use url::Url;

use super::error::HandoffError;
use super::key::FarmKey;
use crate::bits::protocol::SessionId;

pub use crate::config::Peers;

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
