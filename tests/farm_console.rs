//! `bitsfarm farm` as a person meets it, through the real binary: the commands typed on its
//! standard input (driven through a pipe), what it says when something is wrong, which member
//! wrote each log line, and what a client shows while it waits for a member that is gone.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{LocalFarm, create_request, expect_line, free_port_block, lines_of, random_bytes};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");

/// The line of `said` that contains `needle`, or a panic naming them all.
fn line_with<'a>(said: &'a [String], needle: &str) -> &'a str {
    said.iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line containing {needle:?} in {said:#?}"))
}

#[test]
fn help_lists_the_commands_and_the_members_and_every_mistake_is_named() {
    let mut farm = LocalFarm::start(3, &[], &[]);
    let said = farm.command("help", "fallback timeout");
    let text = said.join("\n");
    for cmd in [
        "kill N",
        "stop N",
        "restart N",
        "drain N",
        "status",
        "help",
        "exit",
    ] {
        assert!(text.contains(cmd), "help names {cmd:?}: {text}");
    }
    for i in 0..3 {
        line_with(&said, &format!("member {i} http://{}", farm.member(i)));
    }
    assert!(!text.contains("name a member by its number"), "{text}");

    let said = farm.command("kill 9", "member");
    assert!(
        said.last()
            .unwrap()
            .contains("no member 9 (members are 0-2)"),
        "{said:#?}"
    );
    let said = farm.command("foo", "foo");
    assert!(
        said.last()
            .unwrap()
            .contains("unknown command foo (try help)"),
        "{said:#?}"
    );
    let said = farm.command("kill", "kill");
    assert!(
        said.last().unwrap().contains("kill needs a member number"),
        "{said:#?}"
    );

    farm.command("kill 2", "member 2 killed");
    for again in ["kill 2", "stop 2", "drain 2"] {
        let said = farm.command(again, "member 2");
        let last = said.last().unwrap();
        assert!(last.contains("member 2 is already down"), "{again}: {last}");
        assert!(!last.contains("member 2 killed"), "{again}: {last}");
    }
    let said = farm.command("status", "fallback timeout");
    assert!(
        line_with(&said, "member 2 http://").contains(" down"),
        "{said:#?}"
    );
    farm.command("restart 2", "member 2 restarted");
    let said = farm.command("status", "fallback timeout");
    assert!(
        line_with(&said, "member 2 http://").contains(" running"),
        "{said:#?}"
    );
}

/// The local farm's clients fall back after a demo-sized timeout unless told otherwise; the farm
/// says so at start and in `status`, and a member told to drain shows as draining while it still
/// has a session.
#[test]
fn status_shows_the_fallback_timeout_and_a_draining_member() {
    let mut farm = LocalFarm::start(2, &[], &[]);
    let said = line_with(&farm.started, "fallback timeout");
    assert!(said.contains("host-id fallback timeout 30 s"), "{said}");
    assert!(said.contains("--host-id-fallback-timeout"), "{said}");

    // What the members tell clients.
    let created = common::Conn::open(farm.shared)
        .send(&create_request("/up/open.bin"))
        .expect("Create-Session through the shared address");
    assert_eq!(created.status, 200, "{created:?}");
    assert_eq!(
        created.header("BITS-Host-Id-Fallback-Timeout"),
        Some("30"),
        "{created:?}"
    );
    let owner = farm.member_of(created.header("BITS-Host-Id").expect("a host id"));
    let other = 1 - owner;

    farm.command(&format!("drain {owner}"), "draining");
    let said = farm.command("status", "fallback timeout");
    let line = line_with(&said, &format!("member {owner} http://"));
    assert!(line.contains("draining (1 session left)"), "{said:#?}");
    assert!(
        line_with(&said, &format!("member {other} http://")).contains(" running"),
        "{said:#?}"
    );
    assert!(
        line_with(&said, "fallback timeout").contains("30 s"),
        "{said:#?}"
    );

    // One set on the command line is the one used, and said without the default's hint.
    let farm = LocalFarm::start(1, &[], &["--host-id-fallback-timeout", "7"]);
    let said = line_with(&farm.started, "fallback timeout");
    assert!(said.contains("host-id fallback timeout 7 s"), "{said}");
    assert!(!said.contains("default"), "{said}");
}

#[test]
fn a_taken_receiver_port_is_named_as_the_receivers() {
    let base = free_port_block(4);
    // Two members: the shared port, the members' two, then the receiver's.
    let receiver_port = base + 3;
    let _holder = TcpListener::bind(("127.0.0.1", receiver_port)).expect("holding the port");
    let mut farm = LocalFarm::spawn_at(base, 2, &[], &["--receiver"]);
    let code = farm.wait_exit(Duration::from_secs(60));
    assert!(
        matches!(code, Some(c) if c != 0),
        "the farm went on with its receiver's port taken: {code:?}"
    );
    let err = farm.stderr_for(Duration::from_secs(2)).join("\n");
    assert!(
        err.contains(&format!("the receiver's port {receiver_port} is taken")),
        "{err}"
    );
    assert!(!err.contains("did not start"), "{err}");
}

