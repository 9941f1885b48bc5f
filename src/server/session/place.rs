//! Where an upload lands: the destination checked at Create-Session and again at Close-Session,
//! the commit, and the answers a path on the server gets when it cannot be used.
//!
//! Every path here is relative to the data folder and reached through `Beneath`, which never
//! follows a symbolic link: a link planted on the way (`DATA/etc -> /etc`) or at the destination
//! is refused with 403, never written through.

use std::io;
use std::path::Path;

use tracing::warn;

use crate::bits::paths::check_fits;
use crate::bits::protocol::BitsError;
use crate::server::beneath::{Beneath, met_file, met_link};
use crate::server::disk::io_error;

/// The answer to a failure on a path in the data folder: a link met on the way is refused (403,
/// fatal for the client: retrying cannot help until someone removes the link); anything else is
/// a storage failure.
pub(super) fn storage_error(e: io::Error) -> BitsError {
    if met_link(&e) {
        warn!(error = %e, "a symbolic link in the data folder was met and not followed");
        BitsError::access_denied(
            "the path on the server passes through a symbolic link, which this server never \
             follows; its operator must remove the link",
        )
    } else {
        io_error(e)
    }
}

/// The same for the path of a destination, where a file in the place of a folder, or a path too
/// long, is the client's to fix (400, fatal: a Windows client does not retry a 4xx for 14 days).
pub(super) fn destination_error(e: io::Error) -> BitsError {
    if met_file(&e) {
        BitsError::invalid(
            "a folder in the upload URL is a file on the server; choose another path",
        )
    } else if e.raw_os_error() == Some(rustix::io::Errno::NAMETOOLONG.raw_os_error()) {
        BitsError::invalid("the upload URL is too long for the server's file system")
    } else {
        storage_error(e)
    }
}

fn names_a_folder() -> BitsError {
    BitsError::invalid("the upload URL names a folder on the server; upload to a file name")
}

/// Refuses, at Create-Session, a destination that could never be committed: too long for the
/// system, under a file, through a link, a folder, or an existing file when overwrites are off.
/// `name_max` is the longest name the data folder's file system takes.
pub(super) fn check_new_destination(
    b: &Beneath,
    dest: &Path,
    allow_overwrites: bool,
    name_max: usize,
) -> Result<(), BitsError> {
    check_fits(b.path(), dest, name_max)?;
    check_destination(b, dest, allow_overwrites)
}

/// Refuses a destination that is a folder, a link, lies under a file or a link, or is an existing
/// file when overwrites are off. Missing folders on the way are fine: the commit makes them.
pub(super) fn check_destination(
    b: &Beneath,
    dest: &Path,
    allow_overwrites: bool,
) -> Result<(), BitsError> {
    match b.metadata(dest) {
        Ok(m) if m.is_dir() => Err(names_a_folder()),
        Ok(_) if !allow_overwrites => Err(BitsError::access_denied(
            "a file with this name already exists and this upload directory does not allow \
             overwrites (allow-overwrites: true in its settings, or serve --allow-overwrites, \
             lets an upload replace it)",
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(destination_error(e)),
    }
}

/// Moves the finished upload `data` to `dest` in one atomic step. Without overwrites a hard link
/// is made (it fails if the name exists, even when another upload got there first) and the
/// session file is dropped afterwards; a link left by a crash between the two is recognised as
/// our own. With overwrites the file is renamed over the name (a link planted there meanwhile is
/// replaced, never followed).
pub(super) fn commit(
    b: &Beneath,
    data: &Path,
    dest: &Path,
    allow_overwrites: bool,
    sync: bool,
) -> Result<(), BitsError> {
    match b.metadata(data) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A crash after the commit but before the tombstone was written: the file is in place.
            if b.metadata(dest).is_ok() {
                return Ok(());
            }
            return Err(BitsError::internal(
                "the session's data file is missing; the upload must be sent again",
            ));
        }
        Err(e) => return Err(storage_error(e)),
    }
    let parent = dest.parent().unwrap_or(Path::new(""));
    b.create_dir_all(parent).map_err(destination_error)?;
    if allow_overwrites {
        check_destination(b, dest, true)?;
        b.rename(data, dest).map_err(destination_error)?;
    } else {
        match b.hard_link(data, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !same_file(b, data, dest) {
                    check_destination(b, dest, false)?;
                }
            }
            Err(e) => return Err(destination_error(e)),
        }
    }
    if sync {
        b.sync_dir(parent).map_err(storage_error)?;
    }
    Ok(())
}

