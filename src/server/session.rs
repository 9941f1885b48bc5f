//! The durable session store of one upload directory.
//!
//! On disk, under `<data-dir>/BITS-Sessions/Requests/{SESSION-ID}/`:
//! - `session.json`: what the session is (destination, total, state), replaced atomically;
//! - `requestfile.bin`: the bytes received so far. Bytes are only ever appended in order, so the
//!   file's length is the next expected offset, and one `fdatasync` before the Ack makes both the
//!   bytes and that offset durable: no separate metadata write per fragment;
//! - `hash.state`: a checkpoint of the running SHA-256 (offset and hasher state), written after
//!   each fragment without a sync, so a restarted server only hashes what the checkpoint missed.
//!
//! Memory holds one small `Session` per session; no upload's bytes are ever held whole.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub use super::clock::unix_now;
use super::dir_lock::DataDirLock;
use super::disk::{blocking, io_error};
use super::hooks;
use super::limits::SessionCounter;
use super::metrics::{Metrics, OutcomeLabels};
use super::notify::{self, Delivery, DeliveryOutcome, Notifier};
use crate::bits::paths::SESSION_DIR;
use crate::bits::protocol::{Ack, BitsError, FragmentRange, SessionId, header};
use crate::config::{NotifyType, UploadDirConfig};

pub const REQUESTS_DIR: &str = "Requests";
pub const REPLIES_DIR: &str = "Replies";
pub const DATA_FILE: &str = "requestfile.bin";
pub const RECORD_FILE: &str = "session.json";
pub const HASH_STATE_FILE: &str = "hash.state";
pub const DELIVERY_FILE: &str = "delivery.json";
pub const REPLY_FILE: &str = "responsefile.bin";
/// Per data folder: one record per delivered idempotency key, so that a new session for the same
/// file at the same URL is not delivered again.
pub const DELIVERED_DIR: &str = "Delivered";

/// Fragments up to this size are read whole and written without a hand-off to another thread.
const SMALL_FRAGMENT: u64 = 256 << 10;
/// Chunks (as hyper received them) that may wait for the disk writer.
const WRITE_QUEUE: usize = 16;
/// Buffer for reading a session file back (rebuilding the hash after a restart).
const WRITE_BUFFER: usize = 1 << 20;
/// Received chunks are gathered up to this many bytes and written with one `writev`: few system
/// calls, and no copy into a buffer of our own. Small enough to still be in cache for the hash.
const WRITE_BATCH: usize = 512 << 10;
/// Most chunks in one `writev` (Linux's IOV_MAX).
const WRITE_IOVECS: usize = 1024;
/// With syncing on, writeback of each this many bytes starts as soon as they are written, so the
/// disk works while the rest of the fragment is still arriving and the flush before the Ack only
/// waits for the tail.
const WRITEBACK_STEP: u64 = 1 << 20;

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

/// What `session.json` holds.
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

/// One session in memory.
pub struct Session {
    pub record: SessionRecord,
    dir: PathBuf,
    /// Bytes stored so far: the next expected offset.
    offset: u64,
    /// The running SHA-256 of bytes `0..offset`; None after a restart until it is rebuilt.
    hasher: Option<Sha256>,
    last_activity: SystemTime,
    /// Set when the session left the table while a packet was waiting for it.
    removed: bool,
    /// The recorded outcome of the delivery to the server application, once there is one.
    delivery: Option<DeliveryOutcome>,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn is_complete(&self) -> bool {
        self.record.total == Some(self.offset)
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }
}

type SessionSlot = Arc<tokio::sync::Mutex<Session>>;

/// Where a packet was sent: the upload URL as the client sees it.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The `Host` the client used (in a farm: the member's host id).
    pub host: String,
    /// Path and query of the request.
    pub path_and_query: String,
}

impl Origin {
    pub fn url(&self) -> String {
        format!("http://{}{}", self.host, self.path_and_query)
    }
}

/// What a packet handler needs to know about the request beyond the session id.
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

/// One upload directory: its configuration, its folder and its sessions.
pub struct UploadDir {
    pub config: UploadDirConfig,
    root: PathBuf,
    requests: PathBuf,
    replies: PathBuf,
    delivered: PathBuf,
    sessions: Mutex<HashMap<SessionId, SessionSlot>>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    sync: bool,
    /// Open sessions per user and in all, shared by the server's directories.
    counter: Arc<SessionCounter>,
    /// Held for as long as the directory is served: no other server recovers it meanwhile.
    _lock: DataDirLock,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot prepare the data folder {path}: {source}; check that it exists and is writable"
    )]
    Prepare { path: PathBuf, source: io::Error },
}

