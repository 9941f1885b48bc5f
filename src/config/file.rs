//! The keys: the YAML file and the `bitsfarm serve` flags, each key declared once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// The `bitsfarm serve` flags: `--config`, and every key of the file but `directories` and
/// `handoff`. Each is optional so that a value given in `--config` is only overridden by a flag
/// that was actually given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// YAML file with the same keys as these flags, plus `directories:` for several upload directories.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ConfigFile,
}

/// Writes each key, listed once in the call below, into every place that needs it: `ConfigFile`
/// (the file's top level, and the flags: a key's doc comment is its `--help`) and, for the
/// directory keys, `DirectoryKeys` (each `directories:` entry); and the merges that go key by key
/// (`or`, `defaults`, `with_defaults`, `inherit`). The directory keys are written into the top level rather than `#[serde(flatten)]`ed:
/// flatten cannot deny unknown keys, and it buffers YAML scalars before it knows their type, so
/// `data-dir: 2024` would stop parsing, and a bad value's error would point at the start of the
/// mapping instead of the value.
///
/// The order of the keys is the order of the file's keys (in `to_yaml` and in the list an unknown
/// key's error gives) and of `--help`. A `bool` key is a switch on the command line: `num_args = 0,
/// default_missing_value = "true"` makes `--allow-overwrites` mean true and its absence mean "not
/// given", so that the file's value stands.
macro_rules! config_keys {
    (
        server {$(
            $(#[doc = $s_doc:literal])*
            #[arg($($s_arg:tt)*)]
            $(#[serde($($s_serde:tt)*)])?
            $s_key:ident: $s_ty:ty,
        )*}
        directory {$(
            $(#[doc = $d_doc:literal])*
            #[arg($($d_arg:tt)*)]
            $d_key:ident: $d_ty:ty,
        )*}
        after_directories {$(
            $(#[doc = $a_doc:literal])*
            #[arg($($a_arg:tt)*)]
            $a_key:ident: $a_ty:ty,
        )*}
    ) => {
        /// The YAML file, whose keys are also the flags. `directories` entries inherit the
        /// directory keys they omit from the top level.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        // Without a group of its own: clap would print one in an error's usage line in place of
        // the flags that were given.
        #[group(skip)]
        pub struct ConfigFile {
            $(
                $(#[doc = $s_doc])*
                #[arg($($s_arg)*)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                $(#[serde($($s_serde)*)])?
                pub $s_key: Option<$s_ty>,
            )*
            $(
                $(#[doc = $d_doc])*
                #[arg($($d_arg)*)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $d_key: Option<$d_ty>,
            )*
            /// Upload directories, each with its own upload path and data folder.
            #[arg(skip)]
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub directories: Vec<DirectoryKeys>,
            $(
                $(#[doc = $a_doc])*
                #[arg($($a_arg)*)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $a_key: Option<$a_ty>,
            )*
            /// Session handoff between the members of a farm (see `server::handoff`).
            #[arg(skip)]
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub handoff: Option<HandoffSettings>,
        }

        /// The settings of one upload directory (a `directories:` entry, or the top level's
        /// defaults), each optional so that it can inherit.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        pub struct DirectoryKeys {
            $(
                $(#[doc = $d_doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $d_key: Option<$d_ty>,
            )*
        }

        impl ConfigFile {
            /// Each key of `self` (the flags), or `file`'s where `self` leaves it out.
            pub fn or(self, file: ConfigFile) -> ConfigFile {
                ConfigFile {
                    $($s_key: self.$s_key.or(file.$s_key),)*
                    $($d_key: self.$d_key.or(file.$d_key),)*
                    directories: if self.directories.is_empty() {
                        file.directories
                    } else {
                        self.directories
                    },
                    $($a_key: self.$a_key.or(file.$a_key),)*
                    handoff: self.handoff.or(file.handoff),
                }
            }

            /// The directory keys given at the top level: the defaults every directory inherits.
            pub fn defaults(&self) -> DirectoryKeys {
                DirectoryKeys {
                    $($d_key: self.$d_key.clone(),)*
                }
            }

            /// A file that sets only `defaults`, at the top level.
            pub fn with_defaults(defaults: DirectoryKeys) -> Self {
                ConfigFile {
                    $($d_key: defaults.$d_key,)*
                    ..ConfigFile::default()
                }
            }
        }

        impl DirectoryKeys {
            /// Fills what this entry leaves out from `parent`.
            pub fn inherit(&self, parent: &DirectoryKeys) -> DirectoryKeys {
                DirectoryKeys {
                    $($d_key: self.$d_key.clone().or_else(|| parent.$d_key.clone()),)*
                }
            }
        }
    };
}

config_keys! {
    server {
        /// Address to listen on: IP:PORT, or HOST:PORT with HOST resolved at start-up to its
        /// first IPv4 address (localhost is 127.0.0.1) [default: 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR", value_parser = super::addr::parse_listen_addr)]
        #[serde(deserialize_with = "super::addr::deserialize_listen_addr")]
        listen: SocketAddr,
        /// Separate address for /healthz, /readyz and /metrics (by default they share --listen),
        /// and the only one that serves POST /drain (without it, drain with SIGUSR1).
        #[arg(long, value_name = "ADDR", value_parser = super::addr::parse_listen_addr)]
        #[serde(deserialize_with = "super::addr::deserialize_listen_addr")]
        admin_listen: SocketAddr,
        /// Also accept uploads on this address, shared with the other members of a local farm
        /// (SO_REUSEPORT: the kernel spreads connections among them, as a Service does).
        #[arg(long, value_name = "ADDR", value_parser = super::addr::parse_listen_addr)]
        #[serde(deserialize_with = "super::addr::deserialize_listen_addr")]
        shared_listen: SocketAddr,
        /// This server's own address, returned as BITS-Host-Id (BITSHostId) [default: none].
        #[arg(long, env = "BITSFARM_HOST_ID", value_name = "VALUE")]
        host_id: String,
        /// Seconds a client keeps to the host id after an error before falling back [default: 86400].
        #[arg(long, value_name = "SECS")]
        host_id_fallback_timeout: u64,
        /// Seconds a client may take to send a request's headers or the next piece of a body; also
        /// the grace before --min-body-rate applies [default: 60].
        #[arg(long, value_name = "SECS")]
        read_timeout: u64,
        /// Bytes per second a request body must average once --read-timeout has passed since it
        /// began; a slower body is cut and its connection closed. 0 = no minimum [default: 1024].
        #[arg(long, value_name = "BYTES_PER_SEC")]
        min_body_rate: u64,
        /// Seconds between sweeps that remove expired sessions [default: session timeout / 10, 1 to 3600].
        #[arg(long, value_name = "SECS")]
        cleanup_interval: u64,
    }
    directory {
        /// URL path of the upload directory (IIS: the virtual directory) [default: /].
        #[arg(long, value_name = "PREFIX")]
        upload_path: String,
        /// Folder uploads land in; session state lives in its BITS-Sessions folder [default: ./bitsfarm-data].
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Largest upload accepted, in bytes (BITSMaximumUploadSize) [default: unlimited].
        #[arg(long, value_name = "BYTES")]
        max_upload_size: u64,
        /// Seconds without progress after which a session and its data are removed [default: 1209600].
        #[arg(long, value_name = "SECS")]
        session_timeout: u64,
        /// Let an upload replace an existing file (BITSAllowOverwrites).
        #[arg(long, num_args = 0, default_missing_value = "true")]
        allow_overwrites: bool,
        /// How a finished upload reaches the server application [default: none].
        #[arg(long, value_enum, value_name = "TYPE")]
        notify_type: NotifyType,
        /// URL of the server application; relative URLs are resolved against the upload URL.
        #[arg(long, value_name = "URL")]
        notify_url: String,
        /// Seconds to wait for the server application's answer [default: 300].
        #[arg(long, value_name = "SECS")]
        notify_timeout: u64,
        /// Serve completed files with GET and HEAD (Range supported). Off: this is an upload server.
        #[arg(long, num_args = 0, default_missing_value = "true")]
        allow_downloads: bool,
    }
    after_directories {
        /// Trades crash safety for speed: Acks are sent before the bytes and session state are flushed
        /// to disk (no fdatasync/fsync), so a power loss or kernel crash can lose acknowledged
        /// fragments. Only for benchmarks, or data you can upload again.
        #[arg(long, num_args = 0, default_missing_value = "true")]
        unsafe_no_sync: bool,
        /// HTTP Basic users: one `user:$argon2id$...` per line (`bitsfarm passwd USER` prints one).
        /// Re-read when it changes. Without this and --tokens-file, uploads need no credentials.
        #[arg(long, value_name = "FILE")]
        users_file: PathBuf,
        /// Bearer tokens: one `user:token` per line. Re-read when it changes.
        #[arg(long, value_name = "FILE")]
        tokens_file: PathBuf,
        /// Open sessions one authenticated user may have (BITSNumberOfSessionsLimit); 0 = no limit [default: 50].
        #[arg(long, value_name = "N")]
        max_sessions_per_user: usize,
        /// Open sessions the whole server may have; 0 = no limit [default: 100000].
        #[arg(long, value_name = "N")]
        max_sessions: usize,
        /// Largest fragment accepted, in bytes; larger ones get 413 [default: no limit].
        #[arg(long, value_name = "BYTES")]
        max_fragment_size: u64,
        /// Bytes of fragment bodies received and not yet written, all uploads together; past it,
        /// bodies wait unread. More lets many concurrent uploads move faster, at that much more
        /// memory. At least 65536 [default: 8388608].
        #[arg(long, value_name = "BYTES")]
        max_body_memory: u64,
        /// Connections served at once on the upload listener(s); more wait to be accepted. Must fit
        /// the file-descriptor limit [default: 1024, or fewer if the limit is lower].
        #[arg(long, value_name = "N")]
        max_connections: usize,
        /// Connections one client address (IPv6: one /64) may hold on the upload listener(s); more
        /// are closed at once. 0 = no limit [default: a quarter of --max-connections].
        #[arg(long, value_name = "N")]
        max_connections_per_address: usize,
        /// Seconds a keep-alive connection may sit idle between requests [default: 60].
        #[arg(long, value_name = "SECS")]
        idle_timeout: u64,
        /// PEM certificate chain for https on the upload listener; re-read when it changes.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: PathBuf,
        /// PEM private key for --tls-cert; re-read when it changes.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: PathBuf,
        /// A header sent with every call to the server application, as `Name: value` (for example
        /// `Authorization: Bearer ...`); read at each call, never logged.
        #[arg(long, value_name = "FILE")]
        notify_header_file: PathBuf,
        /// PEM CA bundle trusted for https calls to the server application (instead of the system's).
        #[arg(long, value_name = "FILE")]
        notify_ca_file: PathBuf,
    }
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
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn flags(argv: &[&str]) -> Result<ConfigFile, clap::Error> {
        let argv = std::iter::once("serve").chain(argv.iter().copied());
        Serve::try_parse_from(argv).map(|s| s.args.flags)
    }

    #[test]
    fn config_file_round_trips_through_yaml() {
        let file = ConfigFile {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            host_id: Some("pod-0.farm".into()),
            notify_type: Some(NotifyType::ByValue),
            notify_url: Some("http://backend/in".into()),
            directories: vec![DirectoryKeys {
                upload_path: Some("/x".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let yaml = file.to_yaml().unwrap();
        assert_eq!(ConfigFile::parse(&yaml).unwrap(), file, "{yaml}");
    }

    #[test]
    fn a_value_is_read_as_its_keys_type_and_a_bad_one_is_pointed_at() {
        // What `#[serde(flatten)]` would break (see `config_keys!`).
        let f = ConfigFile::parse("data-dir: 2024\nhost-id: 10\ndirectories:\n  - data-dir: 7\n")
            .unwrap();
        assert_eq!(f.data_dir, Some("2024".into()));
        assert_eq!(f.host_id.as_deref(), Some("10"));
        assert_eq!(f.directories[0].data_dir, Some("7".into()));
        let e = ConfigFile::parse("listen: 127.0.0.1:1\nmax-upload-size: lots\n").unwrap_err();
        assert!(e.contains("line 2 column 18"), "{e}");
        let e = ConfigFile::parse("directories:\n  - upload-pth: /a\n").unwrap_err();
        assert!(e.contains("unknown field `upload-pth`"), "{e}");
    }

    #[test]
    fn a_switch_given_is_true_and_one_not_given_leaves_the_file_alone() {
        let f = flags(&["--allow-overwrites", "--unsafe-no-sync"]).unwrap();
        assert_eq!(f.allow_overwrites, Some(true));
        assert_eq!(f.unsafe_no_sync, Some(true));
        assert_eq!(f.allow_downloads, None);
        assert_eq!(flags(&[]).unwrap(), ConfigFile::default());
        for bad in [
            &["--allow-downloads=true"][..],
            &["--allow-downloads", "--allow-downloads"],
            &["--allow-overwrites", "false"],
        ] {
            assert!(flags(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_take_the_files_key_names() {
        let f = flags(&[
            "--upload-path=/u",
            "--max-sessions-per-user=3",
            "--notify-type=by-reference",
            "--listen=127.0.0.1:9",
        ])
        .unwrap();
        assert_eq!(
            f,
            ConfigFile::parse(
                "upload-path: /u\nmax-sessions-per-user: 3\nnotify-type: by-reference\nlisten: 127.0.0.1:9\n"
            )
            .unwrap()
        );
        assert!(flags(&["--tls-cert=/c"]).is_err(), "tls-cert needs tls-key");
    }

    #[test]
    fn the_flags_win_key_by_key_and_entries_inherit_what_they_omit() {
        let file = ConfigFile::parse(
            "listen: 127.0.0.1:1\nsession-timeout: 5\nnotify-url: /in\ndirectories:\n  - upload-path: /a\n",
        )
        .unwrap();
        let given = ConfigFile {
            session_timeout: Some(9),
            users_file: Some("/u".into()),
            ..Default::default()
        };
        let merged = given.or(file.clone());
        assert_eq!(merged.listen, file.listen);
        assert_eq!(merged.session_timeout, Some(9));
        assert_eq!(merged.users_file, Some("/u".into()));
        assert_eq!(merged.directories, file.directories);
        let entry = merged.directories[0].inherit(&merged.defaults());
        assert_eq!(entry.upload_path.as_deref(), Some("/a"));
        assert_eq!(entry.session_timeout, Some(9));
        assert_eq!(entry.notify_url.as_deref(), Some("/in"));
        let top = ConfigFile::with_defaults(entry.clone());
        assert_eq!(top.defaults(), entry);
        assert_eq!(top.listen, None);
    }
}
