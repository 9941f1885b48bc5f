//! `ServerConfig`: everything one `bitsfarm serve` process needs, built from flags, a YAML file, or
//! (later) an UploadFarm spec. Flags win over the file; directories in the file inherit the file's
//! top-level keys, the way IIS virtual directories inherit BITS properties.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bits::paths::UploadPrefix;
use crate::bits::protocol::MAX_HOST_ID_LEN;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./bitsfarm-data";
pub const DEFAULT_FALLBACK_TIMEOUT_SECS: u64 = 86_400;
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 1_209_600;
pub const DEFAULT_NOTIFY_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How a finished upload reaches the server application (BITSServerNotificationType).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyType {
    /// No notification: the file is committed to its destination at Close-Session.
    #[default]
    None,
    /// POST the path of the stored upload (shared volume).
    ByReference,
    /// POST the file itself as the request body.
    ByValue,
}

/// The `bitsfarm serve` flags. Every flag is optional so that a value given in `--config` is only
/// overridden by a flag that was actually given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// YAML file with the same keys as these flags, plus `directories:` for several upload directories.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Separate address for /healthz, /readyz and /metrics (by default they share --listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Also accept uploads on this address, shared with the other members of a local farm
    /// (SO_REUSEPORT: the kernel spreads connections among them, as a Service does).
    #[arg(long, value_name = "ADDR")]
    pub shared_listen: Option<SocketAddr>,
    /// Folder uploads land in; session state lives in its BITS-Sessions folder [default: ./bitsfarm-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL path of the upload directory (IIS: the virtual directory) [default: /].
    #[arg(long, value_name = "PREFIX")]
    pub upload_path: Option<String>,
    /// This server's own address, returned as BITS-Host-Id (BITSHostId) [default: none].
    #[arg(long, env = "BITSFARM_HOST_ID", value_name = "VALUE")]
    pub host_id: Option<String>,
    /// Seconds a client keeps to the host id after an error before falling back [default: 86400].
    #[arg(long, value_name = "SECS")]
    pub host_id_fallback_timeout: Option<u64>,
    /// Largest upload accepted, in bytes (BITSMaximumUploadSize) [default: unlimited].
    #[arg(long, value_name = "BYTES")]
    pub max_upload_size: Option<u64>,
    /// Seconds without progress after which a session and its data are removed [default: 1209600].
    #[arg(long, value_name = "SECS")]
    pub session_timeout: Option<u64>,
    /// Let an upload replace an existing file (BITSAllowOverwrites).
    #[arg(long)]
    pub allow_overwrites: bool,
    /// How a finished upload reaches the server application [default: none].
    #[arg(long, value_enum, value_name = "TYPE")]
    pub notify_type: Option<NotifyType>,
    /// URL of the server application; relative URLs are resolved against the upload URL.
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// Seconds to wait for the server application's answer [default: 300].
    #[arg(long, value_name = "SECS")]
    pub notify_timeout: Option<u64>,
    /// Serve completed files with GET and HEAD (Range supported). Off: this is an upload server.
    #[arg(long)]
    pub allow_downloads: bool,
    /// Seconds a client may take to send a request's headers or the next piece of a body [default: 60].
    #[arg(long, value_name = "SECS")]
    pub read_timeout: Option<u64>,
    /// Seconds between sweeps that remove expired sessions [default: session timeout / 10, 1 to 3600].
    #[arg(long, value_name = "SECS")]
    pub cleanup_interval: Option<u64>,
    /// Trades crash safety for speed: Acks are sent before the bytes and session state are flushed
    /// to disk (no fdatasync/fsync), so a power loss or kernel crash can lose acknowledged
    /// fragments. Only for benchmarks, or data you can upload again.
    #[arg(long)]
    pub unsafe_no_sync: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Authentication, TLS, backend credentials and resource limits (`bitsfarm serve` flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// HTTP Basic users: one `user:$argon2id$...` per line (`bitsfarm passwd USER` prints one).
    /// Re-read when it changes. Without this and --tokens-file, uploads need no credentials.
    #[arg(long, value_name = "FILE")]
    pub users_file: Option<PathBuf>,
    /// Bearer tokens: one `user:token` per line. Re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Open sessions one authenticated user may have (BITSNumberOfSessionsLimit); 0 = no limit [default: 50].
    #[arg(long, value_name = "N")]
    pub max_sessions_per_user: Option<usize>,
    /// Open sessions the whole server may have; 0 = no limit [default: no limit].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// Largest fragment accepted, in bytes; larger ones get 413 [default: no limit].
    #[arg(long, value_name = "BYTES")]
    pub max_fragment_size: Option<u64>,
    /// Connections served at once on the upload listener(s); more wait to be accepted [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a keep-alive connection may sit idle between requests [default: 60].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// PEM certificate chain for https on the upload listener; re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert; re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A header sent with every call to the server application, as `Name: value` (for example
    /// `Authorization: Bearer ...`); read at each call, never logged.
    #[arg(long, value_name = "FILE")]
    pub notify_header_file: Option<PathBuf>,
    /// PEM CA bundle trusted for https calls to the server application (instead of the system's).
    #[arg(long, value_name = "FILE")]
    pub notify_ca_file: Option<PathBuf>,
}

