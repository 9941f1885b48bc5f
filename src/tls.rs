//! The TLS setup every part of the process shares, outgoing calls included: which rustls provider
//! serves. It sits at the crate root so that the upload client gets it without importing the
//! server (`server::tls` re-exports it for the server's own code).

use std::sync::Once;

/// Installs `ring` as the process's rustls provider (reqwest's rustls uses it too). Idempotent.
pub fn install_ring_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
