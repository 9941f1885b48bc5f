//! Shared helpers for the integration tests: a handle on the real `bitsfarm` binary and a tiny raw
//! HTTP/1.1 client that sends exactly the bytes a test asks for.
//!
//! Everything here is bounded in time: sockets carry read and write timeouts, and every loop has a
//! limit, so a misbehaving server fails a test instead of hanging it.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The only BITS upload protocol GUID ([MC-BUP] 1.7.1).
pub const GUID: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
pub const E_INVALIDARG: &str = "0x80070057";
pub const E_ACCESSDENIED: &str = "0x80070005";
pub const BG_E_SESSION_NOT_FOUND: &str = "0x8020001F";
pub const BG_E_TOO_LARGE: &str = "0x80200020";

/// How long a socket read or write may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may take to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses larger than this are refused (nothing in these tests comes close).
const MAX_RESPONSE: usize = 64 << 20;

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// A running `bitsfarm serve` on 127.0.0.1 with its own temporary data folder. SIGKILLed on drop.
pub struct Server {
    child: Option<Child>,
    /// The main listener.
    pub addr: SocketAddr,
    /// The admin listener, when `--admin-listen` was given.
    pub admin_addr: Option<SocketAddr>,
    /// The first stdout line of the latest start, without its line end.
    pub first_line: String,
    /// The `--data-dir` passed to the server (kept across restarts).
    pub data_dir: PathBuf,
    /// The temporary folder holding `data_dir` (and nothing else, unless a test puts it there).
    pub root: TempDir,
    /// Holds the server's stderr log and any config file; kept apart from the data folder.
    pub scratch: TempDir,
    args: Vec<String>,
    starts: usize,
    /// Extra environment variables for the next starts (see `start_with_env`, `set_env`).
    env: Vec<(String, String)>,
    /// Every stdout line of the latest start (the first included), as it arrives.
    stdout_lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the server with `--data-dir <tmp>/data` plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_nested(&[], extra)
    }

    /// Starts the server with its data folder `levels` deep below the temporary root, so that a
    /// test can see files that escaped upwards (they would land in the root or a level between).
    pub fn start_nested(levels: &[&str], extra: &[&str]) -> Server {
        let root = tempfile::Builder::new()
            .prefix("bitsfarm-it-")
            .tempdir()
            .expect("creating a temporary data root");
        let scratch = tempfile::Builder::new()
            .prefix("bitsfarm-it-scratch-")
            .tempdir()
            .expect("creating a temporary scratch folder");
        let mut data_dir = root.path().to_path_buf();
        for l in levels {
            data_dir.push(l);
        }
        data_dir.push("data");
        fs::create_dir_all(&data_dir).expect("creating the data folder");
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: None,
            first_line: String::new(),
            data_dir,
            root,
            scratch,
            args: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            env: Vec::new(),
            stdout_lines: Arc::default(),
        };
        server.spawn();
        server
    }

    /// Starts the server with `--data-dir data_dir` (a folder the test made, such as a small
    /// mount) plus `extra` flags.
    pub fn start_at(data_dir: &Path, extra: &[&str]) -> Server {
        let root = tempfile::Builder::new()
            .prefix("bitsfarm-it-")
            .tempdir()
            .expect("creating a temporary root");
        let scratch = tempfile::Builder::new()
            .prefix("bitsfarm-it-scratch-")
            .tempdir()
            .expect("creating a temporary scratch folder");
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: None,
            first_line: String::new(),
            data_dir: data_dir.to_path_buf(),
            root,
            scratch,
            args: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            env: Vec::new(),
            stdout_lines: Arc::default(),
        };
        server.spawn();
        server
    }

    /// Writes `text` to a file in the scratch folder and returns its path (for `--config`).
    pub fn write_scratch(scratch: &Path, name: &str, text: &str) -> PathBuf {
        let p = scratch.join(name);
        fs::write(&p, text).expect("writing a scratch file");
        p
    }

    /// Starts the server with `--config <yaml>` written into a fresh scratch folder; `{root}` in
    /// the YAML is replaced by the temporary root (so directories can name their own data folders).
    pub fn start_with_config(yaml: &str, extra: &[&str]) -> Server {
        Self::try_start_with_config(yaml, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start_with_config`, but a server that refuses to start is an `Err` with its log.
    pub fn try_start_with_config(yaml: &str, extra: &[&str]) -> Result<Server, String> {
        let root = tempfile::Builder::new()
            .prefix("bitsfarm-it-")
            .tempdir()
            .expect("creating a temporary data root");
        let scratch = tempfile::Builder::new()
            .prefix("bitsfarm-it-scratch-")
            .tempdir()
            .expect("creating a temporary scratch folder");
        let yaml = yaml.replace("{root}", &root.path().display().to_string());
        let config = Self::write_scratch(scratch.path(), "config.yaml", &yaml);
        let data_dir = root.path().join("data");
        fs::create_dir_all(&data_dir).expect("creating the data folder");
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: None,
            first_line: String::new(),
            data_dir,
            root,
            scratch,
            args,
            starts: 0,
            env: Vec::new(),
            stdout_lines: Arc::default(),
        };
        server.try_spawn()?;
        Ok(server)
    }

    fn log_path(&self) -> PathBuf {
        self.scratch
            .path()
            .join(format!("server-{}.log", self.starts))
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the server is already running");
        self.starts += 1;
        let log = fs::File::create(self.log_path()).expect("creating the server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitsfarm"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "bitsfarm=debug")
            .env("NO_COLOR", "1")
            .env_remove("BITSFARM_HOST_ID")
            .env_remove("BITSFARM_TEST_PAUSE_AT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("starting the bitsfarm binary");
        let stdout = child.stdout.take().expect("the child's stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let lines = Arc::new(Mutex::new(Vec::new()));
        self.stdout_lines = lines.clone();
        // Reads the first line for us, then keeps draining stdout (so the child never blocks on
        // it), keeping every line for `wait_stdout`.
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            lines.lock().unwrap().push(first.trim_end().to_string());
            let _ = tx.send(first);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end().to_string();
                        let mut all = lines.lock().unwrap();
                        if all.len() < 10_000 {
                            all.push(text);
                        }
                    }
                }
            }
        });
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the server printed no address within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
        };
        let Some((addr, admin)) = parse_listen_line(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the server did not start: first stdout line {line:?}; log:\n{}",
                self.log_tail()
            ));
        };
        self.child = Some(child);
        self.addr = addr;
        self.admin_addr = admin;
        self.first_line = line.trim_end().to_string();
        Ok(())
    }

    /// SIGKILLs the server and waits for it to die.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (by process id, with `kill -TERM`) without waiting.
    pub fn terminate(&mut self) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits up to `limit` for the process to exit; its exit status, or None if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (if running) and starts it again on the same data folder and flags.
    /// The new process listens on a new port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// True while the child process has not exited.
    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last part of the current server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    // -- talking to it ------------------------------------------------------------------------

    /// A new connection to the main listener.
    pub fn connect(&self) -> Conn {
        Conn::open(self.addr)
    }

    /// A new connection to the admin listener.
    pub fn connect_admin(&self) -> Conn {
        Conn::open(self.admin_addr.expect("the server has no admin listener"))
    }

    /// Sends one request on a fresh connection and reads the response.
    pub fn send(&self, req: &Request) -> Response {
        let mut c = self.connect();
        c.send(req).unwrap_or_else(|e| {
            panic!(
                "{} {}: {e}\nlog:\n{}",
                req.method,
                req.target,
                self.log_tail()
            )
        })
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(&Request::new("GET", path))
    }

    pub fn ping(&self) -> Response {
        self.send(&Request::bits("Ping", "/"))
    }

    /// Create-Session at `url_path`; asserts 200 and returns the session id.
    pub fn create_session(&self, url_path: &str) -> String {
        let r = self.send(&create_request(url_path));
        assert_eq!(
            r.status, 200,
            "Create-Session at {url_path}: expected 200, got {}\n{r:?}",
            r.status
        );
        r.header("BITS-Session-Id")
            .unwrap_or_else(|| panic!("Create-Session Ack without BITS-Session-Id: {r:?}"))
            .to_string()
    }

    /// Sends `bytes` as the fragment at `start` of an upload of `total` bytes.
    pub fn fragment(&self, id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Response {
        self.send(&fragment_request(id, path, start, bytes, total))
    }

    pub fn close(&self, id: &str, path: &str) -> Response {
        self.send(&Request::bits("Close-Session", path).header("BITS-Session-Id", id))
    }

    pub fn cancel(&self, id: &str, path: &str) -> Response {
        self.send(&Request::bits("Cancel-Session", path).header("BITS-Session-Id", id))
    }

    /// Uploads `data` to `path` in fragments of `chunk` bytes, checking every Ack, then closes.
    pub fn upload(&self, path: &str, data: &[u8], chunk: usize) -> String {
        let id = self.create_session(path);
        self.send_fragments(&id, path, data, 0, chunk);
        let r = self.close(&id, path);
        assert_eq!(r.status, 200, "Close-Session of {path}: {r:?}");
        id
    }

    /// Sends `data[from..]` in order in fragments of `chunk` bytes, asserting each Ack's offset.
    pub fn send_fragments(&self, id: &str, path: &str, data: &[u8], from: usize, chunk: usize) {
        let total = data.len() as u64;
        if data.is_empty() {
            let r = self.send(&empty_fragment_request(id, path));
            assert_eq!(r.status, 200, "empty fragment: {r:?}");
            return;
        }
        let mut at = from;
        let mut steps = 0;
        while at < data.len() {
            steps += 1;
            assert!(steps <= data.len() + 1, "upload loop did not end");
            let end = (at + chunk).min(data.len());
            let r = self.fragment(id, path, at as u64, &data[at..end], total);
            assert_eq!(r.status, 200, "fragment {at}-{} of {path}: {r:?}", end - 1);
            assert_eq!(
                r.received(),
                Some(end as u64),
                "fragment {at}-{}: Ack offset",
                end - 1
            );
            at = end;
        }
    }

    /// GET /metrics from wherever it is served.
    pub fn metrics(&self) -> String {
        let r = match self.admin_addr {
            Some(_) => self
                .connect_admin()
                .send(&Request::new("GET", "/metrics"))
                .expect("GET /metrics"),
            None => self.get("/metrics"),
        };
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        r.text()
    }

    /// The session folder `<data-dir>/BITS-Sessions/Requests/{id}`.
    pub fn session_dir(&self, id: &str) -> PathBuf {
        self.data_dir
            .join("BITS-Sessions")
            .join("Requests")
            .join(id)
    }

    // -- environment and stdout ---------------------------------------------------------------

    /// Like `start`, with extra environment variables (e.g. `BITSFARM_TEST_PAUSE_AT`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut s = Self::start(extra);
        s.set_env(env);
        s.restart();
        s
    }

    /// Replaces the extra environment variables used from the next start on.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Every stdout line the latest start printed so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().unwrap().clone()
    }

    /// Waits up to `limit` for a stdout line of the latest start containing `needle`.
    pub fn wait_stdout(&self, needle: &str, limit: Duration) -> Option<String> {
        let mut found = None;
        wait_until(limit, || {
            found = self
                .stdout_lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            found.is_some()
        });
        found
    }

    /// A counter or gauge from /metrics (summed over its label sets); 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if thread::panicking() && self.child.is_some() {
            eprintln!("---- bitsfarm log (tail) ----\n{}", self.log_tail());
        }
        self.kill();
    }
}

/// `bitsfarm: listening on http://A[ admin http://B]`.
fn parse_listen_line(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let line = line.trim_end();
    let rest = line
        .strip_prefix("bitsfarm: listening on http://")
        .or_else(|| line.strip_prefix("bitsfarm: listening on https://"))?;
    let (main, admin) = match rest.split_once(" admin http://") {
        Some((m, a)) => (m, Some(a.parse().ok()?)),
        None => (rest, None),
    };
    Some((main.parse().ok()?, admin))
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 request, written to the wire exactly as given: `Host` is added first unless the
/// test set one, `Content-Length` is added only when `auto_length` is on (the default) and the test
/// set none.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub auto_length: bool,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_string(),
            target: target.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            auto_length: true,
        }
    }

    /// `BITS_POST <target>` with `BITS-Packet-Type: <packet>`.
    pub fn bits(packet: &str, target: &str) -> Request {
        Request::new("BITS_POST", target).header("BITS-Packet-Type", packet)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Removes every header called `name` (any case).
    pub fn without(mut self, name: &str) -> Request {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Request {
        self.body = body.to_vec();
        self
    }

    /// Sends no `Content-Length` unless the test adds one itself.
    pub fn no_auto_length(mut self) -> Request {
        self.auto_length = false;
        self
    }

    fn has(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The request head (request line and headers, ending with the blank line).
    pub fn head_bytes(&self, host: SocketAddr) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if !self.has("host") {
            out.push_str(&format!("Host: {host}\r\n"));
        }
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if self.auto_length && !self.has("content-length") {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    pub fn to_bytes(&self, host: SocketAddr) -> Vec<u8> {
        let mut out = self.head_bytes(host);
        out.extend_from_slice(&self.body);
        out
    }
}

pub fn create_request(url_path: &str) -> Request {
    Request::bits("Create-Session", url_path).header("BITS-Supported-Protocols", GUID)
}

pub fn content_range(start: u64, len: usize, total: u64) -> String {
    format!("bytes {start}-{}/{total}", start + len as u64 - 1)
}

pub fn fragment_request(id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Request {
    Request::bits("Fragment", path)
        .header("BITS-Session-Id", id)
        .header("Content-Range", &content_range(start, bytes.len(), total))
        .body(bytes)
}

/// The fragment of a zero-byte upload: `Content-Range: bytes */0`, no body.
pub fn empty_fragment_request(id: &str, path: &str) -> Request {
    Request::bits("Fragment", path)
        .header("BITS-Session-Id", id)
        .header("Content-Range", "bytes */0")
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(300)]);
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Response {
    /// The first header called `name`, compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header called `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `BITS-Received-Content-Range` as a number.
    pub fn received(&self) -> Option<u64> {
        self.header("BITS-Received-Content-Range").map(|v| {
            v.trim()
                .parse()
                .expect("BITS-Received-Content-Range is a number")
        })
    }

    pub fn error_code(&self) -> Option<&str> {
        self.header("BITS-Error-Code")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// One TCP connection; several requests may be sent on it in turn (keep-alive).
pub struct Conn {
    pub stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        assert!(addr.ip().is_loopback(), "tests only talk to 127.0.0.1");
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            peer: addr,
            buf: Vec::new(),
        }
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Writes `req` and reads its response.
    pub fn send(&mut self, req: &Request) -> io::Result<Response> {
        self.write_raw(&req.to_bytes(self.peer))?;
        self.read_response(req.method.eq_ignore_ascii_case("HEAD"))
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes the request head and only the first `n` bytes of its body.
    pub fn write_partial(&mut self, req: &Request, n: usize) -> io::Result<()> {
        let mut bytes = req.head_bytes(self.peer);
        bytes.extend_from_slice(&req.body[..n.min(req.body.len())]);
        self.write_raw(&bytes)
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() > MAX_RESPONSE {
            return Err(io::Error::other("response too large"));
        }
        Ok(n)
    }

    /// Reads one response (head, then a body framed by Content-Length, chunked coding or EOF).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let (status, headers, head_len) = loop {
            let mut hdrs = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut hdrs);
            match resp
                .parse(&self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                httparse::Status::Complete(n) => {
                    let status = resp.code.unwrap_or(0);
                    let headers: Vec<(String, String)> = owned_headers(resp.headers);
                    break (status, headers, n);
                }
                httparse::Status::Partial => {
                    if self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed before a full response head ({} bytes read)",
                                self.buf.len()
                            ),
                        ));
                    }
                }
            }
        };
        self.buf.drain(..head_len);
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let no_body = head_request || status / 100 == 1 || status == 204 || status == 304;
        let body = if no_body {
            Vec::new()
        } else if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked()?
        } else if let Some(len) = find("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
            }
            self.buf.drain(..len).collect()
        } else {
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        for _ in 0..1_000_000 {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk size"));
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk"));
                }
            }
            if size == 0 {
                // No trailers are expected; skip the final CRLF.
                self.buf.drain(..2);
                return Ok(body);
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
        Err(io::Error::other("too many chunks"))
    }

    /// Waits up to `limit` for the server to close the connection; true if it did (EOF or reset).
    /// Any response bytes that arrive first are returned through `seen`.
    pub fn wait_closed(&mut self, limit: Duration, seen: &mut Vec<u8>) -> bool {
        let deadline = Instant::now() + limit;
        seen.append(&mut self.buf);
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Data and files
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (SplitMix64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn file_sha256(path: &Path) -> String {
    let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sha256_hex(&data)
}

/// Every file and folder below `dir` (recursively), as paths relative to `dir`, sorted. Skips the
/// top-level entries named in `skip`.
pub fn tree(dir: &Path, skip: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut visited = 0;
    while let Some(d) = stack.pop() {
        visited += 1;
        assert!(visited < 100_000, "directory walk did not end");
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if d == dir && skip.iter().any(|s| rel.as_os_str() == *s) {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns the last result.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the response is a well-formed error Ack with `status` and (if given) `code`.
#[track_caller]
pub fn assert_error(r: &Response, status: u16, code: Option<&str>, what: &str) {
    assert_eq!(
        r.status, status,
        "{what}: expected HTTP {status}, got {r:?}"
    );
    assert_ack_shape(r, what);
    let got = r
        .error_code()
        .unwrap_or_else(|| panic!("{what}: error Ack without BITS-Error-Code: {r:?}"));
    assert!(
        is_hresult(got),
        "{what}: BITS-Error-Code {got:?} is not 0x + 8 upper-case hex digits"
    );
    assert_eq!(
        r.header("BITS-Error-Context"),
        Some("0x5"),
        "{what}: BITS-Error-Context: {r:?}"
    );
    if let Some(code) = code {
        assert_eq!(got, code, "{what}: BITS-Error-Code: {r:?}");
    }
}

/// Every Ack: `BITS-Packet-Type: Ack`, `Content-Length: 0`, empty body.
#[track_caller]
pub fn assert_ack_shape(r: &Response, what: &str) {
    assert_eq!(
        r.header("BITS-Packet-Type"),
        Some("Ack"),
        "{what}: BITS-Packet-Type: {r:?}"
    );
    assert_eq!(
        r.header("Content-Length"),
        Some("0"),
        "{what}: Content-Length: {r:?}"
    );
    assert!(r.body.is_empty(), "{what}: Ack with a body: {r:?}");
}

pub fn is_hresult(v: &str) -> bool {
    v.len() == 10
        && v.starts_with("0x")
        && v[2..]
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, 'A'..='F'))
}

/// The value of metric `name` in a Prometheus/OpenMetrics text exposition, summed over its label
/// sets; 0 when it is absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once('}')?.1
            } else {
                rest
            };
            if !rest.starts_with(' ') {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The reference server application (`bitsfarm receiver`)
// ---------------------------------------------------------------------------------------------

/// One delivery the receiver stored: `<dir>/<key>/{content,delivery.json}`.
#[derive(Debug, Clone)]
pub struct StoredDelivery {
    pub key: String,
    pub content_sha256: String,
    pub record: serde_json::Value,
}

impl StoredDelivery {
    /// The reply the receiver gave (and gives again to any repeat).
    pub fn reply(&self) -> String {
        self.record["reply"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A running `bitsfarm receiver` on 127.0.0.1 with its own temporary folder. SIGKILLed on drop.
pub struct ReceiverProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _root: TempDir,
}

impl ReceiverProcess {
    pub fn start() -> ReceiverProcess {
        let root = tempfile::Builder::new()
            .prefix("bitsfarm-it-receiver-")
            .tempdir()
            .expect("creating the receiver's folder");
        let dir = root.path().join("deliveries");
        let log = fs::File::create(root.path().join("receiver.log")).expect("receiver log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
            .arg("receiver")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--dir")
            .arg(&dir)
            .env("RUST_LOG", "bitsfarm=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting bitsfarm receiver");
        let stdout = child.stdout.take().expect("the receiver's stdout");
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let _ = tx.send(first);
            let mut sink = [0u8; 4096];
            while let Ok(n) = reader.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
        let addr = line
            .trim_end()
            .strip_prefix("bitsfarm receiver: listening on http://")
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the receiver did not start: first stdout line {line:?}; log:\n{}",
                fs::read_to_string(root.path().join("receiver.log")).unwrap_or_default()
            );
        };
        ReceiverProcess {
            child: Some(child),
            addr,
            dir,
            _root: root,
        }
    }

    /// `http://ADDR<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn metrics(&self) -> String {
        let r = Conn::open(self.addr)
            .send(&Request::new("GET", "/metrics"))
            .expect("GET the receiver's /metrics");
        assert_eq!(r.status, 200, "receiver /metrics: {r:?}");
        r.text()
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }

    /// Every delivery stored, sorted by key (the `.incoming` staging folder is not one).
    pub fn deliveries(&self) -> Vec<StoredDelivery> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            let record: serde_json::Value = serde_json::from_slice(
                &fs::read(p.join("delivery.json"))
                    .unwrap_or_else(|e| panic!("{}/delivery.json: {e}", p.display())),
            )
            .expect("delivery.json is JSON");
            out.push(StoredDelivery {
                key: name,
                content_sha256: file_sha256(&p.join("content")),
                record,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// SIGKILLs the receiver.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted server application
// ---------------------------------------------------------------------------------------------

/// A request the scripted backend received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the scripted backend does with a request (after reading all of it).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Answers with this status, headers and body (and closes the connection).
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Holds the connection open without answering for this long, then closes it.
    Stall(Duration),
    /// Sends a 200 head promising a longer body than it sends, then stalls like `Stall`.
    HeadThenStall(Duration),
}

impl Answer {
    pub fn ok(body: &[u8]) -> Answer {
        Answer::status(200, body)
    }

    pub fn status(status: u16, body: &[u8]) -> Answer {
        Answer::Reply {
            status,
            headers: Vec::new(),
            body: body.to_vec(),
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Answer {
        match self {
            Answer::Reply {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.to_string(), value.to_string()));
                Answer::Reply {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }
}

type Script = Box<dyn FnMut(usize, &Recorded) -> Answer + Send>;

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every request and answers what the test's
/// script says (the script gets the request's index, counting from 0, and the request). One
/// thread per connection; every answer closes its connection.
pub struct Backend {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<Script>>,
    stop: Arc<AtomicBool>,
    /// Connections accepted (including ones that sent no complete request).
    connections: Arc<AtomicUsize>,
}

impl Backend {
    pub fn start(script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static) -> Backend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script)
    }

    /// Starts on a given address (to take over a port that refused connections before).
    pub fn start_on(
        addr: SocketAddr,
        script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static,
    ) -> Backend {
        assert!(addr.ip().is_loopback(), "tests only listen on 127.0.0.1");
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("binding the scripted backend on {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        {
            let (requests, script, stop, connections) = (
                requests.clone(),
                script.clone(),
                stop.clone(),
                connections.clone(),
            );
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (requests, script, stop) = (requests.clone(), script.clone(), stop.clone());
                    thread::spawn(move || serve_scripted(stream, &requests, &script, &stop));
                }
            });
        }
        Backend {
            addr,
            requests,
            script,
            stop,
            connections,
        }
    }

    /// `http://ADDR<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Replaces the script for the requests still to come.
    pub fn set_script(&self, script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static) {
        *self.script.lock().unwrap() = Box::new(script);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_scripted(
    mut stream: TcpStream,
    requests: &Mutex<Vec<Recorded>>,
    script: &Mutex<Script>,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(rec) = read_request(&mut stream) else {
        return;
    };
    let answer = {
        let mut all = requests.lock().unwrap();
        all.push(rec.clone());
        let index = all.len() - 1;
        drop(all);
        (script.lock().unwrap())(index, &rec)
    };
    match answer {
        Answer::Reply {
            status,
            headers,
            body,
        } => {
            let mut out = format!("HTTP/1.1 {status} Scripted\r\n");
            for (n, v) in &headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Lets the peer read the answer before the socket goes away.
            let mut sink = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut sink);
        }
        Answer::HeadThenStall(d) => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial");
            let _ = stream.flush();
            let deadline = Instant::now() + d;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Answer::Stall(d) => {
            let deadline = Instant::now() + d;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Reads one request: head, then a body framed by Content-Length or chunked coding.
fn read_request(stream: &mut TcpStream) -> io::Result<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let fill = |stream: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]| -> io::Result<()> {
        let n = stream.read(chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(io::Error::other("request too large"));
        }
        Ok(())
    };
    let (method, target, headers, head_len) = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut hdrs);
        match req
            .parse(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            httparse::Status::Complete(n) => {
                let headers: Vec<(String, String)> = owned_headers(req.headers);
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    headers,
                    n,
                );
            }
            httparse::Status::Partial => fill(stream, &mut buf, &mut chunk)?,
        }
    };
    buf.drain(..head_len);
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            let mut body = Vec::new();
            let mut done = false;
            for _ in 0..1_000_000 {
                let Some(i) = buf.windows(2).position(|w| w == b"\r\n") else {
                    fill(stream, &mut buf, &mut chunk)?;
                    continue;
                };
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
                while buf.len() < i + 2 + size + 2 {
                    fill(stream, &mut buf, &mut chunk)?;
                }
                body.extend_from_slice(&buf[i + 2..i + 2 + size]);
                buf.drain(..i + 2 + size + 2);
                if size == 0 {
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(io::Error::other("too many chunks"));
            }
            body
        } else {
            let len: usize = find("content-length")
                .map(|v| v.trim().parse().unwrap_or(0))
                .unwrap_or(0);
            while buf.len() < len {
                fill(stream, &mut buf, &mut chunk)?;
            }
            buf.truncate(len);
            buf
        };
    Ok(Recorded {
        method,
        target,
        headers,
        body,
    })
}

/// Parsed header lines as owned (name, value) pairs; values that are not UTF-8 are kept lossily.
pub fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}