/// The YAML file. Top-level keys mirror the flags; `directories` entries inherit what they omit.
/// (The directory keys are spelled out rather than flattened: serde cannot deny unknown fields
/// through `flatten`, and a misspelt key must be an error.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_listen: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id_fallback_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_overwrites: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_type: Option<NotifyType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_downloads: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub directories: Vec<DirectorySettings>,
    /// `--unsafe-no-sync`: Ack without flushing to disk (crash safety traded for speed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsafe_no_sync: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_user: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fragment_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_header_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_ca_file: Option<PathBuf>,
    /// Session handoff between the members of a farm (see `server::handoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffSettings>,
}

/// `handoff:` in the YAML file: who this member is, where the others are, and the farm's secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HandoffSettings {
    /// File holding the secret every member shares (at least 32 bytes).
    pub secret_file: PathBuf,
    /// This member's ordinal; by default the number at the end of `POD_NAME` (a StatefulSet pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u16>,
    /// Each member's base URL, by ordinal (a farm of fixed size, such as `bitsfarm farm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// A base URL with `{ordinal}` (and optionally `{namespace}`), for a farm whose size changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_url_template: Option<String>,
    /// PEM bundle that https peers' certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The resolved `handoff:` settings; the secret itself is read when the server starts.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffConfig {
    pub secret_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub ordinal: u16,
    pub peers: crate::server::handoff::Peers,
}

impl HandoffSettings {
    fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<HandoffConfig, ConfigError> {
        use crate::server::handoff::Peers;
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
fn pod_ordinal(pod: &str) -> Option<&str> {
    pod.rsplit_once('-')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The settings of one upload directory, each optional so that it can inherit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DirectorySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_overwrites: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_type: Option<NotifyType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_downloads: Option<bool>,
}

impl ConfigFile {
    /// The directory keys given at the top level: the defaults every directory inherits.
    pub fn defaults(&self) -> DirectorySettings {
        DirectorySettings {
            upload_path: self.upload_path.clone(),
            data_dir: self.data_dir.clone(),
            max_upload_size: self.max_upload_size,
            session_timeout: self.session_timeout,
            allow_overwrites: self.allow_overwrites,
            notify_type: self.notify_type,
            notify_url: self.notify_url.clone(),
            notify_timeout: self.notify_timeout,
            allow_downloads: self.allow_downloads,
        }
    }
}

impl DirectorySettings {
    /// Fills what this entry leaves out from `parent`.
    fn inherit(&self, parent: &DirectorySettings) -> DirectorySettings {
        DirectorySettings {
            upload_path: self.upload_path.clone().or(parent.upload_path.clone()),
            data_dir: self.data_dir.clone().or(parent.data_dir.clone()),
            max_upload_size: self.max_upload_size.or(parent.max_upload_size),
            session_timeout: self.session_timeout.or(parent.session_timeout),
            allow_overwrites: self.allow_overwrites.or(parent.allow_overwrites),
            notify_type: self.notify_type.or(parent.notify_type),
            notify_url: self.notify_url.clone().or(parent.notify_url.clone()),
            notify_timeout: self.notify_timeout.or(parent.notify_timeout),
            allow_downloads: self.allow_downloads.or(parent.allow_downloads),
        }
    }
}

/// One upload directory, fully resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadDirConfig {
    pub upload_path: UploadPrefix,
    pub data_dir: PathBuf,
    pub max_upload_size: Option<u64>,
    pub session_timeout: Duration,
    pub allow_overwrites: bool,
    pub notify_type: NotifyType,
    pub notify_url: Option<String>,
    pub notify_timeout: Duration,
    pub allow_downloads: bool,
}

/// Everything a server process needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub shared_listen: Option<SocketAddr>,
    pub host_id: Option<String>,
    pub host_id_fallback_timeout: u64,
    pub read_timeout: Duration,
    pub cleanup_interval: Option<Duration>,
    pub directories: Vec<UploadDirConfig>,
    /// Flush (fdatasync) each fragment and every session-state change before answering: the
    /// default. False only with `--unsafe-no-sync`, which trades crash safety for speed.
    pub sync: bool,
    /// Authentication, TLS, backend credentials and limits.
    pub security: SecurityConfig,
    /// Session handoff between farm members, when configured.
    pub handoff: Option<HandoffConfig>,
}

pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 50;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;

/// The resolved security settings (see `SecurityArgs`).
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    pub users_file: Option<PathBuf>,
    pub tokens_file: Option<PathBuf>,
    pub max_sessions_per_user: Option<usize>,
    pub max_sessions: Option<usize>,
    pub max_fragment_size: Option<u64>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub notify_header_file: Option<PathBuf>,
    pub notify_ca_file: Option<PathBuf>,
}

impl SecurityConfig {
    fn resolve(a: &SecurityArgs, f: &ConfigFile) -> Result<Self, ConfigError> {
        let limit = |v: Option<usize>| v.filter(|n| *n > 0);
        let c = SecurityConfig {
            users_file: a.users_file.clone().or(f.users_file.clone()),
            tokens_file: a.tokens_file.clone().or(f.tokens_file.clone()),
            max_sessions_per_user: limit(Some(
                a.max_sessions_per_user
                    .or(f.max_sessions_per_user)
                    .unwrap_or(DEFAULT_MAX_SESSIONS_PER_USER),
            )),
            max_sessions: limit(a.max_sessions.or(f.max_sessions)),
            max_fragment_size: a.max_fragment_size.or(f.max_fragment_size),
            max_connections: a
                .max_connections
                .or(f.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            idle_timeout: Duration::from_secs(
                a.idle_timeout
                    .or(f.idle_timeout)
                    .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
            ),
            tls_cert: a.tls_cert.clone().or(f.tls_cert.clone()),
            tls_key: a.tls_key.clone().or(f.tls_key.clone()),
            notify_header_file: a
                .notify_header_file
                .clone()
                .or(f.notify_header_file.clone()),
            notify_ca_file: a.notify_ca_file.clone().or(f.notify_ca_file.clone()),
        };
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return invalid("tls-cert and tls-key go together: give both or neither");
        }
        if c.max_fragment_size == Some(0) {
            return invalid("max-fragment-size must be greater than 0");
        }
        if c.max_connections == 0 {
            return invalid("max-connections must be at least 1");
        }
        if c.idle_timeout.is_zero() {
            return invalid("idle-timeout must be at least 1 second");
        }
        Ok(c)
    }

    /// True when uploads need credentials.
    pub fn auth_enabled(&self) -> bool {
        self.users_file.is_some() || self.tokens_file.is_some()
    }
}

