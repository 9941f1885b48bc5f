//! The session table of one data folder and its records on disk.
//!
//! On disk, under `<data-dir>/BITS-Sessions/Requests/{SESSION-ID}/`:
//! - `session.json`: what the session is (destination, owner), written once at Create-Session
//!   and never rewritten. When the session ends it is renamed `closed.json` or `cancelled.json`:
//!   its tombstone;
//! - `requestfile.bin`: the bytes received so far. Bytes are only ever appended in order, so the
//!   file's length is the next expected offset, and one flush before the Ack makes both the
//!   bytes and that offset durable: no separate metadata write per fragment. The upload's size,
//!   once a Fragment gave it, is the file's extended attribute `user.bitsfarm.total`, which the
//!   same flush covers (where the file system has no user attributes: an empty file
//!   `total-<bytes>` beside it, and its folder flushed);
//! - `hash.state`: a checkpoint of the running SHA-256 (see `writer`).
//!
//! Later facts are never rewrites of a file and never new files where that can be helped: each
//! new file costs an inode, and each rewrite a flush and a rename (see `flush`).
//!
//! Memory holds one small `Session` per session, each behind its own lock; the table's lock is
//! only held to look a session up, insert or remove it. No upload's bytes are ever held whole.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::flush::Flushing;
use super::place::{check_new_destination, commit, storage_error};
use crate::bits::paths::SESSION_DIR;
use crate::bits::protocol::{BitsError, SessionId};
use crate::server::beneath::{Beneath, met_link};
use crate::server::clock::unix_now;
use crate::server::dir_lock::DataDirLock;
use crate::server::disk::blocking;
use crate::server::limits::SessionCounter;
use crate::server::metrics::Metrics;
use crate::server::notify::DeliveryOutcome;

pub const REQUESTS_DIR: &str = "Requests";
pub const REPLIES_DIR: &str = "Replies";
pub const DATA_FILE: &str = "requestfile.bin";
pub const RECORD_FILE: &str = "session.json";
pub const HASH_STATE_FILE: &str = "hash.state";
pub const DELIVERY_FILE: &str = "delivery.json";
pub const REPLY_FILE: &str = "responsefile.bin";
/// The record's name once the session was closed, or cancelled: its tombstone.
pub const CLOSED_RECORD: &str = "closed.json";
pub const CANCELLED_RECORD: &str = "cancelled.json";
/// The data file's extended attribute that holds the upload's size, in decimal.
pub const TOTAL_ATTRIBUTE: &str = "user.bitsfarm.total";
/// Where the file system has no user attributes: the start of the name of an empty file that
/// records the upload's size, `total-<bytes>`.
pub const TOTAL_MARK: &str = "total-";
/// Per data folder: one record per delivered idempotency key, so that a new session for the same
/// file at the same URL is not delivered again.
pub const DELIVERED_DIR: &str = "Delivered";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// Fragments are being received (or all were, and Close has not come yet).
    Receiving,
    /// Closed: the file was committed (or an incomplete upload discarded). Kept as a tombstone so
    /// that a retried Close-Session is answered 200 instead of "session not found".
    Closed,
    /// Cancelled; kept as a tombstone for a retried Cancel-Session.
    Cancelled,
}

/// What `session.json` holds. Records written before the size and the tombstone became names
/// may carry them here too; they are still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SessionRecord {
    pub id: SessionId,
    /// The request path the session was created at; packets for it at another path are refused.
    pub url_path: String,
    /// Destination relative to the data folder.
    pub destination: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_name: Option<String>,
    pub created_unix: u64,
    /// The upload's size, known from the first Fragment on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    pub state: SessionState,
    /// The authenticated user that created the session (none when authentication is off, and in
    /// records written before authentication existed). Only that user may use the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SessionId::parse(&s).ok_or_else(|| serde::de::Error::custom("not a braced GUID"))
    }
}

