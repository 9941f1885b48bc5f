//! `ServerConfig`: everything one `bitsfarm serve` process needs, built from flags, a YAML file, or
//! an UploadFarm spec (`api::server_config`). Flags win over the file; directories in the file
//! inherit the file's top-level keys, the way IIS virtual directories inherit BITS properties.
//!
//! - `file`: the keys, each declared once: the YAML file (`ConfigFile`, `DirectoryKeys`,
//!   `HandoffSettings`) and the flags (`ServeArgs`), which are the same keys.
//! - `resolve`: keys -> `ServerConfig`: precedence, inheritance, defaults, validation, and what
//!   comes from the environment (host-id templates, a farm member's ordinal).
//! - `handoff`: a farm member's place: its ordinal and its peers' addresses.
//! - `addr`: listen addresses as people write them (a host name is resolved).

mod addr;
mod file;
mod handoff;
mod resolve;

pub use addr::parse_listen_addr;
pub use file::{ConfigError, ConfigFile, DirectoryKeys, HandoffSettings, NotifyType, ServeArgs};
pub use handoff::{HandoffConfig, PeerError, Peers};
pub use resolve::{
    DEFAULT_DATA_DIR, DEFAULT_FALLBACK_TIMEOUT_SECS, DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_MEMORY, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_USER, DEFAULT_MIN_BODY_RATE, DEFAULT_NOTIFY_TIMEOUT_SECS,
    DEFAULT_READ_TIMEOUT_SECS, DEFAULT_SESSION_TIMEOUT_SECS, MIN_BODY_MEMORY, SecurityConfig,
    ServerConfig, UploadDirConfig, expand_host_id,
};
