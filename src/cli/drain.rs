//! `bitsfarm drain`: SIGUSR1 to a server, then wait for it to exit.
//!
//! The default target, process 1, is right in a server's container (the pods' preStop hook) and
//! wrong everywhere else: on a host process 1 is init, which the kernel shields from signals it
//! does not handle, so the old default signalled nothing and then waited a day. Guessing "am I in
//! a container?" is not reliable (`/.dockerenv`, cgroup paths and `container=` differ between
//! engines, and a VM's init can carry them too), and it is not the question: what matters is
//! whether process 1 is a bitsfarm server. That is read from `/proc/1`, so the default applies
//! exactly where it is meant to, and an explicit `--pid` is checked the same way, because
//! SIGUSR1 ends most other programs.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Asks the server `pid` (by default process 1, when that is a bitsfarm server) to drain and
/// waits, at most `wait` seconds, until it has exited: a draining server exits on its own once
/// its last session is done.
pub async fn drain(pid: Option<i32>, wait: u64) -> anyhow::Result<()> {
    let target = pid.unwrap_or(1);
    let command = match (Process::read(target), pid) {
        (Ok(p), _) if p.is_server() => p.command(),
        (Ok(p), None) => bail!(
            "no --pid given, and process 1 is `{}`, not a bitsfarm server: the default is for \
             a server's container, where the server is process 1. Name the server: bitsfarm \
             drain --pid PID (`pgrep -f 'bitsfarm serve'` lists them)",
            p.command()
        ),
        (Ok(p), Some(_)) => bail!(
            "process {target} is `{}`, not a bitsfarm server; drain sends SIGUSR1, which ends \
             most other programs. Check the pid (`pgrep -f 'bitsfarm serve'` lists the \
             servers); for a server under another name, send it yourself: kill -USR1 {target}",
            p.command()
        ),
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("there is no process {target}")
        }
        (Err(e), None) => bail!(
            "no --pid given, and process 1 cannot be read ({e}) to check that it is a bitsfarm \
             server; name the server: bitsfarm drain --pid PID"
        ),
        // Another user's process under a `hidepid` /proc: the signal itself will say whether
        // we may send it.
        (Err(_), Some(_)) => "a process /proc does not show".to_string(),
    };
    kill(Pid::from_raw(target), Signal::SIGUSR1).with_context(|| {
        format!("cannot signal process {target}; is it a bitsfarm server of yours?")
    })?;
    eprintln!(
        "bitsfarm drain: asked process {target} (`{command}`) to drain; waiting up to {wait} s \
         for its sessions to finish and the process to exit"
    );
    let deadline = Instant::now() + Duration::from_secs(wait);
    while still_running(target) {
        if Instant::now() >= deadline {
            eprintln!(
                "bitsfarm drain: process {target} still has sessions after {wait} s; giving up \
                 waiting (it goes on draining)"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("bitsfarm drain: process {target} drained and exited");
    Ok(())
}

/// `POST /drain?stay=true` on the server's admin address, then `GET /drain` until it counts no
/// session, at most `wait` seconds. The server stays up, empty and unready, for whoever stops it
/// next (the kubelet's SIGTERM after the preStop hook).
pub async fn drain_through_admin(admin: &str, wait: u64) -> anyhow::Result<()> {
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{admin}")
    };
    let url = reqwest::Url::parse(&format!("{base}/drain"))
        .with_context(|| format!("--admin {admin:?} is not an address (HOST:PORT)"))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let mut start = url.clone();
    start.set_query(Some("stay=true"));
    let started = http
        .post(start)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| {
            format!("asking {url} to drain failed; is ADDR the server's --admin-listen?")
        })?;
    let mut left = sessions_left(started).await?;
    eprintln!(
        "bitsfarm drain: {base} drains; waiting up to {wait} s for its {left} session(s) to finish"
    );
    let deadline = Instant::now() + Duration::from_secs(wait);
    while left > 0 {
        if Instant::now() >= deadline {
            eprintln!(
                "bitsfarm drain: {base} still has {left} session(s) after {wait} s; giving up \
                 waiting (it goes on draining)"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A status that cannot be read now (a busy server) is read again at the next turn.
        if let Ok(r) = http.get(url.clone()).send().await
            && let Ok(n) = sessions_left(r).await
        {
            left = n;
        }
    }
    eprintln!("bitsfarm drain: {base} drained: no session left");
    Ok(())
}

/// The `sessions` of a `{"draining": true, "sessions": N}` answer.
async fn sessions_left(r: reqwest::Response) -> anyhow::Result<u64> {
    let body = r.bytes().await.context("reading the drain status")?;
    let status: serde_json::Value =
        serde_json::from_slice(&body).context("the drain status is not JSON")?;
    status["sessions"]
        .as_u64()
        .with_context(|| format!("the drain status {status} has no session count"))
}

/// Signal 0 only checks that the process is there; an exited one that its parent has not yet
/// reaped (a zombie) is there too, but done.
fn still_running(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `PID (COMM) STATE ...`, where COMM may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// What `/proc` says about a process.
struct Process {
    args: Vec<String>,
    /// It runs the very file this drain runs (a server under any name).
    same_program: bool,
}

impl Process {
    fn read(pid: i32) -> std::io::Result<Process> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let args = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // Reading another process's exe link needs the right to trace it; without that, the
        // name on its command line decides.
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        let theirs = std::fs::metadata(format!("/proc/{pid}/exe")).map(id);
        let ours = std::fs::metadata("/proc/self/exe").map(id);
        let same_program = matches!((theirs, ours), (Ok(a), Ok(b)) if a == b);
        Ok(Process { args, same_program })
    }

    fn is_server(&self) -> bool {
        let named = self.args.first().is_some_and(|a| {
            std::path::Path::new(a)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("bitsfarm"))
        });
        (named || self.same_program) && subcommand(&self.args) == Some("serve")
    }

    /// The command line, shortened for a message.
    fn command(&self) -> String {
        let line = self.args.join(" ");
        match line.char_indices().nth(100) {
            Some((i, _)) => format!("{}...", &line[..i]),
            None if line.is_empty() => "(a kernel thread or zombie: no command line)".into(),
            None => line,
        }
    }
}

/// The subcommand of a bitsfarm command line: its first word after the program that is neither
/// a flag nor the value of the one global flag that takes one.
fn subcommand(args: &[String]) -> Option<&str> {
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        if a == "--log-format" {
            rest.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(line: &str, same_program: bool) -> Process {
        Process {
            args: line.split(' ').map(str::to_string).collect(),
            same_program,
        }
    }

    #[test]
    fn only_a_bitsfarm_serve_process_is_a_server() {
        for server in [
            "/usr/local/bin/bitsfarm serve --config /etc/bitsfarm/config.yaml",
            "bitsfarm --log-format json serve",
            "./target/debug/bitsfarm --log-format=json serve --listen 127.0.0.1:0",
        ] {
            assert!(process(server, false).is_server(), "{server}");
        }
        assert!(process("/opt/renamed serve", true).is_server());
        for other in [
            "/sbin/init splash",
            "/usr/lib/systemd/systemd --switched-root",
            "bitsfarm farm --receiver",
            "bitsfarm --log-format serve farm",
            "/opt/renamed serve",
            "sleep 30",
        ] {
            assert!(!process(other, false).is_server(), "{other}");
        }
        assert!(!process("sh -c bitsfarm serve", true).is_server());
    }

    #[test]
    fn a_long_command_line_is_shortened() {
        let long = process(&format!("bitsfarm serve {}", "x".repeat(300)), false);
        assert_eq!(long.command().chars().count(), 103);
        assert_eq!(
            Process {
                args: vec![],
                same_program: false
            }
            .command(),
            "(a kernel thread or zombie: no command line)"
        );
    }
}
