//! `bitsfarm farm`: one farm run on one machine, for development, demos and end-to-end tests.
//!
//! Each member is a real `bitsfarm serve` process with its own address (its host id) and its own
//! data folder; all of them also bind one shared address with SO_REUSEPORT, so the kernel spreads
//! connections among them the way a Kubernetes Service spreads them among pods. Commands on
//! standard input kill (SIGKILL), stop (SIGTERM), restart and drain members.
//!
//! Each member also has an admin address on the loopback interface (a port the system picks,
//! printed when the member starts and by `status`): its `/metrics`, `/healthz`, `/readyz` and
//! `/drain`. Draining is never offered on the member's own or the shared address, where any
//! client could use it; `drain N` goes to the admin address.

mod commands;
mod process;

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::api::membership;
use crate::config::{ConfigFile, DEFAULT_FALLBACK_TIMEOUT_SECS, NotifyType};
use commands::Console;
use process::{LogLabel, Member};

/// The host-id fallback timeout of a local farm whose user set none. A server's default (a day)
/// suits clients that may sleep through a member's restart; on one machine, a member killed in
/// a demo would leave its clients waiting so long that the upload looks hung.
pub const LOCAL_FALLBACK_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("member {index} did not start: {message}")]
    Start { index: usize, message: String },
    #[error("the receiver on {addr} did not start: {message}")]
    Receiver { addr: SocketAddr, message: String },
    #[error("{what} is taken ({addr}): {hint}")]
    PortTaken {
        what: String,
        addr: SocketAddr,
        hint: &'static str,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FarmPlan {
    pub replicas: usize,
    /// The shared address; members listen on the ports right after it.
    pub shared: SocketAddr,
    pub data_dir: PathBuf,
    /// Give each member a host id (its own address). Off: every packet goes through the shared
    /// address, as with a farm without BITS-Host-Id.
    pub host_ids: bool,
    /// Members hand packets for each other's sessions to the owner (a secret in the data folder
    /// authenticates them to each other).
    pub handoff: bool,
    /// The server configuration every member shares (directories, backend, limits).
    pub server: ConfigFile,
    /// Run the reference receiver on the port after the members and deliver to it by value.
    pub receiver: bool,
    /// The server configuration's host-id fallback timeout is the local farm's default, not one
    /// the user chose (see `settle_fallback`).
    pub fallback_default: bool,
    /// Members and receivers log JSON lines, as the farm itself does with `--log-format json`.
    pub json_logs: bool,
}

/// Sets `server`'s host-id fallback timeout: `flag`, else the one the farm's file names, else
/// the local farm's default. True when it is the default.
pub fn settle_fallback(server: &mut ConfigFile, flag: Option<u64>, file_names_one: bool) -> bool {
    if flag.is_some() {
        server.host_id_fallback_timeout = flag;
        return false;
    }
    if file_names_one && server.host_id_fallback_timeout.is_some() {
        return false;
    }
    server.host_id_fallback_timeout = Some(LOCAL_FALLBACK_TIMEOUT_SECS);
    true
}

/// Whether an UploadFarm file names `spec.hostIds.fallbackTimeoutSeconds` itself: the spec read
/// from it holds the server's default when it does not, and cannot tell.
pub fn names_fallback(manifest: &Path) -> bool {
    std::fs::read_to_string(manifest)
        .ok()
        .and_then(|text| serde_saphyr::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|v| !v["spec"]["hostIds"]["fallbackTimeoutSeconds"].is_null())
}

impl FarmPlan {
    pub fn member_addr(&self, index: usize) -> Result<SocketAddr, FarmError> {
        let port = u16::try_from(usize::from(self.shared.port()) + 1 + index).map_err(|_| {
            FarmError::Invalid(format!(
                "the shared port {} leaves no room for {} members",
                self.shared.port(),
                self.replicas
            ))
        })?;
        Ok(SocketAddr::new(self.shared.ip(), port))
    }

    /// The secret the members share for handoff; made once, kept across runs of the farm so
    /// that sessions minted before a restart still name their owners.
    pub fn secret_file(&self) -> PathBuf {
        self.data_dir.join("handoff-secret")
    }

