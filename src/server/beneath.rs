//! Paths beneath a data folder, resolved without ever following a symbolic link.
//!
//! Someone with a shell on the server can plant links in the data folder (`DATA/etc -> /etc`).
//! `std::fs` follows links in every folder of a path, so an upload, an overwrite, a download or a
//! cleanup would reach outside. Here the data folder is opened once, and every path below it is
//! resolved by the kernel from that descriptor with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: a link anywhere on the way, the last name included, fails with ELOOP
//! instead of being followed, atomically, with no window between a check and a use. Where
//! `openat2` is missing (Linux before 5.6, or a seccomp filter that refuses it) the same walk is
//! made one name at a time with `O_NOFOLLOW`. Creating, linking, renaming and removing act on a
//! name inside a folder opened that way, so no path of ours is ever resolved by name again.
//!
//! rustix rather than cap-std: cap-std's sandbox follows links that stay inside it, so
//! `DATA/x -> BITS-Sessions` would still let an upload write into the server's own state; the
//! rule here is that no link inside the data folder is followed at all, which is one flag of
//! `openat2`. rustix was already in the build (through tempfile) and wraps exactly these calls.
//!
//! Paths given here are relative and made of plain names only (as `bits::paths` makes them);
//! anything else is refused with EINVAL before any system call.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Flags the kernel resolves every path with: stay beneath the folder, follow no link.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);
/// A folder on the way, held only to look the next name up in.
const FOLDER: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// How often an `openat2` the kernel asks to retry (EAGAIN: a rename or mount raced the lookup)
/// is tried before the walk takes over.
const EAGAIN_TRIES: usize = 4;
/// The deepest folder `remove_all` descends into; session folders are one level deep.
const MAX_REMOVE_DEPTH: usize = 16;

/// How paths are resolved below the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// One `openat2` call per path.
    Openat2,
    /// One `openat(O_NOFOLLOW)` per name: where `openat2` is not available.
    Walk,
}

/// A folder (the data folder) and the means to reach what is beneath it without following links.
/// Cheap to clone: clones share the one descriptor.
#[derive(Debug, Clone)]
pub struct Beneath {
    root: Arc<OwnedFd>,
    path: Arc<PathBuf>,
    resolver: Resolver,
}

