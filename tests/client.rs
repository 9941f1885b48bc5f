//! `bitsfarm upload` as a user runs it: resume across runs through the job file, Ctrl-C with and
//! without `--cancel-on-interrupt`, and the exit codes scripts rely on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, random_bytes, sha256_hex, wait_until};
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
    let record = std::fs::read_to_string(s.session_dir(&id).join("session.json")).unwrap();
    assert!(record.contains("\"cancelled\""), "{record}");
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
