//! The command line as a person meets it, through the real binary: each subcommand's help, the
//! password prompt (through a pipe and on a pseudo-terminal), `drain` without `--pid` on a host,
//! colour in the logs, start-up errors that say what is wrong (a data folder that is a file, an
//! address this machine does not have, a host name), and the server's log of refused sessions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rexpect::process::WaitStatus;

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");
/// How long a command that should end on its own may take.
const LIMIT: Duration = Duration::from_secs(30);

/// Waits up to `LIMIT` for `child`, reading its output meanwhile; kills it if it is still running.
fn finish(mut child: Child, what: &str) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(out.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = reader(err.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for bitsfarm") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `bitsfarm ARGS` with stdin closed and `env` set, at most `LIMIT`.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("BITSFARM_HOST_ID")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bitsfarm");
    finish(child, &format!("bitsfarm {args:?}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// -- help ------------------------------------------------------------------------------------

#[test]
fn each_subcommand_is_described_under_its_own_name() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    let line = |name: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{help}"))
            .to_string()
    };
    let passwd = line("passwd");
    assert!(passwd.contains("--users-file"), "{passwd}");
    let drain = line("drain");
    assert!(
        drain.contains("Drain a running server") && !drain.contains("users-file"),
        "{drain}"
    );

    let passwd = text(&run(&["passwd", "--help"], &[]).stdout);
    assert!(
        passwd.contains("without echo") && passwd.contains("first line of stdin"),
        "{passwd}"
    );
    let drain = text(&run(&["drain", "--help"], &[]).stdout);
    assert!(
        drain.contains("--pid") && drain.contains("process 1") && !drain.contains("[default: 1]"),
        "drain --help must say when process 1 is signalled:\n{drain}"
    );
    for sub in [
        "serve", "upload", "farm", "render", "receiver", "operator", "crd",
    ] {
        let out = run(&[sub, "--help"], &[]);
        assert!(out.status.success(), "{sub} --help: {out:?}");
        assert!(
            text(&out.stdout).contains(&format!("Usage: bitsfarm {sub}")),
            "{sub} --help:\n{}",
            text(&out.stdout)
        );
    }
}

// -- passwd ----------------------------------------------------------------------------------

#[test]
fn passwd_through_a_pipe_reads_the_first_line_and_prints_only_the_entry() {
    let mut child = spawn_passwd("alice");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"first-line\nsecond-line\n")
        .unwrap();
    let out = finish(child, "passwd through a pipe");
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line, the entry: {stdout:?}");
    assert!(lines[0].starts_with("alice:$argon2id$"), "{stdout}");
    assert!(
        out.stderr.is_empty(),
        "no prompt when stdin is not a terminal: {:?}",
        text(&out.stderr)
    );
}

/// `bitsfarm passwd alice > OUT` on a pseudo-terminal with echo on, as a shell leaves it.
fn passwd_on_a_terminal(out: &Path) -> rexpect::session::PtySession {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"stty echo && exec "$0" passwd alice > "$1""#,
        BIN,
        &out.display().to_string(),
    ]);
    rexpect::session::spawn_command(cmd, Some(LIMIT.as_millis() as u64))
        .expect("starting bitsfarm passwd on a pseudo-terminal")
}

#[test]
fn passwd_on_a_terminal_asks_twice_without_echo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("entry");
    let mut p = passwd_on_a_terminal(&out);
    let password = "typed-on-a-terminal";
    p.exp_string("Password for alice: ")
        .expect("a prompt on the terminal");
    p.send_line(password).unwrap();
    p.exp_string("again").expect("asked a second time");
    p.send_line(password).unwrap();
    let rest = p.exp_eof().expect("passwd ends");
    assert!(
        !rest.contains(password),
        "the password was echoed: {rest:?}"
    );
    assert!(
        matches!(p.process().wait(), Ok(WaitStatus::Exited(_, 0))),
        "passwd failed: {rest:?}"
    );
    let entry = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        entry.lines().count(),
        1,
        "stdout holds the entry only: {entry:?}"
    );
    assert!(entry.starts_with("alice:$argon2id$"), "{entry:?}");
}

