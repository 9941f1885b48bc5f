//! `cargo bench --bench throughput`: the upload server against the baselines of the same machine,
//! measured in the same run, printed as one table (see BENCHMARKS.md).
//!
//! - 1 GiB through BITS (the `bitsfarm` client library, our release server, 8 MiB fragments,
//!   loopback, data folder on the normal disk), with and without `--unsafe-no-sync`, against
//!   `curl -T` to nginx's WebDAV module, `dd oflag=dsync bs=8M`, and the ceilings of an unsynced
//!   upload: a loopback copy and `dd bs=8M` over a file in the page cache;
//! - 64 KiB fragments on one keep-alive connection against 64 KiB PUTs to the same nginx;
//! - 1,000 sessions x 1 MiB from 50 connections (time, p50/p99 Ack latency, peak RSS), against
//!   1,000 PUTs x 1 MiB to nginx from 50 connections;
//! - 10,000 open idle sessions: RSS per session;
//! - `load`: 4 MiB uploads (one session, one fragment each) from 1, 10, 50 and 200 connections
//!   until about 1 GiB went through: server CPU seconds per GiB (flushed and `--unsafe-no-sync`)
//!   and peak RSS, against 4 MiB PUTs to nginx (master and workers);
//! - `uploads`: 1,000 uploads of 64 KiB, a session each, from one connection and from 16, against
//!   `dd oflag=dsync bs=64K` and 1,000 64 KiB PUTs to nginx;
//! - `syscalls`: syscalls and flushes per 64 KiB upload and per packet type, by `strace -c -f`;
//! - the operator: every child object for 1,000 farms with the pure builders, and the real
//!   `bitsfarm operator` process's RSS with 1,000 UploadFarms served by a mocked API server.
//!
//! Only correctness is asserted (the SHA-256 of what landed), never a speed. Without `--bench`
//! (as `cargo test --all-targets` runs it) it prints a note and exits: the point of building it
//! there is that it cannot rot.
//!
//! `cargo bench --bench throughput -- large small many load uploads syscalls idle operator` runs
//! only the named parts. `BITSFARM_BENCH_DIR` picks the folder the data goes to (default: the
//! system temp folder); `BITSFARM_BENCH_ROUNDS` the rounds of the interleaved parts (default 3);
//! `BITSFARM_BENCH_LOAD_MIB` what each `load` run sends (default 1024), `BITSFARM_BENCH_UPLOADS`
//! the uploads of `uploads` (default 1000), `BITSFARM_BENCH_SYSCALL_N` those of each traced
//! phase of `syscalls` (default 200).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const GIB: u64 = 1 << 30;
const MIB: usize = 1 << 20;
const FRAGMENT: u64 = 8 << 20;
const SMALL: usize = 64 << 10;
const SMALL_COUNT: usize = 2000;
const MANY_SESSIONS: usize = 1000;
const MANY_CONNS: usize = 50;
const IDLE_SESSIONS: usize = 10_000;
const FARMS: usize = 1000;
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "throughput: not run (it takes minutes and installs nginx); run `cargo bench --bench throughput`"
        );
        return;
    }
    let only: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let want = |part: &str| only.is_empty() || only.contains(&part);

    let base = std::env::var_os("BITSFARM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("bitsfarm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).expect("creating the bench folder");
    let bench = Bench {
        base: base.clone(),
        rows: Vec::new(),
        median_of: None,
        flushed_uploads: None,
    };
    let mut bench = bench;
    let started = Instant::now();
    machine_note(&base);

    let nginx = if want("large") || want("small") || want("many") || want("uploads") {
        Some(Nginx::start(&base.join("nginx")))
    } else {
        None
    };
    if want("large") {
        large(&mut bench, nginx.as_ref().unwrap());
    }
    if want("small") {
        small(&mut bench, nginx.as_ref().unwrap());
    }
    if want("many") {
        many(&mut bench, nginx.as_ref().unwrap());
    }
    if want("uploads") {
        uploads(&mut bench, nginx.as_ref().unwrap());
    }
    drop(nginx);
    if want("load") {
        load(&mut bench);
    }
    if want("syscalls") {
        syscalls(&mut bench);
    }
    if want("idle") {
        idle(&mut bench);
    }
    if want("operator") {
        operator(&mut bench);
    }
    bench.print();
    println!("total bench time: {:.0} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&base);
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Row {
    measure: String,
    ours: String,
    baseline: String,
    base_value: String,
    ratio: String,
}

struct Bench {
    base: PathBuf,
    rows: Vec<Row>,
    /// The rounds behind rows made by `row_rounds`, for the note under the table.
    median_of: Option<usize>,
    /// Per round of `uploads`: flushed uploads/s from 1 and from 16 connections, and dd's
    /// writes/s; `syscalls` turns them into flushes per second once it has counted the flushes of
    /// an upload.
    flushed_uploads: Option<[Vec<f64>; 3]>,
}

/// How a figure is shown: its unit and its decimals.
#[derive(Clone, Copy)]
struct Unit(&'static str, usize);

impl Unit {
    fn show(self, v: f64) -> String {
        format!("{v:.prec$} {}", self.0, prec = self.1)
    }
}

/// The round whose ratio `ours / base` is the median, the lower middle for an even count: a row
/// takes both values and the ratio from it, so the three always agree (medians taken apart
/// could read "1166 vs 361 MB/s, 1.94x").
fn median_round(ours: &[f64], base: &[f64]) -> usize {
    let ratio = |i: usize| ours[i] / base[i];
    let mut idx: Vec<usize> = (0..ours.len().min(base.len())).collect();
    idx.sort_by(|&a, &b| ratio(a).total_cmp(&ratio(b)));
    idx[(idx.len() - 1) / 2]
}

impl Bench {
    fn row(&mut self, measure: &str, ours: String, baseline: &str, base_value: String, ratio: f64) {
        let r = Row {
            measure: measure.into(),
            ours,
            baseline: baseline.into(),
            base_value,
            ratio: if ratio.is_finite() {
                format!("{ratio:.2}x")
            } else {
                "-".into()
            },
        };
        eprintln!(
            "  {} | {} | {} {} | {}",
            r.measure, r.ours, r.baseline, r.base_value, r.ratio
        );
        self.rows.push(r);
    }

    /// A row from figures measured once per round (`ours[i]` next to `base[i]`): values and
    /// ratio from the median round by ratio.
    fn row_rounds(
        &mut self,
        measure: &str,
        ours: (&[f64], Unit),
        baseline: &str,
        base: (&[f64], Unit),
    ) {
        let (n, i) = (ours.0.len(), median_round(ours.0, base.0));
        self.median_of = Some(n);
        self.row(
            &format!("{measure} [median round of {n}]"),
            ours.1.show(ours.0[i]),
            baseline,
            base.1.show(base.0[i]),
            ours.0[i] / base.0[i],
        );
    }

    fn print(&self) {
        let headers = ["measure", "bitsfarm", "baseline", "baseline value", "ratio"];
        let cells: Vec<[&str; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.measure.as_str(),
                    r.ours.as_str(),
                    r.baseline.as_str(),
                    r.base_value.as_str(),
                    r.ratio.as_str(),
                ]
            })
            .collect();
        let mut w = [0usize; 5];
        for row in std::iter::once(&headers).chain(cells.iter()) {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |row: &[&str; 5]| {
            let mut s = String::from("|");
            for (i, c) in row.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s
        };
        println!();
        println!("{}", line(&headers));
        let mut sep = String::from("|");
        for x in w {
            let _ = write!(sep, "{}|", "-".repeat(x + 2));
        }
        println!("{sep}");
        for c in &cells {
            println!("{}", line(c));
        }
        println!();
        if let Some(n) = self.median_of {
            println!(
                "[median round of {n}]: values and ratio from the median round (by ratio) of {n} (the lower middle for an even count); every round is on stderr."
            );
            println!();
        }
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn machine_note(base: &Path) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let df = Command::new("df")
        .arg("-h")
        .arg(base)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    eprintln!("machine: {cores} cores; load {}", load.trim());
    eprintln!("bench folder {}: {df}", base.display());
    eprintln!("its file system: {}", file_system(base));
}

/// The file system under `dir`, and for ext4 whether it has a journal: without one, every new
/// inode makes the kernel step over the inodes freed in the last minutes (`recently_deleted`),
/// which decides what a small upload costs there (BENCHMARKS.md).
fn file_system(dir: &Path) -> String {
    let out = Command::new("findmnt")
        .args(["-no", "SOURCE,FSTYPE", "--target"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut it = out.split_whitespace();
    let (source, fstype) = (it.next().unwrap_or("?"), it.next().unwrap_or("?"));
    if fstype != "ext4" {
        return format!("{fstype} on {source}");
    }
    let dev = source.rsplit('/').next().unwrap_or(source);
    let journal = std::fs::read_dir("/proc/fs/jbd2")
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{dev}-"))
            })
        })
        .unwrap_or(false);
    if journal {
        format!("ext4 on {source}, with a journal")
    } else {
        format!(
            "ext4 on {source}, WITHOUT a journal: each new inode scans past recently freed ones"
        )
    }
}