/// One session in memory. The other rooms of `session` update it while they hold its lock.
pub struct Session {
    pub record: SessionRecord,
    /// The session's folder, relative to the data folder (like every path the store keeps).
    pub(super) dir: PathBuf,
    /// Bytes stored so far: the next expected offset.
    pub(super) offset: u64,
    /// The running SHA-256 of bytes `0..offset`; None after a restart until it is rebuilt.
    pub(super) hasher: Option<Sha256>,
    pub(super) last_activity: SystemTime,
    /// Set when the session left the table while a packet was waiting for it.
    removed: bool,
    /// The recorded outcome of the delivery to the server application, once there is one.
    pub(super) delivery: Option<DeliveryOutcome>,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn is_complete(&self) -> bool {
        self.record.total == Some(self.offset)
    }

    /// The bytes received so far, relative to the data folder.
    pub(super) fn data_file(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    /// The hash checkpoint, relative to the data folder.
    pub(super) fn hash_state_file(&self) -> PathBuf {
        self.dir.join(HASH_STATE_FILE)
    }

    fn expired(&self, now: SystemTime, timeout: Duration) -> bool {
        now.duration_since(self.last_activity)
            .is_ok_and(|idle| idle > timeout)
    }
}

type SessionSlot = Arc<tokio::sync::Mutex<Session>>;
/// A session, locked for one packet.
pub type Locked = tokio::sync::OwnedMutexGuard<Session>;

/// What a Create-Session makes: the new id, where the upload goes, and who owns it.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// A fresh id: random, or minted with this member's owner tag when the farm hands off sessions.
    pub id: SessionId,
    pub url_path: String,
    pub destination: PathBuf,
    pub content_name: Option<String>,
    /// The authenticated user creating the session.
    pub owner: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot prepare the data folder {path}: {error}; check that it is a folder this user \
         can write"
    )]
    Prepare { path: PathBuf, error: io::Error },
    #[error(
        "{path} is a symbolic link (or lies under one); bitsfarm never follows links inside its \
         data folder: replace it with a real folder"
    )]
    Link { path: PathBuf },
}

/// The sessions of one data folder: the table, its folders and the count of open sessions.
pub struct Store {
    root: PathBuf,
    /// The data folder, opened once; every path below is relative and reached through it, never
    /// through a symbolic link.
    pub(super) beneath: Beneath,
    /// The longest name the data folder's file system takes.
    name_max: usize,
    requests: PathBuf,
    replies: PathBuf,
    pub(super) delivered: PathBuf,
    sessions: Mutex<HashMap<SessionId, SessionSlot>>,
    metrics: Arc<Metrics>,
    /// Every write is synced before it is acknowledged.
    pub(super) sync: bool,
    /// What the flushes before an Ack must cover on this file system.
    pub(super) flushing: Flushing,
    /// Open sessions per user and in all, shared by the server's directories.
    counter: Arc<SessionCounter>,
    /// Held for as long as the directory is served: no other server recovers it meanwhile.
    _lock: DataDirLock,
}

