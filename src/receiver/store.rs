//! The receiver's folder: each delivery at its upload's own path and name, and its record, by
//! key, beside the uploads.
//!
//! ```text
//! <dir>/dumps/app.dmp                      the upload to /dumps/app.dmp (the URL path)
//! <dir>/dumps/app-2.dmp                    other bytes sent to the same URL later
//! <dir>/.bitsfarm/deliveries/<key>.json    what arrived, where it went, and the reply
//! <dir>/.bitsfarm/incoming/                deliveries still arriving
//! ```
//!
//! The path comes from `BITS-Original-Request-URL`, a request header like any other, so it gets
//! the server's own rules (`bits::paths::destination_path`: plain names only, no `..`, no encoded
//! slash or backslash), and every folder below `<dir>` is reached from a descriptor of it without
//! following a link (as `trusted` reads by-reference files): a link planted in the folder is
//! refused on the way, and a link or file already at the name is never written through nor
//! replaced.
//!
//! Two different uploads to one URL path are both kept: the later gets the first free name with
//! `-2`, `-3`, … before its extension, since a crash-dump collector receives `app.dmp` from many
//! machines and must lose none. The same bytes to the same URL path are one delivery (one key),
//! stored once. A file is placed before its record is written; a retry after a crash between the
//! two finds its bytes already at one of its names and takes that file as its own.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::StoredDelivery;
use super::trusted::open_beneath;
use crate::bits::paths;

/// The receiver's own folder below `<dir>`; no upload may use this name.
pub const STATE_DIR: &str = ".bitsfarm";
const RECORDS: &str = "deliveries";
const INCOMING: &str = "incoming";
/// How many names (`app.dmp`, `app-2.dmp`, …) are tried before a delivery is refused.
const MAX_NAMES: u32 = 10_000;

/// Why a delivery cannot be put where its URL says. Each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "BITS-Original-Request-URL {url:?} names no file this receiver can store: {why}; send the upload's URL"
    )]
    BadUrl { url: String, why: String },
    #[error(
        "{path} passes through a symbolic link below {dir}; this receiver follows none (remove the link)"
    )]
    Link { path: PathBuf, dir: PathBuf },
    #[error("{path} cannot be stored on this receiver's file system: {why}")]
    TooLong { path: PathBuf, why: String },
    #[error("{path}: a file is where a folder of this path should be, below {dir}")]
    NotAFolder { path: PathBuf, dir: PathBuf },
    #[error("cannot store {path} below {dir}: {source}")]
    Io {
        path: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
}

impl StoreError {
    /// A URL no bitsfarm server sends is the request's fault; a link the operator's; a name
    /// taken by a file where a folder should be is a conflict another upload made.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::BadUrl { .. } | StoreError::TooLong { .. } => 400,
            StoreError::Link { .. } => 403,
            StoreError::NotAFolder { .. } => 409,
            StoreError::Io { .. } => 500,
        }
    }
}

/// Where a delivery goes below the folder: the path of its original URL (percent-decoded, under
/// the server's rules), or, without a URL (a server other than bitsfarm may send none), its key.
pub fn destination(original_url: Option<&str>, key: &str) -> Result<PathBuf, StoreError> {
    let Some(raw) = original_url else {
        return Ok(PathBuf::from(key));
    };
    let bad = |why: String| StoreError::BadUrl {
        url: raw.to_string(),
        why,
    };
    let url = url::Url::parse(raw).map_err(|e| bad(format!("not a URL ({e})")))?;
    let rel =
        paths::destination_path(url.path().trim_start_matches('/')).map_err(|e| bad(e.message))?;
    let first = rel.components().next().map(|c| c.as_os_str());
    if first.is_some_and(|f| f.as_bytes().eq_ignore_ascii_case(STATE_DIR.as_bytes())) {
        return Err(bad(format!("{STATE_DIR} holds the receiver's records")));
    }
    Ok(rel)
}

