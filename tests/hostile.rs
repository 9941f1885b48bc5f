//! Clients that try to hold the server rather than use it, through real HTTP against the real
//! binary: bodies that trickle, refused packets with huge bodies, many connections from one
//! address, half-sent headers, and the file descriptors all of that costs.
//!
//! Timings are reported (eprintln) and asserted only within generous bounds.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// One byte every 250 ms never pauses as long as `--read-timeout`, yet averages 4 B/s: the
/// connection is cut once the grace (the read timeout) has passed and the body is behind the
/// minimum rate (1 KiB/s by default). A body well above that rate is not cut, however long it takes.
#[test]
fn a_trickling_body_is_cut_after_the_grace_and_a_steady_one_is_not() {
    let s = Server::start(&["--read-timeout", "2"]);
    let id = s.create_session("/trickle.bin");
    let data = random_bytes(100_000, 1);
    let mut c = s.connect();
    c.write_partial(&fragment_request(&id, "/trickle.bin", 0, &data, 100_000), 1)
        .unwrap();
    let started = Instant::now();
    let mut cut = None;
    for b in &data[1..200] {
        thread::sleep(Duration::from_millis(250));
        if c.write_raw(&[*b]).is_err() {
            cut = Some(started.elapsed());
            break;
        }
        let mut seen = Vec::new();
        if c.wait_closed(Duration::from_millis(1), &mut seen) {
            cut = Some(started.elapsed());
            break;
        }
    }
    let cut = cut.unwrap_or_else(|| {
        panic!(
            "a body trickling at 4 B/s held its connection for {:?} (read timeout 2 s)",
            started.elapsed()
        )
    });
    eprintln!("trickling body (4 B/s, grace 2 s, minimum 1 KiB/s) cut after {cut:?}");
    assert!(
        cut >= Duration::from_millis(1500),
        "cut before the grace: {cut:?}"
    );
    assert!(cut < Duration::from_secs(15), "cut only after {cut:?}");
    assert_eq!(
        s.metric("bitsfarm_limit_refusals_total{limit=\"body_rate\"}"),
        1.0
    );

    // 2 KiB every 250 ms (8 KiB/s) for twice the grace: stored whole.
    let id = s.create_session("/steady.bin");
    let steady = random_bytes(40 << 10, 2);
    let mut c = s.connect();
    let req = fragment_request(&id, "/steady.bin", 0, &steady, steady.len() as u64);
    c.write_partial(&req, 2048).unwrap();
    let started = Instant::now();
    for part in steady[2048..].chunks(2048) {
        thread::sleep(Duration::from_millis(250));
        c.write_raw(part).expect("a steady body is not cut");
    }
    let r = c.read_response(false).expect("the Ack to a steady body");
    eprintln!(
        "steady body (8 KiB/s) stored in {:?}: {}",
        started.elapsed(),
        r.status
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.received(), Some(steady.len() as u64), "{r:?}");
}

/// A Ping announcing a megabyte of body is refused from its headers: the Ack comes before the
/// body (not after the server read it), and the connection closes. A client that keeps
/// sending its body meanwhile (as WinHTTP does) is not reset: the server reads it away after
/// answering.
#[test]
fn a_refused_packet_is_answered_at_once_and_its_connection_closed() {
    let s = Server::start(&["--max-fragment-size", "1000"]);
    let mut c = s.connect();
    let ping = Request::bits("Ping", "/").header("Content-Length", "1000000");
    let mut bytes = ping.head_bytes(s.addr);
    bytes.extend_from_slice(&[b'x'; 64 << 10]);
    let started = Instant::now();
    c.write_raw(&bytes).unwrap();
    c.set_read_timeout(Duration::from_secs(5));
    let r = c.read_response(false).unwrap_or_else(|e| {
        panic!(
            "no answer within {:?} to a Ping with Content-Length 1000000 (64 KiB of it sent): {e}",
            started.elapsed()
        )
    });
    let answered = started.elapsed();
    eprintln!("refused Ping (Content-Length 1000000, 64 KiB sent) answered in {answered:?}");
    assert_error(&r, 400, Some(E_INVALIDARG), "Ping with a body");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    let mut seen = Vec::new();
    assert!(
        c.wait_closed(Duration::from_secs(5), &mut seen),
        "the connection stayed open after the refusal"
    );
    assert!(seen.is_empty(), "{:?}", String::from_utf8_lossy(&seen));

    // A refused Fragment (413) while the client goes on sending 4 MiB of its body.
    let id = s.create_session("/big.bin");
    let body = vec![b'y'; 4 << 20];
    let req = fragment_request(&id, "/big.bin", 0, &body, body.len() as u64);
    let mut c = s.connect();
    let started = Instant::now();
    c.write_partial(&req, 16 << 10).unwrap();
    let r = c.read_response(false).expect("the 413 before the body");
    eprintln!(
        "refused Fragment (4 MiB) answered in {:?}",
        started.elapsed()
    );
    assert_error(&r, 413, Some(BG_E_TOO_LARGE), "fragment over the limit");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    for part in body[16 << 10..].chunks(256 << 10) {
        c.write_raw(part)
            .expect("the rest of a refused body is read, not reset");
    }
    let mut seen = Vec::new();
    assert!(c.wait_closed(Duration::from_secs(10), &mut seen));
    assert!(seen.is_empty(), "{:?}", String::from_utf8_lossy(&seen));
    assert_eq!(s.ping().status, 200);
}

