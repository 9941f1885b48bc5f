//! Delivery of a finished upload to the server application (the backend), once.
//!
//! Every delivery carries an `Idempotency-Key` derived from the upload's URL path and the SHA-256
//! of its content, so every retry, every restart and every member of a farm sends the same key for
//! the same file at the same URL; and `Repr-Digest`, so the backend can check what it got.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::beneath::Beneath;
use super::disk::io_error;
use crate::bits::protocol::{BitsError, SessionId, hresult};
use crate::config::NotifyType;

pub use crate::bits::notification::*;

/// The `Name: value` header in `path` (the first line that is not empty or a `#` comment), with
/// the value marked sensitive. Errors never include the value.
pub fn read_header_file(
    path: &Path,
) -> Result<(reqwest::header::HeaderName, reqwest::header::HeaderValue), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the header file {}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| format!("the header file {} is empty", path.display()))?;
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| format!("the header file {} must hold `Name: value`", path.display()))?;
    let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        format!(
            "the header file {} has an invalid header name",
            path.display()
        )
    })?;
    let mut value = reqwest::header::HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the header file {} has an invalid value", path.display()))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// What the backend answered, once it answered 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeliveryOutcome {
    pub idempotency_key: String,
    pub sha256: String,
    pub delivered_unix: u64,
    /// The reply lives at this URL (BITS-Static-Response-URL); none is stored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_reply_url: Option<String>,
    /// The backend asked for the upload to be put at its destination too.
    #[serde(default)]
    pub copy_to_destination: bool,
    /// True when this server did not notify because it had already delivered the same key.
    #[serde(default)]
    pub suppressed_duplicate: bool,
}

/// One notification to send.
pub struct Delivery<'a> {
    pub kind: NotifyType,
    pub url: Url,
    pub original_url: &'a str,
    pub session: &'a SessionId,
    pub key: &'a str,
    pub sha256: &'a [u8],
    /// The data folder: `data` and `reply` are below it, and reached without following links.
    pub folder: &'a Beneath,
    pub data: &'a Path,
    pub size: u64,
    /// Where the reply goes: written by us (by value) or by the backend (by reference).
    pub reply: &'a Path,
    pub timeout: Duration,
    pub sync: bool,
}

