//! `bitsfarm upload` against a server that is not ours: a scripted server that answers the way IIS
//! does in [MC-BUP] section 4 (mixed-case header names, lower-case GUIDs, the spec's `BITS-Error`
//! spelling, `Accept-encoding`, a relative backslashed `BITS-Reply-URL`).

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{random_bytes, sha256_hex};

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");

#[derive(Default)]
struct IisState {
    /// The bytes of the current session, by offset.
    data: Vec<u8>,
    session: Option<String>,
    sessions_created: u32,
    fragments: u32,
    /// Every request line and packet type seen, for the assertions.
    log: Vec<String>,
    closed: Option<Vec<u8>>,
    reply: Vec<u8>,
}

struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut byte).ok()? == 0 || head.len() > 65536 {
            return None;
        }
        head.push(byte[0]);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head).ok()?;
    let headers: Vec<(String, String)> = common::owned_headers(req.headers);
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(Req {
        method: req.method?.to_string(),
        path: req.path?.to_string(),
        headers,
        body,
    })
}

/// Answers as IIS 6 does in the spec's captures, with a few scripted faults on the way:
/// the 2nd fragment of the first session answers "session not found" (in the spec's `BITS-Error`
/// spelling), the first fragment of the second session acknowledges only half of its bytes, and
/// the third answers 416 with an earlier offset.
fn iis(state: &Arc<Mutex<IisState>>, req: &Req, reply_mode: bool) -> String {
    let mut s = state.lock().unwrap();
    if req.method == "GET" {
        s.log.push(format!("GET {}", req.path));
        let range = req.header("Range").unwrap_or("");
        let (a, b) = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
            .unwrap_or((0, s.reply.len() - 1));
        let b = b.min(s.reply.len() - 1);
        let body = &s.reply[a..=b];
        return format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\nAccept-Ranges: bytes\r\n\r\n{}",
            body.len(),
            s.reply.len(),
            // The reply is ASCII in these tests.
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(req.method, "BITS_POST");
    let packet = req.header("BITS-Packet-Type").unwrap_or("").to_string();
    s.log.push(packet.clone());
    let ok = "HTTP/1.1 200 OK\r\nPragma: no-cache\r\nBITS-Packet-Type: Ack\r\n";
    match packet.to_ascii_lowercase().as_str() {
        "create-session" => {
            let protocols = req.header("BITS-Supported-Protocols").unwrap_or("");
            assert!(
                protocols
                    .to_ascii_lowercase()
                    .contains("{7df0354d-249b-430f-820d-3d2a9bef4931}")
            );
            s.sessions_created += 1;
            let id = format!(
                "{{a0ff5911-4144-45b3-bf27-27afc8ec8a6{}}}",
                s.sessions_created
            );
            s.session = Some(id.clone());
            s.data.clear();
            s.fragments = 0;
            format!(
                "{ok}BITS-Protocol: {{7DF0354D-249B-430F-820D-3D2A9BEF4931}}\r\nBITS-Session-Id: {id}\r\nContent-Length: 0\r\nAccept-encoding: identity\r\n\r\n"
            )
        }
        "fragment" => {
            assert_eq!(req.header("BITS-Session-Id"), s.session.as_deref());
            s.fragments += 1;
            let range = req.header("Content-Range").unwrap().to_string();
            let (first, rest) = range
                .strip_prefix("bytes ")
                .unwrap()
                .split_once('-')
                .unwrap();
            let (last, total) = rest.split_once('/').unwrap();
            let (first, last, total): (usize, usize, usize) = (
                first.parse().unwrap(),
                last.parse().unwrap(),
                total.parse().unwrap(),
            );
            if s.sessions_created == 1 && s.fragments == 2 {
                return "HTTP/1.1 500 Internal Server Error\r\nBITS-Packet-Type: Ack\r\nBITS-Error: 0x8020001f\r\nBITS-Error-Context: 0x5\r\nContent-Length: 0\r\n\r\n".into();
            }
            if s.sessions_created == 2 && s.fragments == 3 {
                let back = s.data.len() / 2;
                s.data.truncate(back);
                return format!(
                    "HTTP/1.1 416 Requested Range Not Satisfiable\r\nBITS-Packet-Type: Ack\r\nbits-received-content-range: {back}\r\nContent-Length: 0\r\n\r\n"
                );
            }
            assert!(first <= s.data.len(), "gap: {first} > {}", s.data.len());
            let mut keep = req.body.clone();
            if s.sessions_created == 2 && s.fragments == 1 {
                keep.truncate(keep.len() / 2);
            }
            let end = first + keep.len();
            if end > s.data.len() {
                let from = s.data.len() - first;
                let tail = keep[from..].to_vec();
                s.data.extend_from_slice(&tail);
            }
            let mut r = format!(
                "{ok}Content-Length: 0\r\nBITS-Received-Content-Range: {}\r\n",
                s.data.len()
            );
            if reply_mode && last + 1 == total && s.data.len() == total {
                r.push_str(&format!(
                    "BITS-Reply-URL: BITS-Sessions\\Replies\\{}\\responsefile.bin\r\n",
                    s.session.clone().unwrap().to_ascii_uppercase()
                ));
            }
            r.push_str("\r\n");
            r
        }
        "ping" => format!("{ok}Content-Length: 0\r\n\r\n"),
        "close-session" => {
            let data = s.data.clone();
            s.closed = Some(data);
            format!("{ok}Content-Length: 0\r\n\r\n")
        }
        other => panic!("unexpected packet {other:?}"),
    }
}

fn start_iis(reply_mode: bool, reply: Vec<u8>) -> (SocketAddr, Arc<Mutex<IisState>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Mutex::new(IisState {
        reply,
        ..Default::default()
    }));
    let st = state.clone();
    thread::spawn(move || {
        for conn in listener.incoming().take(1000) {
            let Ok(conn) = conn else { continue };
            let st = st.clone();
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                for _ in 0..10_000 {
                    let Some(req) = read_request(&mut r) else {
                        return;
                    };
                    let resp = iis(&st, &req, reply_mode);
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, state)
}

fn run_upload(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(BIN)
        .arg("upload")
        .args(args)
        .args([
            "--json",
            "--no-resume",
            "--retry-delay",
            "0",
            "--no-progress-timeout",
            "30",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running bitsfarm upload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .next_back()
        .unwrap_or_default();
    (out.status.code().unwrap_or(-1), last)
}

#[test]
fn uploads_to_an_iis_like_server_through_its_faults() {
    let (addr, state) = start_iis(false, Vec::new());
    let dir = tempfile::TempDir::new().unwrap();
    let data = random_bytes(40_000, 11);
    let file = dir.path().join("rfc2119.txt");
    std::fs::write(&file, &data).unwrap();
    let (code, report) = run_upload(&[
        file.to_str().unwrap(),
        &format!("http://{addr}/upload/2000mb-rfc2119.txt"),
        "--fragment-size",
        "8192",
    ]);
    assert_eq!(code, 0, "{report}");
    let s = state.lock().unwrap();
    assert_eq!(
        s.closed.as_deref().map(sha256_hex),
        Some(sha256_hex(&data)),
        "what the server closed with is the file"
    );
    assert_eq!(
        s.sessions_created, 2,
        "restarted once on BITS-Error 0x8020001f"
    );
    assert_eq!(report["report"]["restarts"], 1, "{report}");
    assert_eq!(
        report["report"]["session_id"], "{a0ff5911-4144-45b3-bf27-27afc8ec8a62}",
        "the server's id is used as given"
    );
    assert_eq!(s.log.first().map(String::as_str), Some("Create-Session"));
    assert_eq!(s.log.last().map(String::as_str), Some("Close-Session"));
}

#[test]
fn downloads_an_iis_style_relative_reply_url_with_ranges() {
    let reply: Vec<u8> = (0..1_500_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (addr, state) = start_iis(true, reply.clone());
    let dir = tempfile::TempDir::new().unwrap();
    let data = random_bytes(20_000, 12);
    let file = dir.path().join("in.bin");
    std::fs::write(&file, &data).unwrap();
    let out = dir.path().join("reply.bin");
    let (code, report) = run_upload(&[
        file.to_str().unwrap(),
        &format!("http://{addr}/upload-ref-isapi-WebFarm/2100mb-rfc2119.txt"),
        "--fragment-size",
        "65536",
        "--reply",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(std::fs::read(&out).unwrap(), reply);
    let s = state.lock().unwrap();
    let gets: Vec<_> = s.log.iter().filter(|l| l.starts_with("GET")).collect();
    assert!(gets.len() >= 2, "ranged GETs: {gets:?}");
    // Resolved against the upload URL, backslashes turned to slashes, braces percent-encoded.
    let id = s.session.clone().unwrap().to_ascii_uppercase();
    let expected = format!(
        "GET /upload-ref-isapi-WebFarm/BITS-Sessions/Replies/{}/responsefile.bin",
        id.replace('{', "%7B").replace('}', "%7D")
    );
    assert!(
        gets.iter().all(|g| **g == expected),
        "{gets:?} vs {expected}"
    );
    let close = s.log.iter().position(|l| l == "Close-Session").unwrap();
    let last_get = s.log.iter().rposition(|l| l.starts_with("GET")).unwrap();
    assert!(
        last_get < close,
        "the reply is downloaded before Close-Session"
    );
}
