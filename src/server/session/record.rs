//! A session's files on disk: its record, the size and tombstone that come later, and how one
//! session is read back after a restart.
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

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use super::flush::Flushing;
use crate::bits::paths::SESSION_DIR;
use crate::bits::protocol::SessionId;
use crate::server::beneath::Beneath;
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

/// Writes a new session's record in its new folder `dir`, in place: the name is new, so there is
/// nothing to replace, and a record cut short by a crash belongs to a session that was never
/// acknowledged (recovery drops it). The flush (`fsync`, which covers the file's creation) also
/// makes the folder durable where the file system orders its names (see `flush`).
pub(super) fn write_new_record(
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

/// Flushes the data `file` (at `data`, below `b`) with `fsync`, which also covers its size
/// attribute and, for a `new_file`, its creation; then its folder where a name in it is not
/// covered: the size kept `beside` the file, or a new file's name on a file system that needs
/// folders flushed. Nothing with flushing off.
pub(super) fn flush_named(
    b: &Beneath,
    file: &File,
    data: &Path,
    beside: bool,
    new_file: bool,
    flushing: Flushing,
) -> io::Result<()> {
    if !flushing.on() {
        return Ok(());
    }
    file.sync_all()?;
    let folder = data.parent().unwrap_or(Path::new(""));
    if beside {
        b.sync_dir(folder)
    } else if new_file {
        flushing.names(b, &[folder])
    } else {
        Ok(())
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

/// One session as read back from its folder after a restart.
pub(super) struct OnDisk {
    pub record: SessionRecord,
    /// The data file's length: the next expected offset.
    pub offset: u64,
    pub last_activity: SystemTime,
    pub delivery: Option<DeliveryOutcome>,
}

/// Reads the session in folder `dir` back; None when there is nothing to keep (no record, or one
/// cut short before it was acknowledged).
pub(super) fn load_session(b: &Beneath, dir: &Path) -> io::Result<Option<OnDisk>> {
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
    Ok(Some(OnDisk {
        record,
        offset,
        last_activity,
        delivery,
    }))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::server::beneath::met_link;

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
            (
                &session.record,
                session.offset,
                session.record.total == Some(session.offset)
            ),
            (&rec, 2, false)
        );
        assert!(session.delivery.is_none());
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