#[derive(Clone)]
pub struct Notifier {
    client: reqwest::Client,
    /// `Name: value` sent with every call (backend credentials); read at each call, never logged.
    header_file: Option<PathBuf>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    pub fn new() -> Self {
        super::tls::install_ring_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("bitsfarm/", env!("CARGO_PKG_VERSION")))
            // The backend is named by configuration; its redirects are not followed blindly.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Notifier {
            client,
            header_file: None,
        }
    }

    /// A notifier that sends the header in `header_file` with every call and, with `ca_file`,
    /// trusts only the CAs in that PEM bundle for https. Both files are checked now.
    pub fn with_credentials(
        header_file: Option<PathBuf>,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        super::tls::install_ring_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bitsfarm/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca_file {
            builder = builder.tls_certs_only(super::tls::ca_bundle(ca, "CA bundle")?);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the backend client: {e}"))?;
        if let Some(f) = &header_file {
            read_header_file(f)?;
        }
        Ok(Notifier {
            client,
            header_file,
        })
    }

    /// Sends one notification and stores the reply. A non-200 answer is relayed to the client as
    /// an application error; no answer within the timeout gives the spec's timeout error.
    pub async fn deliver(&self, d: Delivery<'_>) -> Result<(Option<String>, bool), BitsError> {
        match tokio::time::timeout(d.timeout, self.send(&d)).await {
            Ok(r) => r,
            Err(_) => {
                warn!(session = %d.session, url = %d.url, timeout_s = d.timeout.as_secs(), "the server application did not answer in time");
                Err(BitsError::application(
                    408,
                    hresult::NOTIFICATION_TIMEOUT,
                    format!(
                        "the server application did not answer within {} s; retry the last fragment",
                        d.timeout.as_secs()
                    ),
                ))
            }
        }
    }

    async fn send(&self, d: &Delivery<'_>) -> Result<(Option<String>, bool), BitsError> {
        let mut req = self
            .client
            .post(d.url.clone())
            .header(ORIGINAL_REQUEST_URL, d.original_url)
            .header("bits-session-id", d.session.as_str())
            .header(IDEMPOTENCY_KEY, d.key)
            .header(REPR_DIGEST, repr_digest(d.sha256));
        if let Some(f) = &self.header_file {
            let (name, value) = read_header_file(f).map_err(|e| {
                warn!(error = %e, "backend credentials unavailable");
                BitsError::application(
                    500,
                    hresult::E_FAIL,
                    "the backend credentials cannot be read; retry later",
                )
            })?;
            req = req.header(name, value);
        }
        if let Some(parent) = d.reply.parent() {
            d.folder.create_dir_all(parent).map_err(io_error)?;
        }
        match d.kind {
            NotifyType::ByValue => {
                let file = d
                    .folder
                    .open_file(d.data, rustix::fs::OFlags::RDONLY)
                    .map_err(io_error)?;
                let file = tokio::fs::File::from_std(file);
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    file,
                    256 << 10,
                ));
                req = req
                    .header(reqwest::header::CONTENT_LENGTH, d.size)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body);
            }
            NotifyType::ByReference => {
                req = req
                    .header(
                        REQUEST_DATAFILE_NAME,
                        path_header(&d.folder.absolute(d.data))?,
                    )
                    .header(
                        RESPONSE_DATAFILE_NAME,
                        path_header(&d.folder.absolute(d.reply))?,
                    )
                    .header(reqwest::header::CONTENT_LENGTH, 0)
                    .body(Vec::new());
            }
            NotifyType::None => return Ok((None, false)),
        }
        let resp = req.send().await.map_err(|e| {
            warn!(session = %d.session, url = %d.url, error = %e, "cannot reach the server application");
            BitsError::application(
                408,
                hresult::NOTIFICATION_TIMEOUT,
                format!("cannot reach the server application: {e}; the last fragment will be retried"),
            )
        })?;
        let status = resp.status().as_u16();
        if status != 200 {
            warn!(session = %d.session, url = %d.url, status, "the server application refused the upload");
            return Err(BitsError::application(
                status,
                0x8019_0000 + u32::from(status),
                format!("the server application answered {status}"),
            ));
        }
        let static_url = resp
            .headers()
            .get(STATIC_RESPONSE_URL)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if let Some(u) = &static_url
            && u.len() > MAX_REPLY_URL_LEN
        {
            return Err(BitsError::application(
                400,
                hresult::E_INVALIDARG,
                format!(
                    "the server application's BITS-Static-Response-URL is longer than {MAX_REPLY_URL_LEN} characters"
                ),
            ));
        }
        let copy = resp.headers().contains_key(COPY_FILE_TO_DESTINATION);
        // By value the reply is the body; by reference the backend wrote the reply file itself.
        if d.kind == NotifyType::ByValue && static_url.is_none() {
            store_reply(resp, d.folder, d.reply, d.sync).await?;
        } else if d.kind == NotifyType::ByReference
            && d.folder.metadata(d.reply).is_err()
            && static_url.is_none()
        {
            d.folder
                .write_atomic(d.reply, b"", d.sync)
                .map_err(io_error)?;
        }
        info!(session = %d.session, url = %d.url, key = d.key, static_reply = static_url.is_some(), copy, "delivered to the server application");
        Ok((static_url, copy))
    }
}

fn path_header(p: &Path) -> Result<String, BitsError> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        BitsError::internal("the data folder's path is not valid UTF-8; choose another data-dir")
    })
}

/// Writes the reply to `path` below `folder`, whole or not at all.
async fn store_reply(
    resp: reqwest::Response,
    folder: &Beneath,
    path: &Path,
    sync: bool,
) -> Result<(), BitsError> {
    let tmp: PathBuf = path.with_extension("part");
    let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::TRUNC;
    let mut f = tokio::fs::File::from_std(folder.open_file(&tmp, flags).map_err(io_error)?);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            BitsError::application(
                408,
                hresult::NOTIFICATION_TIMEOUT,
                format!("the server application's reply broke off: {e}"),
            )
        })?;
        f.write_all(&chunk).await.map_err(io_error)?;
    }
    f.flush().await.map_err(io_error)?;
    if sync {
        f.sync_data().await.map_err(io_error)?;
    }
    drop(f);
    folder.rename(&tmp, path).map_err(io_error)
}
