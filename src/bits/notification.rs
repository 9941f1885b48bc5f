//! The notification of the server application ([MC-BUP] 3.2.1.4 and IIS's headers), pure: the
//! header names a delivery carries, its stable transaction id, its digest, and where it goes.
//! The server sends them (`server::notify`) and the reference receiver reads them.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use url::Url;

use super::protocol::BitsError;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const REPR_DIGEST: &str = "repr-digest";
pub const ORIGINAL_REQUEST_URL: &str = "bits-original-request-url";
pub const REQUEST_DATAFILE_NAME: &str = "bits-request-datafile-name";
pub const RESPONSE_DATAFILE_NAME: &str = "bits-response-datafile-name";
pub const STATIC_RESPONSE_URL: &str = "bits-static-response-url";
pub const COPY_FILE_TO_DESTINATION: &str = "bits-copy-file-to-destination";
/// Longest reply URL a client accepts ([MC-BUP] 2.2.1.2).
pub const MAX_REPLY_URL_LEN: usize = 2200;

/// The stable transaction id of a delivery: the same file sent to the same URL path always gets
/// the same key, on any server. The host is left out on purpose: in a farm each member is reached
/// under its own host id.
pub fn idempotency_key(path_and_query: &str, sha256: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"bitsfarm-delivery-v1\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(sha256);
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("bf1-{hex}")
}

/// `sha-256=:<base64>:` (RFC 9530).
pub fn repr_digest(sha256: &[u8]) -> String {
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sha256)
    )
}

/// Where the notification goes: `notify_url`, resolved against the upload URL when relative, with
/// the upload URL's query string appended (as IIS does).
pub fn notification_url(notify_url: &str, upload_url: &str) -> Result<Url, BitsError> {
    let base = Url::parse(upload_url).map_err(|e| {
        BitsError::invalid(format!("the upload URL {upload_url:?} is not valid: {e}"))
    })?;
    let mut url = base.join(notify_url).map_err(|e| {
        BitsError::internal(format!(
            "the notification URL {notify_url:?} cannot be resolved: {e}; fix notify-url"
        ))
    })?;
    if let Some(q) = base.query().filter(|q| !q.is_empty()) {
        let joined = match url.query().filter(|q| !q.is_empty()) {
            Some(own) => format!("{own}&{q}"),
            None => q.to_string(),
        };
        url.set_query(Some(&joined));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_path_and_content_only() {
        let a = idempotency_key("/up/a.bin", &[1; 32]);
        assert_eq!(a, idempotency_key("/up/a.bin", &[1; 32]));
        assert_ne!(a, idempotency_key("/up/b.bin", &[1; 32]));
        assert_ne!(a, idempotency_key("/up/a.bin", &[2; 32]));
        assert!(a.starts_with("bf1-") && a.len() == 36);
    }

    #[test]
    fn digests_use_the_rfc_9530_form() {
        let d = Sha256::digest(b"hello");
        assert_eq!(
            repr_digest(&d),
            "sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:"
        );
    }

    #[test]
    fn notification_urls_resolve_like_iis() {
        let u = notification_url("/app/in", "http://h:8/up/a.bin?acct=7").unwrap();
        assert_eq!(u.as_str(), "http://h:8/app/in?acct=7");
        let u = notification_url("handle.asp", "http://h/up/dir/a.bin").unwrap();
        assert_eq!(u.as_str(), "http://h/up/dir/handle.asp");
        let u = notification_url("http://backend:9/x?k=1", "http://h/up/a.bin?acct=7").unwrap();
        assert_eq!(u.as_str(), "http://backend:9/x?k=1&acct=7");
        let u = notification_url("http://backend:9/x", "http://h/up/a.bin").unwrap();
        assert_eq!(u.as_str(), "http://backend:9/x");
    }
}