// ---------------------------------------------------------------------------------------------
// Connections per address
// ---------------------------------------------------------------------------------------------

/// Opens a connection from `from` and pings on it; the Ack's status, or None when the server
/// refused the connection (closed it, or answered before reading anything).
fn ping_from(from: IpAddr, addr: SocketAddr) -> (Conn, Option<u16>) {
    let mut c = Conn::open_from(from, addr);
    c.set_read_timeout(Duration::from_secs(5));
    let status = match c.send(&Request::bits("Ping", "/")) {
        Ok(r) => Some(r.status),
        Err(_) => None,
    };
    (c, status)
}

fn assert_refused(status: Option<u16>, what: &str) {
    assert!(
        matches!(status, None | Some(503)),
        "{what}: expected the connection refused (503 or closed), got {status:?}"
    );
}

/// With `--max-connections 40`, one address may hold a quarter of them (10): the 11th is
/// refused at once while another address is served; a freed slot is usable again.
#[test]
fn one_address_holds_at_most_its_share_of_the_connections() {
    let s = Server::start(&["--max-connections", "40"]);
    let mut held = Vec::new();
    for i in 0..10 {
        let (c, status) = ping_from(ip("127.0.0.1"), s.addr);
        assert_eq!(status, Some(200), "connection {i} from 127.0.0.1");
        held.push(c);
    }
    let started = Instant::now();
    let (_, status) = ping_from(ip("127.0.0.1"), s.addr);
    eprintln!(
        "11th connection from one address: {status:?} after {:?}",
        started.elapsed()
    );
    assert_refused(status, "the 11th connection from 127.0.0.1");
    let (_other, status) = ping_from(ip("127.0.0.2"), s.addr);
    assert_eq!(status, Some(200), "another address is still served");
    drop(held.pop());
    assert!(
        wait_until(Duration::from_secs(10), || ping_from(
            ip("127.0.0.1"),
            s.addr
        )
        .1 == Some(200)),
        "a closed connection's slot was not given back to its address"
    );
    // From another address: 127.0.0.1 may still hold its whole share.
    let (mut c, _) = ping_from(ip("127.0.0.3"), s.addr);
    let text = c.send(&Request::new("GET", "/metrics")).unwrap().text();
    assert!(
        metric_value(
            &text,
            "bitsfarm_limit_refusals_total{limit=\"connections_per_address\"}"
        ) >= 1.0,
        "{text}"
    );

    // The flag sets the share; 0 turns it off.
    let s = Server::start(&["--max-connections-per-address", "2"]);
    let a = ping_from(ip("127.0.0.1"), s.addr);
    let b = ping_from(ip("127.0.0.1"), s.addr);
    assert_eq!((a.1, b.1), (Some(200), Some(200)));
    assert_refused(ping_from(ip("127.0.0.1"), s.addr).1, "a third connection");
    let s = Server::start(&[
        "--max-connections",
        "8",
        "--max-connections-per-address",
        "0",
    ]);
    let all: Vec<_> = (0..8).map(|_| ping_from(ip("127.0.0.1"), s.addr)).collect();
    assert!(
        all.iter().all(|(_, st)| *st == Some(200)),
        "{:?}",
        all.iter().map(|c| c.1).collect::<Vec<_>>()
    );
}

