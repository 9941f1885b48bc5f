//! How many flushes an acknowledgement needs on the data folder's file system.
//!
//! A flush is one `fsync` or `fdatasync`, and on this path it is the disk's slowest step. The
//! store arranges every packet so that what must be durable before its Ack is one file: its bytes,
//! its own attributes (`fsync` covers them on every file system) and, for a file the packet
//! created, its name. Facts that come later are attributes or renames, never rewrites.
//!
//! On ext4 (with or without a journal), XFS and btrfs, the `fsync` of a newly created file also
//! makes its name durable, and the names of the new folders above it: journaled file systems
//! commit the creation with the file, and ext4 without a journal flushes the new file's folders
//! itself (`ext4_sync_parent`). There the minimum is one flush per Create-Session, per Fragment
//! and per Close-Session. On any other file system (NFS, and those we cannot name) a new name is
//! durable only once its folder is flushed, so those folders are flushed too.

use std::io;
use std::path::Path;

use crate::server::beneath::Beneath;

/// What a flush of a file covers on the data folder's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushing {
    /// Writes are not flushed at all (`--unsafe-no-sync`).
    Off,
    /// A new file's flush also makes its name durable (ext4, XFS, btrfs, tmpfs).
    Ordered,
    /// A new name is durable only once its folder is flushed.
    Folders,
}

const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683E;
/// Nothing on tmpfs survives a reboot, so no flush can lose anything there.
const TMPFS_MAGIC: i64 = 0x0102_1994;

impl Flushing {
    /// The rule for a data folder whose file system is `fs_type` (statfs's `f_type`; 0 when it
    /// could not be asked, which gets folders flushed).
    pub fn for_file_system(sync: bool, fs_type: i64) -> Flushing {
        match fs_type {
            _ if !sync => Flushing::Off,
            EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC | TMPFS_MAGIC => Flushing::Ordered,
            _ => Flushing::Folders,
        }
    }

    pub fn on(self) -> bool {
        self != Flushing::Off
    }

    /// True when the data folder `root` (of statfs type `fs_type`) is on ext4 without a journal.
    /// There every new file makes the kernel step over each inode freed in the last minutes
    /// (ext4's `recently_deleted`), so after many deletions a new session costs up to a
    /// millisecond of CPU per file it makes: worth a line in the log.
    pub fn journal_less_ext4(root: &Path, fs_type: i64) -> bool {
        use std::os::unix::fs::MetadataExt;
        if fs_type != EXT4_MAGIC {
            return false;
        }
        let Ok(dev) = std::fs::metadata(root).map(|m| m.dev()) else {
            return false;
        };
        let device = format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(dev),
            rustix::fs::minor(dev)
        );
        let Some(name) = std::fs::read_link(device)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
        else {
            return false;
        };
        std::fs::read_to_string(Path::new("/sys/fs/ext4").join(name).join("journal_task"))
            .is_ok_and(|task| says_no_journal(&task))
    }

    /// Makes the new names in `folders` (below `b`) durable where flushing the new file in them
    /// did not.
    pub fn names(self, b: &Beneath, folders: &[&Path]) -> io::Result<()> {
        if self == Flushing::Folders {
            for folder in folders {
                b.sync_dir(folder)?;
            }
        }
        Ok(())
    }
}

/// ext4's `journal_task` in sysfs names the journal thread's pid, or `<none>`.
fn says_no_journal(journal_task: &str) -> bool {
    journal_task.trim() == "<none>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_without_a_journal_is_told_by_its_journal_thread() {
        assert!(says_no_journal("<none>\n"));
        assert!(!says_no_journal("3434\n"));
        assert!(!Flushing::journal_less_ext4(Path::new("/"), XFS_MAGIC));
    }

    #[test]
    fn known_file_systems_need_one_flush_others_their_folders_too() {
        assert_eq!(
            Flushing::for_file_system(true, EXT4_MAGIC),
            Flushing::Ordered
        );
        assert_eq!(
            Flushing::for_file_system(true, XFS_MAGIC),
            Flushing::Ordered
        );
        assert_eq!(
            Flushing::for_file_system(true, BTRFS_MAGIC),
            Flushing::Ordered
        );
        // NFS, FUSE, and a file system that could not be asked.
        for other in [0x6969, 0x6573_5546, 0] {
            assert_eq!(Flushing::for_file_system(true, other), Flushing::Folders);
        }
        assert_eq!(Flushing::for_file_system(false, EXT4_MAGIC), Flushing::Off);
        assert!(!Flushing::Off.on());
    }
}