#[test]
fn passwd_on_a_terminal_refuses_two_different_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("entry");
    let mut p = passwd_on_a_terminal(&out);
    p.exp_string("Password for alice: ")
        .expect("a prompt on the terminal");
    p.send_line("one-password").unwrap();
    p.exp_string("again").expect("asked a second time");
    p.send_line("another-password").unwrap();
    let rest = p.exp_eof().expect("passwd ends");
    assert!(rest.contains("do not match"), "{rest:?}");
    assert!(
        matches!(p.process().wait(), Ok(WaitStatus::Exited(_, code)) if code != 0),
        "a mismatch must fail"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "",
        "no entry printed"
    );
}

// -- drain -----------------------------------------------------------------------------------

/// On this machine, as on any host, process 1 is not a bitsfarm server: `drain` without `--pid`
/// must refuse rather than signal it (and then wait a day for it to exit).
#[test]
fn drain_without_pid_outside_a_servers_container_refuses() {
    let started = Instant::now();
    let out = run(&["drain", "--wait", "5"], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused at once, not after waiting"
    );
    assert!(
        err.contains("process 1 is") && err.contains("--pid"),
        "the message names process 1 and --pid: {err}"
    );
}

#[test]
fn drain_refuses_a_process_that_is_not_a_bitsfarm_server() {
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("starting sleep");
    let pid = sleeper.id().to_string();
    let out = run(&["drain", "--pid", &pid, "--wait", "2"], &[]);
    let err = text(&out.stderr);
    let alive = sleeper.try_wait().unwrap().is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(!out.status.success(), "{err}");
    assert!(alive, "drain signalled sleep (SIGUSR1 ends it): {err}");
    assert!(
        err.contains(&format!(
            "process {pid} is `sleep 30`, not a bitsfarm server"
        )),
        "{err}"
    );
}

#[test]
fn drain_says_which_server_it_drains() {
    let mut s = Server::start(&[]);
    let pid = s.pid().unwrap().to_string();
    let out = run(&["drain", "--pid", &pid, "--wait", "20"], &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("process {pid} (`")) && err.contains(" serve --listen"),
        "{err}"
    );
    assert!(err.contains("drained and exited"), "{err}");
    assert!(s.wait_exit(Duration::from_secs(5)).is_some());
}

/// The pods' preStop hook: drain through the admin address returns once the last session is
/// done, and leaves the server up (empty, unready) for the kubelet's SIGTERM, so that the hook
/// never outlives the server (a hook killed with its container is recorded as failed).
#[test]
fn drain_through_the_admin_address_returns_when_the_sessions_are_done_and_leaves_the_server_up() {
    let mut s = Server::start(&["--admin-listen", "127.0.0.1:0"]);
    let admin = s.admin_addr.expect("an admin address").to_string();
    let r = s.send(&create_request("/up/open.bin"));
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    let mut drain = Command::new(BIN)
        .args(["drain", "--admin", &admin, "--wait", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the session is open, the drain waits and the server takes no new session.
    let mut refused = false;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        if s.send(&create_request("/up/new.bin")).status == 503 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the server kept taking sessions");
    assert!(
        drain.try_wait().unwrap().is_none(),
        "drain returned with a session open"
    );
    let r = s.send(&Request::bits("Close-Session", "/up/open.bin").header("BITS-Session-Id", &id));
    assert_eq!(r.status, 200, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = drain.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "drain did not return after the last Close"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    drain
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("no session left"), "{err}");
    // Still up, and unready, until something stops it.
    assert!(
        s.wait_exit(Duration::from_millis(500)).is_none(),
        "the server exited"
    );
    let ready = Conn::open(s.admin_addr.unwrap())
        .send(&Request::new("GET", "/readyz"))
        .unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    let out = run(&["drain", "--admin", "127.0.0.1:1", "--wait", "5"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--admin-listen"),
        "{}",
        text(&out.stderr)
    );
}

// -- colour ----------------------------------------------------------------------------------

/// A start-up that logs a line and fails at once: the data folder is a file.
fn failing_serve_args(dir: &Path) -> Vec<String> {
    let file = dir.join("afile");
    std::fs::write(&file, b"x").unwrap();
    ["serve", "--listen", "127.0.0.1:0", "--data-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string()])
        .collect()
}

#[test]
fn logs_to_a_pipe_have_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let args = failing_serve_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args, &[]);
    let err = text(&out.stderr);
    assert!(err.contains("INFO"), "a log line was written: {err}");
    assert!(!err.contains('\x1b'), "escape codes on a pipe: {err:?}");
}

fn logs_on_a_terminal(no_color: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(failing_serve_args(dir.path()))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut p = rexpect::session::spawn_command(cmd, Some(LIMIT.as_millis() as u64))
        .expect("starting bitsfarm on a pseudo-terminal");
    let out = p.exp_eof().expect("bitsfarm ends");
    assert!(out.contains("INFO"), "a log line was written: {out:?}");
    out
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    assert!(
        logs_on_a_terminal(None).contains("\x1b["),
        "colour on a terminal"
    );
    assert!(
        logs_on_a_terminal(Some("")).contains("\x1b["),
        "an empty NO_COLOR does not count (no-color.org)"
    );
    let plain = logs_on_a_terminal(Some("1"));
    assert!(!plain.contains('\x1b'), "NO_COLOR=1: {plain:?}");
}

// -- start-up errors -------------------------------------------------------------------------

#[test]
fn a_data_folder_that_is_a_file_is_called_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    for data_dir in [file.clone(), file.join("below")] {
        let d = data_dir.display().to_string();
        let out = run(&["serve", "--listen", "127.0.0.1:0", "--data-dir", &d], &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("{} is a file, not a folder", file.display())),
            "--data-dir {d}: {err}"
        );
        assert!(
            !err.contains("File exists") && !err.contains("Not a directory"),
            "{err}"
        );
    }
}

