//! Authentication: HTTP Basic against a users file of argon2 hashes, and bearer tokens from a file.
//!
//! Both files are optional; with neither, the server is open (the default) and every request is
//! anonymous. They are re-read when they change (checked at most once a second), so a rotated
//! Kubernetes Secret takes effect without a restart.
//!
//! - users file: one `user:$argon2id$...` per line (what `bitsfarm passwd USER` prints); `#` starts
//!   a comment line;
//! - tokens file: one `user:token` per line; the token is compared by its SHA-256.
//!
//! Checking an argon2 hash on every packet would cost tens of milliseconds per fragment, so a
//! successful check is remembered (as a salted SHA-256 of user and password, in memory only) for
//! [`VERIFIED_TTL`], and forgotten whenever the users file changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// The realm named in `WWW-Authenticate`.
pub const REALM: &str = "bitsfarm";
/// How long a verified password is trusted without running argon2 again.
pub const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// How often the files' modification times are looked at.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Cap on remembered verifications (a flood of distinct right passwords cannot grow memory).
const MAX_VERIFIED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Why a request was not let in (for the log; the client only sees 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Malformed,
    UnknownUser,
    WrongPassword,
    UnknownToken,
    SchemeNotEnabled,
}

/// Every value `Denied::metric_reason` gives, for the metrics to start at 0.
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["missing", "malformed", "unsupported_scheme", "wrong"];

impl Denied {
    /// The `reason` label of `bitsfarm_auth_failures_total`. An unknown user, a wrong password
    /// and an unknown token are all `wrong`: `/metrics` needs no credentials, and telling them
    /// apart there would let anyone find out which user names exist by watching the counters.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Malformed => "malformed",
            Denied::SchemeNotEnabled => "unsupported_scheme",
            Denied::UnknownUser | Denied::WrongPassword | Denied::UnknownToken => "wrong",
        }
    }
}

#[derive(Default)]
struct Files {
    /// user -> PHC hash string.
    users: HashMap<String, String>,
    /// SHA-256 of a token -> user.
    tokens: HashMap<[u8; 32], String>,
    users_stamp: Option<(SystemTime, u64)>,
    tokens_stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    /// salted SHA-256 of `user:password` -> when it was verified.
    verified: HashMap<[u8; 32], Instant>,
}

/// The configured credentials. `None` paths mean that scheme is off.
pub struct Authenticator {
    users_file: Option<PathBuf>,
    tokens_file: Option<PathBuf>,
    /// Random per process: the verification cache's keys are useless outside it.
    pepper: [u8; 16],
    files: Mutex<Files>,
}

impl Authenticator {
    /// Loads both files; a file that cannot be read or parsed at start-up is an error.
    pub fn new(
        users_file: Option<PathBuf>,
        tokens_file: Option<PathBuf>,
    ) -> Result<Self, AuthError> {
        let auth = Authenticator {
            users_file,
            tokens_file,
            pepper: *uuid::Uuid::new_v4().as_bytes(),
            files: Mutex::new(Files::default()),
        };
        {
            let mut f = auth.lock();
            if let Some(p) = &auth.users_file {
                f.users = load_users(p)?;
                f.users_stamp = stamp(p);
            }
            if let Some(p) = &auth.tokens_file {
                f.tokens = load_tokens(p)?;
                f.tokens_stamp = stamp(p);
            }
            f.checked = Some(Instant::now());
        }
        Ok(auth)
    }

    pub fn basic_enabled(&self) -> bool {
        self.users_file.is_some()
    }

    pub fn bearer_enabled(&self) -> bool {
        self.tokens_file.is_some()
    }