impl Store {
    /// Opens (creating if needed) the data folder and recovers every session found on disk; `lock`
    /// is this server's hold on that folder.
    pub fn open(
        data_dir: &Path,
        metrics: Arc<Metrics>,
        sync: bool,
        lock: DataDirLock,
    ) -> Result<Self, StoreError> {
        let prepare = |path: &Path| {
            fs::create_dir_all(path).map_err(|error| StoreError::Prepare {
                path: path.to_path_buf(),
                error,
            })
        };
        prepare(data_dir)?;
        let root = fs::canonicalize(data_dir).map_err(|error| StoreError::Prepare {
            path: data_dir.to_path_buf(),
            error,
        })?;
        let beneath = Beneath::open(&root).map_err(|error| StoreError::Prepare {
            path: root.clone(),
            error,
        })?;
        let requests = Path::new(SESSION_DIR).join(REQUESTS_DIR);
        let replies = Path::new(SESSION_DIR).join(REPLIES_DIR);
        let delivered = Path::new(SESSION_DIR).join(DELIVERED_DIR);
        for p in [&requests, &replies, &delivered] {
            beneath.create_dir_all(p).map_err(|source| {
                let path = root.join(p);
                if met_link(&source) {
                    StoreError::Link { path }
                } else {
                    StoreError::Prepare {
                        path,
                        error: source,
                    }
                }
            })?;
        }
        // 255 where the file system does not say (and never more: the URL rules stop there).
        let name_max = beneath.name_max().unwrap_or(255).clamp(1, 255);
        let flushing = Flushing::detect(&beneath, sync);
        if flushing == Flushing::Folders {
            info!(dir = %root.display(), "the data folder's file system is not one known to make a new file's name durable with the file (ext4, XFS, btrfs): new names' folders are flushed too, a flush or two more per packet");
        }
        let store = Store {
            root,
            beneath,
            name_max,
            requests,
            replies,
            delivered,
            sessions: Mutex::new(HashMap::new()),
            metrics,
            sync,
            flushing,
            counter: Arc::new(SessionCounter::default()),
            _lock: lock,
        };
        store.recover();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a session's reply from the backend is kept (and served from), relative to the data
    /// folder.
    pub fn reply_path(&self, id: &SessionId) -> PathBuf {
        self.replies.join(id.as_str()).join(REPLY_FILE)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionSlot>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: &SessionId) -> Option<SessionSlot> {
        self.table().get(id).cloned()
    }

    fn recover(&self) {
        let names = match self.beneath.read_dir(&self.requests) {
            Ok(n) => n,
            Err(e) => {
                warn!(dir = %self.beneath.absolute(&self.requests).display(), error = %e, "cannot list sessions");
                return;
            }
        };
        let mut recovered = 0usize;
        for name in names {
            let Some(id) = name.to_str().and_then(SessionId::parse) else {
                continue;
            };
            let dir = self.requests.join(&name);
            match load_session(&self.beneath, &dir) {
                Ok(Some(session)) if session.record.id == id => {
                    if session.record.state == SessionState::Receiving {
                        self.metrics.sessions_active.inc();
                        self.counter.add(session.record.owner.as_deref());
                    }
                    self.table()
                        .insert(id, Arc::new(tokio::sync::Mutex::new(session)));
                    recovered += 1;
                }
                Ok(Some(_)) => {
                    warn!(dir = %dir.display(), "session.json names another session; left alone")
                }
                Ok(None) => {
                    // Created but never acknowledged (no session.json yet): nothing to keep.
                    let _ = self.beneath.remove_all(&dir);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "unreadable session; left alone"),
            }
        }
        if recovered > 0 {
            info!(dir = %self.root.display(), sessions = recovered, "recovered sessions");
        }
    }

    /// Looks a session up, locks it, and enforces the timeout and the URL it belongs to.
    pub async fn lock(
        &self,
        id: &SessionId,
        url_path: &str,
        timeout: Duration,
    ) -> Result<Locked, BitsError> {
        let slot = self.slot(id).ok_or_else(BitsError::session_not_found)?;
        let session = slot.lock_owned().await;
        if session.removed || !crate::bits::paths::same_url_path(&session.record.url_path, url_path)
        {
            return Err(BitsError::session_not_found());
        }
        if session.expired(SystemTime::now(), timeout) {
            self.remove(id, session, "expired").await;
            return Err(BitsError::session_not_found());
        }
        Ok(session)
    }

    /// Removes a session from the table and from disk.
    async fn remove(&self, id: &SessionId, mut session: Locked, why: &str) {
        session.removed = true;
        self.table().remove(id);
        if session.record.state == SessionState::Receiving {
            self.metrics.sessions_active.dec();
            self.counter.release(session.record.owner.as_deref());
            if why == "expired" {
                self.metrics.sessions_expired.inc();
            }
        }
        let dir = session.dir.clone();
        let reply_dir = self.replies.join(id.as_str());
        let b = self.beneath.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let reply = b.remove_all(&reply_dir);
            b.remove_all(&dir).and(reply)
        })
        .await;
        if let Ok(Err(e)) = removed {
            warn!(session = %id, error = %e, "the session's files could not all be removed");
        }
        info!(session = %id, why, "session removed");
    }

    /// Creates a session, on disk first, if the session limits and the destination allow it.
    pub async fn create(
        &self,
        req: CreateRequest,
        allow_overwrites: bool,
    ) -> Result<SessionId, BitsError> {
        let dest = req.destination.clone();
        let id = req.id.clone();
        let dir = self.requests.join(id.as_str());
        self.counter
            .try_acquire(req.owner.as_deref())
            .map_err(|refused| {
                self.metrics.limit_refused(refused.limit);
                refused.error
            })?;
        let owner = req.owner.clone();
        let record = SessionRecord {
            id: id.clone(),
            url_path: req.url_path,
            destination: req.destination,
            content_name: req.content_name,
            created_unix: unix_now(),
            total: None,
            state: SessionState::Receiving,
            owner: req.owner,
        };
        let (flushing, name_max, b) = (self.flushing, self.name_max, self.beneath.clone());
        let rec = record.clone();
        let (d, requests) = (dir.clone(), self.requests.clone());
        let created = blocking(move || {
            check_new_destination(&b, &dest, allow_overwrites, name_max)?;
            b.create_dir(&d).map_err(storage_error)?;
            write_new_record(&b, &d, &rec, flushing)
                .and_then(|()| flushing.names(&b, &[&d, &requests]))
                .map_err(|e| {
                // The session was never acknowledged: nothing of it stays (a full disk, say).
                if let Err(left) = b.remove_all(&d) {
                    warn!(dir = %b.absolute(&d).display(), error = %left, "cannot remove a session folder that failed to be made");
                }
                storage_error(e)
            })
        })
        .await;
        if let Err(e) = created {
            self.counter.release(owner.as_deref());
            return Err(e);
        }
        let session = Session {
            record,
            dir,
            offset: 0,
            hasher: Some(Sha256::new()),
            last_activity: SystemTime::now(),
            removed: false,
            delivery: None,
        };
        self.table()
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        self.metrics.sessions_created.inc();
        self.metrics.sessions_active.inc();
        Ok(id)
    }

    /// Records the upload's size, durably, when a fragment names it for the first time but
    /// brings no new bytes (a Fragment that writes records it with its bytes, see `writer`).
    pub async fn record_total(&self, session: &mut Session, total: u64) -> Result<(), BitsError> {
        let (data, flushing, b) = (session.data_file(), self.flushing, self.beneath.clone());
        blocking(move || {
            let recorded = || -> io::Result<()> {
                let file = b.open_file(&data, OFlags::WRONLY)?;
                let folder_flush = record_total_on(&b, &file, &data, total)?;
                if flushing.on() {
                    file.sync_all()?;
                    if folder_flush {
                        b.sync_dir(data.parent().unwrap_or(Path::new("")))?;
                    }
                }
                Ok(())
            };
            recorded().map_err(storage_error)
        })
        .await?;
        session.record.total = Some(total);
        Ok(())
    }

    /// Ends a receiving session as a tombstone in `state` (so a retried Close or Cancel is answered
    /// 200): commits the upload to `commit_to` first when given (the one flush), then drops its
    /// data, hash checkpoint and reply. The session no longer counts as open.
    ///
    /// The tombstone is not flushed: if a crash loses it, the session comes back open, and a
    /// retried Close commits again, which finds its own file in place (see `commit`); a retried
    /// Cancel drops it again.
    pub async fn end(
        &self,
        session: &mut Session,
        state: SessionState,
        commit_to: Option<PathBuf>,
        allow_overwrites: bool,
    ) -> Result<(), BitsError> {
        let mut record = session.record.clone();
        record.state = state;
        let (dir, data, sync) = (session.dir.clone(), session.data_file(), self.sync);
        let reply_dir = self.replies.join(record.id.as_str());
        let tombstone = dir.join(match state {
            SessionState::Cancelled => CANCELLED_RECORD,
            _ => CLOSED_RECORD,
        });
        let b = self.beneath.clone();
        blocking(move || {
            if let Some(dest) = commit_to {
                commit(&b, &data, &dest, allow_overwrites, sync)?;
            }
            b.rename(&dir.join(RECORD_FILE), &tombstone)
                .map_err(storage_error)?;
            let _ = b.remove_file(&data);
            let _ = b.remove_file(&dir.join(HASH_STATE_FILE));
            let _ = b.remove_all(&reply_dir);
            Ok(())
        })
        .await?;
        session.record = record;
        session.last_activity = SystemTime::now();
        session.hasher = None;
        self.metrics.sessions_active.dec();
        self.counter.release(session.record.owner.as_deref());
        Ok(())
    }

    /// Removes every session idle for longer than `timeout` at `now`. Sessions busy with a packet
    /// are skipped: they are not idle.
    pub async fn sweep_expired(&self, now: SystemTime, timeout: Duration) -> usize {
        let slots: Vec<(SessionId, SessionSlot)> = self
            .table()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut removed = 0;
        for (id, slot) in slots {
            let Ok(session) = slot.try_lock_owned() else {
                continue;
            };
            if !session.removed && session.expired(now, timeout) {
                self.remove(&id, session, "expired").await;
                removed += 1;
            }
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Shares `counter` with the server's other directories and counts this one's open sessions
    /// in it (before any packet is served).
    pub fn set_counter(&mut self, counter: Arc<SessionCounter>) {
        let slots: Vec<SessionSlot> = self.table().values().cloned().collect();
        for slot in slots {
            if let Ok(s) = slot.try_lock()
                && s.record.state == SessionState::Receiving
            {
                counter.add(s.record.owner.as_deref());
            }
        }
        self.counter = counter;
    }

    /// Refuses, as an unknown session, a session that belongs to another user than `owner`
    /// (`None`: authentication is off). Ownership never changes, so checking before the packet's
    /// own lock is enough.
    pub async fn check_owner(&self, id: &SessionId, owner: Option<&str>) -> Result<(), BitsError> {
        let Some(slot) = self.slot(id) else {
            return Ok(()); // unknown: the packet handler answers that itself
        };
        let session = slot.lock().await;
        if session.record.owner.as_deref() != owner {
            return Err(BitsError::session_not_found());
        }
        Ok(())
    }

    /// The reply file of an open session whose reply this server keeps (not a static URL),
    /// opened while the session is locked, so no cleanup races it.
    pub async fn reply_file(&self, id: &SessionId, timeout: Duration) -> Option<File> {
        let slot = self.slot(id)?;
        let session = slot.lock_owned().await;
        let open = !session.removed
            && session.record.state == SessionState::Receiving
            && !session.expired(SystemTime::now(), timeout);
        let served_here = session
            .delivery
            .as_ref()
            .is_some_and(|d| d.static_reply_url.is_none());
        if !(open && served_here) {
            return None;
        }
        self.open_download(self.reply_path(id)).await
    }

    /// The regular file at `rel`, opened for reading; None for anything else, and when a link is
    /// on the way (never followed). Opened without blocking, so a FIFO planted in the data folder
    /// cannot hold a thread.
    pub async fn open_download(&self, rel: PathBuf) -> Option<File> {
        let b = self.beneath.clone();
        let opened = blocking(move || {
            let file = b.open_file(&rel, OFlags::RDONLY | OFlags::NONBLOCK);
            if let Err(e) = &file
                && met_link(e)
            {
                warn!(path = %b.absolute(&rel).display(), "a download met a symbolic link; not followed");
            }
            Ok(file
                .ok()
                .filter(|f| f.metadata().is_ok_and(|m| m.is_file())))
        });
        opened.await.ok().flatten()
    }
}

/// Writes a new session's record in its new folder `dir`, in place: the name is new, so there is
/// nothing to replace, and a record cut short by a crash belongs to a session that was never
/// acknowledged (recovery drops it). The flush (`fsync`, which covers the file's creation) also
/// makes the folder durable where the file system orders its names (see `flush`).
fn write_new_record(
    b: &Beneath,
    dir: &Path,
    record: &SessionRecord,
    flushing: Flushing,
) -> io::Result<()> {
    use std::io::Write;
    let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
    let mut file = b.open_file(&dir.join(RECORD_FILE), flags)?;
    file.write_all(&json)?;
    if flushing.on() {
        file.sync_all()?;
    }
    Ok(())
}

/// Records the upload's size `total` on its data `file` (at `data`, below `b`), for the flush
/// that follows to make durable: as an attribute of the file, or where the file system has none,
/// as an empty file beside it. True when that file was made, and its folder must be flushed too.
pub(super) fn record_total_on(
    b: &Beneath,
    file: &File,
    data: &Path,
    total: u64,
) -> io::Result<bool> {
    let value = total.to_string();
    let flags = rustix::fs::XattrFlags::empty();
    match rustix::fs::fsetxattr(file, TOTAL_ATTRIBUTE, value.as_bytes(), flags) {
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let mark = data.with_file_name(format!("{TOTAL_MARK}{total}"));
            match b.create_empty(&mark) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(true),
                other => other.map(|()| true),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The upload's size as recorded by `record_total_on`, if it was.
fn recorded_total(b: &Beneath, data: &Path, names: &[std::ffi::OsString]) -> Option<u64> {
    let from_mark = || {
        names
            .iter()
            .find_map(|n| n.to_str()?.strip_prefix(TOTAL_MARK)?.parse().ok())
    };
    let Ok(file) = b.open_file(data, OFlags::RDONLY | OFlags::NONBLOCK) else {
        return from_mark();
    };
    let mut value = [0u8; 20];
    match rustix::fs::fgetxattr(&file, TOTAL_ATTRIBUTE, &mut value) {
        Ok(n) => std::str::from_utf8(&value[..n]).ok()?.parse().ok(),
        Err(_) => from_mark(),
    }
}

/// Replaces the JSON file `rel` (below the data folder) atomically: write, sync, rename, sync the
/// folder.
pub(super) fn write_json<T: Serialize>(
    b: &Beneath,
    rel: &Path,
    value: &T,
    sync: bool,
) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    b.write_atomic(rel, &json, sync)
}

fn load_session(b: &Beneath, dir: &Path) -> io::Result<Option<Session>> {
    let names = b.read_dir(dir)?;
    let has = |name: &str| names.iter().any(|n| n == name);
    // The record, under the name that says how far the session got.
    let Some((record_name, ended)) = [
        (RECORD_FILE, None),
        (CLOSED_RECORD, Some(SessionState::Closed)),
        (CANCELLED_RECORD, Some(SessionState::Cancelled)),
    ]
    .into_iter()
    .find(|(name, _)| has(name)) else {
        return Ok(None);
    };
    let json = b.read(&dir.join(record_name))?;
    let mut record: SessionRecord = match serde_json::from_slice(&json) {
        Ok(r) => r,
        // Cut short by a crash before Create-Session's flush: never acknowledged, nothing to keep.
        // With anything else in the folder, it is not ours to judge.
        Err(_) if names.len() == 1 => return Ok(None),
        Err(e) => return Err(io::Error::other(e)),
    };
    // The record names where Close will write: never trust it to stay inside the data folder.
    let names_session_dir = record
        .destination
        .components()
        .next()
        .is_some_and(|c| c.as_os_str().eq_ignore_ascii_case(SESSION_DIR));
    if !crate::bits::paths::is_contained(&record.destination)
        || record.destination.as_os_str().is_empty()
        || names_session_dir
    {
        return Err(io::Error::other(format!(
            "destination {:?} leaves the data folder or names the session folder",
            record.destination
        )));
    }
    if let Some(state) = ended {
        record.state = state;
    }
    if record.total.is_none() && record.state == SessionState::Receiving {
        record.total = recorded_total(b, &dir.join(DATA_FILE), &names);
    }
    let (offset, data_mtime) = match b.metadata(&dir.join(DATA_FILE)) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    };
    // The folder changes with every name made, renamed or dropped in it (the tombstone).
    let folder_mtime = b.metadata(dir)?.modified().ok();
    let last_activity = data_mtime
        .into_iter()
        .chain(folder_mtime)
        .max()
        .unwrap_or_else(SystemTime::now);
    let delivery = if has(DELIVERY_FILE) {
        b.read(&dir.join(DELIVERY_FILE))
            .ok()
            .and_then(|j| serde_json::from_slice(&j).ok())
    } else {
        None
    };
    Ok(Some(Session {
        record,
        dir: dir.to_path_buf(),
        offset,
        hasher: None,
        last_activity,
        removed: false,
        delivery,
    }))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn record(destination: &str) -> SessionRecord {
        SessionRecord {
            id: SessionId::generate(),
            url_path: "/a.bin".into(),
            destination: PathBuf::from(destination),
            content_name: None,
            created_unix: 0,
            total: Some(3),
            state: SessionState::Receiving,
            owner: None,
        }
    }

    fn folder() -> (tempfile::TempDir, Beneath) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("s")).unwrap();
        let b = Beneath::open(dir.path()).unwrap();
        (dir, b)
    }

    #[test]
    fn a_session_comes_back_with_its_file_length_as_offset() {
        let (dir, b) = folder();
        let s = Path::new("s");
        assert!(load_session(&b, s).unwrap().is_none(), "no record yet");
        let rec = record("sub/a.bin");
        write_new_record(&b, s, &rec, Flushing::Off).unwrap();
        fs::write(dir.path().join("s").join(DATA_FILE), b"ab").unwrap();
        let session = load_session(&b, s).unwrap().unwrap();
        assert_eq!(
            (&session.record, session.offset, session.is_complete()),
            (&rec, 2, false)
        );
        assert!(session.hasher.is_none() && session.delivery.is_none());
    }

    #[test]
    fn a_tombstone_and_a_recorded_size_come_back() {
        let (dir, b) = folder();
        let s = Path::new("s");
        let mut rec = record("a.bin");
        rec.total = None;
        write_new_record(&b, s, &rec, Flushing::Ordered).unwrap();
        let data = s.join(DATA_FILE);
        fs::write(dir.path().join(&data), b"ab").unwrap();
        let file = b.open_file(&data, OFlags::WRONLY).unwrap();
        assert!(
            !record_total_on(&b, &file, &data, 5).unwrap(),
            "an attribute"
        );
        let session = load_session(&b, s).unwrap().unwrap();
        assert_eq!((session.record.total, session.offset), (Some(5), 2));
        // Where the attribute is missing, the empty file beside the data stands in for it.
        fs::remove_file(dir.path().join(&data)).unwrap();
        fs::write(dir.path().join(&data), b"ab").unwrap();
        fs::write(dir.path().join("s").join(format!("{TOTAL_MARK}9")), b"").unwrap();
        assert_eq!(load_session(&b, s).unwrap().unwrap().record.total, Some(9));
        for (name, state) in [
            (CLOSED_RECORD, SessionState::Closed),
            (CANCELLED_RECORD, SessionState::Cancelled),
        ] {
            let now = fs::read_dir(dir.path().join("s"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "json"))
                .unwrap();
            fs::rename(now, dir.path().join("s").join(name)).unwrap();
            assert_eq!(load_session(&b, s).unwrap().unwrap().record.state, state);
        }
    }

    #[test]
    fn a_record_cut_short_before_its_flush_is_dropped_unless_the_folder_holds_more() {
        let (dir, b) = folder();
        let s = Path::new("s");
        fs::write(dir.path().join("s").join(RECORD_FILE), b"{\"id\": \"{1").unwrap();
        assert!(load_session(&b, s).unwrap().is_none(), "never acknowledged");
        fs::write(dir.path().join("s").join(DATA_FILE), b"ab").unwrap();
        assert!(
            load_session(&b, s).is_err(),
            "not ours to judge: left alone"
        );
    }

    #[test]
    fn a_record_naming_a_place_outside_the_data_folder_is_refused() {
        for destination in [
            "../up.bin",
            "/etc/passwd",
            "",
            "BITS-Sessions/x",
            "bits-sessions",
        ] {
            let (_dir, b) = folder();
            write_new_record(&b, Path::new("s"), &record(destination), Flushing::Off).unwrap();
            assert!(load_session(&b, Path::new("s")).is_err(), "{destination:?}");
        }
    }

    #[test]
    fn a_session_folder_that_is_a_link_is_not_read() {
        let (dir, b) = folder();
        let elsewhere = tempfile::tempdir().unwrap();
        fs::write(
            elsewhere.path().join(RECORD_FILE),
            serde_json::to_vec(&record("a.bin")).unwrap(),
        )
        .unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("l")).unwrap();
        let e = load_session(&b, Path::new("l")).err().expect("refused");
        assert!(met_link(&e), "{e}");
    }
}