/// `app.dmp` as its `n`th name: `app-2.dmp`; `core` as `core-2`; `.env` as `.env-2`.
fn nth_name(name: &OsStr, n: u32) -> OsString {
    if n <= 1 {
        return name.to_os_string();
    }
    let bytes = name.as_bytes();
    let dot = bytes.iter().rposition(|b| *b == b'.').filter(|i| *i > 0);
    let (stem, ext) = bytes.split_at(dot.unwrap_or(bytes.len()));
    let mut out = stem.to_vec();
    out.extend_from_slice(format!("-{n}").as_bytes());
    out.extend_from_slice(ext);
    OsString::from(std::ffi::OsStr::from_bytes(&out))
}

/// The receiver's folder, held open.
pub struct Folder {
    path: PathBuf,
    root: OwnedFd,
    records: OwnedFd,
    incoming: OwnedFd,
}

impl Folder {
    /// Opens `dir` (made if missing; links in `dir` itself are followed: it is the operator's
    /// setting), its records and its incoming folder, emptied of what a crash left there.
    pub fn open(dir: &Path) -> io::Result<Folder> {
        let state = dir.join(STATE_DIR);
        std::fs::create_dir_all(state.join(RECORDS))?;
        std::fs::create_dir_all(state.join(INCOMING))?;
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let folder = |name: &str| {
            let rel = Path::new(STATE_DIR).join(name);
            open_beneath(
                root.as_fd(),
                &rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            )
        };
        let (records, incoming) = (folder(RECORDS)?, folder(INCOMING)?);
        // One receiver per folder: what is in `incoming` now is what a stopped one left.
        for entry in rustix::fs::Dir::read_from(&incoming)? {
            let name = entry?.file_name().to_owned();
            if !matches!(name.to_bytes(), b"." | b"..") {
                let _ = rustix::fs::unlinkat(&incoming, name.as_c_str(), AtFlags::empty());
            }
        }
        Ok(Folder {
            // Logs name files by absolute path, without resolving the operator's links.
            path: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            root,
            records,
            incoming,
        })
    }

    /// A new file in the incoming folder, and its name there.
    pub fn incoming_file(&self) -> io::Result<(File, String)> {
        let name = uuid::Uuid::new_v4().simple().to_string();
        Ok((super::trusted::create_new(&self.incoming, &name)?, name))
    }