    /// The `WWW-Authenticate` challenges to send with a 401 (Basic first: Windows answers it).
    pub fn challenges(&self) -> Vec<String> {
        let mut c = Vec::new();
        if self.basic_enabled() {
            c.push(format!("Basic realm=\"{REALM}\""));
        }
        if self.bearer_enabled() {
            c.push(format!("Bearer realm=\"{REALM}\""));
        }
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads a file whose modification time or size changed. A file that became unreadable
    /// or invalid keeps the previous contents (and a warning says so).
    fn reload_if_changed(&self, f: &mut Files) {
        if f.checked.is_some_and(|t| t.elapsed() < RELOAD_CHECK) {
            return;
        }
        f.checked = Some(Instant::now());
        if let Some(p) = &self.users_file {
            let now = stamp(p);
            if now != f.users_stamp {
                match load_users(p) {
                    Ok(u) => {
                        info!(file = %p.display(), users = u.len(), "users file reloaded");
                        f.users = u;
                        f.verified.clear();
                        f.users_stamp = now;
                    }
                    Err(e) => {
                        warn!(error = %e, "users file not reloaded; keeping the previous one")
                    }
                }
            }
        }
        if let Some(p) = &self.tokens_file {
            let now = stamp(p);
            if now != f.tokens_stamp {
                match load_tokens(p) {
                    Ok(t) => {
                        info!(file = %p.display(), tokens = t.len(), "tokens file reloaded");
                        f.tokens = t;
                        f.tokens_stamp = now;
                    }
                    Err(e) => {
                        warn!(error = %e, "tokens file not reloaded; keeping the previous one")
                    }
                }
            }
        }
    }

    /// The user an `Authorization` header value proves, or why it does not.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<String, Denied> {
        let value = authorization.ok_or(Denied::Missing)?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(Denied::Malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            if !self.basic_enabled() {
                return Err(Denied::SchemeNotEnabled);
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| Denied::Malformed)?;
            let decoded = String::from_utf8(decoded).map_err(|_| Denied::Malformed)?;
            let (user, password) = decoded.split_once(':').ok_or(Denied::Malformed)?;
            self.check_password(user, password)?;
            Ok(user.to_string())
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if !self.bearer_enabled() {
                return Err(Denied::SchemeNotEnabled);
            }
            let digest: [u8; 32] = Sha256::digest(rest.as_bytes()).into();
            let mut f = self.lock();
            self.reload_if_changed(&mut f);
            f.tokens.get(&digest).cloned().ok_or(Denied::UnknownToken)
        } else {
            Err(Denied::SchemeNotEnabled)
        }
    }

    fn check_password(&self, user: &str, password: &str) -> Result<(), Denied> {
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(self.pepper);
            h.update((user.len() as u64).to_le_bytes());
            h.update(user.as_bytes());
            h.update(password.as_bytes());
            h.finalize().into()
        };
        let phc = {
            let mut f = self.lock();
            self.reload_if_changed(&mut f);
            if f.verified
                .get(&key)
                .is_some_and(|t| t.elapsed() < VERIFIED_TTL)
            {
                // Still in the file? A removed user is gone at once even if cached.
                if f.users.contains_key(user) {
                    return Ok(());
                }
            }
            f.users.get(user).cloned()
        };
        let Some(phc) = phc else {
            // Spend about the time a real check takes, so a timing probe cannot list users.
            let salt = dummy_salt();
            let _ = Argon2::default().hash_password(password.as_bytes(), &salt);
            return Err(Denied::UnknownUser);
        };
        let ok = PasswordHash::new(&phc).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
        if !ok {
            return Err(Denied::WrongPassword);
        }
        let mut f = self.lock();
        if f.verified.len() >= MAX_VERIFIED {
            f.verified.retain(|_, t| t.elapsed() < VERIFIED_TTL);
            if f.verified.len() >= MAX_VERIFIED {
                f.verified.clear();
            }
        }
        f.verified.insert(key, Instant::now());
        Ok(())
    }
}

fn dummy_salt() -> SaltString {
    SaltString::encode_b64(b"bitsfarm-dummy-salt").unwrap_or_else(|_| new_salt())
}

fn new_salt() -> SaltString {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    // A v4 UUID has 122 random bits from the OS; mixing in a second one fills the rest.
    for (b, r) in bytes.iter_mut().zip(uuid::Uuid::new_v4().as_bytes()) {
        *b ^= r.rotate_left(3);
    }
    SaltString::encode_b64(&bytes).expect("16 bytes always encode as a salt")
}

