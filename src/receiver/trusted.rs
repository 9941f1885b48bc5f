//! Files named by reference (`BITS-Request-DataFile-Name`, `BITS-Response-DataFile-Name`), read
//! and written only beneath the folders the receiver was told to trust, without following any
//! link.
//!
//! Anyone who can reach the receiver can send those headers, so a name is only a request: it must
//! start with a trusted folder's canonical path (the form the server sends, since it canonicalises
//! its data folder), and what follows is resolved from a descriptor of that folder, opened at
//! start, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`. Where the kernel has no openat2
//! (before Linux 5.6, or a seccomp filter refusing it), each component is opened in turn with
//! `O_NOFOLLOW`, which refuses the same links. The file read must be a regular file with one link
//! (a hard link is no link a lookup sees: it *is* the file it names, possibly from outside). The
//! reply is written to a new file beside its name and renamed over it, so no existing file, and
//! nothing a hard link shares, is ever truncated or written through.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// A folder the operator named with `--trust-dir`.
struct TrustedDir {
    /// Canonical: what a server that canonicalises its data folder names.
    path: PathBuf,
    /// Opened once at start (`O_PATH`), so later changes above the folder do not move it.
    fd: OwnedFd,
}

/// The folders by-reference files may be in; none by default.
pub struct TrustedDirs {
    dirs: Vec<TrustedDir>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot trust {path}: {source}; --trust-dir must name an existing folder (the data folder of the server that delivers by reference)"
)]
pub struct TrustError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Why a file named by reference is not used. Each message names the header and the path.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "{header} {path}: this receiver trusts no folder, so it takes deliveries by value only; start it with --trust-dir <the server's data folder> to take them by reference"
    )]
    NothingTrusted { header: &'static str, path: PathBuf },
    #[error(
        "{header} {path} is not beneath a folder this receiver trusts ({trusted}); name a file in the server's data folder, as a canonical path, or trust that folder with --trust-dir"
    )]
    Outside {
        header: &'static str,
        path: PathBuf,
        trusted: String,
    },
    #[error(
        "{header} {path} passes through a symbolic link; this receiver follows none beneath a trusted folder"
    )]
    Link { header: &'static str, path: PathBuf },
    #[error("{header} {path} is not a regular file")]
    NotRegular { header: &'static str, path: PathBuf },
    #[error(
        "{header} {path} has {links} hard links; a delivered file has one, so this may be a file from outside the trusted folder"
    )]
    HardLinked {
        header: &'static str,
        path: PathBuf,
        links: u64,
    },
    #[error("{header} {path}: no such file or folder")]
    Missing { header: &'static str, path: PathBuf },
    #[error("{header} {path}: {source}")]
    Io {
        header: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl Refused {
    /// A name that is missing is an ordinary mistake; every other refusal is a name the receiver
    /// will not use, and an I/O error is its own.
    pub fn status(&self) -> u16 {
        match self {
            Refused::Missing { .. } => 400,
            Refused::Io { .. } => 500,
            _ => 403,
        }
    }
}

/// Where a reply goes: the folder, held open, and the name in it.
pub struct ReplyTarget {
    parent: OwnedFd,
    name: OsString,
}

impl TrustedDirs {
    /// Opens every folder now: a missing one is a configuration error, said at start.
    pub fn open(paths: &[PathBuf]) -> Result<TrustedDirs, TrustError> {
        let mut dirs = Vec::with_capacity(paths.len());
        for p in paths {
            let err = |source| TrustError {
                path: p.clone(),
                source,
            };
            // The operator may name the folder through links of its own (a mount, say).
            let path = std::fs::canonicalize(p).map_err(err)?;
            let fd = rustix::fs::open(
                &path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| err(e.into()))?;
            dirs.push(TrustedDir { path, fd });
        }
        Ok(TrustedDirs { dirs })
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.path.as_path())
    }

    /// The trusted folder `named` is in, and the rest of it (plain names only; may be empty).
    fn locate(
        &self,
        header: &'static str,
        named: &Path,
    ) -> Result<(&TrustedDir, PathBuf), Refused> {
        if self.dirs.is_empty() {
            return Err(Refused::NothingTrusted {
                header,
                path: named.to_path_buf(),
            });
        }
        self.dirs
            .iter()
            .find_map(|d| relative_beneath(&d.path, named).map(|rest| (d, rest)))
            .ok_or_else(|| Refused::Outside {
                header,
                path: named.to_path_buf(),
                trusted: self
                    .paths()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Opens the upload a notification names, for reading.
    pub fn open_request_file(&self, header: &'static str, named: &Path) -> Result<File, Refused> {
        let (dir, rest) = self.locate(header, named)?;
        let refused = Refusal {
            header,
            named,
            trusted: &dir.path,
        };
        if rest.as_os_str().is_empty() {
            return Err(refused.not_regular());
        }
        // O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (and is then refused).
        let fd = open_beneath(
            dir.fd.as_fd(),
            &rest,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        )
        .map_err(|e| refused.errno(e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| refused.errno(e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(refused.not_regular());
        }
        if st.st_nlink != 1 {
            return Err(Refused::HardLinked {
                header,
                path: named.to_path_buf(),
                // u32 on some targets, u64 on others.
                #[allow(clippy::useless_conversion)]
                links: st.st_nlink.into(),
            });
        }
        Ok(File::from(fd))
    }

    /// Checks where a reply may go, before anything is stored: the folder must exist beneath a
    /// trusted folder, reached without links, and the name must be free or a regular file.
    pub fn reply_target(&self, header: &'static str, named: &Path) -> Result<ReplyTarget, Refused> {
        let (dir, rest) = self.locate(header, named)?;
        let refused = Refusal {
            header,
            named,
            trusted: &dir.path,
        };
        let Some(name) = rest.file_name().map(OsStr::to_os_string) else {
            return Err(refused.not_regular());
        };
        let folder = rest.parent().unwrap_or(Path::new(""));
        let parent = open_beneath(
            dir.fd.as_fd(),
            folder,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .map_err(|e| refused.errno(e))?;
        match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {}
                FileType::Symlink => return Err(refused.errno(Errno::LOOP)),
                _ => return Err(refused.not_regular()),
            },
            Err(Errno::NOENT) => {}
            Err(e) => return Err(refused.errno(e)),
        }
        Ok(ReplyTarget { parent, name })
    }
}

impl ReplyTarget {
    /// Writes `bytes` to a new file in the folder and renames it over the name: a file already
    /// there (a retried delivery's reply) is replaced whole, never truncated or written through,
    /// and a reader never sees half a reply.
    pub fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let temp = format!(".bitsfarm-reply-{}.tmp", uuid::Uuid::new_v4().simple());
        let mut file = create_new(&self.parent, &temp)?;
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                rustix::fs::renameat(&self.parent, &temp, &self.parent, &self.name)
                    .map_err(io::Error::from)
            });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&self.parent, &temp, AtFlags::empty());
        }
        written
    }
}

