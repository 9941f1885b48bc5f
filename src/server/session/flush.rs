//! How many flushes an acknowledgement needs on the data folder's file system.
//!
//! A flush is one `fsync` or `fdatasync`, and on this path it is the disk's slowest step: each
//! one is a journal commit and a cache flush. The store keeps every fact a later packet only adds
//! (the upload's size, the session's end) as a new name in the session's folder, never as a
//! rewrite of a file, so what must be durable before an Ack is always one file's bytes plus names.
//!
//! On ext4 and XFS a flush of any file commits the metadata journal up to that file's last
//! change, and the journal commits in order: every name made earlier on the same file system (a
//! folder, a file's creation, a link, an empty marker) is durable with it. There the minimum is
//! one flush per Create-Session, per Fragment and per Close-Session. Elsewhere (btrfs, NFS, and
//! any file system we cannot name) names are only durable when their folder is flushed, so the
//! folders that gained one are flushed too.

use std::io;
use std::path::Path;

use crate::server::beneath::Beneath;

/// What a flush of a file covers on the data folder's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushing {
    /// Writes are not flushed at all (`--unsafe-no-sync`).
    Off,
    /// A file's flush also makes every earlier name on the file system durable (ext4, XFS).
    Ordered,
    /// A new name is durable only once its folder is flushed.
    Folders,
}

const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
/// Nothing on tmpfs survives a reboot, so no flush can lose anything there.
const TMPFS_MAGIC: i64 = 0x0102_1994;

impl Flushing {
    /// The rule for a data folder whose file system is `fs_type` (statfs's `f_type`).
    pub fn for_file_system(sync: bool, fs_type: i64) -> Flushing {
        match fs_type {
            _ if !sync => Flushing::Off,
            EXT4_MAGIC | XFS_MAGIC | TMPFS_MAGIC => Flushing::Ordered,
            _ => Flushing::Folders,
        }
    }

    /// The rule for the data folder `b`; a file system that cannot be asked is treated as one
    /// that needs folders flushed.
    pub fn detect(b: &Beneath, sync: bool) -> Flushing {
        Flushing::for_file_system(sync, b.fs_type().unwrap_or(0))
    }

    pub fn on(self) -> bool {
        self != Flushing::Off
    }

    /// Makes the names just made in `folders` (below `b`) durable, when a later file flush will
    /// not.
    pub fn names(self, b: &Beneath, folders: &[&Path]) -> io::Result<()> {
        if self == Flushing::Folders {
            for folder in folders {
                b.sync_dir(folder)?;
            }
        }
        Ok(())
    }

    /// Makes the names just made in `folder` durable now, with no file flush to come after them
    /// in this packet.
    pub fn names_now(self, b: &Beneath, folder: &Path) -> io::Result<()> {
        if self.on() {
            b.sync_dir(folder)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journaled_file_systems_need_one_flush_others_their_folders_too() {
        assert_eq!(
            Flushing::for_file_system(true, EXT4_MAGIC),
            Flushing::Ordered
        );
        assert_eq!(
            Flushing::for_file_system(true, XFS_MAGIC),
            Flushing::Ordered
        );
        // btrfs, NFS, and a file system that could not be asked.
        for other in [0x9123_683E, 0x6969, 0] {
            assert_eq!(Flushing::for_file_system(true, other), Flushing::Folders);
        }
        assert_eq!(Flushing::for_file_system(false, EXT4_MAGIC), Flushing::Off);
        assert!(!Flushing::Off.on());
    }
}
