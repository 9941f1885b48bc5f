//! Storage failures as the answers a client can act on, and the blocking tasks that meet them.
//! Shared by the session store and the delivery to the backend, so neither needs the other.

use std::io;

use tracing::warn;

use crate::bits::protocol::BitsError;

/// Maps an I/O failure to the answer a client can act on: a full disk is worth retrying later,
/// anything else is the server's fault.
pub fn io_error(e: io::Error) -> BitsError {
    if e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull {
        warn!(error = %e, "disk full");
        BitsError::disk_full()
    } else {
        warn!(error = %e, "storage error");
        BitsError::internal(format!("the server could not store the upload: {e}"))
    }
}

/// Runs file system work off the async workers; a task that panicked is a 500.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BitsError> + Send + 'static,
) -> Result<T, BitsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BitsError::internal(format!("a storage task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits::protocol::hresult;

    #[test]
    fn a_full_disk_is_its_own_answer() {
        for e in [
            io::Error::from_raw_os_error(28),
            io::Error::from(io::ErrorKind::StorageFull),
        ] {
            assert_eq!(io_error(e), BitsError::disk_full());
        }
    }

    #[test]
    fn other_failures_are_internal_errors_naming_the_cause() {
        let e = io_error(io::Error::from_raw_os_error(13));
        assert_eq!((e.status, e.code), (500, hresult::E_FAIL));
        assert!(e.message.contains("could not store the upload"), "{e}");
    }

    #[tokio::test]
    async fn a_panicking_task_is_an_internal_error() {
        let e = blocking::<()>(|| panic!("boom")).await.unwrap_err();
        assert_eq!((e.status, e.code), (500, hresult::E_FAIL));
        assert_eq!(blocking(|| Ok(7)).await, Ok(7));
    }
}
