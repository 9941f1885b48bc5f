//! Once-only delivery of a complete upload to the server application, and the ledger that keeps a
//! later session for the same file from delivering it again.
//!
//! The session's lock is held throughout, so a retried final fragment or Close waits for the
//! delivery in progress and then finds its outcome instead of sending a second notification.
//! The HTTP side is `notify`'s.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustix::fs::OFlags;

use sha2::Digest;
use tracing::{info, warn};

use super::place::storage_error;
use super::record::{DELIVERY_FILE, write_json};
use super::store::{Session, Store};
use super::writer::rebuild_hasher;
use crate::bits::protocol::BitsError;
use crate::config::{NotifyType, UploadDirConfig};
use crate::server::beneath::Beneath;
use crate::server::clock::unix_now;
use crate::server::disk::blocking;
use crate::server::hooks;
use crate::server::metrics::{Metrics, OutcomeLabels};
use crate::server::notify::{self, Delivery, DeliveryOutcome, Notifier};

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

/// What delivering the uploads of one directory takes, borrowed from it for one packet.
pub struct Deliverer<'a> {
    pub config: &'a UploadDirConfig,
    pub store: &'a Store,
    pub notifier: &'a Notifier,
    pub metrics: &'a Metrics,
}

impl Deliverer<'_> {
    /// Hands a complete upload to the server application unless its delivery is already recorded,
    /// and returns the reply URL for the final fragment's Ack. The outcome is on disk before this
    /// returns, so a retried final fragment or Close after a success never notifies again.
    pub async fn ensure_delivered(
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
        Ok(Some(super::machine::reply_url(
            &self.config.upload_path,
            &session.record.id,
            session.delivery.as_ref(),
        )))
    }

    async fn deliver(
        &self,
        session: &mut Session,
        origin: &Origin,
        kind: NotifyType,
    ) -> Result<DeliveryOutcome, BitsError> {
        let id = session.record.id.clone();
        let b = self.store.beneath.clone();
        let sha = upload_sha256(&b, session).await?;
        let key = notify::idempotency_key(&origin.path_and_query, &sha);
        let reply = self.store.reply_path(&id);
        let ledger = self.store.delivered.join(format!("{key}.json"));
        let ledger_reply = self.store.delivered.join(format!("{key}.reply"));

        // Delivered before, by an earlier session of this server: answer with that outcome.
        let known = {
            let (ledger, ledger_reply, reply) =
                (ledger.clone(), ledger_reply.clone(), reply.clone());
            let b = b.clone();
            blocking(move || Ok(load_ledger(&b, &ledger, &ledger_reply, &reply))).await?
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
                    folder: &b,
                    data: &session.data_file(),
                    size: session.offset,
                    reply: &reply,
                    timeout: self.config.notify_timeout,
                    sync: self.store.flushing.on(),
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
                sha256: sha.iter().map(|b| format!("{b:02x}")).collect(),
                delivered_unix: unix_now(),
                static_reply_url,
                copy_to_destination,
                suppressed_duplicate: false,
            }
        };
        let (dir, sync, o) = (
            session.dir.clone(),
            self.store.flushing.on(),
            outcome.clone(),
        );
        blocking(move || {
            write_json(&b, &dir.join(DELIVERY_FILE), &o, sync).map_err(storage_error)?;
            // The ledger is a second copy for later sessions; losing it only costs a re-delivery
            // with the same key, which the backend can recognise. The reply goes in first, whole,
            // so an entry is never found without the reply it names.
            let copied = o.static_reply_url.is_some()
                || b.copy_atomic(&reply, &ledger_reply, sync)
                    .inspect_err(
                        |e| warn!(error = %e, "cannot copy the reply into the delivery ledger"),
                    )
                    .is_ok();
            if copied && let Err(e) = write_json(&b, &ledger, &o, sync) {
                warn!(error = %e, "cannot write the delivery ledger");
            }
            Ok(())
        })
        .await?;
        Ok(outcome)
    }

    /// Forgets the deliveries older than the session timeout at `now`.
    pub async fn sweep_ledger(&self, now: SystemTime) {
        let (ledger, keep) = (self.store.delivered.clone(), self.config.session_timeout);
        let b = self.store.beneath.clone();
        let _ = tokio::task::spawn_blocking(move || sweep_ledger(&b, &ledger, keep, now)).await;
    }
}

/// The SHA-256 of the whole upload: the running hash, or (only after a restart) the checkpoint
/// resumed over what it did not cover.
async fn upload_sha256(b: &Beneath, session: &mut Session) -> Result<Vec<u8>, BitsError> {
    if let Some(h) = &session.hasher {
        return Ok(h.clone().finalize().to_vec());
    }
    let (path, state, offset) = (
        session.data_file(),
        session.hash_state_file(),
        session.offset,
    );
    let b = b.clone();
    let h = blocking(move || {
        let mut f = b.open_file(&path, OFlags::RDONLY).map_err(storage_error)?;
        rebuild_hasher(&mut f, &b, &state, offset).map_err(storage_error)
    })
    .await?;
    session.hasher = Some(h.clone());
    Ok(h.finalize().to_vec())
}

/// A delivery this server recorded for the same key, with its reply copied into `reply`.
fn load_ledger(
    b: &Beneath,
    ledger: &Path,
    ledger_reply: &Path,
    reply: &Path,
) -> Option<DeliveryOutcome> {
    let outcome: DeliveryOutcome = serde_json::from_slice(&b.read(ledger).ok()?).ok()?;
    if outcome.static_reply_url.is_none() {
        // An entry without its reply (torn by a crash) is not trusted: the upload is delivered
        // again, with the same key, rather than answered with an empty reply.
        if !b.metadata(ledger_reply).is_ok_and(|m| m.is_file()) {
            return None;
        }
        b.create_dir_all(reply.parent()?).ok()?;
        b.copy_atomic(ledger_reply, reply, false).ok()?;
    }
    Some(outcome)
}

/// Forgets deliveries older than the session timeout: by then no client can still be retrying.
fn sweep_ledger(b: &Beneath, dir: &Path, keep: Duration, now: SystemTime) {
    let Ok(names) = b.read_dir(dir) else {
        return;
    };
    for name in names {
        let entry = dir.join(name);
        let old = b
            .metadata(&entry)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > keep);
        if old {
            let _ = b.remove_file(&entry);
        }
    }
}