/// The users-file line for `user` with `password` (argon2id, default parameters).
pub fn passwd_entry(user: &str, password: &str) -> Result<String, String> {
    if user.is_empty() || user.contains(':') || user.chars().any(|c| c.is_control()) {
        return Err("the user name must be non-empty, without ':' or control characters".into());
    }
    if password.is_empty() {
        return Err("the password must not be empty".into());
    }
    let salt = new_salt();
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| format!("hashing failed: {e}"))?
        .to_string();
    Ok(format!("{user}:{hash}"))
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn lines(p: &Path) -> Result<Vec<(usize, String)>, AuthError> {
    let text = std::fs::read_to_string(p).map_err(|source| AuthError::Read {
        path: p.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

fn load_users(p: &Path) -> Result<HashMap<String, String>, AuthError> {
    let mut users = HashMap::new();
    for (line, l) in lines(p)? {
        let err = |message: &str| AuthError::Parse {
            path: p.to_path_buf(),
            line,
            message: message.to_string(),
        };
        let (user, hash) = l
            .split_once(':')
            .ok_or_else(|| err("expected user:$argon2id$... (see `bitsfarm passwd`)"))?;
        PasswordHash::new(hash)
            .map_err(|_| err("the hash is not a PHC string such as $argon2id$..."))?;
        if user.is_empty() {
            return Err(err("empty user name"));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

fn load_tokens(p: &Path) -> Result<HashMap<[u8; 32], String>, AuthError> {
    let mut tokens = HashMap::new();
    for (line, l) in lines(p)? {
        let (user, token) = l.split_once(':').ok_or_else(|| AuthError::Parse {
            path: p.to_path_buf(),
            line,
            message: "expected user:token".into(),
        })?;
        if user.is_empty() || token.is_empty() {
            return Err(AuthError::Parse {
                path: p.to_path_buf(),
                line,
                message: "empty user or token".into(),
            });
        }
        tokens.insert(Sha256::digest(token.as_bytes()).into(), user.to_string());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn passwd_entries_verify_and_wrong_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        let tokens = dir.path().join("tokens");
        let entry = passwd_entry("alice", "s3cret").unwrap();
        assert!(entry.starts_with("alice:$argon2id$"), "{entry}");
        std::fs::write(&users, format!("# comment\n{entry}\n")).unwrap();
        std::fs::write(&tokens, "bob:tok-123\n").unwrap();
        let a = Authenticator::new(Some(users), Some(tokens)).unwrap();
        assert_eq!(
            a.authenticate(Some(&basic("alice", "s3cret"))),
            Ok("alice".into())
        );
        // Cached the second time, still right.
        assert_eq!(
            a.authenticate(Some(&basic("alice", "s3cret"))),
            Ok("alice".into())
        );
        assert_eq!(
            a.authenticate(Some(&basic("alice", "wrong"))),
            Err(Denied::WrongPassword)
        );
        assert_eq!(
            a.authenticate(Some(&basic("mallory", "s3cret"))),
            Err(Denied::UnknownUser)
        );
        assert_eq!(a.authenticate(Some("Bearer tok-123")), Ok("bob".into()));
        assert_eq!(
            a.authenticate(Some("Bearer tok-124")),
            Err(Denied::UnknownToken)
        );
        assert_eq!(a.authenticate(None), Err(Denied::Missing));
        assert_eq!(a.authenticate(Some("Basic !!!")), Err(Denied::Malformed));
        assert_eq!(
            a.authenticate(Some("Digest x")),
            Err(Denied::SchemeNotEnabled)
        );
        assert_eq!(a.challenges().len(), 2);
    }

    #[test]
    fn metric_reasons_are_fixed_words_that_do_not_tell_users_apart() {
        let all = [
            Denied::Missing,
            Denied::Malformed,
            Denied::UnknownUser,
            Denied::WrongPassword,
            Denied::UnknownToken,
            Denied::SchemeNotEnabled,
        ];
        for d in &all {
            assert!(
                AUTH_FAILURE_REASONS.contains(&d.metric_reason()),
                "{d:?} -> {} is not pre-registered",
                d.metric_reason()
            );
        }
        // An unknown user looks exactly like a known user with a wrong password.
        assert_eq!(Denied::UnknownUser.metric_reason(), "wrong");
        assert_eq!(Denied::WrongPassword.metric_reason(), "wrong");
        assert_eq!(Denied::UnknownToken.metric_reason(), "wrong");
        assert_eq!(Denied::Missing.metric_reason(), "missing");
        let distinct: std::collections::HashSet<_> =
            all.iter().map(Denied::metric_reason).collect();
        assert_eq!(distinct.len(), AUTH_FAILURE_REASONS.len());
    }

    #[test]
    fn bad_files_are_refused_and_names_checked() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, "alice:plaintext\n").unwrap();
        assert!(Authenticator::new(Some(users), None).is_err());
        assert!(passwd_entry("a:b", "x").is_err());
        assert!(passwd_entry("a", "").is_err());
    }
}