/// Which member wrote a log line: `[member N]` before each text line; a `member` field in each
/// JSON line, every line still one JSON object.
#[test]
fn member_log_lines_name_their_member_in_text_and_in_json() {
    let serving = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("serving BITS uploads"))
            .cloned()
            .collect()
    };
    let farm = LocalFarm::start(2, &[], &["--receiver"]);
    let lines = farm.stderr_for(Duration::from_secs(3));
    let found = serving(&lines);
    assert_eq!(found.len(), 2, "{lines:#?}");
    for i in 0..2 {
        assert!(
            found
                .iter()
                .any(|l| l.starts_with(&format!("[member {i}] "))),
            "{found:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[receiver] ") && l.contains("reference server application")),
        "{lines:#?}"
    );
    drop(farm);

    let farm = LocalFarm::start(2, &["--log-format", "json"], &["--receiver"]);
    let lines = farm.stderr_for(Duration::from_secs(3));
    let mut members = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.is_object(), "{l}");
        if v["message"] == "serving BITS uploads" {
            members.push(v["member"].as_u64().unwrap_or_else(|| panic!("{l}")));
        }
    }
    members.sort();
    assert_eq!(members, [0, 1], "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"receiver\":\"127.0.0.1:")),
        "{lines:#?}"
    );
}

/// A `bitsfarm upload` of `file` to `url`; stdout and stderr piped.
fn upload(file: &Path, url: &str, extra: &[&str]) -> Child {
    Command::new(BIN)
        .arg("upload")
        .arg(file)
        .arg(url)
        .args([
            "--no-resume",
            "--fragment-size",
            "65536",
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "120",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bitsfarm upload")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn data_file(dir: &Path, len: usize, seed: u64) -> PathBuf {
    let path = dir.join(format!("upload-{seed}.bin"));
    std::fs::write(&path, random_bytes(len, seed)).unwrap();
    path
}

/// The local farm's default fallback, seen by a client whose member is killed mid-upload: it
/// says which host it waits for, how often it has tried, and when it falls back (a `waiting`
/// event in `--json`), instead of an estimate of the time left.
#[test]
fn a_client_of_a_killed_member_says_it_waits_for_that_host_until_it_falls_back() {
    let mut farm = LocalFarm::start(2, &[], &["--receiver"]);
    let work = TempDir::new().unwrap();
    let file = data_file(work.path(), 16 << 20, 11);
    let mut up = upload(
        &file,
        &format!("http://{}/up/w.bin", farm.shared),
        &["--json"],
    );
    let out = lines_of(up.stdout.take().unwrap());
    let _up = Killed(up);
    let session = expect_line(&out, "\"session\"", Duration::from_secs(60));
    let session: serde_json::Value = serde_json::from_str(session.last().unwrap()).unwrap();
    let host = session["host_id"].as_str().expect("a host id").to_string();
    expect_line(&out, "\"progress\"", Duration::from_secs(60));
    farm.command(&format!("kill {}", farm.member_of(&host)), "killed");
    let killed = Instant::now();

    let mut last_left = u64::MAX;
    for retry in 1..=2u64 {
        let seen = expect_line(&out, "\"waiting\"", Duration::from_secs(30));
        let w: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
        assert_eq!(w["host"], host.as_str(), "{w}");
        assert_eq!(w["retry"].as_u64(), Some(retry), "{w}");
        let left = w["falls_back_in_s"].as_u64().expect("falls_back_in_s");
        // The local farm's 30 s, not a day.
        assert!(left <= 30, "{w}");
        assert!(left + killed.elapsed().as_secs() + 2 >= 30, "{w}");
        assert!(left <= last_left, "{w}");
        last_left = left;
    }
}

/// Without `--json` and without a terminal, what the progress line would show goes to stderr
/// as plain lines: which host the client waits for, then where it fell back to.
#[test]
fn without_a_terminal_the_upload_writes_its_waiting_and_fallback_as_lines() {
    let mut farm = LocalFarm::start(2, &[], &["--receiver", "--host-id-fallback-timeout", "2"]);
    let work = TempDir::new().unwrap();
    let file = data_file(work.path(), 16 << 20, 12);
    let url = format!("http://{}/up/p.bin", farm.shared);
    let mut up = upload(&file, &url, &[]);
    let err = lines_of(up.stderr.take().unwrap());
    let mut up = Killed(up);
    // The job file names the session's host once a fragment got through.
    let job = PathBuf::from(format!("{}.bitsjob", file.display()));
    let mut host = None;
    assert!(
        common::wait_until(Duration::from_secs(60), || {
            let j: Option<serde_json::Value> = std::fs::read(&job)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            host = j
                .filter(|j| j["offset"].as_u64() > Some(0))
                .and_then(|j| j["host-id"].as_str().map(str::to_string));
            host.is_some()
        }),
        "no job file with progress at {}",
        job.display()
    );
    let host = host.unwrap();
    farm.command(&format!("kill {}", farm.member_of(&host)), "killed");
    let seen = expect_line(
        &err,
        &format!("waiting for host {host} (retry 1, falls back in "),
        Duration::from_secs(30),
    );
    let seen2 = expect_line(
        &err,
        &format!("fell back to {url}"),
        Duration::from_secs(30),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(Some(s)) = up.0.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "the upload did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{seen:#?} {seen2:#?}");
    for l in seen.iter().chain(&seen2) {
        assert!(!l.contains("eta"), "{l}");
    }
}
