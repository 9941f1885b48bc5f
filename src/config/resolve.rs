//! From keys to a checked `ServerConfig`: flags over the file, directories inheriting the top
//! level, defaults, validation, and what comes from the environment (host-id templates and the
//! handoff member's ordinal, from `POD_NAME` and `POD_NAMESPACE`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{ConfigError, ConfigFile, DirectoryKeys, NotifyType, ServeArgs};
use super::handoff::{HandoffConfig, pod_ordinal};
use crate::bits::paths::UploadPrefix;
use crate::bits::protocol::MAX_HOST_ID_LEN;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./bitsfarm-data";
pub const DEFAULT_FALLBACK_TIMEOUT_SECS: u64 = 86_400;
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 1_209_600;
pub const DEFAULT_NOTIFY_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 50;
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MIN_BODY_RATE: u64 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_MAX_BODY_MEMORY: u64 = 8 << 20;
/// One connection's read buffer: a smaller budget could not pass a full read on.
pub const MIN_BODY_MEMORY: u64 = 64 << 10;

/// One upload directory: its `DirectoryKeys` inherited, checked and with the defaults filled in.
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
    /// Bytes per second a body must average after `read_timeout`; `None`: no minimum.
    pub min_body_rate: Option<u64>,
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

/// The resolved authentication, TLS, backend-credential and limit keys.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    pub users_file: Option<PathBuf>,
    pub tokens_file: Option<PathBuf>,
    pub max_sessions_per_user: Option<usize>,
    pub max_sessions: Option<usize>,
    pub max_fragment_size: Option<u64>,
    /// Bytes of bodies held in memory, all uploads together.
    pub max_body_memory: u64,
    /// As given; the server fits the default to the file-descriptor limit at start
    /// (`server::limits::ConnectionLimits`).
    pub max_connections: Option<usize>,
    /// As given (`Some(0)`: no limit); by default a share of the connections.
    pub max_connections_per_address: Option<usize>,
    pub idle_timeout: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub notify_header_file: Option<PathBuf>,
    pub notify_ca_file: Option<PathBuf>,
}