/// Builds the refusal for one header and name.
struct Refusal<'a> {
    header: &'static str,
    named: &'a Path,
    trusted: &'a Path,
}

impl Refusal<'_> {
    fn not_regular(&self) -> Refused {
        Refused::NotRegular {
            header: self.header,
            path: self.named.to_path_buf(),
        }
    }

    fn errno(&self, e: Errno) -> Refused {
        let (header, path) = (self.header, self.named.to_path_buf());
        match e {
            Errno::LOOP => Refused::Link { header, path },
            // RESOLVE_BENEATH: the lookup would have left the folder.
            Errno::XDEV => Refused::Outside {
                header,
                path,
                trusted: self.trusted.display().to_string(),
            },
            Errno::NOENT | Errno::NOTDIR => Refused::Missing { header, path },
            e => Refused::Io {
                header,
                path,
                source: e.into(),
            },
        }
    }
}

/// A new file `name` in the folder `dir`, for writing: never one that is there already (a link
/// planted there included), so nothing is ever written through a name someone else made.
pub fn create_new(dir: impl AsFd, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    Ok(File::from(fd))
}

/// `named` without the `trusted` prefix, if it is beneath it by name alone: compared component by
/// component (so `/data-evil` is not beneath `/data`), and made of plain names only (no `..`,
/// which could climb out, and no `.`).
pub fn relative_beneath(trusted: &Path, named: &Path) -> Option<PathBuf> {
    let rest = named.strip_prefix(trusted).ok()?;
    let mut out = PathBuf::new();
    for c in rest.components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

/// Set once openat2 has proved missing, so later lookups go straight to the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `rest` (plain names; empty for the folder itself) beneath `dir` without following any
/// link: ELOOP if a component is a link, EXDEV if the lookup would leave `dir`.
pub(super) fn open_beneath(
    dir: BorrowedFd<'_>,
    rest: &Path,
    flags: OFlags,
) -> Result<OwnedFd, Errno> {
    let path = if rest.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rest
    };
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve) {
            // ENOSYS: a kernel before 5.6; EPERM: a seccomp filter that does not know openat2.
            Err(Errno::NOSYS | Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            r => return r,
        }
    }
    open_walk(dir, rest, flags)
}