impl Beneath {
    /// Opens the folder `path`. Links in `path` itself are followed: it is the operator's setting.
    pub fn open(path: &Path) -> io::Result<Beneath> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let resolver = if openat2_works(&root) {
            Resolver::Openat2
        } else {
            tracing::info!(dir = %path.display(), "openat2 is not available; paths are resolved one name at a time");
            Resolver::Walk
        };
        Ok(Beneath {
            root: Arc::new(root),
            path: Arc::new(path.to_path_buf()),
            resolver,
        })
    }

    /// The same folder, resolved with `resolver` (tests check both ways).
    pub fn with_resolver(mut self, resolver: Resolver) -> Beneath {
        self.resolver = resolver;
        self
    }

    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    /// The folder's path, as it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` as an absolute path, for messages and for programs that take a path.
    pub fn absolute(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// The longest name the folder's file system takes, in bytes.
    pub fn name_max(&self) -> io::Result<usize> {
        Ok(rustix::fs::fstatfs(&*self.root)?.f_namelen as usize)
    }

    /// The kind of the folder's file system (`statfs`'s `f_type`).
    pub fn fs_type(&self) -> io::Result<i64> {
        Ok(rustix::fs::fstatfs(&*self.root)?.f_type as i64)
    }

    /// Opens `rel` with `flags` (`O_NOFOLLOW` and `O_CLOEXEC` are added; with `O_CREAT` a new
    /// file gets mode 0666 less the umask).
    pub fn open_fd(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        check(rel)?;
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match self.resolver {
            Resolver::Openat2 => self.openat2(rel, flags)?,
            Resolver::Walk => self.walk(rel, flags)?,
        };
        // With O_PATH and O_NOFOLLOW the kernel hands out the link itself instead of refusing it.
        if flags.contains(OFlags::PATH) && is_link(&fd)? {
            return Err(link_met());
        }
        Ok(fd)
    }

    pub fn open_file(&self, rel: &Path, flags: OFlags) -> io::Result<File> {
        Ok(File::from(self.open_fd(rel, flags)?))
    }

    /// What `rel` is. A link is an error (ELOOP), as everywhere here.
    pub fn metadata(&self, rel: &Path) -> io::Result<Metadata> {
        File::from(self.open_fd(rel, OFlags::PATH)?).metadata()
    }

    pub fn read(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_file(rel, OFlags::RDONLY)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// The names in folder `rel` (without `.` and `..`).
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        list(self.open_fd(rel, OFlags::RDONLY | OFlags::DIRECTORY)?)
    }

    /// Creates folder `rel` and every missing folder above it. A link or a file on the way is an
    /// error (ELOOP, ENOTDIR); nothing is created past it.
    pub fn create_dir_all(&self, rel: &Path) -> io::Result<()> {
        match self.open_fd(rel, FOLDER) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other.map(drop),
        }
        let mut held: Option<OwnedFd> = None;
        for name in names(rel)? {
            let at = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = match rustix::fs::openat(at, name, FOLDER, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o777)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(explain(at, name, e)),
                    }
                    rustix::fs::openat(at, name, FOLDER, Mode::empty())
                        .map_err(|e| explain(at, name, e))?
                }
                Err(e) => return Err(explain(at, name, e)),
            };
            held = Some(next);
        }
        Ok(())
    }

    /// Creates folder `rel`; its parent must exist. An existing name is an error (EEXIST).
    pub fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel, FOLDER)?;
        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o777))
            .map_err(|e| explain(dir.as_fd(), name, e))
    }

    /// Makes `to` a second name of the file `from`; fails if `to` exists (EEXIST), even as a link.
    pub fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from, FOLDER)?;
        let (to_dir, to_name) = self.parent(to, FOLDER)?;
        rustix::fs::linkat(&from_dir, from_name, &to_dir, to_name, AtFlags::empty())?;
        Ok(())
    }

    /// Renames `from` to `to`, replacing a file there (the name itself, never what a link there
    /// points to).
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from, FOLDER)?;
        let (to_dir, to_name) = self.parent(to, FOLDER)?;
        rustix::fs::renameat(&from_dir, from_name, &to_dir, to_name)?;
        Ok(())
    }

    /// Removes the file (or link: the link, never its target) `rel`.
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel, FOLDER)?;
        rustix::fs::unlinkat(&dir, name, AtFlags::empty())?;
        Ok(())
    }

    /// Removes `rel` and, if it is a folder, everything in it. Links inside are removed, never
    /// followed; a link on the way to `rel` is an error and nothing is removed. Gone already is
    /// success.
    pub fn remove_all(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = match self.parent(rel, FOLDER) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        remove_entry(dir.as_fd(), name, 0)
    }

    /// Replaces file `rel` with `bytes` in one step (a temporary name, then a rename); with
    /// `sync`, the bytes and the folder entry are on disk when this returns.
    pub fn write_atomic(&self, rel: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
        self.replace_with(rel, sync, |f| f.write_all(bytes))
    }

    /// Replaces file `to` with a copy of file `from`, in one step as `write_atomic` does.
    pub fn copy_atomic(&self, from: &Path, to: &Path, sync: bool) -> io::Result<()> {
        let mut source = self.open_file(from, OFlags::RDONLY)?;
        self.replace_with(to, sync, |f| io::copy(&mut source, f).map(drop))
    }

    fn replace_with(
        &self,
        rel: &Path,
        sync: bool,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(rel, OFlags::RDONLY)?;
        let mut tmp = name.to_os_string();
        tmp.push(".tmp");
        // A stale (or planted) temporary file goes first and the new one is made exclusively: the
        // bytes never land in a file that was already there, a hard link to one elsewhere included.
        match rustix::fs::unlinkat(&dir, &tmp, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut f = File::from(rustix::fs::openat(
            &dir,
            &tmp,
            flags,
            Mode::from_raw_mode(0o666),
        )?);
        let written = fill(&mut f).and_then(|()| if sync { f.sync_data() } else { Ok(()) });
        drop(f);
        let renamed = written.and_then(|()| Ok(rustix::fs::renameat(&dir, &tmp, &dir, name)?));
        if let Err(e) = renamed {
            let _ = rustix::fs::unlinkat(&dir, &tmp, AtFlags::empty());
            return Err(e);
        }
        if sync {
            rustix::fs::fsync(&dir)?;
        }
        Ok(())
    }

    /// Makes a new, empty file `rel`; fails if the name exists (EEXIST), even as a link.
    pub fn create_empty(&self, rel: &Path) -> io::Result<()> {
        self.open_fd(rel, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)
            .map(drop)
    }

    /// Flushes folder `rel`'s entries (a new or renamed name in it) to disk.
    pub fn sync_dir(&self, rel: &Path) -> io::Result<()> {
        let dir = self.open_fd(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(rustix::fs::fsync(&dir)?)
    }

    /// The folder holding `rel`, opened with `flags`, and `rel`'s last name.
    fn parent<'a>(&self, rel: &'a Path, flags: OFlags) -> io::Result<(OwnedFd, &'a OsStr)> {
        let name = match rel.file_name() {
            Some(n) if check(rel).is_ok() => n,
            _ => return Err(not_below()),
        };
        let dir = self.open_fd(
            rel.parent().unwrap_or(Path::new("")),
            flags | OFlags::DIRECTORY,
        )?;
        Ok((dir, name))
    }

    fn openat2(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        for _ in 0..EAGAIN_TRIES {
            match rustix::fs::openat2(&*self.root, path, flags, create_mode(flags), RESOLVE) {
                Ok(fd) => return Ok(fd),
                Err(Errno::AGAIN) => continue,
                // A link or a file where a folder should be: the walk finds which, and says so.
                Err(Errno::NOTDIR) => return self.walk(rel, flags),
                Err(e) => return Err(e.into()),
            }
        }
        self.walk(rel, flags)
    }

    fn walk(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let names = names(rel)?;
        let Some((last, folders)) = names.split_last() else {
            return Ok(rustix::fs::openat(&*self.root, ".", flags, Mode::empty())?);
        };
        let mut held: Option<OwnedFd> = None;
        for name in folders {
            let at = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = rustix::fs::openat(at, *name, FOLDER, Mode::empty())
                .map_err(|e| explain(at, name, e))?;
            held = Some(next);
        }
        let at = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
        rustix::fs::openat(at, *last, flags, create_mode(flags)).map_err(|e| explain(at, last, e))
    }
}