#[test]
fn a_body_memory_budget_below_one_read_buffer_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data").display().to_string();
    let serve = ["serve", "--listen", "127.0.0.1:0", "--data-dir", &d];
    let out = run(&[&serve[..], &["--max-body-memory", "65535"]].concat(), &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("max-body-memory must be at least 65536 bytes (one read buffer), not 65535"),
        "{err}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is made before the settings are checked"
    );
}

#[test]
fn an_address_this_machine_does_not_have_is_called_so() {
    // TEST-NET-1 (RFC 5737): on no interface here, so binding fails with EADDRNOTAVAIL; no
    // packet is sent anywhere.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data").display().to_string();
    for (flag, port, args) in [
        (
            "listen",
            9000,
            vec!["serve", "--listen", "192.0.2.1:9000", "--data-dir", &d],
        ),
        (
            "admin-listen",
            9001,
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "192.0.2.1:9001",
                "--data-dir",
                &d,
            ],
        ),
    ] {
        let out = run(&args, &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("cannot listen on 192.0.2.1:{port} ({flag})")),
            "{err}"
        );
        assert!(
            err.contains("no network interface of this machine has the address 192.0.2.1"),
            "{err}"
        );
        assert!(!err.contains("another process"), "{err}");
    }
}

#[test]
fn an_address_in_use_is_called_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data").display().to_string();
    let out = run(&["serve", "--listen", &addr, "--data-dir", &d], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another process is listening on it"), "{err}");
}

/// Starts `bitsfarm serve ARGS` and returns its first stdout line (the address it listens on).
fn first_line_of_serve(args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("BITSFARM_HOST_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bitsfarm serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(LIMIT).unwrap_or_default();
    let _ = child.kill();
    let out = finish(child, "serve");
    assert!(!line.is_empty(), "serve {args:?} did not start: {out:?}");
    line.trim_end().to_string()
}

#[test]
fn a_host_name_is_resolved_where_an_address_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data").display().to_string();
    let line = first_line_of_serve(&[
        "--listen",
        "localhost:0",
        "--admin-listen",
        "localhost:0",
        "--data-dir",
        &d,
    ]);
    assert!(
        line.starts_with("bitsfarm: listening on http://127.0.0.1:")
            && line.contains(" admin http://127.0.0.1:"),
        "localhost is 127.0.0.1: {line}"
    );

    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("listen: localhost:0\nadmin-listen: localhost:0\ndata-dir: {d}\n"),
    )
    .unwrap();
    let line = first_line_of_serve(&["--config", &config.display().to_string()]);
    assert!(
        line.starts_with("bitsfarm: listening on http://127.0.0.1:")
            && line.contains(" admin http://127.0.0.1:"),
        "listen: in the file: {line}"
    );

    let out = run(&["serve", "--listen", "localhost", "--data-dir", &d], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("HOST:PORT"), "{err}");

    std::fs::write(&config, "listen: 127.0.0.1\n").unwrap();
    let out = run(&["serve", "--config", &config.display().to_string()], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("HOST:PORT") && err.contains("line 1"), "{err}");
}