    fn fallback_secs(&self) -> u64 {
        self.server
            .host_id_fallback_timeout
            .unwrap_or(DEFAULT_FALLBACK_TIMEOUT_SECS)
    }

    /// `status`'s line about the host-id fallback timeout.
    fn fallback_status(&self) -> String {
        let default = if self.fallback_default {
            " (the local farm's default)"
        } else {
            ""
        };
        format!(
            "host-id fallback timeout {} s{default}",
            self.fallback_secs()
        )
    }

    /// What the farm says at start about the host-id fallback timeout: what it means here, and
    /// how to set another when it is the default.
    fn fallback_said(&self) -> String {
        let t = self.fallback_secs();
        let meaning = if self.host_ids {
            format!(
                "a client falls back to the shared address once its host id has not answered for {t} s"
            )
        } else {
            format!(
                "a packet whose session's owner is down is answered \"retry\" for {t} s, then \"session not found\""
            )
        };
        let how = if self.fallback_default {
            "; the local farm's default, set another with --host-id-fallback-timeout or spec.hostIds.fallbackTimeoutSeconds"
        } else {
            ""
        };
        format!("host-id fallback timeout {t} s: {meaning}{how}")
    }

    pub fn receiver_addr(&self) -> Result<SocketAddr, FarmError> {
        self.member_addr(self.replicas)
    }

