//! The write path of a Fragment: its body appended to the session's file, hashed on the way, and
//! flushed before the Ack.
//!
//! `hash.state` next to the file is a checkpoint of the running SHA-256 (offset and hasher state),
//! written after each fragment without a sync, so a restarted server only hashes what the
//! checkpoint missed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use rustix::fs::OFlags;
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::debug;

use super::flush::Flushing;
use super::place::storage_error;
use super::record::{flush_named, record_total_on};
use super::store::Session;
use crate::bits::protocol::BitsError;
use crate::server::beneath::Beneath;

/// Fragments up to this size are read whole and written without a hand-off to another thread.
const SMALL_FRAGMENT: u64 = 256 << 10;
/// Hand-offs (each up to `HAND_OFF` bytes) that may wait for the disk writer of one fragment.
const WRITE_QUEUE: usize = 8;
/// A large fragment's body goes to its writer in hand-offs of this many bytes, not chunk by
/// chunk (hyper's chunks are at most its 64 KiB read buffer): each hand-off may wake the writer
/// thread, and context switches were 5-9 % of the server's profile under one upload.
const HAND_OFF: usize = 256 << 10;
/// Bytes of fragment bodies received and not yet written, all fragments of a server together
/// (`--max-body-memory`). Past it, bodies wait unread (the client waits on TCP), so memory stays
/// bounded however many uploads arrive at once.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes (at most what a semaphore counts, about 2 GiB).
    pub fn new(total: u64) -> Self {
        let total = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget `bytes` take: never more than there is.
    fn share_of(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX)
    }

    /// Waits until `bytes` more bytes of bodies may be held in memory.
    async fn take(&self, bytes: usize) -> Result<OwnedSemaphorePermit, BitsError> {
        self.bytes
            .clone()
            .acquire_many_owned(self.share_of(bytes))
            .await
            .map_err(|_| BitsError::internal("the in-flight budget was closed"))
    }

    /// `bytes` more bytes of bodies, if they may be held now.
    fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.share_of(bytes))
            .ok()
    }
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(crate::config::DEFAULT_MAX_BODY_MEMORY)
    }
}

/// A piece of a fragment's body on its way to the disk, with its share of the in-flight budget,
/// given back once it is written.
pub(super) struct Piece {
    bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Pieces handed to the writer at once.
type Pieces = Vec<Piece>;

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

/// What a Fragment appends: `len` bytes after skipping `skip` already held, and the upload's
/// size when the fragment gives it for the first time.
pub struct Append {
    pub skip: u64,
    pub len: u64,
    pub new_total: Option<u64>,
}

/// Streams `body` to the session's file (below the data folder `b`, reached without following a
/// link): skips `skip` bytes, appends the next `len` bytes at the current offset, flushes them
/// (see `flushing`), and advances the offset; with `hash`, the running hash follows. `new_total`:
/// the upload's size, given for the first time, recorded with the bytes. On any failure
/// the file goes back to its previous length, so it only ever holds whole fragments' worth of
/// acknowledged bytes.
pub async fn append<S, E>(
    b: &Beneath,
    session: &mut Session,
    Append {
        skip,
        len,
        new_total,
    }: Append,
    body: &mut S,
    hash: bool,
    flushing: Flushing,
    budget: &BodyBudget,
) -> Result<u64, BitsError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let target = Target {
        b: b.clone(),
        path: session.data_file(),
        state_path: session.hash_state_file(),
        offset: session.offset,
        new_total,
        flushing,
    };
    let hasher = if hash { session.hasher.clone() } else { None };
    let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let (result, failure) = if len <= SMALL_FRAGMENT && multi_thread {
        // A small fragment is written and flushed on this worker thread (`block_in_place`): no
        // hand-off to a blocking thread and back, which costs as much as the write itself.
        // The whole fragment's share up front: pieces held while the rest arrives never wait
        // on one another for the budget.
        let _budget = budget.take(len as usize).await?;
        let rx = read_small(body, skip, len).await?;
        let result = tokio::task::block_in_place(|| write_fragment(&target, hasher, hash, rx));
        (result, None)
    } else {
        let (tx, rx) = mpsc::channel::<Pieces>(WRITE_QUEUE);
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::task::spawn_blocking(move || {
            let _ = started.send(());
            write_fragment(&target, hasher, hash, rx)
        });
        // Nothing is read (nor takes budget) before the writer runs: a writer still queued for
        // a thread must not hold the budget the running ones need to finish.
        let _ = running.await;
        let failure = stream_to(tx, body, skip, len, budget).await;
        let result = writer
            .await
            .map_err(|e| BitsError::internal(format!("the disk writer failed: {e}")))?;
        (result, failure)
    };
    match (result, failure) {
        (Ok(done), None) if done.written == len => {
            session.offset += done.written;
            session.hasher = done.hasher;
            if new_total.is_some() {
                session.record.total = new_total;
            }
            Ok(done.written)
        }
        (Ok(_), failure) => {
            let _ = tokio::task::spawn_blocking(rollback_to(b, session)).await;
            Err(failure.unwrap_or_else(|| {
                BitsError::invalid("the fragment body did not match its Content-Range")
            }))
        }
        (Err(e), _) => {
            let _ = tokio::task::spawn_blocking(rollback_to(b, session)).await;
            // A rebuilt hasher may have been lost with the failed write; rebuild next time.
            Err(storage_error(e))
        }
    }
}

