//! `bitsfarm farm` as a person drives it: its standard input through a pipe, what it says on
//! stdout and what it logs on stderr read line by line, each bounded in time.

use super::*;

/// The `bitsfarm` binary under test.
const FARM_BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");

/// `n` consecutive free ports on 127.0.0.1 (the farm puts its shared address, members and
/// receiver on consecutive ports).
pub fn free_port_block(n: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    for attempt in 0..200u32 {
        let base = 20_000 + ((seed.wrapping_add(attempt * 7919)) % 30_000) as u16;
        let held: Vec<_> = (0..n)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no block of {n} free ports on 127.0.0.1");
}

/// Lines a child writes, collected by a thread.
pub fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `needle`; returns every line seen up to it, or panics
/// naming them.
pub fn expect_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line containing {needle:?} within {limit:?}; saw {seen:#?}");
}

/// A `bitsfarm farm` on 127.0.0.1 with its stdin, stdout and stderr on pipes. Told to exit (and
/// killed if it will not) on drop.
pub struct LocalFarm {
    pub child: Child,
    stdin: Option<std::process::ChildStdin>,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
    pub shared: SocketAddr,
    pub data: TempDir,
    pub replicas: u16,
    /// What the farm said on stdout before `ready`.
    pub started: Vec<String>,
}

impl LocalFarm {
    /// Spawns `bitsfarm [global...] farm --replicas N --shared 127.0.0.1:BASE --data-dir TMP
    /// [extra...]` with `RUST_LOG=info` and waits for nothing.
    pub fn spawn(replicas: u16, global: &[&str], extra: &[&str]) -> LocalFarm {
        let base = free_port_block(replicas + 2);
        Self::spawn_at(base, replicas, global, extra)
    }

    /// As `spawn`, with the shared address on port `base`.
    pub fn spawn_at(base: u16, replicas: u16, global: &[&str], extra: &[&str]) -> LocalFarm {
        let shared: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
        let data = tempfile::Builder::new()
            .prefix("bitsfarm-farm-")
            .tempdir()
            .unwrap();
        let mut child = Command::new(FARM_BIN)
            .args(global)
            .args(["farm", "--replicas", &replicas.to_string(), "--shared"])
            .arg(shared.to_string())
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("BITSFARM_TEST_PAUSE_AT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bitsfarm farm");
        let stdin = child.stdin.take();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        LocalFarm {
            child,
            stdin,
            stdout,
            stderr,
            shared,
            data,
            replicas,
            started: Vec::new(),
        }
    }

    /// Spawns the farm and waits (bounded) until it says it is ready.
    pub fn start(replicas: u16, global: &[&str], extra: &[&str]) -> LocalFarm {
        let mut farm = Self::spawn(replicas, global, extra);
        farm.started = expect_line(&farm.stdout, "ready", Duration::from_secs(60));
        farm
    }

    pub fn member(&self, i: u16) -> SocketAddr {
        SocketAddr::new(self.shared.ip(), self.shared.port() + 1 + i)
    }

    pub fn member_of(&self, host_id: &str) -> u16 {
        let addr: SocketAddr = host_id.parse().expect("a host id is an address");
        addr.port() - self.shared.port() - 1
    }

    /// Types `line` on the farm's standard input.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the farm's stdin is open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Types `line` and waits for the farm's line containing `expect`; returns the lines it said
    /// up to that one.
    pub fn command(&mut self, line: &str, expect: &str) -> Vec<String> {
        self.send(line);
        expect_line(&self.stdout, expect, Duration::from_secs(30))
    }

    /// Waits (bounded) for the farm to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every stderr line that arrives within `limit`.
    pub fn stderr_for(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for LocalFarm {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "exit");
            let _ = stdin.flush();
        }
        if self.wait_exit(Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
