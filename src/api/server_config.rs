//! The one `UploadFarmSpec -> ConfigFile` mapping. The operator writes its output into the
//! ConfigMap, `render` prints it, and the local farm runs it, so the three cannot disagree.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::config::{ConfigFile, DirectoryKeys, NotifyType, ServeArgs, ServerConfig};

use super::{Backend, Limits, Notification, UploadFarmSpec};

/// Where each pod's session volume is mounted.
pub const DATA_ROOT: &str = "/var/lib/bitsfarm";
/// Where the Secrets named in `spec.security` are mounted: `<root>/{auth,tokens,tls,backend}`.
pub const SECRETS_ROOT: &str = "/var/run/secrets/bitsfarm";
/// The port the server listens on inside the pod, for uploads and its health endpoints.
pub const SERVER_PORT: u16 = 8080;
/// The port of each server's health, metrics and drain endpoints (plain http, never exposed by a
/// Service): the operator drains servers through it, whatever authentication the uploads need.
pub const ADMIN_PORT: u16 = 8081;

/// A spec the servers could not run with. The message names the field and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid UploadFarm spec: {0}")]
pub struct InvalidSpec(pub String);

/// How clients reach a farm's servers: the scheme, the port and the host ids that follow from
/// the spec. A BITS client keeps the scheme of the URL it started with and replaces only the host
/// with `BITS-Host-Id` (and the port, when the host id names one), so every per-pod address must
/// answer in the shared address's scheme, on the port the host id implies. The servers, their
/// Services, the status and `render` all take these from here.
impl UploadFarmSpec {
    /// Whether the servers speak https: a TLS Secret is named.
    pub fn tls(&self) -> bool {
        self.security
            .as_ref()
            .is_some_and(|s| s.tls_secret_name.is_some())
    }

    /// `https` with TLS, `http` without. Also the name of the Service and container ports.
    pub fn scheme(&self) -> &'static str {
        if self.tls() { "https" } else { "http" }
    }

    /// The port a URL of `scheme()` without a port means.
    pub fn default_port(&self) -> i32 {
        if self.tls() {
            super::DEFAULT_TLS_SERVICE_PORT
        } else {
            super::DEFAULT_SERVICE_PORT
        }
    }

    /// The port of the shared and per-pod Services: `service.port`, else the scheme's default,
    /// so that plain `https://host/...` URLs work when TLS is on.
    pub fn service_port(&self) -> i32 {
        self.service.port.unwrap_or_else(|| self.default_port())
    }

    /// The host-id template the servers run with: `hostIds.template`, with `:PORT` appended when
    /// the Services listen on a port that is not the scheme's default and the template names no
    /// port. Without it, a host id would send clients to the scheme's default port (or, for
    /// clients that keep the original URL's port, only work when that URL named the port).
    pub fn host_id_template(&self) -> String {
        let template = &self.host_ids.template;
        let port = self.service_port();
        if port == self.default_port() || names_port(template) {
            template.clone()
        } else {
            format!("{template}:{port}")
        }
    }
}

/// Whether a host-id template already names a port: a `:` after the host (after the `]` of an
/// IPv6 literal).
fn names_port(template: &str) -> bool {
    let host_end = template.rfind(']').map_or(0, |i| i + 1);
    template[host_end..].contains(':')
}