/// Half-sent headers on more connections than `--max-connections`: each is cut after
/// `--read-timeout`, and a client from another address is served meanwhile.
#[test]
fn header_slowloris_beyond_the_cap_does_not_starve_an_honest_client() {
    let s = Server::start(&["--max-connections", "8", "--read-timeout", "2"]);
    let mut attackers: Vec<Conn> = (0..30)
        .map(|i| {
            let mut c = Conn::open_from(ip(&format!("127.0.0.{}", 1 + i % 3)), s.addr);
            // A refused connection may already be closed: the write may fail.
            let _ = c.write_raw(b"BITS_POST / HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n");
            c
        })
        .collect();
    let started = Instant::now();
    let mut c = Conn::open_from(ip("127.0.0.9"), s.addr);
    c.set_read_timeout(Duration::from_secs(30));
    let r = c
        .send(&Request::bits("Ping", "/"))
        .expect("the honest client is served");
    eprintln!(
        "honest Ping among 30 half-sent headers (cap 8): served in {:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 200);
    for (i, a) in attackers.iter_mut().enumerate() {
        let mut seen = Vec::new();
        assert!(
            a.wait_closed(Duration::from_secs(20), &mut seen),
            "half-sent headers {i} still open after {:?}",
            started.elapsed()
        );
    }
    eprintln!("all 30 cut within {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// File descriptors
// ---------------------------------------------------------------------------------------------

/// A `bitsfarm serve` started with RLIMIT_NOFILE set to (soft, hard) in the child, as a shell's
/// `ulimit -n` or systemd's LimitNOFILE would. SIGKILLed on drop.
struct LimitedServer {
    child: Child,
    addr: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server; `Err(stderr)` when it exits instead of listening.
fn serve_with_nofile(soft: u64, hard: u64, args: &[&str]) -> Result<LimitedServer, String> {
    use std::os::unix::process::CommandExt;
    let data = tempfile::tempdir().unwrap();
    let log: PathBuf = data.path().join("server.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitsfarm"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("data"))
        .args(args)
        .env("RUST_LOG", "bitsfarm=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().expect("starting bitsfarm");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        // Keep draining so the child never blocks on a full pipe.
        let mut rest = String::new();
        while reader.read_line(&mut rest).is_ok_and(|n| n > 0) {
            rest.clear();
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let addr = line
        .trim()
        .strip_prefix("bitsfarm: listening on http://")
        .and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Ok(LimitedServer {
            child,
            addr,
            _data: data,
        }),
        None => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            Err(format!(
                "{status}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }
}

/// The test process itself opens over a thousand sockets.
fn raise_own_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// A hard limit of 512 descriptors cannot hold 1024 connections: an explicit
/// `--max-connections 1024` is refused at start with the reason, and the default is lowered to
/// what fits (the server starts).
#[test]
fn a_max_connections_beyond_the_descriptor_limit_is_refused_at_start() {
    let err = match serve_with_nofile(512, 512, &["--max-connections", "1024"]) {
        Ok(s) => panic!(
            "started on {} with --max-connections 1024 under a hard limit of 512 descriptors",
            s.addr
        ),
        Err(e) => e,
    };
    eprintln!("refused: {err}");
    assert!(err.contains("max-connections"), "{err}");
    assert!(err.contains("512"), "the limit is named: {err}");
    let s = serve_with_nofile(512, 512, &[]).expect("the default fits itself to the limit");
    let mut c = Conn::open(s.addr);
    assert_eq!(c.send(&Request::bits("Ping", "/")).unwrap().status, 200);
}

/// The soft limit is commonly 1024, the default `--max-connections` too: with 1,030 idle
/// connections (from five addresses, within the per-address share), a Fragment on a
/// connection already open still gets its file, because the server raised its soft limit to
/// the hard one at start.
#[test]
fn a_thousand_idle_connections_leave_descriptors_for_a_fragment() {
    raise_own_nofile();
    let s = serve_with_nofile(1024, 20_000, &[]).expect("the server starts");
    let mut a = Conn::open(s.addr);
    let r = a.send(&create_request("/fd.bin")).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    let started = Instant::now();
    let idle: Vec<Conn> = (0..1030)
        .map(|i| Conn::open_from(ip(&format!("127.0.0.{}", 2 + i % 5)), s.addr))
        .collect();
    // Let the server accept what it will.
    thread::sleep(Duration::from_millis(1500));
    eprintln!(
        "{} idle connections open in {:?}",
        idle.len(),
        started.elapsed()
    );
    let started = Instant::now();
    let r = a
        .send(&fragment_request(&id, "/fd.bin", 0, b"0123456789", 10))
        .expect("the Fragment's Ack");
    eprintln!(
        "Fragment beside 1,030 idle connections: {} in {:?}",
        r.status,
        started.elapsed()
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = a
        .send(&Request::bits("Close-Session", "/fd.bin").header("BITS-Session-Id", &id))
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    drop(idle);
}

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

/// The limits an operator gets without saying anything, as `--help` shows them.
#[test]
fn serve_help_shows_the_default_limits() {
    let out = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    for (flag, default) in [
        ("--max-sessions <N>", "[default: 100000]"),
        ("--min-body-rate <BYTES_PER_SEC>", "[default: 1024"),
        (
            "--max-connections-per-address <N>",
            "[default: a quarter of --max-connections",
        ),
    ] {
        let at = help
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        let text = &help[at..];
        let end = text.find("\n  -").unwrap_or(text.len());
        let text = text[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains(default),
            "{flag}: {default} missing from {text:?}"
        );
    }
}
