//! How setting up handoff fails: an unusable farm secret or peer list.

/// A secret shorter than this is refused: the tag and the forwarding proof are only as strong
/// as the key.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "cannot read the farm secret {path}: {source}; handoff needs the same secret file on every member"
    )]
    ReadSecret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the farm secret {path} holds {len} bytes; it needs at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    ShortSecret {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error("this member's ordinal {ordinal} has no entry in the handoff peer list of {len}")]
    SelfMissing { ordinal: u16, len: usize },
}
