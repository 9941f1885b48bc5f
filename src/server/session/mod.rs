//! The sessions of one upload directory, in rooms:
//! - `machine`: the protocol's rules applied to a session, pure: what a packet does to it;
//! - `store`: the session table and its locks, creation, the end of a session, recovery, expiry;
//! - `record`: what a session keeps on disk (record, size, tombstone) and how one is read back;
//! - `flush`: what the one flush before an Ack must cover on the data folder's file system;
//! - `writer`: the blocking disk writer of a Fragment's body;
//! - `place`: where an upload lands: the destination's checks, the commit, and the answers a path
//!   on the server gets when it cannot be used (never through a symbolic link);
//! - `delivery`: once-only delivery of a complete upload to the server application, and its ledger.
//!
//! `UploadDir` is what the HTTP side calls: each packet locks its session in the store, asks the
//! machine what to do, and has the store, the writer or the delivery do it.

mod delivery;
mod flush;
mod machine;
mod place;
mod record;
mod store;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use tracing::{debug, info};

use super::dir_lock::DataDirLock;
use super::limits::SessionCounter;
use super::metrics::Metrics;
use super::notify::Notifier;
use crate::bits::protocol::{Ack, BitsError, FragmentRange, SessionId};
use crate::config::{NotifyType, UploadDirConfig};
use delivery::Deliverer;
use machine::{Ending, Write};
use store::Store;

pub use super::clock::unix_now;
pub use delivery::Origin;
pub use record::{
    DATA_FILE, DELIVERED_DIR, DELIVERY_FILE, HASH_STATE_FILE, RECORD_FILE, REPLIES_DIR, REPLY_FILE,
    REQUESTS_DIR, SessionRecord, SessionState,
};
pub use store::{CreateRequest, Session, StoreError};
pub use writer::BodyBudget;

