//! `bitsfarm upload` as a user runs it: resume across runs through the job file, Ctrl-C with and
//! without `--cancel-on-interrupt`, and the exit codes scripts rely on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{Server, lines_of, random_bytes, sha256_hex, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");
const FRAGMENT: u64 = 65_536;

fn upload_cmd(file: &Path, url: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("upload")
        .arg(file)
        .arg(url)
        .args(["--json", "--fragment-size", &FRAGMENT.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn");
    c
}

fn report(out: &Output) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .next_back()
        .unwrap_or_default()
}

fn job_offset(job: &Path) -> u64 {
    std::fs::read(job)
        .ok()
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
        .and_then(|v| v["offset"].as_u64())
        .unwrap_or(0)
}

fn job_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".bitsjob");
    p.into()
}

/// Starts an upload of a 32 MiB file and waits until at least 1 MiB is acknowledged.
fn start_and_wait(s: &Server, dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, Vec<u8>, Child) {
    let data = random_bytes(32 << 20, 21);
    let file = dir.join(name);
    std::fs::write(&file, &data).unwrap();
    let child = upload_cmd(&file, &format!("http://{}/c/{name}", s.addr), extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let job = job_path(&file);
    assert!(
        wait_until(Duration::from_secs(60), || job_offset(&job) >= 1 << 20),
        "the upload made no progress"
    );
    (file, data, child)
}

fn wait_exit(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("the client did not exit");
}

#[test]
fn a_killed_upload_resumes_on_the_next_run_from_the_job_file() {
    let s = Server::start(&[]);
    let dir = tempfile::TempDir::new().unwrap();
    let (file, data, mut child) = start_and_wait(&s, dir.path(), "resume.bin", &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    let acked = job_offset(&job_path(&file));
    assert!(acked < data.len() as u64, "finished before it was killed");
    let out = upload_cmd(&file, &format!("http://{}/c/resume.bin", s.addr), &[])
        .output()
        .unwrap();
    let r = report(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["report"]["resumed"], true, "{r}");
    assert_eq!(r["report"]["sessions"], 1, "{r}");
    let sent = r["report"]["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= data.len() as u64 - acked + FRAGMENT,
        "sent {sent} bytes again after {acked} were acknowledged"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(s.data_dir.join("c/resume.bin")).unwrap()),
        sha256_hex(&data)
    );
    assert!(
        !job_path(&file).exists(),
        "the job file is removed once done"
    );
}

/// The session and host a resumed upload goes on with, from its job file.
fn job_session(file: &Path) -> (String, String) {
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_path(file)).unwrap()).unwrap();
    (
        job["session-id"].as_str().unwrap().to_string(),
        job["host-id"].as_str().unwrap_or_default().to_string(),
    )
}