impl UploadDir {
    /// Opens (creating if needed) the data folder and recovers every session found on disk; `lock`
    /// is this server's hold on that folder.
    pub fn open(
        config: UploadDirConfig,
        metrics: Arc<Metrics>,
        sync: bool,
        lock: DataDirLock,
    ) -> Result<Self, StoreError> {
        let prepare = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| StoreError::Prepare {
                path: path.to_path_buf(),
                source,
            })
        };
        prepare(&config.data_dir)?;
        let root = fs::canonicalize(&config.data_dir).map_err(|source| StoreError::Prepare {
            path: config.data_dir.clone(),
            source,
        })?;
        let requests = root.join(SESSION_DIR).join(REQUESTS_DIR);
        let replies = root.join(SESSION_DIR).join(REPLIES_DIR);
        let delivered = root.join(SESSION_DIR).join(DELIVERED_DIR);
        for p in [&requests, &replies, &delivered] {
            prepare(p)?;
        }
        let dir = UploadDir {
            config,
            root,
            requests,
            replies,
            delivered,
            sessions: Mutex::new(HashMap::new()),
            metrics,
            notifier: Notifier::new(),
            sync,
            counter: Arc::new(SessionCounter::default()),
            _lock: lock,
        };
        dir.recover();
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionSlot>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recover(&self) {
        let entries = match fs::read_dir(&self.requests) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.requests.display(), error = %e, "cannot list sessions");
                return;
            }
        };
        let mut recovered = 0usize;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(SessionId::parse) else {
                continue;
            };
            let dir = entry.path();
            match load_session(&dir) {
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
                    let _ = fs::remove_dir_all(&dir);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "unreadable session; left alone"),
            }
        }
        if recovered > 0 {
            info!(dir = %self.root.display(), sessions = recovered, "recovered sessions");
        }
    }

    fn expired(&self, s: &Session, now: SystemTime) -> bool {
        now.duration_since(s.last_activity)
            .is_ok_and(|idle| idle > self.config.session_timeout)
    }

    /// Looks a session up, locks it, and enforces the timeout and the URL it belongs to.
    async fn lock_session(
        &self,
        id: &SessionId,
        url_path: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Session>, BitsError> {
        let slot = self
            .table()
            .get(id)
            .cloned()
            .ok_or_else(BitsError::session_not_found)?;
        let session = slot.lock_owned().await;
        if session.removed || !crate::bits::paths::same_url_path(&session.record.url_path, url_path)
        {
            return Err(BitsError::session_not_found());
        }
        if self.expired(&session, SystemTime::now()) {
            self.remove(id, session, "expired").await;
            return Err(BitsError::session_not_found());
        }
        Ok(session)
    }

    /// Removes a session from the table and from disk.
    async fn remove(
        &self,
        id: &SessionId,
        mut session: tokio::sync::OwnedMutexGuard<Session>,
        why: &str,
    ) {
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
        let _ = tokio::task::spawn_blocking(move || {
            let _ = fs::remove_dir_all(reply_dir);
            fs::remove_dir_all(dir)
        })
        .await;
        info!(session = %id, why, "session removed");
    }

    pub async fn create_session(&self, req: CreateRequest) -> Result<SessionId, BitsError> {
        let dest = self.root.join(&req.destination);
        let allow_overwrites = self.config.allow_overwrites;
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
        let sync = self.sync;
        let rec = record.clone();
        let d = dir.clone();
        let created = blocking(move || {
            check_destination(&dest, allow_overwrites)?;
            fs::create_dir(&d).map_err(io_error)?;
            write_record(&d, &rec, sync).map_err(io_error)
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

    /// Stores a Fragment. `body` yields exactly `range.len()` bytes (the caller checked
    /// `Content-Length`); only the part past the next expected offset is written. What is left of
    /// the body (a retransmit, or an error) is the caller's to drain.
    pub async fn fragment<S, E>(
        &self,
        id: &SessionId,
        origin: &Origin,
        url_path: &str,
        range: FragmentRange,
        body: &mut S,
    ) -> Result<Ack, BitsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut session = self.lock_session(id, url_path).await?;
        if session.record.state != SessionState::Receiving {
            return Err(BitsError::session_not_found());
        }
        if let Some(max) = self.config.max_upload_size
            && range.total > max
        {
            self.metrics.limit_refused(super::limits::Limit::UploadSize);
            return Err(BitsError::too_large(format!(
                "the upload is {} bytes; this directory accepts at most {max}",
                range.total
            )));
        }
        match session.record.total {
            Some(total) if total != range.total => {
                return Err(BitsError::invalid(format!(
                    "Content-Range total {} differs from the {total} given by earlier fragments",
                    range.total
                )));
            }
            Some(_) => {}
            None => {
                let mut record = session.record.clone();
                record.total = Some(range.total);
                let (dir, sync) = (session.dir.clone(), self.sync);
                let r = record.clone();
                blocking(move || write_record(&dir, &r, sync).map_err(io_error)).await?;
                session.record = record;
            }
        }
        let next = session.offset;
        if range.start > next {
            return Err(BitsError::out_of_sync(next));
        }
        if range.end > next || (range.is_empty() && !session.data_path().exists()) {
            let skip = next - range.start;
            let written = self
                .append(&mut session, skip, range.len() - skip, body)
                .await?;
            self.metrics.bytes_received.inc_by(written);
            debug!(session = %id, %range, written, next = session.offset, "fragment stored");
        } else {
            debug!(session = %id, %range, next, "fragment already held; nothing written");
        }
        session.last_activity = SystemTime::now();
        let mut ack = Ack::ok().with(header::RECEIVED_CONTENT_RANGE, session.offset.to_string());
        if session.is_complete() {
            if session.delivery.is_none() {
                info!(session = %id, bytes = session.offset, destination = %session.record.destination.display(), "upload complete");
            }
            if let Some(reply_url) = self.ensure_delivered(&mut session, origin).await? {
                ack = ack.with(header::REPLY_URL, reply_url);
            }
        }
        Ok(ack)
    }

    /// Hands a complete upload to the server application unless its delivery is already recorded,
    /// and returns the reply URL for the final fragment's Ack. The outcome is on disk before this
    /// returns, so a retried final fragment or Close after a success never notifies again.
    async fn ensure_delivered(
        &self,
        session: &mut Session,
        origin: &Origin,
    ) -> Result<Option<String>, BitsError> {
        let kind = self.config.notify_type;
        if kind == NotifyType::None {
            return Ok(None);
        }
        if session.delivery.is_none() {
            let outcome = self.deliver(session, origin, kind).await?;
            session.delivery = Some(outcome);
            session.last_activity = SystemTime::now();
            hooks::checkpoint(hooks::AFTER_RECORD).await;
        }
        Ok(Some(self.reply_url(session)))
    }

    async fn deliver(
        &self,
        session: &mut Session,
        origin: &Origin,
        kind: NotifyType,
    ) -> Result<DeliveryOutcome, BitsError> {
        let id = session.record.id.clone();
        let sha = match &session.hasher {
            Some(h) => h.clone().finalize().to_vec(),
            None => {
                // Only after a restart, and only for what the checkpoint did not cover.
                let (path, state, offset) = (
                    session.data_path(),
                    session.dir.join(HASH_STATE_FILE),
                    session.offset,
                );
                let h = blocking(move || {
                    let mut f = File::open(&path).map_err(io_error)?;
                    rebuild_hasher(&mut f, &state, offset).map_err(io_error)
                })
                .await?;
                session.hasher = Some(h.clone());
                h.finalize().to_vec()
            }
        };
        let key = notify::idempotency_key(&origin.path_and_query, &sha);
        let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        let reply = self.replies.join(id.as_str()).join(REPLY_FILE);
        let ledger = self.delivered.join(format!("{key}.json"));
        let ledger_reply = self.delivered.join(format!("{key}.reply"));

        // Delivered before, by an earlier session of this server: answer with that outcome.
        let known = {
            let (ledger, ledger_reply, reply) =
                (ledger.clone(), ledger_reply.clone(), reply.clone());
            blocking(move || Ok(load_ledger(&ledger, &ledger_reply, &reply))).await?
        };
        let outcome = if let Some(mut earlier) = known {
            info!(session = %id, key, "already delivered by this server; not sent again");
            self.metrics.duplicates_suppressed.inc();
            earlier.suppressed_duplicate = true;
            earlier.delivered_unix = unix_now();
            earlier
        } else {
            hooks::checkpoint(hooks::BEFORE_NOTIFY).await;
            let url = notify::notification_url(
                self.config.notify_url.as_deref().unwrap_or_default(),
                &origin.url(),
            )?;
            let result = self
                .notifier
                .deliver(Delivery {
                    kind,
                    url,
                    original_url: &origin.url(),
                    session: &id,
                    key: &key,
                    sha256: &sha,
                    data: &session.data_path(),
                    size: session.offset,
                    reply: &reply,
                    timeout: self.config.notify_timeout,
                    sync: self.sync,
                })
                .await;
            let label = match &result {
                Ok(_) => "delivered",
                Err(e) if e.status == 408 => "unreachable",
                Err(_) => "refused",
            };
            self.metrics
                .notifications
                .get_or_create(&OutcomeLabels {
                    outcome: label.to_string(),
                })
                .inc();
            let (static_reply_url, copy_to_destination) = result?;
            hooks::checkpoint(hooks::AFTER_NOTIFY).await;
            DeliveryOutcome {
                idempotency_key: key.clone(),
                sha256: sha_hex,
                delivered_unix: unix_now(),
                static_reply_url,
                copy_to_destination,
                suppressed_duplicate: false,
            }
        };
        let (dir, sync, o) = (session.dir.clone(), self.sync, outcome.clone());
        blocking(move || {
            write_json(&dir.join(DELIVERY_FILE), &o, sync).map_err(io_error)?;
            // The ledger is a second copy for later sessions; losing it only costs a re-delivery
            // with the same key, which the backend can recognise. The reply goes in first, whole,
            // so an entry is never found without the reply it names.
            let copied = o.static_reply_url.is_some() || copy_whole(&reply, &ledger_reply, sync);
            if !copied {
                warn!("cannot copy the reply into the delivery ledger");
            } else if let Err(e) = write_json(&ledger, &o, sync) {
                warn!(error = %e, "cannot write the delivery ledger");
            }
            Ok(())
        })
        .await?;
        Ok(outcome)
    }

    /// The URL a client downloads the reply from: the backend's static URL, or this server's copy
    /// under the upload directory (an absolute path, so it resolves against the host the client used).
    fn reply_url(&self, session: &Session) -> String {
        if let Some(u) = session
            .delivery
            .as_ref()
            .and_then(|d| d.static_reply_url.clone())
        {
            return u;
        }
        let prefix = self.config.upload_path.as_str().trim_end_matches('/');
        let id = session
            .record
            .id
            .as_str()
            .replace('{', "%7B")
            .replace('}', "%7D");
        format!("{prefix}/{SESSION_DIR}/{REPLIES_DIR}/{id}/{REPLY_FILE}")
    }

    /// The reply file of an open session, for GET and HEAD of its reply URL.
    pub async fn reply_file(&self, id: &SessionId) -> Option<PathBuf> {
        let slot = self.table().get(id).cloned()?;
        let session = slot.lock_owned().await;
        let open = !session.removed
            && session.record.state == SessionState::Receiving
            && !self.expired(&session, SystemTime::now());
        let served_here = session
            .delivery
            .as_ref()
            .is_some_and(|d| d.static_reply_url.is_none());
        (open && served_here).then(|| self.replies.join(id.as_str()).join(REPLY_FILE))
    }

    /// Streams `body` to the session's file: skips `skip` bytes, appends the next `len` bytes at
    /// the current offset, flushes them, and advances the offset. On any failure the file goes back
    /// to its previous length, so it only ever holds whole fragments' worth of acknowledged bytes.
    async fn append<S, E>(
        &self,
        session: &mut Session,
        mut skip: u64,
        len: u64,
        body: &mut S,
    ) -> Result<u64, BitsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = session.data_path();
        let state_path = session.dir.join(HASH_STATE_FILE);
        let offset = session.offset;
        // The running hash only serves deliveries to a server application (their idempotency
        // key); without one, hashing would only cost CPU, and a later switch to notifications
        // rebuilds it from the file.
        let hash = self.config.notify_type != NotifyType::None;
        let hasher = if hash { session.hasher.clone() } else { None };
        let sync = self.sync;
        let mut remaining = len;
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let (result, failure) = if len <= SMALL_FRAGMENT && multi_thread {
            // A small fragment is read whole, then written and flushed on this worker thread
            // (`block_in_place`): no hand-off to a blocking thread and back, which costs as much
            // as the write itself. A body that fails to arrive writes nothing.
            // Every piece holds at least one byte, so this never fills; slots are allocated as
            // they are used.
            let (tx, rx) = mpsc::channel::<Bytes>(SMALL_FRAGMENT as usize);
            loop {
                match next_piece(body, &mut skip, &mut remaining).await {
                    Ok(Some(chunk)) => {
                        if tx.try_send(chunk).is_err() {
                            return Err(BitsError::internal(
                                "the write queue of a small fragment is full",
                            ));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            drop(tx);
            if remaining > 0 {
                return Err(short_body(remaining));
            }
            let result = tokio::task::block_in_place(|| {
                write_fragment(&path, &state_path, offset, hasher, hash, rx, sync)
            });
            (result, None)
        } else {
            let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
            let writer = tokio::task::spawn_blocking(move || {
                write_fragment(&path, &state_path, offset, hasher, hash, rx, sync)
            });
            let mut failure: Option<BitsError> = None;
            loop {
                match next_piece(body, &mut skip, &mut remaining).await {
                    Ok(Some(chunk)) => {
                        if tx.send(chunk).await.is_err() {
                            // The writer stopped early; its own error is reported below.
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            drop(tx);
            if failure.is_none() && remaining > 0 {
                failure = Some(short_body(remaining));
            }
            let result = writer
                .await
                .map_err(|e| BitsError::internal(format!("the disk writer failed: {e}")))?;
            (result, failure)
        };
        match (result, failure) {
            (Ok(done), None) if done.written == len => {
                session.offset += done.written;
                session.hasher = done.hasher;
                Ok(done.written)
            }
            (Ok(_), failure) => {
                let _ = tokio::task::spawn_blocking(rollback_to(session)).await;
                Err(failure.unwrap_or_else(|| {
                    BitsError::invalid("the fragment body did not match its Content-Range")
                }))
            }
            (Err(e), _) => {
                let _ = tokio::task::spawn_blocking(rollback_to(session)).await;
                // A rebuilt hasher may have been lost with the failed write; rebuild next time.
                Err(io_error(e))
            }
        }
    }

    pub async fn close_session(
        &self,
        id: &SessionId,
        origin: &Origin,
        url_path: &str,
    ) -> Result<Ack, BitsError> {
        let mut session = self.lock_session(id, url_path).await?;
        match session.record.state {
            SessionState::Closed => return Ok(Ack::ok()),
            SessionState::Cancelled => {
                return Err(BitsError::not_found(
                    "the session was cancelled; its upload no longer exists",
                ));
            }
            SessionState::Receiving => {}
        }
        let complete = session.is_complete();
        if complete {
            // A Close whose final fragment's delivery failed (or was never acknowledged) tries once more.
            self.ensure_delivered(&mut session, origin).await?;
        }
        let to_destination = self.config.notify_type == NotifyType::None
            || session
                .delivery
                .as_ref()
                .is_some_and(|d| d.copy_to_destination);
        let commit_to =
            (complete && to_destination).then(|| self.root.join(&session.record.destination));
        self.end_session(&mut session, SessionState::Closed, commit_to)
            .await?;
        if complete {
            self.metrics.sessions_completed.inc();
            info!(session = %id, destination = %session.record.destination.display(), bytes = session.offset, committed = to_destination, "session closed; upload complete");
        } else {
            self.metrics.sessions_cancelled.inc();
            info!(session = %id, bytes = session.offset, total = ?session.record.total, "session closed before the upload was complete; data discarded");
        }
        Ok(Ack::ok())
    }

    pub async fn cancel_session(&self, id: &SessionId, url_path: &str) -> Result<Ack, BitsError> {
        let mut session = self.lock_session(id, url_path).await?;
        if session.record.state == SessionState::Cancelled {
            return Ok(Ack::ok());
        }
        if session.record.state == SessionState::Closed {
            // The file is already committed; cancelling cannot take it back (as with IIS).
            return Ok(Ack::ok());
        }
        self.end_session(&mut session, SessionState::Cancelled, None)
            .await?;
        self.metrics.sessions_cancelled.inc();
        info!(session = %id, "session cancelled; data discarded");
        Ok(Ack::ok())
    }

    /// Ends a receiving session as a tombstone in `state` (so a retried Close or Cancel is answered
    /// 200): commits the upload to `commit_to` first when given, then drops its data, hash
    /// checkpoint and reply. The session no longer counts as open.
    async fn end_session(
        &self,
        session: &mut Session,
        state: SessionState,
        commit_to: Option<PathBuf>,
    ) -> Result<(), BitsError> {
        let mut record = session.record.clone();
        record.state = state;
        let (dir, data, sync) = (session.dir.clone(), session.data_path(), self.sync);
        let allow_overwrites = self.config.allow_overwrites;
        let reply_dir = self.replies.join(record.id.as_str());
        let rec = record.clone();
        blocking(move || {
            if let Some(dest) = commit_to {
                commit(&data, &dest, allow_overwrites, sync)?;
            }
            write_record(&dir, &rec, sync).map_err(io_error)?;
            let _ = fs::remove_file(&data);
            let _ = fs::remove_file(dir.join(HASH_STATE_FILE));
            let _ = fs::remove_dir_all(&reply_dir);
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

    /// Removes every session idle for longer than the session timeout. Sessions busy with a packet
    /// are skipped: they are not idle.
    pub async fn sweep_expired(&self) -> usize {
        let now = SystemTime::now();
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
            if !session.removed && self.expired(&session, now) {
                self.remove(&id, session, "expired").await;
                removed += 1;
            }
        }
        let (ledger, keep) = (self.delivered.clone(), self.config.session_timeout);
        let _ = tokio::task::spawn_blocking(move || sweep_ledger(&ledger, keep, now)).await;
        removed
    }

    pub fn session_count(&self) -> usize {
        self.table().len()
    }

    /// Shares `counter` with the server's other directories and counts this one's open sessions
    /// in it (before any packet is served).
    pub fn set_session_counter(&mut self, counter: Arc<SessionCounter>) {
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

    /// Uses `notifier` (with the configured backend credentials and CA bundle) for deliveries.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = notifier;
    }

    /// Refuses, as an unknown session, a session that belongs to another user than `owner`
    /// (`None`: authentication is off). Ownership never changes, so checking before the packet's
    /// own lock is enough.
    pub async fn check_owner(&self, id: &SessionId, owner: Option<&str>) -> Result<(), BitsError> {
        let Some(slot) = self.table().get(id).cloned() else {
            return Ok(()); // unknown: the packet handler answers that itself
        };
        let session = slot.lock().await;
        if session.record.owner.as_deref() != owner {
            return Err(BitsError::session_not_found());
        }
        Ok(())
    }
}

/// Refuses a destination that is a folder, or an existing file when overwrites are off.
fn check_destination(dest: &Path, allow_overwrites: bool) -> Result<(), BitsError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => Err(BitsError::invalid(
            "the upload URL names a folder on the server; upload to a file name",
        )),
        Ok(_) if !allow_overwrites => Err(BitsError::access_denied(
            "a file with this name already exists and this directory does not allow overwrites",
        )),
        _ => Ok(()),
    }
}

/// Moves the finished upload to its destination in one atomic step. Without overwrites a hard link
/// is made (it fails if the name exists, even when another upload got there first) and the session
/// file is dropped afterwards; a link left by a crash between the two is recognised as our own.
fn commit(data: &Path, dest: &Path, allow_overwrites: bool, sync: bool) -> Result<(), BitsError> {
    if !data.exists() {
        // A crash after the commit but before the tombstone was written: the file is in place.
        if dest.exists() {
            return Ok(());
        }
        return Err(BitsError::internal(
            "the session's data file is missing; the upload must be sent again",
        ));
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(20) {
                BitsError::invalid(
                    "a folder in the upload URL is a file on the server; choose another path",
                )
            } else {
                io_error(e)
            }
        })?;
    }
    if allow_overwrites {
        if dest.is_dir() {
            return Err(BitsError::invalid(
                "the upload URL names a folder on the server; upload to a file name",
            ));
        }
        fs::rename(data, dest).map_err(io_error)?;
    } else {
        match fs::hard_link(data, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !same_file(data, dest) {
                    check_destination(dest, false)?;
                }
            }
            Err(e) => return Err(io_error(e)),
        }
    }
    if sync && let Some(parent) = dest.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_error)?;
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn write_record(dir: &Path, record: &SessionRecord, sync: bool) -> io::Result<()> {
    write_json(&dir.join(RECORD_FILE), record, sync)
}

/// Replaces a JSON file atomically (write, sync, rename, sync the folder).
fn write_json<T: Serialize>(path: &Path, value: &T, sync: bool) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        if sync {
            f.sync_data()?;
        }
    }
    fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A delivery this server recorded for the same key, with its reply copied into `reply`.
fn load_ledger(ledger: &Path, ledger_reply: &Path, reply: &Path) -> Option<DeliveryOutcome> {
    let outcome: DeliveryOutcome = serde_json::from_slice(&fs::read(ledger).ok()?).ok()?;
    if outcome.static_reply_url.is_none() {
        // An entry without its reply (torn by a crash) is not trusted: the upload is delivered
        // again, with the same key, rather than answered with an empty reply.
        if !ledger_reply.is_file() {
            return None;
        }
        fs::create_dir_all(reply.parent()?).ok()?;
        fs::copy(ledger_reply, reply).ok()?;
    }
    Some(outcome)
}

/// Copies `from` to `to` through a temporary file and a rename, so `to` is whole or absent.
fn copy_whole(from: &Path, to: &Path, sync: bool) -> bool {
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let copied = fs::copy(from, &tmp).and_then(|_| {
        if sync {
            File::open(&tmp)?.sync_data()?;
        }
        fs::rename(&tmp, to)
    });
    if copied.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    copied.is_ok()
}

/// Forgets deliveries older than the session timeout: by then no client can still be retrying.
fn sweep_ledger(dir: &Path, keep: std::time::Duration, now: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > keep);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn load_session(dir: &Path) -> io::Result<Option<Session>> {
    let record_path = dir.join(RECORD_FILE);
    let json = match fs::read(&record_path) {
        Ok(j) => j,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let record: SessionRecord = serde_json::from_slice(&json).map_err(io::Error::other)?;
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
    let data = dir.join(DATA_FILE);
    let (offset, data_mtime) = match fs::metadata(&data) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    };
    let record_mtime = fs::metadata(&record_path)?.modified().ok();
    let last_activity = data_mtime
        .into_iter()
        .chain(record_mtime)
        .max()
        .unwrap_or_else(SystemTime::now);
    let delivery = fs::read(dir.join(DELIVERY_FILE))
        .ok()
        .and_then(|j| serde_json::from_slice(&j).ok());
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

struct Written {
    written: u64,
    /// The running hash, when hashing.
    hasher: Option<Sha256>,
}

/// Cuts a session's data file back to its last acknowledged length (a failed write).
fn rollback_to(s: &Session) -> impl FnOnce() + Send + 'static {
    let path = s.data_path();
    let offset = s.offset;
    move || {
        if let Ok(f) = OpenOptions::new().write(true).open(&path) {
            let _ = f.set_len(offset);
        }
    }
}

fn short_body(remaining: u64) -> BitsError {
    BitsError::invalid(format!(
        "the fragment body ended {remaining} bytes short of its Content-Range"
    ))
}

/// The next piece of a fragment's body to write: the bytes already held (`skip`) are dropped,
/// and a body longer than its Content-Range (`remaining`) is an error. `None` at the end.
async fn next_piece<S, E>(
    body: &mut S,
    skip: &mut u64,
    remaining: &mut u64,
) -> Result<Option<Bytes>, BitsError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|e| BitsError::invalid(format!("the fragment body could not be read: {e}")))?;
        if *skip > 0 {
            let n = (*skip).min(chunk.len() as u64);
            chunk = chunk.slice(n as usize..);
            *skip -= n;
        }
        if chunk.is_empty() {
            continue;
        }
        if chunk.len() as u64 > *remaining {
            return Err(BitsError::invalid(
                "the fragment body is longer than its Content-Range",
            ));
        }
        *remaining -= chunk.len() as u64;
        return Ok(Some(chunk));
    }
    Ok(None)
}

/// The blocking half of a Fragment: appends what arrives on `rx` at `offset` (hashing as it goes
/// when `hash`), then, when `sync`, flushes it: the bytes and the file length (the next offset)
/// are durable when this returns.
fn write_fragment(
    path: &Path,
    state_path: &Path,
    offset: u64,
    hasher: Option<Sha256>,
    hash: bool,
    mut rx: mpsc::Receiver<Bytes>,
    sync: bool,
) -> io::Result<Written> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let mut hasher = match (hash, hasher) {
        (false, _) => None,
        (true, Some(h)) => Some(h),
        (true, None) => Some(rebuild_hasher(&mut file, state_path, offset)?),
    };
    if file.metadata()?.len() != offset {
        file.set_len(offset)?;
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut written = 0u64;
    let mut writeback_from = offset;
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    let mut ended = false;
    while !ended {
        // Wait for one chunk, then take what else is already queued, up to a batch.
        let mut batch_len = 0usize;
        while batch_len < WRITE_BATCH && batch.len() < WRITE_IOVECS {
            let next = if batch.is_empty() {
                rx.blocking_recv()
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                        Some(c) => Some(c),
                        None => {
                            ended = true;
                            break;
                        }
                    },
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(chunk) = next else {
                ended = true;
                break;
            };
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            batch_len += chunk.len();
            batch.push(chunk);
        }
        if batch.is_empty() {
            break;
        }
        write_all_chunks(&mut file, &batch)?;
        batch.clear();
        written += batch_len as u64;
        let at = offset + written;
        if sync && at - writeback_from >= WRITEBACK_STEP {
            start_writeback(&file, writeback_from, at - writeback_from);
            writeback_from = at;
        }
    }
    if sync {
        file.sync_data()?;
    }
    if let Some(h) = &hasher {
        save_hash_state(state_path, offset + written, h);
    }
    Ok(Written { written, hasher })
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
fn write_all_chunks(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    let mut iov: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest = &mut iov[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `from` to the disk now, without waiting for
/// them. Only a head start for the `fdatasync` that follows, which is the guarantee.
fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open.
    unsafe {
        nix::libc::sync_file_range(
            file.as_raw_fd(),
            from as nix::libc::off64_t,
            len as nix::libc::off64_t,
            nix::libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

const HASH_STATE_MAGIC: &[u8; 4] = b"BFH1";

/// Best effort: a missing or stale checkpoint only means more hashing after a restart.
fn save_hash_state(path: &Path, offset: u64, hasher: &Sha256) {
    let state = hasher.serialize();
    let mut buf = Vec::with_capacity(4 + 8 + state.len() + 8);
    buf.extend_from_slice(HASH_STATE_MAGIC);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(state.as_slice());
    let check = Sha256::digest(&buf);
    buf.extend_from_slice(&check[..8]);
    // Overwritten in place, not truncated: on ext4 a truncate-and-rewrite starts writeback of the
    // file on close (auto_da_alloc), a disk write per fragment. The size is fixed, and a torn
    // write fails the check, so in place is safe.
    let saved = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&buf, 0)?;
            if f.metadata()?.len() != buf.len() as u64 {
                f.set_len(buf.len() as u64)?;
            }
            Ok(())
        });
    if let Err(e) = saved {
        debug!(error = %e, "could not checkpoint the upload hash");
    }
}

fn load_hash_state(path: &Path) -> Option<(u64, Sha256)> {
    let buf = fs::read(path).ok()?;
    let (body, check) = buf.split_at_checked(buf.len().checked_sub(8)?)?;
    if Sha256::digest(body)[..8] != *check || body.get(..4)? != HASH_STATE_MAGIC {
        return None;
    }
    let offset = u64::from_le_bytes(body.get(4..12)?.try_into().ok()?);
    let state = SerializedState::<Sha256>::try_from(body.get(12..)?).ok()?;
    Some((offset, Sha256::deserialize(&state).ok()?))
}

/// After a restart: resume the hash from the checkpoint, reading only the bytes it did not cover.
fn rebuild_hasher(file: &mut File, state_path: &Path, offset: u64) -> io::Result<Sha256> {
    let (mut at, mut hasher) = match load_hash_state(state_path) {
        Some((at, h)) if at <= offset => (at, h),
        _ => (0, Sha256::new()),
    };
    file.seek(SeekFrom::Start(at))?;
    let mut buf = vec![0u8; WRITE_BUFFER];
    while at < offset {
        let want = ((offset - at) as usize).min(buf.len());
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the session file is shorter than its recorded offset",
            ));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher)
}