/// Flushes dirty pages so one measurement does not pay for the previous one's writeback.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(300));
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

fn check(what: &str, got: &str, want: &str) {
    assert_eq!(
        got, want,
        "{what}: the stored bytes differ from what was sent"
    );
}

/// Reproducible incompressible bytes.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn make_source(path: &Path, size: u64) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 * MIB];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], &mut seed);
        f.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush().unwrap();
    hex(&h.finalize())
}

// ---------------------------------------------------------------------------------------------
// Processes: our server and nginx.

/// The `bitsfarm` binary built with this bench; `BITSFARM_BENCH_EXE` names another one (to
/// compare two builds on the same machine at the same time).
fn bitsfarm_exe() -> String {
    std::env::var("BITSFARM_BENCH_EXE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_bitsfarm").to_string())
}

/// Whether the server binary takes `flag` (an older one given with `BITSFARM_BENCH_EXE` may not).
fn serve_takes(flag: &str) -> bool {
    Command::new(bitsfarm_exe())
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data: &Path, log: &Path, extra: &[&str]) -> Server {
        std::fs::create_dir_all(data).unwrap();
        let mut child = Command::new(bitsfarm_exe())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--allow-overwrites",
                "--data-dir",
            ])
            .arg(data)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting bitsfarm serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("bitsfarm: listening on http://")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from bitsfarm serve: {line:?}"));
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` / `VmHWM` of a process, in bytes.
fn proc_mem(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// User plus system CPU seconds a process (all its threads) has used so far. /proc counts in
/// USER_HZ, which Linux fixes at 100 whatever the kernel's own tick.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

struct Nginx {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
}

fn nginx_exe() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    eprintln!("nginx is missing: installing Debian's nginx package (apt-get)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success())
        || (Command::new("apt-get").arg("update").status().is_ok()
            && Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "nginx"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success()));
    assert!(
        ok,
        "could not install nginx with apt-get; install it and run again"
    );
    "/usr/sbin/nginx".into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let exe = nginx_exe();
        if Command::new("curl").arg("--version").output().is_err() {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "curl"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
        let root = dir.join("dav");
        let tmp = dir.join("body-temp");
        for d in [&root, &tmp] {
            std::fs::create_dir_all(d).unwrap();
        }
        let port = free_port();
        // As root, the workers would run as nobody and could not write into our folder.
        let user = {
            use std::os::unix::fs::MetadataExt;
            match std::fs::metadata("/proc/self").map(|m| m.uid()) {
                Ok(0) => "user root root;",
                _ => "",
            }
        };
        let conf = format!(
            r#"daemon off;
{user}
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {dir}/proxy-temp;
    fastcgi_temp_path {dir}/fastcgi-temp;
    uwsgi_temp_path {dir}/uwsgi-temp;
    scgi_temp_path {dir}/scgi-temp;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        client_max_body_size 0;
        client_body_buffer_size 1m;
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw;
        }}
    }}
}}
"#,
            dir = dir.display(),
            tmp = tmp.display(),
            root = root.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, addr, root }
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Peak RSS of the master and its workers together.
    fn peak_rss(&self) -> u64 {
        self.pids().into_iter().map(|p| proc_mem(p, "VmHWM")).sum()
    }

    /// CPU seconds the master and its workers have used so far.
    fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: a fast shutdown that also stops the workers.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A tight HTTP/1.1 client (blocking, keep-alive), the same for BITS and for nginx.

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    head: Vec<u8>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Resp {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Conn {
            s,
            buf: Vec::with_capacity(16 << 10),
            head: Vec::with_capacity(1024),
        }
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.request_parts(method, path, headers, &[body])
    }

    /// A request whose body is the concatenation of `parts` (a per-upload prefix before shared
    /// bytes, so 200 threads need no 4 MiB copy each).
    fn request_parts(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        parts: &[&[u8]],
    ) -> Resp {
        self.head.clear();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let _ = write!(
            self.head,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n"
        );
        for (k, v) in headers {
            let _ = write!(self.head, "{k}: {v}\r\n");
        }
        self.head.extend_from_slice(b"\r\n");
        // One write for small requests, as a real client's buffered writer would; large parts
        // go out as they are.
        let mut sent_head = false;
        for p in parts {
            if !sent_head && self.head.len() + p.len() <= 256 << 10 {
                self.head.extend_from_slice(p);
            } else {
                if !sent_head {
                    self.s.write_all(&self.head).unwrap();
                    sent_head = true;
                }
                self.s.write_all(p).unwrap();
            }
        }
        if !sent_head {
            self.s.write_all(&self.head).unwrap();
        }
        self.response()
    }

    fn response(&mut self) -> Resp {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).expect("bad HTTP response") {
                let status = r.code.unwrap_or(0);
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let resp = Resp { status, headers };
                let len: usize = resp
                    .get("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                self.buf.drain(..n);
                while self.buf.len() < len {
                    self.fill();
                }
                self.buf.drain(..len);
                return resp;
            }
            self.fill();
        }
    }

    fn fill(&mut self) {
        let mut tmp = [0u8; 16 << 10];
        let n = self.s.read(&mut tmp).unwrap();
        assert!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&tmp[..n]);
    }

    fn create_session(&mut self, path: &str) -> String {
        let r = self.request(
            "BITS_POST",
            path,
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            &[],
        );
        assert_eq!(r.status, 200, "Create-Session: {:?}", r.headers);
        r.get("bits-session-id").unwrap().to_string()
    }

    fn fragment(&mut self, path: &str, id: &str, start: u64, total: u64, body: &[u8]) {
        self.fragment_parts(path, id, start, total, &[body]);
    }

    fn fragment_parts(&mut self, path: &str, id: &str, start: u64, total: u64, parts: &[&[u8]]) {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let range = format!("bytes {}-{}/{}", start, start + len - 1, total);
        let r = self.request_parts(
            "BITS_POST",
            path,
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", id),
                ("Content-Range", &range),
            ],
            parts,
        );
        assert_eq!(r.status, 200, "Fragment {range}: {:?}", r.headers);
        let next: u64 = r
            .get("bits-received-content-range")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(next, start + len);
    }

    fn close_session(&mut self, path: &str, id: &str) {
        let r = self.request(
            "BITS_POST",
            path,
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", id),
            ],
            &[],
        );
        assert_eq!(r.status, 200, "Close-Session: {:?}", r.headers);
    }

    fn put(&mut self, path: &str, body: &[u8]) {
        self.put_parts(path, &[body]);
    }

    fn put_parts(&mut self, path: &str, parts: &[&[u8]]) {
        let r = self.request_parts("PUT", path, &[], parts);
        assert!(
            r.status == 201 || r.status == 204,
            "PUT {path}: HTTP {}",
            r.status
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1 GiB.

fn bits_upload_with_client(addr: SocketAddr, file: &Path, name: &str) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let up = bitsfarm::client::Uploader::new(bitsfarm::client::UploadOptions {
            fragment_size: FRAGMENT,
            ..Default::default()
        })
        .unwrap();
        let url = reqwest::Url::parse(&format!("http://{addr}/{name}")).unwrap();
        let t = Instant::now();
        let report = up.upload(file, &url, |_| {}, || false).await.unwrap();
        let d = t.elapsed();
        assert_eq!(report.bytes, GIB);
        assert_eq!(report.restarts + report.retries, 0, "{report:?}");
        d
    })
}

/// The same protocol from the tight client: the file read in 8 MiB pieces and written out.
fn bits_upload_tight(addr: SocketAddr, file: &Path, name: &str) -> Duration {
    let path = format!("/{name}");
    let mut f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; FRAGMENT as usize];
    let t = Instant::now();
    let mut c = Conn::open(addr);
    let id = c.create_session(&path);
    each_fragment(&mut f, &mut buf, |at, piece| {
        c.fragment(&path, &id, at, GIB, piece)
    });
    c.close_session(&path, &id);
    t.elapsed()
}

/// Reads the first GiB of `f` in pieces of 8 MiB into `buf`, handing each to `each` with its
/// offset: how the tight client and the loopback ceiling send.
fn each_fragment(f: &mut std::fs::File, buf: &mut [u8], mut each: impl FnMut(u64, &[u8])) {
    let mut at = 0;
    while at < GIB {
        let n = (GIB - at).min(FRAGMENT) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        each(at, &buf[..n]);
        at += n as u64;
    }
}

/// `dd if=src of=out ARGS status=none`, which must succeed; how long it took.
fn run_dd(src: &Path, out: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let ok = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", out.display()))
        .args(args)
        .arg("status=none")
        .status()
        .unwrap()
        .success();
    let took = t.elapsed();
    assert!(ok, "dd {args:?} failed");
    took
}

/// 1 GiB through a loopback TCP connection with nothing at either end but copies: `file` read
/// in 8 MiB pieces and written to the socket, and a reader that drops what it receives.
fn loopback_copy(file: &Path) -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break got,
                Ok(n) => got += n as u64,
                Err(e) => panic!("loopback read: {e}"),
            }
        }
    });
    let mut f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; FRAGMENT as usize];
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    each_fragment(&mut f, &mut buf, |_, piece| s.write_all(piece).unwrap());
    drop(s);
    let got = sink.join().unwrap();
    let d = t.elapsed();
    assert_eq!(got, GIB, "the loopback reader got another length");
    d
}

/// Rounds of the interleaved measurements (`BITSFARM_BENCH_ROUNDS`, default 3). This VM's page
/// cache writes swing by 5x within minutes (host-side memory backing, other builds), so every
/// figure is measured once per round, next to its baseline, and a row shows the round whose
/// ratio is the median (`row_rounds`).
fn rounds() -> usize {
    std::env::var("BITSFARM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(3)
}

/// A count from the environment (to shorten a part while developing), else `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(default)
}