/// True when `e` says that a path met a symbolic link, which is never followed here.
pub fn met_link(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::LOOP.raw_os_error())
}

/// True when `e` says that a name on the way is a file where a folder should be.
pub fn met_file(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::NOTDIR.raw_os_error())
}

fn link_met() -> io::Error {
    Errno::LOOP.into()
}

fn not_below() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "not a relative path of plain names below the folder",
    )
}

fn create_mode(flags: OFlags) -> Mode {
    if flags.contains(OFlags::CREATE) {
        Mode::from_raw_mode(0o666)
    } else {
        Mode::empty()
    }
}

/// Refuses anything but plain names (no root, `.`, `..`); the empty path is the folder itself.
fn check(rel: &Path) -> io::Result<()> {
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(not_below())
    }
}

fn names(rel: &Path) -> io::Result<Vec<&OsStr>> {
    check(rel)?;
    Ok(rel.components().map(|c| c.as_os_str()).collect())
}

fn openat2_works(root: &OwnedFd) -> bool {
    rustix::fs::openat2(root, ".", FOLDER, Mode::empty(), RESOLVE).is_ok()
}

fn is_link(fd: &OwnedFd) -> io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// Turns "not a folder" for a name that is a link into ELOOP, so that every link met reads the
/// same, whichever call met it.
fn explain(at: BorrowedFd<'_>, name: &OsStr, e: Errno) -> io::Error {
    if matches!(e, Errno::NOTDIR | Errno::LOOP) {
        let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW);
        if st.is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink) {
            return link_met();
        }
    }
    e.into()
}

fn list(dir: OwnedFd) -> io::Result<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::new(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(io::Error::other(format!(
            "more than {MAX_REMOVE_DEPTH} folders deep; not removed"
        )));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let sub = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(explain(dir, name, e)),
    };
    let children = list(rustix::io::dup(&sub)?)?;
    for child in children {
        remove_entry(sub.as_fd(), &child, depth + 1)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