/// A resumed upload's summary names the session and host it finished in, in the --json report
/// and in the text line, as a first run's does (it used to say `session ,`).
#[test]
fn a_resumed_upload_names_its_session_and_host() {
    let s = Server::start(&["--host-id", "127.0.0.1"]);
    let dir = tempfile::TempDir::new().unwrap();

    let (file, _, mut child) = start_and_wait(&s, dir.path(), "named.bin", &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    let (id, host) = job_session(&file);
    assert!(id.starts_with('{') && host == "127.0.0.1", "{id} {host}");
    let out = upload_cmd(&file, &format!("http://{}/c/named.bin", s.addr), &[])
        .output()
        .unwrap();
    let r = report(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["report"]["resumed"], true, "{r}");
    assert_eq!(r["report"]["session_id"], id.as_str(), "{r}");
    assert_eq!(r["report"]["host_id"], host.as_str(), "{r}");
    assert_eq!(r["report"]["url_path"], "/c/named.bin", "{r}");
    let events = String::from_utf8_lossy(&out.stdout);
    let session_event = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "session")
        .unwrap_or_else(|| panic!("no session event on resume: {events}"));
    assert_eq!(session_event["id"], id.as_str(), "{events}");

    // The text summary, on stderr.
    let (file, _, mut child) = start_and_wait(&s, dir.path(), "text.bin", &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    let (id, _) = job_session(&file);
    let out = Command::new(BIN)
        .arg("upload")
        .arg(&file)
        .arg(format!("http://{}/c/text.bin", s.addr))
        .args(["--fragment-size", &FRAGMENT.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("session {id}")) && text.contains("host 127.0.0.1"),
        "{text}"
    );
    assert!(!text.contains("session ,"), "{text}");
    assert!(text.contains("on the server: /c/text.bin"), "{text}");
}

#[test]
fn ctrl_c_keeps_the_job_for_later_unless_asked_to_cancel() {
    let s = Server::start(&[]);
    let dir = tempfile::TempDir::new().unwrap();

    // Without --cancel-on-interrupt: exit 4, the job stays, the next run resumes.
    let (file, data, child) = start_and_wait(&s, dir.path(), "keep.bin", &[]);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(4), "{}", report(&out));
    assert!(job_path(&file).exists());
    let out = upload_cmd(&file, &format!("http://{}/c/keep.bin", s.addr), &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(report(&out)["report"]["resumed"], true);
    assert_eq!(std::fs::read(s.data_dir.join("c/keep.bin")).unwrap(), data);

    // With it: exit 4, Cancel-Session sent, the job file gone, nothing committed.
    let (file, _, child) = start_and_wait(&s, dir.path(), "drop.bin", &["--cancel-on-interrupt"]);
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_path(&file)).unwrap()).unwrap();
    let id = job["session-id"].as_str().unwrap().to_string();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(4));
    assert!(!job_path(&file).exists(), "the job file is removed");
    // The session's tombstone: its record, renamed for how it ended.
    assert!(
        s.session_dir(&id).join("cancelled.json").is_file(),
        "the session was cancelled"
    );
    assert!(!s.data_dir.join("c/drop.bin").exists());
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let s = Server::start(&[]);
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("x.bin");
    std::fs::write(&file, b"hello").unwrap();
    let url = format!("http://{}/c/x.bin", s.addr);
    let ok = upload_cmd(&file, &url, &[]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));

    // The name is taken (no overwrites): refused by the server.
    let refused = upload_cmd(&file, &url, &[]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("0x80070005"),
        "the error code is reported"
    );

    // Bad arguments and a missing file.
    let bad = upload_cmd(&file, "ftp://x/y", &[]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let missing = upload_cmd(&dir.path().join("nope"), &url, &[])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));

    // Nobody listening: retried until the no-progress timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let down = upload_cmd(
        &file,
        &format!("http://127.0.0.1:{port}/c/y.bin"),
        &[
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "2",
            "--no-resume",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(down.status.code(), Some(3), "{}", report(&down));
    assert!(started.elapsed() >= Duration::from_secs(2));
}