/// Reads a small fragment's body whole, before anything is written, so a body that fails to
/// arrive writes nothing. The pieces wait, as one hand-off, in the queue the writer then drains.
async fn read_small<S, E>(
    body: &mut S,
    mut skip: u64,
    len: u64,
) -> Result<mpsc::Receiver<Pieces>, BitsError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut remaining = len;
    let mut pieces = Pieces::new();
    while let Some(bytes) = next_piece(body, &mut skip, &mut remaining).await? {
        pieces.push(Piece {
            bytes,
            _budget: None,
        });
    }
    if remaining > 0 {
        return Err(short_body(remaining));
    }
    let (tx, rx) = mpsc::channel::<Pieces>(1);
    if tx.try_send(pieces).is_err() {
        return Err(BitsError::internal(
            "the write queue of a small fragment is full",
        ));
    }
    Ok(rx)
}

/// Passes a large fragment's body to the writer as it arrives, in hand-offs of `HAND_OFF`
/// bytes, and says what was wrong with the body, if anything. Dropping `tx` at the end tells the
/// writer the body is over.
async fn stream_to<S, E>(
    tx: mpsc::Sender<Pieces>,
    body: &mut S,
    mut skip: u64,
    len: u64,
    budget: &BodyBudget,
) -> Option<BitsError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut remaining = len;
    let mut gathered = Pieces::new();
    let mut gathered_len = 0usize;
    let failure = loop {
        let bytes = match next_piece(body, &mut skip, &mut remaining).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        // The next piece is not read until this one has its share of the budget. Pieces held
        // here are handed over before waiting for it: bodies that each hold a part of the
        // budget and wait for more would otherwise wait on one another forever.
        let share = match budget.try_take(bytes.len()) {
            Some(share) => share,
            None => {
                if !hand_over(&tx, &mut gathered, &mut gathered_len).await {
                    break None;
                }
                match budget.take(bytes.len()).await {
                    Ok(share) => share,
                    Err(e) => break Some(e),
                }
            }
        };
        gathered_len += bytes.len();
        gathered.push(Piece {
            bytes,
            _budget: Some(share),
        });
        if (gathered_len >= HAND_OFF || gathered.len() >= WRITE_IOVECS)
            && !hand_over(&tx, &mut gathered, &mut gathered_len).await
        {
            break None;
        }
    };
    if failure.is_some() {
        return failure;
    }
    hand_over(&tx, &mut gathered, &mut gathered_len).await;
    (remaining > 0).then(|| short_body(remaining))
}

/// Sends the pieces gathered so far (if any) to the writer and starts a new gathering. False
/// when the writer has stopped early: its own error is the one reported.
async fn hand_over(
    tx: &mpsc::Sender<Pieces>,
    gathered: &mut Pieces,
    gathered_len: &mut usize,
) -> bool {
    *gathered_len = 0;
    gathered.is_empty() || tx.send(std::mem::take(gathered)).await.is_ok()
}