impl SecurityConfig {
    fn resolve(f: &ConfigFile) -> Result<Self, ConfigError> {
        let limit = |v: Option<usize>| v.filter(|n| *n > 0);
        let c = SecurityConfig {
            users_file: f.users_file.clone(),
            tokens_file: f.tokens_file.clone(),
            max_sessions_per_user: limit(Some(
                f.max_sessions_per_user
                    .unwrap_or(DEFAULT_MAX_SESSIONS_PER_USER),
            )),
            max_sessions: limit(Some(f.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS))),
            max_fragment_size: f.max_fragment_size,
            max_body_memory: f.max_body_memory.unwrap_or(DEFAULT_MAX_BODY_MEMORY),
            max_connections: f.max_connections,
            max_connections_per_address: f.max_connections_per_address,
            idle_timeout: Duration::from_secs(f.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS)),
            tls_cert: f.tls_cert.clone(),
            tls_key: f.tls_key.clone(),
            notify_header_file: f.notify_header_file.clone(),
            notify_ca_file: f.notify_ca_file.clone(),
        };
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return invalid("tls-cert and tls-key go together: give both or neither");
        }
        if c.max_fragment_size == Some(0) {
            return invalid("max-fragment-size must be greater than 0");
        }
        if c.max_body_memory < MIN_BODY_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "max-body-memory must be at least {MIN_BODY_MEMORY} bytes (one read buffer), not {}",
                c.max_body_memory
            )));
        }
        if c.max_connections == Some(0) {
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

    /// Flags override the file's keys; directories inherit the top level's.
    pub fn from_parts(file: ConfigFile, args: &ServeArgs) -> Result<Self, ConfigError> {
        let keys = args.flags.clone().or(file);
        let defaults = keys.defaults();
        let listen = match keys.listen {
            Some(a) => a,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("default listen address: {e}")))?,
        };
        let entries = if keys.directories.is_empty() {
            vec![defaults]
        } else {
            keys.directories
                .iter()
                .map(|d| d.inherit(&defaults))
                .collect()
        };
        let directories = entries
            .iter()
            .map(UploadDirConfig::resolve)
            .collect::<Result<Vec<_>, _>>()?;
        let security = SecurityConfig::resolve(&keys)?;
        let env = |k: &str| std::env::var(k).ok();
        let handoff = keys.handoff.as_ref().map(|h| h.resolve(env)).transpose()?;
        let config = ServerConfig {
            listen,
            admin_listen: keys.admin_listen,
            shared_listen: keys.shared_listen,
            host_id: keys
                .host_id
                .filter(|h| !h.is_empty())
                .map(|t| expand_host_id(&t, env))
                .transpose()?,
            host_id_fallback_timeout: keys
                .host_id_fallback_timeout
                .unwrap_or(DEFAULT_FALLBACK_TIMEOUT_SECS),
            read_timeout: Duration::from_secs(
                keys.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT_SECS),
            ),
            min_body_rate: Some(keys.min_body_rate.unwrap_or(DEFAULT_MIN_BODY_RATE))
                .filter(|r| *r > 0),
            cleanup_interval: keys.cleanup_interval.map(Duration::from_secs),
            directories,
            sync: !keys.unsafe_no_sync.unwrap_or(false),
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
    fn resolve(s: &DirectoryKeys) -> Result<Self, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(flags: ConfigFile) -> ServeArgs {
        ServeArgs {
            flags,
            ..Default::default()
        }
    }

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
        assert_eq!(c.read_timeout, Duration::from_secs(60));
        assert_eq!(c.min_body_rate, Some(1024));
        let sec = &c.security;
        assert_eq!(sec.max_sessions, Some(100_000), "a finite session limit");
        assert_eq!(sec.max_sessions_per_user, Some(50));
        // Fitted to the file-descriptor limit at start (server::limits).
        assert_eq!(sec.max_connections, None);
        assert_eq!(sec.max_connections_per_address, None);
        assert_eq!(sec.max_body_memory, 8 << 20);
    }

    #[test]
    fn the_body_memory_budget_holds_at_least_one_read_buffer() {
        let file = ConfigFile::parse("max-body-memory: 65536\n").unwrap();
        let c = ServerConfig::from_parts(file, &ServeArgs::default()).unwrap();
        assert_eq!(c.security.max_body_memory, 65536);
        let file = ConfigFile::parse("max-body-memory: 0\n").unwrap();
        let err = ServerConfig::from_parts(file, &ServeArgs::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("max-body-memory must be at least 65536 bytes"),
            "{err}"
        );
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let file = ConfigFile::parse(
            "max-sessions: 0\nmin-body-rate: 0\nmax-connections-per-address: 0\n",
        )
        .unwrap();
        let c = ServerConfig::from_parts(file, &ServeArgs::default()).unwrap();
        assert_eq!(c.security.max_sessions, None);
        assert_eq!(c.min_body_rate, None);
        assert_eq!(c.security.max_connections_per_address, Some(0));
        let args = flags(ConfigFile {
            min_body_rate: Some(10),
            max_connections: Some(7),
            ..Default::default()
        });
        let c = ServerConfig::from_parts(ConfigFile::default(), &args).unwrap();
        assert_eq!(c.min_body_rate, Some(10));
        assert_eq!(c.security.max_connections, Some(7));
        let file = ConfigFile::parse("max-connections: 0\n").unwrap();
        assert!(ServerConfig::from_parts(file, &ServeArgs::default()).is_err());
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
        let args = flags(ConfigFile {
            session_timeout: Some(9),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Default::default()
        });
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
        let args = flags(ConfigFile {
            host_id: Some("a b".into()),
            ..Default::default()
        });
        assert!(ServerConfig::from_parts(ConfigFile::default(), &args).is_err());
        let args = flags(ConfigFile {
            upload_path: Some("up".into()),
            ..Default::default()
        });
        assert!(ServerConfig::from_parts(ConfigFile::default(), &args).is_err());
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
}