    /// Removes an incoming file that will not be stored.
    pub fn discard(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.incoming, name, AtFlags::empty());
    }

    /// The record of `key`, if it was stored (here, or as `<key>/delivery.json` by a receiver
    /// of the layout before this one, so that an upgrade keeps the once-per-key promise).
    pub fn record(&self, key: &str) -> io::Result<Option<StoredDelivery>> {
        let json = format!("{key}.json");
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.records, json.as_str(), flags, Mode::empty()) {
            Ok(fd) => serde_json::from_slice(&read_all(fd)?)
                .map(Some)
                .map_err(|e| io::Error::other(format!("the record of {key}: {e}"))),
            Err(Errno::NOENT) => {
                let old = Path::new(key).join("delivery.json");
                match open_beneath(self.root.as_fd(), &old, flags) {
                    // An upload could be at that path too: only a record is taken for one.
                    Ok(fd) => Ok(serde_json::from_slice(&read_all(fd)?).ok()),
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the record of a delivery: a temporary file renamed over its name, both on disk
    /// before this returns.
    pub fn write_record(&self, d: &StoredDelivery) -> io::Result<()> {
        let name = format!("{}.json", d.idempotency_key);
        let temp = format!(".{name}.tmp");
        match rustix::fs::unlinkat(&self.records, temp.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let mut f = super::trusted::create_new(&self.records, &temp)?;
        let json = serde_json::to_vec_pretty(d).map_err(io::Error::other)?;
        f.write_all(&json)?;
        f.sync_all()?;
        rustix::fs::renameat(&self.records, temp.as_str(), &self.records, name.as_str())?;
        Ok(rustix::fs::fsync(&self.records)?)
    }

    /// `rel` below the folder, as a path for messages and logs.
    pub fn absolute(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// Puts the incoming file `temp` (`size` bytes, SHA-256 `sha_hex`, already on disk) at `rel`,
    /// or at the first free name beside it, making the folders on the way; returns where it went.
    /// A name already taken is never replaced; one holding these very bytes is this delivery's.
    pub fn place(
        &self,
        temp: &str,
        rel: &Path,
        size: u64,
        sha_hex: &str,
    ) -> Result<PathBuf, StoreError> {
        let (Some(name), parent) = (rel.file_name(), rel.parent().unwrap_or(Path::new(""))) else {
            return Err(self.io(rel, io::Error::other("no file name")));
        };
        // Said as the server says it at Create-Session, rather than failing the same way forever.
        let name_max = rustix::fs::fstatfs(&self.root).map_or(255, |s| s.f_namelen as usize);
        paths::check_fits(&self.path, rel, name_max).map_err(|e| StoreError::TooLong {
            path: self.absolute(rel),
            why: e.message,
        })?;
        let folder = self.make_folders(parent)?;
        for n in 1..=MAX_NAMES {
            let candidate = nth_name(name, n);
            let placed = parent.join(&candidate);
            match rustix::fs::linkat(
                &self.incoming,
                temp,
                &folder,
                candidate.as_os_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    if holds(folder.as_fd(), &candidate, size, sha_hex) {
                        self.discard(temp);
                        return Ok(placed);
                    }
                    continue;
                }
                Err(e) => return Err(self.io(&placed, e.into())),
            }
            self.discard(temp);
            rustix::fs::fsync(&folder).map_err(|e| self.io(&placed, e.into()))?;
            return Ok(placed);
        }
        Err(self.io(
            rel,
            io::Error::other(format!("{MAX_NAMES} names beside it are taken")),
        ))
    }

    /// Opens folder `rel`, making every missing folder on the way, without following a link.
    fn make_folders(&self, rel: &Path) -> Result<OwnedFd, StoreError> {
        const FOLDER: OFlags = OFlags::RDONLY
            .union(OFlags::DIRECTORY)
            .union(OFlags::NOFOLLOW)
            .union(OFlags::CLOEXEC);
        let mut held: Option<OwnedFd> = None;
        let mut walked = PathBuf::new();
        for name in rel.components().map(|c| c.as_os_str()) {
            walked.push(name);
            let at = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let opened = match rustix::fs::openat(at, name, FOLDER, Mode::empty()) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io(&walked, e.into())),
                    }
                    rustix::fs::openat(at, name, FOLDER, Mode::empty())
                }
                other => other,
            };
            match opened {
                Ok(fd) => held = Some(fd),
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW);
                    let link = st.is_ok_and(|s| FileType::from_raw_mode(s.st_mode).is_symlink());
                    let (path, dir) = (self.absolute(&walked), self.path.clone());
                    return Err(if link {
                        StoreError::Link { path, dir }
                    } else {
                        StoreError::NotAFolder { path, dir }
                    });
                }
                Err(e) => return Err(self.io(&walked, e.into())),
            }
        }
        match held {
            Some(fd) => Ok(fd),
            None => rustix::fs::openat(&self.root, ".", FOLDER, Mode::empty())
                .map_err(|e| self.io(rel, e.into())),
        }
    }

    fn io(&self, rel: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.absolute(rel),
            dir: self.path.clone(),
            source,
        }
    }
}

