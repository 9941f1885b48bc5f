//! Data, files and the assertions every protocol test shares.

use super::*;

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

/// A 2 MiB tmpfs mounted for the test; unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount() -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (not root, or no CAP_SYS_ADMIN?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
