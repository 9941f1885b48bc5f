//! The farm's child processes: starting a member (and a receiver) and waiting for its
//! announcement, passing its log on under its name, stopping it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{FarmError, say};

/// How long a child may take to announce that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child that failed to start may take to finish its log, so that its last words
/// come before the farm's own error.
const LAST_WORDS: Duration = Duration::from_secs(2);

pub(super) struct Member {
    pub index: usize,
    pub addr: SocketAddr,
    /// Where its admin endpoints (drain among them) answer, as it announced at its last start.
    pub admin: Option<SocketAddr>,
    pub config: PathBuf,
    pub child: Option<Child>,
    /// What the farm last did to it that took it down (killed, stopped), for `status`.
    pub taken_down: Option<&'static str>,
    /// It took a `drain` since its last start: it exits on its own once its sessions are done.
    pub drained: bool,
}

impl Member {
    /// ` admin http://ADDR`, or nothing before the member has announced one.
    pub fn admin_text(&self) -> String {
        self.admin
            .map(|a| format!(" admin http://{a}"))
            .unwrap_or_default()
    }

    /// Why the member is not running (killed, stopped, or how it exited on its own, as a drained
    /// member does); None while it runs.
    pub fn down(&mut self) -> Option<String> {
        let Some(child) = self.child.as_mut() else {
            return Some(self.taken_down.unwrap_or("not started").to_string());
        };
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) if self.drained && status.success() => {
                Some("drained and exited".into())
            }
            Ok(Some(status)) => Some(format!("exited, {status}")),
            Err(e) => Some(format!("cannot tell: {e}")),
        }
    }
}

/// How a child's log lines are marked as its own.
#[derive(Debug, Clone)]
pub(super) struct LogLabel {
    /// Before each text line, e.g. `[member 2] `.
    pub prefix: String,
    /// Added to each JSON line, e.g. `"member": 2`.
    pub field: (&'static str, serde_json::Value),
    pub json: bool,
}

impl LogLabel {
    pub fn member(index: usize, json: bool) -> LogLabel {
        LogLabel {
            prefix: format!("[member {index}] "),
            field: ("member", index.into()),
            json,
        }
    }

    /// `only`: the farm runs one receiver, so `[receiver]` names it.
    pub fn receiver(addr: SocketAddr, only: bool, json: bool) -> LogLabel {
        LogLabel {
            prefix: if only {
                "[receiver] ".to_string()
            } else {
                format!("[receiver {addr}] ")
            },
            field: ("receiver", addr.to_string().into()),
            json,
        }
    }

    /// One line of the child's log, marked. A JSON log stays one JSON object per line: a line that
    /// is not one (a panic's message) becomes the `message` of one.
    pub fn mark(&self, line: &str) -> String {
        if !self.json {
            return format!("{}{line}", self.prefix);
        }
        let mut object = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => {
                let mut o = serde_json::Map::new();
                o.insert("message".into(), line.into());
                o
            }
        };
        object.insert(self.field.0.into(), self.field.1.clone());
        serde_json::Value::Object(object).to_string()
    }
}

/// `bitsfarm [--log-format json] ARGS...`, its stdout piped (the announcement) and its stderr
/// passed on marked with `label`. Returns the child and the task passing its log on.
pub(super) fn spawn(
    exe: &Path,
    args: &[&std::ffi::OsStr],
    label: LogLabel,
) -> std::io::Result<(Child, JoinHandle<()>)> {
    let mut cmd = Command::new(exe);
    if label.json {
        cmd.args(["--log-format", "json"]);
    }
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let log = match child.stderr.take() {
        Some(err) => tokio::spawn(pass_on(err, label)),
        None => tokio::spawn(async {}),
    };
    Ok((child, log))
}

/// Writes each line of `from` to the farm's stderr, marked. A line is written whole, in one
/// write, so that lines of several children and the farm's own log do not mix.
async fn pass_on(from: impl AsyncRead + Unpin, label: LogLabel) {
    let mut lines = BufReader::new(from).lines();
    let mut err = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut marked = label.mark(&line);
        marked.push('\n');
        if err.write_all(marked.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Starts member `m`; its log lines say `[member N]`.
pub(super) async fn start(m: &mut Member, exe: &Path, json_logs: bool) -> Result<(), FarmError> {
    let fail = |message: String| FarmError::Start {
        index: m.index,
        message,
    };
    let args = ["serve".as_ref(), "--config".as_ref(), m.config.as_os_str()];
    let (mut child, log) =
        spawn(exe, &args, LogLabel::member(m.index, json_logs)).map_err(|e| fail(e.to_string()))?;
    let line = match first_line(&mut child).await {
        Ok(line) => line,
        Err(message) => {
            let _ = tokio::time::timeout(LAST_WORDS, log).await;
            return Err(fail(message));
        }
    };
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
    m.taken_down = None;
    m.drained = false;
    Ok(())
}

/// Waits (bounded) for a child's first line on stdout: its "listening" announcement.
pub(super) async fn first_line(child: &mut Child) -> Result<String, String> {
    let out = child.stdout.as_mut().ok_or("no stdout")?;
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    match tokio::time::timeout(START_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.contains("listening on") => Ok(line),
        Ok(_) => Err("it exited before listening (see its log above)".into()),
        Err(_) => Err(format!(
            "no announcement within {} s",
            START_TIMEOUT.as_secs()
        )),
    }
}

/// Waits (bounded) for a child that failed to start to finish its log.
pub(super) async fn last_words(log: JoinHandle<()>) {
    let _ = tokio::time::timeout(LAST_WORDS, log).await;
}

/// The admin address in a member's `bitsfarm: listening on URL admin http://ADDR`.
pub(super) fn announced_admin(line: &str) -> Option<SocketAddr> {
    line.split_once(" admin http://")?.1.trim().parse().ok()
}

pub(super) async fn stop(m: &mut Member) {
    m.admin = None;
    if let Some(mut c) = m.child.take() {
        terminate(&mut c).await;
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
pub(super) async fn terminate(c: &mut Child) {
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

    #[test]
    fn log_lines_are_marked_with_their_child_and_json_stays_json() {
        let text = LogLabel::member(2, false);
        assert_eq!(text.mark("INFO serving"), "[member 2] INFO serving");
        let json = LogLabel::member(2, true);
        let v: serde_json::Value =
            serde_json::from_str(&json.mark(r#"{"level":"INFO","message":"serving"}"#)).unwrap();
        assert_eq!(v["member"], 2);
        assert_eq!(v["message"], "serving");
        assert_eq!(v["level"], "INFO");
        let v: serde_json::Value =
            serde_json::from_str(&json.mark("thread 'main' panicked")).unwrap();
        assert_eq!(v["message"], "thread 'main' panicked");
        assert_eq!(v["member"], 2);
        let addr = "127.0.0.1:8090".parse().unwrap();
        assert_eq!(
            LogLabel::receiver(addr, true, false).mark("x"),
            "[receiver] x"
        );
        assert_eq!(
            LogLabel::receiver(addr, false, false).mark("x"),
            "[receiver 127.0.0.1:8090] x"
        );
        let v: serde_json::Value =
            serde_json::from_str(&LogLabel::receiver(addr, false, true).mark("{}")).unwrap();
        assert_eq!(v["receiver"], "127.0.0.1:8090");
    }
}