/// The server configuration every pod of the farm runs with. The host id stays a template that
/// each pod expands from its own name; the result is checked as the server would check it.
pub fn server_config(spec: &UploadFarmSpec) -> Result<ConfigFile, InvalidSpec> {
    if spec.replicas < 0 {
        return Err(InvalidSpec(format!(
            "spec.replicas is {}; it must be 0 or more",
            spec.replicas
        )));
    }
    let template = &spec.host_ids.template;
    if !template.contains("{pod}") && !template.contains("{ordinal}") {
        return Err(InvalidSpec(format!(
            "spec.hostIds.template {template:?} must contain {{pod}} or {{ordinal}}, or every server would hand out the same address"
        )));
    }
    // Checked before the directory keys: of several mistakes, the one reported stays the same.
    let fallback_timeout = seconds(
        "spec.hostIds.fallbackTimeoutSeconds",
        spec.host_ids.fallback_timeout_seconds,
    )?;
    let mut defaults = DirectoryKeys {
        upload_path: Some(spec.upload_path.clone()),
        data_dir: Some(PathBuf::from(DATA_ROOT).join("files")),
        session_timeout: Some(seconds(
            "spec.sessionTimeoutSeconds",
            spec.session_timeout_seconds,
        )?),
        ..DirectoryKeys::default()
    };
    if let Some(b) = &spec.backend {
        apply_backend(&mut defaults, b, "spec.backend")?;
    }
    if let Some(l) = &spec.limits {
        apply_limits(&mut defaults, l, "spec.limits")?;
    }
    let mut file = ConfigFile {
        listen: Some(std::net::SocketAddr::from(([0, 0, 0, 0], SERVER_PORT))),
        admin_listen: Some(std::net::SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT))),
        host_id: Some(spec.host_id_template()),
        host_id_fallback_timeout: Some(fallback_timeout),
        ..ConfigFile::with_defaults(defaults)
    };
    if let Some(sec) = &spec.security {
        let secret_file =
            |dir: &str, key: &str| Some(PathBuf::from(SECRETS_ROOT).join(dir).join(key));
        if sec.auth_secret_name.is_some() {
            file.users_file = secret_file("auth", "users");
        }
        if sec.tokens_secret_name.is_some() {
            file.tokens_file = secret_file("tokens", "tokens");
        }
        if sec.tls_secret_name.is_some() {
            file.tls_cert = secret_file("tls", "tls.crt");
            file.tls_key = secret_file("tls", "tls.key");
        }
        if sec.backend_credentials_secret_name.is_some() {
            file.notify_header_file = secret_file("backend", "header");
        }
    }
    let mut used = HashSet::new();
    for (i, d) in spec.directories.iter().enumerate() {
        let at = format!("spec.directories[{i}]");
        let mut dir = DirectoryKeys {
            upload_path: Some(d.path.clone()),
            data_dir: Some(
                PathBuf::from(DATA_ROOT)
                    .join("dirs")
                    .join(folder_name(&d.path, i, &mut used)),
            ),
            ..DirectoryKeys::default()
        };
        if let Some(b) = &d.backend {
            apply_backend(&mut dir, b, &format!("{at}.backend"))?;
            // A backend is taken whole: an empty URL keeps the directory from inheriting the
            // farm's.
            dir.notify_url.get_or_insert_default();
        }
        if let Some(l) = &d.limits {
            apply_limits(&mut dir, l, &format!("{at}.limits"))?;
        }
        file.directories.push(dir);
    }
    check(&file)?;
    Ok(file)
}

/// Runs the server's own validation on the file as pod 0 would see it.
fn check(file: &ConfigFile) -> Result<(), InvalidSpec> {
    let mut probe = file.clone();
    if let Some(t) = &probe.host_id {
        let env = |k: &str| match k {
            "POD_NAME" => Some("farm-0".to_string()),
            "POD_NAMESPACE" => Some("default".to_string()),
            _ => None,
        };
        probe.host_id = Some(
            crate::config::expand_host_id(t, env)
                .map_err(|e| InvalidSpec(format!("spec.hostIds.template: {e}")))?,
        );
    }
    ServerConfig::from_parts(probe, &ServeArgs::default())
        .map(|_| ())
        .map_err(|e| InvalidSpec(e.to_string()))
}

fn seconds(field: &str, v: i64) -> Result<u64, InvalidSpec> {
    match u64::try_from(v) {
        Ok(s) if s > 0 => Ok(s),
        _ => Err(InvalidSpec(format!(
            "{field} is {v}; it must be a positive number of seconds"
        ))),
    }
}

fn apply_backend(to: &mut DirectoryKeys, b: &Backend, at: &str) -> Result<(), InvalidSpec> {
    let url = b.url.clone().filter(|u| !u.is_empty());
    if b.notification != Notification::None && url.is_none() {
        return Err(InvalidSpec(format!(
            "{at}.url is required when {at}.notification is {:?}",
            b.notification
        )));
    }
    let notify_type = match b.notification {
        Notification::None => NotifyType::None,
        Notification::ByReference => NotifyType::ByReference,
        Notification::ByValue => NotifyType::ByValue,
    };
    let timeout = seconds(&format!("{at}.timeoutSeconds"), b.timeout_seconds)?;
    to.notify_type = Some(notify_type);
    to.notify_url = url;
    to.notify_timeout = Some(timeout);
    Ok(())
}

fn apply_limits(to: &mut DirectoryKeys, l: &Limits, at: &str) -> Result<(), InvalidSpec> {
    let max = match l.max_upload_size_bytes {
        None => None,
        Some(v) => match u64::try_from(v) {
            Ok(b) if b > 0 => Some(b),
            _ => {
                return Err(InvalidSpec(format!(
                    "{at}.maxUploadSizeBytes is {v}; it must be a positive number of bytes"
                )));
            }
        },
    };
    if max.is_some() {
        to.max_upload_size = max;
    }
    if l.allow_overwrites.is_some() {
        to.allow_overwrites = l.allow_overwrites;
    }
    Ok(())
}

/// A readable folder name for a directory's data, unique within the farm: `/photos/raw` ->
/// `photos-raw`, `/` -> `root`.
fn folder_name(path: &str, index: usize, used: &mut HashSet<String>) -> String {
    let mut name: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() || name.chars().all(|c| c == '.') {
        name = "root".into();
    }
    if !used.insert(name.clone()) {
        name = format!("{name}-{index}");
        used.insert(name.clone());
    }
    name
}
