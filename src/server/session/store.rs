//! The session table of one data folder: lookup and locks, creation, the end of a session,
//! recovery and expiry. What each session keeps on disk is in `record`.
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
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::flush::Flushing;
use super::place::{check_new_destination, commit, storage_error};
use super::record::{
    CANCELLED_RECORD, CLOSED_RECORD, DATA_FILE, DELIVERED_DIR, HASH_STATE_FILE, RECORD_FILE,
    REPLIES_DIR, REPLY_FILE, REQUESTS_DIR, SessionRecord, SessionState, flush_named, load_session,
    record_total_on, write_new_record,
};
use crate::bits::paths::SESSION_DIR;
use crate::bits::protocol::{BitsError, SessionId};
use crate::server::beneath::{Beneath, met_link};
use crate::server::clock::unix_now;
use crate::server::dir_lock::DataDirLock;
use crate::server::disk::blocking;
use crate::server::limits::SessionCounter;
use crate::server::metrics::Metrics;
use crate::server::notify::DeliveryOutcome;

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
    /// What the flushes before an Ack must cover on this file system (none with syncing off).
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
        // A file system that cannot be asked is treated as one that needs folders flushed.
        let fs_type = beneath.fs_type().unwrap_or(0);
        let flushing = Flushing::for_file_system(sync, fs_type);
        if Flushing::journal_less_ext4(&root, fs_type) {
            info!(dir = %root.display(), "the data folder is on ext4 without a journal: there each new file steps over every inode freed in the last minutes, so after many deletions a session costs up to a millisecond of CPU per file it makes; a journaled file system (ext4's default, XFS) does not");
        }
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
                Ok(Some(found)) if found.record.id == id => {
                    let session = Session {
                        record: found.record,
                        dir,
                        offset: found.offset,
                        hasher: None,
                        last_activity: found.last_activity,
                        removed: false,
                        delivery: found.delivery,
                    };
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
                let beside = record_total_on(&b, &file, &data, total)?;
                flush_named(&b, &file, &data, beside, false, flushing)
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
        let (dir, data, sync) = (session.dir.clone(), session.data_file(), self.flushing.on());
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