fn same_file(b: &Beneath, x: &Path, y: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (b.metadata(x), b.metadata(y)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::bits::protocol::hresult;

    fn folder() -> (tempfile::TempDir, Beneath) {
        let dir = tempfile::tempdir().unwrap();
        let b = Beneath::open(dir.path()).unwrap();
        (dir, b)
    }

    #[test]
    fn a_destination_may_not_be_a_folder_nor_an_existing_file_without_overwrites() {
        let (dir, b) = folder();
        fs::write(dir.path().join("f"), b"x").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let p = Path::new;
        assert_eq!(check_destination(&b, p("d"), true).unwrap_err().status, 400);
        assert_eq!(
            check_destination(&b, p("f"), false).unwrap_err().status,
            403
        );
        assert!(check_destination(&b, p("f"), true).is_ok());
        assert!(check_destination(&b, p("new"), false).is_ok());
        assert!(check_destination(&b, p("new/deeper/x"), false).is_ok());
        // Under a file: never committable.
        let e = check_destination(&b, p("f/inner.bin"), true).unwrap_err();
        assert_eq!((e.status, e.code), (400, hresult::E_INVALIDARG), "{e}");
    }

    #[test]
    fn a_link_at_or_on_the_way_to_a_destination_is_refused() {
        let (dir, b) = folder();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"v").unwrap();
        symlink(outside.path(), dir.path().join("etc")).unwrap();
        symlink(outside.path().join("victim"), dir.path().join("l.bin")).unwrap();
        for (dest, overwrites) in [("etc/x", false), ("etc/victim", true), ("l.bin", true)] {
            let e = check_destination(&b, Path::new(dest), overwrites).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (403, hresult::E_ACCESSDENIED),
                "{dest}: {e}"
            );
        }
        fs::write(dir.path().join("data"), b"upload").unwrap();
        for overwrites in [false, true] {
            let e = commit(
                &b,
                Path::new("data"),
                Path::new("etc/sub/x"),
                overwrites,
                true,
            )
            .unwrap_err();
            assert_eq!(e.status, 403, "{e}");
            let e =
                commit(&b, Path::new("data"), Path::new("l.bin"), overwrites, true).unwrap_err();
            assert_eq!(e.status, 403, "{e}");
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"v");
    }

    #[test]
    fn a_commit_makes_the_folders_and_recognises_its_own_file() {
        let (dir, b) = folder();
        fs::write(dir.path().join("data"), b"upload").unwrap();
        let (data, dest) = (Path::new("data"), Path::new("a/b/c.bin"));
        commit(&b, data, dest, false, true).unwrap();
        // Repeated after a crash before the session file was dropped: the link is our own.
        commit(&b, data, dest, false, true).unwrap();
        fs::remove_file(dir.path().join("data")).unwrap();
        // Repeated after a crash after the session file was dropped: the file is in place.
        commit(&b, data, dest, false, true).unwrap();
        assert_eq!(fs::read(dir.path().join("a/b/c.bin")).unwrap(), b"upload");
        fs::write(dir.path().join("data"), b"other").unwrap();
        assert_eq!(commit(&b, data, dest, false, true).unwrap_err().status, 403);
        commit(&b, data, dest, true, true).unwrap();
        assert_eq!(fs::read(dir.path().join("a/b/c.bin")).unwrap(), b"other");
        fs::write(dir.path().join("data"), b"x").unwrap();
        let e = commit(&b, data, Path::new("a/b/c.bin/d"), true, false).unwrap_err();
        assert_eq!(e.status, 400, "{e}");
    }
}
