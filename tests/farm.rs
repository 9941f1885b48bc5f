//! End-to-end tests of a farm's promises with real processes on 127.0.0.1: `bitsfarm farm` (members
//! behind one SO_REUSEPORT address), `bitsfarm upload` (the client) and `bitsfarm receiver`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Conn, Request, expect_line, free_port_block, lines_of, metric_value, random_bytes, sha256_hex,
};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");

/// A running `bitsfarm farm`; told to exit (and killed if it will not) on drop.
struct Farm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    shared: SocketAddr,
    data: TempDir,
    replicas: u16,
    /// Each member's admin address (metrics, drain), as the farm announced it.
    admins: Vec<Option<SocketAddr>>,
}

/// `(N, ADDR)` from a farm line `member N ... admin http://ADDR`.
fn announced_admin(line: &str) -> Option<(u16, SocketAddr)> {
    let rest = line.split_once("member ")?.1;
    let index = rest.split_whitespace().next()?.parse().ok()?;
    let addr = rest.split_once(" admin http://")?.1.trim().parse().ok()?;
    Some((index, addr))
}

impl Farm {
    fn start(replicas: u16, extra: &[&str]) -> Farm {
        let base = free_port_block(replicas + 2);
        let shared: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
        let data = tempfile::Builder::new()
            .prefix("bitsfarm-farm-")
            .tempdir()
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["farm", "--replicas", &replicas.to_string(), "--shared"])
            .arg(shared.to_string())
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("BITSFARM_TEST_PAUSE_AT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting bitsfarm farm");
        let stdin = child.stdin.take().unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        let seen = expect_line(&lines, "ready", Duration::from_secs(60));
        let mut farm = Farm {
            child,
            stdin,
            lines,
            shared,
            data,
            replicas,
            admins: vec![None; usize::from(replicas)],
        };
        farm.note_admins(&seen);
        farm
    }

    fn note_admins(&mut self, lines: &[String]) {
        for (i, addr) in lines.iter().filter_map(|l| announced_admin(l)) {
            if let Some(slot) = self.admins.get_mut(usize::from(i)) {
                *slot = Some(addr);
            }
        }
    }

    /// Where member `i` serves its metrics and drain: its admin address.
    fn admin(&self, i: u16) -> SocketAddr {
        self.admins[usize::from(i)]
            .unwrap_or_else(|| panic!("member {i} announced no admin address"))
    }

    fn member(&self, i: u16) -> SocketAddr {
        SocketAddr::new(self.shared.ip(), self.shared.port() + 1 + i)
    }

    fn member_of(&self, host_id: &str) -> u16 {
        let addr: SocketAddr = host_id.parse().expect("host id is an address");
        addr.port() - self.shared.port() - 1
    }

    fn command(&mut self, cmd: &str, expect: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let seen = expect_line(&self.lines, expect, Duration::from_secs(30));
        self.note_admins(&seen);
    }

    fn member_metrics(&self, i: u16) -> String {
        let r = Conn::open(self.admin(i))
            .send(&Request::new("GET", "/metrics"))
            .expect("GET /metrics of a member");
        r.text()
    }

    fn fragments_per_member(&self) -> Vec<f64> {
        (0..self.replicas)
            .map(|i| {
                metric_value(
                    &self.member_metrics(i),
                    "bitsfarm_packets_total{packet=\"Fragment\"}",
                )
            })
            .collect()
    }

    /// Deliveries the farm's receiver stored: (key, SHA-256 of the content).
    fn received(&self) -> Vec<(String, String)> {
        stored_deliveries(&self.data.path().join(format!(
            "received-{}",
            self.shared.port() + 1 + self.replicas
        )))
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stored_deliveries(dir: &Path) -> Vec<(String, String)> {
    common::stored_deliveries(dir)
        .into_iter()
        .map(|d| (d.key, d.content_sha256))
        .collect()
}

/// A `bitsfarm upload --json` run in the background.
struct Upload {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Upload {
    fn start(file: &Path, url: &str, extra: &[&str]) -> Upload {
        let mut child = Command::new(BIN)
            .arg("upload")
            .arg(file)
            .arg(url)
            .args(["--json", "--no-resume"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting bitsfarm upload");
        let lines = lines_of(child.stdout.take().unwrap());
        Upload {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_event(&mut self, needle: &str) -> serde_json::Value {
        let lines = expect_line(&self.lines, needle, Duration::from_secs(60));
        self.seen.extend(lines.iter().cloned());
        serde_json::from_str(lines.last().unwrap()).expect("a JSON event")
    }

    /// Waits for the end; returns the exit code and the final report.
    fn finish(mut self, limit: Duration) -> (i32, serde_json::Value) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the upload did not finish within {limit:?}; saw {:#?}",
                    self.seen
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        let mut last = serde_json::Value::Null;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                last = v;
            }
            self.seen.push(l);
        }
        (status.code().unwrap_or(-1), last)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_file(dir: &Path, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = random_bytes(len, seed);
    let path = dir.join(format!("upload-{seed}.bin"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn report_u64(report: &serde_json::Value, key: &str) -> u64 {
    report["report"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("report.{key} in {report}"))
}

#[test]
fn with_host_ids_every_packet_after_create_session_lands_on_one_member() {
    let farm = Farm::start(3, &["--receiver"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 2 << 20, 1);
    // A new connection per packet: without host ids these would spread over the members.
    let mut up = Upload::start(
        &file,
        &format!("http://{}/up/a.bin", farm.shared),
        &[
            "--fragment-size",
            "262144",
            "--no-keep-alive",
            "--retry-delay",
            "1",
        ],
    );
    let session = up.wait_event("\"session\"");
    let owner = farm.member_of(session["host_id"].as_str().expect("a host id"));
    let (code, report) = up.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report_u64(&report, "restarts"), 0);
    assert_eq!(report_u64(&report, "bytes_sent"), data.len() as u64);
    let per_member = farm.fragments_per_member();
    for (i, n) in per_member.iter().enumerate() {
        let expected = if i as u16 == owner { 8.0 } else { 0.0 };
        assert_eq!(
            *n, expected,
            "Fragments per member: {per_member:?}, owner {owner}"
        );
    }
    let got = farm.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, sha256_hex(&data));
}

/// Five uploads of `file` through the shared address, 64 KiB fragments, each packet on a new
/// connection (so any member may get it), to `/up/{prefix}{round}.bin?tag={round}`. Gives the
/// restarts and bytes sent they took in all.
fn uploads_without_affinity(farm: &Farm, file: &Path, prefix: &str) -> (u64, u64) {
    let (mut restarts, mut sent) = (0, 0);
    for round in 0..5 {
        let up = Upload::start(
            file,
            &format!("http://{}/up/{prefix}{round}.bin?tag={round}", farm.shared),
            &[
                "--fragment-size",
                "65536",
                "--no-keep-alive",
                "--retry-delay",
                "0",
            ],
        );
        let (code, report) = up.finish(Duration::from_secs(60));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["report"]["host_id"], serde_json::Value::Null);
        restarts += report_u64(&report, "restarts");
        sent += report_u64(&report, "bytes_sent");
    }
    (restarts, sent)
}

#[test]
fn without_host_ids_sessions_break_and_restart_from_zero() {
    // The number this project exists to improve: bytes resent and restarts when a farm has no
    // affinity (every connection may land on another member) and, as with IIS, no handoff.
    let farm = Farm::start(2, &["--receiver", "--no-host-id", "--no-handoff"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 128 << 10, 2);
    let (restarts, sent) = uploads_without_affinity(&farm, &file, "r");
    let size = 5 * data.len() as u64;
    println!(
        "without host ids: 5 uploads of {} bytes, {restarts} restarts from zero, {} bytes resent ({:.1}x the data)",
        data.len(),
        sent - size,
        sent as f64 / size as f64
    );
    // Each upload needs its 2 fragments and Close to reach the member of its session by chance:
    // with 2 members all 5 uploads avoiding a restart has a probability of (1/8)^5.
    assert!(restarts > 0, "no session ever broke");
    assert!(sent > size);
    let got = farm.received();
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(|(_, sha)| *sha == sha256_hex(&data)));
}

/// The uploads of `without_host_ids_sessions_break_and_restart_from_zero`, on a farm of 3 with
/// handoff on (the default): a packet that lands on the wrong member is handed to the owner.
#[test]
fn with_handoff_a_farm_without_host_ids_never_restarts_and_resends_nothing() {
    let farm = Farm::start(3, &["--receiver", "--no-host-id"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 128 << 10, 2);
    let (restarts, sent) = uploads_without_affinity(&farm, &file, "h");
    let size = 5 * data.len() as u64;
    let forwarded: f64 = (0..farm.replicas)
        .map(|i| {
            metric_value(
                &farm.member_metrics(i),
                "bitsfarm_handoff_forwarded_packets_total{packet=\"Fragment\",outcome=\"forwarded\"}",
            )
        })
        .sum();
    let forwarded_bytes: f64 = (0..farm.replicas)
        .map(|i| {
            metric_value(
                &farm.member_metrics(i),
                "bitsfarm_handoff_forwarded_bytes_total",
            )
        })
        .sum();
    println!(
        "with handoff, without host ids: 5 uploads of {} bytes, {restarts} restarts, {} bytes resent; {forwarded} fragments ({forwarded_bytes} bytes) handed to their owner",
        data.len(),
        sent - size
    );
    assert_eq!(restarts, 0);
    assert_eq!(sent, size, "no byte was sent twice");
    // 10 fragments, each on a new connection to one of 3 members: all landing on their owner
    // by chance has a probability of (1/3)^10.
    assert!(forwarded > 0.0, "no packet was handed on");
    assert!(forwarded_bytes >= 65536.0);
    let got = farm.received();
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(|(_, sha)| *sha == sha256_hex(&data)));
    // The backend saw the URL the client used (the shared address), not a member's own address.
    let meta = common::stored_deliveries(&farm.data.path().join(format!(
        "received-{}",
        farm.shared.port() + 1 + farm.replicas
    )))
    .into_iter()
    .map(|d| d.record.to_string())
    .collect::<Vec<_>>();
    assert_eq!(meta.len(), 5, "{meta:?}");
    assert!(
        meta.iter()
            .all(|t| t.contains(&format!("http://{}/up/h", farm.shared)) && t.contains("?tag=")),
        "{meta:?}"
    );
}

/// Without host ids and with handoff, the owner killed mid-upload: the member the client reaches
/// answers "retry" while the owner might come back, then, once the owner has refused connections
/// for the fallback timeout, "session not found", and the client starts again there, as BITS
/// does after a fallback.
#[test]
fn with_handoff_a_killed_owner_makes_the_client_restart_elsewhere() {
    let mut farm = Farm::start(
        2,
        &[
            "--receiver",
            "--no-host-id",
            "--host-id-fallback-timeout",
            "2",
        ],
    );
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 3 << 20, 5);
    let mut up = Upload::start(
        &file,
        &format!("http://{}/up/gone.bin", farm.shared),
        &[
            "--fragment-size",
            "65536",
            "--no-keep-alive",
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "60",
        ],
    );
    up.wait_event("\"progress\"");
    let owner = (0..farm.replicas)
        .find(|&i| metric_value(&farm.member_metrics(i), "bitsfarm_sessions_active") >= 1.0)
        .expect("one member holds the session");
    farm.command(&format!("kill {owner}"), "killed");
    let killed = Instant::now();
    let (code, report) = up.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{report}");
    assert!(report_u64(&report, "restarts") >= 1, "{report}");
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "restarted before the owner's grace was over"
    );
    let survivor = 1 - owner;
    let down = metric_value(
        &farm.member_metrics(survivor),
        "bitsfarm_handoff_forwarded_packets_total{packet=\"Fragment\",outcome=\"owner_down\"}",
    );
    assert!(down >= 1.0, "the survivor never told the client to retry");
    let gone = metric_value(
        &farm.member_metrics(survivor),
        "bitsfarm_handoff_forwarded_packets_total{packet=\"Fragment\",outcome=\"owner_gone\"}",
    );
    assert!(gone >= 1.0, "the survivor never tried the dead owner");
    let got = farm.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, sha256_hex(&data));
}

#[test]
fn a_killed_member_is_left_after_the_fallback_timeout_and_the_upload_finishes_elsewhere() {
    let mut farm = Farm::start(2, &["--receiver", "--host-id-fallback-timeout", "2"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 3 << 20, 3);
    let mut up = Upload::start(
        &file,
        &format!("http://{}/up/k.bin", farm.shared),
        &[
            "--fragment-size",
            "65536",
            "--retry-delay",
            "1",
            "--no-progress-timeout",
            "60",
        ],
    );
    let session = up.wait_event("\"session\"");
    let owner = farm.member_of(session["host_id"].as_str().unwrap());
    up.wait_event("\"progress\"");
    farm.command(&format!("kill {owner}"), "killed");
    let started = Instant::now();
    let (code, report) = up.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{report}");
    assert!(report_u64(&report, "fallbacks") >= 1, "{report}");
    assert!(report_u64(&report, "restarts") >= 1, "{report}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "fell back before the fallback timeout"
    );
    let got = farm.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].1,
        sha256_hex(&data),
        "the file at the backend is complete"
    );
}

#[test]
fn a_restarted_member_resumes_the_upload_without_resending() {
    let mut farm = Farm::start(2, &["--receiver", "--host-id-fallback-timeout", "60"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 4 << 20, 4);
    let fragment = 131_072u64;
    let mut up = Upload::start(
        &file,
        &format!("http://{}/up/s.bin", farm.shared),
        &[
            "--fragment-size",
            &fragment.to_string(),
            "--retry-delay",
            "1",
        ],
    );
    let session = up.wait_event("\"session\"");
    let owner = farm.member_of(session["host_id"].as_str().unwrap());
    up.wait_event("\"progress\"");
    farm.command(&format!("kill {owner}"), "killed");
    farm.command(&format!("restart {owner}"), "restarted");
    let (code, report) = up.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report_u64(&report, "restarts"), 0, "{report}");
    assert_eq!(report_u64(&report, "sessions"), 1, "{report}");
    let resent = report_u64(&report, "bytes_sent") - data.len() as u64;
    assert!(resent <= fragment, "resent {resent} bytes: {report}");
    let got = farm.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, sha256_hex(&data));
}

/// The seed's duplicate: a member dies after the backend took the file and before the client got
/// its Ack; after the fallback another member receives the whole file and delivers it again. The
/// receiver stores it once, because both deliveries carry the same Idempotency-Key.
#[test]
fn a_duplicate_delivery_after_fallback_is_stored_once() {
    let base = free_port_block(4);
    let shared = format!("127.0.0.1:{base}");
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", base + 1),
        format!("127.0.0.1:{}", base + 2),
    );
    let root = TempDir::new().unwrap();
    let mut receiver = Command::new(BIN)
        .args([
            "receiver",
            "--listen",
            &format!("127.0.0.1:{}", base + 3),
            "--dir",
        ])
        .arg(root.path().join("received"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx_lines = lines_of(receiver.stdout.take().unwrap());
    expect_line(&rx_lines, "listening", Duration::from_secs(30));
    let member = |addr: &str, dir: &str, pause: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args([
            "serve",
            "--listen",
            addr,
            "--shared-listen",
            &shared,
            "--host-id",
            addr,
        ])
        .args([
            "--host-id-fallback-timeout",
            "2",
            "--notify-type",
            "by-value",
        ])
        .arg("--notify-url")
        .arg(format!("http://127.0.0.1:{}/deliveries", base + 3))
        .arg("--data-dir")
        .arg(root.path().join(dir))
        .env("RUST_LOG", "warn")
        .env_remove("BITSFARM_TEST_PAUSE_AT")
        .stdout(Stdio::piped());
        if let Some(p) = pause {
            c.env("BITSFARM_TEST_PAUSE_AT", p);
        }
        let mut child = c.spawn().unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        expect_line(&lines, "listening", Duration::from_secs(30));
        (child, lines)
    };
    // Only A is up when the upload starts, so A holds the session.
    let (mut a, a_lines) = member(&a_addr, "a", Some("after-notify"));
    let (file, data) = data_file(root.path(), 1 << 20, 5);
    let up = Upload::start(
        &file,
        &format!("http://{shared}/up/dup.bin"),
        &["--fragment-size", "262144", "--retry-delay", "1"],
    );
    expect_line(&a_lines, "paused at after-notify", Duration::from_secs(60));
    let (mut b, _b_lines) = member(&b_addr, "b", None);
    a.kill().unwrap();
    a.wait().unwrap();
    let (code, report) = up.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{report}");
    assert!(report_u64(&report, "fallbacks") >= 1, "{report}");
    assert_eq!(report["report"]["host_id"], b_addr.as_str(), "{report}");
    let stored = stored_deliveries(&root.path().join("received"));
    assert_eq!(stored.len(), 1, "stored once: {stored:?}");
    assert_eq!(stored[0].1, sha256_hex(&data));
    let metrics = Conn::open(format!("127.0.0.1:{}", base + 3).parse().unwrap())
        .send(&Request::new("GET", "/metrics"))
        .unwrap()
        .text();
    assert_eq!(
        metric_value(&metrics, "bitsfarm_receiver_deliveries_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "bitsfarm_receiver_duplicates_suppressed_total"),
        1.0,
        "the second delivery carried the same Idempotency-Key: {metrics}"
    );
    let _ = b.kill();
    let _ = b.wait();
    let _ = receiver.kill();
    let _ = receiver.wait();
}

#[test]
fn farm_runs_an_uploadfarm_manifest_with_its_local_backend() {
    let base = free_port_block(5);
    let manifest = TempDir::new().unwrap();
    let path = manifest.path().join("farm.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: t\nspec:\n  replicas: 2\n  uploadPath: /in\n  backend:\n    url: http://127.0.0.1:{}/deliveries\n    notification: ByValue\n",
            base + 4
        ),
    )
    .unwrap();
    let data = TempDir::new().unwrap();
    let mut child = Command::new(BIN)
        .args(["farm", "-f"])
        .arg(&path)
        .args(["--shared", &format!("127.0.0.1:{base}"), "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let seen = expect_line(&lines, "ready", Duration::from_secs(60));
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("receiver http://127.0.0.1:{}", base + 4))),
        "{seen:#?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.contains("member ")).count(),
        2,
        "{seen:#?}"
    );
    let (file, bytes) = data_file(manifest.path(), 100_000, 6);
    let reply = manifest.path().join("reply.txt");
    let up = Upload::start(
        &file,
        &format!("http://127.0.0.1:{base}/in/x.bin"),
        &["--reply", reply.to_str().unwrap()],
    );
    let (code, report) = up.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    let reply = std::fs::read_to_string(&reply).unwrap();
    assert!(
        reply.contains(&sha256_hex(&bytes)),
        "the reply is the receiver's: {reply}"
    );
    let stored = stored_deliveries(&data.path().join(format!("received-{}", base + 4)));
    assert_eq!(stored.len(), 1);
    let _ = writeln!(stdin, "exit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
}

/// A member told to drain finishes its session, takes no new one (the shared address sends new
/// sessions to the others), and exits when done.
#[test]
fn a_drained_member_finishes_its_session_takes_no_new_one_and_exits() {
    let mut farm = Farm::start(2, &["--receiver"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 16 << 20, 7);
    let mut up = Upload::start(
        &file,
        &format!("http://{}/up/long.bin", farm.shared),
        &["--fragment-size", "65536", "--retry-delay", "1"],
    );
    let session = up.wait_event("\"session\"");
    let owner = farm.member_of(session["host_id"].as_str().unwrap());
    up.wait_event("\"progress\"");
    farm.command(&format!("drain {owner}"), "draining");
    // New sessions through the shared address all land on the other member.
    let (small, _) = data_file(work.path(), 1000, 8);
    for i in 0..6 {
        let (code, report) = Upload::start(
            &small,
            &format!("http://{}/up/new{i}.bin", farm.shared),
            &["--retry-delay", "1", "--no-keep-alive"],
        )
        .finish(Duration::from_secs(60));
        assert_eq!(code, 0, "{report}");
        let host = report["report"]["host_id"].as_str().unwrap().to_string();
        assert_ne!(
            farm.member_of(&host),
            owner,
            "a new session landed on the draining member"
        );
    }
    let (code, report) = up.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report_u64(&report, "restarts"), 0, "{report}");
    let got = farm.received();
    assert!(got.iter().any(|(_, sha)| *sha == sha256_hex(&data)));
    // Its session done, the drained member exits.
    let gone = common::wait_until(Duration::from_secs(15), || {
        std::net::TcpStream::connect_timeout(&farm.member(owner), Duration::from_millis(200))
            .is_err()
    });
    assert!(gone, "the drained member is still listening");
}

/// `bitsfarm drain --pid` (the farm pods' preStop hook): the server stops taking sessions, its
/// open session completes, it exits, and the drain command returns.
#[test]
fn drain_by_signal_waits_for_the_open_session_and_the_server_exits() {
    let mut s = common::Server::start(&[]);
    let id = s.create_session("/d/open.bin");
    assert_eq!(s.fragment(&id, "/d/open.bin", 0, b"0123", 8).status, 200);
    let pid = s.pid().expect("server pid");
    let mut drain = Command::new(BIN)
        .args(["drain", "--pid", &pid.to_string(), "--wait", "60"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    assert!(
        common::wait_until(Duration::from_secs(10), || s.get("/readyz").status == 503),
        "readiness fails while draining"
    );
    let r = s.send(&common::create_request("/d/new.bin"));
    assert_eq!((r.status, r.error_code()), (503, Some("0x801901F7")));
    assert_eq!(s.fragment(&id, "/d/open.bin", 4, b"4567", 8).status, 200);
    assert!(
        matches!(drain.try_wait(), Ok(None)),
        "drain returned with a session open"
    );
    assert_eq!(s.close(&id, "/d/open.bin").status, 200);
    // The server exits on its own once the session is done; the drain command then returns.
    assert!(
        common::wait_until(Duration::from_secs(15), || !s.is_running()),
        "the drained server did not exit"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(st)) = drain.try_wait() {
            break st;
        }
        assert!(Instant::now() < deadline, "bitsfarm drain did not return");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert_eq!(
        std::fs::read(s.data_dir.join("d/open.bin")).unwrap(),
        b"01234567"
    );
}

/// Forwarding is authenticated and goes one hop at most: a packet that claims to be forwarded
/// without the farm's secret is refused, and one that proves itself is answered by the member it
/// reached, even when its session names another member.
#[test]
fn forwarded_packets_must_prove_themselves_and_are_never_forwarded_again() {
    use bitsfarm::server::handoff::{FORWARDED_HEADER, FarmKey, ForwardedRequest, Hop, unix_now};
    let farm = Farm::start(2, &["--no-host-id"]);
    let key = FarmKey::load(&farm.data.path().join("handoff-secret")).expect("the farm's secret");
    let id = key.mint(1).to_string();
    let path = "/up/hop.bin";
    let host = farm.member(0).to_string();
    let fragment = |proof: &str| {
        common::fragment_request(&id, path, 0, b"abcd", 4)
            .header(FORWARDED_HEADER, proof)
            .header("bitsfarm-original-host", &host)
    };
    let forged = Conn::open(farm.member(0))
        .send(&fragment("v1 from=1 ts=1 mac=AAAA"))
        .expect("an answer");
    assert_eq!(forged.status, 403, "{forged:?}");
    let proof = key.forward_proof(
        Hop { from: 1, to: 0 },
        unix_now(),
        &ForwardedRequest {
            method: "BITS_POST",
            path_and_query: path,
            session_id: &id,
            original_host: &host,
            packet_type: b"Fragment",
            content_range: b"bytes 0-3/4",
            content_length: b"4",
        },
    );
    let hop = Conn::open(farm.member(0))
        .send(&fragment(&proof))
        .expect("an answer");
    // Member 0 does not hold the session; it answers itself instead of sending it on to member 1.
    assert_eq!(hop.status, 500, "{hop:?}");
    assert_eq!(hop.error_code(), Some("0x8020001F"));
    let m0 = farm.member_metrics(0);
    assert_eq!(
        metric_value(&m0, "bitsfarm_handoff_received_packets_total"),
        1.0
    );
    assert_eq!(
        metric_value(&m0, "bitsfarm_handoff_forwarded_packets_total"),
        0.0
    );
    assert_eq!(
        metric_value(
            &farm.member_metrics(1),
            "bitsfarm_handoff_received_packets_total"
        ),
        0.0
    );
}

/// The operator's drain (`POST /drain?stay=true`): the server drains and stays up once empty, so
/// that Kubernetes does not restart it as a fresh, ready server before the scale-down removes it;
/// a scale back up cancels it; the preStop signal makes it exit, and a later `stay` cannot undo
/// that.
#[test]
fn a_drain_that_stays_keeps_the_empty_server_up_until_it_is_signalled() {
    let mut s = common::Server::start(&["--admin-listen", "127.0.0.1:0"]);
    fn admin(s: &common::Server, req: Request) -> common::Response {
        s.connect_admin().send(&req).expect("an admin answer")
    }
    let r = admin(&s, Request::new("POST", "/drain?stay=true"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"draining\":true"), "{}", r.text());
    assert!(r.text().contains("\"sessions\":0"), "{}", r.text());
    thread::sleep(Duration::from_secs(1));
    assert!(
        s.is_running(),
        "an empty server that was told to stay exited"
    );
    assert_eq!(admin(&s, Request::new("GET", "/readyz")).status, 503);
    // The farm grew back: the server takes sessions again.
    let r = admin(&s, Request::new("POST", "/drain?cancel=true"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"draining\":false"), "{}", r.text());
    assert_eq!(admin(&s, Request::new("GET", "/readyz")).status, 200);
    let id = s.create_session("/d/again.bin");
    // Drained again and stopped by the signal, while a session is open: a `stay` that arrives
    // after the signal does not keep the server up once the session is done.
    assert_eq!(
        admin(&s, Request::new("POST", "/drain?stay=true")).status,
        200
    );
    let pid = s.pid().expect("server pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        admin(&s, Request::new("POST", "/drain?stay=true")).status,
        200
    );
    assert_eq!(
        admin(&s, Request::new("POST", "/drain?cancel=true")).status,
        409,
        "a signalled stop cannot be cancelled"
    );
    assert!(s.is_running(), "exited with a session open");
    assert_eq!(s.cancel(&id, "/d/again.bin").status, 200);
    assert!(
        common::wait_until(Duration::from_secs(15), || !s.is_running()),
        "the signalled server did not exit"
    );
}

/// Upload-reply without host ids: the reply download (a GET of the reply URL) that lands on
/// another member is handed to the owner too, so every job gets its backend's reply.
#[test]
fn with_handoff_reply_downloads_reach_the_owner() {
    let farm = Farm::start(3, &["--receiver", "--no-host-id"]);
    let work = TempDir::new().unwrap();
    let (file, data) = data_file(work.path(), 50_000, 8);
    for round in 0..8 {
        let reply = work.path().join(format!("reply-{round}.txt"));
        let up = Upload::start(
            &file,
            &format!("http://{}/up/reply-{round}.bin", farm.shared),
            &[
                "--reply",
                reply.to_str().unwrap(),
                "--no-keep-alive",
                "--retry-delay",
                "0",
            ],
        );
        let (code, report) = up.finish(Duration::from_secs(60));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report_u64(&report, "restarts"), 0, "{report}");
        let text = std::fs::read_to_string(&reply).unwrap();
        assert!(text.contains(&sha256_hex(&data)), "round {round}: {text}");
    }
    let replies: f64 = (0..farm.replicas)
        .map(|i| {
            metric_value(
                &farm.member_metrics(i),
                "bitsfarm_handoff_forwarded_packets_total{packet=\"Reply\",outcome=\"forwarded\"}",
            )
        })
        .sum();
    // 8 downloads (at least one GET each) that all land on their owner by chance: (1/3)^8.
    assert!(replies > 0.0, "no reply download was handed on");
}

/// A path the forwarder's URL library writes differently (raw braces become %7B/%7D) still
/// reaches the owner's session, and its proof still verifies.
#[test]
fn a_forwarded_packet_with_a_raw_brace_in_its_path_reaches_its_session() {
    let farm = Farm::start(2, &["--no-host-id"]);
    let path = "/up/a{1}.bin";
    let created = Conn::open(farm.member(1))
        .send(&common::create_request(path))
        .expect("Create-Session on member 1");
    assert_eq!(created.status, 200, "{created:?}");
    let id = created.header("BITS-Session-Id").unwrap().to_string();
    let r = Conn::open(farm.member(0))
        .send(&common::fragment_request(&id, path, 0, b"abcd", 4))
        .expect("an answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("BITS-Received-Content-Range"), Some("4"));
}

/// The farm's shared address and the members' own addresses are no off switch: `POST /drain`
/// there reaches no member's drain (three of them once stopped two members), and every member
/// keeps taking sessions. The farm's own `drain N` uses the member's admin address.
#[test]
fn drain_is_not_served_on_the_shared_or_member_addresses() {
    let farm = Farm::start(2, &[]);
    let mut addrs = vec![farm.shared; 3];
    addrs.extend((0..farm.replicas).map(|i| farm.member(i)));
    for addr in addrs {
        let r = Conn::open(addr)
            .send(&Request::new("POST", "/drain"))
            .expect("an answer to POST /drain");
        assert!(
            matches!(r.status, 404 | 405),
            "POST /drain on {addr}: {r:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..farm.replicas {
        let r = Conn::open(farm.member(i))
            .send(&common::create_request(&format!("/up/after-{i}.bin")))
            .expect("Create-Session");
        assert_eq!(r.status, 200, "member {i} stopped taking sessions: {r:?}");
    }
}

/// A forwarding proof is bound to its packet: replayed with another packet type, another
/// `Content-Range` or `Content-Length`, or to another member than the one it was made for, it is
/// refused with 403.
#[test]
fn a_forwarding_proof_replayed_for_another_packet_or_member_is_refused() {
    use bitsfarm::server::handoff::{FORWARDED_HEADER, FarmKey, ForwardedRequest, Hop, unix_now};
    let farm = Farm::start(2, &["--no-host-id"]);
    let key = FarmKey::load(&farm.data.path().join("handoff-secret")).expect("the farm's secret");
    let id = key.mint(1).to_string();
    let path = "/up/bound.bin";
    let host = farm.member(0).to_string();
    let proof = key.forward_proof(
        Hop { from: 1, to: 0 },
        unix_now(),
        &ForwardedRequest {
            method: "BITS_POST",
            path_and_query: path,
            session_id: &id,
            original_host: &host,
            packet_type: b"Fragment",
            content_range: b"bytes 0-3/4",
            content_length: b"4",
        },
    );
    let with_proof = |req: Request| {
        req.header(FORWARDED_HEADER, &proof)
            .header("bitsfarm-original-host", &host)
    };
    let send = |to: u16, req: &Request| {
        Conn::open(farm.member(to))
            .send(req)
            .expect("an answer to a forwarded packet")
    };
    // The packet the proof was made for is taken (member 0 does not hold the session).
    let r = send(
        0,
        &with_proof(common::fragment_request(&id, path, 0, b"abcd", 4)),
    );
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.error_code(), Some("0x8020001F"), "{r:?}");
    let replays = [
        (
            0,
            with_proof(Request::bits("Cancel-Session", path).header("BITS-Session-Id", &id)),
            "as a Cancel-Session",
        ),
        (
            0,
            with_proof(common::fragment_request(&id, path, 4, b"efgh", 8)),
            "with another Content-Range",
        ),
        (
            0,
            with_proof(common::fragment_request(&id, path, 0, b"abcd", 4).body(b"abcdefgh")),
            "with another Content-Length",
        ),
        (
            1,
            with_proof(common::fragment_request(&id, path, 0, b"abcd", 4)),
            "to another member",
        ),
    ];
    for (to, req, what) in replays {
        let r = send(to, &req);
        assert_eq!(r.status, 403, "a proof replayed {what}: {r:?}");
        assert_eq!(
            r.error_code(),
            Some(common::E_ACCESSDENIED),
            "{what}: {r:?}"
        );
    }
}
