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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::api::membership;
use crate::config::{ConfigFile, NotifyType};

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

struct Member {
    index: usize,
    addr: SocketAddr,
    /// Where its admin endpoints (drain among them) answer, as it announced at its last start.
    admin: Option<SocketAddr>,
    config: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// ` admin http://ADDR`, or nothing before the member has announced one.
    fn admin_text(&self) -> String {
        self.admin
            .map(|a| format!(" admin http://{a}"))
            .unwrap_or_default()
    }
}

/// Runs the farm until Ctrl-C or SIGTERM (or the end of standard input with `exit`).
pub async fn run(plan: FarmPlan, exe: &Path) -> Result<(), FarmError> {
    if plan.replicas == 0 {
        return Err(FarmError::Invalid("a farm needs at least 1 replica".into()));
    }
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
    let mut receivers = Vec::new();
    for addr in plan.receivers()? {
        let dir = plan.data_dir.join(format!("received-{}", addr.port()));
        let mut child = Command::new(exe)
            .args(["receiver", "--listen", &addr.to_string(), "--dir"])
            .arg(&dir)
            .args(
                trusted
                    .iter()
                    .flat_map(|t| ["--trust-dir".as_ref(), t.as_os_str()]),
            )
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(exe))?;
        first_line(&mut child, plan.replicas).await?;
        say(&format!(
            "receiver http://{addr} (stores in {})",
            dir.display()
        ))
        .await;
        receivers.push(child);
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
        };
        start(&mut m, exe).await?;
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
    say("ready; commands: kill N, stop N, restart N, drain N, status, exit").await;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let shutdown = crate::shutdown::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => {
                match line {
                    Ok(Some(l)) => {
                        if command(&l, &mut members, exe).await {
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
        stop(m).await;
    }
    for r in &mut receivers {
        terminate(r).await;
    }
    say("stopped").await;
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

/// Handles one command; true means exit.
async fn command(line: &str, members: &mut [Member], exe: &Path) -> bool {
    let mut words = line.split_whitespace();
    let (verb, arg) = (words.next().unwrap_or(""), words.next());
    if verb.is_empty() {
        return false;
    }
    if verb == "exit" || verb == "quit" {
        return true;
    }
    if verb == "status" {
        for m in members.iter_mut() {
            let alive = m
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            say(&format!(
                "member {} http://{} {}{}",
                m.index,
                m.addr,
                if alive { "running" } else { "down" },
                m.admin_text()
            ))
            .await;
        }
        return false;
    }
    let Some(m) = arg
        .and_then(|a| a.parse::<usize>().ok())
        .and_then(|i| members.get_mut(i))
    else {
        say(&format!("error: {line:?}: name a member by its number")).await;
        return false;
    };
    match verb {
        "kill" => {
            if let Some(c) = m.child.as_mut() {
                let _ = c.kill().await;
            }
            m.child = None;
            m.admin = None;
            say(&format!("member {} killed", m.index)).await;
        }
        "stop" => {
            stop(m).await;
            say(&format!("member {} stopped", m.index)).await;
        }
        "drain" => {
            // The member stops taking new sessions, leaves the shared address, and exits once
            // its sessions are done.
            let Some(admin) = m.admin else {
                say(&format!("error: member {} is not running", m.index)).await;
                return false;
            };
            let url = format!("http://{admin}/drain");
            crate::tls::install_ring_provider();
            match reqwest::Client::new().post(&url).send().await {
                Ok(r) => {
                    let body = r.text().await.unwrap_or_default();
                    say(&format!("member {} draining {}", m.index, body.trim())).await;
                }
                Err(e) => say(&format!("error: member {}: {e}", m.index)).await,
            }
        }
        "restart" => {
            stop(m).await;
            match start(m, exe).await {
                Ok(()) => say(&format!("member {} restarted{}", m.index, m.admin_text())).await,
                Err(e) => say(&format!("error: {e}")).await,
            }
        }
        _ => say(&format!("error: unknown command {verb:?}")).await,
    }
    false
}

async fn start(m: &mut Member, exe: &Path) -> Result<(), FarmError> {
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&m.config)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FarmError::Start {
            index: m.index,
            message: e.to_string(),
        })?;
    let line = first_line(&mut child, m.index).await?;
    m.admin = announced_admin(&line);
    // Pass on what the member says later (test hooks announce themselves on stdout).
    if let Some(out) = child.stdout.take() {
        let index = m.index;
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                say(&format!("member {index}: {l}")).await;
            }
        });
    }
    info!(member = m.index, addr = %m.addr, "member started");
    m.child = Some(child);
    Ok(())
}

/// Waits (bounded) for a child's first line on stdout: its "listening" announcement.
async fn first_line(child: &mut Child, index: usize) -> Result<String, FarmError> {
    let fail = |message: String| FarmError::Start { index, message };
    let out = child
        .stdout
        .as_mut()
        .ok_or_else(|| fail("no stdout".into()))?;
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    match tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.contains("listening on") => Ok(line),
        Ok(_) => Err(fail(
            "it exited before listening (see its log above)".into(),
        )),
        Err(_) => Err(fail("no announcement within 30 s".into())),
    }
}

/// The admin address in a member's `bitsfarm: listening on URL admin http://ADDR`.
fn announced_admin(line: &str) -> Option<SocketAddr> {
    line.split_once(" admin http://")?.1.trim().parse().ok()
}

async fn stop(m: &mut Member) {
    m.admin = None;
    if let Some(mut c) = m.child.take() {
        terminate(&mut c).await;
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
async fn terminate(c: &mut Child) {
    if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_ok()
        {
            return;
        }
        warn!(pid, "did not stop on SIGTERM; killing");
    }
    let _ = c.kill().await;
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
    fn the_admin_address_is_read_from_the_members_announcement() {
        assert_eq!(
            announced_admin(
                "bitsfarm: listening on http://127.0.0.1:8081 admin http://127.0.0.1:40001\n"
            ),
            Some("127.0.0.1:40001".parse().unwrap())
        );
        assert_eq!(
            announced_admin("bitsfarm: listening on http://127.0.0.1:8081\n"),
            None
        );
    }
}
