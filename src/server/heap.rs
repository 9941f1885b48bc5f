//! How the process's allocator hands memory back to the kernel.
//!
//! Fragment bodies pass through the heap in 64 KiB pieces that are freed as soon as they are
//! written. glibc gives the free top of each thread's arena back to the kernel once it passes
//! 128 KiB (`madvise(MADV_DONTNEED)`), so the next pieces fault fresh zeroed pages in again:
//! under one 1 GiB upload that cycle was a quarter of the server's CPU time (faults inside
//! `recvfrom`, page clearing, the `madvise` itself). What a server holds at once is bounded
//! elsewhere (the in-flight body budget, one read buffer per connection), so keeping freed
//! memory for reuse costs no more than the peak the server already reaches.

/// Free memory an arena keeps before giving any back: above the in-flight body budget and the
/// read buffers of a few hundred connections together, so steady traffic never trims.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_FREE: i32 = 64 << 20;

/// Keeps freed heap memory for reuse instead of returning it to the kernel after every burst.
/// Call once, early; later calls change nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a global allocator parameter; any value is valid for it.
    unsafe {
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, KEEP_FREE);
    }
}