/// A port on 127.0.0.1 that nothing listens on, below the kernel's ephemeral range (so no
/// outgoing connection of this test takes it meanwhile).
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (0..500u32)
        .map(|i| 20_000 + ((seed.wrapping_add(i * 7919)) % 12_000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port on 127.0.0.1")
}

/// A child process SIGKILLed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server a session's host id names refuses connections for a while (it is not up yet): the
/// client retries, and fragments that never reached a socket are not counted as sent. When that
/// server comes up on the session's data folder, the upload finishes with exactly the file's size
/// on the wire.
#[test]
fn fragments_to_a_host_that_refuses_connections_are_retried_but_not_counted_as_sent() {
    let port = free_port();
    let host_id = format!("127.0.0.1:{port}");
    // The server that takes Create-Session names a host id where nothing listens yet.
    let mut front = Server::start(&["--host-id", &host_id]);
    let dir = tempfile::TempDir::new().unwrap();
    let data = random_bytes(1 << 20, 33);
    let file = dir.path().join("late.bin");
    std::fs::write(&file, &data).unwrap();
    let started = Instant::now();
    let mut child = upload_cmd(
        &file,
        &format!("http://{}/c/late.bin", front.addr),
        &[
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "60",
            "--no-resume",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let mut client = Killed(child);

    // Two refused fragments (a retry each) before the host comes up.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen
        .iter()
        .filter(|l: &&String| l.contains("\"event\":\"retry\""))
        .count()
        < 2
    {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("fewer than 2 retries within 30 s: {seen:#?}"));
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(e) => panic!("the client's output ended ({e}): {seen:#?}"),
        }
    }
    for l in seen.iter().filter(|l| l.contains("\"event\":\"retry\"")) {
        assert!(
            l.contains("connect"),
            "the retry is for a refused connection: {l}"
        );
    }
    assert!(
        !seen.iter().any(|l| l.contains("\"progress\"")),
        "a fragment got through to a host that is not up: {seen:#?}"
    );

    // The host id's server comes up on the session's data folder (the front server lets go of it).
    front.kill();
    let log = std::fs::File::create(dir.path().join("host.log")).unwrap();
    let mut host = Command::new(BIN)
        .args(["serve", "--listen", &host_id, "--data-dir"])
        .arg(&front.data_dir)
        .env("RUST_LOG", "bitsfarm=info")
        .env_remove("BITSFARM_HOST_ID")
        .env_remove("BITSFARM_TEST_PAUSE_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let host_lines = lines_of(host.stdout.take().unwrap());
    let _host = Killed(host);
    let first = host_lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the host id's server starts");
    assert!(first.contains(&host_id), "{first}");

    let out = wait_exit_of(&mut client.0, &lines, &mut seen);
    let r: serde_json::Value = seen
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .next_back()
        .unwrap_or_default();
    assert_eq!(out, Some(0), "{seen:#?}");
    let report = &r["report"];
    assert_eq!(
        report["bytes_sent"].as_u64(),
        Some(data.len() as u64),
        "refused fragments were counted as sent: {r}"
    );
    assert!(report["retries"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(report["sessions"], 1, "{r}");
    assert_eq!(report["restarts"], 0, "{r}");
    assert_eq!(report["fallbacks"], 0, "{r}");
    assert_eq!(report["host_id"], host_id.as_str(), "{r}");
    assert_eq!(
        sha256_hex(&std::fs::read(front.data_dir.join("c/late.bin")).unwrap()),
        sha256_hex(&data)
    );
    eprintln!("uploaded in {:?}", started.elapsed());
}

/// Waits (at most 60 s) for `child` to exit, collecting its stdout lines into `seen`; its exit code.
fn wait_exit_of(
    child: &mut Child,
    lines: &Receiver<String>,
    seen: &mut Vec<String>,
) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        seen.extend(lines.try_iter());
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("the client did not finish within 60 s: {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = lines.recv_timeout(Duration::from_secs(2)) {
        seen.push(l);
    }
    status.code()
}

/// A host id that takes every packet but Close-Session: it relays each request to `server` and
/// its answer back, and drops the connection on a Close-Session. Counts the Closes it dropped.
fn host_that_drops_close(
    listener: std::net::TcpListener,
    server: std::net::SocketAddr,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dropped = std::sync::Arc::new(AtomicUsize::new(0));
    let count = dropped.clone();
    /// One HTTP message (head and Content-Length body), or None at the end of the stream.
    fn message(r: &mut BufReader<std::net::TcpStream>) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some((head, body))
    }
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut from_client = BufReader::new(conn.try_clone().unwrap());
                let mut to_client = conn;
                while let Some((head, body)) = message(&mut from_client) {
                    if head
                        .to_ascii_lowercase()
                        .contains("bits-packet-type: close-session")
                    {
                        count.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let Ok(up) = std::net::TcpStream::connect(server) else {
                        return;
                    };
                    up.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let mut up_w = up.try_clone().unwrap();
                    if up_w
                        .write_all(head.as_bytes())
                        .and_then(|_| up_w.write_all(&body))
                        .is_err()
                    {
                        return;
                    }
                    let Some((rhead, rbody)) = message(&mut BufReader::new(up)) else {
                        return;
                    };
                    if to_client
                        .write_all(rhead.as_bytes())
                        .and_then(|_| to_client.write_all(&rbody))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    dropped
}

/// A host id that stops answering after the last fragment: Close-Session falls back to the
/// original URL once the fallback timeout has passed, as every other packet does, instead of
/// being retried at the silent host until the no-progress timeout gives up.
#[test]
fn close_session_falls_back_to_the_original_url_when_its_host_stops_answering() {
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_id = host.local_addr().unwrap().to_string();
    let server = Server::start(&["--host-id", &host_id, "--host-id-fallback-timeout", "2"]);
    let dropped = host_that_drops_close(host, server.addr);
    let dir = tempfile::TempDir::new().unwrap();
    let data = random_bytes(3 * FRAGMENT as usize, 41);
    let file = dir.path().join("closing.bin");
    std::fs::write(&file, &data).unwrap();
    let out = upload_cmd(
        &file,
        &format!("http://{}/c/closing.bin", server.addr),
        &[
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "20",
            "--no-resume",
        ],
    )
    .output()
    .unwrap();
    let events = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the upload failed: {out:?}");
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no Close reached the host id"
    );
    assert!(events.contains("\"event\":\"waiting\""), "{events}");
    assert!(events.contains("\"event\":\"fallback\""), "{events}");
    assert_eq!(
        std::fs::read(server.data_dir.join("c/closing.bin")).expect("committed"),
        data
    );
}
