//! The reference server application (`bitsfarm receiver`) as a process, and what it stored.

use super::*;

/// One delivery the receiver stored: the file at its URL path below the receiver's folder, and
/// its record, `.bitsfarm/deliveries/<key>.json`.
#[derive(Debug, Clone)]
pub struct StoredDelivery {
    pub key: String,
    pub content_sha256: String,
    pub record: serde_json::Value,
}

/// How many deliveries with content `sha` (hex SHA-256) the receiver with folder `dir` holds.
pub fn stored_copies(dir: &Path, sha: &str) -> usize {
    stored_deliveries(dir)
        .iter()
        .filter(|d| d.content_sha256 == sha)
        .count()
}

/// Every delivery the receiver with folder `dir` stored, sorted by key: each record, and the
/// SHA-256 of the file it names.
pub fn stored_deliveries(dir: &Path) -> Vec<StoredDelivery> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir.join(".bitsfarm").join("deliveries")) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let record: serde_json::Value = serde_json::from_slice(
            &fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .expect("a record is JSON");
        let at = record["stored-path"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no stored-path", p.display()));
        out.push(StoredDelivery {
            key: record["idempotency-key"]
                .as_str()
                .unwrap_or_default()
                .into(),
            content_sha256: file_sha256(&dir.join(at)),
            record,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
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
    /// A receiver that trusts no folder: it takes deliveries by value only.
    pub fn start() -> ReceiverProcess {
        Self::start_trusting(&[])
    }

    /// A receiver that reads and writes by-reference files beneath `trusted` (`--trust-dir`
    /// each), such as the data folder of the server that delivers to it.
    pub fn start_trusting(trusted: &[&Path]) -> ReceiverProcess {
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
            .args(trusted.iter().flat_map(|t| [Path::new("--trust-dir"), t]))
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

    /// What the receiver logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self._root.path().join("receiver.log")).unwrap_or_default()
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

    /// Every delivery stored, sorted by key.
    pub fn deliveries(&self) -> Vec<StoredDelivery> {
        stored_deliveries(&self.dir)
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