// -- refused sessions in the server's log ----------------------------------------------------

/// The server log's lines at info or above that report a refused session.
/// The refusal lines of the log, once there is one (waited for up to 5 s), as one text.
fn logged_refusal(s: &Server) -> String {
    assert!(
        wait_until(Duration::from_secs(5), || !refusal_lines(s).is_empty()),
        "no refusal at info:\n{}",
        s.log_tail()
    );
    refusal_lines(s).join("\n")
}

fn refusal_lines(s: &Server) -> Vec<String> {
    s.log()
        .lines()
        .filter(|l| (l.contains(" INFO ") || l.contains(" WARN ")) && l.contains("session refused"))
        .map(str::to_string)
        .collect()
}

#[test]
fn an_upload_outside_the_upload_directories_is_told_where_they_are() {
    let s = Server::start(&["--upload-path", "/uploads"]);
    let r = s.send(&create_request("/elsewhere/x.bin"));
    assert_error(
        &r,
        404,
        Some("0x80190194"),
        "Create-Session outside /uploads",
    );
    assert_ack_shape(&r, "a 404 Ack");
    assert!(r.body.is_empty(), "an Ack has no body: {r:?}");
    let line = logged_refusal(&s);
    assert!(
        line.contains("/elsewhere/x.bin") && line.contains("/uploads"),
        "the log names the path and the directories served: {line}"
    );

    let r = s.get("/elsewhere/x.bin");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.text().contains("/uploads"), "{r:?}");
}

#[test]
fn an_existing_destination_is_refused_with_a_hint_about_allow_overwrites() {
    let s = Server::start(&[]);
    s.upload("/a.bin", b"first", 1024);
    let r = s.send(&create_request("/a.bin"));
    assert_error(&r, 403, Some(E_ACCESSDENIED), "a second upload to /a.bin");
    let line = logged_refusal(&s);
    assert!(
        line.contains("/a.bin") && line.contains("allow-overwrites"),
        "{line}"
    );
}

#[test]
fn a_refused_session_is_logged_once_and_a_flood_of_refusals_does_not_fill_the_log() {
    let s = Server::start(&[]);
    let id = s.create_session("/b.bin");
    assert_eq!(s.cancel(&id, "/b.bin").status, 200);
    for _ in 0..5 {
        let r = s.fragment(&id, "/b.bin", 0, b"late", 4);
        assert!(r.status >= 400, "{r:?}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || !refusal_lines(&s).is_empty()),
        "no refusal at info:\n{}",
        s.log_tail()
    );
    let about_it = refusal_lines(&s)
        .into_iter()
        .filter(|l| l.contains(&id))
        .count();
    assert_eq!(about_it, 1, "once per session:\n{}", s.log_tail());

    // Every made-up session id is a session of its own: the log takes a few, then says that
    // the rest go to debug only.
    for i in 0..200u32 {
        let made_up = format!("{{{i:08X}-0000-4000-8000-000000000000}}");
        let r = s.fragment(&made_up, "/b.bin", 0, b"x", 1);
        assert!(r.status >= 400, "{r:?}");
    }
    let lines = refusal_lines(&s);
    assert!(
        lines.len() <= 21,
        "{} refusals logged at info for 201 refused sessions",
        lines.len()
    );
    assert!(
        s.log()
            .contains("further refused sessions are logged at debug only"),
        "{}",
        s.log_tail()
    );
}