fn read_all(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::from(fd).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether `name` in `folder` is a regular file (not a link) of exactly these bytes.
fn holds(folder: BorrowedFd<'_>, name: &OsStr, size: u64, sha_hex: &str) -> bool {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(fd) = rustix::fs::openat(folder, name, flags, Mode::empty()) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return false;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != size {
        return false;
    }
    let mut hasher = Sha256::new();
    let mut file = File::from(fd);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == sha_hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_goes_to_its_url_path_under_the_servers_rules() {
        let d = |u: &str| destination(Some(u), "k").map(|p| p.display().to_string());
        assert_eq!(d("http://h:8/dumps/app.dmp").unwrap(), "dumps/app.dmp");
        assert_eq!(
            d("http://h/up/crash%20report.dmp?acct=7").unwrap(),
            "up/crash report.dmp"
        );
        assert_eq!(d("http://h/%2e%2e/%2e%2e/x").unwrap(), "x");
        for bad in [
            "http://h/",
            "http://h/a%2fb",
            "http://h/a%5cb",
            "http://h/a%00b",
            "http://h/a//b",
            "http://h/.bitsfarm/deliveries/k.json",
            "http://h/.BITSFARM/x",
            "not a url",
        ] {
            let e = d(bad).expect_err(bad);
            assert!(e.contains_url(bad), "{bad}: the refusal names the URL: {e}");
        }
        assert_eq!(
            destination(None, "sha256-ab").unwrap(),
            PathBuf::from("sha256-ab")
        );
    }

    impl StoreError {
        fn contains_url(&self, url: &str) -> bool {
            matches!(self, StoreError::BadUrl { url: u, .. } if u == url) && self.status() == 400
        }
    }

    #[test]
    fn later_names_go_before_the_extension() {
        let n = |s: &str, k| nth_name(OsStr::new(s), k).to_string_lossy().into_owned();
        assert_eq!(n("app.dmp", 1), "app.dmp");
        assert_eq!(n("app.dmp", 2), "app-2.dmp");
        assert_eq!(n("a.tar.gz", 3), "a.tar-3.gz");
        assert_eq!(n("core", 2), "core-2");
        assert_eq!(n(".env", 2), ".env-2");
    }

    fn incoming(f: &Folder, bytes: &[u8]) -> (String, String) {
        let (mut file, name) = f.incoming_file().unwrap();
        file.write_all(bytes).unwrap();
        let sha: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (name, sha)
    }

    #[test]
    fn names_taken_are_kept_and_the_same_bytes_are_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = Folder::open(dir.path()).unwrap();
        let rel = Path::new("a/b/app.dmp");
        let (t1, s1) = incoming(&f, b"first");
        assert_eq!(f.place(&t1, rel, 5, &s1).unwrap(), rel);
        let (t2, s2) = incoming(&f, b"second");
        assert_eq!(
            f.place(&t2, rel, 6, &s2).unwrap(),
            Path::new("a/b/app-2.dmp")
        );
        // A retry of the second after a crash before its record: its own file, not a third.
        let (t3, _) = incoming(&f, b"second");
        assert_eq!(
            f.place(&t3, rel, 6, &s2).unwrap(),
            Path::new("a/b/app-2.dmp")
        );
        assert_eq!(std::fs::read(dir.path().join(rel)).unwrap(), b"first");
        let left = std::fs::read_dir(dir.path().join(STATE_DIR).join(INCOMING))
            .unwrap()
            .count();
        assert_eq!(left, 0, "nothing left in incoming");
        // Too long for the file system: said as such.
        let (t5, s5) = incoming(&f, b"y");
        let long = Path::new("a").join("n".repeat(300));
        assert_eq!(f.place(&t5, &long, 1, &s5).unwrap_err().status(), 400);
        f.discard(&t5);
        // A file where a folder should be.
        let (t4, s4) = incoming(&f, b"x");
        let e = f
            .place(&t4, Path::new("a/b/app.dmp/x"), 1, &s4)
            .unwrap_err();
        assert_eq!(e.status(), 409, "{e}");
    }

    #[test]
    fn records_are_read_back_and_old_ones_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = Folder::open(dir.path()).unwrap();
        assert!(f.record("k1").unwrap().is_none());
        let d = StoredDelivery {
            idempotency_key: "k1".into(),
            sha256: "00".into(),
            bytes: 1,
            original_url: None,
            session_id: None,
            stored_path: Some("k1".into()),
            received_unix: 0,
            reply: "r".into(),
        };
        f.write_record(&d).unwrap();
        assert_eq!(f.record("k1").unwrap(), Some(d.clone()));
        // The layout before: <key>/delivery.json.
        std::fs::create_dir(dir.path().join("k0")).unwrap();
        let old = StoredDelivery {
            idempotency_key: "k0".into(),
            stored_path: None,
            ..d
        };
        std::fs::write(
            dir.path().join("k0").join("delivery.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert_eq!(f.record("k0").unwrap(), Some(old));
        // A stale incoming file goes at the next start.
        let (_t, _) = incoming(&f, b"half");
        drop(f);
        Folder::open(dir.path()).unwrap();
        let left = std::fs::read_dir(dir.path().join(STATE_DIR).join(INCOMING))
            .unwrap()
            .count();
        assert_eq!(left, 0);
    }
}