/// The fallback: one component at a time, each checked not to be a link before it is used, and
/// opened with `O_NOFOLLOW` so that a link swapped in after the check is refused too.
fn open_walk(dir: BorrowedFd<'_>, rest: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let names: Vec<&OsStr> = rest
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(Errno::XDEV),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, folders)) = names.split_last() else {
        return rustix::fs::openat(dir, ".", flags, Mode::empty());
    };
    let mut current: Option<OwnedFd> = None;
    for name in folders {
        let at = current.as_ref().map_or(dir, |f| f.as_fd());
        // O_PATH with O_NOFOLLOW opens a link itself rather than failing, so look before using.
        let fd = rustix::fs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        match FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) {
            FileType::Directory => current = Some(fd),
            FileType::Symlink => return Err(Errno::LOOP),
            _ => return Err(Errno::NOTDIR),
        }
    }
    let at = current.as_ref().map_or(dir, |f| f.as_fd());
    if let Ok(st) = rustix::fs::statat(at, *last, AtFlags::SYMLINK_NOFOLLOW)
        && FileType::from_raw_mode(st.st_mode) == FileType::Symlink
    {
        return Err(Errno::LOOP);
    }
    rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn beneath_by_name_only() {
        let t = Path::new("/srv/data");
        let ok = |n: &str| relative_beneath(t, Path::new(n));
        assert_eq!(ok("/srv/data/a/b.bin"), Some(PathBuf::from("a/b.bin")));
        assert_eq!(ok("/srv/data//a/./b.bin"), Some(PathBuf::from("a/b.bin")));
        assert_eq!(ok("/srv/data"), Some(PathBuf::new()));
        assert_eq!(ok("/srv/data/../etc/passwd"), None);
        assert_eq!(ok("/srv/data/a/../../etc"), None);
        assert_eq!(ok("/srv/data-evil/a"), None);
        assert_eq!(ok("/srv/dat"), None);
        assert_eq!(ok("/etc/hostname"), None);
        assert_eq!(ok("srv/data/a"), None);
    }

    /// The fallback refuses what openat2 refuses; run here on any kernel.
    #[test]
    fn the_walk_follows_no_link() {
        let root = tempfile::tempdir().unwrap();
        let (inside, outside) = (root.path().join("in"), root.path().join("out"));
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(inside.join("sub").join("f.bin"), b"ok").unwrap();
        std::fs::write(outside.join("secret"), b"no").unwrap();
        symlink(&outside, inside.join("out-link")).unwrap();
        symlink(outside.join("secret"), inside.join("file-link")).unwrap();
        symlink("sub", inside.join("inner-link")).unwrap();
        let dir =
            rustix::fs::open(&inside, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let read = OFlags::RDONLY | OFlags::NONBLOCK;
        let walk = |p: &str, f| open_walk(dir.as_fd(), Path::new(p), f).map(|_| ());
        assert_eq!(walk("sub/f.bin", read), Ok(()));
        assert_eq!(walk("sub", OFlags::PATH | OFlags::DIRECTORY), Ok(()));
        assert_eq!(walk("", OFlags::PATH | OFlags::DIRECTORY), Ok(()));
        assert_eq!(walk("out-link/secret", read), Err(Errno::LOOP));
        assert_eq!(walk("file-link", read), Err(Errno::LOOP));
        assert_eq!(walk("inner-link/f.bin", read), Err(Errno::LOOP));
        assert_eq!(
            walk("inner-link", OFlags::PATH | OFlags::DIRECTORY),
            Err(Errno::LOOP)
        );
        assert_eq!(walk("../out/secret", read), Err(Errno::XDEV));
        assert_eq!(walk("sub/f.bin/x", read), Err(Errno::NOTDIR));
        assert_eq!(walk("nothing", read), Err(Errno::NOENT));
        // openat2 (where the kernel has it) agrees.
        let both = |p: &str| {
            (
                walk(p, read),
                open_beneath(dir.as_fd(), Path::new(p), read).map(|_| ()),
            )
        };
        for p in [
            "sub/f.bin",
            "out-link/secret",
            "file-link",
            "inner-link/f.bin",
            "nothing",
        ] {
            let (w, o) = both(p);
            assert_eq!(w, o, "{p}");
        }
    }

    #[test]
    fn a_reply_replaces_the_name_not_what_it_links_to() {
        let root = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(root.path()).unwrap();
        let (inside, outside) = (base.join("in"), base.join("out"));
        std::fs::create_dir(&inside).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        std::fs::hard_link(outside.join("victim"), inside.join("reply")).unwrap();
        let trusted = TrustedDirs::open(std::slice::from_ref(&inside)).unwrap();
        let h = "BITS-Response-DataFile-Name";
        trusted
            .reply_target(h, &inside.join("reply"))
            .unwrap()
            .write(b"new")
            .unwrap();
        assert_eq!(std::fs::read(inside.join("reply")).unwrap(), b"new");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(
            std::fs::read_dir(&inside).unwrap().count(),
            1,
            "no temporary left"
        );
        symlink(outside.join("victim"), inside.join("link")).unwrap();
        assert!(matches!(
            trusted.reply_target(h, &inside.join("link")),
            Err(Refused::Link { .. })
        ));
        assert!(matches!(
            trusted.reply_target(h, &outside.join("victim")),
            Err(Refused::Outside { .. })
        ));
        assert!(matches!(
            TrustedDirs::open(&[])
                .unwrap()
                .reply_target(h, &inside.join("reply")),
            Err(Refused::NothingTrusted { .. })
        ));
    }
}
