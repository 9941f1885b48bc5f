//! Sessions survive a SIGKILL of the server: a restarted server on the same data folder resumes
//! every upload from the bytes it had acknowledged.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const FRAG: usize = 256 * 1024;
/// A little over 4 MiB, so the last fragment is a short one.
const SIZE: usize = 4 * 1024 * 1024 + 12_345;

/// Where fragments go: a server of the helpers, or one this file started by hand.
trait Fragments {
    fn fragment(&self, id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Response;
}

impl Fragments for Server {
    fn fragment(&self, id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Response {
        Server::fragment(self, id, path, start, bytes, total)
    }
}

/// Sends `data[from..to]` in fragments of `FRAG`, asserting every Ack; returns the last Ack offset.
fn send_range(
    s: &impl Fragments,
    id: &str,
    path: &str,
    data: &[u8],
    from: usize,
    to: usize,
) -> u64 {
    let mut at = from;
    let mut acked = from as u64;
    for _ in 0..(data.len() / FRAG + 2) {
        if at >= to {
            break;
        }
        let end = (at + FRAG).min(to);
        let r = s.fragment(id, path, at as u64, &data[at..end], data.len() as u64);
        assert_eq!(r.status, 200, "fragment {at}-{}: {r:?}", end - 1);
        acked = r.received().expect("the Ack gives the next offset");
        assert_eq!(acked, end as u64, "fragment {at}-{}: Ack offset", end - 1);
        at = end;
    }
    assert!(at >= to, "the fragment loop did not reach {to}");
    acked
}

/// Like a BITS client after a lost connection: sends from `offset` and follows whatever offset the
/// server's Acks (200 or 416) name until the upload is complete.
fn resume(s: &impl Fragments, id: &str, path: &str, data: &[u8], mut offset: u64) {
    let total = data.len() as u64;
    for _ in 0..(data.len() / FRAG + 10) {
        if offset == total {
            return;
        }
        let start = offset as usize;
        let end = (start + FRAG).min(data.len());
        let r = s.fragment(id, path, offset, &data[start..end], total);
        let next = r
            .received()
            .unwrap_or_else(|| panic!("Ack without BITS-Received-Content-Range: {r:?}"));
        match r.status {
            200 => assert_eq!(next, end as u64, "fragment {start}-{}: {r:?}", end - 1),
            416 => assert!(next > offset, "416 must name a later offset: {r:?}"),
            _ => panic!("fragment {start}-{}: {r:?}", end - 1),
        }
        assert!(next <= total, "offset {next} beyond the total {total}");
        offset = next;
    }
    assert_eq!(offset, total, "the resume loop did not finish the upload");
}

#[test]
fn upload_resumes_after_sigkill_between_fragments() {
    let mut s = Server::start(&[]);
    let data = random_bytes(SIZE, 0xB175);
    let path = "/dumps/big.bin";
    let id = s.create_session(path);
    let first_part = 6 * FRAG;
    let acked = send_range(&s, &id, path, &data, 0, first_part);
    assert_eq!(acked, first_part as u64);

    s.restart();
    assert_eq!(s.ping().status, 200, "the restarted server answers");

    // The next fragment from the last acknowledged offset is accepted as such.
    let next_end = first_part + FRAG;
    let r = s.fragment(&id, path, acked, &data[first_part..next_end], SIZE as u64);
    assert_eq!(r.status, 200, "first fragment after the restart: {r:?}");
    assert_eq!(
        r.received(),
        Some(next_end as u64),
        "Ack offset after the restart"
    );

    // A retransmit of the very first fragment changes nothing.
    let r = s.fragment(&id, path, 0, &data[..FRAG], SIZE as u64);
    assert_eq!(
        r.status, 200,
        "retransmit of fragment 0 after the restart: {r:?}"
    );
    assert_eq!(
        r.received(),
        Some(next_end as u64),
        "a retransmit does not move the offset"
    );
    let held = std::fs::metadata(s.session_dir(&id).join("requestfile.bin"))
        .expect("the session file")
        .len();
    assert_eq!(held, next_end as u64, "nothing was written twice");

    // A second crash in the middle, then the rest.
    let mid = next_end + 4 * FRAG;
    send_range(&s, &id, path, &data, next_end, mid);
    s.restart();
    send_range(&s, &id, path, &data, mid, SIZE);
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close-Session: {r:?}");
    assert_eq!(
        file_sha256(&s.data_dir.join("dumps/big.bin")),
        sha256_hex(&data),
        "the committed file equals the source"
    );
}

/// Sends the head and `sent` bytes of a `len`-byte fragment at `start`, waits for the server to
/// take them in, then SIGKILLs and restarts it.
fn kill_mid_fragment(
    s: &mut Server,
    id: &str,
    path: &str,
    data: &[u8],
    start: usize,
    len: usize,
    sent: usize,
) {
    let req = fragment_request(
        id,
        path,
        start as u64,
        &data[start..start + len],
        data.len() as u64,
    );
    let mut c = s.connect();
    c.write_partial(&req, sent)
        .expect("sending half a fragment");
    // Let the server read what was sent (and possibly write some of it) before it dies.
    thread::sleep(Duration::from_millis(500));
    s.kill();
    drop(c);
    s.restart();
}

fn check_resume_after_kill_mid_fragment(fragment_len: usize, seed: u64) {
    let mut s = Server::start(&[]);
    let data = random_bytes(SIZE, seed);
    let path = "/mid.bin";
    let id = s.create_session(path);
    let acked = send_range(&s, &id, path, &data, 0, 4 * FRAG) as usize;
    let half = fragment_len / 2;
    kill_mid_fragment(&mut s, &id, path, &data, acked, fragment_len, half);

    // The client sends the fragment after the interrupted one; the server must say where it is.
    let after = acked + fragment_len;
    let end = (after + FRAG).min(SIZE);
    let r = s.fragment(&id, path, after as u64, &data[after..end], SIZE as u64);
    assert_error(&r, 416, None, "fragment past the interrupted one");
    let at = r.received().expect("416 names the next expected offset");
    assert!(
        at >= acked as u64 && at <= (acked + half) as u64,
        "after the crash the server expects {at}; it had acknowledged {acked} and got {half} more bytes"
    );
    eprintln!("resume: acked {acked}, sent {half} more, server expects {at}");
    // A retransmit from 0 does not move it.
    let r = s.fragment(&id, path, 0, &data[..FRAG], SIZE as u64);
    assert_eq!(
        (r.status, r.received()),
        (200, Some(at)),
        "retransmit of fragment 0: {r:?}"
    );

    resume(&s, &id, path, &data, at);
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close-Session: {r:?}");
    assert_eq!(
        file_sha256(&s.data_dir.join("mid.bin")),
        sha256_hex(&data),
        "the committed file equals the source"
    );
}

#[test]
fn upload_resumes_after_sigkill_mid_fragment_body() {
    check_resume_after_kill_mid_fragment(FRAG, 0x5EED_0001);
}

/// Same, with a fragment large enough that part of it reaches the session file before the kill.
#[test]
fn upload_resumes_after_sigkill_mid_large_fragment_body() {
    check_resume_after_kill_mid_fragment(3 * 1024 * 1024, 0x5EED_0002);
}

#[test]
fn session_total_survives_restart() {
    let mut s = Server::start(&[]);
    let data = random_bytes(1000, 21);
    let id = s.create_session("/total.bin");
    assert_eq!(
        s.fragment(&id, "/total.bin", 0, &data[..400], 1000)
            .received(),
        Some(400)
    );
    s.restart();
    let r = s.fragment(&id, "/total.bin", 400, &data[400..], 1001);
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "a different total after the restart",
    );
    let r = s.fragment(&id, "/total.bin", 400, &data[400..], 1000);
    assert_eq!((r.status, r.received()), (200, Some(1000)), "{r:?}");
    assert_eq!(s.close(&id, "/total.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("total.bin")).unwrap(), data);
}

#[test]
fn created_but_empty_session_survives_restart() {
    let mut s = Server::start(&[]);
    let id = s.create_session("/fresh.bin");
    s.restart();
    let data = random_bytes(3000, 22);
    let r = s.fragment(&id, "/fresh.bin", 100, &data[100..200], 3000);
    assert_error(&r, 416, None, "gap in a recovered empty session");
    assert_eq!(r.received(), Some(0), "{r:?}");
    send_range(&s, &id, "/fresh.bin", &data, 0, 3000);
    assert_eq!(s.close(&id, "/fresh.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("fresh.bin")).unwrap(), data);
    // A session id from before the restart at another URL is still refused.
    let other = s.create_session("/other.bin");
    s.restart();
    let r = s.fragment(&other, "/fresh2.bin", 0, b"x", 1);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "recovered session at another URL",
    );
}

#[test]
fn closed_and_cancelled_sessions_stay_so_after_restart() {
    let mut s = Server::start(&[]);
    let closed = s.create_session("/c.bin");
    assert_eq!(
        s.fragment(&closed, "/c.bin", 0, b"done", 4).received(),
        Some(4)
    );
    assert_eq!(s.close(&closed, "/c.bin").status, 200);
    let cancelled = s.create_session("/x.bin");
    assert_eq!(
        s.fragment(&cancelled, "/x.bin", 0, b"gone", 8).received(),
        Some(4)
    );
    assert_eq!(s.cancel(&cancelled, "/x.bin").status, 200);
    let zero = s.create_session("/z.bin");
    assert_eq!(s.send(&empty_fragment_request(&zero, "/z.bin")).status, 200);
    s.restart();
    let r = s.close(&closed, "/c.bin");
    assert_eq!(r.status, 200, "retried Close after a restart: {r:?}");
    assert_eq!(std::fs::read(s.data_dir.join("c.bin")).unwrap(), b"done");
    let r = s.cancel(&cancelled, "/x.bin");
    assert_eq!(r.status, 200, "retried Cancel after a restart: {r:?}");
    let r = s.fragment(&cancelled, "/x.bin", 4, b"gone", 8);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "Fragment of a cancelled session after a restart",
    );
    assert!(!s.data_dir.join("x.bin").exists());
    // The zero-byte upload, complete before the crash, commits after it.
    assert_eq!(s.close(&zero, "/z.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("z.bin")).unwrap(), b"");
}

/// A recovered `session.json` is trusted for the destination: one that points out of the data
/// folder (tampered, or planted through nested data folders) must not be committed there.
#[test]
fn recovered_session_cannot_commit_outside_the_data_folder() {
    let mut s = Server::start_nested(&["l1"], &[]);
    let id = "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}";
    let dir = s.session_dir(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("requestfile.bin"), b"owned").unwrap();
    let record = format!(
        "{{\"id\":\"{id}\",\"url-path\":\"/f.bin\",\"destination\":\"../escaped.bin\",\
         \"created-unix\":0,\"total\":5,\"state\":\"receiving\"}}"
    );
    std::fs::write(dir.join("session.json"), record).unwrap();
    s.restart();
    let r = s.close(id, "/f.bin");
    let escaped = s.root.path().join("l1/escaped.bin");
    assert!(
        !escaped.exists(),
        "Close-Session answered {} and wrote {} outside the data folder",
        r.status,
        escaped.display()
    );
}

/// A `bitsfarm serve` started by hand on a given port and data folder, which another server may
/// hold: it prints its address only once it has the folder. SIGKILLed on drop.
struct Newcomer {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
    log: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Newcomer {
    fn start(data_dir: &Path, port: u16) -> Newcomer {
        let scratch = tempfile::Builder::new()
            .prefix("bitsfarm-it-scratch-")
            .tempdir()
            .unwrap();
        let log = scratch.path().join("newcomer.log");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "bitsfarm=debug")
            .env("NO_COLOR", "1")
            .env_remove("BITSFARM_HOST_ID")
            .env_remove("BITSFARM_TEST_PAUSE_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("starting the second bitsfarm server");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Newcomer {
            child,
            addr,
            lines,
            log,
            _scratch: scratch,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for the "listening" line; None if it did not come.
    fn wait_listening(&self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// True if the "listening" line has come (without waiting).
    fn printed_listening(&self) -> bool {
        self.lines.try_iter().any(|l| l.contains("listening on"))
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Nothing accepts connections on its port.
    fn refuses_connections(&self) -> bool {
        TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)).is_err()
    }

    fn send(&self, req: &Request) -> Response {
        Conn::open(self.addr)
            .send(req)
            .unwrap_or_else(|e| panic!("{} {}: {e}\nlog:\n{}", req.method, req.target, self.log()))
    }
}

impl Fragments for Newcomer {
    fn fragment(&self, id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Response {
        self.send(&fragment_request(id, path, start, bytes, total))
    }
}

impl Drop for Newcomer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- second server's log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port on 127.0.0.1")
}

/// A force-deleted pod's replacement on the same volume: the second server waits, without
/// serving, while the first one lives and keeps acknowledging fragments; once the first is killed
/// it starts within a few seconds and knows the session at the offset the first last
/// acknowledged, not the one on disk when it was started.
#[test]
fn a_second_server_on_a_held_data_folder_waits_and_then_resumes_where_the_first_stopped() {
    let mut a = Server::start(&[]);
    let data = random_bytes(SIZE, 0xD1_0C);
    let path = "/dumps/handover.bin";
    let id = a.create_session(path);
    let early = send_range(&a, &id, path, &data, 0, 3 * FRAG);

    let mut b = Newcomer::start(&a.data_dir, free_port());
    let mut started_anyway = false;
    let waits = wait_until(Duration::from_secs(15), || {
        started_anyway = b.printed_listening();
        started_anyway
            || b.log()
                .contains("another bitsfarm server holds this data folder")
    });
    assert!(
        !started_anyway,
        "the second server started on a data folder the first one holds"
    );
    assert!(
        waits,
        "the second server does not say it waits for the folder"
    );
    assert!(b.is_running(), "the second server gave up at once");
    assert!(
        b.refuses_connections(),
        "the second server serves a data folder the first one holds"
    );

    // The first server goes on; the second must not have read the folder yet.
    let late = send_range(&a, &id, path, &data, early as usize, 9 * FRAG);
    assert!(late > early);
    thread::sleep(Duration::from_millis(600));
    assert!(
        !b.printed_listening() && b.refuses_connections(),
        "the second server started while the first one held the folder"
    );
    assert_eq!(
        a.get("/healthz").status,
        200,
        "the first server still serves"
    );

    let killed = Instant::now();
    a.kill();
    let line = b
        .wait_listening(Duration::from_secs(10))
        .expect("the second server starts once the first is gone");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the second server took {took:?} to start after the first died"
    );
    assert!(line.contains(&b.addr.to_string()), "{line}");
    assert!(
        b.log().contains("the other server left the data folder"),
        "log:\n{}",
        b.log()
    );
    eprintln!("second server listening {took:?} after the first was killed");
    assert_eq!(b.send(&Request::new("GET", "/healthz")).status, 200);

    // The session is where the first server left it.
    let after = late as usize + FRAG;
    let r = b.fragment(
        &id,
        path,
        after as u64,
        &data[after..after + FRAG],
        SIZE as u64,
    );
    assert_error(&r, 416, None, "a fragment past the acknowledged offset");
    assert_eq!(
        r.received(),
        Some(late),
        "the second server names the offset the first last acknowledged ({early} was on disk when it started)"
    );
    let r = b.fragment(&id, path, 0, &data[..FRAG], SIZE as u64);
    assert_eq!(
        (r.status, r.received()),
        (200, Some(late)),
        "a retransmit of fragment 0: {r:?}"
    );

    resume(&b, &id, path, &data, late);
    let r = b.send(&Request::bits("Close-Session", path).header("BITS-Session-Id", &id));
    assert_eq!(r.status, 200, "Close-Session on the second server: {r:?}");
    assert_eq!(
        file_sha256(&a.data_dir.join("dumps/handover.bin")),
        sha256_hex(&data),
        "the committed file equals the source"
    );
}

/// A pod stopped while its server still waits for the data folder (its preStop drain sends
/// SIGUSR1, the kubelet SIGTERM) goes at once instead of waiting for a folder it never served.
#[test]
fn a_server_waiting_for_its_data_folder_stops_on_a_signal() {
    let a = Server::start(&[]);
    for signal in [
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let mut b = Newcomer::start(&a.data_dir, free_port());
        assert!(
            wait_until(Duration::from_secs(15), || b
                .log()
                .contains("another bitsfarm server holds this data folder")),
            "the second server does not say it waits"
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(b.child.id() as i32), signal).unwrap();
        let mut status = None;
        wait_until(Duration::from_secs(5), || {
            status = b.child.try_wait().ok().flatten();
            status.is_some()
        });
        let status = status.unwrap_or_else(|| panic!("{signal:?} did not stop a waiting server"));
        assert!(status.success(), "{signal:?}: exit {status}\n{}", b.log());
        assert!(
            b.log().contains("stopped by a signal before serving"),
            "{}",
            b.log()
        );
    }
    assert_eq!(
        a.get("/healthz").status,
        200,
        "the first server still serves"
    );
}
