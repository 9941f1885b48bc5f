//! The commands typed on the farm's standard input: read (pure, in `parse`), then carried out on
//! the members, each answer saying what happened or what was wrong and what to type instead.

use std::path::Path;
use std::time::Duration;

use super::process::{self, Member};
use super::say;

/// How long `status` and `drain` wait for a member's admin address to answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

const HELP: &[&str] = &[
    "commands:",
    "  kill N     SIGKILL member N, as a crash would",
    "  stop N     SIGTERM member N: it stops cleanly, its sessions stay on disk",
    "  restart N  stop member N if it runs, then start it again",
    "  drain N    member N takes no new session and exits once its sessions are done",
    "  status     each member's state and addresses",
    "  help       this list",
    "  exit       stop the farm (also quit, Ctrl-C, or the end of standard input)",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verb {
    Kill,
    Stop,
    Restart,
    Drain,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Kill => "kill",
            Verb::Stop => "stop",
            Verb::Restart => "restart",
            Verb::Drain => "drain",
        }
    }
}

/// A line typed on standard input, read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Typed {
    Nothing,
    Exit,
    Help,
    Status,
    Member(Verb, usize),
    /// Not a command the farm can carry out: what to tell the person.
    Mistake(String),
}

/// "members are 0-2", or "the only member is 0".
fn members_are(replicas: usize) -> String {
    match replicas {
        1 => "the only member is 0".into(),
        n => format!("members are 0-{}", n - 1),
    }
}

pub(super) fn parse(line: &str, replicas: usize) -> Typed {
    let mut words = line.split_whitespace();
    let Some(word) = words.next() else {
        return Typed::Nothing;
    };
    let verb = match word {
        "exit" | "quit" => return Typed::Exit,
        "help" | "?" => return Typed::Help,
        "status" => return Typed::Status,
        "kill" => Verb::Kill,
        "stop" => Verb::Stop,
        "restart" => Verb::Restart,
        "drain" => Verb::Drain,
        other => return Typed::Mistake(format!("unknown command {other} (try help)")),
    };
    let name = verb.name();
    let Some(arg) = words.next() else {
        return Typed::Mistake(format!(
            "{name} needs a member number: {name} N ({})",
            members_are(replicas)
        ));
    };
    match arg.parse::<usize>() {
        Ok(i) if i < replicas => Typed::Member(verb, i),
        Ok(i) => Typed::Mistake(format!("no member {i} ({})", members_are(replicas))),
        Err(_) => Typed::Mistake(format!(
            "{name} needs a member number, not {arg:?} ({})",
            members_are(replicas)
        )),
    }
}

/// What the farm runs that commands act on.
pub(super) struct Console<'a> {
    pub members: &'a mut [Member],
    pub exe: &'a Path,
    pub json_logs: bool,
    /// The `status` line about the host-id fallback timeout.
    pub fallback: String,
}

impl Console<'_> {
    /// Carries out one typed line; true means exit.
    pub async fn run(&mut self, line: &str) -> bool {
        match parse(line, self.members.len()) {
            Typed::Nothing => {}
            Typed::Exit => return true,
            Typed::Help => {
                for l in HELP {
                    say(l).await;
                }
                self.status().await;
            }
            Typed::Status => self.status().await,
            Typed::Mistake(m) => say(&format!("error: {m}")).await,
            Typed::Member(verb, i) => self.on_member(verb, i).await,
        }
        false
    }

    async fn status(&mut self) {
        for m in self.members.iter_mut() {
            let state = match m.down() {
                Some(why) => format!("down ({why})"),
                None => match drain_state(m).await {
                    Some(d) if d.draining => format!("draining ({})", d.left()),
                    Some(_) => "running".into(),
                    // A drained member stops answering as it exits.
                    None if m.drained => "draining (exiting)".into(),
                    None => "running (its admin address does not answer)".into(),
                },
            };
            say(&format!(
                "member {} http://{} {state}{}",
                m.index,
                m.addr,
                m.admin_text()
            ))
            .await;
        }
        say(&self.fallback).await;
    }

    async fn on_member(&mut self, verb: Verb, i: usize) {
        let (exe, json_logs) = (self.exe, self.json_logs);
        let Some(m) = self.members.get_mut(i) else {
            return;
        };
        let down = m.down();
        if down.is_some() && verb != Verb::Restart {
            say(&format!(
                "member {i} is already down ({}); restart {i} starts it again",
                down.unwrap_or_default()
            ))
            .await;
            return;
        }
        match verb {
            Verb::Kill => {
                if let Some(c) = m.child.as_mut() {
                    let _ = c.kill().await;
                }
                m.child = None;
                m.admin = None;
                m.taken_down = Some("killed");
                say(&format!("member {i} killed")).await;
            }
            Verb::Stop => {
                process::stop(m).await;
                m.taken_down = Some("stopped");
                say(&format!("member {i} stopped")).await;
            }
            Verb::Drain => drain(m).await,
            Verb::Restart => {
                process::stop(m).await;
                match process::start(m, exe, json_logs).await {
                    Ok(()) => say(&format!("member {i} restarted{}", m.admin_text())).await,
                    Err(e) => say(&format!("error: {e}")).await,
                }
            }
        }
    }
}