/// One upload directory: its configuration, its folder and its sessions.
pub struct UploadDir {
    pub config: UploadDirConfig,
    store: Store,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    budget: writer::BodyBudget,
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
        let store = Store::open(&config.data_dir, metrics.clone(), sync, lock)?;
        Ok(UploadDir {
            config,
            store,
            metrics,
            notifier: Notifier::new(),
            budget: writer::BodyBudget::default(),
        })
    }

    pub fn root(&self) -> &Path {
        self.store.root()
    }

    pub async fn create_session(&self, req: CreateRequest) -> Result<SessionId, BitsError> {
        self.store.create(req, self.config.allow_overwrites).await
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
        let mut session = self
            .store
            .lock(id, url_path, self.config.session_timeout)
            .await?;
        // Only the empty upload asks the disk; no other fragment pays for the look.
        let data_file_exists =
            range.is_empty() && self.store.beneath.metadata(&session.data_file()).is_ok();
        let plan = machine::fragment(
            &session.record,
            session.offset,
            range,
            self.config.max_upload_size,
            data_file_exists,
        )
        .map_err(|refused| {
            if let Some(limit) = refused.limit {
                self.metrics.limit_refused(limit);
            }
            refused.error
        })?;
        match plan.write? {
            Write::Append { skip, len } => {
                // The running hash only serves deliveries to a server application (their
                // idempotency key); without one, hashing would only cost CPU, and a later switch
                // to notifications rebuilds it from the file.
                let hash = self.config.notify_type != NotifyType::None;
                let written = writer::append(
                    &self.store.beneath,
                    &mut session,
                    writer::Append {
                        skip,
                        len,
                        new_total: plan.record_total,
                    },
                    body,
                    hash,
                    self.store.flushing,
                    &self.budget,
                )
                .await?;
                self.metrics.bytes_received.inc_by(written);
                debug!(session = %id, %range, written, next = session.offset, "fragment stored");
            }
            Write::Held => {
                if let Some(total) = plan.record_total {
                    self.store.record_total(&mut session, total).await?;
                }
                debug!(session = %id, %range, next = session.offset, "fragment already held; nothing written")
            }
        }
        session.last_activity = SystemTime::now();
        let mut reply_url = None;
        if session.is_complete() {
            if session.delivery.is_none() {
                info!(session = %id, bytes = session.offset, destination = %session.record.destination.display(), "upload complete");
            }
            reply_url = self
                .deliverer()
                .ensure_delivered(&mut session, origin)
                .await?;
        }
        Ok(machine::fragment_ack(session.offset, reply_url))
    }

    /// The reply file of an open session, opened for GET and HEAD of its reply URL; None when
    /// there is none, or a symbolic link is on its way.
    pub async fn reply_file(&self, id: &SessionId) -> Option<File> {
        self.store.reply_file(id, self.config.session_timeout).await
    }

    /// The file at `rel` below the data folder, opened for a download; None when there is no
    /// regular file there, or a symbolic link is on its way (never followed).
    pub async fn download_file(&self, rel: PathBuf) -> Option<File> {
        self.store.open_download(rel).await
    }

    pub async fn close_session(
        &self,
        id: &SessionId,
        origin: &Origin,
        url_path: &str,
    ) -> Result<Ack, BitsError> {
        let mut session = self
            .store
            .lock(id, url_path, self.config.session_timeout)
            .await?;
        let ending = machine::close(session.record.state, session.is_complete())?;
        if ending == Ending::Repeat {
            return Ok(Ack::ok());
        }
        let complete = ending == Ending::Commit;
        if complete {
            // A Close whose final fragment's delivery failed (or was never acknowledged) tries once more.
            self.deliverer()
                .ensure_delivered(&mut session, origin)
                .await?;
        }
        let to_destination =
            machine::commits_to_destination(self.config.notify_type, session.delivery.as_ref());
        let commit_to = (complete && to_destination).then(|| session.record.destination.clone());
        self.store
            .end(
                &mut session,
                SessionState::Closed,
                commit_to,
                self.config.allow_overwrites,
            )
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
        let mut session = self
            .store
            .lock(id, url_path, self.config.session_timeout)
            .await?;
        if machine::cancel(session.record.state) == Ending::Repeat {
            return Ok(Ack::ok());
        }
        self.store
            .end(
                &mut session,
                SessionState::Cancelled,
                None,
                self.config.allow_overwrites,
            )
            .await?;
        self.metrics.sessions_cancelled.inc();
        info!(session = %id, "session cancelled; data discarded");
        Ok(Ack::ok())
    }

    /// Removes every session idle for longer than the session timeout, and forgets deliveries as
    /// old. Sessions busy with a packet are skipped: they are not idle.
    pub async fn sweep_expired(&self) -> usize {
        let now = SystemTime::now();
        let removed = self
            .store
            .sweep_expired(now, self.config.session_timeout)
            .await;
        self.deliverer().sweep_ledger(now).await;
        removed
    }

    pub fn session_count(&self) -> usize {
        self.store.len()
    }

    /// Shares `counter` with the server's other directories and counts this one's open sessions
    /// in it (before any packet is served).
    pub fn set_session_counter(&mut self, counter: Arc<SessionCounter>) {
        self.store.set_counter(counter);
    }

    /// Uses `notifier` (with the configured backend credentials and CA bundle) for deliveries.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = notifier;
    }

    /// Shares the server's budget for fragment bodies held in memory with its other directories.
    pub fn set_body_budget(&mut self, budget: writer::BodyBudget) {
        self.budget = budget;
    }

    fn deliverer(&self) -> Deliverer<'_> {
        Deliverer {
            config: &self.config,
            store: &self.store,
            notifier: &self.notifier,
            metrics: &self.metrics,
        }
    }

    /// Refuses, as an unknown session, a session that belongs to another user than `owner`
    /// (`None`: authentication is off). Ownership never changes, so checking before the packet's
    /// own lock is enough.
    pub async fn check_owner(&self, id: &SessionId, owner: Option<&str>) -> Result<(), BitsError> {
        self.store.check_owner(id, owner).await
    }
}
