//! One server per data folder. Two servers on one folder would each recover the sessions into
//! memory and then disagree with the disk and with each other. That happens on Kubernetes when a
//! pod is force-deleted: the StatefulSet starts its replacement on the same volume while the old
//! container is still being killed. The newcomer waits for the old one to exit (the kernel drops
//! an `flock` with its holder), then recovers what the old one left.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::OFlags;
use tracing::{info, warn};

use super::beneath::{Beneath, met_link};
use crate::bits::paths::SESSION_DIR;

/// The lock file, inside the folder that no upload can name.
pub const LOCK_FILE: &str = "lock";

/// How long a server waits for another one to leave its data folder before it gives up.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error(
        "cannot open the lock file {path}: {error}; check that the data folder can be written \
         by this user"
    )]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot use {dir} as a data folder: {file} is a file, not a folder. Give data-dir \
         (--data-dir) a folder, or a path where one can be made"
    )]
    NotAFolder { dir: PathBuf, file: PathBuf },
    #[error(
        "{path} is a symbolic link (or lies under one); bitsfarm never follows links inside its \
         data folder: replace it with a real folder"
    )]
    Link { path: PathBuf },
    #[error(
        "another bitsfarm server has been using the data folder {dir} for {waited_s} s (it holds \
         {path}); stop it, or give this server a data folder of its own"
    )]
    Held {
        dir: PathBuf,
        path: PathBuf,
        waited_s: u64,
    },
}

/// An exclusive hold on a data folder, released when dropped or when the process ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the data folder `dir`, waiting up to `wait` for a server that holds it to exit.
    pub async fn acquire(dir: &Path, wait: Duration) -> Result<DataDirLock, DirLockError> {
        let state = dir.join(SESSION_DIR);
        let path = state.join(LOCK_FILE);
        let open_err = |error: std::io::Error| {
            if met_link(&error) {
                DirLockError::Link {
                    path: state.clone(),
                }
            } else if let Some(file) = file_on_the_way(dir) {
                // EEXIST or ENOTDIR from deep inside create_dir_all would name neither the
                // file nor the setting.
                DirLockError::NotAFolder {
                    dir: dir.to_path_buf(),
                    file,
                }
            } else {
                DirLockError::Open {
                    path: path.clone(),
                    error,
                }
            }
        };
        // The data folder itself is the operator's setting; below it no link is followed, so a
        // planted `BITS-Sessions -> /etc` cannot make the server create files elsewhere.
        fs::create_dir_all(dir).map_err(open_err)?;
        let beneath = Beneath::open(dir).map_err(open_err)?;
        let lock = Path::new(SESSION_DIR).join(LOCK_FILE);
        beneath
            .create_dir_all(Path::new(SESSION_DIR))
            .map_err(open_err)?;
        let file = beneath
            .open_file(&lock, OFlags::WRONLY | OFlags::CREATE)
            .map_err(open_err)?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    if told {
                        info!(dir = %dir.display(), waited_ms = start.elapsed().as_millis() as u64, "the other server left the data folder");
                    }
                    return Ok(DataDirLock { _file: file });
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(open_err(e)),
            }
            if start.elapsed() >= wait {
                return Err(DirLockError::Held {
                    dir: dir.to_path_buf(),
                    path,
                    waited_s: start.elapsed().as_secs(),
                });
            }
            if !told {
                warn!(dir = %dir.display(), "another bitsfarm server holds this data folder (a pod being replaced?); waiting for it to exit");
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The data folder itself, or the nearest folder above it, when that exists and is not a folder.
fn file_on_the_way(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .find_map(|p| match fs::metadata(p) {
            Ok(m) => (!m.is_dir()).then(|| p.to_path_buf()),
            Err(_) => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first_and_then_gets_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path(), DEFAULT_WAIT)
            .await
            .unwrap();
        let err = DataDirLock::acquire(dir.path(), Duration::from_millis(300))
            .await
            .unwrap_err();
        // What an operator reads when a server gives up: who holds which folder, and what to do.
        let msg = err.to_string();
        assert!(msg.contains("another bitsfarm server"), "{msg}");
        assert!(
            msg.contains(&format!("data folder {} ", dir.path().display())),
            "the error names the folder: {msg}"
        );
        let lock = dir.path().join(SESSION_DIR).join(LOCK_FILE);
        assert!(
            msg.contains(&lock.display().to_string()),
            "the error names the lock file: {msg}"
        );
        assert!(msg.contains("a data folder of its own"), "{msg}");
        assert!(matches!(err, DirLockError::Held { .. }), "{err:?}");
        let path = dir.path().to_path_buf();
        let second =
            tokio::spawn(async move { DataDirLock::acquire(&path, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!second.is_finished(), "the second took a held folder");
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second gets the folder once the first lets go")
            .unwrap();
        assert!(got.is_ok(), "{got:?}");
    }

    #[tokio::test]
    async fn a_data_folder_that_is_a_file_or_lies_below_one_is_called_so() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_folder = dir.path().join("file");
        std::fs::write(&not_a_folder, b"x").unwrap();
        for data_dir in [not_a_folder.clone(), not_a_folder.join("below")] {
            let err = DataDirLock::acquire(&data_dir, Duration::from_millis(100))
                .await
                .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DirLockError::NotAFolder { .. }), "{err:?}");
            assert!(
                msg.contains(&format!("{} is a file", not_a_folder.display())),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn a_lock_file_that_cannot_be_made_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the lock file should be: opening it for writing fails.
        std::fs::create_dir_all(dir.path().join(SESSION_DIR).join(LOCK_FILE)).unwrap();
        let err = DataDirLock::acquire(dir.path(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, DirLockError::Open { .. }), "{err:?}");
        let lock = dir.path().join(SESSION_DIR).join(LOCK_FILE);
        assert!(
            err.to_string().contains(&lock.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_linked_session_folder_is_refused_and_nothing_is_made_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(SESSION_DIR)).unwrap();
        let err = DataDirLock::acquire(dir.path(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, DirLockError::Link { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("symbolic link") && msg.contains(SESSION_DIR),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_released_folder_is_taken_at_once_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        drop(
            DataDirLock::acquire(dir.path(), DEFAULT_WAIT)
                .await
                .unwrap(),
        );
        // No wait at all: the lock must be free the moment the first holder is dropped.
        let again = DataDirLock::acquire(dir.path(), Duration::ZERO).await;
        assert!(again.is_ok(), "{again:?}");
    }
}