struct Written {
    written: u64,
    /// The running hash, when hashing.
    hasher: Option<Sha256>,
}

/// Cuts a session's data file back to its last acknowledged length (a failed write).
fn rollback_to(b: &Beneath, s: &Session) -> impl FnOnce() + Send + 'static {
    let (b, path, offset) = (b.clone(), s.data_file(), s.offset);
    move || {
        if let Ok(f) = b.open_file(&path, OFlags::WRONLY) {
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

/// Where a fragment goes: the session's data file `path` and hash checkpoint `state_path` (below
/// the data folder `b`), the offset it starts at, the size it gives for the first time, and how
/// it is flushed.
struct Target {
    b: Beneath,
    path: PathBuf,
    state_path: PathBuf,
    offset: u64,
    new_total: Option<u64>,
    flushing: Flushing,
}

/// The blocking half of a Fragment: appends what arrives on `rx` at the target's offset (hashing
/// as it goes when `hash`), records the size when the fragment gives it, then flushes it all
/// (unless flushing is off): the bytes, the file length (the next offset), the size and, for a
/// new file, its name are durable when this returns.
fn write_fragment(
    t: &Target,
    hasher: Option<Sha256>,
    hash: bool,
    mut rx: mpsc::Receiver<Pieces>,
) -> io::Result<Written> {
    let (b, path, state_path) = (&t.b, &t.path, &t.state_path);
    let (offset, new_total, flushing) = (t.offset, t.new_total, t.flushing);
    let sync = flushing.on();
    let mut file = b.open_file(path, OFlags::RDWR | OFlags::CREATE)?;
    let mut hasher = match (hash, hasher) {
        (false, _) => None,
        (true, Some(h)) => Some(h),
        (true, None) => Some(rebuild_hasher(&mut file, b, state_path, offset)?),
    };
    if file.metadata()?.len() != offset {
        file.set_len(offset)?;
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut written = 0u64;
    let mut writeback_from = offset;
    let mut batch = Pieces::new();
    let mut ended = false;
    while !ended {
        // Wait for one hand-off, then take what else is already queued, up to a batch.
        let mut batch_len = 0usize;
        while batch_len < WRITE_BATCH && batch.len() < WRITE_IOVECS {
            let next = if batch.is_empty() {
                rx.blocking_recv()
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    // Nothing more has arrived: write what is here rather than hold it waiting.
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(pieces) = next else {
                ended = true;
                break;
            };
            for piece in pieces {
                if let Some(h) = hasher.as_mut() {
                    h.update(&piece.bytes);
                }
                batch_len += piece.bytes.len();
                batch.push(piece);
            }
        }
        if batch.is_empty() {
            break;
        }
        write_all_chunks(&mut file, &batch)?;
        // Written: the pieces and their share of the budget go back.
        batch.clear();
        written += batch_len as u64;
        let at = offset + written;
        if sync && at - writeback_from >= WRITEBACK_STEP {
            start_writeback(&file, writeback_from, at - writeback_from);
            writeback_from = at;
        }
    }
    let beside = match new_total {
        Some(total) => record_total_on(b, &file, path, total)?,
        None => false,
    };
    if offset == 0 || new_total.is_some() {
        // `fsync`, not `fdatasync`: it also covers the size attribute, and the creation of a new
        // file (an empty upload's file grows by nothing, which `fdatasync` would not flush).
        flush_named(b, &file, path, beside, offset == 0, flushing)?;
    } else if sync {
        file.sync_data()?;
    }
    if let Some(h) = &hasher {
        save_hash_state(b, state_path, offset + written, h);
    }
    Ok(Written { written, hasher })
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
fn write_all_chunks(file: &mut File, chunks: &[Piece]) -> io::Result<()> {
    let mut iov: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(&c.bytes)).collect();
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
fn save_hash_state(b: &Beneath, path: &Path, offset: u64, hasher: &Sha256) {
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
    let saved = b
        .open_file(path, OFlags::WRONLY | OFlags::CREATE)
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

fn load_hash_state(b: &Beneath, path: &Path) -> Option<(u64, Sha256)> {
    let buf = b.read(path).ok()?;
    let (body, check) = buf.split_at_checked(buf.len().checked_sub(8)?)?;
    if Sha256::digest(body)[..8] != *check || body.get(..4)? != HASH_STATE_MAGIC {
        return None;
    }
    let offset = u64::from_le_bytes(body.get(4..12)?.try_into().ok()?);
    let state = SerializedState::<Sha256>::try_from(body.get(12..)?).ok()?;
    Some((offset, Sha256::deserialize(&state).ok()?))
}

/// After a restart: resume the hash from the checkpoint (`state_path`, below the data folder `b`),
/// reading only the bytes it did not cover.
pub fn rebuild_hasher(
    file: &mut File,
    b: &Beneath,
    state_path: &Path,
    offset: u64,
) -> io::Result<Sha256> {
    let (mut at, mut hasher) = match load_hash_state(b, state_path) {
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::server::session::DATA_FILE;

    /// Writes `chunks` at `offset` the way a Fragment does, with hashing and syncing on.
    fn write_at(b: &Beneath, offset: u64, chunks: &[&'static [u8]]) -> Written {
        let (tx, rx) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.try_send(vec![Piece {
                bytes: Bytes::from_static(c),
                _budget: None,
            }])
            .unwrap();
        }
        drop(tx);
        let target = Target {
            b: b.clone(),
            path: DATA_FILE.into(),
            state_path: "h".into(),
            offset,
            new_total: None,
            flushing: Flushing::Ordered,
        };
        write_fragment(&target, None, true, rx).unwrap()
    }

    /// A folder, the same opened as a data folder, and the paths of its data file and checkpoint.
    fn folder() -> (
        tempfile::TempDir,
        Beneath,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let b = Beneath::open(dir.path()).unwrap();
        let (path, state) = (dir.path().join(DATA_FILE), dir.path().join("h"));
        (dir, b, path, state)
    }

    #[test]
    fn a_fragment_lands_at_its_offset_and_cuts_off_a_torn_tail() {
        let (_dir, b, path, _) = folder();
        // Bytes past the acknowledged offset (a write cut short by a crash) are not kept.
        fs::write(&path, b"abcXXXX").unwrap();
        let done = write_at(&b, 3, &[b"de", b"f"]);
        assert_eq!(done.written, 3);
        assert_eq!(fs::read(&path).unwrap(), b"abcdef");
        let hash = done.hasher.unwrap().finalize();
        assert_eq!(
            hash,
            Sha256::digest(b"abcdef"),
            "the hash covers the whole file"
        );
    }

    #[test]
    fn the_hash_resumes_from_its_checkpoint() {
        let (_dir, b, path, _) = folder();
        write_at(&b, 0, &[b"hello "]);
        assert_eq!(
            load_hash_state(&b, Path::new("h")).map(|(at, _)| at),
            Some(6)
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"world")
            .unwrap();
        let mut f = File::open(&path).unwrap();
        let h = rebuild_hasher(&mut f, &b, Path::new("h"), 11).unwrap();
        assert_eq!(h.finalize(), Sha256::digest(b"hello world"));
    }

    #[test]
    fn a_torn_or_foreign_checkpoint_is_ignored() {
        let (_dir, b, path, state) = folder();
        write_at(&b, 0, &[b"hello"]);
        let mut saved = fs::read(&state).unwrap();
        saved[5] ^= 1;
        fs::write(&state, &saved).unwrap();
        assert!(load_hash_state(&b, Path::new("h")).is_none());
        fs::write(&state, b"short").unwrap();
        assert!(load_hash_state(&b, Path::new("h")).is_none());
        // Without a usable checkpoint the whole file is read again.
        let h = rebuild_hasher(&mut File::open(&path).unwrap(), &b, Path::new("h"), 5).unwrap();
        assert_eq!(h.finalize(), Sha256::digest(b"hello"));
    }

    #[test]
    fn a_file_shorter_than_its_offset_cannot_be_hashed() {
        let (_dir, b, path, _) = folder();
        fs::write(&path, b"abc").unwrap();
        let mut f = File::open(&path).unwrap();
        let e = rebuild_hasher(&mut f, &b, Path::new("none"), 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
