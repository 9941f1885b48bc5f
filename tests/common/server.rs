//! The `bitsfarm serve` process a test starts: its own data folder, its address, its log.

use super::*;

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

    /// The whole log of the latest start.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
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

/// `bitsfarm passwd USER`, started with its stdin, stdout and stderr piped.
pub fn spawn_passwd(user: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(["passwd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running bitsfarm passwd")
}

/// `bitsfarm passwd USER` with `password` on stdin: the users-file line.
pub fn passwd(user: &str, password: &str) -> String {
    let mut child = spawn_passwd(user);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "passwd failed: {out:?}");
    let line = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(line.starts_with(&format!("{user}:$argon2id$")), "{line}");
    assert!(
        !line.contains(password),
        "the entry must not contain the password"
    );
    line
}

/// The `Authorization` value of HTTP Basic for `user` and `password`.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:{password}")
        )
    )
}