    /// Where reference receivers run: the one `receiver` asks for, or every backend of the
    /// configuration that is on this machine (a loopback address), so that a farm spec whose
    /// backend is `http://127.0.0.1:PORT/...` runs with its backend.
    pub fn receivers(&self) -> Result<Vec<SocketAddr>, FarmError> {
        if self.receiver {
            return Ok(vec![self.receiver_addr()?]);
        }
        let urls = std::iter::once(&self.server.notify_url)
            .chain(self.server.directories.iter().map(|d| &d.notify_url))
            .flatten();
        let mut out = Vec::new();
        for u in urls {
            let Ok(url) = reqwest::Url::parse(u) else {
                continue;
            };
            let ip = match url.host() {
                Some(url::Host::Domain("localhost")) => std::net::IpAddr::from([127, 0, 0, 1]),
                Some(url::Host::Ipv4(ip)) => ip.into(),
                Some(url::Host::Ipv6(ip)) => ip.into(),
                _ => continue,
            };
            if let (true, Some(port)) = (ip.is_loopback(), url.port_or_known_default()) {
                let addr = SocketAddr::new(ip, port);
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
        Ok(out)
    }

    /// The configuration file of member `index`: the shared settings, plus its own addresses and
    /// folders.
    pub fn member_config(&self, index: usize) -> Result<ConfigFile, FarmError> {
        let addr = self.member_addr(index)?;
        let dir = self.data_dir.join(format!("member-{index}"));
        let mut c = self.server.clone();
        c.listen = Some(addr);
        c.shared_listen = Some(self.shared);
        // Drain is served on an admin address only; loopback, since only this machine (the
        // farm's `drain N`, a local Prometheus) has any business there.
        c.admin_listen = Some(SocketAddr::new(loopback(self.shared.ip()), 0));
        c.host_id = self.host_ids.then(|| addr.to_string());
        c.handoff = if self.handoff {
            let me = u16::try_from(index)
                .map_err(|_| FarmError::Invalid(format!("member {index} is beyond 65535")))?;
            let members = (0..self.replicas)
                .map(|i| self.member_addr(i))
                .collect::<Result<Vec<_>, _>>()?;
            Some(membership::local(&members, me, self.secret_file()))
        } else {
            None
        };
        if c.directories.is_empty() {
            c.data_dir = Some(dir.join("data"));
        } else {
            for (i, d) in c.directories.iter_mut().enumerate() {
                d.data_dir = Some(dir.join(format!("dir-{i}")));
            }
        }
        if self.receiver {
            c.notify_type = Some(NotifyType::ByValue);
            c.notify_url = Some(format!("http://{}/deliveries", self.receiver_addr()?));
        }
        Ok(c)
    }
}

/// The loopback address of `ip`'s family.
fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Runs the farm until Ctrl-C or SIGTERM (or the end of standard input with `exit`).
pub async fn run(plan: FarmPlan, exe: &Path) -> Result<(), FarmError> {
    if plan.replicas == 0 {
        return Err(FarmError::Invalid("a farm needs at least 1 replica".into()));
    }
    let receivers = plan.receivers()?;
    check_ports(&plan, &receivers)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FarmError::Io { path, source }
    };
    tokio::fs::create_dir_all(&plan.data_dir)
        .await
        .map_err(io(&plan.data_dir))?;
    if plan.handoff {
        ensure_secret(&plan.secret_file()).await?;
    }
    // A receiver takes files named by reference only beneath the folders it trusts: exactly the
    // members' data folders, where they name them. Made now, since it opens them at start.
    let mut trusted = Vec::new();
    for index in 0..plan.replicas {
        let c = plan.member_config(index)?;
        let folders: Vec<PathBuf> = if c.directories.is_empty() {
            c.data_dir.into_iter().collect()
        } else {
            c.directories
                .into_iter()
                .filter_map(|d| d.data_dir)
                .collect()
        };
        for f in folders {
            tokio::fs::create_dir_all(&f).await.map_err(io(&f))?;
            trusted.push(f);
        }
    }
    let mut receiver_children = Vec::new();
    for &addr in &receivers {
        let dir = plan.data_dir.join(format!("received-{}", addr.port()));
        let listen = addr.to_string();
        let mut args: Vec<&OsStr> = vec![
            "receiver".as_ref(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
        ];
        for t in &trusted {
            args.extend(["--trust-dir".as_ref(), t.as_os_str()]);
        }
        let label = LogLabel::receiver(addr, receivers.len() == 1, plan.json_logs);
        let (mut child, log) = process::spawn(exe, &args, label).map_err(io(exe))?;
        if let Err(message) = process::first_line(&mut child).await {
            process::last_words(log).await;
            return Err(FarmError::Receiver { addr, message });
        }
        say(&format!(
            "receiver http://{addr} (stores in {})",
            dir.display()
        ))
        .await;
        receiver_children.push(child);
    }
    let mut members = Vec::new();
    for index in 0..plan.replicas {
        let config = plan.data_dir.join(format!("member-{index}.yaml"));
        let yaml = plan
            .member_config(index)?
            .to_yaml()
            .map_err(FarmError::Invalid)?;
        tokio::fs::write(&config, yaml).await.map_err(io(&config))?;
        let mut m = Member {
            index,
            addr: plan.member_addr(index)?,
            admin: None,
            config,
            child: None,
            taken_down: None,
            drained: false,
        };
        process::start(&mut m, exe, plan.json_logs).await?;
        say(&format!(
            "member {index} http://{}{}{}",
            m.addr,
            if plan.host_ids { " (its host id)" } else { "" },
            m.admin_text()
        ))
        .await;
        members.push(m);
    }
    say(&format!("shared http://{}", plan.shared)).await;
    say(&plan.fallback_said()).await;
    say("ready; commands: kill N, stop N, restart N, drain N, status, help, exit").await;

    let mut console = Console {
        members: &mut members,
        exe,
        json_logs: plan.json_logs,
        fallback: plan.fallback_status(),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let shutdown = crate::shutdown::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => {
                match line {
                    Ok(Some(l)) => {
                        if console.run(&l).await {
                            break;
                        }
                    }
                    _ => stdin_open = false,
                }
            }
            _ = &mut shutdown => break,
        }
    }
    for m in &mut members {
        process::stop(m).await;
    }
    for r in &mut receiver_children {
        process::terminate(r).await;
    }
    say("stopped").await;
    Ok(())
}

/// Refuses to start when a port the farm needs is taken, naming whose port it is: a child that
/// cannot listen only says that it exited.
fn check_ports(plan: &FarmPlan, receivers: &[SocketAddr]) -> Result<(), FarmError> {
    const MOVE: &str = "stop what listens there, or move the farm with --shared (the members \
                        take the ports after it, then --receiver the next one)";
    const BACKEND: &str = "the farm's backend URL names it; stop what listens there, or give \
                           the backend another port";
    let mut wanted = vec![(
        format!("the shared port {}", plan.shared.port()),
        plan.shared,
        MOVE,
    )];
    for i in 0..plan.replicas {
        let addr = plan.member_addr(i)?;
        wanted.push((format!("member {i}'s port {}", addr.port()), addr, MOVE));
    }
    for &addr in receivers {
        let hint = if plan.receiver { MOVE } else { BACKEND };
        wanted.push((format!("the receiver's port {}", addr.port()), addr, hint));
    }
    for (what, addr, hint) in wanted {
        // Anything but a port in use (no such address, a privileged port) the child reports.
        if let Err(e) = std::net::TcpListener::bind(addr)
            && e.kind() == std::io::ErrorKind::AddrInUse
        {
            return Err(FarmError::PortTaken { what, addr, hint });
        }
    }
    Ok(())
}

/// Writes a random secret (readable by this user only) unless the file is already there.
async fn ensure_secret(path: &Path) -> Result<(), FarmError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| FarmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let secret = format!(
        "{}{}\n",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => f.write_all(secret.as_bytes()).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

async fn say(line: &str) {
    let mut out = tokio::io::stdout();
    let _ = out
        .write_all(format!("bitsfarm farm: {line}\n").as_bytes())
        .await;
    let _ = out.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(shared: &str) -> FarmPlan {
        FarmPlan {
            replicas: 2,
            shared: shared.parse().unwrap(),
            data_dir: PathBuf::from("/tmp/farm"),
            host_ids: true,
            handoff: false,
            server: ConfigFile::default(),
            receiver: false,
            fallback_default: false,
            json_logs: false,
        }
    }

    #[test]
    fn every_member_has_a_loopback_admin_address_of_its_own() {
        for (shared, admin) in [
            ("0.0.0.0:8080", "127.0.0.1:0"),
            ("192.0.2.1:8080", "127.0.0.1:0"),
            ("[::]:8080", "[::1]:0"),
        ] {
            let p = plan(shared);
            for i in 0..p.replicas {
                let c = p.member_config(i).unwrap();
                assert_eq!(c.admin_listen, Some(admin.parse().unwrap()), "{shared}");
                assert_ne!(c.admin_listen, c.listen);
            }
        }
    }

    #[test]
    fn the_fallback_timeout_is_the_users_else_the_files_else_the_local_default() {
        let mut c = ConfigFile::default();
        assert!(settle_fallback(&mut c, None, false));
        assert_eq!(
            c.host_id_fallback_timeout,
            Some(LOCAL_FALLBACK_TIMEOUT_SECS)
        );
        let mut c = ConfigFile {
            host_id_fallback_timeout: Some(86_400),
            ..ConfigFile::default()
        };
        // A spec that names none still holds the server's default.
        assert!(settle_fallback(&mut c, None, false));
        assert_eq!(
            c.host_id_fallback_timeout,
            Some(LOCAL_FALLBACK_TIMEOUT_SECS)
        );
        c.host_id_fallback_timeout = Some(600);
        assert!(!settle_fallback(&mut c, None, true));
        assert_eq!(c.host_id_fallback_timeout, Some(600));
        assert!(!settle_fallback(&mut c, Some(5), true));
        assert_eq!(c.host_id_fallback_timeout, Some(5));

        let mut p = plan("127.0.0.1:8080");
        p.server.host_id_fallback_timeout = Some(30);
        p.fallback_default = true;
        assert!(p.fallback_said().contains("--host-id-fallback-timeout"));
        assert_eq!(
            p.fallback_status(),
            "host-id fallback timeout 30 s (the local farm's default)"
        );
        p.fallback_default = false;
        assert!(!p.fallback_said().contains("default"));
    }

    #[test]
    fn a_farm_file_names_its_fallback_timeout_or_not() {
        let dir = tempfile::TempDir::new().unwrap();
        let with = dir.path().join("with.yaml");
        std::fs::write(
            &with,
            "kind: UploadFarm\nspec:\n  hostIds:\n    fallbackTimeoutSeconds: 30\n",
        )
        .unwrap();
        let without = dir.path().join("without.yaml");
        std::fs::write(&without, "kind: UploadFarm\nspec:\n  hostIds: {}\n").unwrap();
        assert!(names_fallback(&with));
        assert!(!names_fallback(&without));
        assert!(!names_fallback(&dir.path().join("absent.yaml")));
    }
}