fn large(b: &mut Bench, nginx: &Nginx) {
    let n = rounds();
    eprintln!("== 1 GiB upload, {n} interleaved rounds");
    let src = b.base.join("source-1g.bin");
    let want = make_source(&src, GIB);
    settle();

    // dd with oflag=dsync: the disk's rate for bytes that are durable when acknowledged.
    let dd_run = || -> f64 {
        let dd_out = b.base.join("dd.out");
        let v = mbps(GIB, run_dd(&src, &dd_out, &["bs=8M", "oflag=dsync"]));
        check("dd", &sha_file(&dd_out), &want);
        let _ = std::fs::remove_file(&dd_out);
        settle();
        v
    };
    // curl -T: one PUT to nginx's WebDAV module (which does not sync).
    let nginx_run = || -> f64 {
        let t = Instant::now();
        let ok = Command::new("curl")
            .args(["-sS", "-f", "-o", "/dev/null", "-T"])
            .arg(&src)
            .arg(format!("http://{}/large.bin", nginx.addr))
            .status()
            .unwrap()
            .success();
        let v = mbps(GIB, t.elapsed());
        assert!(ok, "curl -T to nginx failed");
        let landed = nginx.root.join("large.bin");
        check("nginx PUT", &sha_file(&landed), &want);
        let _ = std::fs::remove_file(&landed);
        settle();
        v
    };
    // The two ceilings of an unsynced upload on this machine, measured like the tight client
    // sends: the source read in 8 MiB pieces and written to a loopback socket whose reader only
    // discards, and the same pieces copied into the page cache by dd without a sync. The page
    // cache figure is dd's second pass over its own file, whose pages are already cached: the
    // copy alone. dd's first pass (a new file) is printed too; on this VM it swings 5x with
    // how the host backs fresh guest memory, so it is no ceiling.
    let loopback_run = || -> f64 {
        let v = mbps(GIB, loopback_copy(&src));
        settle();
        v
    };
    let page_cache_run = || -> (f64, f64) {
        let out = b.base.join("cache.out");
        let new_file = mbps(GIB, run_dd(&src, &out, &["bs=8M"]));
        let cached = mbps(GIB, run_dd(&src, &out, &["bs=8M", "conv=notrunc"]));
        check("dd (page cache)", &sha_file(&out), &want);
        let _ = std::fs::remove_file(&out);
        settle();
        (cached, new_file)
    };
    let run = |label: &str, extra: &[&str], tight: bool| -> f64 {
        let data = b.base.join(format!("data-{label}"));
        let srv = Server::start(&data, &b.base.join(format!("server-{label}.log")), extra);
        let d = if tight {
            bits_upload_tight(srv.addr, &src, "large.bin")
        } else {
            bits_upload_with_client(srv.addr, &src, "large.bin")
        };
        let landed = data.join("large.bin");
        check(label, &sha_file(&landed), &want);
        drop(srv);
        let _ = std::fs::remove_dir_all(&data);
        settle();
        mbps(GIB, d)
    };
    let (mut dd, mut ng, mut ceiling) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sync, mut nosync, mut sync_tight, mut nosync_tight) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..n {
        // Each round starts at another place in the order: where a run falls (after a synced
        // run, after a delete of 1 GiB) moved nginx's figure by 4x in trials.
        let mut got = [0f64; 8];
        let mut new_file = 0f64;
        for k in 0..8 {
            let i = (k + round * 3) % 8;
            got[i] = match i {
                0 => dd_run(),
                1 => run("sync", &[], false),
                2 => run("sync-tight", &[], true),
                3 => nginx_run(),
                4 => run("nosync", &["--unsafe-no-sync"], false),
                5 => run("nosync-tight", &["--unsafe-no-sync"], true),
                6 => loopback_run(),
                _ => {
                    let (cached, fresh) = page_cache_run();
                    new_file = fresh;
                    cached
                }
            };
        }
        let [d, s, st, g, ns, nst, lo, pc] = got;
        eprintln!(
            "   round {}: dd {d:.0}, sync {s:.0}, sync-tight {st:.0}, nginx {g:.0}, nosync {ns:.0}, nosync-tight {nst:.0}, loopback {lo:.0}, page cache {pc:.0} (new file {new_file:.0}) MB/s",
            round + 1
        );
        dd.push(d);
        ng.push(g);
        ceiling.push(lo.min(pc));
        sync.push(s);
        sync_tight.push(st);
        nosync.push(ns);
        nosync_tight.push(nst);
    }
    let _ = std::fs::remove_file(&src);

    // Every ratio is taken within a round (each pair measured minutes apart at most).
    let mb = Unit("MB/s", 0);
    b.row_rounds(
        "1 GiB, flush before Ack (bitsfarm client)",
        (&sync, mb),
        "dd oflag=dsync bs=8M",
        (&dd, mb),
    );
    b.row_rounds(
        "1 GiB, flush before Ack (tight client)",
        (&sync_tight, mb),
        "dd oflag=dsync bs=8M",
        (&dd, mb),
    );
    b.row_rounds(
        "1 GiB, --unsafe-no-sync (bitsfarm client)",
        (&nosync, mb),
        "nginx PUT, curl -T",
        (&ng, mb),
    );
    b.row_rounds(
        "1 GiB, --unsafe-no-sync (tight client)",
        (&nosync_tight, mb),
        "nginx PUT, curl -T",
        (&ng, mb),
    );
    b.row_rounds(
        "1 GiB, --unsafe-no-sync (tight client), to its ceiling",
        (&nosync_tight, mb),
        "min(loopback, page cache)",
        (&ceiling, mb),
    );
    b.row_rounds(
        "1 GiB, price of durability (tight client)",
        (&sync_tight, mb),
        "same, --unsafe-no-sync",
        (&nosync_tight, mb),
    );
}