impl ServerConfig {
    /// Builds the configuration from flags and, when `--config` is given, the YAML file.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        Self::from_parts(file, args)
    }

    /// Flags override the file's top-level keys; directories inherit from the result.
    pub fn from_parts(file: ConfigFile, args: &ServeArgs) -> Result<Self, ConfigError> {
        let flags = DirectorySettings {
            upload_path: args.upload_path.clone(),
            data_dir: args.data_dir.clone(),
            max_upload_size: args.max_upload_size,
            session_timeout: args.session_timeout,
            allow_overwrites: args.allow_overwrites.then_some(true),
            notify_type: args.notify_type,
            notify_url: args.notify_url.clone(),
            notify_timeout: args.notify_timeout,
            allow_downloads: args.allow_downloads.then_some(true),
        };
        let defaults = flags.inherit(&file.defaults());
        let listen = match args.listen.or(file.listen) {
            Some(a) => a,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("default listen address: {e}")))?,
        };
        let entries = if file.directories.is_empty() {
            vec![defaults]
        } else {
            file.directories
                .iter()
                .map(|d| d.inherit(&defaults))
                .collect()
        };
        let directories = entries
            .iter()
            .map(UploadDirConfig::resolve)
            .collect::<Result<Vec<_>, _>>()?;
        let security = SecurityConfig::resolve(&args.security, &file)?;
        let handoff = file
            .handoff
            .as_ref()
            .map(|h| h.resolve(|k| std::env::var(k).ok()))
            .transpose()?;
        let config = ServerConfig {
            listen,
            admin_listen: args.admin_listen.or(file.admin_listen),
            shared_listen: args.shared_listen.or(file.shared_listen),
            host_id: args
                .host_id
                .clone()
                .or(file.host_id)
                .filter(|h| !h.is_empty())
                .map(|t| expand_host_id(&t, |k| std::env::var(k).ok()))
                .transpose()?,
            host_id_fallback_timeout: args
                .host_id_fallback_timeout
                .or(file.host_id_fallback_timeout)
                .unwrap_or(DEFAULT_FALLBACK_TIMEOUT_SECS),
            read_timeout: Duration::from_secs(
                args.read_timeout
                    .or(file.read_timeout)
                    .unwrap_or(DEFAULT_READ_TIMEOUT_SECS),
            ),
            cleanup_interval: args
                .cleanup_interval
                .or(file.cleanup_interval)
                .map(Duration::from_secs),
            directories,
            sync: !(args.unsafe_no_sync || file.unsafe_no_sync.unwrap_or(false)),
            security,
            handoff,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Some(h) = &self.host_id {
            if h.len() > MAX_HOST_ID_LEN {
                return invalid(format!(
                    "host-id is {} characters long; at most {MAX_HOST_ID_LEN} are allowed",
                    h.len()
                ));
            }
            if h.chars()
                .any(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
            {
                return invalid(format!(
                    "host-id {h:?} must be a host name or address without spaces or control characters"
                ));
            }
        }
        if self.read_timeout.is_zero() {
            return invalid("read-timeout must be at least 1 second".into());
        }
        if self.cleanup_interval.is_some_and(|d| d.is_zero()) {
            return invalid("cleanup-interval must be at least 1 second".into());
        }
        for (i, a) in self.directories.iter().enumerate() {
            for b in &self.directories[i + 1..] {
                if a.upload_path == b.upload_path {
                    return invalid(format!(
                        "two directories use the upload path {}",
                        a.upload_path.as_str()
                    ));
                }
                let (pa, pb) = (absolute(&a.data_dir), absolute(&b.data_dir));
                if pa.starts_with(&pb) || pb.starts_with(&pa) {
                    return invalid(format!(
                        "the data folders {} and {} overlap; give each directory its own folder, \
                         not one inside another (uploads to the outer one could reach the inner \
                         one's session state)",
                        a.data_dir.display(),
                        b.data_dir.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// How often expired sessions are swept: a tenth of the shortest session timeout, 1 s to 1 h.
    pub fn effective_cleanup_interval(&self) -> Duration {
        self.cleanup_interval.unwrap_or_else(|| {
            let shortest = self
                .directories
                .iter()
                .map(|d| d.session_timeout)
                .min()
                .unwrap_or(Duration::from_secs(DEFAULT_SESSION_TIMEOUT_SECS));
            (shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
        })
    }
}

/// The folder as an absolute path with `.` and `..` resolved lexically (it may not exist yet).
fn absolute(p: &Path) -> PathBuf {
    use std::path::Component;
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Expands a host-id template: `{pod}` (env `POD_NAME`), `{ordinal}` (the number after the pod
/// name's last `-`, as in a StatefulSet) and `{namespace}` (env `POD_NAMESPACE`). This is how each
/// pod of a farm learns its own address from the one configuration all pods share.
pub fn expand_host_id(
    template: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    if !template.contains('{') {
        return Ok(template.to_string());
    }
    let need = |var: &str, placeholder: &str| {
        env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "host-id {template:?} uses {placeholder} but the environment variable {var} is not set"
            ))
        })
    };
    let mut out = template.to_string();
    if out.contains("{pod}") || out.contains("{ordinal}") {
        let pod = need("POD_NAME", "{pod}/{ordinal}")?;
        if out.contains("{ordinal}") {
            let ordinal = pod_ordinal(&pod).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "host-id uses {{ordinal}} but POD_NAME {pod:?} does not end in -<number>"
                ))
            })?;
            out = out.replace("{ordinal}", ordinal);
        }
        out = out.replace("{pod}", &pod);
    }
    if out.contains("{namespace}") {
        out = out.replace("{namespace}", &need("POD_NAMESPACE", "{namespace}")?);
    }
    if out.contains('{') || out.contains('}') {
        return Err(ConfigError::Invalid(format!(
            "host-id {template:?} has an unknown placeholder; use {{pod}}, {{ordinal}} or {{namespace}}"
        )));
    }
    Ok(out)
}

impl UploadDirConfig {
    fn resolve(s: &DirectorySettings) -> Result<Self, ConfigError> {
        let path_str = s.upload_path.as_deref().unwrap_or("/");
        let upload_path = UploadPrefix::parse(path_str).map_err(ConfigError::Invalid)?;
        let at = upload_path.as_str().to_string();
        let invalid = |m: String| ConfigError::Invalid(format!("directory {at}: {m}"));
        let notify_type = s.notify_type.unwrap_or_default();
        let notify_url = s.notify_url.clone().filter(|u| !u.is_empty());
        match (notify_type, &notify_url) {
            (NotifyType::None, _) => {}
            (_, None) => {
                return Err(invalid(
                    "notify-type is by-value or by-reference but no notify-url is set".into(),
                ));
            }
            (_, Some(url)) => {
                if url.len() > 2200 {
                    return Err(invalid("notify-url is longer than 2,200 characters".into()));
                }
                if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(invalid(format!(
                        "notify-url {url:?} contains spaces or control characters"
                    )));
                }
                // A relative URL is resolved against the upload URL; an absolute one must be HTTP.
                if let Ok(abs) = url::Url::parse(url)
                    && !matches!(abs.scheme(), "http" | "https")
                {
                    return Err(invalid(format!(
                        "notify-url {url:?} is not an http:// or https:// URL: the server application is reached over HTTP"
                    )));
                }
            }
        }
        let positive = |name: &str, v: Option<u64>, default: u64| match v {
            Some(0) => Err(invalid(format!("{name} must be greater than 0"))),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let session_timeout = positive(
            "session-timeout",
            s.session_timeout,
            DEFAULT_SESSION_TIMEOUT_SECS,
        )?;
        let notify_timeout = positive(
            "notify-timeout",
            s.notify_timeout,
            DEFAULT_NOTIFY_TIMEOUT_SECS,
        )?;
        if s.max_upload_size == Some(0) {
            return Err(invalid("max-upload-size must be greater than 0".into()));
        }
        Ok(UploadDirConfig {
            upload_path,
            data_dir: s
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_upload_size: s.max_upload_size,
            session_timeout: Duration::from_secs(session_timeout),
            allow_overwrites: s.allow_overwrites.unwrap_or(false),
            notify_type,
            notify_url,
            notify_timeout: Duration::from_secs(notify_timeout),
            allow_downloads: s.allow_downloads.unwrap_or(false),
        })
    }
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_yaml(&self) -> Result<String, String> {
        serde_saphyr::to_string(self).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = ServerConfig::from_parts(ConfigFile::default(), &ServeArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.host_id, None);
        assert_eq!(c.host_id_fallback_timeout, 86_400);
        assert_eq!(c.directories.len(), 1);
        let d = &c.directories[0];
        assert_eq!(d.upload_path.as_str(), "/");
        assert_eq!(d.data_dir, PathBuf::from("./bitsfarm-data"));
        assert_eq!(d.session_timeout, Duration::from_secs(1_209_600));
        assert_eq!(d.max_upload_size, None);
        assert!(!d.allow_overwrites && !d.allow_downloads);
        assert_eq!(d.notify_type, NotifyType::None);
    }

    #[test]
    fn a_backend_url_is_http_or_relative() {
        let with = |url: &str| {
            let file =
                ConfigFile::parse(&format!("notify-type: by-value\nnotify-url: {url}\n")).unwrap();
            ServerConfig::from_parts(file, &ServeArgs::default())
        };
        for ok in ["http://app:8090/in", "https://app/in", "/app/in", "notify"] {
            assert!(with(ok).is_ok(), "{ok} refused: {:?}", with(ok).err());
        }
        let err = with("ftp://app/in").unwrap_err().to_string();
        assert!(err.contains("not an http:// or https:// URL"), "{err}");
    }

    #[test]
    fn flags_win_and_directories_inherit() {
        let file = ConfigFile::parse(
            "listen: 127.0.0.1:9000\nmax-upload-size: 100\nsession-timeout: 50\ndirectories:\n  - upload-path: /a\n    data-dir: /tmp/a\n  - upload-path: /b\n    data-dir: /tmp/b\n    max-upload-size: 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            session_timeout: Some(9),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Default::default()
        };
        let c = ServerConfig::from_parts(file, &args).unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.directories[0].max_upload_size, Some(100));
        assert_eq!(c.directories[1].max_upload_size, Some(7));
        assert!(
            c.directories
                .iter()
                .all(|d| d.session_timeout == Duration::from_secs(9))
        );
    }

    #[test]
    fn bad_files_and_values_say_what_is_wrong() {
        let e = ConfigFile::parse("lisen: 1").unwrap_err();
        assert!(e.contains("lisen"), "{e}");
        let e = ConfigFile::parse("max-upload-size: lots").unwrap_err();
        assert!(!e.is_empty());
        let file = ConfigFile::parse("notify-type: by-value").unwrap();
        let e = ServerConfig::from_parts(file, &ServeArgs::default()).unwrap_err();
        assert!(e.to_string().contains("notify-url"), "{e}");
        let file = ConfigFile::parse("session-timeout: 0").unwrap();
        assert!(ServerConfig::from_parts(file, &ServeArgs::default()).is_err());
        let file = ConfigFile::parse(
            "directories:\n  - upload-path: /a\n    data-dir: /d\n  - upload-path: /b\n    data-dir: /d/./inner\n",
        )
        .unwrap();
        let e = ServerConfig::from_parts(file, &ServeArgs::default()).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        let file =
            ConfigFile::parse("directories:\n  - upload-path: /a\n  - upload-path: /a/\n").unwrap();
        assert!(ServerConfig::from_parts(file, &ServeArgs::default()).is_err());
        let args = ServeArgs {
            host_id: Some("a b".into()),
            ..Default::default()
        };
        assert!(ServerConfig::from_parts(ConfigFile::default(), &args).is_err());
        let args = ServeArgs {
            upload_path: Some("up".into()),
            ..Default::default()
        };
        assert!(ServerConfig::from_parts(ConfigFile::default(), &args).is_err());
    }

    #[test]
    fn handoff_settings_name_the_member_and_its_peers() {
        use crate::server::handoff::Peers;
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

    #[test]
    fn host_id_templates_expand_from_the_pod() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("farm-12".to_string()),
            "POD_NAMESPACE" => Some("uploads".to_string()),
            _ => None,
        };
        assert_eq!(
            expand_host_id("{pod}.{namespace}.svc.cluster.local", env).unwrap(),
            "farm-12.uploads.svc.cluster.local"
        );
        assert_eq!(
            expand_host_id("up{ordinal}.example.com", env).unwrap(),
            "up12.example.com"
        );
        assert_eq!(
            expand_host_id("plain.example", |_| None).unwrap(),
            "plain.example"
        );
        assert!(expand_host_id("{pod}", |_| None).is_err());
        assert!(expand_host_id("{node}.x", env).is_err());
        let bad = |k: &str| (k == "POD_NAME").then(|| "farm".to_string());
        assert!(expand_host_id("{ordinal}", bad).is_err());
    }

    #[test]
    fn config_file_round_trips_through_yaml() {
        let file = ConfigFile {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            host_id: Some("pod-0.farm".into()),
            notify_type: Some(NotifyType::ByValue),
            notify_url: Some("http://backend/in".into()),
            directories: vec![DirectorySettings {
                upload_path: Some("/x".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let yaml = file.to_yaml().unwrap();
        assert_eq!(ConfigFile::parse(&yaml).unwrap(), file, "{yaml}");
    }
}
