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
//!
//! Wrong passwords must not starve the server: checks run on the blocking pool, a few at a time
//! ([`slots`]), and an address whose credentials keep failing is slowed down ([`throttle`]): past
//! a few failures it is answered `503` without a check for a penalty that doubles with each
//! further failure, and an address with a recent failure never waits in line for a check.

mod slots;
mod throttle;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub use slots::WAIT as CHECK_WAIT;
pub use throttle::{FIRST_PENALTY, FREE_FAILURES, MAX_PENALTY};

use slots::{NoSlot, Slots};
use throttle::{AddrKey, Standing, Throttle};

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

/// Why a request was not let in (for the log; the client sees 401, or 503 when it should retry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Malformed,
    UnknownUser,
    WrongPassword,
    UnknownToken,
    SchemeNotEnabled,
    /// Not checked: the client's address failed too often lately (503, retry after this long).
    Throttled(Duration),
    /// Not checked: every password check was taken for longer than [`CHECK_WAIT`] (503).
    Busy,
}

impl Denied {
    /// How long the client should wait before it retries, when the refusal is only for now
    /// (answered 503 rather than 401).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denied::Throttled(d) => Some(*d),
            Denied::Busy => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Every value `Denied::metric_reason` gives, for the metrics to start at 0.
pub const AUTH_FAILURE_REASONS: [&str; 6] = [
    "missing",
    "malformed",
    "unsupported_scheme",
    "wrong",
    "throttled",
    "busy",
];

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
            Denied::Throttled(_) => "throttled",
            Denied::Busy => "busy",
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

/// What an `Authorization` header presents.
enum Presented {
    Basic { user: String, password: String },
    Bearer(String),
}

/// The configured credentials. `None` paths mean that scheme is off.
pub struct Authenticator {
    users_file: Option<PathBuf>,
    tokens_file: Option<PathBuf>,
    /// Random per process: the verification cache's keys are useless outside it.
    pepper: [u8; 16],
    files: Mutex<Files>,
    slots: Slots,
    throttle: Throttle,
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
            slots: Slots::for_this_machine(),
            throttle: Throttle::default(),
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
                        self.throttle.forget_used();
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
                        self.throttle.forget_used();
                        f.tokens_stamp = now;
                    }
                    Err(e) => {
                        warn!(error = %e, "tokens file not reloaded; keeping the previous one")
                    }
                }
            }
        }
    }

    /// The user an `Authorization` header value proves, or why it does not. `from`: the
    /// client's address, for slowing down one that keeps failing (`None`: not to be slowed down,
    /// such as a packet another farm member forwarded after checking it).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        from: Option<IpAddr>,
    ) -> Result<String, Denied> {
        let presented = self.parse(authorization)?;
        let key = self.credentials_key(&presented);
        let from = from.map(AddrKey::new);
        let standing = from.map_or(Standing::Clean, |a| {
            self.throttle.standing(a, Instant::now())
        });
        let result = match presented {
            Presented::Basic { user, password } => {
                self.check_password(user, password, &key, from, standing)
                    .await
            }
            Presented::Bearer(token) => self.check_token(&token, &key, from, standing),
        };
        if let Some(a) = from {
            let now = Instant::now();
            match &result {
                Ok(_) => self.throttle.succeeded(a, &key, now),
                Err(Denied::UnknownUser | Denied::WrongPassword | Denied::UnknownToken) => {
                    self.throttle.failed(a, now);
                }
                Err(_) => {}
            }
        }
        result
    }

    /// Reads the header: the scheme must be on, the value well-formed. Costs nothing.
    fn parse(&self, authorization: Option<&str>) -> Result<Presented, Denied> {
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
            Ok(Presented::Basic {
                user: user.to_string(),
                password: password.to_string(),
            })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if !self.bearer_enabled() {
                return Err(Denied::SchemeNotEnabled);
            }
            Ok(Presented::Bearer(rest.to_string()))
        } else {
            Err(Denied::SchemeNotEnabled)
        }
    }

    /// The salted SHA-256 the cache and the throttle know credentials by (never the password).
    fn credentials_key(&self, presented: &Presented) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        match presented {
            Presented::Basic { user, password } => {
                h.update(b"basic");
                h.update((user.len() as u64).to_le_bytes());
                h.update(user.as_bytes());
                h.update(password.as_bytes());
            }
            Presented::Bearer(token) => {
                h.update(b"bearer");
                h.update(token.as_bytes());
            }
        }
        h.finalize().into()
    }

    /// During a penalty, only credentials that already worked from that address pass (and
    /// nothing is checked): a guess gets no answer, a client sharing the address keeps working.
    fn penalty_allows(
        &self,
        from: Option<AddrKey>,
        standing: Standing,
        key: &[u8; 32],
    ) -> Result<(), Denied> {
        match (standing, from) {
            (Standing::Penalized(left), Some(a)) => {
                if self.throttle.used_here(a, key, Instant::now()) {
                    Ok(())
                } else {
                    Err(Denied::Throttled(left.max(Duration::from_secs(1))))
                }
            }
            _ => Ok(()),
        }
    }

    fn check_token(
        &self,
        token: &str,
        key: &[u8; 32],
        from: Option<AddrKey>,
        standing: Standing,
    ) -> Result<String, Denied> {
        self.penalty_allows(from, standing, key)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut f = self.lock();
        self.reload_if_changed(&mut f);
        f.tokens.get(&digest).cloned().ok_or(Denied::UnknownToken)
    }

    async fn check_password(
        &self,
        user: String,
        password: String,
        key: &[u8; 32],
        from: Option<AddrKey>,
        standing: Standing,
    ) -> Result<String, Denied> {
        let phc = {
            let mut f = self.lock();
            self.reload_if_changed(&mut f);
            let cached = f
                .verified
                .get(key)
                .is_some_and(|t| t.elapsed() < VERIFIED_TTL);
            // Still in the file? A removed user is gone at once even if cached.
            let known = f.users.get(&user).cloned();
            if cached && known.is_some() {
                drop(f);
                self.penalty_allows(from, standing, key)?;
                return Ok(user);
            }
            known
        };
        self.penalty_allows(from, standing, key)?;
        // An address that failed lately gets a check only if one is free now: a flood never
        // waits in line ahead of clean addresses.
        let permit = match standing {
            Standing::Clean => self.slots.within(slots::WAIT).await,
            Standing::Failed | Standing::Penalized(_) => self.slots.now(),
        };
        let permit = permit.map_err(|e| match e {
            NoSlot::Busy => Denied::Busy,
            NoSlot::NoneFree => Denied::Throttled(Duration::from_secs(1)),
        })?;
        // Its address failed while it waited: the flood it belongs to gets no check.
        if standing == Standing::Clean
            && let Some(a) = from
            && self.throttle.standing(a, Instant::now()) != Standing::Clean
        {
            return Err(Denied::Throttled(Duration::from_secs(1)));
        }
        let ok = tokio::task::spawn_blocking(move || {
            // The permit is held for as long as the check runs, even if the client is gone.
            let _permit = permit;
            match phc {
                Some(phc) => Some(verify(&phc, &password)),
                None => {
                    // Spend about the time a real check takes, so a timing probe cannot list
                    // users.
                    let _ = Argon2::default().hash_password(password.as_bytes(), &dummy_salt());
                    None
                }
            }
        })
        .await
        .map_err(|_| Denied::Busy)?;
        match ok {
            None => Err(Denied::UnknownUser),
            Some(false) => Err(Denied::WrongPassword),
            Some(true) => {
                self.remember(*key);
                Ok(user)
            }
        }
    }

    fn remember(&self, key: [u8; 32]) {
        let mut f = self.lock();
        if f.verified.len() >= MAX_VERIFIED {
            f.verified.retain(|_, t| t.elapsed() < VERIFIED_TTL);
            if f.verified.len() >= MAX_VERIFIED {
                f.verified.clear();
            }
        }
        f.verified.insert(key, Instant::now());
    }
}

fn verify(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
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

/// A name a users file can hold: non-empty, without ':' or control characters.
pub fn check_user_name(user: &str) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.chars().any(|c| c.is_control()) {
        return Err("the user name must be non-empty, without ':' or control characters".into());
    }
    Ok(())
}

/// The users-file line for `user` with `password` (argon2id, default parameters).
pub fn passwd_entry(user: &str, password: &str) -> Result<String, String> {
    check_user_name(user)?;
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
mod tests;