/// What a member's `GET /drain` says.
#[derive(Debug, serde::Deserialize)]
struct DrainState {
    draining: bool,
    sessions: u64,
}

impl DrainState {
    fn left(&self) -> String {
        match self.sessions {
            1 => "1 session left".into(),
            n => format!("{n} sessions left"),
        }
    }
}

fn admin_client() -> Option<reqwest::Client> {
    crate::tls::install_ring_provider();
    reqwest::Client::builder()
        .timeout(ADMIN_TIMEOUT)
        .build()
        .ok()
}

/// The member's drain state from its admin address; None when it does not answer.
async fn drain_state(m: &Member) -> Option<DrainState> {
    let url = format!("http://{}/drain", m.admin?);
    let body = admin_client()?
        .get(url)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// The member stops taking new sessions, leaves the shared address, and exits once its sessions
/// are done.
async fn drain(m: &mut Member) {
    let i = m.index;
    let Some(admin) = m.admin else {
        say(&format!(
            "error: member {i} announced no admin address to drain it on"
        ))
        .await;
        return;
    };
    let Some(http) = admin_client() else {
        say("error: cannot set up HTTP").await;
        return;
    };
    let answer = match http.post(format!("http://{admin}/drain")).send().await {
        Ok(r) => r.text().await.map_err(|e| e.to_string()).and_then(|body| {
            serde_json::from_str::<DrainState>(&body).map_err(|_| body.trim().to_string())
        }),
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(d) => {
            m.drained = true;
            let then = match d.sessions {
                0 => "it has no session left and exits now".to_string(),
                _ => format!("{}; it exits once they are done", d.left()),
            };
            say(&format!("member {i} draining: {then}")).await
        }
        Err(e) => say(&format!("error: member {i} did not take the drain: {e}")).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_are_read_and_mistakes_say_what_to_type() {
        assert_eq!(parse("  ", 3), Typed::Nothing);
        assert_eq!(parse("exit", 3), Typed::Exit);
        assert_eq!(parse("quit", 3), Typed::Exit);
        assert_eq!(parse("help", 3), Typed::Help);
        assert_eq!(parse("status", 3), Typed::Status);
        assert_eq!(parse("kill 2", 3), Typed::Member(Verb::Kill, 2));
        assert_eq!(parse(" drain  0 ", 3), Typed::Member(Verb::Drain, 0));
        let mistake = |line: &str, replicas| match parse(line, replicas) {
            Typed::Mistake(m) => m,
            other => panic!("{line:?} read as {other:?}"),
        };
        assert_eq!(mistake("kill 9", 3), "no member 9 (members are 0-2)");
        assert_eq!(mistake("kill 1", 1), "no member 1 (the only member is 0)");
        assert_eq!(mistake("foo", 3), "unknown command foo (try help)");
        assert_eq!(
            mistake("stop", 3),
            "stop needs a member number: stop N (members are 0-2)"
        );
        assert_eq!(
            mistake("restart two", 3),
            "restart needs a member number, not \"two\" (members are 0-2)"
        );
    }
}