// ---------------------------------------------------------------------------------------------
// 64 KiB fragments on one connection.

fn small(b: &mut Bench, nginx: &Nginx) {
    let n = rounds();
    eprintln!("== 64 KiB fragments on one keep-alive connection, {n} interleaved rounds");
    let total = (SMALL * SMALL_COUNT) as u64;
    let mut data = vec![0u8; SMALL * SMALL_COUNT];
    let mut seed = 7u64;
    fill(&mut data, &mut seed);
    let want = hex(&Sha256::digest(&data));

    // nginx: one PUT per 64 KiB piece, each to its own file.
    let nginx_run = || -> f64 {
        let mut c = Conn::open(nginx.addr);
        let t = Instant::now();
        for (i, piece) in data.chunks(SMALL).enumerate() {
            c.put(&format!("/small/{i:05}"), piece);
        }
        let ng = SMALL_COUNT as f64 / t.elapsed().as_secs_f64();
        drop(c);
        let mut h = Sha256::new();
        for i in 0..SMALL_COUNT {
            h.update(std::fs::read(nginx.root.join(format!("small/{i:05}"))).unwrap());
        }
        check("nginx 64 KiB PUTs", &hex(&h.finalize()), &want);
        let _ = std::fs::remove_dir_all(nginx.root.join("small"));
        settle();
        ng
    };
    let run = |label: &str, extra: &[&str]| -> f64 {
        let dir = b.base.join(format!("small-{label}"));
        let srv = Server::start(&dir, &b.base.join(format!("small-{label}.log")), extra);
        let mut c = Conn::open(srv.addr);
        let id = c.create_session("/small.bin");
        let t = Instant::now();
        for (i, piece) in data.chunks(SMALL).enumerate() {
            c.fragment("/small.bin", &id, (i * SMALL) as u64, total, piece);
        }
        let rate = SMALL_COUNT as f64 / t.elapsed().as_secs_f64();
        c.close_session("/small.bin", &id);
        check(label, &sha_file(&dir.join("small.bin")), &want);
        drop(srv);
        let _ = std::fs::remove_dir_all(&dir);
        settle();
        rate
    };
    // The disk's rate for 64 KiB pieces that are durable when acknowledged.
    let src = b.base.join("small-source.bin");
    std::fs::write(&src, &data).unwrap();
    let dd_run = || -> f64 {
        let dd_out = b.base.join("small-dd.out");
        settle();
        let took = run_dd(&src, &dd_out, &["bs=64K", "oflag=dsync"]);
        check("dd 64 KiB", &sha_file(&dd_out), &want);
        let _ = std::fs::remove_file(&dd_out);
        SMALL_COUNT as f64 / took.as_secs_f64()
    };
    let (mut sync, mut nosync, mut ng, mut dd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..n {
        let mut got = [0f64; 4];
        for k in 0..4 {
            let i = (k + round) % 4;
            got[i] = match i {
                0 => nginx_run(),
                1 => run("sync", &[]),
                2 => run("nosync", &["--unsafe-no-sync"]),
                _ => dd_run(),
            };
        }
        let [g, s, ns, d] = got;
        eprintln!(
            "   round {}: nginx {g:.0} PUTs/s, sync {s:.0}, nosync {ns:.0} fragments/s, dd {d:.0} writes/s",
            round + 1
        );
        sync.push(s);
        nosync.push(ns);
        ng.push(g);
        dd.push(d);
    }
    let _ = std::fs::remove_file(&src);

    let (frags, writes, puts) = (
        Unit("fragments/s", 0),
        Unit("writes/s", 0),
        Unit("PUTs/s", 0),
    );
    b.row_rounds(
        "64 KiB fragments, flush before Ack",
        (&sync, frags),
        "dd oflag=dsync bs=64K",
        (&dd, writes),
    );
    b.row_rounds(
        "64 KiB fragments, flush before Ack",
        (&sync, frags),
        "nginx 64 KiB PUTs",
        (&ng, puts),
    );
    b.row_rounds(
        "64 KiB fragments, --unsafe-no-sync",
        (&nosync, frags),
        "nginx 64 KiB PUTs",
        (&ng, puts),
    );
}

// ---------------------------------------------------------------------------------------------
// 1,000 sessions x 1 MiB from 50 connections.

struct ManyResult {
    total: Duration,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `work(conn, index)` for every index below `count` from `conns` threads, each with its own
/// keep-alive connection; `work` returns the latency of the request that matters.
fn fan_out(
    addr: SocketAddr,
    conns: usize,
    count: usize,
    work: impl Fn(&mut Conn, usize) -> Duration + Send + Sync + 'static,
) -> ManyResult {
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let t = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return lat;
                    }
                    lat.push(work(&mut c, i));
                }
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let total = t.elapsed();
    lat.sort();
    ManyResult {
        total,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

/// The 1 MiB body of upload `i`: shared random bytes with `i` in the first eight.
fn body_for(shared: &[u8], i: usize) -> Vec<u8> {
    let mut v = shared.to_vec();
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

fn many(b: &mut Bench, nginx: &Nginx) {
    eprintln!("== {MANY_SESSIONS} sessions x 1 MiB from {MANY_CONNS} connections");
    let mut shared = vec![0u8; MIB];
    let mut seed = 11u64;
    fill(&mut shared, &mut seed);
    let shared = Arc::new(shared);

    let s = shared.clone();
    let ng = fan_out(nginx.addr, MANY_CONNS, MANY_SESSIONS, move |c, i| {
        let body = body_for(&s, i);
        let t = Instant::now();
        c.put(&format!("/many/{i:04}.bin"), &body);
        t.elapsed()
    });
    let ng_rss = nginx.peak_rss();
    verify_many(&shared, &nginx.root.join("many"));
    let _ = std::fs::remove_dir_all(nginx.root.join("many"));
    settle();

    let run = |extra: &[&str]| {
        let dir = b.base.join("many");
        let srv = Server::start(&dir, &b.base.join("many.log"), extra);
        let s = shared.clone();
        let ours = fan_out(srv.addr, MANY_CONNS, MANY_SESSIONS, move |c, i| {
            let body = body_for(&s, i);
            let path = format!("/many/{i:04}.bin");
            let id = c.create_session(&path);
            let t = Instant::now();
            c.fragment(&path, &id, 0, MIB as u64, &body);
            let lat = t.elapsed();
            c.close_session(&path, &id);
            lat
        });
        let rss = proc_mem(srv.pid(), "VmHWM");
        drop(srv);
        verify_many(&shared, &dir.join("many"));
        let _ = std::fs::remove_dir_all(&dir);
        settle();
        (ours, rss)
    };
    let (ours, rss) = run(&[]);
    // The same with four times the default budget for bodies in memory: what the setting trades.
    let roomy = serve_takes("--max-body-memory").then(|| run(&["--max-body-memory", "33554432"]));

    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / MIB as f64);
    let total = |b: &mut Bench, what: &str, ours: &ManyResult| {
        b.row(
            &format!("{what}: total time (lower is better)"),
            format!("{:.2} s", ours.total.as_secs_f64()),
            "nginx, 1,000 PUTs",
            format!("{:.2} s", ng.total.as_secs_f64()),
            r(ours.total, ng.total),
        );
    };
    let peak = |b: &mut Bench, what: &str, rss: u64| {
        b.row(
            &format!("{what}: server peak RSS (lower is better)"),
            mib(rss),
            "nginx peak RSS (all)",
            mib(ng_rss),
            rss as f64 / ng_rss as f64,
        );
    };
    total(b, "1,000 x 1 MiB / 50 conns", &ours);
    b.row(
        "1,000 x 1 MiB: p50 Ack latency (lower is better)",
        ms(ours.p50),
        "nginx PUT p50",
        ms(ng.p50),
        r(ours.p50, ng.p50),
    );
    b.row(
        "1,000 x 1 MiB: p99 Ack latency (lower is better)",
        ms(ours.p99),
        "nginx PUT p99",
        ms(ng.p99),
        r(ours.p99, ng.p99),
    );
    peak(b, "1,000 x 1 MiB", rss);
    if let Some((roomy, roomy_rss)) = roomy {
        total(b, "1,000 x 1 MiB, --max-body-memory 32 MiB", &roomy);
        peak(b, "1,000 x 1 MiB, --max-body-memory 32 MiB", roomy_rss);
    }
}

fn verify_many(shared: &[u8], dir: &Path) {
    for i in 0..MANY_SESSIONS {
        let want = hex(&Sha256::digest(body_for(shared, i)));
        check(
            "1 MiB upload",
            &sha_file(&dir.join(format!("{i:04}.bin"))),
            &want,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Load: 4 MiB uploads from 1 to 200 connections, CPU and memory per level.

const LOAD_UPLOAD: usize = 4 << 20;
const LOAD_LEVELS: [usize; 4] = [1, 10, 50, 200];

/// What one load run measured.
struct LoadRun {
    /// Server CPU (user + system, all threads; nginx: master + workers) per GiB received.
    cpu_per_gib: f64,
    /// Peak RSS (nginx: master + workers summed).
    peak_rss: f64,
}

/// The first eight bytes of upload `i` (its index), sent before the shared rest: every upload
/// differs, so a mixed-up file fails the check.
fn load_prefix(i: usize) -> [u8; 8] {
    (i as u64).to_le_bytes()
}

/// Checks what a load run left in `dir`: every upload there with its size, and the SHA-256 of
/// about 16 of them spread over the run.
fn verify_load(dir: &Path, uploads: usize, shared: &[u8]) {
    let names = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(names, uploads, "{}: uploads that landed", dir.display());
    let step = (uploads / 16).max(1);
    for i in 0..uploads {
        let p = dir.join(format!("{i:05}.bin"));
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, LOAD_UPLOAD as u64, "{}: size", p.display());
        if i % step == 0 || i == uploads - 1 {
            let mut h = Sha256::new();
            h.update(load_prefix(i));
            h.update(&shared[8..]);
            check("4 MiB upload", &sha_file(&p), &hex(&h.finalize()));
        }
    }
}

/// Sends `uploads` 4 MiB uploads from `conns` connections, by BITS (one session, one fragment
/// each) or as PUTs.
fn load_drive(addr: SocketAddr, conns: usize, uploads: usize, shared: &Arc<Vec<u8>>, bits: bool) {
    let s = shared.clone();
    fan_out(addr, conns, uploads, move |c, i| {
        let path = format!("/load/{i:05}.bin");
        let prefix = load_prefix(i);
        let parts: [&[u8]; 2] = [&prefix, &s[8..]];
        let t = Instant::now();
        if bits {
            let id = c.create_session(&path);
            c.fragment_parts(&path, &id, 0, LOAD_UPLOAD as u64, &parts);
            c.close_session(&path, &id);
        } else {
            c.put_parts(&path, &parts);
        }
        t.elapsed()
    });
}

/// One load run on a fresh server (so its peak RSS is this run's): `None` for nginx, else
/// bitsfarm with `extra` arguments.
fn load_run(
    b: &Bench,
    label: &str,
    bitsfarm: Option<&[&str]>,
    conns: usize,
    uploads: usize,
    shared: &Arc<Vec<u8>>,
) -> LoadRun {
    let dir = b.base.join(format!("load-{label}"));
    let (cpu, rss, wall, landed);
    match bitsfarm {
        Some(extra) => {
            let srv = Server::start(&dir, &b.base.join(format!("load-{label}.log")), extra);
            let before = cpu_seconds(srv.pid());
            let t = Instant::now();
            load_drive(srv.addr, conns, uploads, shared, true);
            wall = t.elapsed();
            cpu = cpu_seconds(srv.pid()) - before;
            rss = proc_mem(srv.pid(), "VmHWM");
            landed = dir.join("load");
        }
        None => {
            let ng = Nginx::start(&dir);
            let before = ng.cpu_seconds();
            let t = Instant::now();
            load_drive(ng.addr, conns, uploads, shared, false);
            wall = t.elapsed();
            cpu = ng.cpu_seconds() - before;
            rss = ng.peak_rss();
            landed = ng.root.join("load");
        }
    }
    verify_load(&landed, uploads, shared);
    let _ = std::fs::remove_dir_all(&dir);
    settle();
    let bytes = (uploads * LOAD_UPLOAD) as u64;
    let run = LoadRun {
        cpu_per_gib: cpu / (bytes as f64 / GIB as f64),
        peak_rss: rss as f64 / MIB as f64,
    };
    eprintln!(
        "     {label}: {:.2} GiB in {:.2} s, {:.0} MB/s, CPU {cpu:.2} s = {:.2} s/GiB, peak RSS {:.1} MiB",
        bytes as f64 / GIB as f64,
        wall.as_secs_f64(),
        mbps(bytes, wall),
        run.cpu_per_gib,
        run.peak_rss,
    );
    run
}

fn load(b: &mut Bench) {
    let n = rounds();
    let uploads = (env_count("BITSFARM_BENCH_LOAD_MIB", 1024) * MIB / LOAD_UPLOAD).max(1);
    eprintln!(
        "== load: {uploads} uploads x 4 MiB per run at {LOAD_LEVELS:?} connections, {n} interleaved rounds"
    );
    let mut shared = vec![0u8; LOAD_UPLOAD];
    let mut seed = 13u64;
    fill(&mut shared, &mut seed);
    let shared = Arc::new(shared);
    let cpu = Unit("s/GiB", 2);
    let mem = Unit("MiB", 1);
    for conns in LOAD_LEVELS {
        let conn = if conns == 1 { "conn" } else { "conns" };
        // Per round: [flushed, unsynced, nginx], each started fresh, in a rotating order.
        let mut got: Vec<[LoadRun; 3]> = Vec::new();
        for round in 0..n {
            eprintln!("   {conns} {conn}, round {}:", round + 1);
            let mut runs: [Option<LoadRun>; 3] = [None, None, None];
            for k in 0..3 {
                let i = (k + round) % 3;
                runs[i] = Some(match i {
                    0 => load_run(b, "sync", Some(&[]), conns, uploads, &shared),
                    1 => load_run(
                        b,
                        "nosync",
                        Some(&["--unsafe-no-sync"]),
                        conns,
                        uploads,
                        &shared,
                    ),
                    _ => load_run(b, "nginx", None, conns, uploads, &shared),
                });
            }
            got.push(runs.map(|r| r.expect("every run measured")));
        }
        let col = |k: usize, f: fn(&LoadRun) -> f64| -> Vec<f64> {
            got.iter().map(|r| f(&r[k])).collect()
        };
        let (sync_cpu, nosync_cpu, ng_cpu) = (
            col(0, |r| r.cpu_per_gib),
            col(1, |r| r.cpu_per_gib),
            col(2, |r| r.cpu_per_gib),
        );
        let (sync_rss, ng_rss) = (col(0, |r| r.peak_rss), col(2, |r| r.peak_rss));
        b.row_rounds(
            &format!(
                "load, {conns} {conn} x 4 MiB: server CPU, flush before Ack (lower is better)"
            ),
            (&sync_cpu, cpu),
            "nginx 4 MiB PUTs (master+workers)",
            (&ng_cpu, cpu),
        );
        b.row_rounds(
            &format!(
                "load, {conns} {conn} x 4 MiB: server CPU, --unsafe-no-sync (lower is better)"
            ),
            (&nosync_cpu, cpu),
            "nginx 4 MiB PUTs (master+workers)",
            (&ng_cpu, cpu),
        );
        b.row_rounds(
            &format!("load, {conns} {conn} x 4 MiB: peak RSS, flush before Ack (lower is better)"),
            (&sync_rss, mem),
            "nginx peak RSS (master+workers)",
            (&ng_rss, mem),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1,000 uploads of 64 KiB, one session each.

/// Parallel connections of the second half of the `uploads` part.
const UPLOAD_CONNS: usize = 16;

/// Checks the `count` 64 KiB files in `dir` (`{i:05}.bin`) against `data`, by one hash over all.
fn verify_pieces(what: &str, dir: &Path, data: &[u8], count: usize) {
    let mut h = Sha256::new();
    for i in 0..count {
        let p = dir.join(format!("{i:05}.bin"));
        h.update(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
    }
    check(what, &hex(&h.finalize()), &hex(&Sha256::digest(data)));
}

fn uploads(b: &mut Bench, nginx: &Nginx) {
    let n = rounds();
    let count = env_count("BITSFARM_BENCH_UPLOADS", 1000);
    eprintln!(
        "== {count} uploads x 64 KiB (a session each), 1 and {UPLOAD_CONNS} connections, {n} interleaved rounds"
    );
    let mut data = vec![0u8; SMALL * count];
    let mut seed = 17u64;
    fill(&mut data, &mut seed);
    let data = Arc::new(data);
    let src = b.base.join("uploads-source.bin");
    std::fs::write(&src, data.as_slice()).unwrap();

    // The disk's rate for 64 KiB writes that are durable when acknowledged.
    let dd_run = || -> f64 {
        let out = b.base.join("uploads-dd.out");
        let took = run_dd(
            &src,
            &out,
            &["bs=64K", &format!("count={count}"), "oflag=dsync"],
        );
        let rate = count as f64 / took.as_secs_f64();
        check(
            "dd 64 KiB",
            &sha_file(&out),
            &hex(&Sha256::digest(data.as_slice())),
        );
        let _ = std::fs::remove_file(&out);
        settle();
        rate
    };
    // nginx: one PUT per upload, each its own file.
    let nginx_run = |conns: usize| -> f64 {
        let d = data.clone();
        let r = fan_out(nginx.addr, conns, count, move |c, i| {
            let t = Instant::now();
            c.put(&format!("/up/{i:05}.bin"), &d[i * SMALL..(i + 1) * SMALL]);
            t.elapsed()
        });
        let landed = nginx.root.join("up");
        verify_pieces("nginx 64 KiB PUTs", &landed, &data, count);
        let _ = std::fs::remove_dir_all(&landed);
        settle();
        count as f64 / r.total.as_secs_f64()
    };
    // Ours: Create-Session, one 64 KiB Fragment, Close-Session per upload.
    let run = |label: &str, extra: &[&str], conns: usize| -> f64 {
        let dir = b.base.join(format!("uploads-{label}"));
        let srv = Server::start(&dir, &b.base.join(format!("uploads-{label}.log")), extra);
        let d = data.clone();
        let r = fan_out(srv.addr, conns, count, move |c, i| {
            let path = format!("/up/{i:05}.bin");
            let t = Instant::now();
            let id = c.create_session(&path);
            c.fragment(&path, &id, 0, SMALL as u64, &d[i * SMALL..(i + 1) * SMALL]);
            c.close_session(&path, &id);
            t.elapsed()
        });
        drop(srv);
        verify_pieces(label, &dir.join("up"), &data, count);
        let _ = std::fs::remove_dir_all(&dir);
        settle();
        count as f64 / r.total.as_secs_f64()
    };
    const RUNS: usize = 7;
    let mut got: Vec<[f64; RUNS]> = Vec::new();
    for round in 0..n {
        let mut g = [0f64; RUNS];
        for k in 0..RUNS {
            let i = (k + round * 3) % RUNS;
            g[i] = match i {
                0 => dd_run(),
                1 => nginx_run(1),
                2 => run("sync-1", &[], 1),
                3 => run("nosync-1", &["--unsafe-no-sync"], 1),
                4 => nginx_run(UPLOAD_CONNS),
                5 => run("sync-16", &[], UPLOAD_CONNS),
                _ => run("nosync-16", &["--unsafe-no-sync"], UPLOAD_CONNS),
            };
        }
        let [d, g1, s1, ns1, g16, s16, ns16] = g;
        eprintln!(
            "   round {}: dd {d:.0} writes/s; 1 conn: nginx {g1:.0} PUTs/s, sync {s1:.0}, nosync {ns1:.0} uploads/s; {UPLOAD_CONNS} conns: nginx {g16:.0} PUTs/s, sync {s16:.0}, nosync {ns16:.0} uploads/s",
            round + 1
        );
        got.push(g);
    }
    let _ = std::fs::remove_file(&src);

    let col = |k: usize| -> Vec<f64> { got.iter().map(|g| g[k]).collect() };
    b.flushed_uploads = Some([col(2), col(5), col(0)]);
    let (ups, writes, puts) = (Unit("uploads/s", 0), Unit("writes/s", 0), Unit("PUTs/s", 0));
    let rows: [(&str, usize, &str, usize, Unit); 6] = [
        (
            "flush before Ack, 1 conn",
            2,
            "dd oflag=dsync bs=64K",
            0,
            writes,
        ),
        (
            "flush before Ack, 1 conn",
            2,
            "nginx 64 KiB PUTs, 1 conn",
            1,
            puts,
        ),
        (
            "--unsafe-no-sync, 1 conn",
            3,
            "nginx 64 KiB PUTs, 1 conn",
            1,
            puts,
        ),
        (
            "flush before Ack, 16 conns in parallel",
            5,
            "dd oflag=dsync bs=64K",
            0,
            writes,
        ),
        (
            "flush before Ack, 16 conns in parallel",
            5,
            "nginx 64 KiB PUTs, 16 conns",
            4,
            puts,
        ),
        (
            "--unsafe-no-sync, 16 conns in parallel",
            6,
            "nginx 64 KiB PUTs, 16 conns",
            4,
            puts,
        ),
    ];
    for (what, ours, baseline, base, unit) in rows {
        b.row_rounds(
            &format!("{count} x 64 KiB uploads (a session each), {what}"),
            (&col(ours), ups),
            baseline,
            (&col(base), unit),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Syscalls and flushes per upload and per packet, counted by `strace -c -f`.

/// `strace`, installed with apt-get when missing; `None` when that fails.
fn strace_exe() -> Option<&'static str> {
    let present = || Command::new("strace").arg("-V").output().is_ok();
    if present() {
        return Some("strace");
    }
    eprintln!("strace is missing: installing Debian's strace package (apt-get)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "strace"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = install() || (Command::new("apt-get").arg("update").status().is_ok() && install());
    present().then_some("strace")
}

/// Whether every thread of `pid` has a tracer.
fn all_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .is_some_and(|v| v.trim() != "0")
    })
}

/// The calls per syscall of a `strace -c` summary ("% time seconds usecs/call calls [errors]
/// syscall"; the "total" line is left out).
fn strace_counts(summary: &str) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for line in summary.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let numeric = f.first().is_some_and(|c| c.parse::<f64>().is_ok());
        if !numeric || f.len() < 5 || f[f.len() - 1] == "total" {
            continue;
        }
        if let Ok(calls) = f[3].parse::<u64>() {
            counts.insert(f[f.len() - 1].to_string(), calls);
        }
    }
    counts
}

/// Runs `work` while `strace -c -f` is attached to `pid` (every thread, and the threads it
/// starts), and returns its result and the calls per syscall; `Err` when strace cannot attach.
fn traced<T>(
    pid: u32,
    out: &Path,
    work: impl FnOnce() -> T,
) -> Result<(T, HashMap<String, u64>), String> {
    let err = out.with_extension("err");
    let mut st = Command::new("strace")
        .args(["-c", "-f", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting strace: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        if let Ok(Some(status)) = st.try_wait() {
            break Some(format!("strace exited: {status}"));
        }
        if all_traced(pid) {
            break None;
        }
        if Instant::now() > deadline {
            break Some("strace did not attach within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(why) = failed {
        let _ = st.kill();
        let _ = st.wait();
        let said = std::fs::read_to_string(&err).unwrap_or_default();
        return Err(format!(
            "{why}: {}",
            said.lines().next().unwrap_or("").trim()
        ));
    }
    let got = work();
    // SIGINT: strace detaches and writes its summary.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = st.wait();
    let summary = std::fs::read_to_string(out).map_err(|e| e.to_string())?;
    Ok((got, strace_counts(&summary)))
}

/// Per-packet figures of one traced phase, `n` packets (or uploads).
struct Calls {
    phase: String,
    n: usize,
    counts: HashMap<String, u64>,
}

impl Calls {
    /// The calls of these syscalls, per packet.
    fn per(&self, names: &[&str]) -> f64 {
        let sum: u64 = names.iter().filter_map(|s| self.counts.get(*s)).sum();
        sum as f64 / self.n as f64
    }

    fn total(&self) -> f64 {
        self.counts.values().sum::<u64>() as f64 / self.n as f64
    }

    fn flushes(&self) -> f64 {
        self.per(&["fsync", "fdatasync"])
    }

    /// The most frequent syscalls, per packet.
    fn top(&self, k: usize) -> String {
        let mut v: Vec<(&String, &u64)> = self.counts.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter()
            .take(k)
            .map(|(name, c)| format!("{name} {:.2}", **c as f64 / self.n as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The syscall groups shown per phase: (column, syscalls).
const SYSCALL_COLUMNS: [(&str, &[&str]); 8] = [
    ("fsync+fdatasync", &["fsync", "fdatasync"]),
    ("sync_file_range", &["sync_file_range"]),
    ("rename*", &["rename", "renameat", "renameat2"]),
    ("mkdir*", &["mkdir", "mkdirat"]),
    ("stat*", &["statx", "fstat", "newfstatat", "stat", "lstat"]),
    // The server opens with openat2 (resolved beneath its data folder): openat alone would miss it.
    ("openat*", &["open", "openat", "openat2"]),
    ("unlinkat", &["unlink", "unlinkat"]),
    ("futex", &["futex"]),
];

fn print_calls(phases: &[Calls]) {
    let mut head = format!("   {:<44} {:>5} {:>8}", "phase (per packet)", "N", "calls");
    for (col, _) in SYSCALL_COLUMNS {
        let _ = write!(head, " {col:>15}");
    }
    eprintln!("{head}");
    for c in phases {
        let mut line = format!("   {:<44} {:>5} {:>8.2}", c.phase, c.n, c.total());
        for (_, names) in SYSCALL_COLUMNS {
            let _ = write!(line, " {:>15.2}", c.per(names));
        }
        eprintln!("{line}");
    }
    for c in phases {
        eprintln!("   top, {}: {}", c.phase, c.top(10));
    }
}

/// Creates `n` sessions for `/sc/{prefix}{i:05}.bin`, returning their ids.
fn sc_create(c: &mut Conn, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| c.create_session(&format!("/sc/{prefix}{i:05}.bin")))
        .collect()
}

fn sc_fragments(c: &mut Conn, prefix: &str, ids: &[String], body: &[u8]) {
    for (i, id) in ids.iter().enumerate() {
        c.fragment(
            &format!("/sc/{prefix}{i:05}.bin"),
            id,
            0,
            body.len() as u64,
            body,
        );
    }
}

fn sc_close(c: &mut Conn, prefix: &str, ids: &[String]) {
    for (i, id) in ids.iter().enumerate() {
        c.close_session(&format!("/sc/{prefix}{i:05}.bin"), id);
    }
}

/// `n` whole uploads, one after the other on `c`.
fn sc_uploads(c: &mut Conn, prefix: &str, n: usize, body: &[u8]) {
    for i in 0..n {
        let path = format!("/sc/{prefix}{i:05}.bin");
        let id = c.create_session(&path);
        c.fragment(&path, &id, 0, body.len() as u64, body);
        c.close_session(&path, &id);
    }
}

/// The traced phases of one server: whole uploads, and with `per_packet` each packet type alone.
fn syscall_phases(
    b: &Bench,
    label: &str,
    extra: &[&str],
    n: usize,
    body: &[u8],
    per_packet: bool,
) -> Result<Vec<Calls>, String> {
    let dir = b.base.join(format!("syscalls-{label}"));
    let srv = Server::start(&dir, &b.base.join(format!("syscalls-{label}.log")), extra);
    let pid = srv.pid();
    let mut c = Conn::open(srv.addr);
    // Warm up: the folder, the runtime's threads, the pools, the allocator.
    sc_uploads(&mut c, "warm-", 20, body);
    let out = |phase: &str| b.base.join(format!("strace-{label}-{phase}.txt"));
    let mut phases = Vec::new();
    let ((), counts) = traced(pid, &out("uploads"), || sc_uploads(&mut c, "u-", n, body))?;
    phases.push(Calls {
        phase: format!("64 KiB upload (3 packets), {label}"),
        n,
        counts,
    });
    if per_packet {
        let (ids, counts) = traced(pid, &out("create"), || sc_create(&mut c, "p-", n))?;
        phases.push(Calls {
            phase: format!("Create-Session, {label}"),
            n,
            counts,
        });
        let ((), counts) = traced(pid, &out("fragment"), || {
            sc_fragments(&mut c, "p-", &ids, body)
        })?;
        phases.push(Calls {
            phase: format!("Fragment (64 KiB, whole file), {label}"),
            n,
            counts,
        });
        let ((), counts) = traced(pid, &out("close"), || sc_close(&mut c, "p-", &ids))?;
        phases.push(Calls {
            phase: format!("Close-Session, {label}"),
            n,
            counts,
        });
    }
    drop(c);
    drop(srv);
    // What landed: the first and the last upload of each kind.
    let want = hex(&Sha256::digest(body));
    for name in ["u-00000", &format!("u-{:05}", n - 1), "p-00000"] {
        let p = dir.join(format!("sc/{name}.bin"));
        if name.starts_with('u') || per_packet {
            check("traced upload", &sha_file(&p), &want);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(phases)
}

fn syscalls(b: &mut Bench) {
    let n = env_count("BITSFARM_BENCH_SYSCALL_N", 200);
    eprintln!("== syscalls per 64 KiB upload and per packet, strace -c -f, N = {n}");
    if strace_exe().is_none() {
        eprintln!("syscalls not counted: strace is missing and could not be installed");
        return;
    }
    let mut body = vec![0u8; SMALL];
    let mut seed = 19u64;
    fill(&mut body, &mut seed);
    let mut phases = match syscall_phases(b, "flushed", &[], n, &body, true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("syscalls not counted: strace cannot attach ({e})");
            return;
        }
    };
    match syscall_phases(
        b,
        "--unsafe-no-sync",
        &["--unsafe-no-sync"],
        n,
        &body,
        false,
    ) {
        Ok(p) => phases.extend(p),
        Err(e) => eprintln!("syscalls with --unsafe-no-sync not counted: {e}"),
    }
    print_calls(&phases);
    for c in &phases {
        b.row(
            &format!("syscalls per {} (strace -c -f, N = {})", c.phase, c.n),
            format!("{:.1} calls, {:.2} flushes", c.total(), c.flushes()),
            "-",
            "-".into(),
            f64::NAN,
        );
    }
    // The disk's view of `uploads`: flushes per second, each upload's rate times the flushes
    // counted here for one flushed upload, against dd's flushed writes in the same round.
    if let (Some([one, many, dd]), Some(upload)) = (b.flushed_uploads.take(), phases.first()) {
        let per = upload.flushes();
        let flushes = |rates: &[f64]| -> Vec<f64> { rates.iter().map(|r| r * per).collect() };
        let (unit, writes) = (Unit("flushes/s", 0), Unit("writes/s", 0));
        for (conns, rates) in [("1 conn", &one), ("16 conns", &many)] {
            b.row_rounds(
                &format!("64 KiB uploads, flush before Ack, {conns}: uploads/s x {per:.2} flushes"),
                (&flushes(rates), unit),
                "dd oflag=dsync bs=64K",
                (&dd, writes),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 10,000 idle sessions.

fn idle(b: &mut Bench) {
    eprintln!("== {IDLE_SESSIONS} open idle sessions");
    let dir = b.base.join("idle");
    // Memory per session does not depend on syncing; not syncing keeps the setup short.
    let srv = Server::start(&dir, &b.base.join("idle.log"), &["--unsafe-no-sync"]);
    let addr = srv.addr;
    let open = |from: usize, to: usize| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut c = Conn::open(addr);
                    let mut i = from + t;
                    while i < to {
                        let id = c.create_session(&format!("/idle/{i:05}.bin"));
                        // One byte of a two-byte upload: the session is open and has data.
                        c.fragment(&format!("/idle/{i:05}.bin"), &id, 0, 2, b"x");
                        i += 4;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    // Warm up the runtime, the pools and the allocator first.
    open(0, 200);
    std::thread::sleep(Duration::from_millis(500));
    let before = proc_mem(srv.pid(), "VmRSS");
    open(200, 200 + IDLE_SESSIONS);
    std::thread::sleep(Duration::from_millis(500));
    let after = proc_mem(srv.pid(), "VmRSS");
    let per = after.saturating_sub(before) as f64 / IDLE_SESSIONS as f64;
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
    b.row(
        "10,000 idle sessions: RSS per session (vs target)",
        format!("{per:.0} B"),
        "target",
        "4096 B".into(),
        per / 4096.0,
    );
    b.row(
        "10,000 idle sessions: server RSS",
        format!("{:.1} MiB", after as f64 / MIB as f64),
        "before them",
        format!("{:.1} MiB", before as f64 / MIB as f64),
        after as f64 / before as f64,
    );
}

// ---------------------------------------------------------------------------------------------
// The operator.

fn farm_json(i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "bitsfarm.io/v1alpha1",
        "kind": "UploadFarm",
        "metadata": {
            "name": format!("farm-{i:04}"),
            "namespace": format!("ns-{:02}", i % 20),
            "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": { "replicas": 3 },
    })
}

fn operator(b: &mut Bench) {
    eprintln!("== the operator with {FARMS} UploadFarms");
    let farms: Vec<bitsfarm::api::UploadFarm> = (0..FARMS)
        .map(|i| serde_json::from_value(farm_json(i)).expect("an UploadFarm"))
        .collect();
    let opts = bitsfarm::operator::resources::BuildOptions::default();
    // Best of three: the first run also pays for warming caches.
    let mut best = Duration::MAX;
    let mut objects = 0;
    for _ in 0..3 {
        let t = Instant::now();
        objects = 0;
        for f in &farms {
            let c = bitsfarm::operator::resources::children(f, &opts).expect("valid farm");
            objects += 4 + c.host_services.len();
            std::hint::black_box(&c);
        }
        best = best.min(t.elapsed());
    }
    b.row(
        &format!("operator: build all {objects} children of 1,000 farms"),
        format!("{:.1} ms", best.as_secs_f64() * 1e3),
        "-",
        "-".into(),
        f64::NAN,
    );

    match operator_rss(&b.base.join("operator")) {
        Ok((rss, hwm, reconciled, settle_s)) => {
            b.row(
                &format!(
                    "operator: idle RSS, 1,000 farms ({reconciled} reconciled in {settle_s:.1} s)"
                ),
                format!("{:.1} MiB", rss as f64 / MIB as f64),
                "target",
                "64 MiB".into(),
                rss as f64 / (64.0 * MIB as f64),
            );
            b.row(
                "operator: peak RSS while reconciling",
                format!("{:.1} MiB", hwm as f64 / MIB as f64),
                "target",
                "64 MiB".into(),
                hwm as f64 / (64.0 * MIB as f64),
            );
        }
        Err(e) => {
            eprintln!("operator RSS not measured: {e}");
            b.row(
                "operator: idle RSS, 1,000 farms",
                format!("not measured: {e}"),
                "target",
                "64 MiB".into(),
                f64::NAN,
            );
        }
    }
}

/// Counters the mock API keeps.
#[derive(Default)]
struct MockStats {
    status_patches: AtomicUsize,
    requests: AtomicUsize,
    unknown: AtomicUsize,
}

/// Runs the real `bitsfarm operator` against a mocked API server holding `FARMS` UploadFarms and
/// no children; waits until every farm's status was written, then lets it settle and reads RSS.
fn operator_rss(dir: &Path) -> Result<(u64, u64, usize, f64), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let farms: Vec<serde_json::Value> = (0..FARMS).map(farm_json).collect();
    let by_name: HashMap<String, serde_json::Value> = farms
        .iter()
        .map(|f| {
            (
                f["metadata"]["name"].as_str().unwrap().to_string(),
                f.clone(),
            )
        })
        .collect();
    let list = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "bitsfarm.io/v1alpha1",
        "kind": "UploadFarmList",
        "metadata": { "resourceVersion": "1" },
        "items": farms,
    }))
    .unwrap();
    let stats = Arc::new(MockStats::default());
    let state = Arc::new((bytes::Bytes::from(list), by_name, stats.clone()));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| e.to_string())?;
    let api = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(mock_api(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{api}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n    namespace: default\ncurrent-context: mock\nusers:\n- name: mock\n  user: {{}}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let health = free_port();
    let mut child = Command::new(bitsfarm_exe())
        .args([
            "operator",
            "--no-leader-election",
            "--listen",
            &format!("127.0.0.1:{health}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("operator.log")).unwrap())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(120);
    let result = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Err(format!("the operator exited: {st}; see its log"));
        }
        let done = stats.status_patches.load(Ordering::Relaxed);
        if done >= FARMS {
            let settle_s = t.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs(3));
            let rss = proc_mem(pid, "VmRSS");
            let hwm = proc_mem(pid, "VmHWM");
            eprintln!(
                "  mock API: {} requests, {} unanswered kinds",
                stats.requests.load(Ordering::Relaxed),
                stats.unknown.load(Ordering::Relaxed)
            );
            break Ok((rss, hwm, done, settle_s));
        }
        if Instant::now() > deadline {
            break Err(format!(
                "only {done} of {FARMS} farms reconciled within 120 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    if result.is_err() {
        let log = std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        eprintln!(
            "operator log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    drop(rt);
    result
}

type MockState = (
    bytes::Bytes,
    HashMap<String, serde_json::Value>,
    Arc<MockStats>,
);

async fn mock_api(
    state: &MockState,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>> {
    use http_body_util::{BodyExt, Full, StreamBody};
    let (list, by_name, stats) = state;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let json = |status: u16, v: bytes::Bytes| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(v).boxed())
            .unwrap()
    };
    let empty_list = |kind: &str| {
        bytes::Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []
            }))
            .unwrap(),
        )
    };
    if query.contains("watch=true") || query.contains("watch=1") {
        // A watch that never sees a change: the connection stays open and quiet.
        let never = futures_util::stream::pending::<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >();
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(never).boxed())
            .unwrap();
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["version"]) => json(
            200,
            bytes::Bytes::from_static(
                br#"{"major":"1","minor":"33","gitVersion":"v1.33.0","gitCommit":"","gitTreeState":"clean","buildDate":"2025-01-01T00:00:00Z","goVersion":"go1.24","compiler":"gc","platform":"linux/amd64"}"#,
            ),
        ),
        ("GET", ["apis", "bitsfarm.io", "v1alpha1", "uploadfarms"]) => json(200, list.clone()),
        ("GET", [.., kind]) if kind.ends_with('s') => {
            json(200, empty_list(&format!("{}List", kind.trim_end_matches('s'))))
        }
        ("PATCH", [.., "uploadfarms", name, "status"]) => {
            stats.status_patches.fetch_add(1, Ordering::Relaxed);
            let mut farm = by_name.get(*name).cloned().unwrap_or_default();
            if let Ok(p) = serde_json::from_slice::<serde_json::Value>(&body) {
                farm["status"] = p["status"].clone();
            }
            json(200, serde_json::to_vec(&farm).unwrap().into())
        }
        ("PATCH", _) | ("POST", _) | ("PUT", _) => {
            // Server-side apply and events: answered with what was sent, as if applied.
            let mut v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::json!({}));
            if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                m.entry("resourceVersion").or_insert("1".into());
                m.entry("uid")
                    .or_insert("11111111-1111-4111-8111-111111111111".into());
            }
            let status = if method == "POST" { 201 } else { 200 };
            json(status, serde_json::to_vec(&v).unwrap().into())
        }
        _ => {
            stats.unknown.fetch_add(1, Ordering::Relaxed);
            json(
                404,
                bytes::Bytes::from_static(
                    br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
                ),
            )
        }
    }
}
